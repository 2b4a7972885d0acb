"""nox sessions: the unit suite, lint, and one integration session per tool.

Integration sessions install the real tool, install this package on top, and run the tests in
``integration/`` that execute the tool's own model-loading code. Installing torch costs ~70 s and
5.5 GB per environment, so each session's venv sees the base environment that runs nox (which
holds torch, segment-anything and this kit's dependencies) through a ``.pth`` file; what a session
installs itself takes precedence. Each session appends a row to integration/COMPATIBILITY.md (or,
in CI, to the folder $MEDICO_COMPAT_DIR names; integration/compat_report.py merges those).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
# nox imports this file from its own entry point: the project's folder is not on sys.path yet.
sys.path.insert(0, str(ROOT))
from integration import compat_report  # noqa: E402

# CI jobs write their rows into a folder of their own (uploaded, then merged across OSes).
COMPAT_DIR = Path(os.environ.get("MEDICO_COMPAT_DIR") or ROOT / "integration")
NAPARI_SAM_RELEASES = {"0.4.0": "N1", "0.4.5": "N2", "0.4.13": "N3"}
GOOD_NAPARI = "napari==0.5.6"
#: napari-sam-all in shards of a few minutes each (one CI job per shard), as version ranges so
#: that a new release falls into the last one.
NAPARI_SAM_ALL_SHARDS = {
    "0.0-0.2": "<0.3",
    "0.3.0-0.3.10": ">=0.3,<0.3.11",
    "0.3.11-0.3.20": ">=0.3.11,<0.4",
    "0.4-newest": ">=0.4",
}


def link_base(session: nox.Session) -> None:
    """Let the session's venv import torch & co. from the environment running nox."""
    # purelib is site-packages on every OS (site.getsitepackages()[0] is the venv root on Windows).
    venv_site = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", silent=True
    ).strip().splitlines()[-1]
    # Not fsio.write_text: before Python 3.13, site.py reads .pth files in the locale's encoding.
    Path(venv_site, "_medico_base_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def record(tool: str, version: str, layout: str, loaded: str, window: str | None = None) -> None:
    """Write this OS's row; ``window`` marks it proven in a real napari window (kept when a
    headless run refreshes the row)."""
    compat_report.record(COMPAT_DIR, tool, version, layout, loaded, window=window)


def run_integration(session: nox.Session, tool: str, requirements: list[str], tests: str, env: dict | None = None,
                    launcher: tuple[str, ...] = ()) -> None:
    link_base(session)
    if requirements:
        session.install(*requirements)
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pip", "freeze", silent=False)
    # The tools cache weights under ~, which is USERPROFILE on Windows and HOME elsewhere: both
    # point at a fresh folder in the session's venv, never at the developer's or the runner's home.
    home = Path(session.virtualenv.location, "home")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    env = {"HOME": str(home), "USERPROFILE": str(home), **(env or {})}
    session.run(*launcher, "python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", tests, env=env,
                external=bool(launcher))


@nox.session
def tests(session: nox.Session) -> None:
    """The unit suite (what .ci/run runs)."""
    link_base(session)
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "medico_adapters", "tests", "integration", "noxfile.py")


@nox.session(tags=["integration", "napari-sam"])
@nox.parametrize("release", list(NAPARI_SAM_RELEASES))
def napari_sam(session: nox.Session, release: str) -> None:
    """A representative release of each napari-sam layout, with napari 0.5.6."""
    run_integration(
        session, "napari-sam", [f"napari-sam=={release}", GOOD_NAPARI, "pyqt5"],
        "integration/test_napari_real.py",
        env={"MEDICO_NAPARI_SAM_VERSION": release, "QT_QPA_PLATFORM": "offscreen"},
    )
    record("napari-sam", f"{release} (napari 0.5.6)", NAPARI_SAM_RELEASES[release], "yes")


