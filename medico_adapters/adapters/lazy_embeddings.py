"""``patch TOOL --lazy-embeddings``: the tool embeds what a prompt needs, through the embedding store.

napari-sam (from 0.3.0) embeds every slice of a 3D image in ``set_image``, before the first click
can be used and again after each contrast change::

    self.sam_features = []
    for index in tqdm(range(self.image_layer.data.shape[0]), desc="Creating SAM image embedding"):
        image_slice = ...the slice, as the tool normalises it...
        self.sam_predictor.set_image(image_slice)
        self.sam_features.append(self.sam_predictor.features)
        progress_bar.setValue(index + 1)

``LazySliceLoop`` turns the loop body into a function of the slice index and the list into the
kit's ``LazySlices`` (``medico_adapters/embeddings/lazy.py``), which the tool indexes as before:
each slice is embedded when a prompt first needs it, the rest in a background thread, all through
the embedding store. Where a tool embeds one image (``predictor.set_image(image)`` outside any
loop: napari-sam's 2D images, napari-segment-anything), the call goes through the store.

The kit places two files beside the widget, unchanged: ``_medico_lazy_embeddings.py`` (lazy.py)
and ``_medico_embedding_store.py`` (store.py), which it imports relatively. Every inserted import
sits in a ``try``; if the module is missing or broken, the tool prints one line and runs its own
code, kept verbatim in the ``else`` branch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

from medico_adapters.adapters import embedding_store
from medico_adapters.adapters.base import first_string, string_literal

#: the names the placed modules are imported by inside a tool.
MODULE = "_medico_lazy_embeddings"
STORE_MODULE = embedding_store.MODULE
#: what ``status`` lists while the option is on.
FEATURE = "lazy embeddings (each slice embedded when a prompt first needs it, the rest in the background; the embedding store)"
STORE_FEATURE = "stored embeddings (an image embedded before comes from the embedding store)"

_SET_IMAGE = m.SimpleStatementLine(body=[m.Expr(value=m.Call(func=m.Attribute(attr=m.Name("set_image")), args=[m.Arg(keyword=None, star="")]))])
_EMPTY_LIST = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(target=m.Name() | m.Attribute())], value=m.List(elements=[]))])
_CALL_STATEMENT = m.SimpleStatementLine(body=[m.Expr(value=m.Call())])
_LEAVES_FUNCTION = m.Return() | m.Yield() | m.Break() | m.Continue() | m.Await()


def sources() -> dict[str, bytes]:
    """The placed modules' bytes, exactly as the kit ships them (name -> bytes)."""
    lazy = resources.files("medico_adapters.embeddings").joinpath("lazy.py").read_bytes()
    return {MODULE: lazy, STORE_MODULE: embedding_store.source()}


def module_files(folder: str) -> dict[str, bytes]:
    """The files to add beside the code in ``folder`` (a relpath; "" for the tree root)."""
    return {(PurePosixPath(folder or ".") / f"{name}.py").as_posix(): data for name, data in sources().items()}


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


class _Names(cst.CSTVisitor):
    """Names a piece of code reads or binds (not attribute names, not keyword-argument names)."""

    def __init__(self) -> None:
        self.read: set[str] = set()
        self.bound: set[str] = set()

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        self._bind(node.target)
        return False

    def visit_AugAssign(self, node: cst.AugAssign) -> bool:
        self._bind(node.target)
        self.read |= {n.value for n in m.findall(node.target, m.Name())}
        node.value.visit(self)
        return False

    def visit_For(self, node: cst.For) -> None:
        self._bind(node.target)

    def _bind(self, target: cst.BaseExpression) -> None:
        if isinstance(target, cst.Name):
            self.bound.add(target.value)
        elif isinstance(target, (cst.Tuple, cst.List)):
            for element in target.elements:
                self._bind(element.value)
        else:  # a.b = ..., a[i] = ...: reads a
            target.visit(self)

    def visit_Name(self, node: cst.Name) -> None:
        self.read.add(node.value)


def _names(*nodes: cst.CSTNode) -> _Names:
    names = _Names()
    for node in nodes:
        node.visit(names)
    return names


def _range_count(iterable: cst.BaseExpression) -> cst.BaseExpression | None:
    """N in ``range(N)`` or in a wrapper's first argument (``tqdm(range(N), desc=...)``)."""
    call = iterable
    if m.matches(call, m.Call(func=m.Name() | m.Attribute(), args=[m.Arg(value=m.Call(func=m.Name("range"))), m.ZeroOrMore()])) \
            and not m.matches(call.func, m.Name("range")):
        call = call.args[0].value
    if m.matches(call, m.Call(func=m.Name("range"), args=[m.Arg(keyword=None, star="")])):
        return call.args[0].value
    return None


class _Loop:
    """The parts of a matched whole-volume loop (``_match`` says whether a pair of statements is one)."""

    def __init__(self, holder, loop, index, count, predictor, prep, image, after) -> None:
        self.holder, self.loop, self.index, self.count = holder, loop, index, count
        self.predictor, self.prep, self.image, self.after = predictor, prep, image, after


