"""royerlab's napari-segment-anything widget, headless, loads MedicoSAM and segments a click."""

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

from medico_adapters import patching, phantom
from medico_adapters.adapters.napari_segment_anything import ADAPTER, needs_labels_compat
from tests.helpers import import_fresh, snapshot

napari = pytest.importorskip("napari", reason="needs napari (nox -t napari-segment-anything)")
pytest.importorskip("napari_segment_anything", reason="napari-segment-anything is not installed (nox -t napari-segment-anything)")


def _package_copy(tmp_path: Path) -> Path:
    """The installed release's wheel, unpacked beside the test (the installed copy stays as it is)."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), f"napari-segment-anything=={version('napari-segment-anything')}"],
        check=True,
    )
    root = tmp_path / "site"
    zipfile.ZipFile(next(wheel_dir.glob("*.whl"))).extractall(root)
    return root


def test_widget_loads_medicosam_and_segments_a_click(tmp_path, checkpoints, vit_b_state, _isolated_home):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    root = _package_copy(tmp_path)
    before = snapshot(root)
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"], options={"napari_compat": needs_labels_compat()})
    assert result.layout == "N1"
    assert result.placed == [str(_isolated_home / ".cache/napari-segment-anything/nsa_vit_b_medicosam.pt")]
    features = patching.status(ADAPTER, root)["features"]
    print(f"napari-segment-anything {version('napari-segment-anything')}: layout {result.layout}, napari {napari.__version__}, {features}")

    widget_module = import_fresh(root, "napari_segment_anything._widget")
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    # A viewer model, not a window: offscreen Qt on a GPU-less machine has no OpenGL context, and
    # vispy's labels texture (the plugin's mask layer) needs one; the widget only talks to the model.
    viewer = napari.components.ViewerModel()
    ph = phantom.make_phantom()
    layer = viewer.add_image(phantom.window(ph.volume[ph.middle]), name="ct")
    # The widget loads the model it is created with; MedicoSAM must be one of its choices.
    widget = widget_module.SAMWidget(viewer, model_type="MedicoSAM")
    assert "MedicoSAM" in widget._model_type_widget.choices
    for key, value in widget._sam.state_dict().items():
        assert torch.equal(value.cpu(), vit_b_state[key]), key

    widget._im_layer_widget.choices = (layer,)  # what docking in a napari window would offer
    widget._im_layer_widget.value = layer
    assert widget._image is not None and widget._image.shape == (*layer.data.shape, 3)
    _, y, x = ph.landmarks["lesion"]
    widget._pts_layer.add(np.array([[y, x]], dtype=float))  # a click: the points layer's data event runs SAM
    mask = np.asarray(widget._mask_layer.data)
    assert mask.shape == layer.data.shape and widget._logits is not None
    print(f"click at ({y}, {x}): mask of {int(mask.astype(bool).sum())} pixels")
    app.processEvents()

    patching.unpatch(ADAPTER, root)
    assert {k: v for k, v in snapshot(root).items() if "__pycache__" not in k} == before


def test_lazy_embeddings_serve_an_image_embedded_before(tmp_path, checkpoints, _isolated_home):
    """``--lazy-embeddings``: the plugin embeds one 2D image at a time; the store gives it back
    without the encoder when the user returns to an image, with the same features and mask."""
    from medico_adapters.adapters import lazy_embeddings

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    root = _package_copy(tmp_path)
    before = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"],
                   options={"napari_compat": needs_labels_compat(), "lazy_embeddings": True})
    assert lazy_embeddings.STORE_FEATURE in patching.status(ADAPTER, root)["features"]
    widget_module = import_fresh(root, "napari_segment_anything._widget")
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    viewer = napari.components.ViewerModel()
    ph = phantom.make_phantom()
    ct = viewer.add_image(phantom.window(ph.volume[ph.middle]), name="ct")
    other = viewer.add_image(phantom.window(ph.volume[ph.middle - 6]), name="other slice")
    widget = widget_module.SAMWidget(viewer, model_type="MedicoSAM")
    calls = []
    forward = widget._sam.image_encoder.forward
    widget._sam.image_encoder.forward = lambda x: calls.append(1) or forward(x)
    widget._im_layer_widget.choices = (ct, other)

    _, y, x = ph.landmarks["lesion"]
    results = []
    for layer in (ct, other, ct):  # back to the first image: the store's
        widget._im_layer_widget.value = layer
        features = widget._predictor.features.clone()
        widget._logits = None  # each image's first click, as after the plugin's own cancel
        if not len(widget._pts_layer.data):
            widget._pts_layer.add(np.array([[y, x]], dtype=float))
        else:
            widget._on_interactive_run()
        results.append((len(calls), features, np.asarray(widget._mask_layer.data).copy()))
    assert [n for n, _, _ in results] == [1, 2, 2]
    assert torch.equal(results[2][1], results[0][1]) and np.array_equal(results[2][2], results[0][2])
    app.processEvents()
    patching.unpatch(ADAPTER, root)
    assert {k: v for k, v in snapshot(root).items() if "__pycache__" not in k} == before
