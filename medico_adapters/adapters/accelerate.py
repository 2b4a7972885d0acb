"""``patch TOOL --accelerate``: the tool's own SAM-1 model gets the kit's faster, exact image encoder.

The kit places ``medico_adapters/accel/medico_sam_accel.py`` unchanged in the tool's tree, named
``_medico_sam_accel``, beside the file that builds the model, so the tool never imports the kit
(Slicer's Python does not have it). ``AccelerateModel`` then calls its ``accelerate`` on the model
instance right after the tool moved it to its device. The call sits in a ``try``: if the module is
missing or anything in it fails, the tool prints one line and runs as before. ``accelerate`` itself
keeps the embedding within float rounding of the original (OpenVINO f32 where it is installed and
the model is on the CPU, else SDPA attention on that instance), so the tool's masks stay what they
were. Turning the option off (``--no-accelerate``) or ``unpatch`` removes the call and the module.

Where the module goes, and how the tool imports it:

* inside a package (napari-sam, napari-segment-anything, samm-server's ``backends``): a sibling
  module, imported relatively (``from ._medico_sam_accel import ...``);
* samm's ``samm-python-terminal``: a script folder (``python sam_server.py`` puts it first on
  ``sys.path``), so a plain import;
* SlicerSegmentWithSAM: Slicer appends each scripted module's folder to ``sys.path`` when it loads
  the module (``ctkFactoryScriptedItem::load`` in ``Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx``),
  so a plain import works; but the same factory registers *every* ``.py`` file in that folder as a
  scripted module and executes it at start-up (``isValidFile``, ``setPythonSource``), so the module
  goes in a package folder of its own: ``_medico_sam_accel/__init__.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

#: the name the accelerator is imported by inside every tool.
MODULE = "_medico_sam_accel"
#: what ``status`` lists while the option is on.
FEATURE = "accelerated (the SAM model's image encoder: OpenVINO f32 or SDPA, same embedding)"

_SAM_MODELS_BUILDER = m.Subscript(
    value=m.Subscript(value=m.Name("SAM_MODELS")),
    slice=[m.SubscriptElement(slice=m.Index(value=m.SimpleString()))],
)


def source() -> bytes:
    """The accelerator module's bytes, exactly as the kit ships them."""
    return resources.files("medico_adapters.accel").joinpath("medico_sam_accel.py").read_bytes()


def module_file(folder: str, *, package: bool = False) -> dict[str, bytes]:
    """The file to add beside the code in ``folder`` (a relpath; "" for the tree root):
    ``_medico_sam_accel.py``, or ``_medico_sam_accel/__init__.py`` where a bare ``.py`` would be
    mistaken for something else (Slicer's scripted-module folders)."""
    rel = PurePosixPath(folder or ".") / (f"{MODULE}/__init__.py" if package else f"{MODULE}.py")
    return {rel.as_posix(): source()}


def features(options: dict) -> list[str]:
    return [FEATURE] if options.get("accelerate") else []


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


