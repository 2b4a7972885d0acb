"""The compatibility workflow's jobs come from nox: every integration session, on every OS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from integration import matrix

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "compatibility.yml"


def _nox(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nox", "--noxfile", str(ROOT / "noxfile.py"), *args],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def sessions():
    return matrix.nox_sessions()


@pytest.fixture(scope="module")
def include(sessions):
    return matrix.matrix(sessions, matrix.git_tools())


def test_every_integration_session_runs_on_every_os(include):
    listed = _nox("--list", "--json", "-t", "integration")
    assert listed.returncode == 0, listed.stderr
    integration = {s["session"] for s in json.loads(listed.stdout)}
    assert {"micro_sam", "samm", "slicer", "napari_sam(release='0.4.13')"} <= integration
    cells = {(cell["session"], cell["os"]) for cell in include}
    assert {(name, runner) for name in integration for runner in matrix.RUNNERS} <= cells


def test_every_tagged_session_has_jobs_and_untagged_ones_do_not(sessions, include):
    tagged = {s["session"] for s in sessions if s["tags"]}
    assert {cell["session"] for cell in include} == tagged
    assert not {"tests", "lint"} & tagged


def test_a_session_added_with_new_tags_gets_jobs_and_gui_gets_xvfb_on_linux_only():
    added = [{"session": "napari-sam-gui-newest", "tags": ["gui", "napari-sam"]},
             {"session": "anylabeling", "tags": ["integration", "anylabeling"]}]
    cells = {(c["session"], c["os"]): c for c in matrix.matrix(added, matrix.git_tools())}
    assert len(cells) == 2 * len(matrix.RUNNERS)
    assert [runner for (name, runner), c in cells.items() if c["xvfb"]] == ["ubuntu-latest"]
    assert cells[("napari-sam-gui-newest", "ubuntu-latest")]["xvfb"]
    assert not any(c["checkout-repo"] or c["experimental"] for c in cells.values())


@pytest.mark.parametrize(("tag", "tool"), [("samm", "samm"), ("slicer", "slicer-segment-with-sam")])
def test_checkout_jobs_clone_each_tested_commit_and_the_newest_may_fail(include, tag, tool):
    from medico_adapters.install import GIT_TOOLS

    cells = [c for c in include if c["session"] == tag and c["os"] == "ubuntu-latest"]
    assert [c["checkout-ref"] for c in cells] == [*GIT_TOOLS[tool]["refs"], ""]
    assert [c["experimental"] for c in cells] == [False] * len(GIT_TOOLS[tool]["refs"]) + [True]
    assert {c["checkout-repo"] for c in cells} == {GIT_TOOLS[tool]["url"].removeprefix("https://github.com/")}


@pytest.mark.parametrize("tag", sorted(matrix.CHECKOUTS))
def test_the_checkout_session_reads_the_variable_the_job_sets(sessions, tag):
    """Without the variable the session skips and names it: so the job's variable is the one read."""
    env_var = matrix.CHECKOUTS[tag][1]
    (name,) = [s["session"] for s in sessions if tag in s["tags"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDICO_")}
    result = _nox("--no-venv", "-s", name, env=env)
    assert result.returncode == 0, result.stderr
    assert f"Session {name} skipped: set {env_var} to a checkout" in result.stderr


def test_git_tools_read_from_source_equal_the_imported_ones():
    from medico_adapters.install import GIT_TOOLS

    assert matrix.git_tools() == GIT_TOOLS


def test_napari_sam_all_shards_split_every_shipped_release_once(sessions):
    shipped = [p.stem for p in (ROOT / "patches" / "napari-sam").glob("*.diff")]
    shards = [SpecifierSet(s["call_spec"]["releases"]) for s in sessions if "napari-sam-all" in s["tags"]]
    assert len(shipped) >= 49 and len(shards) >= 3
    for version in shipped:
        assert sum(version in shard for shard in shards) == 1, version
    # One shard of 13 releases took 207 s of CPU (10 min wall on a shared 2-core machine): keep
    # shards about that size so a job on a runner stays near 5 minutes.
    assert max(len(list(shard.filter(shipped))) for shard in shards) <= 16
    # Open-ended at both ends, so future releases land in a shard.
    assert "0.0.0" in shards[0] and "99.0" in shards[-1]


def test_artifact_names_are_unique_and_uploadable(include):
    names = [cell["artifact"] for cell in include]
    assert len(set(names)) == len(names) == len(include) <= 256  # GitHub's limit per matrix
    assert all(re.fullmatch(r"compat-[A-Za-z0-9._-]+", name) for name in names)


def test_the_workflow_reads_only_fields_every_job_has(include):
    used = set(re.findall(r"(?<![.\w])matrix\.([A-Za-z][A-Za-z0-9_-]*)", WORKFLOW.read_text(encoding="utf-8")))
    assert {"session", "os", "checkout-ref", "experimental", "artifact"} <= used
    assert all(used <= set(cell) for cell in include)


def test_the_command_line_prints_the_json_the_workflow_loads():
    result = subprocess.run([sys.executable, "-m", "integration.matrix", "--json"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert json.loads(result.stdout)["include"]
