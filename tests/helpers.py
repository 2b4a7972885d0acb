"""Small helpers shared by the adapter tests."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import libcst as cst

from medico_adapters.adapters.base import run_codemod
from medico_adapters.engine import STATE_DIR

FIXTURES = Path(__file__).parent / "fixtures"


def copy_fixture(rel: str, dest: Path) -> Path:
    target = dest / Path(rel).name
    shutil.copytree(FIXTURES / rel, target)
    return target


def kit_cli(*args, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """The kit's CLI in a subprocess, as a user runs it, with ``home`` as HOME and cache."""
    env = {**os.environ, "HOME": str(home), "MEDICO_ADAPTERS_CACHE": str(home / "cache")}
    return subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


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


def outside_state(root: Path) -> dict[str, bytes]:
    """``snapshot`` without the kit's own state folder: the tool's files as a user sees them."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith(STATE_DIR)}


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


def tiny_sam(seed: int = 0, img_size: int = 64):
    """A Segment Anything model of the real classes at toy size (a ViT of one block, 64-pixel
    input): SamPredictor runs on it as on a ViT-B, in milliseconds. Random weights."""
    from functools import partial

    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    dim, grid = 32, img_size // 16
    encoder = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2,
                              out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=2, global_attn_indexes=(0,))
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
                           mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                          transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=dim)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    for p in sam.parameters():  # SAM zero-initialises its rel-pos tables; random ones make slices differ more
        if p.dim() == 2 and p.shape[-1] == dim // 2:
            torch.nn.init.normal_(p, std=0.5)
    return sam.eval()


class FakeLayer:
    """What napari-sam's set_image reads of an image layer."""

    def __init__(self, data, contrast_limits, rgb: bool = False):
        self.data = data
        self.ndim = data.ndim - (1 if rgb else 0)
        self.rgb = rgb
        self.contrast_limits = contrast_limits
