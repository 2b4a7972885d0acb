"""``install``: get the tool (pip, or a pinned git clone), patch it, and check it loads MedicoSAM."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from medico_adapters import patching, pyenv
from medico_adapters.adapters import get_adapter
from medico_adapters.adapters import micro_sam as micro_sam_adapter
from medico_adapters.errors import MedicoError, PatchError

#: commits the kit is tested on (newest first); the first is the default ``--ref``.
GIT_TOOLS = {
    "samm": {
        "url": "https://github.com/bingogome/samm",
        "refs": {
            "ee627cd5ad43d65d57182a7a1ae0fca3e51a79fd": "S4, 2024-03-30 (newest legacy layout)",
            "82b46c03b60ee75522bcb73c1c1a60a193b6bc15": "S4, 2023-08-09",
            "9e7533268c2990e9ec1cc7101643de8a6d5b8d84": "S3, 2023-08-08",
            "34e8a63ab659e0fa8c0c5cf9da71f90086e3d74e": "S2, 2023-08-07",
        },
    },
    "slicer-segment-with-sam": {
        "url": "https://github.com/mazurowski-lab/SlicerSegmentWithSAM",
        "refs": {
            "0d3c0a13d073254312f2c972ef196673c04c14fa": "W2, 2024-09-23",
            "bfc2e7e5bccf32d63c68bfa988c31a15982eda9e": "W2, 2024-09-23",
            "d962ed03d849a88b81f05dd52e0dfb24516f843e": "W1, 2024-01-30",
        },
    },
}
GOOD_NAPARI = "0.5.6"

_VERIFY_NAPARI = textwrap.dedent(
    """
    import importlib, json, os, sys
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import torch
    pkg, name = sys.argv[1], sys.argv[2]
    w = importlib.import_module(pkg + "._widget")
    if hasattr(w, "SAM_MODELS"):
        path = w.SamWidget.get_weights_path(None, name)
        model = w.SAM_MODELS[name]["model"](path)
    else:
        getter = getattr(getattr(w, "SamWidget", None), "get_weights_path", None)
        path = getter(None, name) if getter else importlib.import_module(pkg + ".utils").get_weights_path(name)
        model = w.sam_model_registry[name](path)
    expected = torch.load(path, weights_only=True)
    same = all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    print(json.dumps({"checkpoint": str(path), "weights_match": same}))
    sys.exit(0 if same else 1)
    """
)

_VERIFY_MICRO_SAM = textwrap.dedent(
    """
    import json, sys
    from micro_sam.util import get_sam_model
    predictor = get_sam_model(model_type="vit_b", checkpoint_path=sys.argv[1], device="cpu")
    print(json.dumps({"checkpoint": sys.argv[1], "loaded": type(predictor).__name__}))
    """
)


_VERIFY_ISAT = textwrap.dedent(
    """
    import json, sys
    import torch
    from ISAT.segment_any.segment_any import SegAny
    segany = SegAny(sys.argv[1], use_bfloat16=False)
    expected = torch.load(sys.argv[1], weights_only=True)
    same = all(torch.equal(v, expected[k]) for k, v in segany.predictor.model.state_dict().items())
    print(json.dumps({"checkpoint": sys.argv[1], "model_type": segany.model_type, "weights_match": same}))
    sys.exit(0 if same and segany.model_type == sys.argv[2] else 1)
    """
)

_VERIFY_ANYLABELING = textwrap.dedent(
    """
    import json, sys
    import yaml
    from anylabeling.services.auto_labeling.segment_anything import SegmentAnything
    config = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
    config["config_file"] = sys.argv[1]
    model = SegmentAnything(config, on_message=print)
    print(json.dumps({"config": sys.argv[1], "loaded": type(model.model).__name__}))
    """
)

#: PyPI tools patched like napari-sam: pip-install, locate the package, patch, load through its code.
PYPI_TOOLS = {
    "napari-segment-anything": {"packages": ("napari_segment_anything",), "verify": _VERIFY_NAPARI, "napari": True},
    "isat-sam": {"packages": ("ISAT",), "verify": _VERIFY_ISAT},
    "anylabeling": {"packages": ("anylabeling",), "verify": _VERIFY_ANYLABELING},
}


def _pip(python: str, requirements: list[str]) -> None:
    """pip's own progress goes to stderr, so ``--json`` keeps stdout to one object."""
    print(f"installing {' '.join(requirements)} into {python}", file=sys.stderr, flush=True)
    pyenv.run([python, "-m", "pip", "install", *requirements], f"pip install {' '.join(requirements)}", stdout=sys.stderr)


