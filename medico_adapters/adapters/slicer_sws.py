"""SlicerSegmentWithSAM (mazurowski-lab/SlicerSegmentWithSAM): the 3D Slicer extension.

Layouts, both in ``SegmentWithSAM/SegmentWithSAM.py``:

* ``W2`` (SAM-2 era, 2024+): drop-down items added with ``self.ui.modelDropDown.addItem(...)`` and
  an exact-text ``changeModel`` if/elif chain; each entry gets an item and a SAM-1 style branch.
* ``W1`` (2023): one hard-wired model (``modelVersion``/``modelName``/``modelCheckpoint``) built at
  start-up; the patch points it at the entry and guards the "missing -> download vit_h under this
  name" branches so they can never put ViT-H weights in MedicoSAM's file.

Checkpoints go where the module computes them: relative to its own file, via
``resourcePath("UI") + "/../../../..."``, both in a source checkout and an installed extension.

Where it is installed: Slicer's Extension Manager unpacks the extension into
``Extensions-<rev>/SegmentWithSAM/``, the module at ``lib/Slicer-X.Y/qt-scripted-modules/SegmentWithSAM.py``
with its ``Resources/UI`` beside it (``slicerMacroBuildScriptedModule``), so the module's checkpoint
folder is ``lib/Slicer-X.Y/model_checkpoints/``. An update deletes ``Extensions-<rev>/SegmentWithSAM``
and unpacks the new release; so the tree root of such an install is the ``Extensions-<rev>`` folder,
whose ``.medico-adapters`` state outlives an update and can tell that it replaced the patched file.
Source checkouts (``SegmentWithSAM/SegmentWithSAM.py``) are their own root. ``--path`` may name any
level in between, or a Slicer install (see :mod:`medico_adapters.locations`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

from medico_adapters import locations
from medico_adapters.adapters import accelerate
from medico_adapters.adapters.base import (
    MEDICOSAM_FILENAME,
    Adapter,
    Layout,
    Step,
    check_display_name,
    parse,
    slug,
    string_literal,
)
from medico_adapters.engine import MANIFEST, STATE_DIR, Entry, Tree
from medico_adapters.errors import AmbiguousInstallError, LayoutError, PatchError

EXTENSION = "SegmentWithSAM"
MODULE = "SegmentWithSAM.py"
SOURCE_MODULE = "SegmentWithSAM/" + MODULE
#: the module inside the extension folder the Extension Manager unpacks.
INSTALLED_MODULE = "lib/Slicer-*/qt-scripted-modules/" + MODULE
#: where the module sits below each folder a user may name: a module folder (qt-scripted-modules,
#: an Additional module path), a source checkout, the levels of the extension folder, an
#: Extensions-<rev> folder. (A Slicer install is searched through its own folders and settings.)
MODULE_PATTERNS = (
    MODULE,
    SOURCE_MODULE,
    "qt-scripted-modules/" + MODULE,
    "Slicer-*/qt-scripted-modules/" + MODULE,
    INSTALLED_MODULE,
    f"{EXTENSION}/{INSTALLED_MODULE}",
)
DEFAULT_NAME = "MedicoSAM (ViT-B)"
GUARD_HINT = "run `medico-adapters patch slicer-segment-with-sam` to place this checkpoint"
DOWNLOADERS = ("downloadFileIntoCache", "urlretrieve", "copyfile", "download")

_ADD_ITEM = m.Call(
    func=m.Attribute(value=m.Attribute(attr=m.Name("modelDropDown")), attr=m.Name("addItem")),
    args=[m.Arg(value=m.SimpleString())],
)


def _self_attr(name: str) -> m.Attribute:
    return m.Attribute(value=m.Name("self"), attr=m.Name(name))


def _assign_to(name: str) -> m.Assign:
    return m.Assign(targets=[m.AssignTarget(target=_self_attr(name))])


def _contains(node: cst.CSTNode, matcher) -> bool:
    return bool(m.findall(node, matcher))


class AddDropDownItems(VisitorBasedCodemodCommand):
    """Add each entry to the model drop-down after the module's own items (W2).

    Before::

        self.ui.modelDropDown.addItem("SAM (ViT-H)")

    After::

        self.ui.modelDropDown.addItem("SAM (ViT-H)")
        self.ui.modelDropDown.addItem("MedicoSAM (ViT-B)")
    """

    DESCRIPTION = "Offer new models in SegmentWithSAM's model drop-down."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.present: set[str] = set()
        self.done = False

    def visit_Module(self, node: cst.Module) -> None:
        self.present = {c.args[0].value.evaluated_value for c in m.findall(node, _ADD_ITEM)}

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        last = max((i for i, s in enumerate(body) if m.matches(s, m.SimpleStatementLine(body=[m.Expr(value=_ADD_ITEM)]))), default=None)
        if last is None or self.done:
            return updated
        self.done = True
        template = body[last]
        call = template.body[0].value
        new = [
            template.with_changes(
                leading_lines=[],
                body=[template.body[0].with_changes(value=call.with_changes(args=[call.args[0].with_changes(value=string_literal(e.name, call.args[0].value))]))],
            )
            for e in self.entries
            if e.name not in self.present
        ]
        if not new:
            raise SkipFile("every entry is already in the model drop-down")
        body[last + 1: last + 1] = new
        return updated.with_changes(body=body)

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.done:
            raise SkipFile("no self.ui.modelDropDown.addItem(...) calls")
        return updated


class AddChangeModelBranches(VisitorBasedCodemodCommand):
    """Give ``changeModel`` a branch per entry, copied from its SAM (ViT-x) branches (W2).

    Before::

        elif modelName == "SAM (ViT-H)":
            self.modelVersion = "vit_h"
            self.checkpointName = "sam_vit_h_4b8939.pth"
            self.modelCheckpoint = self.checkpointFolder + self.checkpointName
            model = sam_model_registry[self.modelVersion](checkpoint=self.modelCheckpoint)
            model.to(device=self.device)
            self.sam = SamPredictor(model)

    After::

        elif modelName == "SAM (ViT-H)":
            ...
        elif modelName == "MedicoSAM (ViT-B)":
            self.modelVersion = "vit_b"
            self.checkpointName = "vit_b_medicosam.pt"
            self.modelCheckpoint = self.checkpointFolder + self.checkpointName
            model = sam_model_registry[self.modelVersion](checkpoint=self.modelCheckpoint)
            model.to(device=self.device)
            self.sam = SamPredictor(model)
    """

    DESCRIPTION = "Load new models in SegmentWithSAM's changeModel, like its SAM-1 branches."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.done = False

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if updated.name.value != "changeModel" or self.done:
            return updated
        params = [p.name.value for p in updated.params.params if p.name.value != "self"]
        if not params:
            return updated
        param = params[0]
        body = list(updated.body.body)
        for i, stmt in enumerate(body):
            if m.matches(stmt, m.If(test=m.Comparison(left=m.Name(param), comparisons=[m.ComparisonTarget(operator=m.Equal())]))):
                chain = self._extend(stmt, param)
                if chain is not None:
                    body[i] = chain
                    self.done = True
                    return updated.with_changes(body=updated.body.with_changes(body=body))
        return updated

    def _extend(self, head: cst.If, param: str) -> cst.If | None:
        branches: list[cst.If] = []
        node: cst.If | cst.Else | None = head
        while isinstance(node, cst.If):
            branches.append(node)
            node = node.orelse
        tail = node  # an `else:` or None
        names = [b.test.comparisons[0].comparator.evaluated_value for b in branches if isinstance(b.test, cst.Comparison) and isinstance(b.test.comparisons[0].comparator, cst.SimpleString)]
        template = next(
            (b for b in branches if _contains(b.body, m.Subscript(value=m.Name("sam_model_registry"))) and _contains(b.body, _assign_to("modelVersion"))),
            None,
        )
        if template is None:
            return None
        new = [e for e in self.entries if e.name not in names]
        if not new:
            raise SkipFile("changeModel already has a branch per entry")
        like = branches[-1].test.comparisons[0].comparator
        added = [
            cst.If(
                test=template.test.with_changes(comparisons=[template.test.comparisons[0].with_changes(comparator=string_literal(e.name, like))]),
                body=_retarget(template.body, e),
                leading_lines=template.leading_lines,
            )
            for e in new
        ]
        chain: cst.If | cst.Else | None = tail
        for branch in reversed([*branches, *added]):
            chain = branch.with_changes(orelse=chain)
        return chain

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.done:
            raise SkipFile("no changeModel if/elif chain with a sam_model_registry branch")
        return updated


def _retarget(block: cst.BaseSuite, entry: Entry) -> cst.BaseSuite:
    """A SAM-1 branch body with its model version and checkpoint name set to the entry's."""

    class _Retarget(cst.CSTTransformer):
        def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
            if not isinstance(updated.value, cst.SimpleString):
                return updated
            if m.matches(updated, _assign_to("modelVersion")):
                return updated.with_changes(value=string_literal(entry.arch, updated.value))
            if m.matches(updated, _assign_to("checkpointName")):
                return updated.with_changes(value=string_literal(entry.filename, updated.value))
            return updated

    return block.visit(_Retarget())


