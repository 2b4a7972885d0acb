import pytest
import torch

from medico_adapters.device import select_device
from medico_adapters.errors import DeviceError


def test_auto_picks_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device() == "cpu"


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == "cuda"


def test_env_override(monkeypatch):
    monkeypatch.setenv("MEDICO_ADAPTERS_DEVICE", "cpu")
    assert select_device() == "cpu"


def test_unavailable_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        select_device("cuda:0")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        select_device("tpu")
