"""Each patched tool's own embedding, as patched and with ``--accelerate``, in one run.

    python benchmarks/bench_tools.py --samm-src SAMM --slicer-src SWS --out benchmarks/RESULTS-tools.md

(27 minutes on a 2-core CPU with the defaults; samm's server also needs pyzmq, opencv-python-headless,
matplotlib, tqdm, timm and mobilesam-mirror where it runs.)

Every figure comes from the tool's own code, run in a fresh process per tool and variant, on copies
of the tools patched by the kit (``plain``: ``patch TOOL``; ``accelerated``: ``patch TOOL --accelerate``):

* napari-sam (the installed release): the real widget, headless; ``_load_model``, then
  ``_activate`` on a CT-like volume (it embeds every slice), then one click on the lesion through
  ``do_point_click``: the seconds to the first mask;
* samm (a legacy checkout, ``--samm-src``): the real server module; ``SammParameterNode()`` loads
  its default model (MedicoSAM after the patch), the volume arrives through its own
  ``SET_IMAGE_SIZE``/``SET_NTH_IMAGE`` callbacks and ``CalculateEmbeddings`` embeds every slice of
  its three views (a small block of the volume: each slice is resized to 1024x1024 before the
  encoder, so a slice costs the same whatever its size);
* SlicerSegmentWithSAM (a W2 checkout, ``--slicer-src``): the real module, outside Slicer as the
  integration test runs it; ``changeModel("MedicoSAM (ViT-B)")``, then its predictor's
  ``set_image`` on a few slices;
* the kit's own ``medico-adapters segment`` on the same volume: the first mask (``--no-propagate``:
  only the clicked slice is embedded) and the whole 3D mask (it embeds the slices the mask reaches).

``--first-mask VARIANT...`` measures only napari-sam's first mask, through its own widget, for
the patch options that decide it (``eager``: ``patch napari-sam``; ``accelerate``: ``--accelerate
--no-lazy-embeddings``; ``lazy``: ``--lazy-embeddings``; ``lazy-accelerate``: ``--accelerate``, which
turns lazy embeddings on; ``lazy-reopened``: ``lazy`` again in a new process, on the store the
``lazy`` run wrote). Each variant merges its figures into ``--record FILE`` and the table is
printed (and, with ``--out``, written into its section of the markdown file), so the long eager
variants can run as commands of their own, with one ``--work-dir`` kept between them::

    python benchmarks/bench_tools.py --first-mask lazy lazy-reopened lazy-accelerate --work-dir W --record W/first-mask.json --out benchmarks/RESULTS-tools.md
    python benchmarks/bench_tools.py --first-mask eager --work-dir W --record W/first-mask.json --out benchmarks/RESULTS-tools.md

The accelerated variants load the compiled encoder from the cache that a first start fills (its
conversion time is reported on its own). Embeddings of both variants are compared (max abs diff),
and the clicked masks too. Weights are a random ViT-B (fixed seed, random relative-position
tables): speed and agreement, not segmentation accuracy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_predictor import _cpu_name, _load, _peak_mib, _random_sam, _versions  # noqa: E402

from medico_adapters import phantom  # noqa: E402
from medico_adapters.accel import medico_sam_accel as accel  # noqa: E402

VARIANTS = ("plain", "accelerated")
#: --first-mask variants: the patch options each one is, and the tree (and store) it runs on.
FIRST_MASK = {
    "eager": {"lazy_embeddings": False},
    "accelerate": {"accelerate": True, "lazy_embeddings": False},
    "lazy": {"lazy_embeddings": True},
    "lazy-reopened": {"lazy_embeddings": True},
    "lazy-accelerate": {"accelerate": True},
}
FIRST_MASK_TREE = {"lazy-reopened": "lazy"}
#: whose clicked mask each variant must equal: the eager tool with the same encoder (OpenVINO f32
#: and torch agree within float rounding, which may move a pixel at the threshold).
SAME_AS = {"lazy": "eager", "lazy-reopened": "eager", "lazy-accelerate": "accelerate", "accelerate": "eager"}
#: the lines around the first-mask section of the markdown report (--out replaces what is between).
SECTION = ("<!-- first-mask: written by bench_tools.py --first-mask -->", "<!-- /first-mask -->")
#: background slices a lazy run lets the fill embed after the first mask, for a per-slice time.
FILL_SAMPLES = 2
TOOLS = ("napari-sam", "samm", "slicer-segment-with-sam")
SOFT_TISSUE = phantom.WINDOWS["soft_tissue"]


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.stack([image] * 3, axis=-1)


class _Timed:
    """Wraps a predictor's ``set_image`` to time each call; nothing else changes."""

    def __init__(self, predictor) -> None:
        self.times: list[float] = []
        self._set_image = predictor.set_image
        predictor.set_image = self

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._set_image(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - started)