class PointModelAttributes(VisitorBasedCodemodCommand):
    """Point W1's hard-wired model at the entry.

    Before::

        self.modelVersion = "vit_h"
        self.modelName = "sam_vit_h_4b8939.pth"

    After::

        self.modelVersion = "vit_b"
        self.modelName = "vit_b_medicosam.pt"
    """

    DESCRIPTION = "Make SegmentWithSAM (W1) build the entry's model from the entry's file."

    def __init__(self, context, entry: Entry) -> None:
        super().__init__(context)
        self.values = {"modelVersion": entry.arch, "modelName": entry.filename}
        self.found: set[str] = set()

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        for attr, value in self.values.items():
            if m.matches(updated, _assign_to(attr)) and isinstance(updated.value, cst.SimpleString) and attr not in self.found:
                self.found.add(attr)
                return updated.with_changes(value=string_literal(value, updated.value))
        return updated

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if self.found != set(self.values):
            raise SkipFile("no self.modelVersion/self.modelName string assignments")
        if updated.deep_equals(original):
            raise SkipFile("the model attributes already point at the entry")
        return updated


class GuardCheckpointDownload(VisitorBasedCodemodCommand):
    """Stop W1's "checkpoint missing -> fetch vit_h under that name" branches replacing our file.

    Before::

        if not os.path.exists(self.modelCheckpoint):
            ...downloadFileIntoCache("https://.../sam_vit_h_4b8939.pth", ...)
            shutil.copyfile(downloadedFilePath, self.modelCheckpoint)

    After::

        if not os.path.exists(self.modelCheckpoint):
            if os.path.basename(self.modelCheckpoint) == "vit_b_medicosam.pt":
                raise FileNotFoundError(f"{self.modelCheckpoint} is missing: run `medico-adapters patch ...`")
            ...
    """

    DESCRIPTION = "Guard SegmentWithSAM's vit_h download so it never writes to MedicoSAM's file."

    def __init__(self, context, filename: str) -> None:
        super().__init__(context)
        self.filename = filename
        self.guarded = 0
        self.added = 0

    def _guard(self, path: str) -> cst.If:
        return cst.ensure_type(
            cst.parse_statement(
                f'if os.path.basename({path}) == "{self.filename}":\n'
                f'    raise FileNotFoundError(f"{{{path}}} is missing: {GUARD_HINT}")\n'
            ),
            cst.If,
        )

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.If:
        exists = m.UnaryOperation(operator=m.Not(), expression=m.Call(func=m.Attribute(attr=m.Name("exists")), args=[m.Arg()]))
        if not m.matches(updated.test, exists) or not isinstance(updated.body, cst.IndentedBlock):
            return updated
        calls = [c for c in m.findall(updated.body, m.Call()) if _called(c) in DOWNLOADERS]
        if not calls:
            return updated
        first = updated.body.body[0] if updated.body.body else None
        if first is not None and GUARD_HINT in cst.Module([]).code_for_node(first):
            self.guarded += 1
            return updated
        path = cst.Module([]).code_for_node(updated.test.expression.args[0].value)
        if path != "self.modelCheckpoint":
            return updated
        self.guarded += 1
        self.added += 1
        return updated.with_changes(body=updated.body.with_changes(body=[self._guard(path), *updated.body.body]))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.added:
            raise SkipFile("already guarded" if self.guarded else "no download branch for a missing self.modelCheckpoint")
        return updated


