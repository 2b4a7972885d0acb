"""Patches as data: plan in memory, show as a diff, commit all files at once, undo byte for byte.

State lives in ``<root>/.medico-adapters/``:

* ``manifest.json`` -- tool, layout, kit version, entries, and per changed file the hashes of its
  original and patched bytes; per placed checkpoint its path, hash and what was there before;
* ``backup/<relpath>`` -- the original bytes of every changed file;
* ``journal.json`` -- present only while a commit is under way: every staged temporary file is
  complete and fsynced before the journal appears, so an interrupted run is rolled forward by the
  next ``patch``/``unpatch``/``status`` (and without a journal, staged files are just removed);
* ``lock`` -- an ``flock`` so that two runs on one tree serialise.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medico_adapters import __version__
from medico_adapters.errors import PatchError

STATE_DIR = ".medico-adapters"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
STAGING = "staging.json"
TMP_SUFFIX = ".medico-adapters.tmp"
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


@dataclass
class Plan:
    tool: str
    layout: str
    root: Path
    entries: list[Entry]
    files: dict[str, bytes]  # relpath -> new bytes (only files that differ from the current ones)
    current: dict[str, bytes]  # relpath -> bytes on disk now
    originals: dict[str, bytes]  # relpath -> upstream bytes
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
            old = self.current.get(rel, b"")
            out.extend(
                difflib.unified_diff(
                    old.decode("utf-8", "replace").splitlines(keepends=True),
                    new.decode("utf-8", "replace").splitlines(keepends=True),
                    fromfile=f"a/{rel}",
                    tofile=f"b/{rel}",
                    n=3,
                )
            )
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in out)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Tree:
    """A tool's source tree seen through its manifest: ``original()`` gives upstream bytes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state = self.root / STATE_DIR
        self.manifest = read_manifest(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def current(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def original(self, rel: str) -> bytes:
        if self.manifest and rel in self.manifest.get("files", {}):
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Steps:
    """Counts commit steps; the test hook kills the process at a chosen one."""

    def __init__(self) -> None:
        self.n = 0
        kill_at = os.environ.get(KILL_AT_ENV)
        self.kill_at = int(kill_at) if kill_at else None

    def __call__(self) -> None:
        self.n += 1
        if self.kill_at is not None and self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold an ``flock`` on the tree's state folder; a second run waits
    (up to $MEDICO_ADAPTERS_LOCK_TIMEOUT seconds, default 120), then refuses."""
    import fcntl

    state = Path(root) / STATE_DIR
    try:
        state.mkdir(exist_ok=True)
    except OSError as e:
        raise PatchError(f"{state}: cannot create the kit's state folder ({e.strerror})") from None
    fd = os.open(state, os.O_RDONLY)
    deadline = time.monotonic() + float(os.environ.get(LOCK_TIMEOUT_ENV, "120"))
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise PatchError(f"{root}: another medico-adapters run is patching this tree") from None
                time.sleep(0.05)
        yield
    finally:
        # A tree that ends unpatched keeps no state folder (removed while still locked).
        if not (state / MANIFEST).exists() and not (state / JOURNAL).exists():
            shutil.rmtree(state, ignore_errors=True)
        os.close(fd)


def check_target(root: Path, rel: str) -> Path:
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise PatchError(f"{path}: resolves outside the tool's tree ({real}); refusing to write through it")
    if path.exists() and not os.access(path, os.W_OK):
        raise PatchError(f"{path}: is read-only; make it writable or run as its owner")
    if not os.access(path.parent, os.W_OK):
        raise PatchError(f"{path.parent}: folder is not writable")
    return real


# --- the journal -----------------------------------------------------------------------------


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
            for tmp in _read_json(staging, default=[]):
                Path(tmp).unlink(missing_ok=True)
            staging.unlink()
        return None
    journal = _read_json(journal_path, default=None)
    if journal is None:
        raise PatchError(f"{journal_path}: damaged journal; inspect the tree by hand")
    _roll_forward(journal, _Steps())
    journal_path.unlink()
    (state / STAGING).unlink(missing_ok=True)
    _fsync_dir(state)
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
    _atomic_write(staging, json.dumps(sorted(set(known) | {str(p) for p in paths})).encode())


def _roll_forward(journal: dict, step: _Steps) -> None:
    for op in journal["ops"]:
        target = Path(op["target"])
        if op["kind"] == "replace":
            tmp = Path(op["tmp"])
            if tmp.exists():
                if op.get("keep_old"):
                    old = Path(op["keep_old"])
                    if target.exists() and not old.exists():
                        os.replace(target, old)
                        step()
                os.replace(tmp, target)
                step()
        elif op["kind"] == "remove":
            if target.is_dir():
                shutil.rmtree(target)
                step()
            elif target.exists():
                target.unlink()
                step()
        elif op["kind"] == "restore":  # move a kept-aside file back
            src = Path(op["source"])
            if src.exists():
                os.replace(src, target)
                step()


def _commit(root: Path, action: str, stage: list, ops: list[dict], step: _Steps) -> None:
    """Stage every new file, write the journal, then apply ``ops`` in order."""
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    _stage_only(root, stage, step)
    _atomic_write(state / JOURNAL, json.dumps({"action": action, "ops": ops}, indent=1).encode())
    _fsync_dir(state)
    step()
    _roll_forward({"ops": ops}, step)
    (state / JOURNAL).unlink()
    (state / STAGING).unlink(missing_ok=True)
    _fsync_dir(state)
    step()


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
        if rel not in files:
            backup = state / "backup" / rel
            stage.append((backup.with_name(backup.name + TMP_SUFFIX), plan.originals[rel]))
            ops.append({"kind": "replace", "target": str(backup), "tmp": str(backup.with_name(backup.name + TMP_SUFFIX))})
            files[rel] = {"original_sha256": sha256_bytes(plan.originals[rel])}
        tmp = real.with_name(real.name + TMP_SUFFIX)
        stage.append((tmp, new))
        ops.append({"kind": "replace", "target": str(real), "tmp": str(tmp)})
        if new == plan.originals[rel]:
            files.pop(rel)
            ops.append({"kind": "remove", "target": str(state / "backup" / rel)})
        else:
            files[rel]["patched_sha256"] = sha256_bytes(new)

    checkpoints = dict(old.get("checkpoints", {}))
    for placement in plan.placements:
        target = placement.target
        tmp = target.with_name(target.name + TMP_SUFFIX)
        stage.append((tmp, placement.write))
        record = checkpoints.get(str(target))
        op = {"kind": "replace", "target": str(target), "tmp": str(tmp)}
        if record is None:
            record = {"entry": placement.entry.name, "preexisting": target.exists()}
            if target.exists():
                op["keep_old"] = str(target.with_name(target.name + ORIG_SUFFIX))
        ops.append(op)
        checkpoints[str(target)] = record
    for target in plan.removals:
        record = checkpoints.pop(str(target), None)
        ops.append({"kind": "remove", "target": str(target)})
        if record and record.get("preexisting"):
            ops.append({"kind": "restore", "target": str(target), "source": str(target.with_name(target.name + ORIG_SUFFIX))})

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

    def _finish_manifest(data: dict) -> bytes:
        return json.dumps(data, indent=2, sort_keys=True).encode()

    # Checkpoint hashes are known only once written, so the manifest is staged last.
    _stage_only(root, stage, step)
    for placement in plan.placements:
        tmp = placement.target.with_name(placement.target.name + TMP_SUFFIX)
        checkpoints[str(placement.target)]["sha256"] = placement.sha256 or sha256_file(tmp)
    manifest_tmp = state / (MANIFEST + TMP_SUFFIX)
    ops.append({"kind": "replace", "target": str(state / MANIFEST), "tmp": str(manifest_tmp)})
    _commit(root, "patch", [(manifest_tmp, _finish_manifest(manifest))], ops, step)
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
                with open(tmp, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            done.append(tmp)
            step()
    except BaseException:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        raise


def commit_unpatch(root: Path, manifest: dict, *, force: bool = False, rewrites: dict[str, bytes] | None = None) -> list[str]:
    """Restore every changed file and remove placed checkpoints; returns the restored paths.

    A placed file named in ``rewrites`` gets those bytes instead (the tool rewrote a shared
    file since the patch, so restoring its old bytes would undo the tool's own changes too).
    """
    rewrites = rewrites or {}
    state = root / STATE_DIR
    step = _Steps()
    edited = []
    for rel, record in manifest["files"].items():
        path = root / rel
        now = sha256_bytes(path.read_bytes()) if path.exists() else None
        if now not in (record.get("patched_sha256"), record["original_sha256"]):
            edited.append(rel)
    if edited and not force:
        raise PatchError(f"{root / edited[0]}: changed since it was patched; pass --force to restore it anyway")
    stage, ops, restored = [], [], []
    for rel in sorted(manifest["files"]):
        backup = state / "backup" / rel
        if not backup.is_file():
            raise PatchError(f"{backup}: backup of a patched file is missing; cannot restore {rel}")
        real = check_target(root, rel)
        tmp = real.with_name(real.name + TMP_SUFFIX)
        stage.append((tmp, backup.read_bytes()))
        ops.append({"kind": "replace", "target": str(real), "tmp": str(tmp)})
        restored.append(rel)
    for target, record in manifest.get("checkpoints", {}).items():
        kept = Path(target).with_name(Path(target).name + ORIG_SUFFIX)
        if target in rewrites:
            tmp = Path(target).with_name(Path(target).name + TMP_SUFFIX)
            stage.append((tmp, rewrites[target]))
            ops.append({"kind": "replace", "target": target, "tmp": str(tmp)})
            if record.get("preexisting"):
                ops.append({"kind": "remove", "target": str(kept)})
            continue
        ops.append({"kind": "remove", "target": target})
        if record.get("preexisting"):
            ops.append({"kind": "restore", "target": target, "source": str(kept)})
    ops.append({"kind": "remove", "target": str(state / MANIFEST)})
    ops.append({"kind": "remove", "target": str(state / "backup")})
    _commit(root, "unpatch", stage, ops, step)
    return restored

