"""The standalone accelerator (``medico_adapters/accel/medico_sam_accel.py``) that tools get a copy of.

The encoder is a random ViT-B (real widths, depth, heads, windows and global blocks) at a 256-pixel
input instead of 1024, so each embedding costs a fraction of a second; the global blocks' one-head-
at-a-time branch is forced by lowering its token threshold. Random weights: this checks that the
accelerated encoder computes the same thing, not accuracy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from medico_adapters.accel import medico_sam_accel as accel

ACCEL_FILE = Path(accel.__file__)
IMG = 256


def _vit_b(seed: int = 0, tiny: bool = False) -> torch.nn.Module:
    """A SAM-shaped object holding a random ViT-B encoder (random rel-pos tables, so the bias matters).

    ``tiny``: two narrow blocks (one windowed, one global) at 64 pixels, for the cache tests,
    where what counts is how often a conversion happens, not the architecture's size.
    """
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    size = {"embed_dim": 64, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": (1,)} if tiny else {
        "embed_dim": 768, "depth": 12, "num_heads": 12, "window_size": 14, "global_attn_indexes": (2, 5, 8, 11)}
    encoder = ImageEncoderViT(
        img_size=64 if tiny else IMG, patch_size=16, mlp_ratio=4.0, out_chans=256, qkv_bias=True, use_rel_pos=True,
        rel_pos_zero_init=True, **size,
    ).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.05)
            block.attn.rel_pos_w.normal_(std=0.05)
    sam = torch.nn.Module()
    sam.image_encoder = encoder
    return sam


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def plain(image) -> torch.Tensor:
    with torch.inference_mode():
        return _vit_b().image_encoder(image)


def _embed(sam, image) -> torch.Tensor:
    with torch.inference_mode():
        return sam.image_encoder(image)


@pytest.fixture
def per_head(monkeypatch):
    """Send the 16x16-token global blocks through the one-head-at-a-time branch too."""
    monkeypatch.setattr(accel, "_GLOBAL_TOKENS", 100)


needs_openvino = pytest.mark.skipif(accel.openvino_version() is None, reason="OpenVINO is not installed")


def test_sdpa_path_gives_the_same_embedding(plain, image, per_head, no_openvino):
    from segment_anything.modeling.image_encoder import Attention

    sam, lines = _vit_b(), []
    assert accel.accelerate(sam, log=lines.append) is True
    assert lines == ["medico_sam_accel: image encoder uses SDPA attention; OpenVINO is not installed"]
    assert all("forward" in vars(block.attn) for block in sam.image_encoder.blocks)
    assert Attention.forward.__module__ == "segment_anything.modeling.image_encoder"
    assert (_embed(sam, image) - plain).abs().max().item() <= 1e-4


@needs_openvino
def test_openvino_path_gives_the_same_embedding_and_caches_it(plain, image, per_head, tmp_path):
    sam, lines = _vit_b(), []
    assert accel.accelerate(sam, log=lines.append, cache_dir=tmp_path) is True
    encoder = sam.image_encoder
    assert type(encoder).__name__ == "OpenVINOImageEncoder" and encoder.precision == "f32"
    assert encoder.img_size == IMG and not list(encoder.parameters())  # the torch weights are gone
    assert lines[0].startswith("medico_sam_accel: converting the image encoder for OpenVINO (f32)")
    assert lines[1].endswith("(f32, same embedding)") and len(lines) == 2
    assert (_embed(sam, image) - plain).abs().max().item() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [encoder.cache_file.name]

    again, lines = _vit_b(), []
    assert accel.accelerate(again, log=lines.append, cache_dir=tmp_path) is True
    assert again.image_encoder.from_cache and len(lines) == 1
    assert torch.equal(_embed(again, image), _embed(sam, image))


def test_accelerating_twice_changes_nothing(image, no_openvino):
    sam, lines = _vit_b(), []
    assert accel.accelerate(sam, log=lines.append)
    forwards = [vars(block.attn)["forward"] for block in sam.image_encoder.blocks]
    first = _embed(sam, image)
    assert accel.accelerate(sam, log=lines.append) is True
    assert len(lines) == 1
    assert [vars(block.attn)["forward"] for block in sam.image_encoder.blocks] == forwards
    assert torch.equal(_embed(sam, image), first)


def _load_copy(name: str):
    spec = importlib.util.spec_from_file_location(name, ACCEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copy_loaded_from_its_path_under_another_name(plain, image, no_openvino):
    copy = _load_copy("napari_sam._medico_sam_accel")
    assert copy is not accel and copy.__name__ == "napari_sam._medico_sam_accel"
    sam, lines = _vit_b(), []
    assert copy.accelerate(sam, log=lines.append) is True
    assert (_embed(sam, image) - plain).abs().max().item() <= 1e-4
    # a second copy (another tool in the same process) sees the work as done
    assert _load_copy("samm_accel").accelerate(sam, log=lines.append) is True
    assert accel.accelerate(sam, log=lines.append) is True
    assert len(lines) == 1


def test_without_sdpa_or_openvino_nothing_changes(plain, image, monkeypatch, no_openvino):
    import torch.nn.functional as F

    monkeypatch.delattr(F, "scaled_dot_product_attention")
    sam, lines = _vit_b(), []
    assert accel.accelerate(sam, log=lines.append) is False
    assert len(lines) == 1 and "not accelerated" in lines[0] and "OpenVINO is not installed" in lines[0]
    assert not any("forward" in vars(block.attn) for block in sam.image_encoder.blocks)
    assert torch.equal(_embed(sam, image), plain)


@needs_openvino
def test_failed_conversion_falls_back_to_sdpa(plain, image, monkeypatch, tmp_path):
    def broken(*_):
        raise RuntimeError("unsupported operation aten::weird\nmore detail")

    monkeypatch.setattr(accel, "_convert", broken)
    sam, lines = _vit_b(), []
    assert accel.accelerate(sam, log=lines.append, cache_dir=tmp_path) is True
    assert lines[-1] == ("medico_sam_accel: image encoder uses SDPA attention; "
                         "OpenVINO failed (RuntimeError: unsupported operation aten::weird)")
    assert (_embed(sam, image) - plain).abs().max().item() <= 1e-4


def test_other_encoders_are_left_alone():
    sam = torch.nn.Module()
    sam.image_encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    lines = []
    assert accel.accelerate(sam, log=lines.append) is False
    assert lines == ["medico_sam_accel: not accelerated: Sequential is not Segment Anything's ViT encoder"]
    assert accel.accelerate(torch.nn.Linear(2, 2), log=lines.append) is False
    assert lines[-1] == "medico_sam_accel: not accelerated: the model has no image_encoder"


# -- the compiled-encoder cache ----------------------------------------------------------------------
@pytest.fixture
def counted_conversions(monkeypatch):
    calls = []
    real = accel._convert

    def counting(encoder, example):
        calls.append(example.shape)
        return real(encoder, example)

    monkeypatch.setattr(accel, "_convert", counting)
    return calls


@needs_openvino
def test_cache_entry_per_precision_weights_and_openvino_version(tiny_image, tmp_path, counted_conversions, monkeypatch):
    def build(precision="f32", key="ckpt-a", seed=0):
        return accel.openvino_encoder(_vit_b(seed, tiny=True).image_encoder, precision, cache_dir=tmp_path, key=key)

    first = build()
    assert not first.from_cache and len(counted_conversions) == 1
    second = build()
    assert second.from_cache and second.cache_file == first.cache_file and len(counted_conversions) == 1
    assert torch.equal(_embed_with(second, tiny_image), _embed_with(first, tiny_image))

    other_files = {build("bf16").cache_file, build(key="ckpt-b", seed=1).cache_file}
    monkeypatch.setattr(accel, "openvino_version", lambda: "1999.0.0")
    other_files.add(build().cache_file)
    assert len(other_files | {first.cache_file}) == 4 and len(counted_conversions) == 4


@needs_openvino
def test_damaged_cache_entry_is_rebuilt(tiny_image, tmp_path, counted_conversions):
    def build():
        return accel.openvino_encoder(_vit_b(tiny=True).image_encoder, "f32", cache_dir=tmp_path, key="k")

    encoder = build()
    expected = _embed_with(encoder, tiny_image)
    whole = encoder.cache_file.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    damages = {"truncated": whole[: len(whole) // 2], "flipped": bytes(flipped), "garbage": b"not a compiled model",
               "empty": b""}
    for n, (damage, data) in enumerate(damages.items(), start=2):
        encoder.cache_file.write_bytes(data)
        rebuilt = build()
        assert not rebuilt.from_cache and len(counted_conversions) == n, damage
        assert torch.equal(_embed_with(rebuilt, tiny_image), expected), damage
        assert rebuilt.cache_file.read_bytes() == whole or build().from_cache, damage


@needs_openvino
def test_a_cache_that_cannot_be_written_costs_a_conversion_not_the_encoder(tiny_image, tmp_path, counted_conversions):
    blocked = tmp_path / "cache"
    blocked.write_bytes(b"a file where the cache folder should be")  # read-only media behave alike
    lines = []

    def build():
        return accel.openvino_encoder(_vit_b(tiny=True).image_encoder, "f32", cache_dir=blocked, key="k", log=lines.append)

    first = build()
    assert first.cache_file is None and not first.from_cache
    assert [line for line in lines if line.startswith("could not cache")] == [lines[-1]]
    assert str(blocked) in lines[-1]
    second = build()
    assert not second.from_cache and len(counted_conversions) == 2
    assert torch.equal(_embed_with(second, tiny_image), _embed_with(first, tiny_image))
    assert blocked.read_bytes() == b"a file where the cache folder should be"


@pytest.fixture(scope="module")
def tiny_image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _embed_with(encoder, image):
    with torch.inference_mode():
        return encoder(image)


def test_default_cache_dir_follows_the_kit(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDICO_ADAPTERS_CACHE", str(tmp_path))
    assert accel.default_cache_dir() == tmp_path / "openvino"
    monkeypatch.delenv("MEDICO_ADAPTERS_CACHE")
    assert accel.default_cache_dir().parts[-2:] == ("medico-adapters", "openvino")


# -- CPU flags ---------------------------------------------------------------------------------------
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16\n"
INTEL_MAC_SYSCTL = (
    "machdep.cpu.features: FPU VME DE PSE SSE SSE2 AVX1.0 FMA\n"
    "machdep.cpu.leaf7_features: SMEP ERMS AVX2 AVX512F AVX512BW AVX512VNNI\n"
    "machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n"
)
APPLE_SYSCTL = "hw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.FEAT_FP16: 1\nhw.optional.arm.FEAT_SME: 0\nhw.optional.floatingpoint: 1\n"


@pytest.mark.parametrize(
    ("text", "expected", "bf16"),
    [
        (X86_CPUINFO, {"avx2", "avx512_bf16", "amx_bf16", "amx_int8"}, True),
        (AVX2_CPUINFO, {"avx2", "fma"}, False),
        (ARM_CPUINFO, {"asimd", "bf16", "asimdhp"}, False),
        ("processor\t: 0\n", set(), False),
    ],
)
def test_flags_from_linux_cpuinfo(text, expected, bf16):
    flags = accel._flags_from_cpuinfo(text)
    assert expected <= flags
    assert accel.native_bf16(flags) is bf16


def test_flags_from_macos_sysctl():
    intel = accel._flags_from_sysctl(INTEL_MAC_SYSCTL)
    assert {"avx1", "avx2", "avx512f", "avx512vnni"} <= intel and not accel.native_bf16(intel)
    apple = accel._flags_from_sysctl(APPLE_SYSCTL)
    assert apple == {"bf16", "fp16"} and not accel.native_bf16(apple)


def test_cpu_flags_dispatch_per_system(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=INTEL_MAC_SYSCTL))
    assert "avx2" in accel.cpu_flags("Darwin")
    probes = {"_is_avx512_bf16_supported": lambda: True, "_is_amx_tile_supported": lambda: False,
              "_is_avx512_vnni_supported": lambda: True}
    for name, probe in probes.items():
        monkeypatch.setattr(torch.cpu, name, probe, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx2_supported", raising=False)
    assert accel.cpu_flags("Windows") == {"avx512_bf16", "avx512_vnni"}

    def broken():
        raise RuntimeError("no cpuinfo")

    for name in probes:
        monkeypatch.setattr(torch.cpu, name, broken, raising=False)
    assert accel.cpu_flags("Windows") == frozenset()  # safe fallback: every caller picks f32


def test_cpu_flags_on_this_machine_are_read():
    if sys.platform.startswith("linux") and Path("/proc/cpuinfo").read_text().find("flags") >= 0:
        assert "sse2" in accel.cpu_flags()
