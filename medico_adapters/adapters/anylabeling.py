"""AnyLabeling (vietanhdev/anylabeling; PyPI ``anylabeling``), layout ``A1`` (0.4.x): no source change.

AnyLabeling runs SAM as an ONNX encoder/decoder pair (``services/auto_labeling/sam_onnx.py``) named
in a model ``config.yaml`` (``encoder_model_path``, ``decoder_model_path``, ``input_size``,
``max_width``, ``max_height``), and lists user models from ``custom_models`` in ``~/.anylabelingrc``:
``ModelManager.load_custom_model`` stores each as its config plus ``config_file``, newest first.

So the patch places, per entry, ``~/anylabeling_data/models/<folder>/`` with the pair exported by
:mod:`medico_adapters.onnx_export` (checked against the torch model) and a ``config.yaml``, and
records the entry in ``~/.anylabelingrc`` exactly as the model manager would, marked
``placed_by: medico-adapters``. Nothing under the package changes; the tree only holds the kit's
manifest, and the layout check reads the decoder inputs and letterbox size from the tool's code.

AnyLabeling re-saves ``~/.anylabelingrc`` on every start. ``unpatch`` restores the file byte for
byte when it is as the kit left it (or equal to the original once the kit's entries are dropped);
otherwise it removes only the kit's entries and keeps the rest of what AnyLabeling wrote.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import libcst as cst
import libcst.matchers as m

from medico_adapters import engine, fsio, onnx_export
from medico_adapters.adapters.base import Adapter, Layout, Step, check_display_name, parse, slug
from medico_adapters.checkpoint import Checkpoint
from medico_adapters.engine import Entry, Placement, Tree
from medico_adapters.errors import LayoutError, PatchError

PACKAGE = "anylabeling"
SAM_MODEL = "services/auto_labeling/segment_anything.py"
SAM_ONNX = "services/auto_labeling/sam_onnx.py"
DEFAULTS = "configs/anylabeling_config.yaml"
BUILTIN_MODELS = "configs/auto_labeling/models.yaml"
RC = ".anylabelingrc"
MODELS_DIR = "anylabeling_data/models"
PLACED_BY = "medico-adapters"


def _class(module: cst.Module, name: str) -> cst.ClassDef | None:
    return next((s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == name), None)


def _method(cls: cst.ClassDef, name: str) -> cst.FunctionDef | None:
    return next((s for s in cls.body.body if isinstance(s, cst.FunctionDef) and s.name.value == name), None)


def _assignments(node: cst.CSTNode, target: m.BaseMatcherNode) -> list[cst.BaseExpression]:
    return [a.value for a in m.findall(node, m.Assign(targets=[m.AssignTarget(target=target)]))]


def _decoder_inputs(module: cst.Module) -> tuple[str, ...] | None:
    cls = _class(module, "SegmentAnythingONNX")
    method = _method(cls, "run_decoder") if cls else None
    values = _assignments(method, m.Name("decoder_inputs")) if method else []
    if len(values) != 1 or not isinstance(values[0], cst.Dict):
        return None
    return tuple(e.key.evaluated_value for e in values[0].elements if isinstance(e, cst.DictElement) and isinstance(e.key, cst.SimpleString))


def _input_size(module: cst.Module) -> tuple[int, int] | None:
    cls = _class(module, "SegmentAnythingONNX")
    init = _method(cls, "__init__") if cls else None
    values = _assignments(init, m.Attribute(value=m.Name("self"), attr=m.Name("input_size"))) if init else []
    if len(values) != 1 or not m.matches(values[0], m.Tuple(elements=[m.Element(value=m.Integer()), m.Element(value=m.Integer())])):
        return None
    return tuple(int(e.value.value) for e in values[0].elements)


def _required_config(module: cst.Module) -> tuple[str, ...] | None:
    cls = _class(module, "SegmentAnything")
    meta = _class(cst.Module(body=list(cls.body.body)), "Meta") if cls else None
    values = _assignments(meta, m.Name("required_config_names")) if meta else []
    if len(values) != 1 or not isinstance(values[0], cst.List):
        return None
    return tuple(e.value.evaluated_value for e in values[0].elements if isinstance(e.value, cst.SimpleString))


def rc_path() -> Path:
    return Path.home() / RC


def model_folder(entry: Entry) -> Path:
    return Path.home() / MODELS_DIR / entry.filename


def model_config(entry: Entry) -> dict:
    return {**onnx_export.anylabeling_config(entry.filename, entry.name), "placed_by": PLACED_BY}


def _record(entry: Entry) -> dict:
    """The custom_models item ``ModelManager.load_custom_model`` stores for this config."""
    config_file = model_folder(entry) / onnx_export.CONFIG_FILE
    return {**model_config(entry), "config_file": os.path.normpath(os.path.abspath(config_file))}


def _ours(record, managed: set[str]) -> bool:
    return isinstance(record, dict) and record.get("placed_by") == PLACED_BY and os.path.normpath(str(record.get("config_file", ""))) in managed


class AnyLabelingAdapter(Adapter):
    tool = "anylabeling"
    description = "AnyLabeling (anylabeling on PyPI), 0.4.x: ONNX SAM models, custom models in ~/.anylabelingrc"

    packages = (PACKAGE,)

    @staticmethod
    def _package(tree: Tree) -> str:
        if (tree.root / SAM_MODEL).is_file():
            return ""
        if (tree.root / PACKAGE / SAM_MODEL).is_file():
            return PACKAGE
        raise LayoutError(f"{tree.root}: no {PACKAGE}/{SAM_MODEL} (give the installed anylabeling package folder or a checkout)")

    def detect(self, tree: Tree) -> Layout:
        pkg = self._package(tree)
        join = (lambda rel: f"{pkg}/{rel}") if pkg else (lambda rel: rel)
        sam_onnx, sam_model, defaults = join(SAM_ONNX), join(SAM_MODEL), join(DEFAULTS)
        if not tree.exists(sam_onnx) or not tree.exists(defaults):
            raise LayoutError(f"{tree.root}: missing {sam_onnx} or {defaults} (AnyLabeling layout A1)")
        onnx_module = parse(tree, sam_onnx)
        inputs, size = _decoder_inputs(onnx_module), _input_size(onnx_module)
        if inputs is None or set(inputs) != set(onnx_export.DECODER_INPUTS):
            raise LayoutError(f"{tree.path(sam_onnx)}: the decoder takes {inputs or 'unknown inputs'}, not the SAM ONNX inputs {', '.join(onnx_export.DECODER_INPUTS)}")
        if size is None or max(size) != 1024:
            raise LayoutError(f"{tree.path(sam_onnx)}: no 1024-wide self.input_size letterbox in SegmentAnythingONNX")
        required = _required_config(parse(tree, sam_model))
        config_keys = set(model_config(self.default_entry()))
        if required is None or not set(required) <= config_keys:
            raise LayoutError(f"{tree.path(sam_model)}: SegmentAnything requires config keys {required}, beyond what the kit writes")
        builtin = join(BUILTIN_MODELS)
        return Layout(
            "A1", "ONNX encoder/decoder SAM, custom models in ~/.anylabelingrc (0.4.x)", (), pkg,
            extra={"input_size": size, "defaults": defaults, "builtin": builtin if tree.exists(builtin) else None},
        )

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        return []

    def supported_archs(self, layout: Layout) -> tuple[str, ...]:
        return onnx_export.ONNX_ARCHS

    def default_entry(self) -> Entry:
        return Entry("MedicoSAM", "vit_b", "medicosam_vit_b", default=True)

    def custom_entry(self, name: str, arch: str) -> Entry:
        check_display_name(name)
        return Entry(name, arch, f"medico_{arch}_{slug(name)}")

    def checkpoint_path(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> Path:
        return model_folder(entry) / onnx_export.ENCODER_FILE

    def entry_targets(self, tree: Tree, layout: Layout, entry: Entry, options: dict) -> list[Path]:
        folder = model_folder(entry)
        return [folder / onnx_export.ENCODER_FILE, folder / onnx_export.DECODER_FILE, folder / onnx_export.CONFIG_FILE]

    def entry_placements(self, tree: Tree, layout: Layout, entry: Entry, options: dict, source: Callable[[], Checkpoint]) -> list[Placement]:
        encoder, decoder, config = self.entry_targets(tree, layout, entry, options)
        # One export writes both files, so the encoder's writer also fills the decoder's staging path.
        decoder_tmp = decoder.with_name(decoder.name + engine.TMP_SUFFIX)

        def write_encoder(tmp: Path) -> Path:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            engine.record_staging(tree.root, [decoder_tmp])
            onnx_export.write_pair(source(), tmp, decoder_tmp, input_size=layout.extra["input_size"])
            return tmp

        def write_decoder(tmp: Path) -> Path:
            if not tmp.is_file():
                raise PatchError(f"{tmp}: the decoder was not exported with its encoder")
            return tmp

        def write_config(tmp: Path) -> Path:
            _, _, yaml = onnx_export.require_onnx()
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return fsio.write_file(tmp, yaml.safe_dump(model_config(entry), sort_keys=False).encode("utf-8"))

        return [Placement(entry, encoder, write_encoder), Placement(entry, decoder, write_decoder), Placement(entry, config, write_config)]

    def validate_entry(self, tree: Tree, layout: Layout, entry: Entry) -> None:
        _, _, yaml = onnx_export.require_onnx()
        decoder = str(model_folder(entry).resolve() / onnx_export.DECODER_FILE)
        if "coreml" in decoder:
            raise PatchError(f"{decoder}: AnyLabeling loads any decoder whose path contains 'coreml' as CoreML; choose another --name")
        taken = {}
        if layout.extra["builtin"]:
            for model in yaml.safe_load(tree.current(layout.extra["builtin"])) or []:
                taken[model.get("name")] = taken[model.get("display_name")] = "a built-in model"
        for model in self._config(tree, layout)[0].get("custom_models") or []:
            if isinstance(model, dict) and model.get("placed_by") != PLACED_BY:
                taken[model.get("name")] = taken[model.get("display_name")] = f"a custom model in {rc_path()}"
        for value in (entry.name, entry.filename):
            if value in taken:
                raise PatchError(f"AnyLabeling already lists {value!r} ({taken[value]}); choose another --name")

    def _config(self, tree: Tree, layout: Layout) -> tuple[dict, bytes | None]:
        _, _, yaml = onnx_export.require_onnx()
        rc = rc_path()
        if rc.is_file():
            data = rc.read_bytes()
            try:
                config = yaml.safe_load(data)
            except yaml.YAMLError as e:
                raise PatchError(f"{rc}: is not valid YAML ({str(e).splitlines()[0]}); fix or move it, then patch again") from None
            if not isinstance(config, dict):
                raise PatchError(f"{rc}: holds no YAML mapping; fix or move it, then patch again")
            return config, data
        # AnyLabeling writes its defaults there on first start; the kit starts from the same.
        return yaml.safe_load(tree.current(layout.extra["defaults"])) or {}, None

    def registrations(self, tree: Tree, layout: Layout, entries: Sequence[Entry], previous: Sequence[Entry], options: dict) -> list[Placement]:
        managed = {_record(e)["config_file"] for e in [*entries, *previous]}

        def write(tmp: Path) -> Path:
            _, _, yaml = onnx_export.require_onnx()
            config, current = self._config(tree, layout)
            models = [r for r in config.get("custom_models") or [] if isinstance(r, dict)]
            by_file = {os.path.normpath(str(r.get("config_file", ""))): r for r in models}
            ours = []
            for entry in entries:
                record = _record(entry)
                # Keep what AnyLabeling added to its record (last_used, flags) so a re-patch changes nothing.
                ours.append({**by_file.get(record["config_file"], {}), **record})
            others = [r for r in models if not _ours(r, managed)]
            wanted = [*ours, *others]
            if current is not None and config.get("custom_models") == wanted:
                return fsio.write_file(tmp, current)
            return fsio.write_file(tmp, yaml.safe_dump({**config, "custom_models": wanted}).encode("utf-8"))

        return [Placement(entries[0], rc_path(), write)]

    def _cleaned(self, manifest: dict) -> dict | None:
        """~/.anylabelingrc as it is now, without the kit's entries (None: unreadable)."""
        _, _, yaml = onnx_export.require_onnx()
        managed = {_record(Entry.from_dict(e))["config_file"] for e in manifest.get("entries", [])}
        try:
            config = yaml.safe_load(rc_path().read_bytes())
        except (OSError, yaml.YAMLError):
            return None
        if not isinstance(config, dict):
            return None
        config["custom_models"] = [r for r in config.get("custom_models") or [] if not _ours(r, managed)]
        return config

    def unpatch_rewrites(self, root: Path, manifest: dict) -> dict[str, bytes]:
        rc = rc_path()
        record = manifest.get("checkpoints", {}).get(str(rc))
        config = self._cleaned(manifest) if record is not None and rc.is_file() else None
        if config is None:
            return {}
        _, _, yaml = onnx_export.require_onnx()
        kept = rc.with_name(rc.name + engine.ORIG_SUFFIX)
        if record.get("preexisting"):
            if kept.is_file() and yaml.safe_load(kept.read_bytes()) == config:
                return {}  # the engine puts the original bytes back
        else:
            tree = Tree(root)
            defaults = yaml.safe_load(tree.current(self.detect(tree).extra["defaults"])) or {}
            if config == {**defaults, "custom_models": []}:
                return {}  # nothing but AnyLabeling's defaults: the engine removes the file
        return {str(rc): yaml.safe_dump(config).encode("utf-8")}

    def placement_matching(self, target: Path, record: dict, manifest: dict) -> bool | None:
        if target != rc_path():
            return None
        _, _, yaml = onnx_export.require_onnx()
        try:
            models = (yaml.safe_load(target.read_bytes()) or {}).get("custom_models") or []
        except (yaml.YAMLError, AttributeError):
            return False
        listed = {os.path.normpath(str(r.get("config_file"))) for r in models if isinstance(r, dict)}
        return all(_record(Entry.from_dict(e))["config_file"] in listed for e in manifest.get("entries", []))


ADAPTER = AnyLabelingAdapter()
