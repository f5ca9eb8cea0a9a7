"""Search spaces: sampling from Optuna and from fixed parameters, sizes, registration."""

import math

import optuna
import pytest

import searchspace
from searchspace import Arch, ChoiceSpace, MixerNASError, StageChoices, UnknownNameError
from searchspace.space import FunctionSpace, register_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_default_space_covers_every_builtin_mixer():
    space = searchspace.get_space("default")
    offered = {m for sc in space.stages for m in sc.mixers}
    builtin = {"identity", "pooling", "sepconv", "modulation", "additive", "strip_attention", "attention",
               "random", "gpsa", "hadamard"}
    assert builtin <= offered


def test_sampled_architectures_replay_from_their_params():
    space = searchspace.get_space("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        arch = space.sample(trial)
        assert isinstance(arch, Arch)
        assert space.sample(trial.params) == arch  # stable names replay the trial exactly
        assert all(k in space.choices or k.split(".")[0] in {"s1", "s2", "s3", "s4"} for k in trial.params)
        study.tell(trial, 0.0)


def test_choice_space_size_matches_enumeration():
    space = searchspace.get_space("tiny")
    expected = math.prod(sc.size() for sc in space.stages)
    assert space.size() == expected
    assert _enumerated_size(space) == expected


def _enumerated_size(space):
    return searchspace.space.SearchSpace.size(space)


def test_define_by_run_space_counts_conditional_branches():
    def fn(trial):
        mixer = trial.suggest_categorical("s3.mixer", ["pooling", "attention"])
        arch = searchspace.preset("PoolFormerV2-S12")
        if mixer == "attention":
            depth = trial.suggest_int("s3.depth", 2, 6, step=2)  # 3 options only under attention
            return arch.replace_stage(2, mixer=mixer, depth=depth)
        return arch

    space = FunctionSpace(fn, name="cond")
    assert space.size() == 1 + 3
    arch = space.sample({"s3.mixer": "attention", "s3.depth": 4})
    assert arch.stages[2].depth == 4 and arch.stages[2].mixer == "attention"


def test_fixed_params_are_checked():
    space = searchspace.get_space("tiny")
    params = space.params_of(searchspace.get_space("tiny").sample(_first_choices(space)))
    assert params is not None
    with pytest.raises(MixerNASError, match="s1.mixer.*not one of"):
        space.sample({**params, "s1.mixer": "attention"})
    with pytest.raises(MixerNASError, match="missing"):
        space.sample({k: v for k, v in params.items() if k != "s3.depth"})
    with pytest.raises(MixerNASError, match="unknown parameter.*s9.depth"):
        space.sample({**params, "s9.depth": 3})


def _first_choices(space):
    params = {}
    for i, sc in enumerate(space.stages):
        for key, options in (("mixer", sc.mixers), ("depth", sc.depths), ("width", sc.widths),
                             ("mlp_ratio", sc.mlp_ratios)):
            if len(options) > 1:
                params[f"s{i + 1}.{key}"] = options[0]
    return params


def test_params_of_inverts_sample_and_rejects_outsiders():
    space = searchspace.get_space("tiny")
    params = _first_choices(space)
    arch = space.sample(params)
    assert space.params_of(arch) == params
    assert space.params_of(searchspace.preset("CAFormer-S18")) is None


def test_mixer_argument_choices_get_dotted_names():
    space = ChoiceSpace([
        StageChoices(("pooling",), depths=(1,), widths=(32,)),
        StageChoices(("pooling",), depths=(1,), widths=(32,)),
        StageChoices(("pooling", "strip_attention"), depths=(1,), widths=(64,),
                     mixer_args={"strip_attention": {"sr_ratio": (1, 2, 4)}}),
        StageChoices(("pooling",), depths=(1,), widths=(64,)),
    ])
    assert space.size() == 1 + 3
    arch = space.sample({"s3.mixer": "strip_attention", "s3.strip_attention.sr_ratio": 2})
    assert arch.stages[2].mixer_args["sr_ratio"] == 2
    assert space.params_of(arch) == {"s3.mixer": "strip_attention", "s3.strip_attention.sr_ratio": 2}


def test_incompatible_choices_rejected_when_declared():
    with pytest.raises(MixerNASError, match="s1.*attention.*width 48"):
        ChoiceSpace([StageChoices(("attention",), depths=(1,), widths=(48,))])


def test_registration_by_name_and_module_path():
    @register_space("test-two-mixers", overwrite=True)
    def two(trial):
        mixer = trial.suggest_categorical("s4.mixer", ["pooling", "attention"])
        return searchspace.preset("PoolFormerV2-S12").replace_mixer(3, mixer)

    assert "test-two-mixers" in searchspace.list_spaces()
    assert searchspace.get_space("test-two-mixers").size() == 2
    space = searchspace.get_space("tests.test_space:module_level_space")
    assert space.sample({"s4.mixer": "attention"}).stages[3].mixer == "attention"
    with pytest.raises(UnknownNameError, match="did you mean 'default'"):
        searchspace.get_space("defualt")
    with pytest.raises(MixerNASError, match="cannot import"):
        searchspace.get_space("no_such_module:space")


def module_level_space(trial):
    mixer = trial.suggest_categorical("s4.mixer", ["pooling", "attention"])
    return searchspace.preset("PoolFormerV2-S12").replace_mixer(3, mixer)
