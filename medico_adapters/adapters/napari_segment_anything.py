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
import libcst.matchers as m
from libcst.codemod import VisitorBasedCodemodCommand
from libcst.codemod.visitors import AddImportsVisitor
from packaging.version import Version

from medico_adapters import pyenv
from medico_adapters.adapters.base import Layout, Step, string_literal
from medico_adapters.adapters.napari_sam import NapariSamAdapter, widget_classes
from medico_adapters.engine import Entry, Tree
from medico_adapters.errors import LayoutError

PACKAGES = ("napari_segment_anything",)
FILENAME_PREFIX = "nsa_"


class LabelsColormapCompat(VisitorBasedCodemodCommand):
    """Pass ``add_labels(color=...)`` as a ``DirectLabelColormap``: napari 0.5 removed ``color``.

    The plugin's constructor adds its mask layer this way, so on napari >= 0.5 the widget cannot
    even be created. Labels missing from the dict stay transparent, as they were drawn before.

    Before::

        self._mask_layer = self._viewer.add_labels(data=d, name="SAM mask", color={1: "cyan"})

    After::

        self._mask_layer = self._viewer.add_labels(data=d, name="SAM mask", colormap=DirectLabelColormap(color_dict={1: "cyan", None: "transparent"}))
    """

    DESCRIPTION = "Rename add_labels(color=...) to colormap=DirectLabelColormap(...) (napari >= 0.5)."
    REQUIRED = False

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not m.matches(updated.func, m.Attribute(attr=m.Name("add_labels"))):
            return updated
        args = []
        for arg in updated.args:
            if m.matches(arg.keyword, m.Name("color")):
                colors = arg.value
                if isinstance(colors, cst.Dict) and not any(m.matches(e, m.DictElement(key=m.Name("None"))) for e in colors.elements):
                    comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
                    elements = [*colors.elements[:-1], colors.elements[-1].with_changes(comma=comma)] if colors.elements else []
                    colors = colors.with_changes(elements=[*elements, cst.DictElement(cst.Name("None"), string_literal("transparent", colors.elements[0].value if colors.elements and isinstance(colors.elements[0].value, cst.SimpleString) else None))])
                elif not isinstance(colors, cst.Dict):
                    colors = cst.parse_expression(f'{{None: "transparent", **{cst.Module([]).code_for_node(colors)}}}')
                value = cst.parse_expression(f"DirectLabelColormap(color_dict={cst.Module([]).code_for_node(colors)})")
                arg = arg.with_changes(keyword=cst.Name("colormap"), value=value)
                AddImportsVisitor.add_needed_import(self.context, "napari.utils.colormaps", "DirectLabelColormap")
            args.append(arg)
        return updated.with_changes(args=args)


#: napari 0.5 removed ``add_labels(color=...)`` (pre-releases of 0.5 included).
LABELS_COLOR_REMOVED = Version("0.5.0.dev0")


def needs_labels_compat(python: str | None = None) -> bool:
    """Whether the napari installed for ``python`` (default: the kit's own) needs the compat patch."""
    installed = pyenv.dist_version(python, "napari")
    return installed is not None and installed >= LABELS_COLOR_REMOVED


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
        # napari-sam's napari>=0.6.2 fixes target code this widget does not have; it needs its own.
        steps = super().steps(tree, layout, entries, {**options, "napari_compat": False})
        return [*steps, Step(layout.files[0], LabelsColormapCompat)] if options.get("napari_compat") else steps

    def features(self, tree: Tree, layout: Layout, options: dict) -> list[str]:
        compat = ["napari>=0.5 compat (add_labels colormap)"] if options.get("napari_compat") else []
        return compat + self.option_features(tree, layout, options)


ADAPTER = NapariSegmentAnythingAdapter()
