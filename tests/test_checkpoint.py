import os
import subprocess
import sys

import pytest
import torch

from medico_adapters import checkpoint
from medico_adapters.errors import CheckpointError, UnsafeCheckpointError

FORMATS = {
    "plain": ("plain", ""),
    "training": ("training", "sam."),
    "module_prefixed": ("prefixed", "module.sam."),
    "medsam": ("wrapped", ""),
    "cuda": ("plain", ""),
    "legacy": ("plain", ""),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_exports_and_loads_through_segment_anything(name, checkpoints, vit_b_state, tmp_path):
    from segment_anything import build_sam_vit_b

    info = checkpoint.load_checkpoint(checkpoints[name]).info
    assert (info.format, info.prefix) == FORMATS[name]
    assert info.arch == "vit_b" and info.loadable
    out = tmp_path / "plain.pt"
    checkpoint.export_checkpoint(checkpoints[name], out)
    loaded = torch.load(out, weights_only=True)
    assert all(t.device.type == "cpu" for t in loaded.values())
    model = build_sam_vit_b(checkpoint=str(out))  # bare torch.load + strict load_state_dict
    for key, value in model.state_dict().items():
        assert torch.equal(value, vit_b_state[key]), key


def test_bare_torch_load_fails_on_cuda_saved_file_but_export_fixes_it(checkpoints, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(checkpoints["cuda"], weights_only=True)
    checkpoint.export_checkpoint(checkpoints["cuda"], tmp_path / "ok.pt")
    torch.load(tmp_path / "ok.pt", weights_only=True)


def test_training_format_keeps_decoder_and_reports_extras(checkpoints, tmp_path):
    ckpt = checkpoint.load_checkpoint(checkpoints["training"])
    assert ckpt.info.has_decoder
    assert {"optimizer_state", "epoch", "best_metric", "init"} <= set(ckpt.info.extra_entries)
    checkpoint.export_checkpoint(checkpoints["training"], tmp_path / "enc.pt", decoder_out=tmp_path / "dec.pt")
    decoder = torch.load(tmp_path / "dec.pt", weights_only=True)
    assert set(decoder) == {"decoder.0.weight", "decoder.0.bias"}


def test_decoder_out_without_decoder_writes_nothing(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="has no decoder_state"):
        checkpoint.export_checkpoint(checkpoints["plain"], tmp_path / "a.pt", decoder_out=tmp_path / "b.pt")
    assert list(tmp_path.iterdir()) == []


def _synthetic(embed, depth):
    sd = {"image_encoder.patch_embed.proj.weight": torch.empty(embed, 3, 16, 16)}
    for i in range(depth):
        sd[f"image_encoder.blocks.{i}.norm1.weight"] = torch.empty(embed)
    return sd


@pytest.mark.parametrize(("embed", "depth", "arch"), [(768, 12, "vit_b"), (1024, 24, "vit_l"), (1280, 32, "vit_h")])
def test_arch_from_shapes(embed, depth, arch):
    assert checkpoint.detect_arch(_synthetic(embed, depth)) == arch


def test_vit_t_from_tinyvit_keys():
    sd = {"image_encoder.patch_embed.seq.0.c.weight": torch.empty(32, 3, 3, 3), "image_encoder.layers.0.blocks.0.x": torch.empty(1)}
    assert checkpoint.detect_arch(sd) == "vit_t"


def test_unknown_encoder_shape_is_named():
    with pytest.raises(CheckpointError, match="embed dim 512, depth 6"):
        checkpoint.detect_arch(_synthetic(512, 6))


def test_expected_arch_mismatch(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="weights are vit_b, but vit_l was asked for"):
        checkpoint.export_checkpoint(checkpoints["plain"], tmp_path / "x.pt", expect_arch="vit_l")
    assert not (tmp_path / "x.pt").exists()


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_a_command_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _RunsCommand(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system") as err:
        checkpoint.load_checkpoint(evil)
    assert "--trust-checkpoint" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"\x00\x01garbage" * 100, "not a"),
        (b"PK\x05\x06" + b"\x00" * 18, "not a readable PyTorch checkpoint"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, reason):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        checkpoint.load_checkpoint(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_truncated_checkpoint(checkpoints, tmp_path):
    data = checkpoints["plain"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpoint.load_checkpoint(cut)
    with pytest.raises(CheckpointError):
        checkpoint.export_checkpoint(cut, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_non_sam_dict(tmp_path):
    f = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3), "lr": 0.1}, f)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        checkpoint.load_checkpoint(f)


def test_incomplete_state_dict_is_not_loadable(vit_b_state, tmp_path):
    f = tmp_path / "partial.pt"
    torch.save({k: v for k, v in vit_b_state.items() if not k.startswith("mask_decoder.")}, f)
    info = checkpoint.load_checkpoint(f).info
    assert not info.loadable and "missing" in info.problems[0]


def test_loading_does_not_execute_in_a_fresh_process(tmp_path):
    """The same refusal from the CLI: exit 1, one line, the command never ran."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _RunsCommand(marker)}, evil)
    proc = subprocess.run([sys.executable, "-m", "medico_adapters", "check", str(evil)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not marker.exists()
