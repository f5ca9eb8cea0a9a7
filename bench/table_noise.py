"""Is the table's error noise in its parts, or what a sum of parts cannot see? Several tables for the same models.

The same architectures as ``bench/latency_table.py`` (its 16 calibration models and 30 others of the default space)
get their parts measured into ``--tables`` fresh tables, one after another, as a first open measures them (batches,
yardsticks). The 46 whole models are measured once, with the search's protocol. Each table is then judged as the
latency-table bench judges its rule: split the 46 models at random many times, fit on 16, predict the other 30.
Then the tables' entries are averaged (each table brought to the first one's level by the median ratio of its
entries) and judged the same way.

If the error were the parts' measurement noise, the averaged table would predict clearly better than any single one
(averaging four tables halves independent noise). If it predicts about as well, what is left is structural: the
parts' context inside a model, which measuring parts more often cannot remove.

    python bench/table_noise.py                  # 4 tables at 32x32x1
    python bench/table_noise.py --size 64 --tables 3

The last line is ``key=value`` figures: single_mape=.. single_tau=.. averaged_mape=.. averaged_tau=.. ... cpu=..
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from bench.latency_table import SPLITS, resplit  # noqa: E402
from searchspace.latency import InputSpec, device_name, measure_many  # noqa: E402
from searchspace.latency.measure import thread_cpu_timer  # noqa: E402
from searchspace.latency.predictor import kendall_tau  # noqa: E402
from searchspace.latency.table import CALIBRATION_MODELS, LatencyTable, level_scale, sample_archs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--tables", type=int, default=4, help="tables measured for the same parts (default: 4)")
    p.add_argument("--archs", type=int, default=30, help="architectures besides the calibration's (default: 30)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tables < 2:
        p.error("--tables must be at least 2 (the averaged table needs two)")
    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    space = searchspace.get_space("default")
    calibration = sample_archs(space, CALIBRATION_MODELS, seed=args.seed)
    archs = calibration + sample_archs(space, args.archs, seed=args.seed + 1000, exclude=calibration)
    print(f"{len(archs)} architectures at {args.size}x{args.size}x{args.channels}, 1 thread, thread clock, on "
          f"{device_name('cpu')}; {args.tables} tables")

    tables = []
    for k in range(args.tables):
        start = time.perf_counter()
        table = LatencyTable.open("cpu", spec, threads=1, num_classes=10,
                                  cache_dir=tempfile.mkdtemp(prefix=f"mixernas-noise-{args.size}-"))
        table.ensure(archs, progress=True)
        tables.append(table)
        print(f"table {k}: {len(table)} parts in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    models = [tables[0].model(a) for a in archs]  # as the tables predict them
    measured = [r.value_ms for r in measure_many(models, spec, threads=1, timer=thread_cpu_timer,
                                                 reference=tables[0].reference())]
    print(f"whole models measured in {time.perf_counter() - start:.0f} s")

    entries = [t.entries for t in tables]
    common = [part for part in entries[0] if all(part in e for e in entries)]
    scales = [level_scale([entries[0][q] for q in common], [e[q] for q in common]) for e in entries]
    averaged = {q: statistics.fmean(e[q] * s for e, s in zip(entries, scales)) for q in common}
    spread = statistics.fmean(statistics.pstdev([e[q] * s for e, s in zip(entries, scales)]) / averaged[q]
                              for q in common)
    print(f"the same {len(common)} parts in {len(tables)} tables: levels {', '.join(f'{s:.3f}' for s in scales)} "
          f"(factor to the first table's), each part's spread across tables {spread:.1%} (standard deviation)")

    def judge(label: str, features) -> tuple[float, float, float]:
        mape, within, tau = resplit(features, measured, len(calibration), args.seed)["mean"]
        plain = kendall_tau([f.sum_ms for f in features], measured)
        print(f"{label:<16} MAPE {mape:.2%}, within +-10% {within:.0%}, tau {tau:.3f} (plain sum over all "
              f"{len(archs)}: tau {plain:.3f})")
        return mape, within, tau

    singles = [judge(f"table {k}", [t.features(a) for a in archs]) for k, t in enumerate(tables)]
    avg = judge("averaged", [tables[0].features(a, averaged) for a in archs])
    single = tuple(statistics.fmean(s[i] for s in singles) for i in range(3))
    print(f"one table (mean of {len(tables)}): MAPE {single[0]:.2%}, tau {single[2]:.3f}; the {len(tables)} "
          f"averaged: MAPE {avg[0]:.2%}, tau {avg[2]:.3f} (each over {SPLITS} random splits, {len(calibration)} "
          f"fitted, {args.archs} predicted)")
    print(f"single_mape={single[0]:.4g} single_tau={single[2]:.4g} averaged_mape={avg[0]:.4g} "
          f"averaged_tau={avg[2]:.4g} part_spread={spread:.4g} tables={len(tables)} size={args.size} "
          f"cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
