"""samm --lazy-embeddings: the server's own embedding pass reads and writes the kit's embedding store.

The runs use a small stand-in encoder (one strided convolution, SAM's 1 x 256 x 64 x 64 output)
inside the real ``segment_anything`` model and predictor, so a volume costs milliseconds; the real
ViT-B through the real samm server is in integration/test_samm_real.py.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_noop, check_transformed, copy_fixture, snapshot, transformed

from medico_adapters.adapters import accelerate, embedding_store, samm
from medico_adapters.adapters.embedding_store import KeyModelIdentity, StoreSetImage
from medico_adapters.embeddings import store as store_module
from medico_adapters.embeddings.store import EmbeddingStore
from medico_adapters.engine import STATE_DIR
from medico_adapters.patching import patch, status, unpatch

LEGACY = {"functions": ("CalculateEmbeddings",), "import_from": "_medico_embedding_store"}


# --- the codemods -------------------------------------------------------------------------------

LOOP = """\
import numpy as np
from segment_anything import SamPredictor


def CalculateEmbeddings(msg):
    for i in tqdm(range(dataNode.N["R"])):
        dataNode.samPredictor["R"].set_image(cv2.cvtColor(dataNode.mainVolume[i,:,:],cv2.COLOR_GRAY2RGB))
        dataNode.features["R"][i] = dataNode.samPredictor["R"].features.to('cpu')
"""


def test_set_image_in_the_embedding_pass_goes_through_the_store():
    check_transformed(
        StoreSetImage,
        LOOP,
        """\
        import numpy as np
        from segment_anything import SamPredictor

        try:  # medico-adapters --lazy-embeddings: embeddings come from, and go to, the kit's embedding store
            from _medico_embedding_store import set_image as _medico_set_image
        except Exception as _medico_store_error:  # no store module: embed as before
            print(f"medico embedding store: not used ({type(_medico_store_error).__name__}: {_medico_store_error})")

            def _medico_set_image(predictor, image, image_format="RGB"):
                predictor.set_image(image, image_format)


        def CalculateEmbeddings(msg):
            for i in tqdm(range(dataNode.N["R"])):
                _medico_set_image(dataNode.samPredictor["R"], cv2.cvtColor(dataNode.mainVolume[i,:,:],cv2.COLOR_GRAY2RGB))
                dataNode.features["R"][i] = dataNode.samPredictor["R"].features.to('cpu')
        """,
        **LEGACY,
    )


def test_untransformed_outside_the_named_functions():
    check_noop(StoreSetImage, "def helperPredict(dataNode):\n    dataNode.samPredictor['R'].set_image(img)\n", **LEGACY)
    check_noop(StoreSetImage, "def CalculateEmbeddings(msg):\n    dataNode.features = {}\n", **LEGACY)


def test_already_routed_through_the_store():
    once = transformed(StoreSetImage, LOOP, **LEGACY)
    check_noop(StoreSetImage, once, **LEGACY)
    assert once.count("_medico_set_image(") == 2  # the fallback's def and the one call


def test_methods_of_a_backend_get_the_relative_import():
    out = transformed(StoreSetImage, """\
        from threading import Lock


        class Backend:
            def embed(self, weight, image_bytes, shape):
                predictor = self.predictor_types[weight.id](self.models[weight.id])
                predictor.set_image(np.frombuffer(image_bytes, dtype=np.uint8).reshape(shape))

            def predict(self, weight, image):
                self.predictors[weight.id].set_image(image, "BGR")

            def offload(self):
                self.other.set_image(None)
        """, functions=("embed", "predict"), import_from="._medico_embedding_store")
    assert "from ._medico_embedding_store import set_image as _medico_set_image" in out
    assert "_medico_set_image(predictor, np.frombuffer(image_bytes, dtype=np.uint8).reshape(shape))" in out
    assert '_medico_set_image(self.predictors[weight.id], image, "BGR")' in out
    assert "self.other.set_image(None)" in out


BUILT = """\
from segment_anything import sam_model_registry


class SammParameterNode:
    def initNetworkSam(self, model):
        sam = sam_model_registry[model](checkpoint=self.sam_checkpoint)
        sam.to(device=self.device)
        self.samPredictor["R"] = SamPredictor(sam)
