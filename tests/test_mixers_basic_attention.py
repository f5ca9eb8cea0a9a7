"""The mixers of ``searchspace.mixers.basic`` and ``searchspace.mixers.attention``: contract, timm parity, pruning."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from searchspace.errors import MixerNASError
from searchspace.mixers import create_mixer, get_mixer
from searchspace.mixers.attention import GPSA, conv_offsets, head_layout, relative_offsets
from searchspace.mixers.basic import RandomMixing, random_mixing_matrix

NAMES = ["identity", "pooling", "sepconv", "random", "attention", "strip_attention", "gpsa"]
SIZES = [(1, 1), (5, 3), (2, 9), (7, 7)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_any_size_same_shape_and_deterministic(name):
    mixer = create_mixer(name, 32).eval()
    for h, w in SIZES:
        x = torch.randn(2, 32, h, w)
        y = mixer(x)
        assert y.shape == x.shape
        assert torch.isfinite(y).all()
        assert torch.equal(y, mixer(x))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    mixer = create_mixer(name, 32).train()
    x = torch.randn(2, 32, 5, 3, requires_grad=True)  # so parameter-free mixers backpropagate too
    mixer(x).square().mean().backward()
    assert x.grad is not None
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_matches_eager(name):
    mixer = create_mixer(name, 32).eval()
    x = torch.randn(1, 32, 5, 3)
    program = torch.export.export(mixer, (x,))
    torch.testing.assert_close(program.module()(x), mixer(x))


def test_registry_declares_attention():
    assert {n for n in NAMES if get_mixer(n).attention} == {"attention", "strip_attention", "gpsa"}
    for n in NAMES:
        assert get_mixer(n).reference
        assert all(isinstance(v, (int, float, str, bool)) for v in get_mixer(n).defaults.values())


# ----------------------------------------------------------------------------------------------- timm parity


@pytest.mark.parametrize("dim", [64, 320])
def test_pooling_sepconv_attention_match_timm(dim):
    tm = pytest.importorskip("timm.models.metaformer")
    x = torch.randn(2, dim, 7, 5)
    torch.testing.assert_close(create_mixer("pooling", dim)(x), tm.Pooling()(x), rtol=0, atol=0)

    ours, theirs = create_mixer("sepconv", dim), tm.SepConv(dim)
    assert n_params(ours) == n_params(theirs)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))

    ours, theirs = create_mixer("attention", dim), tm.Attention(dim)
    assert n_params(ours) == n_params(theirs)
    theirs.load_state_dict(ours.state_dict())
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours(x), theirs(tokens).transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("dim", [128, 144, 288, 312])
def test_efficientmod_attention_layout(dim):
    # EfficientMod: 8 heads of max(dim // 8, 32) channels, qkv without bias, projection with bias
    mixer = create_mixer("attention", dim, num_heads=8, min_head_dim=32, proj_bias=True)
    width = 8 * max(dim // 8, 32)
    assert (mixer.num_heads, mixer.head_dim) == (8, width // 8)
    assert n_params(mixer) == dim * 3 * width + width * dim + dim
    assert mixer(torch.randn(1, dim, 3, 4)).shape == (1, dim, 3, 4)


@pytest.mark.parametrize("name, dim, args", [
    ("attention", 48, {}),  # heads of 32 do not tile 48 (timm would fail in the forward)
    ("gpsa", 48, {}),
    ("gpsa", 64, {"num_heads": 3}),
    ("strip_attention", 64, {"num_heads": 3}),
    ("strip_attention", 64, {"sr_ratio": 0}),
    ("pooling", 64, {"pool_size": 2}),
    ("sepconv", 64, {"kernel_size": 4}),
    ("sepconv", 64, {"act": "nope"}),
    ("random", 64, {"seed": 1.5}),
])
def test_unusable_arguments_are_rejected_by_check_and_constructor(name, dim, args):
    factory = get_mixer(name).factory
    problem = factory.check(dim, **args)
    assert problem
    with pytest.raises(MixerNASError, match=f"^{name}: ") as info:
        factory(dim, **args)
    assert problem in str(info.value)
    with pytest.raises(MixerNASError):
        create_mixer(name, dim, **args)


def test_check_accepts_what_presets_use():
    for dim in (128, 144, 288, 312):  # EfficientMod widths with 8 heads
        assert get_mixer("attention").factory.check(dim, num_heads=8, min_head_dim=32) is None
    assert get_mixer("attention").factory.check(320) is None
    assert get_mixer("strip_attention").factory.check(64, sr_ratio=4) is None


def test_head_layout_rules():
    assert head_layout(320) == (10, 32)
    assert head_layout(16) == (1, 32)  # at least one head
    assert head_layout(64, num_heads=4) == (4, 16)
    with pytest.raises(MixerNASError, match="head_dim >= 1"):
        head_layout(64, head_dim=0)


# ---------------------------------------------------------------------------------------------- random mixing


def test_random_matrix_is_seeded_row_stochastic_and_frozen():
    m = random_mixing_matrix(4, 6, seed=3)
    assert m.shape == (24, 24)
    torch.testing.assert_close(m.sum(-1), torch.ones(24))
    assert torch.equal(m, random_mixing_matrix(4, 6, seed=3))
    assert not torch.equal(m, random_mixing_matrix(4, 6, seed=4))
    assert not torch.equal(m, random_mixing_matrix(6, 4, seed=3))
    assert m.std() > 0  # really random, not uniform averaging

    mixer = RandomMixing(16, seed=3)
    assert n_params(mixer) == 0 and len(mixer.state_dict()) == 0
    x = torch.randn(2, 16, 4, 6)
    expected = torch.einsum("mn,bcn->bcm", m, x.flatten(2)).unflatten(2, (4, 6))
    torch.testing.assert_close(mixer(x), expected)
    torch.testing.assert_close(RandomMixing(16, seed=3)(x), mixer(x), rtol=0, atol=0)  # fresh instance, same matrix


def test_random_cache_stays_out_of_copies_and_export():
    mixer = RandomMixing(8)
    x = torch.randn(1, 8, 3, 5)
    y = mixer(x)
    assert len(mixer._cache) == 1
    for clone in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
        assert clone._cache == {}
        assert torch.equal(clone(x), y)
    fresh = RandomMixing(8)
    program = torch.export.export(fresh, (x,))  # uncached: the matrix is computed inside the graph
    assert fresh._cache == {}
    torch.testing.assert_close(program.module()(x), y)


# ------------------------------------------------------------------------------------------------------- gpsa


def test_relative_offsets_convention():
    rel = relative_offsets(2, 3)  # tokens row-major: token 1 is (row 0, col 1), token 3 is (row 1, col 0)
    assert rel[1, 3].tolist() == [-1.0, 1.0, 2.0]
    assert rel[3, 1].tolist() == [1.0, -1.0, 2.0]
    assert torch.equal(rel[..., 2], rel[..., 0] ** 2 + rel[..., 1] ** 2)


def test_conv_offsets_cover_a_kernel():
    assert set(conv_offsets(9)) == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert len(set(conv_offsets(10))) == 10


def test_gpsa_positional_attention_starts_convolutional():
    mixer = GPSA(9 * 4, head_dim=4)  # 9 heads: one per tap of a 3x3 kernel
    h, w = 5, 6
    logits = (relative_offsets(h, w) @ mixer.pos_weight.t()).permute(2, 0, 1)
    centre = 2 * w + 3  # an interior query token
    for head, (dx, dy) in enumerate(conv_offsets(9)):
        key = logits[head, centre].argmax().item()
        assert (key % w - centre % w, key // w - centre // w) == (dx, dy)
    assert torch.equal(mixer.v.weight, torch.eye(36))
    assert torch.equal(mixer.gating_param, torch.ones(9))


def test_gpsa_with_strong_locality_and_closed_gate_is_a_shift_per_head():
    dim, head_dim = 5 * 2, 2
    mixer = GPSA(dim, head_dim=head_dim, locality_strength=30.0).eval()
    with torch.no_grad():
        mixer.gating_param.fill_(30.0)  # all positional
        mixer.proj.weight.copy_(torch.eye(dim))
        mixer.proj.bias.zero_()
    x = torch.randn(1, dim, 6, 7)
    y = mixer(x)
    for head, (dx, dy) in enumerate(conv_offsets(5)):
        ch = slice(head * head_dim, (head + 1) * head_dim)
        torch.testing.assert_close(y[0, ch, 2:4, 2:5], x[0, ch, 2 + dy:4 + dy, 2 + dx:5 + dx], atol=1e-4, rtol=0)


def test_gpsa_init_weights_restores_local_init():
    mixer = GPSA(64)
    reference = copy.deepcopy(mixer.state_dict())
    for m in mixer.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
    mixer.init_weights()
    assert torch.equal(mixer.pos_weight, reference["pos_weight"])
    assert torch.equal(mixer.v.weight, reference["v.weight"])


# -------------------------------------------------------------------------------------------- strip attention


@pytest.mark.parametrize("sr_ratio", [1, 2, 4])
def test_strip_attention_reduces_keys_and_compresses_qk(sr_ratio):
    dim = 64
    mixer = create_mixer("strip_attention", dim, sr_ratio=sr_ratio, qk_dim=8)
    assert mixer.q.out_channels == mixer.k.out_channels == 8 and mixer.v.out_channels == dim
    expected = 2 * 8 * dim + dim * dim + dim * dim + dim + (dim * sr_ratio**2 + dim if sr_ratio > 1 else 0)
    assert n_params(mixer) == expected
    for h, w in [(1, 1), (3, 5), (8, 8)]:
        assert mixer(torch.randn(2, dim, h, w)).shape == (2, dim, h, w)


def test_strip_attention_heads_and_ratio():
    mixer = create_mixer("strip_attention", 96, qk_ratio=0.1, num_heads=4)
    assert mixer.q.out_channels % 4 == 0
    assert mixer(torch.randn(1, 96, 5, 7)).shape == (1, 96, 5, 7)


# ------------------------------------------------------------------------------------------------- pruning


def _prune(mixer: nn.Module, dim: int, residual: bool = False, **kwargs) -> nn.Module:
    tp = pytest.importorskip("torch_pruning")

    class Residual(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return x + self.inner(x)

    model = nn.Sequential(nn.Conv2d(16, dim, 1), Residual(mixer) if residual else mixer, nn.Conv2d(dim, 16, 1))
    hints = mixer.pruning_hints() if hasattr(mixer, "pruning_hints") else {}
    hints = {**hints, **kwargs}
    hints["ignored_layers"] = [model[2], *hints.get("ignored_layers", [])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 16, 8, 8), importance=tp.importance.MagnitudeImportance(),
                                      pruning_ratio=0.5, **hints)
        pruner.step()
    assert model[0].out_channels == dim // 2
    for h, w in [(8, 8), (5, 3), (1, 1)]:
        assert model(torch.randn(2, 16, h, w)).shape == (2, 16, h, w)
    return pruner


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("residual", [False, True])
def test_channel_pruning_with_hints_keeps_it_runnable(name, residual):
    _prune(create_mixer(name, 64), 64, residual=residual)


@pytest.mark.parametrize("name", ["identity", "pooling", "sepconv", "random", "attention", "gpsa"])
def test_channel_pruning_without_hints_keeps_it_runnable(name):
    _prune(create_mixer(name, 64), 64, num_heads={})


def _row_origins(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """For each row of a pruned weight, the index of the original row it came from (columns kept as-is)."""
    return [int((original == row).all(1).nonzero()[0]) for row in pruned]


@pytest.mark.parametrize("whole_heads", [False, True])
def test_attention_head_pruning_keeps_heads_aligned(whole_heads):
    tp = pytest.importorskip("torch_pruning")
    dim = 128
    mixer = create_mixer("attention", dim)  # 4 heads of 32
    original = mixer.qkv.weight.detach().clone()
    model = nn.Sequential(nn.Conv2d(16, dim, 1), mixer, nn.Conv2d(dim, 16, 1))
    extra = dict(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5) if whole_heads else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 16, 4, 4), importance=tp.importance.MagnitudeImportance(),
                                      pruning_ratio=0.5, ignored_layers=[model[0], model[2]], **mixer.pruning_hints(),
                                      **extra)
        pruner.step()
    mixer.num_heads = pruner.num_heads[mixer.qkv]  # what a pruner does after removing whole heads; no-op otherwise
    assert mixer.num_heads == (2 if whole_heads else 4)
    width = mixer.qkv.out_features // 3
    origins = _row_origins(mixer.qkv.weight, original)
    for j, r in enumerate(origins):  # row j of the pruned q/k/v is read as (part, head); it must come from there
        part, head = j // width, (j % width) // mixer.head_dim
        assert r // dim == part
        if not whole_heads:
            assert (r % dim) // 32 == head
    if whole_heads:
        kept = sorted({(r % dim) // 32 for r in origins})
        assert len(kept) == 2 and all(((r % dim) // 32) == kept[(j % width) // 32] for j, r in enumerate(origins))
    assert model(torch.randn(1, 16, 3, 5)).shape == (1, 16, 3, 5)


@pytest.mark.parametrize("name", ["random", "gpsa"])
def test_a_traced_mixer_holds_its_size_derived_tensor_as_a_constant(name):
    # runtimes that convert a traced model (OpenVINO) run the graph as traced: once the mixer has run at a size,
    # as the adapters make sure, its matrix or offset table must be a constant of the trace, not regenerated
    # (arange, hashing, softmax) on every call; a mixer traced cold still traces, computing it in the graph
    x = torch.randn(1, 32, 6, 5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings that sizes become constants
        for warm in (True, False):
            mixer = create_mixer(name, 32).eval()
            if warm:
                mixer(x)
            traced = torch.jit.trace(mixer, x)
            kinds = {node.kind() for node in traced.inlined_graph.nodes()}
            assert ("aten::arange" in kinds) is not warm, sorted(kinds)
            torch.testing.assert_close(traced(x), mixer(x))
