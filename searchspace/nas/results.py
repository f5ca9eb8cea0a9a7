"""The results folder: files a person can read and a program can reload.

```
<out>/config.json       the search's settings (a re-run with the same settings resumes)
<out>/study.db          Optuna storage (unless --storage points elsewhere)
<out>/trials.csv        every trial: parameters, arch, predicted and measured latency, accuracy, params, MACs, state,
                        and the preset's name for the first trials, the presets that are points of the space
<out>/pareto.csv        the accuracy/latency front (Pareto objective)
<out>/baselines.json    the other presets, evaluated beside the search the same way
<out>/best.json         the winner: arch, accuracy, latency_ms, input_size, batch_size, device, budget_ms, environment
<out>/best/arch.json    the winner's architecture, and best/model.safetensors its trained weights
<out>/accuracy_vs_latency.png, history.png, report.md
```
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_bytes, atomic_write_text
from ..arch import Arch
from ..errors import MixerNASError
from ..latency import device_name
from ..model import build_model


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": device_name("cpu"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def save_model(folder: Path, model: torch.nn.Module, arch: Arch, *, num_classes: int, in_chans: int,
               extra: dict[str, Any] | None = None) -> None:
    """Architecture + tensors, loadable without unpickling code (safetensors)."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    arch.save(folder / "arch.json")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"num_classes": str(num_classes), "in_chans": str(in_chans), "format": "mixernas-1"}
    atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata=meta))
    write_json(folder / "model.json", {"num_classes": num_classes, "in_chans": in_chans, **(extra or {})})


def load_model(folder: str | Path, map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild a search's best model with its weights: ``load_model("runs/default-5ms")``.

    Accepts the results folder or its ``best`` sub-folder.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "best" / "arch.json").exists():
        folder = folder / "best"
    arch_path, weights = folder / "arch.json", folder / "model.safetensors"
    if not arch_path.exists() or not weights.exists():
        raise MixerNASError(f"{folder} has no saved model (arch.json and model.safetensors); pass a search's "
                            f"results folder")
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        num_classes, in_chans = int(meta["num_classes"]), int(meta["in_chans"])
    except (KeyError, ValueError):
        raise MixerNASError(f"{weights} lacks the num_classes/in_chans metadata MixerNAS writes") from None
    model = build_model(Arch.load(arch_path), num_classes=num_classes, in_chans=in_chans)
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MixerNASError(f"{weights} does not match {arch_path}: {len(missing)} missing and {len(unexpected)} "
                            f"unexpected tensors (e.g. {(missing or unexpected)[0]})")
    return model.eval()
