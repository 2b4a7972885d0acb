"""Embed a whole cohort into the embedding store on a Dask cluster (``medico-adapters precompute``).

Why Dask ``distributed``: it already does what a cohort needs -- processes on one machine
(``LocalCluster``) or a lab's cluster by address (``tcp://host:8786``, also one ``dask-jobqueue``
started on SLURM), tasks rescheduled when a worker dies, results streamed back as they finish --
so the kit writes no scheduler of its own. What the kit adds:

* one task per slab of ``slab`` slices. The client reads each volume (one at a time), normalises it
  as ``segment`` does (``io.normalise`` with the same ``window``) and computes each slice's store
  key, so the entries are the ones ``segment`` and the patched tools look up; the task gets the
  slab's keys and pixels and computes what the store lacks.
* each worker process builds its ``Predictor`` once, on its first slice to compute (a re-run that
  finds everything stored loads no model), with torch set to the worker's thread count and one
  embedding at a time per process;
* an entry is written atomically (``EmbeddingStore.put``), so a task cut short by a killed worker
  leaves whole entries, which its retry on another worker skips. By default the task also checks
  every existing entry's digest, so a damaged one is recomputed (``verify=False`` trusts existing
  files, checked here without reading them);
* only a few slabs are in flight at a time, so neither the client nor the scheduler holds a cohort;
* bad input is reported per file -- unreadable, a 2D image among volumes (or the other way
  round), larger than the memory it needs -- and the other files go on.

Entries are exact (f32) embeddings: what ``segment`` without ``--fast``, the patched tools and
micro-sam read. With ``microsam_dir`` each input's micro-sam embedding file is also written
(``embeddings.microsam``), which needs micro-sam's own normalisation (``window="microsam"``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medico_adapters.embeddings import microsam
from medico_adapters.embeddings.store import EmbeddingStore, input_size
from medico_adapters.errors import ImageError, MedicoError, MissingDependencyError

__all__ = ["SLAB", "ModelSpec", "embed_slab", "expand_inputs", "precompute"]

#: slices per task: long enough (a minute on a CPU) that scheduling costs nothing, short enough
#: that a killed worker loses little and the progress bar moves.
SLAB = 8
#: the file names ``expand_inputs`` takes as volumes in a folder of them (imagesTr/imagesTs).
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# -- worker side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its predictor; small, so it travels with every task."""

    checkpoint: str
    backend: str = "auto"
    device: str | None = None
    trust: bool = False


_PREDICTORS: dict = {}
_BUILD_LOCK = threading.Lock()
# A worker's threads overlap reading and writing entries; the encoder already uses the threads.
_ENCODER_LOCK = threading.Lock()


def _worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _worker_predictor(spec: ModelSpec):
    """This process's predictor for ``spec``, built on first use; (predictor, built now?)."""
    with _BUILD_LOCK:
        if spec in _PREDICTORS:
            return _PREDICTORS[spec], False
        import torch

        from medico_adapters.predictor import Predictor

        threads = _worker_threads()
        if threads:
            torch.set_num_threads(threads)
        predictor = Predictor(spec.checkpoint, device=spec.device, exact=True, backend=spec.backend, trust=spec.trust)
        _PREDICTORS[spec] = predictor
        return predictor, True


def embed_slab(spec: ModelSpec, root: str, model: str, keys: Sequence[str], pixels: Sequence[np.ndarray],
               verify: bool = True) -> dict:
    """Compute the entries of ``keys`` the store lacks (a Dask task; runs on a worker).

    Returns counts, the reasons of failed slices, and whether this call loaded the model.
    """
    store = EmbeddingStore(root)
    out = {"computed": 0, "skipped": 0, "failed": 0, "errors": [], "loaded": False, "pid": os.getpid()}
    for key, image in zip(keys, pixels, strict=True):
        if store.get(key) is not None if verify else key in store:
            out["skipped"] += 1
            continue
        try:
            predictor, built = _worker_predictor(spec)
            out["loaded"] |= built
            if predictor.store_model != model:
                raise MedicoError(f"{spec.checkpoint} on this worker holds other weights than on the client")
            with _ENCODER_LOCK:
                features = predictor.embed(image).features.cpu().numpy()
            store.put(key, features)
            out["computed"] += 1
        except Exception as e:  # reported per file by the client; the other slices go on
            out["failed"] += 1
            reason = str(e).splitlines()[0] if str(e) else ""
            out["errors"].append(f"{type(e).__name__}: {reason}"[:300])
    return out


