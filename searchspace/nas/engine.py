"""The search: from a configuration to a results folder (see :mod:`searchspace.nas.results`)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..arch import Arch
from ..data import load_data
from ..errors import MixerNASError
from ..evaluators import TrainEvaluator, ZeroCostEvaluator
from ..export import export_model
from ..latency import InputSpec, LatencyTable, format_ms, measure_many, parse_budget, resolve_device
from ..latency.measure import RunOptions, default_dtype
from ..presets import list_presets, preset
from ..runtimes import get_runtime
from ..space import get_space
from . import nni_backend, optuna_backend, plots, ray_backend
from .candidate import CandidateRunner, Outcome, arch_model
from .config import SearchConfig, load_saved_config
from .report import render_report
from .results import environment, load_model, save_model, write_csv, write_json
from .storage import open_storage

FINALISTS = 5  # best candidates re-measured side by side before the winner is chosen
# Each backend module imports its engine (Ray, NNI) only when it runs, so all three are imported here.
BACKENDS = {"optuna": optuna_backend, "ray": ray_backend, "nni": nni_backend}


class NoArchitectureFits(MixerNASError):
    """The budget is below every candidate's measured latency; the message suggests a budget that can be met."""


@dataclass
class SearchResult:
    """What :func:`search` returns; every field is also in the results folder."""

    out_dir: Path
    config: SearchConfig
    best: dict[str, Any] | None  # as in best.json; None when nothing fits or the search was interrupted early
    trials: list[dict[str, Any]] = field(default_factory=list)
    # How each preset compared did (name, state, metric, latency, params): a trial of the search when the preset is
    # a point of the space (``trial`` its number), else evaluated beside the search (``trial`` None)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def arch(self) -> Arch | None:
        return None if self.best is None else Arch.from_dict(self.best["arch"])

    def load_model(self) -> torch.nn.Module:
        return load_model(self.out_dir)


def search(latency_budget: str | float = "5ms", **options: Any) -> SearchResult:
    """Find the most accurate architecture whose measured latency fits ``latency_budget``.

    ``latency_budget`` is a string such as ``"5ms"`` or ``"500us"``, or a number of milliseconds; ``options`` are
    the fields of :class:`SearchConfig` (``space``, ``data``, ``trials``, ``timeout_s``, ``out``, ...)::

        result = searchspace.search("5ms", trials=20, out="runs/demo")
        result.best["accuracy"], result.best["latency_ms"]
        model = result.load_model()
    """
    budget_ms = parse_budget(latency_budget) if isinstance(latency_budget, str) else float(latency_budget)
    progress = options.pop("progress", False)
    return run(SearchConfig(budget_ms=budget_ms, **options), progress=progress)


