"""Fine-tuning on the user's own labelled scans (``medico-adapters finetune``).

* ``data``        -- find cases (Decathlon/nnU-Net folders, image/label folders, tools' label maps),
                     check them, split them by case, cut them into slices;
* ``prompts``     -- prompts simulated from ground truth: random for training, fixed for evaluation;
* ``interactive`` -- SAM's forward with gradients, the loss, one training step, the evaluation;
* ``lora``        -- low-rank adapters on the encoder's attention, merged back into plain weights;
* ``loop``        -- the resumable loop: AdamW, warm-up, checkpoints with RNG state, time budget;
* ``report``      -- Markdown, JSON and the two pictures beside the checkpoint;
* ``finetune``    -- the command: data, embeddings (through the embedding store), train, evaluate, write.
"""
