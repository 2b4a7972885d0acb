"""Seeded formatting variants of the adapter fixtures, as real forks and local copies look.

A variant is the fixture's ``.py`` files run through a random, reproducible mix of mutations:

* structural, applied identically to every file of the tree (so e.g. samm's two
  ``SammModelMapper`` copies stay in step): a user's own model entry appended or prepended to the
  model tables, and the tables' entries reordered;
* formatting, per file: trailing commas added or removed, black at line length 40/79/120 (when
  black is installed), string quotes swapped (libcst, never a regex), comments and blank lines
  between statements and inside dict literals, CRLF line endings, a UTF-8 BOM.

``variants(layout, n)`` gives ``n`` variants: even indices are the single mutations (so each is
covered alone) until they run out, the rest random combinations. Everything is deterministic in the layout name and the index.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
import libcst.matchers as m

try:
    import black
except ImportError:  # the black mutations are skipped
    black = None

FIXTURES = Path(__file__).parent / "fixtures"

#: layout name -> fixture folder (relative to tests/fixtures)
LAYOUTS = {
    "N1": "napari_sam/N1",
    "N2": "napari_sam/N2",
    "N3": "napari_sam/N3",
    "S2": "samm/S2",
    "S3": "samm/S3",
    "S4": "samm/S4",
    "samm-server": "samm/samm_server",
    "W1": "slicer_sws/W1",
    "W2": "slicer_sws/W2",
}

#: the user's own entries the structural mutation adds (one per tool's table shape)
USER_NAPARI = "my_lung_sam"
USER_SAMM = "lungsam_vit_b"
USER_SAMM_ID = "lungsam"
USER_SLICER = "Lung SAM (ViT-B)"

BLACK_LENGTHS = (40, 79, 120)
SINGLE = (
    ["user_entry_append", "user_entry_prepend", "reorder", "trailing_comma_add", "trailing_comma_remove"]
    + ([f"black{n}" for n in BLACK_LENGTHS] if black is not None else [])
    + ["quotes_single", "quotes_double", "quotes_mixed", "comments", "blank_lines", "crlf", "bom"]
)


@dataclass
class Variant:
    layout: str
    index: int
    seed: int
    mutations: list[str]
    files: dict[str, bytes]  # relpath -> bytes, every .py file of the fixture

    @property
    def label(self) -> str:
        return f"{self.layout}#{self.index}[{'+'.join(self.mutations) or 'none'}]"

    def write(self, root: Path) -> Path:
        for rel, data in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root


def fixture_files(layout: str) -> dict[str, str]:
    base = FIXTURES / LAYOUTS[layout]
    return {p.relative_to(base).as_posix(): p.read_text("utf-8") for p in sorted(base.rglob("*.py"))}


# --- element lists ---------------------------------------------------------------------------


def _opening(node) -> cst.BaseParenthesizableWhitespace | None:
    if isinstance(node, cst.Dict):
        return node.lbrace.whitespace_after
    if isinstance(node, cst.List):
        return node.lbracket.whitespace_after
    if isinstance(node, cst.Tuple) and node.lpar:
        return node.lpar[0].whitespace_after
    return None


def _between(node, elements) -> cst.Comma:
    """The comma that separates elements in this literal's own layout."""
    for e in elements[:-1]:
        if isinstance(e.comma, cst.Comma):
            return e.comma
    opening = _opening(node)
    if isinstance(opening, cst.ParenthesizedWhitespace):
        return cst.Comma(whitespace_after=opening)
    return cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))


def relayout(node, new_elements, *, old_last):
    """``node`` with ``new_elements``, commas fixed: the old trailing comma stays at the end."""
    old = list(node.elements)
    between = _between(node, old)
    trailing = old[-1].comma if old else cst.MaybeSentinel.DEFAULT
    out = []
    for i, e in enumerate(new_elements):
        if i == len(new_elements) - 1:
            out.append(e.with_changes(comma=trailing))
        elif e is old_last or not isinstance(e.comma, cst.Comma):
            out.append(e.with_changes(comma=between))
        else:
            out.append(e)
    return node.with_changes(elements=out)


def insert_element(node, element, *, prepend: bool):
    old = list(node.elements)
    new = [element, *old] if prepend else [*old, element]
    return relayout(node, new, old_last=old[-1] if old else None)


