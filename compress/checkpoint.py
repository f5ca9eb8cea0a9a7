"""Load checkpoints safely, and resolve ``--model`` to a module with its weights.

**Files.** ``.safetensors`` is read with safetensors; ``.pth``, ``.pt``, ``.bin``, ``.ckpt`` and ``.tar`` with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A checkpoint that needs to run
pickled code to load (a custom class, a function call) is refused with a one-line error naming what it asked for;
nothing in it is executed. ``argparse.Namespace`` is the one class allowed besides PyTorch's own: timm's training
script stores its arguments in one, and building a Namespace runs no code of the file's choosing.

**Layouts.** A bare state dict, or the nested layouts training scripts write: timm's ``{"state_dict": ...,
"state_dict_ema": ..., "optimizer": ..., "args": ...}``, ``{"model": ...}``, ``{"module": ...}``, ``{"net": ...}``;
``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are removed. With
``use_ema=True`` the EMA weights are preferred when present.

**Fit.** The weights must fit the model exactly. If they do not, timm's own conversion for the model family
(``checkpoint_filter_fn``: original-repository key names, resized position embeddings) is tried; if it still does
not fit, the error summarises the missing, unexpected and differently shaped tensors.

**Models** (:func:`create_model`): a MixerNAS results folder (``best/arch.json`` + ``best/model.safetensors``),
a folder written by ``python -m compress``, an architecture JSON file, a MixerNAS preset name (``CAFormer-S18``)
or any timm model name (``poolformerv2_s12``, ``convformer_s18``, ``caformer_s18``, ``vit_tiny_patch16_224``,
``deit_small_patch16_224``, ...), always created with ``pretrained=False``: nothing is downloaded. The classifier
size and input channels are read from the checkpoint when not given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searchspace.errors import MixerNASError, first_line

from . import saving
from .adapters.base import first_conv_in, native_input_size

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
SAFE_GLOBALS = [argparse.Namespace]  # timm's train.py saves its args; constructing one runs no file-chosen code
NESTED_KEYS = ("state_dict", "model", "module", "net", "network", "model_state", "model_state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
PREFIXES = ("module.", "_orig_mod.")
HEAD_RESET_ATTR = "_mixernas_head_reset"  # set by adapt_to_data on a model whose classifier starts untrained


class CheckpointError(MixerNASError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need to execute pickled code to load."""


class CheckpointMismatchError(CheckpointError):
    """Weights whose names or shapes do not fit the model."""


# --------------------------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from training-script layouts (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass a .pth, .pt or .safetensors file (or give "
                              f"the folder as --model if it is a search results or compressed-model folder)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path)), source=str(path), use_ema=use_ema)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {exc}") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unknown suffix; use .safetensors or one of "
                              f"{', '.join(TORCH_SUFFIXES)} (PyTorch files, loaded with weights_only=True)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, exc)
        if names:
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} refused: loading it would run pickled code (it asks for {names}), which "
                f"could do anything; it was not executed. Re-save only the tensors where you trust the file "
                f"(torch.save(model.state_dict(), ...) or safetensors)") from None
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} as plain tensors ({' '.join(detail.split())}); "
                              f"nothing in it was run. Is it a PyTorch checkpoint?") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: "
                              f"{first_line(exc) or type(exc).__name__}") from None
    return unwrap_state_dict(obj, source=str(path), use_ema=use_ema)


def _unsafe_globals(path: Path, exc: Exception) -> str:
    """The code a refused checkpoint asks to run (``builtins.eval``, ``mymodule.MyClass``), or "" if none."""
    names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if not names:
        with contextlib.suppress(Exception):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return ", ".join(dict.fromkeys(names))


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint", use_ema: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a state dict or a nested training checkpoint; prefixes removed."""
    for _ in range(4):  # layouts nest at most a few levels ({"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_prefixes({str(k): v for k, v in obj.items()})
        keys = (EMA_KEYS + NESTED_KEYS) if use_ema else NESTED_KEYS
        inner = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:  # a state dict with a few stray entries (e.g. a version int)
            return _strip_prefixes(tensors)
        shown = ", ".join(repr(k) for k in list(obj)[:6])
        raise CheckpointError(f"checkpoint {source!r} holds no state dict I recognise (top-level keys: {shown}); "
                              f"expected tensors, or one of {', '.join(NESTED_KEYS)} holding them")
    if isinstance(obj, nn.Module):  # unreachable with weights_only, kept for in-memory use
        return dict(obj.state_dict())
    raise CheckpointError(f"checkpoint {source!r} holds a {type(obj).__name__}, not a state dict")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------- fitting weights