@nox.session(tags=["integration", "napari-sam"])
def napari_sam_newest_napari(session: nox.Session) -> None:
    """The newest napari-sam on the newest napari, which needs the layers_change compat transform."""
    # --upgrade: a napari in the linked base environment (the [demo] extra's 0.5.6) must not satisfy "newest"
    run_integration(
        session, "napari-sam", ["--upgrade", "napari-sam", "napari", "pyqt5"], "integration/test_napari_real.py",
        env={"QT_QPA_PLATFORM": "offscreen"},
    )
    versions = session.run(
        "python", "-c", "from importlib.metadata import version as v; print(v('napari-sam'), v('napari'))", silent=True
    ).split()
    record("napari-sam", f"{versions[0]} (napari {versions[1]})", "N3 + compat", "yes")


XVFB = ("xvfb-run", "-a", "-s", "-screen 0 1280x1024x24")


def display_launcher(session: nox.Session) -> tuple[str, ...]:
    """Xvfb where installed (a fixed 1280x1024 screen, the developer's desktop left alone), else the display."""
    if shutil.which("xvfb-run"):
        return XVFB
    if sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return ()
    session.skip(
        "no display and no xvfb-run: install xvfb xauth libgl1 libgl1-mesa-dri libegl1 libdbus-1-3 "
        "libxkbcommon-x11-0 and the libxcb-* packages that .ci/run lists, or run under a desktop session"
    )


def napari_sam_gui(session: nox.Session, napari_sam: str, requirements: list[str], layout: str, qt_api: str,
                   demo: bool = False) -> None:
    """Drive the patched napari-sam in a shown napari window; screenshots go to integration/gui-shots/.

    ``demo``: also run ``medico-adapters demo`` with the display, which then saves window.png.
    """
    launcher = display_launcher(session)
    # the copy the test patches must live in this venv, never in the base environment linked in
    session.install("--no-deps", "--ignore-installed", napari_sam)
    shots = ROOT / "integration" / "gui-shots" / session.name
    shutil.rmtree(shots, ignore_errors=True)
    # napari's pytest plugin imports napari, which builds its icons under the HOME of that moment,
    # before the tests move HOME: the window would then find none
    env = {"QT_API": qt_api, "MEDICO_GUI_SHOTS": str(shots), "PYTEST_ADDOPTS": "-p no:napari"}
    if launcher:
        env["QT_QPA_PLATFORM"] = "xcb"
    run_integration(session, "napari-sam", requirements, "integration/test_napari_gui.py", env=env, launcher=launcher)
    if not any(shots.glob("*.png")):
        session.skip("the GUI test skipped (its reason is above): nothing recorded")
    if demo:
        session.run(*launcher, "python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
                    "integration/test_demo_real.py::test_demo_saves_the_real_window", env=env, external=bool(launcher))
        # a label map from `segment --model`, opened as a napari labels layer (issue 21)
        session.run(*launcher, "python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
                    "integration/test_labels_gui.py", env=env, external=bool(launcher))
    versions = session.run(
        "python", "-c", "from importlib.metadata import version as v; print(v('napari-sam'), v('napari'))", silent=True
    ).split()
    where = "Xvfb" if launcher else "desktop"
    record("napari-sam", f"{versions[0]} (napari {versions[1]})", layout, "yes", window=f"yes ({qt_api}, {where})")


@nox.session(name="napari-sam-gui-0.5.6", tags=["integration", "gui"])
def napari_sam_gui_056(session: nox.Session) -> None:
    """The napari the demo installs; also the demo's own window capture."""
    napari_sam_gui(session, "napari-sam==0.4.13", ["napari-sam==0.4.13", GOOD_NAPARI, "pyqt5"], "N3", "pyqt5", demo=True)


@nox.session(name="napari-sam-gui-newest", tags=["integration", "gui"])
def napari_sam_gui_newest(session: nox.Session) -> None:
    """The newest napari with the Qt binding its ``[all]`` extra picks: the compat transforms' proof."""
    # --upgrade: a napari in the linked base environment must not satisfy "newest"
    napari_sam_gui(session, "napari-sam", ["--upgrade", "napari-sam", "napari[pyqt]"], "N3 + compat", "pyqt6")


@nox.session(tags=["integration", "micro-sam"])
def micro_sam(session: nox.Session) -> None:
    """micro-sam from PyPI: its get_sam_model loads the exported and the training-format files."""
    run_integration(session, "micro-sam", ["micro-sam"], "integration/test_micro_sam_real.py")
    version = session.run("python", "-c", "from importlib.metadata import version; print(version('micro-sam'))", silent=True).strip()
    record("micro-sam", version, "registry-cache", "yes")


