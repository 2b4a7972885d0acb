"""Every napari-sam release on PyPI: patched, idempotent, reverted byte for byte.

Needs PyPI (the wheels are downloaded into a temporary folder); the widget itself is exercised
for one release per layout by test_napari_real.py. ``MEDICO_NAPARI_SAM_RELEASES`` (a version
specifier such as ``>=0.4``) limits the run to one range: noxfile.py's CI shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from medico_adapters import patching
from medico_adapters.adapters.napari_sam import ADAPTER
from medico_adapters.patchgen import releases
from tests.helpers import snapshot

SELECTED = SpecifierSet(os.environ.get("MEDICO_NAPARI_SAM_RELEASES", ""))
#: the releases the kit ships a plain diff for (patches/): every one of them in range must be tested.
SHIPPED = [p.stem for p in (Path(__file__).parents[1] / "patches" / "napari-sam").glob("*.diff")]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    try:
        versions = list(SELECTED.filter(releases("napari-sam")))
    except OSError as e:
        pytest.skip(f"PyPI not reachable: {e}")
    folder = tmp_path_factory.mktemp("wheels")
    for version in versions:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder / version),
                        f"napari-sam=={version}"], check=True, capture_output=True)
    return {v: next((folder / v).glob("*.whl")) for v in versions}


def test_every_release(wheels, tmp_path, checkpoints):
    layouts = {}
    for version, wheel in wheels.items():
        root = tmp_path / version
        zipfile.ZipFile(wheel).extractall(root)
        before = snapshot(root)
        result = patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
        assert result.changed, version
        assert patching.patch(ADAPTER, root).changed == [], version
        assert patching.status(ADAPTER, root)["patched"], version
        patching.unpatch(ADAPTER, root)
        assert snapshot(root) == before, version
        layouts.setdefault(result.layout, []).append(version)
    summary = ", ".join(f"{k}: {len(v)} ({v[0]}..{v[-1]})" for k, v in sorted(layouts.items()))
    print(f"\n{len(wheels)} napari-sam releases {SELECTED or ''} patched, idempotent and reverted: {summary}")
    assert len(SHIPPED) >= 49
    assert set(SELECTED.filter(SHIPPED)) <= set(wheels)
    assert wheels
