"""Export a SAM-1 checkpoint as the ONNX encoder/decoder pair AnyLabeling runs, and prove it.

The pair has the shape AnyLabeling's ``SegmentAnythingONNX`` (``services/auto_labeling/sam_onnx.py``)
feeds and reads, which is the samexporter format its published models use:

* encoder: one float input ``input_image`` of shape ``(H, W, 3)`` (RGB, 0..255, dynamic H and W;
  AnyLabeling letterboxes every image into 684 x 1024 itself). Normalisation, the channel move and
  the padding to 1024 x 1024 are *inside* the graph (SAM's own ``Sam.preprocess``); the output
  ``image_embeddings`` is ``(1, 256, 64, 64)``.
* decoder: segment_anything's own ``SamOnnxModel`` (single best mask), inputs ``image_embeddings``,
  ``point_coords``, ``point_labels`` (dynamic point count), ``mask_input``, ``has_mask_input``,
  ``orig_im_size``; outputs ``masks`` (logits at ``orig_im_size``), ``iou_predictions``,
  ``low_res_masks``; AnyLabeling takes the first and thresholds it at 0.

Every export is checked with onnxruntime against the torch model on a CT phantom slice before
anything is moved into place: embedding max abs difference <= 1e-4, and decoder masks equal
(pixels whose torch logit lies within 1e-4 of the threshold are counted as ties, not mismatches).
onnx, onnxruntime and PyYAML come with the ``[onnx]`` extra and are imported only here.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medico_adapters import checkpoint as ckpt_mod
from medico_adapters import fsio
from medico_adapters.errors import CheckpointError, ExportCheckError, MissingDependencyError

#: the letterbox AnyLabeling's SegmentAnythingONNX resizes every image into (height, width).
INPUT_SIZE = (684, 1024)
TOLERANCE = 1e-4
OPSET = 17
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
INT8_FILE = "encoder.int8.onnx"
CONFIG_FILE = "config.yaml"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
#: a protobuf file cannot exceed 2 GiB; ViT-H's encoder would need external data files.
ONNX_ARCHS = ("vit_b", "vit_l")


def require_onnx():
    """Import the optional extra, or say in one line how to get it."""
    try:
        import onnx
        import onnxruntime
        import yaml
    except ImportError as e:
        raise MissingDependencyError(
            f"ONNX export needs {e.name}: pip install 'medico-adapters[onnx]' (onnx, onnxruntime, pyyaml)"
        ) from None
    return onnx, onnxruntime, yaml


@dataclass
class OnnxReport:
    arch: str
    encoder: str
    decoder: str
    input_size: tuple[int, int]
    encoder_max_abs_diff: float
    decoder_max_abs_diff: float
    decoder_masks_equal: bool  # strictly, pixel for pixel
    decoder_tie_pixels: int  # differing pixels whose torch logit is within TOLERANCE of 0
    int8_encoder: str | None = None
    int8_cosine: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class EncoderGraph(torch.nn.Module):
    """SAM's image encoder behind its own preprocessing, taking an (H, W, 3) RGB image."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(self.sam.preprocess(input_image.permute(2, 0, 1)[None]))


def build_sam(ckpt: ckpt_mod.Checkpoint):
    from segment_anything import sam_model_registry

    sam = sam_model_registry[ckpt.info.arch]()
    sam.load_state_dict(ckpt_mod.plain_state_dict(ckpt))
    return sam.eval()


def _export(module: torch.nn.Module, args: tuple, target: Path, names: tuple, outputs: tuple, dynamic: dict) -> None:
    def write(f) -> None:
        # no_grad: tracing with autograd on keeps every activation (9.4 GB peak for ViT-B, 4 GB without)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter traces SamOnnxModel as segment_anything designed it.
            torch.onnx.export(
                module, args, f, input_names=list(names), output_names=list(outputs),
                dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )

    fsio.write_file(target, write)


