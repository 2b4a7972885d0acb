"""Patches as data: plan in memory, show as a diff, commit all files at once, undo byte for byte.

State lives in ``<root>/.medico-adapters/``:

* ``manifest.json`` -- tool, layout, kit version, entries, and per changed file the hashes of its
  original and patched bytes (a file the kit adds is ``created``, with the folders it created for
  it, which go again with its bytecode when it is removed); per placed checkpoint its path, hash
  and what was there before;
* ``backup/<relpath>`` -- the original bytes of every changed file;
* ``journal.json`` -- present only while a commit is under way: every staged temporary file is
  complete and fsynced before the journal appears, so an interrupted run is rolled forward by the
  next ``patch``/``unpatch``/``status`` (and without a journal, staged files are just removed).

Paths in the manifest, the journal and the staging list are relative to the tree root (POSIX
separators), so the tree can be inspected, restored or recovered from any working folder, and
moved as a whole. Only places outside the tree (napari-sam's cache, say) are stored absolute.

Two runs on one tree serialise on a ``filelock`` kept in the kit's cache, named after the tree's
resolved path: ``unpatch`` removes the state folder, so the lock cannot live there. All writing
goes through :mod:`medico_adapters.fsio`, which is where Linux, macOS and Windows differ.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import filelock

from medico_adapters import __version__, fsio
from medico_adapters.errors import PatchError

STATE_DIR = ".medico-adapters"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
STAGING = "staging.json"
TMP_SUFFIX = fsio.TMP_SUFFIX
ORIG_SUFFIX = ".medico-adapters.orig"
LOCK_TIMEOUT_ENV = "MEDICO_ADAPTERS_LOCK_TIMEOUT"
#: test hook: ``kill -9`` ourselves at the N-th commit step (see tests/test_faults.py).
KILL_AT_ENV = "MEDICO_ADAPTERS_TEST_KILL_AT"


@dataclass(frozen=True)
class Entry:
    """One model offered by the patched tool."""

    name: str
    arch: str
    filename: str
    default: bool = False

    def as_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "filename": self.filename, "default": self.default}

    @classmethod
    def from_dict(cls, data: dict) -> Entry:
        return cls(data["name"], data["arch"], data["filename"], bool(data.get("default", False)))


@dataclass
class Placement:
    """A checkpoint to put where the tool reads it; ``write`` saves it to a temporary path."""

    entry: Entry
    target: Path
    write: Callable[[Path], Path] | None = None
    sha256: str | None = None  # of the staged file, once written
    #: keys of the folders that did not exist before it was staged (``new_folders``); unpatch
    #: removes them again, if empty by then.
    folders: list[str] | None = None


@dataclass
class Plan:
    tool: str
    layout: str
    root: Path
    entries: list[Entry]
    # relpath -> new bytes (only files that differ from the current ones); None removes a file
    # the kit added earlier.
    files: dict[str, bytes | None]
    current: dict[str, bytes | None]  # relpath -> bytes on disk now (None: absent)
    originals: dict[str, bytes | None]  # relpath -> upstream bytes (None: the kit adds the file)
    placements: list[Placement] = field(default_factory=list)
    removals: list[Path] = field(default_factory=list)  # placed checkpoints to take away
    features: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.files and not self.placements and not self.removals

    def diff(self) -> str:
        out = []
        for rel, new in sorted(self.files.items()):
            old = self.current.get(rel)
            out.extend(
                difflib.unified_diff(
                    (old or b"").decode("utf-8", "replace").splitlines(keepends=True),
                    (new or b"").decode("utf-8", "replace").splitlines(keepends=True),
                    fromfile=f"a/{rel}" if old is not None else "/dev/null",
                    tofile=f"b/{rel}" if new is not None else "/dev/null",
                    n=3,
                )
            )
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in out)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


sha256_file = fsio.sha256_file


def path_key(root: Path, path: Path) -> str:
    """How the state files name ``path``: relative to the tree root when inside it, else absolute."""
    path = Path(path)
    try:
        return PurePosixPath(*path.relative_to(root).parts).as_posix()
    except ValueError:
        return str(path)


def key_path(root: Path, key: str) -> Path:
    """The path a state-file key names (absolute keys, as older manifests wrote, stay as they are)."""
    return Path(root) / key


class Tree:
    """A tool's source tree seen through its manifest: ``original()`` gives upstream bytes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state = self.root / STATE_DIR
        self.manifest = read_manifest(self.root)
        self.rebased: dict[str, bytes] = {}

    def rebase(self, rel: str, data: bytes) -> None:
        """Take ``data`` as the upstream bytes of ``rel`` (the tool was updated over the patch)."""
        self.rebased[rel] = data

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def current(self, rel: str) -> bytes | None:
        path = self.path(rel)
        return path.read_bytes() if path.is_file() else None

    def original(self, rel: str) -> bytes | None:
        """Upstream bytes; None for a file upstream does not have (one the kit adds)."""
        if rel in self.rebased:
            return self.rebased[rel]
        record = (self.manifest or {}).get("files", {}).get(rel)
        if record is not None:
            if record.get("created"):
                return None
            backup = self.state / "backup" / rel
            if not backup.is_file():
                raise PatchError(f"{backup}: backup of a patched file is missing; the manifest is damaged")
            return backup.read_bytes()
        return self.current(rel)


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / STATE_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, OSError) as e:
        raise PatchError(f"{path}: damaged manifest ({e}); restore it or reinstall the tool") from None
    return data


