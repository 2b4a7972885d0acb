"""Semantic segmentation benchmark: 2D and 3D heads on the varied phantom cohort, from the
random-weight stand-in encoder, each trained with ``finetune --semantic`` for at most ``--minutes``
(embedding included), then per-class validation Dice and the time to label a new 64-slice volume.

Both runs use the real commands in fresh processes. The 2D run embeds the cohort into an empty
store; the 3D run trains on the same cases and slices, so it reads those embeddings from the store
(its own neighbours included: every labelled slice is used) -- the store at work, and said so in
the table. The new volume is then segmented by both models: the first pays for its 64
embeddings, the second reads them.

    python benchmarks/bench_semantic.py --out benchmarks/RESULTS-semantic.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_finetune import cpu_name, stand_in

CLASSES = ("liver", "lung", "aorta", "bone", "lesion")
LARGE = ("liver", "lung", "bone")


def _run(command: list[str]) -> tuple[dict, float]:
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout), time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=10, help="slices per cohort volume")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--minutes", type=float, default=15.0, help="budget of each training run")
    parser.add_argument("--volume-slices", type=int, default=64, help="slices of the new volume segmented at the end")
    parser.add_argument("--work", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("extra", nargs="*", help="more finetune options, after --")
    args = parser.parse_args(argv)

    from medico_adapters import phantom

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-semantic-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "cohort"
    if not (data / "dataset.json").is_file():
        phantom.write_cohort(data, args.cases, (args.slices, args.size, args.size), seed=100)
    checkpoint = work / "standin_vit_b_seed0.pt"
    if not checkpoint.is_file():
        stand_in(checkpoint)
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    runs = {}
    for dims in (2, 3):
        out = work / f"run{dims}d" / f"organs{dims}d.pt"
        shutil.rmtree(out.parent, ignore_errors=True)
        report, wall = _run([
            sys.executable, "-m", "medico_adapters", "finetune", str(data), "-o", str(out), "--semantic",
            "--dims", str(dims), "--checkpoint", str(checkpoint), "--classes", ",".join(CLASSES),
            "--slices-per-case", "all", "--val-fraction", str(args.val_fraction), "--minutes", str(args.minutes),
            "--store", str(store), "--json", *args.extra,
        ])
        runs[dims] = {"report": report, "wall": wall, "record": json.loads(out.with_suffix(".json").read_text()),
                      "model": out}

    volume = work / "new_scan.nii.gz"
    phantom.write(phantom.make_phantom((args.volume_slices, args.size, args.size), seed=999, anatomy=phantom.vary(999)),
                  volume)
    inference = {}
    for dims in (2, 3):
        report, wall = _run([sys.executable, "-m", "medico_adapters", "segment", str(volume), "--model",
                             str(runs[dims]["model"]), "-o", str(work / f"labels{dims}d.nii.gz"), "--store", str(store),
                             "--json"])
        inference[dims] = {"report": report, "wall": wall}

    lines = [
        f"`python benchmarks/bench_semantic.py {' '.join(sys.argv[1:])}` -- {time.strftime('%Y-%m-%d')}, {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        f"Cohort: {args.cases} varied phantoms of {args.slices} x {args.size} x {args.size} voxels, every labelled slice, "
        f"split by case ({len(runs[2]['record']['split']['train'])} training, {len(runs[2]['record']['split']['val'])} "
        f"validation). Classes: {', '.join(CLASSES)} (+ background). Encoder: the random-weight stand-in ViT-B (seed 0), "
        f"frozen (`decoder` training). Each run stopped at {args.minutes} minutes, embedding included. Validation Dice "
        "per class over the validation slices:",
        "",
        "| class | 2D head | 3D head (1 neighbour each side) |",
        "|---|---|---|",
    ]
    per = {d: runs[d]["record"]["evaluation"]["after"]["per_class"] for d in (2, 3)}
    for name in CLASSES:
        cells = [("–" if per[d].get(name) is None else f"{per[d][name]:.3f}") for d in (2, 3)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    means = {d: sum(per[d][n] or 0 for n in LARGE) / len(LARGE) for d in (2, 3)}
    lines.append(f"| **mean of liver, lung, bone** | **{means[2]:.3f}** | **{means[3]:.3f}** |")
    lines.append(f"| mean of all classes | {runs[2]['record']['evaluation']['after']['mean']:.3f} | "
                 f"{runs[3]['record']['evaluation']['after']['mean']:.3f} |")
    lines += ["", "| run | embedding | training | whole command |", "|---|---|---|---|"]
    for d in (2, 3):
        t = runs[d]["record"]["timing"]
        emb = t["embedding_train"]
        lines.append(f"| {d}D | {emb['computed']} computed, {emb['from_store']} from the store ({emb['seconds']} s) + "
                     f"validation {t['embedding_val']['computed']} computed ({t['embedding_val']['seconds']} s) | "
                     f"{runs[d]['record']['steps']} steps, {t['train_seconds']} s | {t['total_seconds']} s |")
    lines += ["", f"Labelling a new {args.volume_slices}-slice volume ({args.size} x {args.size}) with `segment --model`:", "",
              "| model | slices embedded | read from the store | seconds |", "|---|---|---|---|"]
    for d in (2, 3):
        r = inference[d]["report"]
        lines.append(f"| {d}D | {r['embeddings']['computed']} | {r['embeddings']['from_store']} | {r['seconds']} "
                     f"(wall {inference[d]['wall']:.0f} with start-up) |")
    lines += ["", "The encoder is random: these Dice figures test the head and its training on a CPU; with MedicoSAM's "
              "encoder the features are far richer. Nothing here measures accuracy on real scans."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# Semantic segmentation on a CPU\n\n" + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
