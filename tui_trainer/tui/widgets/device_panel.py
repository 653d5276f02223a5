"""Device and throughput panel: GPU memory / NVML stats, or process RSS and CPU% with a plain 'no GPU'."""

from __future__ import annotations

from collections.abc import Callable

import psutil
from rich.text import Text
from textual.widgets import Static

from tui_trainer.engine.events import DeviceSample, StepLogged
from tui_trainer.tui import fmt

Probe = Callable[[], DeviceSample]


def process_probe() -> Callable[[], DeviceSample]:
    """Sample this process (the app and its training thread) with psutil: what we show with no engine."""
    proc = psutil.Process()
    proc.cpu_percent(None)  # prime: the first reading is always 0

    def probe() -> DeviceSample:
        return DeviceSample(
            run="",
            device="cpu",
            name="this process",
            rss_bytes=proc.memory_info().rss,
            cpu_percent=proc.cpu_percent(None),
        )

    return probe


class DevicePanel(Static):
    """Shows the newest DeviceSample plus throughput, step time and ETA of the newest logged step."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__("", **kwargs)  # type: ignore[arg-type]
        self.sample: DeviceSample | None = None
        self.step: StepLogged | None = None
        self.live = False

    def on_mount(self) -> None:
        self.border_title = "Device"
        self._redraw()

    def show_sample(self, sample: DeviceSample) -> None:
        self.sample = sample
        self._redraw()

    def show_step(self, step: StepLogged | None, live: bool) -> None:
        self.step, self.live = step, live
        self._redraw()

    def text(self) -> Text:
        out = Text(no_wrap=True, overflow="ellipsis")
        s = self.sample
        if s is None:
            out.append("sampling…", style="dim")
        elif s.device.startswith("cuda"):
            out.append(f"{s.name}\n", style="bold")
            out.append(f"mem {fmt.size(s.allocated)} alloc · {fmt.size(s.reserved)} rsv\n")
            out.append(f"peak {fmt.size(s.peak)} / {fmt.size(s.total)}\n")
            bits = []
            if s.utilization is not None:
                bits.append(f"util {s.utilization:.0f}%")
            if s.temperature_c is not None:
                bits.append(f"{s.temperature_c:.0f}°C")
            if s.power_w is not None:
                bits.append(f"{s.power_w:.0f} W")
            out.append(" · ".join(bits) if bits else "no NVML: util/temp unknown", style="" if bits else "dim")
            out.append("\n")
        elif s.device.startswith("mps"):
            out.append("Apple GPU (mps)\n", style="bold")
            out.append(f"mem {fmt.size(s.allocated)} allocated\n")
            out.append(self._process_line(s) + "\n")
        else:
            out.append("CPU · no GPU\n", style="bold")
            out.append(self._process_line(s) + "\n")
        e = self.step
        if e is not None and self.live:
            out.append(f"{fmt.rate(e.tokens_per_s)} · {e.step_time * 1000:.0f} ms/step · ETA {fmt.duration(e.eta_s)}")
        elif e is not None:
            out.append(f"last {fmt.rate(e.tokens_per_s)} · {e.step_time * 1000:.0f} ms/step", style="dim")
        else:
            out.append("no run training", style="dim")
        return out

    @staticmethod
    def _process_line(s: DeviceSample) -> str:
        cpu = "–" if s.cpu_percent is None else f"{s.cpu_percent:.0f}%"
        return f"RSS {fmt.size(s.rss_bytes)} · CPU {cpu}"

    def _redraw(self) -> None:
        self.update(self.text(), layout=False)  # fixed size (CSS): skip the relayout
