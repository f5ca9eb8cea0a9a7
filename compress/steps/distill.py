"""``distill``: knowledge distillation from the uncompressed model (or another checkpoint) into the compressed one.

Loss = ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)``
(Hinton et al. 2015), plus optionally ``feature_weight * MSE(adapter(student features), teacher features)`` on the
last stage's features (FitNets), where the adapter is a 1x1 convolution (or a linear map for token features) when
the widths differ - as they do after channel pruning - and is dropped after training.

The teacher is ``ctx.teacher``: ``compress.apply`` sets it to the model as it was before the first step that is
neither ``measure`` nor ``finetune`` (the uncompressed model, after any fine-tuning to the data). ``teacher:`` names
another one: a checkpoint file with ``teacher_model:`` (a timm name, preset or arch.json), or a results or
compressed-model folder alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from searchspace.training import agreement, batches

from . import Param, RecipeError, StepContext, register_step
from .finetune import TRAIN_PARAMS, kd_loss, train_model


class FeatureMatch(nn.Module):
    """MSE between student and teacher features, through a learned adapter when the widths differ."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor):
        super().__init__()
        if student.ndim not in (3, 4) or student.ndim != teacher.ndim:
            raise RecipeError(f"distill features: expected (B, C, H, W) or (B, N, C) features from both models, got "
                              f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        self.tokens = student.ndim == 3
        s, t = (student.shape[-1], teacher.shape[-1]) if self.tokens else (student.shape[1], teacher.shape[1])
        if s == t:
            self.adapter: nn.Module = nn.Identity()
        elif self.tokens:
            self.adapter = nn.Linear(s, t, bias=False)
        else:
            self.adapter = nn.Conv2d(s, t, 1, bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student = self.adapter(student)
        if self.tokens:
            if student.shape[1] != teacher.shape[1]:  # token pruning changed the count: compare the mean token
                student, teacher = student.mean(1), teacher.mean(1)
        elif student.shape[-2:] != teacher.shape[-2:]:
            student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
        return F.mse_loss(student, teacher)


def _features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = model.forward_features(images)
    return features, model.forward_head(features)


def _check(params: dict[str, Any]) -> str | None:
    teacher, model = params["teacher"], params["teacher_model"]
    if model is not None and teacher is None:
        return "teacher_model is given without teacher (the checkpoint file it describes)"
    if teacher is not None:
        path = Path(teacher).expanduser()
        if not path.exists():
            return f"teacher {teacher!r} does not exist"
        if path.is_file() and model is None:
            return "teacher is a checkpoint file; say its architecture with teacher_model (a timm name, preset or " \
                   "arch.json)"
    return None


@register_step(
    "distill",
    description="knowledge distillation from the uncompressed model (or a teacher checkpoint): soft labels with "
                "temperature, optional feature matching",
    needs_data=True,
    params={
        **TRAIN_PARAMS,
        "epochs": Param(int, 3, minimum=1, help="passes over the training split (ignored when steps is set)"),
        "temperature": Param(float, 4.0, minimum=0.01, help="softmax temperature of the soft labels"),
        "alpha": Param(float, 0.7, minimum=0.0, maximum=1.0,
                       help="weight of the distillation loss; 1 - alpha weighs cross-entropy on the labels"),
        "features": Param(bool, False, help="also match the last stage's features (MSE, 1x1 adapter)"),
        "feature_weight": Param(float, 1.0, minimum=0.0, help="weight of the feature loss"),
        "teacher": Param(str, None, help="teacher checkpoint file or model folder (default: the uncompressed model)"),
        "teacher_model": Param(str, None, help="architecture of a teacher checkpoint: timm name, preset, arch.json"),
    },
)
def distill(ctx: StepContext, temperature: float, alpha: float, features: bool, feature_weight: float,
            teacher: str | None, teacher_model: str | None, **train: Any) -> dict[str, Any]:
    teacher_net = _load_teacher(ctx, teacher, teacher_model)
    if not ctx.data.labelled and alpha < 1:
        ctx.log(f"distill: the data has no labels, so alpha {alpha} is taken as 1 (soft labels only)")
        alpha = 1.0
    teacher_net.to(ctx.device).eval()  # its forward runs under no_grad: its weights never change
    student = ctx.model.to(ctx.device)
    match: FeatureMatch | None = None
    if features:
        for net in (student, teacher_net):
            if not (callable(getattr(net, "forward_features", None)) and callable(getattr(net, "forward_head", None))):
                raise RecipeError("distill features: true needs forward_features() and forward_head() on both models "
                                  "(timm and MixerNAS models have them)")
        images = _first_images(ctx.data).to(ctx.device)
        with torch.no_grad():
            s_feat, t_feat = student.forward_features(images), teacher_net.forward_features(images)
        match = FeatureMatch(s_feat, t_feat).to(ctx.device)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if match is not None:
                t_feat, t_logits = _features_and_logits(teacher_net, images)
            else:
                t_logits = teacher_net(images)
        if match is not None:
            s_feat, s_logits = _features_and_logits(model, images)
        else:
            s_logits = model(images)
        if s_logits.shape != t_logits.shape:
            raise RecipeError(f"distill: the teacher predicts {t_logits.shape[-1]} classes and the model "
                              f"{s_logits.shape[-1]}; use a teacher trained on the same classes")
        loss = alpha * kd_loss(s_logits, t_logits, temperature)
        if alpha < 1:
            loss = loss + (1 - alpha) * F.cross_entropy(s_logits, labels)
        if match is not None:
            loss = loss + feature_weight * match(s_feat, t_feat)
        return loss

    before = agreement(student, teacher_net, ctx.data.val, device=ctx.device)
    figures = train_model(student, ctx.data, loss_fn, device=ctx.device, threads=ctx.threads, log=ctx.log,
                          extra_params=list(match.parameters()) if match is not None else (), label="distill",
                          **train)
    figures.update(teacher_agreement_before=before,
                   teacher_agreement=agreement(student, teacher_net, ctx.data.val, device=ctx.device))
    return figures


def _load_teacher(ctx: StepContext, teacher: str | None, teacher_model: str | None) -> nn.Module:
    if teacher is None:
        if ctx.teacher is None:
            raise RecipeError("distill: no teacher; compress.apply provides the uncompressed model, or name one with "
                              "teacher: (and teacher_model:)")
        return ctx.teacher
    from ..checkpoint import adapt_to_data, create_model

    path = Path(teacher).expanduser()
    if path.is_dir():
        loaded = create_model(path)
    else:
        loaded = create_model(teacher_model, checkpoint=path, input_size=ctx.input_spec.height)
    if ctx.data is not None:
        _, _, notes = adapt_to_data(loaded.model, ctx.data)
        for note in notes:
            ctx.log(f"distill teacher: {note}")
    return loaded.model


def _first_images(data: Any, n: int = 8) -> torch.Tensor:
    images, _ = next(batches(data.train, min(n, len(data.train))))
    return images


distill.check = _check  # run by compress.recipe when the recipe is validated
