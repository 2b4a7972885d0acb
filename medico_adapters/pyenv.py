"""Another Python environment, asked through its own interpreter (the one a user starts a tool with).

A tool installed for another interpreter is found, and its versions read, by running that
interpreter: never by importing into the kit's own process, whose ``sys.path`` and packages may
differ. ``python=None`` everywhere means the kit's own interpreter, read in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
from pathlib import Path

from packaging.version import InvalidVersion, Version

from medico_adapters.errors import MedicoError


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, **kwargs)
    except FileNotFoundError:
        raise MedicoError(f"{cmd[0]}: not found (needed to {what})") from None
    except PermissionError:
        raise MedicoError(f"{cmd[0]}: cannot be run (needed to {what})") from None
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if isinstance(proc.stderr, str) else []
        raise MedicoError(f"{what} failed (exit {proc.returncode}){': ' + tail[0] if tail else ''}")
    return proc


def probe(python: str, code: str) -> str:
    """What ``code`` prints when ``python`` runs it, with the environment the user's tool sees
    (PYTHONPATH, user site-packages), but from the file-system root, so that a package folder in
    the current directory is not mistaken for an installed one."""
    if os.sep in python or (os.altsep and os.altsep in python):
        python = os.path.abspath(python)  # not resolve(): a venv's python is a symlink to keep
    return run([python, "-c", code], f"inspect the Python at {python}", capture_output=True, text=True,
               cwd=os.path.abspath(os.sep)).stdout.strip()


def package_dir(python: str | None, packages: tuple[str, ...]) -> Path | None:
    """Folder of the first of ``packages`` that ``python`` imports, without importing it."""
    if python is None:
        import importlib.util

        for package in packages:
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.submodule_search_locations:
                return Path(list(spec.submodule_search_locations)[0])
        return None
    code = (
        "import importlib.util\n"
        f"for p in {packages!r}:\n"
        "    s = importlib.util.find_spec(p)\n"
        "    if s and s.submodule_search_locations:\n"
        "        print(list(s.submodule_search_locations)[0]); break\n"
    )
    out = probe(python, code)
    return Path(out) if out else None


def dist_version(python: str | None, dist: str) -> Version | None:
    """The installed version of distribution ``dist`` for ``python`` (None: absent or unparseable)."""
    if python is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version(dist)
        except PackageNotFoundError:
            return None
    else:
        text = probe(python, f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept Exception: print('')")
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def site_packages(python: str | None) -> str:
    if python is None:
        return sysconfig.get_paths()["purelib"]
    return probe(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")


def same_environment(python: str) -> bool | None:
    """Whether ``python`` installs into the kit's own site-packages (None: it cannot be run)."""
    try:
        theirs = site_packages(python)
    except MedicoError:
        return None
    return os.path.normcase(os.path.abspath(theirs)) == os.path.normcase(os.path.abspath(site_packages(None)))


_SH_EXEC = re.compile(r"""^'''exec' "?([^"]+?)"? "\$0" "\$@"$""", re.MULTILINE)


def script_python(script: Path) -> str | None:
    """The interpreter a console script (``napari``) runs with: its shebang, the ``/bin/sh``
    trampoline pip writes for long or spaced paths, or on Windows the ``python.exe`` of the
    environment whose ``Scripts`` folder holds the launcher."""
    if script.suffix.lower() == ".exe":
        for candidate in (script.parent / "python.exe", script.parent.parent / "python.exe"):
            if candidate.is_file():
                return str(candidate)
        return None
    try:
        with open(script, "rb") as f:
            head = f.read(1024).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("#!"):
        return None
    first = head[2:].splitlines()[0].strip()
    if first in ("/bin/sh", "/usr/bin/sh"):
        match = _SH_EXEC.search(head)
        return match.group(1) if match else None
    words = first.split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        import shutil

        return shutil.which(words[-1])
    return words[0] if words else None
