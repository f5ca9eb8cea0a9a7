"""How the latency table's parts should be timed: with the reference workload among their rounds, or after them.

The table times each part alone and predicts a model from the sum of its parts. On the thread clock it keeps the
parts' own times and uses the reference workload only to tell whether the machine was busy. This bench checks, side
by side in one process, where that probe should run:

* ``among``: the reference runs inside each part's rounds (a reference run after every chunk of part runs), as
  whole models are measured; the part's raw time is kept;
* ``after``: the parts' rounds hold nothing else; the reference is timed alone after the batch.

The same parts (those of ``--archs`` default-space architectures) are timed with each variant in turn, ``--repeats``
times, and each model's sum of parts is compared with the model measured whole (as the search measures it),
after one common scale (the median of model / sum): mean error and Kendall tau of the ranking. A variant that
disturbs the parts the way nothing inside a model does ranks the models worse.

    python bench/part_protocol.py                 # 40 architectures at 32x32x1, 3 repeats
    python bench/part_protocol.py --size 64 --archs 20

The last line is ``key=value`` figures: mape_among=.. tau_among=.. mape_after=.. tau_after=.. cpu=..
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from searchspace.latency import InputSpec, device_name, measure_many  # noqa: E402
from searchspace.latency.measure import thread_cpu_timer  # noqa: E402
from searchspace.latency.predictor import kendall_tau  # noqa: E402
from searchspace.latency.table import LatencyTable, PartProtocol, sample_archs  # noqa: E402
from searchspace.model import build_model  # noqa: E402

VARIANTS = ("among", "after")


def against_whole(sums: list[float], whole: list[float]) -> tuple[float, float, float]:
    """``sums`` as predictions of ``whole`` after one common scale (the median of whole / sum): the scale, the
    mean absolute error and Kendall's tau of the ranking."""
    scale = statistics.median(m / s for s, m in zip(sums, whole))
    mape = statistics.fmean(abs(s * scale - m) / m for s, m in zip(sums, whole))
    return scale, mape, kendall_tau(sums, whole)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=40, help="architectures of the default space (default: 40)")
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--repeats", type=int, default=3, help="times each variant times the parts (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=tempfile.mkdtemp(prefix="mixernas-protocol-"),
                              num_classes=10)
    reference = table.reference()
    archs = sample_archs(searchspace.get_space("default"), args.archs, seed=args.seed)
    uses = [table.parts(a) for a in archs]
    parts = list(dict.fromkeys(u.part for us in uses for u in us))
    print(f"{len(archs)} architectures at {args.size}x{args.size}x{args.channels}, {len(parts)} parts, one thread, "
          f"thread clock, on {device_name('cpu')}")
    models = [build_model(a, num_classes=10, in_chans=args.channels) for a in archs]
    whole = [r.value_ms for r in measure_many(models, spec, threads=1, timer=thread_cpu_timer, reference=reference)]

    protocol = PartProtocol()
    modules = [part.build() for part in parts]
    specs = [part.input_spec(1, "float32") for part in parts]
    figures: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            results = measure_many(modules, specs, threads=1, timer=thread_cpu_timer, warmup=protocol.warmup,
                                   rounds=protocol.rounds, target_round_ms=protocol.target_round_ms,
                                   tolerance=protocol.tolerance, max_extra_rounds=protocol.max_extra_rounds,
                                   reference=reference if variant == "among" else False)
            ms = {part: r.raw_ms for part, r in zip(parts, results)}
            sums = [sum(ms[u.part] for u in us) for us in uses]
            scale, mape, tau = against_whole(sums, whole)
            figures[variant].append((mape, tau))
            print(f"repeat {repeat + 1}, reference {variant:5s} the parts' rounds: sum of parts x {scale:.3f} "
                  f"misses the whole models by {mape:.2%} on average, Kendall tau {tau:.3f}", flush=True)
    out = {}
    for variant, rows in figures.items():
        out[f"mape_{variant}"] = statistics.fmean(m for m, _ in rows)
        out[f"tau_{variant}"] = statistics.fmean(t for _, t in rows)
        print(f"reference {variant:5s} the rounds: mean error {out[f'mape_{variant}']:.2%}, "
              f"Kendall tau {out[f'tau_{variant}']:.3f} (mean of {len(rows)})")
    print(" ".join(f"{k}={v:.4g}" for k, v in out.items())
          + f" size={args.size} archs={len(archs)} cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
