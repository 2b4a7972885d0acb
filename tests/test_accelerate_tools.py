"""``patch TOOL --accelerate``: the codemod, the placed module, and each fixture tool's own code run.

The tools' models are real random-weight ViT-Bs at SAM's fixed 1024-pixel input, so an embedding
costs seconds: every layout checks that the tool's own model-building code ends with an
accelerated encoder (OpenVINO, and the SDPA fallback without it), and two full-size embeddings,
one per path, are compared with plain ``SamPredictor``'s. Random weights: agreement, not accuracy.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import py_compile
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FakeViewer,
    check_noop,
    check_transformed,
    copy_fixture,
    import_fresh,
    kit_cli,
    outside_state,
    slicer_stand_ins,
    snapshot,
    transformed,
)

from medico_adapters import phantom
from medico_adapters.accel import medico_sam_accel as accel
from medico_adapters.adapters import (
    accelerate,
    lazy_embeddings,
    napari_sam,
    napari_segment_anything,
    samm,
    slicer_sws,
)
from medico_adapters.adapters.accelerate import AccelerateModel
from medico_adapters.embeddings.store import state_identity
from medico_adapters.engine import STATE_DIR
from medico_adapters.errors import LayoutError, PatchError
from medico_adapters.patching import patch, status, unpatch


@pytest.fixture(autouse=True)
def _drop_placed_checkpoints(tmp_path, _isolated_home):
    """Every patch here places a 358 MB checkpoint; remove them once a test is done with them."""
    yield
    for folder in (tmp_path, _isolated_home):
        for placed in [*folder.rglob("*.pt"), *folder.rglob("*.pth")]:
            placed.unlink(missing_ok=True)


needs_openvino = pytest.mark.skipif(accel.openvino_version() is None, reason="OpenVINO is not installed")
CALL = "_medico_sam_accelerate("


def _inserted(target: str, import_from: str = "._medico_sam_accel", indent: str = "    ") -> str:
    i = indent
    return (
        "try:  # medico-adapters --accelerate: same embedding, faster encoder; a failure keeps the model as built\n"
        f"{i}from {import_from} import accelerate as _medico_sam_accelerate\n"
        f"{i}_medico_sam_accelerate({target})\n"
        "except Exception as _medico_sam_error:\n"
        f'{i}print(f"medico_sam_accel: not accelerated ({{type(_medico_sam_error).__name__}}: {{_medico_sam_error}})")\n'
    )


def _indented(text: str, by: str) -> str:
    return "".join(by + line for line in text.splitlines(keepends=True))


# --- the codemod ------------------------------------------------------------------------------

NAPARI_N3 = """\
from segment_anything import SamPredictor, build_sam_vit_b

class SamWidget:
    def _load_model(self):
        self.sam_model = SAM_MODELS[model_type]["model"](
            self.get_weights_path(model_type)
        )
        self.sam_model.to(self.device)
        self.sam_predictor = SamPredictor(self.sam_model)
"""


def test_napari_sam_models_table_builder():
    head, tail = NAPARI_N3.split("        self.sam_predictor")
    check_transformed(AccelerateModel, NAPARI_N3, head + _indented(_inserted("self.sam_model"), "        ") + "        self.sam_predictor" + tail,
                      import_from="._medico_sam_accel")


SAMM = """\
from segment_anything import sam_model_registry as sam_model_registry_sam
from mobile_sam import sam_model_registry as sam_model_registry_mobile

class SammParameterNode:
    def initNetworkSam(self, model):
        sam = sam_model_registry_sam[model](checkpoint=self.sam_checkpoint)
        sam.to(device=self.device)

    def initNetworkMobile(self, model):
        sam = sam_model_registry_mobile[model[7:]](checkpoint=self.sam_checkpoint)
        sam.to(device=self.device)
"""


def test_samm_aliased_registry_and_mobile_sam_left_alone():
    head, tail = SAMM.split("\n    def initNetworkMobile")
    after = head + _indented(_inserted("sam", "_medico_sam_accel"), "        ") + "\n    def initNetworkMobile" + tail
    check_transformed(AccelerateModel, SAMM, after, import_from="_medico_sam_accel")


SAMM_SERVER = """\
class SamPredictorBackend:
    def prepare(self, weight, checkpoint_path, device):
        module = self.module()
        model = module.sam_model_registry[weight.model_type](checkpoint=str(checkpoint_path))
        model.to(device=device)
        self.models[weight.id] = model
