"""The Hadamard mixers (modulation, hadamard) and CAS-ViT's additive mixer: published structure and pruning.

The shared contract (tests/test_mixers.py) covers shapes, gradients, export and pruning at default arguments; here:
parameter counts equal to the reference implementations, forwards equal to the reference formulations, and
torch-pruning removing exactly the channels that belong together.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from searchspace.arch import Arch, Stage
from searchspace.errors import InvalidArchError, MixerNASError
from searchspace.mixers import create_mixer, get_mixer
from searchspace.mixers.additive import AdditiveMixer, LocalIntegration
from searchspace.mixers.modulation import Modulation, RecursiveGatedConv
from searchspace.testing import MixerContract


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------- contract at other arguments


class TestModulationExpanded(MixerContract):
    mixer, mixer_args = "modulation", {"expansion": 6, "kernel_size": 5}


class TestHadamardOrder2(MixerContract):
    mixer, mixer_args = "hadamard", {"order": 2}


class TestHadamardOrder5(MixerContract):
    mixer, mixer_args = "hadamard", {"order": 5}


class TestAdditiveOddWidth(MixerContract):
    mixer, dim = "additive", 48  # CAS-ViT-XS/S stage-1 width


# ------------------------------------------------------------------------------------------- parameter counts


def efficientmod_mlp_params(dim: int, r: int, k: int = 7) -> int:
    """EfficientMod's ``Mlp(dim, dim*r, conv_group_dim=r, context_size=k)``: fc1, fc2, f, dwconv, g."""
    return (dim * r * dim + r * dim) + (r * dim * dim + dim) + 2 * (dim * dim + dim) + dim * k * k + dim


def hornet_gnconv_params(dim: int, order: int, k: int = 7) -> int:
    """HorNet's ``gnconv(dim, order)``: proj_in C->2C, one depthwise conv on sum(dims), pws, proj_out."""
    dims = [dim // 2**i for i in reversed(range(order))]
    pws = sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(order - 1))
    return (dim * 2 * dim + 2 * dim) + sum(dims) * (k * k + 1) + pws + (dim * dim + dim)


@pytest.mark.parametrize("dim", [32, 64, 144, 312])
@pytest.mark.parametrize("r", [1, 4, 6])
def test_modulation_matches_efficientmod_mlp(dim, r):
    assert n_params(Modulation(dim, expansion=r)) == efficientmod_mlp_params(dim, r)


def test_modulation_bias_switch_is_efficientmods():
    # EfficientMod's `bias` drops only the fc1/fc2 biases; f, g and the depthwise conv keep theirs.
    assert n_params(Modulation(64, expansion=6, bias=False)) == efficientmod_mlp_params(64, 6) - 6 * 64 - 64


@pytest.mark.parametrize("dim,order", [(64, 2), (128, 3), (256, 4), (512, 5), (96, 2), (384, 4), (768, 5)])
def test_hadamard_matches_hornet_gnconv(dim, order):
    # HorNet-T/S widths 64/96 * (1, 2, 4, 8) with orders 2, 3, 4, 5 per stage.
    assert n_params(RecursiveGatedConv(dim, order=order)) == hornet_gnconv_params(dim, order)


def test_hadamard_accepts_widths_hornet_cannot_split():
    m = RecursiveGatedConv(220, order=3)  # 220 is not a multiple of 4; HorNet's split would fail
    assert [dw.out_channels for dw in m.dws] == [55, 110, 220]
    assert m(torch.randn(1, 220, 3, 3)).shape == (1, 220, 3, 3)


@pytest.mark.parametrize("dim", [48, 56, 112, 220, 512])
def test_additive_matches_casvit_token_mixer(dim):
    # AdditiveTokenMixer(dim): qkv 3C^2, two (spatial 13C + channel C^2) gates, dwc 10C, proj 10C.
    assert n_params(AdditiveMixer(dim)) == 5 * dim * dim + 46 * dim


@pytest.mark.parametrize("dim", [48, 220])
def test_local_integration_matches_casvit(dim):
    # 1x1 conv (bias), BatchNorm, depthwise 3x3 (bias), GELU, 1x1 conv (bias).
    assert n_params(LocalIntegration(dim)) == 2 * (dim * dim + dim) + 2 * dim + 10 * dim
    mid = 2 * dim
    assert n_params(LocalIntegration(dim, ratio=2.0)) == (dim * mid + mid) + 2 * mid + 10 * mid + (mid * dim + dim)


