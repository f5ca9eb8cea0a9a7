"""Accuracy estimation: short training, and zero-cost proxies for fast screening.

Every evaluator has one method, ``evaluate(arch, data, report=None) -> EvalResult``; a higher ``result.score`` is
better (the validation accuracy for training, the proxy's value for a proxy)::

    from searchspace.data import load_data
    from searchspace.evaluators import TrainEvaluator, ZeroCostEvaluator

    data = load_data()                                   # the built-in digits
    result = TrainEvaluator(epochs=3).evaluate(arch, data)
    result.accuracy, result.accuracies, result.seconds   # 0.95, (0.89, 0.94, 0.95), 12.3
    ZeroCostEvaluator("synflow").evaluate(arch, data).score

**Early stopping of poor trials.** ``report(epoch, accuracy)`` is called after every epoch (epochs count from 1)
with the validation accuracy; if it returns True the training stops and :class:`TrialPruned` is raised, carrying
the partial result (``exc.result``, ``pruned=True``). It derives from ``optuna.TrialPruned``, so an Optuna
objective wires a pruner in two lines and Optuna records the trial as pruned without further code::

    def objective(trial):
        arch = space.sample(trial)
        def report(epoch, accuracy):
            trial.report(accuracy, epoch)
            return trial.should_prune()
        return evaluator.evaluate(arch, data, report).accuracy

Under Ray Tune the callback calls ``tune.report`` and returns False; ASHA stops the trial itself.

**Failures.** A non-finite training loss or weights raise :class:`TrainingDiverged`; a proxy that gives no finite
number raises :class:`EvaluationError` (its base). Both are :class:`~searchspace.errors.MixerNASError`, so a search
records the trial as failed and goes on.

**Reproducibility.** The same architecture, data and seed give the same result on the CPU: weights are initialised
under ``seed``, batches are drawn from a generator seeded with ``seed``, and the caller's global random state is
left untouched. Results can differ with the thread count (floating-point sums in another order).

**Threads.** On a shared 2-core machine a second torch thread waits on whatever runs on the other core: 3 epochs of
a 0.1 M-parameter network on the digits took 2.6 s with 1 thread and 35 s with 2 while other processes kept the
machine busy (on a quieter moment the largest default-space network took 45 s with 1 thread, 25 s with 2). Pass
``threads=1`` when trials run beside other work or in parallel; ``None`` keeps torch's setting.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch
from .data import DataBundle
from .errors import (
    EvaluationError,
    MixerNASError,
    TrainingDiverged,  # noqa: F401  (raised by the training loop; importable from here as before)
    UnknownNameError,
)
from .latency.counting import count_params
from .latency.measure import num_threads, resolve_device
from .layers import ACTIVATIONS
from .model import build_model
from .training import Schedule, batches, cross_entropy, seeded, train, validate

Report = Callable[[int, float], "bool | None"]  # report(epoch, val_accuracy) -> True to prune the trial
ArchLike = Arch | str | Mapping[str, Any]


class TrialPruned(optuna.TrialPruned):
    """The ``report`` callback asked to stop a poor trial; ``result`` holds what was measured until then."""

    def __init__(self, result: EvalResult):
        super().__init__(f"pruned after epoch {result.epochs} at validation accuracy {result.accuracy:.4f}")
        self.result = result


@dataclass(frozen=True)
class EvalResult:
    """What an evaluator measured for one architecture. Higher ``score`` is better."""

    evaluator: str  # "train" or the proxy's name
    score: float  # the number a search maximises: the accuracy for training, the proxy's value for a proxy
    accuracy: float | None = None  # validation top-1 in [0, 1] after the last epoch run; None for proxies
    accuracies: tuple[float, ...] = ()  # validation top-1 after each epoch
    train_losses: tuple[float, ...] = ()  # mean training loss of each epoch
    val_losses: tuple[float, ...] = ()  # mean validation cross-entropy after each epoch (no label smoothing)
    epochs: int = 0  # epochs run (fewer than asked when pruned)
    seconds: float = 0.0  # wall time of the evaluation, model construction included
    params: int = 0  # parameters of the evaluated model
    pruned: bool = False  # stopped early by the report callback

    @property
    def train_loss(self) -> float | None:
        """Mean training loss of the last epoch run."""
        return self.train_losses[-1] if self.train_losses else None

    @property
    def val_loss(self) -> float | None:
        """Validation cross-entropy after the last epoch run: a finer-grained signal than the accuracy."""
        return self.val_losses[-1] if self.val_losses else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Evaluator(ABC):
    """Estimates how good an architecture is on a data set; see the module docstring."""

    name: str = ""

    @abstractmethod
    def evaluate(self, arch: ArchLike, data: DataBundle, report: Report | None = None) -> EvalResult:
        """Score ``arch`` on ``data``; ``report(epoch, accuracy) -> True`` stops a training early."""


# ------------------------------------------------------------------------------------------------ short training


@dataclass(frozen=True)
class TrainEvaluator(Evaluator):
    """Short training from scratch; the score is the validation accuracy after the last epoch.

    AdamW (no weight decay on biases, norms and scales), linear warm-up then cosine decay to zero, cross-entropy
    with optional label smoothing, and optional light augmentation (random shifts of up to 1/8 of the image).
    The defaults suit the built-in digits at 32x32 on a CPU. With one thread of a 2-core machine that other
    work kept busy, the 3 epochs took 2.5 s for the smallest architecture of the default space (0.8 M
    parameters), 17 s for a mid-size one (5.6 M) and 45 s for the largest (19.5 M); random ones took 9-13 s
    per epoch. They reach 0.89-0.96 validation accuracy, and on the digits that ranking is noisy: over 30 random
    architectures two trainings with different seeds agree with Spearman rho 0.49 (0.58 after 1 epoch, where the
    spread is wider but small models are favoured); see ``bench/proxies.py``. Raise ``epochs`` or average seeds
    when the differences between candidates matter.

    >>> TrainEvaluator(epochs=3, threads=1).evaluate(arch, load_data()).accuracy  # doctest: +SKIP
    0.94
    """

    epochs: int = 3  # passes over the training split; 3 brings most designs to their plateau on the digits
    batch_size: int = 64
    lr: float = 2e-3  # peak learning rate of AdamW
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5  # linear warm-up length; MetaFormers are unstable at the full rate from step 0
    label_smoothing: float = 0.1
    augment: bool = False  # random shifts; off because a 3-epoch ranking gains nothing from them
    grad_clip: float | None = 1.0  # max global gradient norm; keeps unstable candidates from diverging
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch intra-op threads while training; None keeps torch's setting
    eval_batch_size: int = 256
    name: str = field(default="train", init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("warmup_epochs", self.warmup_epochs)
        if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 1:
            raise MixerNASError(f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, positive=True)
        resolve_device(self.device)  # an unknown device is reported at construction

    def evaluate(self, arch: ArchLike, data: DataBundle, report: Report | None = None) -> EvalResult:
        """Train ``arch`` on ``data.train``; the score is its accuracy on ``data.val`` after the last epoch.

        Raises:
            TrialPruned: ``report`` returned True after some epoch (``exc.result`` has the partial result).
            TrainingDiverged: the loss or the weights became NaN or infinite.
        """
        return self.train(arch, data, report)[1]

    def train(self, arch: ArchLike, data: DataBundle, report: Report | None = None) -> tuple[nn.Module, EvalResult]:
        """Like :meth:`evaluate`, and also returns the trained model (in eval mode) to save or train further."""
        start = time.perf_counter()
        device = resolve_device(self.device)
        schedule = Schedule(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                            batch_size=self.batch_size, warmup=self.warmup_epochs / self.epochs,
                            grad_clip=self.grad_clip, augment=self.augment, seed=self.seed)
        accuracies: list[float] = []
        losses: list[float] = []
        val_losses: list[float] = []

        def after_epoch(epoch: int, loss: float) -> None:
            val_acc, val_loss = validate(model, data.val, self.eval_batch_size, device)
            losses.append(loss)
            accuracies.append(val_acc)
            val_losses.append(val_loss)
            # every epoch is reported (the pruner's statistics need the last one too), but a training that
            # has finished is never thrown away: pruning only saves the epochs still to come
            if report is not None and report(epoch, val_acc) and epoch < self.epochs:
                raise TrialPruned(self._result(accuracies, losses, val_losses, params, start, pruned=True))

        with num_threads(self.threads), seeded(self.seed, device):
            model = build_model(arch, num_classes=data.num_classes, in_chans=data.in_chans).to(device)
            params = sum(p.numel() for p in model.parameters())
            train(model, data, cross_entropy(self.label_smoothing), schedule, device=device, after_epoch=after_epoch)
        return model, self._result(accuracies, losses, val_losses, params, start)

    def _result(self, accuracies: list[float], losses: list[float], val_losses: list[float], params: int,
                start: float, pruned: bool = False) -> EvalResult:
        return EvalResult(evaluator=self.name, score=accuracies[-1], accuracy=accuracies[-1],
                          accuracies=tuple(accuracies), train_losses=tuple(losses), val_losses=tuple(val_losses),
                          epochs=len(accuracies),
                          seconds=time.perf_counter() - start, params=params, pruned=pruned)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MixerNASError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise MixerNASError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


# --------------------------------------------------------------------------------------------- zero-cost proxies
#
# Pure functions of a freshly initialised model: each works on a copy and leaves the model, its gradients and
# the global random state as they were. Higher is better for all four.


def param_count(model: nn.Module) -> int:
    """Number of parameters: the baseline every proxy must beat (ZiCo shows it is a strong one)."""
    return count_params(model)


def synflow(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Synaptic flow (Tanaka et al. 2020), as the zero-cost proxies paper scores it (Abdelfattah et al. 2021).

    ``sum |theta * dR/dtheta|`` over the weight matrices and kernels (parameters with 2+ dimensions), where
    ``R = sum(model(1))`` is the output for an all-ones input of ``input_shape`` (``(C, H, W)``) with every
    parameter replaced by its absolute value. Computed in float64 (the products of many weights overflow float32)
    and in eval mode, so BatchNorm is the fixed affine map of its running statistics and never sees a batch of one.
    Our models use per-sample norms (LayerNorm, GroupNorm), which keep the signal bounded from stage to stage;
    they stay in place. Buffers (positional offsets, frozen mixing matrices) keep their signs.
    """
    device = _model_device(model)
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    for p in net.parameters():
        p.requires_grad_(True)
        p.grad = None
    shape = tuple(input_shape[-3:])
    net(torch.ones((1, *shape), dtype=torch.float64, device=device)).sum().backward()
    score = sum((p * p.grad).abs().sum().item() for p in net.parameters() if p.ndim >= 2 and p.grad is not None)
    return float(score)


