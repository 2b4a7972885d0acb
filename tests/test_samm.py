"""samm adapter: legacy S2-S4 and samm-server 1.2 transforms, end to end, and the patched loader run."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from helpers import check_noop, check_transformed, copy_fixture, snapshot, transformed

from medico_adapters.adapters import samm
from medico_adapters.adapters.samm import (
    ADAPTER,
    AddComboItems,
    AddCpuFallback,
    AddMapperEntries,
    AddMedicoLoader,
    AddModelDefinitions,
    AddProtocolIds,
    SetDefaultModel,
    SetStartupCheckpoint,
)
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError, PatchError
from medico_adapters.patching import patch, status, unpatch

MEDICO = ADAPTER.default_entry()
LUNG = ADAPTER.custom_entry("Lung Model", "vit_l")
BOTH = [MEDICO, LUNG]


# --- SammModelMapper ----------------------------------------------------------------------------

MAPPER = """\
SammModelMapper = {
    "vit_b" : 0,
    "vit_l" : 1,
    "DICT" : ["vit_b", "vit_l"]
}
"""


def test_mapper_gets_next_ints_and_dict_slots():
    check_transformed(
        AddMapperEntries,
        MAPPER,
        """\
        SammModelMapper = {
            "vit_b" : 0,
            "vit_l" : 1,
            "medicosam_vit_b" : 2,
            "lung_model_vit_l" : 3,
            "DICT" : ["vit_b", "vit_l", "medicosam_vit_b", "lung_model_vit_l"]
        }
        """,
        entries=BOTH,
    )


def test_mapper_untransformed_without_mapper():
    check_noop(AddMapperEntries, "SammMsgType = 1\n", entries=BOTH)


def test_mapper_already_patched():
    once = transformed(AddMapperEntries, MAPPER, entries=BOTH)
    check_noop(AddMapperEntries, once, entries=BOTH)


def test_mapper_adds_only_missing_entries():
    once = transformed(AddMapperEntries, MAPPER, entries=[MEDICO])
    twice = transformed(AddMapperEntries, once, entries=BOTH)
    assert '"lung_model_vit_l" : 3' in twice and twice.count("medicosam_vit_b") == 2


# --- comboModelItems ----------------------------------------------------------------------------

COMBO = """\
def setup(self):
    comboModelItems = ['vit_b', 'vit_l', 'vit_h']
"""


def test_combo_items_appended_in_own_quotes():
    check_transformed(
        AddComboItems,
        COMBO,
        """\
        def setup(self):
            comboModelItems = ['vit_b', 'vit_l', 'vit_h', 'medicosam_vit_b']
        """,
        entries=[MEDICO],
    )


def test_combo_untransformed_without_list():
    check_noop(AddComboItems, "items = ['vit_b']\n", entries=[MEDICO])


def test_combo_already_patched():
    check_noop(AddComboItems, transformed(AddComboItems, COMBO, entries=BOTH), entries=BOTH)


# --- initNetwork: device, loader, default -------------------------------------------------------

NODE = """\
from segment_anything import sam_model_registry as sam_model_registry_sam
from segment_anything import SamPredictor as SamPredictor_sam


class SammParameterNode:
    def initNetwork(self, model = "vit_b"):
        if torch.cuda.is_available():
            self.device = "cuda"
        if torch.backends.mps.is_available():
            self.device = "mps"

        if model.startswith('vit_'):
            self.initNetworkSam(model)
        if model.startswith('medsam_'):
            self.initNetworkMedSam(model)

    def initNetworkSam(self, model):
        pass
