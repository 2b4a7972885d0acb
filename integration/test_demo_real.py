"""``medico-adapters demo`` end to end: napari-sam's real widget, headless, in a subprocess.

Needs napari (and a Qt binding); without a cached MedicoSAM it runs the labelled random stand-in.
The image embedding of a ViT-B on CPU makes this take about a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("napari", reason="the demo needs napari (pip install \"napari==0.5.6\" pyqt5 napari-sam)")

REPO = Path(__file__).resolve().parents[1]


def _installed_widget_digest() -> str | None:
    from medico_adapters.demo import _find_spec

    spec = _find_spec("napari_sam")
    if spec is None or not spec.submodule_search_locations:
        return None
    widget = Path(list(spec.submodule_search_locations)[0]) / "_widget.py"
    return hashlib.sha256(widget.read_bytes()).hexdigest()


def test_demo_runs_the_real_widget(tmp_path, _isolated_home):
    out = tmp_path / "demo-out"
    shot = tmp_path / "widget.png"
    installed_before = _installed_widget_digest()
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "medico_adapters", "demo", "--out", str(out), "--screenshot", str(shot)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )
    elapsed = time.perf_counter() - start
    print(proc.stdout)
    print(f"demo subprocess: {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[demo] patching that copy" in proc.stdout and "overlay:" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    ns = report["napari_sam"]
    assert ns["layout"] in ("N1", "N2", "N3")
    assert any(item.startswith("MedicoSAM") for item in ns["model_list"])
    assert ns["after_load"] == "MedicoSAM (Loaded)"
    assert "medico-demo-" in ns["widget_module"]  # the patched temporary copy ran, not the installed one
    assert not Path(ns["widget_module"]).exists()  # and the temporary folder is gone
    assert report["result"]["sam_logits"] is True
    assert report["result"]["mask_pixels"] >= 0
    assert report["result"]["empty"] == (report["result"]["mask_pixels"] == 0)
    ckpt = report["checkpoint"]
    if ckpt["standin"]:
        assert ckpt["kind"] == "standin" and "not MedicoSAM" in ckpt["label"]
        assert "plumbing check, not accuracy" in (out / "report.md").read_bytes().decode("utf-8").lower()
        assert "plumbing check, not accuracy" in proc.stdout
    for phase in ("get_files", "patch", "widget_build", "model_load", "embedding_click", "embedding", "click", "total"):
        assert report["timings_s"][phase] >= 0, phase

    from PIL import Image

    overlay = Image.open(out / "overlay.png")
    assert overlay.width >= 128 * 4 and overlay.height > overlay.width
    widget_png = Image.open(shot)
    assert widget_png.width > 300 and widget_png.height > 300
    assert (out / "phantom.nii.gz").is_file()

    # nothing left behind: not in the (test's) home, not in the installed package, no temp folder
    assert not (_isolated_home / ".cache" / "napari-segment-anything").exists()
    assert _installed_widget_digest() == installed_before
    assert report["temp_dir"] is None


def test_demo_saves_the_real_window(tmp_path, _isolated_home):
    """With a display (``nox -t gui`` runs this under Xvfb) the demo also saves the shown window."""
    from medico_adapters.demo import WINDOW_SIZE, display_available

    if not display_available():
        pytest.skip("no display: run under xvfb-run or on a desktop (nox -t gui)")
    out = tmp_path / "demo-out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "medico_adapters", "demo", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "docked in a shown napari window" in proc.stdout and "window: " in proc.stdout

    report = json.loads((out / "report.json").read_bytes().decode("utf-8"))
    assert report["napari"]["window"] is True
    assert report["outputs"]["window"] == str(out / "window.png")
    assert report["result"]["sam_logits"] is True
    md = (out / "report.md").read_bytes().decode("utf-8")
    assert "a screenshot of the real napari window" in md and "not a screenshot" in md
    assert "↳ of which embedding" in md

    from PIL import Image

    window = Image.open(out / "window.png")
    assert window.width >= 0.6 * WINDOW_SIZE[0] and window.height >= 0.6 * WINDOW_SIZE[1]  # a small screen caps it
    assert len(window.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 100  # a rendered window, not a blank
    assert Image.open(out / "overlay.png").size != window.size
    assert not (_isolated_home / ".cache" / "napari-segment-anything").exists()
