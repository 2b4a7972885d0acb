"""SlicerSegmentWithSAM adapter: W1/W2 transforms, end to end, and the patched changeModel run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    check_noop,
    check_transformed,
    copy_fixture,
    slicer_stand_ins,
    snapshot,
    transformed,
)

from medico_adapters.adapters.slicer_sws import (
    ADAPTER,
    AddChangeModelBranches,
    AddDropDownItems,
    GuardCheckpointDownload,
    PointModelAttributes,
)
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError, PatchError
from medico_adapters.patching import patch, status, unpatch

MEDICO = ADAPTER.default_entry()
LUNG = ADAPTER.custom_entry("Lung SAM", "vit_l")
MODULE = "SegmentWithSAM/SegmentWithSAM.py"

ITEMS = """\
def initializeParameterNode(self):
    self.ui.modelDropDown.addItem("SAM-2 Large")

    self.ui.modelDropDown.addItem("SAM (ViT-H)")
"""


def test_drop_down_item_after_the_module_items():
    check_transformed(
        AddDropDownItems,
        ITEMS,
        ITEMS + '    self.ui.modelDropDown.addItem("MedicoSAM (ViT-B)")\n',
        entries=[MEDICO],
    )


def test_drop_down_untransformed_without_items():
    check_noop(AddDropDownItems, "def setup(self):\n    self.ui.maskDropDown.addItem('Mask-1')\n", entries=[MEDICO])


def test_drop_down_already_patched():
    check_noop(AddDropDownItems, transformed(AddDropDownItems, ITEMS, entries=[MEDICO, LUNG]), entries=[MEDICO, LUNG])


CHANGE = """\
def changeModel(self, modelName):
    if modelName == "SAM-2 Large":
        self.sam = build_sam2("sam2_hiera_l.yaml", self.checkpointFolder + "l.pt")
    elif modelName == "SAM (ViT-H)":
        self.modelVersion = "vit_h"
        self.checkpointName = "sam_vit_h_4b8939.pth"
        self.modelCheckpoint = self.checkpointFolder + self.checkpointName
        model = sam_model_registry[self.modelVersion](checkpoint=self.modelCheckpoint)
        model.to(device=self.device)
        self.sam = SamPredictor(model)
"""


def test_change_model_branch_copies_a_sam1_branch():
    check_transformed(
        AddChangeModelBranches,
        CHANGE,
        CHANGE
        + """\
    elif modelName == "MedicoSAM (ViT-B)":
        self.modelVersion = "vit_b"
        self.checkpointName = "vit_b_medicosam.pt"
        self.modelCheckpoint = self.checkpointFolder + self.checkpointName
        model = sam_model_registry[self.modelVersion](checkpoint=self.modelCheckpoint)
        model.to(device=self.device)
        self.sam = SamPredictor(model)
""",
        entries=[MEDICO],
    )


def test_change_model_branch_goes_before_else():
    source = CHANGE + "    else:\n        raise ValueError(modelName)\n"
    out = transformed(AddChangeModelBranches, source, entries=[MEDICO])
    assert out.index('"MedicoSAM (ViT-B)"') < out.index("else:")


def test_change_model_untransformed_without_sam1_branch():
    check_noop(AddChangeModelBranches, 'def changeModel(self, modelName):\n    if modelName == "SAM-2 Large":\n        pass\n', entries=[MEDICO])


def test_change_model_already_patched():
    once = transformed(AddChangeModelBranches, CHANGE, entries=[MEDICO, LUNG])
    check_noop(AddChangeModelBranches, once, entries=[MEDICO, LUNG])


W1_INIT = """\
def __init__(self, parent=None):
    self.modelVersion = "vit_h"
    self.modelName = "sam_vit_h_4b8939.pth"
    self.modelCheckpoint = self.resourcePath("UI") + "/../../../" + self.modelName
    if not os.path.exists(self.modelCheckpoint):
        urllib.request.urlretrieve("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", self.modelCheckpoint)
