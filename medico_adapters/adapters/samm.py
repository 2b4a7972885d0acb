"""samm (bingogome/samm): the legacy ZeroMQ server + SammBase module, and samm-server >= 1.2.

Layouts:

* ``S2``/``S3``/``S4`` (2023-2024): ``SammModelMapper`` in both ``utl_sam_msg.py`` and
  ``UtilMsgFactory.py``, ``comboModelItems`` in ``WidgetSammBase.py``, a prefix dispatch in
  ``SammParameterNode.initNetwork``. S2 has vit_b/l/h, S3 adds MobileSAM, S4 adds MedSAM.
* ``samm-server`` (1.2+): ``MODEL_DEFINITIONS`` in ``service/samm_server/model_registry.py`` and the
  Slicer module's ``MODEL_IDS`` in ``samm/<module>/samm_lib/protocol.py``.

Options: ``--accelerate`` (accelerate.py) and ``--lazy-embeddings`` (embedding_store.py: the legacy
``CalculateEmbeddings`` and samm-server's ``embed``/``predict`` set each slice through the kit's
embedding store).

``S1`` (no mapper: ``initNetWork`` hard-wired to vit_h) is refused. Legacy model names are
``<slug>_<arch>`` and never start with a dispatch prefix, so they reach only the exact-name loader
the patch adds; samm-server model ids are the same names without the ``_<arch>`` suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

from medico_adapters.adapters import accelerate, embedding_store
from medico_adapters.adapters.base import (
    MEDICOSAM_FILENAME,
    Adapter,
    Layout,
    Step,
    check_display_name,
    dict_keys,
    first_string,
    module_assignment,
    parse,
    slug,
    string_literal,
)
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError, PatchError

SERVER_MSG = "samm-python-terminal/utl_sam_msg.py"
SLICER_MSG = "samm/SammBase/SammBaseLib/UtilMsgFactory.py"
WIDGET = "samm/SammBase/SammBaseLib/WidgetSammBase.py"
SERVER_UTIL = "samm-python-terminal/utl_sam_server.py"
SERVER_MAIN = "samm-python-terminal/sam_server.py"
LEGACY_FILES = (SERVER_MSG, SLICER_MSG, WIDGET, SERVER_UTIL, SERVER_MAIN)
WORKSPACE = "samm-python-terminal/samm-workspace"
REGISTRY = "service/samm_server/model_registry.py"
#: where samm-server's sam1 backend builds its model: its own module, or (1.2) the predictor base
#: class it shares with the MobileSAM backend, where ``self.module_name`` tells them apart.
SAM1_BACKENDS = {
    "service/samm_server/backends/sam1.py": None,
    "service/samm_server/backends/sam_predictor.py": 'self.module_name == "segment_anything"',
}
DEFAULT_NAME = "medicosam_vit_b"
DISPATCH_PREFIXES = ("vit_", "mobile_", "medsam_")
MODELS_TABLE = "MEDICO_ADAPTERS_MODELS"
LOADER = "initNetworkMedico"
ARCH_LABELS = {"vit_b": "ViT-B", "vit_l": "ViT-L", "vit_h": "ViT-H"}
_NOTHING = cst.MaybeSentinel.DEFAULT


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def append_elements(node: cst.List | cst.Tuple, new: list[cst.Element]) -> cst.List | cst.Tuple:
    """Append to a list/tuple literal, laid out like its existing elements."""
    elements = list(node.elements)
    if not elements:
        return node.with_changes(elements=[e.with_changes(comma=_NOTHING) for e in new])
    opening = node.lbracket.whitespace_after if isinstance(node, cst.List) else (node.lpar[0].whitespace_after if node.lpar else None)
    if len(elements) > 1 and isinstance(elements[-2].comma, cst.Comma):
        between = elements[-2].comma
    elif isinstance(opening, cst.ParenthesizedWhitespace):
        between = cst.Comma(whitespace_after=opening)
    else:
        between = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    trailing = elements[-1].comma
    elements[-1] = elements[-1].with_changes(comma=between)
    elements.extend(e.with_changes(comma=between) for e in new[:-1])
    elements.append(new[-1].with_changes(comma=trailing))
    return node.with_changes(elements=elements)


def sequence_strings(node: cst.BaseExpression) -> list[str]:
    if not isinstance(node, (cst.List, cst.Tuple)):
        return []
    return [e.value.evaluated_value for e in node.elements if isinstance(e.value, cst.SimpleString)]


def model_id(entry: Entry) -> str:
    """samm-server's model id: the legacy name without its ``_<arch>`` suffix."""
    suffix = f"_{entry.arch}"
    return entry.name[: -len(suffix)] if entry.name.endswith(suffix) else entry.name


