"""Reusable test suites shipped with the package (as Optuna ships its sampler tests).

Check your own mixer against the same contract as the built-in ones::

    # tests/test_my_mixer.py
    from searchspace.testing import MixerContract

    class TestMaxPoolMixer(MixerContract):
        mixer = "maxpool"          # a registered name
        mixer_args = {"size": 3}   # optional keyword arguments
"""

from .mixer_contract import MixerContract

__all__ = ["MixerContract"]
