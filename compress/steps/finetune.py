"""``finetune``: train the model on ``ctx.data`` for some epochs or steps, to recover accuracy after compression.

AdamW (no weight decay on biases, norms and scales), linear warm-up then cosine decay, cross-entropy with label
smoothing, gradient clipping: the same schedule the search's evaluator trains with
(:class:`searchspace.evaluators.TrainEvaluator`), applied to an existing model instead of a fresh one.
:func:`train_model` is the loop; ``distill`` uses it with its own loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import Param, StepContext, register_step

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # loss(model, images, labels)

TRAIN_PARAMS: dict[str, Param] = {
    "epochs": Param(int, 1, minimum=1, help="passes over the training split (ignored when steps is set)"),
    "steps": Param(int, None, minimum=1, help="optimizer steps in total; overrides epochs"),
    "lr": Param(float, 5e-4, minimum=0.0, help="peak learning rate of AdamW (lower than from scratch)"),
    "weight_decay": Param(float, 0.05, minimum=0.0, help="AdamW weight decay of weight matrices and kernels"),
    "batch_size": Param(int, 64, minimum=1),
    "warmup": Param(float, 0.1, minimum=0.0, maximum=1.0, help="share of the steps spent warming up linearly"),
    "grad_clip": Param(float, 1.0, minimum=0.0, help="max global gradient norm; 0 = off"),
    "augment": Param(bool, False, help="random shifts of up to 1/8 of the image"),
    "seed": Param(int, 0, minimum=0, help="seed of the batch order and augmentation"),
}


def train_model(model: nn.Module, data: Any, loss_fn: Loss, *, epochs: int = 1, steps: int | None = None,
                lr: float = 5e-4, weight_decay: float = 0.05, batch_size: int = 64, warmup: float = 0.1,
                grad_clip: float = 1.0, augment: bool = False, seed: int = 0, device: str = "cpu",
                threads: int | None = None, extra_params: Sequence[nn.Parameter] = (),
                log: Callable[[str], None] = print, label: str = "train") -> dict[str, Any]:
    """Train ``model`` in place on ``data.train`` with ``loss_fn``; returns ``steps``, ``epochs``, ``train_loss``
    (mean of the last epoch) and ``seconds``. ``extra_params`` (e.g. a feature adapter) are trained alongside.

    Raises:
        TrainingDiverged: the loss or the weights became NaN or infinite (lower ``lr``).
    """
    from searchspace.evaluators import (
        TrainingDiverged,
        _batches,
        _num_batches,
        _param_groups,
        _warmup_cosine,
        random_shift,
    )
    from searchspace.latency.measure import num_threads

    start = time.perf_counter()
    per_epoch = _num_batches(len(data.train), batch_size)
    total = steps if steps is not None else epochs * per_epoch
    groups = _param_groups(model, weight_decay)
    extra = [p for p in extra_params if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(round(warmup * total), total))
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for g in groups for p in g["params"]]
    done, epoch, last_loss = 0, 0, math.nan
    with num_threads(threads):
        model.train()
        while done < total:
            epoch += 1
            running, count = 0.0, 0
            for images, labels in _batches(data.train, batch_size, generator):
                if done >= total:
                    break
                if augment:
                    images = random_shift(images, generator)
                images, labels = images.to(device), labels.to(device)
                loss = loss_fn(model, images, labels)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{label} diverged: loss is {loss.item()} at step {done + 1} (lr={lr}); "
                                           f"lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()
                scheduler.step()
                running += loss.item() * len(labels)
                count += len(labels)
                done += 1
            last_loss = running / max(count, 1)
            if not all(torch.isfinite(p).all() for p in trainable):
                raise TrainingDiverged(f"{label} diverged: weights became NaN or infinite in epoch {epoch} "
                                       f"(lr={lr}); lower the learning rate")
            elapsed = time.perf_counter() - start
            eta = f", about {elapsed / done * (total - done):.0f} s to go" if done < total else ""
            log(f"{label}: epoch {epoch}, {done}/{total} steps, loss {last_loss:.4f} ({elapsed:.1f} s{eta})")
    model.eval()
    return {"steps": done, "epochs": epoch, "train_loss": last_loss, "seconds": time.perf_counter() - start}


@register_step(
    "finetune",
    description="train on the data with cross-entropy (AdamW, warm-up + cosine) to recover accuracy",
    needs_data=True,
    params={**TRAIN_PARAMS,
            "label_smoothing": Param(float, 0.1, minimum=0.0, maximum=0.99, help="cross-entropy label smoothing")},
)
def finetune(ctx: StepContext, label_smoothing: float, **train: Any) -> dict[str, Any]:
    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)

    ctx.model.to(ctx.device)
    return train_model(ctx.model, ctx.data, loss_fn, device=ctx.device, threads=ctx.threads, log=ctx.log,
                       label="finetune", **train)
