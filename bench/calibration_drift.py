"""Do the same whole models measure alike in one process, whatever else is measured with them?

``bench/latency_table.py`` measures the calibration's models again at its end and finds them reading a few percent
slower than at the calibration, minutes before (its ``drift``). This bench asks whether that comes with what a
measurement holds: in one process it measures the table's 16 calibration architectures of the default space
(``measure_many``, as the table does: interleaved rounds, one thread, the thread clock, the two-model reference)

- ``A``: the 16 alone;
- ``B``: the 16 among 30 other architectures (the check's company);
- ``C``: the 16 alone again (the same module objects: the process is older, its heap fuller);
- ``D``: fresh copies of the 16, alone (the same weights' values at new addresses);
- ``E``: the 30 first and the 16 last.

and prints how far each step moved the 16 (mean signed and mean absolute relative change), corrected and raw.
Moves within the noise floor (about 1%) say that the company, the process's age and where the weights lie are not
what moves a calibration.

    python bench/calibration_drift.py              # 32x32x1
    python bench/calibration_drift.py --size 64

The last line is ``key=value`` figures: a_b=.. a_c=.. c_d=.. b_e=.. a_e=.. (mean signed moves) ... cpu=..
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
from searchspace.latency import InputSpec, device_name, measure_many  # noqa: E402
from searchspace.latency.measure import reference_for, thread_cpu_timer  # noqa: E402
from searchspace.latency.table import CALIBRATION_MODELS, sample_archs  # noqa: E402
from searchspace.model import build_model  # noqa: E402


def moved(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean signed and mean absolute relative change from ``before`` to ``after``."""
    d = [(b - a) / a for a, b in zip(before, after)]
    return statistics.fmean(d), statistics.fmean(abs(v) for v in d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--others", type=int, default=30, help="other architectures in B and E (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="as bench/latency_table.py's (default: 0)")
    args = p.parse_args(argv)
    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    space = searchspace.get_space("default")
    calibration = sample_archs(space, CALIBRATION_MODELS, seed=args.seed)
    others = sample_archs(space, args.others, seed=args.seed + 1000, exclude=calibration)
    reference = reference_for("cpu", spec, 1, timer=thread_cpu_timer, cache_dir=tempfile.mkdtemp())
    build = lambda archs: [build_model(a, num_classes=10, in_chans=args.channels) for a in archs]  # noqa: E731
    cal_models, other_models = build(calibration), build(others)
    print(f"{len(calibration)} calibration and {len(others)} other architectures at {args.size}x{args.size}x"
          f"{args.channels}, one thread, thread clock, two-model reference, on {device_name('cpu')}")

    def run(label: str, models: list) -> tuple[list[float], list[float]]:
        start = time.perf_counter()
        results = measure_many(models, spec, threads=1, timer=thread_cpu_timer, reference=reference)
        print(f"{label}: {len(models)} models in {time.perf_counter() - start:.0f} s", flush=True)
        return [r.value_ms for r in results], [r.raw_ms for r in results]

    n = len(calibration)
    a, a_raw = run("A the 16 alone", cal_models)
    b, b_raw = run("B the 16 among the others", cal_models + other_models)
    c, c_raw = run("C the 16 alone again", cal_models)
    d, d_raw = run("D fresh copies of the 16 alone", build(calibration))
    e, e_raw = run("E the others first, the 16 last", other_models + cal_models)
    steps = {"a_b": (a, b[:n], a_raw, b_raw[:n]), "a_c": (a, c, a_raw, c_raw), "c_d": (c, d, c_raw, d_raw),
             "b_e": (b[:n], e[-n:], b_raw[:n], e_raw[-n:]), "a_e": (a, e[-n:], a_raw, e_raw[-n:])}
    figures = {}
    for name, (before, after, before_raw, after_raw) in steps.items():
        signed, absolute = moved(before, after)
        raw_signed, _ = moved(before_raw, after_raw)
        print(f"{name.replace('_', ' -> ').upper()}: the 16 moved {signed:+.2%} on average ({absolute:.2%} absolute); "
              f"uncorrected {raw_signed:+.2%}")
        figures[name] = signed
        figures[f"{name}_abs"] = absolute
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items())
          + f" size={args.size} cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
