"""A label map from ``segment --model`` opened as a napari labels layer in a shown window.

``nox -t gui`` runs this under Xvfb after the napari-sam window test. The scan is labelled through
the kit's CLI in a subprocess, then read back with SimpleITK and shown as napari shows any label
image: a labels layer over the scan at the scan's spacing, the class names from the sidecar JSON as
the layer's features (napari's status bar names the class under the cursor). With
``MEDICO_LABELS_SHOW=SCAN,LABELS`` it shows that pair instead (how docs/semantic-labels-napari.png
was taken from the benchmark's new scan). The weights are the random stand-in: plumbing, not accuracy.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters import automatic, fsio, phantom

if importlib.util.find_spec("napari") is None:
    pytest.skip("napari is not installed (nox -t gui)", allow_module_level=True)
if os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal") or not (
        sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("no display: run under xvfb-run or `nox -t gui`", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def labelled_scan(tmp_path, vit_b_state):
    shown = os.environ.get("MEDICO_LABELS_SHOW")
    if shown:
        scan, labels = (Path(p) for p in shown.split(","))
        return scan, labels
    from medico_adapters.training.semantic import SemanticHead, SemanticModel

    torch.manual_seed(0)
    classes = [(0, "background"), (3, "lung"), (5, "bone"), (6, "liver")]
    model = tmp_path / "organs.pt"
    torch.save(SemanticModel(SemanticHead(len(classes), 3, 1, width=32), classes, "soft_tissue", vit_b_state).state(), model)
    scan = Path(phantom.write(phantom.make_phantom((8, 64, 64), seed=5, anatomy=phantom.vary(5)), tmp_path / "scan.nii.gz"))
    labels = tmp_path / "scan_organs.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "medico_adapters", "segment", scan, "--model", model, "-o", labels,
                           "--backend", "torch", "--store", tmp_path / "store", "--json"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return scan, labels


def test_label_map_opens_as_napari_labels(labelled_scan, tmp_path):
    import napari
    import SimpleITK as sitk
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    scan, labels = labelled_scan
    table = json.loads(automatic.class_table_path(labels).read_text("utf-8"))
    image, label_image = sitk.ReadImage(str(scan)), sitk.ReadImage(str(labels))
    volume, values = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label_image)
    spacing = tuple(reversed(image.GetSpacing()))
    assert values.shape == volume.shape and label_image.GetSpacing() == image.GetSpacing()
    names = {c["value"]: c["name"] for c in table["classes"]}
    assert set(np.unique(values)) <= set(names)

    viewer = napari.Viewer(title="medico-adapters: segment --model, as napari labels", show=True)
    try:
        viewer.window.resize(1100, 800)
        viewer.add_image(volume, name=scan.name, colormap="gray", contrast_limits=(-160, 240), scale=spacing)
        layer = viewer.add_labels(values, name=f"{labels.name} (classes)", scale=spacing, opacity=0.55,
                                  features={"index": list(names), "class": list(names.values())})
        # the slice that shows the most classes (then the most labelled pixels)
        z = max(range(len(values)), key=lambda i: (len(np.unique(values[i])), int((values[i] > 0).sum())))
        viewer.dims.set_current_step(0, z)
        for _ in range(30):
            QApplication.processEvents()
        assert np.array_equal(np.asarray(layer.data), values)
        assert list(layer.features["class"]) == list(names.values())
        pixels = viewer.screenshot(canvas_only=False, flash=False)
        assert pixels.shape[0] > 300 and pixels.std() > 5  # a painted window, not a blank one
        folder = Path(os.environ.get("MEDICO_GUI_SHOTS") or tmp_path)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG", optimize=True)
        fsio.atomic_write(folder / "semantic-labels.png", buffer.getvalue())
    finally:
        viewer.close()
