"""ISAT-SAM (yatengLG/ISAT_with_segment_anything; PyPI ``isat-sam``), layout ``I1`` (1.5.x).

ISAT picks the model builder from the checkpoint's *path*: ``SegAny.__init__`` in
``segment_any/segment_any.py`` tests ``"mobile_sam" in checkpoint``, ``"edge_sam"``,
``"sam_hq_vit"``, ``"sam_vit"`` ... in that order, and inside the ``sam_vit`` branch ``"vit_b"``,
``"vit_l"``, ``"vit_h"``. Its model manager lists the keys of ``model_dict`` in
``segment_any/model_zoo.py`` (file names in ``CHECKPOINT_PATH``, with download URLs and memory
figures) and loads ``CHECKPOINT_PATH/<key>``.

The patch adds a ``model_dict`` entry without a URL (marked ``"placed_by": "medico-adapters"``)
and makes the manager's ``download`` explain that the kit places that file instead of starting a
download with no URL. The checkpoint goes into ``CHECKPOINT_PATH`` as ``sam_vit_b_medicosam.pth``
(custom entries ``sam_<arch>_<name>.pth``). Which builder a name gets is read from the tree's own
``SegAny.__init__`` (the branch that imports the plain ``segment_anything``), and a name whose
full path would take another branch or architecture, or skip ISAT's bf16 cast, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

from medico_adapters.adapters.base import (
    Adapter,
    Layout,
    Step,
    append_dict_elements,
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

PACKAGE = "ISAT"
ZOO = "segment_any/model_zoo.py"
DIALOG = "widgets/model_manager_dialog.py"
DISPATCH = "segment_any/segment_any.py"
CONFIGS = "configs.py"
MEDICOSAM_FILENAME = "sam_vit_b_medicosam.pth"
PLACED_BY = "medico-adapters"
GUARD_HINT = "run `medico-adapters patch isat-sam` to place this checkpoint"
#: ISAT's own figures for its SAM checkpoints of each architecture (memory, bf16 memory, params).
ARCH_FIGURES = {"vit_b": ("3302M", "1760M", "375M"), "vit_l": ("5016M", "2634M", "1.3G"), "vit_h": ("6462M", "3378M", "2.6G")}
#: the module SegAny's plain-SAM branch imports its builders from.
PLAIN_SAM_MODULE = "segment_anything"

_MODEL_DICT = m.Assign(targets=[m.AssignTarget(target=m.Name("model_dict"))], value=m.Dict())


class AddModelZooEntry(VisitorBasedCodemodCommand):
    """Add each entry to ``model_dict``, with no URL and the kit named as what places the file.

    Before::

        model_dict = {
            "sam_vit_b_01ec64.pth": {"urls": ["https://..."], "memory": "3302M", ...},
        }

    After::

        model_dict = {
            "sam_vit_b_01ec64.pth": {"urls": ["https://..."], "memory": "3302M", ...},
            "sam_vit_b_medicosam.pth": {"urls": [], "memory": "3302M", "bf16_memory": "1760M", "params": "375M", "image_segment": True, "video_segment": False, "placed_by": "medico-adapters"},
        }
    """

    DESCRIPTION = "Add model entries to ISAT's model_dict."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.found = False

    @staticmethod
    def _value(entry: Entry, like) -> cst.Dict:
        memory, bf16_memory, params = ARCH_FIGURES[entry.arch]
        fields = [
            ("urls", cst.List([])),
            ("memory", string_literal(memory, like)),
            ("bf16_memory", string_literal(bf16_memory, like)),
            ("params", string_literal(params, like)),
            ("image_segment", cst.Name("True")),
            ("video_segment", cst.Name("False")),
            ("placed_by", string_literal(PLACED_BY, like)),
        ]
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        elements = [cst.DictElement(string_literal(k, like), v, comma=comma) for k, v in fields]
        elements[-1] = elements[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return cst.Dict(elements)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, _MODEL_DICT):
            return updated
        self.found = True
        existing = dict_keys(updated.value)
        like = first_string(updated.value)
        new = [
            cst.DictElement(string_literal(e.filename, like), self._value(e, like))
            for e in self.entries
            if e.filename not in existing
        ]
        if not new:
            raise SkipFile("every entry is already in model_dict")
        return updated.with_changes(value=append_dict_elements(updated.value, new))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no model_dict dict literal")
        return updated


def _imported_names(module: cst.Module) -> set[str]:
    names = set()
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
                    names |= {(a.asname.name.value if a.asname else a.name.value) for a in small.names if isinstance(a.name, cst.Name)}
    return names


class GuardPlacedDownload(VisitorBasedCodemodCommand):
    """Make the model manager explain a missing kit-placed checkpoint instead of downloading it.

    Before::

        class ModelManagerDialog(QtWidgets.QDialog, Ui_Dialog):
            def download(self, model_name):
                button = self.sender()
                ...

    After::

        class ModelManagerDialog(QtWidgets.QDialog, Ui_Dialog):
            def download(self, model_name):
                if model_dict.get(model_name, {}).get("placed_by") == "medico-adapters":
                    QtWidgets.QMessageBox.warning(self, "warning", f"{model_name} has no download: run `medico-adapters patch isat-sam` to place this checkpoint")
                    return
                button = self.sender()
                ...
    """

    DESCRIPTION = "Explain, not download, kit-placed checkpoints in ISAT's model manager."

    def __init__(self, context) -> None:
        super().__init__(context)
        self.in_dialog = False
        self.done = False
        self.importable = True

    def visit_Module(self, node: cst.Module) -> None:
        self.importable = {"model_dict", "QtWidgets"} <= _imported_names(node)

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        if node.name.value == "ModelManagerDialog":
            self.in_dialog = True

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if original.name.value == "ModelManagerDialog":
            self.in_dialog = False
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        params = [p.name.value for p in updated.params.params]
        if not (self.in_dialog and self.importable and updated.name.value == "download" and len(params) == 2):
            return updated
        body = updated.body
        if not isinstance(body, cst.IndentedBlock):
            return updated
        self.done = True
        if body.body and GUARD_HINT in cst.Module([]).code_for_node(body.body[0]):
            return updated
        name = params[1]
        guard = cst.parse_statement(
            f'if model_dict.get({name}, {{}}).get("placed_by") == "{PLACED_BY}":\n'
            f'    QtWidgets.QMessageBox.warning(self, "warning", f"{{{name}}} has no download: {GUARD_HINT}")\n'
            "    return\n"
        )
        return updated.with_changes(body=body.with_changes(body=[guard, *body.body]))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.done:
            raise SkipFile("no ModelManagerDialog.download(self, name) in a module importing model_dict and QtWidgets")
        if updated.deep_equals(original):
            raise SkipFile("already guarded")
        return updated


# --- reading SegAny's file-name dispatch --------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """SegAny's if/elif chain on substrings of the checkpoint path, read from the tree."""

    branches: tuple[tuple[str, str], ...]  # (substring, module its builders come from), in order
    archs: tuple[tuple[str, str], ...]  # plain-SAM branch: (substring, model_type), in order
    dtype_exempt: tuple[str, ...]  # substrings that skip the cast to ISAT's model dtype (bf16)

    def pick(self, path: str) -> tuple[str | None, str | None, str | None]:
        """(branch substring, its module, model_type) that ``SegAny(path)`` would choose."""
        for needle, module in self.branches:
            if needle in path:
                if module.rsplit(".", 1)[-1] != PLAIN_SAM_MODULE:
                    return needle, module, None
                arch = next((t for n, t in self.archs if n in path), None)
                return needle, module, arch
        return None, None, None


