"""AnyLabeling: the ONNX export (checked with onnxruntime) and its registration as a custom model.

One random ViT-B is exported once per module through the CLI, as a user would run it; the export
itself checks the pair against the torch model. The adapter tests then place copies of that
verified pair, so patch/status/unpatch are exercised without exporting again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters import checkpoint as ckpt_mod
from medico_adapters import cli, onnx_export, patching
from medico_adapters.adapters import get_adapter
from medico_adapters.adapters.anylabeling import ADAPTER, rc_path
from medico_adapters.errors import CheckpointError, ExportCheckError, LayoutError, PatchError
from tests.helpers import copy_fixture, snapshot

yaml = pytest.importorskip("yaml", reason="the [onnx] extra is not installed")
onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints):
    """``medico-adapters export plain.pt --onnx out --json``, run from the checkpoint's folder."""
    work = tmp_path_factory.mktemp("onnx")
    shutil.copy(checkpoints["plain"], work / "plain.pt")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["export", "plain.pt", "--onnx", "out", "--json"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return work / "out", json.loads(out.getvalue())


# --- the export ------------------------------------------------------------------------------


def test_export_is_checked_against_the_torch_model(exported):
    out, report = exported
    print(f"onnx export: embedding max abs diff {report['encoder_max_abs_diff']:.3g}, decoder logits {report['decoder_max_abs_diff']:.3g}, "
          f"masks equal {report['decoder_masks_equal']} ({report['decoder_tie_pixels']} tie pixels), {report['seconds']} s")
    assert report["encoder_max_abs_diff"] <= 1e-4
    assert report["decoder_max_abs_diff"] <= 1e-4
    assert report["decoder_tie_pixels"] < 50
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "decoder.onnx", "encoder.onnx"]


def test_files_have_the_inputs_and_outputs_anylabeling_reads(exported):
    out, _ = exported
    encoder = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    (image,) = encoder.get_inputs()
    assert (image.name, image.type, image.shape[2]) == ("input_image", "tensor(float)", 3)
    assert all(isinstance(d, str) for d in image.shape[:2])  # any letterbox size
    assert encoder.get_outputs()[0].shape[1:] == [256, 64, 64]
    decoder = onnx.load(str(out / "decoder.onnx"))
    assert [i.name for i in decoder.graph.input] == list(onnx_export.DECODER_INPUTS)
    assert [o.name for o in decoder.graph.output] == list(onnx_export.DECODER_OUTPUTS)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["type"] == "segment_anything" and config["display_name"] == "MedicoSAM"
    assert (config["encoder_model_path"], config["decoder_model_path"]) == ("encoder.onnx", "decoder.onnx")


def test_decoder_check_fails_loudly_on_other_weights(exported, vit_b_state, tmp_path):
    out, _ = exported
    sam = onnx_export.build_sam(ckpt_mod.Checkpoint(_info("vit_b"), vit_b_state))
    other = onnx_export.build_sam(ckpt_mod.Checkpoint(_info("vit_b"), vit_b_state))
    with torch.no_grad():
        other.mask_decoder.iou_prediction_head.layers[0].weight.mul_(3.0)
        other.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.mul_(-1.0)
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    points = [(300.0, 200.0), (500.0, 400.0)]
    assert onnx_export.check_decoder(sam, out / "decoder.onnx", embedding, points)["decoder_max_abs_diff"] <= 1e-4
    with pytest.raises(ExportCheckError, match="decoder's masks differ"):
        onnx_export.check_decoder(other, out / "decoder.onnx", embedding, points)


def _info(arch: str) -> ckpt_mod.CheckpointInfo:
    return ckpt_mod.CheckpointInfo(path="x.pt", format="plain", prefix="", arch=arch, has_decoder=False, n_tensors=0)