class _Steps:
    """Counts commit steps; the test hook kills the process at a chosen one."""

    def __init__(self) -> None:
        self.n = 0
        kill_at = os.environ.get(KILL_AT_ENV)
        self.kill_at = int(kill_at) if kill_at else None

    def __call__(self) -> None:
        self.n += 1
        if self.kill_at is not None and self.n == self.kill_at:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def lock_path(root: Path) -> Path:
    """The lock file for a tree: in the kit's cache, so ``unpatch`` never deletes it mid-run."""
    from medico_adapters.registry import cache_dir

    digest = hashlib.sha256(os.path.normcase(str(Path(root).resolve())).encode("utf-8")).hexdigest()[:24]
    return cache_dir() / "locks" / f"{digest}.lock"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the tree's lock; a second run waits (up to $MEDICO_ADAPTERS_LOCK_TIMEOUT seconds,
    default 120), then refuses."""
    state = Path(root) / STATE_DIR
    lock = lock_path(root)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PatchError(f"{lock.parent}: cannot create the kit's lock folder ({e.strerror})") from None
    try:
        with filelock.FileLock(lock, timeout=float(os.environ.get(LOCK_TIMEOUT_ENV, "120"))):
            try:
                state.mkdir(exist_ok=True)
            except OSError as e:
                raise PatchError(f"{state}: cannot create the kit's state folder ({e.strerror})") from None
            try:
                yield
            finally:
                # A tree that ends unpatched keeps no state folder (removed while still locked).
                if not (state / MANIFEST).exists() and not (state / JOURNAL).exists():
                    shutil.rmtree(state, ignore_errors=True)
    except filelock.Timeout:
        raise PatchError(f"{root}: another medico-adapters run is patching this tree") from None


def check_target(root: Path, rel: str) -> Path:
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise PatchError(f"{path}: resolves outside the tool's tree ({real}); refusing to write through it")
    if path.exists() and not os.access(path, os.W_OK):
        raise PatchError(f"{path}: is read-only; make it writable or run as its owner")
    folder = path.parent
    while not folder.exists() and folder.parent != folder:  # a file the kit adds, in a new folder
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise PatchError(f"{folder}: folder is not writable")
    return real


# --- the journal -----------------------------------------------------------------------------
# Every path in the journal and the staging list is a key (see ``path_key``), resolved against the
# tree root only when used, so a run from another working folder finishes the same commit.


def _write_state(path: Path, data: bytes) -> None:
    """State files use a fixed temporary name, so a killed write leaves nothing new behind."""
    fsio.atomic_write(path, data, tmp=fsio.temp_path(path))


def recover(root: Path) -> str | None:
    """Finish a commit that was interrupted; returns what was done (None if nothing was pending).

    With a journal every staged file is complete, so the commit is rolled forward. Without one
    the run died while staging: its temporary files (listed in ``staging.json``) are removed.
    """
    state = Path(root) / STATE_DIR
    journal_path = state / JOURNAL
    if not journal_path.exists():
        staging = state / STAGING
        if staging.exists():
            for key in _read_json(staging, default=[]):
                fsio.remove(key_path(root, key))
            fsio.remove(staging)
        return None
    journal = _read_json(journal_path, default=None)
    if journal is None:
        raise PatchError(f"{journal_path}: damaged journal; inspect the tree by hand")
    _roll_forward(root, journal, _Steps())
    _finish_commit(state)
    return journal.get("action", "commit")


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text("utf-8"))
    except (ValueError, OSError):
        return default


def record_staging(root: Path, paths: list[Path]) -> None:
    """Note temporary files before creating them, so a killed run's leftovers can be removed."""
    staging = Path(root) / STATE_DIR / STAGING
    known = _read_json(staging, default=[]) if staging.exists() else []
    _write_state(staging, json.dumps(sorted(set(known) | {path_key(root, p) for p in paths})).encode())