def _called(call: cst.Call) -> str:
    func = call.func
    return func.value if isinstance(func, cst.Name) else func.attr.value if isinstance(func, cst.Attribute) else ""


def _folder_expression(module: cst.Module, attr: str) -> list[cst.BaseExpression] | None:
    """The ``+`` operands of ``self.<attr> = ...`` in the widget (first assignment)."""
    for assign in m.findall(module, _assign_to(attr)):
        parts: list[cst.BaseExpression] = []
        node = assign.value
        while isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add):
            parts.insert(0, node.right)
            node = node.left
        parts.insert(0, node)
        return parts
    return None


class SlicerSwsAdapter(Adapter):
    tool = "slicer-segment-with-sam"
    description = "SlicerSegmentWithSAM (mazurowski-lab): W1 (2023, one model) and W2 (2024+, model drop-down)"
    accelerates = True

    def _module(self, tree: Tree) -> str:
        for pattern in (SOURCE_MODULE, MODULE, INSTALLED_MODULE, f"{EXTENSION}/{INSTALLED_MODULE}"):
            found = _module_files(tree.root, pattern)
            if len(found) > 1:
                raise LayoutError(f"{tree.root}: holds {len(found)} SegmentWithSAM modules ({', '.join(str(f) for f in found)}); pass --path with one of them")
            if found:
                return found[0].relative_to(tree.root).as_posix()
        raise LayoutError(
            f"{tree.root}: no {SOURCE_MODULE} (source checkout), {MODULE} (module folder) "
            f"or {EXTENSION}/{INSTALLED_MODULE} (Extension Manager install)"
        )

    def detect(self, tree: Tree) -> Layout:
        rel = self._module(tree)
        found = _layout_of(parse(tree, rel))
        if found is None:
            raise LayoutError(
                f"{tree.path(rel)}: found neither modelDropDown.addItem + changeModel (W2) nor self.modelVersion/self.modelName (W1)"
            )
        return Layout(*found, (rel,))

    # --- where it is installed --------------------------------------------------------------

    def installed(self, env: locations.Env) -> list[Path]:
        """Tree roots of the modules Slicer loads on this machine: Extension Manager installs and
        the module folders Slicer's settings add (a git clone among them), one per module."""
        files = [f for folder in locations.extension_folders(env) for f in _module_files(folder, f"{EXTENSION}/{INSTALLED_MODULE}")]
        files += [f for folder in locations.module_folders(env) for f in _module_files(folder, MODULE)]
        return _unique_roots(files)

    def locate(self, env: locations.Env | None = None) -> Path:
        env = env or locations.current_env()
        roots = self.installed(env)
        if not roots:
            raise PatchError(
                f"{self.tool}: found no SegmentWithSAM installed by Slicer's Extension Manager "
                f"(looked in {'; '.join(locations.searched(env))}); pass --path to your Slicer, its "
                "Extensions-<rev> folder or a source checkout"
            )
        if len(roots) > 1:
            raise AmbiguousInstallError(
                f"{self.tool}: found {len(roots)} SegmentWithSAM modules: {'; '.join(str(r) for r in roots)}; "
                "pass --path with the one Slicer loads"
            )
        return roots[0]

    def resolve(self, path: Path | None) -> Path:
        """Any level of an install, from a Slicer folder down to ``qt-scripted-modules`` or the
        module file, or a source checkout, to that module's tree root."""
        if path is None:
            return self.locate()
        path = Path(path)
        if path.is_file() and path.name == MODULE:
            files = [path]
        elif not path.is_dir():
            return path  # the caller says it is missing or not a folder
        else:
            files = [f for pattern in MODULE_PATTERNS for f in _module_files(path, pattern)]
            if not files:
                files = _slicer_install_modules(path)
        if not files:
            raise LayoutError(
                f"{path}: no SegmentWithSAM module here or below (looked for {', '.join(MODULE_PATTERNS)}, "
                "and in a Slicer install's Extensions-<rev> folders and module paths)"
            )
        roots = _unique_roots(files)
        if len(roots) > 1:
            raise AmbiguousInstallError(
                f"{path}: holds {len(roots)} SegmentWithSAM modules: {'; '.join(str(r) for r in roots)}; "
                "pass --path with the one Slicer loads"
            )
        return roots[0]

    def upstream_replaced(self, tree: Tree, rel: str, data: bytes) -> bool:
        """A new release from the Extension Manager: parseable, a known layout, and holding
        none of the kit's entries (names, checkpoint files) or its download guard."""
        try:
            module = cst.parse_module(data)
        except cst.ParserSyntaxError:
            return False
        if _layout_of(module) is None or GUARD_HINT.encode() in data:
            return False
        entries = (tree.manifest or {}).get("entries", [])
        ours = {e["name"] for e in entries} | {e["filename"] for e in entries}
        strings = {s.evaluated_value for s in m.findall(module, m.SimpleString())}
        return not (ours & strings)

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        rel = layout.files[0]
        # Slicer puts the module's folder on sys.path; last, so the branches added above get it too.
        accelerated = [Step(rel, accelerate.AccelerateModel, {"import_from": accelerate.MODULE})] if options.get("accelerate") else []
        if layout.name == "W2":
            return [Step(rel, AddDropDownItems, {"entries": entries}), Step(rel, AddChangeModelBranches, {"entries": entries}), *accelerated]
        entry = next((e for e in entries if e.default), entries[0])
        steps = [Step(rel, PointModelAttributes, {"entry": entry})]
        # the oldest W1 only prints where to put the file; there is no download to guard.
        if any(_called(c) in DOWNLOADERS for c in m.findall(parse(tree, rel), m.Call())):
            steps.append(Step(rel, GuardCheckpointDownload, {"filename": entry.filename}))
        return steps + accelerated

    def added_files(self, tree: Tree, layout: Layout, options: dict) -> dict[str, bytes]:
        """The accelerator, as a package beside the module: Slicer would load a bare ``.py`` there
        as a scripted module of its own (see accelerate.py)."""
        if not options.get("accelerate"):
            return {}
        return accelerate.module_file(PurePosixPath(layout.files[0]).parent.as_posix(), package=True)

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        return accelerate.features(options)

    def default_entry(self) -> Entry:
        return Entry(DEFAULT_NAME, "vit_b", MEDICOSAM_FILENAME, default=True)

    def custom_entry(self, name: str, arch: str) -> Entry:
        check_display_name(name)
        if "SAM-2" in name:
            raise PatchError(f"model name {name!r} contains 'SAM-2', which SegmentWithSAM treats as a SAM-2 model; choose another --name")
        return Entry(name, arch, f"{arch}_{slug(name)}.pt")

    def validate_entry(self, tree: Tree, layout: Layout, entry: Entry) -> None:
        if "SAM-2" in entry.name:
            raise PatchError(f"model name {entry.name!r} contains 'SAM-2'; choose another --name")
        if layout.name == "W1" and (tree.manifest or {}).get("entries"):
            raise PatchError(f"{tree.path(layout.files[0])}: this SegmentWithSAM (W1) loads a single model; it cannot offer {entry.name!r} as well")
        items = {c.args[0].value.evaluated_value for c in m.findall(parse(tree, layout.files[0]), _ADD_ITEM)}
        if entry.name in items:
            raise PatchError(f"{tree.path(layout.files[0])}: the model drop-down already has {entry.name!r}; choose another --name")

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        """Evaluate the module's own path expression against where its file is."""
        rel = layout.files[0]
        module_dir = tree.path(rel).parent
        attr = "checkpointFolder" if layout.name == "W2" else "modelCheckpoint"
        parts = _folder_expression(parse(tree, rel), attr) or []
        text = ""
        for part in parts:
            if m.matches(part, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("resourcePath")), args=[m.Arg(value=m.SimpleString())])):
                text += str(module_dir / "Resources" / part.args[0].value.evaluated_value)
            elif isinstance(part, cst.SimpleString):
                text += part.evaluated_value
            elif m.matches(part, _self_attr("modelName") | _self_attr("checkpointName")):
                text += entry.filename
            else:
                text = ""
                break
        if not text:
            default = "../model_checkpoints/" if layout.name == "W2" else "../"
            text = str(module_dir) + "/" + default
        if layout.name == "W2":
            text = text.rstrip("/") + "/" + entry.filename
        return Path(os.path.normpath(text))


