"""Every shipped recipe, run by the command line on a timm checkpoint and on a search winner, then reloaded.

What a user does, end to end, for each ``recipes/*.yaml``:

1. **A timm checkpoint.** ``timm.create_model(<timm>, num_classes=10)`` (default ``caformer_s18``: conv stages and
   attention stages, so every recipe has something to work on) is fine-tuned on the built-in digits at
   ``--input-size`` and saved the way timm's ``train.py`` saves: ``{"epoch", "arch", "state_dict", "optimizer",
   "version"}`` in a ``.pth.tar``. Then ``python -m compress --recipe R --model <timm> --checkpoint <file>``.
2. **A search winner.** ``python -m compress --recipe R --model <results folder>`` on the folder
   ``search.py`` wrote (``--winner``, default ``runs/default-5.00ms``, the README's main job).

Each command runs in its own process, exactly as typed by a user. Afterwards this script reloads the written model
with ``compress.load`` (no pickles: a JSON description plus safetensors) and checks that it *is* the compressed
model: the same parameter count as ``report.json`` says and the same validation accuracy, recomputed here on the
same split. ``fit-budget.yaml`` ships with a 5 ms target; here its target is set to ``--fit-fraction`` (0.75) of
each model's own measured latency so that it has to prune (the only change made to any recipe).

    python bench/recipes.py                              # 4 recipes x 2 models, ~20-30 min on 2 CPU cores
    python bench/recipes.py --recipes prune-50-kd --skip-winner

Last line: ``recipes_ok=N/M ...`` and per run ``<recipe>@<model>_speedup=..`` (side-by-side, original / compressed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compress  # noqa: E402
from searchspace.data import load_data  # noqa: E402
from searchspace.evaluators import validate  # noqa: E402
from searchspace.latency import InputSpec, measure_latency  # noqa: E402
from searchspace.latency.measure import num_threads  # noqa: E402


def make_timm_checkpoint(name: str, input_size: int, epochs: int, path: Path) -> None:
    """Fine-tune ``name`` (random init, 10 classes) on the digits and save it in timm's training layout."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10)
    model, data, _ = compress.adapt_to_data(model, load_data(input_size=input_size))
    recipe = {"name": "train", "steps": [{"finetune": {"epochs": epochs}}]}
    trained, report = compress.apply(recipe, model, data=data, threads=2, step_latency=False, side_by_side=False,
                                     log=lambda _: None)
    print(f"  {name}: trained {epochs} epochs at {input_size}px, accuracy {report.after['accuracy']:.4f}")
    torch.save({"epoch": epochs, "arch": name, "state_dict": trained.state_dict(), "version": 2}, path)


def recipe_file(path: Path, model: str, checkpoint: Path | None, input_size: int | None, fraction: float,
                work: Path) -> Path:
    """The recipe as shipped; for fit_budget, the target set to ``fraction`` of the model's measured latency."""
    data = yaml.safe_load(path.read_text())
    fit = [s for s in data["steps"] if isinstance(s, dict) and "fit_budget" in s]
    if not fit:
        return path
    loaded = compress.create_model(model, checkpoint=checkpoint, input_size=input_size)
    bundle = load_data(input_size=input_size)
    net, bundle, _ = compress.adapt_to_data(loaded.model, bundle)
    spec = InputSpec(1, bundle.in_chans, bundle.input_size, bundle.input_size)
    with num_threads(1):
        ms = measure_latency(net.eval(), spec, threads=1).value_ms
    fit[0]["fit_budget"]["target"] = f"{fraction * ms:.3f}ms"
    out = work / f"{path.stem}-{Path(str(model)).name}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"  fit_budget target for {Path(str(model)).name}: {fraction:.2f} x {ms:.2f} ms = {fraction * ms:.2f} ms")
    return out


