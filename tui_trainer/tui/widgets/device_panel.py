"""Device and throughput panel: GPU memory / NVML stats, or process RSS and CPU% with a plain 'no GPU'."""

from __future__ import annotations

from collections.abc import Callable

import psutil
from rich.text import Text
from textual.widgets import Static

from tui_trainer.core import fmt
from tui_trainer.core.events import DeviceSample, StepLogged
from tui_trainer.tui.widgets.text_fit import fit

Probe = Callable[[], DeviceSample]


def process_probe() -> Probe:
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

    def text(self, width: int | None = None) -> Text:
        """Lines of short items, packed " · "-joined as far as `width` allows (default: the panel's width),
        so a narrow panel wraps between items instead of cutting a number off."""
        if width is None:
            width = self.content_region.width if self.is_mounted and self.content_region.width else 1000
        # throughput and ETA first: when a short panel cuts lines, it cuts device details, not the ETA
        lines: list[tuple[str, str]] = []  # (text, style)
        s = self.sample
        header, items = _device_items(s) if s is not None else ("sampling…", [])
        lines.append((header, "bold" if s is not None else "dim"))
        e = self.step
        if e is not None and self.live:
            # the step time the ETA counts with, so the two always agree (ETA = steps left x this)
            per_step = e.eta_step_time if e.eta_step_time is not None else e.step_time
            speed = [fmt.rate(e.tokens_per_s), f"{per_step * 1000:.0f} ms/step", f"ETA {fmt.duration(e.eta_s)}"]
            lines += [(line, "") for line in pack(speed, width)]
        elif e is not None:
            speed = [f"last {fmt.rate(e.tokens_per_s)}", f"{e.step_time * 1000:.0f} ms/step"]
            lines += [(line, "dim") for line in pack(speed, width)]
        else:
            lines.append(("no run training", "dim"))
        lines += [(line, "dim" if "NVML" in line else "") for line in pack(items, width)]
        out = Text(no_wrap=True)
        for i, (line, style) in enumerate(lines):
            out.append("\n" if i else "")
            out.append_text(fit(Text(line, style=style), width))  # a long GPU name: cut after a word
        return out

    def on_resize(self) -> None:
        self._redraw()

    def _redraw(self) -> None:
        self.update(self.text(), layout=False)  # fixed size (CSS): skip the relayout


CORES = psutil.cpu_count() or 1


def cpu_use(percent: float | None, cores: int | None = None) -> str:
    """psutil's process CPU% counts each core as 100%: say how many of the machine's cores are busy."""
    return "CPU –" if percent is None else f"CPU {percent / 100:.1f}/{cores or CORES} cores"


def _device_items(s: DeviceSample) -> tuple[str, list[str]]:
    if s.device.startswith("cuda"):
        items = [
            f"mem {fmt.size(s.allocated)} alloc",
            f"{fmt.size(s.reserved)} rsv",
            f"peak {fmt.size(s.peak)} / {fmt.size(s.total)}",
        ]
        if s.utilization is not None:
            items.append(f"util {s.utilization:.0f}%")
        if s.temperature_c is not None:
            items.append(f"{s.temperature_c:.0f}°C")
        if s.power_w is not None:
            items.append(f"{s.power_w:.0f} W")
        if s.utilization is None and s.temperature_c is None and s.power_w is None:
            items.append("no NVML: util/temp unknown")
        return s.name, items
    process = [f"RSS {fmt.size(s.rss_bytes)}", cpu_use(s.cpu_percent)]
    if s.device.startswith("mps"):
        return "Apple GPU (mps)", [f"mem {fmt.size(s.allocated)} allocated", *process]
    return "CPU · no GPU", process


def pack(items: list[str], width: int, sep: str = " · ") -> list[str]:
    """Greedy: as many items per line as fit in `width`; an item never splits."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines
