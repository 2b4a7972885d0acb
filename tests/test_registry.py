import functools
import http.server
import threading

import pooch
import pytest

from medico_adapters import registry
from medico_adapters.errors import RegistryError


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A loopback HTTP server with one file, registered in the registry as 'vit_b'."""
    payload = tmp_path / "www" / "weights.pth"
    payload.parent.mkdir()
    payload.write_bytes(b"pretend weights" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(payload.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/weights.pth"
    monkeypatch.setitem(registry.URLS, "vit_b", url)
    monkeypatch.setitem(registry.HASHES, "vit_b", "xxh128:" + pooch.file_hash(str(payload), alg="xxh128"))
    yield payload
    server.shutdown()


def test_fetch_downloads_and_verifies(served):
    path = registry.fetch("vit_b", progress=False)
    assert path.read_bytes() == served.read_bytes()
    assert registry.cached_path("vit_b") == path


def test_hash_mismatch_leaves_no_file(served, monkeypatch):
    monkeypatch.setitem(registry.HASHES, "vit_b", "xxh128:" + "0" * 32)
    with pytest.raises(RegistryError, match="vit_b: .*hash"):
        registry.fetch("vit_b", progress=False)
    assert registry.cached_path("vit_b") is None
    assert not any(registry.models_dir().glob("*")) if registry.models_dir().exists() else True


def test_failed_download_says_how_to_register_a_local_copy(monkeypatch):
    monkeypatch.setitem(registry.URLS, "vit_b", "http://127.0.0.1:9/none.pth")
    with pytest.raises(RegistryError, match="--from-file"):
        registry.fetch("vit_b", progress=False)


def test_from_file_verifies_known_hash(tmp_path):
    f = tmp_path / "medicosam.pt"
    f.write_bytes(b"not the real file")
    with pytest.raises(RegistryError, match="does not match the registry's 40169f1e"):
        registry.register_file("vit_b_medical_imaging", f)
    assert registry.cached_path("vit_b_medical_imaging") is None


def test_from_file_without_published_hash(tmp_path):
    f = tmp_path / "medsam.pth"
    f.write_bytes(b"weights")
    path, verified = registry.register_file("medsam_vit_b", f)
    assert not verified and path.read_bytes() == b"weights"


def test_alias_and_unknown_names():
    assert registry.canonical("MedicoSAM") == "vit_b_medical_imaging"
    with pytest.raises(RegistryError, match="unknown model 'sam3'"):
        registry.canonical("sam3")


def test_cache_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDICO_ADAPTERS_CACHE", str(tmp_path / "c"))
    assert registry.models_dir() == tmp_path / "c" / "models"