def _match(first: cst.BaseStatement, second: cst.BaseStatement) -> _Loop | None:
    """``L = []`` then ``for i in range(N): ...; P.set_image(E); L.append(P.features); <calls>``."""
    if not m.matches(first, _EMPTY_LIST) or not isinstance(second, cst.For) or second.orelse is not None \
            or second.asynchronous is not None or not isinstance(second.target, cst.Name):
        return None
    count = _range_count(second.iter)
    body = list(second.body.body) if isinstance(second.body, cst.IndentedBlock) else []
    holder = _code(first.body[0].targets[0].target)
    at = next((k for k, stmt in enumerate(body) if m.matches(stmt, _SET_IMAGE)), None)
    if count is None or at is None or at + 1 >= len(body):
        return None
    call = body[at].body[0].value
    predictor = _code(call.func.value)
    append = body[at + 1]
    if not m.matches(append, _CALL_STATEMENT) or _code(append.body[0].value).strip() != f"{holder}.append({predictor}.features)":
        return None
    prep, after = body[:at], body[at + 2:]
    if any(m.findall(stmt, _LEAVES_FUNCTION) for stmt in prep) or not all(m.matches(s, _CALL_STATEMENT) for s in after):
        return None
    return _Loop(holder, second, second.target.value, count, predictor, prep, call.args[0].value, after)