def model_label(entry: Entry) -> str:
    return "MedicoSAM" if entry.default else model_id(entry)


# --- legacy: the two SammModelMapper copies and the Slicer combo ----------------------------


class AddMapperEntries(VisitorBasedCodemodCommand):
    """Give each entry the next free int in ``SammModelMapper`` and the matching ``"DICT"`` slot.

    Both mapper files get this same transform, so the server and the Slicer module stay in step.

    Before::

        SammModelMapper = {
            "vit_b" : 0,
            "DICT" : ["vit_b"]
        }

    After::

        SammModelMapper = {
            "vit_b" : 0,
            "medicosam_vit_b" : 1,
            "DICT" : ["vit_b", "medicosam_vit_b"]
        }
    """

    DESCRIPTION = "Add model names to samm's SammModelMapper (name -> int, plus the DICT list)."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.found = False

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, m.Assign(targets=[m.AssignTarget(target=m.Name("SammModelMapper"))], value=m.Dict())):
            return updated
        self.found = True
        elements = list(updated.value.elements)
        keys = dict_keys(updated.value)
        if "DICT" not in keys:
            raise SkipFile("SammModelMapper has no DICT list")
        at = keys.index("DICT")
        table = elements[at]
        if not isinstance(table.value, cst.List):
            raise SkipFile("SammModelMapper's DICT is not a list literal")
        ints = [int(e.value.value) for e in elements if isinstance(e, cst.DictElement) and isinstance(e.value, cst.Integer)]
        new = [e for e in self.entries if e.name not in keys]
        if not new:
            raise SkipFile("every entry is already in SammModelMapper")
        like = first_string(updated.value)
        template = elements[at - 1] if at > 0 else cst.DictElement(
            string_literal("x"), cst.Integer("0"), comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        )
        added = []
        for i, entry in enumerate(new):
            added.append(template.with_changes(key=string_literal(entry.name, like), value=cst.Integer(str(max(ints, default=-1) + 1 + i))))
        names = [cst.Element(string_literal(e.name, like)) for e in new]
        table = table.with_changes(value=append_elements(table.value, names))
        return updated.with_changes(value=updated.value.with_changes(elements=[*elements[:at], *added, table, *elements[at + 1:]]))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no SammModelMapper dict literal")
        return updated


class AddComboItems(VisitorBasedCodemodCommand):
    """Offer each entry in the SammBase model combo box.

    Before::

        comboModelItems = ['vit_b', 'vit_l', 'vit_h']

    After::

        comboModelItems = ['vit_b', 'vit_l', 'vit_h', 'medicosam_vit_b']
    """

    DESCRIPTION = "Add model names to samm's comboModelItems list."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, m.Assign(targets=[m.AssignTarget(target=m.Name("comboModelItems"))], value=m.List())):
            return updated
        present = sequence_strings(updated.value)
        like = first_string(updated.value)
        new = [cst.Element(string_literal(e.name, like)) for e in self.entries if e.name not in present]
        if not new:
            raise SkipFile("every entry is already in comboModelItems")
        return updated.with_changes(value=append_elements(updated.value, new))


# --- legacy: the server's SammParameterNode ---------------------------------------------------

_INIT_NETWORK = m.FunctionDef(name=m.Name("initNetwork"))
_CUDA_TEST = m.Call(func=m.Attribute(value=m.Attribute(value=m.Name("torch"), attr=m.Name("cuda")), attr=m.Name("is_available")))
_MPS_TEST = m.Call(
    func=m.Attribute(
        value=m.Attribute(value=m.Attribute(value=m.Name("torch"), attr=m.Name("backends")), attr=m.Name("mps")),
        attr=m.Name("is_available"),
    )
)


