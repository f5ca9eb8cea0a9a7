"""One reference model measured in three separate processes, one after another: how far apart do they land?

Each process is a fresh ``python -m searchspace.latency <model> --no-table --json`` (new interpreter, new
allocator, new thread pool), so the spread includes everything that differs between two runs of the tool, not
only the noise inside one. Target (issue 3): spread across processes <= 3%.

    python bench/latency_repeat.py                                  # PoolFormerV2-S12 at 224, 1 thread
    python bench/latency_repeat.py --model CAFormer-S18 --input-size 64 --processes 5

Last line: ``process_spread=.. min_ms=.. max_ms=.. ...`` (spread = (max - min) / min of the processes' results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.03


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PoolFormerV2-S12", help="preset or arch JSON (default: PoolFormerV2-S12)")
    p.add_argument("--input-size", default="224", help="N or HxW (default: 224)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--processes", type=int, default=3, help="separate processes (default: 3)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per process (default: 5)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall clock (default) or the measuring thread's CPU time (with --threads 1)")
    args = p.parse_args(argv)

    values, spreads = [], []
    for i in range(args.processes):
        cmd = [sys.executable, "-m", "searchspace.latency", args.model, "--input-size", args.input_size,
               "--threads", str(args.threads), "--rounds", str(args.rounds), "--clock", args.clock,
               "--no-table", "--json"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        data = json.loads(done.stdout)
        m = data["measured"]
        values.append(m["value_ms"])
        spreads.append(m["spread"])
        print(f"process {i + 1}: {m['value_ms']:.3f} ms (spread within the process {m['spread']:.1%}, "
              f"{len(m['round_medians_ms'])} rounds of {m['runs_per_round']} runs)")
    ctx = data["measured"]["context"]
    spread = (max(values) - min(values)) / min(values)
    verdict = "ok" if spread <= TARGET else "MISSED"
    print(f"{args.model} at {args.input_size}, {ctx['threads']} thread(s) on {ctx['device_name']}, "
          f"torch {ctx['torch_version']}, {args.clock} clock")
    print(f"spread across {args.processes} processes: {spread:.2%} (target <= {TARGET:.0%}: {verdict})")
    print(f"process_spread={spread:.4f} min_ms={min(values):.3f} max_ms={max(values):.3f} "
          f"max_within_process_spread={max(spreads):.4f} processes={args.processes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
