"""Save a compressed model so that it reloads without unpickling code, and load it back in one call.

```
<folder>/compressed.json    how to rebuild it: the architecture (an Arch, or a timm model name and its keyword
                            arguments), structural changes to replay (e.g. low-rank factorisation), and the module
                            attributes pruning changed (channel counts, heads, head_dim, Scale.shape, ...)
<folder>/model.safetensors  every tensor, with its pruned shape
```

Loading builds the original architecture, replays the recorded structural changes, sets the changed attributes,
gives each parameter and buffer the saved tensor (and so its pruned shape), and checks that nothing is missing or
left over. How a model's architecture is described and built afresh is its family's adapter's answer
(:meth:`compress.adapters.ModelAdapter.describe` and ``build``), so a family of yours saves once it has an adapter.
:func:`save` reloads what it wrote and checks that the outputs are identical before it returns::

    compress.save(model, "out/model", example=torch.randn(1, 3, 64, 64))
    model = compress.load("out/model")

**Structural changes.** Channel pruning only changes shapes and attributes, which are saved as data. A step that
changes which modules exist (replacing a ``Linear`` by two smaller ones, wrapping a block) records how to redo it
on a freshly built model: it registers a rebuild function once and records its configuration on the model::

    from compress.saving import record_rebuild, register_rebuild

    @register_rebuild("low_rank")
    def _rebuild(model, config):         # -> None (changed in place) or the new root module
        ...

    record_rebuild(model, "low_rank", {"layers": {"stages.0.blocks.0.mlp.fc1": 24}})

A change that is neither recorded nor expressible as shapes and attributes is caught by the output check at save
time, with a message that says so.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searchspace._io import atomic_write_bytes, atomic_write_text
from searchspace.errors import MixerNASError
from searchspace.registry import Registry

from .adapters import AdapterError, adapter_for_source, find_adapter
from .adapters.base import first_conv_in

MANIFEST = "compressed.json"
WEIGHTS = "model.safetensors"
FORMAT = "mixernas-compressed-1"

_SOURCE_ATTR = "_mixernas_source"  # how the model was created: {"kind": "timm", "name": ..., "kwargs": {...}}
_REBUILD_ATTR = "_mixernas_rebuild"  # structural changes in the order applied: [{"name": ..., "config": {...}}]

Rebuild = Callable[[nn.Module, dict[str, Any]], "nn.Module | None"]
REBUILDS: Registry[Rebuild] = Registry("rebuild")


class SaveError(MixerNASError):
    """A model that cannot be saved or reloaded faithfully."""


# ------------------------------------------------------------------------------------ provenance and rebuilds


def register_rebuild(name: str, fn: Rebuild | None = None, *, overwrite: bool = False):
    """Register ``fn(model, config) -> model | None`` that redoes a structural change on a fresh model."""

    def add(f: Rebuild) -> Rebuild:
        REBUILDS.add(name, f, overwrite=overwrite)
        return f

    return add(fn) if fn is not None else add


def record_rebuild(model: nn.Module, name: str, config: Mapping[str, Any]) -> None:
    """Note on ``model`` that rebuild ``name`` was applied with ``config`` (JSON data), after those before it."""
    config = dict(config)
    json.dumps(config)  # a TypeError here is a bug in the step: configurations must be plain data
    REBUILDS.get(name)
    model.__dict__.setdefault(_REBUILD_ATTR, []).append({"name": name, "config": config})


def rebuild_history(model: nn.Module) -> list[dict[str, Any]]:
    """The structural changes recorded on ``model``, oldest first."""
    return copy.deepcopy(model.__dict__.get(_REBUILD_ATTR, []))


def set_source(model: nn.Module, source: Mapping[str, Any]) -> None:
    """Record how ``model`` was created: ``{"kind": "timm", "name": "convformer_s18", "kwargs": {...}}``."""
    json.dumps(dict(source))
    model.__dict__[_SOURCE_ATTR] = dict(source)


def describe_source(model: nn.Module) -> dict[str, Any]:
    """How to build ``model``'s architecture afresh: the source recorded when it was created (brought up to date,
    e.g. its class count), else what its family's adapter (:mod:`compress.adapters`) describes: a MixerNAS ``Arch``
    or a timm model name with kwargs."""
    recorded = model.__dict__.get(_SOURCE_ATTR)
    try:
        if recorded is not None:
            source = adapter_for_source(recorded).describe(model, copy.deepcopy(recorded))
        else:
            adapter = find_adapter(model)
            source = adapter.describe(model) if adapter is not None else None
    except AdapterError as exc:
        raise SaveError(str(exc)) from None
    if source is None:
        raise SaveError(f"cannot tell how to rebuild a {type(model).__name__}: no model adapter describes it (it is "
                        f"neither a MixerNAS model nor a timm model); record it with compress.saving.set_source(model, "
                        f"{{'kind': 'timm', 'name': ..., 'kwargs': {{...}}}}) or register an adapter "
                        f"(compress.adapters.register_adapter)")
    return source


def build_from_source(source: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model of ``source`` (see :func:`describe_source`), built by the adapter of its kind."""
    try:
        return adapter_for_source(source).build(dict(source))
    except AdapterError as exc:
        raise SaveError(str(exc)) from None


