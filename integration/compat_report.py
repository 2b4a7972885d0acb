"""The compatibility report: rows written by the nox sessions, merged over jobs and operating systems.

A row says that one tool at one version (or commit) was patched and then loaded by the tool's own
code, on one OS. ``noxfile.py``'s ``record()`` adds the row of the session that just passed; the
compatibility workflow's last job merges the rows every job uploaded, plus each job's outcome,
into one COMPATIBILITY.md: tool × version, a column per OS.

    python -m integration.compat_report job --session NAME --outcome success --out DIR
    python -m integration.compat_report merge ARTIFACTS_DIR --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from medico_adapters import fsio

RESULTS = "results.json"
REPORT = "COMPATIBILITY.md"
JOB = "job.json"
FIELDS = ("tool", "version", "layout", "patched", "loaded", "os", "date")
#: sys.platform -> the report's column; other platforms get a column named after sys.platform.
OS_COLUMNS = {"linux": "Linux", "darwin": "macOS", "win32": "Windows"}
# Rows recorded before the OS column existed all came from the project's Linux machine.
LEGACY_OS = "Linux"
NOT_RUN = "—"

_HEADER = """\
# Compatibility

Written by the nox integration sessions (`nox -t integration`), merged over operating systems by
the compatibility workflow. "yes" means the tool's own model-loading code built SAM from the placed
checkpoint on that OS and its weights matched (random weights of the real architecture: plumbing,
not accuracy); "{not_run}" means no passing run there.
"""


def current_os() -> str:
    return OS_COLUMNS.get(sys.platform, sys.platform)


def make_row(tool: str, version: str, layout: str, loaded: str, *, os: str | None = None,
             date: str | None = None, **extra: str | None) -> dict:
    """A row; ``extra`` notes (such as ``window="yes (pyqt5, Xvfb)"``) are shown in its OS's cell."""
    return {
        "tool": tool, "version": version, "layout": layout, "patched": "yes", "loaded": loaded,
        "os": os or current_os(), "date": date or datetime.date.today().isoformat(),
        **{name: value for name, value in extra.items() if value is not None},
    }


def key(row: dict) -> str:
    return f"{row['tool']} {row['version']} on {row['os']}"


def load(path: str | Path) -> dict[str, dict]:
    """The rows of one results.json (empty if it does not exist), keyed by tool, version and OS."""
    path = Path(path)
    if not path.exists():
        return {}
    rows = {}
    for row in json.loads(path.read_text(encoding="utf-8")).values():
        row = {"os": LEGACY_OS, **row}
        rows[key(row)] = row
    return rows


def merge(row_sets: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """One row per tool, version and OS: the newest date wins, then the later set."""
    merged: dict[str, dict] = {}
    for rows in row_sets:
        for k, row in rows.items():
            if k not in merged or row["date"] >= merged[k]["date"]:
                merged[k] = row
    return merged


def _natural(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _columns(os_names: Iterable[str]) -> list[str]:
    known = list(OS_COLUMNS.values())
    return known + sorted(set(os_names) - set(known))


def render(rows: dict[str, dict], jobs: Iterable[dict] = ()) -> str:
    """COMPATIBILITY.md: a line per tool and version, a column per OS, then the jobs that failed."""
    columns = _columns(row["os"] for row in rows.values())
    table: dict[tuple[str, str], list[dict]] = {}
    for row in rows.values():
        table.setdefault((row["tool"], row["version"]), []).append(row)
    lines = [_HEADER.format(not_run=NOT_RUN)]
    lines.append("| tool | version / commit | layout | " + " | ".join(columns) + " | date |")
    lines.append("|---" * (len(columns) + 4) + "|")
    for (tool, version), cells in sorted(table.items(), key=lambda item: (item[0][0], _natural(item[0][1]))):
        by_os = {row["os"]: "; ".join([row["loaded"], *(f"{k} {row[k]}" for k in sorted(set(row) - set(FIELDS)))])
                 for row in cells}
        layout = " / ".join(sorted({row["layout"] for row in cells}))
        date = max(row["date"] for row in cells)
        results = " | ".join(by_os.get(column, NOT_RUN) for column in columns)
        lines.append(f"| {tool} | {version} | {layout} | {results} | {date} |")
    failed = sorted((job for job in jobs if job["outcome"] != "success"), key=lambda j: (j["session"], j["os"]))
    if failed:
        lines += ["", "## Jobs that did not pass", "",
                  "| nox session | OS | outcome |", "|---|---|---|"]
        lines += [f"| `{job['session']}` | {job['os']} | {job['outcome']}"
                  f"{' (allowed to fail: newest upstream)' if job.get('allowed_to_fail') else ''} |"
                  for job in failed]
    return "\n".join(lines) + "\n"


def save(folder: str | Path, rows: dict[str, dict], jobs: Iterable[dict] = ()) -> Path:
    """Write results.json and COMPATIBILITY.md into ``folder``; returns the report's path."""
    folder = Path(folder)
    ordered = dict(sorted(rows.items()))
    fsio.write_text(folder / RESULTS, json.dumps(ordered, indent=2, sort_keys=True) + "\n")
    return fsio.write_text(folder / REPORT, render(ordered, jobs))


def record(folder: str | Path, tool: str, version: str, layout: str, loaded: str, **extra: str | None) -> Path:
    """Add or refresh this OS's row in the report in ``folder``, keeping notes an earlier run added."""
    row = make_row(tool, version, layout, loaded, **extra)
    rows = load(Path(folder) / RESULTS)
    rows[key(row)] = {**rows.get(key(row), {}), **row}
    return save(folder, rows)


def collect(artifacts: str | Path) -> tuple[dict[str, dict], list[dict]]:
    """Every job's rows and outcome under a folder of downloaded artifacts (one folder per job)."""
    artifacts = Path(artifacts)
    rows = merge(load(path) for path in sorted(artifacts.rglob(RESULTS)))
    jobs = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(artifacts.rglob(JOB))]
    return rows, jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.compat_report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    job = commands.add_parser("job", help="write this job's outcome (job.json) beside its rows")
    job.add_argument("--session", required=True, help="the nox session the job ran")
    job.add_argument("--outcome", required=True, help="success, failure, cancelled or skipped")
    job.add_argument("--allowed-to-fail", action="store_true", help="the job tests an unpinned upstream")
    job.add_argument("--out", required=True, type=Path)
    merge_cmd = commands.add_parser("merge", help="merge the artifacts of every job into one report")
    merge_cmd.add_argument("artifacts", type=Path, help="folder holding each job's results.json / job.json")
    merge_cmd.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "job":
        outcome = {"session": args.session, "os": current_os(), "outcome": args.outcome,
                   "allowed_to_fail": args.allowed_to_fail}
        fsio.write_text(args.out / JOB, json.dumps(outcome, indent=2) + "\n")
        return 0
    rows, jobs = collect(args.artifacts)
    if not jobs:
        print(f"{args.artifacts}: no {JOB} found; nothing to merge", file=sys.stderr)
        return 1
    report = save(args.out, rows, jobs)
    print(f"{report}: {len(rows)} rows from {len(jobs)} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
