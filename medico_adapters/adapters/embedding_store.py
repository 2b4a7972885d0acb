"""``patch TOOL --lazy-embeddings`` for tools whose own code embeds slice after slice (samm).

The kit places ``medico_adapters/embeddings/store.py`` unchanged in the tool's tree, named
``_medico_embedding_store``, beside the file that embeds (as ``--accelerate`` places its module,
see accelerate.py), and ``StoreSetImage`` routes that file's ``<predictor>.set_image(image)`` calls
through the store's ``set_image``: a slice whose pixels (as the tool hands them to the encoder),
model and input size are already stored is served from the store and the encoder does not run; a
new one is computed by the tool's own ``set_image`` and stored. The predictor ends up exactly as
its ``set_image`` leaves it, so everything after the call (samm's ``features[...][i] =
predictor.features.to('cpu')``, its pickle, its masks) is unchanged.

The store keys a model by a hash of its encoder's weights. ``--accelerate`` may swap the encoder
for an OpenVINO one that holds no weights; ``KeyModelIdentity`` therefore hashes the torch encoder
right after the model is built, before the accelerator runs, and tags the model with it (its
``_medico_identity``, which the store reads when the encoder cannot answer). An encoder whose
identity cannot be known is embedded as before, never keyed by a guess.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

import libcst as cst
import libcst.matchers as m
from libcst.codemod import SkipFile, VisitorBasedCodemodCommand

from medico_adapters.adapters.accelerate import AccelerateModel

#: the name the store is imported by inside every tool.
MODULE = "_medico_embedding_store"
#: what ``status`` lists while the option is on.
FEATURE = "embedding store (each slice's embedding read from / written to the kit's store: a volume is embedded once)"
#: the name a patched file calls instead of ``<predictor>.set_image``.
SET_IMAGE = "_medico_set_image"


def source() -> bytes:
    """The store module's bytes, exactly as the kit ships them."""
    return resources.files("medico_adapters.embeddings").joinpath("store.py").read_bytes()


def module_file(folder: str) -> dict[str, bytes]:
    """``_medico_embedding_store.py`` beside the code in ``folder`` (a relpath; "" for the root)."""
    return {(PurePosixPath(folder or ".") / f"{MODULE}.py").as_posix(): source()}


def features(options: dict) -> list[str]:
    return [FEATURE] if options.get("lazy_embeddings") else []


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _is_import(stmt: cst.CSTNode) -> bool:
    return m.matches(stmt, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()]))


