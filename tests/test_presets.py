"""Presets: faithful to the published models (parameter parity), runnable at odd sizes, usable through timm."""

import pytest
import timm
import torch

import searchspace
from searchspace.presets import preset_spec
from searchspace.timm_compat import timm_name

PRESETS = searchspace.list_presets()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_published_models_are_there():
    expected = {"IdentityFormer-S12", "RandFormer-S12", "PoolFormerV2-S12", "ConvFormer-S18", "CAFormer-S18",
                "EfficientMod-xxs", "EfficientMod-xs", "EfficientMod-s", "CAS-ViT-XS", "CAS-ViT-S", "CAS-ViT-M"}
    assert expected <= set(PRESETS)
    for name in PRESETS:
        assert preset_spec(name).source, f"{name} must cite its source"
        assert preset_spec(name).timm_name or preset_spec(name).published_params or preset_spec(name).notes


@pytest.mark.parametrize("name", [n for n in PRESETS if preset_spec(n).timm_name])
def test_parameter_parity_with_timm(name):
    ours = searchspace.build_model(name)
    theirs = timm.create_model(preset_spec(name).timm_name, pretrained=False)
    assert n_params(ours) == n_params(theirs)
    # layer by layer, not only in total: the same multiset of parameter shapes (a 1x1 conv is a linear layer)
    assert sorted(map(_linear_shape, ours.parameters())) == sorted(map(_linear_shape, theirs.parameters()))


def _linear_shape(p: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(p.shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@pytest.mark.parametrize("name", [n for n in PRESETS
                                  if preset_spec(n).published_params and not preset_spec(n).timm_name])
def test_parameter_count_matches_publication(name):
    spec = preset_spec(name)
    ours = n_params(searchspace.build_model(name))
    # publications round (to 0.1M, 0.01M, or 1M for HorNet): allow that rounding and nothing more
    assert abs(ours / 1e6 - spec.published_params) <= spec.published_precision / 2, \
        f"{name}: {ours / 1e6:.3f}M vs published {spec.published_params}M"


@pytest.mark.parametrize("name", PRESETS)
def test_forward_at_odd_sizes(name):
    model = searchspace.build_model(name, num_classes=7).eval()
    with torch.no_grad():
        for size in [(65, 47), (33, 33)]:
            y = model(torch.randn(1, 3, *size))
            assert y.shape == (1, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_points_of_the_space(name):
    arch = searchspace.preset(name)
    assert isinstance(arch, searchspace.Arch) and arch.name == name
    assert searchspace.Arch.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize("name", ["PoolFormerV2-S12", "CAFormer-S18", "CAS-ViT-XS", "EfficientMod-xxs"])
def test_created_through_timm(name):
    model = timm.create_model(timm_name(name), num_classes=5, drop_path_rate=0.1, drop_rate=0.0)
    assert n_params(model) == n_params(searchspace.build_model(name, num_classes=5))
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_timm_feature_extraction_and_saved_arch(tmp_path):
    arch = searchspace.preset("CAFormer-S18")
    arch.save(tmp_path / "arch.json")
    feats = timm.create_model("mixernas", arch=str(tmp_path / "arch.json"), features_only=True).eval()
    outs = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == list(arch.widths)
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]



@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_export_and_eval_determinism(name):
    model = searchspace.build_model(name, num_classes=4).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), first, rtol=1e-4, atol=1e-4)
