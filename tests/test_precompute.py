"""``precompute`` on real Dask clusters of worker processes, with a random ViT-B.

A cohort of five slices (a NIfTI volume, a DICOM series, a Decathlon folder) is embedded with one
worker killed mid-run, run again (everything skipped, no model loaded), run again after an entry
was damaged (that one slice recomputed), then read by ``segment``. Few slices, because each costs
seconds on a CPU; the random weights prove the plumbing, not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="needs the [precompute] extra (Dask distributed)")

from medico_adapters import phantom  # noqa: E402
from medico_adapters.embeddings.precompute import expand_inputs, precompute  # noqa: E402
from medico_adapters.embeddings.store import EmbeddingStore, input_size, state_identity  # noqa: E402
from medico_adapters.io import normalise, read_image  # noqa: E402

SLICES = 5


def _few(shape, seed, keep, path):
    """A phantom cut down to a few slices (the phantom itself needs eight)."""
    ph = phantom.make_phantom(shape, seed=seed)
    phantom.write(dataclasses.replace(ph, volume=ph.volume[keep], labels=ph.labels[keep]), path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    import SimpleITK as sitk

    from tests.test_io import _write_dicom_series

    root = tmp_path_factory.mktemp("cohort")
    _few((8, 48, 48), 1, slice(3, 5), root / "a.nii.gz")
    series = root / "b-dicom"
    series.mkdir()
    ph = phantom.make_phantom((8, 40, 56), seed=2)
    image = sitk.GetImageFromArray(ph.volume[2:4])
    image.SetSpacing((0.8, 0.8, 3.0))
    _write_dicom_series(image, series)
    task = root / "Task09_Demo"
    (task / "imagesTr").mkdir(parents=True)
    _few((8, 40, 40), 3, slice(4, 5), task / "imagesTr" / "case_001.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/case_001.nii.gz",
                                                                 "label": "./labelsTr/case_001.nii.gz"}]}))
    return root, [root / "a.nii.gz", series, task]


def _keys(paths, model, store, window=None):
    keys = []
    for path, _ in expand_inputs(paths):
        loaded = read_image(path)
        pixels, _ = normalise(loaded.array if loaded.is_volume else loaded.array[None], window)
        keys += [store.key(model, p, input_size(*p.shape[:2])) for p in pixels]
    return keys


@pytest.fixture(scope="module")
def first_run(cohort, checkpoints, vit_b_state, tmp_path_factory):
    """The cohort embedded on a LocalCluster of two processes, one of them killed mid-run."""
    import psutil
    from distributed import Client, LocalCluster
    from distributed.utils_test import poll_for

    store = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDICO_ADAPTERS_CACHE", str(tmp_path_factory.mktemp("kit-cache")))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            pids = client.run(os.getpid)
            report = {}
            run = threading.Thread(target=lambda: report.update(precompute(
                cohort[1], checkpoints["plain"], store, scheduler=cluster.scheduler_address, slab=2,
                backend="torch", progress=False)))
            run.start()
            poll_for(lambda: any(store.rglob("*.emb")) and any(client.processing().values()), timeout=300, period=0.2)
            victim = next(address for address, tasks in client.processing().items() if tasks)
            psutil.Process(pids[victim]).kill()
            run.join(timeout=600)
    assert not run.is_alive()
    return store, report, state_identity(vit_b_state)


def test_a_killed_worker_leaves_a_complete_store(cohort, first_run):
    store_root, report, model = first_run
    totals = report["totals"]
    assert totals["slices"] == SLICES and totals["computed"] + totals["skipped"] == SLICES
    assert (totals["failed"], totals["files_with_errors"]) == (0, 0), report["files"]
    assert [row["slices"] for row in report["files"]] == [2, 2, 1]  # a.nii.gz, the DICOM series, the Decathlon case
    assert report["model_loads"] == report["worker_processes"]  # each process loaded its model once
    store = EmbeddingStore(store_root)
    for key in _keys(cohort[1], model, store):
        features = store.get(key)
        assert features is not None and features.shape == (1, 256, 64, 64)
    for path in store_root.rglob("*.emb"):  # nothing torn by the kill either
        assert store.get(path.stem) is not None
    assert store.stats["damaged"] == 0


def test_rerun_skips_all_and_a_damaged_entry_is_recomputed(cohort, first_run, checkpoints):
    store_root, _, model = first_run
    again = precompute(cohort[1], checkpoints["plain"], store_root, workers=2, backend="torch", progress=False)
    assert again["cluster"] == {"scheduler": "LocalCluster", "workers": 2, "threads": 2 * max(1, (os.cpu_count() or 1) // 2)}
    assert (again["totals"]["computed"], again["totals"]["skipped"], again["model_loads"]) == (0, SLICES, 0)

    store = EmbeddingStore(store_root)
    damaged = store.path(_keys(cohort[1], model, store)[3])
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    damaged.write_bytes(bytes(blob))
    trusting = precompute(cohort[1], checkpoints["plain"], store_root, workers=1, backend="torch", verify=False,
                          progress=False)
    assert (trusting["totals"]["computed"], trusting["totals"]["skipped"]) == (0, SLICES)  # --no-verify: exists
    repaired = precompute(cohort[1], checkpoints["plain"], store_root, workers=1, backend="torch", progress=False)
    assert (repaired["totals"]["computed"], repaired["totals"]["skipped"], repaired["totals"]["failed"]) == (1, SLICES - 1, 0)
    assert EmbeddingStore(store_root).get(damaged.stem) is not None


def test_segment_finds_every_slice_in_the_store(cohort, first_run, checkpoints, tmp_path):
    from medico_adapters.segment import segment

    report = segment(cohort[1][0], tmp_path / "mask.nii.gz", points=[(0, 24, 20)], checkpoint=checkpoints["plain"],
                     backend="torch", store=first_run[0], progress=False, iou_threshold=0.0)
    assert report["embeddings"]["computed"] == 0 and report["embeddings"]["from_cache"] >= 1


# -- inputs and errors (no model) ---------------------------------------------------------------------
def test_inputs_expand_from_files_dicom_and_decathlon_folders(cohort, tmp_path):
    root, paths = cohort
    found = expand_inputs([*paths, paths[0]])
    assert [(p.name, error) for p, error in found] == [("a.nii.gz", None), ("b-dicom", None), ("case_001.nii.gz", None)]
    listed = tmp_path / "Task10"
    (listed / "imagesTr").mkdir(parents=True)
    (listed / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/gone.nii.gz"}], "test": ["./imagesTs/t.nii.gz"]}))
    bare = tmp_path / "Task11"
    (bare / "imagesTr").mkdir(parents=True)
    (bare / "imagesTr" / "x.nii.gz").write_bytes(b"")
    (bare / "imagesTr" / "._x.nii.gz").write_bytes(b"")  # macOS resource forks are not images
    (tmp_path / "other").mkdir()
    found = expand_inputs([listed, bare, tmp_path / "other", tmp_path / "none.nii.gz"])
    assert [(p.relative_to(tmp_path).as_posix(), error and error.split(": ", 1)[1]) for p, error in found] == [
        ("Task10/imagesTr/gone.nii.gz", None), ("Task10/imagesTs/t.nii.gz", None), ("Task11/imagesTr/x.nii.gz", None),
        ("other", "a folder that is neither a DICOM series nor a Decathlon folder (dataset.json, imagesTr/)"),
        ("none.nii.gz", "no such file or folder"),
    ]


def test_a_volume_larger_than_memory_is_refused_alone(cohort, checkpoints, tmp_path):
    report = precompute([cohort[1][0]], checkpoints["plain"], tmp_path, memory_limit=1000, progress=False)
    assert "needs about" in report["files"][0]["errors"][0] and "memory available" in report["files"][0]["errors"][0]
    assert report["totals"]["computed"] == 0 and "cluster" not in report  # nothing to run, no cluster started


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "medico_adapters", "precompute", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_reports_each_bad_input_on_one_line_and_goes_on(cohort, first_run, checkpoints, tmp_path):
    import SimpleITK as sitk

    root = cohort[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.uint8)), str(tmp_path / "flat.png"))
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    (tmp_path / "notes").mkdir()
    store = os.path.relpath(first_run[0], tmp_path)
    done = _cli(os.path.relpath(root / "a.nii.gz", tmp_path), "flat.png", "bad.nii.gz", "missing.nii.gz", "notes",
                "--checkpoint", checkpoints["plain"], "--store", store, "--workers", "1", "--backend", "torch", "--json",
                cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("medico-adapters: error: ") for line in lines), done.stderr
    assert {line.split(": ")[2] for line in lines} == {"bad.nii.gz", "flat.png", "missing.nii.gz", "notes"}
    report = json.loads(done.stdout)
    good = next(row for row in report["files"] if row["input"].endswith("a.nii.gz"))
    assert (good["computed"], good["skipped"], good["errors"]) == (0, 2, [])
    assert report["store"] == str(first_run[0])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "absent.pt"], "absent.pt"),
    (["--checkpoint", "x.pt", "--microsam-zarr", "z", "--window", "lung"], "--window microsam"),
    (["--checkpoint", "x.pt", "--slab", "0"], "--slab 0"),
    (["--checkpoint", "x.pt", "--window", "liver"], "--window 'liver': unknown preset"),
])
def test_cli_one_line_errors(tmp_path, args, message):
    done = _cli("a.nii.gz", *args, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and done.stderr.startswith("medico-adapters: error: ")


def test_cli_on_a_running_scheduler_writes_micro_sam_files(cohort, checkpoints, vit_b_state, tmp_path):
    """An existing cluster by address (here distributed's own test cluster), and micro-sam's file
    written from the entries: the micro-sam window gives other pixels, so the slice is computed."""
    zarr = pytest.importorskip("zarr", minversion="3.1.3", reason="needs the [precompute] extra (zarr >= 3.1.3)")
    from distributed.utils_test import cluster

    from medico_adapters.embeddings import microsam

    case = cohort[1][2] / "imagesTr" / "case_001.nii.gz"
    with cluster(nworkers=1, worker_kwargs={"nthreads": 2}) as (scheduler, _):
        done = _cli(case, "--checkpoint", checkpoints["plain"], "--store", "store", "--scheduler", scheduler["address"],
                    "--microsam-zarr", "zarrs", "--backend", "torch", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cluster"] == {"scheduler": scheduler["address"], "workers": 1, "threads": 2}
    assert report["window"] == "microsam"
    row = report["files"][0]
    assert (row["computed"], row["microsam_written"], row["microsam"]) == (1, True, str(tmp_path / "zarrs" / "case_001.zarr"))
    group = zarr.open_group(row["microsam"], mode="r")
    raw = read_image(case).array
    store = EmbeddingStore(tmp_path / "store")
    key = store.key(state_identity(vit_b_state), microsam.to_image(raw[0]))
    np.testing.assert_array_equal(group["features"][0], store.get(key))
    assert group.attrs["data_signature"] == microsam.data_signature(raw) and group.attrs["input_size"] == [1024, 1024]