def _install_napari_sam(args: dict) -> dict:
    from medico_adapters.adapters.napari_sam import LAYERS_CHANGE_REMOVED, PACKAGES

    python = args["python"] or sys.executable
    requirements = [f"napari-sam=={args['version']}" if args["version"] else "napari-sam"]
    napari = pyenv.dist_version(python, "napari")
    compat = args["options"].get("napari_compat") or (napari is not None and napari >= LAYERS_CHANGE_REMOVED)
    if napari is None:
        requirements += [f"napari=={GOOD_NAPARI}", "pyqt5"]
    _pip(python, requirements)
    root = args["path"] or pyenv.package_dir(python, PACKAGES)
    if root is None:
        raise PatchError(f"{python}: cannot find the installed napari-sam package after installing it")
    options = {**args["options"], "napari_compat": bool(compat)}
    result = patching.patch(get_adapter("napari-sam"), root, checkpoint=args["checkpoint"], name=args["name"], options=options)
    report = result.as_dict()
    entry = args["name"] or "MedicoSAM"
    if not args["skip_verify"]:
        package = root.name if root.name in PACKAGES else PACKAGES[0]
        proc = pyenv.run([python, "-c", _VERIFY_NAPARI, package, entry], "load the model through napari-sam's code",
                    capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root.parent)})
        report["verified"] = json.loads(proc.stdout.strip().splitlines()[-1])
    report["message"] = (
        f"napari-sam installed and patched at {root} (layout {result.layout}"
        + (", napari>=0.6.2 compat" if compat else "")
        + f"); select {entry!r} in the widget's model list"
        + ("; verified: napari-sam's own loader built it from the placed checkpoint" if "verified" in report else "")
    )
    return report


