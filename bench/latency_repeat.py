"""One model measured in several separate processes, one after another: how far apart do they land?

Each process is a fresh ``python -m searchspace.latency <model> --no-table --json`` (new interpreter, new
allocator, new thread pool), so the spread includes everything that differs between two runs of the tool, not
only the noise inside one. The defaults are what the search measures with: the main job's input (32x32, one
channel), one thread, the thread clock, the reference workload's drift correction (its anchor is measured by the
first process and read by the others, as on a user's machine). ``--no-reference`` shows the same without it.
``--load`` keeps the other core busy with a second process while measuring.

Target (issue 11): spread across processes (max - min) / min <= 2%.

    python bench/latency_repeat.py                                  # PoolFormerV2-S12, 32x32x1, 3 processes
    python bench/latency_repeat.py --model CAFormer-S18 --input-size 64 --channels 3 --processes 5
    python bench/latency_repeat.py --load                           # the other core busy meanwhile

Last line: ``process_spread=.. min_ms=.. max_ms=.. ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import busy_core  # noqa: E402

TARGET = 0.02


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PoolFormerV2-S12", help="preset or arch JSON (default: PoolFormerV2-S12)")
    p.add_argument("--input-size", default="32", help="N or HxW (default: 32, the main job's)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--processes", type=int, default=3, help="separate processes (default: 3)")
    p.add_argument("--clock", choices=("wall", "thread"), default="thread",
                   help="the measuring thread's CPU time (default, as the search) or the wall clock")
    p.add_argument("--no-reference", action="store_true", help="measure without the reference's drift correction")
    p.add_argument("--tolerance", type=float, default=None,
                   help="the relative half-width of each measurement's 95%% interval to reach (default: the CLI's)")
    p.add_argument("--max-extra-rounds", type=int, default=None,
                   help="most rounds each measurement adds to get there (default: the CLI's)")
    p.add_argument("--load", action="store_true", help="keep the other core busy with a second process")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder for the reference's anchor (default: a fresh temporary folder)")
    args = p.parse_args(argv)

    cache = args.cache_dir or tempfile.mkdtemp(prefix="mixernas-repeat-")
    env = {**os.environ, "MIXERNAS_CACHE_DIR": cache}
    values, rows = [], []
    with busy_core(args.load):
        for i in range(args.processes):
            cmd = [sys.executable, "-m", "searchspace.latency", args.model, "--input-size", args.input_size,
                   "--channels", str(args.channels), "--threads", str(args.threads), "--clock", args.clock,
                   "--no-table", "--json", *(["--no-reference"] if args.no_reference else []),
                   *(["--tolerance", str(args.tolerance)] if args.tolerance is not None else []),
                   *(["--max-extra-rounds", str(args.max_extra_rounds)] if args.max_extra_rounds is not None else [])]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            m = json.loads(done.stdout)["measured"]
            values.append(m["value_ms"])
            rows.append(m)
            drift = f", machine at {m['drift']:.2f}x the anchor" if m.get("drift") else ""
            print(f"process {i + 1}: {m['value_ms']:.3f} ms +-{m['precision']:.1%} (95% interval, "
                  f"{len(m['round_medians_ms'])} rounds of {m['runs_per_round']} runs; uncorrected "
                  f"{m['raw_ms']:.3f} ms{drift})")
    ctx = rows[-1]["context"]
    spread = (max(values) - min(values)) / min(values)
    raw = [m["raw_ms"] for m in rows]
    raw_spread = (max(raw) - min(raw)) / min(raw)
    verdict = "ok" if spread <= TARGET else "MISSED"
    print(f"{args.model} at {args.input_size} x {args.channels} channel(s), {ctx['threads']} thread(s) on "
          f"{ctx['device_name']}, torch {ctx['torch_version']}, {args.clock} clock, "
          f"{'reference-corrected' if not args.no_reference else 'no reference'}, "
          f"{'other core busy' if args.load else 'idle'}")
    print(f"spread across {args.processes} processes: {spread:.2%} (target <= {TARGET:.0%}: {verdict}); "
          f"uncorrected round medians {raw_spread:.2%}")
    print(f"process_spread={spread:.4f} raw_spread={raw_spread:.4f} min_ms={min(values):.3f} max_ms={max(values):.3f} "
          f"max_precision={max(m['precision'] for m in rows):.4f} processes={args.processes} "
          f"load={int(args.load)} cpu={ctx['device_name'].replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
