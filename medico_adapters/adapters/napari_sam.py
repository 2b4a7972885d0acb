"""napari-sam (MIC-DKFZ/napari-sam): every PyPI release, 0.0.1 .. 0.4.13.

Layouts:

* ``N3`` (0.4.6+): ``SAM_MODELS`` dict literal in ``_widget.py``; one new entry is enough.
* ``N2`` (0.4.1 .. 0.4.5): ``SAM_WEIGHTS_URL`` in ``_widget.py``, models from ``sam_model_registry``.
* ``N1`` (0.0.1 .. 0.4.0): like N2 with the URL table and ``get_weights_path`` in ``utils.py``.

A new entry's URL uses the ``medico-adapters://`` scheme, so its cache file name is the one the
layout derives (``url.split("/")[-1]``) and a guard in ``get_weights_path`` refuses to "download" it:
the widget never fetches a file it cannot load, it tells the user to run the kit instead.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand
from libcst.codemod.visitors import AddImportsVisitor
from packaging.version import Version

from medico_adapters import pyenv
from medico_adapters.adapters import accelerate, lazy_embeddings
from medico_adapters.adapters.base import (
    LOCAL_SCHEME,
    MEDICOSAM_FILENAME,
    SCHEME,
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

PACKAGES = ("napari_sam", "napari_segment_anything")
CACHE_SUBDIR = ".cache/napari-segment-anything"


def guard_hint(tool: str) -> str:
    return f"run `medico-adapters patch {tool}` to place this checkpoint"


GUARD_HINT = guard_hint("napari-sam")

_SAM_MODELS = m.Assign(targets=[m.AssignTarget(target=m.Name("SAM_MODELS"))], value=m.Dict())
_SAM_WEIGHTS_URL = m.Assign(targets=[m.AssignTarget(target=m.Name("SAM_WEIGHTS_URL"))], value=m.Dict())
_LAYERS_CHANGE_CONNECT = m.Expr(
    value=m.Call(
        func=m.Attribute(
            value=m.Attribute(value=m.Attribute(attr=m.Name("events")), attr=m.Name("layers_change")),
            attr=m.Name("connect"),
        )
    )
)


def _url(entry: Entry) -> str:
    return LOCAL_SCHEME + entry.filename


class AddSamModelsEntry(VisitorBasedCodemodCommand):
    """Add each entry to the ``SAM_MODELS`` dict literal (N3).

    Before::

        SAM_MODELS = {
            "vit_b": {"filename": "sam_vit_b_01ec64.pth", "url": "https://...", "model": build_sam_vit_b},
        }

    After::

        SAM_MODELS = {
            "vit_b": {"filename": "sam_vit_b_01ec64.pth", "url": "https://...", "model": build_sam_vit_b},
            "MedicoSAM": {"filename": "vit_b_medicosam.pt", "url": "medico-adapters://local/vit_b_medicosam.pt", "model": build_sam_vit_b},
        }
    """

    DESCRIPTION = "Add model entries to napari-sam's SAM_MODELS table."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)
        self.found = False

    def _value(self, entry: Entry, like) -> cst.Dict:
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        fields = [
            ("filename", string_literal(entry.filename, like)),
            ("url", string_literal(_url(entry), like)),
            ("model", cst.Name(f"build_sam_{entry.arch}")),
        ]
        elements = [cst.DictElement(string_literal(k, like), v, comma=comma) for k, v in fields]
        elements[-1] = elements[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return cst.Dict(elements)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, _SAM_MODELS):
            return updated
        self.found = True
        existing = dict_keys(updated.value)
        like = first_string(updated.value)
        new = []
        for entry in self.entries:
            if entry.name in existing:
                continue
            new.append(cst.DictElement(string_literal(entry.name, like), self._value(entry, like)))
            AddImportsVisitor.add_needed_import(self.context, "segment_anything", f"build_sam_{entry.arch}")
        if not new:
            raise SkipFile("every entry is already in SAM_MODELS")
        return updated.with_changes(value=append_dict_elements(updated.value, new))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.found:
            raise SkipFile("no SAM_MODELS dict literal")
        return updated


class AddWeightsUrl(VisitorBasedCodemodCommand):
    """Add each entry's kit-local URL to the ``SAM_WEIGHTS_URL`` dict literal (N1, N2).

    Before::

        SAM_WEIGHTS_URL = {"vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"}

    After::

        SAM_WEIGHTS_URL = {"vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "MedicoSAM": "medico-adapters://local/vit_b_medicosam.pt"}
    """

    DESCRIPTION = "Add model URLs to napari-sam's SAM_WEIGHTS_URL table."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if not m.matches(updated, _SAM_WEIGHTS_URL):
            return updated
        existing = dict_keys(updated.value)
        like = first_string(updated.value)
        new = [
            cst.DictElement(string_literal(e.name, like), string_literal(_url(e), like))
            for e in self.entries
            if e.name not in existing
        ]
        if not new:
            raise SkipFile("every entry is already in SAM_WEIGHTS_URL")
        return updated.with_changes(value=append_dict_elements(updated.value, new))


class ExtendModelRegistry(VisitorBasedCodemodCommand):
    """Give the widget module its own ``sam_model_registry`` holding the new entries (N1, N2).

    The widget lists ``sam_model_registry.keys()`` in its model combo; rebinding the name in the
    widget module extends that list without touching segment_anything's registry for the process.

    Before::

        from segment_anything import SamPredictor, sam_model_registry

    After::

        from segment_anything import SamPredictor, sam_model_registry
        sam_model_registry = {**sam_model_registry, "MedicoSAM": sam_model_registry["vit_b"]}
    """

    DESCRIPTION = "Extend the widget module's sam_model_registry with new entries."

    def __init__(self, context, entries: Sequence[Entry]) -> None:
        super().__init__(context)
        self.entries = list(entries)

    def _statement(self, like: cst.SimpleString | None) -> cst.SimpleStatementLine:
        code = cst.Module([]).code_for_node
        pairs = ", ".join(
            f"{code(string_literal(e.name, like))}: sam_model_registry[{code(string_literal(e.arch, like))}]"
            for e in self.entries
        )
        return cst.parse_statement(f"sam_model_registry = {{**sam_model_registry, {pairs}}}\n")

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if module_assignment(updated, "sam_model_registry") is not None:
            raise SkipFile("sam_model_registry is already extended")
        body = list(updated.body)
        for i, stmt in enumerate(body):
            if m.matches(
                stmt,
                m.SimpleStatementLine(
                    body=[m.ImportFrom(module=m.Name("segment_anything"), names=[m.ZeroOrMore(), m.ImportAlias(name=m.Name("sam_model_registry"), asname=None), m.ZeroOrMore()])]
                ),
            ):
                body.insert(i + 1, self._statement(first_string(updated)))
                return updated.with_changes(body=body)
        raise SkipFile("no module-level `from segment_anything import sam_model_registry`")


class GuardLocalWeights(VisitorBasedCodemodCommand):
    """Refuse to download kit-placed checkpoints in ``get_weights_path``.

    Before::

        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            ...
            if not weight_path.exists():
                download(weight_url, weight_path)

    After::

        def get_weights_path(model_type):
            weight_url = SAM_WEIGHTS_URL[model_type]
            ...
            if not weight_path.exists():
                if str(SAM_WEIGHTS_URL[model_type]).startswith("medico-adapters://"):
                    raise FileNotFoundError(f"{weight_path} is missing: run `medico-adapters patch napari-sam` ...")
                download(weight_url, weight_path)
    """

    DESCRIPTION = "Make get_weights_path explain, not download, a missing kit-placed checkpoint."

    def __init__(self, context, table: str, tool: str = "napari-sam") -> None:
        super().__init__(context)
        self.table = table  # "SAM_MODELS" (N3) or "SAM_WEIGHTS_URL" (N1, N2)
        self.hint = guard_hint(tool)  # the forks share this transform; each names its own command
        self.param: str | None = None
        self.done = False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value == "get_weights_path":
            params = [p.name.value for p in node.params.params if p.name.value != "self"]
            self.param = params[0] if params else None

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value == "get_weights_path":
            self.param = None
        return updated

    def _guard(self, path_name: str) -> cst.If:
        url = f"{self.table}[{self.param}]" + ('["url"]' if self.table == "SAM_MODELS" else "")
        return cst.ensure_type(
            cst.parse_statement(
                f'if str({url}).startswith("{SCHEME}"):\n'
                f'    raise FileNotFoundError(f"{{{path_name}}} is missing: {self.hint}")\n'
            ),
            cst.If,
        )

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.If:
        if self.param is None:
            return updated
        test = updated.test
        if not m.matches(test, m.UnaryOperation(operator=m.Not(), expression=m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("exists"))))):
            return updated
        body = updated.body
        if not isinstance(body, cst.IndentedBlock):
            return updated
        first = body.body[0] if body.body else None
        if first is not None and self.hint in cst.Module([]).code_for_node(first):
            self.done = True
            return updated
        path_name = test.expression.func.value.value
        self.done = True
        return updated.with_changes(body=body.with_changes(body=[self._guard(path_name), *body.body]))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.done:
            raise SkipFile("no `if not <path>.exists():` download branch in get_weights_path")
        if updated.deep_equals(original):
            raise SkipFile("already guarded")
        return updated


class LayersChangeCompat(VisitorBasedCodemodCommand):
    """Replace ``viewer.events.layers_change``, removed in napari 0.6.2 (napari-sam issue #23).

    Before::

        self.viewer.events.layers_change.connect(self._on_layers_changed)

    After::

        for _layers_event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed, self.viewer.layers.events.moved):
            _layers_event.connect(self._on_layers_changed)
    """

    DESCRIPTION = "Connect to the layer list's own events instead of viewer.events.layers_change."

    def leave_SimpleStatementLine(self, original, updated):
        if len(updated.body) != 1 or not m.matches(updated.body[0], _LAYERS_CHANGE_CONNECT):
            return updated
        call = updated.body[0].value
        viewer = cst.Module([]).code_for_node(call.func.value.value.value)
        handler = cst.Module([]).code_for_node(call.args[0].value)
        events = ", ".join(f"{viewer}.layers.events.{name}" for name in ("inserted", "removed", "moved"))
        return cst.parse_statement(f"for _layers_event in ({events}):\n    _layers_event.connect({handler})\n")


class PointsBorderColorCompat(VisitorBasedCodemodCommand):
    """Pass ``border_color`` to ``add_points``: napari 0.6 removed its ``edge_color`` alias.

    Before::

        self.viewer.add_points(data=p, face_color=c, edge_color="white")

    After::

        self.viewer.add_points(data=p, face_color=c, border_color="white")
    """

    DESCRIPTION = "Rename add_points(edge_color=...) to border_color (napari >= 0.5 name)."
    REQUIRED = False  # early releases draw no points layer

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not m.matches(updated.func, m.Attribute(attr=m.Name("add_points"))):
            return updated
        args = [
            a.with_changes(keyword=cst.Name("border_color")) if m.matches(a.keyword, m.Name("edge_color")) else a
            for a in updated.args
        ]
        return updated.with_changes(args=args)


#: napari removed ``viewer.events.layers_change`` in napari PR #7971, merged after 0.6.1: every
#: 0.6.2 pre-release (0.6.2a0 .. 0.6.2rc1) already lacks it. So any 0.6.2 development build counts
#: as 0.6.2; both replacements work on every napari >= 0.5, so erring that way is harmless.
LAYERS_CHANGE_REMOVED = Version("0.6.2.dev0")


def needs_layers_compat(python: str | None = None) -> bool:
    """Whether the napari installed for ``python`` (default: the kit's own) needs the compat patch."""
    installed = pyenv.dist_version(python, "napari")
    return installed is not None and installed >= LAYERS_CHANGE_REMOVED


def napari_on_path_note(python: str | None, root: Path) -> str | None:
    """When no ``--python`` was given and the ``napari`` command runs another interpreter than
    the kit's, say which copy is being patched and how to choose the other one."""
    if python is not None:
        return None
    script = shutil.which("napari")
    theirs = pyenv.script_python(Path(script)) if script else None
    if theirs is None or pyenv.same_environment(theirs) is not False:
        return None
    return (
        f"the napari command on PATH ({script}) runs {theirs}, not this kit's Python ({sys.executable}); "
        f"this is the napari-sam installed for the kit's Python ({root}). "
        f"To use the one napari starts with, pass --python {theirs}"
    )


def lazy_on(options: dict) -> bool:
    """``--lazy-embeddings`` as the user set it; unset, it follows ``--accelerate`` (README: "Lazy
    embeddings" says why): the masks are the same, and a user who asked for speed gets the first
    mask in seconds instead of after the whole volume."""
    return bool(options.get("lazy_embeddings", options.get("accelerate", False)))


def widget_classes(module: cst.Module) -> set[str]:
    return {stmt.name.value for stmt in module.body if isinstance(stmt, cst.ClassDef)}


class NapariSamAdapter(Adapter):
    tool = "napari-sam"
    description = "napari-sam (MIC-DKFZ/napari-sam), PyPI releases 0.0.1 .. 0.4.13"
    packages = PACKAGES
    #: prepended to checkpoint file names; the forks share one cache folder (see napari_segment_anything.py).
    filename_prefix = ""
    accelerates = True
    lazy_embeddings = True

    def locate(self, python: str | None = None) -> Path:
        """The package installed for ``python`` (default: the kit's own interpreter)."""
        found = pyenv.package_dir(python, self.packages)
        if found is not None:
            return found
        if python is not None:
            raise PatchError(f"{python}: has no {self.tool} installed; `medico-adapters install {self.tool} --python {python}` installs it")
        script = shutil.which("napari")
        theirs = pyenv.script_python(Path(script)) if script else None
        hint = f"; the napari command on PATH runs {theirs}: pass --python {theirs}" if theirs and pyenv.same_environment(theirs) is False else ""
        raise PatchError(
            f"{self.tool} is not installed for this kit's Python ({sys.executable}){hint}; "
            f"or run `medico-adapters install {self.tool}`, or pass --path"
        )

    def _package(self, tree: Tree) -> str:
        root = tree.root
        if root.name in self.packages and (root / "_widget.py").is_file():
            return ""
        for base in ("src/", ""):
            for package in self.packages:
                if (root / base / package / "_widget.py").is_file():
                    return f"{base}{package}"
        looked = ", ".join(f"{p}/" for p in self.packages)
        raise LayoutError(f"{root}: no {self.packages[0]}/_widget.py (looked in ., src/, {looked})")

    def check_widget(self, tree: Tree, widget: str, module: cst.Module) -> None:
        """napari-sam 0.0.1 and royerlab's plugin share a package name; their widget classes differ."""
        classes = widget_classes(module)
        if "SAMWidget" in classes and "SamWidget" not in classes:
            raise LayoutError(f"{tree.path(widget)}: is royerlab's napari-segment-anything (class SAMWidget); use `medico-adapters patch napari-segment-anything`")

    def detect(self, tree: Tree) -> Layout:
        pkg = self._package(tree)
        join = (lambda name: f"{pkg}/{name}") if pkg else (lambda name: name)
        widget, utils = join("_widget.py"), join("utils.py")
        module = parse(tree, widget)
        self.check_widget(tree, widget, module)
        models = module_assignment(module, "SAM_MODELS")
        if models is not None:
            if not isinstance(models.value, cst.Dict):
                raise LayoutError(f"{tree.path(widget)}: SAM_MODELS is computed, not a dict literal; cannot add an entry safely")
            return Layout("N3", "SAM_MODELS table in _widget.py (0.4.6+)", (widget,), pkg)
        if module_assignment(module, "SAM_WEIGHTS_URL") is not None:
            self._require_dict(tree, widget, module)
            return Layout("N2", "SAM_WEIGHTS_URL in _widget.py, sam_model_registry models (0.4.1-0.4.5)", (widget,), pkg)
        if tree.exists(utils):
            utils_module = parse(tree, utils)
            if module_assignment(utils_module, "SAM_WEIGHTS_URL") is not None:
                self._require_dict(tree, utils, utils_module)
                return Layout("N1", "SAM_WEIGHTS_URL in utils.py, sam_model_registry models (0.0.1-0.4.0)", (widget, utils), pkg)
        raise LayoutError(f"{tree.path(widget)}: found neither SAM_MODELS nor SAM_WEIGHTS_URL (napari-sam layouts N1-N3)")

    @staticmethod
    def _require_dict(tree: Tree, rel: str, module: cst.Module) -> None:
        if not isinstance(module_assignment(module, "SAM_WEIGHTS_URL").value, cst.Dict):
            raise LayoutError(f"{tree.path(rel)}: SAM_WEIGHTS_URL is computed, not a dict literal")

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        widget = layout.files[0]
        compat = [Step(widget, LayersChangeCompat), Step(widget, PointsBorderColorCompat)] if options.get("napari_compat") else []
        if options.get("accelerate"):
            compat.append(Step(widget, accelerate.AccelerateModel, {"import_from": "." + accelerate.MODULE}))
        if self._lazy_placed(tree, layout, options):
            compat.append(Step(widget, lazy_embeddings.LazySliceLoop, {"import_from": "." + lazy_embeddings.MODULE}))
        if layout.name == "N3":
            return [
                Step(widget, AddSamModelsEntry, {"entries": entries}),
                Step(widget, GuardLocalWeights, {"table": "SAM_MODELS", "tool": self.tool}),
                *compat,
            ]
        urls = widget if layout.name == "N2" else layout.files[1]
        return [
            Step(urls, AddWeightsUrl, {"entries": entries}),
            Step(urls, GuardLocalWeights, {"table": "SAM_WEIGHTS_URL", "tool": self.tool}),
            Step(widget, ExtendModelRegistry, {"entries": entries}),
            *compat,
        ]

    def default_entry(self) -> Entry:
        return Entry("MedicoSAM", "vit_b", self.filename_prefix + MEDICOSAM_FILENAME, default=True)

    def custom_entry(self, name: str, arch: str) -> Entry:
        check_display_name(name)
        return Entry(name, arch, f"{self.filename_prefix}{arch}_{slug(name)}.pt")

    def validate_entry(self, tree: Tree, layout: Layout, entry: Entry) -> None:
        table = "SAM_MODELS" if layout.name == "N3" else "SAM_WEIGHTS_URL"
        rel = layout.files[0] if layout.name in ("N3", "N2") else layout.files[1]
        existing = dict_keys(module_assignment(parse(tree, rel), table).value)
        if entry.name in existing or entry.name in ("default", "vit_h", "vit_l", "vit_b"):
            raise PatchError(f"{tree.path(rel)}: {table} already has an entry named {entry.name!r}; choose another --name")

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        return Path.home() / CACHE_SUBDIR / entry.filename

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        compat = ["napari>=0.6.2 compat (layers_change, add_points border_color)"] if options.get("napari_compat") else []
        return compat + self.option_features(tree, layout, options)

    def option_features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        """What ``--accelerate`` and ``--lazy-embeddings`` add, as ``status`` lists it."""
        listed = accelerate.features(options)
        if self._lazy_placed(tree, layout, options):
            loop = lazy_embeddings.has_volume_loop(parse(tree, layout.files[0]))
            listed.append(lazy_embeddings.FEATURE if loop else lazy_embeddings.STORE_FEATURE)
        return listed

    def _lazy_placed(self, tree: Tree, layout: Layout, options: dict) -> bool:
        # asked for, it must find something to change; implied by --accelerate, only where there is
        return lazy_on(options) and ("lazy_embeddings" in options or lazy_embeddings.has_embedding(parse(tree, layout.files[0])))

    def added_files(self, tree: Tree, layout: Layout, options: dict) -> dict[str, bytes]:
        """The accelerator and the lazy embedding modules, siblings of ``_widget.py`` in the plugin's package."""
        added = accelerate.module_file(layout.package) if options.get("accelerate") else {}
        if self._lazy_placed(tree, layout, options):
            added.update(lazy_embeddings.module_files(layout.package))
        return added


ADAPTER = NapariSamAdapter()
