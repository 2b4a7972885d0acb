"""AnyLabeling's own model manager lists MedicoSAM and its SegmentAnything model segments a click.

The ONNX pair is exported for real (and checked by the export itself); the embedding AnyLabeling
computes is then compared with the torch model's on the very input AnyLabeling built, and its
mask with the torch decoder's.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch
import yaml

from medico_adapters import checkpoint as ckpt_mod
from medico_adapters import onnx_export, patching, phantom
from medico_adapters.adapters.anylabeling import ADAPTER, rc_path

pytest.importorskip("anylabeling", reason="anylabeling is not installed (nox -t anylabeling)")
pytest.importorskip("PyQt6", reason="anylabeling needs PyQt6 (nox -t anylabeling)")


def test_model_list_load_and_point_prompt(tmp_path, checkpoints, vit_b_state, _isolated_home):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    result = patching.patch(ADAPTER, None, checkpoint=checkpoints["training"])  # the installed package
    print(f"anylabeling {version('anylabeling')}: layout {result.layout}, placed {len(result.placed)} files")
    folder = _isolated_home / "anylabeling_data/models/medicosam_vit_b"

    import anylabeling.config as anylabeling_config
    import cv2
    from anylabeling.views.labeling.widgets.auto_labeling.auto_labeling import AutoLabelingWidget
    from PyQt6 import QtGui, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    anylabeling_config.current_config_file = str(rc_path())  # what app.py sets from --config's default
    widget = AutoLabelingWidget(parent=None)
    combo = widget.model_select_combobox
    items = [combo.itemText(i) for i in range(combo.count())]
    assert "(User) MedicoSAM" in items, items
    manager = widget.model_manager
    model_id = next(i for i, c in enumerate(manager.get_model_configs()) if c["display_name"] == "MedicoSAM")
    assert manager.get_model_configs()[model_id]["config_file"] == str(folder / "config.yaml")

    loaded = manager._load_model(model_id)  # the body of the model manager's loading thread
    assert loaded is not None, "AnyLabeling could not load the MedicoSAM config"
    model = loaded["model"]
    assert type(model.model).__name__ == "SegmentAnythingONNX"

    ph = phantom.make_phantom()
    gray = phantom.window(ph.volume[ph.middle])
    image_path = str(tmp_path / "phantom.png")
    cv2.imwrite(image_path, np.repeat(gray[..., None], 3, axis=2))
    # AnyLabeling drops a mask whose outline covers > 90 % of the image; with random weights a click
    # on the liver gives such a mask, a click on the lesion a smaller one (real weights: the organ).
    _, y, x = ph.landmarks["lesion"]
    model.set_auto_labeling_marks([{"type": "point", "data": [x, y], "label": 1}])
    shapes = model.predict_shapes(QtGui.QImage(image_path), image_path).shapes
    assert shapes and shapes[0].shape_type == "polygon"
    print(f"AnyLabeling point prompt on the phantom: {len(shapes)} shape(s), first with {len(shapes[0].points)} points")

    # the embedding AnyLabeling cached, against the torch model on the same letterboxed input
    cached = model.image_embedding_cache.get(image_path)
    rgb = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
    height, width = model.model.input_size
    letterbox = cv2.warpAffine(rgb, cached["transform_matrix"][:2], (width, height), flags=cv2.INTER_LINEAR)
    sam = onnx_export.build_sam(ckpt_mod.load_checkpoint(checkpoints["training"]))
    with torch.inference_mode():
        reference = onnx_export.EncoderGraph(sam)(torch.from_numpy(letterbox.astype(np.float32))).numpy()
    diff = float(np.abs(cached["image_embedding"] - reference).max())
    print(f"AnyLabeling embedding vs torch: max abs diff {diff:.3g}")
    assert diff <= 1e-4

    # its mask, against the torch decoder fed the torch embedding and AnyLabeling's prompt transform
    ours = model.model.predict_masks(cached, model.marks)[0, 0]
    from segment_anything.utils.onnx import SamOnnxModel

    coords = np.array([[x, y]], dtype=np.float64) @ cached["transform_matrix"][:2, :2].T
    inputs = onnx_export.decoder_inputs(reference, [tuple(coords[0])], [1.0], (height, width))
    with torch.inference_mode():
        logits = SamOnnxModel(sam, return_single_mask=True)(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()[0, 0]
    expected = cv2.warpAffine(logits, np.linalg.inv(cached["transform_matrix"])[:2], (gray.shape[1], gray.shape[0]), flags=cv2.INTER_LINEAR)
    differ = int(((ours > 0) != (expected > 0)).sum())
    print(f"AnyLabeling mask vs torch: {differ} of {ours.size} pixels differ, both {int((ours > 0).sum())} / {int((expected > 0).sum())} inside")
    assert differ <= max(2, ours.size // 10000)
    torch_shapes = model.post_process(expected)  # AnyLabeling's own mask-to-polygon step on the torch mask
    assert [len(s.points) for s in shapes] == [len(s.points) for s in torch_shapes]

    # optional int8 encoder, reported as its cosine to the fp32 one
    int8 = tmp_path / "encoder.int8.onnx"
    onnx_export.quantize(folder / "encoder.onnx", int8)
    print(f"int8 encoder: embedding cosine vs fp32 {onnx_export.int8_cosine(folder / 'encoder.onnx', int8):.5f}")

    model.unload()
    app.processEvents()
    rc_before_unpatch = yaml.safe_load(rc_path().read_text())
    assert any(m.get("display_name") == "MedicoSAM" for m in rc_before_unpatch["custom_models"])
    patching.unpatch(ADAPTER, None)
    rc = yaml.safe_load(rc_path().read_text()) if rc_path().exists() else {"custom_models": []}
    assert not any(m.get("placed_by") == "medico-adapters" for m in rc.get("custom_models") or [])
    assert not (folder / "encoder.onnx").exists()
    assert "PyQt5" not in sys.modules  # AnyLabeling's PyQt6 only, never napari's PyQt5
