"""micro-sam: ``--path`` names the folder MICROSAM_CACHEDIR names; the files go in its ``models``."""

from __future__ import annotations

import json

import pooch
import pytest

from medico_adapters import registry
from medico_adapters.adapters import micro_sam
from medico_adapters.cli import main
from medico_adapters.errors import PatchError


@pytest.fixture
def published(monkeypatch, checkpoints):
    """The random ViT-B stands in for the published MedicoSAM file: its hash becomes the registry's."""
    path = checkpoints["plain"]
    monkeypatch.setitem(registry.HASHES, registry.MEDICOSAM, "xxh128:" + pooch.file_hash(str(path), alg="xxh128"))
    return path


def test_path_is_the_microsam_cachedir(published, tmp_path, capsys):
    cachedir = tmp_path / "microsam"
    assert main(["patch", "micro-sam", "--path", str(cachedir), "--checkpoint", str(published), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    placed = cachedir / "models" / registry.MEDICOSAM
    assert report["placed"] == [str(placed)] and placed.read_bytes() == published.read_bytes()
    assert sorted(p.name for p in placed.parent.iterdir()) == [micro_sam.RECORD, registry.MEDICOSAM]  # no temporary left
    assert json.loads((placed.parent / micro_sam.RECORD).read_text("utf-8")) == {"placed": [registry.MEDICOSAM]}

    assert main(["status", "micro-sam", "--path", str(cachedir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ready"] is True
    assert main(["unpatch", "micro-sam", "--path", str(cachedir)]) == 0
    assert list(placed.parent.iterdir()) == []


def test_the_default_is_where_microsam_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "c"))
    assert micro_sam.cache_dir() == micro_sam.cache_dir(tmp_path / "c") == tmp_path / "c/models"


@pytest.mark.parametrize("command", ["patch", "status", "unpatch"])
def test_a_models_folder_is_named_not_nested(command, published, tmp_path, capsys):
    cachedir = tmp_path / "microsam"
    micro_sam.patch(published, cache=cachedir)
    before = sorted((cachedir / "models").iterdir())
    assert main([command, "micro-sam", "--path", str(cachedir / "models")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is micro-sam's models folder itself" in err and f"--path {cachedir}" in err
    assert sorted((cachedir / "models").iterdir()) == before and not (cachedir / "models/models").exists()


def test_a_models_folder_micro_sam_filled_is_recognised(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "vit_b").write_bytes(b"sam")
    with pytest.raises(PatchError, match="models folder itself"):
        micro_sam.cache_dir(models)
    assert micro_sam.cache_dir(tmp_path / "empty") == tmp_path / "empty/models"