def _in_test(test: cst.BaseExpression, param: str, negated: bool = False) -> str | None:
    operator = m.NotIn() if negated else m.In()
    if m.matches(test, m.Comparison(left=m.SimpleString(), comparisons=[m.ComparisonTarget(operator=operator, comparator=m.Name(param))])):
        return test.left.evaluated_value
    return None


def _chain(first: cst.If, param: str) -> list[tuple[str, cst.BaseSuite]]:
    out = []
    node: cst.If | cst.Else | None = first
    while isinstance(node, cst.If):
        needle = _in_test(node.test, param)
        if needle is None:
            break
        out.append((needle, node.body))
        node = node.orelse
    return out


def _imports_from(block: cst.CSTNode) -> str:
    found: list[str] = []

    class _Finder(cst.CSTVisitor):
        def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
            if node.module is not None and not found:
                found.append(cst.Module([]).code_for_node(node.module))

    block.visit(_Finder())
    return found[0] if found else ""


def _model_type(block: cst.BaseSuite) -> str | None:
    for stmt in block.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if m.matches(small, m.Assign(targets=[m.AssignTarget(target=m.Attribute(value=m.Name("self"), attr=m.Name("model_type")))], value=m.SimpleString())):
                    return small.value.evaluated_value
    return None


def read_dispatch(module: cst.Module) -> Dispatch | None:
    init = None
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value == "SegAny":
            init = next((f for f in stmt.body.body if isinstance(f, cst.FunctionDef) and f.name.value == "__init__"), None)
    if init is None or len(init.params.params) < 2:
        return None
    param = init.params.params[1].name.value
    ifs = [s for s in init.body.body if isinstance(s, cst.If)]
    head = next((s for s in ifs if _in_test(s.test, param) is not None), None)
    if head is None:
        return None
    branches, archs = [], []
    for needle, block in _chain(head, param):
        source = _imports_from(block)
        branches.append((needle, source))
        if source.rsplit(".", 1)[-1] == PLAIN_SAM_MODULE and not archs:
            inner = next((s for s in block.body if isinstance(s, cst.If) and _in_test(s.test, param) is not None), None)
            if inner is not None:
                archs = [(n, _model_type(b) or n) for n, b in _chain(inner, param)]
    exempt = [n for s in ifs if (n := _in_test(s.test, param, negated=True)) is not None]
    if not archs:
        return None
    return Dispatch(tuple(branches), tuple(archs), tuple(exempt))