def assemble_microsam(path: str, root: str, keys: Sequence[str], signature: microsam.Signature, ndim: int) -> bool:
    """Write one micro-sam embedding file from the store (a Dask task, after the file's slabs)."""
    return microsam.assemble(path, EmbeddingStore(root), keys, signature, ndim)


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class Case:
    """One input volume (or image) and what happened to it."""

    path: Path
    slices: int = 0
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    ndim: int | None = None
    zarr: Path | None = None
    zarr_written: bool | None = None
    nbytes: int = 0
    _pending: int = 0  # its tasks still running
    _submitted: bool = False  # all its slabs handed out
    _assembling: bool = False  # its micro-sam file handed out
    _keys: list[str] = field(default_factory=list)
    _signature: microsam.Signature | None = None

    def row(self) -> dict:
        row = {"input": str(self.path), "slices": self.slices, "computed": self.computed, "skipped": self.skipped,
               "failed": self.failed, "errors": self.errors}
        if self.zarr is not None:
            row["microsam"] = str(self.zarr)
            row["microsam_written"] = self.zarr_written
        return row


def _decathlon(folder: Path) -> list[Path]:
    """The images a Decathlon (or nnU-Net raw) folder lists: dataset.json's training and test
    images, else every volume in imagesTr/ and imagesTs/."""
    listing = folder / "dataset.json"
    if listing.is_file():
        try:
            data = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ImageError(f"{listing}: not readable JSON ({e})") from None
        names = [item["image"] if isinstance(item, dict) else item
                 for part in ("training", "test") for item in data.get(part) or []
                 if isinstance(item, (dict, str)) and (not isinstance(item, dict) or "image" in item)]
        if names:
            return [folder / name for name in names]
    found = sorted(p for sub in ("imagesTr", "imagesTs") if (folder / sub).is_dir() for p in (folder / sub).iterdir()
                   if not p.name.startswith(".") and p.name.lower().endswith(_VOLUME_SUFFIXES))
    if not found:
        raise ImageError(f"{folder}: a Decathlon folder without images (no dataset.json entries, no imagesTr/ volumes)")
    return found


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "No Series were found" is this answer
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, str | None]]:
    """Files, DICOM series folders and Decathlon folders -> [(volume path, None) or (input, error)],
    in the order given, each volume once."""
    found: dict[Path, str | None] = {}
    for item in inputs:
        path = Path(item)
        try:
            if not path.exists():
                raise ImageError(f"{path}: no such file or folder")
            if path.is_dir() and ((path / "dataset.json").is_file() or (path / "imagesTr").is_dir()):
                found.update((p, None) for p in _decathlon(path) if p not in found)
            elif path.is_dir() and not _is_dicom_folder(path):
                raise ImageError(f"{path}: a folder that is neither a DICOM series nor a Decathlon folder (dataset.json, imagesTr/)")
            else:
                found.setdefault(path, None)
        except ImageError as e:
            found[path] = str(e)
    return list(found.items())


