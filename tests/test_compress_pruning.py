"""Compression steps that change structure: channel_prune, token_prune, token_merge and fit_budget.

Channel pruning: parameter counts drop as expected, widths are multiples of 8, the model runs at odd sizes, the
classifier and ignored layers are left alone, attention heads stay whole and aligned (checked against a
reference attention computed from the pruned weights, and by tracing every pruned q/k/v row back to its
original head), and the timm MetaFormer pitfalls (stale Scale.shape, bias-less GroupNorm) are handled.
Token pruning and merging: exact identity when nothing is removed, fewer tokens through attention (counted with
hooks), dropped tokens restored to the grid unchanged, shapes kept. fit_budget: a fake deterministic latency.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import searchspace
from compress.adapters import split_block
from compress.pruning_timm import GroupNormPruner, attention_layouts, head_counts, set_head_counts
from compress.steps import RecipeError, StepContext, get_step
from compress.steps.channel import classifier_layers, head_shape, kept_head_channels
from compress.steps.tokens import apply_token_merging, apply_token_pruning
from compress.tokens import KeepSchedule, TokenPruning, bipartite_matching, keep_count, merge_tokens
from searchspace import Arch, Blocks, Stage
from searchspace.latency import InputSpec

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(mixers=("pooling", "sepconv", "attention", "attention"), norm="groupnorm_nobias", widths=(32, 64, 96, 128),
         depth=1, extra=None, **kw) -> Arch:
    stages = tuple(Stage(mixer=m, depth=depth, width=w, mlp_ratio=2.0, res_scale=1.0 if i >= 2 else None,
                         extra=extra if (extra and i == 2) else ())
                   for i, (m, w) in enumerate(zip(mixers, widths)))
    return Arch(stages=stages, norm=norm, **kw)


def context(model: nn.Module, size: int = 64, **kw) -> StepContext:
    logs: list[str] = []
    channels = getattr(model, "in_chans", 3)
    return StepContext(model=model, input_spec=InputSpec(channels=channels, height=size, width=size), log=logs.append,
                       **kw)


def timm_model(name: str) -> nn.Module:
    if name.startswith(("vit", "deit")):
        return timm.create_model(name, pretrained=False, img_size=64, num_classes=10).eval()
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def channel_prune(model: nn.Module, size: int = 64, **params) -> dict:
    return get_step("channel_prune").fn(context(model, size), **params)


def prunable_widths(model: nn.Module) -> list[tuple[str, int]]:
    """(name, output width) of every conv/linear layer whose width pruning decides (not logits, not 1-wide)."""
    logits = {id(m) for m in classifier_layers(model)}
    out = []
    for name, m in model.named_modules():
        if id(m) in logits:
            continue
        if isinstance(m, nn.Linear):
            out.append((name, m.out_features))
        elif isinstance(m, nn.Conv2d):
            out.append((name, m.out_channels))
    return out


def check_pruned(model: nn.Module, figures: dict, kept=(0.18, 0.36), sizes=((47, 65), (64, 64))) -> None:
    lo, hi = kept
    assert lo <= figures["params_after"] / figures["params_before"] <= hi, figures
    assert all(w % 8 == 0 for w in figures["widths_after"]), figures["widths_after"]
    assert all(a < b for a, b in zip(figures["widths_after"], figures["widths_before"]))
    assert all(w % 8 == 0 for _, w in prunable_widths(model) if w > 3), prunable_widths(model)
    with torch.no_grad():
        for h, w in sizes:
            y = model(torch.randn(2, 3, h, w))
            assert y.shape == (2, 10) and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------ channel_prune


@pytest.mark.parametrize("name", ["PoolFormerV2-S12", "CAFormer-S18", "CAS-ViT-XS", "EfficientMod-xxs"])
def test_channel_prune_presets_halve_widths_and_run(name):
    model = searchspace.build_model(name, num_classes=10).eval()
    figures = channel_prune(model, ratio=0.5)
    check_pruned(model, figures)
    assert model.get_classifier is not None and classifier_layers(model)[0].out_features == 10


@pytest.mark.parametrize("name", ["poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_channel_prune_timm_metaformers(name):
    model = timm_model(name)
    before = copy.deepcopy(model)
    figures = channel_prune(model, ratio=0.5)
    check_pruned(model, figures)
    assert figures["widths_after"] == [32, 64, 160, 256]
    # the stale-shape pitfall: every timm Scale now reshapes to its pruned size
    from timm.models.metaformer import Scale

    scales = [m for m in model.modules() if isinstance(m, Scale)]
    assert scales and all(m.shape[0] == m.scale.numel() for m in scales)
    assert n_params(before) > n_params(model)


def test_channel_prune_vit():
    model = timm_model("vit_tiny_patch16_224")
    figures = channel_prune(model, ratio=0.5)
    check_pruned(model, figures, sizes=((64, 64),))
    assert figures["widths_after"] == [96]
    assert model.cls_token.shape[-1] == model.pos_embed.shape[-1] == 96


def test_bias_less_groupnorm_is_pruned_ours_and_timm():
    from timm.models.metaformer import GroupNorm1NoBias

    for norm in (GroupNorm1NoBias(16), searchspace.layers.GroupNorm1(16, bias=False)):
        assert norm.bias is None
        GroupNormPruner().prune_out_channels(norm, [0, 3, 5])
        assert norm.num_channels == 13 and norm.weight.shape == (13,) and norm.bias is None
        assert norm(torch.randn(2, 13, 3, 3)).shape == (2, 13, 3, 3)
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    channel_prune(model, ratio=0.5)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.bias is None and m.num_channels == m.weight.numel() for m in norms)


def test_ratio_zero_changes_nothing():
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    reference = copy.deepcopy(model)
    figures = channel_prune(model, ratio=0.0)
    assert figures["params_after"] == figures["params_before"]
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_ignore_patterns_stage_ratios_and_the_classifier():
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    figures = channel_prune(model, ratio=0.5, ignore=["stages.0.*", "stem*"])
    assert figures["widths_after"][0] == 32 and figures["widths_after"][1:] == [32, 48, 64]
    assert model.head.fc.out_features == 10
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    figures = channel_prune(model, ratio=0.0, stage_ratios={2: 0.5, "3": 0.25})
    assert figures["widths_after"] == [32, 64, 48, 96]
    with pytest.raises(RecipeError, match="matches no layer"):
        channel_prune(searchspace.build_model(tiny(), num_classes=10), ignore=["stagez.*"])
    with pytest.raises(RecipeError, match="stage 7"):
        channel_prune(searchspace.build_model(tiny(), num_classes=10), stage_ratios={7: 0.5})


@pytest.mark.parametrize("importance", ["lamp", "random"])
def test_other_criteria_and_global_pruning(importance):
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    figures = channel_prune(model, ratio=0.5, importance=importance, global_pruning=True)
    assert figures["params_after"] < 0.6 * figures["params_before"]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 10)


def test_taylor_uses_the_data_and_needs_it():
    from searchspace.data import load_data

    data = load_data(input_size=32)
    model = searchspace.build_model(tiny(), num_classes=10, in_chans=1).eval()
    ctx = context(model, 32, data=data)
    figures = get_step("channel_prune").fn(ctx, ratio=0.5, importance="taylor", taylor_batches=2, batch_size=16)
    assert figures["params_after"] < figures["params_before"]
    assert all(p.grad is None for p in model.parameters())  # gradients used for ranking are not left behind
    with pytest.raises(RecipeError, match="needs data"):
        get_step("channel_prune").fn(context(searchspace.build_model(tiny(), num_classes=10)), importance="taylor")


# ----------------------------------------------------------------------------------------------- attention heads


def test_head_shape_and_kept_channels():
    assert head_shape(160, 10, 32) == (10, 16)
    assert head_shape(224, 10, 32) == (8, 28)
    assert head_shape(456, 16, 32, exact=True) is None
    assert head_shape(456, 16, 32) == (16, 28)
    assert head_shape(100, 3, 64, whole_heads=True) == (1, 64)
    assert kept_head_channels(torch.tensor([5.0, 1, 0, 0, 9, 3]), 3, 2, 2, 1) == [0, 4]


def reference_attention(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Multi-head attention computed from the module's weights and its ``num_heads`` (tokens: (B, N, C))."""
    b, n, _ = tokens.shape
    heads = module.num_heads
    qkv = F.linear(tokens, module.qkv.weight, module.qkv.bias)
    width = qkv.shape[-1] // 3
    q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(b, n, heads, -1).transpose(1, 2) for i in range(3))
    attn = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, width)
    return F.linear(out, module.proj.weight, module.proj.bias)


