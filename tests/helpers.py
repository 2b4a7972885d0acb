"""Small helpers shared by the adapter tests."""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap
import types
from pathlib import Path

import libcst as cst

from medico_adapters.adapters.base import run_codemod

FIXTURES = Path(__file__).parent / "fixtures"


def copy_fixture(rel: str, dest: Path) -> Path:
    target = dest / Path(rel).name
    shutil.copytree(FIXTURES / rel, target)
    return target


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, and every empty folder (as ``rel/``): a folder the kit made and left
    behind shows up too."""
    shot = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        if p.is_file():
            shot[str(p.relative_to(root))] = p.read_bytes()
        elif p.is_dir() and not any(p.iterdir()):
            shot[str(p.relative_to(root)) + "/"] = b""
    return shot


def transformed(transform, before: str, **kwargs) -> str:
    """Run a codemod on dedented source; the result must parse and compile."""
    out = run_codemod(transform, textwrap.dedent(before).encode(), **kwargs).decode()
    compile(cst.parse_module(out).code, "<transformed>", "exec")
    return out


def check_noop(transform, source: str, **kwargs) -> None:
    source = textwrap.dedent(source)
    assert transformed(transform, source, **kwargs) == source


def check_transformed(transform, before: str, after: str, **kwargs) -> None:
    out = transformed(transform, before, **kwargs)
    assert out == textwrap.dedent(after)
    # already patched: the transform finds its own result and leaves it alone
    assert transformed(transform, out, **kwargs) == out


def import_fresh(package_parent: Path, module: str):
    top = module.split(".")[0]
    for name in list(sys.modules):
        if name == top or name.startswith(top + "."):
            del sys.modules[name]
    sys.path.insert(0, str(package_parent))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(package_parent))


class FakeViewer:
    """What the napari-sam fixture widgets touch of a viewer: one event to connect to."""

    class events:
        class layers_change:
            @staticmethod
            def connect(f):
                pass


def slicer_stand_ins(monkeypatch, module_dir: Path) -> None:
    """Just enough of Slicer's modules for SegmentWithSAM's module, constructor and changeModel."""

    class Widget:
        def __init__(self, parent=None):
            self.parent = parent

        def resourcePath(self, name):
            return str(module_dir / "Resources" / name)

    class Mixin:
        def __init__(self):
            pass

    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(VTKObservationMixin=Mixin, confirmOkCancelDisplay=lambda *a: False)
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")
    loadable.ScriptedLoadableModule = loadable.ScriptedLoadableModuleWidget = loadable.ScriptedLoadableModuleLogic = Widget
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = Mixin
    for name, module in {
        "slicer": slicer, "slicer.ScriptedLoadableModule": loadable, "slicer.util": util,
        "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk"), "ctk": types.ModuleType("ctk"),
        "SampleData": types.ModuleType("SampleData"),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
