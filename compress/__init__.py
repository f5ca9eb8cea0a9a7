"""MixerNAS compression: YAML recipes of steps (channel pruning, token pruning, distillation, low-rank,
fine-tuning, measurement) applied to a search winner or to an existing timm checkpoint.

The steps and the ``python -m compress`` command are being built (see the project's compression issue); this
package depends on :mod:`searchspace`, never the other way round.
"""
