"""PNG plots of a search: accuracy against measured latency, and the optimisation history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def accuracy_vs_latency(path: Path, rows: list[dict[str, Any]], *, budget_ms: float, metric: str,
                        best: dict[str, Any] | None, baselines: list[dict[str, Any]],
                        front: list[dict[str, Any]] | None = None) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r.get("measured_ms") is not None and r.get(metric) is not None]
    inside = [r for r in done if r["measured_ms"] <= budget_ms]
    outside = [r for r in done if r["measured_ms"] > budget_ms]
    if inside:
        ax.scatter([r["measured_ms"] for r in inside], [r[metric] for r in inside], s=18, c="tab:blue",
                   label="candidates within budget")
    if outside:
        ax.scatter([r["measured_ms"] for r in outside], [r[metric] for r in outside], s=18, c="tab:gray",
                   alpha=0.5, label="candidates over budget")
    if front:
        pts = sorted((r["measured_ms"], r[metric]) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", c="tab:green", lw=1, label="Pareto front")
    for b in baselines:
        if b.get("measured_ms") is not None and b.get(metric) is not None:
            ax.scatter([b["measured_ms"]], [b[metric]], marker="s", s=40, c="tab:orange")
            ax.annotate(b["name"], (b["measured_ms"], b[metric]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    if best is not None and best.get("search_" + metric) is not None:
        ax.scatter([best["latency_ms"]], [best["search_" + metric]], marker="*", s=180, c="tab:red",
                   label="winner", zorder=5)
    ax.axvline(budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("validation accuracy" if metric == "accuracy" else "proxy score")
    ax.set_title("Candidates, presets (squares) and the winner")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    plt.close(fig)


def history(path: Path, rows: list[dict[str, Any]], *, metric: str, budget_ms: float) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows = sorted(rows, key=lambda r: r["trial"])
    feasible = [r for r in rows if r.get(metric) is not None and r.get("measured_ms") is not None
                and r["measured_ms"] <= budget_ms and r["state"] == "complete"]
    ax.scatter([r["trial"] for r in feasible], [r[metric] for r in feasible], s=14, c="tab:blue",
               label="feasible trial")
    best, xs, ys = None, [], []
    for r in rows:
        if r in feasible and (best is None or r[metric] > best):
            best = r[metric]
        if best is not None:
            xs.append(r["trial"])
            ys.append(best)
    ax.step(xs, ys, where="post", c="tab:red", label="best so far")
    others = [r["trial"] for r in rows if r not in feasible]
    if others:
        low = min([r[metric] for r in feasible], default=0.0)
        ax.scatter(others, [low] * len(others), marker="x", s=12, c="tab:gray",
                   label="screened / over budget / pruned / failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("Optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    plt.close(fig)