def test_vit_h_is_refused_before_exporting(tmp_path):
    with pytest.raises(CheckpointError, match="2 GB"):
        onnx_export.write_pair(ckpt_mod.Checkpoint(_info("vit_h"), {}), tmp_path / "e.onnx", tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_no_files(checkpoints, tmp_path, monkeypatch):
    def failing(ckpt, encoder, decoder, **kwargs):
        encoder.write_bytes(b"partial")
        decoder.write_bytes(b"partial")
        raise ExportCheckError(f"{encoder}: injected mismatch")

    monkeypatch.setattr(onnx_export, "write_pair", failing)
    code = cli.main(["export", str(checkpoints["plain"]), "--onnx", str(tmp_path / "out")])
    assert code == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_extra_is_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["export", str(checkpoints["plain"]), "--onnx", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'medico-adapters[onnx]'" in err
    assert not (tmp_path / "out").exists()


def test_export_needs_an_output(checkpoints, capsys):
    assert cli.main(["export", str(checkpoints["plain"])]) == 1
    assert "-o OUT" in capsys.readouterr().err


# --- the adapter -----------------------------------------------------------------------------


@pytest.fixture
def place_exported(exported, monkeypatch):
    """Patches place copies of the module's verified export instead of exporting again."""
    out, report = exported
    made = []

    def copy_pair(ckpt, encoder, decoder, **kwargs):
        made.append(ckpt.info.arch)
        shutil.copyfile(out / "encoder.onnx", encoder)
        shutil.copyfile(out / "decoder.onnx", decoder)
        return report

    monkeypatch.setattr(onnx_export, "write_pair", copy_pair)
    return made


def _home_files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file() and not any("cache" in part for part in p.relative_to(home).parts)}


def test_patch_places_config_and_registers_custom_model(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    tree_before, home_before = snapshot(root), _home_files(_isolated_home)
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["training"])
    assert result.layout == "A1" and result.changed == []
    folder = _isolated_home / "anylabeling_data/models/medicosam_vit_b"
    assert sorted(result.placed) == sorted(str(p) for p in [folder / "encoder.onnx", folder / "decoder.onnx", folder / "config.yaml", rc_path()])
    assert place_exported == ["vit_b"]

    config = yaml.safe_load((folder / "config.yaml").read_text())
    rc = yaml.safe_load(rc_path().read_text())
    assert rc["language"] == "en_US"  # AnyLabeling's defaults, as it writes them on first start
    (record,) = rc["custom_models"]
    assert record == {**config, "config_file": str(folder / "config.yaml")}
    assert record["display_name"] == "MedicoSAM" and record["placed_by"] == "medico-adapters"

    assert patching.patch(ADAPTER, root).placed == []
    st = patching.status(ADAPTER, root)
    assert st["layout"] == "A1" and st["patched"] and all(c["matching"] for c in st["checkpoints"])

    patching.unpatch(ADAPTER, root)
    assert snapshot(root) == tree_before and _home_files(_isolated_home) == home_before


def test_users_rc_restored_byte_for_byte(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    mine = b"# my settings\nlanguage: vi_VN\ncustom_models:\n- {name: yolo, display_name: My YOLO, type: yolov8, config_file: /m/yolo/config.yaml}\n"
    rc_path().write_bytes(mine)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    rc = yaml.safe_load(rc_path().read_text())
    assert [m["display_name"] for m in rc["custom_models"]] == ["MedicoSAM", "My YOLO"]  # newest first, as load_custom_model does
    assert rc["language"] == "vi_VN"
    patching.unpatch(ADAPTER, root)
    assert rc_path().read_bytes() == mine


def _anylabeling_resaves(extra: dict | None = None) -> None:
    """What ModelManager.load_model_configs + save_config do on every start."""
    config = yaml.safe_load(rc_path().read_text())
    for model in config["custom_models"]:
        model.update(is_custom_model=True, has_downloaded=True)
    config.update(extra or {})
    rc_path().write_text(yaml.safe_dump(config))


def test_unpatch_after_anylabeling_resaved_keeps_its_changes(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    _anylabeling_resaves({"theme": "dark"})
    assert all(c["matching"] for c in patching.status(ADAPTER, root)["checkpoints"])
    assert patching.patch(ADAPTER, root).placed == []  # re-patching does not fight AnyLabeling's re-save
    patching.unpatch(ADAPTER, root)
    rc = yaml.safe_load(rc_path().read_text())
    assert rc["theme"] == "dark" and rc["custom_models"] == []
    assert not (_isolated_home / "anylabeling_data/models/medicosam_vit_b/encoder.onnx").exists()


def test_unpatch_after_a_resave_that_changed_nothing_else_restores_bytes(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    mine = yaml.safe_dump({"language": "en_US", "custom_models": []}).encode()
    rc_path().write_bytes(mine)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    _anylabeling_resaves()
    patching.unpatch(ADAPTER, root)
    assert rc_path().read_bytes() == mine


def test_custom_entry_beside_medicosam_and_unpatch_one(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    result = patching.patch(ADAPTER, root, checkpoint=checkpoints["medsam"], name="Liver SAM")
    assert result.entries[-1].filename == "medico_vit_b_liver_sam"
    names = [m["display_name"] for m in yaml.safe_load(rc_path().read_text())["custom_models"]]
    assert names == ["MedicoSAM", "Liver SAM"]
    patching.unpatch(ADAPTER, root, name="Liver SAM")
    assert [m["display_name"] for m in yaml.safe_load(rc_path().read_text())["custom_models"]] == ["MedicoSAM"]
    assert not any((_isolated_home / "anylabeling_data/models/medico_vit_b_liver_sam").iterdir())
    patching.unpatch(ADAPTER, root)
    assert not rc_path().exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [("Segment Anything (ViT-B)", "a built-in model"), ("My YOLO", "a custom model"), ("coreml liver", "CoreML")],
)
def test_names_anylabeling_would_confuse_are_refused(tmp_path, checkpoints, place_exported, name, reason):
    root = copy_fixture("anylabeling/A1", tmp_path)
    rc_path().write_text("custom_models:\n- {name: yolo, display_name: My YOLO, type: yolov8, config_file: /m/c.yaml}\n")
    with pytest.raises(PatchError, match=reason):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"], name=name)
    assert place_exported == []


def test_damaged_rc_is_named_and_nothing_is_placed(tmp_path, checkpoints, place_exported, _isolated_home):
    root = copy_fixture("anylabeling/A1", tmp_path)
    rc_path().write_text("custom_models: [unclosed\n")
    with pytest.raises(PatchError, match=r"\.anylabelingrc: is not valid YAML"):
        patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    assert not (_isolated_home / "anylabeling_data").exists()


def test_other_decoder_format_refused(tmp_path):
    root = copy_fixture("anylabeling/A1", tmp_path)
    sam_onnx = root / "anylabeling/services/auto_labeling/sam_onnx.py"
    sam_onnx.write_text(sam_onnx.read_text().replace('"has_mask_input"', '"high_res_feats_0"'))
    with pytest.raises(LayoutError, match="not the SAM ONNX inputs"):
        patching.patch(ADAPTER, root, dry_run=True)


def test_registered_under_its_tool_id():
    assert get_adapter("anylabeling") is ADAPTER