def _replay(model: nn.Module, history: list[dict[str, Any]]) -> nn.Module:
    import compress.steps  # noqa: F401  (the built-in steps register their rebuilds)

    for entry in history:
        try:
            fn = REBUILDS.get(entry["name"])
        except MixerNASError:
            raise SaveError(f"the saved model needs rebuild {entry['name']!r}, which is not registered; import the "
                            f"module that defines the step that made it before loading") from None
        model = fn(model, entry["config"]) or model
    model.__dict__[_REBUILD_ATTR] = copy.deepcopy(history)
    return model


# ---------------------------------------------------------------------------------------- module attributes


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_is_plain(v) for v in value)


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Public, plain-data attributes of one module (channel counts, shapes, heads, scales, flags)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _is_plain(v)}


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def attribute_changes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module name, the plain attributes of ``model`` that differ from (or are absent in) ``reference``."""
    ref_modules = dict(reference.named_modules())
    changes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ref = _plain_attributes(ref_modules[name]) if name in ref_modules else {}
        diff = {k: v for k, v in _plain_attributes(module).items() if k not in ref or not _same(v, ref[k])}
        if diff:
            changes[name] = diff
    return changes


# ---------------------------------------------------------------------------------------------- save, load


def _example_input(model: nn.Module, example: Any) -> torch.Tensor | None:
    from searchspace.latency import InputSpec

    if isinstance(example, torch.Tensor):
        return example
    if isinstance(example, InputSpec):
        return example.example("cpu")
    source = model.__dict__.get(_SOURCE_ATTR) or {}
    size = (source.get("kwargs") or {}).get("img_size") or 32
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return torch.randn(1, first_conv_in(model) or 3, *size)


def save(model: nn.Module, folder: str | Path, *, example: torch.Tensor | Any = None,
         extra: Mapping[str, Any] | None = None, verify: bool = True) -> Path:
    """Write ``model`` to ``folder`` (see the module docstring); returns the folder.

    Args:
        example: an input (tensor or :class:`~searchspace.latency.InputSpec`) for the reload check; None guesses
            one (the model's input channels at 32x32, or its timm ``img_size``).
        extra: JSON data stored in ``compressed.json`` (recipe, preprocessing, report figures).
        verify: reload and compare outputs on ``example``; a model that does not come back identical raises
            :class:`SaveError` and leaves no files behind.
    """
    from safetensors.torch import save as save_tensors

    from searchspace import __version__

    folder = Path(folder)
    source = describe_source(model)
    history = rebuild_history(model)
    reference = _replay(build_from_source(source), history)
    state = model.state_dict()
    ref_keys = set(reference.state_dict())
    removed = sorted(ref_keys - set(state))
    for key in removed:
        if not _is_none_slot(model, key):
            raise SaveError(f"cannot save: tensor {key!r} of the rebuilt architecture is missing from the model; a "
                            f"step changed the modules without recording how (compress.saving.record_rebuild)")
    unexpected = sorted(set(state) - ref_keys)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise SaveError(f"cannot save: the model has tensors its rebuilt architecture lacks ({shown}); a step "
                        f"changed the modules without recording how (compress.saving.record_rebuild)")
    manifest = {
        "format": FORMAT,
        "source": source,
        "rebuild": history,
        "attributes": {name: {k: _encode(v) for k, v in attrs.items()}
                       for name, attrs in attribute_changes(model, reference).items()},
        "removed": removed,
        "params": sum(p.numel() for p in model.parameters()),
        "created_with": {"mixernas": __version__, "torch": torch.__version__.split("+")[0]},
        "extra": dict(extra or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, save_tensors(tensors, metadata={"format": FORMAT}))
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if verify:
        try:
            _verify(model, folder, example)
        except BaseException:
            for name in (MANIFEST, WEIGHTS):
                (folder / name).unlink(missing_ok=True)
            raise
    return folder


def _verify(model: nn.Module, folder: Path, example: Any) -> None:
    x = _example_input(model, example)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    reloaded = load(folder, map_location=str(device))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x.to(device))
            got = reloaded(x.to(device))
    finally:
        model.train(was_training)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
        return  # models with structured outputs are checked by their own tests
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-5, atol=1e-6):
        diff = (expected - got).abs().max().item() if expected.shape == got.shape else "shape"
        raise SaveError(f"the saved model does not reproduce the model's outputs (max difference {diff}); a step "
                        f"changed the model in a way that is not recorded (compress.saving.record_rebuild)")


def load(folder: str | Path, map_location: str = "cpu") -> nn.Module:
    """The model :func:`save` wrote, in eval mode: ``compress.load("runs/x/model")`` (or its parent folder)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / MANIFEST).exists() and (folder / "model" / MANIFEST).exists():
        folder = folder / "model"
    manifest_path, weights = folder / MANIFEST, folder / WEIGHTS
    if not manifest_path.exists() or not weights.exists():
        raise SaveError(f"{str(folder)!r} holds no compressed model ({MANIFEST} and {WEIGHTS}); pass the folder "
                        f"python -m compress wrote")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SaveError(f"cannot read {manifest_path}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise SaveError(f"{manifest_path} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    model = _replay(build_from_source(manifest["source"]), manifest.get("rebuild", []))
    modules = dict(model.named_modules())
    for name, attrs in manifest.get("attributes", {}).items():
        if name not in modules:
            raise SaveError(f"{manifest_path}: module {name!r} does not exist in the rebuilt model")
        for key, value in attrs.items():
            setattr(modules[name], key, _decode(value))
    for key in manifest.get("removed", []):
        module, leaf = _owner(model, key)
        if leaf in module._parameters:
            module._parameters[leaf] = None
        else:
            module._buffers[leaf] = None
    state = load_file(str(weights), device=map_location)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SaveError(f"{weights} does not fit the rebuilt model: {len(missing)} missing and {len(unexpected)} "
                        f"unexpected tensors (e.g. {(missing or unexpected)[0]})")
    for key, tensor in state.items():
        if expected[key].shape != tensor.shape:  # a pruned shape: a fresh tensor of it, filled below
            # Not the loaded tensor itself: safetensors maps the file, so its tensors start wherever they lie in
            # it (8-byte aligned), and some BLAS kernels (MKL's sgemv under a 1x1 conv at 1x1, on AMD EPYC) sum
            # in another order for a weight that is not 16-byte aligned: 2e-7 off the in-memory model.
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            module, leaf = _owner(model, key)
            if leaf in module._parameters:
                old = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(fresh, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = fresh
    model.load_state_dict(state, strict=True)
    model.__dict__[_SOURCE_ATTR] = manifest["source"]
    return model.to(map_location).eval()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``compressed.json`` of a saved model (its source, rebuilds, changed attributes and extra data)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and (folder / "model" / MANIFEST).exists():
        folder = folder / "model"
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def is_saved_model(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / MANIFEST).exists() or (folder / "model" / MANIFEST).exists()


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _is_none_slot(model: nn.Module, key: str) -> bool:
    """True if ``key`` names a parameter or buffer slot of ``model`` that is set to None (e.g. a pruned bias)."""
    try:
        module, leaf = _owner(model, key)
    except AttributeError:
        return False
    for slots in (module._parameters, module._buffers):
        if leaf in slots and slots[leaf] is None:
            return True
    return False
