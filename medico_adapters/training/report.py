"""The training report: Markdown a person reads, JSON a script reads, and two pictures.

``OUT-curves.png``: the training loss, validation Dice over the steps, and Dice after each
correction click, before and after training. ``OUT-slices.png``: validation slices with the
ground truth outlined and the mask from one centre click, before (top row) and after (bottom).
Everything is rendered with matplotlib's Agg backend (no display needed) and written atomically;
``OUT.pt`` and ``OUT.json`` are staged and renamed last, together.
"""

from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import numpy as np

from medico_adapters import fsio

__all__ = ["write_all", "markdown"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def _moving(values: np.ndarray, width: int) -> np.ndarray:
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def curves_png(record: dict) -> bytes:
    plt = _figure()
    history = record["history"]
    evaluation = record.get("evaluation") or {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    loss = np.array(history.get("loss") or [[0, np.nan]], dtype=float)
    axes[0].plot(loss[:, 0], loss[:, 1], color="0.75", lw=0.8, label="per step")
    width = max(1, len(loss) // 25)
    if width > 1:
        axes[0].plot(loss[width - 1:, 0], _moving(loss[:, 1], width), color="C0", lw=1.8, label=f"mean of {width}")
    axes[0].set(title="training loss", xlabel="step",
                ylabel="Dice + cross-entropy" if record.get("task") == "semantic" else "Dice + focal + IoU MSE")
    axes[0].legend(fontsize=8)
    val = np.array(history.get("val") or [], dtype=float).reshape(-1, 2)
    if len(val):
        axes[1].plot(val[:, 0], val[:, 1], "o-", color="C2", ms=3)
    before = (evaluation.get("before") or {}).get("point", {}).get("mean")
    if before is not None:
        axes[1].axhline(before, color="C3", ls="--", lw=1, label=f"before training ({before:.3f})")
        axes[1].legend(fontsize=8)
    axes[1].set(title="validation Dice, one centre click", xlabel="step", ylabel="mean Dice", ylim=(0, 1))
    for label, colour in (("before", "C3"), ("after", "C2")):
        clicks = ((evaluation.get(label) or {}).get("iterative") or {}).get("by_clicks")
        if clicks:
            axes[2].plot(range(len(clicks)), clicks, "o-", color=colour, ms=3, label=label)
    axes[2].set(title="iterative prompting", xlabel="correction clicks after the centre click", ylabel="mean Dice",
                ylim=(0, 1))
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['model']}: {record['mode']} training, {record['steps']} steps")
    if record.get("task") == "semantic":
        axes[1].set_title("validation Dice, mean over classes")
        axes[2].set_visible(False)
    return _png(fig)


def slices_png(slices, before: list[dict], after: list[dict]) -> bytes:
    plt = _figure()
    n = max(1, min(len(before), len(after)))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), squeeze=False)
    for col in range(n):
        for row, (label, masks, colour) in enumerate((("before", before, (1.0, 0.2, 0.2)), ("after", after, (0.2, 0.6, 1.0)))):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(masks):
                continue
            item = masks[col]
            s = slices[item["slice"]]
            image = s.pixels if s.pixels.ndim == 3 else np.repeat(s.pixels[:, :, None], 3, axis=2)
            overlay = image.astype(np.float32) / 255.0
            mask = item["mask"].astype(bool)
            overlay[mask] = 0.55 * overlay[mask] + 0.45 * np.array(colour)
            ax.imshow(overlay)
            ax.contour(item["truth"].astype(float), levels=[0.5], colors=["#33ff66"], linewidths=0.9)
            x, y = item["click"]
            ax.plot([x], [y], marker="*", color="yellow", ms=9, mec="black", mew=0.6)
            ax.set_title(f"{label}: {item['name']}\n{s.case} z={s.index}, Dice {item.get('dice', float('nan')):.2f}",
                         fontsize=7)
    fig.suptitle("validation slices, one centre click (green: ground truth)", fontsize=9)
    return _png(fig)


def _cell(before, after, key) -> str:
    b = (before or {}).get(key)
    a = (after or {}).get(key)
    if b is None and a is None:
        return "–"
    if b is None:
        return f"{a:.3f}"
    if a is None:
        return f"{b:.3f}"
    return f"{b:.3f} → **{a:.3f}** ({a - b:+.3f})"


