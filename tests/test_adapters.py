"""Model-family adapters: each built-in passes the adapter contract (detection, block halves, attention runs with
token pruning and merging through them, head layouts, classifier, rebuild), claims its own family and no other's,
and a user's adapter brings a new family to token pruning and to save/reload without touching compress."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import compress
import searchspace
from compress import saving
from compress.adapters import (
    AdapterError,
    AttentionRun,
    ModelAdapter,
    adapter_for,
    find_adapter,
    get_adapter,
    list_adapters,
    register_adapter,
    split_block,
    unregister_adapter,
)
from compress.adapters.contract import AdapterContract
from compress.steps.tokens import apply_token_pruning
from compress.tokens import TokenPruning
from searchspace.errors import MixerNASError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------- the built-in families


class TestOursWithAttentionAndFusedBlocks(AdapterContract):
    adapter = "mixernas"

    def make_model(self):  # metaformer blocks with attention in stages 3-4, fused (modulation) blocks elsewhere
        return timm.create_model("mixernas_efficientmod_xxs", pretrained=False, num_classes=10)


class TestOursCASViT(AdapterContract):
    adapter = "mixernas"
    has_attention = False  # additive attention has no attention matrix: not an attention=True mixer

    def make_model(self):
        return searchspace.build_model("CAS-ViT-XS", num_classes=10)


class TestTimmCAFormer(AdapterContract):
    adapter = "timm_metaformer"

    def make_model(self):
        return timm.create_model("caformer_s18", pretrained=False, num_classes=10)


class TestTimmViT(AdapterContract):
    adapter = "timm_vit"

    def make_model(self):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)


class TestTimmOther(AdapterContract):
    adapter = "timm"
    splits_blocks = has_attention = False

    def make_model(self):
        return timm.create_model("resnet10t", pretrained=False, num_classes=10)


def family_models() -> dict[str, nn.Module]:
    return {
        "mixernas": searchspace.build_model("PoolFormerV2-S12", num_classes=10),
        "timm_metaformer": timm.create_model("poolformerv2_s12", pretrained=False, num_classes=10),
        "timm_vit": timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10),
        "timm": timm.create_model("resnet10t", pretrained=False, num_classes=10),
    }


def test_each_adapter_claims_its_own_family_and_no_other():
    models = family_models()
    for family, model in models.items():
        assert find_adapter(model).name == family
        for other in ("mixernas", "timm_metaformer", "timm_vit"):
            assert get_adapter(other).matches(model) == (other == family), (other, family)
    assert not get_adapter("timm").matches(models["mixernas"])  # built by us, not by timm.create_model
    assert find_adapter(timm.create_model("mixernas_poolformerv2_s12", num_classes=10)).name == "mixernas"


def test_a_model_of_no_known_family_is_refused_with_the_way_out():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
    assert find_adapter(model) is None
    with pytest.raises(AdapterError, match="register_adapter"):
        adapter_for(model)
    with pytest.raises(saving.SaveError, match="register_adapter"):
        saving.describe_source(model)
    with pytest.raises(MixerNASError, match="register_adapter"):
        apply_token_pruning(model, 0.5)
    assert split_block(nn.Linear(4, 4)) is None


def test_a_timm_model_of_another_family_has_no_attention_to_prune_tokens_in():
    with pytest.raises(MixerNASError, match="no attention blocks"):
        apply_token_pruning(family_models()["timm"], 0.5)


# ------------------------------------------------------------------------------------------ a user's family


class ToyAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ToyAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyNet(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 4, num_classes: int = 5):
        super().__init__()
        self.dim, self.depth, self.num_classes = dim, depth, num_classes
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.Sequential(*(ToyBlock(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


class ToyAdapter(ModelAdapter):
    name, description, source_kind = "toy", "the toy ViTs of this test", "toy"

    def matches(self, model):
        return isinstance(model, ToyNet)

    def attention_runs(self, model):
        attention = {j: b.attn for j, b in enumerate(model.blocks)}
        return [AttentionRun(model, "blocks", "blocks", None, "nlc", attention, 0, False, False)]

    def split_block(self, block):
        if type(block) is not ToyBlock:
            return None
        return (lambda x: x + block.attn(block.norm1(x)), lambda x: x + block.mlp(block.norm2(x)))

    def classifier(self, model):
        return model.head

    def describe(self, model, recorded=None):
        return {"kind": "toy", "dim": model.dim, "depth": model.depth, "num_classes": model.num_classes}

    def build(self, source):
        return ToyNet(source["dim"], source["depth"], source["num_classes"])


@pytest.fixture
def toy_adapter():
    register_adapter(ToyAdapter)
    yield get_adapter("toy")
    unregister_adapter("toy")


class TestToyAdapter(AdapterContract):
    adapter = "toy"

    @pytest.fixture(autouse=True)
    def _registered(self, toy_adapter):
        yield

    def make_model(self):
        return ToyNet()


def test_a_registered_adapter_brings_its_family_to_token_pruning_and_save_reload(toy_adapter, tmp_path):
    model = ToyNet().eval()
    assert list_adapters()[0] == "toy" and find_adapter(model) is toy_adapter
    apply_token_pruning(model, 0.5, blocks=[1])
    assert isinstance(model.blocks, TokenPruning)
    mlp_tokens = []
    model.blocks[1].mlp.register_forward_pre_hook(lambda m, a: mlp_tokens.append(a[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert mlp_tokens == [8]  # 16 tokens, half kept between block 1's attention and its MLP (placement inside)
    compress.save(model, tmp_path / "toy", example=x)  # reloads through the adapter and checks the outputs
    reloaded = compress.load(tmp_path / "toy")
    assert isinstance(reloaded, ToyNet) and isinstance(reloaded.blocks, TokenPruning)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), y)


def test_registering_adapters_follows_the_registry_rules(toy_adapter):
    with pytest.raises(MixerNASError, match="already registered"):
        register_adapter(ToyAdapter())
    register_adapter(ToyAdapter(), overwrite=True)
    assert list_adapters().count("toy") == 1 and list_adapters()[0] == "toy"

    class NoDetection(ModelAdapter):
        name = "nothing"

    with pytest.raises(MixerNASError, match="matches"):
        register_adapter(NoDetection)
    with pytest.raises(MixerNASError, match="ModelAdapter"):
        register_adapter(object())
    assert list_adapters()[-4:] == ["mixernas", "timm_metaformer", "timm_vit", "timm"]