class StoreSetImage(VisitorBasedCodemodCommand):
    """Route ``<predictor>.set_image(...)`` inside the named functions through the embedding store.

    Before::

        from segment_anything import SamPredictor

        def CalculateEmbeddings(msg):
            for i in tqdm(range(dataNode.N["R"])):
                dataNode.samPredictor["R"].set_image(cv2.cvtColor(dataNode.mainVolume[i,:,:],cv2.COLOR_GRAY2RGB))
                dataNode.features["R"][i] = dataNode.samPredictor["R"].features.to('cpu')

    After::

        from segment_anything import SamPredictor

        try:  # medico-adapters --lazy-embeddings: embeddings come from, and go to, the kit's embedding store
            from _medico_embedding_store import set_image as _medico_set_image
        except Exception as _medico_store_error:  # no store module: embed as before
            print(f"medico embedding store: not used ({type(_medico_store_error).__name__}: {_medico_store_error})")

            def _medico_set_image(predictor, image, image_format="RGB"):
                predictor.set_image(image, image_format)

        def CalculateEmbeddings(msg):
            for i in tqdm(range(dataNode.N["R"])):
                _medico_set_image(dataNode.samPredictor["R"], cv2.cvtColor(dataNode.mainVolume[i,:,:],cv2.COLOR_GRAY2RGB))
                dataNode.features["R"][i] = dataNode.samPredictor["R"].features.to('cpu')
    """

    DESCRIPTION = "Serve the tool's per-slice set_image from the kit's embedding store, and fill it."

    def __init__(self, context, functions: tuple[str, ...], import_from: str) -> None:
        super().__init__(context)
        self.functions = tuple(functions)
        self.import_from = import_from
        self.depth = 0  # inside how many of the named functions
        self.routed = 0
        self.present = 0
        self.config = cst.PartialParserConfig()

    def visit_Module(self, node: cst.Module) -> None:
        self.config = node.config_for_parsing

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value in self.functions:
            self.depth += 1

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value in self.functions:
            self.depth -= 1
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not self.depth:
            return updated
        if m.matches(updated.func, m.Name(SET_IMAGE)):
            self.present += 1
            return updated
        if not m.matches(updated.func, m.Attribute(attr=m.Name("set_image"))) or not updated.args:
            return updated
        self.routed += 1
        first = cst.Arg(updated.func.value, comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        return updated.with_changes(func=cst.Name(SET_IMAGE), args=[first, *updated.args])

    def _import(self) -> cst.BaseStatement:
        i = self.config.default_indent
        code = (
            "try:  # medico-adapters --lazy-embeddings: embeddings come from, and go to, the kit's embedding store\n"
            f"{i}from {self.import_from} import set_image as {SET_IMAGE}\n"
            "except Exception as _medico_store_error:  # no store module: embed as before\n"
            f'{i}print(f"medico embedding store: not used ({{type(_medico_store_error).__name__}}: {{_medico_store_error}})")\n'
            "\n"
            f'{i}def {SET_IMAGE}(predictor, image, image_format="RGB"):\n'
            f"{i}{i}predictor.set_image(image, image_format)\n"
        )
        return cst.parse_statement(code, config=self.config)

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.routed:
            raise SkipFile(
                "every set_image here already goes through the embedding store" if self.present
                else f"no <predictor>.set_image(...) call in {', '.join(self.functions)}"
            )
        body = list(updated.body)
        if any(MODULE in _code(s) for s in body if isinstance(s, cst.Try)):
            return updated
        at = 0
        while at < len(body) and (_is_import(body[at]) or m.matches(body[at], m.SimpleStatementLine(body=[m.Expr(m.SimpleString())]))):
            at += 1
        if not any(_is_import(s) for s in body[:at]):
            at = 0
        body.insert(at, self._import().with_changes(leading_lines=[cst.EmptyLine(indent=False)] if at else []))
        return updated.with_changes(body=body)


class KeyModelIdentity(AccelerateModel):
    """Hash each SAM-1 model's encoder right after the file builds and moves it (before ``--accelerate``).

    Same places as ``AccelerateModel``; the patch runs this after it, so the hash comes first.

    Before::

        sam = sam_model_registry[model_type](checkpoint=self.sam_checkpoint)
        sam.to(device=self.device)

    After::

        sam = sam_model_registry[model_type](checkpoint=self.sam_checkpoint)
        sam.to(device=self.device)
        try:  # medico-adapters --lazy-embeddings: its weights' hash keys the stored embeddings (kept when accelerated)
            from _medico_embedding_store import model_identity as _medico_model_identity
            sam._medico_identity = _medico_model_identity(sam.image_encoder)
        except Exception as _medico_store_error:
            print(f"medico embedding store: no model identity ({type(_medico_store_error).__name__}: {_medico_store_error})")
    """

    DESCRIPTION = "Hash the tool's SAM encoder weights before the accelerator may drop them."
    MARK = "_medico_model_identity"
    DONE = "hashed"

    def __init__(self, context, import_from: str) -> None:
        super().__init__(context, import_from)

    def _call(self, target: str) -> cst.BaseStatement:
        i = self.config.default_indent
        code = (
            "try:  # medico-adapters --lazy-embeddings: its weights' hash keys the stored embeddings (kept when accelerated)\n"
            f"{i}from {self.import_from} import model_identity as {self.MARK}\n"
            f"{i}{target}._medico_identity = {self.MARK}({target}.image_encoder)\n"
            "except Exception as _medico_store_error:\n"
            f'{i}print(f"medico embedding store: no model identity ({{type(_medico_store_error).__name__}}: {{_medico_store_error}})")\n'
        )
        return cst.parse_statement(code, config=self.config)
