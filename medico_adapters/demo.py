"""``medico-adapters demo``: MedicoSAM inside napari-sam's real widget, end to end, offline.

In a temporary folder: take napari-sam's files (the installed copy, or the wheel from PyPI),
patch that copy (never the installed one), build the real ``SamWidget``, load MedicoSAM
through the widget's own ``_load_model`` and click the lesion of a CT-like phantom through its own
``do_point_click``. HOME (with its Windows and XDG counterparts) points into the temporary folder
for the whole run, so the widget's checkpoint cache and napari's settings never touch the user's
real home. Where a display exists (a desktop, or ``xvfb-run``) the widget is docked in a shown
napari window and that window is saved too (``window.png``); elsewhere Qt runs offscreen.

Without a cached MedicoSAM checkpoint the run uses a random-weight ViT-B stand-in: the mask is
meaningless and every output says so ("plumbing check, not accuracy").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

import numpy as np

from medico_adapters import __version__, fsio, phantom
from medico_adapters.errors import MedicoError

NAPARI_HINT = 'pip install "napari==0.5.6" pyqt5 napari-sam'
STANDIN_NOTE = "random-weight stand-in: plumbing check, not accuracy"
QT_BINDINGS = ("PyQt5", "PyQt6", "PySide2", "PySide6")
#: where each OS looks for a home or per-user folder, and the folder it gets inside the demo's home.
#: Path.home() reads USERPROFILE on Windows (HOME elsewhere); platformdirs (napari's settings)
#: reads LOCALAPPDATA/APPDATA on Windows and the XDG variables on Linux.
HOME_REDIRECTS = (
    ("HOME", "."), ("USERPROFILE", "."),
    ("LOCALAPPDATA", "AppData/Local"), ("APPDATA", "AppData/Roaming"),
    ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
    ("XDG_DATA_HOME", ".local/share"), ("XDG_STATE_HOME", ".local/state"),
)
HOME_VARS = (*(key for key, _ in HOME_REDIRECTS), "XAUTHORITY")
WINDOW_SIZE = (1200, 820)
MASK_RGB = (255, 140, 0)
TRUTH_RGB = (60, 220, 90)
CLICK_RGB = (0, 200, 255)
SCALE = 5  # overlay pixels per phantom pixel
FILE_NOTES = {
    "overlay": "a picture the kit composed (not a screenshot): the phantom slice enlarged, the widget's mask "
               "(orange), the phantom's truth outline (green) and the click (cyan)",
    "window": "a screenshot of the real napari window, as a user sees it: napari-sam's widget docked beside "
              "the phantom slice and the mask layer the click filled",
    "screenshot": "the widget and its model list (Qt grab)",
}
NO_WINDOW = ("no display here (DISPLAY/WAYLAND_DISPLAY unset, or QT_QPA_PLATFORM=offscreen), so Qt ran "
             "offscreen; run the demo on a desktop or under `xvfb-run -a` to also save the real window")


class DemoError(MedicoError):
    """The demo cannot run here (no napari, no napari-sam, a widget that fails)."""


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def require_napari() -> None:
    """Fail with one line that says how to get napari when it (or a Qt binding) is missing."""
    if _find_spec("napari") is None:
        raise DemoError(
            f"napari is not importable by {sys.executable}; the demo drives napari-sam's real widget: "
            f"run `{NAPARI_HINT}` (or `medico-adapters install napari-sam`) in this environment"
        )
    if not any(_find_spec(b) is not None for b in QT_BINDINGS):
        raise DemoError(f"napari has no Qt binding in {sys.executable}; run `pip install pyqt5`")


# --- small helpers -----------------------------------------------------------------------------


class _Phases:
    """Times named phases and prints a line as each starts and ends."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, text: str) -> Iterator[None]:
        self.say(f"[demo] {text} ...")
        start = time.perf_counter()
        try:
            yield
        except MedicoError:
            raise
        except Exception as e:  # the tool's own code failing is reported, not a kit traceback
            raise DemoError(f"demo phase '{key}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        seconds = time.perf_counter() - start
        self.timings[key] = round(seconds, 3)
        self.say(f"[demo]   done in {seconds:.1f} s")


def display_available() -> bool:
    """Whether Qt can show a window: a desktop on macOS/Windows, X11/Wayland (or xvfb-run) elsewhere."""
    if os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal"):
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@contextlib.contextmanager
def isolated_home(home: Path) -> Iterator[Path]:
    """Point every home and per-user folder variable into ``home``; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in HOME_VARS}
    xauthority = Path.home() / ".Xauthority"
    home.mkdir(parents=True, exist_ok=True)
    for key, sub in HOME_REDIRECTS:
        os.environ[key] = str(home / sub)
    if saved["XAUTHORITY"] is None and xauthority.is_file():
        # X11 finds its cookie in ~/.Xauthority unless told; a moved HOME would lose the display
        os.environ["XAUTHORITY"] = str(xauthority)
    try:
        if Path.home().resolve() != home.resolve():
            raise DemoError(f"{home}: could not redirect HOME for the demo; refusing to touch the real cache")
        yield home
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _version(dist: str) -> str | None:
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return None


def _purge_modules(top: str) -> None:
    for name in list(sys.modules):
        if name == top or name.startswith(top + "."):
            del sys.modules[name]


def _import_copy(site: Path, module: str):
    """Import ``module`` from ``site`` even though another copy is installed."""
    from medico_adapters.adapters.napari_sam import PACKAGES

    for top in PACKAGES:
        _purge_modules(top)
    sys.path.insert(0, str(site))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(site))


# --- phase: napari-sam's files -------------------------------------------------------------------


def get_napari_sam(dest: Path, wanted: str | None = None) -> dict:
    """Put an unpatched napari-sam package under ``dest/site``; say where it came from."""
    from medico_adapters import engine
    from medico_adapters.adapters.napari_sam import PACKAGES

    site = dest / "site"
    site.mkdir(parents=True, exist_ok=True)
    installed = _version("napari-sam")
    if wanted is None or wanted == installed:
        for package in PACKAGES:
            spec = _find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                continue
            src = Path(list(spec.submodule_search_locations)[0])
            target = site / package
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", engine.STATE_DIR, "*" + engine.ORIG_SUFFIX))
            note = f"copy of the installed package {src}"
            manifest = engine.read_manifest(src)
            if manifest:  # the installed copy is patched: rebuild upstream from its backups
                for rel in manifest.get("files", {}):
                    shutil.copyfile(src / engine.STATE_DIR / "backup" / rel, target / rel)
                note += " (it is patched; the demo used its upstream backups)"
            return {"site": site, "package": package, "version": installed or "unknown", "source": note}
    spec = f"napari-sam=={wanted}" if wanted else "napari-sam"
    wheels = dest / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary", ":all:",
           "-q", "-d", str(wheels), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if proc.returncode != 0 or not found:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        what = f"napari-sam {wanted} is not the installed version" if wanted else "napari-sam is not installed"
        raise DemoError(
            f"{what} and `pip download {spec}` failed ({reason}); "
            f"run `{NAPARI_HINT}` or `medico-adapters install napari-sam`"
        )
    wheel = found[0]
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    package = next((p for p in PACKAGES if (site / p / "_widget.py").is_file()), None)
    if package is None:
        raise DemoError(f"{wheel.name}: holds no napari_sam/_widget.py")
    return {"site": site, "package": package, "version": wheel.name.split("-")[1], "source": f"PyPI wheel {wheel.name}"}


# --- phase: checkpoint -----------------------------------------------------------------------------


def choose_checkpoint(checkpoint: str | os.PathLike | None, tmp: Path) -> dict:
    """The user's file, else the cached MedicoSAM, else a seeded random ViT-B (labelled stand-in)."""
    from medico_adapters import registry

    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise DemoError(f"{path}: no such checkpoint file")
        return {"path": str(path), "kind": "user", "standin": False, "label": f"user checkpoint {path.name}"}
    cached = registry.cached_path(registry.MEDICOSAM)
    if cached is not None:
        return {"path": str(cached), "kind": "medicosam", "standin": False, "label": f"MedicoSAM ({registry.MEDICOSAM}, cached)"}
    import torch
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    path = tmp / "standin_vit_b_random_seed0.pt"
    torch.save(build_sam_vit_b().state_dict(), path)
    return {
        "path": str(path), "kind": "standin", "standin": True,
        "label": "RANDOM ViT-B stand-in (seed 0), not MedicoSAM",
        "why": f"{registry.MEDICOSAM} is not cached; `medico-adapters fetch {registry.MEDICOSAM}` (or --from-file) gets it",
    }


# --- pictures --------------------------------------------------------------------------------------


def _png(picture) -> bytes:
    """A PIL image as PNG bytes, for fsio to write atomically."""
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _edge(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _wrap(draw, text: str, font, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            out.append(line)
            line = word
        else:
            line = candidate
    return out + [line]


def render_overlay(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None, click: tuple[int, int],
                   lines: list[tuple[str, tuple[int, int, int]]], path: Path) -> Path:
    """The windowed slice, enlarged, with the mask filled and outlined, the truth outline and the click."""
    from PIL import Image, ImageDraw

    big = lambda a: np.kron(a, np.ones((SCALE, SCALE), dtype=a.dtype))  # noqa: E731
    rgb = np.repeat(big(image)[:, :, None], 3, axis=2).astype(np.float32)
    m = big(mask.astype(bool))
    rgb[m] = 0.6 * rgb[m] + 0.4 * np.array(MASK_RGB, dtype=np.float32)
    edge = _edge(mask.astype(bool))
    if edge.sum() < 0.5 * max(int(mask.sum()), 1):  # a compact mask gets an outline; speckle would drown in it
        rgb[_edge(m)] = MASK_RGB
    if truth is not None:
        t = big(truth.astype(bool))
        ring = _edge(t) | _edge(t & ~_edge(t))
        rgb[ring] = TRUTH_RGB
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    cy, cx = (click[0] + 0.5) * SCALE, (click[1] + 0.5) * SCALE
    r = 1.2 * SCALE
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=CLICK_RGB, width=2)
    draw.line((cx - 2 * r, cy, cx - r, cy), fill=CLICK_RGB, width=2)
    draw.line((cx + r, cy, cx + 2 * r, cy), fill=CLICK_RGB, width=2)
    draw.line((cx, cy - 2 * r, cx, cy - r), fill=CLICK_RGB, width=2)
    draw.line((cx, cy + r, cx, cy + 2 * r), fill=CLICK_RGB, width=2)

    font = _font(15)
    line_h = 20
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [(part, colour) for text, colour in lines for part in _wrap(measure, text, font, picture.width - 16)]
    banner = Image.new("RGB", (picture.width, line_h * len(wrapped) + 10), (24, 24, 24))
    bd = ImageDraw.Draw(banner)
    for i, (text, colour) in enumerate(wrapped):
        bd.text((8, 5 + i * line_h), text, fill=colour, font=font)
    legend = Image.new("RGB", (picture.width, line_h + 10), (24, 24, 24))
    ld = ImageDraw.Draw(legend)
    x = 8
    for text, colour in (("napari-sam mask", MASK_RGB), ("phantom lesion (truth)", TRUTH_RGB), ("click", CLICK_RGB)):
        ld.rectangle((x, 9, x + 14, 23), fill=colour)
        ld.text((x + 20, 7), text, fill=(230, 230, 230), font=font)
        x += 28 + int(ld.textlength(text, font=font))
    out = Image.new("RGB", (picture.width, banner.height + picture.height + legend.height))
    out.paste(banner, (0, 0))
    out.paste(picture, (0, banner.height))
    out.paste(legend, (0, banner.height + picture.height))
    return fsio.atomic_write(path, _png(out))


def grab_widget(widget, path: Path, highlight: str = "MedicoSAM") -> Path:
    """Save the widget and, beside it, its model list with ``highlight`` selected (offscreen Qt)."""
    from qtpy.QtCore import QBuffer, QByteArray, QIODevice, QPoint, Qt
    from qtpy.QtGui import QColor, QFont, QPainter, QPixmap
    from qtpy.QtWidgets import QApplication, QListWidget

    docked = widget.isVisible()  # in a shown window: grab it in place, never resize or hide it
    if not docked:
        widget.resize(max(widget.sizeHint().width(), 380), widget.sizeHint().height())
        widget.show()
    QApplication.processEvents()
    shot = widget.grab()

    combo = widget.cb_model_type
    items = QListWidget()
    items.setFont(combo.font())
    for i in range(combo.count()):
        items.addItem(combo.itemText(i))
        if combo.itemText(i).startswith(highlight):
            items.setCurrentRow(i)
            font = QFont(combo.font())
            font.setBold(True)
            items.item(i).setFont(font)
    rows = items.sizeHintForRow(0) * combo.count() + 2 * items.frameWidth() + 4
    items.resize(max(combo.width(), items.sizeHintForColumn(0) + 24), rows)
    items.show()
    QApplication.processEvents()
    popup = items.grab()

    pad, title_h = 12, 24
    canvas = QPixmap(shot.width() + popup.width() + 3 * pad, max(shot.height(), popup.height() + title_h) + 2 * pad)
    canvas.fill(QColor(38, 41, 48))
    painter = QPainter(canvas)
    painter.drawPixmap(QPoint(pad, pad), shot)
    painter.setPen(QColor(230, 230, 230))
    painter.drawText(shot.width() + 2 * pad, pad, popup.width(), title_h, int(Qt.AlignLeft | Qt.AlignVCenter),
                     "model list (cb_model_type):")
    painter.drawPixmap(QPoint(shot.width() + 2 * pad, pad + title_h), popup)
    painter.end()
    items.close()
    if not docked:
        widget.hide()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not canvas.save(buffer, "PNG"):
        raise DemoError(f"{path}: Qt could not encode the screenshot")
    buffer.close()
    return fsio.atomic_write(path, bytes(data))


def grab_window(viewer) -> bytes:
    """The whole shown napari window (menus, layer list, canvas, docked widget) as PNG bytes."""
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    for _ in range(5):  # let the canvas repaint with the new mask before reading it back
        QApplication.processEvents()
        time.sleep(0.05)
    return _png(Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).convert("RGB"))


# --- the demo --------------------------------------------------------------------------------------


def _close_quietly(viewer) -> None:
    with contextlib.suppress(Exception):
        viewer.close()


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else round(2.0 * int((a & b).sum()) / total, 4)


def run(
    out: str | os.PathLike = "medico-demo",
    *,
    screenshot: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    napari_sam_version: str | None = None,
    target: str = "lesion",
    keep_temp: bool = False,
    say: Callable[[str], None] = print,
) -> dict:
    require_napari()
    out = Path(out).expanduser().resolve()
    screenshot = Path(screenshot).expanduser().resolve() if screenshot else None
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a folder")
    if target not in ("lesion", "liver"):
        raise DemoError(f"--target {target}: choose lesion or liver")
    checkpoint = Path(checkpoint).expanduser().resolve() if checkpoint else None

    started = time.perf_counter()
    phases = _Phases(say)
    tmp = Path(tempfile.mkdtemp(prefix="medico-demo-"))
    report: dict = {"kit_version": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        with phases("checkpoint", "choosing the checkpoint"):
            ckpt = choose_checkpoint(checkpoint, tmp)  # before HOME moves: the kit's cache is the user's
        report["checkpoint"] = ckpt
        say(f"[demo]   {ckpt['label']}")

        window = display_available()
        # the viewer closes (ExitStack) before HOME is restored: its teardown runs widget code too
        with isolated_home(tmp / "home"), contextlib.ExitStack() as closing:
            if not window:
                os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
            with phases("get_files", "getting napari-sam's files into a temporary folder"):
                files = get_napari_sam(tmp, napari_sam_version)
            say(f"[demo]   napari-sam {files['version']}: {files['source']}")

            with phases("patch", "patching that copy (the installed package is not touched)"):
                from medico_adapters import patching
                from medico_adapters.adapters.napari_sam import ADAPTER, needs_layers_compat

                options = {"napari_compat": True} if needs_layers_compat() else {}
                result = patching.patch(ADAPTER, files["site"], checkpoint=ckpt["path"], options=options)
                for placed in result.placed:
                    if not Path(placed).resolve().is_relative_to(tmp.resolve()):
                        raise DemoError(f"{placed}: the demo placed a checkpoint outside its temporary folder")
            say(f"[demo]   layout {result.layout}; changed {', '.join(result.changed)}"
                + ("; napari>=0.6.2 compat" if options else ""))

            where = "docked in a shown napari window" if window else "headless (offscreen Qt)"
            with phases("widget_build", f"building napari-sam's real widget, {where}"):
                import napari

                # Import order matters with a window: the widget module loads torch and torchvision,
                # whose triton (Linux torch wheels) segfaults if it loads after Mesa's OpenGL LLVM.
                widget_module = _import_copy(files["site"], f"{files['package']}._widget")
                widget_file = Path(widget_module.__file__).resolve()
                if not widget_file.is_relative_to(tmp.resolve()):
                    raise DemoError(f"{widget_file}: imported the installed widget, not the patched copy")
                ph = phantom.make_phantom()
                z = ph.middle
                image = phantom.window(ph.volume[z], *phantom.WINDOWS["soft_tissue"])
                viewer = napari.Viewer(show=window, title="medico-adapters demo: napari-sam + MedicoSAM")
                closing.callback(_close_quietly, viewer)
                viewer.add_image(image, name="phantom CT (W400/L40)")
                viewer.add_labels(np.zeros(image.shape, dtype=np.int32), name="mask")
                widget = widget_module.SamWidget(viewer)
                if window:
                    viewer.window.resize(*WINDOW_SIZE)
                    viewer.window.add_dock_widget(widget, name="Segment Anything (patched copy)", area="right")

            with phases("model_load", "selecting MedicoSAM and running the widget's _load_model"):
                combo = widget.cb_model_type
                items = [combo.itemText(i) for i in range(combo.count())]
                index = next((i for i, t in enumerate(items) if t.startswith("MedicoSAM")), None)
                if index is None:
                    raise DemoError(f"{widget_file}: the patched widget offers no MedicoSAM entry ({', '.join(items)})")
                combo.setCurrentIndex(index)
                selected = combo.currentText()
                widget._load_model()
                loaded = combo.currentText()
            say(f"[demo]   model list: {', '.join(items)}; now '{loaded}' on {widget.device}")

            shot_path = None
            if screenshot is not None:
                with phases("screenshot", "grabbing the widget with MedicoSAM loaded (Qt grab)"):
                    shot_path = grab_widget(widget, screenshot)

            click = tuple(int(v) for v in ph.landmarks[target][1:])
            with phases("embedding_click", f"image embedding (widget _activate) and a click on the {target} at (y, x) = {click}"):
                widget.cb_image_layers.setCurrentText("phantom CT (W400/L40)")
                widget.cb_label_layers.setCurrentText("mask")
                start = time.perf_counter()
                widget._activate()
                embed_s = time.perf_counter() - start
                if not widget.is_active:
                    raise DemoError("the widget did not activate (no image/labels layer selected?)")
                start = time.perf_counter()
                widget.do_point_click(np.array(click), True)
                click_s = time.perf_counter() - start
                mask = np.asarray(viewer.layers["mask"].data) > 0
                predicted = widget.sam_logits is not None  # read now: closing the viewer deactivates
                device = str(widget.device)
            phases.timings["embedding"] = round(embed_s, 3)
            phases.timings["click"] = round(click_s, 3)

            window_png = None
            if window:
                with phases("window", "saving the real napari window (widget, image, mask)"):
                    window_png = grab_window(viewer)

        truth = ph.mask(target)[z]
        report.update({
            "napari_sam": {
                "version": files["version"], "source": files["source"], "layout": result.layout,
                "changed": result.changed, "napari_compat": bool(options),
                "widget_module": str(widget_file), "model_list": items, "selected": selected, "after_load": loaded,
            },
            "napari": {"version": _version("napari") or getattr(napari, "__version__", "unknown"),
                       "qt_platform": os.environ.get("QT_QPA_PLATFORM"), "window": window,
                       "display": os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")},
            "device": device,
            "phantom": {"shape": list(ph.volume.shape), "spacing_mm": list(ph.spacing), "slice": z,
                        "window": "soft tissue W400/L40 -> uint8", "target": target, "click_yx": list(click)},
            "result": {
                "mask_pixels": int(mask.sum()), "empty": not mask.any(),
                "dice_vs_phantom_" + target: _dice(mask, truth),
                "sam_logits": predicted,
                "meaningful": not ckpt["standin"],
            },
            "timings_s": phases.timings,
        })
        report["timings_s"]["total"] = round(time.perf_counter() - started, 3)  # wall clock, start to here

        out.mkdir(parents=True, exist_ok=True)
        lines = _banner(report)
        overlay = render_overlay(image, mask, truth, click, lines, out / "overlay.png")
        volume_path = phantom.write(ph, out / "phantom.nii.gz")
        outputs = {"overlay": str(overlay), "report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
                   "phantom": volume_path}
        if window_png is not None:
            outputs["window"] = str(fsio.atomic_write(out / "window.png", window_png))
        if shot_path is not None:
            outputs["screenshot"] = str(shot_path)
        report["outputs"] = outputs
        report["temp_dir"] = str(tmp) if keep_temp else None
        fsio.write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        fsio.write_text(out / "report.md", markdown(report))
        return report
    finally:
        from medico_adapters.adapters.napari_sam import PACKAGES

        for top in PACKAGES:  # the patched copy's modules must not outlive its folder
            _purge_modules(top)
        if not keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)


def _banner(report: dict) -> list[tuple[str, tuple[int, int, int]]]:
    r, ns, ck = report["result"], report["napari_sam"], report["checkpoint"]
    target = report["phantom"]["target"]
    dice = r["dice_vs_phantom_" + target]
    lines = [
        (f"napari-sam {ns['version']} (layout {ns['layout']}) + napari {report['napari']['version']}: "
         f"'{ns['after_load']}', one click on the {target}", (235, 235, 235)),
        (f"checkpoint: {ck['label']}", (255, 90, 90) if ck["standin"] else (235, 235, 235)),
    ]
    if ck["standin"]:
        lines.append((f"{STANDIN_NOTE.upper()}: the mask shows the plumbing works; its shape means nothing",
                      (255, 90, 90)))
    if r["empty"]:
        lines.append(("MASK IS EMPTY: the widget ran, SAM predicted no foreground"
                      + (" (expected with random weights)" if ck["standin"] else ""), (255, 200, 0)))
    else:
        lines.append((f"mask: {r['mask_pixels']} px; Dice vs the phantom's {target}: {dice}", (235, 235, 235)))
    return lines


def markdown(report: dict) -> str:
    r, ns, ck, t = report["result"], report["napari_sam"], report["checkpoint"], report["timings_s"]
    target = report["phantom"]["target"]
    standin = ck["standin"]
    lines = ["# medico-adapters demo: MedicoSAM in napari-sam's real widget", ""]
    if standin:
        lines += [f"> **{STANDIN_NOTE.upper()}.** The weights are a seeded random ViT-B, not MedicoSAM "
                  f"({ck.get('why', '')}). The mask shows that the patched widget loads and runs the model; "
                  "its shape means nothing.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| napari-sam | {ns['version']} ({ns['source']}) |",
        f"| layout | {ns['layout']}; changed {', '.join(ns['changed'])}"
        + ("; napari>=0.6.2 layers_change compat" if ns["napari_compat"] else "") + " |",
        f"| napari | {report['napari']['version']} ("
        + (f"shown window on display {report['napari'].get('display') or 'of this desktop'}"
           if report["napari"].get("window") else f"QT_QPA_PLATFORM={report['napari']['qt_platform']}") + ") |",
        f"| checkpoint | {ck['label']} — `{ck['path']}`"
        + (" (temporary, removed after the run)" if ck["standin"] and not report.get("temp_dir") else "") + " |",
        f"| stand-in | {'yes — ' + STANDIN_NOTE if standin else 'no'} |",
        f"| model list | {', '.join(ns['model_list'])} |",
        f"| after `_load_model` | {ns['after_load']} on {report['device']} |",
        f"| phantom | {' x '.join(map(str, report['phantom']['shape']))} HU, 1 mm; slice {report['phantom']['slice']}, "
        f"{report['phantom']['window']} |",
        f"| click | {target} at (y, x) = {tuple(report['phantom']['click_yx'])} via `do_point_click` |",
        f"| mask | {'EMPTY' if r['empty'] else str(r['mask_pixels']) + ' px'}"
        f"; Dice vs phantom {target}: {r['dice_vs_phantom_' + target]}"
        + (" (meaningless with random weights)" if standin else "") + " |",
        "", "## Timings (seconds)", "", "| phase | s |", "|---|---|",
    ]
    names = {
        "checkpoint": "choose checkpoint" + (" (build random stand-in)" if standin else ""),
        "get_files": "get napari-sam's files", "patch": "patch the copy (incl. checkpoint export)",
        "widget_build": "import napari + viewer + widget build", "model_load": "model load (`_load_model`)",
        "embedding_click": "embedding + click", "embedding": "↳ of which embedding (`_activate`)",
        "click": "↳ of which click (`do_point_click`)", "screenshot": "widget screenshot",
        "window": "window screenshot", "total": "**total**",
    }
    lines += [f"| {names.get(k, k)} | {v:.2f} |" for k, v in t.items()]
    lines += ["", "## Files", ""]
    lines += [f"- {k}: `{v}`" + (f" — {FILE_NOTES[k]}" if k in FILE_NOTES else "") for k, v in report["outputs"].items()]
    if "window" not in report["outputs"]:
        lines.append(f"- no window.png: {NO_WINDOW}")
    if r["empty"]:
        lines += ["", "The mask is empty: the widget ran end to end, but SAM predicted no foreground"
                  + (" (expected with random weights)." if standin else ".")]
    lines += ["", "Try the kit's own predictor on the full volume:", "",
              f"    medico-adapters segment {report['outputs']['phantom']} -o lesion.nii.gz "
              f"--point {report['phantom']['slice']},{report['phantom']['click_yx'][0]},{report['phantom']['click_yx'][1]} "
              "--window soft_tissue", ""]
    return "\n".join(lines)


def summary(report: dict) -> str:
    r, ck, t = report["result"], report["checkpoint"], report["timings_s"]
    target = report["phantom"]["target"]
    head = (f"napari-sam {report['napari_sam']['version']} (layout {report['napari_sam']['layout']}) on napari "
            f"{report['napari']['version']}: loaded '{report['napari_sam']['after_load']}' and clicked the {target}")
    mask = "EMPTY mask" if r["empty"] else f"mask {r['mask_pixels']} px (Dice vs phantom {target} {r['dice_vs_phantom_' + target]})"
    lines = [head, f"  checkpoint: {ck['label']}", f"  result: {mask}"]
    if ck["standin"]:
        lines.append(f"  note: {STANDIN_NOTE}; {ck['why']}")
    lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    lines += [f"  {k}: {v}" for k, v in report["outputs"].items()]
    if "window" not in report["outputs"]:
        lines.append(f"  window: none; {NO_WINDOW}")
    return "\n".join(lines)
