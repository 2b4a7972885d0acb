"""What every adapter provides, and the small libcst helpers the transforms share."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst.codemod import CodemodContext, SkipFile, VisitorBasedCodemodCommand

from medico_adapters import pyenv
from medico_adapters.checkpoint import Checkpoint, write_plain
from medico_adapters.engine import Entry, Placement, Tree
from medico_adapters.errors import LayoutError, PatchError

#: the URL scheme patched tools see for files the kit places; never downloadable.
SCHEME = "medico-adapters://"
LOCAL_SCHEME = SCHEME + "local/"
MEDICOSAM_FILENAME = "vit_b_medicosam.pt"


@dataclass(frozen=True)
class Layout:
    """A shape of a tool's source the adapter knows how to patch."""

    name: str
    description: str
    files: tuple[str, ...]  # relpaths (from the tree root) the layout's transforms touch
    package: str = ""  # relpath of the package folder, where it matters
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Step:
    """One transform applied to one file of a layout."""

    file: str
    transform: type[VisitorBasedCodemodCommand]
    kwargs: dict = field(default_factory=dict, hash=False)


class Adapter:
    """Base class: detect a layout, say which transforms it needs, and where checkpoints go."""

    tool: str = ""
    description: str = ""
    #: whether ``patch --accelerate`` can give this tool's SAM model the kit's encoder (see accelerate.py).
    accelerates: bool = False
    #: whether ``patch --lazy-embeddings`` applies: the tool's embeddings go through the kit's
    #: embedding store (and, where the tool embeds whole volumes up front, lazily per slice).
    lazy_embeddings: bool = False

    #: import names of the tool's package, for tools installed into a Python environment.
    packages: tuple[str, ...] = ()

    def locate(self) -> Path:
        """The installed copy: the first of ``packages`` the kit's own Python imports."""
        found = pyenv.package_dir(None, self.packages) if self.packages else None
        if found is None:
            if not self.packages:
                raise PatchError(f"{self.tool}: no installed copy to find; pass --path")
            raise PatchError(f"{self.tool} is not installed in this environment; run `medico-adapters install {self.tool}` or pass --path")
        return found

    def resolve(self, path: Path | None) -> Path:
        """The tree root to patch for ``--path`` (any level of an install the adapter knows),
        or the installed copy when there is none. Resolving a tree root returns it unchanged."""
        return self.locate() if path is None else Path(path)

    def upstream_replaced(self, tree: Tree, rel: str, data: bytes) -> bool:
        """Whether ``data``, found at ``rel`` instead of the patched or the original bytes, is a
        pristine upstream release of the file (the tool was updated over the patch), which
        ``patch`` may take as the new original. Only adapters that can tell say yes."""
        return False

    def detect(self, tree: Tree) -> Layout:
        raise NotImplementedError

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        raise NotImplementedError

    def default_entry(self) -> Entry:
        raise NotImplementedError

    def custom_entry(self, name: str, arch: str) -> Entry:
        raise NotImplementedError

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        raise NotImplementedError

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        return []

    def added_files(self, tree: Tree, layout: Layout, options: dict) -> dict[str, bytes]:
        """Files the patch adds to the tree (relpath -> bytes); ``unpatch`` deletes them again."""
        return {}

    def supported_archs(self, layout: Layout) -> tuple[str, ...]:
        return ("vit_b", "vit_l", "vit_h")

    # Where an entry's files go. Most tools read one plain state dict; AnyLabeling reads an ONNX
    # pair and a config, and registers models in a user file (see anylabeling.py).

    def entry_targets(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> list[Path]:
        return [self.checkpoint_path(tree, layout, entry, options)]

    def entry_placements(self, tree: Tree, layout: Layout, entry: Entry, options: dict, source: Callable[[], Checkpoint]) -> list[Placement]:
        """What to place for a new entry; ``source()`` loads (or downloads) its checkpoint lazily."""
        target = self.checkpoint_path(tree, layout, entry, options)
        return [Placement(entry, target, lambda tmp: write_plain(source(), target, tmp))]

    def registrations(self, tree: Tree, layout: Layout, entries: Sequence[Entry], previous: Sequence[Entry], options: dict) -> list[Placement]:
        """Files outside the tree that list the entries (rewritten whenever the entries change)."""
        return []

    def unpatch_rewrites(self, root: Path, manifest: dict) -> dict[str, bytes]:
        """Placed files to rewrite, not restore, at unpatch (the tool edited them since)."""
        return {}

    def placement_matching(self, target: Path, record: dict, manifest: dict) -> bool | None:
        """Whether a placed file still does its job, where a hash cannot tell (None: compare hashes)."""
        return None


def parse(tree: Tree, rel: str, source: bytes | None = None) -> cst.Module:
    data = tree.original(rel) if source is None else source
    try:
        return cst.parse_module(data)
    except cst.ParserSyntaxError as e:
        raise LayoutError(f"{tree.path(rel)}: cannot parse it as Python (line {e.raw_line})") from None


def run_codemod(transform: type[VisitorBasedCodemodCommand], source: bytes, **kwargs) -> bytes:
    """Apply one codemod to ``source``; a ``SkipFile`` leaves the bytes untouched."""
    module = cst.parse_module(source)
    command = transform(CodemodContext(), **kwargs)
    try:
        return command.transform_module(module).bytes
    except SkipFile:
        return source


def module_assignment(module: cst.Module, name: str) -> cst.Assign | None:
    """The module-level ``name = ...`` statement, if there is exactly one."""
    found = None
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and any(
                    isinstance(t.target, cst.Name) and t.target.value == name for t in small.targets
                ):
                    found = small
    return found


def dict_keys(node: cst.Dict) -> list[str]:
    keys = []
    for element in node.elements:
        if isinstance(element, cst.DictElement) and isinstance(element.key, cst.SimpleString):
            keys.append(element.key.evaluated_value)
    return keys


def string_literal(value: str, like: cst.SimpleString | None = None) -> cst.SimpleString:
    """A string literal for ``value`` quoted the way the surrounding code quotes."""
    quote = "'" if like is not None and like.quote == "'" else '"'
    escaped = value.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return cst.SimpleString(f"{quote}{escaped}{quote}")


def first_string(node: cst.CSTNode) -> cst.SimpleString | None:
    found: list[cst.SimpleString] = []

    class _Finder(cst.CSTVisitor):
        def visit_SimpleString(self, n: cst.SimpleString) -> None:
            if not found:
                found.append(n)

    node.visit(_Finder())
    return found[0] if found else None


def append_dict_elements(node: cst.Dict, new: list[cst.DictElement]) -> cst.Dict:
    """Append elements after the last one, laid out like the existing ones (one per line or inline)."""
    elements = list(node.elements)
    if not elements:
        return node.with_changes(elements=new)
    if len(elements) > 1 and isinstance(elements[-2].comma, cst.Comma):
        between = elements[-2].comma
    elif isinstance(node.lbrace.whitespace_after, cst.ParenthesizedWhitespace):
        between = cst.Comma(whitespace_after=node.lbrace.whitespace_after)
    else:
        between = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    trailing = elements[-1].comma
    elements[-1] = elements[-1].with_changes(comma=between)
    for element in new[:-1]:
        elements.append(element.with_changes(comma=between))
    elements.append(new[-1].with_changes(comma=trailing))
    return node.with_changes(elements=elements)


_SAFE = re.compile(r"[^A-Za-z0-9]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}


def slug(name: str) -> str:
    """A file-name stem safe on Windows, macOS and Linux."""
    stem = _SAFE.sub("_", name).strip("_").lower()[:48]
    if not stem:
        raise PatchError(f"model name {name!r} has no letters or digits to name a checkpoint file after")
    if stem in _WINDOWS_RESERVED:
        stem += "_model"
    return stem


def check_display_name(name: str) -> None:
    if not name or not name.strip():
        raise PatchError("model name is empty")
    if len(name) > 64:
        raise PatchError(f"model name {name!r} is longer than 64 characters")
    if any(not ch.isprintable() for ch in name):
        raise PatchError(f"model name {name!r} holds control characters")
