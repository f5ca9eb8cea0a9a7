"""timm's MetaFormers (``timm.models.metaformer``: poolformerv2, convformer, caformer; poolformer v1 too).

Attention is timm's MetaFormer ``Attention`` class, named exactly; its stages run on ``(B, N, C)`` tokens. The
attention's inner width must equal its input width (its forward reshapes to it). timm's ``Scale`` keeps a
``shape`` attribute that pruning must re-derive.
"""

from __future__ import annotations

from timm.models.metaformer import Attention, MetaFormer, MetaFormerBlock, Scale
from torch import nn

from .base import AttentionRun, Half, HeadLayout
from .timm_generic import TimmAdapter, set_timm_heads, sync_timm_attention


class TimmMetaFormerAdapter(TimmAdapter):
    name = "timm_metaformer"
    description = "timm MetaFormers: poolformerv2, convformer, caformer"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MetaFormer)

    def attention_runs(self, model: nn.Module) -> list[AttentionRun]:
        runs = []
        for i, stage in enumerate(model.stages):
            attention = {j: b.token_mixer for j, b in enumerate(stage.blocks) if type(b.token_mixer) is Attention}
            if attention:  # timm runs these stages on (B, N, C) tokens
                runs.append(AttentionRun(stage, "blocks", f"stages.{i}.blocks", i, "nlc", attention, 0, True, False))
        return runs

    def split_block(self, block: nn.Module) -> tuple[Half, Half] | None:
        if type(block) is not MetaFormerBlock:
            return None
        b = block
        return (lambda x: b.res_scale1(x) + b.layer_scale1(b.drop_path1(b.token_mixer(b.norm1(x)))),
                lambda x: b.res_scale2(x) + b.layer_scale2(b.drop_path2(b.mlp(b.norm2(x)))))

    def head_layout(self, module: nn.Module) -> HeadLayout | None:
        if type(module) is not Attention:
            return None
        # forward: x.transpose(1, 2).reshape(B, N, C) with C the input width, so the widths must stay equal
        return HeadLayout(module, module.qkv, module.proj, module.num_heads, module.head_dim, True, False,
                          lambda n: set_timm_heads(module, n))

    def sync_pruned(self, module: nn.Module) -> None:
        if type(module) is Scale:
            module.shape = (module.scale.numel(),) + (1,) * (len(module.shape) - 1)
        elif type(module) is Attention:
            sync_timm_attention(module)