"""


def test_cpu_fallback_chains_devices():
    out = transformed(AddCpuFallback, NODE)
    assert (
        '        if torch.cuda.is_available():\n            self.device = "cuda"\n'
        '        elif torch.backends.mps.is_available():\n            self.device = "mps"\n'
        '        else:\n            self.device = "cpu"\n'
    ) in out


def test_cpu_fallback_untransformed_without_device_choice():
    check_noop(AddCpuFallback, "class N:\n    def initNetwork(self, model):\n        pass\n")


def test_cpu_fallback_already_patched():
    check_noop(AddCpuFallback, transformed(AddCpuFallback, NODE))


def test_loader_dispatches_exact_names_before_prefixes():
    out = transformed(AddMedicoLoader, NODE, entries=BOTH)
    table = 'MEDICO_ADAPTERS_MODELS = {"medicosam_vit_b": ("vit_b", "vit_b_medicosam.pt"), "lung_model_vit_l": ("vit_l", "vit_l_lung_model.pt")}'
    assert table in out
    dispatch = out.index("if model in MEDICO_ADAPTERS_MODELS:")
    assert dispatch < out.index("if model.startswith('vit_')")
    assert "self.initNetworkMedico(model)\n            return\n" in out
    loader = out[out.index("def initNetworkMedico"):]
    assert "sam_model_registry_sam[model_type]" in loader and "SamPredictor_sam(sam)" in loader
    assert "model[7:]" not in loader and 'self.samPredictor["Y"]' in loader


def test_loader_uses_unaliased_names_in_s2():
    out = transformed(AddMedicoLoader, NODE.replace(" as sam_model_registry_sam", "").replace(" as SamPredictor_sam", ""), entries=[MEDICO])
    assert "sam = sam_model_registry[model_type]" in out and "SamPredictor(sam)" in out


def test_loader_untransformed_without_prefix_dispatch():
    check_noop(AddMedicoLoader, "class N:\n    def initNetWork(self):\n        pass\n", entries=[MEDICO])


def test_loader_already_patched():
    check_noop(AddMedicoLoader, transformed(AddMedicoLoader, NODE, entries=BOTH), entries=BOTH)


def test_loader_rebuilt_for_new_entry_list():
    once = transformed(AddMedicoLoader, NODE, entries=[MEDICO])
    twice = transformed(AddMedicoLoader, once, entries=BOTH)
    assert twice == transformed(AddMedicoLoader, NODE, entries=BOTH)


def test_default_model_points_at_medicosam():
    out = transformed(SetDefaultModel, NODE, name="medicosam_vit_b")
    assert 'def initNetwork(self, model = "medicosam_vit_b"):' in out
    check_noop(SetDefaultModel, out, name="medicosam_vit_b")
    check_noop(SetDefaultModel, "def initNetwork(self, model):\n    pass\n", name="medicosam_vit_b")


STARTUP = """\
class SamServer:
    def __init__(self):
        self.sam_checkpoint = self.workspace + "/sam_vit_h_4b8939.pth"
