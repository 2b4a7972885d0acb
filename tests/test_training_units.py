"""Issue 20, the pieces: simulated prompts, the loss on known inputs, LoRA, the loop's checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medico_adapters.training import prompts
from medico_adapters.training.interactive import loss_terms
from medico_adapters.training.lora import LoRALinear, add_lora, lora_parameters, merge_lora


def _disc(shape=(60, 80), centre=(30, 40), radius=15):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_random_points_lie_inside_the_object():
    mask = _disc()
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = prompts.random_point(mask, rng)
        assert mask[y, x]


def test_centre_is_the_point_farthest_from_the_border():
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:55] = True  # a long bar: its centre line
    mask[10:35, 20:45] = True  # and a square hanging from it, wider: the centre is in the square
    x, y = prompts.centre(mask)
    assert 20 <= x < 45 and 10 <= y < 35 and mask[y, x]


def test_jittered_boxes_stay_near_the_object_and_inside_the_image():
    mask = _disc()
    tight = prompts.tight_box(mask)
    assert tight.tolist() == [25, 15, 55, 45]
    rng = np.random.default_rng(1)
    boxes = np.stack([prompts.jittered_box(mask, rng) for _ in range(300)])
    size = 31
    assert np.all(np.abs(boxes - tight) <= 0.1 * size + 1e-9)
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 79 and boxes[:, 3].max() <= 59
    assert np.abs(boxes - tight).max() > 1  # it does move


def test_correction_points_fall_in_the_error_region():
    truth = _disc()
    predicted = _disc(centre=(30, 48))  # shifted right: misses the left part, spills right
    missed, spilled = truth & ~predicted, predicted & ~truth
    rng = np.random.default_rng(2)
    for _ in range(100):
        (x, y), label = prompts.random_correction(truth, predicted, rng)
        assert (missed if label == 1 else spilled)[y, x]
    (x, y), label = prompts.correction(truth, np.zeros_like(truth))  # all missed: a positive click in it
    assert label == 1 and truth[y, x]
    (x, y), label = prompts.correction(truth, truth | _disc(centre=(30, 70), radius=9))  # only a spill
    assert label == 0 and not truth[y, x]
    assert prompts.correction(truth, truth)[1] == 1  # perfect: a harmless positive click


def test_loss_values_on_known_inputs():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 50  # logits far on the right side everywhere
    zero = torch.zeros(1, 1, 8, 8)
    logits = torch.cat([zero, perfect, -perfect], dim=1)  # three candidates: unsure, right, inverted
    iou_pred = torch.tensor([[0.5, 1.0, 0.0]])
    terms = loss_terms(logits, iou_pred, target)
    assert terms["best"].tolist() == [1]
    assert terms["mask"].item() == pytest.approx(0.0, abs=1e-4)
    assert terms["actual_iou"].tolist() == [[0.0, 1.0, 0.0]]  # zero logits are not > 0: an empty mask
    assert terms["iou"].item() == pytest.approx((0.5**2) / 3, abs=1e-6)
    # unsure logits: sigmoid 0.5 everywhere; Dice = 1 - 2*0.5*16 / (32 + 16), focal = 0.25 * ln 2
    dice = 1 - (2 * 0.5 * 16 + 1e-5) / (0.5 * 64 + 16 + 1e-5)
    focal = 0.25 * np.log(2)
    assert terms["dice"][0, 0].item() == pytest.approx(dice, abs=1e-5)
    assert terms["focal"][0, 0].item() == pytest.approx(focal, abs=1e-5)


def _small_encoder():
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, out_chans=32,
                              use_rel_pos=True, window_size=2, global_attn_indexes=(1,))
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.02)
            block.attn.rel_pos_w.normal_(0, 0.02)
    return encoder.eval()


def test_lora_starts_as_the_base_model_and_merges_to_the_same_outputs():
    encoder = _small_encoder()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = encoder(x)
    assert add_lora(encoder, rank=4) == 4  # qkv and proj of both blocks
    with torch.no_grad():
        assert torch.equal(encoder(x), reference)  # B starts at zero
        for p in lora_parameters(encoder):
            p.normal_(0, 0.05)
        adapted = encoder(x)
    assert (adapted - reference).abs().max() > 1e-3
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or not n.endswith((".qkv.base.weight", ".proj.base.weight")) for n in trainable)
    assert merge_lora(encoder) == 4
    assert not any(isinstance(m, LoRALinear) for m in encoder.modules())
    with torch.no_grad():
        merged = encoder(x)
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert all(k.endswith(("weight", "bias", "rel_pos_h", "rel_pos_w", "pos_embed")) and "lora" not in k
               for k in encoder.state_dict())


def test_lora_trains_and_embeds_with_the_kits_attention():
    from medico_adapters.accel import medico_sam_accel as accel

    encoder = _small_encoder()
    add_lora(encoder, rank=2)
    for p in lora_parameters(encoder):
        torch.nn.init.normal_(p, 0, 0.05)
    x = torch.randn(1, 3, 64, 64)
    encoder(x).sum().backward()  # training runs SAM's own attention: the adapters get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(encoder))
    with torch.no_grad():
        plain = encoder(x)
        assert accel.bind_sdpa_attention(encoder)  # evaluation embeds with the kit's SDPA attention
        assert (encoder(x) - plain).abs().max().item() < 1e-4


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX; the atomic rename is the same code on Windows")
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    from medico_adapters.training.loop import CHECKPOINT, _save, load_state

    _save(tmp_path, {"format": 1, "step": 7, "model": {"w": torch.ones(3)}})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from medico_adapters.training import loop

        class Dying:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)  # mid-pickle: half the file is written

        loop._save(Path({str(tmp_path)!r}), {{"format": 1, "step": 8, "model": {{"w": torch.zeros(1 << 20)}}, "x": Dying()}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    state = load_state(tmp_path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.ones(3))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != CHECKPOINT]
    assert all(name.endswith(".tmp") for name in leftovers)  # a temporary file, never the checkpoint
    _save(tmp_path, {"format": 1, "step": 9, "model": {}})  # the next save goes through
    assert load_state(tmp_path)["step"] == 9


def test_warmup_then_cosine_schedule():
    from medico_adapters.training.loop import LoopSettings

    s = LoopSettings(iterations=120, lr=1e-3, warmup=20)
    assert s.lr_at(0) == pytest.approx(5e-5) and s.lr_at(19) == pytest.approx(1e-3)
    assert s.lr_at(20) == pytest.approx(1e-3) and s.lr_at(120) == pytest.approx(1e-4)
    budget = LoopSettings(iterations=None, lr=1e-3, warmup=20)
    assert budget.lr_at(500) == pytest.approx(1e-3)  # no budget: constant after warm-up
    assert budget.lr_at(500, elapsed=0.5) == pytest.approx(5.5e-4) and budget.lr_at(900, elapsed=1.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("multimask", [True, False])
def test_training_decoder_equals_sams_mask_decoder_in_values_and_gradients(multimask):
    """``train_decoder`` (matmul upscaling, only the masks asked for) is SAM's ``MaskDecoder``."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from medico_adapters.training.interactive import train_decoder

    torch.manual_seed(0)
    decoder = MaskDecoder(transformer_dim=64, transformer=TwoWayTransformer(depth=1, embedding_dim=64, mlp_dim=128, num_heads=4))
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorm's ones and zeros would hide a mixed-up channel
    features, pe = torch.randn(1, 64, 8, 8), torch.randn(1, 64, 8, 8)
    sparse, dense = torch.randn(3, 2, 64), torch.randn(3, 64, 8, 8)  # three objects, two prompt tokens each

    def run(fn):
        decoder.zero_grad()
        masks, iou = fn()
        (masks.square().mean() + iou.sum()).backward()
        return masks.detach(), iou.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}

    ref = run(lambda: decoder(features, pe, sparse, dense, multimask_output=multimask))
    ours = run(lambda: train_decoder(decoder, features, pe, sparse, dense, multimask))
    assert ours[0].shape == ref[0].shape == (3, 3 if multimask else 1, 32, 32)
    assert torch.allclose(ours[0], ref[0], atol=1e-5) and torch.allclose(ours[1], ref[1], atol=1e-6)
    assert ours[2].keys() <= ref[2].keys()  # SAM also runs the unused mask's MLP: a zero gradient
    for name, grad in ref[2].items():
        assert torch.allclose(ours[2].get(name, torch.zeros_like(grad)), grad, atol=1e-5, rtol=1e-4), name