def permute(node, rng: random.Random):
    old = list(node.elements)
    if len(old) < 2:
        return node
    order = list(range(len(old)))
    while order == sorted(order):
        rng.shuffle(order)
    return relayout(node, [old[i] for i in order], old_last=old[-1])


def _assign_name(node: cst.Assign) -> str | None:
    if len(node.targets) == 1 and isinstance(node.targets[0].target, cst.Name):
        return node.targets[0].target.value
    return None


def _parse_expr(code: str) -> cst.BaseExpression:
    return cst.parse_expression(code)


# --- structural mutations ------------------------------------------------------------------


class UserEntry(cst.CSTTransformer):
    """A user's own model entry in every model table of the tree (same position in every copy)."""

    def __init__(self, prepend: bool) -> None:
        self.prepend = prepend
        self.mapper_int: int | None = None

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        name = _assign_name(updated)
        value = updated.value
        if name == "SAM_MODELS" and isinstance(value, cst.Dict):
            entry = _parse_expr(
                f'{{"{USER_NAPARI}": {{"filename": "{USER_NAPARI}.pth", '
                f'"url": "https://example.org/{USER_NAPARI}.pth", "model": build_sam_vit_l}}}}'
            ).elements[0]
            return updated.with_changes(value=insert_element(value, entry, prepend=self.prepend))
        if name == "SAM_WEIGHTS_URL" and isinstance(value, cst.Dict):
            entry = _parse_expr(f'{{"{USER_NAPARI}": "https://example.org/{USER_NAPARI}.pth"}}').elements[0]
            return updated.with_changes(value=insert_element(value, entry, prepend=self.prepend))
        if name == "SammModelMapper" and isinstance(value, cst.Dict):
            ints = [int(e.value.value) for e in value.elements if isinstance(e.value, cst.Integer)]
            number = max(ints) + 1
            elements = []
            for e in value.elements:
                if isinstance(e.key, cst.SimpleString) and e.key.evaluated_value == "DICT":
                    e = e.with_changes(value=insert_element(e.value, cst.Element(cst.SimpleString(f'"{USER_SAMM}"')), prepend=False))
                elements.append(e)
            value = value.with_changes(elements=elements)
            template = next(e for e in value.elements if isinstance(e.value, cst.Integer))
            entry = template.with_changes(key=cst.SimpleString(f'"{USER_SAMM}"'), value=cst.Integer(str(number)))
            if self.prepend:
                return updated.with_changes(value=insert_element(value, entry, prepend=True))
            # appended: just before DICT, where samm itself adds models
            at = next(i for i, e in enumerate(value.elements) if isinstance(e.key, cst.SimpleString) and e.key.evaluated_value == "DICT")
            old = list(value.elements)
            if at == len(old) - 1:
                new = [*old[:at], entry.with_changes(comma=old[at - 1].comma if at else _between(value, old)), old[at]]
                return updated.with_changes(value=value.with_changes(elements=new))
            return updated.with_changes(value=relayout(value, [*old[:at], entry, *old[at:]], old_last=old[-1]))
        if name == "comboModelItems" and isinstance(value, cst.List):
            item = cst.Element(cst.SimpleString(f"'{USER_SAMM}'"))
            return updated.with_changes(value=insert_element(value, item, prepend=False))
        if name == "MODEL_DEFINITIONS" and isinstance(value, (cst.Tuple, cst.List)):
            call = _parse_expr(
                f'ModelDefinition("{USER_SAMM_ID}", "Lung SAM", (WeightDefinition("{USER_SAMM}", "ViT-B", '
                f'"{USER_SAMM}.pth", "sam1", "vit_b", SAM_PROMPTS),))'
            )
            return updated.with_changes(value=insert_element(value, cst.Element(call), prepend=self.prepend))
        if name in ("MODEL_IDS", "WEIGHT_IDS") and isinstance(value, (cst.Tuple, cst.List)):
            text = USER_SAMM_ID if name == "MODEL_IDS" else USER_SAMM
            return updated.with_changes(value=insert_element(value, cst.Element(cst.SimpleString(f'"{text}"')), prepend=self.prepend))
        return updated

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        """Slicer W2: one more drop-down item, next to the module's own."""
        body = list(updated.body)
        adds = [i for i, s in enumerate(body) if m.matches(s, _ADD_ITEM_LINE)]
        if not adds:
            return updated
        at = adds[0] if self.prepend else adds[-1]
        template = body[at]
        call = template.body[0].value
        line = template.with_changes(
            leading_lines=template.leading_lines if self.prepend else [],
            body=[template.body[0].with_changes(value=call.with_changes(args=[call.args[0].with_changes(value=cst.SimpleString(f'"{USER_SLICER}"'))]))],
        )
        if self.prepend:
            body[at] = body[at].with_changes(leading_lines=[])
            body.insert(at, line)
        else:
            body.insert(at + 1, line)
        return updated.with_changes(body=body)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        """Slicer W2: a changeModel branch for the user's model, at the end of the chain."""
        if updated.name.value != "changeModel":
            return updated
        body = list(updated.body.body)
        for i, stmt in enumerate(body):
            if isinstance(stmt, cst.If) and m.matches(stmt.test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.Equal())])):
                branches = _chain(stmt)
                template = next((b for b in branches if "sam_model_registry" in cst.Module([]).code_for_node(b.body)), None)
                if template is None:
                    continue
                new = template.with_changes(
                    test=template.test.with_changes(comparisons=[template.test.comparisons[0].with_changes(comparator=cst.SimpleString(f'"{USER_SLICER}"'))]),
                    body=_replace_string(template.body, "sam_vit_b_01ec64.pth", "lung_sam_vit_b.pth"),
                )
                branches = [*branches, new]
                body[i] = _rechain(branches, branches_tail(stmt))
                return updated.with_changes(body=updated.body.with_changes(body=body))
        return updated


