import pytest
import torch

from medico_adapters import patching
from medico_adapters.adapters.napari_sam import (
    ADAPTER,
    AddSamModelsEntry,
    AddWeightsUrl,
    ExtendModelRegistry,
    GuardLocalWeights,
    LayersChangeCompat,
    PointsBorderColorCompat,
)
from medico_adapters.engine import Entry
from medico_adapters.errors import LayoutError, PatchError
from tests.helpers import (
    FakeViewer,
    check_noop,
    check_transformed,
    copy_fixture,
    import_fresh,
    snapshot,
)

MEDICO = [Entry("MedicoSAM", "vit_b", "vit_b_medicosam.pt", default=True)]


# --- transforms ------------------------------------------------------------------------------


def test_sam_models_entry_added_one_per_line():
    check_transformed(
        AddSamModelsEntry,
        """\
        from segment_anything import build_sam_vit_b
        SAM_MODELS = {
            "vit_b": {"filename": "b.pth", "url": "https://x/b.pth", "model": build_sam_vit_b},
        }
        """,
        """\
        from segment_anything import build_sam_vit_b
        SAM_MODELS = {
            "vit_b": {"filename": "b.pth", "url": "https://x/b.pth", "model": build_sam_vit_b},
            "MedicoSAM": {"filename": "vit_b_medicosam.pt", "url": "medico-adapters://local/vit_b_medicosam.pt", "model": build_sam_vit_b},
        }
        """,
        entries=MEDICO,
    )


def test_sam_models_entry_imports_missing_builder():
    out_entries = [Entry("Mine", "vit_l", "vit_l_mine.pt")]
    check_transformed(
        AddSamModelsEntry,
        """\
        from segment_anything import build_sam_vit_b
        SAM_MODELS = {'vit_b': {'filename': 'b.pth', 'url': 'u/b.pth', 'model': build_sam_vit_b}}
        """,
        """\
        from segment_anything import build_sam_vit_l, build_sam_vit_b
        SAM_MODELS = {'vit_b': {'filename': 'b.pth', 'url': 'u/b.pth', 'model': build_sam_vit_b}, 'Mine': {'filename': 'vit_l_mine.pt', 'url': 'medico-adapters://local/vit_l_mine.pt', 'model': build_sam_vit_l}}
        """,
        entries=out_entries,
    )


def test_untransformed_without_sam_models():
    check_noop(AddSamModelsEntry, "MODELS = {'a': 1}\n", entries=MEDICO)


def test_untransformed_when_sam_models_is_computed():
    check_noop(AddSamModelsEntry, "SAM_MODELS = dict(a=1)\n", entries=MEDICO)


def test_weights_url_entry():
    check_transformed(
        AddWeightsUrl,
        """\
        SAM_WEIGHTS_URL = {"vit_b": "https://x/b.pth"}
        """,
        """\
        SAM_WEIGHTS_URL = {"vit_b": "https://x/b.pth", "MedicoSAM": "medico-adapters://local/vit_b_medicosam.pt"}
        """,
        entries=MEDICO,
    )


def test_untransformed_without_weights_url():
    check_noop(AddWeightsUrl, "URLS = {}\n", entries=MEDICO)


def test_registry_extended_after_import():
    check_transformed(
        ExtendModelRegistry,
        """\
        from segment_anything import SamPredictor, sam_model_registry
        import torch
        """,
        """\
        from segment_anything import SamPredictor, sam_model_registry
        sam_model_registry = {**sam_model_registry, "MedicoSAM": sam_model_registry["vit_b"]}
        import torch
        """,
        entries=MEDICO,
    )


def test_untransformed_without_registry_import():
    check_noop(ExtendModelRegistry, "from segment_anything import SamPredictor\n", entries=MEDICO)


