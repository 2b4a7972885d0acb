"""The samm adapter on a real bingogome/samm checkout: ``MEDICO_SAMM_SRC=/path/to/samm pytest integration``.

The checkout is copied to tmp, patched, loaded (legacy: ``SammParameterNode`` on CPU; samm-server:
its own ``model_registry``), re-patched and unpatched byte for byte.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from medico_adapters.adapters import samm
from medico_adapters.patching import patch, status, unpatch

SRC = os.environ.get("MEDICO_SAMM_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set MEDICO_SAMM_SRC to a bingogome/samm checkout to run")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    state = build_sam_vit_b().state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "medicosam.pt"
    torch.save(state, path)
    return path, state


def _stub_missing(monkeypatch, names) -> None:
    """Server imports that model loading never uses are stubbed only when not installed."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.sam_model_registry, stub.SamPredictor = {}, object
            monkeypatch.setitem(sys.modules, name, stub)


def test_real_checkout(tmp_path, ckpt, monkeypatch):
    root = tmp_path / "samm"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns(".git"))
    before = _snapshot(root)
    path, state = ckpt
    result = patch(samm.ADAPTER, root, checkpoint=path)
    layout = result.layout
    assert patch(samm.ADAPTER, root).changed == []
    assert status(samm.ADAPTER, root)["patched"]
    if layout == "samm-server":
        spec = importlib.util.spec_from_file_location("_real_registry", root / samm.REGISTRY)
        registry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(registry)
        model, weight = registry.weight_definition("medicosam_vit_b")
        assert registry.MODEL_DEFINITIONS[-1] is model and weight.backend == "sam1"
        from segment_anything import sam_model_registry

        sam = sam_model_registry[weight.model_type](checkpoint=str(root / "checkpoints" / weight.checkpoint))
        assert torch.equal(sam.state_dict()["image_encoder.pos_embed"], state["image_encoder.pos_embed"])
    else:
        _stub_missing(monkeypatch, ["zmq", "cv2", "matplotlib", "matplotlib.pyplot", "tqdm", "mobile_sam"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.syspath_prepend(str(root / "samm-python-terminal"))
        for name in ("utl_sam_msg", "utl_sam_server", "utl_latencylogger"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        server = importlib.import_module("utl_sam_server")
        try:
            node = server.SammParameterNode()
            loaded = node.samPredictor["R"].model.state_dict()
            assert node.device == "cpu" and all(torch.equal(loaded[k], v) for k, v in state.items())
        finally:
            for name in ("utl_sam_msg", "utl_sam_server", "utl_latencylogger"):
                sys.modules.pop(name, None)
    unpatch(samm.ADAPTER, root)
    assert _snapshot(root) == before