class UseNodeDevice(VisitorBasedCodemodCommand):
    """Move prompt features to the node's device, not a hard-wired GPU (S2's inference callback).

    Before::

        def sammProcessingCallBack_INFERENCE(msg):
            dataNode = SammParameterNode()
            dataNode.samPredictor[v].features = dataNode.features[v][n].to("cuda")

    After::

        def sammProcessingCallBack_INFERENCE(msg):
            dataNode = SammParameterNode()
            dataNode.samPredictor[v].features = dataNode.features[v][n].to(dataNode.device)
    """

    DESCRIPTION = "Replace .to(\"cuda\") with the parameter node's device in callbacks using dataNode."
    REQUIRED = False  # S3 and later already use dataNode.device

    def __init__(self, context) -> None:
        super().__init__(context)
        self.node: list[bool] = []

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        bound = any(p.name.value == "dataNode" for p in node.params.params) or bool(
            m.findall(node, m.AssignTarget(target=m.Name("dataNode")))
        )
        self.node.append(bound)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        self.node.pop()
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not (self.node and self.node[-1]):
            return updated
        if m.matches(updated, m.Call(func=m.Attribute(attr=m.Name("to")), args=[m.Arg(value=m.SimpleString())])) \
                and updated.args[0].value.evaluated_value == "cuda":
            device = cst.Attribute(value=cst.Name("dataNode"), attr=cst.Name("device"))
            return updated.with_changes(args=[updated.args[0].with_changes(value=device)])
        return updated


class AddCpuFallback(VisitorBasedCodemodCommand):
    """Chain initNetwork's device ``if``s as cuda -> mps -> cpu (upstream never sets a CPU device).

    Before::

        if torch.cuda.is_available():
            self.device = "cuda"
        if torch.backends.mps.is_available():
            self.device = "mps"

    After::

        if torch.cuda.is_available():
            self.device = "cuda"
        elif torch.backends.mps.is_available():
            self.device = "mps"
        else:
            self.device = "cpu"
    """

    DESCRIPTION = "Give samm's initNetwork an explicit CPU fallback after CUDA and MPS."

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if not m.matches(updated, _INIT_NETWORK):
            return updated
        body = list(updated.body.body)
        cuda = next((i for i, s in enumerate(body) if m.matches(s, m.If(test=_CUDA_TEST))), None)
        if cuda is None:
            raise SkipFile("initNetwork does not test torch.cuda.is_available()")
        if body[cuda].orelse is not None:
            raise SkipFile("initNetwork's device choice is already an if/elif/else chain")
        cpu = cst.Else(
            body=cst.IndentedBlock(
                [
                    cst.parse_statement('self.device = "cpu"\n'),
                    cst.parse_statement('print("[SAMM INFO] No CUDA or MPS detected. Running on CPU ...")\n'),
                ]
            )
        )
        nxt = body[cuda + 1] if cuda + 1 < len(body) else None
        if nxt is not None and m.matches(nxt, m.If(test=_MPS_TEST)) and nxt.orelse is None:
            chained = body[cuda].with_changes(orelse=nxt.with_changes(leading_lines=[], orelse=cpu))
            body[cuda: cuda + 2] = [chained]
        else:
            body[cuda] = body[cuda].with_changes(orelse=cpu)
        return updated.with_changes(body=updated.body.with_changes(body=body))


def _segment_anything_names(module: cst.Module) -> tuple[str, str]:
    """The names this module binds ``sam_model_registry`` and ``SamPredictor`` to (S3+ alias them)."""
    registry, predictor = "sam_model_registry", "SamPredictor"
    for stmt in module.body:
        if not m.matches(stmt, m.SimpleStatementLine(body=[m.ImportFrom(module=m.Name("segment_anything"))])):
            continue
        for alias in stmt.body[0].names:
            bound = alias.asname.name.value if alias.asname else alias.name.value
            if alias.name.value == "sam_model_registry":
                registry = bound
            elif alias.name.value == "SamPredictor":
                predictor = bound
    return registry, predictor


