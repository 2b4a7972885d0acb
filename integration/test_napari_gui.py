"""napari-sam, patched by the kit, driven in a shown napari window as a user drives it.

``nox -t gui`` runs this under Xvfb (or on a desktop): the kit's CLI patches the installed
napari-sam, the Plugins menu's own call docks its widget, its combo box picks MedicoSAM, its
buttons load the model and embed the volume, and middle clicks on the vispy canvas (Qt mouse
events, through napari's mouse callbacks) place points on two slices. A screenshot of the whole
window is saved at each step (``$MEDICO_GUI_SHOTS``). The weights are a random ViT-B in the
training format: this proves the plumbing through the real GUI, not accuracy.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_adapters import fsio, phantom
from medico_adapters.adapters.napari_sam import needs_layers_compat

# Neither is imported here: napari builds its icon theme under the home it sees when imported,
# which must be the test's own, and the patch must land before napari-sam is imported.
for _package in ("napari", "napari_sam"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (nox -t gui)", allow_module_level=True)
if "napari" in sys.modules:
    pytest.fail("napari was imported before the test moved HOME (its pytest plugin?): run with -p no:napari",
                pytrace=False)

REPO = Path(__file__).resolve().parents[1]
# napari-sam embeds every slice when activated (~10-20 s each for a ViT-B on 2 CPU cores), so the
# test loads a slab of the smallest phantom: four slices, from one above the lesion's centre.
SHAPE = (8, 128, 128)
SLAB = slice(3, 7)
WINDOW_SIZE = (1200, 820)


def _display_problem() -> str | None:
    if os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal"):
        return f"QT_QPA_PLATFORM={os.environ['QT_QPA_PLATFORM']} shows no window"
    if sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return "no display (DISPLAY/WAYLAND_DISPLAY unset): run under xvfb-run or `nox -t gui`"


if _display_problem():
    pytest.skip(_display_problem(), allow_module_level=True)


def _kit(*args: str, home: Path) -> dict:
    """The kit's CLI, as a user runs it, with this test's HOME."""
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "medico_adapters", *args, "--json"], capture_output=True, text=True,
                          env=env, cwd=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def _module_home(tmp_path_factory):
    """One home for this module's windows: napari builds its icon theme under the home it sees when
    first imported, and every later window of the process looks for the icons there."""
    from tests.conftest import HOME_VARIABLES

    home = tmp_path_factory.mktemp("gui-home")
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in HOME_VARIABLES.items():
            mp.setenv(name, str(home / sub))
        mp.setenv("MEDICO_ADAPTERS_CACHE", str(home / "medico-cache"))
        yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def _isolated_home(_module_home):
    """The unit suite's per-test home, made this module's one home (see ``_module_home``)."""
    return _module_home


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("MEDICO_GUI_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def training_checkpoint(tmp_path, vit_b_state):
    """The random ViT-B as a micro-sam/torch_em training file (what MedicoSAM's export writes)."""
    path = tmp_path / "medicosam_training.pt"
    torch.save({
        "model_state": {f"sam.{k}": v for k, v in vit_b_state.items()},
        "decoder_state": {"decoder.0.weight": torch.zeros(8, 4)},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        "epoch": 12,
    }, path)
    return path


def _forget_imported_widget() -> None:
    """An earlier test docked napari-sam as it was patched then: napari's plugin manager (npe2)
    keeps the widget class it imported, and Python the module. Forget both, so that the Plugins
    menu's call imports the file as this test patched it."""
    for name in [n for n in sys.modules if n.split(".")[0] == "napari_sam"]:
        del sys.modules[name]
    if "npe2" in sys.modules:
        from npe2 import PluginManager

        for command in PluginManager.instance().commands._commands.values():
            if str(getattr(command, "python_name", "") or "").startswith("napari_sam"):
                command.function = None


def _patched(checkpoint: Path, home: Path, *options: str):
    """The installed napari-sam patched through the kit's CLI; restored byte for byte afterwards."""
    widget = Path(list(importlib.util.find_spec("napari_sam").submodule_search_locations)[0]) / "_widget.py"
    upstream = widget.read_bytes()
    result = _kit("patch", "napari-sam", "--checkpoint", str(checkpoint), *options, home=home)
    _forget_imported_widget()
    try:
        yield result
    finally:
        _kit("unpatch", "napari-sam", home=home)
        assert widget.read_bytes() == upstream
        assert not list(widget.parent.glob("_medico_*.py"))


@pytest.fixture
def patched_napari_sam(training_checkpoint, _isolated_home):
    yield from _patched(training_checkpoint, _isolated_home)


@pytest.fixture
def lazy_napari_sam(training_checkpoint, _isolated_home):
    yield from _patched(training_checkpoint, _isolated_home, "--lazy-embeddings")


def _settle(seconds: float = 0.3) -> None:
    """Let Qt lay out, paint and deliver queued events, as a user's event loop would."""
    import time

    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        # a running event loop deletes what deleteLater() marked (napari-sam's progress bar);
        # processEvents alone, outside one, never does
        QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        time.sleep(0.01)


def _screenshot(viewer, folder: Path, name: str) -> Path:
    from PIL import Image

    _settle()
    pixels = viewer.screenshot(canvas_only=False, flash=False)  # the whole window: menus, docks, canvas
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG", optimize=True)
    return fsio.atomic_write(folder / f"{name}.png", buffer.getvalue())


def _middle_click(viewer, yx: tuple[int, int]) -> None:
    """A real Qt middle click on the canvas at data (y, x) of the displayed slice (napari-sam's positive click)."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    canvas = viewer.window._qt_viewer.canvas
    to_canvas = canvas.view.scene.node_transform(canvas.view.canvas.scene)
    x, y = to_canvas.map([yx[1], yx[0]])[:2]
    QTest.mouseClick(canvas.native, Qt.MouseButton.MiddleButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(int(round(x)), int(round(y))))


def _expected_mask(widget, z: int, yx: tuple[int, int]) -> np.ndarray:
    """segment_anything's own answer for one positive point on slice ``z`` of the widget's embedding."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(widget.sam_model)
    predictor.features = widget.sam_features[z]
    predictor.original_size = widget.sam_predictor.original_size
    predictor.input_size = widget.sam_predictor.input_size
    predictor.is_image_set = True
    masks, _, _ = predictor.predict(point_coords=np.array([[yx[1], yx[0]]]), point_labels=np.array([1]),
                                    multimask_output=False)
    return masks[0]


def _dock_medicosam(viewer, patched: dict, shots: Path, prefix: str = "0"):
    """Dock napari-sam from the Plugins menu's call, pick MedicoSAM and load it with its own button."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")  # Plugins menu's call
    widget_file = Path(sys.modules[type(widget).__module__].__file__).resolve()
    assert widget_file.is_relative_to(Path(patched["path"]).resolve()), widget_file
    _screenshot(viewer, shots, f"{prefix}2-plugin-docked")
    combo = widget.cb_model_type
    items = [combo.itemText(i) for i in range(combo.count())]
    assert "MedicoSAM (Cached)" in items, items
    combo.setCurrentIndex(items.index("MedicoSAM (Cached)"))
    assert widget.btn_load_model.text() == "Load model"  # the widget's own handler saw a cached file
    _screenshot(viewer, shots, f"{prefix}3-medicosam-selected")
    QTest.mouseClick(widget.btn_load_model, Qt.MouseButton.LeftButton)
    assert combo.currentText() == "MedicoSAM (Loaded)"
    return widget


def test_patched_napari_sam_in_a_real_window(patched_napari_sam, shots, vit_b_state):
    # Linux torch wheels bring triton, whose bundled LLVM segfaults when it loads after Mesa's LLVM
    # (which a shown OpenGL window loads); torchvision loads it. napari-sam imports both only when its
    # widget docks, so load them first: a crash of that environment, not of napari-sam or the kit.
    import napari
    import segment_anything  # noqa: F401
    import torchvision  # noqa: F401
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    assert patched_napari_sam["changed"] == ["_widget.py"] and patched_napari_sam["layout"] == "N3"
    patched = (Path(patched_napari_sam["path"]) / "_widget.py").read_text(encoding="utf-8")
    assert ("events.layers_change" in patched) != needs_layers_compat()  # the CLI chose the compat transforms
    ph = phantom.make_phantom(SHAPE)
    volume = ph.volume[SLAB]
    lesion, liver = ph.landmarks["lesion"], ph.landmarks["liver"]
    z_lesion = lesion[0] - SLAB.start
    clicks = [(z_lesion, lesion[1:]), (z_lesion + 2, liver[1:])]  # two slices, each a first click there

    viewer = napari.Viewer(title="medico-adapters: napari-sam + MedicoSAM", show=True)
    try:
        viewer.window.resize(*WINDOW_SIZE)
        width, level = phantom.WINDOWS["soft_tissue"]  # napari-sam embeds what the contrast limits show
        image = viewer.add_image(volume, name="CT phantom (HU)", colormap="gray",
                                 contrast_limits=(level - width / 2, level + width / 2))
        labels = viewer.add_labels(np.zeros(volume.shape, dtype=np.int32), name="mask")
        viewer.dims.set_current_step(0, clicks[0][0])
        _screenshot(viewer, shots, "01-volume")

        widget = _dock_medicosam(viewer, patched_napari_sam, shots)
        loaded = widget.sam_model.state_dict()
        assert loaded.keys() == vit_b_state.keys()
        for key, value in loaded.items():
            assert torch.equal(value.cpu(), vit_b_state[key]), key

        widget.cb_image_layers.setCurrentText(image.name)
        widget.cb_label_layers.setCurrentText(labels.name)
        assert widget.btn_activate.isEnabled()
        QTest.mouseClick(widget.btn_activate, Qt.MouseButton.LeftButton)  # embeds every slice
        assert widget.is_active and len(widget.sam_features) == len(volume)
        _screenshot(viewer, shots, "04-activated")

        done: list[int] = []
        for z, yx in clicks:
            viewer.dims.set_current_step(0, z)
            _settle()
            _middle_click(viewer, yx)
            _settle()
            done.append(z)
            assert [list(map(int, p)) for p in widget.points[labels.selected_label]] == [[c, *xy] for c, xy in clicks[:len(done)]]
            mask = np.asarray(labels.data) > 0
            assert [bool(m.any()) for m in mask] == [i in done for i in range(len(volume))]
            assert np.array_equal(mask[z], _expected_mask(widget, z, yx))
            _screenshot(viewer, shots, f"0{4 + len(done)}-click-slice-{z}")
    finally:
        viewer.close()
        _settle()


#: a fresh 64-slice volume: eager napari-sam embeds all 64 (~10 min here) before the first click.
LAZY_SHAPE = (64, 128, 128)
LAZY_SLICE = 40


def test_lazy_napari_sam_masks_slice_40_while_the_rest_embeds(lazy_napari_sam, shots):
    """``--lazy-embeddings``: activating embeds nothing; a click on slice 40 right after it embeds
    that slice and shows its mask, while the background fill embeds the rest and the window stays
    responsive; closing the window stops the fill."""
    import time

    import napari
    import segment_anything  # noqa: F401
    import torchvision  # noqa: F401
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    assert sorted(lazy_napari_sam["changed"]) == ["_medico_embedding_store.py", "_medico_lazy_embeddings.py", "_widget.py"]
    ph = phantom.make_phantom(LAZY_SHAPE)
    yx = ph.landmarks["liver"][1:]
    viewer = napari.Viewer(title="medico-adapters: napari-sam --lazy-embeddings", show=True)
    features = None
    try:
        viewer.window.resize(*WINDOW_SIZE)
        width, level = phantom.WINDOWS["soft_tissue"]
        image = viewer.add_image(ph.volume, name="CT phantom, 64 slices", colormap="gray",
                                 contrast_limits=(level - width / 2, level + width / 2))
        labels = viewer.add_labels(np.zeros(ph.volume.shape, dtype=np.int32), name="mask")
        _screenshot(viewer, shots, "lazy-01-volume")
        widget = _dock_medicosam(viewer, lazy_napari_sam, shots, prefix="lazy-0")

        widget.cb_image_layers.setCurrentText(image.name)
        widget.cb_label_layers.setCurrentText(labels.name)
        started = time.perf_counter()
        QTest.mouseClick(widget.btn_activate, Qt.MouseButton.LeftButton)
        activate_s = time.perf_counter() - started
        features = widget.sam_features
        assert widget.is_active and type(features).__name__ == "LazySlices" and features.ready == 0
        _screenshot(viewer, shots, "lazy-04-activated")

        viewer.dims.set_current_step(0, LAZY_SLICE)
        _settle()
        started = time.perf_counter()
        _middle_click(viewer, yx)
        click_s = time.perf_counter() - started
        mask = np.asarray(labels.data) > 0
        assert [list(map(int, p)) for p in widget.points[labels.selected_label]] == [[LAZY_SLICE, *yx]]
        assert [bool(m.any()) for m in mask] == [z == LAZY_SLICE for z in range(len(mask))]
        assert np.array_equal(mask[LAZY_SLICE], _expected_mask(widget, LAZY_SLICE, yx))
        assert features.filling and features.ready < len(mask)  # the others are still being embedded
        _screenshot(viewer, shots, f"lazy-05-slice-{LAZY_SLICE}-masked-while-the-rest-embeds")

        started = time.perf_counter()
        _settle(2.0)  # the event loop runs while the fill works
        settle_s = time.perf_counter() - started
        _screenshot(viewer, shots, "lazy-06-still-filling")
        print(f"\nlazy: activate {activate_s:.2f} s, click to mask {click_s:.1f} s, {features.ready}/{len(mask)} "
              f"slices embedded so far; 2 s of event loop took {settle_s:.1f} s")
    finally:
        viewer.close()
        _settle()
    assert features is None or features.join(180)  # the widget went: the fill stopped
