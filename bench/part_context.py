"""How much of a model's latency do its parts tell, timed alone, stage by stage, or one after another?

The latency table times each part (stem, block, downsampling layer, head) alone, in a loop, and predicts a model
from the sum. This bench measures, side by side in one process on the same architectures, what that loses:

* ``chain``: the model's parts, each built on its own as the table builds it, run one after another as one
  model: the same work as the model, only the modules are the table's;
* ``stages``: each stage (its downsampling layer and blocks) timed as one piece, plus the stem and the head;
* ``alone``: each part timed alone, as the table times it, and summed;
* ``again``: the whole models measured a second time (the clock's own repeatability, the ceiling).

Each is compared with the whole models after one common scale (the median of model / sum): mean error and
Kendall tau of the ranking. What ``alone`` loses against ``chain`` is the parts' context inside a model (what
ran before them, what their caches hold), which no part timed alone sees.

    python bench/part_context.py                  # 16 architectures of the default space at 32x32x1
    python bench/part_context.py --size 64 --archs 12

The last line is ``key=value`` figures: mape_chain=.. tau_chain=.. mape_stages=.. ... cpu=..
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import searchspace  # noqa: E402
from bench.part_protocol import against_whole  # noqa: E402
from searchspace.latency import InputSpec, device_name, measure_many  # noqa: E402
from searchspace.latency.measure import thread_cpu_timer  # noqa: E402
from searchspace.latency.table import LatencyTable, sample_archs  # noqa: E402
from searchspace.model import build_model  # noqa: E402


class Chain(nn.Module):
    """Modules run one after another."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=16, help="architectures of the default space (default: 16)")
    p.add_argument("--size", type=int, default=32, help="input height and width in pixels (default: 32)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default: 1, the digits)")
    p.add_argument("--seed", type=int, default=77)
    args = p.parse_args(argv)

    spec = InputSpec(channels=args.channels, height=args.size, width=args.size)
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=tempfile.mkdtemp(prefix="mixernas-context-"),
                              num_classes=10)
    archs = sample_archs(searchspace.get_space("default"), args.archs, seed=args.seed)
    print(f"{len(archs)} architectures at {args.size}x{args.size}x{args.channels}, one thread, thread clock, on "
          f"{device_name('cpu')}; timing the parts alone (the table)", flush=True)
    table.ensure(archs, progress=False)
    models, chains, pieces, piece_specs, owner, alone = [], [], [], [], [], []
    for k, arch in enumerate(archs):
        uses = table.parts(arch)
        models.append(build_model(arch, num_classes=10, in_chans=args.channels))
        chains.append(Chain([u.part.build() for u in uses]))
        alone.append(sum(table.get(u.part) for u in uses))
        stages: dict[str, list] = {}
        for u in uses:
            stages.setdefault(u.label if u.stage is None else f"s{u.stage}", []).append(u)
        for group in stages.values():
            pieces.append(Chain([u.part.build() for u in group]))
            piece_specs.append(group[0].part.input_spec(1, "float32"))
            owner.append(k)

    def measure(modules, specs):
        return [r.value_ms for r in measure_many(modules, specs, threads=1, timer=thread_cpu_timer, reference=False)]

    print("timing the whole models, the chains and the stages", flush=True)
    whole = measure(models, spec)
    chain = measure(chains, spec)
    stage = [0.0] * len(archs)
    for k, ms in zip(owner, measure(pieces, piece_specs)):
        stage[k] += ms
    again = measure(models, spec)
    out = {}
    for name, sums in (("again", again), ("chain", chain), ("stages", stage), ("alone", alone)):
        scale, mape, tau = against_whole(sums, whole)
        out[f"mape_{name}"], out[f"tau_{name}"] = mape, tau
        print(f"{name:7s} x {scale:.3f}: misses the whole models by {mape:.2%} on average, Kendall tau {tau:.3f}")
    print(" ".join(f"{k}={v:.4g}" for k, v in out.items())
          + f" size={args.size} archs={len(archs)} cpu={device_name('cpu').replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
