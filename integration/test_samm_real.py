"""The samm adapter on a real bingogome/samm checkout: ``MEDICO_SAMM_SRC=/path/to/samm pytest integration``.

Every test works on its own tmp copy of the checkout.

* ``test_patch_roundtrip``: patch, re-patch (no change), unpatch byte for byte.
* legacy layouts (S2-S4): the real server (``sam_server.SamServer`` over ``utl_sam_server``) is
  constructed on CPU and driven by the real Slicer side (``SammBaseLogic.processSelectModel`` and
  ``UtilConnections.pushRequest``, encoding with ``UtilMsgFactory``). The only transport stand-in is
  the zmq context of ``UtilConnections``: its REQ socket hands ``[cmd, msg]`` to the server's own
  ``sammProcessingCallBack`` and queues the late job on ``SamServer.cacheExec`` exactly as
  ``SamServer.looping`` does (no socket is opened). slicer/qt/vtk/ctk get light stand-in modules;
  zmq, cv2, matplotlib, tqdm, segment_anything and mobile_sam are the real packages.
* ``--lazy-embeddings`` (legacy): the real ``CalculateEmbeddings``, driven the same way, fills the
  kit's embedding store, and the same volume sent again makes no encoder call (it raises).
* samm-server (>= 1.2): the real ``samm_server.model_preparer.ModelPreparer`` prepares
  ``medicosam_vit_b`` with the real ``sam1`` backend on CPU, and ``/models``' payload lists it available.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters.adapters import embedding_store, samm
from medico_adapters.engine import Tree
from medico_adapters.errors import LayoutError
from medico_adapters.patching import patch, status, unpatch

SRC = os.environ.get("MEDICO_SAMM_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set MEDICO_SAMM_SRC to a bingogome/samm checkout to run")


def _layout() -> str | None:
    if not SRC:
        return None
    try:
        return samm.ADAPTER.detect(Tree(Path(SRC))).name
    except LayoutError:
        return None  # test_patch_roundtrip reports the refusal


LAYOUT = _layout()
needs_legacy = pytest.mark.skipif(LAYOUT not in ("S2", "S3", "S4"), reason=f"legacy samm only (this checkout: {LAYOUT})")
needs_server = pytest.mark.skipif(LAYOUT != "samm-server", reason=f"samm-server >= 1.2 only (this checkout: {LAYOUT})")

SERVER_MODULES = ("sam_server", "utl_sam_server", "utl_sam_msg", "utl_latencylogger")
STORE_MODULE = embedding_store.MODULE
VOLUME = (8, 8, 8)  # a constant cube: all 24 slices (R+G+Y) give the encoder the same 1024x1024 input


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))}


def _same(model: torch.nn.Module, state: dict) -> bool:
    loaded = model.state_dict()
    return loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    state = build_sam_vit_b().state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "medicosam.pt"
    torch.save(state, path)
    return path, state


def _copy(tmp: Path) -> Path:
    root = tmp / "samm"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns(".git"))
    return root


def test_patch_roundtrip(tmp_path, ckpt):
    root = _copy(tmp_path)
    before = _snapshot(root)
    result = patch(samm.ADAPTER, root, checkpoint=ckpt[0])
    assert result.layout == LAYOUT
    assert patch(samm.ADAPTER, root).changed == []
    assert status(samm.ADAPTER, root)["patched"]
    unpatch(samm.ADAPTER, root)
    assert _snapshot(root) == before


# --- legacy: the real server driven by the real Slicer side ----------------------------------


class _ParameterNode:
    def __init__(self):
        self.values: dict[str, str] = {}

    def GetParameter(self, name):
        return self.values.get(name, "")

    def SetParameter(self, name, value):
        self.values[name] = value


def _slicer_stand_ins() -> dict[str, types.ModuleType]:
    """Just what SammBaseLib's imports touch outside Slicer."""

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            self._node = _ParameterNode()

        def getParameterNode(self):
            return self._node

    slicer = types.ModuleType("slicer")
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")
    loadable.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {})
    slicer.ScriptedLoadableModule, slicer.util = loadable, util
    mods = {"slicer": slicer, "slicer.ScriptedLoadableModule": loadable, "slicer.util": util}
    mods.update({name: types.ModuleType(name) for name in ("qt", "vtk", "ctk")})
    return mods


