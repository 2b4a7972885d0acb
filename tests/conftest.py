"""Shared fixtures: one randomly initialised ViT-B, saved in every format met in the wild.

Real MedicoSAM weights cannot be downloaded here; a random ViT-B has the real architecture, so it
tests the plumbing (formats, keys, shapes, loaders), not accuracy.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

#: where each OS looks for the user's home and per-user data (Path.home(), pooch/platformdirs).
HOME_VARIABLES = {
    "HOME": "", "USERPROFILE": "", "LOCALAPPDATA": "AppData/Local", "APPDATA": "AppData/Roaming",
    "XDG_CACHE_HOME": ".cache", "XDG_CONFIG_HOME": ".config", "XDG_DATA_HOME": ".local/share",
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the real caches on any OS: home, per-user data, the kit's and micro-sam's
    caches all live in tmp."""
    home = tmp_path_factory.mktemp("home")
    for name, sub in HOME_VARIABLES.items():
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("MEDICO_ADAPTERS_CACHE", str(home / "medico-cache"))
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(home / "microsam-cache"))
    yield home
    # Tests place 375 MB checkpoints and encoder caches here; keeping one per test filled CI's disk.
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def vit_b_state():
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    return build_sam_vit_b().state_dict()


def _cuda_tagged(path: Path) -> None:
    """Rewrite a zip checkpoint so its storages claim to live on cuda:0, as GPU-saved files do."""
    src = zipfile.ZipFile(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(item, data)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, vit_b_state):
    """name -> path of the same weights in each real format."""
    import numpy as np

    root = tmp_path_factory.mktemp("ckpts")
    decoder = {"decoder.0.weight": torch.randn(8, 4), "decoder.0.bias": torch.zeros(8)}
    files = {
        "plain": vit_b_state,
        "training": {
            "model_state": {f"sam.{k}": v for k, v in vit_b_state.items()},
            "decoder_state": decoder,
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "epoch": 12,
            "best_metric": np.float64(0.25),
            "init": {"model_kwargs": {"model_type": "vit_b"}},
        },
        "module_prefixed": {f"module.sam.{k}": v for k, v in vit_b_state.items()},
        "medsam": {"model": vit_b_state, "epoch": 3},
        "cuda": vit_b_state,
    }
    paths = {}
    for name, obj in files.items():
        path = root / f"{name}.pt"
        torch.save(obj, path)
        paths[name] = path
    _cuda_tagged(paths["cuda"])
    legacy = root / "legacy.pth"
    torch.save(vit_b_state, legacy, _use_new_zipfile_serialization=False)
    paths["legacy"] = legacy
    return paths


class _OpenVINOBlocker:
    """A meta path finder that makes ``import openvino`` fail, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


@pytest.fixture
def no_openvino(monkeypatch):
    """This process behaves as if OpenVINO were not installed (restored after the test)."""
    import sys

    for name in [n for n in sys.modules if n == "openvino" or n.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_OpenVINOBlocker(), *sys.meta_path])