class LazySliceLoop(VisitorBasedCodemodCommand):
    """Replace a whole-volume embedding loop with ``LazySlices``; route one-image ``set_image`` calls
    through the embedding store. ``import_from`` names the placed module (``._medico_lazy_embeddings``).

    Before::

        self.sam_features = []
        for index in tqdm(range(self.image_layer.data.shape[0]), desc="Creating SAM image embedding"):
            image_slice = np.asarray(self.image_layer.data[index, ...])
            contrast_limits = self.image_layer.contrast_limits
            image_slice = normalize(image_slice, source_limits=contrast_limits, target_limits=(0, 255)).astype(np.uint8)
            self.sam_predictor.set_image(image_slice)
            self.sam_features.append(self.sam_predictor.features)
            progress_bar.setValue(index+1)
            progress_bar.deleteLater()

    After::

        try:  # medico-adapters --lazy-embeddings: each slice embedded when a prompt first needs it, the rest in the background, through the embedding store
            from ._medico_lazy_embeddings import LazySlices as _MedicoLazySlices
        except Exception as _medico_lazy_error:
            print(f"medico_lazy_embeddings: every slice embedded now ({type(_medico_lazy_error).__name__}: {_medico_lazy_error})")
            _MedicoLazySlices = None
        if _MedicoLazySlices is not None:
            contrast_limits = self.image_layer.contrast_limits
            def _medico_slice(index, contrast_limits=contrast_limits):
                image_slice = np.asarray(self.image_layer.data[index, ...])
                image_slice = normalize(image_slice, source_limits=contrast_limits, target_limits=(0, 255)).astype(np.uint8)
                return image_slice
            self.sam_features = _MedicoLazySlices(self.sam_predictor, _medico_slice, self.image_layer.data.shape[0], owner=self, attribute="sam_features")
            progress_bar.deleteLater()
        else:
            self.sam_features = []
            for index in ...:  # the tool's loop, unchanged
                ...

    What the loop body reads that does not change from one slice to the next (an assignment that
    uses neither the index nor anything the body assigns) is read once, in ``set_image``, as the
    eager loop reads it there; locals of ``set_image`` the body reads are bound as defaults. So a
    slice embedded later is the slice the eager loop embedded. Of the calls after ``append`` (the
    progress display), those that use the index are dropped, the others run once.
    """

    DESCRIPTION = "Embed each slice when a prompt needs it (and one-image set_image) through the embedding store."

    def __init__(self, context, import_from: str) -> None:
        super().__init__(context)
        self.import_from = import_from
        self.config = cst.PartialParserConfig()
        self.functions: list[cst.FunctionDef] = []
        self.loops = 0
        self.depth = 0  # for loops around the current statement
        self.single = 0
        self.like: cst.SimpleString | None = None

    def visit_Module(self, node: cst.Module) -> None:
        self.config = node.config_for_parsing
        self.like = first_string(node)
        if any(m.findall(node, m.ImportFrom(module=m.Attribute(attr=m.Name(MODULE)) | m.Name(MODULE)))):
            raise SkipFile("already lazy")

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.functions.append(node)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        self.functions.pop()
        return updated

    def visit_For(self, node: cst.For) -> None:
        self.depth += 1

    def leave_For(self, original: cst.For, updated: cst.For) -> cst.For:
        self.depth -= 1
        return updated

    def _statements(self, code: str) -> list[cst.BaseStatement]:
        return list(cst.parse_module(code, config=self.config).body)

    def _guarded(self, name: str, imported: str, failure: str, lazy: list[str], eager: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        """``try: import`` (a broken module prints one line), then the new code or the tool's own."""
        i = self.config.default_indent
        head = self._statements(
            f"try:  # medico-adapters --lazy-embeddings: {failure[0]}\n"
            f"{i}from {self.import_from} import {imported} as {name}\n"
            "except Exception as _medico_lazy_error:\n"
            f'{i}print(f"medico_lazy_embeddings: {failure[1]} ({{type(_medico_lazy_error).__name__}}: {{_medico_lazy_error}})")\n'
            f"{i}{name} = None\n"
            f"if {name} is not None:\n" + "".join(f"{i}{line}\n" for line in "\n".join(lazy).splitlines())
            + "else:\n" f"{i}pass\n"
        )
        # comments and blank lines above the tool's code now stand above the try
        leading = eager[0].leading_lines
        eager = [eager[0].with_changes(leading_lines=()), *eager[1:]]
        branch = head[1]
        return [head[0].with_changes(leading_lines=leading),
                branch.with_changes(orelse=branch.orelse.with_changes(body=branch.orelse.body.with_changes(body=eager)))]

    def _lazy(self, first: cst.BaseStatement, loop: _Loop) -> list[cst.BaseStatement]:
        i = self.config.default_indent
        inside = _names(*loop.prep)
        hoisted, names = [], set()
        for stmt in loop.prep:
            if not m.matches(stmt, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget()])])):
                continue
            target = _names(stmt.body[0].targets[0])
            once = all(sum(name in _names(s).bound for s in loop.prep) == 1 for name in target.bound)
            reads = _names(stmt.body[0].value).read
            if target.bound and not target.read and once and not reads & (inside.bound | {loop.index}):
                hoisted.append(stmt)
                names |= target.bound
        body = [s for s in loop.prep if all(s is not h for h in hoisted)]
        function = self.functions[-1] if self.functions else None
        local = set()
        if function is not None:
            local = _names(function.body).bound | {p.name.value for p in function.params.params} - {"self", "cls"}
        used = _names(*body, loop.image).read
        params = sorted((used & local) - inside.bound - {loop.index} | names & used)
        signature = ", ".join([loop.index, *(f"{p}={p}" for p in params)])
        owner, _, attribute = loop.holder.partition(".")
        quoted = _code(string_literal(attribute, self.like))
        where = f", owner={owner}, attribute={quoted}" if attribute and "." not in attribute else ""
        statements = [_code(s).rstrip("\n") for s in hoisted]
        statements.append(f"def _medico_slice({signature}):")
        statements += [f"{i}{line}" for s in body for line in _code(s).rstrip("\n").splitlines()]
        statements.append(f"{i}return {_code(loop.image)}")
        statements.append(f"{loop.holder} = _MedicoLazySlices({loop.predictor}, _medico_slice, {_code(loop.count)}{where})")
        statements += [_code(s).rstrip("\n") for s in loop.after if loop.index not in _names(s).read]
        return self._guarded(
            "_MedicoLazySlices", "LazySlices",
            ("each slice embedded when a prompt first needs it, the rest in the background, through the embedding store",
             "every slice embedded now"),
            statements, [first, loop.loop])

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        out: list[cst.BaseStatement] = []
        k, changed = 0, False
        while k < len(body):
            loop = _match(body[k], body[k + 1]) if k + 1 < len(body) else None
            if loop is None:
                out.append(body[k])
                k += 1
                continue
            out += self._lazy(body[k], loop)
            self.loops += 1
            k, changed = k + 2, True
        return updated.with_changes(body=out) if changed else updated

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        if self.depth or not m.matches(updated, _SET_IMAGE):
            return updated
        call = updated.body[0].value
        self.single += 1
        lazy = [f"_medico_set_image({_code(call.func.value)}, {_code(call.args[0].value)})"]
        return cst.FlattenSentinel(self._guarded(
            "_medico_set_image", "stored_set_image",
            ("an image embedded before comes from the embedding store", "embedding without the store"),
            lazy, [updated]))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.loops and not self.single:
            raise SkipFile("no `predictor.set_image(...)` to route through the store, and no whole-volume loop")
        return updated


def has_volume_loop(module: cst.Module) -> bool:
    """Whether ``module`` holds a whole-volume embedding loop ``LazySliceLoop`` makes lazy."""
    for block in m.findall(module, m.IndentedBlock()):
        if any(_match(a, b) for a, b in zip(block.body, block.body[1:], strict=False)):
            return True
    return False


class _OneImageCalls(cst.CSTVisitor):
    """Counts ``predictor.set_image(image)`` statements outside any ``for`` loop, as LazySliceLoop sees them."""

    def __init__(self) -> None:
        self.depth = 0
        self.found = 0

    def visit_For(self, node: cst.For) -> None:
        self.depth += 1

    def leave_For(self, original_node: cst.For) -> None:
        self.depth -= 1

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        if not self.depth and m.matches(node, _SET_IMAGE):
            self.found += 1


def has_embedding(module: cst.Module) -> bool:
    """Whether ``LazySliceLoop`` finds anything to change in ``module``."""
    calls = _OneImageCalls()
    module.visit(calls)
    return bool(calls.found) or has_volume_loop(module)
