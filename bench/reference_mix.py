"""Why the reference workload is two models: does a second, weight-heavy one follow the machine better?

Whole models are corrected by the reference workload timed among their runs (``reference.py``). It used to be the
light model alone (6.5 MB of weights); measured twice minutes apart, the corrected figures still moved together by
a few percent at 64x64 and 224x224, most for the weight-heavy models. This bench times architectures of the
default space in several passes, as ``measure_many`` does (interleaved rounds, one thread, the thread clock), and
after every chunk of a model's runs it times, in turn, the light reference, the heavy one (the same kinds of
stages, wider: tens of MB of weights, more than any cache here) and the light one once more. The same rounds are
then taken five ways:

- ``none``: uncorrected (the means of the runs; how far the machine itself moved);
- ``light``: by the light reference alone, as measurements were before;
- ``light2``: by the mean of its two runs (is a gain only the reference's own noise averaged?);
- ``heavy``: by the heavy reference alone;
- ``mix``: by the geometric mean of the light and the heavy one, as measurements are now.

For each: how far the passes land apart on average, their Kendall tau, and the range of the pass-level shift (the
mean over models of a pass's log-deviation from each model's mean: what the correction failed to take out).
Busy rounds are left out by the light reference, the same rounds for every way.

    python bench/reference_mix.py                    # 24 architectures at 32x32x1, 6 passes 10 s apart
    python bench/reference_mix.py --size 64 --gap 60

The last line is ``key=value`` figures: apart_light=.. apart_mix=.. tau_light=.. shift_light=.. ... cpu=..
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from bench.load import busy_core  # noqa: E402
from bench.passes import agreement, paired_rounds_setup  # noqa: E402
from searchspace.latency import InputSpec, device_name  # noqa: E402
from searchspace.latency.measure import (  # noqa: E402
    num_threads,
    run_paired_rounds,
    steady_allocator,
    thread_cpu_timer,
)
from searchspace.latency.reference import reference_models  # noqa: E402
from searchspace.latency.stats import calm_rounds, reference_value, summarize  # noqa: E402
from searchspace.latency.table import sample_archs  # noqa: E402
from searchspace.model import build_model  # noqa: E402

WAYS = ("none", "light", "light2", "heavy", "mix")


def per_chunk(light: list[float], heavy: list[float], light2: list[float], way: str) -> list[float]:
    """The reference value of each chunk of a round, corrected ``way``."""
    if way == "none":
        return [1.0] * len(light)
    if way == "light":
        return light
    if way == "light2":
        return [(a + b) / 2 for a, b in zip(light, light2)]
    if way == "heavy":
        return heavy
    return [reference_value([a, b]) for a, b in zip(light, heavy)]  # as measurements take it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=24, help="architectures of the default space (default: 24)")
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--passes", type=int, default=6, help="times every model is measured (default: 6, at least 2)")
    p.add_argument("--rounds", type=int, default=16, help="rounds per model and pass (default: 16)")
    p.add_argument("--gap", type=float, default=10.0, help="seconds of rest between passes (default: 10)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--load", action="store_true", help="keep the other core busy with a second process")
    args = p.parse_args(argv)
    if args.passes < 2 or args.rounds < 4 or args.gap < 0:
        print("reference_mix: --passes must be at least 2, --rounds at least 4 and --gap at least 0", file=sys.stderr)
        return 2

    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    steady_allocator()
    archs = sample_archs(searchspace.get_space("default"), args.archs, seed=args.seed)
    timer = thread_cpu_timer
    with busy_core(args.load), num_threads(1), torch.inference_mode():
        models = [build_model(a, num_classes=10, in_chans=args.channels).eval() for a in archs]
        light_model, heavy_model = reference_models(args.channels)
        megabytes = [sum(t.numel() * t.element_size() for t in m.parameters()) / 1e6
                     for m in (light_model, heavy_model, *models)]
        print(f"{len(archs)} architectures at {args.size}x{args.size}x{args.channels} ({min(megabytes[2:]):.0f}-"
              f"{max(megabytes[2:]):.0f} MB of weights), reference {megabytes[0]:.1f} MB, heavy reference "
              f"{megabytes[1]:.1f} MB; {args.passes} passes of {args.rounds} rounds, one thread, thread clock, on "
              f"{device_name('cpu')}, {'other core busy' if args.load else 'idle'}", flush=True)
        x = spec.example(torch.device("cpu"))
        current = [0]
        fns = [lambda i=i, m=m: (current.__setitem__(0, i), m(x)) for i, m in enumerate(models)]
        records: list[list[tuple[float, float, float]]] = [[] for _ in models]

        def references() -> None:  # timed as one by run_paired_rounds; each run is also timed on its own here
            light = timer(lambda: light_model(x))
            heavy = timer(lambda: heavy_model(x))
            records[current[0]].append((light, heavy, timer(lambda: light_model(x))))

        runs, chunks = paired_rounds_setup(fns, [lambda: light_model(x), lambda: heavy_model(x)], timer)
        figures: dict[str, list[list[float]]] = {way: [] for way in WAYS}
        for n in range(args.passes):
            for r in records:
                r.clear()
            own, composite = run_paired_rounds(fns, runs, references, rounds=args.rounds, max_extra_rounds=0,
                                               timer=timer, done=lambda t, r: True, chunks=chunks)
            for way in WAYS:
                values = []
                for i, rows in enumerate(own):
                    chunk_records = iter(records[i])  # in the order measured: round by round
                    refs = [[next(chunk_records) for _ in composite[i][k]] for k in range(len(rows))]
                    by_way = [per_chunk(*map(list, zip(*round_refs)), way) for round_refs in refs]
                    kept = calm_rounds([[light for light, _, _ in round_refs] for round_refs in refs])
                    values.append(summarize([rows[k] for k in kept], [by_way[k] for k in kept], 1.0).value_ms)
                figures[way].append(values)
            print(f"pass {n + 1} of {args.passes} done", flush=True)
            if n + 1 < args.passes:
                time.sleep(args.gap)
    out = {}
    for way in WAYS:
        passes = figures[way]
        apart, tau = agreement(passes)
        means = [statistics.fmean(math.log(v[i]) for v in passes) for i in range(len(archs))]
        shifts = [statistics.fmean(math.log(v[i]) - means[i] for i in range(len(archs))) for v in passes]
        out[f"apart_{way}"], out[f"tau_{way}"], out[f"shift_{way}"] = apart, tau, max(shifts) - min(shifts)
        print(f"{way:6s}: passes {apart:.2%} apart on average, Kendall tau {tau:.3f}; pass-level shifts "
              + " ".join(f"{s:+.1%}" for s in shifts))
    print(" ".join(f"{k}={v:.4g}" for k, v in out.items())
          + f" size={args.size} archs={len(archs)} passes={args.passes} load={int(args.load)}"
          + f" cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
