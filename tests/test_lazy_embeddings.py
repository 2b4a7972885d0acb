"""``patch napari-sam --lazy-embeddings``: the codemod, the placed modules, and each fixture tool's
own code run on a small volume.

The proof on the fixtures' own code: masks (and logits) equal the eager tool's for clicks on
several slices, a first click embeds its slice and nothing else, a contrast change embeds nothing
until a click needs a slice, a volume opened again comes from the store, and the background fill
stops when the tool moves on. The tools' code runs on a toy SAM of the real classes
(``helpers.tiny_sam``): a slice costs milliseconds, so this checks plumbing and agreement; speed
is benchmarks/bench_tools.py's, accuracy nobody's (random weights).
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
import numpy as np
import pytest
import torch
from helpers import (
    FakeLayer,
    FakeViewer,
    check_noop,
    check_transformed,
    copy_fixture,
    import_fresh,
    kit_cli,
    outside_state,
    snapshot,
    tiny_sam,
    transformed,
)

from medico_adapters.accel import medico_sam_accel as accel
from medico_adapters.adapters import lazy_embeddings, napari_sam, napari_segment_anything
from medico_adapters.adapters.lazy_embeddings import LazySliceLoop
from medico_adapters.embeddings import lazy
from medico_adapters.embeddings.store import EmbeddingStore, model_identity
from medico_adapters.patching import patch, status, unpatch

IMPORT = {"import_from": "._medico_lazy_embeddings"}
LAZY_HEAD = (
    "try:  # medico-adapters --lazy-embeddings: each slice embedded when a prompt first needs it, the rest in the background, through the embedding store\n"
    "    from ._medico_lazy_embeddings import LazySlices as _MedicoLazySlices\n"
    "except Exception as _medico_lazy_error:\n"
    '    print(f"medico_lazy_embeddings: every slice embedded now ({type(_medico_lazy_error).__name__}: {_medico_lazy_error})")\n'
    "    _MedicoLazySlices = None\n"
    "if _MedicoLazySlices is not None:\n"
)
STORE_HEAD = (
    "try:  # medico-adapters --lazy-embeddings: an image embedded before comes from the embedding store\n"
    "    from ._medico_lazy_embeddings import stored_set_image as _medico_set_image\n"
    "except Exception as _medico_lazy_error:\n"
    '    print(f"medico_lazy_embeddings: embedding without the store ({type(_medico_lazy_error).__name__}: {_medico_lazy_error})")\n'
    "    _medico_set_image = None\n"
    "if _medico_set_image is not None:\n"
)


def _indented(text: str, by: str) -> str:
    return "".join(by + line if line.strip() else line for line in text.splitlines(keepends=True))


# --- the codemod ------------------------------------------------------------------------------

LOOP = """\
self.features = []
for z in tqdm(range(len(self.layer.data)), desc="embedding"):
    pixels = self.layer.data[z]
    low, high = self.layer.limits
    pixels = scale(pixels, low, high)
    self.predictor.set_image(pixels)
    self.features.append(self.predictor.features)
    bar.setValue(z + 1)
    bar.deleteLater()