def _roll_forward(root: Path, journal: dict, step: _Steps) -> None:
    for op in journal["ops"]:
        target = key_path(root, op["target"])
        if op["kind"] == "replace":
            tmp = key_path(root, op["tmp"])
            if tmp.exists():
                if op.get("keep_old"):
                    old = key_path(root, op["keep_old"])
                    if target.exists() and not old.exists():
                        fsio.replace(target, old)
                        step()
                fsio.replace(tmp, target)
                step()
        elif op["kind"] == "remove":
            if target.is_dir():
                shutil.rmtree(target)
                step()
            elif target.exists():
                fsio.remove(target)
                step()
        elif op["kind"] == "remove_bytecode":  # the tool imported an added module: its cached bytecode
            cache = target.parent / "__pycache__"
            for pyc in sorted(cache.glob(f"{target.stem}.*.pyc")) if cache.is_dir() else ():
                fsio.remove(pyc)
                step()
            fsio.remove_empty_dir(cache)
        elif op["kind"] == "remove_dir":  # a folder the kit created for an added file, if now empty
            if target.is_dir():
                fsio.remove_empty_dir(target)
                step()
        elif op["kind"] == "restore":  # move a kept-aside file back
            src = key_path(root, op["source"])
            if src.exists():
                fsio.replace(src, target)
                step()


def _finish_commit(state: Path) -> None:
    fsio.remove(state / JOURNAL)
    fsio.remove(state / STAGING)
    fsio.fsync_dir(state)


def _commit(root: Path, action: str, stage: list, ops: list[dict], step: _Steps) -> None:
    """Stage every new file, write the journal, then apply ``ops`` in order."""
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    _stage_only(root, stage, step)
    _write_state(state / JOURNAL, json.dumps({"action": action, "ops": ops}, indent=1).encode())
    step()
    _roll_forward(root, {"ops": ops}, step)
    _finish_commit(state)
    step()


def _replace_op(root: Path, target: Path, tmp: Path, **extra: str) -> dict:
    return {"kind": "replace", "target": path_key(root, target), "tmp": path_key(root, tmp), **extra}


def new_folders(root: Path, target: Path) -> list[str]:
    """Keys of the folders above ``target`` that do not exist yet (deepest first): the folders made
    for an added file or a placed checkpoint, which removing it removes again (if empty by then)."""
    folders, folder = [], target.parent
    while folder != root and folder.parent != folder and not folder.exists():
        folders.append(path_key(root, folder))
        folder = folder.parent
    return folders


def _remove_dirs(record: dict | None) -> list[dict]:
    """Ops that remove the folders made for a file, deepest first, each only if empty by then."""
    return [{"kind": "remove_dir", "target": folder} for folder in (record or {}).get("folders", [])]


def _remove_added(root: Path, rel: str, record: dict) -> list[dict]:
    """Ops that take an added file away with what it brought: its bytecode (the tool imported it)
    and the folders created for it."""
    key = path_key(root, check_target(root, rel))
    ops = [{"kind": "remove", "target": key}]
    if rel.endswith(".py"):
        ops.append({"kind": "remove_bytecode", "target": key})
    return ops + _remove_dirs(record)


