"""The CT phantom and the parts of ``medico-adapters demo`` that run without napari.

The demo itself drives napari-sam's real widget; integration/test_demo_real.py runs it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medico_adapters import cli, demo, phantom
from tests.helpers import copy_fixture

REPO = Path(__file__).resolve().parents[1]


# --- phantom ---------------------------------------------------------------------------------------


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def test_phantom_is_deterministic():
    a, b = phantom.make_phantom(), phantom.make_phantom()
    assert _digest(a.volume) == _digest(b.volume)
    assert _digest(a.labels) == _digest(b.labels)
    assert a.landmarks == b.landmarks
    assert _digest(phantom.make_phantom(seed=1).volume) != _digest(a.volume)


def test_phantom_geometry_and_type():
    ph = phantom.make_phantom()
    assert ph.volume.shape == (48, 128, 128) == ph.labels.shape
    assert ph.volume.dtype == np.int16
    assert ph.spacing == (1.0, 1.0, 1.0)
    middle = set(np.unique(ph.labels[ph.middle]).tolist())
    assert set(phantom.LABELS.values()) <= middle, "the middle slice shows every structure"
    lesion = ph.mask("lesion")
    assert 500 < lesion.sum() < 3000
    assert lesion[: ph.middle - 10].sum() == 0 and lesion[ph.middle + 10 :].sum() == 0, "a round lesion, not a tube"
    for name, (z, y, x) in ph.landmarks.items():
        expected = "bone" if name == "spine" else name
        assert ph.labels[z, y, x] == phantom.LABELS[expected], name


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("body", -10, 10), ("soft_tissue", 30, 50), ("lung", -810, -790), ("bone", 690, 710),
     ("liver", 50, 70), ("lesion", 0, 20), ("aorta", 40, 60)],
)
def test_phantom_hounsfield_ranges(name, low, high):
    ph = phantom.make_phantom()
    values = ph.volume[ph.mask(name)].astype(np.float64)
    assert low <= values.mean() <= high
    assert values.std() < 12  # CT-like noise, no overlap between tissue classes
    assert np.percentile(values, 1) > low - 40 and np.percentile(values, 99) < high + 40


def test_phantom_air_and_clean_values():
    ph = phantom.make_phantom(noise=0)
    air = ph.volume[ph.labels == 0]
    assert (air == -1000).all()
    for name, hu in phantom.HU.items():
        if name != "air":
            assert (ph.volume[ph.mask(name)] == hu).all(), name
    assert ph.volume.min() >= -1024 and ph.volume.max() <= 3071


def test_phantom_scales_with_shape():
    ph = phantom.make_phantom((16, 64, 96))
    assert ph.volume.shape == (16, 64, 96)
    assert set(phantom.LABELS.values()) <= set(np.unique(ph.labels[ph.middle]).tolist())
    with pytest.raises(ValueError, match="too small"):
        phantom.make_phantom((4, 64, 64))


def test_soft_tissue_window():
    hu = np.array([-1000, -160, 40, 240, 1000])
    assert phantom.window(hu, 400, 40).tolist() == [0, 0, 128, 255, 255]
    assert phantom.window(hu).dtype == np.uint8


def test_phantom_writes_with_spacing(tmp_path):
    import SimpleITK as sitk

    ph = phantom.make_phantom()
    path = phantom.write(ph, tmp_path / "phantom.nii.gz")
    img = sitk.ReadImage(path)
    assert img.GetSpacing() == (1.0, 1.0, 1.0)
    assert np.array_equal(sitk.GetArrayFromImage(img), ph.volume)


# --- the demo's CLI without napari -------------------------------------------------------------------


def _no_napari(monkeypatch, missing=("napari",)):
    real = demo._find_spec
    monkeypatch.setattr(demo, "_find_spec", lambda name: None if name in missing else real(name))


def test_demo_without_napari_refuses_in_one_line(monkeypatch, tmp_path, capsys):
    _no_napari(monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("medico-adapters: error: napari is not importable")
    assert 'pip install "napari==0.5.6" pyqt5 napari-sam' in lines[0]
    assert "medico-adapters install napari-sam" in lines[0]
    assert not out.exists()


def test_demo_without_qt_binding_refuses(monkeypatch, tmp_path, capsys):
    if demo._find_spec("napari") is None:
        monkeypatch.setattr(demo, "_find_spec", lambda name: object() if name == "napari" else None)
    else:
        _no_napari(monkeypatch, demo.QT_BINDINGS)
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install pyqt5" in err[0]


def test_demo_refusal_in_a_real_process(tmp_path):
    """A fresh interpreter where importing napari fails: exit 1, one stderr line, no traceback."""
    code = (
        "import sys; sys.modules['napari'] = None\n"
        "from medico_adapters.cli import main\n"
        f"raise SystemExit(main(['demo', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "napari==0.5.6" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--screenshot", "--checkpoint", "--napari-sam-version", "--json", "medico-demo"):
        assert option in text


# --- pieces that need no Qt ---------------------------------------------------------------------------


def test_isolated_home_redirects_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    before = (os.environ["HOME"], Path.home())
    with demo.isolated_home(tmp_path / "h") as home:
        assert Path.home() == home
        assert os.environ["XDG_CACHE_HOME"] == str(home / ".cache")
        assert os.environ["XDG_CONFIG_HOME"] == str(home / ".config")
    assert (os.environ["HOME"], Path.home()) == before
    assert os.environ["XDG_CACHE_HOME"] == "/somewhere/cache"
    assert "XDG_STATE_HOME" not in os.environ


WINDOWS_ENV = {
    "USERPROFILE": r"C:\Users\alice",
    "LOCALAPPDATA": r"C:\Users\alice\AppData\Local",
    "APPDATA": r"C:\Users\alice\AppData\Roaming",
}


def test_isolated_home_redirects_windows_folders(tmp_path, monkeypatch):
    """On Windows Path.home() reads USERPROFILE, not HOME: the demo must move it (and AppData) too."""
    import ntpath

    for key, value in WINDOWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os.path, "expanduser", ntpath.expanduser)  # Windows' lookup: USERPROFILE
    assert str(Path.home()) == WINDOWS_ENV["USERPROFILE"]
    home = tmp_path / "h"
    with demo.isolated_home(home):
        assert Path.home() == home
        assert os.environ["USERPROFILE"] == str(home)
        assert os.environ["LOCALAPPDATA"] == str(home / "AppData" / "Local")
        assert os.environ["APPDATA"] == str(home / "AppData" / "Roaming")
    for key, value in WINDOWS_ENV.items():
        assert os.environ[key] == value, key
    assert str(Path.home()) == WINDOWS_ENV["USERPROFILE"]


def test_isolated_home_keeps_the_x11_cookie(tmp_path, monkeypatch):
    real = tmp_path / "real-home"
    real.mkdir()
    (real / ".Xauthority").write_bytes(b"cookie")
    monkeypatch.setenv("HOME", str(real))
    monkeypatch.delenv("XAUTHORITY", raising=False)
    with demo.isolated_home(tmp_path / "h"):
        assert os.environ["XAUTHORITY"] == str(real / ".Xauthority")
    assert "XAUTHORITY" not in os.environ


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {}, False),
        ("linux", {"DISPLAY": ":99"}, True),
        ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, True),
        ("linux", {"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, False),
        ("win32", {}, True),
        ("darwin", {}, True),
        ("darwin", {"QT_QPA_PLATFORM": "offscreen"}, False),
    ],
)
def test_display_available(monkeypatch, platform, env, expected):
    for key in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert demo.display_available() is expected


def test_installed_copy_is_copied_unpatched(tmp_path, monkeypatch, checkpoints):
    """A patched installed napari-sam: the demo's copy is upstream code, and the original is untouched."""
    from medico_adapters import engine, patching
    from medico_adapters.adapters.napari_sam import ADAPTER

    fixture = copy_fixture("napari_sam/N3", tmp_path / "installed")
    package = fixture / "src" / "napari_sam"
    upstream = (package / "_widget.py").read_bytes()
    patching.patch(ADAPTER, package, checkpoint=checkpoints["plain"])
    patched = (package / "_widget.py").read_bytes()
    assert patched != upstream

    monkeypatch.setattr(demo, "_find_spec", lambda name: SimpleNamespace(submodule_search_locations=[str(package)])
                        if name == "napari_sam" else None)
    monkeypatch.setattr(demo, "_version", lambda dist: "0.4.13")
    files = demo.get_napari_sam(tmp_path / "demo")
    copy = files["site"] / "napari_sam"
    assert files["package"] == "napari_sam" and files["version"] == "0.4.13"
    assert "upstream backups" in files["source"]
    assert (copy / "_widget.py").read_bytes() == upstream
    assert not (copy / engine.STATE_DIR).exists()
    assert (package / "_widget.py").read_bytes() == patched