"""
WIDGET = "class Widget:\n    def set_image(self):\n        # every slice, before the first click\n" + _indented(LOOP, "        ")


def test_volume_loop_becomes_lazy_slices():
    """The window is read once, in set_image, as the eager loop read it; the progress call that
    uses the index goes, the other runs once."""
    lazy_branch = (
        "low, high = self.layer.limits\n"
        "def _medico_slice(z, high=high, low=low):\n"
        "    pixels = self.layer.data[z]\n"
        "    pixels = scale(pixels, low, high)\n"
        "    return pixels\n"
        'self.features = _MedicoLazySlices(self.predictor, _medico_slice, len(self.layer.data), owner=self, attribute="features")\n'
        "bar.deleteLater()\n"
    )
    block = LAZY_HEAD + _indented(lazy_branch, "    ") + "else:\n" + _indented(LOOP, "    ")
    after = "class Widget:\n    def set_image(self):\n        # every slice, before the first click\n" + _indented(block, "        ")
    check_transformed(LazySliceLoop, WIDGET, after, **IMPORT)


def test_locals_the_body_reads_are_bound_when_set_image_runs():
    before = """\
    def embed(volume, predictor, window):
        out = []
        for i in range(volume.shape[0]):
            predictor.set_image(volume[i] * window)
            out.append(predictor.features)
        volume = None
        return out
    """
    lazy_branch = (
        "def _medico_slice(i, volume=volume, window=window):\n"
        "    return volume[i] * window\n"
        "out = _MedicoLazySlices(predictor, _medico_slice, volume.shape[0])\n"
    )
    loop = "out = []\nfor i in range(volume.shape[0]):\n    predictor.set_image(volume[i] * window)\n    out.append(predictor.features)\n"
    block = LAZY_HEAD + _indented(lazy_branch, "    ") + "else:\n" + _indented(loop, "    ")
    check_transformed(LazySliceLoop, before, "def embed(volume, predictor, window):\n" + _indented(block, "    ")
                      + "    volume = None\n    return out\n", **IMPORT)


def test_one_image_set_image_goes_through_the_store():
    before = "def load(self):\n    self._predictor.set_image(self._image)\n    self.ready = True\n"
    block = STORE_HEAD + "    _medico_set_image(self._predictor, self._image)\nelse:\n    self._predictor.set_image(self._image)\n"
    check_transformed(LazySliceLoop, before, "def load(self):\n" + _indented(block, "    ") + "    self.ready = True\n", **IMPORT)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("def f(self):\n    self.set_image()\n", id="the-widget-own-set_image"),
        pytest.param("def f(p, img):\n    p.set_image(img, 'BGR')\n", id="set_image-with-options"),
        pytest.param(
            "def f(p, vol):\n    out = []\n    for i in range(len(vol)):\n        if vol[i] is None:\n            break\n"
            "        p.set_image(vol[i])\n        out.append(p.features)\n",
            id="loop-that-breaks",
        ),
        pytest.param(
            "def f(p, vol):\n    out = []\n    for i in range(len(vol)):\n        p.set_image(vol[i])\n        out.append(p.get_image_embedding())\n",
            id="loop-keeping-something-else",
        ),
        pytest.param(
            "def f(p, vol):\n    out = []\n    n = 0\n    for i in range(len(vol)):\n        p.set_image(vol[i])\n        out.append(p.features)\n        n += 1\n",
            id="loop-counting-after-append",
        ),
        pytest.param(
            "def f(p, vol):\n    out = []\n    for v in vol:\n        p.set_image(v)\n        out.append(p.features)\n",
            id="loop-not-over-a-range",
        ),
    ],
)
def test_untransformed(source):
    check_noop(LazySliceLoop, source, **IMPORT)
    # what --accelerate asks before it turns lazy embeddings on: nothing here, so no error either
    assert not lazy_embeddings.has_embedding(cst.parse_module(textwrap.dedent(source)))


def test_what_accelerate_finds_is_what_the_codemod_changes():
    assert lazy_embeddings.has_volume_loop(cst.parse_module(WIDGET))
    assert lazy_embeddings.has_embedding(cst.parse_module("def load(self):\n    self._predictor.set_image(self._image)\n"))


def test_already_lazy():
    check_noop(LazySliceLoop, transformed(LazySliceLoop, WIDGET, **IMPORT), **IMPORT)


# --- every layout's fixture: placement, status, turning it off, unpatch -----------------------


@dataclass(frozen=True)
class Case:
    adapter: object
    fixture: str
    package: str  # where the widget and the placed modules live
    feature: str


CASES = {
    "N1": Case(napari_sam.ADAPTER, "napari_sam/N1", "napari_sam", lazy_embeddings.FEATURE),
    "N2": Case(napari_sam.ADAPTER, "napari_sam/N2", "napari_sam", lazy_embeddings.FEATURE),
    "N3": Case(napari_sam.ADAPTER, "napari_sam/N3", "src/napari_sam", lazy_embeddings.FEATURE),
    # royerlab's plugin embeds one 2D image at a time: no loop, only the store
    "nsa-N1": Case(napari_segment_anything.ADAPTER, "napari_segment_anything/N1", "napari_segment_anything",
                   lazy_embeddings.STORE_FEATURE),
}
PLACED = sorted(f"{name}.py" for name in (lazy_embeddings.MODULE, lazy_embeddings.STORE_MODULE))


@pytest.fixture(autouse=True)
def _drop_placed_checkpoints(tmp_path, _isolated_home):
    """Every patch here places a 358 MB checkpoint; remove them once a test is done with them."""
    yield
    for folder in (tmp_path, _isolated_home):
        for placed in [*folder.rglob("*.pt"), *folder.rglob("*.pth")]:
            placed.unlink(missing_ok=True)


@pytest.mark.parametrize("layout", sorted(CASES))
def test_placed_listed_and_removed_byte_for_byte(layout, tmp_path, checkpoints):
    case = CASES[layout]
    root = copy_fixture(case.fixture, tmp_path)
    before = snapshot(root)

    result = patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"lazy_embeddings": True})
    widget = f"{case.package}/_widget.py"
    assert widget in result.changed and all(f"{case.package}/{name}" in result.changed for name in PLACED)
    for name, data in lazy_embeddings.sources().items():  # verbatim
        assert (root / case.package / f"{name}.py").read_bytes() == data
    report = status(case.adapter, root)
    assert report["patched"] and case.feature in report["features"]
    assert patch(case.adapter, root).changed == []  # the option is remembered

    unpatch(case.adapter, root)
    assert snapshot(root) == before


@pytest.mark.parametrize("layout", sorted(CASES))
def test_no_lazy_embeddings_leaves_the_rest_of_the_patch(layout, tmp_path, checkpoints):
    case = CASES[layout]
    fast = copy_fixture(case.fixture, tmp_path / "fast")
    patch(case.adapter, fast, checkpoint=checkpoints["plain"], options={"accelerate": True, "lazy_embeddings": False})
    root = copy_fixture(case.fixture, tmp_path / "both")
    patch(case.adapter, root, checkpoint=checkpoints["plain"], options={"accelerate": True})  # lazy: implied

    assert (root / case.package / PLACED[0]).is_file()
    result = patch(case.adapter, root, options={"lazy_embeddings": False})
    assert sorted(result.changed) == sorted([f"{case.package}/_widget.py", *(f"{case.package}/{n}" for n in PLACED)])
    assert outside_state(root) == outside_state(fast)
    assert case.feature not in status(case.adapter, root)["features"]


# --- the fixture tools' own code, patched, on a small volume ----------------------------------

VOLUME = (np.random.default_rng(7).random((6, 40, 48)) * 1000 - 300).astype(np.float32)
WINDOW = (0.0, 400.0)
CLICKS = [(4, 20, 24), (0, 10, 30), (5, 33, 12), (2, 20, 24)]


@pytest.fixture(scope="module")
def trees(tmp_path_factory, checkpoints):
    """Each layout twice: as upstream (eager) and patched with --lazy-embeddings (its checkpoint
    placed under a throwaway home, then removed: these tests run a toy model)."""
    base = tmp_path_factory.mktemp("lazy-trees")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(base / "home"))
        mp.setenv("USERPROFILE", str(base / "home"))
        for layout, case in CASES.items():
            eager = copy_fixture(case.fixture, base / layout / "eager")
            patched = copy_fixture(case.fixture, base / layout / "lazy")
            patch(case.adapter, patched, checkpoint=checkpoints["plain"], options={"lazy_embeddings": True})
            made[layout] = (eager, patched)
    for placed in base.rglob("*.pt"):
        placed.unlink()
    return made


class Encoder:
    """Counts the image encoder's calls; ``hold()`` keeps every thread but the main one waiting at
    the door, so what a click computes before its mask is exactly countable."""

    def __init__(self, model) -> None:
        self.calls: list[str] = []
        self.door = threading.Event()
        self.door.set()
        forward = model.image_encoder.forward

        def counted(x):
            if threading.current_thread() is not threading.main_thread():
                self.door.wait(30)
            self.calls.append(threading.current_thread().name)
            return forward(x)

        model.image_encoder.forward = counted

    def hold(self) -> None:
        self.door.clear()

    def release(self) -> None:
        self.door.set()


@pytest.fixture
def napari_tool(trees, monkeypatch):
    """``napari_tool(layout, lazy)`` -> a fixture widget of that tree on a toy SAM, its encoder counted."""
    opened: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def make(layout: str, lazy: bool = True, *, volume=VOLUME, window=WINDOW, seed: int = 0):
        root = trees[layout][1 if lazy else 0]
        parent = root / "src" if (root / "src").is_dir() else root
        module = import_fresh(parent, "napari_sam._widget")
        widget = module.SamWidget(FakeViewer())
        widget.sam_model = tiny_sam(seed)
        widget.sam_predictor = napari_sam_predictor(widget.sam_model)
        widget.image_layer = FakeLayer(volume, window)
        widget.encoder = Encoder(widget.sam_model)
        opened.append(widget)
        return widget

    yield make
    for widget in opened:
        widget.encoder.release()
        if _lazy(widget.sam_features):
            widget.sam_features.close()
            widget.sam_features.join(30)
    for name in [n for n in sys.modules if n.split(".")[0] == "napari_sam"]:
        sys.modules.pop(name)


def _lazy(features) -> bool:
    """The tree's own copy of the placed module made it (not the kit's: isinstance cannot tell)."""
    return type(features).__name__ == "LazySlices" and type(features).__module__ == "napari_sam._medico_lazy_embeddings"


def napari_sam_predictor(model):
    from segment_anything import SamPredictor

    return SamPredictor(model)


def _eager(napari_tool, layout: str, clicks=CLICKS, **kwargs):
    widget = napari_tool(layout, lazy=False, **kwargs)
    widget.set_image()
    assert isinstance(widget.sam_features, list) and len(widget.encoder.calls) == len(VOLUME)
    return widget, [widget.predict(c) for c in clicks]


NAPARI = ["N1", "N2", "N3"]


@pytest.mark.parametrize("layout", NAPARI)
def test_same_masks_as_the_eager_tool(layout, napari_tool):
    eager, expected = _eager(napari_tool, layout)
    widget = napari_tool(layout)
    widget.set_image()
    assert _lazy(widget.sam_features) and widget.encoder.calls == []
    for click, (mask, logits) in zip(CLICKS, expected, strict=True):
        got_mask, got_logits = widget.predict(click)
        assert np.array_equal(got_mask, mask) and np.array_equal(got_logits, logits), click
        assert 0 < mask.sum() < mask.size  # a real mask, not a trivially equal empty one
    assert widget.sam_features.join(30) and widget.sam_features.ready == len(VOLUME)
    for z in range(len(VOLUME)):
        assert torch.equal(widget.sam_features[z], eager.sam_features[z]), z
    for attribute in ("original_size", "input_size"):  # the predictor is sized as the eager loop left it
        assert getattr(widget.sam_predictor, attribute) == getattr(eager.sam_predictor, attribute)


@pytest.mark.parametrize("layout", NAPARI)
def test_a_click_embeds_its_slice_and_nothing_else_before_its_mask(layout, napari_tool):
    widget = napari_tool(layout)
    widget.encoder.hold()  # the background fill may start, not finish
    widget.set_image()
    assert widget.encoder.calls == []  # activating embeds nothing
    z = 4
    widget.predict((z, 20, 24))
    assert widget.encoder.calls == ["MainThread"]
    clicked = z - 1 if layout == "N1" else z  # N1 reads the slice before the clicked one
    assert [widget.sam_features.is_ready(i) for i in range(len(VOLUME))] == [i == clicked for i in range(len(VOLUME))]
    widget.encoder.release()
    assert widget.sam_features.join(30)
    assert len(widget.encoder.calls) == len(VOLUME) and widget.sam_features.stats == {"computed": 6, "stored": 0}
    widget.predict((1, 20, 24))
    assert len(widget.encoder.calls) == len(VOLUME)  # filled in the background: nothing more to embed


@pytest.mark.parametrize("layout", NAPARI)
def test_a_contrast_change_embeds_nothing_until_a_click_needs_a_slice(layout, napari_tool):
    narrow = (50.0, 250.0)
    _, expected = _eager(napari_tool, layout, clicks=[(2, 20, 24)], window=narrow)
    widget = napari_tool(layout)
    widget.set_image()
    widget.predict((3, 20, 24))
    first = widget.sam_features
    assert first.join(30) and len(widget.encoder.calls) == len(VOLUME)

    widget.image_layer.contrast_limits = narrow
    widget.on_contrast_limits_change()
    assert widget.sam_features is not first and len(widget.encoder.calls) == len(VOLUME)
    widget.encoder.hold()
    mask, logits = widget.predict((2, 20, 24))  # new pixels, new key: this slice only
    assert len(widget.encoder.calls) == len(VOLUME) + 1
    assert np.array_equal(mask, expected[0][0]) and np.array_equal(logits, expected[0][1])
    widget.encoder.release()
    widget.sam_features.join(30)

    calls = len(widget.encoder.calls)
    widget.image_layer.contrast_limits = WINDOW  # back to the first window: every slice is stored
    widget.on_contrast_limits_change()
    for z in range(len(VOLUME)):
        widget.predict((z, 20, 24))
    assert len(widget.encoder.calls) == calls


@pytest.mark.parametrize("layout", NAPARI)
def test_a_volume_opened_again_comes_from_the_store(layout, napari_tool):
    first = napari_tool(layout)
    first.set_image()
    first.predict((2, 20, 24))
    assert first.sam_features.join(30)

    again = napari_tool(layout)  # another widget, the same weights and volume: as after a restart
    again.set_image()
    masks = [again.predict(c) for c in CLICKS]
    assert again.encoder.calls == [] and again.sam_features.stats["stored"] >= len(CLICKS)
    _, expected = _eager(napari_tool, layout)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(masks, expected, strict=True))

    other = napari_tool(layout, seed=1)  # other weights: another model, never served these entries
    other.encoder.hold()
    other.set_image()
    other.predict((2, 20, 24))
    assert other.encoder.calls == ["MainThread"]


def test_the_background_fill_stops_when_set_image_runs_again(napari_tool):
    widget = napari_tool("N3")
    widget.encoder.hold()
    widget.set_image()
    widget.predict((0, 20, 24))
    old = widget.sam_features
    widget.set_image()  # another image, or a contrast change
    widget.encoder.release()
    assert old.join(30)
    assert old.ready <= 2  # the clicked slice, and at most the one the fill had begun


def test_the_background_fill_stops_when_the_widget_is_destroyed(monkeypatch):
    class Signal:
        def __init__(self):
            self.slots = []

        def connect(self, slot):
            self.slots.append(slot)

    class Widget:  # what a Qt widget offers: a destroyed signal
        destroyed = Signal()

    from segment_anything import SamPredictor

    model = tiny_sam()
    encoder = Encoder(model)
    owner = Widget()
    owner.features = lazy.LazySlices(SamPredictor(model), lambda i: np.full((16, 16, 3), i, np.uint8), 5,
                                     owner=owner, attribute="features", store=False)
    encoder.hold()
    owner.features[0]
    for slot in Widget.destroyed.slots:
        slot()
    encoder.release()
    assert owner.features.join(30) and owner.features.ready <= 2


@pytest.mark.parametrize("layout", ["N3", "nsa-N1"])
def test_one_image_comes_from_the_store_the_second_time(layout, trees, monkeypatch):
    from segment_anything import SamPredictor

    image = (np.random.default_rng(3).random((40, 48)) * 400).astype(np.float32)
    results = []
    for tree in trees[layout]:  # eager, then lazy twice (the second from the store)
        root = tree / "src" if (tree / "src").is_dir() else tree
        package = "napari_segment_anything" if layout.startswith("nsa") else "napari_sam"
        module = import_fresh(root, f"{package}._widget")
        for _ in range(1 if tree is trees[layout][0] else 2):
            model = tiny_sam()
            encoder = Encoder(model)
            predictor = SamPredictor(model)
            if package == "napari_sam":
                widget = module.SamWidget(FakeViewer())
                widget.sam_model, widget.sam_predictor, widget.image_layer = model, predictor, FakeLayer(image, WINDOW)
                widget.set_image()
                mask, logits = widget.predict((0, 20, 24))
            else:
                widget = module.SAMWidget(FakeViewer())
                widget._sam, widget._predictor = model, predictor
                widget._load_image(FakeLayer(image, WINDOW))
                mask, logits = widget._on_interactive_run(np.array([[20, 24]])), widget._logits
            results.append((len(encoder.calls), mask, logits, predictor.input_size))
        for name in [n for n in sys.modules if n.split(".")[0] == package]:
            sys.modules.pop(name)
    assert [r[0] for r in results] == [1, 1, 0]
    assert all(np.array_equal(r[1], results[0][1]) and np.array_equal(r[2], results[0][2]) and r[3] == results[0][3]
               for r in results)


def test_a_broken_module_leaves_the_eager_loop(napari_tool, trees, capsys):
    placed = trees["N2"][1] / "napari_sam" / f"{lazy_embeddings.MODULE}.py"
    good = placed.read_bytes()
    placed.write_text("raise ImportError('broken on purpose')\n", "utf-8")
    try:
        widget = napari_tool("N2")
        widget.set_image()
    finally:
        placed.write_bytes(good)
    assert isinstance(widget.sam_features, list) and len(widget.encoder.calls) == len(VOLUME)
    assert "medico_lazy_embeddings: every slice embedded now (ImportError: broken on purpose)" in capsys.readouterr().out


# --- the placed modules themselves --------------------------------------------------------------


def test_a_weightless_encoder_without_an_identity_turns_the_store_off(tmp_path):
    from segment_anything import SamPredictor

    class Compiled(torch.nn.Module):  # stands for an accelerated encoder that carries no identity
        def __init__(self, inner):
            super().__init__()
            object.__setattr__(self, "inner", inner)
            self.img_size = inner.img_size

        def forward(self, x):
            return self.inner(x)

    model = tiny_sam()
    model.image_encoder = Compiled(model.image_encoder)
    lines: list[str] = []
    slices = lazy.LazySlices(SamPredictor(model), lambda i: np.full((16, 16, 3), 9 * i, np.uint8), 3,
                             store=tmp_path / "store", log=lines.append)
    assert slices[1].shape == (1, 32, 4, 4)
    slices.close()
    slices.join(30)
    assert not (tmp_path / "store").exists()
    assert lines[0].startswith("medico_lazy_embeddings: embedding store off (ValueError: Compiled holds no weights")


def test_a_damaged_entry_is_recomputed(tmp_path):
    from segment_anything import SamPredictor

    model, store = tiny_sam(), EmbeddingStore(tmp_path)
    encoder = Encoder(model)
    pixels = np.full((16, 16, 3), 50, np.uint8)
    first = SamPredictor(model)
    lazy.stored_set_image(first, pixels, store=store)
    entry = next(tmp_path.rglob("*.emb"))
    entry.write_bytes(entry.read_bytes()[:-7] + b"garbage")
    again = SamPredictor(model)
    assert lazy.stored_set_image(again, pixels, store=store)  # computed, not served
    assert len(encoder.calls) == 2 and torch.equal(again.features, first.features)
    assert store.stats["damaged"] == 1


@pytest.mark.skipif(accel.openvino_version() is None, reason="OpenVINO is not installed")
def test_an_accelerated_encoder_carries_the_store_identity(tmp_path, checkpoints):
    """OpenVINO drops the ViT's weights; the placed accelerator hands the store identity over."""
    root = copy_fixture("napari_sam/N3", tmp_path)
    patch(napari_sam.ADAPTER, root, checkpoint=checkpoints["plain"], options={"accelerate": True})
    placed = import_fresh(root / "src", "napari_sam._medico_sam_accel")
    try:
        model = tiny_sam()
        expected = model_identity(tiny_sam().image_encoder)
        assert placed.accelerate(model, log=None, cache_dir=tmp_path / "ov")
        assert type(model.image_encoder).__name__ == "OpenVINOImageEncoder"
        assert model_identity(model.image_encoder) == expected
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "napari_sam"]:
            sys.modules.pop(name)