def test_local_integration_takes_norm_and_act_by_name():
    m = LocalIntegration(32, ratio=0.5, act="relu", norm="layernorm")
    assert m.fc1.out_channels == 16 and isinstance(m.act, nn.ReLU)
    assert m(torch.randn(2, 32, 5, 3)).shape == (2, 32, 5, 3)


# ------------------------------------------------------------------------- forwards equal to the references


@torch.no_grad()
def test_modulation_equals_efficientmod_formula():
    torch.manual_seed(0)
    for r in (1, 3):
        m = Modulation(16, expansion=r).eval()
        x = torch.randn(2, 16, 5, 7)
        context = m.g(F.gelu(m.dwconv(m.f(x))))
        value = m.fc1(x) if r == 1 else F.gelu(m.fc1(x))  # EfficientMod: no act on an unexpanded value
        expected = m.fc2(value * context.repeat(1, r, 1, 1))
        torch.testing.assert_close(m(x), expected)
    assert isinstance(Modulation(8, expansion=1).value_act, nn.Identity)
    assert isinstance(Modulation(8, expansion=2).value_act, nn.GELU)


@torch.no_grad()
@pytest.mark.parametrize("order", [2, 3, 5])
def test_hadamard_equals_hornet_fused_layout(order):
    """Our separate convs are HorNet's proj_in / dwconv cut by rows: this is also how to load HorNet weights."""
    torch.manual_seed(0)
    m = RecursiveGatedConv(32, order=order).eval()
    w_in = torch.cat([m.proj_p.weight] + [q.weight for q in m.proj_q])
    b_in = torch.cat([m.proj_p.bias] + [q.bias for q in m.proj_q])
    w_dw = torch.cat([dw.weight for dw in m.dws])
    b_dw = torch.cat([dw.bias for dw in m.dws])
    dims = [dw.out_channels for dw in m.dws]

    x = torch.randn(2, 32, 6, 9)
    pwa, abc = torch.split(F.conv2d(x, w_in, b_in), (dims[0], sum(dims)), dim=1)
    dw_list = torch.split(F.conv2d(abc, w_dw, b_dw, padding=3, groups=sum(dims)) * (1 / 3), dims, dim=1)
    y = pwa * dw_list[0]
    for i in range(order - 1):
        y = m.pws[i](y) * dw_list[i + 1]
    torch.testing.assert_close(m(x), m.proj_out(y))


@torch.no_grad()
def test_additive_equals_casvit_formulation():
    """One qkv conv chunked in three and a C->1 score conv, as CAS-ViT writes it, give the same output."""
    torch.manual_seed(0)
    m = AdditiveMixer(24).eval()
    for gate in (m.q_gate[0], m.k_gate[0]):  # non-trivial BatchNorm statistics
        gate.norm.running_mean.normal_()
        gate.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 24, 5, 6)
    q, k, v = F.conv2d(x, torch.cat([m.q.weight, m.k.weight, m.v.weight])).chunk(3, dim=1)

    def phi(z, gates):
        spatial, channel = gates
        h = spatial.act(spatial.norm(spatial.dwconv(z)))
        z = z * torch.sigmoid(F.conv2d(h, spatial.score.view(1, -1, 1, 1)))
        return z * torch.sigmoid(channel.fc(F.adaptive_avg_pool2d(z, 1)))

    expected = m.proj(m.dwc(phi(q, m.q_gate) + phi(k, m.k_gate)) * v)
    torch.testing.assert_close(m(x), expected)


# --------------------------------------------------------------------- torch-pruning removes coupled channels
# Pruning a group must equal zeroing what the group removes: this fails when torch-pruning maps channel indices
# through an op wrongly (it does for Tensor.repeat, multi-output torch.split and C->1 convs).


def _prune_group(model: nn.Sequential, layer: nn.Conv2d, idxs: list[int]) -> None:
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 8, 6, 6))
    graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=idxs).prune()


def _zero_rows(conv: nn.Conv2d, idxs: list[int]) -> None:
    conv.weight.data[idxs] = 0
    if conv.bias is not None:
        conv.bias.data[idxs] = 0


