"""Files a patch adds to a tool's tree (the accelerator module, say): placed, kept, removed exactly."""

from __future__ import annotations

import json

import pytest

from medico_adapters import patching
from medico_adapters.adapters.samm import SammAdapter
from medico_adapters.engine import STATE_DIR
from tests.helpers import copy_fixture, snapshot

HELPER = "samm-python-terminal/medico_helper.py"


class WithHelper(SammAdapter):
    """samm's adapter, plus one added file while the ``helper`` option is on."""

    def added_files(self, tree, layout, options):
        return {HELPER: b"VERSION = 1\n"} if options.get("helper") else {}


ADAPTER = WithHelper()


@pytest.fixture
def tree(tmp_path):
    return copy_fixture("samm/S4", tmp_path)


def test_added_file_is_placed_recorded_and_removed_by_unpatch(tree, checkpoints):
    before = snapshot(tree)
    result = patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"], options={"helper": True})
    assert HELPER in result.changed
    assert (tree / HELPER).read_bytes() == b"VERSION = 1\n"
    manifest = json.loads((tree / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert manifest["files"][HELPER]["created"] is True
    assert not (tree / STATE_DIR / "backup" / HELPER).exists()
    assert patching.status(ADAPTER, tree)["files"][HELPER] == "patched"

    again = patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"])
    assert again.changed == [] and (tree / HELPER).is_file()  # the option is remembered

    patching.unpatch(ADAPTER, tree)
    assert snapshot(tree) == before


def test_added_file_shows_in_the_dry_run_diff_as_new(tree, checkpoints):
    result = patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"], options={"helper": True}, dry_run=True)
    assert f"--- /dev/null\n+++ b/{HELPER}\n" in result.diff
    assert not (tree / HELPER).exists()


def test_turning_the_option_off_removes_only_the_added_file(tree, checkpoints):
    plain = copy_fixture("samm/S4", tree.parent / "plain")
    patching.patch(ADAPTER, plain, checkpoint=checkpoints["plain"])
    patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"], options={"helper": True})
    result = patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"], options={"helper": False})
    assert result.changed == [HELPER]
    assert not (tree / HELPER).exists()
    manifest = json.loads((tree / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert HELPER not in manifest["files"]
    strip = lambda t: {k: v for k, v in snapshot(t).items() if not k.startswith(STATE_DIR)}  # noqa: E731
    assert strip(tree) == strip(plain)


def test_an_added_file_the_user_edited_is_not_deleted_silently(tree, checkpoints):
    patching.patch(ADAPTER, tree, checkpoint=checkpoints["plain"], options={"helper": True})
    (tree / HELPER).write_bytes(b"VERSION = 2  # mine\n")
    assert patching.status(ADAPTER, tree)["files"][HELPER] == "edited since patch"
    with pytest.raises(Exception, match="changed since it was patched"):
        patching.unpatch(ADAPTER, tree)
    assert (tree / HELPER).read_bytes() == b"VERSION = 2  # mine\n"


class WithPackage(SammAdapter):
    """samm's adapter, plus a package in folders the tree does not have."""

    def added_files(self, tree, layout, options):
        return {"samm-python-terminal/kit/helper/__init__.py": b"VERSION = 1\n"} if options.get("helper") else {}


@pytest.mark.parametrize("how", ["unpatch", "option off"])
def test_folders_made_for_an_added_file_and_its_bytecode_go_with_it(how, tree, checkpoints):
    import importlib.util
    import py_compile

    adapter = WithPackage()
    (tree / "samm-python-terminal/__pycache__").mkdir()
    (tree / "samm-python-terminal/__pycache__/utl_sam_msg.cpython-311.pyc").write_bytes(b"theirs")
    before = snapshot(tree)
    folders = sorted(p for p in tree.rglob("*") if p.is_dir())
    patching.patch(adapter, tree, checkpoint=checkpoints["plain"], options={"helper": True})
    added = tree / "samm-python-terminal/kit/helper/__init__.py"
    manifest = json.loads((tree / STATE_DIR / "manifest.json").read_text("utf-8"))
    assert manifest["files"]["samm-python-terminal/kit/helper/__init__.py"]["folders"] == [
        "samm-python-terminal/kit/helper", "samm-python-terminal/kit"]
    py_compile.compile(str(added), cfile=importlib.util.cache_from_source(str(added)))  # the tool imported it
    if how == "unpatch":
        patching.unpatch(adapter, tree)
        assert snapshot(tree) == before
    else:
        patching.patch(adapter, tree, options={"helper": False})
    assert not (tree / "samm-python-terminal/kit").exists()
    assert sorted(p for p in tree.rglob("*") if p.is_dir() and STATE_DIR not in p.parts and "samm-workspace" not in p.parts) == [
        p for p in folders if "samm-workspace" not in p.parts]
    assert (tree / "samm-python-terminal/__pycache__/utl_sam_msg.cpython-311.pyc").read_bytes() == b"theirs"
