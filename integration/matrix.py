"""The compatibility workflow's jobs, generated from nox's own list of sessions.

Every nox session that carries a tag (the integration sessions, the napari-sam-all shards and
whatever sessions are added later) becomes one job per operating system, so a new session is
tested without editing the workflow. Rules keyed by tag add what a session needs from the runner:

* ``samm``, ``slicer``: a checkout of the tool at each commit ``medico_adapters.install`` lists
  as tested, plus one of upstream's newest default branch, which is allowed to fail (the early
  warning); the checkout's path goes into the environment variable the session reads.
* ``gui``: a display. Linux runners have none, so the session runs under ``xvfb-run``; macOS and
  Windows runners show Qt windows natively.

    python -m integration.matrix            # a table, for people
    python -m integration.matrix --json     # {"include": [...]} for the workflow's strategy
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: GitHub runner label -> the OS name the compatibility report uses for it.
RUNNERS = {"ubuntu-latest": "Linux", "macos-latest": "macOS", "windows-latest": "Windows"}
#: nox tag -> (tool id in GIT_TOOLS, the environment variable naming its checkout).
CHECKOUTS = {
    "samm": ("samm", "MEDICO_SAMM_SRC"),
    "slicer": ("slicer-segment-with-sam", "MEDICO_SLICER_SWS_SRC"),
}
#: nox tags whose sessions open real windows.
DISPLAY_TAGS = {"gui"}
#: where the workflow checks the upstream tool out, relative to the workspace.
CHECKOUT_PATH = "upstream"


def nox_sessions(noxfile: Path = ROOT / "noxfile.py") -> list[dict]:
    """``nox --list --json`` for every session (a bare listing names only nox.options.sessions)."""
    command = [sys.executable, "-m", "nox", "--noxfile", str(noxfile), "--list", "--json", "-k", "True"]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def git_tools() -> dict:
    """``medico_adapters.install.GIT_TOOLS``, read from the source: importing it imports torch,
    which the job that generates the matrix does not install."""
    tree = ast.parse((ROOT / "medico_adapters" / "install.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GIT_TOOLS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError("medico_adapters/install.py no longer defines GIT_TOOLS as a literal")


def checkouts(tags: list[str], tools: dict) -> list[dict]:
    """The upstream trees a session's jobs check out: none, or each tested commit and the newest."""
    for tag in tags:
        if tag in CHECKOUTS:
            tool, env = CHECKOUTS[tag]
            repo = tools[tool]["url"].removeprefix("https://github.com/")
            pinned = [{"repo": repo, "ref": ref, "env": env, "label": ref[:12]} for ref in tools[tool]["refs"]]
            # An empty ref checks out the default branch: whatever upstream has now.
            return [*pinned, {"repo": repo, "ref": "", "env": env, "label": "newest", "experimental": True}]
    return [{}]


def matrix(sessions: list[dict], tools: dict, runners: dict[str, str] = RUNNERS) -> list[dict]:
    """One job per tagged session, upstream checkout and runner."""
    include = []
    for session in sessions:
        if not session["tags"]:
            continue
        for checkout in checkouts(session["tags"], tools):
            label = session["session"] + (f" @ {checkout['label']}" if checkout else "")
            for runner, os_name in runners.items():
                include.append({
                    "name": f"{label} · {os_name}",
                    "label": label,
                    "session": session["session"],
                    "os": runner,
                    "checkout-repo": checkout.get("repo", ""),
                    "checkout-ref": checkout.get("ref", ""),
                    "checkout-env": checkout.get("env", ""),
                    "xvfb": os_name == "Linux" and bool(DISPLAY_TAGS & set(session["tags"])),
                    "experimental": checkout.get("experimental", False),
                    # upload-artifact refuses some characters (" : < > | * ? / \\): keep to a safe set.
                    "artifact": "compat-" + re.sub(r"[^A-Za-z0-9._-]+", "-", f"{label} {os_name}").strip("-"),
                })
    return include


def table(include: list[dict]) -> str:
    lines = [f"{'job':64} {'checkout':30} {'xvfb':5} allowed to fail"]
    for cell in include:
        checkout = f"{cell['checkout-repo'].split('/')[-1]}@{cell['checkout-ref'][:7] or 'default'}" if cell["checkout-repo"] else "-"
        lines.append(f"{cell['name']:64} {checkout:30} {'yes' if cell['xvfb'] else '-':5} "
                     f"{'yes' if cell['experimental'] else '-'}")
    sessions = len({cell["label"] for cell in include})
    lines.append(f"{len(include)} jobs: {sessions} sessions/checkouts x {len({c['os'] for c in include})} runners")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the strategy matrix as one line of JSON")
    args = parser.parse_args(argv)
    include = matrix(nox_sessions(), git_tools())
    print(json.dumps({"include": include}) if args.json else table(include))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