"""


def test_samm_server_module_registry_with_condition():
    head, tail = SAMM_SERVER.split("        self.models")
    block = 'if self.module_name == "segment_anything":\n' + _indented(_inserted("model"), "    ")
    check_transformed(AccelerateModel, SAMM_SERVER, head + _indented(block, "        ") + "        self.models" + tail,
                      import_from="._medico_sam_accel", only_if='self.module_name == "segment_anything"')


SLICER_W2 = """\
def changeModel(self, modelName):
    if modelName == "SAM-2 Large":
        sam2_model = build_sam2(model_cfg, sam2_checkpoint, device=self.device)
        self.sam = SAM2ImagePredictor(sam2_model)
    elif modelName == "SAM (ViT-B)":
        from segment_anything import sam_model_registry
        model = sam_model_registry[self.modelVersion](checkpoint=self.modelCheckpoint)
        model.to(device=self.device)
        self.sam = SamPredictor(model)
"""


def test_slicer_branch_gets_the_call_and_sam2_does_not():
    head, tail = SLICER_W2.split("        self.sam = SamPredictor")
    after = head + _indented(_inserted("model", "_medico_sam_accel"), "        ") + "        self.sam = SamPredictor" + tail
    check_transformed(AccelerateModel, SLICER_W2, after, import_from="_medico_sam_accel")


def test_the_file_own_indentation_is_kept():
    two = "from segment_anything import sam_model_registry\ndef load(d):\n  m = sam_model_registry['vit_b']()\n  m.to(d)\n  return m\n"
    after = two.replace("  return m", _indented(_inserted("m", indent="  "), "  ") + "  return m")
    check_transformed(AccelerateModel, two, after, import_from="._medico_sam_accel")


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("def load():\n    model = build_sam2(cfg)\n    model.to('cpu')\n", id="sam2-builder"),
        pytest.param(
            "from segment_anything import sam_model_registry\ndef load():\n    model = sam_model_registry['vit_b']()\n    return model\n",
            id="never-moved-to-a-device",
        ),
        pytest.param(
            "from mobile_sam import sam_model_registry\ndef load():\n    m = sam_model_registry['vit_t']()\n    m.to('cpu')\n",
            id="mobile-sam-registry",
        ),
        pytest.param(
            "from segment_anything import sam_model_registry\ndef load(other):\n    m = sam_model_registry['vit_b']()\n    other.to('cpu')\n",
            id="another-object-moved",
        ),
    ],
)
def test_untransformed(source):
    check_noop(AccelerateModel, source, import_from="._medico_sam_accel")


def test_already_accelerated():
    once = transformed(AccelerateModel, NAPARI_N3, import_from="._medico_sam_accel")
    check_noop(AccelerateModel, once, import_from="._medico_sam_accel")


# --- every layout's fixture: placement, status, turning it off, unpatch -----------------------


@dataclass(frozen=True)
class Case:
    adapter: object
    fixture: str
    module: str  # the accelerator's relpath
    code: str  # the file that builds the model
    calls: int  # models that file builds (and accelerates)


CASES = {
    "N1": Case(napari_sam.ADAPTER, "napari_sam/N1", "napari_sam/_medico_sam_accel.py", "napari_sam/_widget.py", 1),
    "N2": Case(napari_sam.ADAPTER, "napari_sam/N2", "napari_sam/_medico_sam_accel.py", "napari_sam/_widget.py", 1),
    "N3": Case(napari_sam.ADAPTER, "napari_sam/N3", "src/napari_sam/_medico_sam_accel.py", "src/napari_sam/_widget.py", 1),
    "nsa-N1": Case(napari_segment_anything.ADAPTER, "napari_segment_anything/N1",
                   "napari_segment_anything/_medico_sam_accel.py", "napari_segment_anything/_widget.py", 1),
    # SAM, then the kit's exact-name loader (S3 adds MobileSAM, left alone; S4 MedSAM, a SAM-1 too)
    "S2": Case(samm.ADAPTER, "samm/S2", "samm-python-terminal/_medico_sam_accel.py", samm.SERVER_UTIL, 2),
    "S3": Case(samm.ADAPTER, "samm/S3", "samm-python-terminal/_medico_sam_accel.py", samm.SERVER_UTIL, 2),
    "S4": Case(samm.ADAPTER, "samm/S4", "samm-python-terminal/_medico_sam_accel.py", samm.SERVER_UTIL, 3),
    "samm-server": Case(samm.ADAPTER, "samm/samm_server", "service/samm_server/backends/_medico_sam_accel.py",
                        "service/samm_server/backends/sam_predictor.py", 1),
    "W1": Case(slicer_sws.ADAPTER, "slicer_sws/W1", "SegmentWithSAM/_medico_sam_accel/__init__.py", slicer_sws.SOURCE_MODULE, 1),
    # ViT-B and ViT-H branches, and the MedicoSAM branch the patch adds
    "W2": Case(slicer_sws.ADAPTER, "slicer_sws/W2", "SegmentWithSAM/_medico_sam_accel/__init__.py", slicer_sws.SOURCE_MODULE, 3),
}


def _folders(root: Path) -> set[str]:
    """The tree's folders, less the kit's state and Python's bytecode caches."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_dir() and "__pycache__" not in p.parts and STATE_DIR not in p.relative_to(root).parts}