def run(config: SearchConfig, progress: bool = True, echo: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) the search described by ``config``; see :func:`search`."""
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    out = config.out_dir
    saved = load_saved_config(out)
    if saved is not None:
        config.check_resumable(saved.get("search", {}))

    device = str(resolve_device(config.device))  # "auto" becomes "cuda:0" or "cpu"
    # Latency is measured with a fixed thread count: the one asked for, else one thread on the CPU (the most
    # repeatable figure on a shared machine; pass --threads to match your deployment).
    threads = config.threads or (1 if device == "cpu" else None)
    get_runtime(config.runtime).check(device)  # installed and runs on this device, before any folder is written
    if config.storage:  # a database that cannot be reached is reported now, not after the latency table is built
        open_storage(config.storage).remove_session()
    options = RunOptions.for_device(device, channels_last=config.channels_last, cuda_graphs=config.cuda_graphs,
                                    cudnn_benchmark=config.cudnn_benchmark)
    data = load_data(config.data, input_size=config.input_size, seed=config.seed)
    spec = InputSpec(batch=config.batch_size, channels=data.in_chans, height=data.input_size,
                     width=data.input_size, dtype=config.dtype or default_dtype(device))
    space = get_space(config.space)
    # written once the device, data and space are known to be good, so bad input leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"search": config.to_dict(), "environment": environment()})
    echo(f"MixerNAS: searching space {space.name!r} for the most accurate model within "
         f"{format_ms(config.budget_ms)} on {device} ({config.runtime}) at {data.input_size}x{data.input_size}, batch "
         f"{config.batch_size}; data: {data.describe()}; results in {out}")

    predictor = _latency_table(space, spec, device, threads, data.num_classes, progress, echo, config.runtime,
                               options)
    evaluator = make_evaluator(config, device)
    runner = CandidateRunner(budget_ms=config.budget_ms, predictor=predictor, evaluator=evaluator, data=data,
                             input_spec=spec, device=device, threads=threads, runtime=config.runtime,
                             options=options)

    rows, interrupted = BACKENDS[config.backend].run_study(config, space, runner, progress=progress, echo=echo)
    write_csv(out / "trials.csv", rows)
    if predictor is not None:
        predictor.refresh()
        echo(f"latency table, refined by this search's measurements: {predictor.calibration}")

    metric = "accuracy" if config.evaluator == "train" else "score"
    result = SearchResult(out_dir=out, config=config, best=None, trials=rows, baselines=_preset_trials(rows),
                          interrupted=interrupted)
    if interrupted:
        echo(f"interrupted: {len(rows)} finished trials are in {out / 'trials.csv'}; run the same command to resume")
        _write_report(result, metric)
        return result

    # Presets that are points of the space were the study's first trials; the others are evaluated the same way
    # beside it, and one that fits can win too.
    beside = _baselines(config, runner, out, metric, echo, done={b["name"] for b in result.baselines})
    result.baselines += beside
    winner = _choose_winner(rows + _preset_candidates(beside), runner, metric, config.budget_ms, echo)
    if winner is None:
        _write_report(result, metric)
        _plots(result, metric)
        raise NoArchitectureFits(_nothing_fits_message(rows, config))

    result.best = _final(config, winner, data, device, spec, out, metric, echo)
    write_json(out / "best.json", result.best)
    if config.objective == "pareto":
        write_csv(out / "pareto.csv", pareto_front(rows, metric, config.budget_ms))
    _plots(result, metric)
    _write_report(result, metric)
    return result


# ---------------------------------------------------------------------------------------------------- pieces


def make_evaluator(config: SearchConfig, device: str):
    if config.evaluator == "train":
        kwargs = {"epochs": config.epochs} if config.epochs else {}
        return TrainEvaluator(seed=config.seed, device=device, threads=config.train_threads, **kwargs)
    return ZeroCostEvaluator(seed=config.seed, device=device, threads=config.train_threads)


def _latency_table(space, spec: InputSpec, device: str, threads: int | None, num_classes: int, progress: bool,
                   echo, runtime: str = "eager", options: RunOptions | None = None):
    """The device's lookup table, calibrated on a few whole models when it is new to this device and input (with
    its held-out accuracy printed, so the user knows what its screening is worth); parts a candidate needs are
    measured on first use and cached, and every candidate measured refines the calibration."""
    table = LatencyTable.open(device=device, input_spec=spec, threads=threads, num_classes=num_classes,
                              runtime=runtime, options=options)
    echo(f"latency table: {len(table)} parts and {len(table.observations)} whole models cached for this device "
         f"and input ({table.path})")
    try:
        calibration = table.ensure_calibrated(space, progress=progress)
    except MixerNASError as exc:  # a define-by-run space the table cannot draw from: calibrate on the trials
        echo(f"latency table: not calibrated before the search ({exc}); the trials' measurements will do it")
        return table
    echo(f"latency table prediction on this machine: {calibration}")
    return table


BASELINE_FIELDS = ("state", "accuracy", "score", "predicted_ms", "measured_ms", "params", "macs")


def _preset_trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that were presets, as baseline rows (``name``, ``trial`` and the outcome's fields)."""
    return [{"name": r["preset"], "trial": r["trial"], **{k: r.get(k) for k in BASELINE_FIELDS}}
            for r in rows if r.get("preset")]