class _Loopback:
    """Stands in for UtilConnections' zmq.Context: one REQ/REP round trip per socket, in process.

    The reply and the late job come from the server's own callback, handled as SamServer.looping does.
    """

    def __init__(self, server):
        self.server = server
        self.commands: list[int] = []

    def socket(self, kind):
        loop = self

        class _Socket:
            def setsockopt(self, *args):
                pass

            def connect(self, address):
                pass

            def send_multipart(self, parts):
                cmd, msg = parts
                loop.commands.append(int(np.frombuffer(cmd, dtype="int32")[0]))
                self.reply, late = loop.server.callback(cmd, msg)
                if late is not None:
                    loop.server.cacheExec.append(late)

            def recv(self):
                return self.reply

            def close(self):
                pass

        return _Socket()

    def run_late(self):
        """SamServer.execLooping's body, minus its catch-all, so a failing job fails the test."""
        while self.server.cacheExec:
            self.server.cacheExec.pop(0)()


@contextlib.contextmanager
def _serving(root: Path):
    """The patched checkout's real server and Slicer side, imported fresh, and forgotten afterwards."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setattr(torch.backends.mps, "is_available", lambda: False)
        for name, module in _slicer_stand_ins().items():
            mp.setitem(sys.modules, name, module)
        for name in (*SERVER_MODULES, "SammBaseLib", STORE_MODULE):
            mp.delitem(sys.modules, name, raising=False)
        mp.syspath_prepend(str(root / "samm-python-terminal"))
        mp.syspath_prepend(str(root / "samm" / "SammBase"))
        try:
            server_main = importlib.import_module("sam_server")
            server_util = importlib.import_module("utl_sam_server")
            server_msg = importlib.import_module("utl_sam_msg")
            factory = importlib.import_module("SammBaseLib.UtilMsgFactory")
            connections = importlib.import_module("SammBaseLib.UtilConnections")
            logic_module = importlib.import_module("SammBaseLib.LogicSamm")

            srv = server_main.SamServer(8799, server_util.sammProcessingCallBack, 0.001)  # binds nothing
            loop = _Loopback(srv)
            conn = connections.UtilConnections("127.0.0.1", 8799)
            conn.context = loop
            logic = logic_module.SammBaseLogic()
            logic._connections = conn
            yield types.SimpleNamespace(
                root=root, srv=srv, node=srv.dataNode, loop=loop, conn=conn, logic=logic, factory=factory,
                server_msg=server_msg,
            )
        finally:
            for name in set(sys.modules) - before:
                if name.split(".")[0] in (*SERVER_MODULES, "SammBaseLib", "mobile_sam", STORE_MODULE):
                    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, ckpt):
    path, state = ckpt
    root = _copy(tmp_path_factory.mktemp("legacy"))
    assert patch(samm.ADAPTER, root, checkpoint=path).layout == LAYOUT
    workspace = root / samm.WORKSPACE
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(other, workspace / "sam_vit_b_01ec64.pth")  # upstream's vit_b file, to switch away and back
    with _serving(root) as served:
        served.state, served.other = state, other
        yield served


@needs_legacy
def test_legacy_server_starts_on_medicosam(legacy):
    """Constructing SamServer passes its start-up checkpoint check and loads MedicoSAM on CPU."""
    assert legacy.srv.sam_checkpoint.endswith("/vit_b_medicosam.pt")
    assert legacy.node.device == "cpu"
    assert _same(legacy.node.samPredictor["R"].model, legacy.state)
    assert legacy.node.samPredictor["R"].model is legacy.node.samPredictor["Y"].model


@needs_legacy
def test_legacy_model_switch_through_the_real_messages(legacy):
    name = samm.DEFAULT_NAME
    widget = ast.parse((legacy.root / samm.WIDGET).read_text())
    combo = next(
        n.value for n in ast.walk(widget)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "comboModelItems" for t in n.targets)
    )
    assert name in ast.literal_eval(combo)

    # the Slicer factory's bytes decode to the same name on the server side
    encoded = legacy.factory.SammMsgType_MODEL_SELECTION({"model": name}).getEncodedData()
    assert legacy.server_msg.SammMsgType_MODEL_SELECTION.getDecodedData(encoded) == {"model": name}
    assert legacy.factory.SammMsgType.MODEL_SELECTION.value == legacy.server_msg.SammMsgType.MODEL_SELECTION.value

    node, params = legacy.node, legacy.logic._parameterNode
    for choice, state in (("vit_b", legacy.other), (name, legacy.state)):
        params.SetParameter("sammModelSelection", choice)
        legacy.logic.processSelectModel()  # Slicer: UtilConnections.pushRequest(MODEL_SELECTION, ...)
        assert legacy.loop.commands[-1] == legacy.server_msg.SammMsgType.MODEL_SELECTION.value
        assert len(legacy.srv.cacheExec) == 1  # the server defers SwitchModel, as upstream does
        legacy.loop.run_late()
        assert node.device == "cpu"
        assert _same(node.samPredictor["R"].model, state), f"after switching to {choice!r}"
        assert all(node.samPredictor[v].model is node.samPredictor["R"].model for v in "GY")


def _count_encoder(node) -> dict:
    """Serve identical encoder inputs from a cache (keyed by their exact bytes) and count real runs.

    Every slice still goes through SamPredictor.set_image and the real ViT-B; a CPU ViT-B pass at
    1024x1024 takes tens of seconds, so the constant cube needs one instead of 24.
    """
    encoder = node.samPredictor["R"].model.image_encoder
    forward, seen = encoder.forward, {}
    counts = {"calls": 0, "runs": 0}

    def cached(x):
        counts["calls"] += 1
        key = (tuple(x.shape), hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest())
        if key not in seen:
            counts["runs"] += 1
            seen[key] = forward(x)
        return seen[key]

    encoder.forward = cached
    return counts


@needs_legacy
def test_legacy_embeddings_and_point_inference(legacy, request):
    node, conn, types_ = legacy.node, legacy.conn, legacy.factory.SammMsgType
    if not _same(node.samPredictor["R"].model, legacy.state):  # run alone: select MedicoSAM first
        legacy.logic._parameterNode.SetParameter("sammModelSelection", samm.DEFAULT_NAME)
        legacy.logic.processSelectModel()
        legacy.loop.run_late()
    assert _same(node.samPredictor["R"].model, legacy.state)
    r, g, y = VOLUME
    volume = np.full(VOLUME, 128, dtype=np.uint8)
    # LogicSamm.processPreEmbeddings / processComputeEmbeddings, message for message
    conn.pushRequest(types_.SET_IMAGE_SIZE, {"r": r, "g": g, "y": y})
    for i in range(r):
        conn.pushRequest(types_.SET_NTH_IMAGE, {"n": i, "N": {"R": r, "G": g, "Y": y}, "image": volume[i]})
    assert np.array_equal(node.mainVolume, volume)
    counts = _count_encoder(node)
    conn.pushRequest(types_.CALCULATE_EMBEDDINGS, {"saveToLocal": 1, "loadLocal": 0})
    legacy.loop.run_late()  # CalculateEmbeddings
    assert counts == {"calls": r + g + y, "runs": 1}
    assert [len(node.features[v]) for v in "RGY"] == [r, g, y]
    assert all(f.shape == (1, 256, 64, 64) and f.device.type == "cpu" for v in "RGY" for f in node.features[v])
    assert (legacy.root / samm.WORKSPACE / "emb" / "emb.pkl").is_file()

    mask = conn.pushRequest(types_.INFERENCE, {
        "n": r // 2,
        "view": "R",
        "bbox2D": np.array([-404, -404, -404, -404]),  # LogicSamm's "no 2D box"
        "positivePrompts": np.array([[g // 2, y // 2]]),
        "negativePrompts": np.array([]),
    })
    mask = np.frombuffer(mask, dtype=np.uint8)
    assert mask.size == g * y and set(np.unique(mask)) <= {0, 1}


def _calculate_and_click(served, volume: np.ndarray) -> tuple[dict, np.ndarray]:
    """Slicer's message sequence for a volume (size, slices, CALCULATE_EMBEDDINGS), then one click."""
    conn, types_, node = served.conn, served.factory.SammMsgType, served.node
    r, g, y = volume.shape
    conn.pushRequest(types_.SET_IMAGE_SIZE, {"r": r, "g": g, "y": y})
    for i in range(r):
        conn.pushRequest(types_.SET_NTH_IMAGE, {"n": i, "N": {"R": r, "G": g, "Y": y}, "image": volume[i]})
    conn.pushRequest(types_.CALCULATE_EMBEDDINGS, {"saveToLocal": 0, "loadLocal": 0})
    served.loop.run_late()  # CalculateEmbeddings
    features = {v: [f.clone() for f in node.features[v]] for v in "RGY"}
    mask = conn.pushRequest(types_.INFERENCE, {
        "n": r // 2, "view": "R", "bbox2D": np.array([-404, -404, -404, -404]),
        "positivePrompts": np.array([[g // 2, y // 2]]), "negativePrompts": np.array([]),
    })
    return features, np.frombuffer(mask, dtype=np.uint8).copy()


@needs_legacy
def test_legacy_calculate_embeddings_twice_runs_the_encoder_once_per_slice(tmp_path, ckpt, monkeypatch):
    """patch --lazy-embeddings: the real CalculateEmbeddings fills the kit's store, and the same
    volume sent again is embedded without the encoder (it raises), with the same features and mask."""
    path, state = ckpt
    root = _copy(tmp_path)
    before = _snapshot(root)
    patch(samm.ADAPTER, root, checkpoint=path, options={"lazy_embeddings": True})
    assert embedding_store.FEATURE in status(samm.ADAPTER, root)["features"]
    store = tmp_path / "store"
    monkeypatch.setenv("MEDICO_EMBEDDING_STORE", str(store))
    volume = np.random.default_rng(0).integers(0, 256, (2, 2, 2), dtype=np.uint8)  # 6 different slices
    with _serving(root) as served:
        placed = Path(importlib.import_module(STORE_MODULE).__file__)
        assert placed.parent == root / "samm-python-terminal"
        model = served.node.samPredictor["R"].model
        assert _same(model, state)
        encoder, runs = model.image_encoder, []
        forward = encoder.forward
        encoder.forward = lambda x: runs.append(1) or forward(x)
        first, first_mask = _calculate_and_click(served, volume)
        assert len(runs) == 6 and len(list(store.rglob("*.emb"))) == 6

        def refuse(x):
            raise AssertionError("the encoder ran for a stored slice")

        encoder.forward = refuse
        second, second_mask = _calculate_and_click(served, volume)
        assert all(torch.equal(a, b) for v in "RGY" for a, b in zip(first[v], second[v], strict=True))
        assert np.array_equal(first_mask, second_mask) and first_mask.size == 2 * 2
    unpatch(samm.ADAPTER, root)
    assert _snapshot(root) == before


# --- samm-server >= 1.2 ----------------------------------------------------------------------


@needs_server
def test_samm_server_prepares_medicosam(tmp_path, ckpt):
    path, state = ckpt
    root = _copy(tmp_path)
    assert patch(samm.ADAPTER, root, checkpoint=path).layout == "samm-server"
    model_dir = root / "checkpoints"
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "service"))
        try:
            registry = importlib.import_module("samm_server.model_registry")
            protocol = importlib.import_module("samm_server.protocol")
            preparer_module = importlib.import_module("samm_server.model_preparer")
            assert Path(registry.__file__).is_relative_to(root)

            model, weight = registry.weight_definition(samm.DEFAULT_NAME, model_dir)
            assert model is registry.MODEL_DEFINITIONS[-1] and (model.id, weight.backend) == ("medicosam", "sam1")
            listed = {w["id"]: w for m in protocol.models_payload(model_dir)["models"] for w in m["weights"]}
            assert listed[samm.DEFAULT_NAME]["available"] and listed[samm.DEFAULT_NAME]["model_id"] == "medicosam"
            assert not listed["sam_vit_b"]["available"]

            preparer = preparer_module.ModelPreparer(model_dir, "cpu")
            result = preparer.prepare(samm.DEFAULT_NAME)
            assert result.status_code == 200, result.payload
            assert result.payload["model_id"] == "medicosam" and result.payload["device"] == "cpu"
            assert _same(preparer.backends["sam1"].models[samm.DEFAULT_NAME], state)
        finally:
            for name in set(sys.modules) - before:
                if name.split(".")[0] == "samm_server":
                    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location("_samm_slicer_protocol", root / samm.ADAPTER.detect(Tree(root)).files[1])
    slicer_protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slicer_protocol)
    assert "medicosam" in slicer_protocol.MODEL_IDS and samm.DEFAULT_NAME in slicer_protocol.WEIGHT_IDS


