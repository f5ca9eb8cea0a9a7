"""report.md: the search told in a page."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..arch import Arch
from ..latency import format_ms, resolve_device


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_report(result, metric: str) -> str:
    """The page for a :class:`~searchspace.nas.engine.SearchResult`, ranked by ``metric``."""
    cfg, rows, best = result.config, result.trials, result.best
    states = Counter(r["state"] for r in rows)
    device = resolve_device(cfg.device)  # what "auto" stands for here
    lines = [
        "# MixerNAS search report",
        "",
        f"- budget: **{format_ms(cfg.budget_ms)}** measured latency, batch {cfg.batch_size}, device {device}",
        f"- space: `{cfg.space}`; evaluator: {cfg.evaluator}; objective: {cfg.objective}; backend: {cfg.backend}",
        f"- trials: {len(rows)} finished (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")",
        "",
        "States: *screened* = predicted by the latency table to be over budget, not built; *infeasible* = measured "
        "over budget, not trained; *pruned* = stopped early by the pruner; *failed* = an error (see trials.csv).",
        "",
    ]
    if result.interrupted:
        lines += ["**The search was interrupted**; run the same command again to resume it.", ""]
    if best is not None:
        lines += [
            "## Winner",
            "",
            f"`{best['summary']}`" + _preset_note(best),
            "",
            f"- validation accuracy after {best['final_epochs']} epochs: **{best['accuracy']:.4f}** "
            f"(during the search: {_fmt(best.get('search_' + metric))} {metric})",
            f"- measured latency: **{format_ms(best['latency_ms'])}** {_interval(best)} on "
            f"{best['device_name']}, {best['threads']} thread(s), input {best['input_size']}x{best['input_size']}, "
            f"batch {best['batch_size']}, {best['dtype']}",
            f"- parameters: {_fmt(best.get('params'))}; MACs: {_fmt(best.get('macs'))} (torch FlopCounterMode)",
            "- files: `best.json`, `best/arch.json`, `best/model.safetensors` "
            "(`searchspace.load_model(folder)` rebuilds it)",
            "",
        ]
    fitting = [b for b in result.baselines if b["state"] == "complete"]
    if result.baselines:
        lines += ["## Presets at this input (same evaluator)", "",
                  "Presets that are points of the space were the search's first trials; the others were evaluated "
                  "beside it.", "",
                  f"| preset | evaluated as | state | {metric} | measured latency | params |",
                  "|---|---|---|---|---|---|"]
        for b in sorted(result.baselines, key=lambda b: (b["state"] != "complete", -(b.get(metric) or 0))):
            lat = format_ms(b["measured_ms"]) if b.get("measured_ms") else (
                f"~{format_ms(b['predicted_ms'])} predicted" if b.get("predicted_ms") else "-")
            how = "beside the search" if b.get("trial") is None else f"trial {b['trial']}"
            lines.append(f"| {b['name']} | {how} | {b['state']} | {_fmt(b.get(metric))} | {lat} | "
                         f"{_fmt(b.get('params'))} |")
        if not fitting:
            lines += ["", "No preset fits the budget at this input."]
        lines.append("")
    top = sorted((r for r in rows if r["state"] == "complete" and r.get(metric) is not None),
                 key=lambda r: -r[metric])[:10]
    if top:
        lines += ["## Best trials", "", f"| trial | {metric} | measured latency | params | architecture |",
                  "|---|---|---|---|---|"]
        for r in top:
            lat = format_ms(r["measured_ms"]) if r.get("measured_ms") else "-"
            lines.append(f"| {r['trial']} | {_fmt(r[metric])} | {lat} | {_fmt(r.get('params'))} | "
                         f"`{Arch.from_json(r['arch']).summary()}` |")
        lines.append("")
    lines += ["![accuracy vs latency](accuracy_vs_latency.png)", "", "![history](history.png)", ""]
    return "\n".join(lines)


def _preset_note(best: dict) -> str:
    """What the report says when a preset won: one of the search's trials, or one evaluated beside it."""
    if not best.get("preset"):
        return ""
    if best.get("trial") is None:
        return f": the preset **{best['preset']}**, evaluated like the trials, beat every searched candidate"
    return f": the preset **{best['preset']}** (trial {best['trial']}, a point of the space) beat every other trial"


def _interval(best: dict) -> str:
    """``(+-1.2%, 95% interval 4.61 ms to 4.72 ms)``; older results without an interval show their spread."""
    interval = best.get("latency_interval_ms")
    if not interval:
        return f"(spread {best.get('latency_spread', 0.0):.1%})"
    return (f"(+-{best['latency_precision']:.1%}, 95% interval {format_ms(interval[0])} to "
            f"{format_ms(interval[1])})")