_ADD_ITEM_LINE = m.SimpleStatementLine(
    body=[m.Expr(value=m.Call(func=m.Attribute(value=m.Attribute(attr=m.Name("modelDropDown")), attr=m.Name("addItem")), args=[m.Arg(value=m.SimpleString())]))]
)


def _chain(head: cst.If) -> list[cst.If]:
    out, node = [], head
    while isinstance(node, cst.If):
        out.append(node)
        node = node.orelse
    return out


def branches_tail(head: cst.If):
    node = head
    while isinstance(node, cst.If):
        node = node.orelse
    return node


def _rechain(branches: list[cst.If], tail) -> cst.If:
    chain = tail
    for i, branch in reversed(list(enumerate(branches))):
        # only the head keeps the statement's leading lines; an elif's are its own
        chain = branch.with_changes(orelse=chain, leading_lines=branches[0].leading_lines if i == 0 else branch.leading_lines)
    return chain


def _replace_string(node: cst.CSTNode, old: str, new: str) -> cst.CSTNode:
    class _R(cst.CSTTransformer):
        def leave_SimpleString(self, original, updated):
            return cst.SimpleString(f'"{new}"') if updated.evaluated_value == old else updated

    return node.visit(_R())


class Reorder(cst.CSTTransformer):
    """Reorder the model tables' entries (and W2's changeModel branches, samm-server's ids)."""

    TABLES = ("SAM_MODELS", "SAM_WEIGHTS_URL", "SammModelMapper", "MODEL_DEFINITIONS", "MODEL_IDS", "WEIGHT_IDS", "dictpath")

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:{name}")  # same table, same permutation in every file

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        name = _assign_name(updated)
        if name in self.TABLES and isinstance(updated.value, (cst.Dict, cst.Tuple, cst.List)):
            return updated.with_changes(value=permute(updated.value, self.rng(name)))
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if updated.name.value != "changeModel":
            return updated
        body = list(updated.body.body)
        for i, stmt in enumerate(body):
            if isinstance(stmt, cst.If) and m.matches(stmt.test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.Equal())])):
                branches = _chain(stmt)
                if len(branches) < 2:
                    continue
                order = list(range(len(branches)))
                rng = self.rng("changeModel")
                while order == sorted(order):
                    rng.shuffle(order)
                lines = [b.leading_lines for b in branches]
                shuffled = [branches[j].with_changes(leading_lines=lines[k]) for k, j in enumerate(order)]
                body[i] = _rechain(shuffled, branches_tail(stmt))
                return updated.with_changes(body=updated.body.with_changes(body=body))
        return updated


# --- formatting mutations --------------------------------------------------------------------


