"""The table's key and its file: one JSON file per key, written atomically under a lock, merged on every write."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..arch import Arch
from ..errors import MixerNASError
from ..runtimes import Runtime, get_runtime
from .cache import digest
from .measure import InputSpec, MeasurementError, RunOptions, device_name, resolve_device
from .parts import Part, part_from_dict, part_to_dict
from .predictor import IDENTITY, Calibration

# Bump when the file layout or the meaning of an entry changes; older files are then ignored.
# 6: parts timed on the thread clock are stored as measured, not corrected by the reference.
# 7: every batch is brought to the table's level by re-timed yardstick parts; the runtime is part of the key.
# 8: blocks, downsampling layers and heads are timed on the memory format their input has in the model.
# 9: runtimes that convert a traced model hold the random mixer's matrix and GPSA's offsets as constants.
# 10: whole models (the calibration's observations) are corrected by the two-model reference, in its anchor's unit.
TABLE_FORMAT = 10
MAX_OBSERVATIONS = 400  # whole-model measurements kept for the calibration (the newest)


@dataclass(frozen=True)
class TableKey:
    """What a table's numbers are valid for; each distinct key is its own file."""

    device: str  # "cpu" or "cuda" (the index does not matter, the model does)
    device_name: str  # CPU model from /proc/cpuinfo or the CUDA device name
    threads: int  # torch intra-op threads during measurement
    torch_version: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    runtime: str = "eager"  # what runs the parts and models (searchspace.runtimes), and its version
    runtime_version: str = ""
    options: str = ""  # the RunOptions that are on, "+"-joined: "channels_last+cudnn_benchmark"

    def filename(self) -> str:
        size = f"{self.height}x{self.width}-b{self.batch}-{self.dtype}"
        return f"latency-{self.device}-{self.runtime}-{size}-{digest(asdict(self))}.json"

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.batch, self.channels, self.height, self.width, self.dtype)


def table_key(device: str, input_spec: InputSpec, threads: int | None, runtime: str | Runtime | None = None,
              options: RunOptions | None = None) -> TableKey:
    """The key of the table for these settings (device fingerprint, threads, torch version, input, runtime and
    its version); a runtime that is missing or does not run on ``device`` raises here."""
    if not isinstance(input_spec, InputSpec) or input_spec.layout != "nchw":
        raise MeasurementError(f"a latency table needs an 'nchw' InputSpec, got {input_spec!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MeasurementError(f"threads must be a positive integer or None, got {threads!r}")
    dev = resolve_device(device)
    info = get_runtime(runtime).check(dev)
    return TableKey(device=dev.type, device_name=device_name(dev),
                    threads=threads if threads is not None else torch.get_num_threads(),
                    torch_version=torch.__version__.split("+")[0], batch=input_spec.batch,
                    channels=input_spec.channels, height=input_spec.height, width=input_spec.width,
                    dtype=input_spec.dtype, runtime=info.name, runtime_version=info.version,
                    options="+".join((options or RunOptions()).tags()))


@dataclass(frozen=True)
class Observation:
    """A whole model measured for real on this table's key: what the calibration is fitted on."""

    arch: Arch
    ms: float


@dataclass
class TableData:
    """What one table file holds."""

    entries: dict[Part, float] = field(default_factory=dict)
    calibration: Calibration = IDENTITY
    observations: list[Observation] = field(default_factory=list)


def read_table(path: Path, key: TableKey) -> TableData:
    """The data stored in ``path``; a missing, foreign or damaged file reads as empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TableData()
    except OSError as exc:
        raise MixerNASError(f"cannot read latency table {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        if data.get("format") != TABLE_FORMAT or data.get("key") != asdict(key):
            return TableData()
        entries = {part_from_dict(e["part"]): float(e["ms"]) for e in data["entries"]}
        calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") else IDENTITY
        observations = [Observation(Arch.from_dict(o["arch"]), float(o["ms"])) for o in data.get("observations", [])]
    except (ValueError, KeyError, TypeError, AttributeError, MixerNASError) as exc:
        warnings.warn(f"latency table {path} is damaged ({exc!r}); it will be measured again", stacklevel=3)
        return TableData()
    return TableData(entries, calibration, observations)


def write_table(path: Path, key: TableKey, data: TableData, protocol: Any = None,
                reference: Mapping[str, Any] | None = None) -> None:
    rows = [{"part": part_to_dict(p), "ms": ms} for p, ms in data.entries.items()]
    rows.sort(key=lambda r: json.dumps(r["part"], sort_keys=True))
    observations: Sequence[Observation] = data.observations[-MAX_OBSERVATIONS:]
    payload = {"format": TABLE_FORMAT, "key": asdict(key),
               "calibration": data.calibration.to_dict() if data.calibration.models else None,
               "protocol": asdict(protocol) if protocol is not None else None,  # for the record: not part of the key
               "reference": dict(reference) if reference else None,  # the anchor the entries are expressed in
               "observations": [{"arch": o.arch.to_dict(), "ms": o.ms} for o in observations],
               "entries": rows}
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