def _report(empty: bool, standin: bool = True) -> dict:
    return {
        "napari_sam": {"version": "0.4.13", "source": "copy", "layout": "N3", "changed": ["napari_sam/_widget.py"],
                       "napari_compat": False, "model_list": ["vit_b (Auto-Download)", "MedicoSAM (Cached)"],
                       "after_load": "MedicoSAM (Loaded)"},
        "napari": {"version": "0.5.6", "qt_platform": "offscreen"},
        "device": "cpu",
        "checkpoint": {"label": "RANDOM ViT-B stand-in (seed 0), not MedicoSAM" if standin else "MedicoSAM",
                       "standin": standin, "path": "/tmp/x.pt", "why": "not cached"},
        "phantom": {"shape": [48, 128, 128], "slice": 24, "window": "W400/L40", "target": "lesion", "click_yx": [62, 36]},
        "result": {"mask_pixels": 0 if empty else 150, "empty": empty, "dice_vs_phantom_lesion": None if empty else 0.9,
                   "sam_logits": True},
        "timings_s": {"patch": 1.0, "model_load": 2.0, "total": 3.0},
        "outputs": {"overlay": "o.png", "phantom": "p.nii.gz"},
    }


@pytest.mark.parametrize("empty", [True, False])
def test_reports_label_the_stand_in_and_an_empty_mask(empty):
    report = _report(empty)
    md, text = demo.markdown(report), demo.summary(report)
    for doc in (md, text):
        assert "plumbing check, not accuracy" in doc.lower()
        assert ("EMPTY" in doc) == empty
    assert "| napari-sam | 0.4.13" in md and "N3" in md and "0.5.6" in md
    assert "model load" in md and "**total**" in md
    real = _report(empty, standin=False)
    assert "plumbing check" not in demo.markdown(real).lower()


