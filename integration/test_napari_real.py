"""The real napari-sam widget, headless, loads MedicoSAM and segments a click.

Runs against the installed napari-sam, or against the release named by
``MEDICO_NAPARI_SAM_VERSION`` (its wheel is taken from PyPI into a temporary folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters import patching
from medico_adapters.adapters.napari_sam import ADAPTER, needs_layers_compat
from tests.helpers import import_fresh

napari = pytest.importorskip("napari", reason="napari-sam integration needs napari (nox -t napari-sam)")
pytest.importorskip("napari_sam", reason="napari-sam is not installed (nox -t napari-sam)")


def _package_copy(tmp_path: Path) -> tuple[Path, str]:
    wanted = os.environ.get("MEDICO_NAPARI_SAM_VERSION") or version("napari-sam")
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), f"napari-sam=={wanted}"],
        check=True,
    )
    root = tmp_path / "site"
    zipfile.ZipFile(next(wheel_dir.glob("*.whl"))).extractall(root)
    return root, wanted


@pytest.fixture
def viewer():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if needs_layers_compat():
        # napari >= 0.6.2's vispy canvas needs an OpenGL context that offscreen Qt lacks on a
        # GPU-less machine; the widget only talks to the viewer model, so drive that instead.
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance() or QApplication([])
        yield napari.components.ViewerModel()
        app.processEvents()
        return
    v = napari.Viewer(show=False)
    yield v
    v.close()


def test_real_widget_loads_medicosam_and_segments(tmp_path, viewer, checkpoints, vit_b_state):
    root, release = _package_copy(tmp_path)
    options = {"napari_compat": True} if needs_layers_compat() else {}
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"], options=options)
    print(f"napari-sam {release}: layout {result.layout}, napari {napari.__version__}")

    package = "napari_sam" if (root / "napari_sam").is_dir() else "napari_segment_anything"
    widget_module = import_fresh(root, f"{package}._widget")
    image = (np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)
    viewer.add_image(image, name="ct")
    viewer.add_labels(np.zeros(image.shape, dtype=np.int32), name="mask")
    widget = widget_module.SamWidget(viewer)

    combo = widget.cb_model_type
    items = [combo.itemText(i) for i in range(combo.count())]
    index = next(i for i, text in enumerate(items) if text.startswith("MedicoSAM"))
    combo.setCurrentIndex(index)
    widget._load_model()
    for key, value in widget.sam_model.state_dict().items():
        assert torch.equal(value.cpu(), vit_b_state[key]), key

    widget.cb_image_layers.setCurrentText("ct")
    widget.cb_label_layers.setCurrentText("mask")
    widget._activate()
    assert widget.is_active
    widget.do_point_click(np.array([48, 64]), True)
    mask = viewer.layers["mask"].data
    assert mask.shape == image.shape
    assert widget.sam_logits is not None  # SAM's own predict ran on MedicoSAM's weights
