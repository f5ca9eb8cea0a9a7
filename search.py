#!/usr/bin/env python
"""Find the most accurate MetaFormer backbone whose measured latency on this device fits a budget.

    python search.py --latency-budget 5ms

With no other flags it searches the default space on scikit-learn's handwritten digits (shipped with the package,
no download), measures latency on this machine's device, and writes a results folder (runs/<space>-<budget>):
best architecture and trained weights, trials.csv, plots and report.md. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import sys

from searchspace import cli

EPILOG = """\
units: the budget is a latency with its unit (5ms, 5 ms, 2.5ms, 500us, 500µs, 0.005s), judged on the
median-of-rounds latency measured on --device at --batch-size and --input-size. --timeout is in seconds.
exit status: 0 success, 2 bad input or a budget nothing meets (the message says what to change),
130 interrupted (what finished is written; run the same command to resume).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="search.py", description=__doc__.split("\n\n")[0],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-budget", required=True, metavar="BUDGET",
                   help="latency the model must fit, with its unit, e.g. 5ms or 500us")
    g = p.add_argument_group("measurement")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N "
                   "(default: auto)")
    g.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="square input side in pixels (default: the data's, 32 for the built-in digits, "
                        "64 for an image folder)")
    g.add_argument("--batch-size", type=int, default=1, help="batch size latency is measured at (default: 1)")
    g.add_argument("--threads", type=int, default=None, help="threads latency is measured with; set your "
                   "deployment's count (default: 1 on the CPU, the most repeatable; training uses every core)")
    g.add_argument("--train-threads", type=int, default=None, help="CPU threads for training (default: torch's, "
                   "every core)")
    cli.add_run_arguments(g)
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="image folder, one sub-folder per class, split reproducibly (default: built-in digits)")
    g.add_argument("--evaluator", choices=("train", "zero-cost"), default="train",
                   help="short training with early stopping, or a zero-cost proxy (default: train)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per trial (default: the evaluator's)")
    g.add_argument("--final-epochs", type=int, default=None, help="epochs to train the winner (default: 4x)")
    g = p.add_argument_group("search")
    g.add_argument("--space", default="default", help="registered space name or package.module:function "
                   "(default: default, every built-in mixer; presets: the 16 published models alone)")
    g.add_argument("--trials", type=int, default=100, help="trials in the study, in total: a resumed search runs "
                   "the missing ones, and workers on one --storage/--study-name share them (default: 100; with "
                   "--timeout, whichever comes first)")
    g.add_argument("--timeout", type=float, default=420.0, metavar="SECONDS",
                   help="stop starting trials after this many seconds (default: 420)")
    g.add_argument("--objective", choices=("accuracy", "pareto"), default="accuracy",
                   help="accuracy under the budget (TPE) or the accuracy/latency front (NSGA-II) (default: accuracy)")
    g.add_argument("--sampler", choices=("tpe", "nsga2", "random"), default=None,
                   help="Optuna sampler (default: tpe for accuracy, nsga2 for pareto; random as a baseline)")
    g.add_argument("--backend", choices=("optuna", "ray", "nni"), default="optuna",
                   help="optuna: embedded, one process; ray: Ray Tune (Optuna searcher, ASHA), local or a cluster; "
                        "nni: NNI's regularised evolution (the nni extra) (default: optuna)")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL, e.g. postgresql://user@host/db (the postgres extra; many machines on "
                        "one study) or sqlite:///path.db (default: SQLite in --out)")
    g.add_argument("--study-name", default=None,
                   help="study to create or resume in --storage; machines sharing a study use the same name "
                        "(default: derived from --out)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the sampler, the data split and training, so a run can be repeated (default: 0)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster, e.g. auto or head-node:6379 (default: start a local Ray with "
                        "--workers CPUs)")
    g.add_argument("--workers", type=int, default=1, help="trials evaluated at once with Ray (default: 1)")
    g.add_argument("--baselines", default="all", metavar="all|none|NAME,NAME",
                   help="presets the search is compared with: those that are points of --space are its first "
                        "trials (counted in --trials), the others are evaluated beside it (default: all)")
    g.add_argument("--compress", default=None, metavar="RECIPE", help="apply a compression recipe to the winner")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default: runs/<space>-<budget>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _baselines(text: str) -> tuple[str, ...] | None:
    if text == "all":
        return None
    if text == "none":
        return ()
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _compress_winner(args, result, config) -> int:
    """Apply the recipe to the winner through the compression CLI: <out>/compressed/ holds the model and report."""
    from compress.__main__ import main as compress_main

    argv = ["--recipe", args.compress, "--model", str(result.out_dir), "--out", str(result.out_dir / "compressed"),
            "--device", result.best["device"], "--seed", str(config.seed)]
    if args.data:
        argv += ["--data", args.data]
    if result.best["input_size"]:
        argv += ["--input-size", str(result.best["input_size"])]
    if result.best.get("threads"):
        argv += ["--threads", str(result.best["threads"])]
    # the winner is compressed for the runtime and precision it was searched for
    argv += ["--runtime", config.runtime, "--dtype", result.best["dtype"]]
    if config.channels_last is not None:
        argv.append("--channels-last" if config.channels_last else "--no-channels-last")
    if config.cuda_graphs:
        argv.append("--cuda-graphs")
    if config.cudnn_benchmark is not None:
        argv.append("--cudnn-benchmark" if config.cudnn_benchmark else "--no-cudnn-benchmark")
    if args.quiet:
        argv.append("--quiet")
    print(f"\ncompressing the winner with {args.compress}")
    return compress_main(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run_search, argv, prog="search.py")