def test_guard_in_download_branch():
    check_transformed(
        GuardLocalWeights,
        """\
        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            weight_path = CACHE / weight_url.split("/")[-1]
            if not weight_path.exists():
                download(weight_url, weight_path)
            return weight_path
        """,
        """\
        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            weight_path = CACHE / weight_url.split("/")[-1]
            if not weight_path.exists():
                if str(SAM_WEIGHTS_URL[model_type]).startswith("medico-adapters://"):
                    raise FileNotFoundError(f"{weight_path} is missing: run `medico-adapters patch napari-sam` to place this checkpoint")
                download(weight_url, weight_path)
            return weight_path
        """,
        table="SAM_WEIGHTS_URL",
    )


def test_guard_uses_sam_models_url_in_methods():
    check_transformed(
        GuardLocalWeights,
        """\
        class W:
            def get_weights_path(self, kind):
                p = CACHE / SAM_MODELS[kind]["filename"]
                if not p.exists():
                    self.download(SAM_MODELS[kind]["url"], p)
                return p
        """,
        """\
        class W:
            def get_weights_path(self, kind):
                p = CACHE / SAM_MODELS[kind]["filename"]
                if not p.exists():
                    if str(SAM_MODELS[kind]["url"]).startswith("medico-adapters://"):
                        raise FileNotFoundError(f"{p} is missing: run `medico-adapters patch napari-sam` to place this checkpoint")
                    self.download(SAM_MODELS[kind]["url"], p)
                return p
        """,
        table="SAM_MODELS",
    )


def test_untransformed_exists_check_outside_get_weights_path():
    check_noop(GuardLocalWeights, "def other(p):\n    if not p.exists():\n        pass\n", table="SAM_MODELS")


def test_layers_change_compat():
    check_transformed(
        LayersChangeCompat,
        """\
        def init(self):
            self.viewer.events.layers_change.connect(self._on_layers_changed)
        """,
        """\
        def init(self):
            for _layers_event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed, self.viewer.layers.events.moved):
                _layers_event.connect(self._on_layers_changed)
        """,
    )


def test_points_border_color_compat():
    check_transformed(
        PointsBorderColorCompat,
        """\
        layer = self.viewer.add_points(data=p, face_color=c, edge_color="white", size=3)
        """,
        """\
        layer = self.viewer.add_points(data=p, face_color=c, border_color="white", size=3)
        """,
    )


def test_untransformed_shapes_keep_edge_color():
    check_noop(PointsBorderColorCompat, 'self.viewer.add_shapes(data=b, edge_color="blue")\n')


def test_untransformed_without_layers_change():
    check_noop(LayersChangeCompat, "viewer.layers.events.inserted.connect(f)\n")


# --- whole trees -----------------------------------------------------------------------------

