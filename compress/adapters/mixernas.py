"""Our own models: :class:`searchspace.model.MetaFormerNet` (presets, searched architectures, timm-created ones).

Everything is declared rather than looked up by class: attention blocks by the mixer registry's ``attention``
flag, a block's halves by its ``mixer_half``/``mlp_half`` methods, attention heads by the mixer's
``pruning_hints()["num_heads"]``. The model rebuilds from its ``Arch``.
"""

from __future__ import annotations

from torch import nn

from searchspace import Arch, build_model, get_mixer
from searchspace.model import MetaFormerNet

from .base import AttentionRun, Half, HeadLayout, ModelAdapter, Source


class MixerNASAdapter(ModelAdapter):
    name = "mixernas"
    description = "MixerNAS MetaFormerNet: presets and searched architectures"
    source_kind = "mixernas"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MetaFormerNet)

    def attention_runs(self, model: nn.Module) -> list[AttentionRun]:
        runs = []
        for i, (stage_arch, stage) in enumerate(zip(model.arch.stages, model.stages)):
            flags = [get_mixer(run.mixer).attention for run in stage_arch.runs for _ in range(run.depth)]
            attention = {j: stage.blocks[j].mixer for j, flag in enumerate(flags) if flag}
            if attention:  # our blocks take (B, C, H, W) everywhere
                runs.append(AttentionRun(stage, "blocks", f"stages.{i}.blocks", i, "nchw", attention, 0, True, False))
        return runs

    def split_block(self, block: nn.Module) -> tuple[Half, Half] | None:
        """Blocks that declare their halves (``searchspace.blocks``: MetaFormer, fused and CAS-ViT blocks)."""
        mixer_half, mlp_half = getattr(block, "mixer_half", None), getattr(block, "mlp_half", None)
        if callable(mixer_half) and callable(mlp_half):
            return mixer_half, mlp_half
        return None

    def head_layout(self, module: nn.Module) -> HeadLayout | None:
        """Modules that declare their heads through ``pruning_hints()["num_heads"]`` and keep them in a settable
        ``num_heads`` attribute next to ``qkv`` and ``proj`` linears (``searchspace.mixers.attention.Attention``)."""
        hints = module.pruning_hints() if hasattr(module, "pruning_hints") else {}
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        heads = hints.get("num_heads", {}).get(qkv) if qkv is not None else None
        if not heads or not isinstance(proj, nn.Linear) or not _settable(module, "num_heads"):
            return None

        def set_heads(n: int) -> None:
            module.num_heads = n

        return HeadLayout(module, qkv, proj, heads, qkv.out_features // (3 * heads), False, False, set_heads)

    def describe(self, model: nn.Module, recorded: Source | None = None) -> Source | None:
        if recorded is not None:
            source = dict(recorded)
            if isinstance(model, MetaFormerNet):
                source["num_classes"] = model.num_classes  # reset_classifier changes it
            return source
        if not isinstance(model, MetaFormerNet):
            return None
        return {"kind": "mixernas", "arch": model.arch.to_dict(), "num_classes": model.num_classes,
                "in_chans": model.in_chans}

    def build(self, source: Source) -> nn.Module:
        return build_model(Arch.from_dict(source["arch"]), num_classes=int(source["num_classes"]),
                           in_chans=int(source["in_chans"]), drop_path=0.0)


def _settable(module: nn.Module, name: str) -> bool:
    return name in vars(module) or not isinstance(getattr(type(module), name, None), property)
