"""Fine-tuning benchmark: a varied CT-like phantom cohort, the random-weight stand-in ViT-B, a
``decoder`` run of at most ``--minutes`` (embedding included), held-out Dice before and after.

It runs the real command (``medico-adapters finetune ... --json``) in a fresh process, so what is
measured is what a user gets: the cohort is written as a Decathlon folder, the stand-in is saved
as a checkpoint file, the embedding store starts empty (``--warm-store`` reuses it), and the
figures come from the run's own record (``OUT.json``). The table goes to stdout and, with
``--out``, to a Markdown file (benchmarks/RESULTS-finetune.md is one such run).

The stand-in's encoder is random: its features are a hard test of the training loop, and the
Dice it reaches says nothing about what MedicoSAM reaches on real scans.

    python benchmarks/bench_finetune.py --out benchmarks/RESULTS-finetune.md
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
from bench_predictor import _cpu_name as cpu_name  # benchmarks/ is this script's folder

ORGANS = ("liver", "lung", "aorta", "bone", "lesion")


def stand_in(path: Path, seed: int = 0) -> Path:
    from segment_anything import build_sam_vit_b

    torch.manual_seed(seed)
    torch.save(build_sam_vit_b().state_dict(), path)
    return path


def run(args) -> dict:
    from medico_adapters import phantom

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "cohort"
    if not (data / "dataset.json").is_file():
        phantom.write_cohort(data, args.cases, (args.slices, args.size, args.size), seed=args.seed)
    checkpoint = work / "standin_vit_b_seed0.pt"
    if not checkpoint.is_file():
        stand_in(checkpoint)
    store = work / "store"
    if not args.warm_store:
        shutil.rmtree(store, ignore_errors=True)
    out = work / "run" / "phantom.pt"
    shutil.rmtree(out.parent, ignore_errors=True)
    command = [
        sys.executable, "-m", "medico_adapters", "finetune", str(data), "-o", str(out), "--checkpoint", str(checkpoint),
        "--objects", ",".join(ORGANS), "--connected", "--slices-per-case", str(args.slices_per_case),
        "--val-fraction", str(args.val_fraction), "--minutes", str(args.minutes), "--store", str(store),
        "--seed", str(args.seed), "--json", *args.extra,
    ]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode:
        sys.exit(f"finetune failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    record = json.loads(out.with_suffix(".json").read_text("utf-8"))
    return {"record": record, "wall": wall, "command": command, "work": str(work), "out": str(out)}


def table(result: dict, args) -> str:
    record = result["record"]
    before, after = record["evaluation"]["before"], record["evaluation"]["after"]
    timing = record["timing"]
    rows = ["| object | Dice before | Dice after | change |", "|---|---|---|---|"]
    for name in ORGANS:
        b = before["point"]["per_object"].get(name)
        a = after["point"]["per_object"].get(name)
        if b is None or a is None:
            continue
        rows.append(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    b, a = before["point"]["mean"], after["point"]["mean"]
    rows.append(f"| **mean over organs** | **{b:.3f}** | **{a:.3f}** | **{a - b:+.3f}** |")
    box_b, box_a = before["box"]["mean"], after["box"]["mean"]
    it_b, it_a = before["iterative"]["final"]["mean"], after["iterative"]["final"]["mean"]
    emb, val = timing["embedding_train"], timing["embedding_val"]
    lines = [
        f"`python benchmarks/bench_finetune.py {' '.join(sys.argv[1:])}` -- {time.strftime('%Y-%m-%d')}, "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        f"Cohort: {args.cases} varied phantoms of {args.slices} x {args.size} x {args.size} voxels "
        f"({len(record['split']['train'])} training, {len(record['split']['val'])} validation cases, split by case), "
        f"{args.slices_per_case} slices per case, objects = connected parts of {', '.join(ORGANS)}. Start: the random-weight "
        "stand-in ViT-B (seed 0). Held-out Dice with one click at each object's centre, before and after a "
        f"`decoder` run of at most {args.minutes} minutes, embedding included:",
        "",
        *rows,
        "",
        f"Box prompt: {box_b:.3f} -> {box_a:.3f}; centre click + 8 corrections: {it_b:.3f} -> {it_a:.3f}.",
        "",
        "| where the time went | |",
        "|---|---|",
        f"| embedding, training slices | {emb['computed']} computed in {emb['seconds']} s "
        f"({emb['seconds_per_computed']} s/slice), {emb['from_store']} from the store |",
        f"| embedding, validation slices | {val['computed']} computed in {val['seconds']} s |",
        f"| training | {record['steps']} steps in {timing['train_seconds']} s: {timing['steps_per_second']} steps/s, "
        f"{timing['passes_per_second']} mask-decoder passes/s (forward + backward, one object each) |",
        f"| whole command | {timing['total_seconds']} s (wall {result['wall']:.0f} s with start-up); stopped by {record['stopped']} |",
        "",
        "The stand-in's encoder is random, so these figures test the training loop (a trained SAM starts much "
        "higher); they say nothing about MedicoSAM's accuracy on real scans.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--slices", type=int, default=24, help="slices per phantom volume")
    parser.add_argument("--size", type=int, default=160, help="in-plane size in voxels")
    parser.add_argument("--slices-per-case", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep the cohort, stand-in and store here (default: a temporary folder)")
    parser.add_argument("--warm-store", action="store_true", help="reuse the embeddings already in WORK/store")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("extra", nargs="*", help="more finetune options, after --")
    args = parser.parse_args(argv)
    result = run(args)
    text = table(result, args)
    print(text)
    if args.out:
        Path(args.out).write_text("# Fine-tuning on a CPU\n\n" + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