"""


def test_point_model_attributes():
    out = transformed(PointModelAttributes, W1_INIT, entry=MEDICO)
    assert 'self.modelVersion = "vit_b"\n    self.modelName = "vit_b_medicosam.pt"\n' in out
    check_noop(PointModelAttributes, out, entry=MEDICO)
    check_noop(PointModelAttributes, "def __init__(self):\n    self.masks = None\n", entry=MEDICO)


def test_guard_download_branch():
    out = transformed(GuardCheckpointDownload, W1_INIT, filename="vit_b_medicosam.pt")
    assert (
        '    if not os.path.exists(self.modelCheckpoint):\n'
        '        if os.path.basename(self.modelCheckpoint) == "vit_b_medicosam.pt":\n'
        '            raise FileNotFoundError('
    ) in out
    check_noop(GuardCheckpointDownload, out, filename="vit_b_medicosam.pt")


def test_guard_untransformed_for_print_and_return_variant():
    source = 'def __init__(self):\n    if not os.path.exists(self.modelCheckpoint):\n        print("put it there")\n        return\n'
    check_noop(GuardCheckpointDownload, source, filename="vit_b_medicosam.pt")


# --- detection, names, checkpoint folder --------------------------------------------------------


@pytest.mark.parametrize("layout", ["W1", "W2"])
def test_detect(layout, tmp_path):
    root = copy_fixture(f"slicer_sws/{layout}", tmp_path)
    assert ADAPTER.detect(Tree(root)).name == layout


def test_unknown_module_refused(tmp_path):
    (tmp_path / "SegmentWithSAM.py").write_text("class Other:\n    pass\n")
    with pytest.raises(LayoutError, match="W2.*W1"):
        ADAPTER.detect(Tree(tmp_path))
    with pytest.raises(LayoutError, match="SegmentWithSAM"):
        ADAPTER.detect(Tree(tmp_path / "missing"))


def test_sam2_names_refused():
    with pytest.raises(PatchError, match="SAM-2"):
        ADAPTER.custom_entry("My SAM-2 tune", "vit_b")


def test_w1_takes_one_model_and_w2_refuses_existing_items(tmp_path, checkpoints):
    root = copy_fixture("slicer_sws/W1", tmp_path)
    patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    w1 = Tree(root)
    with pytest.raises(PatchError, match="single model"):
        ADAPTER.validate_entry(w1, ADAPTER.detect(w1), LUNG)
    w2 = Tree(copy_fixture("slicer_sws/W2", tmp_path))
    with pytest.raises(PatchError, match="already"):
        ADAPTER.validate_entry(w2, ADAPTER.detect(w2), Entry("SAM (ViT-B)", "vit_b", "x.pt"))


def test_checkpoint_folder_in_source_checkout_and_extension_folder(tmp_path):
    root = copy_fixture("slicer_sws/W2", tmp_path)
    tree = Tree(root)
    assert ADAPTER.checkpoint_path(tree, ADAPTER.detect(tree), MEDICO, {}) == root / "model_checkpoints/vit_b_medicosam.pt"
    installed = tmp_path / "lib/Slicer-5.6/qt-scripted-modules"
    installed.mkdir(parents=True)
    shutil.copy(root / MODULE, installed)
    tree = Tree(installed)
    layout = ADAPTER.detect(tree)
    assert layout.files == ("SegmentWithSAM.py",)
    assert ADAPTER.checkpoint_path(tree, layout, MEDICO, {}) == tmp_path / "lib/Slicer-5.6/model_checkpoints/vit_b_medicosam.pt"
    w1 = Tree(copy_fixture("slicer_sws/W1", tmp_path))
    assert ADAPTER.checkpoint_path(w1, ADAPTER.detect(w1), MEDICO, {}) == w1.root / "vit_b_medicosam.pt"


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["W1", "W2"])
def test_patch_repatch_status_unpatch(layout, tmp_path, checkpoints):
    root = copy_fixture(f"slicer_sws/{layout}", tmp_path)
    before = snapshot(root)
    result = patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    assert result.changed == [MODULE]
    assert Path(result.placed[0]).is_file()
    assert patch(ADAPTER, root).changed == []
    report = status(ADAPTER, root)
    assert report["layout"] == layout and report["patched"] and report["checkpoints"][0]["matching"]
    unpatch(ADAPTER, root)
    assert snapshot(root) == before


# --- the patched module really loads the weights ------------------------------------------------


def test_patched_w2_change_model_loads_medicosam(tmp_path, checkpoints, vit_b_state, monkeypatch):
    root = copy_fixture("slicer_sws/W2", tmp_path)
    (root / "SegmentWithSAM/Resources/UI").mkdir(parents=True)  # resourcePath("UI") exists in a real module
    (root / "model_checkpoints").mkdir()
    (root / "model_checkpoints/sam_vit_b_01ec64.pth").touch()  # so start-up offers no download
    patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    slicer_stand_ins(monkeypatch, root / "SegmentWithSAM")
    namespace: dict = {"__name__": "SegmentWithSAM"}
    exec(compile((root / MODULE).read_text(), str(root / MODULE), "exec"), namespace)
    widget = namespace["SegmentWithSAMWidget"]()
    widget.changeModel("MedicoSAM (ViT-B)")
    loaded = widget.sam.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vit_b_state.items())
    assert Path(widget.modelCheckpoint).resolve() == root / "model_checkpoints/vit_b_medicosam.pt"