"""


def test_model_hashed_before_the_accelerator_runs():
    accelerated = transformed(accelerate.AccelerateModel, BUILT, import_from="_medico_sam_accel")
    out = transformed(KeyModelIdentity, accelerated, import_from="_medico_embedding_store")
    assert out.index("sam.to(device=self.device)") < out.index("_medico_model_identity(sam.image_encoder)") < out.index(
        "_medico_sam_accelerate(sam)")
    check_noop(KeyModelIdentity, out, import_from="_medico_embedding_store")
    check_noop(KeyModelIdentity, "x = 1\n", import_from="_medico_embedding_store")


# --- the store's set_image on a real SamPredictor ---------------------------------------------


class TinyEncoder(torch.nn.Module):
    """SAM's encoder contract (B x 3 x 1024 x 1024 in, B x 256 x 64 x 64 out) in one convolution."""

    img_size = 1024

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 256, kernel_size=16, stride=16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def _refuse(x):
    raise AssertionError("the encoder ran")


@pytest.fixture(scope="module")
def small_sam():
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(image_encoder=TinyEncoder(), prompt_encoder=prompt, mask_decoder=decoder).eval()


def test_a_stored_slice_leaves_the_predictor_as_set_image_does(small_sam, tmp_path, monkeypatch):
    from segment_anything import SamPredictor

    store = EmbeddingStore(tmp_path)
    image = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    fresh = SamPredictor(small_sam)
    assert store_module.set_image(fresh, image, store=store) is False and store.stats["writes"] == 1
    served = SamPredictor(small_sam)
    monkeypatch.setattr(small_sam.image_encoder, "forward", _refuse)
    assert store_module.set_image(served, image, store=store) is True
    for name in ("original_size", "input_size", "is_image_set"):
        assert getattr(served, name) == getattr(fresh, name), name
    assert torch.equal(served.features, fresh.features)
    point = {"point_coords": np.array([[12.0, 20.0]]), "point_labels": np.array([1])}
    assert np.array_equal(served.predict(**point)[0], fresh.predict(**point)[0])
    # BGR input is the same image to the encoder once flipped: the same entry
    assert store_module.set_image(SamPredictor(small_sam), image[..., ::-1].copy(), "BGR", store=store) is True


def test_an_encoder_without_weights_or_identity_is_never_keyed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(store_module, "_said", set())

    class Compiled(torch.nn.Module):  # what an OpenVINO encoder looks like from outside: no parameters
        img_size = 1024

        def forward(self, x):
            return torch.zeros(1, 256, 64, 64)

    sam = types.SimpleNamespace(image_encoder=Compiled(), image_format="RGB")
    predictor = types.SimpleNamespace(model=sam, transform=types.SimpleNamespace(target_length=1024), calls=[])
    predictor.set_image = lambda image, fmt: predictor.calls.append(fmt) or setattr(predictor, "features", torch.zeros(1))
    store = EmbeddingStore(tmp_path)
    assert store_module.set_image(predictor, np.zeros((8, 8, 3), np.uint8), store=store) is False
    assert predictor.calls == ["RGB"] and store.stats["writes"] == 0
    assert "carries no identity" in capsys.readouterr().out
    # the identity the patched tool tagged its model with before the swap makes it keyable ...
    sam._medico_identity = "a" * 32
    store_module.set_image(predictor, np.zeros((8, 8, 3), np.uint8), store=store)
    assert store.stats["writes"] == 1
    # ... and one the encoder carries itself comes first: another model's entry is not served
    sam.image_encoder._medico_identity = "b" * 32
    assert store_module.set_image(predictor, np.zeros((8, 8, 3), np.uint8), store=store) is False
    assert store.stats["writes"] == 2


def test_an_unwritable_store_costs_the_store_not_the_embedding(small_sam, tmp_path, capsys, monkeypatch):
    from segment_anything import SamPredictor

    monkeypatch.setattr(store_module, "_said", set())

    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    predictor = SamPredictor(small_sam)
    assert store_module.set_image(predictor, np.zeros((8, 8, 3), np.uint8), store=EmbeddingStore(blocked)) is False
    assert predictor.features.shape == (1, 256, 64, 64)
    store_module.set_image(predictor, np.ones((8, 8, 3), np.uint8), store=EmbeddingStore(blocked))
    out = capsys.readouterr().out
    assert out.count("medico embedding store: could not store embeddings") == 1  # once, not once a slice