def run_cli(recipe: Path, model: str, checkpoint: Path | None, input_size: int | None, out: Path,
            threads: int) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "compress", "--recipe", str(recipe), "--model", str(model), "--out", str(out),
           "--threads", str(threads), "--quiet"]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if input_size is not None:
        cmd += ["--input-size", str(input_size)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return done.returncode, time.perf_counter() - start, (done.stderr.strip().splitlines() or [""])[-1]


def verify(out: Path, input_size: int | None) -> dict:
    """Reload the written model and check it against its own report."""
    report = json.loads((out / "report.json").read_text())
    model = compress.load(out / "model").eval()
    bundle = load_data(input_size=input_size)
    model, bundle, _ = compress.adapt_to_data(model, bundle)
    with num_threads(2):
        accuracy, _ = validate(model, bundle.val)
    params = sum(p.numel() for p in model.parameters())
    after = report["after"]
    return {
        "report": report,
        "params_match": params == after["params"],
        "accuracy_match": abs(accuracy - after["accuracy"]) < 1e-9,
        "reloaded_accuracy": accuracy,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", default="caformer_s18", help="timm model for the checkpoint (default: caformer_s18)")
    p.add_argument("--input-size", type=int, default=64, help="pixels for the timm model (default: 64)")
    p.add_argument("--train-epochs", type=int, default=2, help="fine-tuning of the timm checkpoint (default: 2)")
    p.add_argument("--winner", default="runs/default-5.00ms", help="search results folder (default: %(default)s)")
    p.add_argument("--recipes", default="prune-50-kd,token-keep-70,lowrank-kd,fit-budget",
                   help="recipes/<name>.yaml, comma-separated (default: all four shipped)")
    p.add_argument("--fit-fraction", type=float, default=0.75,
                   help="fit_budget target as a fraction of the model's own latency (default: 0.75)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each compress run (default: 1)")
    p.add_argument("--skip-timm", action="store_true")
    p.add_argument("--skip-winner", action="store_true")
    p.add_argument("--work", default=None, help="keep outputs here (default: a temporary folder)")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixernas-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    targets: list[tuple[str, str, Path | None, int | None]] = []  # label, --model, --checkpoint, --input-size
    if not args.skip_timm:
        ckpt = work / f"{args.timm}-digits.pth.tar"
        if not ckpt.exists():
            print(f"making a timm checkpoint: {args.timm}")
            make_timm_checkpoint(args.timm, args.input_size, args.train_epochs, ckpt)
        targets.append((args.timm, args.timm, ckpt, args.input_size))
    if not args.skip_winner:
        winner = (ROOT / args.winner) if not Path(args.winner).is_absolute() else Path(args.winner)
        if not (winner / "best.json").exists():
            print(f"no search results in {winner}: run `python search.py --latency-budget 5ms` first", file=sys.stderr)
            return 2
        targets.append(("winner", str(winner), None, None))

    rows, figures, ok = [], {}, 0
    for name in args.recipes.split(","):
        path = ROOT / "recipes" / f"{name}.yaml"
        for label, model, ckpt, size in targets:
            recipe = recipe_file(path, model, ckpt, size, args.fit_fraction, work)
            out = work / f"{name}@{label}"
            code, seconds, last = run_cli(recipe, model, ckpt, size, out, args.threads)
            if code != 0:
                rows.append((name, label, "FAILED", last))
                print(f"{name} on {label}: exit {code}: {last}")
                continue
            check = verify(out, size)
            rep = check["report"]
            before, after, change = rep["before"], rep["after"], rep["change"]
            good = check["params_match"] and check["accuracy_match"]
            ok += good
            key = f"{name}@{label}".replace("-", "_")
            figures[f"{key}_speedup"] = change.get("speedup", float("nan"))
            figures[f"{key}_acc_change"] = change.get("accuracy_change", float("nan"))
            line = (f"{before['params'] / 1e6:.2f}M -> {after['params'] / 1e6:.2f}M params, "
                    f"{rep['side_by_side']['before_ms']:.2f} -> {rep['side_by_side']['after_ms']:.2f} ms "
                    f"({change['speedup']:.2f}x), accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, "
                    f"reloaded {check['reloaded_accuracy']:.4f} ({'match' if good else 'MISMATCH'}), {seconds:.0f} s")
            rows.append((name, label, "ok" if good else "MISMATCH", line))
            print(f"{name} on {label}: {line}")

    print()
    for name, label, state, line in rows:
        print(f"{name:14s} {label:14s} {state:8s} {line}")
    print(f"outputs in {work}")
    total = len(args.recipes.split(",")) * len(targets)
    print(" ".join([f"recipes_ok={ok}/{total}"] + [f"{k}={v:.3f}" for k, v in figures.items()]))
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
