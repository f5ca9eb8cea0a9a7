"""``python -m searchspace.latency <preset | arch.json>``: measure a model here, with its interval, context,
counts and the lookup table's prediction beside the measurement.

``python -m searchspace.latency build --space default --input-size 32 --channels 1``: build, calibrate and
check this device's lookup table, and print what its predictions are worth here.

    $ python -m searchspace.latency PoolFormerV2-S12 --input-size 224 --threads 1
    PoolFormerV2-S12: pooling x2 @64 | pooling x2 @128 | pooling x6 @320 | pooling x2 @512
    measured    35.1 ms +-0.8% (95% interval 34.9 ms to 35.4 ms; 10 rounds of 3 runs, reference-corrected ...)
    context     AMD EPYC [cpu], 1 thread, 1x3x224x224 nchw float32, steady-allocator, reference-corrected, ...
    params      11.89 M
    MACs        1.81 G  (counted by torch FlopCounterMode)
    predicted   34.6 ms  (-1.4% vs measured; lookup table, the mean of 3 forms (...), fitted on 16 models ...)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from .. import cli
from ..errors import MixerNASError
from ..runtimes import get_runtime
from .counting import count_params_macs
from .measure import InputSpec, clock_for, measure_latency, thread_cpu_timer
from .table import CALIBRATION_MODELS

DESCRIPTION = """\
Measure the latency of a preset or an architecture JSON file on this machine, print it with its 95% interval and
context (device, threads, input, dtype, torch version), the parameter and MAC counts, and the per-device lookup
table's prediction beside it.

Units: latencies in milliseconds (ms) or microseconds (us). The measured value is the median over short
interleaved rounds; on the CPU each round is divided by a fixed reference workload timed in the same round (a
light and a weight-heavy model, their geometric mean) and multiplied by that reference's anchor (its value on
this machine, measured once and cached), so the machine's own drift divides out. The +-% is the half-width of
the value's 95% interval; rounds are added until it is within --tolerance, or the line says it could not get
there. Params and MACs (multiply-accumulates, one forward pass at the given input) are counted by torch's
FlopCounterMode.

To build and check a whole table first: python -m searchspace.latency build --help.