def check_image(input_size: tuple[int, int] = INPUT_SIZE) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The phantom's middle slice letterboxed as AnyLabeling does, and two landmarks in its pixels."""
    from medico_adapters import phantom as phantom_mod

    ph = phantom_mod.make_phantom()
    slice_ = phantom_mod.window(ph.volume[ph.middle]).astype(np.float32)
    height, width = input_size
    scale = min(height / slice_.shape[0], width / slice_.shape[1])
    size = (int(slice_.shape[0] * scale), int(slice_.shape[1] * scale))
    resized = torch.nn.functional.interpolate(torch.from_numpy(slice_)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    canvas[: size[0], : size[1]] = resized.numpy()[..., None]
    points = [(ph.landmarks[name][2] * scale, ph.landmarks[name][1] * scale) for name in ("lesion", "liver")]
    return canvas, points


def _session(path: Path):
    _, onnxruntime, _ = require_onnx()
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def decoder_inputs(embedding: np.ndarray, points: list[tuple[float, float]], labels: list[float], input_size: tuple[int, int]) -> dict:
    """What AnyLabeling passes its decoder (the padding point included)."""
    coords = np.array([[*points, (0.0, 0.0)]], dtype=np.float32)
    return {
        "image_embeddings": embedding.astype(np.float32),
        "point_coords": coords,
        "point_labels": np.array([[*labels, -1.0]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array(input_size, dtype=np.float32),
    }


def check_encoder(sam, encoder: Path, image: np.ndarray, tolerance: float = TOLERANCE) -> tuple[float, np.ndarray]:
    """The ONNX embedding's max abs difference from the torch model's; returns it and the torch embedding."""
    with torch.inference_mode():
        reference = EncoderGraph(sam)(torch.from_numpy(image)).numpy()
    embedding = _session(encoder).run(None, {"input_image": image})[0]
    diff = float(np.abs(embedding - reference).max())
    if diff > tolerance:
        raise ExportCheckError(f"{encoder}: the ONNX image embedding differs from the torch model's by {diff:.3g} (> {tolerance:g}); not using it")
    return diff, reference


def check_decoder(sam, decoder: Path, embedding: np.ndarray, points: list[tuple[float, float]],
                  input_size: tuple[int, int] = INPUT_SIZE, tolerance: float = TOLERANCE) -> dict:
    """Masks from the ONNX decoder and the torch one, for a point and for a point pair, must agree."""
    from segment_anything.utils.onnx import SamOnnxModel

    session = _session(decoder)
    torch_decoder = SamOnnxModel(sam, return_single_mask=True).eval()
    diff, equal, ties, mismatches = 0.0, True, 0, 0
    for prompt_points, labels in ((points[:1], [1.0]), (points, [1.0, 0.0])):
        inputs = decoder_inputs(embedding, prompt_points, labels, input_size)
        masks = session.run(None, inputs)[0]
        with torch.inference_mode():
            expected = torch_decoder(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].numpy()
        diff = max(diff, float(np.abs(masks - expected).max()))
        differ = (masks > 0) != (expected > 0)
        equal &= not differ.any()
        # float rounding decides pixels whose logit is ~0; those are ties, not errors
        near = np.abs(expected) <= tolerance
        ties += int((differ & near).sum())
        mismatches += int((differ & ~near).sum())
    if mismatches or diff > tolerance:
        raise ExportCheckError(f"{decoder}: the ONNX decoder's masks differ from the torch model's ({mismatches} pixels, logits by {diff:.3g}); not using it")
    return {"decoder_max_abs_diff": diff, "decoder_masks_equal": bool(equal), "decoder_tie_pixels": ties}


def verify(sam, encoder: Path, decoder: Path, input_size: tuple[int, int] = INPUT_SIZE, tolerance: float = TOLERANCE) -> dict:
    """Run both files with onnxruntime and the torch model on the phantom; raise if they disagree."""
    image, points = check_image(input_size)
    encoder_diff, reference = check_encoder(sam, encoder, image, tolerance)
    return {"encoder_max_abs_diff": encoder_diff, **check_decoder(sam, decoder, reference, points, input_size, tolerance)}


def quantize(encoder: Path, target: Path) -> None:
    """Dynamic int8 weights (the scheme AnyLabeling's published ``.quant.onnx`` encoders use)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a warning per integer tensor it skips
    try:
        quantize_dynamic(str(encoder), str(target), per_channel=False, reduce_range=False, weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)


def int8_cosine(encoder: Path, int8: Path, input_size: tuple[int, int] = INPUT_SIZE) -> float:
    image, _ = check_image(input_size)
    full = _session(encoder).run(None, {"input_image": image})[0].ravel().astype(np.float64)
    small = _session(int8).run(None, {"input_image": image})[0].ravel().astype(np.float64)
    return float(full @ small / (np.linalg.norm(full) * np.linalg.norm(small)))


def write_pair(
    ckpt: ckpt_mod.Checkpoint, encoder: Path, decoder: Path, *,
    input_size: tuple[int, int] = INPUT_SIZE, tolerance: float = TOLERANCE,
) -> dict:
    """Write the pair to exactly these paths (a caller's staging files) and verify it."""
    require_onnx()
    if ckpt.info.arch not in ONNX_ARCHS:
        raise CheckpointError(f"{ckpt.info.path}: {ckpt.info.arch} encoders exceed ONNX's 2 GB single-file limit; the kit exports {', '.join(ONNX_ARCHS)}")
    from segment_anything.utils.onnx import SamOnnxModel

    sam = build_sam(ckpt)
    try:
        height, width = input_size
        _export(EncoderGraph(sam), (torch.zeros(height, width, 3),), encoder, ("input_image",), ("image_embeddings",),
                {"input_image": {0: "image_height", 1: "image_width"}})
        dummy = decoder_inputs(np.zeros((1, 256, 64, 64), np.float32), [(10.0, 10.0)], [1.0], input_size)
        _export(SamOnnxModel(sam, return_single_mask=True).eval(), tuple(torch.from_numpy(v) for v in dummy.values()), decoder,
                DECODER_INPUTS, DECODER_OUTPUTS, {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
        return verify(sam, encoder, decoder, input_size, tolerance)
    except BaseException:
        encoder.unlink(missing_ok=True)
        decoder.unlink(missing_ok=True)
        raise


def anylabeling_config(name: str, display_name: str) -> dict:
    """A model config AnyLabeling's ``SegmentAnything`` accepts (its required keys plus sizes)."""
    return {
        "type": "segment_anything",
        "name": name,
        "display_name": display_name,
        "encoder_model_path": ENCODER_FILE,
        "decoder_model_path": DECODER_FILE,
        "input_size": 1024,
        "max_width": 1024,
        "max_height": 1024,
    }


def export_onnx(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, name: str = "medicosam", display_name: str = "MedicoSAM",
    int8: bool = False, trust: bool = False, tolerance: float = TOLERANCE,
    say: Callable[[str], None] = lambda line: None,
) -> OnnxReport:
    """``export CKPT --onnx DIR``: the verified pair plus an AnyLabeling ``config.yaml`` in DIR.

    All files appear together, after the check, or none do.
    """
    _, _, yaml = require_onnx()
    started = time.monotonic()
    ckpt = ckpt_mod.load_checkpoint(checkpoint, trust=trust)
    ckpt_mod.require_loadable(ckpt)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file; --onnx takes a folder")
    out.mkdir(parents=True, exist_ok=True)
    targets = {key: out / file for key, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE), ("config", CONFIG_FILE))}
    if int8:
        targets["int8"] = out / INT8_FILE
    temps = {key: fsio.temp_path(path, unique=True) for key, path in targets.items()}
    try:
        say(f"exporting {ckpt.info.arch} to ONNX and checking it against the torch model ...")
        checked = write_pair(ckpt, temps["encoder"], temps["decoder"], tolerance=tolerance)
        cosine = None
        if int8:
            say("quantising the encoder to int8 ...")
            quantize(temps["encoder"], temps["int8"])
            cosine = int8_cosine(temps["encoder"], temps["int8"])
        config = anylabeling_config(name, display_name)
        fsio.write_file(temps["config"], yaml.safe_dump(config, sort_keys=False).encode("utf-8"))
        for key, path in targets.items():
            fsio.replace(temps[key], path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    fsio.fsync_dir(out)
    return OnnxReport(
        arch=ckpt.info.arch, encoder=str(targets["encoder"]), decoder=str(targets["decoder"]), input_size=INPUT_SIZE,
        int8_encoder=str(targets["int8"]) if int8 else None, int8_cosine=cosine,
        seconds=round(time.monotonic() - started, 1), **checked,
    )