def mark_rows(model: nn.Module) -> None:
    """qkv row r of every attention module holds r + 1 everywhere, so pruned rows tell where they came from."""
    with torch.no_grad():
        for layout in attention_layouts(model):
            w = layout.qkv.weight
            w.copy_(torch.arange(1, w.shape[0] + 1, dtype=w.dtype).unsqueeze(1).expand_as(w) * 1e-3)


@pytest.mark.parametrize("name", ["caformer_s18", "CAFormer-S18", "vit_tiny_patch16_224"])
def test_heads_stay_whole_and_aligned(name):
    model = timm_model(name) if "_" in name else searchspace.build_model(name, num_classes=10).eval()
    mark_rows(model)
    original = {id(x.module): (x.num_heads, x.head_dim) for x in attention_layouts(model)}
    figures = channel_prune(model, ratio=0.3, importance="random")
    layouts = attention_layouts(model)
    assert any(x.num_heads < original[id(x.module)][0] for x in layouts), figures["heads"]  # whole heads removed
    for layout in layouts:
        module, (heads0, dim0) = layout.module, original[id(layout.module)]
        width0, width = heads0 * dim0, layout.qkv.out_features // 3
        head_dim = width // module.num_heads
        assert module.num_heads * head_dim == width
        if hasattr(module, "scale"):
            assert module.scale == pytest.approx(head_dim**-0.5)
        origin = (layout.qkv.weight[:, 0] * 1e3).round().long() - 1
        for h in range(module.num_heads):
            rows = [origin[p * width + h * head_dim: p * width + (h + 1) * head_dim] for p in range(3)]
            assert all((r // width0 == p).all() for p, r in enumerate(rows)), "q, k, v rows changed places"
            within = [r % width0 for r in rows]
            assert torch.equal(within[0], within[1]) and torch.equal(within[0], within[2])
            assert len(set((within[0] // dim0).tolist())) == 1, "a pruned head mixes dims of several heads"
        c = layout.qkv.in_features
        tokens = torch.randn(2, 5, c)
        with torch.no_grad():
            if module.__class__.__module__.startswith("searchspace"):
                got = module(tokens.transpose(1, 2).reshape(2, c, 5, 1)).flatten(2).transpose(1, 2)
            else:
                got = module(tokens)
            torch.testing.assert_close(got, reference_attention(module, tokens), rtol=1e-4, atol=1e-5)
            if hasattr(module, "fused_attn"):  # timm's unfused path reads ``scale``: it must agree
                module.fused_attn = False
                torch.testing.assert_close(module(tokens), got, rtol=1e-4, atol=1e-5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 10)


def test_timm_metaformer_width_is_trimmed_until_heads_split_it():
    model = timm_model("caformer_s18")
    figures = channel_prune(model, ratio=0.4, stage_ratios={3: 0.1})  # 512 -> 456: no split into <= 16 heads of 32
    assert figures["widths_after"][3] == 448
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_head_counts_round_trip():
    model = timm_model("caformer_s18")
    channel_prune(model, ratio=0.3)
    counts = head_counts(model)
    assert counts["stages.2.blocks.0.token_mixer"] == 8
    fresh = copy.deepcopy(model)
    for layout in attention_layouts(fresh):
        layout.module.num_heads = 1
    set_head_counts(fresh, counts)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_channel_prune_refuses_to_run_after_token_pruning():
    model = timm_model("caformer_s18")
    apply_token_pruning(model, 0.5)
    with pytest.raises(RecipeError, match="before token_prune"):
        channel_prune(model)


# ------------------------------------------------------------------------------------------------ token pruning


def token_models():
    return {
        "ours": searchspace.build_model(tiny(depth=3), num_classes=10).eval(),
        "caformer_s18": timm_model("caformer_s18"),
        "vit": timm_model("vit_tiny_patch16_224"),
    }


def count_tokens(model: nn.Module) -> list[int]:
    """Tokens seen by each attention module in one forward pass, in order (registered via forward pre-hooks)."""
    seen: list[int] = []

    def hook(module, args):
        x = args[0]
        seen.append(x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1])

    handles = [x.module.register_forward_pre_hook(hook) for x in attention_layouts(model)]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["ours", "caformer_s18", "vit"])
def test_keep_rate_one_and_r_zero_are_exact(name):
    model = token_models()[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        pruned = copy.deepcopy(model)
        apply_token_pruning(pruned, 1.0)
        merged = copy.deepcopy(model)
        apply_token_merging(merged, 0)
        assert torch.equal(pruned(x), reference) and torch.equal(merged(x), reference)
    assert any(isinstance(m, TokenPruning) for m in pruned.modules())
    assert pruned.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", ["ours", "caformer_s18", "vit"])
def test_token_prune_processes_fewer_tokens(name):
    model = token_models()[name]
    before = count_tokens(model)
    ctx = context(model)
    figures = get_step("token_prune").fn(ctx, keep_rate=0.5, blocks=[0])
    after = count_tokens(model)
    assert len(after) == len(before) and sum(after) < sum(before)
    assert after[0] == before[0]
    if name == "vit":  # class token + kept + one fused token
        assert after[1] == 1 + keep_count(before[0] - 1, 0.5) + 1
    else:
        assert after[1] == keep_count(before[1], 0.5)
    assert figures["reduce_after"]
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    if name != "vit":  # hierarchical models run at any size
        with torch.no_grad():
            assert model(torch.randn(1, 3, 47, 71)).shape == (1, 10)


def test_norm_score_and_several_rates():
    model = token_models()["ours"]
    before = count_tokens(model)
    apply_token_pruning(model, [0.75, 0.5], blocks=[0, 1], score="norm")
    after = count_tokens(model)
    n = before[0]
    assert after[:3] == [n, keep_count(n, 0.75), keep_count(keep_count(n, 0.75), 0.5)]


def test_dropped_tokens_return_to_the_grid_unchanged_before_a_conv_block():
    arch = tiny(depth=2, extra=(Blocks(mixer="pooling", depth=1),))  # stage 2: attention, attention, pooling
    model = searchspace.build_model(arch, num_classes=10).eval()
    stage = model.stages[2]
    apply_token_pruning(model, 0.5, stages=[2], blocks=[0])
    first = stage.blocks[0]
    seen = {}
    first.norm1.register_forward_pre_hook(lambda m, a: seen.__setitem__("into0", a[0]))
    first.mixer.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed0", o))
    stage.blocks[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("into_pool", a[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        # tokens are selected inside block 0, after its attention: the dropped ones keep that value
        after_attention = first.res_scale1(seen["into0"]) + first.layer_scale1(seen["mixed0"])
    a, b = after_attention.flatten(2), seen["into_pool"].flatten(2)
    assert a.shape == b.shape  # the pooling block gets the full grid back
    unchanged = (a == b).all(dim=1).sum().item()
    n = a.shape[-1]
    assert unchanged == n - keep_count(n, 0.5)


@pytest.mark.parametrize("name", ["ours", "caformer_s18", "vit"])
def test_block_halves_compose_to_the_block(name):
    # token_prune selects between a block's attention and its MLP by calling these halves: they must be the block
    model = token_models()[name]
    block, x = {
        "ours": lambda: (model.stages[3].blocks[0], torch.randn(2, 128, 3, 3)),
        "caformer_s18": lambda: (model.stages[2].blocks[0], torch.randn(2, 9, 320)),  # timm: (B, N, C) there
        "vit": lambda: (model.blocks[1], torch.randn(2, 17, 192)),
    }[name]()
    halves = split_block(block)
    assert halves is not None
    with torch.no_grad():
        assert torch.equal(halves[1](halves[0](x)), block(x))
    assert split_block(nn.Linear(4, 4)) is None


@pytest.mark.parametrize("name", ["ours", "caformer_s18", "vit"])
def test_inside_placement_runs_the_blocks_mlp_on_the_kept_tokens(name):
    def mlp_tokens(placement: str) -> int:
        model = token_models()[name]
        apply_token_pruning(model, 0.5, blocks=[0], placement=placement)
        block = model.blocks[0] if name == "vit" else model.stages[-1 if name == "ours" else 2].blocks[0]
        shapes = []
        block.mlp.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape))
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        shape = shapes[0]
        return shape[2] * shape[3] if len(shape) == 4 else shape[1]

    full, inside = mlp_tokens("after"), mlp_tokens("inside")
    if name == "vit":  # class token + kept + one fused token
        assert inside == 1 + keep_count(full - 1, 0.5) + 1
    else:
        assert inside == keep_count(full, 0.5)


def test_keep_rate_warms_up_over_training_steps():
    model = token_models()["ours"]
    ctx = context(model)
    get_step("token_prune").fn(ctx, keep_rate=0.5, blocks=[0], schedule="warmup", warmup_steps=4)
    schedule = ctx.state["token_schedule"]
    assert isinstance(schedule, KeepSchedule) and schedule.rate() == 1.0
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, TokenPruning):
            m.schedule = KeepSchedule(1.0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # eval before training: rate 1, exact
        model.train()
        for _ in range(2):
            model(x)
        assert schedule.step == 2 and schedule.rate() == pytest.approx(0.75)
        for _ in range(3):
            model(x)
        model.eval()
    assert schedule.rate() == 0.5
    assert count_tokens(model)[1] == keep_count(count_tokens(reference)[1], 0.5)
    with pytest.raises(RecipeError, match="warmup_steps"):
        get_step("token_prune").fn(context(token_models()["vit"]), schedule="warmup")


def test_token_prune_errors():
    with pytest.raises(RecipeError, match="keep_rate"):
        apply_token_pruning(token_models()["ours"], 0.0)
    with pytest.raises(RecipeError, match="stage 0"):
        apply_token_pruning(token_models()["ours"], 0.5, stages=[0])
    with pytest.raises(RecipeError, match="no attention blocks"):
        apply_token_pruning(searchspace.build_model(tiny(mixers=("pooling",) * 4), num_classes=10), 0.5)
    model = token_models()["vit"]
    apply_token_pruning(model, 0.5)
    with pytest.raises(RecipeError, match="once"):
        apply_token_merging(model, 4)


# ------------------------------------------------------------------------------------------------ token merging


def test_bipartite_matching_merges_the_most_similar_pairs():
    metric = torch.tensor([[[1.0, 0], [0, 1], [1, 0.01], [0.7, 0.7], [0, 1.0], [1, 0]]])
    dest, n_out = bipartite_matching(metric, 2)
    assert n_out == 4
    # A = tokens 0, 2, 4; B = 1, 3, 5. Tokens 0 and 4 match B partners exactly (5 and 1) and are merged.
    assert dest[0, 0] == dest[0, 5] and dest[0, 4] == dest[0, 1]
    assert len(set(dest[0].tolist())) == 4
    x = torch.arange(6.0).view(1, 6, 1)
    merged, size = merge_tokens(x, dest, n_out)
    assert size.sum() == 6 and merged[0, dest[0, 0], 0] == pytest.approx(2.5)  # (0 + 5) / 2
    again, size2 = merge_tokens(merged, *bipartite_matching(merged, 1), size)
    assert size2.sum() == 6 and (again * size2).sum() == pytest.approx(x.sum())  # size-weighted: mass is kept
    assert bipartite_matching(metric, 0)[1] == 6


@pytest.mark.parametrize("name", ["ours", "caformer_s18", "vit"])
def test_token_merge_shapes_and_counts(name):
    model = token_models()[name]
    before = count_tokens(model)
    figures = get_step("token_merge").fn(context(model), r=2)
    after = count_tokens(model)
    assert figures["reduce_after"] and sum(after) < sum(before)
    assert after[1] == before[1] - 2
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_saved_token_pruned_model_reloads(tmp_path):
    import compress

    model = timm_model("caformer_s18")
    channel_prune(model, ratio=0.3)
    apply_token_pruning(model, 0.5)
    x = torch.randn(1, 3, 64, 64)
    compress.save(model, tmp_path / "m", example=x)
    with torch.no_grad():
        torch.testing.assert_close(compress.load(tmp_path / "m")(x), model(x))


# --------------------------------------------------------------------------------------------------- fit_budget


def fake_latency(model: nn.Module, ctx: StepContext) -> float:
    """Deterministic stand-in for a measurement: one millisecond per 10k parameters."""
    return n_params(model) / 1e4


def budget_ctx(model: nn.Module) -> StepContext:
    ctx = context(model, 32)
    ctx.state["measure_ms"] = fake_latency
    return ctx


def test_fit_budget_stops_at_the_first_ratio_that_meets_the_target():
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    base = fake_latency(model, None)
    ctx = budget_ctx(model)
    result = get_step("fit_budget").fn(ctx, target=f"{0.5 * base:.3f}ms", step_ratio=0.1, max_ratio=0.8)
    ratios = [s["ratio"] for s in result["steps"]]
    latencies = [s["latency_ms"] for s in result["steps"]]
    assert ratios[0] == 0.0 and ratios[1:] == [round(0.1 * i, 6) for i in range(1, len(ratios))]
    assert latencies[-1] <= result["target_ms"] < min(latencies[:-1])
    assert result["ratio"] == ratios[-1] and ctx.model is not model
    assert fake_latency(ctx.model, ctx) == pytest.approx(latencies[-1])


def test_fit_budget_met_without_pruning_and_unreachable():
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    ctx = budget_ctx(model)
    result = get_step("fit_budget").fn(ctx, target="1s")
    assert result["ratio"] == 0.0 and ctx.model is model
    with pytest.raises(RecipeError, match="best was"):
        get_step("fit_budget").fn(budget_ctx(model), target="1us", step_ratio=0.3, max_ratio=0.6)
    with pytest.raises(RecipeError, match="target"):
        get_step("fit_budget").fn(budget_ctx(model), target="fast")


def test_fit_budget_skips_distillation_without_data():
    model = searchspace.build_model(tiny(), num_classes=10).eval()
    ctx = budget_ctx(model)
    logs: list[str] = []
    ctx.log = logs.append
    result = get_step("fit_budget").fn(ctx, target=f"{0.8 * fake_latency(model, ctx):.3f}ms", distill_epochs=2)
    assert result["distill"] is None and any("distillation skipped" in line for line in logs)
