#!/usr/bin/env python
"""Search quality on the built-in digits: TPE vs random search vs the best preset that fits, at equal trials.

For each seed, TPE and random search each run the same number of trials of the same space under the same latency
budget (their own results folders under --out), and the presets that fit the budget are trained with the same
evaluator. Printed: best feasible search-time accuracy per method and seed, their means, and TPE's win count.

Then the zero-cost proxies: every architecture these searches trained to the end (complete trials, distinct
architectures) is scored at initialisation by synflow, NASWOT, grad-norm and the parameter count, and each score's
Spearman rank correlation with the trained accuracy is printed (a proxy is only worth using if it beats the
parameter count). The architectures come from the searches, so they lean towards the budget and, for TPE, towards
good regions; ``bench/proxies.py`` does the same on uniformly drawn architectures, with a second training seed
as the noise ceiling.

    python bench/search_quality.py --budget 5ms --trials 20 --seeds 3 --epochs 2     # ~40-60 min on 2 cores

Last line: key=value figures.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_feasible(rows: list[dict], budget_ms: float) -> float | None:
    values = [r["accuracy"] for r in rows if r["state"] == "complete" and r.get("accuracy") is not None
              and r.get("measured_ms") is not None and r["measured_ms"] <= budget_ms]
    return max(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="2ms", help="latency budget with its unit (default: 2ms)")
    p.add_argument("--trials", type=int, default=20, help="trials per method and seed; TPE samples at random for "
                   "its first max(4, trials // 6) (default: 20)")
    p.add_argument("--seeds", type=int, default=3, help="(default: 3)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per trial (default: 2)")
    p.add_argument("--space", default="default")
    p.add_argument("--out", default="runs/bench-search-quality", help="scratch folder (removed first)")
    p.add_argument("--skip-proxies", action="store_true", help="leave out the zero-cost proxy correlations")
    args = p.parse_args(argv)

    from searchspace.latency import parse_budget
    from searchspace.nas import SearchConfig, run
    from searchspace.nas.engine import NoArchitectureFits

    budget = parse_budget(args.budget)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results: dict[str, list[float | None]] = {"tpe": [], "random": [], "preset": []}
    trained: dict[str, float] = {}  # arch JSON -> accuracy of every complete trial
    for seed in range(args.seeds):
        for sampler in ("tpe", "random"):
            config = SearchConfig(budget_ms=budget, space=args.space, trials=args.trials, timeout_s=None,
                                  epochs=args.epochs, final_epochs=1, sampler=sampler, seed=seed, threads=1,
                                  baselines=() if sampler == "random" or seed else None,
                                  out=str(out / f"{sampler}-{seed}"))
            try:
                result = run(config, progress=False, echo=lambda m: None)
                rows, baselines = result.trials, result.baselines
            except NoArchitectureFits:
                rows, baselines = [], []
            results[sampler].append(best_feasible(rows, budget))
            for r in rows:
                if r["state"] == "complete" and r.get("accuracy") is not None and r.get("arch"):
                    trained.setdefault(r["arch"], r["accuracy"])
            if sampler == "tpe" and seed == 0:
                fitting = [b["accuracy"] for b in baselines if b["state"] == "complete" and b.get("accuracy")]
                results["preset"] = [max(fitting)] if fitting else [None]
            print(f"seed {seed} {sampler:6s}: best feasible accuracy {results[sampler][-1]}", flush=True)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else float("nan")

    pairs = list(zip(results["tpe"], results["random"]))
    wins = sum(1 for t, r in pairs if t is not None and (r is None or t > r))
    ties = sum(1 for t, r in pairs if t == r)
    print()
    print(f"{'method':8s} {'mean best feasible accuracy':>28s}   per seed")
    for name in ("tpe", "random", "preset"):
        print(f"{name:8s} {mean(results[name]):28.4f}   {results[name]}")
    proxy_figures = "" if args.skip_proxies else proxy_correlations(trained)
    seconds = time.perf_counter() - start
    print(f"tpe_mean={mean(results['tpe']):.4f} random_mean={mean(results['random']):.4f} "
          f"best_preset={mean(results['preset']):.4f} tpe_wins={wins}/{args.seeds} ties={ties} trials={args.trials} "
          f"seeds={args.seeds} budget_ms={budget:g} epochs={args.epochs} seconds={seconds:.0f}{proxy_figures}")
    return 0


def proxy_correlations(trained: dict[str, float]) -> str:
    """Spearman rho of each zero-cost proxy (and the parameter count) with the searches' trained accuracies."""
    import json

    from scipy.stats import spearmanr

    from searchspace.arch import Arch
    from searchspace.data import load_data
    from searchspace.evaluators import PROXIES, ZeroCostEvaluator

    if len(trained) < 5:
        print(f"\nproxies: only {len(trained)} trained architectures, too few for a rank correlation")
        return ""
    data = load_data()
    archs = [Arch.from_dict(json.loads(a)) for a in trained]
    accuracy = list(trained.values())
    print(f"\nzero-cost proxies vs trained accuracy over {len(archs)} distinct architectures the searches trained:")
    figures = {}
    for proxy in PROXIES:
        evaluator = ZeroCostEvaluator(proxy, threads=1)
        scores = [evaluator.evaluate(arch, data).score for arch in archs]
        rho, pvalue = spearmanr(scores, accuracy)
        figures[proxy] = rho
        print(f"  {proxy:10s} Spearman rho {rho:+.3f} (p = {pvalue:.2g})")
    return "".join(f" {name}_rho={rho:.3f}" for name, rho in figures.items()) + f" proxy_archs={len(archs)}"


if __name__ == "__main__":
    sys.exit(main())