"""


def test_startup_check_names_medicosam():
    after = STARTUP.replace("sam_vit_h_4b8939.pth", "vit_b_medicosam.pt")
    check_transformed(SetStartupCheckpoint, STARTUP, after, filename="vit_b_medicosam.pt")
    check_noop(SetStartupCheckpoint, after, filename="vit_b_medicosam.pt")
    check_noop(SetStartupCheckpoint, "x = 1\n", filename="vit_b_medicosam.pt")


# --- samm-server --------------------------------------------------------------------------------

REGISTRY = """\
MODEL_DEFINITIONS = (
    ModelDefinition(
        "sam1",
        "SAM 1",
        (WeightDefinition("sam_vit_b", "ViT-B", "sam_vit_b_01ec64.pth", "sam1", "vit_b", SAM_PROMPTS),),
    ),
    ModelDefinition("medsam", "MedSAM", (WeightDefinition("medsam_vit_b", "ViT-B", "m.pth", "medsam", "vit_b", MEDSAM_PROMPTS),)),
)
"""


def test_model_definition_appended_at_end():
    out = transformed(AddModelDefinitions, REGISTRY, entries=[MEDICO])
    new = 'ModelDefinition("medicosam", "MedicoSAM", (WeightDefinition("medicosam_vit_b", "ViT-B", "vit_b_medicosam.pt", "sam1", "vit_b", SAM_PROMPTS),)),\n)\n'
    assert out.endswith(new)


def test_model_definitions_untransformed_without_table():
    check_noop(AddModelDefinitions, "MODELS = ()\n", entries=[MEDICO])


def test_model_definitions_already_patched():
    check_noop(AddModelDefinitions, transformed(AddModelDefinitions, REGISTRY, entries=BOTH), entries=BOTH)


PROTOCOL = 'MODEL_IDS = ("sam1", "medsam")\nWEIGHT_IDS = (\n    "sam_vit_b",\n)\n'


def test_protocol_ids_added():
    check_transformed(
        AddProtocolIds,
        PROTOCOL,
        'MODEL_IDS = ("sam1", "medsam", "medicosam")\nWEIGHT_IDS = (\n    "sam_vit_b",\n    "medicosam_vit_b",\n)\n',
        entries=[MEDICO],
    )


def test_protocol_ids_list_without_weight_ids():
    check_transformed(AddProtocolIds, 'MODEL_IDS = ["sam1"]\n', 'MODEL_IDS = ["sam1", "medicosam"]\n', entries=[MEDICO])


def test_protocol_ids_untransformed_and_already_patched():
    check_noop(AddProtocolIds, "SLICE_VIEWS = ()\n", entries=[MEDICO])
    check_noop(AddProtocolIds, transformed(AddProtocolIds, PROTOCOL, entries=BOTH), entries=BOTH)


# --- detection and names ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["S2", "S3", "S4", "samm_server"])
def test_detect(layout, tmp_path):
    root = copy_fixture(f"samm/{layout}", tmp_path)
    assert ADAPTER.detect(Tree(root)).name == layout.replace("_", "-")


def test_s1_refused(tmp_path):
    root = copy_fixture("samm/S1", tmp_path)
    with pytest.raises(LayoutError, match="SammModelMapper"):
        ADAPTER.detect(Tree(root))


def test_not_samm_refused(tmp_path):
    with pytest.raises(LayoutError, match="model_registry.py.*utl_sam_msg.py"):
        ADAPTER.detect(Tree(tmp_path))


def test_mappers_out_of_step_refused(tmp_path):
    root = copy_fixture("samm/S4", tmp_path)
    msg = root / samm.SLICER_MSG
    msg.write_text(msg.read_text().replace('    "medsam_vit_b" : 4,\n', ""))
    with pytest.raises(LayoutError, match="differs"):
        ADAPTER.detect(Tree(root))


@pytest.mark.parametrize("name", ["vit_huge", "mobile thing", "MedSAM tuned"])
def test_custom_names_claimed_by_prefix_dispatch_refused(name):
    with pytest.raises(PatchError, match="prefix"):
        ADAPTER.custom_entry(name, "vit_b")


def test_custom_name_is_slug_with_arch():
    assert ADAPTER.custom_entry("Lung Model", "vit_l") == Entry("lung_model_vit_l", "vit_l", "vit_l_lung_model.pt")
    assert ADAPTER.custom_entry("liver_vit_b", "vit_b").name == "liver_vit_b"


def test_existing_name_refused(tmp_path):
    root = copy_fixture("samm/S4", tmp_path)
    tree = Tree(root)
    with pytest.raises(PatchError, match="prefix"):
        ADAPTER.validate_entry(tree, ADAPTER.detect(tree), Entry("medsam_vit_b", "vit_b", "x.pt"))
    root = copy_fixture("samm/samm_server", tmp_path)
    tree = Tree(root)
    with pytest.raises(PatchError, match="already"):
        ADAPTER.validate_entry(tree, ADAPTER.detect(tree), Entry("sam1_vit_b", "vit_b", "x.pt"))


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["S2", "S3", "S4"])
def test_legacy_patch_repatch_status_unpatch(layout, tmp_path, checkpoints):
    root = copy_fixture(f"samm/{layout}", tmp_path)
    before = snapshot(root)
    result = patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    assert sorted(result.changed) == sorted(samm.LEGACY_FILES)
    placed = root / "samm-python-terminal/samm-workspace/vit_b_medicosam.pt"
    assert result.placed == [str(placed)] and placed.is_file()
    server, slicer = (root / samm.SERVER_MSG).read_text(), (root / samm.SLICER_MSG).read_text()
    assert server == slicer and '"medicosam_vit_b" : ' in server
    again = patch(ADAPTER, root)
    assert again.changed == [] and again.placed == []
    report = status(ADAPTER, root)
    assert report["layout"] == layout and report["patched"] and report["checkpoints"][0]["matching"]
    unpatch(ADAPTER, root)
    assert snapshot(root) == before


def test_keep_default_leaves_startup_alone(tmp_path, checkpoints):
    root = copy_fixture("samm/S4", tmp_path)
    result = patch(ADAPTER, root, checkpoint=checkpoints["plain"], options={"keep_default": True})
    assert samm.SERVER_MAIN not in result.changed
    assert 'model = "vit_b"' in (root / samm.SERVER_UTIL).read_text()


def test_samm_server_patch_repatch_status_unpatch(tmp_path, checkpoints):
    root = copy_fixture("samm/samm_server", tmp_path)
    before = snapshot(root)
    result = patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    assert result.placed == [str(root / "checkpoints/vit_b_medicosam.pt")]
    assert patch(ADAPTER, root).changed == []
    assert status(ADAPTER, root)["patched"]

    spec = importlib.util.spec_from_file_location("_samm_registry", root / samm.REGISTRY)
    registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registry)
    model, weight = registry.weight_definition("medicosam_vit_b")
    assert registry.MODEL_DEFINITIONS[-1] is model and model.id == "medicosam"
    assert (weight.checkpoint, weight.backend, weight.model_type) == ("vit_b_medicosam.pt", "sam1", "vit_b")
    assert weight.capabilities == registry.MODEL_DEFINITIONS[0].weights[0].capabilities
    assert len(registry.MODEL_DEFINITIONS[0].weights) == 3
    unpatch(ADAPTER, root)
    assert snapshot(root) == before


def test_samm_server_model_dir_option(tmp_path, checkpoints):
    root = copy_fixture("samm/samm_server", tmp_path)
    result = patch(ADAPTER, root, checkpoint=checkpoints["plain"], options={"model_dir": str(tmp_path / "models")})
    assert result.placed == [str(tmp_path / "models/vit_b_medicosam.pt")]


# --- the patched server really loads the weights ------------------------------------------------


def _stand_ins(monkeypatch) -> None:
    """zmq/cv2/mobile_sam are imported at module level but unused by model loading."""
    for name in ("zmq", "cv2", "mobile_sam"):
        stub = types.ModuleType(name)
        stub.sam_model_registry, stub.SamPredictor = {}, object
        monkeypatch.setitem(sys.modules, name, stub)
    for name in ("utl_sam_msg", "utl_sam_server"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("layout", ["S2", "S4"])
def test_patched_server_loads_medicosam_on_cpu(layout, tmp_path, checkpoints, vit_b_state, monkeypatch):
    root = copy_fixture(f"samm/{layout}", tmp_path)
    patch(ADAPTER, root, checkpoint=checkpoints["plain"])
    _stand_ins(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.syspath_prepend(str(root / "samm-python-terminal"))
    server = importlib.import_module("utl_sam_server")
    try:
        node = server.SammParameterNode()  # the default model is loaded on construction
        assert node.device == "cpu"
        loaded = node.samPredictor["R"].model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in vit_b_state.items())
        assert node.samPredictor["G"].model is node.samPredictor["Y"].model
        node.samPredictor = {"R": None, "G": None, "Y": None}
        node.initNetwork("medicosam_vit_b")
        assert node.samPredictor["Y"] is not None
    finally:
        sys.modules.pop("utl_sam_server", None)
        sys.modules.pop("utl_sam_msg", None)


# --- S2's hard-wired .to("cuda") in the inference callback ------------------------------------


def test_inference_features_follow_the_node_device():
    from medico_adapters.adapters.samm import UseNodeDevice

    check_transformed(
        UseNodeDevice,
        """\
        def sammProcessingCallBack_INFERENCE(msg):
            dataNode = SammParameterNode()
            dataNode.samPredictor["R"].features = dataNode.features["R"][0].to("cuda")
        """,
        """\
        def sammProcessingCallBack_INFERENCE(msg):
            dataNode = SammParameterNode()
            dataNode.samPredictor["R"].features = dataNode.features["R"][0].to(dataNode.device)
        """,
    )


def test_untransformed_cuda_outside_node_callbacks():
    from medico_adapters.adapters.samm import UseNodeDevice

    check_noop(UseNodeDevice, 'def warm(x):\n    return x.to("cuda")\n')
    check_noop(UseNodeDevice, "def f(msg):\n    dataNode = SammParameterNode()\n    return dataNode.features.to(dataNode.device)\n")
