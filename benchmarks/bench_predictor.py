"""Image-encoder speed, agreement and memory of the kit's predictor against plain SAM and CPU runtimes.

    python benchmarks/bench_predictor.py --out benchmarks/RESULTS.md

Prints (and with ``--out`` writes) one markdown table: for each variant the seconds for one
embedding of a 512x512 slice (median of ``--repeats`` runs after a warm-up), the speed-up against
plain ``SamPredictor.set_image``, the max abs diff and cosine of the 1x256x64x64 embedding against
plain's, the peak RSS of the process (load plus every run), the precision it used and its start-up
time. Every variant runs in a fresh subprocess, so memory and warm caches do not leak between
rows; optional rows (ONNX Runtime, plain OpenVINO, torch.compile) are skipped with the reason when
their package is missing. Below the table: the CPU and its flags, the versions, the machine's load
average before and after (a shared machine makes the seconds noisy; compare ratios within one
run), the kit's start-up with a cold and a warm encoder cache, and ``predict`` on a cached
embedding against ``SamPredictor.predict``.

Weights are a random ViT-B (fixed seed, random relative-position tables so the bias path counts):
this measures speed and agreement with plain SAM, not segmentation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medico_adapters.accel import medico_sam_accel as accel  # noqa: E402

#: name -> table label, in table order. The ``kit-*`` rows are what users get.
VARIANTS = {
    "plain": "plain `SamPredictor.set_image`",
    "kit-exact": "kit `Predictor(exact=True)`",
    "kit-fast": "kit `Predictor(exact=False)`",
    "kit-torch-exact": "kit `Predictor(exact=True, backend=\"torch\")` (SDPA)",
    "kit-torch-fast": "kit `Predictor(exact=False, backend=\"torch\")` (torch autocast)",
    "torch-bf16-weights": "torch bf16 weights + SDPA attention",
    "torch-compile": "`torch.compile(image_encoder)`",
    "ort-fp32": "ONNX Runtime fp32, steady state (from the 3rd call)",
    "ort-int8": "ONNX Runtime dynamic int8, steady state",
    "ov-f32": "OpenVINO, forced f32",
    "ov-default": "OpenVINO default precision",
}
#: runs before timing starts: ONNX Runtime's second call is its slowest (it sizes its arenas then).
WARMUPS = {"ort-fp32": 2, "ort-int8": 2}


def _random_sam():
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    sam = build_sam_vit_b().eval()
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.05)
            block.attn.rel_pos_w.normal_(std=0.05)
    return sam


def _image(size: int) -> np.ndarray:
    return (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)


def _encoder_input(sam, image: np.ndarray) -> torch.Tensor:
    """What ``SamPredictor.set_image`` hands the encoder: resized, normalised, padded."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(tensor)


