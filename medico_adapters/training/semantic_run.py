"""``finetune --semantic``: the semantic head trained on the checked data ``finetune`` prepared.

The class table comes from the data: label value 0 is the background, then each chosen value (or
every value found) with its name from ``dataset.json`` or the segmentation file. The embeddings of
every slice a sample needs (3D: its neighbours too) come from the store, so the interactive
``finetune``, ``segment`` and the tools share them. Before training there is nothing to measure
(the head is random); after it, the Dice of each class over the validation slices.
"""

from __future__ import annotations

import numpy as np
import torch

from medico_adapters.errors import MedicoError
from medico_adapters.io import MICROSAM
from medico_adapters.training.finetune import (
    _NO_EMBEDDING,
    WRITE_SECONDS,
    _encode_all,
    _prepare,
    _Prepared,
    _record,
    _summary,
    embed_pixels,
)
from medico_adapters.training.loop import run_loop
from medico_adapters.training.semantic import (
    SemanticHead,
    SemanticModel,
    SemanticTask,
    build_samples,
)

__all__ = ["class_table", "train_semantic", "window_of"]


def class_table(run: _Prepared) -> list[tuple[int, str]]:
    values = run.object_values
    if values is None:
        found = set()
        for s in (*run.train_slices, *run.val_slices):
            found.update(int(v) for v in np.unique(s.labels) if v)
        values = tuple(sorted(found))
    names = run.dataset.label_names
    return [(0, "background"), *((v, names.get(v, f"label {v}")) for v in values)]


def window_of(run: _Prepared):
    """How the slices were normalised, as ``io.normalise`` takes it back at inference."""
    methods = {json_key(r["normalisation"]) for record in run.records.values() for r in record.values()}
    if len(methods) > 1:
        raise MedicoError(f"{run.dataset.root}: cases were normalised differently ({', '.join(sorted(map(str, methods)))}); "
                          "pass --window to use one normalisation for all")
    return methods.pop() if methods else None


def json_key(norm: dict):
    """``io.normalise``'s record of a slice's normalisation, as the ``window`` it takes (None: uint8 kept)."""
    if norm.get("method") == "window":
        return norm["name"] if norm.get("name") != "custom" else (norm["width"], norm["level"])
    return norm["method"] if norm.get("method") in ("percentile", MICROSAM) else None


def _unique_slices(slices) -> dict[tuple[str, int], np.ndarray]:
    pixels = {}
    for s in slices:
        pixels[(s.case, s.index)] = s.pixels
        for z, near in s.neighbours.items():
            pixels.setdefault((s.case, z), near)
    return pixels


def train_semantic(run: _Prepared, lazy, store, progress: bool) -> dict:
    from medico_adapters.predictor import _build_sam
    from medico_adapters.training import report as report_mod

    settings, device = run.settings, run.device
    classes = class_table(run)
    if len(classes) < 2:
        raise MedicoError(f"{run.dataset.root}: no labelled class to learn")
    window = window_of(run)
    table = [[v, n] for v, n in classes]
    if run.state is not None and run.state["identity"].get("classes", table) != table:
        raise MedicoError(f"{run.paths.work}: the run learnt classes {run.state['identity']['classes']}, the data now gives "
                          f"{table}; name them with --classes to keep the table")
    run.identity["classes"] = table
    values = [v for v, _ in classes]
    context = settings.context if settings.dims == 3 else 0
    train_pixels, val_pixels = _unique_slices(run.train_slices), _unique_slices(run.val_slices)

    sam = None
    encoder_inputs = None
    if settings.mode == "decoder":
        train_emb, train_stats = embed_pixels(lazy, list(train_pixels.values()), store, progress=progress)
        train_by_key = dict(zip(train_pixels, train_emb, strict=True))
    else:
        train_stats, train_by_key = _NO_EMBEDDING, {}
        sam = _build_sam(run.ckpt).to(device)
        prepared = _prepare(sam, list(train_pixels.values()), device)
        encoder_inputs = dict(zip(train_pixels, prepared, strict=True))
    val_emb, val_stats = embed_pixels(lazy, list(val_pixels.values()), store, progress=progress, desc="embedding (validation)")
    val_by_key = dict(zip(val_pixels, val_emb, strict=True))
    encoder_backend = lazy.describe()

    torch.manual_seed(settings.seed)
    head = SemanticHead(len(classes), settings.dims, context, settings.width)
    extra = []
    if settings.mode != "decoder":
        from medico_adapters.training.lora import encoder_trainables

        extra = encoder_trainables(sam, settings.mode, settings.lora_rank, device)
    train_samples = build_samples(run.train_slices, train_by_key, values, context, encoder_inputs)
    val_samples = build_samples(run.val_slices, val_by_key, values, context)
    task = SemanticTask(head, classes, train_samples, val_samples, batch=settings.batch, device=device,
                        encoder=sam, extra_params=extra)
    eval_reserve = 0.05 * len(val_samples) + WRITE_SECONDS + (0 if settings.mode == "decoder" else 8 * len(val_pixels))
    result = run_loop(task, settings.loop(device), run.paths.work, identity=run.identity, state=run.state,
                      deadline=None if run.deadline is None else run.deadline - eval_reserve, progress=progress,
                      on_first_step=run.step_estimate())

    if sam is not None:  # lora/full: the trained encoder embeds the validation slices again
        if settings.mode == "lora":
            from medico_adapters.training.lora import merge_lora

            merge_lora(sam.image_encoder)
        encoded = _encode_all(sam, _prepare(sam, list(val_pixels.values()), device), device, progress)
        val_samples = build_samples(run.val_slices, dict(zip(val_pixels, encoded, strict=True)), values, context)
    after = task.evaluate(val_samples) if val_samples else None
    predictions = _pictures(task, run.val_slices, val_samples)

    sam_state = run.ckpt.state_dict if sam is None else {k: v.detach().cpu() for k, v in sam.state_dict().items()}
    record = _record(run, result, "semantic", encoder_backend, train_stats, val_stats)
    record["classes"] = table
    record["dims"] = settings.dims
    record["window"] = list(window) if isinstance(window, tuple) else window
    record["evaluation"] = {"before": None, "after": after}
    model = SemanticModel(head.cpu().eval(), classes, window, sam_state,
                          trained={"record": run.paths.record.name, "steps": result.steps, "mode": settings.mode,
                                   "validation": after, "base_weights": run.base["weights"]})
    written = report_mod.write_semantic(run.paths, record, model.state(), run.val_slices, predictions)
    return _summary(run, record, written)


@torch.no_grad()
def _pictures(task: SemanticTask, slices, samples, count: int = 4) -> list[dict]:
    """Predicted class maps of a few validation slices, spread over them, for the report."""
    if not samples:
        return []
    picks = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(count, len(samples)))})
    task.head.eval()
    out = [{"slice": i, "predicted": task.logits(samples[i]).argmax(1)[0].cpu().numpy(), "truth": samples[i][2]}
           for i in picks]
    task.head.train()
    return out

