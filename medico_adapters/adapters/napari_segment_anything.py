"""napari-segment-anything (royerlab/napari-segment-anything): PyPI releases 0.1.0 .. 0.1.4.

napari-sam was forked from this plugin, and every release from 0.1.0 on has napari-sam's ``N1``
shape: ``SAM_WEIGHTS_URL`` and ``get_weights_path`` in ``napari_segment_anything/utils.py``, the
widget's model combo listing ``sam_model_registry.keys()``. So this adapter is napari-sam's with
its own tool id and package name, and the same transforms. (0.0.1 took a checkpoint path argument
and has no URL table; it is refused as an unknown layout.)

Both plugins cache weights in ``~/.cache/napari-segment-anything`` and name the file after the
URL's last part. This adapter's files start with ``nsa_`` (``nsa_vit_b_medicosam.pt``), a prefix
no napari-sam file name can have (they start with ``vit_`` or ``sam_``): with both tools patched,
neither placement overwrites the other's, and unpatching one removes only its own files.
"""

from __future__ import annotations

from collections.abc import Sequence

import libcst as cst

from medico_adapters.adapters.base import Layout, Step
from medico_adapters.adapters.napari_sam import NapariSamAdapter, widget_classes
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError

PACKAGES = ("napari_segment_anything",)
FILENAME_PREFIX = "nsa_"


class NapariSegmentAnythingAdapter(NapariSamAdapter):
    tool = "napari-segment-anything"
    description = "napari-segment-anything (royerlab), PyPI releases 0.1.0 .. 0.1.4"
    packages = PACKAGES
    filename_prefix = FILENAME_PREFIX

    def check_widget(self, tree: Tree, widget: str, module: cst.Module) -> None:
        if "SAMWidget" not in widget_classes(module):
            raise LayoutError(f"{tree.path(widget)}: has no SAMWidget class, so it is not royerlab's napari-segment-anything (napari-sam 0.0.1 shares the package name: use `medico-adapters patch napari-sam`)")

    def detect(self, tree: Tree) -> Layout:
        layout = super().detect(tree)
        if layout.name != "N1":
            raise LayoutError(f"{tree.path(layout.files[0])}: napari-segment-anything has only ever shipped layout N1, this is {layout.name}")
        return layout

    def steps(self, tree: Tree, layout: Layout, entries: Sequence[Entry], options: dict) -> list[Step]:
        # napari-sam's napari>=0.6.2 fixes target code this widget does not have.
        return super().steps(tree, layout, entries, {**options, "napari_compat": False})

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        return []


ADAPTER = NapariSegmentAnythingAdapter()