class TrailingCommas(cst.CSTTransformer):
    """Add (or remove) the trailing comma of dict, list and parenthesised tuple literals."""

    def __init__(self, add: bool, rng: random.Random) -> None:
        self.add = add
        self.rng = rng

    def _fix(self, node):
        elements = list(node.elements)
        if not elements or self.rng.random() < 0.3:
            return node
        last = elements[-1]
        if self.add and not isinstance(last.comma, cst.Comma):
            elements[-1] = last.with_changes(comma=cst.Comma())
        elif not self.add and isinstance(last.comma, cst.Comma):
            if isinstance(node, cst.Tuple) and len(elements) == 1:
                return node  # ("x",) must stay a tuple
            ws = last.comma.whitespace_after
            elements[-1] = last.with_changes(comma=cst.MaybeSentinel.DEFAULT)
            if isinstance(ws, cst.ParenthesizedWhitespace):  # keep the closing bracket on its own line
                return self._close_with(node.with_changes(elements=elements), ws)
        else:
            return node
        return node.with_changes(elements=elements)

    @staticmethod
    def _close_with(node, ws):
        if isinstance(node, cst.Dict):
            return node.with_changes(rbrace=node.rbrace.with_changes(whitespace_before=ws))
        if isinstance(node, cst.List):
            return node.with_changes(rbracket=node.rbracket.with_changes(whitespace_before=ws))
        return node.with_changes(rpar=[node.rpar[0].with_changes(whitespace_before=ws), *node.rpar[1:]])

    def leave_Dict(self, original, updated):
        return self._fix(updated)

    def leave_List(self, original, updated):
        return self._fix(updated)

    def leave_Tuple(self, original, updated):
        return self._fix(updated) if updated.lpar else updated


class Quotes(cst.CSTTransformer):
    """Swap string quotes: all single, all double, or a coin flip per literal."""

    def __init__(self, mode: str, rng: random.Random) -> None:
        self.mode = mode
        self.rng = rng

    def _target(self) -> str:
        if self.mode == "single":
            return "'"
        if self.mode == "double":
            return '"'
        return self.rng.choice("'\"")

    def leave_SimpleString(self, original: cst.SimpleString, updated: cst.SimpleString) -> cst.SimpleString:
        quote = updated.quote
        if len(quote) != 1:
            return updated  # docstrings and other triple-quoted strings keep theirs
        want = self._target()
        prefix = updated.prefix
        body = updated.value[len(prefix) + 1 : -1]
        if want == quote or want in body or ("r" in prefix.lower() and "\\" in body):
            return updated
        return updated.with_changes(value=f"{prefix}{want}{body}{want}")

    def leave_FormattedString(self, original: cst.FormattedString, updated: cst.FormattedString) -> cst.FormattedString:
        quote = updated.end
        if len(quote) != 1:
            return updated
        want = self._target()
        inner = cst.Module([]).code_for_node(updated)[len(updated.start) : -1]
        if want == quote or want in inner:
            return updated
        return updated.with_changes(start=updated.start[:-1] + want, end=want)


NOTES = (
    "# local change: keep in sync with the lab's server",
    "# TODO(user): check this on the cluster",
    "# noqa",
    "# fmt: skip",
    "# type: ignore",
    "#: models we use",
    "# -*- added by hand -*-",
)


class Comments(cst.CSTTransformer):
    """Comments (and blank lines) between statements, after statements and inside literals."""

    def __init__(self, rng: random.Random, *, comments: bool, blanks: bool, rate: float = 0.35) -> None:
        self.rng = rng
        self.comments = comments
        self.blanks = blanks
        self.rate = rate

    def _note(self) -> cst.Comment:
        return cst.Comment(self.rng.choice(NOTES))

    def _extra_lines(self, indent: bool = True, whitespace: str = "") -> list[cst.EmptyLine]:
        lines = []
        if self.blanks and self.rng.random() < self.rate:
            lines += [cst.EmptyLine(indent=False)] * self.rng.randint(1, 3)
        if self.comments and self.rng.random() < self.rate:
            lines.append(cst.EmptyLine(indent=indent, whitespace=cst.SimpleWhitespace(whitespace), comment=self._note()))
        return lines

    def _statement(self, updated):
        extra = self._extra_lines()
        if extra:
            updated = updated.with_changes(leading_lines=[*updated.leading_lines, *extra])
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        updated = self._statement(updated)
        tw = updated.trailing_whitespace
        if self.comments and tw.comment is None and self.rng.random() < self.rate / 2:
            updated = updated.with_changes(trailing_whitespace=tw.with_changes(whitespace=cst.SimpleWhitespace("  "), comment=self._note()))
        return updated

    def leave_FunctionDef(self, original, updated):
        return self._statement(updated)

    def leave_ClassDef(self, original, updated):
        return self._statement(updated)

    def leave_If(self, original, updated):
        return self._statement(updated)

    def leave_For(self, original, updated):
        return self._statement(updated)

    def _paren_ws(self, ws):
        if not isinstance(ws, cst.ParenthesizedWhitespace):
            return ws
        first = ws.first_line
        if self.comments and first.comment is None and self.rng.random() < self.rate:
            first = first.with_changes(whitespace=cst.SimpleWhitespace("  "), comment=self._note())
        indent = ws.last_line.value
        extra = self._extra_lines(indent=ws.indent, whitespace=indent)
        return ws.with_changes(first_line=first, empty_lines=[*ws.empty_lines, *extra])

    def leave_Comma(self, original, updated):
        return updated.with_changes(whitespace_after=self._paren_ws(updated.whitespace_after))

    def leave_LeftCurlyBrace(self, original, updated):
        return updated.with_changes(whitespace_after=self._paren_ws(updated.whitespace_after))


