"""`ddeseg.distributed.resolve_device`, the one device resolver: a bad `--device` is one line
naming the option and what this machine has, before any work starts."""

from __future__ import annotations

import pytest
import torch

from ddeseg.distributed import resolve_device
from ddeseg.errors import DDESegError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("value", ["gpu", "gpu:0", "cuda0", "nonsense"])
def test_a_value_that_is_not_a_torch_device_is_refused(value):
    with pytest.raises(DDESegError) as caught:
        resolve_device(value)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--device {value!r} is not a device")
    assert "cpu, cuda, cuda:N" in message


@pytest.mark.parametrize("value", ["cuda", "cuda:3"])
def test_a_gpu_this_machine_lacks_is_refused(value, monkeypatch):
    # Pretend a machine without CUDA whatever this one has, so the test runs anywhere.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DDESegError) as caught:
        resolve_device(value, option="--device")
    message = str(caught.value)
    assert "\n" not in message
    assert f"--device {value!r}" in message and "no CUDA GPU is visible" in message


def test_an_index_past_the_visible_gpus_names_the_ones_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    with pytest.raises(DDESegError, match=r"--device 'cuda:3'.*visible: cuda:0, cuda:1"):
        resolve_device("cuda:3")
