"""Every built-in mixer against the shipped contract (searchspace.testing.MixerContract)."""

import pytest
import torch
from torch import nn

import searchspace
from searchspace.testing import MixerContract

BUILTIN = ["identity", "pooling", "sepconv", "modulation", "additive", "hadamard", "random", "strip_attention",
           "gpsa", "attention"]


class TestBuiltinMixers(MixerContract):
    @pytest.fixture(params=BUILTIN)
    def mixer_name(self, request) -> str:
        return request.param


class TestUserMixer(MixerContract):
    """A mixer registered in a few lines passes the same contract and is searchable like a built-in one."""

    mixer = "test-maxpool"

    @classmethod
    def setup_class(cls):
        @searchspace.register_mixer("test-maxpool", description="3x3 max pooling minus the input", overwrite=True)
        class MaxPoolMixer(nn.Module):
            def __init__(self, dim: int, size: int = 3):
                super().__init__()
                self.pool = nn.MaxPool2d(size, stride=1, padding=size // 2)
                self.scale = nn.Parameter(torch.ones(dim, 1, 1))

            def forward(self, x):
                return (self.pool(x) - x) * self.scale

    @classmethod
    def teardown_class(cls):
        searchspace.unregister_mixer("test-maxpool")

    def test_searchable(self):
        space = searchspace.ChoiceSpace([
            searchspace.StageChoices(("pooling", "test-maxpool"), depths=(1,), widths=(32,)),
            searchspace.StageChoices(("test-maxpool",), depths=(1,), widths=(32,)),
            searchspace.StageChoices(("test-maxpool", "attention"), depths=(1,), widths=(64,)),
            searchspace.StageChoices(("test-maxpool",), depths=(1,), widths=(64,)),
        ])
        assert space.size() == 4
        arch = space.sample({"s1.mixer": "test-maxpool", "s3.mixer": "test-maxpool"})
        assert arch.mixers == ("test-maxpool",) * 4
        assert searchspace.build_model(arch, num_classes=2)(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_every_builtin_is_registered_with_a_reference():
    assert set(BUILTIN) <= set(searchspace.list_mixers())
    for name in BUILTIN:
        spec = searchspace.get_mixer(name)
        assert spec.reference and spec.description


def test_attention_is_declared_not_guessed():
    declared = {n for n in BUILTIN if searchspace.get_mixer(n).attention}
    assert declared == {"attention", "strip_attention", "gpsa"}


def test_unknown_mixer_argument_is_named():
    with pytest.raises(searchspace.MixerNASError, match="pool_sise"):
        searchspace.create_mixer("pooling", 32, pool_sise=3)


# one argument each mixer cannot use (identity and additive take none that can be wrong, only unknown ones)
BAD_ARGUMENTS = {
    "identity": {"size": 3},
    "pooling": {"pool_size": 4},
    "sepconv": {"kernel_size": 0},
    "modulation": {"expansion": 0},
    "additive": {"heads": 2},
    "hadamard": {"order": 0},
    "random": {"seed": "zero"},
    "strip_attention": {"num_heads": 3},
    "gpsa": {"num_heads": 3},
    "attention": {"head_dim": 0},
}


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_arguments_raise_mixernas_error(name):
    args = BAD_ARGUMENTS[name]
    with pytest.raises(searchspace.MixerNASError):
        searchspace.create_mixer(name, 40, **args)
    check = getattr(searchspace.get_mixer(name).factory, "check", None)
    if check is not None:  # what architectures are validated with says why, without building anything
        assert check(40, **args)
        with pytest.raises(searchspace.InvalidArchError):
            searchspace.Arch(stages=(searchspace.Stage(mixer=name, depth=1, width=40, mixer_args=args),))