@needs_server
def test_samm_server_embeds_a_slice_once_across_restarts(tmp_path, ckpt, monkeypatch):
    """patch --lazy-embeddings: a restarted server (a new ModelPreparer) embeds an image it has
    embedded before from the store, its encoder made to raise, with the same features and mask."""
    path, _ = ckpt
    root = _copy(tmp_path)
    patch(samm.ADAPTER, root, checkpoint=path, options={"lazy_embeddings": True})
    monkeypatch.setenv("MEDICO_EMBEDDING_STORE", str(tmp_path / "store"))
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    point = [[16, 12]]
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "service"))
        try:
            preparer_module = importlib.import_module("samm_server.model_preparer")
            results = []
            for restart in (False, True):
                preparer = preparer_module.ModelPreparer(root / "checkpoints", "cpu")
                assert preparer.prepare(samm.DEFAULT_NAME).status_code == 200
                backend = preparer.backends["sam1"]
                if restart:
                    def refuse(x):
                        raise AssertionError("the encoder ran for a stored image")

                    backend.models[samm.DEFAULT_NAME].image_encoder.forward = refuse
                payload = preparer.embed(image.tobytes(), list(image.shape))
                features = backend.embeddings[payload["embedding_id"]]["predictor"].features
                mask = preparer.predict(image.tobytes(), list(image.shape), point, [1])
                results.append((features.detach().cpu().clone(), mask))
            assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
            assert len(list((tmp_path / "store").rglob("*.emb"))) == 1
        finally:
            for name in set(sys.modules) - before:
                if name.split(".")[0] == "samm_server":
                    sys.modules.pop(name, None)
