"""Zero-cost proxies against short training: do synflow, NASWOT and grad-norm rank architectures better than size?

Draws ``--archs`` architectures from a search space (Optuna's random sampler, seeded), trains each with the
search's default :class:`~searchspace.evaluators.TrainEvaluator` on the built-in digits, scores each at
initialisation with every zero-cost proxy, and prints the Spearman rank correlation of each proxy with the trained
accuracy beside the parameter count's (the baseline a proxy must beat: ZiCo). A proxy is worth using for screening
only if its rho is clearly above ``params_rho``. The same correlations against the validation loss (negated, so
higher is better) are shown too: the loss is continuous, the accuracy of a few hundred images is coarse.

The trained accuracy is itself noisy (a few hundred validation images, a few epochs), so unless ``--no-repeat`` is
given every architecture is trained a second time with another seed: ``train_seed_rho``, the rank correlation of
the two trainings, is the ceiling any proxy can reach against this target.

The last line is ``key=value`` figures. About 10-20 minutes with the defaults on one idle CPU thread (40 minutes
when other work shares the cores).

    python bench/proxies.py                       # 30 archs of the default space, 3 epochs, seed 0
    python bench/proxies.py --archs 10 --epochs 1 --no-repeat
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

try:
    import searchspace
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import searchspace

import optuna
import torch
from scipy.stats import spearmanr

from searchspace.data import load_data
from searchspace.evaluators import PROXIES, EvaluationError, TrainEvaluator, ZeroCostEvaluator

DEFAULTS = TrainEvaluator()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Spearman rank correlation of zero-cost proxies (synflow, naswot, grad_norm) and of the parameter "
                    "count with short-training accuracy on the built-in digits, over random architectures of a "
                    "search space. The last output line is key=value figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--archs", type=int, default=30, help="architectures sampled from the space")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="training epochs per architecture")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the architecture sampler, the data split, training and the proxies")
    parser.add_argument("--space", default="default", help="search space name (searchspace.list_spaces())")
    parser.add_argument("--input-size", type=int, default=None, help="digit image size in pixels; None = 32")
    parser.add_argument("--proxy-batch", type=int, default=64, help="images per batch for naswot and grad_norm")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because a second thread on a shared 2-core machine mostly waits")
    parser.add_argument("--no-repeat", action="store_true",
                        help="skip the second training (with seed+1) that measures the target's own noise")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    try:
        if args.archs < 3:
            raise searchspace.MixerNASError(f"--archs must be at least 3 for a rank correlation, got {args.archs}")
        data = load_data(input_size=args.input_size, seed=args.seed)
        space = searchspace.get_space(args.space)
        trainer = TrainEvaluator(epochs=args.epochs, seed=args.seed, threads=args.threads)
        again = TrainEvaluator(epochs=args.epochs, seed=args.seed + 1, threads=args.threads)
        proxies = {p: ZeroCostEvaluator(p, batch_size=args.proxy_batch, seed=args.seed, threads=args.threads)
                   for p in PROXIES}
    except searchspace.MixerNASError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"{args.archs} architectures of space {args.space!r} (random, seed {args.seed}); data: {data.describe()}")
    print(f"training: {trainer}")
    print()
    header = (f"{'#':>3} {'acc':>6} {'acc2':>6} {'train s':>8} {'synflow':>10} {'naswot':>8} {'grad_norm':>9} "
              f"{'params':>10}  architecture")
    print(header)
    print("-" * len(header))
    sampler = optuna.samplers.RandomSampler(seed=args.seed)
    study = optuna.create_study(sampler=sampler)
    rows = []  # (result, repeat result or None, {proxy: score})
    proxy_seconds = {p: 0.0 for p in PROXIES}
    train_seconds = 0.0
    for i in range(args.archs):
        trial = study.ask()
        arch = space.sample(trial)
        study.tell(trial, 0.0)
        try:
            result = trainer.evaluate(arch, data)
            repeat = None if args.no_repeat else again.evaluate(arch, data)
            scores = {}
            for name, evaluator in proxies.items():
                proxy_result = evaluator.evaluate(arch, data)
                scores[name] = proxy_result.score
                proxy_seconds[name] += proxy_result.seconds
        except EvaluationError as error:  # a diverged training or a proxy without a number: reported, skipped
            print(f"{i + 1:>3} failed: {error}  {arch.summary()}")
            continue
        train_seconds += result.seconds
        rows.append((result, repeat, scores))
        acc2 = "-" if repeat is None else f"{repeat.accuracy:.3f}"
        print(f"{i + 1:>3} {result.accuracy:>6.3f} {acc2:>6} {result.seconds:>8.1f} {scores['synflow']:>10.4g} "
              f"{scores['naswot']:>8.1f} {scores['grad_norm']:>9.3g} {int(scores['params']):>10,}  "
              f"{arch.summary()} ({arch.act})", flush=True)

    if len(rows) < 3:
        print(f"error: only {len(rows)} architectures were evaluated; need at least 3", file=sys.stderr)
        return 1
    accuracies = [r[0].accuracy for r in rows]
    neg_losses = [-r[0].val_loss for r in rows]
    figures: dict[str, object] = {}  # the key=value line: rank correlations with the accuracy first
    loss_figures: dict[str, object] = {}
    print()
    print(f"Spearman rank correlation with {args.epochs}-epoch validation accuracy (and with minus the validation "
          f"loss) over {len(rows)} architectures; mean cost per architecture: training "
          f"{train_seconds / len(rows):.1f} s")
    print(f"{'proxy':<10} {'rho':>6} {'p-value':>8} {'rho(-loss)':>10} {'seconds':>8}  beats params?")
    params_rho = _rho(accuracies, [r[2]["params"] for r in rows])[0]
    for name in PROXIES:
        scores = [r[2][name] for r in rows]
        rho, p = _rho(accuracies, scores)
        rho_loss = _rho(neg_losses, scores)[0]
        figures[f"{name}_rho"] = f"{rho:.3f}"
        loss_figures[f"{name}_rho_loss"] = f"{rho_loss:.3f}"
        verdict = _verdict(rho, p, params_rho) if name != "params" else "(baseline)"
        print(f"{name:<10} {rho:>6.3f} {p:>8.3g} {rho_loss:>10.3f} {proxy_seconds[name] / len(rows):>8.3f}  {verdict}")
    if not args.no_repeat:
        rho, p = _rho(accuracies, [r[1].accuracy for r in rows])
        rho_loss = _rho(neg_losses, [-r[1].val_loss for r in rows])[0]
        figures["train_seed_rho"] = f"{rho:.3f}"
        loss_figures["train_seed_rho_loss"] = f"{rho_loss:.3f}"
        print(f"{'train seed':<10} {rho:>6.3f} {p:>8.3g} {rho_loss:>10.3f} {'':>8}  (the same training with seed "
              f"{args.seed} vs {args.seed + 1}: the ceiling)")
    spread = max(accuracies) - min(accuracies)
    print(f"accuracy range {min(accuracies):.3f}-{max(accuracies):.3f} (spread {spread:.3f}); "
          f"threads {torch.get_num_threads() if args.threads is None else args.threads}")
    figures.update(loss_figures)
    figures.update(archs=len(rows), epochs=args.epochs, acc_spread=f"{spread:.3f}",
                   seconds=f"{time.perf_counter() - start:.0f}")
    print()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


def _verdict(rho: float, p: float, params_rho: float) -> str:
    # a higher rho that could be chance (p >= 0.05 with ~30 points: |rho| < ~0.36) is not a win
    if p >= 0.05:
        return "no (rho not significant)"
    return "yes" if rho > params_rho else "no"


def _rho(a: list[float], b: list[float]) -> tuple[float, float]:
    rho, p = spearmanr(a, b)
    return (float(rho), float(p)) if not math.isnan(rho) else (0.0, 1.0)


if __name__ == "__main__":
    sys.exit(main())