def _checkout_session(session: nox.Session, tool: str, env_var: str, tests: str, requirements: list[str]) -> None:
    src = os.environ.get(env_var)
    if not src:
        session.skip(f"set {env_var} to a checkout of {tool} (not on PyPI; clones need github access)")
    # An exported tree (git archive) has no .git: then say which commit it is with <VAR>_COMMIT.
    commit = os.environ.get(f"{env_var}_COMMIT") or session.run(
        "git", "-C", src, "rev-parse", "HEAD", silent=True, external=True, success_codes=[0, 128]
    ).strip()
    commit = commit if len(commit) >= 7 and " " not in commit else "unknown-commit"
    session.log(f"{tool} checkout {src} at {commit}")
    run_integration(session, tool, requirements, tests, env={env_var: src})
    status = session.run("python", "-m", "medico_adapters", "status", tool, "--path", src, "--json", silent=True)
    layout = json.loads(status[status.index("{"):])["layout"]
    record(tool, commit[:12], layout, "yes")


@nox.session(tags=["integration", "samm"])
def samm(session: nox.Session) -> None:
    _checkout_session(
        session, "samm", "MEDICO_SAMM_SRC", "integration/test_samm_real.py",
        ["pyzmq", "opencv-python-headless", "matplotlib", "tqdm", "timm", "mobilesam-mirror"],
    )


@nox.session(tags=["integration", "slicer"])
def slicer(session: nox.Session) -> None:
    _checkout_session(session, "slicer-segment-with-sam", "MEDICO_SLICER_SWS_SRC", "integration/test_slicer_real.py", [])


@nox.session(tags=["napari-sam-all"])
@nox.parametrize("releases", list(NAPARI_SAM_ALL_SHARDS.values()), ids=list(NAPARI_SAM_ALL_SHARDS))
def napari_sam_all_releases(session: nox.Session, releases: str) -> None:
    """Every napari-sam release from PyPI in one range: patch, re-patch, --lazy-embeddings on and off, unpatch."""
    run_integration(
        session, "napari-sam", [], "integration/test_napari_all_releases.py",
        env={"MEDICO_NAPARI_SAM_RELEASES": releases},
    )


@nox.session(tags=["integration", "napari-segment-anything"])
def napari_segment_anything(session: nox.Session) -> None:
    """royerlab's napari-segment-anything 0.1.4 on napari 0.5.6: its widget loads MedicoSAM and segments a click."""
    run_integration(
        session, "napari-segment-anything", ["napari-segment-anything==0.1.4", GOOD_NAPARI, "pyqt5"],
        "integration/test_napari_segment_anything_real.py", env={"QT_QPA_PLATFORM": "offscreen"},
    )
    record("napari-segment-anything", "0.1.4 (napari 0.5.6)", "N1", "yes")


@nox.session(tags=["integration", "isat-sam"])
def isat_sam(session: nox.Session) -> None:
    """ISAT-SAM 1.5.2: its SegAny builds vit_b from the placed file (float32 and the bf16 path), its model manager lists it."""
    run_integration(session, "isat-sam", ["isat-sam==1.5.2"], "integration/test_isat_real.py", env={"QT_QPA_PLATFORM": "offscreen"})
    record("isat-sam", "1.5.2", "I1", "yes")


@nox.session(tags=["integration", "anylabeling"])
def anylabeling(session: nox.Session) -> None:
    """AnyLabeling 0.4.43 (PyQt6, its own venv): lists MedicoSAM, loads the exported ONNX pair, segments a click."""
    run_integration(
        session, "anylabeling", ["anylabeling==0.4.43", "onnx", "onnxruntime", "pyyaml"],
        # napari's pytest plugins (visible from the base environment) would import its PyQt5 here
        "integration/test_anylabeling_real.py", env={"QT_QPA_PLATFORM": "offscreen", "PYTEST_ADDOPTS": "-p no:napari -p no:napari-plugin-engine -p no:npe2"},
    )
    record("anylabeling", "0.4.43", "A1 (ONNX)", "yes")
