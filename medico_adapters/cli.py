"""The ``medico-adapters`` command line (contract: shared/CLI.md)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from medico_adapters import __version__
from medico_adapters.errors import MedicoError, TrainingInterrupted

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
    trained = _training_record(Path(args.checkpoint))
    if trained is not None:
        text.append(f"  trained:  {trained['summary']}")
    text.append("  loadable: yes" if info.loadable else f"  loadable: no ({'; '.join(info.problems)})")
    _emit(args, {**info.as_dict(), "training": trained}, "\n".join(text))
    if not info.loadable:
        print(f"{PROG}: error: {info.path}: {info.problems[0]}", file=sys.stderr)
        return 1
    return 0


def _training_record(path: Path) -> dict | None:
    """The ``finetune`` record beside a checkpoint (``OUT.json``), if it describes this very file."""
    from medico_adapters import fsio

    record_path = path.with_suffix(".json")
    try:
        record = json.loads(record_path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") != "medico-adapters finetune":
        return None
    if record.get("sha256") != fsio.sha256_file(path):
        return {"record": str(record_path), "summary": f"{record_path.name} describes another file (the checkpoint changed since)"}
    summary = f"medico-adapters finetune ({record['mode']}, {record['steps']} steps"
    ev = record.get("evaluation") or {}
    if ev.get("before") and ev.get("after"):
        summary += f", validation Dice {ev['before']['point']['mean']:.3f} -> {ev['after']['point']['mean']:.3f}"
    summary += f"), record {record_path.name}"
    return {"record": str(record_path), "summary": summary, "mode": record["mode"], "steps": record["steps"],
            "base_checkpoint": record.get("base_checkpoint")}


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
    options.update(_lazy_option(args))
    return options


def _switch(args, key: str, supports: str, why: str) -> dict:
    """A ``--X`` / ``--no-X`` tool option: kept in the manifest, so only an explicit flag changes
    it; turning it on for a tool whose adapter lacks ``supports`` is refused with ``why``."""
    from medico_adapters.adapters import TOOLS

    value = getattr(args, key, None)
    if value is None:
        return {}
    supported = sorted(tool for tool, adapter in TOOLS.items() if getattr(adapter, supports))
    if value and args.tool not in supported:
        flag = "--" + key.replace("_", "-")
        raise MedicoError(f"{flag}: {args.tool} {why}; it works for {', '.join(supported) or 'no tool yet'}")
    return {key: value}


def _accelerate_option(args) -> dict:
    return _switch(args, "accelerate", "accelerates", "has no SAM model of its own for the kit to accelerate")


def _lazy_option(args) -> dict:
    return _switch(args, "lazy_embeddings", "lazy_embeddings", "does not embed images through code the kit can rewrite")


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


def _segment_with_model(args) -> int:
    from medico_adapters import automatic

    if args.point or args.box or args.auto or args.slice is not None:
        raise MedicoError("--model segments every class without prompts; leave out --point/--box/--auto/--slice")
    if args.checkpoint:
        raise MedicoError("--model carries its own SAM weights; leave out --checkpoint")
    report = automatic.segment_labels(args.image, args.output, args.model, dims=args.dims, device=args.device,
                                      backend=args.backend, slab=args.slab, store_root=args.store, progress=not args.json)
    found = ", ".join(f"{name} {count}" for name, count in report["voxels"].items())
    _emit(args, report, f"wrote {report['output']} ({report['dims']}D model; voxels: {found}; {report['seconds']} s)\n"
                        f"wrote {report['classes_file']} (the class table)")
    return 0


def cmd_segment(args) -> int:
    import warnings

    if args.model:
        return _segment_with_model(args)
    if args.dims is not None:
        raise MedicoError("--dims checks a semantic model's kind; it goes with --model")

    from medico_adapters import segment
    from medico_adapters.predictor import BackendWarning

    boxes = [tuple(_ints(b, "--box")) for b in args.box]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackendWarning)
        report = segment.segment(
            args.image, args.output, points=[_point(p) for p in args.point], boxes=boxes, auto=args.auto,
            checkpoint=args.checkpoint, window=_window(args.window), overlay=args.overlay, slice_index=args.slice,
            device=args.device, exact=not args.fast, propagate_masks=not args.no_propagate,
            progress=not args.json, backend=args.backend, store=args.store,
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


def _slices_per_case(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise MedicoError(f"--slices-per-case {text!r}: give a number or 'all'") from None
    if value < 1:
        raise MedicoError(f"--slices-per-case {text!r}: give at least 1")
    return value


def cmd_finetune(args) -> int:
    from medico_adapters.training.finetune import FinetuneSettings, finetune

    if args.patch and args.semantic:
        raise MedicoError("--patch: a semantic model is used by `segment --model`, not by the interactive tools")
    if bool(args.patch) != bool(args.name):
        raise MedicoError("--patch TOOL and --name NAME go together: the trained model is added to TOOL under NAME")
    if args.classes and args.objects:
        raise MedicoError("--classes and --objects name the same thing; give one")
    if not args.semantic and (args.dims != 2 or args.classes):
        raise MedicoError("--dims and --classes are for --semantic models")
    chosen = args.classes or args.objects
    settings = FinetuneSettings(
        mode=args.train, objects=tuple(o for o in (chosen or "").split(",") if o.strip()) or None,
        semantic=args.semantic, dims=args.dims, context=args.context, batch=args.batch,
        connected=args.connected, slices_per_case=_slices_per_case(args.slices_per_case), val_fraction=args.val_fraction,
        window=_window(args.window) if args.window else "auto", iterations=args.iterations, minutes=args.minutes,
        seed=args.seed, lr=args.lr, objects_per_step=args.objects_per_step, rounds=args.rounds,
        lora_rank=args.lora_rank, val_every=args.val_every, checkpoint_minutes=args.checkpoint_minutes,
        checkpoint_every=args.checkpoint_every, precision=args.precision,
    )
    say = (lambda line: None) if args.json else (lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
    report = finetune(args.data, args.output, checkpoint=args.checkpoint, labels=args.labels, settings=settings,
                      resume=args.resume, device=args.device, store_root=args.store, backend=args.backend,
                      progress=not args.json, say=say)
    ev = report["evaluation"]
    kind = "semantic model" if report["task"] == "semantic" else "checkpoint"
    lines = [f"wrote {report['output']} ({kind}, {report['mode']} training, {report['steps']} steps, stopped by {report['stopped']})"]
    if ev.get("before") and ev.get("after"):
        b, a = ev["before"]["point"]["mean"], ev["after"]["point"]["mean"]
        lines.append(f"  validation Dice, one centre click: {b:.3f} -> {a:.3f}")
    elif (ev.get("after") or {}).get("per_class"):
        per = ", ".join(f"{n} {d:.3f}" for n, d in ev["after"]["per_class"].items() if d is not None)
        lines.append(f"  validation Dice per class: {per}")
    lines += [f"  {Path(f).name}" for f in report["files"][1:]]
    if args.patch:
        # the patch command's own parser: its defaults, whatever options it grows
        patch_args = build_parser().parse_args(
            ["patch", args.patch, "--checkpoint", str(report["output"]), "--name", args.name,
             *(["--path", str(args.path)] if args.path else [])]
        )
        if args.json:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()) as captured:
                cmd_patch(patch_args)
            report["patch"] = captured.getvalue().strip()
        else:
            print("\n".join(lines))
            lines = []
            cmd_patch(patch_args)
    _emit(args, report, "\n".join(lines))
    return 0

def cmd_precompute(args) -> int:
    from medico_adapters.embeddings.precompute import precompute

    report = precompute(
        args.inputs, args.checkpoint, args.store, scheduler=args.scheduler, workers=args.workers,
        window=_window(args.window), slab=args.slab, backend=args.backend, device=args.device,
        trust=args.trust_checkpoint, verify=not args.no_verify, microsam_dir=args.microsam_zarr, progress=not args.json,
    )
    errors = [error for row in report["files"] for error in row["errors"]]
    for error in errors:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    t = report["totals"]
    lines = [f"{row['input']}: {row['slices']} slices, {row['computed']} computed, {row['skipped']} already stored"
             + (f", {row['failed']} failed" if row["failed"] else "") + (" (error)" if row["errors"] else "")
             + (f"; micro-sam file {row['microsam']}" if row.get("microsam_written") is not None else "")
             for row in report["files"]]
    lines.append(f"{t['computed']} slices computed, {t['skipped']} already stored, {t['failed']} failed, "
                 f"{t['files_with_errors']} of {t['files']} files with errors; {report['seconds']} s "
                 f"({report['computed_per_hour']} computed slices/h); store {report['store']}")
    _emit(args, report, "\n".join(lines))
    return 1 if errors or t["failed"] else 0


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
    "segment": "medico-adapters segment ct.nii.gz -o mask.nii.gz --point 40,256,256 --window soft_tissue\n"
               "  medico-adapters segment ct.nii.gz --model organs.pt -o organs.seg.nrrd",
    "demo": "medico-adapters demo --out medico-demo --screenshot medico-demo/widget.png",
    "finetune": "medico-adapters finetune ./Task03_Liver -o liver.pt --objects liver,tumour --minutes 30\n"
                "  medico-adapters finetune ./scans --labels ./labels -o mine.pt --patch napari-sam --name \"My MedicoSAM\"",
    "precompute": "medico-adapters precompute Task03_Liver ct1.nii.gz dicom/ --checkpoint medicosam.pt --store /data/embeddings --workers 2\n"
                  "  medico-adapters precompute scans/*.nii.gz --checkpoint medicosam.pt --store /shared/emb --scheduler tcp://head:8786",
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
                           "the tool's Python, else SDPA); napari-sam and napari-segment-anything: also turns "
                           "--lazy-embeddings on unless --no-lazy-embeddings; kept until --no-accelerate")
    fast.add_argument("--no-accelerate", dest="accelerate", action="store_false",
                      help="remove the accelerator again (the rest of the patch stays)")
    lazy = p.add_mutually_exclusive_group()
    lazy.add_argument("--lazy-embeddings", dest="lazy_embeddings", action="store_true", default=None,
                      help="napari-sam, napari-segment-anything: embed a slice when a prompt first needs it, the rest "
                           "in the background; samm: its server's CalculateEmbeddings; all through the kit's "
                           "embedding store, so a volume is embedded once; kept until --no-lazy-embeddings")
    lazy.add_argument("--no-lazy-embeddings", dest="lazy_embeddings", action="store_false",
                      help="remove the lazy embedding code again (the rest of the patch stays)")


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
    p.add_argument("--window", help="CT window preset (soft_tissue, lung, bone, brain) or W,L; microsam: micro-sam's "
                   "per-slice min-max, sharing its embeddings; default: percentile (uint8 images kept)")
    p.add_argument("--overlay", metavar="PNG", help="also write a PNG of the prompted slice with the mask")
    p.add_argument("--store", metavar="DIR", help="the embedding store read and written (default: $MEDICO_EMBEDDING_STORE, "
                   "else embeddings/ in the kit's cache); what `precompute --store` filled")
    p.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N")
    p.add_argument("--fast", action="store_true",
                   help="faster, near-identical embeddings (bf16 where the CPU has it natively, else f32)")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="what runs the image encoder; auto: OpenVINO on a CPU when installed, else torch")
    p.add_argument("--no-propagate", action="store_true", help="3D: segment only the prompted slice")
    p.add_argument("--model", metavar="SEMANTIC.pt", help="a model from `finetune --semantic`: label every class, no prompts")
    p.add_argument("--dims", type=int, choices=[2, 3], help="with --model: refuse unless the model is 2D or 3D")
    p.add_argument("--slab", type=int, default=16, metavar="N", help="with --model: slices embedded and held at once (default 16)")
    p.add_argument("--json", action="store_true")
    _add_trust(p)

    p = _sub(subs, "finetune", "Fine-tune SAM on your labelled scans (a CPU is enough for --train decoder) and write a "
             "checkpoint every tool loads, with a report.", cmd_finetune)
    p.add_argument("data", metavar="DATA", help="a Decathlon/nnU-Net folder (dataset.json), a folder with images/ and labels/, "
                   "or an image folder with --labels DIR")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt",
                   help="the checkpoint to write (a plain SAM state dict); OUT.json, OUT-report.md/.json/-*.png and OUT-train/ go beside it")
    p.add_argument("--labels", metavar="DIR", help="the folder of label maps, matched to DATA's images by file name")
    p.add_argument("--checkpoint", metavar="BASE", help="the weights to start from (default: cached MedicoSAM)")
    p.add_argument("--train", choices=["decoder", "lora", "full"], default="decoder",
                   help="decoder (default): frozen encoder, each slice embedded once; lora: adapters on the encoder's attention "
                        "(a GPU job); full: every weight (a GPU job)")
    p.add_argument("--semantic", action="store_true",
                   help="train an automatic segmenter (a class per pixel, no prompts) for `segment --model`")
    p.add_argument("--dims", type=int, choices=[2, 3], default=2,
                   help="--semantic: 2 (each slice alone) or 3 (neighbouring slices too; default 2)")
    p.add_argument("--context", type=int, default=1, help="--dims 3: neighbouring slices on each side (default 1)")
    p.add_argument("--classes", metavar="NAMES", help="--semantic: the classes (label names or values); default: all labels")
    p.add_argument("--batch", type=int, default=2, help="--semantic: slices per step (default 2)")
    p.add_argument("--objects", metavar="NAMES", help="comma-separated label names (from dataset.json) or values; default: all")
    p.add_argument("--connected", action="store_true", help="each connected part of a label on a slice is its own object")
    p.add_argument("--slices-per-case", default="12", metavar="N",
                   help="slices per case, spread over the labelled extent (default 12; 'all': every labelled slice -- "
                        "each costs an embedding, seconds on a CPU)")
    p.add_argument("--iterations", type=int, metavar="N", help=f"training steps (default {500} unless --minutes is given)")
    p.add_argument("--minutes", type=float, metavar="M", help="stop cleanly after M minutes (embedding and evaluation included)")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F", help="share of cases held out for validation (default 0.2; 0: none)")
    p.add_argument("--window", help="CT window preset or W,L, or percentile; default auto: soft tissue for CT, percentiles otherwise")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the sampling and the prompts (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default 1e-3)")
    p.add_argument("--objects-per-step", type=int, default=2, metavar="K", help="objects of one slice per step (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="prompt rounds per step: the first prompt plus corrections (default 2)")
    p.add_argument("--precision", choices=["auto", "f32", "bf16"], default="auto",
                   help="training steps: auto (default) runs them under bf16 autocast where the hardware has bf16 "
                        "(read from the CPU's flags), f32 elsewhere; weights stay f32")
    p.add_argument("--lora-rank", type=int, default=4, help="--train lora: adapter rank (default 4)")
    p.add_argument("--val-every", type=int, default=100, metavar="N", help="validation Dice every N steps (default 100)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M", help="save a resumable checkpoint every M minutes (default 5)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="also save one every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT-train/ (same options; a larger --iterations continues a finished run)")
    p.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N")
    p.add_argument("--store", metavar="DIR", help="the embedding store (default: $MEDICO_EMBEDDING_STORE, else the kit's cache)")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="what embeds the slices (exact f32 either way); auto: OpenVINO on a CPU when installed")
    p.add_argument("--patch", metavar="TOOL", help="then add the trained model to TOOL (as `patch TOOL --checkpoint OUT.pt --name NAME`)")
    p.add_argument("--name", help="with --patch: the model's name in the tool")
    p.add_argument("--path", metavar="DIR", help="with --patch: the tool's tree (default: the installed copy)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p = _sub(subs, "precompute", "Embed every slice of a cohort into the embedding store with Dask, so that segment and "
             "the patched tools read instead of computing.", cmd_precompute)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="volume files (NIfTI, NRRD, MHA), DICOM series folders, Decathlon folders (dataset.json, imagesTr/)")
    p.add_argument("--checkpoint", metavar="CKPT", required=True, help="the weights to embed with (any format check accepts)")
    p.add_argument("--store", metavar="DIR", help="the embedding store (default: $MEDICO_EMBEDDING_STORE, else embeddings/ in "
                   "the kit's cache); on a cluster, a folder every worker sees at this path")
    p.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (tcp://host:8786); default: a "
                   "LocalCluster of worker processes on this machine")
    p.add_argument("--workers", type=int, metavar="N", help="LocalCluster worker processes, each loading the model once "
                   "(default: one per 4 cores); threads per worker = cores / N")
    p.add_argument("--window", help="the normalisation the entries are for, as segment's --window: soft_tissue, lung, "
                   "bone, brain, W,L, percentile, or microsam (micro-sam's per-slice min-max); default: segment's default "
                   "(percentile; uint8 images kept). segment with the same --window finds every slice")
    p.add_argument("--slab", type=int, default=8, metavar="W", help="slices per Dask task (default 8)")
    p.add_argument("--microsam-zarr", metavar="DIR", help="also write each input's micro-sam embedding file "
                   "(DIR/NAME.zarr, for micro-sam's annotators' embedding_path); implies --window microsam")
    p.add_argument("--no-verify", action="store_true", help="skip slices whose entry file exists without reading it "
                   "(default: workers check each entry's digest and recompute damaged ones)")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="what runs the encoder on the workers (exact f32 whichever you pick)")
    p.add_argument("--device", help="the workers' device: auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
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
PATH_OPTIONS = ("path", "model_dir", "checkpoint", "dest", "store", "labels", "model", "microsam_zarr")


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
    except TrainingInterrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 130
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
