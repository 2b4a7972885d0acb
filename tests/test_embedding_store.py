"""The embedding store under damage, concurrency and kill -9, with Windows' constraints.

Writers run as separate processes with what only POSIX has taken away (no ``fcntl``, no folder
handles: ``tests.test_portability.WINDOWS_LIKE``'s preamble) and are killed with
``Popen.kill`` (TerminateProcess on Windows, SIGKILL elsewhere).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medico_adapters.embeddings.store import EmbeddingStore
from tests.test_portability import WINDOWS_LIKE

NO_POSIX = WINDOWS_LIKE.split("from medico_adapters.cli")[0]
PIXELS = np.arange(48 * 40, dtype=np.uint8).reshape(48, 40)


def _writer(script: str, *args) -> subprocess.Popen:
    code = NO_POSIX + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_damaged_entry_is_removed_and_recomputed(tmp_path):
    store = EmbeddingStore(tmp_path)
    key = store.key("model-a", PIXELS)
    features = np.random.default_rng(0).random((1, 256, 8, 8), dtype=np.float32)
    path = store.put(key, features)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # one flipped bit pattern deep in the payload
    path.write_bytes(bytes(blob))
    calls = []
    again = store.get_or_compute(key, lambda: calls.append(1) or features)
    assert calls == [1] and store.stats["damaged"] == 1
    np.testing.assert_array_equal(again, features)
    np.testing.assert_array_equal(EmbeddingStore(tmp_path).get(key), features)  # the rewrite is whole
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert store.get(key) is None and not path.exists()


def test_keys_follow_model_pixels_and_input_size(tmp_path):
    store = EmbeddingStore(tmp_path)
    key = store.key("model-a", PIXELS)
    assert key == store.key("model-a", np.repeat(PIXELS[:, :, None], 3, axis=2))  # grey is its RGB
    others = {store.key("model-b", PIXELS), store.key("model-a", PIXELS + 1),
              store.key("model-a", PIXELS, (512, 512)), store.key("model-a", PIXELS[:, :39].copy())}
    assert key not in others and len(others) == 4
    with pytest.raises(TypeError, match="uint8"):
        store.key("model-a", PIXELS.astype(np.float32))


def test_concurrent_writers_of_one_entry(tmp_path):
    """Four processes write the same entry over and over while this one reads it: every read is
    the whole entry or none, never a damaged one, and no temporary file stays behind."""
    script = """
        import numpy as np
        from medico_adapters.embeddings.store import EmbeddingStore
        store = EmbeddingStore(sys.argv[1])
        features = np.arange(256 * 64 * 64, dtype=np.float32).reshape(1, 256, 64, 64)
        for _ in range(25):
            store.put(sys.argv[2], features)
        print(store.stats["writes"])
    """
    store = EmbeddingStore(tmp_path)
    key = store.key("model-a", PIXELS)
    expected = np.arange(256 * 64 * 64, dtype=np.float32).reshape(1, 256, 64, 64)
    writers = [_writer(script, tmp_path, key) for _ in range(4)]
    seen = 0
    while any(w.poll() is None for w in writers):
        got = store.get(key)
        if got is not None:
            np.testing.assert_array_equal(got, expected)
            seen += 1
    outputs = [w.communicate() for w in writers]
    assert [w.returncode for w in writers] == [0] * 4, [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["25"] * 4
    assert store.stats["damaged"] == 0 and seen > 0
    assert [p.name for p in store.path(key).parent.iterdir()] == [store.path(key).name]


def test_kill_9_mid_write_leaves_no_torn_entry(tmp_path):
    """A writer of large entries is killed while a temporary file is being written: the entries
    that exist all load, and the killed one is simply absent (or whole)."""
    script = """
        import numpy as np
        from medico_adapters.embeddings.store import EmbeddingStore
        store = EmbeddingStore(sys.argv[1])
        features = np.ones((4, 256, 128, 128), dtype=np.float32)  # 64 MiB: a write takes a while
        for i in range(1000):
            print("begin", i, flush=True)
            store.put(store.key("model-a", np.full((8, 8), i % 256, np.uint8), (i, i)), features * i)
    """
    store = EmbeddingStore(tmp_path)
    caught_mid_write = 0
    for attempt in range(3):
        writer = _writer(script, tmp_path)
        for _ in range(2 + attempt):
            assert writer.stdout.readline().startswith("begin")
        deadline = time.monotonic() + 10
        while not list(tmp_path.rglob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.002)
        caught_mid_write += bool(list(tmp_path.rglob("*.tmp")))
        writer.kill()
        writer.communicate()
    assert caught_mid_write >= 1  # the kill really landed inside a write
    entries = list(tmp_path.rglob("*.emb"))
    assert entries
    for path in entries:  # an entry's file name is its key
        features = store.get(path.stem)
        assert features is not None, f"torn entry {path.name}"
        assert features.shape == (4, 256, 128, 128) and np.unique(features).size == 1
    assert store.stats["damaged"] == 0