class AddMedicoLoader(VisitorBasedCodemodCommand):
    """Dispatch exact model names to a loader of their own, before samm's prefix dispatch.

    Before::

        class SammParameterNode:
            def initNetwork(self, model = "vit_b"):
                ...
                if model.startswith('vit_'):
                    self.initNetworkSam(model)

    After::

        MEDICO_ADAPTERS_MODELS = {"medicosam_vit_b": ("vit_b", "vit_b_medicosam.pt")}
        class SammParameterNode:
            def initNetwork(self, model = "vit_b"):
                ...
                if model in MEDICO_ADAPTERS_MODELS:
                    self.initNetworkMedico(model)
                    return
                if model.startswith('vit_'):
                    self.initNetworkSam(model)

            def initNetworkMedico(self, model):
                model_type, filename = MEDICO_ADAPTERS_MODELS[model]
                ...  # build SAM of model_type from samm-workspace/<filename>, fill R/G/Y
    """

    DESCRIPTION = "Load kit-placed models in samm's initNetwork by exact name, never by prefix."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.names: tuple[str, str] = ("sam_model_registry", "SamPredictor")
        self.dispatched = False

    def visit_Module(self, node: cst.Module) -> None:
        self.names = _segment_anything_names(node)
        table = module_assignment(node, MODELS_TABLE)
        if table is not None and _code(table.value) == _code(self._table().body[0].value) and m.findall(node, m.FunctionDef(name=m.Name(LOADER))):
            raise SkipFile("the exact-name loader already holds these entries")

    def _table(self) -> cst.SimpleStatementLine:
        pairs = ", ".join(f'"{e.name}": ("{e.arch}", "{e.filename}")' for e in self.entries)
        return cst.parse_statement(f"{MODELS_TABLE} = {{{pairs}}}\n")

    def _loader(self, indent: str) -> cst.FunctionDef:
        registry, predictor = self.names
        code = (
            f"def {LOADER}(self, model):\n"
            f'    """Models placed by medico-adapters: matched by exact name, built from their own arch."""\n'
            f"    model_type, filename = {MODELS_TABLE}[model]\n"
            f"    self.sam_checkpoint = os.path.join(self.workspace, filename)\n"
            f"    if not os.path.isfile(self.sam_checkpoint):\n"
            f'        raise Exception("[SAMM ERROR] SAM model file is not in " + self.sam_checkpoint)\n'
            f"    sam = {registry}[model_type](checkpoint=self.sam_checkpoint)\n"
            f"    sam.to(device=self.device)\n"
            f'    self.samPredictor["R"] = {predictor}(sam)\n'
            f'    self.samPredictor["G"] = {predictor}(sam)\n'
            f'    self.samPredictor["Y"] = {predictor}(sam)\n'
            f"    print(f'[SAMM INFO] Model initialzed to: \"{{model}}\"')\n"
        )
        module = cst.parse_module(code, config=cst.PartialParserConfig(default_indent=indent))
        return module.body[0].with_changes(leading_lines=[cst.EmptyLine(indent=False)])

    def _dispatch(self, param: str) -> cst.If:
        return cst.ensure_type(
            cst.parse_statement(f"if {param} in {MODELS_TABLE}:\n    self.{LOADER}({param})\n    return\n"), cst.If
        )

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if not m.matches(updated, _INIT_NETWORK):
            return updated
        params = [p.name.value for p in updated.params.params if p.name.value != "self"]
        if not params:
            return updated
        param = params[0]
        body = _without(list(updated.body.body), m.If(test=m.Comparison(comparisons=[m.ComparisonTarget(comparator=m.Name(MODELS_TABLE))])))
        prefix = m.If(test=m.Call(func=m.Attribute(value=m.Name(param), attr=m.Name("startswith"))))
        at = next((i for i, s in enumerate(body) if m.matches(s, prefix)), None)
        if at is None:
            return updated
        dispatch = self._dispatch(param).with_changes(leading_lines=body[at].leading_lines)
        body.insert(at, dispatch)
        body[at + 1] = body[at + 1].with_changes(leading_lines=[])
        self.dispatched = True
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        methods = [s for s in updated.body.body if isinstance(s, cst.FunctionDef)]
        if not any(f.name.value == "initNetwork" for f in methods):
            return updated
        body = [s for s in updated.body.body if not m.matches(s, m.FunctionDef(name=m.Name(LOADER)))]
        last = max(i for i, s in enumerate(body) if isinstance(s, cst.FunctionDef) and s.name.value.startswith("initNetwork"))
        indent = updated.body.indent if isinstance(updated.body.indent, str) else "    "
        body.insert(last + 1, self._loader(indent))
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.dispatched:
            raise SkipFile("no initNetwork with a model.startswith(...) dispatch")
        body = _without(list(updated.body), m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target=m.Name(MODELS_TABLE))])]))
        owner = next(
            i for i, s in enumerate(body)
            if isinstance(s, cst.ClassDef) and any(isinstance(f, cst.FunctionDef) and f.name.value == "initNetwork" for f in s.body.body)
        )
        body.insert(owner, self._table().with_changes(leading_lines=body[owner].leading_lines))
        body[owner + 1] = body[owner + 1].with_changes(leading_lines=[cst.EmptyLine(indent=False)] * 2)
        result = updated.with_changes(body=body)
        if result.deep_equals(original):
            raise SkipFile("the exact-name loader already holds these entries")
        return result