def _install_micro_sam(args: dict) -> dict:
    python = args["python"] or sys.executable
    _pip(python, [f"micro-sam=={args['version']}" if args["version"] else "micro-sam"])
    report = micro_sam_adapter.patch(args["checkpoint"])
    source = args["checkpoint"] or (report["placed"][0] if report["placed"] else None)
    if source and not args["skip_verify"]:
        proc = pyenv.run([python, "-c", _VERIFY_MICRO_SAM, str(source)], "load the model through micro-sam", capture_output=True, text=True)
        report["verified"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _install_pypi_tool(tool: str, args: dict) -> dict:
    from medico_adapters.engine import Tree

    spec = PYPI_TOOLS[tool]
    python = args["python"] or sys.executable
    requirements = [f"{tool}=={args['version']}" if args["version"] else tool]
    if spec.get("napari") and pyenv.dist_version(python, "napari") is None:
        requirements += [f"napari=={GOOD_NAPARI}", "pyqt5"]
    _pip(python, requirements)
    root = args["path"] or pyenv.package_dir(python, spec["packages"])
    if root is None:
        raise PatchError(f"{python}: cannot find the installed {tool} package after installing it")
    adapter = get_adapter(tool)
    options = dict(args["options"])
    if spec.get("napari") and "napari_compat" not in options:
        from medico_adapters.adapters.napari_segment_anything import needs_labels_compat

        options["napari_compat"] = needs_labels_compat(python)
    result = patching.patch(adapter, root, checkpoint=args["checkpoint"], name=args["name"], options=options)
    report = result.as_dict()
    entry = next(e for e in result.entries if e.name == (args["name"] or "MedicoSAM"))
    if not args["skip_verify"]:
        tree = Tree(root)
        targets = adapter.entry_targets(tree, adapter.detect(tree), entry, args["options"])
        argv = {"napari-segment-anything": [spec["packages"][0], entry.name], "isat-sam": [str(targets[0]), entry.arch],
                "anylabeling": [str(targets[-1])]}[tool]
        proc = pyenv.run([python, "-c", spec["verify"], *argv], f"load the model through {tool}'s code",
                    capture_output=True, text=True, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
        report["verified"] = json.loads(proc.stdout.strip().splitlines()[-1])
    report["message"] = (
        f"{tool} installed and patched at {root} (layout {result.layout}); {entry.name!r} is offered"
        + ("; verified: the tool's own loader built it from the placed files" if "verified" in report else "")
    )
    return report


def _install_git_tool(tool: str, args: dict) -> dict:
    spec = GIT_TOOLS[tool]
    root = Path(args["path"]) if args["path"] else None
    note = ""
    if root is None:
        ref = args["ref"] or next(iter(spec["refs"]))
        if ref not in spec["refs"]:
            note = f" (commit {ref} is not among the tested ones: {', '.join(r[:12] for r in spec['refs'])})"
        root = Path(args["dest"] or spec["url"].rsplit("/", 1)[1])
        if root.exists():
            raise PatchError(f"{root}: already exists; pass --path {root} to patch it, or another --dest")
        pyenv.run(["git", "clone", spec["url"], str(root)], f"git clone {spec['url']}", stdout=sys.stderr)
        pyenv.run(["git", "-C", str(root), "checkout", "-q", ref], f"git checkout {ref}", stdout=sys.stderr)
    adapter = get_adapter(tool)
    root = adapter.resolve(root)
    result = patching.patch(adapter, root, checkpoint=args["checkpoint"], name=args["name"], options=args["options"])
    report = result.as_dict()
    report["message"] = f"{tool} at {root} patched (layout {result.layout}){note}"
    if tool == "slicer-segment-with-sam":
        report["message"] += _slicer_loading_note(adapter, root)
    return report


def _slicer_loading_note(adapter, root: Path) -> str:
    """How Slicer comes to load this copy, and what an Extension Manager install means for it."""
    from medico_adapters import locations
    from medico_adapters.adapters.slicer_sws import MODULE
    from medico_adapters.engine import Tree

    if any(part.startswith("Extensions-") for part in root.parts):
        return ("; Slicer loads it from the Extension Manager's folder (restart Slicer); an extension update "
                "replaces it, so run `medico-adapters patch slicer-segment-with-sam` again after one")
    module_dir = (root / adapter.detect(Tree(root)).files[0]).parent
    text = (
        f"; Slicer loads this clone once {module_dir} (the folder holding {MODULE}) is listed in Edit > "
        "Application Settings > Modules > Additional module paths (then restart Slicer)"
    )
    others = [r for r in adapter.installed(locations.current_env()) if r != root]
    if others:
        return text + (
            f"; Slicer already loads another SegmentWithSAM ({', '.join(map(str, others))}) and loads only one "
            "module of that name: uninstall that one (Extension Manager, or its Additional module path), or "
            "patch it instead with `medico-adapters patch slicer-segment-with-sam --path` naming it"
        )
    return text + (
        "; or install SegmentWithSAM with Slicer's Extension Manager and run "
        "`medico-adapters patch slicer-segment-with-sam`, which finds it (again after each extension update)"
    )


def install(tool: str, *, version=None, ref=None, dest=None, path=None, checkpoint=None, python=None,
            name=None, skip_verify=False, options=None) -> dict:
    args = {"version": version, "ref": ref, "dest": dest, "path": Path(path) if path else None, "checkpoint": checkpoint,
            "python": python, "name": name, "skip_verify": skip_verify, "options": options or {}}
    if tool == "napari-sam":
        return _install_napari_sam(args)
    if tool == "micro-sam":
        return _install_micro_sam(args)
    if tool in PYPI_TOOLS:
        return _install_pypi_tool(tool, args)
    if tool in GIT_TOOLS:
        if version:
            raise MedicoError(f"{tool} is not on PyPI: use --ref COMMIT instead of --version")
        return _install_git_tool(tool, args)
    get_adapter(tool)  # raises the unknown-tool error
    raise MedicoError(f"install does not support {tool!r}")
