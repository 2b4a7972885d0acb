"""Where users' tools live on each OS, kept as data: 3D Slicer's installs, its Extension Manager's
folders and the settings files that name more of them.

Slicer's own rules (Base/QTCore/qSlicerCoreApplication.cxx, CMake/SlicerApplicationOptions.cmake):

* the Extension Manager unpacks extension ``E`` into ``<install path>/E``; the install path is
  ``Extensions/InstallPath`` of the revision settings ``Slicer-<rev>.ini``, by default
  ``Extensions-<rev>`` beside that file;
* official builds keep the revision settings in the Slicer folder, under the Qt organization
  (``<Slicer>/slicer.org/``; ``NA-MIC`` up to Slicer 5.2, ``Slicer`` in early-2023 previews);
  builds without that option keep them with the user's settings (``~/.config/<org>/`` on Linux and
  macOS, ``%APPDATA%\\<org>\\`` on Windows); macOS always installs into the app bundle,
  ``Slicer.app/Contents/Extensions-<rev>``;
* ``Modules/AdditionalPaths`` in the same file lists module folders Slicer loads: every installed
  extension's, and the ones a user added (Application Settings > Modules), e.g. a git clone;
* paths in those files are relative to the Slicer folder when they lie inside it.

Everything here reads an :class:`Env` (platform, environment variables, file-system root), never
``os.environ`` or ``sys.platform`` directly, so tests build fake installs of every OS under a
temporary folder.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Qt's organization folder per OS (name on Linux/Windows, domain on macOS): Slicer >= 5.4,
#: <= 5.2, and the early-2023 previews.
ORGANIZATIONS = {
    "linux": ("slicer.org", "NA-MIC", "Slicer"),
    "windows": ("slicer.org", "NA-MIC", "Slicer"),
    "macos": ("slicer.org", "www.na-mic.org", "www.slicer.org"),
}
#: Slicer installs: unpacked tarballs (Linux), app bundles' Contents (macOS), the installer's
#: per-user folder ``%LOCALAPPDATA%\<org>\Slicer <version>`` or an admin install (Windows).
#: ``{VAR}`` comes from the environment; a leading ``/`` is the file-system root.
SLICER_HOMES = {
    "linux": ("{HOME}/Slicer*", "{HOME}/*/Slicer*", "/opt/Slicer*", "/opt/*/Slicer*", "/usr/local/Slicer*"),
    "macos": ("/Applications/Slicer*.app/Contents", "{HOME}/Applications/Slicer*.app/Contents"),
    "windows": ("{LOCALAPPDATA}/{org}/Slicer*", "{PROGRAMFILES}/Slicer*"),
}
#: inside a Slicer install: the revision settings folder, and macOS's in-bundle extensions.
HOME_EXTENSIONS = ("{org}/Extensions-*", "Extensions-*")
HOME_SETTINGS = ("{org}/Slicer*.ini",)
#: the user's own settings folder (Qt's IniFormat, user scope).
USER_SETTINGS = {
    "linux": ("{XDG_CONFIG_HOME}/{org}",),
    "macos": ("{HOME}/.config/{org}",),
    "windows": ("{APPDATA}/{org}",),
}

_WILDCARD = re.compile(r"[*?\[]")
_VAR = re.compile(r"\{(\w+)\}")


def platform_key(name: str) -> str:
    """``sys.platform`` folded to the three families the tables know."""
    if name.startswith(("win", "cygwin", "msys")):
        return "windows"
    return "macos" if name == "darwin" else "linux"


@dataclass(frozen=True)
class Env:
    """What the search reads: the OS family, environment variables, and the file-system root."""

    platform: str
    vars: Mapping[str, str] = field(default_factory=dict)
    root: Path = Path(os.path.abspath(os.sep))

    def var(self, name: str) -> str | None:
        """An environment variable, or the OS's default for the few the tables use; the home
        folder is USERPROFILE on Windows (HOME there may be an MSYS or Git Bash one)."""
        if name == "HOME":
            return (self._get("USERPROFILE") if self.platform == "windows" else None) or self._get("HOME")
        value = self._get(name)
        if value:
            return value
        defaults = {
            "XDG_CONFIG_HOME": ("linux", ".config"),
            "LOCALAPPDATA": ("windows", "AppData/Local"),
            "APPDATA": ("windows", "AppData/Roaming"),
        }
        home = self.var("HOME")
        if name in defaults and home and defaults[name][0] == self.platform:
            return str(Path(home) / defaults[name][1])
        return None

    def _get(self, name: str) -> str | None:
        value = self.vars.get(name)
        if not value and self.platform == "windows":  # variable names are case-insensitive there
            value = next((v for k, v in self.vars.items() if k.upper() == name), None)
        return value or None

    def expand(self, pattern: str, **names: str) -> str | None:
        """The pattern with ``{VAR}``s filled in (None if one is unset), rooted at ``root``."""
        missing = []

        def fill(match: re.Match) -> str:
            key = match.group(1)
            value = names.get(key) or self.var(key)
            if value is None:
                missing.append(key)
                return ""
            return value.replace("\\", "/") if self.platform == "windows" else value

        text = _VAR.sub(fill, pattern)
        if missing:
            return None
        if pattern.startswith("/"):
            return str(self.root / text.lstrip("/"))
        return text

    def glob(self, pattern: str, **names: str) -> list[Path]:
        """Folders matching ``pattern`` (expanded as :meth:`expand`), sorted."""
        text = self.expand(pattern, **names)
        return [] if text is None else glob_dirs(text)


def current_env() -> Env:
    return Env(platform_key(sys.platform), dict(os.environ))


def glob_dirs(pattern: str | os.PathLike) -> list[Path]:
    """Folders matching a path with wildcards in any component, sorted; never raises."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if fixed == len(parts):
        return [base] if base.is_dir() else []
    if not base.is_dir():
        return []
    try:
        return sorted(p for p in base.glob(str(Path(*parts[fixed:]))) if p.is_dir())
    except OSError:
        return []