def _without(body: list, matcher) -> list:
    """``body`` less the statements matching ``matcher``, their blank lines kept for the next one."""
    out: list = []
    carry = None
    for stmt in body:
        if m.matches(stmt, matcher):
            carry = stmt.leading_lines
            continue
        if carry is not None:
            stmt = stmt.with_changes(leading_lines=carry)
            carry = None
        out.append(stmt)
    return out


class SetDefaultModel(VisitorBasedCodemodCommand):
    """Make ``initNetwork``'s default (loaded when the server starts) the given model.

    Before::

        def initNetwork(self, model = "vit_b"):

    After::

        def initNetwork(self, model = "medicosam_vit_b"):
    """

    DESCRIPTION = "Point samm's default model (loaded at server start) at MedicoSAM."

    def __init__(self, context, name: str) -> None:
        super().__init__(context)
        self.name = name

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if not m.matches(updated, _INIT_NETWORK):
            return updated
        params = [p for p in updated.params.params if p.name.value != "self"]
        if not params or not isinstance(params[0].default, cst.SimpleString):
            return updated
        default = params[0].default
        if default.evaluated_value == self.name:
            return updated
        new = params[0].with_changes(default=string_literal(self.name, default))
        return updated.with_changes(params=updated.params.with_changes(
            params=[new if p is params[0] else p for p in updated.params.params]
        ))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if updated.deep_equals(original):
            raise SkipFile("initNetwork's default model is already set")
        return updated


class SetStartupCheckpoint(VisitorBasedCodemodCommand):
    """Make ``sam_server.py``'s start-up check look for the default model's checkpoint.

    Before::

        self.sam_checkpoint = self.workspace + "/sam_vit_h_4b8939.pth"

    After::

        self.sam_checkpoint = self.workspace + "/vit_b_medicosam.pt"
    """

    DESCRIPTION = "Point samm's start-up checkpoint check at the MedicoSAM file."

    def __init__(self, context, filename: str) -> None:
        super().__init__(context)
        self.filename = filename
        self.found = False

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        target = m.AssignTarget(target=m.Attribute(value=m.Name("self"), attr=m.Name("sam_checkpoint")))
        if not m.matches(updated, m.Assign(targets=[target], value=m.BinaryOperation(operator=m.Add(), right=m.SimpleString()))):
            return updated
        self.found = True
        right = updated.value.right
        if right.evaluated_value == "/" + self.filename:
            return updated
        return updated.with_changes(value=updated.value.with_changes(right=string_literal("/" + self.filename, right)))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no `self.sam_checkpoint = self.workspace + \"/<file>\"` check")
        if updated.deep_equals(original):
            raise SkipFile("the start-up check already names this checkpoint")
        return updated


# --- samm-server ------------------------------------------------------------------------------