@pytest.mark.parametrize("layout", sorted(CASES))
def test_placed_listed_and_removed_byte_for_byte(layout, tmp_path, checkpoints):
    case = CASES[layout]
    root = copy_fixture(case.fixture, tmp_path)
    before = snapshot(root)

    result = patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
    assert case.module in result.changed and case.code in result.changed
    assert (root / case.module).read_bytes() == Path(accel.__file__).read_bytes()  # verbatim
    assert (root / case.code).read_text("utf-8").count(CALL) == case.calls
    report = status(case.adapter, root)
    assert report["patched"] and accelerate.FEATURE in report["features"]
    assert report["files"][case.module] == "patched"
    assert patch(case.adapter, root).changed == []  # the option is remembered

    py_compile.compile(str(root / case.module), cfile=importlib.util.cache_from_source(str(root / case.module)))  # as an import does
    unpatch(case.adapter, root)
    assert snapshot(root) == before
    # nothing of the module is left: no folder made for it, no bytecode, no empty cache folder
    assert not [p for p in root.rglob("*") if "_medico_sam_accel" in p.name or p.name == "__pycache__"]


@pytest.mark.parametrize("layout", sorted(CASES))
def test_turning_it_off_leaves_the_plain_patch(layout, tmp_path, checkpoints):
    case = CASES[layout]
    plain = copy_fixture(case.fixture, tmp_path / "plain")
    patch(case.adapter, plain, checkpoint=checkpoints["plain"])
    root = copy_fixture(case.fixture, tmp_path / "accelerated")
    patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"accelerate": True})

    result = patch(case.adapter, root, options={"accelerate": False})
    # napari-sam's lazy embeddings follow --accelerate when not set: they go with it
    folder = Path(case.module).parent.as_posix()
    lazy = [f"{folder}/{name}.py" for name in (lazy_embeddings.MODULE, lazy_embeddings.STORE_MODULE)] \
        if isinstance(case.adapter, napari_sam.NapariSamAdapter) else []
    assert sorted(result.changed) == sorted([case.module, case.code, *lazy])
    assert outside_state(root) == outside_state(plain) and _folders(root) == _folders(plain)
    report = status(case.adapter, root)
    assert report["patched"] and accelerate.FEATURE not in report["features"] and case.module not in report["files"]
    manifest = json.loads((root / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert manifest["options"]["accelerate"] is False
    assert set(manifest["files"]) == set(json.loads((plain / STATE_DIR / "manifest.json").read_text("utf-8"))["files"])


def test_slicer_gets_no_bare_python_file_beside_its_module(tmp_path, checkpoints):
    """Slicer would load any .py in the module's folder as a scripted module of its own."""
    root = copy_fixture("slicer_sws/W2", tmp_path)
    patch(slicer_sws.ADAPTER, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
    assert sorted(p.name for p in (root / "SegmentWithSAM").glob("*.py")) == ["SegmentWithSAM.py"]


def test_tools_without_a_model_of_their_own_refuse(tmp_path, checkpoints):
    from medico_adapters.adapters import isat_sam

    root = copy_fixture("isat_sam/I1", tmp_path)
    with pytest.raises(PatchError, match="no SAM model of its own"):
        patch(isat_sam.ADAPTER, root, checkpoint=checkpoints["plain"], options={"accelerate": True})


def test_samm_server_without_a_sam1_backend_is_refused(tmp_path, checkpoints):
    root = copy_fixture("samm/samm_server", tmp_path)
    for name in ("sam_predictor.py", "sam1.py"):
        (root / "service/samm_server/backends" / name).unlink()
    with pytest.raises(LayoutError, match="sam1 backend"):
        patch(samm.ADAPTER, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
    assert not (root / STATE_DIR / "manifest.json").exists()


# --- the fixture tools' own code, run after patching ------------------------------------------


@pytest.fixture(scope="session")
def compiled_cache(tmp_path_factory):
    """One OpenVINO cache for the session: the weights are the same, so one conversion serves all."""
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture
def run_tool(monkeypatch, checkpoints, compiled_cache):
    """Patch a fixture tree with --accelerate, run the tool's own model-building code, return the model."""
    monkeypatch.setenv("MEDICO_ADAPTERS_CACHE", str(compiled_cache))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    before = set(sys.modules)

    def run(layout: str, root: Path, *, patched: bool = True):
        case = CASES[layout]
        if patched:
            patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
        return RUNNERS[layout](root, monkeypatch)

    yield run
    for name in set(sys.modules) - before:  # the trees' modules, and the plain-imported accelerator
        if name.split(".")[0] in ("napari_sam", "napari_segment_anything", "utl_sam_server", "utl_sam_msg",
                                  "samm_server", "SegmentWithSAM", accelerate.MODULE):
            sys.modules.pop(name, None)


def _napari(package: str):
    def run(root: Path, monkeypatch):
        parent = root / "src" if (root / "src").is_dir() else root
        widget_module = import_fresh(parent, f"{package}._widget")
        if package == "napari_sam":
            widget = widget_module.SamWidget(viewer=FakeViewer())
            widget._load_model(widget.model_names().index("MedicoSAM"))
            return widget.sam_model, widget.sam_predictor
        widget = widget_module.SAMWidget(FakeViewer())
        widget._load_model("MedicoSAM")
        return widget._sam, widget._predictor
    return run


def _samm_legacy(root: Path, monkeypatch):
    for name in ("zmq", "cv2", "mobile_sam"):  # imported at module level, unused by model loading
        stub = types.ModuleType(name)
        stub.sam_model_registry, stub.SamPredictor = {}, object
        monkeypatch.setitem(sys.modules, name, stub)
    for name in ("utl_sam_msg", "utl_sam_server"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(root / "samm-python-terminal"))  # what `python sam_server.py` does
    node = importlib.import_module("utl_sam_server").SammParameterNode()  # loads the default: MedicoSAM
    return node.samPredictor["R"].model, node.samPredictor["R"]


def _samm_server(root: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(root / "service"))
    backend = importlib.import_module("samm_server.backends.sam1").Sam1Backend()
    weight = types.SimpleNamespace(id=samm.DEFAULT_NAME, model_type="vit_b", backend="sam1")
    backend.prepare(weight, root / "checkpoints" / "vit_b_medicosam.pt", "cpu")
    return backend.models[weight.id], backend.predictors[weight.id]


def _slicer(layout: str):
    def run(root: Path, monkeypatch):
        module_dir = root / "SegmentWithSAM"
        (module_dir / "Resources/UI").mkdir(parents=True, exist_ok=True)
        (root / "model_checkpoints").mkdir(exist_ok=True)
        (root / "model_checkpoints/sam_vit_b_01ec64.pth").touch()  # so start-up offers no download
        slicer_stand_ins(monkeypatch, module_dir)
        monkeypatch.syspath_prepend(str(module_dir))  # what Slicer does when it loads the module
        namespace: dict = {"__name__": "SegmentWithSAM"}
        exec(compile((root / slicer_sws.SOURCE_MODULE).read_text("utf-8"), str(root / slicer_sws.SOURCE_MODULE), "exec"), namespace)
        widget = namespace["SegmentWithSAMWidget"]()  # W1 builds its model here
        if layout == "W2":
            widget.changeModel("MedicoSAM (ViT-B)")
        return widget.sam.model, widget.sam
    return run


RUNNERS = {
    "N1": _napari("napari_sam"), "N2": _napari("napari_sam"), "N3": _napari("napari_sam"),
    "nsa-N1": _napari("napari_segment_anything"),
    "S2": _samm_legacy, "S3": _samm_legacy, "S4": _samm_legacy,
    "samm-server": _samm_server,
    "W1": _slicer("W1"), "W2": _slicer("W2"),
}


def _accel_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("medico_sam_accel:")]


def _same_weights(model: torch.nn.Module, state: dict, skip: str = "") -> bool:
    loaded = model.state_dict()
    return all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith(skip))


def _placed_module(root: Path, layout: str):
    placed = (root / CASES[layout].module).resolve()
    return [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) and Path(m.__file__).resolve() == placed]


@needs_openvino
@pytest.mark.parametrize("layout", sorted(CASES))
def test_tool_code_builds_an_openvino_encoder(layout, tmp_path, run_tool, vit_b_state, capsys):
    root = copy_fixture(CASES[layout].fixture, tmp_path)
    capsys.readouterr()
    model, _ = run_tool(layout, root)
    encoder = model.image_encoder
    assert type(encoder).__name__ == "OpenVINOImageEncoder" and encoder.precision == "f32"
    assert _same_weights(model, vit_b_state, skip="image_encoder.")  # the rest of the model is the tool's
    lines = _accel_lines(capsys)
    assert lines[-1].startswith("medico_sam_accel: image encoder runs on OpenVINO") and len(lines) <= 2
    assert _placed_module(root, layout)  # the tool imported its own copy, not the kit's
    if isinstance(CASES[layout].adapter, napari_sam.NapariSamAdapter):
        # --accelerate turned lazy embeddings on: the compiled encoder keeps the store's identity
        assert getattr(encoder, "_medico_identity", None) == state_identity(vit_b_state)


@pytest.mark.parametrize("layout", sorted(CASES))
def test_without_openvino_the_tool_uses_sdpa_and_says_so_once(layout, tmp_path, run_tool, vit_b_state, capsys, no_openvino):
    root = copy_fixture(CASES[layout].fixture, tmp_path)
    capsys.readouterr()
    model, _ = run_tool(layout, root)
    assert all(getattr(block.attn, accel.MARKER, None) == "sdpa" for block in model.image_encoder.blocks)
    assert _same_weights(model, vit_b_state)
    assert _accel_lines(capsys) == ["medico_sam_accel: image encoder uses SDPA attention; OpenVINO is not installed"]


@pytest.mark.parametrize("layout", ["N3", "S2", "samm-server", "W1"])
def test_a_broken_accelerator_leaves_the_tool_as_it_was(layout, tmp_path, run_tool, checkpoints, vit_b_state, capsys):
    case = CASES[layout]
    root = copy_fixture(case.fixture, tmp_path)
    patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
    (root / case.module).write_text("raise ImportError('broken on purpose')\n", "utf-8")
    capsys.readouterr()
    model, _ = run_tool(layout, root, patched=False)
    assert type(model.image_encoder).__name__ == "ImageEncoderViT"
    assert not any("forward" in vars(block.attn) for block in model.image_encoder.blocks)
    assert _same_weights(model, vit_b_state)
    assert _accel_lines(capsys) == ["medico_sam_accel: not accelerated (ImportError: broken on purpose)"]


def test_samm_server_mobile_sam_backend_is_not_accelerated(tmp_path, run_tool, monkeypatch, vit_b_state, capsys):
    """samm-server builds MobileSAM in the same method as SAM; only module_name tells them apart."""
    import segment_anything

    root = copy_fixture("samm/samm_server", tmp_path)
    run_tool("samm-server", root)
    capsys.readouterr()
    lookalike = types.ModuleType("mobile_sam")
    lookalike.sam_model_registry, lookalike.SamPredictor = segment_anything.sam_model_registry, segment_anything.SamPredictor
    monkeypatch.setitem(sys.modules, "mobile_sam", lookalike)
    predictor_module = importlib.import_module("samm_server.backends.sam_predictor")
    backend = predictor_module.SamPredictorBackend("mobile_sam", "mobile_sam", "samm-mobile-sam-embedding-data")
    weight = types.SimpleNamespace(id="mobile_vit_t", model_type="vit_b", backend="mobile_sam")
    backend.prepare(weight, root / "checkpoints" / "vit_b_medicosam.pt", "cpu")
    assert type(backend.models[weight.id].image_encoder).__name__ == "ImageEncoderViT"
    assert _accel_lines(capsys) == []


# --- full size: the tool's own predictor gives plain SamPredictor's embedding -----------------


@pytest.fixture(scope="module")
def ct_slice() -> np.ndarray:
    ct = phantom.make_phantom()
    gray = phantom.window(ct.volume[ct.middle], *phantom.WINDOWS["soft_tissue"])
    return np.stack([gray] * 3, axis=-1)


@pytest.fixture(scope="module")
def plain_embedding(ct_slice, vit_b_state) -> torch.Tensor:
    from segment_anything import SamPredictor, build_sam_vit_b

    sam = build_sam_vit_b()
    sam.load_state_dict(vit_b_state)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(ct_slice)
    return predictor.features


@needs_openvino
@pytest.mark.slow
def test_napari_sam_openvino_embedding_equals_plain(tmp_path, run_tool, ct_slice, plain_embedding):
    _, predictor = run_tool("N3", copy_fixture("napari_sam/N3", tmp_path))
    predictor.set_image(ct_slice)
    assert (predictor.features - plain_embedding).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_slicer_sdpa_embedding_equals_plain(tmp_path, run_tool, ct_slice, plain_embedding, no_openvino):
    _, predictor = run_tool("W2", copy_fixture("slicer_sws/W2", tmp_path))
    predictor.set_image(ct_slice)
    assert (predictor.features - plain_embedding).abs().max().item() <= 1e-4


# --- the command line ---------------------------------------------------------------------------


def test_cli_accelerate_status_no_accelerate_unpatch(tmp_path, checkpoints):
    root = copy_fixture("slicer_sws/W2", tmp_path)
    before = snapshot(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = Path("..") / root.name
    first = kit_cli("patch", "slicer-segment-with-sam", "--path", rel, "--checkpoint", checkpoints["plain"], "--accelerate",
                    cwd=elsewhere, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "changed SegmentWithSAM/_medico_sam_accel/__init__.py" in first.stdout
    again = kit_cli("patch", "slicer-segment-with-sam", "--path", rel, cwd=elsewhere, home=tmp_path)
    assert again.returncode == 0 and "already patched" in again.stdout
    st = kit_cli("status", "slicer-segment-with-sam", "--path", root, "--json", cwd=tmp_path, home=tmp_path)
    assert accelerate.FEATURE in json.loads(st.stdout)["features"]
    text = kit_cli("status", "slicer-segment-with-sam", "--path", root, cwd=tmp_path, home=tmp_path).stdout
    assert f"  feature: {accelerate.FEATURE}" in text

    off = kit_cli("patch", "slicer-segment-with-sam", "--path", rel, "--no-accelerate", "--json", cwd=elsewhere, home=tmp_path)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["changed"] == ["SegmentWithSAM/SegmentWithSAM.py", "SegmentWithSAM/_medico_sam_accel/__init__.py"]
    assert not (root / "SegmentWithSAM/_medico_sam_accel").exists()
    assert kit_cli("unpatch", "slicer-segment-with-sam", "--path", rel, cwd=elsewhere, home=tmp_path).returncode == 0
    assert snapshot(root) == before


@pytest.mark.parametrize("tool", ["micro-sam", "isat-sam", "anylabeling"])
def test_cli_refuses_accelerate_for_tools_without_a_model(tool, tmp_path):
    proc = kit_cli("patch", tool, "--path", tmp_path, "--accelerate", cwd=tmp_path, home=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"medico-adapters: error: --accelerate: {tool} has no SAM model of its own for the kit to "
                           "accelerate; it works for napari-sam, napari-segment-anything, samm, slicer-segment-with-sam\n")
