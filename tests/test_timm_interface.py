"""Every preset has timm's model interface, and traces with torch.fx, torch.export and torch.compile.

What timm's own tests check for its models (``forward_features``, ``forward_head``, ``forward_intermediates``,
``prune_intermediate_layers``, ``feature_info`` and the feature wrappers, ``pretrained_cfg``, FX feature
extraction), here on every MixerNAS preset, built once per preset through ``timm.create_model`` at 64x64 with
3 classes. Tests that change a model work on a copy.
"""

from __future__ import annotations

import ast
import copy
import functools
from pathlib import Path

import pytest
import timm
import torch
from timm.models import FeatureHookNet, FeatureListNet
from timm.models import create_feature_extractor as timm_feature_extractor
from timm.models._features import FeatureGetterNet
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor as tv_feature_extractor

import searchspace
from searchspace import Arch, Blocks, MixerNASError, Stage
from searchspace.blocks import STEMS
from searchspace.presets import PRESETS
from searchspace.timm_compat import timm_name

PRESET_NAMES = searchspace.list_presets()
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
ODD = torch.randn(1, 3, 65, 47, generator=torch.Generator().manual_seed(1))
NUM_CLASSES = 3

BUILTIN_MIXERS = {"identity", "pooling", "sepconv", "random", "modulation", "hadamard", "attention", "strip_attention",
                  "gpsa", "additive"}
# Presets that together use every built-in mixer, block variant and stem (torch.compile is slow on a small CPU).
COVERING = ["RandFormer-S12", "PoolFormerV2-S12", "EfficientMod-xxs", "CAS-ViT-XS", "S2AFormer-style-S12",
            "ConViT-style-S12", "HorNet-T-7x7"]


@functools.cache
def _model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(timm_name(name), num_classes=num_classes).eval()


@pytest.fixture(scope="module", autouse=True)
def _free_the_models():
    yield
    _model.cache_clear()


@pytest.fixture(params=PRESET_NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture
def model(name) -> nn.Module:
    """The preset's model, shared by the tests that do not change it."""
    return _model(name)


@pytest.fixture
def fresh(model) -> nn.Module:
    """A copy the test may change."""
    return copy.deepcopy(model)


def tiny_every_mixer_arch() -> Arch:
    """A small architecture with every built-in mixer and block variant, for the slow tracers."""
    return Arch(stages=(
        Stage(mixer="identity", depth=1, width=32, extra=(Blocks(mixer="pooling", depth=1),
                                                          Blocks(mixer="sepconv", depth=1))),
        Stage(mixer="random", depth=1, width=32, extra=(
            Blocks(mixer="modulation", depth=1, block="fused", mixer_args={"expansion": 2}),
            Blocks(mixer="hadamard", depth=1))),
        Stage(mixer="attention", depth=1, width=64, extra=(Blocks(mixer="strip_attention", depth=1),
                                                           Blocks(mixer="gpsa", depth=1))),
        Stage(mixer="additive", depth=1, width=64, block="casvit"),
    ), stem="conv3x2", embed_norm="batchnorm", drop_path=0.1)


def test_every_builtin_mixer_is_in_the_tiny_architecture():
    assert {r.mixer for s in tiny_every_mixer_arch().stages for r in s.runs} == BUILTIN_MIXERS


# ---------------------------------------------------------------------------------------------- classification


@torch.no_grad()
def test_forward_features_and_head(model):
    features = model.forward_features(X)
    last = model.feature_info[-1]
    assert features.shape == (2, last["num_chs"], 64 // last["reduction"], 64 // last["reduction"])
    assert model.num_features == model.head_hidden_size == last["num_chs"]
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(model.get_classifier()(pooled), logits, rtol=0, atol=0)
    torch.testing.assert_close(model(X), logits, rtol=0, atol=0)


@torch.no_grad()
def test_reset_classifier(fresh):
    fresh.reset_classifier(7)
    assert fresh.num_classes == 7 and fresh(X).shape == (2, 7)
    assert not fresh.get_classifier().training  # follows the model's mode
    fresh.reset_classifier(0, "avg")
    assert isinstance(fresh.get_classifier(), nn.Identity)
    torch.testing.assert_close(fresh(X), fresh.forward_head(fresh.forward_features(X), pre_logits=True))
    with pytest.raises(MixerNASError, match="global_pool"):
        fresh.reset_classifier(5, "max")
    with pytest.raises(MixerNASError, match="num_classes"):
        fresh.reset_classifier(-1)


def check_grad_checkpointing(model: nn.Module) -> None:
    """Checkpointed stages give the same outputs and gradients (eval mode: no dropout, frozen norm statistics)."""
    x = X[:1]

    def run():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = run()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    ckpt, ckpt_grads = run()
    torch.testing.assert_close(ckpt, plain)
    assert len(ckpt_grads) == len(plain_grads) > 0
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)
    _, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(intermediates[-1].detach(), model.forward_features(x).detach())


def test_grad_checkpointing_with_every_mixer():
    check_grad_checkpointing(searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).eval())


