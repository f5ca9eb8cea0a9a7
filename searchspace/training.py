"""The one training loop: the search's evaluator trains candidates with it, compression fine-tunes and distils.

AdamW with no weight decay on biases, norms and scales (timm's rule), a linear warm-up then cosine decay to zero,
gradient clipping, optional random shifts, and batches drawn from a generator seeded by the caller, so the same
model, data and seed give the same weights on the CPU. The loss is the caller's (``loss_fn(model, images, labels)``):
cross-entropy for the evaluator and ``finetune``, soft labels from a teacher for ``distill``. After every epoch
``after_epoch(epoch, mean_loss)`` runs (validation, pruning a poor trial, progress); it may raise to stop.

A non-finite loss or weights raise :class:`~searchspace.errors.TrainingDiverged` naming where it happened.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import TrainingDiverged

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # loss(model, images, labels)
AfterEpoch = Callable[[int, float], None]  # after_epoch(epoch, mean training loss)


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: ``steps`` optimizer steps in all (None = ``epochs`` passes over the data)."""

    epochs: int = 1
    steps: int | None = None
    lr: float = 5e-4  # peak learning rate of AdamW
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup: float = 0.1  # share of the steps spent warming up linearly
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 = off
    augment: bool = False  # random shifts of up to 1/8 of the image
    seed: int = 0  # seed of the batch order and the augmentation

    def total_steps(self, examples: int) -> int:
        return self.steps if self.steps is not None else self.epochs * num_batches(examples, self.batch_size)


def train(model: nn.Module, data: Any, loss_fn: Loss, schedule: Schedule = Schedule(), *,
          device: str | torch.device = "cpu", extra_params: Sequence[nn.Parameter] = (),
          after_epoch: AfterEpoch | None = None, log: Callable[[str], None] | None = None,
          label: str = "training") -> dict[str, Any]:
    """Train ``model`` in place on ``data.train`` with ``loss_fn``; it is left in eval mode.

    Returns ``steps``, ``epochs``, ``train_loss`` (mean of the last epoch), ``train_losses`` (per epoch) and
    ``seconds``. ``extra_params`` (e.g. a feature adapter for distillation) are trained alongside.
    """
    start = time.perf_counter()
    total = schedule.total_steps(len(data.train))
    groups = param_groups(model, schedule.weight_decay)
    extra = [p for p in extra_params if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": schedule.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(round(schedule.warmup * total), total))
    generator = torch.Generator().manual_seed(schedule.seed)
    trainable = [p for p in model.parameters() if p.requires_grad] + extra
    done, epoch, losses = 0, 0, []
    while done < total:
        epoch += 1
        model.train()
        running, count = 0.0, 0
        for step, (images, labels) in enumerate(batches(data.train, schedule.batch_size, generator), 1):
            if done >= total:
                break
            if schedule.augment:
                images = random_shift(images, generator)
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model, images, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{label} diverged: loss is {loss.item()} at epoch {epoch}, step {step} "
                                       f"(lr={schedule.lr}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if schedule.grad_clip:
                nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(labels)
            count += len(labels)
            done += 1
        losses.append(running / max(count, 1))
        if not all(torch.isfinite(p).all() for p in trainable):
            raise TrainingDiverged(f"{label} diverged: weights became NaN or infinite in epoch {epoch} "
                                   f"(lr={schedule.lr}); lower the learning rate")
        if log is not None:
            elapsed = time.perf_counter() - start
            eta = f", about {elapsed / done * (total - done):.0f} s to go" if done < total else ""
            log(f"{label}: epoch {epoch}, {done}/{total} steps, loss {losses[-1]:.4f} ({elapsed:.1f} s{eta})")
        if after_epoch is not None:
            after_epoch(epoch, losses[-1])
    model.eval()
    return {"steps": done, "epochs": epoch, "train_loss": losses[-1] if losses else math.nan,
            "train_losses": losses, "seconds": time.perf_counter() - start}


def cross_entropy(label_smoothing: float = 0.0) -> Loss:
    """The supervised loss: cross-entropy of the model's logits against the labels."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)

    return loss


# ------------------------------------------------------------------------------------------------- evaluation


def validate(model: nn.Module, dataset: Dataset, batch_size: int = 256,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(top-1 accuracy in [0, 1], mean cross-entropy)`` of ``model`` on ``dataset`` (eval mode, no gradients)."""
    model.eval()
    correct = seen = 0
    loss = 0.0
    with torch.no_grad():
        for images, labels in batches(dataset, batch_size):
            logits = model(images.to(device)).cpu()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            loss += F.cross_entropy(logits.double(), labels, reduction="sum").item()
            seen += len(labels)
    return correct / max(seen, 1), loss / max(seen, 1)


def top1(model: nn.Module, dataset: Dataset, batch_size: int = 256,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """``model``'s top-1 class for every image of ``dataset``, in order (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        out = [model(images.to(device)).argmax(-1).cpu() for images, _ in batches(dataset, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def agreement(model: nn.Module, reference: nn.Module | torch.Tensor, dataset: Dataset, batch_size: int = 256,
              device: torch.device | str = "cpu") -> float:
    """Share of ``dataset``'s images on which ``model``'s top-1 class is ``reference``'s (labels unused);
    ``reference`` is a model or its :func:`top1` classes on ``dataset``."""
    theirs = reference if isinstance(reference, torch.Tensor) else top1(reference, dataset, batch_size, device)
    ours = top1(model, dataset, batch_size, device)
    return (ours == theirs).float().mean().item() if len(ours) else 0.0


# ------------------------------------------------------------------------------------------------- parts


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices and kernels: biases, norm affines and learnable scales are 1-D (timm's rule)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear from 1/warmup to 1, then a cosine down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def num_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the partial one is dropped), at least one."""
    return n // batch_size if n >= batch_size else 1


def batches(dataset: Dataset, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(images, labels)``; shuffled with ``generator`` (last partial batch dropped), else in order.

    In-memory data (``TensorDataset``) is sliced directly, which is much faster than a ``DataLoader`` for small
    images; dropping the partial batch keeps BatchNorm from ever seeing a batch of one.
    """
    shuffle = generator is not None
    n = len(dataset)
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors[0], dataset.tensors[1]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        end = num_batches(n, batch_size) * batch_size if shuffle else n
        for i in range(0, min(end, n), batch_size):
            index = order[i:i + batch_size]
            yield images[index], labels[index]
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                        drop_last=shuffle and n >= batch_size)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to 1/8 of its size in x and y, edges replicated (digits must not be flipped)."""
    pad = max(1, images.shape[-1] // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator).tolist()
    h, w = images.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside, and give the caller back its own random state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