def _preset_candidates(baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete presets evaluated beside the search, in the shape of trial rows (``trial`` None, ``preset`` their
    name)."""
    return [{**b, "trial": None, "preset": b["name"], "arch": preset(b["name"]).to_json()}
            for b in baselines if b["state"] == "complete"]


def candidate_label(row: dict[str, Any]) -> str:
    """``trial 12``, ``trial 0: preset PoolFormerV2-S12`` (a preset that is a point of the space) or ``preset
    EfficientMod-xs`` (one evaluated beside the search)."""
    if row.get("preset") is None:
        return f"trial {row['trial']}"
    return f"preset {row['preset']}" if row.get("trial") is None else f"trial {row['trial']}: preset {row['preset']}"


def _choose_winner(rows, runner: CandidateRunner, metric: str, budget_ms: float, echo) -> dict[str, Any] | None:
    """Re-measure the best few candidates side by side; the winner is the best whose latency still fits."""
    ok = [r for r in rows if r["state"] == "complete" and r.get(metric) is not None
          and r.get("measured_ms") is not None and r["measured_ms"] <= budget_ms]
    ok.sort(key=lambda r: (-r[metric], r["measured_ms"]))
    finalists = ok[:FINALISTS]
    if not finalists:
        return None
    archs = [Arch.from_json(r["arch"]) for r in finalists]
    models = [arch_model(a, runner.data) for a in archs]
    results = measure_many(models, runner.input_spec, device=runner.device, threads=runner.threads,
                           timer=runner.timer, runtime=runner.runtime, **runner.options.kwargs())
    for r, m in zip(finalists, results):
        r["final_ms"], r["final_spread"], r["context"] = m.value_ms, m.spread, m.context
        r["final_interval_ms"], r["final_precision"] = [m.ci_low_ms, m.ci_high_ms], m.precision
        echo(f"finalist {candidate_label(r)}: {metric} {r[metric]:.4f}, re-measured {m.describe()}")
    fitting = [r for r in finalists if r["final_ms"] <= budget_ms]
    return fitting[0] if fitting else None


def _nothing_fits_message(rows, config: SearchConfig) -> str:
    lat = sorted((r.get("measured_ms") or r.get("predicted_ms"), r["trial"]) for r in rows
                 if (r.get("measured_ms") or r.get("predicted_ms")) is not None)
    if not lat:
        return (f"no trial finished, so nothing is known to fit {format_ms(config.budget_ms)}; "
                f"see {config.out_dir / 'trials.csv'} for the errors")
    closest = ", ".join(f"trial {t} at {format_ms(ms)}" for ms, t in lat[:3])
    suggestion = _round_up(lat[0][0] * 1.2)
    return (f"no architecture fits {format_ms(config.budget_ms)} on this device; the fastest candidates were "
            f"{closest}; try --latency-budget {suggestion}")


def _round_up(ms: float) -> str:
    if ms < 1:
        return f"{math.ceil(ms * 100) * 10}us"
    digits = 10 ** max(0, math.floor(math.log10(ms)) - 1)
    return f"{math.ceil(ms / digits) * digits:g}ms"


def _baselines(config: SearchConfig, runner: CandidateRunner, out: Path, metric: str, echo,
               done: set[str] = frozenset()) -> list[dict]:
    """The presets compared with the search that are not among its trials (``done``), evaluated exactly like the
    trials (cached in baselines.json for resumes)."""
    path = out / "baselines.json"
    cache: dict[str, dict] = {}
    if path.exists():
        cache = {b["name"]: b for b in json.loads(path.read_text())}
    rows = []
    for name in list_presets() if config.baselines is None else config.baselines:
        if name in done:
            continue
        if name in cache:
            rows.append(cache[name])
            continue
        arch = preset(name)
        try:
            outcome = runner.run(arch)
        except MixerNASError as exc:
            outcome = Outcome(arch=arch, state="failed", error=str(exc))
        row = {"name": name, "trial": None, **{k: getattr(outcome, k) for k in BASELINE_FIELDS}}
        if outcome.state == "complete":
            echo(f"baseline {name}: {metric} {row[metric]:.4f} at {format_ms(outcome.measured_ms)}")
        rows.append(row)
        write_json(path, rows)
    return rows


def _final(config: SearchConfig, winner: dict, data, device: str, spec: InputSpec, out: Path, metric: str,
           echo) -> dict[str, Any]:
    """Train the winner longer, save it, and describe it in best.json."""
    arch = Arch.from_json(winner["arch"])
    base_epochs = config.epochs or TrainEvaluator().epochs
    epochs = config.final_epochs or 4 * base_epochs
    echo(f"training the winner ({candidate_label(winner)}) for {epochs} epochs")
    trainer = TrainEvaluator(epochs=epochs, seed=config.seed, device=device, threads=config.train_threads)
    model, ev = trainer.train(arch, data)
    ctx = winner["context"]
    best = {
        "arch": arch.to_dict(),
        "summary": arch.summary(),
        "trial": winner["trial"],  # None when a preset evaluated beside the search won
        "preset": winner.get("preset"),  # the preset's name when the winner is one
        "accuracy": ev.accuracy,
        "search_" + metric: winner[metric],
        "latency_ms": winner["final_ms"],
        "latency_spread": winner["final_spread"],
        "latency_interval_ms": winner["final_interval_ms"],  # 95% confidence interval of latency_ms
        "latency_precision": winner["final_precision"],  # its relative half-width
        "budget_ms": config.budget_ms,
        "fits": winner["final_ms"] <= config.budget_ms,
        "input_size": data.input_size,
        "batch_size": config.batch_size,
        "device": device,
        "device_name": ctx.device_name,
        "threads": ctx.threads,
        "dtype": ctx.dtype,
        "runtime": ctx.runtime,  # what ran it: "onnxruntime 1.32.0 (CPUExecutionProvider)"
        "params": winner.get("params"),
        "macs": winner.get("macs"),
        "final_epochs": epochs,
        "data": data.describe(),
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "environment": environment(),
    }
    save_model(out / "best", model.cpu(), arch, num_classes=data.num_classes, in_chans=data.in_chans,
               extra={"accuracy": ev.accuracy, "latency_ms": winner["final_ms"]})
    best["onnx"] = _export_onnx(model.cpu(), spec, out / "best" / "model.onnx", echo)
    return best


def _export_onnx(model, spec: InputSpec, path: Path, echo) -> str | None:
    """``best/model.onnx`` when the onnx extra is installed (checked against PyTorch); the file's name, or None."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        return None
    try:
        result = export_model(model, InputSpec(spec.batch, spec.channels, spec.height, spec.width), "onnx", path,
                              measure=False)
    except MixerNASError as exc:  # the winner stands; its ONNX file is a convenience
        echo(f"best/model.onnx not written: {exc}")
        return None
    echo(f"exported {result}")
    return path.name


def pareto_front(rows, metric: str, budget_ms: float) -> list[dict[str, Any]]:
    """Complete trials not dominated in (higher metric, lower measured latency)."""
    pts = [r for r in rows if r["state"] == "complete" and r.get(metric) is not None and r.get("measured_ms")]
    pts.sort(key=lambda r: (r["measured_ms"], -r[metric]))
    front, best = [], -math.inf
    for r in pts:
        if r[metric] > best:
            front.append(r)
            best = r[metric]
    return front


def _plots(result: SearchResult, metric: str) -> None:
    cfg = result.config
    front = pareto_front(result.trials, metric, cfg.budget_ms) if cfg.objective == "pareto" else None
    plots.accuracy_vs_latency(result.out_dir / "accuracy_vs_latency.png", result.trials, budget_ms=cfg.budget_ms,
                              metric=metric, best=result.best, baselines=result.baselines, front=front)
    plots.history(result.out_dir / "history.png", result.trials, metric=metric, budget_ms=cfg.budget_ms)


def _write_report(result: SearchResult, metric: str) -> None:
    atomic_write_text(result.out_dir / "report.md", render_report(result, metric))