# --- Qt's INI settings files ---------------------------------------------------------------------


def read_qsettings(path: Path) -> dict[str, list[str]]:
    """``Section/Key`` -> values, read the way ``QSettings(..., IniFormat)`` writes them.

    Values are string lists (a single string is a list of one): Qt separates list items with
    commas, quotes items holding special characters and escapes with backslashes, ``\\xNNNN`` for
    characters outside ASCII in Qt 5 files. Variant-encoded values (``@Invalid()``, ...) are
    skipped. An unreadable file reads as empty.
    """
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return {}
    section = "General"
    values: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().replace("\\", "/")
        full = key if section == "General" else f"{section}/{key}"
        items = _unescape_list(value)
        values[full] = [] if items and items[0].startswith("@") and not items[0].startswith("@@") else [
            item[1:] if item.startswith("@@") else item for item in items
        ]
    return values


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            '"': '"', "'": "'", "?": "?", "\\": "\\", ";": ";", ",": ",", "=": "="}


def _unescape_list(value: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "\\" and i + 1 < n:
            nxt = value[i + 1]
            if nxt == "x":
                j = i + 2
                while j < n and value[j] in "0123456789abcdefABCDEF":
                    j += 1
                if j > i + 2:
                    current.append(chr(int(value[i + 2:j], 16)))
                i = j
                continue
            current.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        elif not quoted and ch in ";#":
            break
        elif not quoted and ch == ",":
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current).strip())
    return [item for item in items if item]


# --- Slicer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingsFile:
    path: Path
    home: Path | None  # the Slicer folder its relative paths hang from (None: not known)

    def paths(self, key: str) -> list[Path]:
        """The absolute folders ``key`` names (relative ones only when the Slicer folder is known)."""
        out = []
        for value in read_qsettings(self.path).get(key, []):
            path = Path(value)
            if path.is_absolute():
                out.append(path)
            elif self.home is not None:
                out.append(Path(os.path.normpath(self.home / path)))
        return out


def slicer_homes(env: Env) -> list[Path]:
    found: list[Path] = []
    for pattern in SLICER_HOMES[env.platform]:
        orgs = ORGANIZATIONS[env.platform] if "{org}" in pattern else ("",)
        for org in orgs:
            found += env.glob(pattern, org=org)
    return _unique(found)


def home_extension_folders(home: Path, platform: str) -> list[Path]:
    """``Extensions-<rev>`` folders inside one Slicer install."""
    found: list[Path] = []
    for pattern in HOME_EXTENSIONS:
        for org in ORGANIZATIONS[platform] if "{org}" in pattern else ("",):
            found += glob_dirs(home / pattern.format(org=org))
    return _unique(found)


def home_settings(home: Path, platform: str) -> list[SettingsFile]:
    files = []
    for pattern in HOME_SETTINGS:
        for org in ORGANIZATIONS[platform]:
            folder = home / org
            if folder.is_dir():
                files += [SettingsFile(p, home) for p in sorted(folder.glob(Path(pattern).name)) if p.is_file()]
    return files


def user_settings_folders(env: Env) -> list[Path]:
    found: list[Path] = []
    for pattern in USER_SETTINGS[env.platform]:
        for org in ORGANIZATIONS[env.platform]:
            found += env.glob(pattern, org=org)
    return _unique(found)


def settings_files(env: Env) -> list[SettingsFile]:
    """Every Slicer settings file the search reads: in each install, then the user's own."""
    files = [f for home in slicer_homes(env) for f in home_settings(home, env.platform)]
    for folder in user_settings_folders(env):
        files += [SettingsFile(p, None) for p in sorted(folder.glob("Slicer*.ini")) if p.is_file()]
    return files


def extension_folders(env: Env) -> list[Path]:
    """Every ``Extensions-<rev>`` (or custom install path) folder the Extension Manager may use."""
    found = [f for home in slicer_homes(env) for f in home_extension_folders(home, env.platform)]
    for folder in user_settings_folders(env):
        found += glob_dirs(folder / "Extensions-*")
    for settings in settings_files(env):
        found += [p for p in settings.paths("Extensions/InstallPath") if p.is_dir()]
    return _unique(found)


def module_folders(env: Env) -> list[Path]:
    """Module folders Slicer's settings tell it to load (``Modules/AdditionalPaths``)."""
    found = [p for settings in settings_files(env) for p in settings.paths("Modules/AdditionalPaths")]
    return _unique(p for p in found if p.is_dir())


def searched(env: Env) -> list[str]:
    """Where the search looks, in words for an error message."""
    orgs = "{" + "|".join(ORGANIZATIONS[env.platform]) + "}"
    inside = "/Extensions-*" if env.platform == "macos" else f"/{orgs}/Extensions-*"
    homes = [env.expand(p, org=orgs) for p in SLICER_HOMES[env.platform]]
    users = [env.expand(p, org=orgs) for p in USER_SETTINGS[env.platform]]
    return [
        *(h + inside for h in homes if h),
        *(u + "/Slicer*.ini (Extensions/InstallPath, Modules/AdditionalPaths)" for u in users if u),
    ]


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: dict[str, Path] = {}
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        seen.setdefault(key, path)
    return list(seen.values())