def run_search(args: argparse.Namespace) -> int:
    from searchspace.latency import format_ms, parse_budget
    from searchspace.nas import SearchConfig, run
    from searchspace.nas.engine import candidate_label

    config = SearchConfig(
        budget_ms=parse_budget(args.latency_budget), space=args.space, data=args.data,
        input_size=args.input_size, batch_size=args.batch_size, device=args.device, threads=args.threads,
        runtime=args.runtime, dtype=args.dtype, channels_last=args.channels_last, cuda_graphs=args.cuda_graphs,
        cudnn_benchmark=args.cudnn_benchmark,
        train_threads=args.train_threads, trials=args.trials, timeout_s=args.timeout, evaluator=args.evaluator,
        epochs=args.epochs, final_epochs=args.final_epochs, objective=args.objective, sampler=args.sampler,
        backend=args.backend, storage=args.storage,
        study_name=args.study_name, out=args.out, seed=args.seed, ray_address=args.ray_address,
        workers=args.workers, baselines=_baselines(args.baselines), compress=args.compress,
    )
    if args.compress:
        from compress.recipe import load_recipe

        load_recipe(args.compress)  # a bad recipe fails now, not after the search
    result = run(config, progress=not args.quiet)
    if result.interrupted:
        return 130
    best = result.best
    metric = "accuracy" if config.evaluator == "train" else "score"
    print(f"best: {best['summary']}")
    print(f"      validation accuracy {best['accuracy']:.4f} after {best['final_epochs']} epochs; measured "
          f"{format_ms(best['latency_ms'])} <= budget {format_ms(best['budget_ms'])} on {best['device_name']} "
          f"({best['device']}, {best['threads']} thread(s), {best['input_size']}x{best['input_size']}, batch "
          f"{best['batch_size']}, {best['runtime']})")
    rows = [(f"winner ({candidate_label(best)})", best["search_" + metric], best["latency_ms"], best.get("params"))]
    rows += [(b["name"], b[metric], b["measured_ms"], b.get("params")) for b in result.baselines
             if b["state"] == "complete" and b["name"] != best.get("preset")]
    print(f"\n{'model':28s} {metric + ' (same evaluator)':>26s} {'latency':>10s} {'params':>11s}")
    for name, value, ms, params in sorted(rows, key=lambda r: -(r[1] or 0)):
        print(f"{name:28s} {value:26.4f} {format_ms(ms):>10s} {params or 0:11,d}")
    if len(rows) == 1:
        print("(no preset fits the budget at this input)")
    print(f"\nresults: {result.out_dir}/ (report.md, trials.csv, best.json, best/)")
    if args.compress:
        return _compress_winner(args, result, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
