"""The real napari-sam widget, headless, loads MedicoSAM and segments a click; with
``--lazy-embeddings`` it embeds only what the clicks need, with the eager widget's masks.

Runs against the installed napari-sam, or against the release named by
``MEDICO_NAPARI_SAM_VERSION`` (its wheel is taken from PyPI into a temporary folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters import patching, phantom
from medico_adapters.adapters import lazy_embeddings
from medico_adapters.adapters.napari_sam import ADAPTER, needs_layers_compat
from tests.helpers import import_fresh, snapshot

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


# --- --lazy-embeddings ------------------------------------------------------------------------

#: a 64-slice volume; the eager widget embeds only the clicked slices (a volume of those three),
#: which is what it would have computed for them in the whole volume: same pixels, same window.
LAZY_SHAPE = (64, 96, 128)


def _medicosam_widget(root: Path, viewer, image: str, labels: str):
    """The widget of the tree at ``root``, MedicoSAM loaded, its image and label layers chosen."""
    package = "napari_sam" if (root / "napari_sam").is_dir() else "napari_segment_anything"
    widget = import_fresh(root, f"{package}._widget").SamWidget(viewer)
    combo = widget.cb_model_type
    combo.setCurrentIndex(next(i for i in range(combo.count()) if combo.itemText(i).startswith("MedicoSAM")))
    widget._load_model()
    widget.cb_image_layers.setCurrentText(image)
    widget.cb_label_layers.setCurrentText(labels)
    return widget


def _process_events_until(condition, seconds: float = 15.0) -> bool:
    """Run the Qt event loop (timers, debounced handlers) until condition() holds or seconds pass."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        QApplication.processEvents()
        time.sleep(0.02)
    return True


def _count_encoder(model, door: threading.Event) -> list[str]:
    """The threads that called the image encoder, in order; threads other than the main one wait
    at ``door`` first (so a background fill cannot finish a slice while the door is shut)."""
    calls: list[str] = []
    forward = model.image_encoder.forward

    def counted(x):
        if threading.current_thread() is not threading.main_thread():
            door.wait(600)
        calls.append(threading.current_thread().name)
        return forward(x)

    model.image_encoder.forward = counted
    return calls


def test_real_widget_embeds_lazily_with_the_eager_masks(tmp_path, viewer, checkpoints):
    root, release = _package_copy(tmp_path)
    eager_root = tmp_path / "eager"
    shutil.copytree(root, eager_root)
    options = {"napari_compat": True} if needs_layers_compat() else {}
    patching.patch(ADAPTER, eager_root, checkpoint=checkpoints["plain"], options=options)
    before = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], options={**options, "lazy_embeddings": True})
    assert lazy_embeddings.FEATURE in patching.status(ADAPTER, root)["features"]

    ph = phantom.make_phantom(LAZY_SHAPE)
    width, level = phantom.WINDOWS["soft_tissue"]
    window = (level - width / 2, level + width / 2)
    (zl, yl, xl), (_, yv, xv) = ph.landmarks["lesion"], ph.landmarks["liver"]
    clicks = [(40, yv, xv), (zl, yl, xl), (63, yv, xv)]  # slice 40 first, right after activation
    slices = [z for z, _, _ in clicks]
    viewer.add_image(ph.volume[slices], name="clicked slices", contrast_limits=window)
    viewer.add_labels(np.zeros((len(slices), *LAZY_SHAPE[1:]), dtype=np.int32), name="eager mask")
    volume = viewer.add_image(ph.volume, name="ct", contrast_limits=window)
    viewer.add_labels(np.zeros(LAZY_SHAPE, dtype=np.int32), name="mask")

    eager = _medicosam_widget(eager_root, viewer, "clicked slices", "eager mask")
    eager._activate()
    assert len(eager.sam_features) == len(slices)
    for k, (_, y, x) in enumerate(clicks):
        eager.do_point_click(np.array([k, y, x]), True)
    expected = np.asarray(viewer.layers["eager mask"].data).copy()
    expected_logits = [eager.sam_logits[k] for k in range(len(slices))]
    eager._activate()  # the button again: deactivates

    widget = _medicosam_widget(root, viewer, "ct", "mask")
    door = threading.Event()  # shut: the background fill may begin a slice, not finish one
    calls = _count_encoder(widget.sam_model, door)
    try:
        started = time.perf_counter()
        widget._activate()
        activate_s = time.perf_counter() - started
        features = widget.sam_features
        assert type(features).__name__ == "LazySlices" and len(features) == LAZY_SHAPE[0] and calls == []
        started = time.perf_counter()
        widget.do_point_click(np.array(clicks[0]), True)
        first_mask_s = time.perf_counter() - started
        assert calls == ["MainThread"]  # slice 40, and nothing else, before its mask
        for z, y, x in clicks[1:]:
            widget.do_point_click(np.array([z, y, x]), True)
        mask = np.asarray(viewer.layers["mask"].data)
        for k, z in enumerate(slices):
            assert np.array_equal(mask[z], expected[k]), z
            assert np.array_equal(widget.sam_logits[z], expected_logits[k]), z
        assert not mask[[z for z in range(LAZY_SHAPE[0]) if z not in slices]].any()
        assert len(calls) == len(slices)

        # napari-sam's own handler: qdebounced (1 s) on the layer's contrast_limits event. Let it run
        # here, while the widget is active: napari-sam never disconnects it, so a call still pending
        # after _deactivate meets image_layer = None (an upstream bug that aborts a bare Qt app).
        volume.contrast_limits = (window[0] - 100, window[1] + 100)
        assert _process_events_until(lambda: widget.sam_features is not features), "the contrast handler never ran"
        assert widget.sam_features.ready == 0
        assert len(calls) == len(slices)  # a contrast change embeds nothing until a click needs a slice
    finally:
        door.set()
    assert features.join(600)  # replaced: the fill ends after the slice it had begun
    print(f"napari-sam {release} --lazy-embeddings: activate {activate_s:.2f} s, first mask (slice 40) "
          f"{first_mask_s:.1f} s, {features.ready} of {LAZY_SHAPE[0]} slices embedded in all")
    widget._activate()
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == before