def _checkpoint_folder(module: cst.Module) -> str | None:
    """The folder name in ``CHECKPOINT_PATH = os.path.join(ISAT_ROOT, "<folder>")``."""
    assign = module_assignment(module, "CHECKPOINT_PATH")
    pattern = m.Call(func=m.Attribute(value=m.Attribute(value=m.Name("os"), attr=m.Name("path")), attr=m.Name("join")),
                     args=[m.Arg(value=m.Name("ISAT_ROOT")), m.Arg(value=m.SimpleString())])
    if assign is None or not m.matches(assign.value, pattern):
        return None
    return assign.value.args[1].value.evaluated_value


class IsatSamAdapter(Adapter):
    tool = "isat-sam"
    description = "ISAT-SAM (isat-sam on PyPI), 1.5.x"

    packages = (PACKAGE,)

    @staticmethod
    def _package(tree: Tree) -> str:
        root = tree.root
        if (root / DISPATCH).is_file() and (root / CONFIGS).is_file():
            return ""
        if (root / PACKAGE / DISPATCH).is_file():
            return PACKAGE
        raise LayoutError(f"{root}: no {PACKAGE}/{DISPATCH} (give the installed ISAT package folder or a checkout of ISAT_with_segment_anything)")

    def detect(self, tree: Tree) -> Layout:
        pkg = self._package(tree)
        join = (lambda rel: f"{pkg}/{rel}") if pkg else (lambda rel: rel)
        zoo, dialog, dispatch_rel, configs = join(ZOO), join(DIALOG), join(DISPATCH), join(CONFIGS)
        for rel in (zoo, dialog, configs):
            if not tree.exists(rel):
                raise LayoutError(f"{tree.path(rel)}: missing (ISAT-SAM layout I1 has model_zoo.py, model_manager_dialog.py and configs.py)")
        zoo_assign = module_assignment(parse(tree, zoo), "model_dict")
        if zoo_assign is None or not isinstance(zoo_assign.value, cst.Dict):
            raise LayoutError(f"{tree.path(zoo)}: no model_dict dict literal to add MedicoSAM to")
        dispatch = read_dispatch(parse(tree, dispatch_rel))
        if dispatch is None or not any(s.rsplit(".", 1)[-1] == PLAIN_SAM_MODULE for _, s in dispatch.branches):
            raise LayoutError(f"{tree.path(dispatch_rel)}: no SegAny file-name dispatch with a plain segment_anything branch")
        folder = _checkpoint_folder(parse(tree, configs))
        if folder is None:
            raise LayoutError(f"{tree.path(configs)}: CHECKPOINT_PATH is not os.path.join(ISAT_ROOT, \"<folder>\"); cannot tell where ISAT reads checkpoints")
        return Layout(
            "I1", "model_dict in model_zoo.py, SegAny dispatch on the checkpoint's file name (1.5.x)",
            (zoo, dialog), pkg, extra={"dispatch": dispatch, "checkpoint_folder": join(folder)},
        )

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        zoo, dialog = layout.files
        return [Step(zoo, AddModelZooEntry, {"entries": entries}), Step(dialog, GuardPlacedDownload)]

    def default_entry(self) -> Entry:
        return Entry("MedicoSAM", "vit_b", MEDICOSAM_FILENAME, default=True)

    def custom_entry(self, name: str, arch: str) -> Entry:
        check_display_name(name)
        return Entry(name, arch, f"sam_{arch}_{slug(name)}.pth")

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        return tree.root / layout.extra["checkpoint_folder"] / entry.filename

    def validate_entry(self, tree: Tree, layout: Layout, entry: Entry) -> None:
        zoo = layout.files[0]
        if entry.filename in dict_keys(module_assignment(parse(tree, zoo), "model_dict").value):
            raise PatchError(f"{tree.path(zoo)}: model_dict already has {entry.filename!r}; choose another --name")
        dispatch: Dispatch = layout.extra["dispatch"]
        # SegAny tests substrings of the whole path ISAT passes, which is absolute.
        path = str(self.checkpoint_path(tree, layout, entry, {}).resolve())
        needle, module, arch = dispatch.pick(path)
        if module is None or module.rsplit(".", 1)[-1] != PLAIN_SAM_MODULE:
            raise PatchError(f"{path}: ISAT would build this as {needle or 'nothing'!r} ({module or 'no branch'}), not plain SAM, because of its name or folder; choose another --name")
        if arch != entry.arch:
            raise PatchError(f"{path}: ISAT would build this {entry.arch} checkpoint as {arch} because the path contains {arch!r}; choose another --name")
        skipped = [n for n in dispatch.dtype_exempt if n in path]
        if skipped:
            raise PatchError(f"{path}: contains {skipped[0]!r}, so ISAT would skip its bf16 cast for this model; choose another --name")


ADAPTER = IsatSamAdapter()
