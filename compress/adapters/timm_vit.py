"""timm's ViTs (``timm.models.vision_transformer.VisionTransformer``: ViT, DeiT, distilled DeiT).

One sequence of blocks on ``(B, N, C)`` tokens after ``num_prefix_tokens`` class/distillation tokens; attention is
``timm.layers.Attention``, named exactly. timm's ``Block`` takes an additive ``attn_mask`` (used for ToMe's
proportional attention); its attention may carry per-head q/k norms, so heads are pruned whole there.
"""

from __future__ import annotations

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .base import AttentionRun, Half, HeadLayout, Source
from .timm_generic import TimmAdapter, set_timm_heads, sync_timm_attention


class TimmViTAdapter(TimmAdapter):
    name = "timm_vit"
    description = "timm ViT and DeiT (VisionTransformer)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def attention_runs(self, model: nn.Module) -> list[AttentionRun]:
        attention = {j: b.attn for j, b in enumerate(model.blocks) if type(getattr(b, "attn", None)) is Attention}
        if not attention:
            return []
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        proportional = all(type(b) is Block for b in model.blocks)
        return [AttentionRun(model, "blocks", "blocks", None, "nlc", attention, prefix, prefix == 0, proportional)]

    def split_block(self, block: nn.Module) -> tuple[Half, Half] | None:
        if type(block) is not Block:
            return None
        b = block
        return (lambda x: x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))),
                lambda x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))

    def head_layout(self, module: nn.Module) -> HeadLayout | None:
        if type(module) is not Attention:
            return None
        qk_norm = not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity))
        return HeadLayout(module, module.qkv, module.proj, module.num_heads, module.head_dim, False, qk_norm,
                          lambda n: set_timm_heads(module, n))

    def describe(self, model: nn.Module, recorded: Source | None = None) -> Source | None:
        """The timm name and kwargs, with ``img_size`` where the model was built for another size than its
        default (the position embedding's shape depends on it)."""
        source = super().describe(model, recorded)
        if source is not None and recorded is None:
            size = tuple(getattr(getattr(model, "patch_embed", None), "img_size", None) or ())
            default = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ())[1:])
            if size and size != default:
                source["kwargs"]["img_size"] = list(size)
        return source

    def sync_pruned(self, module: nn.Module) -> None:
        if type(module) is Attention:
            sync_timm_attention(module)