# --- every layout: placed, listed, turned off, unpatched ----------------------------------------

PLACED = {"S2": "samm-python-terminal", "S3": "samm-python-terminal", "S4": "samm-python-terminal",
          "samm_server": "service/samm_server/backends"}
CODE = {"S2": samm.SERVER_UTIL, "S3": samm.SERVER_UTIL, "S4": samm.SERVER_UTIL,
        "samm_server": "service/samm_server/backends/sam_predictor.py"}


@pytest.mark.parametrize("layout", sorted(PLACED))
def test_patch_lists_it_turns_off_and_unpatches_byte_for_byte(layout, tmp_path, checkpoints):
    root = copy_fixture(f"samm/{layout}", tmp_path)
    before = snapshot(root)
    module = f"{PLACED[layout]}/{embedding_store.MODULE}.py"
    result = patch(samm.ADAPTER, root, checkpoint=checkpoints["plain"], options={"lazy_embeddings": True, "accelerate": True})
    assert module in result.changed and CODE[layout] in result.changed
    assert (root / module).read_bytes() == Path(store_module.__file__).read_bytes()  # verbatim
    code = (root / CODE[layout]).read_text("utf-8")
    assert code.count("_medico_set_image(") == 1 + (3 if layout != "samm_server" else 2)
    assert code.count("_medico_model_identity(") == code.count("_medico_sam_accelerate(")
    report = status(samm.ADAPTER, root)
    assert report["patched"] and embedding_store.FEATURE in report["features"] and accelerate.FEATURE in report["features"]
    assert patch(samm.ADAPTER, root).changed == []  # the option is remembered

    off = patch(samm.ADAPTER, root, options={"lazy_embeddings": False})
    assert sorted(off.changed) == sorted([module, CODE[layout]])
    code = (root / CODE[layout]).read_text("utf-8")
    assert "_medico_embedding_store" not in code and "_medico_sam_accelerate(" in code  # only this option went
    assert embedding_store.FEATURE not in status(samm.ADAPTER, root)["features"]
    manifest = json.loads((root / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert manifest["options"]["lazy_embeddings"] is False and module not in manifest["files"]
    unpatch(samm.ADAPTER, root)
    assert snapshot(root) == before


# --- the fixture servers' own embedding code, run twice ----------------------------------------


@pytest.fixture
def legacy_server(monkeypatch, tmp_path, checkpoints):
    """Patch S4 with --lazy-embeddings and import its server module, as `python sam_server.py` does."""

    def load(layout: str):
        root = copy_fixture(f"samm/{layout}", tmp_path)
        patch(samm.ADAPTER, root, checkpoint=checkpoints["plain"], options={"lazy_embeddings": True})
        cv2 = types.ModuleType("cv2")
        cv2.COLOR_GRAY2RGB = 8
        cv2.cvtColor = lambda image, code: np.repeat(image[:, :, None], 3, axis=2)  # what GRAY2RGB does
        for name, module in (("cv2", cv2), ("zmq", types.ModuleType("zmq")), ("mobile_sam", types.ModuleType("mobile_sam"))):
            module.sam_model_registry, module.SamPredictor = {}, object
            monkeypatch.setitem(sys.modules, name, module)
        for name in ("utl_sam_msg", "utl_sam_server", embedding_store.MODULE):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.syspath_prepend(str(root / "samm-python-terminal"))
        server = importlib.import_module("utl_sam_server")
        node = server.SammParameterNode()  # loads MedicoSAM (ViT-B) on the CPU
        node.samPredictor["R"].model.image_encoder = TinyEncoder()
        return server, node

    yield load
    for name in ("utl_sam_msg", "utl_sam_server", embedding_store.MODULE):
        sys.modules.pop(name, None)


def _embed(server, node, volume: np.ndarray) -> dict:
    r, g, y = volume.shape
    server.sammProcessingCallBack_SET_IMAGE_SIZE({"r": r, "g": g, "y": y})
    for i in range(r):
        server.sammProcessingCallBack_SET_NTH_IMAGE({"n": i, "image": volume[i]})
    server.CalculateEmbeddings({"saveToLocal": 0, "loadLocal": 0})
    return {v: list(node.features[v]) for v in "RGY"}


@pytest.mark.parametrize("layout", ["S2", "S4"])
def test_second_calculate_embeddings_makes_no_encoder_call(layout, legacy_server):
    server, node = legacy_server(layout)
    encoder = node.samPredictor["R"].model.image_encoder
    assert sys.modules[embedding_store.MODULE].__file__.startswith(str(Path(server.__file__).parent))  # the placed copy
    volume = np.random.default_rng(1).integers(0, 255, (3, 4, 5), dtype=np.uint8)
    first = _embed(server, node, volume)
    assert encoder.calls == 3 + 4 + 5

    encoder.forward = _refuse
    second = _embed(server, node, volume)
    assert all(torch.equal(a, b) for v in "RGY" for a, b in zip(first[v], second[v], strict=True))
    assert all(f.shape == (1, 256, 64, 64) and f.device.type == "cpu" for v in "RGY" for f in second[v])

    # one changed voxel: only the three slices through it are embedded again
    del encoder.forward
    volume[1, 2, 3] ^= 0xFF
    third = _embed(server, node, volume)
    assert encoder.calls == 3 + 4 + 5 + 3
    assert not torch.equal(third["R"][1], first["R"][1]) and torch.equal(third["R"][0], first["R"][0])


def test_samm_server_backend_embeds_each_slice_once(tmp_path, checkpoints, monkeypatch):
    root = copy_fixture("samm/samm_server", tmp_path)
    patch(samm.ADAPTER, root, checkpoint=checkpoints["plain"], options={"lazy_embeddings": True})
    monkeypatch.syspath_prepend(str(root / "service"))
    try:
        backend = importlib.import_module("samm_server.backends.sam1").Sam1Backend()
        weight = types.SimpleNamespace(id=samm.DEFAULT_NAME, model_type="vit_b", backend="sam1")
        backend.prepare(weight, root / "checkpoints/vit_b_medicosam.pt", "cpu")
        encoder = backend.models[weight.id].image_encoder = TinyEncoder()
        image = np.random.default_rng(2).integers(0, 255, (6, 7, 3), dtype=np.uint8)
        first = backend.embed(weight, image.tobytes(), list(image.shape))
        monkeypatch.setattr(encoder, "forward", _refuse)
        again = backend.embed(weight, image.tobytes(), list(image.shape))
        assert torch.equal(again.features, first.features) and encoder.calls == 1
        mask = backend.predict(weight, image.tobytes(), list(image.shape), [[3, 3]], [1])  # the stored slice again
        assert mask.shape == (6, 7)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "samm_server"]:
            sys.modules.pop(name, None)


# --- as a user runs it ------------------------------------------------------------------------


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The kit as a user runs it (the isolated home's variables are inherited)."""
    return subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_lazy_embeddings_status_off_unpatch(tmp_path, checkpoints):
    root = copy_fixture("samm/S3", tmp_path)
    before = snapshot(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = Path("..") / root.name
    on = _cli("patch", "samm", "--path", rel, "--checkpoint", checkpoints["plain"], "--lazy-embeddings", cwd=elsewhere)
    assert on.returncode == 0, on.stderr
    assert f"changed samm-python-terminal/{embedding_store.MODULE}.py" in on.stdout
    st = _cli("status", "samm", "--path", root, "--json", cwd=tmp_path)
    assert embedding_store.FEATURE in json.loads(st.stdout)["features"]
    off = _cli("patch", "samm", "--path", rel, "--no-lazy-embeddings", "--json", cwd=elsewhere)
    assert off.returncode == 0, off.stderr
    assert sorted(json.loads(off.stdout)["changed"]) == sorted([samm.SERVER_UTIL, f"samm-python-terminal/{embedding_store.MODULE}.py"])
    assert _cli("unpatch", "samm", "--path", rel, cwd=elsewhere).returncode == 0
    assert snapshot(root) == before
