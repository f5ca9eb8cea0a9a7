"""The compression report: per step params, MACs, measured latency and accuracy, before and after.

``report.json`` is the machine-readable record; ``report.md`` the same for a person. Latencies carry their context
(device, threads, input, dtype, torch version). The before/after speed-up comes from one side-by-side measurement
of the original and the compressed model in interleaved rounds (a slow phase of the machine hits both alike), not
from two numbers measured at different times.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from searchspace._io import atomic_write_text


@dataclass
class StepRecord:
    """One step as it ran: its complete parameters, what it reported, and the model's figures after it."""

    index: int
    name: str
    params: dict[str, Any]
    seconds: float
    figures: dict[str, Any]  # what the step returned (e.g. layers factorised, training loss)
    after: dict[str, Any]  # params, macs, latency_ms, latency_spread, accuracy after this step


@dataclass
class Report:
    recipe: dict[str, Any]  # name, description, source, steps with their complete parameters
    model: str  # what was compressed, e.g. "timm model 'poolformerv2_s12' (checkpoint ps.pth)"
    input_shape: tuple[int, ...]
    device: str
    data: str | None = None  # DataBundle.describe()
    notes: list[str] = field(default_factory=list)  # adaptations and warnings a reader must know
    before: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    side_by_side: dict[str, Any] | None = None  # before/after latency measured in one interleaved run
    seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def after(self) -> dict[str, Any]:
        """The model's figures after the last step."""
        return self.steps[-1].after if self.steps else self.before

    @property
    def speedup(self) -> float | None:
        """Original latency / compressed latency, from the side-by-side measurement (None if not measured)."""
        return None if self.side_by_side is None else self.side_by_side["speedup"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["after"] = self.after
        data["change"] = self.change()
        return data

    def change(self) -> dict[str, Any]:
        """Ratios and differences, before -> after."""
        b, a = self.before, self.after
        out: dict[str, Any] = {}
        for key in ("params", "macs"):
            if b.get(key) and a.get(key):
                out[f"{key}_ratio"] = a[key] / b[key]
        if self.side_by_side is not None:
            out["speedup"] = self.side_by_side["speedup"]
        elif b.get("latency_ms") and a.get("latency_ms"):
            out["speedup"] = b["latency_ms"] / a["latency_ms"]
        if b.get("accuracy") is not None and a.get("accuracy") is not None:
            out["accuracy_change"] = a["accuracy"] - b["accuracy"]
        if a.get("agreement") is not None:
            out["agreement"] = a["agreement"]
        return out

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``folder`` (atomically); returns their paths."""
        folder = Path(folder)
        json_path, md_path = folder / "report.json", folder / "report.md"
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path

    # ---------------------------------------------------------------------------------------------- markdown

    def to_markdown(self) -> str:
        r = self.recipe
        lines = [f"# Compression report: {r['name']}", ""]
        if r.get("description"):
            lines += [r["description"], ""]
        shape = "x".join(map(str, self.input_shape))
        lines += [f"- model: {self.model}", f"- recipe: {r.get('source', '')}",
                  f"- data: {self.data or 'none (no accuracy, no training)'}",
                  f"- input: {shape}, device {self.device}", f"- total time: {self.seconds:.1f} s", ""]
        if self.notes:
            lines += ["**Notes**", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += ["| | params | MACs | latency (spread) | accuracy | agreement | step time |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines.append(_row("before", self.before, None))
        for s in self.steps:
            lines.append(_row(f"{s.index}. {s.name}", s.after, s.seconds))
        lines.append("")
        lines += self._summary_lines()
        lines += ["", "## Steps", ""]
        for s in self.steps:
            params = ", ".join(f"{k}={_short(v)}" for k, v in s.params.items())
            figures = ", ".join(f"{k}={_short(v)}" for k, v in s.figures.items() if k not in _COLUMNS)
            lines.append(f"{s.index}. **{s.name}**({params})" + (f"  \n   reported: {figures}" if figures else ""))
        lines += ["", "Latency is the median of short interleaved rounds (on the CPU corrected by a reference workload "
                  "timed in the same rounds), with the spread of the rounds; "
                  "MACs are counted by torch's FlopCounterMode for one forward pass at the input above. "
                  "MACs are not latency: only measured speed-ups count.", ""]
        if self.environment:
            lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in self.environment.items() if v) + ".")
            lines.append("")
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        from searchspace.latency import format_ms

        b, a, change = self.before, self.after, self.change()
        out = []
        if self.side_by_side is not None:
            sbs = self.side_by_side
            out.append(f"**Before vs after, measured side by side in one run:** {format_ms(sbs['before_ms'])} -> "
                       f"{format_ms(sbs['after_ms'])}, **{sbs['speedup']:.2f}x** faster (spreads "
                       f"{sbs['before_spread']:.1%} / {sbs['after_spread']:.1%}), on {sbs['context']}.")
        if "params_ratio" in change:
            out.append(f"Params {_si(b['params'])} -> {_si(a['params'])} ({1 / change['params_ratio']:.2f}x fewer); "
                       f"MACs {_si(b.get('macs', 0))} -> {_si(a.get('macs', 0))}"
                       + (f" ({1 / change['macs_ratio']:.2f}x fewer)." if "macs_ratio" in change else "."))
        if "accuracy_change" in change:
            out.append(f"Accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f} "
                       f"({100 * change['accuracy_change']:+.2f} points).")
        if "agreement" in change:
            out.append(f"Agreement with the original model's top-1 class: {change['agreement']:.4f} of the "
                       f"validation images.")
        return out

    def summary(self) -> str:
        """A few lines for a terminal: the notes (a replaced classifier, unlabelled data), then the figures."""
        return "\n".join([f"Note: {n}" for n in self.notes] + self._summary_lines())


_COLUMNS = {"params", "macs", "latency_ms", "latency_spread", "latency_context", "accuracy", "agreement", "seconds"}


def _row(label: str, f: dict[str, Any], seconds: float | None) -> str:
    from searchspace.latency import format_ms

    latency = ""
    if f.get("latency_ms") is not None:
        latency = f"{format_ms(f['latency_ms'])} ({f.get('latency_spread', 0):.1%})"
    acc = "" if f.get("accuracy") is None else f"{f['accuracy']:.4f}"
    agree = "" if f.get("agreement") is None else f"{f['agreement']:.4f}"
    time = "" if seconds is None else f"{seconds:.1f} s"
    return (f"| {label} | {_si(f['params']) if 'params' in f else ''} | {_si(f['macs']) if 'macs' in f else ''} | "
            f"{latency} | {acc} | {agree} | {time} |")


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_short, v)) + "]"
    return str(v)


def environment() -> dict[str, Any]:
    from searchspace.latency import device_name

    return {"python": platform.python_version(), "torch": torch.__version__.split("+")[0],
            "cpu": device_name("cpu"), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