def naswot(model: nn.Module, batch: torch.Tensor) -> float:
    """NASWOT (Mellor et al. 2021): ``log |det K|``, ``K[i, j]`` = units on which images i and j agree.

    Every unit of an activation module gets a binary code per image: 1 where its input is positive. The paper
    takes the codes of ReLUs; our networks use StarReLU, SquaredReLU and GELU, which are all "off" (zero or
    nearly) for negative inputs and "on" for positive ones, so the sign of each activation's *input* (its
    pre-activation, read by a forward hook) is the same code. ``K = sum over units of agreements`` equals
    ``N_A - Hamming distance``. The model runs in train mode (as in the paper) on a copy, without gradients.
    A larger log-determinant means the network tells the images of the batch apart more distinctly at init.
    """
    kinds = tuple({ACTIVATIONS.get(name) for name in ACTIVATIONS.names()} - {nn.Identity})
    kinds = tuple(k for k in kinds if isinstance(k, type))
    net = copy.deepcopy(model).train()
    n = len(batch)
    kernel = torch.zeros(n, n, dtype=torch.float64)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        codes = (inputs[0].detach().reshape(n, -1) > 0).to(torch.float64).cpu()
        kernel.add_(codes @ codes.T).add_((1 - codes) @ (1 - codes).T)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            net(batch.to(_model_device(net)))
    finally:
        for h in handles:
            h.remove()
    if not handles:
        raise EvaluationError("naswot needs activation modules (StarReLU, GELU, ReLU, ...); this model has none")
    return float(torch.linalg.slogdet(kernel)[1])