@pytest.mark.parametrize("r", [1, 3])
def test_pruning_context_channel_removes_every_tiled_value_channel(r):
    dim, j = 16, [2, 9]
    model = nn.Sequential(nn.Conv2d(8, dim, 1), Modulation(dim, expansion=r), nn.Conv2d(dim, 8, 1)).eval()
    reference = copy.deepcopy(model)
    _zero_rows(reference[1].g, j)  # context channel j is zero, so value channels j, C+j, ... contribute nothing
    _prune_group(model, model[1].g, j)
    assert model[1].fc1.out_channels == r * (dim - len(j))
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("order", [2, 3, 4])
def test_pruning_one_hadamard_order_is_exact(order):
    dim = 32
    for k in range(order):  # prune the output of proj_p (k=0) or of pws[k-1]
        model = nn.Sequential(nn.Conv2d(8, dim, 1), RecursiveGatedConv(dim, order=order), nn.Conv2d(dim, 8, 1)).eval()
        layer = "proj_p" if k == 0 else f"pws.{k - 1}"
        reference = copy.deepcopy(model)
        _zero_rows(reference[1].get_submodule(layer), [0, 1])
        _prune_group(model, model[1].get_submodule(layer), [0, 1])
        assert model[1].dws[k].out_channels == dim // 2 ** (order - 1 - k) - 2
        x = torch.randn(2, 8, 5, 7)
        torch.testing.assert_close(model(x), reference(x))


def test_pruning_additive_mixer_channel_is_exact():
    dim, j = 16, [3, 4, 11]
    model = nn.Sequential(nn.Conv2d(8, dim, 1), AdditiveMixer(dim), nn.Conv2d(dim, 8, 1)).eval()
    reference = copy.deepcopy(model)
    mixer = reference[1]
    for conv in (mixer.q, mixer.k, mixer.v):
        _zero_rows(conv, j)
    mixer.q_gate[0].score.data[j] = 0
    mixer.k_gate[0].score.data[j] = 0
    mixer.proj.bias.data[j] = 0
    _prune_group(model, model[1].proj, j)
    assert model[1].q.out_channels == model[1].q_gate[0].score.numel() == dim - len(j)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(model(x), reference(x))


def test_uniform_pruning_keeps_hornet_channel_progression():
    # Each order is its own pruning group; a uniform ratio keeps dims halving. Multiples of 8 in every group
    # need dim to be a multiple of 8 * 2**(order-1).
    model = nn.Sequential(nn.Conv2d(8, 128, 1), RecursiveGatedConv(128, order=4), nn.Conv2d(128, 8, 1))
    tp.pruner.MetaPruner(
        model,
        torch.randn(1, 8, 6, 6),
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=[model[2]],
        round_to=8,
    ).step()
    assert [dw.out_channels for dw in model[1].dws] == [8, 16, 32, 64]
    assert model(torch.randn(1, 8, 3, 5)).shape == (1, 8, 3, 5)


# ------------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "name,args,match",
    [
        ("modulation", {"expansion": 1.5}, "expansion must be an integer >= 1, got 1.5"),
        ("modulation", {"expansion": 0}, "expansion must be an integer >= 1, got 0"),
        ("modulation", {"kernel_size": 4}, "kernel_size must be a positive odd integer, got 4"),
        ("hadamard", {"order": 0}, "order must be an integer >= 1, got 0"),
        ("hadamard", {"order": 6}, "order 6 needs dim >= 32 channels, got 16"),
        ("hadamard", {"kernel_size": 0}, "kernel_size must be a positive odd integer, got 0"),
    ],
)
def test_bad_arguments_say_what_must_hold(name, args, match):
    with pytest.raises(MixerNASError, match=match):
        create_mixer(name, 16, **args)
    assert re.search(match, get_mixer(name).factory.check(16, **args))  # the same reason, before building


def test_an_architecture_with_bad_mixer_arguments_is_invalid():
    with pytest.raises(InvalidArchError, match=r"stages\[0\].width.*expansion must be an integer >= 1"):
        Arch(stages=(Stage(mixer="modulation", depth=2, width=16, cycle={"expansion": (1, 0)}),))
    with pytest.raises(InvalidArchError, match=r"order 6 needs dim >= 32"):
        Arch(stages=(Stage(mixer="hadamard", depth=1, width=16, mixer_args={"order": 6}),))