def _sam1_capabilities(tuple_node: cst.BaseExpression) -> cst.BaseExpression | None:
    """The capability argument of a sam1 weight already in MODEL_DEFINITIONS."""
    found: list[cst.BaseExpression] = []

    class _Finder(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            if found or not m.matches(node.func, m.Name("WeightDefinition")):
                return
            positional = [a.value for a in node.args if a.keyword is None]
            named = {a.keyword.value: a.value for a in node.args if a.keyword is not None}
            backend = named.get("backend", positional[3] if len(positional) > 3 else None)
            caps = named.get("capabilities", positional[5] if len(positional) > 5 else None)
            if isinstance(backend, cst.SimpleString) and backend.evaluated_value == "sam1" and caps is not None:
                found.append(caps)

    tuple_node.visit(_Finder())
    return found[0] if found else None


class AddModelDefinitions(VisitorBasedCodemodCommand):
    """Append one ``ModelDefinition`` per entry at the END of ``MODEL_DEFINITIONS``.

    Upstream tests index the tuple, so nothing is inserted before existing models.

    Before::

        MODEL_DEFINITIONS = (
            ModelDefinition("sam1", "SAM 1", (WeightDefinition("sam_vit_b", "ViT-B", "sam_vit_b_01ec64.pth", "sam1", "vit_b", SAM_PROMPTS),)),
        )

    After::

        MODEL_DEFINITIONS = (
            ModelDefinition("sam1", "SAM 1", (WeightDefinition("sam_vit_b", "ViT-B", "sam_vit_b_01ec64.pth", "sam1", "vit_b", SAM_PROMPTS),)),
            ModelDefinition("medicosam", "MedicoSAM", (WeightDefinition("medicosam_vit_b", "ViT-B", "vit_b_medicosam.pt", "sam1", "vit_b", SAM_PROMPTS),)),
        )
    """

    DESCRIPTION = "Register models with samm-server's MODEL_DEFINITIONS (sam1 backend)."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.found = False

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, m.Assign(targets=[m.AssignTarget(target=m.Name("MODEL_DEFINITIONS"))], value=m.Tuple() | m.List())):
            return updated
        self.found = True
        present = set()
        for element in updated.value.elements:
            if m.matches(element.value, m.Call(func=m.Name("ModelDefinition"), args=[m.Arg(value=m.SimpleString()), m.ZeroOrMore()])):
                present.add(element.value.args[0].value.evaluated_value)
        caps = _sam1_capabilities(updated.value)
        if caps is None:
            raise SkipFile("MODEL_DEFINITIONS has no sam1 weight to copy prompt capabilities from")
        like = first_string(updated.value)
        new = []
        for entry in self.entries:
            if model_id(entry) in present:
                continue
            s = lambda v: _code(string_literal(v, like))  # noqa: E731
            weight = (
                f"WeightDefinition({s(entry.name)}, {s(ARCH_LABELS.get(entry.arch, entry.arch))}, {s(entry.filename)}, "
                f"{s('sam1')}, {s(entry.arch)}, {_code(caps)})"
            )
            call = cst.parse_expression(f"ModelDefinition({s(model_id(entry))}, {s(model_label(entry))}, ({weight},))")
            new.append(cst.Element(call))
        if not new:
            raise SkipFile("every entry is already in MODEL_DEFINITIONS")
        return updated.with_changes(value=append_elements(updated.value, new))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no MODEL_DEFINITIONS tuple literal")
        return updated


class AddProtocolIds(VisitorBasedCodemodCommand):
    """Add each entry to the Slicer module's ``MODEL_IDS`` (and ``WEIGHT_IDS`` where it exists).

    Before::

        MODEL_IDS = ("sam1", "sam2")
        WEIGHT_IDS = ("sam_vit_b",)

    After::

        MODEL_IDS = ("sam1", "sam2", "medicosam")
        WEIGHT_IDS = ("sam_vit_b", "medicosam_vit_b")
    """

    DESCRIPTION = "Declare the new model (and weight) ids in the samm Slicer module's protocol."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.wanted = {
            "MODEL_IDS": [model_id(e) for e in entries],
            "WEIGHT_IDS": [e.name for e in entries],
        }
        self.found = False

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if len(updated.targets) != 1 or not isinstance(updated.targets[0].target, cst.Name):
            return updated
        name = updated.targets[0].target.value
        if name not in self.wanted or not isinstance(updated.value, (cst.Tuple, cst.List)):
            return updated
        self.found = self.found or name == "MODEL_IDS"
        present = sequence_strings(updated.value)
        like = first_string(updated.value)
        new = [cst.Element(string_literal(v, like)) for v in self.wanted[name] if v not in present]
        if not new:
            return updated
        return updated.with_changes(value=append_elements(updated.value, new))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no MODEL_IDS tuple or list literal")
        if updated.deep_equals(original):
            raise SkipFile("every entry is already declared")
        return updated


# --- the adapter ------------------------------------------------------------------------------