@pytest.mark.slow
def test_grad_checkpointing_of_every_preset(fresh):
    check_grad_checkpointing(fresh)


def test_pretrained_cfg_names_the_model_s_own_layers(name, model):
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == timm_name(name) and cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224)
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    classifiers = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]
    for layer in classifiers:
        assert model.get_submodule(layer).out_features == NUM_CLASSES
    assert cfg["pool_size"] == (7, 7)
    assert timm.models.get_pretrained_cfg(timm_name(name)).first_conv == cfg["first_conv"]
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == "bicubic"


def test_feature_info_and_pool_size_follow_a_user_stem_s_own_reduction():
    # a stride-2 stem: timm's feature consumers (FPNs, detectors) read each stage's reduction from feature_info
    STEMS.add("test_conv3_s2", lambda cin, cout, arch: nn.Conv2d(cin, cout, 3, 2, 1))
    try:
        arch = Arch(stages=tuple(Stage(mixer="pooling", depth=1, width=16) for _ in range(3)), stem="test_conv3_s2")
        model = timm.create_model("mixernas", arch=arch, num_classes=NUM_CLASSES)
        assert [info["reduction"] for info in model.feature_info] == [2, 4, 8]
        assert model.pretrained_cfg["pool_size"] == (28, 28)
        with torch.no_grad():
            feats = model.forward_intermediates(X, intermediates_only=True)
        assert [f.shape[-1] for f in feats] == [64 // info["reduction"] for info in model.feature_info]
    finally:
        STEMS.remove("test_conv3_s2")


def test_pretrained_weights_are_refused():
    with pytest.raises(MixerNASError, match="no pretrained weights"):
        timm.create_model("mixernas_poolformerv2_s12", pretrained=True)


def test_unpooled_output_is_refused_with_a_pointer():
    with pytest.raises(MixerNASError, match="forward_features"):
        timm.create_model("mixernas_poolformerv2_s12", global_pool="")


# ------------------------------------------------------------------------------------------- intermediates


@torch.no_grad()
def test_forward_intermediates_follow_timm(model):
    stages = len(model.feature_info)
    final, intermediates = model.forward_intermediates(X)
    torch.testing.assert_close(final, model.forward_features(X), rtol=0, atol=0)
    assert len(intermediates) == stages
    for feature, info in zip(intermediates, model.feature_info):
        assert feature.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    torch.testing.assert_close(intermediates[-1], final, rtol=0, atol=0)

    only = model.forward_intermediates(X, indices=[0, -1], intermediates_only=True)
    assert isinstance(only, list) and len(only) == 2
    torch.testing.assert_close(only[0], intermediates[0], rtol=0, atol=0)
    torch.testing.assert_close(only[1], intermediates[-1], rtol=0, atol=0)

    last_two = model.forward_intermediates(X, indices=2, intermediates_only=True)  # an int: the last n
    assert [f.shape[1] for f in last_two] == [i["num_chs"] for i in model.feature_info[-2:]]

    early, taken = model.forward_intermediates(X, indices=(1,), stop_early=True)
    torch.testing.assert_close(early, intermediates[1], rtol=0, atol=0)  # nothing after stage 1 ran
    torch.testing.assert_close(taken[0], intermediates[1], rtol=0, atol=0)


@torch.no_grad()
def test_forward_intermediates_norm_is_the_head_norm_of_the_map(model):
    _, plain = model.forward_intermediates(X)
    _, normed = model.forward_intermediates(X, norm=True)
    for a, b in zip(plain[:-1], normed[:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if model.arch.head_norm_first:  # the head normalises the map: norm=True gives that map
        torch.testing.assert_close(normed[-1], model.head_norm(plain[-1]), rtol=0, atol=0)
        pooled = model.forward_head(plain[-1], pre_logits=True)
        torch.testing.assert_close(normed[-1].mean((2, 3)), pooled)
    else:  # the head normalises pooled features, which do not apply to a map
        torch.testing.assert_close(normed[-1], plain[-1], rtol=0, atol=0)


def test_forward_intermediates_refuses_what_it_cannot_give(model):
    with pytest.raises(MixerNASError, match="NCHW"):
        model.forward_intermediates(X, output_fmt="NHWC")
    with pytest.raises(MixerNASError, match="indices"):
        model.forward_intermediates(X, indices=[7])
    with pytest.raises(MixerNASError, match="indices"):
        model.forward_intermediates(X, indices=0)


@torch.no_grad()
def test_prune_intermediate_layers(model):
    expected = model.forward_intermediates(X, intermediates_only=True)

    kept = copy.deepcopy(model)
    assert kept.prune_intermediate_layers(indices=(-2, -1)) == [2, 3]  # the last stage stays: only the head goes
    assert isinstance(kept.get_classifier(), nn.Identity) and kept.num_classes == 0
    assert len(kept.stages) == 4 and kept.num_features == model.num_features

    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers(indices=(0, 1), prune_norm=True) == [0, 1]
    assert len(pruned.stages) == 2
    assert pruned.num_features == pruned.head_hidden_size == model.feature_info[1]["num_chs"]
    assert isinstance(pruned.head_norm, nn.Identity)
    final, got = pruned.forward_intermediates(X, indices=(0, 1))
    for a, b in zip(got, expected[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert pruned(X).shape == (2, pruned.num_features)  # a model that ends at stage 1 pools stage 1


# ---------------------------------------------------------------------------------------- feature wrappers


@torch.no_grad()
def test_feature_wrappers_give_the_intermediates(model):
    expected = model.forward_intermediates(X, indices=(1, 2, 3), intermediates_only=True)
    wrappers = [  # the hook and getter wrappers change the model they wrap
        FeatureListNet(model, out_indices=(1, 2, 3), flatten_sequential=True),  # timm's default
        FeatureHookNet(copy.deepcopy(model), out_indices=(1, 2, 3), flatten_sequential=True),
        FeatureGetterNet(copy.deepcopy(model), out_indices=(1, 2, 3)),
    ]
    for wrapper in wrappers:
        wrapper.eval()
        got = wrapper(X)
        got = list(got.values()) if isinstance(got, dict) else got
        assert wrapper.feature_info.channels() == [i["num_chs"] for i in model.feature_info[1:]]
        assert wrapper.feature_info.reduction() == [8, 16, 32]
        assert len(got) == 3, type(wrapper).__name__
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("feature_cls", [None, "list", "hook", "getter", "fx"])
def test_features_only_through_create_model(feature_cls):
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    reference = _model("CAFormer-S18", num_classes=1000)  # timm's default, so the same weights from the same seed
    torch.manual_seed(0)
    features = timm.create_model("mixernas_caformer_s18", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    with torch.no_grad():
        got = features(X)
        expected = reference.forward_intermediates(X, indices=(1, 2, 3), intermediates_only=True)
    got = list(got.values()) if isinstance(got, dict) else got
    assert features.feature_info.channels() == [128, 320, 512]
    assert features.feature_info.reduction() == [8, 16, 32]
    assert features.pretrained_cfg["architecture"] == "mixernas_caformer_s18"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("feature_cls", ["list", "getter"])
def test_features_only_through_create_model_for_every_preset(name, feature_cls):
    features = timm.create_model(timm_name(name), features_only=True, out_indices=(1, 2, 3),
                                 feature_cls=feature_cls).eval()
    with torch.no_grad():
        got = features(X)
    info = _model(name).feature_info
    assert [f.shape[1] for f in got] == features.feature_info.channels() == [i["num_chs"] for i in info[1:]]


# ---------------------------------------------------------------------------------------------------- tracing


@torch.no_grad()
def test_fx_symbolic_trace_gives_the_same_outputs(model):
    graph = torch.fx.symbolic_trace(model)
    for x in (X, ODD):  # the graph holds no size: odd sizes run too
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)


@torch.no_grad()
def check_fx_feature_extractors(model: nn.Module) -> None:
    """timm's and torchvision's ``create_feature_extractor`` (torch.fx) return the stage outputs asked for."""
    nodes = {"stages.1": "s1", "stages.3": "s3"}
    expected = model.forward_intermediates(X, indices=(1, 3), intermediates_only=True)
    # torchvision warns that drop path adds nodes in training mode; the stage outputs are nodes in both modes
    for extractor in (timm_feature_extractor(model, return_nodes=nodes),
                      tv_feature_extractor(model, return_nodes=nodes, suppress_diff_warning=True)):
        got = extractor(X)
        assert list(got) == ["s1", "s3"]
        for a, b in zip(got.values(), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fx_feature_extractors_with_every_mixer():
    check_fx_feature_extractors(searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).eval())


@pytest.mark.slow
def test_fx_feature_extractors_of_every_preset(model):
    check_fx_feature_extractors(model)


def test_fx_traces_training_mode_with_drop_path():
    model = searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).train()
    graph = torch.fx.symbolic_trace(model)
    torch.manual_seed(5)
    expected = model(X)
    torch.manual_seed(5)
    got = graph(X)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tracing_leaves_no_symbolic_tensor_in_the_mixers_caches():
    model = searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        model(X)  # eager: one cached matrix per mixer and size
    caches = [getattr(m, a) for m in model.modules() for a in ("_cache", "_offset_cache") if hasattr(m, a)]
    assert [len(c) for c in caches] == [1, 1]
    torch.fx.symbolic_trace(model)(ODD)
    torch.export.export(model, (ODD,))
    assert [len(c) for c in caches] == [1, 1]
    for cache in caches:
        for key, value in cache.items():
            assert type(key[0]) is int and type(key[1]) is int and type(value) is torch.Tensor


def test_torch_export_of_every_mixer():
    model = searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).eval()
    exported = torch.export.export(model, (X,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(X), model(X))


def test_torch_compile_captures_every_mixer_in_one_graph():
    # the "eager" backend runs dynamo's capture (where graph breaks come from) without inductor's slow code generation
    model = searchspace.build_model(tiny_every_mixer_arch(), num_classes=NUM_CLASSES).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X))


@pytest.mark.slow
def test_torch_export_of_every_preset(model):
    exported = torch.export.export(model, (X,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(X), model(X))


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", COVERING)
def test_torch_compile_fullgraph(preset_name):
    model = _model(preset_name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X), rtol=1e-4, atol=1e-4)


def test_covering_presets_use_every_builtin_mixer():
    used = {r.mixer for n in COVERING for s in searchspace.preset(n).stages for r in s.runs}
    assert used == BUILTIN_MIXERS


# ------------------------------------------------------------------------------------------ import structure


def test_model_presets_and_timm_compat_import_each_other_one_way_at_module_level():
    package = Path(searchspace.__file__).parent
    modules = ("model", "presets", "timm_compat")
    edges, nested = set(), []
    for mod in modules:
        tree = ast.parse((package / f"{mod}.py").read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    if target in modules:
                        edges.add((mod, target))
                        if node not in top:
                            nested.append((mod, target))
    assert not nested, f"function-level imports between the modules: {nested}"
    assert ("model", "presets") in edges and ("timm_compat", "model") in edges
    assert not any((b, a) in edges for a, b in edges)
    assert ("presets", "timm_compat") not in edges and ("presets", "model") not in edges


def test_a_preset_registered_later_is_a_timm_model():
    searchspace.register_preset("Test-Later-S1", lambda: searchspace.preset("IdentityFormer-S12"), source="a test")
    try:
        model = timm.create_model("mixernas_test_later_s1", num_classes=2)
        assert model.arch.name == "Test-Later-S1" and model(X[:1]).shape == (1, 2)
        assert searchspace.resolve_arch("Test-Later-S1") == model.arch
    finally:
        PRESETS.remove("Test-Later-S1")
