"""Which rounds count as calm: those within 25% of the lowest reference round, or of the rounds' lower quartile?

A measurement times each model in short rounds with the reference workload among its runs and leaves out the
rounds in which the reference ran more than 25% slower than on the calm machine (``stats.calm_rounds``). The calm
level used to be the single fastest round. Now and then the reference runs a third faster than in any other round
(a burst of the host); against that round every other one looked busy and was left out. This bench times the same
architectures in several passes, as ``measure_many`` does (interleaved rounds, the reference paired with each
model's runs, the thread clock, one thread), and judges the *same rounds* by both rules: how far the passes land
from each other (mean absolute difference, Kendall tau) and how many rounds each rule keeps.

    python bench/calm_rule.py                     # 24 architectures of the default space at 32x32x1, 3 passes
    python bench/calm_rule.py --size 64 --passes 4
    python bench/calm_rule.py --load              # the other core busy meanwhile

The last line is ``key=value`` figures: apart_lowest=.. apart_quartile=.. tau_lowest=.. ... cpu=..
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from bench.load import busy_core  # noqa: E402
from bench.passes import agreement, paired_rounds_setup  # noqa: E402
from searchspace.latency import InputSpec, device_name  # noqa: E402
from searchspace.latency.measure import (  # noqa: E402
    num_threads,
    reference_for,
    run_paired_rounds,
    steady_allocator,
    thread_cpu_timer,
)
from searchspace.latency.stats import calm_level, calm_rounds, summarize  # noqa: E402
from searchspace.latency.table import sample_archs  # noqa: E402
from searchspace.model import build_model  # noqa: E402

RULES = {
    "lowest": min,  # the rule before: the single fastest round
    "quartile": calm_level,  # the rule now: the rounds' lower quartile
}


def value(own: list[list[float]], refs: list[list[float]], anchor_ms: float, level) -> tuple[float, int]:
    """The corrected latency from the rounds ``level`` calls calm (as a measurement summarizes them), and how many
    those are."""
    kept = calm_rounds(refs, level=level)
    return summarize([own[k] for k in kept], [refs[k] for k in kept], anchor_ms).value_ms, len(kept)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=24, help="architectures of the default space (default: 24)")
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--passes", type=int, default=3, help="times every model is measured (default: 3, at least 2)")
    p.add_argument("--rounds", type=int, default=24, help="rounds per model and pass (default: 24)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--load", action="store_true", help="keep the other core busy with a second process")
    args = p.parse_args(argv)
    if args.passes < 2 or args.rounds < 4:
        print("calm_rule: --passes must be at least 2 and --rounds at least 4; raise them", file=sys.stderr)
        return 2

    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    steady_allocator()
    reference = reference_for("cpu", spec, 1, timer=thread_cpu_timer,
                              cache_dir=tempfile.mkdtemp(prefix="mixernas-calm-"))
    archs = sample_archs(searchspace.get_space("default"), args.archs, seed=args.seed)
    print(f"{len(archs)} architectures at {args.size}x{args.size}x{args.channels}, {args.passes} passes of "
          f"{args.rounds} rounds, one thread, thread clock, on {device_name('cpu')}, "
          f"{'other core busy' if args.load else 'idle'}", flush=True)
    figures: dict[str, list[list[float]]] = {rule: [] for rule in RULES}
    kept: dict[str, list[int]] = {rule: [] for rule in RULES}
    with busy_core(args.load), num_threads(1), torch.inference_mode():
        models = [build_model(a, num_classes=10, in_chans=args.channels).eval() for a in archs]
        x = spec.example(torch.device("cpu"))
        ref_x = InputSpec(**reference.key["input"]).example(torch.device("cpu"))
        fns = [lambda m=m: m(x) for m in models]
        ref_fns = [lambda m=m: m(ref_x) for m in reference.modules()]
        runs, chunks = paired_rounds_setup(fns, ref_fns, thread_cpu_timer)
        for n in range(args.passes):
            own, refs = run_paired_rounds(fns, runs, ref_fns, rounds=args.rounds, max_extra_rounds=0,
                                          timer=thread_cpu_timer, done=lambda t, r: True, chunks=chunks)
            for rule, level in RULES.items():
                values = [value(o, r, reference.anchor.ms, level) for o, r in zip(own, refs)]
                figures[rule].append([v for v, _ in values])
                kept[rule].extend(k for _, k in values)
            print(f"pass {n + 1} of {args.passes} done", flush=True)
    out = {}
    for rule in RULES:
        apart, tau = agreement(figures[rule])
        out[f"apart_{rule}"], out[f"tau_{rule}"] = apart, tau
        out[f"kept_{rule}"] = statistics.fmean(kept[rule]) / args.rounds
        print(f"calm level = {rule:8s}: passes {apart:.2%} apart on average (Kendall tau {tau:.3f}), rounds kept "
              f"{out[f'kept_{rule}']:.0%} (fewest {min(kept[rule])} of {args.rounds})")
    print(" ".join(f"{k}={v:.4g}" for k, v in out.items())
          + f" size={args.size} archs={len(archs)} passes={args.passes} load={int(args.load)}"
          + f" cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
