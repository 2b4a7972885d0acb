"""The ``medico-adapters`` command line (contract: shared/CLI.md)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from medico_adapters import __version__
from medico_adapters.errors import MedicoError

PROG = "medico-adapters"


def _emit(args, data: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif text:
        print(text)


# --- core commands ---------------------------------------------------------------------------


def cmd_models(args) -> int:
    from medico_adapters import registry

    rows = registry.listing()
    lines = [f"cache: {registry.models_dir()}"]
    for row in rows:
        state = "cached" if row["cached"] else "not cached"
        verified = "" if row["hash"] else " (no published hash)"
        lines.append(f"  {row['name']:<32} {row['arch']:<6} {state:<11} {row['description']}{verified}")
    _emit(args, {"cache": str(registry.models_dir()), "models": rows}, "\n".join(lines))
    return 0


def cmd_fetch(args) -> int:
    from medico_adapters import registry

    if args.from_file:
        path, verified = registry.register_file(args.name, args.from_file)
        note = "hash verified" if verified else "no published hash to verify"
        print(f"registered {args.from_file} as {registry.canonical(args.name)} at {path} ({note})")
    else:
        path = registry.fetch(args.name, progress=not args.quiet)
        print(f"{registry.canonical(args.name)}: {path}")
    return 0


def cmd_check(args) -> int:
    from medico_adapters import checkpoint

    ckpt = checkpoint.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    info = ckpt.info
    if args.model_type and info.arch != args.model_type:
        info = type(info)(**{**info.__dict__, "problems": (*info.problems, f"model type {args.model_type} given, but the weights are {info.arch}")})
    text = [
        f"{info.path}",
        f"  format:   {info.format}" + (f" (key prefix {info.prefix!r})" if info.prefix else ""),
        f"  arch:     {info.arch}",
        f"  decoder:  {'present' if info.has_decoder else 'absent'}",
        f"  tensors:  {info.n_tensors}",
    ]
    if info.extra_entries:
        text.append(f"  ignored:  {', '.join(info.extra_entries)}")
    text.append("  loadable: yes" if info.loadable else f"  loadable: no ({'; '.join(info.problems)})")
    _emit(args, info.as_dict(), "\n".join(text))
    if not info.loadable:
        print(f"{PROG}: error: {info.path}: {info.problems[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from medico_adapters import checkpoint

    if not args.output and not args.onnx:
        raise MedicoError("export needs -o OUT (a plain state dict) and/or --onnx DIR (the ONNX pair AnyLabeling runs)")
    if args.model_type and args.onnx and not args.output:
        checkpoint.require_loadable(checkpoint.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint), args.model_type)
    if args.output:
        info = checkpoint.export_checkpoint(
            args.checkpoint, args.output, decoder_out=args.decoder_out,
            expect_arch=args.model_type, trust=args.trust_checkpoint,
        )
        if not args.json:
            print(f"wrote {args.output} (plain {info.arch} state dict, {info.n_tensors} tensors, from {info.format} format)")
            if args.decoder_out:
                print(f"wrote {args.decoder_out} (decoder state)")
    if args.onnx:
        return _export_onnx(args)
    return 0


def _export_onnx(args) -> int:
    from medico_adapters import onnx_export

    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    report = onnx_export.export_onnx(args.checkpoint, args.onnx, int8=args.int8, trust=args.trust_checkpoint, say=say)
    lines = [
        f"wrote {report.encoder} and {report.decoder} ({report.arch}, AnyLabeling's SAM ONNX format) and {args.onnx}/config.yaml",
        f"  checked with onnxruntime on a CT phantom: embedding max abs diff {report.encoder_max_abs_diff:.2e} (limit {onnx_export.TOLERANCE:g}), "
        f"decoder masks {'equal' if report.decoder_masks_equal else f'equal but for {report.decoder_tie_pixels} tie pixels at the threshold'} "
        f"(logits max abs diff {report.decoder_max_abs_diff:.2e})",
    ]
    if report.int8_encoder:
        lines.append(f"wrote {report.int8_encoder} (int8 weights; embedding cosine vs fp32 {report.int8_cosine:.5f})")
    lines.append(f"  AnyLabeling: Auto Labeling > ...Load Custom Model > {args.onnx}/config.yaml, or `medico-adapters patch anylabeling`")
    _emit(args, report.as_dict(), "\n".join(lines))
    return 0


# --- tool commands ---------------------------------------------------------------------------


def _tool_options(args) -> dict:
    options = {}
    for key in ("keep_default", "napari_compat", "model_dir"):
        value = getattr(args, key, None)
        if value not in (None, False):
            options[key] = str(value) if key == "model_dir" else value
    options.update(_accelerate_option(args))
    return options


def _accelerate_option(args) -> dict:
    """``--accelerate`` / ``--no-accelerate``: kept in the manifest, so only an explicit flag changes it."""
    from medico_adapters.adapters import TOOLS

    accelerate = getattr(args, "accelerate", None)
    if accelerate is None:
        return {}
    supported = sorted(tool for tool, adapter in TOOLS.items() if adapter.accelerates)
    if accelerate and args.tool not in supported:
        raise MedicoError(f"--accelerate: {args.tool} has no SAM model of its own for the kit to accelerate; it works for {', '.join(supported)}")
    return {"accelerate": accelerate}


#: tools found through the Python that runs napari (``--python``).
NAPARI_PLUGINS = ("napari-sam", "napari-segment-anything")


def _tool_root(adapter, args) -> tuple[Path | None, list[str]]:
    """The tree to work on and notes for the user: the copy ``--python`` runs (napari-sam), or
    ``--path`` as given (None: the installed copy), which ``patching`` resolves through the adapter."""
    if adapter.tool in NAPARI_PLUGINS and args.path is None:
        from medico_adapters.adapters.napari_sam import napari_on_path_note

        root = adapter.locate(args.python)
        note = napari_on_path_note(args.python, root)
        return root, [note] if note else []
    return (Path(args.path) if args.path is not None else None), []


def _check_python(args) -> None:
    if getattr(args, "python", None) is not None and args.tool not in NAPARI_PLUGINS:
        raise MedicoError(f"--python: only napari-sam is found through the Python that runs it, not {args.tool}")


def _notes(args, notes: list[str]) -> None:
    """Notes go to stderr, so that stdout stays the report (or the one JSON object)."""
    if not getattr(args, "json", False):
        for note in notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)


def cmd_patch(args) -> int:
    _check_python(args)
    if args.tool == "micro-sam":
        from medico_adapters.adapters import micro_sam

        _accelerate_option(args)
        result = micro_sam.patch(args.checkpoint, cache=args.path, dry_run=args.dry_run, trust=args.trust_checkpoint)
        _emit(args, result, result["message"])
        return 0
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter

    adapter = get_adapter(args.tool)
    options = _tool_options(args)
    root, notes = _tool_root(adapter, args)
    if args.tool == "napari-sam" and args.napari_compat is None:
        from medico_adapters.adapters.napari_sam import needs_layers_compat

        if needs_layers_compat(args.python):
            options["napari_compat"] = True
    if args.tool == "napari-segment-anything" and args.napari_compat is None:
        from medico_adapters.adapters.napari_segment_anything import needs_labels_compat

        options["napari_compat"] = needs_labels_compat(args.python)
    result = patching.patch(
        adapter, root, checkpoint=args.checkpoint, name=args.name,
        options=options, dry_run=args.dry_run, trust=args.trust_checkpoint,
    )
    result.notes += notes
    _notes(args, notes)
    if args.diff and not args.json:
        sys.stdout.write(result.diff)
    verb = "would change" if args.dry_run else "changed"
    if not result.changed and not result.placed:
        text = f"{result.root}: already patched ({adapter.tool} layout {result.layout}); nothing to do"
    else:
        text = "\n".join(
            [f"{result.root}: {adapter.tool} layout {result.layout}"]
            + [f"  {verb} {rel}" for rel in result.changed]
            + [f"  {'would place' if args.dry_run else 'placed'} checkpoint {p}" for p in result.placed]
            + [f"  entries: {', '.join(e.name for e in result.entries)}"]
        )
    if result.recovered:
        text = f"completed an interrupted {result.recovered} first\n" + text
    data = result.as_dict()
    if args.diff:
        data["diff"] = result.diff
    _emit(args, data, "" if (args.diff and args.dry_run) else text)
    return 0


def cmd_unpatch(args) -> int:
    _check_python(args)
    if args.tool == "micro-sam":
        from medico_adapters.adapters import micro_sam

        result = micro_sam.unpatch(cache=args.path)
        _emit(args, result, result["message"])
        return 0
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter

    adapter = get_adapter(args.tool)
    root, notes = _tool_root(adapter, args)
    result = patching.unpatch(adapter, root, name=args.name, force=args.force)
    result["notes"] = notes
    _notes(args, notes)
    if "removed_entry" in result:
        text = f"{result['path']}: removed entry {result['removed_entry']!r}"
    else:
        text = "\n".join([f"{result['path']}: restored"] + [f"  {rel}" for rel in result["restored"]])
    _emit(args, result, text)
    return 0


def cmd_status(args) -> int:
    _check_python(args)
    if args.tool == "micro-sam":
        from medico_adapters.adapters import micro_sam

        result = micro_sam.status(cache=args.path)
        _emit(args, result, result["message"])
        return 0
    from medico_adapters import patching
    from medico_adapters.adapters import get_adapter

    adapter = get_adapter(args.tool)
    root, notes = _tool_root(adapter, args)
    st = patching.status(adapter, root)
    st["notes"] = notes
    _notes(args, notes)
    lines = [
        f"{st['path']}: {st['tool']}",
        f"  layout:  {st['layout'] or 'unknown'} ({st['layout_description']})",
        f"  patched: {'yes' if st['patched'] else 'no'}" + (f" (kit {st['kit_version']})" if st["kit_version"] else ""),
    ]
    lines += [f"  entry:   {e['name']} ({e['arch']}, {e['filename']})" for e in st["entries"]]
    lines += [f"  file:    {rel}: {state}" for rel, state in st["files"].items()]
    for c in st["checkpoints"]:
        state = "matching" if c["matching"] else ("present but changed" if c["present"] else "missing")
        lines.append(f"  checkpoint: {c['path']}: {state}")
    lines += [f"  feature: {f}" for f in st["features"]]
    if st["interrupted"]:
        lines.append("  an interrupted run left a journal: run patch or unpatch to finish it")
    _emit(args, st, "\n".join(lines))
    return 0


def cmd_install(args) -> int:
    from medico_adapters import install

    result = install.install(
        args.tool, version=args.version, ref=args.ref, dest=args.dest, path=args.path, checkpoint=args.checkpoint,
        python=args.python, name=args.name, skip_verify=args.no_verify, options=_tool_options(args),
    )
    _emit(args, result, result["message"])
    return 0


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(round(float(v))) for v in text.split(",")]
    except ValueError:
        raise MedicoError(f"{option} {text!r}: expected comma-separated numbers") from None


def _point(text: str) -> tuple[int, ...]:
    coords, _, label = text.partition(":")
    values = _ints(coords, "--point")
    if len(values) not in (2, 3):
        raise MedicoError(f"--point {text!r}: expected Z,Y,X (volume) or Y,X (2D), optionally :LABEL")
    if label not in ("", "0", "1"):
        raise MedicoError(f"--point {text!r}: the label must be 1 (foreground) or 0 (background)")
    return (*values, int(label or 1))


def _window(text: str | None):
    if text is None or "," not in text:
        return text
    width, level = _ints(text, "--window")[:2]
    return (float(width), float(level))


def cmd_segment(args) -> int:
    import warnings

    from medico_adapters import segment
    from medico_adapters.predictor import BackendWarning

    boxes = [tuple(_ints(b, "--box")) for b in args.box]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackendWarning)
        report = segment.segment(
            args.image, args.output, points=[_point(p) for p in args.point], boxes=boxes, auto=args.auto,
            checkpoint=args.checkpoint, window=_window(args.window), overlay=args.overlay, slice_index=args.slice,
            device=args.device, exact=not args.fast, propagate_masks=not args.no_propagate,
            progress=not args.json, backend=args.backend,
        )
    for w in caught:  # one plain line each, like errors; anything else keeps Python's format
        if issubclass(w.category, BackendWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, BackendWarning)]
    summary = f"wrote {report['output']} ({report.get('voxels', report.get('objects', 0))} " + (
        "objects" if report["mode"] == "auto" else "voxels") + f", slice {report['slice']}, {report['seconds']} s; " + (
        f"encoder: {report['backend']} {report['precision']})")
    if report.get("overlay"):
        summary += f"\nwrote {report['overlay']}"
    _emit(args, report, summary)
    return 0


def cmd_demo(args) -> int:
    from medico_adapters import demo

    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    report = demo.run(
        args.out, screenshot=args.screenshot, checkpoint=args.checkpoint,
        napari_sam_version=args.napari_sam_version, target=args.target, keep_temp=args.keep_temp, say=say,
    )
    _emit(args, report, demo.summary(report))
    return 0


# --- parser ------------------------------------------------------------------------------------

EXAMPLES = {
    "models": "medico-adapters models --json",
    "fetch": "medico-adapters fetch vit_b_medical_imaging --from-file ~/Downloads/medicosam.pt",
    "check": "medico-adapters check medicosam.pt",
    "export": "medico-adapters export medicosam.pt -o vit_b_medicosam.pt --decoder-out decoder.pt\n  medico-adapters export medicosam.pt --onnx medicosam-onnx --int8",
    "patch": "medico-adapters patch samm --path ./samm --dry-run --diff",
    "unpatch": "medico-adapters unpatch napari-sam",
    "status": "medico-adapters status napari-sam --json",
    "install": "medico-adapters install napari-sam --version 0.4.13",
    "segment": "medico-adapters segment ct.nii.gz -o mask.nii.gz --point 40,256,256 --window soft_tissue",
    "demo": "medico-adapters demo --out medico-demo --screenshot medico-demo/widget.png",
}


TOOL_HELP = (
    "napari-sam, napari-segment-anything, micro-sam, samm, slicer-segment-with-sam, isat-sam or anylabeling"
)


def _sub(subs, name: str, help_text: str, func) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name, help=help_text, description=f"{help_text}\n\nexample:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def _add_trust(p) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")


def _add_tool_options(p) -> None:
    p.add_argument("--keep-default", action="store_true",
                   help="samm: leave the upstream default model (vit_b/vit_h) in place")
    p.add_argument("--model-dir", help="samm-server: the model directory (default <repo>/checkpoints)")
    compat = p.add_mutually_exclusive_group()
    compat.add_argument("--napari-compat", dest="napari_compat", action="store_true", default=None,
                        help="napari-sam: also fix the napari>=0.6.2 layers_change break; napari-segment-anything: the napari>=0.5 add_labels break (auto-detected)")
    compat.add_argument("--no-napari-compat", dest="napari_compat", action="store_false")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument("--accelerate", dest="accelerate", action="store_true", default=None,
                      help="napari-sam, napari-segment-anything, samm, slicer-segment-with-sam: the tool's own SAM model "
                           "gets the kit's faster image encoder, with the same embedding (OpenVINO f32 when installed in "
                           "the tool's Python, else SDPA); kept until --no-accelerate")
    fast.add_argument("--no-accelerate", dest="accelerate", action="store_false",
                      help="remove the accelerator again (the rest of the patch stays)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Put MedicoSAM (or any SAM checkpoint) into napari-sam, napari-segment-anything, micro-sam, samm, SlicerSegmentWithSAM, ISAT-SAM and AnyLabeling.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True

    p = _sub(subs, "models", "List the known checkpoints and whether they are cached.", cmd_models)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _sub(subs, "fetch", "Download a known checkpoint into the cache, verifying its hash.", cmd_fetch)
    p.add_argument("name", help="registry name (see `models`), e.g. vit_b_medical_imaging")
    p.add_argument("--from-file", metavar="PATH", help="register a local copy instead of downloading")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = _sub(subs, "check", "Say what a checkpoint is: format, architecture, decoder, loadable.", cmd_check)
    p.add_argument("checkpoint")
    p.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h", "vit_t"], help="fail unless the weights are this architecture")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_trust(p)

    p = _sub(subs, "export", "Write a plain SAM state dict (CPU tensors) every tool can load.", cmd_export)
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", help="the plain state dict to write")
    p.add_argument("--decoder-out", metavar="OUT2", help="also write the segmentation decoder state here")
    p.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h", "vit_t"], help="fail unless the weights are this architecture")
    p.add_argument("--onnx", metavar="DIR", help="write AnyLabeling's ONNX encoder/decoder pair and config.yaml here, checked with onnxruntime (needs the [onnx] extra)")
    p.add_argument("--int8", action="store_true", help="with --onnx: also write an int8-quantised encoder and report its cosine vs fp32")
    p.add_argument("--json", action="store_true", help="print the --onnx report as one JSON object")
    _add_trust(p)

    for name, help_text, func in (
        ("patch", "Rewrite a tool so it offers and loads MedicoSAM, and place the checkpoint it reads.", cmd_patch),
        ("unpatch", "Restore every file a patch changed, byte for byte, and remove placed checkpoints.", cmd_unpatch),
        ("status", "Show a tool's detected layout, patch state and checkpoints.", cmd_status),
    ):
        p = _sub(subs, name, help_text, func)
        p.add_argument("tool", metavar="TOOL", help=TOOL_HELP)
        p.add_argument("--path", metavar="DIR",
                       help="the tool's source tree or install, any level of it (default: the installed copy); "
                            "micro-sam: the folder MICROSAM_CACHEDIR names")
        p.add_argument("--python", metavar="PY",
                       help="napari-sam: the copy installed for this Python, the one you start napari with")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "patch":
            p.add_argument("--checkpoint", metavar="CKPT", help="weights to place (any format; default: cached MedicoSAM)")
            p.add_argument("--name", help="add the checkpoint as a model entry with this name instead of MedicoSAM")
            p.add_argument("--dry-run", action="store_true", help="change nothing; say what would change")
            p.add_argument("--diff", action="store_true", help="print the unified diff of the source changes")
            _add_trust(p)
            _add_tool_options(p)
        if name == "unpatch":
            p.add_argument("--name", help="remove only this entry (and its checkpoint)")
            p.add_argument("--force", action="store_true", help="restore files even if edited since the patch")

    p = _sub(subs, "install", "Get a tool (pip or a pinned git clone), then patch it and check it loads.", cmd_install)
    p.add_argument("tool", metavar="TOOL", help=TOOL_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", help="PyPI release to install (napari-sam, napari-segment-anything, micro-sam, isat-sam, anylabeling)")
    g.add_argument("--ref", help="git commit/tag to clone (samm, slicer-segment-with-sam)")
    p.add_argument("--dest", metavar="DIR", help="where to clone git tools")
    p.add_argument("--path", metavar="DIR", help="patch this existing checkout instead of cloning")
    p.add_argument("--checkpoint", metavar="CKPT")
    p.add_argument("--name")
    p.add_argument("--python", help="the Python environment to pip-install into (default: this one)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the model through the tool's code")
    p.add_argument("--json", action="store_true")
    _add_tool_options(p)

    p = _sub(subs, "segment", "Segment a 2D image or 3D volume with MedicoSAM from point/box prompts.", cmd_segment)
    p.add_argument("image", help="NIfTI, NRRD, MHA, DICOM series folder, PNG or TIFF")
    p.add_argument("-o", "--output", required=True, help="mask file to write (same geometry as IMAGE)")
    p.add_argument("--point", action="append", default=[], metavar="Z,Y,X[:LABEL]", help="point prompt (Y,X for 2D); label 1 = foreground, 0 = background")
    p.add_argument("--box", action="append", default=[], metavar="Z,Y0,X0,Y1,X1", help="box prompt (Y0,X0,Y1,X1 for 2D)")
    p.add_argument("--auto", action="store_true", help="automatic mask generation on a 2D image or --slice")
    p.add_argument("--slice", type=int, help="slice index for --auto on a volume")
    p.add_argument("--checkpoint", metavar="CKPT", help="weights (default: cached MedicoSAM)")
    p.add_argument("--window", help="CT window preset (soft_tissue, lung, bone, brain) or W,L; default: percentile")
    p.add_argument("--overlay", metavar="PNG", help="also write a PNG of the prompted slice with the mask")
    p.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N")
    p.add_argument("--fast", action="store_true",
                   help="faster, near-identical embeddings (bf16 where the CPU has it natively, else f32)")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="what runs the image encoder; auto: OpenVINO on a CPU when installed, else torch")
    p.add_argument("--no-propagate", action="store_true", help="3D: segment only the prompted slice")
    p.add_argument("--json", action="store_true")
    _add_trust(p)

    p = _sub(subs, "demo", "Run napari-sam's real widget on a CT phantom with MedicoSAM (a patched temporary copy); "
             "with a display it is docked in a shown napari window, saved as window.png.", cmd_demo)
    p.add_argument("--out", default="medico-demo", metavar="DIR", help="where overlay.png, window.png (with a display), report.md and report.json go (default ./medico-demo)")
    p.add_argument("--screenshot", metavar="PATH", help="also save a PNG of the widget and its model list (Qt grab)")
    p.add_argument("--checkpoint", metavar="CKPT", help="weights to load (default: cached MedicoSAM, else a labelled random stand-in)")
    p.add_argument("--napari-sam-version", metavar="V", help="use this napari-sam release from PyPI instead of the installed copy")
    p.add_argument("--target", choices=["lesion", "liver"], default="lesion", help="what the click lands on (default lesion)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (patched copy, HOME) for inspection")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress lines)")
    return parser


#: options naming files or folders: made absolute before any command runs, so that what the
#: manifest records, and what ``status``/``unpatch`` read back later, never depends on the cwd.
PATH_OPTIONS = ("path", "model_dir", "checkpoint", "dest")


def _absolute_paths(args) -> None:
    for key in PATH_OPTIONS:
        value = getattr(args, key, None)
        if value:
            setattr(args, key, str(Path(value).expanduser().resolve()))
    python = getattr(args, "python", None)
    if python:
        args.python = _interpreter(python)


def _interpreter(value: str) -> str:
    """``--python``: a path (kept unresolved: a venv's python is a symlink to its base) or a
    command name found on PATH."""
    path = Path(value).expanduser()
    if path.parent != Path() or path.is_file():
        return str(path.absolute())
    found = shutil.which(value)
    if found is None:
        raise MedicoError(f"--python {value}: no such interpreter (not a file, not on PATH)")
    return str(Path(found).absolute())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _absolute_paths(args)
        return args.func(args)
    except MedicoError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename or "file system"
        print(f"{PROG}: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    raise SystemExit(main())
