"""Pick the compute device: cuda, then mps, then cpu -- overridable, never silently wrong."""

from __future__ import annotations

import os

import torch

from medico_adapters.errors import DeviceError

ENV_VAR = "MEDICO_ADAPTERS_DEVICE"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if _mps_available():
        devices.append("mps")
    return devices + ["cpu"]


def select_device(requested: str | None = None) -> str:
    """Return the device to run on.

    ``requested`` (or ``$MEDICO_ADAPTERS_DEVICE``) may be ``auto``, ``cpu``, ``mps``, ``cuda`` or
    ``cuda:N``; asking for a device this machine lacks is an error rather than a quiet fallback.
    """
    choice = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice == "auto":
        return available_devices()[0]
    if choice == "cpu":
        return "cpu"
    if choice == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' was requested but Apple's MPS backend is not available here")
        return "mps"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {choice!r} was requested but this torch sees no CUDA GPU")
        index = choice.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"device {choice!r} does not exist (this machine has {torch.cuda.device_count()} GPU(s))")
        return choice
    raise DeviceError(f"unknown device {choice!r}; use auto, cpu, mps, cuda or cuda:N")