@dataclass(frozen=True)
class Mismatch:
    missing: tuple[str, ...] = ()  # in the model, not in the checkpoint
    unexpected: tuple[str, ...] = ()  # in the checkpoint, not in the model
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (name, checkpoint shape, model shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)

    def summary(self, limit: int = 3) -> str:
        def names(items: tuple[str, ...]) -> str:
            more = f", and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({names(self.unexpected)})")
        if self.shapes:
            shown = tuple(f"{k}: checkpoint {_shape(a)}, model {_shape(b)}" for k, a, b in self.shapes)
            parts.append(f"{len(self.shapes)} with another shape ({names(shown)})")
        return "; ".join(parts)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def compare(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Mismatch:
    """How ``state`` differs from ``model.state_dict()`` in names and shapes."""
    own = model.state_dict()
    missing = tuple(k for k in own if k not in state)
    unexpected = tuple(k for k in state if k not in own)
    shapes = tuple((k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape))
    return Mismatch(missing, unexpected, shapes)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                 model_name: str = "the model") -> list[str]:
    """Copy ``state`` into ``model``, exactly; returns notes (e.g. that timm's conversion was applied)."""
    mismatch = compare(model, state)
    notes: list[str] = []
    if mismatch:
        converted = _timm_convert(model, state)
        if converted is not None:
            after = compare(model, converted)
            if not after:
                notes.append(f"{source}: converted with timm's checkpoint_filter_fn for {type(model).__name__}")
                state, mismatch = converted, after
    if mismatch:
        matching = len(model.state_dict()) - len(mismatch.missing) - len(mismatch.shapes)
        hint = (f"none of its {len(state)} tensor names match; " if matching == 0 else "")
        raise CheckpointMismatchError(
            f"checkpoint {source!r} does not fit {model_name}: {mismatch.summary()}; {hint}check that --model names "
            f"the architecture the checkpoint was trained with (and --num-classes its classifier size)")
    model.load_state_dict(dict(state), strict=True)
    return notes


def _timm_convert(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """timm's per-family conversion (original key names, resized position embeddings), if the model has one."""
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is None or not type(model).__module__.startswith("timm."):
        return None
    try:
        converted = convert(dict(state), model)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError, AssertionError):
        return None
    return converted if isinstance(converted, Mapping) else None


# --------------------------------------------------------------------------------------------- model facts


def classifier_key(model: nn.Module) -> str | None:
    """State-dict name of the classifier's (last) linear weight, e.g. ``head.fc.weight``."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, nn.Module):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return f"{names[id(linears[-1])]}.weight" if linears and id(linears[-1]) in names else None


def first_conv_key(model: nn.Module) -> str | None:
    """State-dict name of the first convolution's weight (the stem or patch embedding), e.g. ``stem.conv.weight``."""
    return next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def model_num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


model_in_chans = first_conv_in  # input channels: the first convolution's (the stem's or patch embedding's)


# --------------------------------------------------------------------------------------------- resolving --model


@dataclass
class LoadedModel:
    """A model resolved from ``--model`` (and ``--checkpoint``), with what is known about it."""

    model: nn.Module
    name: str  # what the user asked for, for reports
    kind: str  # "timm", "mixernas" (an Arch or preset), "results" (a search's winner) or "compressed"
    input_size: int | None = None  # the size it was trained or searched at, when the files say so
    notes: list[str] = field(default_factory=list)