def commit_patch(plan: Plan) -> dict:
    """Write ``plan`` all-or-nothing and return the new manifest."""
    root = plan.root
    state = root / STATE_DIR
    old = read_manifest(root) or {"files": {}, "checkpoints": {}}
    step = _Steps()
    stage: list = []
    ops: list[dict] = []

    files = dict(old.get("files", {}))
    for rel, new in sorted(plan.files.items()):
        real = check_target(root, rel)
        original = plan.originals[rel]
        rebased = original is not None and rel in files and files[rel]["original_sha256"] != sha256_bytes(original)
        if rel not in files or rebased:
            if original is None:
                files[rel] = {"original_sha256": None, "created": True}
                folders = new_folders(root, root / rel)
                if folders:
                    files[rel]["folders"] = folders
            else:
                backup = state / "backup" / rel
                stage.append((fsio.temp_path(backup), original))
                ops.append(_replace_op(root, backup, fsio.temp_path(backup)))
                files[rel] = {"original_sha256": sha256_bytes(original)}
        if new is None:
            ops.extend(_remove_added(root, rel, files[rel]))
        else:
            tmp = fsio.temp_path(real)
            stage.append((tmp, new))
            ops.append(_replace_op(root, real, tmp))
        if new == original:
            files.pop(rel)
            if original is not None:
                ops.append({"kind": "remove", "target": path_key(root, state / "backup" / rel)})
        else:
            files[rel]["patched_sha256"] = sha256_bytes(new)

    checkpoints = dict(old.get("checkpoints", {}))
    for placement in plan.placements:
        target, key = placement.target, path_key(root, placement.target)
        tmp = fsio.temp_path(target)
        stage.append((tmp, placement.write))
        record = checkpoints.get(key)
        extra = {}
        if record is None:
            record = {"entry": placement.entry.name, "preexisting": target.exists()}
            if target.exists():
                extra["keep_old"] = path_key(root, target.with_name(target.name + ORIG_SUFFIX))
            else:  # e.g. samm's samm-workspace/, which no release ships
                folders = placement.folders if placement.folders is not None else new_folders(root, target)
                if folders:
                    record["folders"] = folders
        ops.append(_replace_op(root, target, tmp, **extra))
        checkpoints[key] = record
    for target in plan.removals:
        key = path_key(root, target)
        record = checkpoints.pop(key, None)
        ops.append({"kind": "remove", "target": key})
        if record and record.get("preexisting"):
            ops.append({"kind": "restore", "target": key, "source": path_key(root, target.with_name(target.name + ORIG_SUFFIX))})
        ops.extend(_remove_dirs(record))

    manifest = {
        "tool": plan.tool,
        "layout": plan.layout,
        "kit_version": __version__,
        "entries": [e.as_dict() for e in plan.entries],
        "features": plan.features,
        "options": plan.options,
        "files": files,
        "checkpoints": checkpoints,
    }

    # Checkpoint hashes are known only once written, so the manifest is staged last.
    _stage_only(root, stage, step)
    for placement in plan.placements:
        tmp = fsio.temp_path(placement.target)
        checkpoints[path_key(root, placement.target)]["sha256"] = placement.sha256 or sha256_file(tmp)
    manifest_tmp = fsio.temp_path(state / MANIFEST)
    ops.append(_replace_op(root, state / MANIFEST, manifest_tmp))
    _commit(root, "patch", [(manifest_tmp, json.dumps(manifest, indent=2, sort_keys=True).encode())], ops, step)
    return manifest


def _stage_only(root: Path, stage: list, step: _Steps) -> None:
    record_staging(root, [tmp for tmp, _ in stage])
    done: list[Path] = []
    try:
        for tmp, payload in stage:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if payload is None:  # written to its staging path already
                if not tmp.is_file():
                    raise PatchError(f"{tmp}: staged file vanished before the commit")
            elif callable(payload):
                payload(tmp)
            else:
                fsio.write_file(tmp, payload)
            done.append(tmp)
            step()
    except BaseException:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        raise


def commit_unpatch(
    root: Path, manifest: dict, *, force: bool = False, keep: set[str] = frozenset(),
    rewrites: dict[str, bytes] | None = None,
) -> list[str]:
    """Restore every changed file (but those in ``keep``) and remove placed files; returns the
    restored paths.

    A placed file whose manifest key is in ``rewrites`` gets those bytes instead (the tool
    rewrote a shared file since the patch, so restoring its old bytes would undo the tool's own
    changes too).
    """
    rewrites = rewrites or {}
    state = root / STATE_DIR
    step = _Steps()
    edited = []
    for rel, record in manifest["files"].items():
        if rel in keep:
            continue
        path = root / rel
        now = sha256_bytes(path.read_bytes()) if path.exists() else None
        if now not in (record.get("patched_sha256"), record["original_sha256"]):
            edited.append(rel)
    if edited and not force:
        raise PatchError(f"{root / edited[0]}: changed since it was patched; pass --force to restore it anyway")
    stage, ops, restored = [], [], []
    for rel in sorted(set(manifest["files"]) - set(keep)):
        if manifest["files"][rel].get("created"):
            ops.extend(_remove_added(root, rel, manifest["files"][rel]))
            restored.append(rel)
            continue
        backup = state / "backup" / rel
        if not backup.is_file():
            raise PatchError(f"{backup}: backup of a patched file is missing; cannot restore {rel}")
        real = check_target(root, rel)
        tmp = fsio.temp_path(real)
        stage.append((tmp, backup.read_bytes()))
        ops.append(_replace_op(root, real, tmp))
        restored.append(rel)
    for key, record in manifest.get("checkpoints", {}).items():
        target = key_path(root, key)
        kept = target.with_name(target.name + ORIG_SUFFIX)
        if key in rewrites:
            tmp = fsio.temp_path(target)
            stage.append((tmp, rewrites[key]))
            ops.append(_replace_op(root, target, tmp))
            if record.get("preexisting"):
                ops.append({"kind": "remove", "target": path_key(root, kept)})
            continue
        ops.append({"kind": "remove", "target": key})
        if record.get("preexisting"):
            ops.append({"kind": "restore", "target": key, "source": path_key(root, kept)})
        ops.extend(_remove_dirs(record))
    ops.append({"kind": "remove", "target": path_key(root, state / MANIFEST)})
    ops.append({"kind": "remove", "target": path_key(root, state / "backup")})
    _commit(root, "unpatch", stage, ops, step)
    return restored
