"""Lookup-table prediction vs real measurement on this machine, with a fresh table, as a new user meets it.

For each input size: a fresh, empty table (a temporary cache folder, so its reference anchor is new too) is
opened and calibrated exactly as the search does it on first use (``ensure_calibrated``: a few whole models of
the default space); then 30 other architectures of the default space are predicted and measured for real with
the search's protocol (interleaved short rounds, thread clock with one thread, reference-corrected), and their
errors printed. The same 30 are then measured a second time: how far two honest measurements of the same models
disagree is the noise floor no predictor can beat. The calibration's models are measured again beside them: how far
the machine's level moved since the calibration (drift) is a floor for any table calibrated then. ``--load``
keeps the other core busy with a second process throughout (a user's machine is rarely idle).

How the table decides among its predictor's forms is checked on the same measurements, at no extra cost: the
calibration's models and the 30 are pooled and split at random many times, the calibration's number to fit and the
rest to predict, and each split is predicted by the table's rule (the mean of the forms near the best held out)
and by the single form with the lowest leave-one-out error.

Targets (issue 11), at every size, idle and loaded: MAPE <= 4%, >= 95% within +-10%, Kendall tau >= 0.95;
noise floor <= 2%.

    python bench/latency_table.py                        # 30 archs at 32, 64 and 224, one thread
    python bench/latency_table.py --sizes 32 --load      # the main job's input, the other core busy
    python bench/latency_table.py --archs 8 --sizes 32   # a quick look

The last line is ``key=value`` figures: mape_32=.. within10_32=.. tau_32=.. noise_32=.. ... cpu=..
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from bench.load import busy_core  # noqa: E402
from searchspace.latency import InputSpec, device_name, format_ms, measure_many  # noqa: E402
from searchspace.latency.measure import thread_cpu_timer  # noqa: E402
from searchspace.latency.predictor import FORMS, TIE, accuracy, fit_calibration, min_models  # noqa: E402
from searchspace.latency.table import CALIBRATION_MODELS, LatencyTable, sample_archs  # noqa: E402

TARGET_MAPE, TARGET_WITHIN10, TARGET_TAU, TARGET_NOISE = 0.04, 0.95, 0.95, 0.02
SPLITS = 100


def lowest_holdout_form(features, measured):
    """The single form with the lowest leave-one-out error (simplest first; a richer one must win by TIE)."""
    best = None
    for form in FORMS:
        if len(measured) >= min_models(form):
            fit = fit_calibration(features, measured, form=form)
            if best is None or fit.holdout.mape < best.holdout.mape - TIE:
                best = fit
    return best


def resplit(features, measured, fit_size: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Mean MAPE, within +-10% and tau over SPLITS random splits: ``fit_size`` models fitted, the rest predicted."""
    rng = random.Random(seed)
    scores: dict[str, list] = {"mean": [], "lowest": []}
    for _ in range(SPLITS):
        order = list(range(len(measured)))
        rng.shuffle(order)
        fit, rest = order[:fit_size], order[fit_size:]
        f_fit, m_fit = [features[i] for i in fit], [measured[i] for i in fit]
        truth = [measured[i] for i in rest]
        for name, calibration in (("mean", fit_calibration(f_fit, m_fit)),
                                  ("lowest", lowest_holdout_form(f_fit, m_fit))):
            acc = accuracy([calibration.apply(features[i]) for i in rest], truth)
            scores[name].append((acc.mape, acc.within10, acc.tau))
    return {name: tuple(statistics.fmean(s[k] for s in runs) for k in range(3)) for name, runs in scores.items()}