def create_model(name: str | Path, *, checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
                 num_classes: int | None = None, in_chans: int | None = None, input_size: int | None = None,
                 use_ema: bool = False, checkpoint_label: str | None = None) -> LoadedModel:
    """Resolve ``name`` to a model and load ``checkpoint`` into it (see the module docstring).

    Args:
        checkpoint: a checkpoint file, or a state dict already read (:func:`read_state_dict`); its name in messages
            is ``checkpoint_label``.
        num_classes, in_chans: the checkpoint's classifier size and input channels; None reads them from the
            checkpoint (or uses the architecture's defaults without one).
        input_size: image side the model will see; timm models with a fixed grid (ViT, DeiT) are built for it.
    """
    from searchspace.presets import PRESETS

    text = str(name)
    path = Path(text).expanduser()
    if isinstance(checkpoint, Mapping):
        state, source = dict(checkpoint), checkpoint_label or "checkpoint"
    else:
        state = read_state_dict(checkpoint, use_ema=use_ema) if checkpoint is not None else None
        source = checkpoint_label or (str(checkpoint) if checkpoint is not None else "")
    if path.is_dir():
        return _from_folder(path, state, source)
    if text.endswith(".json") or path.is_file():
        from searchspace import Arch

        arch = Arch.load(path)
        return _build(lambda n, c: _mixernas(arch, n, c), text, "mixernas", state, source, num_classes, in_chans)
    if text in PRESETS:
        from searchspace import preset

        arch = preset(text)
        return _build(lambda n, c: _mixernas(arch, n, c), text, "mixernas", state, source, num_classes, in_chans)
    import timm

    if timm.is_model(text):
        if input_size is None and state is not None:
            input_size = grid_input_size(state)
        return _build(lambda n, c: _timm(text, n, c, input_size), text, "timm", state, source, num_classes,
                      in_chans)
    known = list(PRESETS.names()) + timm.list_models()
    close = difflib.get_close_matches(text, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    raise MixerNASError(f"--model {text!r} is not a folder, an architecture JSON file, a MixerNAS preset or a timm "
                        f"model; {hint}(presets: searchspace.list_presets(); timm: timm.list_models())")


def _mixernas(arch: Any, num_classes: int | None, in_chans: int | None) -> nn.Module:
    from searchspace import build_model

    return build_model(arch, num_classes=1000 if num_classes is None else num_classes,
                       in_chans=3 if in_chans is None else in_chans)


def grid_input_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """The image side a ViT-style checkpoint was trained at, read from its position embedding and patch size
    (``pos_embed`` of ``1 x (prefix + g*g) x C`` and a ``p x p`` patch: ``g * p``); None for other checkpoints."""
    pos, patch = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or patch is None or pos.ndim != 3 or patch.ndim != 4:
        return None
    prefix = sum(int(state[k].shape[1]) for k in ("cls_token", "dist_token", "reg_token")
                 if k in state and state[k].ndim == 3)
    for n in (pos.shape[1] - prefix, pos.shape[1]):  # position embeddings with, then without, the prefix tokens
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return side * int(patch.shape[-1])
    return None


def _timm(name: str, num_classes: int | None, in_chans: int | None, input_size: int | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = None
    if input_size is not None:  # fixed-grid models (ViT, DeiT) are built for the size they will see
        try:
            model = timm.create_model(name, pretrained=False, img_size=input_size, **kwargs)
            kwargs["img_size"] = input_size
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    saving.set_source(model, {"kind": "timm", "name": name, "kwargs": kwargs})
    return model


def _build(make, name: str, kind: str, state: dict[str, torch.Tensor] | None, source: str,
           num_classes: int | None, in_chans: int | None) -> LoadedModel:
    """Build, read the classifier size and input channels from the checkpoint, rebuild if they differ, load."""
    model = make(num_classes, in_chans)
    if state is not None:
        classes, chans = num_classes, in_chans
        key = classifier_key(model)
        if classes is None and key in state and state[key].ndim == 2:
            classes = int(state[key].shape[0])
        key = first_conv_key(model)
        if chans is None and key in state and state[key].ndim == 4:
            chans = int(state[key].shape[1])
        if (classes is not None and classes != model_num_classes(model)) or (
                chans is not None and chans != model_in_chans(model)):
            model = make(classes, chans)
    loaded = LoadedModel(model, name, kind, input_size=native_input_size(model) if kind == "timm" else None)
    if state is not None:
        loaded.notes += load_weights(model, state, source=source, model_name=f"{kind} model {name!r}")
    return loaded


def _from_folder(path: Path, state: dict[str, torch.Tensor] | None, source: str) -> LoadedModel:
    if saving.is_saved_model(path):
        model = saving.load(path)
        extra = saving.read_manifest(path).get("extra", {})
        loaded = LoadedModel(model, str(path), "compressed", input_size=extra.get("input_size"))
    elif (path / "best" / "arch.json").exists() or (path / "model.safetensors").exists():
        from searchspace.nas import load_model

        model = load_model(path)
        loaded = LoadedModel(model, str(path), "results", input_size=results_input_size(path))
    elif (path / "arch.json").exists():
        if state is None:
            raise CheckpointError(f"folder {str(path)!r} has an arch.json but no weights; pass --checkpoint")
        from searchspace import Arch

        arch = Arch.load(path / "arch.json")
        return _build(lambda n, c: _mixernas(arch, n, c), str(path), "mixernas", state, source, None, None)
    else:
        raise MixerNASError(f"folder {str(path)!r} is neither a search results folder (best/arch.json + "
                            f"best/model.safetensors) nor a compressed model (compressed.json); pass one of those, "
                            f"an arch.json file, a preset or a timm model name")
    if state is not None:
        loaded.notes += load_weights(loaded.model, state, source=source, model_name=f"the model in {str(path)!r}")
    return loaded


def results_input_size(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        size = json.loads((path / "best.json").read_text()).get("input_size")
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    return None


# --------------------------------------------------------------------------------------------- fitting the data


OTHER_CLASSES = ("distil", "replace")  # what adapt_to_data does with data of classes the classifier does not know


def adapt_to_data(model: nn.Module, data: Any, *, seed: int = 0, num_classes: int | None = None,
                  other_classes: str = "distil") -> tuple[nn.Module, Any, list[str]]:
    """Make ``model`` and ``data`` (a DataBundle) fit each other, keeping the model; returns ``(model, data, notes)``.

    * Grey data (1 channel) for a model that takes 3: the grey channel is repeated (exactly what a grey photo
      looks like in RGB); other channel mismatches are an error.
    * ``num_classes`` different from the classifier's: the classifier is replaced by a new one for that many
      classes (the data must have them, with labels).
    * Data whose classes are not the classifier's (the digits for an ImageNet checkpoint): with ``other_classes=
      "distil"`` (the default) the classifier is kept and the data is used without its labels (``labelled=False``):
      the training steps learn the original model's outputs, and agreement with it is reported instead of accuracy.
      With ``"replace"`` the classifier is replaced by a new, untrained one for the data's classes (chance accuracy
      until fine-tuned).
    * Unlabelled data (a folder of loose images) keeps the classifier.
    """
    if other_classes not in OTHER_CLASSES:
        raise MixerNASError(f"other_classes must be one of {', '.join(OTHER_CLASSES)}, got {other_classes!r}")
    notes: list[str] = []
    want = model_in_chans(model)
    if want is not None and want != data.in_chans:
        if data.in_chans != 1:
            raise MixerNASError(f"the model takes {want} input channels but the data has {data.in_chans}; use data "
                                f"with {want} channels or a checkpoint trained on {data.in_chans}")
        data = repeat_channels(data, want)
        notes.append(f"the data's grey channel is repeated to the model's {want} input channels")
    classes = model_num_classes(model)
    if num_classes is not None and num_classes != classes:
        if not data.labelled or data.num_classes != num_classes:
            has = f"{data.num_classes} labelled classes" if data.labelled else "no labels"
            raise MixerNASError(f"--num-classes {num_classes} asks for a new classifier, but the data has {has}; "
                                f"give --data a folder with {num_classes} class sub-folders")
        _replace_classifier(model, num_classes, seed)
        notes.append(f"classifier replaced as asked: {classes} -> {num_classes} classes; the new classifier starts "
                     f"untrained (chance accuracy), so fine-tune before distilling from this model")
    elif not data.labelled:
        notes.append("the data has no labels: the training steps learn the original model's outputs (distillation), "
                     "and agreement with the original model is reported instead of accuracy")
    elif classes is not None and classes != data.num_classes:
        if other_classes == "replace":
            _replace_classifier(model, data.num_classes, seed)
            notes.append(f"classifier replaced: the checkpoint predicts {classes} classes, the data has "
                         f"{data.num_classes}; the new classifier starts untrained (chance accuracy), so fine-tune "
                         f"before distilling from this model")
        else:
            notes.append(f"classifier kept: the checkpoint predicts {classes} classes and the data ({data.source}) "
                         f"has {data.num_classes} others, so its images are used without labels: the training steps "
                         f"learn the original model's outputs, and agreement with it is reported instead of accuracy "
                         f"(give --data a folder of the checkpoint's {classes} classes for accuracy)")
            data = data.unlabelled()
    return model, data, notes


def _replace_classifier(model: nn.Module, num_classes: int, seed: int) -> None:
    if not callable(getattr(model, "reset_classifier", None)):
        raise MixerNASError(f"the model has no reset_classifier() to replace its classifier with one for "
                            f"{num_classes} classes; use data of its own classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    model.__dict__[HEAD_RESET_ATTR] = True  # compress.apply warns if it becomes a teacher untrained


def repeat_channels(data: Any, channels: int) -> Any:
    """A DataBundle whose 1-channel images are repeated to ``channels`` (views, no copy for in-memory data)."""
    from torch.utils.data import TensorDataset

    def wrap(ds: Any) -> Any:
        if isinstance(ds, TensorDataset):
            images, *rest = ds.tensors
            return TensorDataset(images.expand(-1, channels, -1, -1), *rest)
        return RepeatedChannels(ds, channels)

    return dataclasses.replace(data, train=wrap(data.train), val=wrap(data.val), in_chans=channels,
                               mean=tuple(data.mean) * channels, std=tuple(data.std) * channels)


class RepeatedChannels(torch.utils.data.Dataset):
    """A dataset of 1-channel images seen as ``channels``-channel ones (lazily loaded image folders)."""

    def __init__(self, base: Any, channels: int):
        self.base, self.channels = base, channels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.base[index]
        return image.expand(self.channels, *image.shape[1:]), label
