"""The training device and what it reports: torch memory stats, NVML (when present), process RSS/CPU."""

from __future__ import annotations

import contextlib
import platform
from typing import Any

import psutil
import torch

from tui_trainer.core.errors import ConfigError
from tui_trainer.core.events import DeviceSample


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps was asked for but torch sees no Apple GPU")
    return torch.device(name)


class DeviceMonitor:
    """Builds DeviceSample events; NVML is optional and initialised once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # prime: the first call always returns 0
        self._nvml: Any = None
        self._nvml_handle: Any = None
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._nvml, self._nvml_handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self, run: str) -> DeviceSample:
        rss = self.process.memory_info().rss
        cpu = self.process.cpu_percent(None)
        kind = self.device.type
        if kind == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            fields: dict[str, Any] = {
                "allocated": torch.cuda.memory_allocated(self.device),
                "reserved": torch.cuda.memory_reserved(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device),
                "total": props.total_memory,
            }
            notes: tuple[str, ...] = ()
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    nv, h = self._nvml, self._nvml_handle
                    fields["utilization"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                    fields["temperature_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                    fields["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            else:
                notes = ("NVML not available: no utilisation/temperature",)
            return DeviceSample(run, "cuda", props.name, rss, cpu, notes=notes, **fields)
        if kind == "mps":
            return DeviceSample(run, "mps", "Apple GPU", rss, cpu, allocated=torch.mps.current_allocated_memory())
        name = platform.processor() or platform.machine()
        return DeviceSample(
            run,
            "cpu",
            f"{name}, {torch.get_num_threads()} threads",
            rss,
            cpu,
            total=psutil.virtual_memory().total,
            notes=("no GPU: training on the CPU",),
        )
