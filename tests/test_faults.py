"""kill -9 at every commit step of a five-file samm patch; every state must be recoverable.

The engine's test hook (MEDICO_ADAPTERS_TEST_KILL_AT=N) sends SIGKILL to the real CLI process at
its N-th commit step, which makes each kill point deterministic.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medico_adapters import patching
from medico_adapters.adapters.samm import ADAPTER
from medico_adapters.engine import KILL_AT_ENV, STATE_DIR
from medico_adapters.errors import PatchError
from tests.helpers import copy_fixture, snapshot

#: how a process killed by the engine's test hook ends (Windows: TerminateProcess with SIGTERM's number).
KILLED = signal.SIGTERM if os.name == "nt" else -signal.SIGKILL


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "medico_adapters", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _source(tree: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(tree).items() if not k.startswith(STATE_DIR) and "samm-workspace" not in k}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoints):
    tmp = tmp_path_factory.mktemp("ref")
    original = copy_fixture("samm/S4", tmp / "orig")
    patched = copy_fixture("samm/S4", tmp / "patched")
    patching.patch(ADAPTER, patched, checkpoint=checkpoints["plain"])
    return _source(original), _source(patched)


def test_kill_at_every_step_is_recoverable(tmp_path, checkpoints, reference):
    original, patched = reference
    touched = [k for k in original if original[k] != patched[k]]
    assert len(touched) == 5  # both mappers, the combo, the server, sam_server.py
    kill_points = 0
    for step in range(1, 200):
        tree = copy_fixture("samm/S4", tmp_path / f"k{step}")
        proc = _cli(["patch", "samm", "--path", str(tree), "--checkpoint", str(checkpoints["plain"])], {KILL_AT_ENV: str(step)})
        if proc.returncode == 0:
            break
        assert proc.returncode == KILLED, proc.stderr
        kill_points += 1
        now = _source(tree)
        for rel in touched:  # every file is whole: its original bytes or its patched bytes
            assert now[rel] in (original[rel], patched[rel]), (step, rel)
        if step % 2:
            patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
            assert _source(tree) == patched, step
            assert patching.status(ADAPTER, tree)["patched"]
            assert patching.status(ADAPTER, tree)["checkpoints"][0]["matching"]
        else:
            try:
                patching.unpatch(ADAPTER, tree)
            except PatchError as e:  # killed before the commit point: nothing to restore
                assert "not patched" in str(e)
            assert _source(tree) == original, step
            assert not (tree / STATE_DIR).exists()
            leftovers = [p for p in tree.rglob("*.medico-adapters.tmp")]
            assert leftovers == [], step
        shutil.rmtree(tree)  # each step's tree holds a 358 MB checkpoint: keep the disk small
    print(f"kill points recovered: {kill_points}")
    assert kill_points >= 25


def test_two_concurrent_patches_end_like_one(tmp_path, checkpoints, reference):
    _, patched = reference
    tree = copy_fixture("samm/S4", tmp_path / "t")
    args = [sys.executable, "-m", "medico_adapters", "patch", "samm", "--path", str(tree), "--checkpoint", str(checkpoints["plain"])]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert _source(tree) == patched
    assert sum("already patched" in r[0] for r in results) == 1