def _peak_mib() -> float | None:
    """Peak RSS of this process in MiB.

    ``ru_maxrss`` survives fork+exec on Linux (a child starts with its parent's high-water mark),
    so the per-address-space ``VmHWM``, which exec resets, comes first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # Windows has no resource module
        return None
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS


# -- one variant, in its own process ------------------------------------------------------------
def _prepare(variant: str, ckpt: Path, work: Path, image: np.ndarray):
    """Build the variant; return (run_once, precision, note). ``run_once()`` returns the embedding."""
    if variant == "plain":
        from segment_anything import SamPredictor, build_sam_vit_b

        predictor = SamPredictor(build_sam_vit_b(checkpoint=str(ckpt)).eval())

        def run():
            predictor.set_image(image)
            return predictor.get_image_embedding()

        return run, "f32", ""
    if variant.startswith("kit-"):
        from medico_adapters.predictor import Predictor

        backend = "torch" if "torch" in variant else "auto"
        predictor = Predictor(ckpt, device="cpu", exact=variant.endswith("exact"), backend=backend)
        info = predictor.describe()
        note = info["reason"] + (f"; encoder cache: {info['encoder_cache'].split()[0]}" if info["encoder_cache"] else "")

        def run():
            predictor.set_image(image)
            return predictor.get_image_embedding()

        return run, f"{info['backend']} {info['precision']}", note

    sam = _random_sam()
    sam.load_state_dict(torch.load(ckpt, weights_only=True))
    x = _encoder_input(sam, image)
    encoder = sam.image_encoder
    if variant == "torch-bf16-weights":
        accel.bind_sdpa_attention(encoder)
        encoder = encoder.to(torch.bfloat16)

        def run():
            with torch.inference_mode():
                return encoder(_encoder_input(sam, image).to(torch.bfloat16)).float()

        return run, "bf16", ""
    if variant == "torch-compile":
        compiled = torch.compile(encoder)

        def run():
            with torch.inference_mode():
                return compiled(_encoder_input(sam, image))

        return run, "f32", "inductor; the warm-up compiles"
    if variant.startswith("ort-"):
        import onnxruntime as ort

        path = _onnx_file(encoder, x, work, int8=variant == "ort-int8")
        options = ort.SessionOptions()
        options.enable_mem_pattern = False  # with it, the second call allocates ~3 GB more
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run():
            return torch.from_numpy(session.run(None, {name: _encoder_input(sam, image).numpy()})[0])

        return run, "int8 (dynamic)" if variant == "ort-int8" else "fp32", "memory pattern off"
    if variant.startswith("ov-"):
        import openvino as ov

        with torch.no_grad():
            model = ov.convert_model(torch.export.export(encoder, (x,)))
        config = {"INFERENCE_PRECISION_HINT": "f32"} if variant == "ov-f32" else {}
        compiled = ov.Core().compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)

        def run():
            return torch.from_numpy(request.infer({0: _encoder_input(sam, image).numpy()})[0].copy())

        return run, precision, "converted from the torch model, no kit code"
    raise SystemExit(f"unknown variant {variant}")


def _onnx_file(encoder, x: torch.Tensor, work: Path, int8: bool) -> Path:
    fp32 = work / "encoder.onnx"
    if not fp32.exists():
        with torch.no_grad():
            torch.onnx.export(encoder, (x,), str(fp32), input_names=["x"], output_names=["features"],
                              opset_version=18, external_data=False, dynamo=False)  # no onnxscript needed
    if not int8:
        return fp32
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantised = work / "encoder.int8.onnx"
    if not quantised.exists():
        quantize_dynamic(str(fp32), str(quantised), weight_type=QuantType.QInt8)
    return quantised


_REQUIRES = {"torch-compile": "torch._inductor", "ort-fp32": "onnxruntime", "ort-int8": "onnxruntime",
             "ov-f32": "openvino", "ov-default": "openvino"}


def _child(variant: str, ckpt: Path, work: Path, size: int, repeats: int) -> None:
    """Run one variant; print one JSON line with its figures and save its embedding.

    ``repeats`` 0 only starts the variant (a cold start that fills the kit's encoder cache).
    """
    import importlib.util

    needed = _REQUIRES.get(variant)
    if needed and importlib.util.find_spec(needed.split(".")[0]) is None:
        print(json.dumps({"skip": f"{needed.split('.')[0]} is not installed"}))
        return
    image = _image(size)
    started = time.perf_counter()
    run, precision, note = _prepare(variant, ckpt, work, image)
    start_s = time.perf_counter() - started
    if repeats == 0:
        print(json.dumps({"start_s": start_s, "peak_mib": _peak_mib(), "precision": precision, "note": note}))
        return
    for _ in range(WARMUPS.get(variant, 1)):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        embedding = run()
        times.append(time.perf_counter() - t0)
    np.save(work / f"{variant}.npy", embedding.detach().float().cpu().numpy())
    print(json.dumps({"times": times, "start_s": start_s, "peak_mib": _peak_mib(), "precision": precision,
                      "note": note}))


def _run_child(variant: str, ckpt: Path, work: Path, args, env: dict, repeats: int | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--checkpoint", str(ckpt), "--work", str(work),
         "--size", str(args.size), "--repeats", str(args.repeats if repeats is None else repeats)],
        capture_output=True, text=True, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skip": f"failed: {last[:160]}"}
    return json.loads(lines[-1])


# -- the report ------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        if platform.system() == "Linux":
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True).stdout.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"torch {torch.__version__}"]
    for dist in ("openvino", "onnxruntime"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} absent")
    return ", ".join(parts)


def _row(label: str, result: dict, plain: dict, ref: np.ndarray | None, work: Path, name: str) -> str:
    if "skip" in result:
        return f"| {label} | – | – | – | – | – | – | skipped: {result['skip']} |"
    median = float(np.median(result["times"]))
    ratio = float(np.median(plain["times"])) / median if "times" in plain else float("nan")
    emb = np.load(work / f"{name}.npy")
    if ref is None:
        diff, cos = float("nan"), float("nan")
    else:
        diff = float(np.abs(emb - ref).max())
        cos = float(np.dot(emb.ravel().astype(np.float64), ref.ravel())
                    / (np.linalg.norm(emb.ravel().astype(np.float64)) * np.linalg.norm(ref.ravel().astype(np.float64))))
    peak = "n/a" if result["peak_mib"] is None else f"{result['peak_mib']:.0f}"
    runs = ", ".join(f"{t:.2f}" for t in result["times"])
    note = "; ".join(filter(None, [result["note"], f"runs {runs}"]))
    return (f"| {label} | {median:.2f} | {ratio:.2f} | {diff:.1e} | {cos:.6f} | {peak} | {result['precision']} "
            f"| {result['start_s']:.1f} | {note} |")


def _predict_line(ckpt: Path, repeats: int) -> str:
    """``predict`` on one shared random embedding: the kit's decoder path against SamPredictor's."""
    from segment_anything import SamPredictor

    from medico_adapters.predictor import Predictor

    sam = _random_sam()
    sam.load_state_dict(torch.load(ckpt, weights_only=True))
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(7)) * 0.5
    reference = SamPredictor(sam)
    reference.features, reference.original_size, reference.is_image_set = features, (512, 512), True
    reference.input_size = (1024, 1024)
    kit = Predictor(ckpt, device="cpu", backend="torch")
    kit.set_embedding(features.clone(), original_size=(512, 512))
    points, labels = np.array([[200.0, 150.0]]), np.array([1])
    calls = {"plain": lambda: reference.predict(points, labels), "kit": lambda: kit.predict(points, labels)}
    for fn in calls.values():
        fn(), fn()
    times = {"plain": [], "kit": []}
    for i in range(repeats):
        for name in (("plain", "kit") if i % 2 == 0 else ("kit", "plain")):  # cancel order effects
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    ms = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    worst = float(np.abs(reference.predict(points, labels)[2] - kit.predict(points, labels)[2]).max())
    return (f"`predict` on a cached embedding (one point, multimask): plain {ms['plain']:.1f} ms, kit "
            f"{ms['kit']:.1f} ms, {ms['plain'] / ms['kit']:.2f}x (medians of {repeats} interleaved calls); "
            f"max abs low-res logit diff {worst:.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--size", type=int, default=512, help="side of the square test slice")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", metavar="MD", help="also write the report to this markdown file")
    parser.add_argument("--predict-repeats", type=int, default=41)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, Path(args.checkpoint), Path(args.work), args.size, args.repeats)
        return 0

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if "plain" not in chosen:
        chosen.insert(0, "plain")
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-predictor-") as tmp:
        work = Path(tmp)
        ckpt = work / "random_vit_b.pth"
        torch.save(_random_sam().state_dict(), ckpt)
        env = dict(os.environ, MEDICO_ADAPTERS_CACHE=str(work / "cache"))
        results, cold = {}, {}
        for name in chosen:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name in ("kit-exact", "kit-fast"):
                # the first start converts and caches the encoder; users pay that once, so the
                # table shows a later start, and the first one is reported below it
                cold[name] = _run_child(name, ckpt, work, args, env, repeats=0)
            results[name] = _run_child(name, ckpt, work, args, env)
        ref = np.load(work / "plain.npy") if "times" in results["plain"] else None
        rows = [_row(VARIANTS[n], results[n], results["plain"], ref, work, n) for n in chosen]
        predict = _predict_line(ckpt, args.predict_repeats)
    flags = accel.cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "neon", "asimd", "sve", "bf16", "fp16")))
    lines = [
        "# Predictor benchmark",
        "",
        f"CPU: **{_cpu_name()}** ({platform.machine()}, {platform.system()}), {torch.get_num_threads()} torch threads.",
        f"Native bf16 (AVX512-BF16 or AMX): **{'yes' if accel.native_bf16(flags) else 'no'}**. "
        f"Flags: {' '.join(shown) or 'unknown'}.",
        f"Versions: {_versions()}, Python {platform.python_version()}.",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {_load()}. A load above the core count "
        "means other work shared the CPU: the seconds are noisy, compare ratios within this run.",
        "",
        f"Random ViT-B, one {args.size}x{args.size} slice through SAM's preprocessing; every timed run takes the uint8 slice to the "
        "embedding (resize, normalise, pad, encoder), the runtimes' rows too; seconds are the median of "
        f"{args.repeats} runs after a warm-up, each variant in a fresh process; x plain = plain / variant; "
        "max abs diff and cosine compare the 1x256x64x64 embedding with plain's; peak RSS covers load and all runs; "
        "start = seconds from nothing to ready (model load, conversion or cache load).",
        "",
        "| variant | s | x plain | max abs diff | cosine | peak RSS MiB | precision | start s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for name, first in cold.items():
        if "start_s" in first:
            peak = "n/a" if first["peak_mib"] is None else f"{first['peak_mib']:.0f} MiB"
            lines.append(f"- {VARIANTS[name]}, first start with an empty encoder cache ({first['precision']}; "
                         f"converts and caches): {first['start_s']:.1f} s, peak RSS {peak}; later starts load it "
                         f"(the table's `start s`: {results[name].get('start_s', float('nan')):.1f} s).")
    lines += ["", predict, ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        from medico_adapters import fsio

        fsio.write_text(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
