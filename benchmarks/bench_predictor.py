"""Measure the predictor against plain ``segment_anything.SamPredictor`` in one run.

Prints: exact-mode embedding speedup and max abs diff, fast-mode speedup and cosine similarity,
predict-with-cached-embedding speedup, peak RSS of one embedding (each in a fresh subprocess,
via ``resource.getrusage``), and the speedup of re-running ``segment`` when the embedding cache
is warm. Weights are random (fixed seed): this measures speed and agreement, not accuracy.

    python benchmarks/bench_predictor.py [--repeats 3] [--size 512] [--predict-repeats 41] [--predict-only]

Timings interleave the contenders, because a shared CPU is noisy; compare figures only within
one run. Embeddings keep the best of ``--repeats`` runs; ``predict`` (both on the same cached
embedding, a single positive point, multimask output) reports medians of ``--predict-repeats``
interleaved calls, plus the worst mask/score/logit disagreement over a few prompt kinds.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _random_checkpoint(folder: Path) -> Path:
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    sam = build_sam_vit_b().eval()
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.05)
            block.attn.rel_pos_w.normal_(std=0.05)
    path = folder / "random_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_child(kind: str, ckpt: str, size: int) -> None:
    """Load a model, embed one image, print peak RSS in MiB (run in a fresh process)."""
    image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    if kind == "reference":
        from segment_anything import SamPredictor, build_sam_vit_b

        predictor = SamPredictor(build_sam_vit_b(checkpoint=ckpt).eval())
    else:
        from medico_adapters.predictor import Predictor

        predictor = Predictor(ckpt, device="cpu", exact=(kind == "exact"))
    before = _peak_mib()
    predictor.set_image(image)
    print(f"{_peak_mib():.0f} {before:.0f}")


def _peak_mib() -> float:
    """Peak RSS of this process in MiB.

    ``getrusage``'s ``ru_maxrss`` survives fork+exec on Linux (a child starts with its parent's
    high-water mark), so prefer the per-address-space ``VmHWM``, which exec resets.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss(kind: str, ckpt: Path, size: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", kind, str(ckpt), "--size", str(size)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def _embedding_figures(reference, exact, fast, image, repeats: int) -> None:
    times = {"reference": [], "exact": [], "fast": []}
    for _ in range(repeats):
        times["reference"].append(_timed(lambda: reference.set_image(image)))
        times["exact"].append(_timed(lambda: exact.set_image(image)))
        times["fast"].append(_timed(lambda: fast.set_image(image)))
    best = {k: min(v) for k, v in times.items()}
    ref_emb = reference.get_image_embedding()
    diff = (exact.get_image_embedding() - ref_emb).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(fast.get_image_embedding().flatten(), ref_emb.flatten(), dim=0).item()
    print(f"set_image  reference {best['reference']:.2f} s (runs {', '.join(f'{t:.1f}' for t in times['reference'])})")
    print(f"set_image  exact     {best['exact']:.2f} s  speedup {best['reference'] / best['exact']:.2f}x  max|diff| {diff:.2e}")
    print(f"set_image  fast      {best['fast']:.2f} s  speedup {best['reference'] / best['fast']:.2f}x  cosine {cos:.5f}")


def _predict_figures(reference, exact, repeats: int) -> None:
    """Predict on one shared embedding: median ms of interleaved calls, and agreement."""
    from medico_adapters.predictor import Embedding

    exact.set_embedding(
        Embedding(reference.get_image_embedding().clone(), tuple(reference.original_size), tuple(reference.input_size))
    )
    points, labels = np.array([[200.0, 150.0]]), np.array([1])
    calls = {"reference": lambda: reference.predict(points, labels), "exact": lambda: exact.predict(points, labels)}
    for _ in range(3):
        for fn in calls.values():
            fn()
    pred = {"reference": [], "exact": []}
    for i in range(repeats):
        order = ("reference", "exact") if i % 2 == 0 else ("exact", "reference")  # cancel order effects
        for name in order:
            pred[name].append(_timed(calls[name]))
    med = {k: float(np.median(v)) * 1000 for k, v in pred.items()}
    paired = float(np.median(np.array(pred["reference"]) / np.array(pred["exact"])))
    print(
        f"predict    reference {med['reference']:.1f} ms, ours {med['exact']:.1f} ms  "
        f"speedup {med['reference'] / med['exact']:.2f}x (medians of {repeats} interleaved calls; "
        f"median per-pair ratio {paired:.2f}x)"
    )
    worst = {"pixels": 0, "score": 0.0, "logit": 0.0}
    prompts = [
        {"point_coords": points, "point_labels": labels},
        {"point_coords": np.array([[200.0, 150.0], [320.0, 300.0]]), "point_labels": np.array([1, 0])},
        {"box": np.array([100.0, 80.0, 400.0, 380.0])},
        {"box": np.array([100.0, 80.0, 400.0, 380.0]), "point_coords": points, "point_labels": labels,
         "multimask_output": False},
    ]
    for prompt in prompts:
        ref_out, ours_out = reference.predict(**prompt), exact.predict(**prompt)
        refine = dict(prompt, mask_input=ref_out[2][:1])
        for a, b in ((ref_out, ours_out), (reference.predict(**refine), exact.predict(**refine))):
            worst["pixels"] = max(worst["pixels"], int((a[0] != b[0]).sum()))
            worst["score"] = max(worst["score"], float(np.abs(a[1] - b[1]).max()))
            worst["logit"] = max(worst["logit"], float(np.abs(a[2] - b[2]).max()))
    print(
        f"predict    agreement over {2 * len(prompts)} prompts: differing mask pixels <= {worst['pixels']}, "
        f"max|score diff| {worst['score']:.1e}, max|low-res logit diff| {worst['logit']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--predict-repeats", type=int, default=41)
    parser.add_argument("--predict-only", action="store_true", help="only the predict timing and agreement")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "CKPT"))
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], args.rss_child[1], args.size)
        return

    from segment_anything import SamPredictor, build_sam_vit_b

    from medico_adapters.predictor import Predictor

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = _random_checkpoint(tmp)
        image = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
        if args.predict_only:
            reference = SamPredictor(build_sam_vit_b(checkpoint=str(ckpt)).eval())
            reference.set_image(image)
            _predict_figures(reference, Predictor(ckpt, device="cpu"), args.predict_repeats)
            return
        for kind in ("reference", "exact", "fast"):
            peak, before = _rss(kind, ckpt, args.size)
            print(f"peak RSS   {kind:<9} {peak:.0f} MiB for load + one embedding (after loading: {before:.0f} MiB)")
        reference = SamPredictor(build_sam_vit_b(checkpoint=str(ckpt)).eval())
        exact = Predictor(ckpt, device="cpu")
        fast = Predictor(ckpt, device="cpu", exact=False)

        _embedding_figures(reference, exact, fast, image, args.repeats)
        _predict_figures(reference, exact, args.predict_repeats)
        del reference, exact, fast


        _segment_rerun(tmp, ckpt)


def _segment_rerun(tmp: Path, ckpt: Path) -> None:
    import SimpleITK as sitk

    from medico_adapters.segment import segment

    os.environ["MEDICO_ADAPTERS_CACHE"] = str(tmp / "cache")
    grey = (np.random.default_rng(1).random((256, 256)) * 255).astype(np.uint8)
    src = tmp / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(src))
    kwargs = {"points": [(128, 128, 1)], "checkpoint": ckpt, "device": "cpu", "progress": False}
    cold = _timed(lambda: segment(src, tmp / "mask1.png", **kwargs))
    warm_report = {}
    warm = _timed(lambda: warm_report.update(segment(src, tmp / "mask2.png", **kwargs)))
    print(
        f"segment    cold {cold:.2f} s, re-run with cache {warm:.2f} s  speedup {cold / warm:.2f}x "
        f"(embeddings from cache: {warm_report['embeddings']['from_cache']}; both include model loading)"
    )


if __name__ == "__main__":
    main()