class SammAdapter(Adapter):
    tool = "samm"
    description = "samm (bingogome/samm): legacy server + SammBase (S2-S4) and samm-server >= 1.2"
    accelerates = True
    lazy_embeddings = True

    def _sam1_backend(self, tree: Tree) -> tuple[str, str | None]:
        """samm-server's file that builds the sam1 model, and the condition that selects sam1 there."""
        for rel, only_if in SAM1_BACKENDS.items():
            if tree.exists(rel) and b"sam_model_registry" in tree.original(rel):
                return rel, only_if
        raise LayoutError(f"{tree.root}: samm-server without a sam1 backend that builds a model ({', '.join(SAM1_BACKENDS)}); cannot --accelerate it")

    def _accelerated(self, tree: Tree, layout: Layout) -> tuple[Step, str]:
        """The accelerate step and the folder its module goes in."""
        if layout.name == "samm-server":
            rel, only_if = self._sam1_backend(tree)
            return Step(rel, accelerate.AccelerateModel, {"import_from": "." + accelerate.MODULE, "only_if": only_if}), rel.rsplit("/", 1)[0]
        # the server runs as a script (`python sam_server.py`): its folder is first on sys.path
        return Step(SERVER_UTIL, accelerate.AccelerateModel, {"import_from": accelerate.MODULE}), SERVER_UTIL.rsplit("/", 1)[0]

    def _stored(self, tree: Tree, layout: Layout, options: dict) -> tuple[list[Step], str]:
        """The --lazy-embeddings steps (after the accelerate step: the model is hashed before the
        accelerator may drop its weights) and the folder the store module goes in."""
        if layout.name == "samm-server":
            rel = self._sam1_backend(tree)[0]
            where, functions, import_from = rel, ("embed", "predict"), "." + embedding_store.MODULE
        else:
            where, functions, import_from = SERVER_UTIL, ("CalculateEmbeddings",), embedding_store.MODULE
        steps = [Step(where, embedding_store.StoreSetImage, {"functions": functions, "import_from": import_from})]
        if options.get("accelerate"):
            steps.append(Step(where, embedding_store.KeyModelIdentity, {"import_from": import_from}))
        return steps, where.rsplit("/", 1)[0]

    def _protocol(self, tree: Tree) -> str | None:
        for path in sorted(tree.root.glob("samm/*/samm_lib/protocol.py")):
            rel = path.relative_to(tree.root).as_posix()
            if module_assignment(parse(tree, rel), "MODEL_IDS") is not None:
                return rel
        return None

    def detect(self, tree: Tree) -> Layout:
        root = tree.root
        if tree.exists(REGISTRY):
            if module_assignment(parse(tree, REGISTRY), "MODEL_DEFINITIONS") is None:
                raise LayoutError(f"{tree.path(REGISTRY)}: has no MODEL_DEFINITIONS table (samm-server >= 1.2)")
            protocol = self._protocol(tree)
            if protocol is None:
                raise LayoutError(f"{root}: samm-server found but no samm/*/samm_lib/protocol.py declaring MODEL_IDS")
            return Layout("samm-server", "samm-server >= 1.2: MODEL_DEFINITIONS + Slicer MODEL_IDS", (REGISTRY, protocol))
        missing = [rel for rel in LEGACY_FILES if not tree.exists(rel)]
        if missing:
            raise LayoutError(
                f"{root}: not a samm checkout: no {REGISTRY} (samm-server) and no {missing[0]} (legacy layout)"
            )
        mappers = []
        for rel in (SERVER_MSG, SLICER_MSG):
            mapper = module_assignment(parse(tree, rel), "SammModelMapper")
            if mapper is None:
                raise LayoutError(f"{tree.path(rel)}: no SammModelMapper (layout S1, before model selection); update samm")
            if not isinstance(mapper.value, cst.Dict) or "DICT" not in dict_keys(mapper.value):
                raise LayoutError(f"{tree.path(rel)}: SammModelMapper is not a dict literal with a DICT list")
            mappers.append(dict_keys(mapper.value))
        if mappers[0] != mappers[1]:
            raise LayoutError(f"{tree.path(SLICER_MSG)}: SammModelMapper differs from {SERVER_MSG}'s; the two must match")
        keys = mappers[0]
        name = "S4" if "medsam_vit_b" in keys else "S3" if "mobile_vit_t" in keys else "S2"
        descriptions = {"S2": "SAM vit_b/l/h", "S3": "SAM + MobileSAM", "S4": "SAM + MobileSAM + MedSAM"}
        return Layout(name, f"legacy samm ({descriptions[name]}): SammModelMapper + initNetwork prefix dispatch", LEGACY_FILES)

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        accelerated = [self._accelerated(tree, layout)[0]] if options.get("accelerate") else []
        accelerated += self._stored(tree, layout, options)[0] if options.get("lazy_embeddings") else []
        if layout.name == "samm-server":
            registry, protocol = layout.files
            return [Step(registry, AddModelDefinitions, {"entries": entries}), Step(protocol, AddProtocolIds, {"entries": entries}), *accelerated]
        steps = [
            Step(SERVER_MSG, AddMapperEntries, {"entries": entries}),
            Step(SLICER_MSG, AddMapperEntries, {"entries": entries}),
            Step(WIDGET, AddComboItems, {"entries": entries}),
            # the CPU fallback comes first: the loader it serves reads self.device.
            Step(SERVER_UTIL, AddCpuFallback),
            Step(SERVER_UTIL, UseNodeDevice),
            Step(SERVER_UTIL, AddMedicoLoader, {"entries": entries}),
        ]
        if not options.get("keep_default"):
            default = next((e for e in entries if e.default), entries[0])
            steps += [
                Step(SERVER_UTIL, SetDefaultModel, {"name": default.name}),
                Step(SERVER_MAIN, SetStartupCheckpoint, {"filename": default.filename}),
            ]
        # last: the exact-name loader added above builds a model too, and is accelerated (and hashed) with the rest
        return steps + accelerated

    def added_files(self, tree: Tree, layout: Layout, options: dict) -> dict[str, bytes]:
        added = accelerate.module_file(self._accelerated(tree, layout)[1]) if options.get("accelerate") else {}
        if options.get("lazy_embeddings"):
            added.update(embedding_store.module_file(self._stored(tree, layout, options)[1]))
        return added

    def default_entry(self) -> Entry:
        return Entry(DEFAULT_NAME, "vit_b", MEDICOSAM_FILENAME, default=True)

    def custom_entry(self, name: str, arch: str) -> Entry:
        check_display_name(name)
        stem = slug(name)
        ident = stem if stem.endswith(f"_{arch}") else f"{stem}_{arch}"
        if ident.startswith(DISPATCH_PREFIXES):
            raise PatchError(f"model name {name!r} would become {ident!r}, which samm's prefix dispatch ({', '.join(DISPATCH_PREFIXES)}) claims; choose another --name")
        return Entry(ident, arch, f"{arch}_{stem}.pt")

    def validate_entry(self, tree: Tree, layout: Layout, entry: Entry) -> None:
        if entry.name.startswith(DISPATCH_PREFIXES):
            raise PatchError(f"model name {entry.name!r} starts with a prefix samm dispatches on; choose another --name")
        if layout.name == "samm-server":
            module = parse(tree, layout.files[0])
            taken = set(sequence_strings(module_assignment(parse(tree, layout.files[1]), "MODEL_IDS").value))
            taken |= set(_definition_ids(module_assignment(module, "MODEL_DEFINITIONS").value))
            if model_id(entry) in taken or entry.name in taken:
                raise PatchError(f"{tree.path(layout.files[0])}: samm-server already has a model or weight named {model_id(entry)!r}; choose another --name")
            return
        keys = dict_keys(module_assignment(parse(tree, SERVER_MSG), "SammModelMapper").value)
        if entry.name in keys:
            raise PatchError(f"{tree.path(SERVER_MSG)}: SammModelMapper already has {entry.name!r}; choose another --name")

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        if layout.name == "samm-server":
            folder = options.get("model_dir")
            return (Path(folder).expanduser() if folder else tree.root / "checkpoints") / entry.filename
        return tree.root / WORKSPACE / entry.filename

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        optional = accelerate.features(options) + embedding_store.features(options)
        if layout.name == "samm-server":
            return optional
        legacy = ["cpu fallback"] + ([] if options.get("keep_default") else ["MedicoSAM is the default model"])
        return legacy + optional


def _definition_ids(node: cst.BaseExpression) -> list[str]:
    """Every model and weight id in MODEL_DEFINITIONS (first string argument of each call)."""
    ids: list[str] = []

    class _Finder(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            if m.matches(call.func, m.Name("ModelDefinition") | m.Name("WeightDefinition")) and call.args:
                if isinstance(call.args[0].value, cst.SimpleString):
                    ids.append(call.args[0].value.evaluated_value)

    node.visit(_Finder())
    return ids


ADAPTER = SammAdapter()
