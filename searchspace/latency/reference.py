"""The reference workload: two fixed models timed in the same rounds as every CPU measurement, to take out drift.

Why: on a small shared CPU the speed of the machine itself moves, by far more than the differences a search has to
see. Measured on a 2-core AMD EPYC VM with another process busy on the second core, the same four default-space
models at 32x32, timed back to back in one process on the thread clock, moved 10-12% between measurements (mean
pairwise difference of the median of ten 50 ms rounds; 13-20% for the lowest round median). The slowdown is shared:
the cores share caches, memory bandwidth and, on a VM, the host. Timing a fixed model in the same rounds and
keeping the median of the per-round ratios took that to 2-3.5% with 30 rounds of 10 ms, 6-7% with 10 rounds of
50 ms: the shorter the rounds, the closer in time the model and the reference run, the better the ratio cancels.

So a CPU latency is ``median over rounds of (model's mean run / reference's mean run) x anchor``, where the
*anchor* is the reference's latency on this machine, measured once at length and kept in the cache folder per
(CPU model, threads, torch version, input). Every whole-model figure on this machine is then in the same unit,
whatever the machine was doing while it was taken. The anchor's own uncertainty is stated with it.

The reference is a pair of small MetaFormers of the default space's kinds (separable conv, pooling, modulation,
attention), so it leans on the machine the way the candidates do: a *light* one (:data:`REFERENCE_ARCH`, a few MB
of weights) and a *heavy* one (:data:`HEAVY_REFERENCE_ARCH`, the same stages wider: tens of MB, more than any
cache, as the larger candidates). Each reference run times both, and its value is the geometric mean of the two
times (the anchor is the same mean of their latencies). Over minutes the machine's level moves, and the candidates
move in between the two: corrected by the light one alone they moved against the machine, by the heavy one alone
with it (``bench/reference_mix.py``; README.md gives the figures).

What it does not correct: work that keeps its data in the core's caches. The latency table's parts are small,
and when the machine slows on the memory side the reference slows and they do not; on the thread clock they are
taken as measured, and the reference, timed alone after each batch of them, only tells whether the machine was
busy (``PartProtocol``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_text
from ..arch import Arch, Stage
from ..model import build_model
from .cache import digest, latency_dir, locked

ANCHOR_FORMAT = 2  # 1: the light reference alone
REFERENCE_ARCH = Arch(
    stages=(
        Stage(mixer="sepconv", depth=1, width=32, mlp_ratio=4.0),
        Stage(mixer="pooling", depth=1, width=64, mlp_ratio=4.0),
        Stage(mixer="modulation", depth=2, width=128, mlp_ratio=4.0),
        Stage(mixer="attention", depth=1, width=256, mlp_ratio=4.0),
    ),
    name="reference",
)
HEAVY_REFERENCE_ARCH = Arch(
    stages=tuple(Stage(mixer=s.mixer, depth=depth, width=width, mlp_ratio=s.mlp_ratio)
                 for s, depth, width in zip(REFERENCE_ARCH.stages, (1, 1, 2, 2), (64, 128, 320, 512))),
    name="heavy-reference",
)


def reference_models(in_chans: int) -> tuple[nn.Module, nn.Module]:
    """The reference workload for inputs of ``in_chans`` channels: the light and the heavy model, with fixed
    weights (seeded, RNG state kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tuple(build_model(arch, num_classes=10, in_chans=in_chans).eval()
                     for arch in (REFERENCE_ARCH, HEAVY_REFERENCE_ARCH))


@dataclass(frozen=True)
class Anchor:
    """The reference workload's latency on this machine, for one key (CPU, threads, torch, input)."""

    ms: float  # geometric mean of the two workloads' latencies (each the median of its round medians)
    ci_low_ms: float  # the same mean of their intervals' bounds (order statistics of the round medians)
    ci_high_ms: float
    rounds: int
    measured_at: float  # time.time() when measured

    @property
    def precision(self) -> float:
        return max(self.ms - self.ci_low_ms, self.ci_high_ms - self.ms) / self.ms


@dataclass(frozen=True)
class Reference:
    """A reference in use: which input it runs on and its anchor (see the module docstring)."""

    key: Mapping[str, Any]
    anchor: Anchor
    in_chans: int

    def modules(self) -> tuple[nn.Module, nn.Module]:
        return reference_models(self.in_chans)


def anchor_path(key: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    k = dict(key)
    size = k["input"]
    return latency_dir(cache_dir) / f"reference-{size['height']}x{size['width']}-b{size['batch']}-{digest(k)}.json"


def read_anchor(key: Mapping[str, Any], cache_dir: str | Path | None = None) -> Anchor | None:
    """The stored anchor of ``key``, or None (missing, foreign or damaged files read as missing)."""
    try:
        data = json.loads(anchor_path(key, cache_dir).read_text(encoding="utf-8"))
        if data.get("format") != ANCHOR_FORMAT or data.get("key") != dict(key):
            return None
        return Anchor(**data["anchor"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_anchor(key: Mapping[str, Any], anchor: Anchor, cache_dir: str | Path | None = None) -> Anchor:
    """Store ``anchor`` unless another process stored one first; returns the anchor now on disk."""
    path = anchor_path(key, cache_dir)
    with locked(path):
        existing = read_anchor(key, cache_dir)
        if existing is not None:
            return existing
        archs = [REFERENCE_ARCH.to_dict(), HEAVY_REFERENCE_ARCH.to_dict()]
        atomic_write_text(path, json.dumps({"format": ANCHOR_FORMAT, "key": dict(key), "anchor": asdict(anchor),
                                            "archs": archs}, indent=1) + "\n")
    return anchor


def forget_anchor(key: Mapping[str, Any], cache_dir: str | Path | None = None) -> None:
    path = anchor_path(key, cache_dir)
    with locked(path):
        path.unlink(missing_ok=True)
