"""``medico-adapters finetune``: labelled scans in, a checkpoint every tool loads out.

The order matters for users: everything that can be wrong with the data or the options is found
before anything is written or computed (one line naming the file); then the slices are embedded
once through the embedding store (decoder mode: the expensive part, shared with ``segment`` and
the tools); the base model is evaluated on the validation cases; the loop trains, checkpointing
as it goes; the model is evaluated again with the same prompts; and ``OUT.pt`` (a plain SAM state
dict, what ``export`` writes), ``OUT.json`` (the training record) and the report land together.

Outputs beside ``OUT.pt``: ``OUT.json``, ``OUT-report.md``, ``OUT-report.json``,
``OUT-curves.png``, ``OUT-slices.png``, and the folder ``OUT-train/`` that holds the resumable
checkpoint and the base model's evaluation (kept, so ``--resume --iterations N`` continues a
finished run).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medico_adapters import fsio
from medico_adapters.errors import MedicoError
from medico_adapters.training import data as data_mod
from medico_adapters.training.interactive import MODES, InteractiveTask, evaluate, targets_of
from medico_adapters.training.loop import LoopSettings, choose_precision, load_state, run_loop

__all__ = ["FinetuneSettings", "OutputPaths", "embed_slices", "finetune"]

RECORD_FORMAT = 1
DEFAULT_ITERATIONS = 500
REPORT_MASKS = 6  # validation objects pictured before/after in the report


@dataclass
class FinetuneSettings:
    mode: str = "decoder"
    objects: tuple[str, ...] | None = None
    connected: bool = False
    min_pixels: int = 10
    slices_per_case: int | None = 12
    val_fraction: float = 0.2
    window: str | tuple[float, float] | None = "auto"
    iterations: int | None = None
    minutes: float | None = None
    seed: int = 0
    lr: float = 1e-3
    warmup: int = 20
    objects_per_step: int = 2
    rounds: int = 2
    mask_prob: float = 0.5
    lora_rank: int = 4
    val_every: int = 100
    checkpoint_minutes: float = 5.0
    checkpoint_every: int | None = None
    semantic: bool = False
    dims: int = 2
    context: int = 1  # --dims 3: neighbouring slices on each side
    batch: int = 2  # semantic: slices per step
    width: int = 96  # semantic: channels of the head's first stage
    precision: str = "auto"  # training steps: "auto" (bf16 autocast where the hardware has it), "f32", "bf16"

    def loop(self, device: str = "cpu") -> LoopSettings:
        iterations = self.iterations if self.iterations is not None else (None if self.minutes else DEFAULT_ITERATIONS)
        return LoopSettings(iterations=iterations, lr=self.lr, warmup=self.warmup, seed=self.seed,
                            val_every=self.val_every, checkpoint_minutes=self.checkpoint_minutes,
                            checkpoint_every=self.checkpoint_every, device=device,
                            precision=choose_precision(self.precision, device)[0])

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues (the budget may change)."""
        skip = {"iterations", "minutes", "checkpoint_minutes", "checkpoint_every"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class OutputPaths:
    model: Path

    @classmethod
    def of(cls, out: str | os.PathLike) -> OutputPaths:
        path = Path(out)
        if path.suffix.lower() not in (".pt", ".pth"):
            raise MedicoError(f"{path}: name the output checkpoint with .pt or .pth")
        if path.is_dir():
            raise MedicoError(f"{path}: is a folder; give a file name for the checkpoint")
        return cls(path)

    def beside(self, tail: str) -> Path:
        return self.model.with_name(self.model.stem + tail)

    @property
    def record(self) -> Path:
        return self.model.with_suffix(".json")

    @property
    def work(self) -> Path:
        return self.beside("-train")


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{math.ceil(hours / 24)} days"


# -- embedding ----------------------------------------------------------------------------------
class LazyPredictor:
    """The kit's predictor for ``ckpt``, built only when a slice is not in the store yet (a resumed
    or repeated run then never loads an encoder, nor compiles one)."""

    def __init__(self, ckpt, *, device: str, backend: str = "auto") -> None:
        from medico_adapters.embeddings.store import state_identity

        self.ckpt, self.device, self.backend = ckpt, device, backend
        self.store_model = state_identity(ckpt.state_dict)
        self._predictor = None

    def get(self):
        if self._predictor is None:
            from medico_adapters.predictor import Predictor

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._predictor = Predictor(self.ckpt, device=self.device, exact=True, backend=self.backend)
        return self._predictor

    def describe(self) -> dict:
        if self._predictor is None:
            return {"backend": "none (every embedding came from the store)", "precision": "f32"}
        return self._predictor.describe()


def embed_pixels(lazy: LazyPredictor, images, store, *, progress: bool = True, desc: str = "embedding") -> tuple[list, dict]:
    """Each image's embedding (uint8 pixels), computed once through the store; and timing counts."""
    from tqdm import tqdm

    from medico_adapters.embeddings.store import input_size
    from medico_adapters.predictor import Embedding, as_rgb

    out, computed, started = [], 0, time.monotonic()
    for pixels in tqdm(images, desc=desc, unit="slice", disable=not progress or len(images) < 2, leave=False):
        rgb = as_rgb(pixels)
        size = input_size(*rgb.shape[:2])

        def compute(rgb=rgb) -> np.ndarray:
            nonlocal computed
            computed += 1
            return lazy.get().embed(rgb).features.cpu().numpy()

        features = store.get_or_compute(store.key(lazy.store_model, rgb, size), compute)
        out.append(Embedding(torch.from_numpy(features), tuple(rgb.shape[:2]), size))
    seconds = time.monotonic() - started
    return out, {"slices": len(images), "computed": computed, "from_store": len(images) - computed,
                 "seconds": round(seconds, 2), "seconds_per_computed": round(seconds / computed, 3) if computed else None}


def embed_slices(lazy: LazyPredictor, slices, store, *, progress: bool = True, desc: str = "embedding") -> tuple[list, dict]:
    """``embed_pixels`` of training slices."""
    return embed_pixels(lazy, [s.pixels for s in slices], store, progress=progress, desc=desc)


def _prepare(sam, pixels, device):
    """Resized, normalised, padded encoder inputs of slices' ``pixels`` (lora/full train the encoder on them)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    from medico_adapters.predictor import as_rgb

    transform = ResizeLongestSide(sam.image_encoder.img_size)
    prepared = []
    for image in pixels:
        rgb = as_rgb(image)
        resized = transform.apply_image(rgb)
        tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
        prepared.append((sam.preprocess(tensor.to(device)).cpu(), tuple(resized.shape[:2]), tuple(rgb.shape[:2])))
    return prepared


@torch.no_grad()
def _encode_all(sam, prepared, device, progress: bool) -> list:
    """``Embedding``s by the model being trained (lora/full), for evaluation."""
    from tqdm import tqdm

    from medico_adapters.accel import medico_sam_accel as accel
    from medico_adapters.predictor import Embedding

    accel.bind_sdpa_attention(sam.image_encoder)
    return [Embedding(sam.image_encoder(image.to(device)).float(), original, input_size)
            for image, input_size, original in tqdm(prepared, desc="embedding (trained encoder)", unit="slice",
                                                   disable=not progress, leave=False)]


# -- the command --------------------------------------------------------------------------------
def _check_resume(paths: OutputPaths, resume: bool) -> dict | None:
    state = load_state(paths.work)
    if state is not None and not resume:
        raise MedicoError(f"{paths.work}: holds a training run; pass --resume to continue it, or remove the folder to start over")
    if state is None and resume:
        raise MedicoError(f"{paths.work}: nothing to resume (no checkpoint.pt); run without --resume")
    return state


def _same_run(state: dict, identity: dict, paths: OutputPaths) -> None:
    before = state.get("identity", {})
    old, new = before.get("settings") or {}, identity["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise MedicoError(f"{paths.work}: the run was started with other options ({', '.join(changed[:4])}); "
                          "resume with the same options, or remove the folder to start over")
    if (before.get("base") or {}).get("weights") != identity["base"]["weights"]:
        raise MedicoError(f"{paths.work}: the run started from other weights than {identity['base']['path']}; "
                          "resume with the same --checkpoint, or remove the folder to start over")


def _base_checkpoint(checkpoint):
    from medico_adapters.checkpoint import load_checkpoint, require_loadable
    from medico_adapters.segment import default_checkpoint

    ckpt = load_checkpoint(checkpoint if checkpoint is not None else default_checkpoint())
    require_loadable(ckpt)
    if ckpt.info.arch == "vit_t":
        raise MedicoError(f"{ckpt.info.path}: MobileSAM (vit_t) is not trained by this kit; use a ViT-B/L/H checkpoint")
    return ckpt


@dataclass
class _Prepared:
    """What both tasks start from: the checked data, the split, the base weights, the store."""

    settings: FinetuneSettings
    paths: OutputPaths
    state: dict | None
    dataset: data_mod.Dataset
    object_values: tuple[int, ...] | None
    train_names: list[str]
    val_names: list[str]
    train_slices: list
    val_slices: list
    records: dict
    ckpt: object
    base: dict
    identity: dict
    device: str
    started: float
    deadline: float | None
    say: Callable[[str], object] = print

    def step_estimate(self) -> Callable[[float, int | None], object] | None:
        """For lora/full on a CPU: after the first step, the time the run will take (one line)."""
        if self.settings.mode == "decoder" or torch.device(self.device).type != "cpu":
            return None

        def say_estimate(seconds: float, left: int | None) -> None:
            if left is None:
                self.say(f"the first step took {seconds:.0f} s: --minutes allows about "
                         f"{max(0.0, (self.deadline or 0) - time.monotonic()) / max(seconds, 1e-9):.0f} more steps")
            elif left == 0:
                self.say(f"the first step took {seconds:.0f} s")
            else:
                self.say(f"the first step took {seconds:.0f} s: the {left} steps left need about "
                         f"{_duration(left * seconds)} on this CPU (Ctrl-C saves; --resume goes on)")

        return say_estimate


def _prepare_run(data, out, checkpoint, labels, settings, resume, device) -> _Prepared:
    """Everything that can be wrong with the data or the options, found before anything is written."""
    from medico_adapters.device import select_device
    from medico_adapters.predictor import checkpoint_identity

    started = time.monotonic()
    if settings.mode not in MODES:
        raise MedicoError(f"--train {settings.mode!r}: use one of {', '.join(MODES)}")
    if settings.dims not in (2, 3):
        raise MedicoError(f"--dims {settings.dims}: use 2 (slice by slice) or 3 (with neighbouring slices)")
    if settings.iterations is not None and settings.iterations < 1:
        raise MedicoError(f"--iterations {settings.iterations}: give at least 1")
    if settings.minutes is not None and settings.minutes <= 0:
        raise MedicoError(f"--minutes {settings.minutes}: give a positive time budget")
    paths = OutputPaths.of(os.path.abspath(out))
    state = _check_resume(paths, resume)
    dataset = data_mod.discover(os.path.abspath(data), None if labels is None else os.path.abspath(labels))
    object_values = data_mod.resolve_objects(settings.objects, dataset.label_names)
    previous_split = state["identity"]["split"] if state is not None else None
    train_names, val_names = data_mod.split_cases([c.name for c in dataset.cases], settings.val_fraction,
                                                  settings.seed, previous_split)
    by_name = {c.name: c for c in dataset.cases}
    load = dict(objects=object_values, slices_per_case=settings.slices_per_case, window=settings.window,
                context=settings.context if settings.semantic and settings.dims == 3 else 0)
    train_slices, train_record = data_mod.load_slices(dataset, [by_name[n] for n in train_names], **load)
    val_slices, val_record = data_mod.load_slices(dataset, [by_name[n] for n in val_names], **load)
    ckpt = _base_checkpoint(checkpoint)
    base = {"path": str(ckpt.info.path), "arch": ckpt.info.arch, "weights": checkpoint_identity(ckpt.state_dict)}
    split = {**{n: "train" for n in train_names}, **{n: "val" for n in val_names}}
    identity = {"settings": settings.identity(), "base": base, "split": split}
    if state is not None:
        _same_run(state, identity, paths)
    return _Prepared(settings, paths, state, dataset, object_values, train_names, val_names, train_slices, val_slices,
                     {"train": train_record, "val": val_record}, ckpt, base, identity, select_device(device), started,
                     started + settings.minutes * 60 if settings.minutes else None)


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    settings: FinetuneSettings | None = None,
    resume: bool = False,
    device: str | None = None,
    store_root: str | os.PathLike | None = None,
    backend: str = "auto",
    progress: bool = True,
    say: Callable[[str], object] = lambda line: None,
) -> dict:
    """Fine-tune SAM on the labelled scans in ``data`` and write ``out`` (see the module docstring)."""
    from medico_adapters.embeddings.store import EmbeddingStore

    run = _prepare_run(data, out, checkpoint, labels, settings or FinetuneSettings(), resume, device)
    run.say = say
    for note in run.dataset.notes:
        say(note)
    say(f"{run.dataset.layout} data in {run.dataset.root}: {len(run.train_names)} training case(s), "
        f"{len(run.val_names)} validation case(s); {len(run.train_slices)} + {len(run.val_slices)} slices")
    if run.settings.mode != "decoder" and torch.device(run.device).type == "cpu":
        say(f"--train {run.settings.mode} runs the image encoder in every step: on a CPU that is tens of seconds per "
            "step (a GPU job); the first steps' time is in the progress bar")
    store = EmbeddingStore(store_root)
    lazy = LazyPredictor(run.ckpt, device=run.device, backend=backend)
    if run.settings.semantic:
        from medico_adapters.training.semantic_run import train_semantic

        return train_semantic(run, lazy, store, progress)
    return _train_interactive(run, lazy, store, progress)


def _train_interactive(run: _Prepared, lazy: LazyPredictor, store, progress: bool) -> dict:
    from medico_adapters.predictor import _build_sam, checkpoint_identity

    settings, paths, state, device = run.settings, run.paths, run.state, run.device
    names = dict(run.dataset.label_names)
    train_targets = targets_of(run.train_slices, names, connected=settings.connected, min_pixels=settings.min_pixels)
    val_targets = targets_of(run.val_slices, names, connected=settings.connected, min_pixels=settings.min_pixels)
    if not any(train_targets):
        raise MedicoError(f"{run.dataset.root}: no training object of at least {settings.min_pixels} pixels")

    # embeddings: once per slice, through the store the whole kit shares
    train_emb, train_embed_stats = embed_slices(lazy, run.train_slices, store, progress=progress) \
        if settings.mode == "decoder" else ([], _NO_EMBEDDING)
    val_emb, val_embed_stats = embed_slices(lazy, run.val_slices, store, progress=progress, desc="embedding (validation)")
    encoder_backend = lazy.describe()
    sam = _build_sam(run.ckpt).to(device)
    features = train_emb if settings.mode == "decoder" else _prepare(sam, [s.pixels for s in run.train_slices], device)

    # the base model on the validation cases (kept in the work folder: resuming does not redo it)
    paths.work.mkdir(parents=True, exist_ok=True)
    before_file = paths.work / "before.json"
    before, before_masks, eval_seconds = None, [], 0.0
    if any(val_targets):
        if state is not None and before_file.is_file():
            before = json.loads(before_file.read_text("utf-8"))
            before_masks = _load_masks(paths.work / "before-masks.npz", before.pop("masks_meta", []))
            eval_seconds = before.pop("seconds", 0.0)
        else:
            tick = time.monotonic()
            before = evaluate(sam, val_targets, val_emb, keep_masks=REPORT_MASKS)
            eval_seconds = time.monotonic() - tick
            before_masks = before.pop("masks")
            _save_masks(paths.work / "before-masks.npz", before_masks)
            fsio.write_text(before_file, json.dumps({**before, "masks_meta": _masks_meta(before_masks),
                                                     "seconds": eval_seconds}))

    task = InteractiveTask(sam, settings.mode, train_targets, run.train_slices, features, val_targets, val_emb,
                           objects_per_step=settings.objects_per_step, rounds=settings.rounds,
                           mask_prob=settings.mask_prob, lora_rank=settings.lora_rank, device=device)
    # leave time for the evaluation after training (as long as the one before) and for writing
    reserve = 1.2 * eval_seconds + WRITE_SECONDS + (0 if settings.mode == "decoder" else 8 * len(run.val_slices))
    result = run_loop(task, settings.loop(device), paths.work, identity=run.identity, state=state,
                      deadline=None if run.deadline is None else run.deadline - reserve, progress=progress,
                      on_first_step=run.step_estimate())

    # the trained model: encoder adapters folded in, evaluated with the same prompts
    if settings.mode == "lora":
        from medico_adapters.training.lora import merge_lora

        merge_lora(sam.image_encoder)
    eval_features = val_emb if settings.mode == "decoder" else _encode_all(sam, _prepare(sam, [s.pixels for s in run.val_slices], device), device, progress)
    after = evaluate(sam, val_targets, eval_features, keep_masks=REPORT_MASKS) if before is not None else None

    from medico_adapters.training import report as report_mod

    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in sam.state_dict().items()}
    record = _record(run, result, "interactive", encoder_backend, train_embed_stats, val_embed_stats)
    record["evaluation"] = {"before": before, "after": _without_masks(after)}
    record["weights"] = checkpoint_identity(state_dict)
    written = report_mod.write_all(run.paths, record, state_dict, run.val_slices, before_masks,
                                   after.get("masks", []) if after else [])
    return _summary(run, record, written)


_NO_EMBEDDING = {"slices": 0, "computed": 0, "from_store": 0, "seconds": 0.0, "seconds_per_computed": None}
WRITE_SECONDS = 10.0  # the checkpoint, the record and the pictures


def _record(run: _Prepared, result, task: str, encoder_backend: dict, train_embed: dict, val_embed: dict) -> dict:
    names = run.dataset.label_names
    history = result.history
    train_seconds = max(history["train_seconds"], 1e-9)
    return {
        "format": RECORD_FORMAT, "kind": "medico-adapters finetune", "model": run.paths.model.name,
        "task": task, "mode": run.settings.mode, "settings": asdict(run.settings), "seed": run.settings.seed,
        "base_checkpoint": run.base, "device": str(run.device), "encoder_backend": encoder_backend,
        "precision": dict(zip(("training", "why"), choose_precision(run.settings.precision, run.device), strict=True)),
        "data": {**run.dataset.describe(),
                 "objects": [names.get(v, str(v)) for v in run.object_values] if run.object_values else "all",
                 **run.records},
        "split": {"train": run.train_names, "val": run.val_names},
        "steps": result.steps, "stopped": result.stopped, "resumed_from": result.resumed_from,
        "history": history,
        "timing": {"embedding_train": train_embed, "embedding_val": val_embed,
                   "train_seconds": round(history["train_seconds"], 2), "passes": history["passes"],
                   "passes_per_second": round(history["passes"] / train_seconds, 3),
                   "steps_per_second": round(result.steps / train_seconds, 3),
                   "total_seconds": round(time.monotonic() - run.started, 2)},
    }


def _summary(run: _Prepared, record: dict, written: list) -> dict:
    return {**{k: record[k] for k in ("model", "task", "mode", "steps", "stopped", "timing", "evaluation", "split")},
            "output": str(run.paths.model), "files": [str(p) for p in written], "work": str(run.paths.work)}


def _without_masks(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "masks"}


def _masks_meta(masks: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("mask", "truth")} for m in masks]


def _save_masks(path: Path, masks: list[dict]) -> None:
    arrays = {f"{kind}{i}": m[kind] for i, m in enumerate(masks) for kind in ("mask", "truth")}
    fsio.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _load_masks(path: Path, meta: list[dict]) -> list[dict]:
    try:
        with np.load(path) as stored:
            return [{**m, "mask": stored[f"mask{i}"], "truth": stored[f"truth{i}"]} for i, m in enumerate(meta)]
    except (OSError, KeyError, ValueError):
        return []