LAYOUTS = {"N1": ("N1", "napari_sam"), "N2": ("N2", "napari_sam"), "N3": ("N3", "src/napari_sam")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_patch_loads_medicosam_through_the_widget_code(layout, tmp_path, checkpoints, vit_b_state, _isolated_home):
    root = copy_fixture(f"napari_sam/{layout}", tmp_path)
    before = snapshot(root)
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"])
    assert result.layout == layout
    placed = _isolated_home / ".cache/napari-segment-anything/vit_b_medicosam.pt"
    assert result.placed == [str(placed)]

    pkg_parent = root / LAYOUTS[layout][1].rpartition("/")[0] if "/" in LAYOUTS[layout][1] else root
    widget_mod = import_fresh(pkg_parent, "napari_sam._widget")
    widget = widget_mod.SamWidget(viewer=FakeViewer())
    names = widget.model_names()
    assert names[-1] == "MedicoSAM" and "vit_b" in names
    widget._load_model(names.index("MedicoSAM"))
    for key, value in widget.sam_model.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key

    # idempotent: nothing changes the second time
    again = patching.patch(ADAPTER, root)
    assert again.changed == [] and again.placed == []

    # a missing kit-placed file is explained, never downloaded
    placed.unlink()
    with pytest.raises(FileNotFoundError, match="medico-adapters patch napari-sam"):
        widget._load_model(names.index("MedicoSAM"))

    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == before


def test_dry_run_writes_nothing(tmp_path):
    root = copy_fixture("napari_sam/N3", tmp_path)
    before = snapshot(root)
    result = patching.patch(ADAPTER, root, dry_run=True)
    assert "+    \"MedicoSAM\"" in result.diff
    assert snapshot(root) == before


def test_status_reports_layout_and_checkpoint(tmp_path, checkpoints):
    root = copy_fixture("napari_sam/N2", tmp_path)
    assert patching.status(ADAPTER, root)["patched"] is False
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    st = patching.status(ADAPTER, root)
    assert st["layout"] == "N2" and st["patched"]
    assert st["checkpoints"][0]["matching"]


def test_user_edit_blocks_unpatch_unless_forced(tmp_path, checkpoints):
    root = copy_fixture("napari_sam/N3", tmp_path)
    original = (root / "src/napari_sam/_widget.py").read_bytes()
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    widget = root / "src/napari_sam/_widget.py"
    widget.write_bytes(widget.read_bytes() + b"# my edit\n")
    with pytest.raises(PatchError, match="changed since it was patched"):
        patching.unpatch(ADAPTER, root)
    patching.unpatch(ADAPTER, root, force=True)
    assert widget.read_bytes() == original


def test_custom_named_entries_coexist_and_unpatch_one(tmp_path, checkpoints, _isolated_home):
    root = copy_fixture("napari_sam/N3", tmp_path)
    original = snapshot(root)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    patching.patch(ADAPTER, root, checkpoint=checkpoints["medsam"], name="Liver SAM")
    text = (root / "src/napari_sam/_widget.py").read_text()
    assert '"Liver SAM": {"filename": "vit_b_liver_sam.pt"' in text and '"MedicoSAM"' in text
    assert (_isolated_home / ".cache/napari-segment-anything/vit_b_liver_sam.pt").is_file()
    patching.unpatch(ADAPTER, root, name="Liver SAM")
    text = (root / "src/napari_sam/_widget.py").read_text()
    assert "Liver SAM" not in text and '"MedicoSAM"' in text
    assert not (_isolated_home / ".cache/napari-segment-anything/vit_b_liver_sam.pt").exists()
    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == original


@pytest.mark.parametrize("name", ["vit_b", "default"])
def test_duplicate_names_refused(tmp_path, checkpoints, name):
    root = copy_fixture("napari_sam/N3", tmp_path)
    with pytest.raises(PatchError, match="already has an entry"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], name=name)


def test_unknown_layout_refused_and_nothing_written(tmp_path):
    pkg = tmp_path / "napari_sam"
    pkg.mkdir()
    (pkg / "_widget.py").write_text("MODELS = {}\n")
    with pytest.raises(LayoutError, match="neither SAM_MODELS nor SAM_WEIGHTS_URL"):
        patching.patch(ADAPTER, tmp_path, dry_run=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["_widget.py", "napari_sam"]


def test_computed_sam_models_refused(tmp_path):
    pkg = tmp_path / "napari_sam"
    pkg.mkdir()
    (pkg / "_widget.py").write_text("SAM_MODELS = load_models()\n")
    with pytest.raises(LayoutError, match="computed"):
        patching.patch(ADAPTER, tmp_path)


def test_repatch_refuses_to_overwrite_a_user_edit(tmp_path, checkpoints):
    root = copy_fixture("napari_sam/N3", tmp_path)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    widget = root / "src/napari_sam/_widget.py"
    edited = widget.read_bytes() + b"# my edit\n"
    widget.write_bytes(edited)
    with pytest.raises(PatchError, match="changed since it was patched"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["medsam"], name="Other")
    assert widget.read_bytes() == edited


def test_older_kit_manifest_is_repatched_from_originals(tmp_path, checkpoints):
    import json

    root = copy_fixture("napari_sam/N2", tmp_path)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    manifest_path = root / ".medico-adapters/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["kit_version"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    assert patching.patch(ADAPTER, root).changed == []
    assert patching.status(ADAPTER, root)["kit_version"] == "0.0.1"