def _layout_of(module: cst.Module) -> tuple[str, str] | None:
    has_change = _contains(module, m.FunctionDef(name=m.Name("changeModel")))
    if has_change and m.findall(module, _ADD_ITEM):
        return "W2", "SAM/SAM-2 model drop-down with changeModel (2024+)"
    if _contains(module, _assign_to("modelVersion")) and _contains(module, _assign_to("modelName")):
        return "W1", "one hard-wired SAM model (2023)"
    return None


def _module_files(folder: Path, pattern: str) -> list[Path]:
    if not any(ch in pattern for ch in "*?["):
        return [folder / pattern] if (folder / pattern).is_file() else []
    try:
        return sorted(p for p in folder.glob(pattern) if p.is_file())
    except OSError:
        return []


def _slicer_install_modules(home: Path) -> list[Path]:
    """SegmentWithSAM modules a Slicer install loads: its Extensions-<rev> folders and the
    module paths its revision settings name (for any OS's folder names)."""
    if (home / "Contents").is_dir():  # a macOS app bundle named by its .app folder
        home = home / "Contents"
    files = []
    for platform in ("linux", "macos"):
        for folder in locations.home_extension_folders(home, platform):
            files += _module_files(folder, f"{EXTENSION}/{INSTALLED_MODULE}")
        for settings in locations.home_settings(home, platform):
            for folder in settings.paths("Extensions/InstallPath"):
                files += _module_files(folder, f"{EXTENSION}/{INSTALLED_MODULE}")
            for folder in settings.paths("Modules/AdditionalPaths"):
                files += _module_files(folder, MODULE)
    return files


