"""Arch: validation with field-naming messages, JSON round trips, building."""

import json

import pytest
import torch

import searchspace
from searchspace import Arch, Blocks, InvalidArchError, MixerNASError, Stage, UnknownNameError


def small(**stage_changes) -> Arch:
    stages = [Stage(mixer="pooling", depth=1, width=w) for w in (32, 64, 64, 96)]
    stages[2] = Stage(**{"mixer": "pooling", "depth": 1, "width": 64, **stage_changes})
    return Arch(stages=tuple(stages))


def test_json_round_trip_of_every_preset():
    for name in searchspace.list_presets():
        arch = searchspace.preset(name)
        again = Arch.from_json(arch.to_json())
        assert again == arch, name
        assert json.loads(again.to_json()) == json.loads(arch.to_json())


def test_same_arch_builds_same_module():
    arch = searchspace.preset("CAFormer-S18")
    torch.manual_seed(0)
    a = searchspace.build_model(arch, num_classes=3)
    torch.manual_seed(0)
    b = searchspace.build_model(Arch.from_dict(arch.to_dict()), num_classes=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_arch_is_frozen_and_hashable():
    arch = small()
    with pytest.raises(AttributeError):
        arch.stem = "patch4"
    assert hash(arch) == hash(Arch.from_dict(arch.to_dict()))
    assert len({arch, Arch.from_dict(arch.to_dict())}) == 1


@pytest.mark.parametrize("changes, field", [
    ({"depth": -1}, "stages[2].depth"),
    ({"depth": 0}, "stages[2].depth"),
    ({"width": 0}, "stages[2].width"),
    ({"mlp_ratio": -2.0}, "stages[2].mlp_ratio"),
    ({"mixer": "poolin"}, "stages[2].mixer"),
    ({"mixer_args": {"pool_sise": 3}}, "stages[2].mixer_args.pool_sise"),
    ({"norm": "layernorm2"}, "stages[2].norm"),
])
def test_invalid_stage_rejected_naming_the_field(changes, field):
    with pytest.raises(InvalidArchError) as info:
        small(**changes)
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_mixer_lists_close_matches():
    with pytest.raises(InvalidArchError, match="did you mean 'pooling'"):
        small(mixer="poolng")
    with pytest.raises(UnknownNameError, match="did you mean 'attention'"):
        searchspace.get_mixer("atention")


def test_width_not_divisible_by_heads_rejected():
    with pytest.raises(InvalidArchError) as info:
        small(mixer="attention", width=48)  # head_dim 32
    assert info.value.field == "stages[2].width"
    assert "attention" in str(info.value)


@pytest.mark.parametrize("changes, field", [
    ({"stem": "conv9"}, "stem"),
    ({"drop_path": 1.5}, "drop_path"),
    ({"act": "swish2"}, "act"),
    ({"stages": ()}, "stages"),
])
def test_invalid_top_level_rejected(changes, field):
    with pytest.raises(InvalidArchError) as info:
        small().replace(**changes)
    assert info.value.field == field


def test_from_dict_rejects_unknown_keys_with_suggestion():
    data = small().to_dict()
    data["stages"][1]["widht"] = 64
    with pytest.raises(InvalidArchError, match=r"stages\[1\]\.widht.*did you mean 'width'"):
        Arch.from_dict(data)
    data = small().to_dict()
    data["norm_epsilon"] = 1e-5
    with pytest.raises(InvalidArchError, match="norm_epsilon.*norm_eps"):
        Arch.from_dict(data)


def test_malformed_json_is_a_user_error(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text("{not json")
    with pytest.raises(MixerNASError, match="malformed"):
        Arch.load(path)
    with pytest.raises(MixerNASError, match="cannot read"):
        Arch.load(tmp_path / "missing.json")


def test_save_load_and_build_from_path(tmp_path):
    arch = small(mixer="sepconv")
    arch.save(tmp_path / "a.json")
    assert Arch.load(tmp_path / "a.json") == arch
    model = searchspace.build_model(str(tmp_path / "a.json"), num_classes=4)
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 4)


def test_extra_runs_and_cycle():
    arch = small(mixer="modulation", block="fused", cycle={"expansion": [1, 4]}, depth=2,
                 extra=(Blocks(mixer="attention", depth=1),))
    model = searchspace.build_model(arch, num_classes=2)
    blocks = model.stages[2].blocks
    assert len(blocks) == 3
    assert arch.depths == (1, 1, 3, 1)
    assert arch.stages[2].block_args(1)["expansion"] == 4
    assert Arch.from_json(arch.to_json()) == arch


def test_replace_mixer_keeps_everything_else():
    base = searchspace.preset("PoolFormerV2-S12")
    arch = base.replace_mixer(3, "attention")
    assert arch.mixers == ("pooling", "pooling", "pooling", "attention")
    assert arch.widths == base.widths and arch.depths == base.depths
    assert arch.name == ""


def test_build_model_rejects_bad_arguments():
    with pytest.raises(MixerNASError):
        searchspace.build_model("PoolFormerV2-S12", num_classes=-1)
    with pytest.raises(UnknownNameError, match="PoolFormerV2-S12"):
        searchspace.build_model("PoolFormerV2-S21")


def test_summary_names_every_stage():
    s = searchspace.preset("CAFormer-S18").summary()
    assert s == "sepconv x3 @64 | sepconv x3 @128 | attention x9 @320 | attention x3 @512"
