"""``finetune``: train the model on ``ctx.data`` for some epochs or steps, to recover accuracy after compression.

AdamW (no weight decay on biases, norms and scales), linear warm-up then cosine decay, cross-entropy with label
smoothing, gradient clipping: the search's own training loop (:mod:`searchspace.training`), applied to an
existing model instead of a fresh one; ``distill`` uses it with its own loss. On unlabelled data (images of other
classes than the model's, or none) the model learns the teacher's outputs instead of labels - the original model's
when no step has fixed a teacher yet - so its classifier is never trained towards classes it does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from searchspace.latency.measure import num_threads
from searchspace.training import Loss, Schedule, cross_entropy, train

from . import Param, StepContext, register_step

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


def train_model(model: nn.Module, data: Any, loss_fn: Loss, *, device: str = "cpu", threads: int | None = None,
                extra_params: Sequence[nn.Parameter] = (), log: Callable[[str], None] = print,
                label: str = "train", **schedule: Any) -> dict[str, Any]:
    """Train ``model`` in place on ``data.train`` with ``loss_fn`` (``searchspace.training.train``, the search's
    loop) under the recipe's ``TRAIN_PARAMS``; returns ``steps``, ``epochs``, ``train_loss`` and ``seconds``."""
    with num_threads(threads):
        figures = train(model, data, loss_fn, Schedule(**schedule), device=device, extra_params=extra_params,
                        log=log, label=label)
    figures.pop("train_losses")
    return figures


@register_step(
    "finetune",
    description="train on the data with cross-entropy (AdamW, warm-up + cosine) to recover accuracy",
    needs_data=True,
    params={**TRAIN_PARAMS,
            "label_smoothing": Param(float, 0.1, minimum=0.0, maximum=0.99, help="cross-entropy label smoothing")},
)
def finetune(ctx: StepContext, label_smoothing: float, **train: Any) -> dict[str, Any]:
    ctx.model.to(ctx.device)
    if ctx.data.labelled:
        loss_fn = cross_entropy(label_smoothing)
    else:  # no labels of the model's classes: learn the teacher's outputs (the original model before distillation)
        teacher = (ctx.teacher or ctx.reference).to(ctx.device).eval()
        ctx.log("finetune: the data has no labels, so the model learns the "
                f"{'teacher' if ctx.teacher is not None else 'original model'}'s outputs (soft labels, T=1)")
        loss_fn = soft_label_loss(teacher, temperature=1.0)
    return train_model(ctx.model, ctx.data, loss_fn, device=ctx.device, threads=ctx.threads, log=ctx.log,
                       label="finetune", **train)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-label loss, scaled by T^2 so its gradients keep their size as T changes."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)


def soft_label_loss(teacher: nn.Module, temperature: float) -> Loss:
    """``loss(model, images, labels)`` that ignores the labels and learns ``teacher``'s outputs."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images)
        return kd_loss(model(images), target, temperature)

    return loss
