"""The training loop every ``finetune`` runs, resumable to the same weights.

Read it as nanoGPT's ``train.py``: settings in one dataclass, one loop, and a checkpoint that holds
everything the loop's future depends on -- the trainable weights, AdamW's state, the step, the
numpy generator that draws slices, objects and prompts, torch's generator, and the history. A
run resumed from a checkpoint therefore takes exactly the steps the uninterrupted run would have
taken and ends with the same weights (on the same machine and thread count: float sums are
not associative, so another CPU may differ in the last bits).

The checkpoint is written atomically (temporary file, fsync, rename) every few minutes, at the
end, and when Ctrl-C stops the run; ``kill -9`` at any moment leaves the previous one loadable.
What one step does is the task's business (``InteractiveTask``, ``SemanticTask``): ``step(rng,
step)`` computes a loss and backpropagates it, ``validate()`` returns a score or None.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medico_adapters import fsio
from medico_adapters.errors import MedicoError, TrainingInterrupted

__all__ = ["CHECKPOINT", "LoopSettings", "LoopResult", "TrainingInterrupted", "load_state", "run_loop"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


@dataclass
class LoopSettings:
    """What shapes the optimisation. ``iterations`` (total steps) and ``deadline`` (a
    ``time.monotonic()`` value) stop it, whichever comes first."""

    iterations: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    seed: int = 0
    val_every: int = 50
    clip: float = 1.0
    checkpoint_minutes: float = 5.0
    checkpoint_every: int | None = None  # also every N steps (tests use it)
    precision: str = "f32"  # "bf16": steps under autocast (weights and AdamW stay f32)
    device: str = "cpu"

    def lr_at(self, step: int, elapsed: float | None = None) -> float:
        """Linear warm-up, then cosine decay to a tenth over ``iterations``, or, for a run stopped by
        a time budget only, over that time (``elapsed``: the budget's fraction used so far)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.iterations and self.iterations > self.warmup:
            progress = min(1.0, (step - self.warmup) / (self.iterations - self.warmup))
        elif elapsed is not None:
            progress = min(1.0, max(0.0, elapsed))
        else:
            return self.lr
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class LoopResult:
    steps: int
    stopped: str  # "iterations", "time budget" or "interrupted"
    seconds: float
    history: dict = field(default_factory=dict)
    resumed_from: int | None = None


def _save(folder: Path, state: dict) -> Path:
    return fsio.atomic_write(folder / CHECKPOINT, lambda f: torch.save(state, f))


def load_state(folder: Path) -> dict | None:
    """The checkpoint in ``folder``, or None when there is none."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file is reported, never half-used
        raise MedicoError(f"{path}: the training checkpoint cannot be read ({type(e).__name__}); remove it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedicoError(f"{path}: not a checkpoint of this kit's training (format {state.get('format') if isinstance(state, dict) else '?'})")
    return state


def _autocast(settings: LoopSettings):
    if settings.precision == "f32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    return torch.autocast(torch.device(settings.device).type, dtype=dtype)


def choose_precision(requested: str, device: str, *, flags=None) -> tuple[str, str]:
    """The training precision and why: ``auto`` is bf16 autocast where the hardware has bf16 (a CPU
    with AVX512-BF16 or AMX, read from its flags now; a CUDA GPU that supports it), else f32."""
    if requested in ("f32", "bf16"):
        return requested, "asked for"
    kind = torch.device(device).type
    if kind == "cuda":
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("f32", "CUDA without bf16")
    if kind != "cpu":
        return "f32", f"{kind}: f32"
    from medico_adapters.accel import medico_sam_accel as accel

    if accel.native_bf16(accel.cpu_flags() if flags is None else flags):
        return "bf16", "the CPU has native bf16 (AVX512-BF16/AMX)"
    return "f32", "no native bf16 on this CPU (emulated bf16 is slower than f32)"


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Ctrl-C sets a flag the loop reads between steps, so the checkpoint it then saves is the
    state after a whole step (an interrupt inside AdamW's update would save half-updated weights).
    A second Ctrl-C stops at once, as Python normally does."""
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield lambda: False
        return
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_loop(
    task,
    settings: LoopSettings,
    folder: Path,
    *,
    identity: dict,
    state: dict | None = None,
    deadline: float | None = None,
    progress: bool = True,
    on_first_step: Callable[[float, int | None], object] | None = None,
) -> LoopResult:
    """Train ``task`` until ``settings.iterations`` or ``deadline``; resume from ``state`` if given.

    ``identity`` (mode, data, base weights...) is stored in the checkpoint; the caller compares
    it when resuming. Returns when done; Ctrl-C saves and raises ``TrainingInterrupted``.
    ``on_first_step(seconds, steps_left)`` hears how long this process's first step took.
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    optimiser = torch.optim.AdamW(task.params, lr=settings.lr, weight_decay=settings.weight_decay)
    history: dict = {"loss": [], "val": [], "passes": 0, "train_seconds": 0.0}
    step = 0
    resumed_from = None
    if state is not None:
        task.load_trainable_state(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        history = state["history"]
        step = resumed_from = int(state["step"])

    def checkpoint() -> None:
        _save(folder, {
            "format": FORMAT, "identity": identity, "settings": asdict(settings), "step": step,
            "model": task.trainable_state(), "optimizer": optimiser.state_dict(),
            "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}, "history": history,
        })

    started = time.monotonic()
    last_save = started
    stopped = "iterations"
    bar = tqdm(total=settings.iterations, initial=step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    smoothed = None
    with _ctrl_c_between_steps() as asked_to_stop:
        while settings.iterations is None or step < settings.iterations:
            if asked_to_stop():
                bar.close()
                checkpoint()
                raise TrainingInterrupted(f"interrupted at step {step}; the checkpoint is in {folder}: run the same "
                                          "command with --resume to continue")
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "time budget"
                break
            elapsed = None if deadline is None else (time.monotonic() - started) / max(deadline - started, 1e-9)
            for group in optimiser.param_groups:
                group["lr"] = settings.lr_at(step, elapsed)
            tick = time.monotonic()
            optimiser.zero_grad(set_to_none=True)
            with _autocast(settings):
                losses = task.step(rng, step)
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(task.params, settings.clip)
            optimiser.step()
            step += 1
            history["train_seconds"] += time.monotonic() - tick
            if on_first_step is not None:
                on_first_step(time.monotonic() - tick, None if settings.iterations is None else settings.iterations - step)
                on_first_step = None
            history["passes"] += int(losses.get("passes", 1))
            history["loss"].append([step, round(losses["loss"], 6)])
            smoothed = losses["loss"] if smoothed is None else 0.9 * smoothed + 0.1 * losses["loss"]
            if settings.val_every and step % settings.val_every == 0:
                score = task.validate()
                if score is not None:
                    history["val"].append([step, round(score, 6)])
            postfix = {"loss": f"{smoothed:.3f}"}
            if history["val"]:
                postfix["val_dice"] = f"{history['val'][-1][1]:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            now = time.monotonic()
            if (now - last_save >= settings.checkpoint_minutes * 60
                    or (settings.checkpoint_every and step % settings.checkpoint_every == 0)):
                checkpoint()
                last_save = now
    bar.close()
    if not history["val"] or history["val"][-1][0] != step:
        score = task.validate()
        if score is not None:
            history["val"].append([step, round(score, 6)])
    checkpoint()
    return LoopResult(step, stopped, time.monotonic() - started, history, resumed_from)