def test_report_says_which_picture_is_which():
    offscreen = _report(empty=False)
    md = demo.markdown(offscreen)
    assert "- overlay: `o.png` — a picture the kit composed (not a screenshot)" in md
    assert "no window.png: no display here" in md and "xvfb-run -a" in md
    assert "QT_QPA_PLATFORM=offscreen" in md
    assert "window: none" in demo.summary(offscreen)

    shown = _report(empty=False)
    shown["napari"].update(qt_platform=None, window=True, display=":99")
    shown["outputs"]["window"] = "w.png"
    md = demo.markdown(shown)
    assert "- window: `w.png` — a screenshot of the real napari window" in md
    assert "shown window on display :99" in md
    assert "no window.png" not in md and "window: none" not in demo.summary(shown)


def test_overlay_png_even_for_an_empty_mask(tmp_path):
    from PIL import Image

    ph = phantom.make_phantom()
    image = phantom.window(ph.volume[ph.middle])
    orange = {}
    for empty in (True, False):
        mask = np.zeros(image.shape, bool) if empty else ph.mask("lesion")[ph.middle]
        path = demo.render_overlay(image, mask, ph.mask("lesion")[ph.middle], (62, 36),
                                   demo._banner(_report(empty)), tmp_path / f"{empty}.png")
        picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert picture.shape[1] == 128 * demo.SCALE and picture.shape[0] > 128 * demo.SCALE
        side = 128 * demo.SCALE
        slice_px = picture[-side - 30 : -30]  # banner above, a 30 px legend below
        tinted = slice_px[..., 0] - slice_px[..., 2] > 60  # orange mask pixels; the phantom is grey
        orange[empty] = int(tinted.sum())
    assert orange[True] == 0
    assert orange[False] > orange[True] + 0.5 * 149 * demo.SCALE**2