def _zarr_names(cases: list[Case], folder: Path) -> None:
    taken: set[str] = set()
    for case in cases:
        name = case.path.name
        for suffix in (*_VOLUME_SUFFIXES, ".png", ".tif", ".tiff", ".dcm"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        case.zarr = folder / f"{candidate}.zarr"


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def _plan(inputs: list[tuple[Path, str | None]], memory_limit: int) -> list[Case]:
    """Read headers; a case that cannot be embedded gets its error (the 2D/3D kind of the run is
    the one most inputs have)."""
    from medico_adapters.io import read_info

    cases = []
    for path, error in inputs:
        case = Case(path)
        cases.append(case)
        try:
            if error:
                raise ImageError(error)
            info = read_info(path)
            if info.dimension not in (2, 3):
                raise ImageError(f"{path}: a {info.dimension}D image; precompute embeds 2D images and 3D volumes")
            case.ndim = info.dimension
            case.slices = info.size[2] if info.dimension == 3 else 1
            # the raw array, the float32 copies normalisation makes, the uint8 result
            case.nbytes = info.nbytes * 2 + int(np.prod(info.size, dtype=np.int64)) * 10
            if case.nbytes > memory_limit:
                raise ImageError(f"{path}: needs about {case.nbytes / 2**30:.1f} GiB to read and normalise, more than the "
                                 f"{memory_limit / 2**30:.1f} GiB of memory available")
        except ImageError as e:
            case.errors.append(str(e))
            case.slices, case.ndim = 0, None
    readable = [c for c in cases if c.ndim]
    kind = 3 if sum(c.ndim == 3 for c in readable) * 2 >= len(readable) else 2
    for case in readable:
        if case.ndim != kind:
            what = "a 2D image among 3D volumes" if kind == 3 else "a 3D volume among 2D images"
            case.errors.append(f"{case.path}: {what}; precompute each kind in a run of its own")
            case.slices, case.ndim = 0, None
    return cases


@dataclass(frozen=True)
class _Slab:
    case: Case
    first: int
    keys: list[str]  # the slices to compute (all of them when verifying)
    pixels: list[np.ndarray]
    skipped: int = 0  # slices found stored without a task (verify=False)
    planned: int = 0  # the header's slice count, when reading the case failed


def _slabs(cases: list[Case], *, model: str, window, slab: int, store: EmbeddingStore, verify: bool,
           signature: dict | None) -> Iterator[_Slab]:
    """Read each case when its turn comes and yield its slabs (without the slices a ``verify=False``
    run finds stored); a case that cannot be read records its error and yields one empty slab."""
    from medico_adapters.io import normalise, read_image

    for case in cases:
        planned = case.slices
        try:
            loaded = read_image(case.path)
            if (3 if loaded.is_volume else 2) != case.ndim:
                raise ImageError(f"{case.path}: the header and the pixels disagree on 2D or 3D")
            stack = loaded.array if loaded.is_volume else loaded.array[None]
            pixels, _ = normalise(stack, window)
        except (ImageError, MemoryError) as e:
            case.errors.append(str(e) if isinstance(e, ImageError) else f"{case.path}: out of memory reading it")
            case.slices, case._submitted = 0, True
            yield _Slab(case, 0, [], [], planned=planned)
            continue
        case.slices = len(pixels)
        case._keys = [store.key(model, p, input_size(*p.shape[:2])) for p in pixels]
        if signature is not None:
            height, width = pixels.shape[1:3]
            case._signature = microsam.Signature(
                data_signature=microsam.data_signature(loaded.array), original_size=(height, width),
                input_size=input_size(height, width), **signature,
            )
        del loaded, stack
        for first in range(0, len(pixels), slab):
            keys = case._keys[first:first + slab]
            todo = [i for i, key in enumerate(keys) if verify or key not in store]
            case.skipped += len(keys) - len(todo)
            case._submitted = first + slab >= len(pixels)
            yield _Slab(case, first, [keys[i] for i in todo], [np.ascontiguousarray(pixels[first + i]) for i in todo],
                        skipped=len(keys) - len(todo))


# -- the cluster -------------------------------------------------------------------------------
def _client(scheduler: str | None, workers: int | None):
    """(client, cluster or None, description): a LocalCluster of processes, or the one at ``scheduler``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError("precompute needs Dask distributed: pip install 'medico-adapters[precompute]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as e:
            raise MedicoError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            client.close()
            raise MedicoError(f"--scheduler {scheduler}: the cluster has no workers (waited 60 s)") from None
        threads = client.nthreads()  # every worker's (scheduler_info lists only a few)
        return client, None, {"scheduler": scheduler, "workers": len(threads), "threads": sum(threads.values())}
    cores = os.cpu_count() or 1
    n = workers or max(1, cores // 4)
    per_worker = max(1, cores // n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=per_worker, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster, {"scheduler": "LocalCluster", "workers": n, "threads": n * per_worker}


def precompute(
    inputs: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike,
    store: str | os.PathLike | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    window: str | tuple[float, float] | None = None,
    slab: int = SLAB,
    backend: str = "auto",
    device: str | None = None,
    trust: bool = False,
    verify: bool = True,
    microsam_dir: str | os.PathLike | None = None,
    progress: bool = True,
    memory_limit: int | None = None,
) -> dict:
    """Embed every slice of ``inputs`` into the store at ``store`` (default: ``default_root()``).

    ``window`` is ``segment``'s normalisation (``io.normalise``); ``microsam_dir`` also writes
    each input's micro-sam embedding file there (``window`` must then be ``"microsam"``, the
    default with it). ``scheduler`` is a Dask scheduler's address; without it a ``LocalCluster``
    of ``workers`` processes runs here (default: one per 4 cores), threads split evenly.
    Returns the report: per file, slices computed / skipped (already stored) / failed, and errors.
    """
    from medico_adapters.checkpoint import load_checkpoint, require_loadable
    from medico_adapters.embeddings.store import state_identity
    from medico_adapters.io import normalise

    started = time.perf_counter()
    if slab < 1:
        raise MedicoError(f"--slab {slab}: give at least 1 slice per task")
    if workers is not None and workers < 1:
        raise MedicoError(f"--workers {workers}: give at least 1")
    if microsam_dir is not None:
        if window is None:
            window = "microsam"
        elif not (isinstance(window, str) and window.lower() == "microsam"):
            raise MedicoError(f"--microsam-zarr: micro-sam embeds its own per-slice normalisation; use --window microsam, not {window}")
        microsam._zarr()
    normalise(np.zeros((1, 1, 1), np.int16), window)  # an unknown --window fails here, once
    store = EmbeddingStore(store)
    checkpoint = str(Path(checkpoint).absolute())
    ckpt = load_checkpoint(Path(checkpoint), trust=trust)
    require_loadable(ckpt)
    model, arch = state_identity(ckpt.state_dict), ckpt.info.arch
    del ckpt
    signature = None
    if microsam_dir is not None:
        model_hash, model_name = microsam.checkpoint_signature(checkpoint, arch)
        signature = {"model_type": arch, "model_name": model_name, "model_hash": model_hash,
                     "micro_sam_version": microsam._micro_sam_version()}

    everything = _plan(expand_inputs(inputs), memory_limit if memory_limit is not None else _available_memory())
    cases = [c for c in everything if not c.errors]
    if microsam_dir is not None:
        _zarr_names(cases, Path(microsam_dir).absolute())
    spec = ModelSpec(checkpoint, backend, device, trust)
    report = {"store": str(store.root.absolute()), "model": model, "checkpoint": checkpoint,
              "window": window if window is not None else "default (as segment: uint8 kept, else percentile)",
              "slab": slab, "verify": verify, "microsam_dir": str(Path(microsam_dir).absolute()) if microsam_dir else None}
    loads, processes = 0, set()
    if cases:
        client, cluster, where = _client(scheduler, workers)
        report["cluster"] = where
        try:
            loads, processes = _run(client, cases, spec=spec, model=model, window=window, slab=slab, store=store,
                                    verify=verify, signature=signature, limit=max(2, 2 * where["threads"]),
                                    progress=progress)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    report["files"] = [c.row() for c in everything]
    totals = {k: sum(getattr(c, k) for c in everything) for k in ("slices", "computed", "skipped", "failed")}
    totals["files"] = len(everything)
    totals["files_with_errors"] = sum(bool(c.errors) for c in everything)
    report["totals"] = totals
    report["model_loads"] = loads
    report["worker_processes"] = len(processes)  # those that computed: each should have loaded once
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["computed_per_hour"] = round(totals["computed"] * 3600 / report["seconds"]) if report["seconds"] else 0
    return report


def _run(client, cases: list[Case], *, spec: ModelSpec, model: str, window, slab: int, store: EmbeddingStore,
         verify: bool, signature: dict | None, limit: int, progress: bool) -> tuple[int, set]:
    """Feed slab tasks to the cluster, a few at a time, and account for them; returns the model
    loads and the worker processes that computed."""
    from distributed import as_completed
    from tqdm import tqdm

    run = uuid.uuid4().hex[:8]
    root = str(store.root.absolute())
    source = _slabs(cases, model=model, window=window, slab=slab, store=store, verify=verify, signature=signature)
    flying = as_completed()
    owner: dict = {}
    loads, processes = 0, set()
    bar = tqdm(total=sum(c.slices for c in cases), unit="slice", desc="precompute", disable=not progress,
               dynamic_ncols=True)
    started = time.perf_counter()

    def submit(case: Case, item: _Slab | None, function, *args) -> None:
        future = client.submit(function, *args, key=f"medico-{function.__name__}-{run}-{uuid.uuid4().hex[:8]}", pure=False)
        case._pending += 1
        owner[future] = (case, item)
        flying.add(future)

    def finish(case: Case) -> None:
        """Once all of a case's slabs are in, hand out its micro-sam file (if asked and complete)."""
        if case._pending or not case._submitted or case._assembling:
            return
        if case.zarr is not None and case._signature is not None and not case.errors and not case.failed:
            case._assembling = True
            submit(case, None, assemble_microsam, str(case.zarr), root, case._keys, case._signature, case.ndim)

    def feed() -> None:
        while len(owner) < limit:
            item = next(source, None)
            if item is None:
                return
            if item.planned:  # a case that could not be read leaves the bar's total
                bar.total -= item.planned
                bar.refresh()
            bar.update(item.skipped)
            if item.keys:
                submit(item.case, item, embed_slab, spec, root, model, item.keys, item.pixels, verify)
            finish(item.case)

    feed()
    for future in flying:
        case, item = owner.pop(future)
        case._pending -= 1
        if item is None:  # the micro-sam file
            try:
                case.zarr_written = bool(future.result())
            except Exception as e:
                case.errors.append(f"{case.zarr}: {type(e).__name__}: {e}")
        else:
            try:
                result = future.result()
            except Exception as e:  # the task failed on every try (e.g. its workers kept dying)
                result = {"computed": 0, "skipped": 0, "failed": len(item.keys), "loaded": False,
                          "errors": [f"{type(e).__name__}: {str(e)[:200]}"]}
            for name in ("computed", "skipped", "failed"):
                setattr(case, name, getattr(case, name) + result[name])
            loads += bool(result["loaded"])
            if result["computed"] or result["loaded"]:
                processes.add(result.get("pid"))
            last = min(item.first + slab, case.slices) - 1
            case.errors += [f"{case.path}: slices {item.first}-{last}: {e}" for e in dict.fromkeys(result["errors"])]
            bar.update(len(item.keys))
            computed = sum(c.computed for c in cases)
            bar.set_postfix(computed=computed, skipped=sum(c.skipped for c in cases), failed=sum(c.failed for c in cases),
                            per_hour=round(computed * 3600 / max(time.perf_counter() - started, 1e-9)))
        finish(case)
        future.release()
        feed()
    bar.close()
    return loads, processes
