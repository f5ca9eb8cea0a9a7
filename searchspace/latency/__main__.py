"""``python -m searchspace.latency <preset | arch.json>``: measure a model here, with its context, counts and the
lookup table's prediction beside the measurement.

    $ python -m searchspace.latency PoolFormerV2-S12 --input-size 224 --threads 1
    PoolFormerV2-S12: pooling x2 @64 | pooling x2 @128 | pooling x6 @320 | pooling x2 @512
    measured    35.1 ms  (spread 1.2% over 5 rounds of 6 runs)
    context     Intel(R) Xeon(R) Processor [cpu], 1 thread, 1x3x224x224 nchw float32, torch 2.x
    params      11.89 M
    MACs        1.81 G  (counted by torch FlopCounterMode)
    predicted   34.6 ms  (-1.4% vs measured; lookup table calibrated on 6 models: ...)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from .. import cli
from ..errors import MixerNASError
from .counting import count_params_macs
from .measure import DTYPES, InputSpec, measure_latency

DESCRIPTION = """\
Measure the latency of a preset or an architecture JSON file on this machine, print it with its spread and
context (device, threads, input, dtype, torch version), the parameter and MAC counts, and the per-device lookup
table's prediction beside it.

Units: latencies in milliseconds (ms) or microseconds (us); the measured value is the lowest round median
(noise only adds time) and the spread is how much slower the typical round was, in percent. Params and MACs
(multiply-accumulates, one forward pass at the given input) are counted by torch's FlopCounterMode.

The lookup table is cached per device, threads, torch version, batch, dtype and input size in
$MIXERNAS_CACHE_DIR, else $XDG_CACHE_HOME/mixernas, else ~/.cache/mixernas; parts of this architecture that
are not in it yet are measured first (a few seconds)."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m searchspace.latency", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="a preset name (e.g. PoolFormerV2-S12) or the path of an architecture JSON file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--input-size", default="224", metavar="N | HxW",
                   help="image size in pixels, square (224) or height x width (256x192) (default: 224)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads while measuring (default: torch's current count; 1 gives the "
                        "steadiest numbers on a small shared CPU)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute precision (default: float32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds before the agreement check (default: 5)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs before the rounds (default: 10)")
    p.add_argument("--round-ms", type=float, default=200.0,
                   help="target duration of one round in ms; sets the runs per round (default: 200)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: elapsed time (default); thread: CPU time of the measuring thread, which leaves out the "
                        "time other processes hold the core (needs --threads 1)")
    p.add_argument("--no-table", action="store_true", help="do not predict with the lookup table")
    p.add_argument("--rebuild-table", action="store_true",
                   help="forget this device's stored table entries and measure them again")
    p.add_argument("--cache-dir", default=None, help="folder of the lookup tables (default: see above)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return p


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"256x192"`` -> (256, 192) (height x width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", text)
    if match is None:
        raise MixerNASError(f"--input-size {text!r} is not a size; write N (square) or HxW, e.g. 224 or 256x192")
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) else h
    if h < 1 or w < 1:
        raise MixerNASError(f"--input-size {text!r} must be positive")
    return h, w


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def run(args: argparse.Namespace) -> int:
    from ..model import build_model, resolve_arch
    from .budget import format_ms

    height, width = parse_size(args.input_size)
    spec = InputSpec(batch=args.batch_size, channels=args.channels, height=height, width=width, dtype=args.dtype)
    arch = resolve_arch(args.arch)
    if isinstance(args.num_classes, bool) or args.num_classes < 0:
        raise MixerNASError(f"--num-classes must be >= 0, got {args.num_classes}")
    timer = None
    if args.clock == "thread":
        if args.threads != 1 or args.device != "cpu":
            raise MixerNASError("--clock thread measures one CPU thread; add --threads 1 (and --device cpu)")
        from .measure import thread_cpu_timer

        timer = thread_cpu_timer
    model = build_model(arch, num_classes=args.num_classes, in_chans=args.channels)
    result = measure_latency(model, spec, device=args.device, threads=args.threads, warmup=args.warmup,
                             rounds=args.rounds, target_round_ms=args.round_ms, timer=timer)
    counts = count_params_macs(model, spec)

    prediction = table = None
    if not args.no_table:
        from .table import LatencyTable

        table = LatencyTable.open(args.device, spec, threads=result.context.threads, cache_dir=args.cache_dir,
                                  rebuild=args.rebuild_table, num_classes=args.num_classes)
        prediction = table.predict(arch)

    error = None if prediction is None else (prediction.total_ms - result.value_ms) / result.value_ms
    if args.json:
        data = {"arch": arch.name or args.arch, "measured": result.to_dict(), "clock": args.clock,
                "params": counts.params,
                "macs": counts.macs, "counter": counts.counter}
        if prediction is not None:
            data["predicted_ms"] = prediction.total_ms
            data["predicted_sum_ms"] = prediction.sum_ms
            data["prediction_error"] = error
            data["breakdown_ms"] = prediction.breakdown
            data["table"] = str(table.path)
        print(json.dumps(data))
        return 0

    again = ", re-measured" if result.remeasured else ""
    print(f"{arch.name or args.arch}: {arch.summary()}")
    print(f"measured    {format_ms(result.value_ms)}  (spread {result.spread:.1%} over {result.rounds} rounds of "
          f"{result.runs_per_round} runs{again}; lowest round median)")
    clock = ", thread CPU time" if timer is not None else ""
    print(f"context     {result.context}{clock}")
    print(f"params      {_si(counts.params)}  ({counts.params:,})")
    print(f"MACs        {_si(counts.macs)}  ({counts.macs:,}, counted by {counts.counter})")
    if prediction is not None:
        print(f"predicted   {format_ms(prediction.total_ms)}  ({error:+.1%} vs measured; lookup table, "
              f"{prediction.calibration})")
        groups = ", ".join(f"{k} {format_ms(v)}" for k, v in prediction.breakdown.items())
        print(f"parts       {groups}")
        print(f"table       {table.path} ({len(table)} entries)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