def markdown(record: dict, paths) -> str:
    ev = record.get("evaluation") or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    timing = record["timing"]
    lines = [
        f"# Fine-tuning report: {record['model']}",
        "",
        f"Written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by `medico-adapters finetune`.",
        "",
        "| | |", "|---|---|",
        f"| training | {record['mode']} ({record['task']}), {record['steps']} steps, stopped by {record['stopped']}"
        + (f", resumed from step {record['resumed_from']}" if record.get("resumed_from") else "") + " |",
        f"| base checkpoint | `{record['base_checkpoint']['path']}` ({record['base_checkpoint']['arch']}, weights {record['base_checkpoint']['weights'][:16]}…) |",
        f"| data | {record['data']['layout']} in `{record['data']['root']}`: {len(record['split']['train'])} training, "
        f"{len(record['split']['val'])} validation case(s), split by case with seed {record['seed']} |",
        f"| objects | {', '.join(record['data']['objects']) if isinstance(record['data']['objects'], list) else record['data']['objects']} ({'connected parts' if record['settings']['connected'] else 'one per label value'}) |",
        f"| device | {record['device']}; embeddings by {record['encoder_backend']['backend']} {record['encoder_backend']['precision']} |",
        "",
        "## Validation Dice, before → after",
        "",
        "Fixed prompts on the validation cases: one click at each object's centre (the pixel farthest from its "
        "border), its tight box, and the centre click followed by 8 correction clicks, each at the centre of the "
        "largest error. Mean over objects of each name; **mean** is over names.",
        "",
        "| object | centre click | box | 8 corrections |",
        "|---|---|---|---|",
    ]
    names = sorted(set((before.get("point") or {}).get("per_object", {})) | set((after.get("point") or {}).get("per_object", {})))
    for name in names:
        lines.append("| " + " | ".join([
            name,
            _cell((before.get("point") or {}).get("per_object"), (after.get("point") or {}).get("per_object"), name),
            _cell((before.get("box") or {}).get("per_object"), (after.get("box") or {}).get("per_object"), name),
            _cell(((before.get("iterative") or {}).get("final") or {}).get("per_object"),
                  ((after.get("iterative") or {}).get("final") or {}).get("per_object"), name),
        ]) + " |")
    if names:
        lines.append("| **mean** | " + " | ".join([
            _cell(before.get("point"), after.get("point"), "mean"),
            _cell(before.get("box"), after.get("box"), "mean"),
            _cell((before.get("iterative") or {}).get("final"), (after.get("iterative") or {}).get("final"), "mean"),
        ]) + " |")
    else:
        lines.append("| (no validation cases: --val-fraction 0) | | | |")
    lines += _pictures_and_time(record, paths, f", {timing['passes_per_second']} mask-decoder passes/s")
    lines += [
        "",
        "## Use it",
        "",
        "```bash",
        f"medico-adapters check {paths.model.name}",
        f"medico-adapters patch napari-sam --checkpoint {paths.model.name} --name \"My model\"   # or samm, slicer-segment-with-sam, ...",
        f"medico-adapters finetune ... -o {paths.model.name} --resume --iterations N   # continue training",
        "```",
        "",
        "Dice depends on the base weights: with a random-weight stand-in it measures the training loop, not "
        "what MedicoSAM reaches.",
        "",
    ]
    return "\n".join(lines)


def write_all(paths, record: dict, state_dict: dict, slices, before_masks: list[dict], after_masks: list[dict]) -> list[Path]:
    """Write the pictures and reports of an interactive run, then the checkpoint and its record together."""
    written = [fsio.atomic_write(paths.beside("-curves.png"), curves_png(record))]
    if before_masks and after_masks:
        written.append(fsio.atomic_write(paths.beside("-slices.png"), slices_png(slices, before_masks, after_masks)))
    written.append(fsio.write_text(paths.beside("-report.json"), json.dumps(record["evaluation"], indent=2) + "\n"))
    written.append(fsio.write_text(paths.beside("-report.md"), markdown(record, paths)))
    return [*_write_model(paths, record, state_dict), *written]


def write_semantic(paths, record: dict, model_state: dict, slices, predictions: list[dict]) -> list[Path]:
    """The same for a semantic model: its curves, a few validation slices, the per-class table."""
    written = [fsio.atomic_write(paths.beside("-curves.png"), curves_png(record))]
    if predictions:
        written.append(fsio.atomic_write(paths.beside("-slices.png"), semantic_png(slices, predictions, record["classes"])))
    written.append(fsio.write_text(paths.beside("-report.json"), json.dumps(record["evaluation"], indent=2) + "\n"))
    written.append(fsio.write_text(paths.beside("-report.md"), semantic_markdown(record, paths)))
    return [*_write_model(paths, record, model_state), *written]


