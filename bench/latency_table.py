"""Lookup-table prediction vs real measurement on this machine: random architectures of the default space.

For each input size: open (or build) the table of the default space, calibrate it on a few whole models that are
*not* among the test architectures, predict the test architectures, then measure them for real with the robust
protocol (interleaved rounds, lowest round median). Optionally measure them a second time: how far two honest
measurements of the same models disagree is the noise floor no predictor can beat.

Targets (issue 3): mean absolute percentage error <= 5%, >= 95% within +-10%, Kendall tau >= 0.9.

    python bench/latency_table.py                       # 30 archs at 64 and 224, 1 thread (~15-25 min)
    python bench/latency_table.py --archs 8 --sizes 64  # a quick look

The last line is ``key=value`` figures: mape_64=.. within10_64=.. tau_64=.. noise_64=.. build_s_64=.. ...
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import kendalltau  # noqa: E402

import searchspace  # noqa: E402
from searchspace.latency import InputSpec, format_ms, measure_many  # noqa: E402
from searchspace.latency.table import LatencyTable, thread_cpu_timer  # noqa: E402

TARGET_MAPE, TARGET_WITHIN10, TARGET_TAU = 0.05, 0.95, 0.9


class RandomTrial:
    """Answers every ``suggest_categorical`` with a seeded uniform choice (what Optuna's RandomSampler does)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name, choices):
        return self.rng.choice(list(choices))


def sample_archs(space, n: int, seed: int, exclude=()) -> list:
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        arch = space.define(RandomTrial(rng))
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
    return out


def errors(pred: list[float], meas: list[float]) -> tuple[float, float, float]:
    rel = [(p - m) / m for p, m in zip(pred, meas)]
    mape = statistics.fmean(abs(r) for r in rel)
    within = sum(abs(r) <= 0.10 for r in rel) / len(rel)
    tau = kendalltau(pred, meas).statistic if len(rel) > 1 else float("nan")
    return mape, within, float(tau)


def run_size(size: int, archs: list, calib: list, args) -> dict[str, float]:
    spec = InputSpec(height=size, width=size)
    space = searchspace.get_space("default")
    table = LatencyTable.open("cpu", spec, threads=args.threads, cache_dir=args.cache_dir, rebuild=args.rebuild)
    start = time.perf_counter()
    built = table.build_for_space(space)
    build_s = time.perf_counter() - start
    print(f"\n== input {size}x{size}, {args.threads} thread(s), models on the {args.clock} clock: "
          f"table {table.path.name}, {len(table)} entries "
          f"({built} measured now in {build_s:.0f} s)")
    # The calibration models are measured in the same interleaved rounds as the test models, so both meet the
    # same machine (on a shared 2-core box the load of other processes can change latencies by 2-4x between
    # minutes); the calibration is fitted on its own models only.
    timer = thread_cpu_timer if args.clock == "thread" else None
    start = time.perf_counter()
    first = [r.value_ms for r in measure_many(calib + archs, spec, threads=args.threads, rounds=args.rounds,
                                              timer=timer)]
    measure_s = time.perf_counter() - start
    calibration = table.calibrate(calib, measured_ms=first[:len(calib)], progress=False)
    measured = first[len(calib):]
    print(f"calibration: {calibration}; load average during the measurement {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    noise = None
    if args.noise_floor:
        again = [r.value_ms for r in measure_many(archs, spec, threads=args.threads, rounds=args.rounds,
                                                  timer=timer)]
        noise = statistics.fmean(abs(b - a) / a for a, b in zip(measured, again))

    start = time.perf_counter()
    predictions = [table.predict(a, measure_missing=False) for a in archs]
    predict_ms = (time.perf_counter() - start) * 1000 / len(archs)
    assert all(p.complete for p in predictions), "the space's table should hold every part"
    searchspace.latency.table.arch_parts.cache_clear()
    start = time.perf_counter()
    for a in archs:
        table.predict(a, measure_missing=False)
    predict_cold_ms = (time.perf_counter() - start) * 1000 / len(archs)

    pred = [p.total_ms for p in predictions]
    raw = [p.sum_ms for p in predictions]
    print(f"{'#':>3} {'measured':>10} {'predicted':>10} {'error':>7} {'sum':>10} {'sum err':>8}  architecture")
    for i, (a, m, p, s) in enumerate(zip(archs, measured, pred, raw)):
        print(f"{i:>3} {format_ms(m):>10} {format_ms(p):>10} {(p - m) / m:>+7.1%} {format_ms(s):>10} "
              f"{(s - m) / m:>+8.1%}  {a.act} | {a.summary()}")
    mape, within, tau = errors(pred, measured)
    raw_mape, raw_within, raw_tau = errors(raw, measured)
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print(f"calibrated:   MAPE {mape:.2%} (target <= {TARGET_MAPE:.0%}: {ok(mape <= TARGET_MAPE)}), "
          f"within +-10% {within:.0%} (target >= {TARGET_WITHIN10:.0%}: {ok(within >= TARGET_WITHIN10)}), "
          f"Kendall tau {tau:.3f} (target >= {TARGET_TAU}: {ok(tau >= TARGET_TAU)})")
    print(f"plain sum:    MAPE {raw_mape:.2%}, within +-10% {raw_within:.0%}, Kendall tau {raw_tau:.3f}")
    if noise is not None:
        print(f"noise floor:  the same {len(archs)} models measured twice differ by {noise:.2%} on average")
    print(f"prediction: {predict_ms:.3f} ms per arch (cached parts list), {predict_cold_ms:.3f} ms cold; "
          f"measuring the {len(calib)} + {len(archs)} models took {measure_s:.0f} s")
    out = {f"mape_{size}": mape, f"within10_{size}": within, f"tau_{size}": tau, f"raw_mape_{size}": raw_mape,
           f"predict_ms_{size}": predict_cold_ms}
    if noise is not None:
        out[f"noise_{size}"] = noise
    out[f"load_{size}"] = os.getloadavg()[0]
    if built == len(table):
        out[f"build_s_{size}"] = build_s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=30, help="test architectures (default: 30)")
    p.add_argument("--sizes", default="64,224", help="input sizes, comma-separated (default: 64,224)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for table and models (default: 1)")
    p.add_argument("--calibration-models", type=int, default=6, help="whole models to calibrate on (default: 6)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per whole-model measurement (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="clock of the whole-model measurements: wall (the measurement layer's default) or the "
                        "measuring thread's CPU time (leaves out other processes; exact with --threads 1)")
    p.add_argument("--cache-dir", default=None, help="table folder (default: the user cache)")
    p.add_argument("--rebuild", action="store_true", help="measure the tables again (times the build)")
    p.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                   help="skip measuring the test models a second time")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    space = searchspace.get_space("default")
    archs = sample_archs(space, args.archs, args.seed)
    calib = sample_archs(space, args.calibration_models, args.seed + 1000, exclude=archs)
    figures: dict[str, float] = {}
    for size in sizes:
        figures.update(run_size(size, archs, calib, args))
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