# --- the generator ---------------------------------------------------------------------------


def _cst(code: str, transformer: cst.CSTTransformer) -> str:
    return cst.parse_module(code).visit(transformer).code


def mutate(files: dict[str, str], mutations: list[str], seed: int) -> dict[str, bytes]:
    out = {}
    for rel, code in files.items():
        rng = random.Random(f"{seed}:{rel}")
        for mutation in mutations:
            if mutation.startswith("user_entry_"):
                code = _cst(code, UserEntry(prepend=mutation.endswith("prepend")))
            elif mutation == "reorder":
                code = _cst(code, Reorder(seed))
            elif mutation.startswith("trailing_comma_"):
                code = _cst(code, TrailingCommas(mutation.endswith("add"), rng))
            elif mutation.startswith("black"):
                mode = black.Mode(
                    line_length=int(mutation[len("black"):]),
                    string_normalization=rng.random() < 0.5,
                    magic_trailing_comma=rng.random() < 0.8,
                )
                code = black.format_str(code, mode=mode)
            elif mutation.startswith("quotes_"):
                code = _cst(code, Quotes(mutation[len("quotes_"):], rng))
            elif mutation in ("comments", "blank_lines"):
                code = _cst(code, Comments(rng, comments=mutation == "comments", blanks=mutation == "blank_lines"))
            elif mutation in ("crlf", "bom"):
                pass  # applied to the bytes below
            else:
                raise ValueError(mutation)
        data = code.replace("\n", "\r\n").encode() if "crlf" in mutations else code.encode()
        if "bom" in mutations:
            data = b"\xef\xbb\xbf" + data
        out[rel] = data
    return out


ORDER = ["user_entry", "reorder", "trailing_comma", "black", "quotes", "comments", "blank_lines", "crlf", "bom"]


def random_mutations(rng: random.Random) -> list[str]:
    chosen = []
    if rng.random() < 0.5:
        chosen.append(rng.choice(["user_entry_append", "user_entry_prepend"]))
    if rng.random() < 0.4:
        chosen.append("reorder")
    if rng.random() < 0.4:
        chosen.append(rng.choice(["trailing_comma_add", "trailing_comma_remove"]))
    if black is not None and rng.random() < 0.5:
        chosen.append(f"black{rng.choice(BLACK_LENGTHS)}")
    if rng.random() < 0.5:
        chosen.append(rng.choice(["quotes_single", "quotes_double", "quotes_mixed"]))
    if rng.random() < 0.5:
        chosen.append("comments")
    if rng.random() < 0.4:
        chosen.append("blank_lines")
    if rng.random() < 0.4:
        chosen.append("crlf")
    if rng.random() < 0.1:
        chosen.append("bom")
    if not chosen:
        chosen.append(rng.choice(SINGLE))
    return sorted(chosen, key=lambda name: next(i for i, p in enumerate(ORDER) if name.startswith(p)))


def variant(layout: str, index: int) -> Variant:
    seed = zlib.crc32(f"{layout}:{index}".encode())
    if index % 2 == 0 and index // 2 < len(SINGLE):  # singles and mixes interleaved
        mutations = [SINGLE[index // 2]]
    else:
        mutations = random_mutations(random.Random(seed))
    return Variant(layout, index, seed, mutations, mutate(fixture_files(layout), mutations, seed))


def variants(layout: str, n: int) -> list[Variant]:
    return [variant(layout, i) for i in range(n)]