def tree_root(module_file: Path) -> Path:
    """The folder a module's patch state lives in: the Extension Manager's install folder
    (``Extensions-<rev>``, or a custom one, which holds ``SegmentWithSAM.s4ext``) for an
    installed extension, as an update replaces everything below it; the checkout for a source
    checkout; else the module's folder. A folder that already holds a manifest (an earlier patch
    made from a deeper ``--path``) keeps it."""
    folder = module_file.parent
    root = folder
    if folder.name == "qt-scripted-modules" and folder.parent.name.startswith("Slicer-") and folder.parent.parent.name == "lib":
        extension = folder.parents[2]
        installs = extension.parent
        managed = installs.name.startswith("Extensions-") or (installs / f"{extension.name}.s4ext").is_file()
        root = installs if managed else extension
    elif folder.name == EXTENSION:
        root = folder.parent
    level = folder
    while True:
        if (level / STATE_DIR / MANIFEST).is_file():
            return level
        if level == root or level.parent == level:
            return root
        level = level.parent


def _unique_roots(files: list[Path]) -> list[Path]:
    roots: dict[str, Path] = {}
    for f in files:
        root = tree_root(Path(os.path.abspath(f)))
        roots.setdefault(os.path.normcase(str(root)), root)
    return list(roots.values())


ADAPTER = SlicerSwsAdapter()