class AccelerateModel(VisitorBasedCodemodCommand):
    """Call the placed accelerator on each SAM-1 model the file builds, right after ``.to(device)``.

    A model counts as built by ``<name>[...](...)`` where the name is ``segment_anything``'s
    ``sam_model_registry`` (under whatever alias the file imports it; MobileSAM's registry is not
    it), ``<module>.sam_model_registry[...](...)``, or napari-sam's ``SAM_MODELS[...]["model"](...)``;
    the call goes after the first ``<target>.to(...)`` that follows in the same block.

    Before::

        self.sam_model = SAM_MODELS[model_type]["model"](self.get_weights_path(model_type))
        self.sam_model.to(self.device)
        self.sam_predictor = SamPredictor(self.sam_model)

    After::

        self.sam_model = SAM_MODELS[model_type]["model"](self.get_weights_path(model_type))
        self.sam_model.to(self.device)
        try:  # medico-adapters --accelerate: same embedding, faster encoder; a failure keeps the model as built
            from ._medico_sam_accel import accelerate as _medico_sam_accelerate
            _medico_sam_accelerate(self.sam_model)
        except Exception as _medico_sam_error:
            print(f"medico_sam_accel: not accelerated ({type(_medico_sam_error).__name__}: {_medico_sam_error})")
        self.sam_predictor = SamPredictor(self.sam_model)

    ``only_if`` (an expression) wraps the call in an ``if``: samm-server builds SAM and MobileSAM
    in one shared method, told apart by ``self.module_name``.
    """

    DESCRIPTION = "Run the tool's SAM model through the kit's accelerator right after it is built."
    #: what the inserted block holds, to recognise it (a subclass inserting another block names its own).
    MARK = MODULE
    DONE = "accelerated"

    def __init__(self, context, import_from: str, only_if: str | None = None) -> None:
        super().__init__(context)
        self.import_from = import_from
        self.only_if = only_if
        self.registries: set[str] = set()
        self.config = cst.PartialParserConfig()
        self.added = 0
        self.present = 0

    def visit_Module(self, node: cst.Module) -> None:
        self.config = node.config_for_parsing
        for imp in m.findall(node, m.ImportFrom(module=m.Name("segment_anything"))):
            if isinstance(imp.names, cst.ImportStar):
                self.registries.add("sam_model_registry")
                continue
            for alias in imp.names:
                if m.matches(alias.name, m.Name("sam_model_registry")):
                    self.registries.add(alias.asname.name.value if alias.asname else "sam_model_registry")

    def _builder(self, call: cst.BaseExpression) -> bool:
        if not isinstance(call, cst.Call) or not isinstance(call.func, cst.Subscript):
            return False
        table = call.func.value
        if isinstance(table, cst.Name):
            return table.value in self.registries
        if m.matches(table, m.Attribute(attr=m.Name("sam_model_registry"))):
            return True
        return m.matches(call.func, _SAM_MODELS_BUILDER) and call.func.slice[0].slice.value.evaluated_value == "model"

    def _built(self, stmt: cst.BaseStatement) -> str | None:
        """The target (as code) that ``stmt`` assigns a freshly built SAM model to."""
        if not m.matches(stmt, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target=m.Name() | m.Attribute())])])):
            return None
        assign = stmt.body[0]
        return _code(assign.targets[0].target) if self._builder(assign.value) else None

    @staticmethod
    def _moved(stmt: cst.BaseStatement) -> str | None:
        """The object ``stmt`` calls ``.to(...)`` on, as code (``model.to(device=d)``)."""
        if m.matches(stmt, m.SimpleStatementLine(body=[m.Expr(value=m.Call(func=m.Attribute(attr=m.Name("to"))))])):
            return _code(stmt.body[0].value.func.value)
        return None

    def _call(self, target: str) -> cst.BaseStatement:
        i = self.config.default_indent
        code = (
            "try:  # medico-adapters --accelerate: same embedding, faster encoder; a failure keeps the model as built\n"
            f"{i}from {self.import_from} import accelerate as _medico_sam_accelerate\n"
            f"{i}_medico_sam_accelerate({target})\n"
            "except Exception as _medico_sam_error:\n"
            f'{i}print(f"medico_sam_accel: not accelerated ({{type(_medico_sam_error).__name__}}: {{_medico_sam_error}})")\n'
        )
        if self.only_if:
            code = f"if {self.only_if}:\n" + "".join(i + line for line in code.splitlines(keepends=True))
        return cst.parse_statement(code, config=self.config)

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        out: list[cst.BaseStatement] = []
        built: set[str] = set()
        for at, stmt in enumerate(body):
            out.append(stmt)
            target = self._built(stmt)
            if target is not None:
                built.add(target)
                continue
            moved = self._moved(stmt)
            if moved not in built:
                continue
            built.discard(moved)
            following = body[at + 1] if at + 1 < len(body) else None
            if following is not None and self.MARK in _code(following):
                self.present += 1
            else:
                out.append(self._call(moved))
                self.added += 1
        return updated.with_changes(body=out) if len(out) != len(body) else updated

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.added:
            raise SkipFile(
                f"every SAM model built here is already {self.DONE}" if self.present
                else "no SAM model built (`m = sam_model_registry[...](...)`) and moved (`m.to(...)`) in one block"
            )
        return updated
