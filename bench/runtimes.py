"""The same architectures on each runtime: how much faster than eager PyTorch, and in which order?

For each input size: 20 random architectures of the default space and the presets are measured with every
runtime asked for (eager, torch.compile, ONNX Runtime, OpenVINO by default), one thread, batch 1, with the
search's protocol (the thread clock where the runtime computes on the calling thread, else the wall clock; the
reference workload's drift correction). Printed per runtime: its latency as a ratio to eager's (median, min, max),
the Kendall tau between its latency ranking and eager's (does a search judged on eager pick the wrong models for
this runtime's user?), and models it could not run. With ``--table``, a fresh lookup table per runtime is
calibrated as the search does and checked on the random architectures (the latency issue's targets: MAPE <= 4%,
>= 95% within +-10%, tau >= 0.95).

    python bench/runtimes.py                                    # 32 and 224, 20 archs + presets, 4 runtimes
    python bench/runtimes.py --sizes 32 --archs 8 --no-presets  # a quick look
    python bench/runtimes.py --sizes 32 --runtimes eager,onnxruntime,openvino --table
    python bench/runtimes.py --sizes 224 --no-presets --runtimes onnxruntime --table --table-only

The last line is ``key=value`` figures: ratio_<runtime>_<size>=.. tau_<runtime>_<size>=.. ... cpu=..
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
from searchspace.errors import MixerNASError  # noqa: E402
from searchspace.latency import InputSpec, clock_for, device_name, measure_many  # noqa: E402
from searchspace.latency.predictor import accuracy, kendall_tau  # noqa: E402
from searchspace.latency.table import LatencyTable, sample_archs  # noqa: E402
from searchspace.runtimes import get_runtime  # noqa: E402


def measure_on(runtime: str, models, labels, spec: InputSpec) -> dict[str, float]:
    """Latency (ms) of each model on ``runtime``; models it cannot run are reported and left out."""
    timer = clock_for("cpu", 1, runtime=runtime)
    times: dict[str, float] = {}
    for label, model in zip(labels, models):  # one by one: one failure must not cost the others
        try:
            [r] = measure_many([model], spec, threads=1, timer=timer, runtime=runtime, warmup=5)
        except MixerNASError as exc:
            print(f"  {runtime}: {label} failed: {exc}", file=sys.stderr)
            continue
        times[label] = r.value_ms
    return times


def table_check(runtime: str, spec: InputSpec, archs, seed: int):
    cache = tempfile.mkdtemp(prefix=f"mixernas-rt-{runtime}-")
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=cache, num_classes=10, runtime=runtime)
    table.ensure_calibrated(searchspace.get_space("default"), seed=seed)
    table.ensure(archs)  # their missing parts in full batches, not a few at a time beside the yardsticks
    predicted = [table.predict(a).total_ms for a in archs]
    models = [table.model(a) for a in archs]  # as the table predicts them
    measured = [r.value_ms for r in measure_many(models, spec, threads=1, runtime=runtime,
                                                  timer=clock_for("cpu", 1, runtime=runtime),
                                                  reference=table.reference())]
    return accuracy(predicted, measured)


def run_size(size: int, args) -> dict[str, float]:
    spec = InputSpec(channels=args.channels, height=size, width=size)
    archs = sample_archs(searchspace.get_space("default"), args.archs, seed=args.seed)
    labels = [f"arch{i}" for i in range(len(archs))]
    models = [searchspace.build_model(a, num_classes=10, in_chans=args.channels).eval() for a in archs]
    if not args.no_presets:
        for name in searchspace.list_presets():
            labels.append(name)
            models.append(searchspace.build_model(searchspace.preset(name), num_classes=10,
                                                  in_chans=args.channels).eval())
    print(f"\n== input {size}x{size}x{args.channels}, 1 thread, batch 1, {len(models)} models, on "
          f"{device_name('cpu')}")
    results: dict[str, dict[str, float]] = {}
    for runtime in args.runtimes:
        if args.table_only:
            results[runtime] = {}
            continue
        start = time.perf_counter()
        results[runtime] = measure_on(runtime, models, labels, spec)
        print(f"  {runtime}: {len(results[runtime])} of {len(models)} measured in {time.perf_counter() - start:.0f} s "
              f"({get_runtime(runtime).check('cpu')})", file=sys.stderr)
    eager = results.get("eager", {})
    figures: dict[str, float] = {}
    print(f"{'runtime':>12} {'models':>6} {'ratio to eager: median':>23} {'min':>6} {'max':>6} {'tau vs eager':>13}"
          f" {'table':>40}")
    for runtime, times in results.items():
        common = [k for k in labels if k in times and k in eager]
        ratios = [times[k] / eager[k] for k in common]
        tau = kendall_tau([times[k] for k in common], [eager[k] for k in common]) if len(common) > 1 else float("nan")
        table = ""
        if args.table:
            acc = table_check(runtime, spec, sample_archs(searchspace.get_space("default"), args.archs,
                                                           seed=args.seed + 500), args.seed)
            table = f"MAPE {acc.mape:.1%}, {acc.within10:.0%} within, tau {acc.tau:.3f}"
            figures.update({f"table_mape_{runtime}_{size}": acc.mape, f"table_within10_{runtime}_{size}": acc.within10,
                            f"table_tau_{runtime}_{size}": acc.tau})
        if ratios:
            print(f"{runtime:>12} {len(times):>6} {statistics.median(ratios):>23.2f} {min(ratios):>6.2f} "
                  f"{max(ratios):>6.2f} {tau:>13.3f} {table:>40}")
            if runtime != "eager":
                slowest = max(common, key=lambda k: times[k] / eager[k])
                print(f"{'':>12} slowest against eager: {slowest}, {times[slowest]:.2f} ms against "
                      f"{eager[slowest]:.2f} ms")
            figures.update({f"ratio_{runtime}_{size}": statistics.median(ratios),
                            f"ratio_min_{runtime}_{size}": min(ratios), f"ratio_max_{runtime}_{size}": max(ratios),
                            f"tau_{runtime}_{size}": tau})
        if not args.table_only:
            figures[f"failed_{runtime}_{size}"] = len(models) - len(times)
        elif table:
            print(f"{runtime:>12} {table}")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,224", help="input sizes, comma-separated (default: 32,224)")
    p.add_argument("--archs", type=int, default=20, help="random architectures of the default space (default: 20)")
    p.add_argument("--no-presets", action="store_true", help="leave the presets out")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--runtimes", default="eager,compile,onnxruntime,openvino",
                   help="comma-separated (default: eager,compile,onnxruntime,openvino)")
    p.add_argument("--table", action="store_true", help="also calibrate and check a fresh lookup table per runtime")
    p.add_argument("--table-only", action="store_true",
                   help="with --table: only the table check, none of the side-by-side ratios to eager")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.table_only and not args.table:
        p.error("--table-only needs --table")
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    for runtime in args.runtimes:
        get_runtime(runtime).check("cpu")  # a missing extra is one line now, not after the eager measurements
    figures: dict[str, float] = {}
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        figures.update(run_size(size, args))
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()) + f" cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
