"""patch / unpatch / status for the adapters that rewrite a tool's source."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from medico_adapters import checkpoint as ckpt_mod
from medico_adapters import engine, fsio, registry
from medico_adapters.adapters.base import Adapter, Layout, run_codemod
from medico_adapters.engine import Entry, Plan, Tree
from medico_adapters.errors import LayoutError, PatchError


@dataclass
class PatchResult:
    tool: str
    root: Path
    layout: str
    changed: list[str]
    placed: list[str]
    entries: list[Entry]
    diff: str = ""
    dry_run: bool = False
    recovered: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "tool": self.tool,
            "path": str(self.root),
            "layout": self.layout,
            "changed": self.changed,
            "placed": self.placed,
            "entries": [e.as_dict() for e in self.entries],
            "dry_run": self.dry_run,
            "already_patched": not self.changed and not self.placed,
            "recovered": self.recovered,
            "notes": self.notes,
        }


def _root(path: str | os.PathLike | None, adapter: Adapter) -> Path:
    """The tree's absolute, resolved root (state-file keys are relative to it): ``path`` at any
    level of an install the adapter knows, or the installed copy."""
    root = adapter.resolve(Path(path).expanduser() if path is not None else None).resolve()
    if not root.exists():
        raise PatchError(f"{root}: no such folder")
    if not root.is_dir():
        raise PatchError(f"{root}: is not a folder (give the tool's source tree)")
    return root


UPDATED = "replaced by an update"
EDITED = "edited since patch"


def file_states(adapter: Adapter, tree: Tree) -> dict[str, str]:
    """Each file the manifest lists: ``patched``, ``original``, ``UPDATED`` (a pristine new
    release the tool's updater put there, as far as the adapter can tell) or ``EDITED``."""
    states = {}
    for rel, record in (tree.manifest or {}).get("files", {}).items():
        data = tree.current(rel)
        now = engine.sha256_bytes(data) if data is not None else None
        if now == record.get("patched_sha256"):
            states[rel] = "patched"
        elif now == record["original_sha256"]:
            states[rel] = "original"
        elif data is not None and adapter.upstream_replaced(tree, rel, data):
            states[rel] = UPDATED
        else:
            states[rel] = EDITED
    return states


def transform_files(adapter: Adapter, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> dict[str, bytes]:
    """Upstream bytes of each layout file run through the layout's transforms, in order."""
    results = {rel: tree.original(rel) for rel in layout.files}
    if not entries:
        return results
    for step in adapter.steps(tree, layout, entries, options):
        if step.file not in results:  # a file only an option touches (samm-server's backend)
            results[step.file] = tree.original(step.file)
        before = results[step.file]
        after = run_codemod(step.transform, before, **step.kwargs)
        if after == before and getattr(step.transform, "REQUIRED", True):
            reason = getattr(step.transform, "DESCRIPTION", step.transform.__name__)
            raise LayoutError(f"{tree.path(step.file)}: {step.transform.__name__} found nothing to change ({reason})")
        results[step.file] = after
    for rel, data in results.items():
        try:
            compile(cst.parse_module(data).code, str(tree.path(rel)), "exec")
        except (SyntaxError, cst.ParserSyntaxError) as e:  # a transform bug; never write it
            raise PatchError(f"{tree.path(rel)}: the patched file would not compile ({e}); nothing was written") from None
    return results


def _source_checkpoint(checkpoint: str | os.PathLike | None, entry: Entry, trust: bool) -> ckpt_mod.Checkpoint:
    if checkpoint is None:
        if not entry.default:
            raise PatchError(f"--checkpoint is needed to add {entry.name!r}")
        checkpoint = registry.cached_path(registry.MEDICOSAM) or registry.fetch(registry.MEDICOSAM)
    loaded = ckpt_mod.load_checkpoint(checkpoint, trust=trust)
    if entry.default and loaded.info.arch != entry.arch:
        raise PatchError(
            f"{checkpoint}: holds {loaded.info.arch} weights but the MedicoSAM entry is {entry.arch}; "
            "add it under its own name with --name"
        )
    ckpt_mod.require_loadable(loaded, entry.arch)
    return loaded


def _source(loaded: ckpt_mod.Checkpoint | None, checkpoint, entry: Entry, trust: bool):
    """Load lazily, once: a dry run never reads (or downloads) the checkpoint."""
    cache: list[ckpt_mod.Checkpoint] = [loaded] if loaded is not None else []

    def source() -> ckpt_mod.Checkpoint:
        if not cache:
            cache.append(_source_checkpoint(checkpoint, entry, trust))
        return cache[0]

    return source


def plan_patch(
    adapter: Adapter,
    path: str | os.PathLike | None,
    *,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    options: dict | None = None,
    trust: bool = False,
    remove: str | None = None,
) -> tuple[Plan, Tree, Layout]:
    root = _root(path, adapter)
    tree = Tree(root)
    manifest = tree.manifest or {}
    if manifest and manifest.get("tool") != adapter.tool:
        raise PatchError(f"{root}: was patched as {manifest.get('tool')!r}, not {adapter.tool!r}")
    for rel, state in file_states(adapter, tree).items():
        if state == UPDATED:  # the tool's own updater replaced it: patch the new release
            tree.rebase(rel, tree.current(rel))
        elif state == EDITED:
            raise PatchError(
                f"{root / rel}: changed since it was patched (your edit, or a reinstalled tool); "
                f"`unpatch --force` restores the patched-from version, or delete {root / engine.STATE_DIR} if you reinstalled"
            )
    layout = adapter.detect(tree)
    entries = [Entry.from_dict(d) for d in manifest.get("entries", [])]
    previous = list(entries)
    merged_options = {**manifest.get("options", {}), **(options or {})}
    if merged_options.get("accelerate") and not adapter.accelerates:
        raise PatchError(f"{adapter.tool}: has no SAM model of its own for --accelerate to speed up")

    placements: list[engine.Placement] = []
    removals: list[Path] = []
    if remove is not None:
        match = [e for e in entries if e.name == remove]
        if not match:
            raise PatchError(f"{root}: has no patched entry named {remove!r} (entries: {', '.join(e.name for e in entries) or 'none'})")
        entries = [e for e in entries if e.name != remove]
        removals.extend(adapter.entry_targets(tree, layout, match[0], merged_options))
    else:
        loaded = None
        if name is not None:
            if checkpoint is None:
                raise PatchError("--name needs --checkpoint: the file whose weights the new entry loads")
            loaded = ckpt_mod.load_checkpoint(checkpoint, trust=trust)
            ckpt_mod.require_loadable(loaded)
            if loaded.info.arch not in adapter.supported_archs(layout):
                raise PatchError(f"{checkpoint}: {adapter.tool} ({layout.name}) cannot build {loaded.info.arch} models")
            entry = adapter.custom_entry(name, loaded.info.arch)
        else:
            entry = adapter.default_entry()
        same = [e for e in entries if e.name == entry.name]
        if same and same[0] != entry:
            raise PatchError(f"{root}: an entry named {entry.name!r} already exists with other weights; unpatch --name it first")
        if not same:
            clash = [e for e in entries if e.filename == entry.filename]
            if clash:
                raise PatchError(f"{root}: {entry.name!r} would share the checkpoint file {entry.filename} with {clash[0].name!r}")
            validate = getattr(adapter, "validate_entry", None)
            if validate is not None:
                validate(tree, layout, entry)
            entries.append(entry)
        targets = adapter.entry_targets(tree, layout, entry, merged_options)
        if checkpoint is not None or not all(_in_place(root, manifest, t) for t in targets):
            placements.extend(adapter.entry_placements(tree, layout, entry, merged_options, _source(loaded, checkpoint, entry, trust)))
    if entries:
        placements.extend(adapter.registrations(tree, layout, entries, previous, merged_options))

    files: dict[str, bytes | None] = transform_files(adapter, tree, layout, entries, merged_options)
    # A file an earlier run changed that no transform changes now (its option went off) goes back.
    for rel, record in manifest.get("files", {}).items():
        if rel not in files and not record.get("created") and tree.exists(rel):
            files[rel] = tree.original(rel)
    # Files the kit adds (not upstream's): today's set, and None for those an earlier run added.
    added = adapter.added_files(tree, layout, merged_options) if entries else {}
    earlier = [rel for rel, rec in manifest.get("files", {}).items() if rec.get("created")]
    files.update({rel: None for rel in earlier})
    files.update(added)
    current = {rel: tree.current(rel) for rel in files}
    changed = {rel: data for rel, data in files.items() if data != current[rel]}
    for rel in changed:
        engine.check_target(root, rel)
    originals = {rel: tree.original(rel) for rel in files}
    plan = Plan(
        tool=adapter.tool,
        layout=layout.name,
        root=root,
        entries=entries,
        files=changed,
        current=current,
        originals=originals,
        placements=placements,
        features=adapter.features(tree, layout, merged_options),
        options=merged_options,
        removals=removals,
    )
    return plan, tree, layout


def _in_place(root: Path, manifest: dict, target: Path) -> bool:
    """The checkpoint the manifest recorded at ``target`` is still there, unchanged."""
    record = manifest.get("checkpoints", {}).get(engine.path_key(root, target))
    return record is not None and target.is_file() and engine.sha256_file(target) == record.get("sha256")


def _materialize_placements(plan: Plan, manifest: dict) -> list[Path]:
    """Export every checkpoint before touching the tree, so a bad file fails first and alone.

    Re-placing an identical checkpoint is not a change: such placements are dropped. Returns
    the temporary files, which the commit moves into place (the caller removes any left over).
    """
    kept, temps, made = [], [], []
    try:
        for placement in plan.placements:
            tmp = fsio.temp_path(placement.target)
            engine.record_staging(plan.root, [tmp])
            temps.append(tmp)  # before writing: a half-written one is removed too
            placement.folders = engine.new_folders(plan.root, placement.target)
            made.extend(placement.folders)
            placement.write(tmp)
            placement.sha256 = engine.sha256_file(tmp)
            record = manifest.get("checkpoints", {}).get(engine.path_key(plan.root, placement.target))
            # compared with the file on disk: a tool may have rewritten a shared file to the same content
            if record and placement.target.is_file() and engine.sha256_file(placement.target) == placement.sha256:
                tmp.unlink()
                continue
            placement.write = None  # already at its staging path
            kept.append(placement)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        for key in made:  # deepest first: nothing half-made stays behind
            fsio.remove_empty_dir(engine.key_path(plan.root, key))
        raise
    plan.placements = kept
    return temps


def patch(
    adapter: Adapter,
    path: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    options: dict | None = None,
    dry_run: bool = False,
    trust: bool = False,
) -> PatchResult:
    root = _root(path, adapter)
    if dry_run:
        recovered = None
        plan, tree, layout = plan_patch(adapter, root, checkpoint=checkpoint, name=name, options=options, trust=trust)
    else:
        with engine.locked(root):
            recovered = engine.recover(root)
            plan, tree, layout = plan_patch(adapter, root, checkpoint=checkpoint, name=name, options=options, trust=trust)
            temps = _materialize_placements(plan, tree.manifest or {})
            try:
                if not plan.empty:
                    engine.commit_patch(plan)
            finally:
                for tmp in temps:
                    tmp.unlink(missing_ok=True)
    return PatchResult(
        tool=adapter.tool,
        root=root,
        layout=plan.layout,
        changed=sorted(plan.files),
        placed=[str(p.target) for p in plan.placements],
        entries=plan.entries,
        diff=plan.diff(),
        dry_run=dry_run,
        recovered=recovered,
    )


def unpatch(adapter: Adapter, path: str | os.PathLike | None = None, *, name: str | None = None, force: bool = False) -> dict:
    root = _root(path, adapter)
    with engine.locked(root):
        recovered = engine.recover(root)
        manifest = engine.read_manifest(root)
        if manifest is None:
            if recovered == "unpatch":
                return {"tool": adapter.tool, "path": str(root), "restored": [], "recovered": recovered}
            raise PatchError(f"{root}: not patched by medico-adapters (no {engine.STATE_DIR}/{engine.MANIFEST})")
        remaining = [e for e in manifest.get("entries", []) if e["name"] != name]
        if name is not None and remaining:
            plan, _, _ = plan_patch(adapter, root, remove=name)
            engine.commit_patch(plan)
            return {"tool": adapter.tool, "path": str(root), "removed_entry": name, "changed": sorted(plan.files)}
        if name is not None and len(remaining) == len(manifest.get("entries", [])):
            raise PatchError(f"{root}: has no patched entry named {name!r}")
        # A release the tool's updater installed over the patch stays: it is newer than the backup.
        updated = {rel for rel, state in file_states(adapter, Tree(root)).items() if state == UPDATED}
        restored = engine.commit_unpatch(
            root, manifest, force=force, keep=updated, rewrites=adapter.unpatch_rewrites(root, manifest),
        )
    return {"tool": adapter.tool, "path": str(root), "restored": restored, "recovered": recovered}


def status(adapter: Adapter, path: str | os.PathLike | None = None) -> dict:
    root = _root(path, adapter)
    tree = Tree(root)
    pending = (root / engine.STATE_DIR / engine.JOURNAL).exists()
    try:
        layout = adapter.detect(tree)
        layout_name, layout_desc = layout.name, layout.description
    except LayoutError as e:
        layout, layout_name, layout_desc = None, None, str(e)
    manifest = tree.manifest
    files = file_states(adapter, tree)
    checkpoints = []
    if manifest:
        for key, record in manifest.get("checkpoints", {}).items():
            target = engine.key_path(root, key)
            present = target.is_file()
            matching = adapter.placement_matching(target, record, manifest) if present else False
            checkpoints.append({
                "path": str(target),
                "entry": record.get("entry"),
                "present": present,
                "matching": present and (engine.sha256_file(target) == record.get("sha256") if matching is None else matching),
            })
    patched = bool(manifest) and all(v == "patched" for v in files.values())
    return {
        "tool": adapter.tool,
        "path": str(root),
        "layout": layout_name,
        "layout_description": layout_desc,
        "patched": patched,
        "kit_version": manifest.get("kit_version") if manifest else None,
        "entries": manifest.get("entries", []) if manifest else [],
        "features": manifest.get("features", []) if manifest else [],
        "files": files,
        "checkpoints": checkpoints,
        "interrupted": pending,
    }

