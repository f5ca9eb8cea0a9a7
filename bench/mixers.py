"""Token mixers at stage-3 shapes: latency, parameters and MACs of every registered mixer, and ours against timm's.

Every registered mixer is built for C=320 channels and timed on a (1, 320, 14, 14) input on the CPU with a fixed
thread count, all mixers measured INTERLEAVED in one run (each round visits every model), so a slow phase of the
machine hits all of them alike. Latency is the lowest round median (see ``searchspace.latency.measure``); params and
MACs come from torch's FlopCounterMode.

Our pooling, sepconv and attention mixers are compared with timm's MetaFormer equivalents (``timm.models.metaformer``
Pooling, SepConv(320), Attention(320)) measured side by side in the same rounds: ratio = ours / timm, and "not slower"
(ratio <= ~1) is the bar. Inputs are what each module takes inside its own network: ours (B, C, H, W); timm's
Attention (B, H*W, C) tokens, because timm's MetaFormerStage converts to tokens once per stage, not per block (so
that conversion is not charged to timm's mixer), while our attention mixer takes and returns (B, C, H, W) itself
(its conversions are views). The weights of each pair are made equal and their outputs compared.

The last line is ``key=value`` figures: ``<pair>_ratio``, ``<mixer>_ms``, ``threads`` and the like.

    python bench/mixers.py                  # defaults: 1 thread, 9 rounds of ~100 ms per model
    python bench/mixers.py --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import searchspace
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import searchspace

import torch
from timm.models import metaformer as timm_metaformer
from torch import nn

from searchspace.latency import InputSpec, count_params_macs, format_ms, measure_many

PAIRS = ("pooling", "sepconv", "attention")


def timm_equivalent(name: str, dim: int) -> tuple[nn.Module, str]:
    """timm's MetaFormer module for our mixer ``name`` and the input layout it takes inside timm's network."""
    if name == "pooling":
        return timm_metaformer.Pooling(pool_size=3), "nchw"
    if name == "sepconv":
        return timm_metaformer.SepConv(dim), "nchw"
    return timm_metaformer.Attention(dim), "tokens"


def same_output(ours: nn.Module, theirs: nn.Module, layout: str, spec: InputSpec) -> str:
    """Copy our weights into timm's module (same parameter names) and compare outputs on one input."""
    try:
        theirs.load_state_dict(ours.state_dict(), strict=True)
    except RuntimeError as error:
        return f"weights differ: {str(error).splitlines()[0][:40]}"
    x = torch.randn(spec.batch, spec.channels, spec.height, spec.width)
    with torch.inference_mode():
        mine = ours.eval()(x)
        if layout == "tokens":
            other = theirs.eval()(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(mine.shape)
        else:
            other = theirs.eval()(x)
    return "yes" if torch.allclose(mine, other, atol=1e-5, rtol=1e-4) else "NO"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Latency (CPU, interleaved rounds), params and MACs of every registered token mixer at stage-3 "
                    "shapes, and our pooling/sepconv/attention mixers against timm's MetaFormer ones (ratio ours/timm, "
                    "measured side by side). The last output line is key=value figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads during the measurement; 1 because on a shared 2-core "
                             "machine a second thread waits on whatever else runs on the other core, and single "
                             "runs then take 10-100x longer (torch's own default here: "
                             f"{torch.get_num_threads()})")
    parser.add_argument("--rounds", type=int, default=9,
                        help="interleaved rounds; each round times every mixer, the lowest round median is reported")
    parser.add_argument("--runs-per-round", type=int, default=None,
                        help="timed forward passes per mixer per round; None = enough for --round-ms")
    parser.add_argument("--round-ms", type=float, default=100.0,
                        help="target duration of one mixer's share of a round, in milliseconds, when "
                             "--runs-per-round is not given")
    parser.add_argument("--warmup", type=int, default=20, help="untimed forward passes per mixer before round one")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="rounds agree when the median round is within this fraction of the best one; "
                             "otherwise extra rounds are measured")
    parser.add_argument("--max-extra-rounds", type=int, default=6, help="bound on the extra rounds")
    parser.add_argument("--channels", type=int, default=320, help="mixer width C (stage 3 of the S12/S18 models)")
    parser.add_argument("--size", type=int, default=14, help="feature map height and width (224 input / 16)")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        spec = InputSpec(batch=args.batch, channels=args.channels, height=args.size, width=args.size)
    except searchspace.MixerNASError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    token_spec = InputSpec(batch=args.batch, channels=args.channels, height=args.size, width=args.size,
                           layout="tokens")

    names, models, specs, failed = [], [], [], {}
    for name in searchspace.list_mixers():
        try:
            models.append(searchspace.create_mixer(name, args.channels))
        except Exception as error:  # a mixer that cannot be built at this width is reported, not fatal
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        names.append(name)
        specs.append(spec)
    equal = {}
    for name in PAIRS:
        if name not in names:
            continue
        theirs, layout = timm_equivalent(name, args.channels)
        equal[name] = same_output(models[names.index(name)], theirs, layout, spec)
        names.append(f"timm:{name}")
        models.append(theirs)
        specs.append(token_spec if layout == "tokens" else spec)

    counts = [count_params_macs(m, s) for m, s in zip(models, specs)]
    start = time.perf_counter()
    try:
        results = measure_many(models, specs, threads=args.threads, warmup=args.warmup, rounds=args.rounds,
                               runs_per_round=args.runs_per_round, tolerance=args.tolerance,
                               max_extra_rounds=args.max_extra_rounds, target_round_ms=args.round_ms)
    except searchspace.MixerNASError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    by_name = dict(zip(names, results))
    ctx = results[0].context

    print(f"Token mixers at C={args.channels}, {args.size}x{args.size}, batch {args.batch}: {ctx}")
    print(f"{len(models)} modules measured interleaved in {seconds:.0f} s: {args.rounds} rounds (+ up to "
          f"{args.max_extra_rounds} while rounds disagree by more than {args.tolerance:.0%}); latency = lowest round "
          f"median, spread = (median round - best round) / best round; params and MACs by {counts[0].counter}")
    print()
    header = f"{'mixer':<18} {'params':>9} {'MMACs':>8} {'latency':>10} {'spread':>7} {'rounds x runs':>14}"
    print(header)
    print("-" * len(header))
    for name, result, count in zip(names, results, counts):
        again = "*" if result.remeasured else ""
        print(f"{name:<18} {count.params:>9,} {count.macs / 1e6:>8.2f} {format_ms(result.value_ms):>10} "
              f"{result.spread:>7.1%} {f'{result.rounds} x {result.runs_per_round}{again}':>14}")
    for name, error in failed.items():
        print(f"{name:<18} could not be built: {error}")
    if any(r.remeasured for r in results):
        print("* rounds disagreed beyond the tolerance, extra rounds were measured")

    figures = {}
    if equal:
        print()
        print("ours vs timm MetaFormer, measured side by side (ratio = ours / timm; <= 1 means not slower)")
        header = f"{'mixer':<10} {'ours':>10} {'timm':>10} {'ratio':>6}  {'same output':<12} inputs (ours | timm)"
        print(header)
        print("-" * len(header))
        for name in equal:
            ours, theirs = by_name[name], by_name[f"timm:{name}"]
            ratio = ours.value_ms / theirs.value_ms
            figures[f"{name}_ratio"] = f"{ratio:.3f}"
            layouts = "(B,C,H,W) | " + ("(B,H*W,C) tokens" if name == "attention" else "(B,C,H,W)")
            print(f"{name:<10} {format_ms(ours.value_ms):>10} {format_ms(theirs.value_ms):>10} {ratio:>6.2f}  "
                  f"{equal[name]:<12} {layouts}")

    for name, result, count in zip(names, results, counts):
        key = name.replace("timm:", "timm_")
        figures[f"{key}_ms"] = f"{result.value_ms:.4f}"
        if not name.startswith("timm:"):
            figures[f"{key}_mmacs"] = f"{count.macs / 1e6:.2f}"
    figures.update(threads=ctx.threads, channels=args.channels, size=args.size, batch=args.batch,
                   max_spread=f"{max(r.spread for r in results):.3f}", seconds=f"{seconds:.0f}")
    print()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