def _write_model(paths, record: dict, payload: dict) -> list[Path]:
    """``OUT.pt`` staged, its record (with the staged file's hash) written, then the rename."""
    from medico_adapters.checkpoint import _save_staged

    staged = _save_staged(payload, paths.model)
    try:
        fsio.write_text(paths.record, json.dumps({**record, "sha256": fsio.sha256_file(staged)}, indent=2, default=str) + "\n")
        fsio.replace(staged, paths.model)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsio.fsync_dir(paths.model.parent)
    return [paths.model, paths.record]


#: label colours for the pictures (class index -> RGB), background transparent
PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.float32) / 255


def _colour(pixels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    image = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
    out = image.astype(np.float32) / 255.0
    inside = classes > 0
    out[inside] = 0.5 * out[inside] + 0.5 * PALETTE[classes[inside] % len(PALETTE)]
    return out


def semantic_png(slices, predictions: list[dict], classes: list) -> bytes:
    plt = _figure()
    n = len(predictions)
    fig, axes = plt.subplots(2, n, figsize=(2.8 * n, 6.0), squeeze=False)
    for col, item in enumerate(predictions):
        s = slices[item["slice"]]
        for row, (label, key) in enumerate((("ground truth", "truth"), ("predicted", "predicted"))):
            ax = axes[row, col]
            ax.imshow(_colour(s.pixels, item[key]))
            ax.set_title(f"{label}\n{s.case} z={s.index}", fontsize=7)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[i % len(PALETTE)]) for i in range(1, len(classes))]
    fig.legend(handles, [name for _, name in classes[1:]], loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle("validation slices: ground truth (top), the trained head (bottom)", fontsize=9)
    return _png(fig)


def _pictures_and_time(record: dict, paths, passes: str = "") -> list[str]:
    timing = record["timing"]
    emb, val = timing["embedding_train"], timing["embedding_val"]
    return [
        "",
        f"![curves]({paths.beside('-curves.png').name})",
        "",
        f"![validation slices]({paths.beside('-slices.png').name})",
        "",
        "## Where the time went",
        "",
        f"- embedding: {emb['computed']} training slices computed, {emb.get('from_store', 0)} read from the store "
        f"({emb['seconds']} s); validation: {val['computed']} computed, {val.get('from_store', 0)} from the store "
        f"({val['seconds']} s)",
        f"- training: {timing['train_seconds']} s for {record['steps']} steps ({timing['steps_per_second']} steps/s{passes}; "
        f"{record.get('precision', {}).get('training', 'f32')} steps)",
        f"- whole run: {timing['total_seconds']} s",
    ]


def semantic_markdown(record: dict, paths) -> str:
    after = (record.get("evaluation") or {}).get("after") or {}
    lines = [
        f"# Semantic segmentation report: {record['model']}",
        "",
        f"Written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by `medico-adapters finetune --semantic`.",
        "",
        "| | |", "|---|---|",
        f"| model | {record['dims']}D head on {record['base_checkpoint']['arch']} ({record['mode']} training), "
        f"{record['steps']} steps, stopped by {record['stopped']}"
        + (f", resumed from step {record['resumed_from']}" if record.get("resumed_from") else "") + " |",
        f"| base checkpoint | `{record['base_checkpoint']['path']}` (weights {record['base_checkpoint']['weights'][:16]}…) |",
        f"| data | {record['data']['layout']} in `{record['data']['root']}`: {len(record['split']['train'])} training, "
        f"{len(record['split']['val'])} validation case(s), split by case with seed {record['seed']} |",
        f"| classes | {', '.join(f'{v} {n}' for v, n in record['classes'])} |",
        f"| normalisation | {record['window']} |",
        "",
        "## Validation Dice per class",
        "",
        "Over the validation slices (all pixels of a class pooled), after training:",
        "",
        "| class | Dice |", "|---|---|",
    ]
    for name, dice in (after.get("per_class") or {}).items():
        lines.append(f"| {name} | {'–' if dice is None else f'{dice:.3f}'} |")
    if after.get("mean") is not None:
        lines.append(f"| **mean** | **{after['mean']:.3f}** |")
    lines += _pictures_and_time(record, paths)
    lines += [
        "",
        "## Use it",
        "",
        "```bash",
        f"medico-adapters segment scan.nii.gz --model {paths.model.name} -o labels.nii.gz",
        f"medico-adapters finetune ... --semantic -o {paths.model.name} --resume --iterations N   # corrected cases added",
        "```",
        "",
    ]
    return "\n".join(lines)
