"""Throughput of ``medico-adapters precompute`` with 1 and 2 worker processes on one cohort.

    flock /work/cpu.lock python benchmarks/bench_precompute.py --out benchmarks/RESULTS-precompute.md

Builds a cohort of CT phantom volumes (different seeds and shapes, a few slices each), converts
the encoder once so that no timed run pays for it, then runs ``precompute`` on a LocalCluster
of 1 worker (all cores as its threads) and of 2 workers (the cores split between them), each
into an empty store, ``--rounds`` times in alternating order. Prints (and with ``--out`` writes)
a table: wall seconds from the call to the report (cluster start and each worker's model load
included), slices computed, slices per hour, and per worker. A re-run on the filled store shows
what "already stored" costs. Random ViT-B weights: speed, not accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cohort(folder: Path, volumes: int, slices: int) -> list[Path]:
    from medico_adapters import phantom

    paths = []
    for i in range(volumes):
        shape = (max(8, slices), 96 + 32 * (i % 3), 128 - 16 * (i % 2))
        ph = phantom.make_phantom(shape, seed=10 + i)
        keep = slice(0, slices)
        path = folder / f"case_{i:03d}.nii.gz"
        phantom.write(dataclasses.replace(ph, volume=ph.volume[keep], labels=ph.labels[keep]), path)
        paths.append(path)
    return paths


def _checkpoint(folder: Path) -> Path:
    import torch
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    path = folder / "random_vit_b.pt"
    torch.save(build_sam_vit_b().state_dict(), path)
    return path


def _run(cohort, checkpoint, store: Path, workers: int, backend: str) -> dict:
    from medico_adapters.embeddings.precompute import precompute

    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    report = precompute(cohort, checkpoint, store, workers=workers, backend=backend, progress=False)
    report["wall"] = time.perf_counter() - started
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--slices", type=int, default=3, help="slices per volume")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each worker count, alternating")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)

    from medico_adapters.embeddings.precompute import precompute
    from medico_adapters.predictor import Predictor

    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    os.environ["MEDICO_ADAPTERS_CACHE"] = str(work / "cache")
    try:
        cohort = _cohort(work, args.volumes, args.slices)
        checkpoint = _checkpoint(work)
        started = time.perf_counter()
        warm = Predictor(checkpoint, backend=args.backend)  # converts and caches the encoder once
        plan = f"{warm.backend} {warm.precision}"
        print(f"encoder ready ({plan}) in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        del warm
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                report = _run(cohort, checkpoint, work / "store", workers, args.backend)
                runs[workers].append(report)
                print(f"{workers} worker(s): {report['totals']['computed']} slices in {report['wall']:.1f} s",
                      file=sys.stderr, flush=True)
        rerun = precompute(cohort, checkpoint, work / "store", workers=2, backend=args.backend, progress=False)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    slices = args.volumes * args.slices
    cores = os.cpu_count() or 1
    lines = [
        "# precompute benchmark",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {cores} cores; Python {platform.python_version()}; "
        f"encoder: {plan} (`--backend {args.backend}`), random ViT-B.",
        f"Cohort: {args.volumes} phantom volumes x {args.slices} slices = {slices} slices (96-160 x 112-128 voxels; "
        "SAM resizes every slice to 1024, so the in-plane size does not change the cost).",
        (f"Load average (1, 5, 15 min) before: {' '.join(f'{v:.1f}' for v in load_before)}; after: "
         f"{' '.join(f'{v:.1f}' for v in load_after)}." if load_before else ""),
        "",
        "Each run: an empty store, `precompute(cohort, workers=N)` on a LocalCluster; wall seconds from the call to the "
        "report, so cluster start and each worker's model load are in them.",
        "",
        "| workers x threads | runs (s) | median s | slices computed | slices/h | slices/h per worker | model loads |",
        "|---|---|---|---|---|---|---|",
    ]
    for workers, reports in runs.items():
        walls = [r["wall"] for r in reports]
        median = statistics.median(walls)
        rate = slices * 3600 / median
        cluster = reports[0]["cluster"]
        lines.append(
            f"| {workers} x {cluster['threads'] // workers} | {', '.join(f'{w:.1f}' for w in walls)} | {median:.1f} | "
            f"{reports[0]['totals']['computed']} | {rate:.0f} | {rate / workers:.0f} | {reports[0]['model_loads']} |"
        )
    lines += [
        "",
        f"Re-run on the filled store (2 workers, every entry's digest checked): {rerun['totals']['skipped']} of "
        f"{slices} slices already stored, {rerun['totals']['computed']} computed, {rerun['seconds']:.1f} s, "
        f"{rerun['model_loads']} model loads.",
    ]
    text = "\n".join(line for line in lines if line is not None) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