def grad_norm(model: nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> float:
    """Gradient norm (Abdelfattah et al. 2021): ``sum over weights of ||d CE / d W||_2`` on one batch at init.

    Summed per weight matrix or kernel (parameters with 2+ dimensions), as the zero-cost proxies code sums the
    per-layer norms; train mode, on a copy of the model.
    """
    device = _model_device(model)
    net = copy.deepcopy(model).train()
    for p in net.parameters():
        p.grad = None
    F.cross_entropy(net(batch.to(device)), targets.to(device)).backward()
    return float(sum(p.grad.norm().item() for p in net.parameters() if p.ndim >= 2 and p.grad is not None))


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


PROXIES = ("synflow", "naswot", "grad_norm", "params")


@dataclass(frozen=True)
class ZeroCostEvaluator(Evaluator):
    """Scores a freshly initialised model without training: ``synflow``, ``naswot``, ``grad_norm`` or ``params``.

    One seeded batch of ``batch_size`` training images feeds ``naswot`` and ``grad_norm`` (``synflow`` needs only
    the input shape). A proxy costs about one forward and backward pass: thousands of times cheaper than training,
    and only as good as its rank correlation with trained accuracy (``bench/proxies.py`` measures it beside the
    parameter count's).

    >>> ZeroCostEvaluator("synflow").evaluate(arch, load_data()).score  # doctest: +SKIP
    3.1e+07
    """

    proxy: str = "synflow"
    batch_size: int = 64  # images for naswot and grad_norm (NASWOT used 128 on CIFAR; 64 ranks alike here)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.proxy

    def __post_init__(self) -> None:
        if self.proxy not in PROXIES:
            raise UnknownNameError("zero-cost proxy", self.proxy, PROXIES)
        _check_int("batch_size", self.batch_size, 2)
        _check_int("seed", self.seed, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        resolve_device(self.device)

    def evaluate(self, arch: ArchLike, data: DataBundle, report: Report | None = None) -> EvalResult:
        """The proxy's score of ``arch`` at initialisation; ``report`` is accepted for symmetry and never called."""
        start = time.perf_counter()
        device = resolve_device(self.device)
        with num_threads(self.threads), seeded(self.seed, device):
            model = build_model(arch, num_classes=data.num_classes, in_chans=data.in_chans).to(device)
            params = param_count(model)
            if self.proxy == "params":
                score = float(params)
            elif self.proxy == "synflow":
                score = synflow(model, data.input_shape)
            else:
                generator = torch.Generator().manual_seed(self.seed)
                images, labels = next(batches(data.train, min(self.batch_size, len(data.train)), generator))
                score = naswot(model, images) if self.proxy == "naswot" else grad_norm(model, images, labels)
        if not math.isfinite(score):
            raise EvaluationError(f"zero-cost proxy {self.proxy!r} gave {score} for this architecture; "
                                  f"it cannot be ranked by this proxy (use another proxy or short training)")
        return EvalResult(evaluator=self.name, score=score, params=params, seconds=time.perf_counter() - start)


# -------------------------------------------------------------------------------------------------------- factory

EVALUATORS = ("train", "zero-cost") + PROXIES


def create_evaluator(kind: str = "train", **options: Any) -> Evaluator:
    """An evaluator by name: ``train``, ``zero-cost`` (the default proxy) or a proxy name.

    Options set to None are dropped, so unset command-line flags never override the defaults; an unknown option
    is an error naming the accepted ones.

    >>> create_evaluator("train", epochs=5, lr=None)
    TrainEvaluator(epochs=5, ...)
    """
    options = {k: v for k, v in options.items() if v is not None}
    if kind == "train":
        cls: type = TrainEvaluator
    elif kind == "zero-cost" or kind in PROXIES:
        cls = ZeroCostEvaluator
        if kind != "zero-cost":
            options["proxy"] = kind
    else:
        raise UnknownNameError("evaluator", kind, EVALUATORS)
    accepted = [f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MixerNASError(f"evaluator {kind!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    return cls(**options)
