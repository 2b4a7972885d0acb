"""ISAT-SAM's own SegAny builds MedicoSAM as vit_b from the placed file, and its model manager lists it."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import version

import numpy as np
import pytest
import torch

from medico_adapters import patching, phantom
from medico_adapters.adapters.isat_sam import ADAPTER
from medico_adapters.engine import Tree
from tests.helpers import import_fresh

ISAT = pytest.importorskip("ISAT", reason="isat-sam is not installed (nox -t isat-sam)")
#: the installed package, read once: later tests import patched copies from their own tmp_path (gone
#: when they pass), so asking importlib again would find a deleted copy.
INSTALLED = list(ISAT.__path__)[0]


@pytest.fixture
def isat(tmp_path, checkpoints):
    """A patched copy of the installed ISAT package (the installed one stays as it is)."""
    root = tmp_path / "site"
    shutil.copytree(INSTALLED, root / "ISAT", ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    originals = {rel: (root / "ISAT" / rel).read_bytes() for rel in ("segment_any/model_zoo.py", "widgets/model_manager_dialog.py")}
    result = patching.patch(ADAPTER, root / "ISAT", checkpoint=checkpoints["training"])
    print(f"isat-sam {version('isat-sam')}: layout {result.layout}, changed {result.changed}")
    yield root, root / "ISAT/checkpoints/sam_vit_b_medicosam.pth"
    patching.unpatch(ADAPTER, root / "ISAT")
    for rel, data in originals.items():
        assert (root / "ISAT" / rel).read_bytes() == data, rel
    assert not (root / "ISAT/checkpoints/sam_vit_b_medicosam.pth").exists()


def _slice():
    ph = phantom.make_phantom()
    gray = phantom.window(ph.volume[ph.middle])
    _, y, x = ph.landmarks["lesion"]
    return np.repeat(gray[..., None], 3, axis=2), (x, y)


def test_segany_builds_vit_b_with_the_weights_and_predicts(isat, vit_b_state):
    root, placed = isat
    segany = import_fresh(root, "ISAT.segment_any.segment_any").SegAny(str(placed), use_bfloat16=False)
    assert (segany.model_source, segany.model_type, segany.model_dtype) == ("sam", "vit_b", torch.float32)
    for key, value in segany.predictor.model.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key
    image, point = _slice()
    segany.set_image(image)
    masks = segany.predict_with_point_prompt([point], [1])
    assert masks.shape == (1, *image.shape[:2]) and masks.dtype == bool
    print(f"ISAT point prompt: mask of {int(masks.sum())} pixels")


def test_bf16_path_runs_medicosam(isat, vit_b_state, monkeypatch):
    """ISAT casts the model to bf16 and autocasts when CUDA is there; no GPU here, so the cuda flag is
    faked after the model is built on the CPU: the same bf16 weights, the same autocast calls."""
    root, placed = isat
    module = import_fresh(root, "ISAT.segment_any.segment_any")
    segany = module.SegAny(str(placed), use_bfloat16=True)
    assert segany.model_dtype == torch.bfloat16
    for key, value in segany.predictor.model.state_dict().items():
        expected = vit_b_state[key].to(torch.bfloat16) if vit_b_state[key].is_floating_point() else vit_b_state[key]
        assert torch.equal(value, expected), key
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    image, point = _slice()
    segany.set_image(image)
    masks = segany.predict_with_point_prompt([point], [1])
    assert masks.shape == (1, *image.shape[:2])


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_custom_names_reach_their_builder(isat, arch, monkeypatch):
    root, _ = isat
    tree = Tree(root / "ISAT")
    layout = ADAPTER.detect(tree)
    entry = ADAPTER.custom_entry("Lung model", arch)
    ADAPTER.validate_entry(tree, layout, entry)
    module = import_fresh(root, "ISAT.segment_any.segment_any")
    import ISAT.segment_any.segment_anything as vendored

    picked = []

    class Stop(Exception):
        pass

    def spy(kind):
        def build(checkpoint):
            picked.append(kind)
            raise Stop

        return build

    monkeypatch.setattr(vendored, "sam_model_registry", {k: spy(k) for k in ("vit_b", "vit_l", "vit_h")})
    with pytest.raises(Stop):
        module.SegAny(str(ADAPTER.checkpoint_path(tree, layout, entry, {})), use_bfloat16=False)
    assert picked == [arch]


def test_model_manager_lists_medicosam_and_explains_its_download(isat, monkeypatch):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    root, placed = isat
    from PyQt5 import QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    dialog_module = import_fresh(root, "ISAT.widgets.model_manager_dialog")

    class MainWindow:
        cfg = {"software": {"use_bfloat16": False, "language": "en"}}
        use_segment_anything = False

        def init_segment_anything(self, *args):
            pass

    dialog = dialog_module.ModelManagerDialog(None, MainWindow())
    grid = dialog.gridLayout
    rows = {grid.itemAtPosition(r, 3).widget().text(): r for r in range(grid.rowCount()) if grid.itemAtPosition(r, 3)}
    assert "sam_vit_b_medicosam.pth" in rows
    row = rows["sam_vit_b_medicosam.pth"]
    assert grid.itemAtPosition(row, 6).widget().text() == "delete"  # ISAT sees the placed file
    assert grid.itemAtPosition(row, 0).widget().isEnabled()  # and lets the user select it

    said = []
    monkeypatch.setattr(dialog_module.QtWidgets.QMessageBox, "warning", lambda *a: said.append(a[2]))
    dialog.download("sam_vit_b_medicosam.pth")
    assert said and "medico-adapters patch isat-sam" in said[0]
    assert dialog.download_thread_dict == {}
    app.processEvents()