The lookup table is cached per device, threads, torch version, batch, dtype and input size in
$MIXERNAS_CACHE_DIR, else $XDG_CACHE_HOME/mixernas, else ~/.cache/mixernas; parts of this architecture that
are not in it yet are measured first (a few seconds)."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m searchspace.latency", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="a preset name (e.g. PoolFormerV2-S12) or the path of an architecture JSON file")
    _input_arguments(p)
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads while measuring (default: torch's current count; 1 gives the "
                        "steadiest numbers on a small shared CPU)")
    p.add_argument("--rounds", type=int, default=10, help="rounds before the interval is checked (default: 10)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="half-width of the 95%% interval to reach, as a fraction (default: 0.02 = +-2%%)")
    p.add_argument("--max-extra-rounds", type=int, default=40,
                   help="most rounds added while the interval is wider than --tolerance (default: 40)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed runs at least before the rounds; warm-up goes on until steady (default: 10)")
    p.add_argument("--round-ms", type=float, default=20.0,
                   help="target duration of one round in ms; sets the runs per round (default: 20)")
    p.add_argument("--no-reference", action="store_true",
                   help="CPU: report plain round medians, without the reference workload's drift correction")
    p.add_argument("--clock", choices=("auto", "wall", "thread"), default="auto",
                   help="thread: CPU time of the measuring thread, which leaves out the time other processes hold "
                        "the core (needs --threads 1); wall: elapsed time; auto (default): thread with --threads 1 "
                        "on the CPU, as the search measures, else wall")
    p.add_argument("--no-table", action="store_true", help="do not predict with the lookup table")
    p.add_argument("--rebuild-table", action="store_true",
                   help="forget this device's stored table entries and measure them again")
    p.add_argument("--cache-dir", default=None, help="folder of the lookup tables (default: see above)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return p


def _input_arguments(p: argparse.ArgumentParser) -> None:
    """The device and input flags both commands share."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--input-size", default="224", metavar="N | HxW",
                   help="image size in pixels, square (224) or height x width (256x192) (default: 224)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default: 3; the digits have 1)")
    cli.add_run_arguments(p)


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
    dtype, options = cli.run_options(args, args.device)
    spec = InputSpec(batch=args.batch_size, channels=args.channels, height=height, width=width, dtype=dtype)
    arch = resolve_arch(args.arch)
    if isinstance(args.num_classes, bool) or args.num_classes < 0:
        raise MixerNASError(f"--num-classes must be >= 0, got {args.num_classes}")
    if args.clock == "thread" and not (args.threads == 1 and args.device == "cpu"):
        raise MixerNASError("--clock thread measures one CPU thread; add --threads 1 (and --device cpu)")
    runtime = get_runtime(args.runtime)
    timer = clock_for(args.device, args.threads, args.clock, runtime)
    model = build_model(arch, num_classes=args.num_classes, in_chans=args.channels)
    table = None
    reference: object = False if args.no_reference else "auto"
    if not args.no_table:
        from .table import LatencyTable

        # opened first: the measurement is corrected by the same reference anchor as the table's entries
        table = LatencyTable.open(args.device, spec, threads=args.threads, cache_dir=args.cache_dir,
                                  rebuild=args.rebuild_table, num_classes=args.num_classes, runtime=runtime.name,
                                  options=options)
        if not args.no_reference:
            reference = table.reference() or False
    result = measure_latency(model, spec, device=args.device, threads=args.threads, warmup=args.warmup,
                             rounds=args.rounds, target_round_ms=args.round_ms, timer=timer,
                             tolerance=args.tolerance, max_extra_rounds=args.max_extra_rounds, reference=reference,
                             runtime=runtime, **options.kwargs())
    counts = count_params_macs(model, spec)
    prediction = table.predict(arch) if table is not None else None

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

    print(f"{arch.name or args.arch}: {arch.summary()}")
    print(f"measured    {result.describe()}")
    clock = ", thread CPU time" if timer is thread_cpu_timer else ""
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


BUILD_DESCRIPTION = """\
Build, calibrate and check this device's latency table for a search space, and print what its predictions are
worth on this machine before a search relies on them.

1. Every part the space can use at this input (stem, blocks, downsampling layers, head) is measured, with a
   progress bar (parts already in the cache are kept; --rebuild measures everything again).
2. --models whole architectures drawn from the space are measured and the predictor is fitted on them (the form
   is the mean of the forms whose leave-one-out error is near the best one's).
3. --check further architectures, not used by the fit, are predicted and then measured: their mean absolute
   percentage error, share within +-10% and Kendall tau are the table's accuracy here. They refine the table
   afterwards.

Latencies are in ms, measured as `python -m searchspace.latency --help` describes (reference-corrected on the
CPU). The table is cached per device, threads, torch version, batch, channels, dtype and input size."""


def build_build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m searchspace.latency build", description=BUILD_DESCRIPTION,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="default", help="search space name or package.module:function (default: default)")
    _input_arguments(p)
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default: 10, the digits)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on the CPU, as the search measures)")
    p.add_argument("--models", type=int, default=CALIBRATION_MODELS,
                   help=f"whole models the predictor is fitted on (default: {CALIBRATION_MODELS}, as the search)")
    p.add_argument("--check", type=int, default=10,
                   help="further whole models predicted, then measured, to check the table (default: 10; 0 = skip)")
    p.add_argument("--seed", type=int, default=0, help="which architectures are drawn (default: 0)")
    p.add_argument("--rebuild", action="store_true", help="forget this key's entries, calibration and anchor first")
    p.add_argument("--cache-dir", default=None, help="folder of the lookup tables (default: the user cache)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of text")
    return p


def run_build(args: argparse.Namespace) -> int:
    import time

    from ..space import get_space
    from .table import LatencyTable, sample_archs

    height, width = parse_size(args.input_size)
    dtype, options = cli.run_options(args, args.device)
    spec = InputSpec(batch=args.batch_size, channels=args.channels, height=height, width=width, dtype=dtype)
    for name in ("models", "check"):
        if getattr(args, name) < 0:
            raise MixerNASError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if isinstance(args.num_classes, bool) or args.num_classes < 0:
        raise MixerNASError(f"--num-classes must be >= 0, got {args.num_classes}")
    if args.models < 4:
        raise MixerNASError(f"--models {args.models} is too few to fit and check a predictor; use 4 or more")
    space = get_space(args.space)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    start = time.perf_counter()
    table = LatencyTable.open(args.device, spec, threads=threads, cache_dir=args.cache_dir, rebuild=args.rebuild,
                              num_classes=args.num_classes, runtime=args.runtime, options=options)
    before = len(table)
    try:
        table.build_for_space(space)
    except MixerNASError:  # a define-by-run space: its parts are measured with the models drawn from it
        pass
    calibration = table.ensure_calibrated(space, models=args.models, seed=args.seed)
    have = {o.arch for o in table.observations}
    checked = None
    if args.check:
        archs = sample_archs(space, args.check, seed=args.seed + 1, exclude=have)
        print(f"checking the table on {len(archs)} architectures it was not fitted on", file=sys.stderr)
        checked = table.check(archs)
    seconds = time.perf_counter() - start
    built = len(table) - before
    ref = table.reference()
    if args.json:
        data = {"table": str(table.path), "parts": len(table), "measured_now": built, "seconds": seconds,
                "calibration": calibration.to_dict(), "check": None if checked is None else vars(checked),
                "refined": table.calibration.to_dict(), "device_name": table.key.device_name,
                "anchor_ms": None if ref is None else ref.anchor.ms}
        print(json.dumps(data))
        return 0
    print(f"table       {table.path}")
    print(f"device      {table.key.device_name} [{table.key.device}], {table.key.threads} thread(s), input "
          f"{spec.batch}x{spec.channels}x{spec.height}x{spec.width} {spec.dtype}, torch {table.key.torch_version}, "
          f"runtime {table.key.runtime} {table.key.runtime_version}")
    if ref is not None:
        print(f"reference   anchor {ref.anchor.ms:.3f} ms +-{ref.anchor.precision:.1%} (every CPU figure is "
              f"corrected by it)")
    print(f"parts       {len(table)} in the table ({built} measured now); {seconds:.0f} s in all")
    print(f"fitted      {calibration}")
    if checked is not None:
        print(f"held out    {checked}  <- what the table's predictions are worth on this machine")
    print(f"refined     {table.calibration}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        return cli.main(build_build_parser(), run_build, argv[1:])
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
