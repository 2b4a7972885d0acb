"""Every napari-sam release on PyPI: patched, idempotent, reverted byte for byte; and with
``--lazy-embeddings`` turned on, listed, turned off and reverted the same way.

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
from packaging.version import Version

from medico_adapters import patching
from medico_adapters.adapters import lazy_embeddings
from medico_adapters.adapters.napari_sam import ADAPTER
from medico_adapters.patchgen import releases
from tests.helpers import outside_state, snapshot

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


def _packages(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if (p / "_widget.py").is_file()]


def test_every_release(wheels, tmp_path, checkpoints):
    layouts = {}
    lazies: dict[str, list[str]] = {lazy_embeddings.FEATURE: [], lazy_embeddings.STORE_FEATURE: []}
    for version, wheel in wheels.items():
        root = tmp_path / version
        zipfile.ZipFile(wheel).extractall(root)
        before = snapshot(root)
        result = patching.patch(ADAPTER, root, checkpoint=checkpoints["plain"])
        assert result.changed, version
        assert patching.patch(ADAPTER, root).changed == [], version
        assert patching.status(ADAPTER, root)["patched"], version
        plain = outside_state(root)

        lazy = patching.patch(ADAPTER, root, options={"lazy_embeddings": True})
        assert {f"{p}/_widget.py" for p in _packages(root)} <= set(lazy.changed), version
        assert patching.patch(ADAPTER, root).changed == [], version
        features = patching.status(ADAPTER, root)["features"]
        # 0.3.0 on embed whole volumes: lazily now; the earlier ones embed one 2D image, through the store
        feature = lazy_embeddings.FEATURE if Version(version) >= Version("0.3") else lazy_embeddings.STORE_FEATURE
        assert feature in features, (version, features)
        lazies[feature].append(version)
        patching.patch(ADAPTER, root, options={"lazy_embeddings": False})
        assert outside_state(root) == plain, version
        patching.unpatch(ADAPTER, root)
        assert snapshot(root) == before, version
        layouts.setdefault(result.layout, []).append(version)
    summary = ", ".join(f"{k}: {len(v)} ({v[0]}..{v[-1]})" for k, v in sorted(layouts.items()))
    print(f"\n{len(wheels)} napari-sam releases {SELECTED or ''} patched, idempotent and reverted: {summary}")
    print(f"--lazy-embeddings: lazy slices in {len(lazies[lazy_embeddings.FEATURE])}, "
          f"one image through the store in {len(lazies[lazy_embeddings.STORE_FEATURE])}")
    assert len(SHIPPED) >= 49
    assert set(SELECTED.filter(SHIPPED)) <= set(wheels)
    assert wheels