# --- the command line ---------------------------------------------------------------------------


def test_cli_lazy_embeddings_status_off_unpatch(tmp_path, checkpoints):
    root = copy_fixture("napari_sam/N2", tmp_path)
    before = snapshot(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = Path("..") / root.name
    first = kit_cli("patch", "napari-sam", "--path", rel, "--checkpoint", checkpoints["plain"], "--lazy-embeddings",
                    cwd=elsewhere, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"changed napari_sam/{lazy_embeddings.MODULE}.py" in first.stdout
    text = kit_cli("status", "napari-sam", "--path", root, cwd=tmp_path, home=tmp_path).stdout
    assert f"  feature: {lazy_embeddings.FEATURE}" in text

    off = kit_cli("patch", "napari-sam", "--path", rel, "--no-lazy-embeddings", "--json", cwd=elsewhere, home=tmp_path)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["changed"] == ["napari_sam/_medico_embedding_store.py", "napari_sam/_medico_lazy_embeddings.py",
                                                 "napari_sam/_widget.py"]
    assert kit_cli("unpatch", "napari-sam", "--path", rel, cwd=elsewhere, home=tmp_path).returncode == 0
    assert snapshot(root) == before


def test_cli_refuses_lazy_embeddings_for_a_tool_without_embedding_code(tmp_path):
    proc = kit_cli("patch", "anylabeling", "--path", tmp_path, "--lazy-embeddings", cwd=tmp_path, home=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("medico-adapters: error: --lazy-embeddings: anylabeling does not embed images "
                                  "through code the kit can rewrite; it works for ")
    assert "napari-sam" in proc.stderr