def _encoder_kind(model) -> str:
    encoder = model.image_encoder
    if getattr(encoder, accel.MARKER, None) == "openvino":
        return f"openvino {encoder.precision}"
    if any(getattr(block.attn, accel.MARKER, None) == "sdpa" for block in getattr(encoder, "blocks", ())):
        return "torch sdpa"
    return "torch (plain)"


# -- the children: one tool and variant each ---------------------------------------------------
def _napari_widget(tree: Path, work: Path):
    """A headless viewer with the volume and a labels layer, and the tree's widget with MedicoSAM
    loaded through its own ``_load_model``: (viewer, widget, seconds the load took)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import napari

    sys.path.insert(0, str(tree))
    widget_module = importlib.import_module("napari_sam._widget")
    volume = np.load(work / "volume.npy")
    viewer = napari.Viewer(show=False)
    width, level = SOFT_TISSUE
    viewer.add_image(volume, name="ct", contrast_limits=(level - width / 2, level + width / 2))
    viewer.add_labels(np.zeros(volume.shape, dtype=np.int32), name="mask")
    widget = widget_module.SamWidget(viewer)
    combo = widget.cb_model_type
    combo.setCurrentIndex(next(i for i in range(combo.count()) if combo.itemText(i).startswith("MedicoSAM")))
    started = time.perf_counter()
    widget._load_model()
    return viewer, widget, time.perf_counter() - started


def _child_napari(tree: Path, work: Path, variant: str, load_only: bool) -> dict:
    viewer, widget, load_s = _napari_widget(tree, work)
    result = {"load_s": load_s, "encoder": _encoder_kind(widget.sam_model)}
    if load_only:
        return result
    timed = _Timed(widget.sam_predictor)
    widget.cb_image_layers.setCurrentText("ct")
    widget.cb_label_layers.setCurrentText("mask")
    started = time.perf_counter()
    widget._activate()  # napari-sam embeds every slice of a 3D image here
    activate_s = time.perf_counter() - started
    z, y, x = json.loads((work / "click.json").read_text())
    viewer.dims.set_point(0, z)
    started = time.perf_counter()
    widget.do_point_click(np.array([z, y, x]), True)
    click_s = time.perf_counter() - started
    np.save(work / f"napari-{variant}-features.npy", torch.cat([f.cpu() for f in widget.sam_features]).numpy())
    np.save(work / f"napari-{variant}-mask.npy", np.asarray(viewer.layers["mask"].data[z]))
    viewer.close()
    return {**result, "embed_times": timed.times, "activate_s": activate_s, "click_s": click_s,
            "first_mask_s": load_s + activate_s + click_s}


def _child_samm(tree: Path, work: Path, variant: str) -> dict:
    sys.path.insert(0, str(tree / "samm-python-terminal"))  # what `python sam_server.py` does
    server = importlib.import_module("utl_sam_server")
    # the server picks cuda/mps when present; measure the CPU (replaced once torch's users imported)
    torch.cuda.is_available = lambda: False
    torch.backends.mps.is_available = lambda: False
    started = time.perf_counter()
    node = server.SammParameterNode()  # loads the default model: MedicoSAM after the patch
    load_s = time.perf_counter() - started
    cube = np.load(work / "cube.npy")
    r, g, y = cube.shape
    server.sammProcessingCallBack_SET_IMAGE_SIZE({"r": r, "g": g, "y": y})
    for n in range(r):
        server.sammProcessingCallBack_SET_NTH_IMAGE({"n": n, "image": cube[n]})
    timers = [_Timed(node.samPredictor[view]) for view in "RGY"]
    started = time.perf_counter()
    server.CalculateEmbeddings({"saveToLocal": 0, "loadLocal": 0})
    embed_s = time.perf_counter() - started
    features = [f for view in "RGY" for f in node.features[view]]
    np.save(work / f"samm-{variant}-features.npy", torch.cat(features).numpy())
    return {"load_s": load_s, "encoder": _encoder_kind(node.samPredictor["R"].model), "embed_s": embed_s,
            "embed_times": [t for timer in timers for t in timer.times]}


def _child_slicer(tree: Path, work: Path, variant: str, slices: list[int]) -> dict:
    from segment_anything import SamPredictor, sam_model_registry

    from tests.helpers import slicer_stand_ins

    class _Setter:  # slicer_stand_ins expects pytest's monkeypatch; only setitem is used
        @staticmethod
        def setitem(mapping, key, value):
            mapping[key] = value

    module_dir = tree / "SegmentWithSAM"
    slicer_stand_ins(_Setter(), module_dir)
    sys.path.insert(0, str(module_dir))  # Slicer appends each scripted module's folder to sys.path
    namespace: dict = {"__name__": "SegmentWithSAM"}
    source = module_dir / "SegmentWithSAM.py"
    exec(compile(source.read_text("utf-8"), str(source), "exec"), namespace)
    # what the widget's __init__ (installers, downloads, Qt) leaves in place before a model is chosen
    namespace.update(sam_model_registry=sam_model_registry, SamPredictor=SamPredictor, torch=torch)
    widget = object.__new__(namespace["SegmentWithSAMWidget"])
    widget.device = torch.device("cpu")
    widget.checkpointFolder = widget.resourcePath("UI") + "/../../../model_checkpoints/"
    started = time.perf_counter()
    widget.changeModel("MedicoSAM (ViT-B)")
    load_s = time.perf_counter() - started
    volume = np.load(work / "volume.npy")
    times, features = [], []
    for z in slices:
        image = _gray_to_rgb(phantom.window(volume[z], *SOFT_TISSUE))
        started = time.perf_counter()
        widget.sam.set_image(image)
        times.append(time.perf_counter() - started)
        features.append(widget.sam.features.cpu())
    np.save(work / f"slicer-{variant}-features.npy", torch.cat(features).numpy())
    return {"load_s": load_s, "encoder": _encoder_kind(widget.sam.model), "embed_times": times}


def _child_first_mask(tree: Path, work: Path, variant: str) -> dict:
    """Load MedicoSAM, activate on the volume, click the lesion: the tool's own code, timed.

    Every ``SamPredictor.set_image`` in the process is timed (the lazy sequence embeds through the
    class's method on its own copy of the predictor), with the thread that called it.
    """
    import hashlib
    import threading

    from segment_anything import SamPredictor

    embeds: list[tuple[str, float, float]] = []
    set_image = SamPredictor.set_image

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return set_image(self, *args, **kwargs)
        finally:
            embeds.append((threading.current_thread().name, started, time.perf_counter()))

    SamPredictor.set_image = timed
    viewer, widget, load_s = _napari_widget(tree, work)
    widget.cb_image_layers.setCurrentText("ct")
    widget.cb_label_layers.setCurrentText("mask")
    started = time.perf_counter()
    widget._activate()
    activate_s = time.perf_counter() - started
    z, y, x = json.loads((work / "click.json").read_text())
    viewer.dims.set_point(0, z)
    started = time.perf_counter()
    widget.do_point_click(np.array([z, y, x]), True)
    mask_at = time.perf_counter()
    click_s = mask_at - started
    before = [e for e in embeds if e[2] <= mask_at]
    features = widget.sam_features
    lazy = type(features).__name__ == "LazySlices"
    result = {
        "variant": variant, "encoder": _encoder_kind(widget.sam_model), "lazy": lazy,
        "load_s": load_s, "activate_s": activate_s, "click_s": click_s, "first_mask_s": load_s + activate_s + click_s,
        "embedded_before_mask": len(before), "embedding_before_mask_s": sum(end - start for _, start, end in before),
        "mask_sha256": hashlib.sha256(np.ascontiguousarray(viewer.layers["mask"].data[z]).tobytes()).hexdigest(),
        "mask_pixels": int(np.count_nonzero(viewer.layers["mask"].data[z])), "slice": z,
    }
    if lazy:
        result["stored_before_mask"] = features.stats["stored"]
        if result["embedded_before_mask"]:  # let the fill embed a few slices alone, for a per-slice time
            deadline = time.monotonic() + 600
            while features.stats["computed"] < 1 + FILL_SAMPLES and features.filling and time.monotonic() < deadline:
                time.sleep(0.2)
        features.close()
        features.join(600)
    result["embed_times"] = [end - start for _, start, end in embeds]
    viewer.close()
    return result


def _first_mask_runs(args, variants: list[str]) -> dict:
    """Run each variant in its own process on its own patched copy; merge into the record."""
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter
    from medico_adapters.adapters.napari_sam import needs_layers_compat

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = dict(os.environ, HOME=str(home), USERPROFILE=str(home), MEDICO_ADAPTERS_CACHE=str(work / "cache"),
               QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    os.environ.update(HOME=str(home), USERPROFILE=str(home), MEDICO_ADAPTERS_CACHE=str(work / "cache"))
    ckpt = work / "random_vit_b.pth"
    if not ckpt.exists():
        torch.save(_random_sam().state_dict(), ckpt)
    ct = phantom.make_phantom((args.slices, args.size, args.size))
    np.save(work / "volume.npy", ct.volume)
    (work / "click.json").write_text(json.dumps(list(ct.landmarks["lesion"])))
    import napari_sam

    record = json.loads(args.record.read_text()) if args.record and args.record.exists() else {}
    for variant in variants:
        name = FIRST_MASK_TREE.get(variant, variant)
        tree = work / f"first-mask-{name}" / "napari_sam"
        if not tree.exists():
            shutil.copytree(Path(napari_sam.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
            options = {"napari_compat": needs_layers_compat(), **FIRST_MASK[name]}
            patching.patch(get_adapter("napari-sam"), tree, checkpoint=ckpt, options=options)
        store = work / f"store-{name}"
        if variant == name:  # a fresh store; the reopened variant reads the one its first run wrote
            shutil.rmtree(store, ignore_errors=True)
        child_env = dict(env, MEDICO_EMBEDDING_STORE=str(store))
        if FIRST_MASK[name].get("accelerate") and not list((work / "cache" / "openvino").glob("*.ov")):
            _run_child("napari-sam", "accelerated", tree.parent, work, child_env, "--load-only")  # converts, caches
        result = _run_child("napari-sam", variant, tree.parent, work, child_env, "--first-mask-child")
        result.update(volume=f"{args.slices} x {args.size} x {args.size}", cpu=_cpu_name(), threads=torch.get_num_threads(),
                      versions=_versions(), napari_sam=version("napari-sam"), napari=version("napari"),
                      load_before=_load(), measured=time.strftime("%Y-%m-%d %H:%M"))
        record[variant] = result
        if args.record:
            from medico_adapters import fsio

            fsio.write_text(args.record, json.dumps(record, indent=1))
    return record


def _first_mask_report(record: dict) -> str:
    order = [v for v in FIRST_MASK if v in record]
    if not order:
        return ""
    any_run = record[order[0]]
    per_slice = {v: _median(r["embed_times"]) for v, r in record.items() if r["embed_times"]}
    if "lazy" in per_slice:  # the reopened run's own fill is incidental: the slice time is lazy's
        per_slice["lazy-reopened"] = per_slice["lazy"]
    labels = {
        "eager": "napari-sam as patched (every slice at `_activate`)",
        "accelerate": "`--accelerate --no-lazy-embeddings` (every slice, faster encoder)",
        "lazy": "`--lazy-embeddings`",
        "lazy-reopened": "`--lazy-embeddings`, the volume opened again (the store)",
        "lazy-accelerate": "`--accelerate` (lazy embeddings on by default)",
    }
    rows = []
    for v in order:
        r = record[v]
        one = per_slice.get(v, float("nan"))
        base = record.get(SAME_AS[v]) if v in SAME_AS else None
        same = "" if base is None else f"{SAME_AS[v]}: " + (
            "yes" if r["mask_sha256"] == base["mask_sha256"] else f"**no** ({r['mask_pixels']} / {base['mask_pixels']} px)")
        stored = r.get("stored_before_mask", 0)
        rows.append(
            f"| {labels[v]} | {r['encoder']} | {r['load_s']:.1f} | {r['activate_s']:.1f} | {r['click_s']:.1f} | "
            f"**{r['first_mask_s']:.1f}** | {r['embedded_before_mask']} ({r['embedding_before_mask_s']:.1f} s) | {stored} | "
            f"{one:.2f} | {r['first_mask_s'] / one:.2f} | {same} |"
        )
    return "\n".join([
        SECTION[0],
        "## napari-sam's first mask: eager, `--accelerate`, lazy, lazy + store",
        "",
        f"napari-sam {any_run['napari_sam']}, napari {any_run['napari']}, its own widget headless: `_load_model`, "
        f"`_activate` on the kit's CT-like phantom ({any_run['volume']}, soft-tissue window), one click on the lesion "
        f"(slice {any_run['slice']}) through `do_point_click`. CPU: {any_run['cpu']}, {any_run['threads']} torch threads; "
        f"{any_run['versions']}. A random ViT-B stands in for MedicoSAM. Each variant ran in its own process on a copy "
        "patched with its options (some as separate commands: their load averages differ, see the record).",
        "",
        "first mask = load + activate + click. Embedded before the mask: `SamPredictor.set_image` calls that ended "
        "before the mask was there (and their seconds); from the store: slices read from it by then (the clicked one, "
        "and any the background fill had read in the meantime). One slice: the median `set_image` time of that "
        "process (lazy: the clicked slice and the first background ones; the reopened run: lazy's). Same mask as: "
        "the clicked slice's mask, pixel for pixel, against the eager tool's with the same encoder (`--accelerate` "
        "against plain: OpenVINO f32 and torch agree within float rounding, which may move a pixel at the threshold).",
        "",
        "| variant | encoder | load s | activate s | click s | first mask s | embedded before the mask | from the store | one slice s | first mask / one slice | same mask as |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Measured: " + "; ".join(f"{v} {record[v]['measured']} (load {record[v]['load_before']})" for v in order) + ".",
        SECTION[1],
    ])


def _write_section(path: Path, section: str) -> None:
    """Put ``section`` into the markdown file at ``path``, in place of an earlier one."""
    from medico_adapters import fsio

    text = path.read_text("utf-8") if path.exists() else ""
    if SECTION[0] in text and SECTION[1] in text:
        head, rest = text.split(SECTION[0], 1)
        tail = rest.split(SECTION[1], 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    fsio.write_text(path, text)


def _child(args) -> None:
    tree, work = Path(args.tree), Path(args.work)
    if args.first_mask_child:
        result = _child_first_mask(tree, work, args.variant)
    elif args.child == "napari-sam":
        result = _child_napari(tree, work, args.variant, args.load_only)
    elif args.child == "samm":
        result = _child_samm(tree, work, args.variant)
    else:
        result = _child_slicer(tree, work, args.variant, [int(z) for z in args.slice_list.split(",")])
    print(json.dumps({**result, "peak_mib": _peak_mib()}), flush=True)


def _run_child(tool: str, variant: str, tree: Path, work: Path, env: dict, *extra: str) -> dict:
    print(f"running {tool} ({variant}{' '.join(('',) + extra)}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, "--variant", variant, "--tree", str(tree), "--work", str(work), *extra],
        capture_output=True, text=True, env=env,
    )
    lines = proc.stdout.splitlines()
    found = [line for line in lines if line.startswith("{")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{tool} ({variant}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(found[-1])
    result["log"] = [line for line in lines if line.startswith(("medico_sam_accel:", "medico_lazy_embeddings:"))]
    return result


# -- the parent: trees, runs, report ----------------------------------------------------------
def _patched_copy(tool: str, source: Path, dest: Path, accelerate: bool, ckpt: Path, options: dict) -> Path:
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    root = dest.parent if tool == "napari-sam" else dest
    patching.patch(get_adapter(tool), dest, checkpoint=ckpt, options={**options, "accelerate": accelerate})
    return root


def _segment(volume: Path, point: str, ckpt: Path, env: dict, *extra: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "medico_adapters", "segment", str(volume), "-o", str(volume.with_suffix(".mask.nii.gz")),
         "--point", point, "--checkpoint", str(ckpt), "--json", *extra],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"medico-adapters segment failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    report["wall_s"] = time.perf_counter() - started
    return report


def _source(tool: str, src: Path) -> str:
    """Which checkout ran: its layout and commit (a folder named by its commit, as CI unpacks them, counts)."""
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter

    status = patching.status(get_adapter(tool), src)
    proc = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = proc.stdout.strip() if proc.returncode == 0 else src.resolve().name
    return f"{tool} {status['layout']} at {commit[:12]}"


def _median(values) -> float:
    return float(np.median(values)) if values else float("nan")


def _mib(result: dict) -> str:
    return "n/a" if result.get("peak_mib") is None else f"{result['peak_mib']:.0f}"


def _diff(work: Path, name: str) -> float:
    a, b = (np.load(work / f"{name}-{v}-features.npy") for v in VARIANTS)
    return float(np.abs(a - b).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samm-src", type=Path, help="a legacy samm checkout (S2-S4); without it samm is skipped")
    parser.add_argument("--slicer-src", type=Path, help="a SlicerSegmentWithSAM W2 checkout; without it Slicer is skipped")
    parser.add_argument("--slices", type=int, default=64, help="slices of the CT-like volume napari-sam embeds")
    parser.add_argument("--size", type=int, default=512, help="side of each slice")
    parser.add_argument("--samm-cube", type=int, default=4, help="side of the block samm embeds (3 x side slices)")
    parser.add_argument("--slicer-slices", type=int, default=3, help="slices SegmentWithSAM's predictor embeds")
    parser.add_argument("--out", metavar="MD", help="also write the report to this markdown file")
    parser.add_argument("--first-mask", nargs="*", choices=FIRST_MASK, metavar="VARIANT",
                        help=f"only napari-sam's first mask, for these variants ({', '.join(FIRST_MASK)}); "
                             "none: the table from --record")
    parser.add_argument("--record", type=Path, help="--first-mask: a JSON file each variant's figures are merged into")
    parser.add_argument("--work-dir", type=Path, help="--first-mask: a folder kept between runs (trees, checkpoint, stores)")
    parser.add_argument("--first-mask-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slice-list", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.first_mask is not None:
        if args.work_dir is None:
            args.work_dir = Path(tempfile.mkdtemp(prefix="bench-first-mask-"))
        if "lazy-reopened" in args.first_mask and "lazy" not in args.first_mask \
                and not (args.work_dir / "store-lazy").is_dir():
            parser.error("lazy-reopened reads the store a lazy run wrote: run lazy first (same --work-dir)")
        report = _first_mask_report(_first_mask_runs(args, args.first_mask))
        print(report)
        if args.out:
            _write_section(Path(args.out), report)
        return 0

    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        work = Path(tmp)
        home = work / "home"
        env = dict(os.environ, HOME=str(home), USERPROFILE=str(home), MEDICO_ADAPTERS_CACHE=str(work / "cache"),
                   QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
        os.environ.update(HOME=str(home), USERPROFILE=str(home), MEDICO_ADAPTERS_CACHE=str(work / "cache"))
        ckpt = work / "random_vit_b.pth"
        torch.save(_random_sam().state_dict(), ckpt)
        ct = phantom.make_phantom((args.slices, args.size, args.size))
        np.save(work / "volume.npy", ct.volume)
        z, y, x = ct.landmarks["lesion"]
        (work / "click.json").write_text(json.dumps([z, y, x]))
        half = args.samm_cube // 2
        block = ct.volume[z - half:z - half + args.samm_cube, y - half:y - half + args.samm_cube, x - half:x - half + args.samm_cube]
        np.save(work / "cube.npy", phantom.window(block, *SOFT_TISSUE))
        picks = np.linspace(z - args.slices // 4, z + args.slices // 4, args.slicer_slices).round().astype(int)
        slicer_slices = ",".join(str(int(v)) for v in picks)

        results: dict[str, dict] = {}
        sources = [f"{tool} {version(tool)}" for tool in ("napari-sam", "napari")]
        sources += [_source(tool, src) for tool, src in (("samm", args.samm_src), ("slicer-segment-with-sam", args.slicer_src)) if src]
        import napari_sam

        from medico_adapters.adapters.napari_sam import needs_layers_compat

        napari_options = {"napari_compat": needs_layers_compat(), "lazy_embeddings": False}  # every slice at activation
        trees = {v: _patched_copy("napari-sam", Path(napari_sam.__file__).parent, work / f"napari-{v}" / "napari_sam",
                                  v == "accelerated", ckpt, napari_options) for v in VARIANTS}
        # the first start converts the encoder and caches it; every later start (all three tools:
        # same weights) loads it, which is what a user meets from the second start on
        cold = _run_child("napari-sam", "accelerated", trees["accelerated"], work, env, "--load-only")
        for v in VARIANTS:
            results[f"napari-{v}"] = _run_child("napari-sam", v, trees[v], work, env)
        if args.samm_src:
            for v in VARIANTS:
                tree = _patched_copy("samm", args.samm_src, work / f"samm-{v}", v == "accelerated", ckpt, {})
                results[f"samm-{v}"] = _run_child("samm", v, tree, work, env)
        if args.slicer_src:
            for v in VARIANTS:
                tree = _patched_copy("slicer-segment-with-sam", args.slicer_src, work / f"sws-{v}", v == "accelerated", ckpt, {})
                results[f"slicer-{v}"] = _run_child("slicer-segment-with-sam", v, tree, work, env, "--slice-list", slicer_slices)

        nifti = work / "ct.nii.gz"
        phantom.write(ct, nifti)
        warm = work / "warmup.nii.gz"
        phantom.write(phantom.make_phantom((8, args.size, args.size), seed=1), warm)
        print("running medico-adapters segment ...", file=sys.stderr, flush=True)
        kit_cold = _segment(warm, "4,100,100", ckpt, env, "--no-propagate")  # converts and caches its encoder
        point = f"{z},{y},{x}"
        kit_first = _segment(nifti, point, ckpt, env, "--no-propagate")
        shutil.rmtree(work / "cache" / "embeddings")  # the 3D run embeds its slices afresh
        kit_full = _segment(nifti, point, ckpt, env)
        masks = [np.load(work / f"napari-{v}-mask.npy") for v in VARIANTS]
        report = _report(args, results, cold, kit_cold, kit_first, kit_full, masks, work, load_before, sources)
    print(report)
    if args.out:
        from medico_adapters import fsio

        fsio.write_text(args.out, report)
    return 0


def _report(args, results, cold, kit_cold, kit_first, kit_full, masks, work, load_before, sources) -> str:
    flags = accel.cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "neon", "asimd", "sve", "bf16", "fp16")))
    rows = []
    for name, label in (("napari", "napari-sam 0.4.13: `_activate` (every slice)"),
                        ("samm", "samm: `CalculateEmbeddings` (server)"),
                        ("slicer", "SegmentWithSAM: predictor `set_image`")):
        if f"{name}-plain" not in results:
            continue
        plain, fast = results[f"{name}-plain"], results[f"{name}-accelerated"]
        p, a = _median(plain["embed_times"]), _median(fast["embed_times"])
        rows.append(
            f"| {label} | {len(plain['embed_times'])} | {p:.2f} | {a:.2f} | **{p / a:.2f}** | {_diff(work, name):.1e} | "
            f"{plain['load_s']:.1f} / {fast['load_s']:.1f} | {_mib(plain)} / {_mib(fast)} | {fast['encoder']} |"
        )
    napari_plain, napari_fast = results["napari-plain"], results["napari-accelerated"]
    same_mask = bool(np.array_equal(*masks))
    lines = [
        "# The patched tools' own embedding, as patched and with `--accelerate`",
        "",
        f"CPU: **{_cpu_name()}** ({platform.machine()}, {platform.system()}), {torch.get_num_threads()} torch threads. "
        f"Flags: {' '.join(shown) or 'unknown'}.",
        f"Versions: {_versions()}, Python {platform.python_version()}. Tools: {'; '.join(sources)}.",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {_load()}. A load above the core count "
        "means other work shared the CPU: the seconds are noisy, compare ratios within this run.",
        "",
        f"A random ViT-B stands in for MedicoSAM (plumbing and speed, not accuracy). Volume: the kit's CT-like phantom, "
        f"{args.slices} x {args.size} x {args.size}. Each tool and variant ran in its own process, on a copy patched by "
        "the kit (`patch TOOL`, and `patch TOOL --accelerate`). s/slice is the median time of the tool's own "
        "`SamPredictor.set_image` calls; x = plain / accelerated; max abs diff compares the embeddings of every slice "
        "both variants computed; load = the tool building its model (accelerated: with the compiled encoder already "
        "cached); peak RSS of the whole process.",
        "",
        "| tool code | slices | plain s/slice | accelerated s/slice | x | max abs diff | load s (plain / acc.) | peak RSS MiB (plain / acc.) | accelerated encoder |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Seconds to the first mask, napari-sam (load the model, `_activate` on the whole volume, one click on the "
        "lesion) next to the kit's own `segment`:",
        "",
        "| | load s | embedding s | click s | first mask s |",
        "|---|---|---|---|---|",
        f"| napari-sam as patched | {napari_plain['load_s']:.1f} | {napari_plain['activate_s']:.1f} | "
        f"{napari_plain['click_s']:.2f} | **{napari_plain['first_mask_s']:.1f}** |",
        f"| napari-sam `--accelerate` | {napari_fast['load_s']:.1f} | {napari_fast['activate_s']:.1f} | "
        f"{napari_fast['click_s']:.2f} | **{napari_fast['first_mask_s']:.1f}** |",
        f"| `medico-adapters segment --no-propagate` ({kit_first['backend']} {kit_first['precision']}; "
        f"{kit_first['embeddings']['computed']} slice embedded) | | | | **{kit_first['wall_s']:.1f}** |",
        f"| `medico-adapters segment` (3D: {kit_full['embeddings']['computed']} slices embedded) | | | | "
        f"**{kit_full['wall_s']:.1f}** |",
        "",
        f"- The clicked mask is the same with and without `--accelerate`: **{'yes' if same_mask else 'no'}** "
        f"({int(masks[0].sum())} / {int(masks[1].sum())} pixels).",
        f"- First start with `--accelerate` (the encoder converted for OpenVINO and cached): napari-sam's "
        f"`_load_model` took {cold['load_s']:.1f} s; every later start, in any of the three tools (same weights), "
        f"loads the cached encoder ({napari_fast['load_s']:.1f} s above). The kit's `segment` keeps its own entry "
        f"(first start {kit_cold['wall_s']:.1f} s for a one-slice run).",
        f"- What the accelerated tools logged: {'; '.join(sorted(set(napari_fast['log']))) or 'nothing'}.",
        "- The `segment` times are whole processes (Python start, reading the volume, loading the model, embedding, "
        "writing the mask); napari-sam's first-mask time starts at `_load_model` in a running napari.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
