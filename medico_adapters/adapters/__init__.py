"""One adapter per tool; ``TOOLS`` maps the CLI's tool ids to them."""

from __future__ import annotations

from medico_adapters.adapters import (
    anylabeling,
    isat_sam,
    napari_sam,
    napari_segment_anything,
    samm,
    slicer_sws,
)
from medico_adapters.adapters.base import Adapter
from medico_adapters.errors import MedicoError

TOOLS: dict[str, Adapter] = {
    napari_sam.ADAPTER.tool: napari_sam.ADAPTER,
    samm.ADAPTER.tool: samm.ADAPTER,
    slicer_sws.ADAPTER.tool: slicer_sws.ADAPTER,
    napari_segment_anything.ADAPTER.tool: napari_segment_anything.ADAPTER,
    isat_sam.ADAPTER.tool: isat_sam.ADAPTER,
    anylabeling.ADAPTER.tool: anylabeling.ADAPTER,
}
#: tools whose integration needs no source change (handled by medico_adapters.adapters.micro_sam).
CACHE_TOOLS = ("micro-sam",)


def get_adapter(tool: str) -> Adapter:
    try:
        return TOOLS[tool]
    except KeyError:
        known = ", ".join(sorted([*TOOLS, *CACHE_TOOLS]))
        raise MedicoError(f"unknown tool {tool!r}; known tools: {known}") from None
