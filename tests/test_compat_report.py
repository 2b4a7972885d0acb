"""Merging the compatibility rows of CI jobs on three operating systems into one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration import compat_report

ROOT = Path(__file__).resolve().parents[1]


def _job(artifacts: Path, name: str, os_name: str, rows: list[tuple], outcome="success", allowed=False) -> None:
    """One job's artifact folder: its results.json (if it passed) and its job.json."""
    folder = artifacts / name
    folder.mkdir(parents=True)
    if rows:
        results = {}
        for tool, version, layout, date in rows:
            row = compat_report.make_row(tool, version, layout, "yes", os=os_name, date=date)
            results[compat_report.key(row)] = row
        (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    job = {"session": name, "os": os_name, "outcome": outcome, "allowed_to_fail": allowed}
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")


@pytest.fixture
def artifacts(tmp_path):
    folder = tmp_path / "artifacts"
    for os_name in ("Linux", "macOS", "Windows"):
        _job(folder, f"compat-micro_sam-{os_name}", os_name, [("micro-sam", "1.8.14", "registry-cache", "2026-11-30")])
        _job(folder, f"compat-samm-ee627cd5ad43-{os_name}", os_name, [("samm", "ee627cd5ad43", "S4", "2026-11-30")])
    for os_name in ("Linux", "macOS"):
        _job(folder, f"compat-napari_sam-0.4.13-{os_name}", os_name, [("napari-sam", "0.4.13 (napari 0.5.6)", "N3", "2026-11-29")])
    _job(folder, "compat-napari_sam-0.4.13-Windows", "Windows", [], outcome="failure")
    _job(folder, "compat-samm-newest-Windows", "Windows", [], outcome="failure", allowed=True)
    return folder


def _table(report: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] not in ("tool", "nox session"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_merge_gives_one_line_per_tool_version_and_a_column_per_os(artifacts, tmp_path):
    assert compat_report.main(["merge", str(artifacts), "--out", str(tmp_path / "merged")]) == 0
    report = (tmp_path / "merged" / "COMPATIBILITY.md").read_text(encoding="utf-8")
    assert "| tool | version / commit | layout | Linux | macOS | Windows | date |" in report
    assert _table(report) == {
        ("micro-sam", "1.8.14"): ["registry-cache", "yes", "yes", "yes", "2026-11-30"],
        ("napari-sam", "0.4.13 (napari 0.5.6)"): ["N3", "yes", "yes", "—", "2026-11-29"],
        ("samm", "ee627cd5ad43"): ["S4", "yes", "yes", "yes", "2026-11-30"],
    }
    assert "| `compat-napari_sam-0.4.13-Windows` | Windows | failure |" in report
    assert "| `compat-samm-newest-Windows` | Windows | failure (allowed to fail: newest upstream) |" in report
    merged = json.loads((tmp_path / "merged" / "results.json").read_text(encoding="utf-8"))
    assert len(merged) == 8 and {row["os"] for row in merged.values()} == {"Linux", "macOS", "Windows"}


def test_merge_from_the_command_line_in_another_folder(artifacts, tmp_path):
    """As the workflow's last job runs it: python -m, relative paths, a second run gives the same."""
    command = [sys.executable, "-m", "integration.compat_report", "merge", "artifacts", "--out", "merged"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith("8 rows from 10 jobs")
    report = (tmp_path / "merged" / "COMPATIBILITY.md").read_bytes()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and (tmp_path / "merged" / "COMPATIBILITY.md").read_bytes() == report


def test_merge_without_any_job_refuses_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compat_report.main(["merge", str(tmp_path / "empty"), "--out", str(tmp_path / "merged")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_the_same_tool_version_and_os_keeps_the_newest_row():
    old = compat_report.make_row("samm", "34e8a63ab659", "S2", "yes", os="macOS", date="2026-11-01")
    new = compat_report.make_row("samm", "34e8a63ab659", "S2", "yes", os="macOS", date="2026-11-30")
    other_os = compat_report.make_row("samm", "34e8a63ab659", "S2", "yes", os="Linux", date="2026-11-01")
    sets = [{compat_report.key(r): r} for r in (new, old, other_os)]
    merged = compat_report.merge(sets)
    assert sorted(r["date"] for r in merged.values()) == ["2026-11-01", "2026-11-30"]
    assert merged[compat_report.key(old)] is new


def test_record_adds_this_os_and_keeps_rows_recorded_before_the_os_column(tmp_path):
    """The committed results.json has no OS field: those rows were recorded on Linux."""
    legacy = {"micro-sam 1.8.14": {"tool": "micro-sam", "version": "1.8.14", "layout": "registry-cache",
                                   "patched": "yes", "loaded": "yes", "date": "2026-11-27"}}
    (tmp_path / "results.json").write_text(json.dumps(legacy), encoding="utf-8")
    compat_report.record(tmp_path, "micro-sam", "1.8.14", "registry-cache", "yes")
    compat_report.record(tmp_path, "micro-sam", "1.8.14", "registry-cache", "yes")
    rows = compat_report.load(tmp_path / "results.json")
    assert sorted(rows) == sorted({f"micro-sam 1.8.14 on {compat_report.LEGACY_OS}",
                                   f"micro-sam 1.8.14 on {compat_report.current_os()}"})
    line = next(row for k, row in _table((tmp_path / "COMPATIBILITY.md").read_text(encoding="utf-8")).items()
                if k == ("micro-sam", "1.8.14"))
    assert line[1:4].count("yes") == len({compat_report.LEGACY_OS, compat_report.current_os()})


def test_job_outcome_names_this_os(tmp_path):
    out = tmp_path / "compat"
    assert compat_report.main(["job", "--session", "samm @ newest", "--outcome", "failure",
                               "--allowed-to-fail", "--out", str(out)]) == 0
    assert json.loads((out / "job.json").read_text(encoding="utf-8")) == {
        "session": "samm @ newest", "os": compat_report.current_os(), "outcome": "failure", "allowed_to_fail": True,
    }


def test_notes_such_as_a_real_window_show_in_the_cell_and_survive_a_headless_rerun(tmp_path):
    compat_report.record(tmp_path, "napari-sam", "0.4.13 (napari 0.5.6)", "N3", "yes", window="yes (pyqt5, Xvfb)")
    compat_report.record(tmp_path, "napari-sam", "0.4.13 (napari 0.5.6)", "N3", "yes")
    (line,) = _table((tmp_path / "COMPATIBILITY.md").read_text(encoding="utf-8")).values()
    assert "yes; window yes (pyqt5, Xvfb)" in line