def run_size(size: int, args) -> dict[str, float]:
    spec = InputSpec(channels=args.channels, height=size, width=size)
    space = searchspace.get_space("default")
    cache = tempfile.mkdtemp(prefix=f"mixernas-table-{size}-")
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=cache, num_classes=args.num_classes)
    start = time.perf_counter()
    calibration = table.ensure_calibrated(space, models=args.calibration_models, seed=args.seed)
    calibrate_s = time.perf_counter() - start
    print(f"\n== input {size}x{size}x{args.channels}, 1 thread, thread clock, on {device_name('cpu')}; "
          f"calibrated on first open in {calibrate_s:.0f} s: {calibration}")
    used = {o.arch for o in table.observations}
    archs = sample_archs(space, args.archs, seed=args.seed + 1000, exclude=used)
    table.ensure(archs, progress=True)
    pred = [table.predict(a).total_ms for a in archs]
    raw = [table.predict(a, calibrated=False).total_ms for a in archs]
    start = time.perf_counter()
    build = lambda archs: [table.model(a) for a in archs]  # noqa: E731 - as the table predicts them
    first = measure_many(build(archs), spec, threads=1, timer=thread_cpu_timer, reference=table.reference())
    measure_s = time.perf_counter() - start
    measured = [r.value_ms for r in first]
    # the calibration's models again beside the second pass: how far the machine's whole-model level moved since
    # the calibration, minutes ago (a table calibrated then cannot be closer to today's measurements than that)
    calibrated = table.observations[:args.calibration_models]
    second = [r.value_ms for r in measure_many(build(archs + [o.arch for o in calibrated]), spec, threads=1,
                                               timer=thread_cpu_timer, reference=table.reference())]
    again = second[:len(archs)]
    drift = [(now - o.ms) / o.ms for o, now in zip(calibrated, second[len(archs):])]
    noise = statistics.fmean(abs(b - a) / a for a, b in zip(measured, again))
    repeat = accuracy(again, measured)  # the second measurement as a "prediction" of the first: the ceiling
    print(f"{'#':>3} {'measured':>10} {'+-95%':>6} {'again':>10} {'predicted':>10} {'error':>7} {'sum':>10}  "
          f"architecture")
    for i, (a, r, m2, p, s) in enumerate(zip(archs, first, again, pred, raw)):
        print(f"{i:>3} {format_ms(r.value_ms):>10} {r.precision:>6.1%} {format_ms(m2):>10} {format_ms(p):>10} "
              f"{(p - r.value_ms) / r.value_ms:>+7.1%} {format_ms(s):>10}  {a.act} | {a.summary()}")
    acc = accuracy(pred, measured)
    plain = accuracy(raw, measured)
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print(f"table:       MAPE {acc.mape:.2%} (target <= {TARGET_MAPE:.0%}: {ok(acc.mape <= TARGET_MAPE)}), "
          f"within +-10% {acc.within10:.0%} (target >= {TARGET_WITHIN10:.0%}: {ok(acc.within10 >= TARGET_WITHIN10)}), "
          f"Kendall tau {acc.tau:.3f} (target >= {TARGET_TAU}: {ok(acc.tau >= TARGET_TAU)})")
    print(f"plain sum:   MAPE {plain.mape:.2%}, within +-10% {plain.within10:.0%}, Kendall tau {plain.tau:.3f}")
    print(f"noise floor: the same {len(archs)} models measured twice differ by {noise:.2%} on average "
          f"(target <= {TARGET_NOISE:.0%}: {ok(noise <= TARGET_NOISE)}); widest 95% interval "
          f"+-{max(r.precision for r in first):.1%}, {sum(not r.converged for r in first)} of {len(first)} wider "
          f"than +-2%; measuring them took {measure_s:.0f} s")
    print(f"ceiling:     the second measurement against the first: Kendall tau {repeat.tau:.3f}, "
          f"{repeat.within10:.0%} within +-10% (no predictor can rank better than the clock repeats itself)")
    if drift:
        print(f"drift:       the {len(drift)} calibration models measured again now differ from their calibration "
              f"by {statistics.fmean(drift):+.1%} on average ({statistics.fmean(abs(d) for d in drift):.1%} "
              f"absolute): the machine's level moved that much between the calibration and the check")
    pooled = table.observations[:args.calibration_models]
    split = resplit([table.features(o.arch) for o in pooled] + [table.features(a) for a in archs],
                    [o.ms for o in pooled] + measured, len(pooled), args.seed)
    for name, label in (("mean", "forms near the best, averaged (the table's rule)"),
                        ("lowest", "the one form lowest held out")):
        mape, within, tau = split[name]
        print(f"re-split:    {label}: MAPE {mape:.2%}, within +-10% {within:.0%}, tau {tau:.3f} (mean over "
              f"{SPLITS} random splits of these {len(pooled) + len(archs)} models, {len(pooled)} fitted)")
    shifts = [abs(s - 1) for s in table.level_scales[1:]]
    if shifts:
        print(f"level:       {len(shifts)} batches of parts brought to the first batch's level by the yardsticks; "
              f"median shift {statistics.median(shifts):.1%}, largest {max(shifts):.1%}")
    return {f"mape_{size}": acc.mape, f"within10_{size}": acc.within10, f"tau_{size}": acc.tau,
            f"noise_{size}": noise, f"repeat_tau_{size}": repeat.tau,
            f"plain_mape_{size}": plain.mape, f"calibrate_s_{size}": calibrate_s,
            f"split_mean_mape_{size}": split["mean"][0], f"split_mean_tau_{size}": split["mean"][2],
            f"split_lowest_mape_{size}": split["lowest"][0], f"split_lowest_tau_{size}": split["lowest"][2],
            f"level_shift_{size}": max(shifts, default=0.0),
            f"drift_{size}": statistics.fmean(drift) if drift else 0.0,
            f"load_{size}": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=30, help="test architectures (default: 30)")
    p.add_argument("--sizes", default="32,64,224", help="input sizes, comma-separated (default: 32,64,224)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default: 10)")
    p.add_argument("--calibration-models", type=int, default=CALIBRATION_MODELS,
                   help=f"whole models of the first-open calibration (default: {CALIBRATION_MODELS}, as the search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", action="store_true", help="keep the other core busy with a second process")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    figures: dict[str, float] = {}
    with busy_core(args.load):
        for size in sizes:
            figures.update(run_size(size, args))
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items())
          + f" load={int(args.load)} cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
