"""Compression core: recipes validated whole, checkpoints loaded safely, low-rank and distillation steps, saving
that reloads without pickled code, the report, and ``python -m compress`` end to end.

Tiny models throughout: a two-stage MixerNAS architecture (widths 32/64) at 32x32, and timm ``poolformerv2_s12`` /
``vit_tiny_patch16_224`` created with ``pretrained=False`` at 32x32. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

import compress
from compress import saving
from compress.__main__ import main
from compress.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    adapt_to_data,
    create_model,
    load_weights,
    read_state_dict,
)
from compress.recipe import load_recipe, recipe_from_dict, recipe_from_yaml
from compress.steps import STEPS, Param, RecipeError, StepContext, register_step
from compress.steps.low_rank import LowRankConv1x1, LowRankLinear, choose_rank
from searchspace import Arch, Stage, build_model
from searchspace.data import load_data
from searchspace.errors import MixerNASError
from searchspace.latency import InputSpec

ROOT = Path(__file__).resolve().parent.parent
FAST = MeasureFast = compress.MeasureOptions(warmup=1, rounds=1, target_round_ms=5, max_extra_rounds=0)
CLI_FAST = ["--threads", "1", "--rounds", "1", "--warmup", "1", "--round-ms", "5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()  # a second thread only waits on other work on a shared 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_arch() -> Arch:
    return Arch(stages=(Stage(mixer="pooling", depth=1, width=32), Stage(mixer="attention", depth=1, width=64)))


def tiny_model(seed: int = 0, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_arch(), num_classes=num_classes, in_chans=in_chans).eval()


@pytest.fixture(scope="module")
def digits():
    """The built-in digits, cut to 256 training and 128 validation images so that an epoch takes a moment."""
    data = load_data()
    cut = lambda ds, n: TensorDataset(*(t[:n] for t in ds.tensors))  # noqa: E731
    return dataclasses.replace(data, train=cut(data.train, 256), val=cut(data.val, 128))


def spec(channels: int = 1, size: int = 32) -> InputSpec:
    return InputSpec(batch=1, channels=channels, height=size, width=size)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def same_layout(a: nn.Module, b: nn.Module) -> bool:
    """Every tensor of ``a`` and ``b`` has the same shape, strides, dtype and alignment: a reloaded model that should
    compute exactly like the original must also lay its tensors out like it, since some BLAS kernels (MKL's sgemv
    on AMD EPYC) sum in another order for a weight that is not 16-byte aligned."""

    def layout(m: nn.Module) -> dict:
        return {k: (t.shape, t.stride(), t.dtype, t.data_ptr() % 64) for k, t in m.state_dict(keep_vars=True).items()}

    return layout(a) == layout(b)


def recipe_error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_yaml(text)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------ recipes


def test_recipe_shorthand_defaults_and_numbers_as_yaml_11_strings():
    recipe = recipe_from_yaml("name: r\nsteps:\n  - measure\n  - finetune: {epochs: 2, lr: 5e-4}\n  - low_rank:\n")
    assert [s.name for s in recipe.steps] == ["measure", "finetune", "low_rank"]
    assert recipe.steps[0].params == {"latency": True, "accuracy": True, "rounds": None}
    assert recipe.steps[1].params["lr"] == 5e-4 and recipe.steps[1].params["epochs"] == 2
    assert recipe.steps[2].params["rank_ratio"] == 0.5  # `low_rank:` with nothing after it = defaults
    assert [s.name for s in recipe.needs_data] == ["finetune"]


def test_unknown_step_and_parameter_name_the_closest_valid_one():
    message = recipe_error("steps:\n  - measure\n  - low_rnak: {energy: 0.9}\n")
    assert "steps[1]" in message and "'low_rnak'" in message and "did you mean 'low_rank'" in message
    message = recipe_error("steps:\n  - distill: {temprature: 2.0}\n")
    assert "steps[0].temprature" in message and "did you mean 'temperature'" in message
    message = recipe_error("name: x\nstep:\n  - measure\n")
    assert "'step'" in message and "did you mean 'steps'" in message


@pytest.mark.parametrize("step, says", [
    ("low_rank: {rank_ratio: half}", "steps[0].rank_ratio: must be a number, got 'half'"),
    ("low_rank: {rank_ratio: 1.5}", "steps[0].rank_ratio: must be at most 1.0"),
    ("low_rank: {energy: -0.1}", "steps[0].energy: must be at least 0.0"),
    ("low_rank: {include: stages.*}", "steps[0].include: must be a list"),
    ("low_rank: {include: [1, 2]}", "include must be a list of module name patterns"),
    ("finetune: {epochs: 1.5}", "steps[0].epochs: must be an integer"),
    ("finetune: {epochs: true}", "steps[0].epochs: must be an integer, got True"),
    ("finetune: {epochs: 0}", "steps[0].epochs: must be at least 1"),
    ("finetune: {augment: 1}", "steps[0].augment: must be true or false"),
    ("distill: {teacher_model: convformer_s18}", "teacher_model is given without teacher"),
    ("distill: {teacher: /no/such/teacher.pth, teacher_model: x}", "does not exist"),
    ("measure: 3", "must be a mapping of parameters"),
])
def test_wrong_types_and_ranges_name_the_path(step, says):
    assert says in recipe_error(f"steps:\n  - {step}\n")


def test_malformed_recipes():
    assert "non-empty list of steps" in recipe_error("name: x\n")
    assert "non-empty list of steps" in recipe_error("steps: []\n")
    assert "one-key mapping" in recipe_error("steps:\n  - {measure: {}, low_rank: {}}\n")
    assert "must be a mapping" in recipe_error("- measure\n")
    assert "not valid YAML" in recipe_error("steps: [measure\n")
    assert "input_size must be an integer of at least 8" in recipe_error("input_size: 4\nsteps: [measure]\n")


def test_required_parameters_are_reported():
    register_step("needs_k", params={"k": Param(int, minimum=1, help="how many")})(lambda ctx, k: {})
    try:
        assert "steps[0].k: required parameter of needs_k is missing: how many" in recipe_error(
            "steps:\n  - needs_k\n")
        assert recipe_from_yaml("steps:\n  - needs_k: {k: 3}\n").steps[0].params == {"k": 3}
    finally:
        STEPS.remove("needs_k")


def test_yaml_with_a_python_tag_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    text = f"steps:\n  - !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="tags such as !!python/... are refused"):
        load_recipe(path)
    assert not marker.exists()


def test_missing_recipe_file_and_steps_needing_data(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    recipe = recipe_from_dict({"steps": ["measure", {"finetune": {"epochs": 1}}]})
    with pytest.raises(RecipeError, match=r"steps\[1\] \(finetune\) needs training data"):
        compress.apply(recipe, tiny_model(), None, measure=FAST)


@pytest.mark.parametrize("name", ["prune-50-kd", "token-keep-70", "lowrank-kd", "fit-budget"])
def test_shipped_recipes_validate_and_explain_themselves(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and len([line for line in text.splitlines() if line.startswith("#")]) >= 3
    missing = [s for s in _step_names(yaml.safe_load(text)) if s not in STEPS]
    if missing:
        pytest.skip(f"step(s) {missing} not written yet")
    recipe = load_recipe(path)
    assert recipe.name == name and recipe.description
    for call in recipe.steps:  # every recipe that cuts the model recovers with distillation afterwards
        if call.name == "fit_budget":
            assert call.params["distill_epochs"] >= 1
    if name != "fit-budget":
        assert "distill" in [call.name for call in recipe.steps]


def _step_names(data) -> list[str]:
    return [s if isinstance(s, str) else next(iter(s)) for s in data["steps"]]


# -------------------------------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this calls ``_touch``: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).touch()


class Custom:
    pass


def test_plain_nested_prefixed_and_safetensors_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    state = model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    files = {
        "plain.pth": state,
        "timm.pth.tar": {"epoch": 3, "arch": "x", "state_dict": state, "state_dict_ema": ema, "version": 2,
                         "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "metric": 0.9,
                         "args": argparse.Namespace(model="x", lr=0.1)},  # what timm's train.py writes
        "ddp.pt": {"model": {f"module.{k}": v for k, v in state.items()}},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in state.items()},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(state, tmp_path / "w.safetensors")
    for name in [*files, "w.safetensors"]:
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys(), name
        assert all(torch.equal(loaded[k], state[k]) for k in state), name
    with_ema = read_state_dict(tmp_path / "timm.pth.tar", use_ema=True)
    assert torch.equal(with_ema["head.fc.bias"], ema["head.fc.bias"])


def test_a_checkpoint_that_needs_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"state_dict": tiny_model().state_dict(), "extra": Payload(marker)}, tmp_path / "evil.pth")
    torch.save({"state_dict": tiny_model().state_dict(), "extra": Custom()}, tmp_path / "custom.pth")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(tmp_path / "evil.pth")
    message = str(info.value)
    assert "refused" in message and "_touch" in message and "not executed" in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="test_compress_core.Custom"):
        read_state_dict(tmp_path / "custom.pth")
    assert main(["--recipe", str(_write_recipe(tmp_path, ["measure"])), "--model", str(_arch_file(tmp_path)),
                 "--checkpoint", str(tmp_path / "evil.pth"), *CLI_FAST]) == 2
    assert not marker.exists()


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "w.npz").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    for name, says in [("missing.pth", "does not exist"), ("junk.pth", "cannot read"), ("w.npz", "unknown suffix"),
                       ("junk.safetensors", "cannot read"), ("empty.pth", "holds no state dict")]:
        with pytest.raises(CheckpointError, match=says):
            read_state_dict(tmp_path / name)


def test_a_checkpoint_that_does_not_fit_gets_a_short_summary():
    model = tiny_model()
    state = dict(tiny_model().state_dict())
    state["extra.weight"] = torch.zeros(3)
    state.pop("head.fc.bias")
    state["stem.conv.weight"] = torch.zeros(16, 1, 7, 7)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(model, state, source="w.pth", model_name="the tiny model")
    message = str(info.value)
    assert "1 missing (head.fc.bias)" in message and "1 unexpected (extra.weight)" in message
    assert "stem.conv.weight: checkpoint 16x1x7x7, model 32x1x7x7" in message and "\n" not in message


def test_model_resolution_reads_classes_and_channels_from_the_checkpoint(tmp_path):
    from searchspace.nas.results import save_model

    trained = tiny_model(seed=3, num_classes=7, in_chans=2)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "t.pth")
    x = torch.randn(2, 2, 32, 32)
    loaded = create_model(_arch_file(tmp_path), checkpoint=tmp_path / "t.pth")
    assert loaded.kind == "mixernas" and torch.equal(outputs(loaded.model, x), outputs(trained, x))
    save_model(tmp_path / "run" / "best", trained, tiny_arch(), num_classes=7, in_chans=2)  # a search's winner
    (tmp_path / "run" / "best.json").write_text(json.dumps({"input_size": [40, 40]}))
    loaded = create_model(tmp_path / "run")
    assert loaded.kind == "results" and loaded.input_size == 40
    assert torch.equal(outputs(loaded.model, x), outputs(trained, x))
    with pytest.raises(MixerNASError, match="did you mean .*'poolformerv2_s12'"):
        create_model("poolformerv2_s13")
    with pytest.raises(CheckpointMismatchError, match="check that --model names the architecture"):
        create_model("IdentityFormer-S12", checkpoint=tmp_path / "t.pth")


def test_timm_imagenet_checkpoint_on_grey_digits_keeps_its_classifier_and_says_so(tmp_path, digits):
    import timm

    torch.manual_seed(0)
    torch.save({"state_dict": timm.create_model("poolformerv2_s12").state_dict()}, tmp_path / "pf.pth")
    loaded = create_model("poolformerv2_s12", checkpoint=tmp_path / "pf.pth", input_size=32)
    assert loaded.kind == "timm" and loaded.model.num_classes == 1000
    head = loaded.model.get_classifier().weight.clone()
    model, data, notes = adapt_to_data(loaded.model, digits)
    assert data.in_chans == 3 and data.train.tensors[0].shape[1:] == (3, 32, 32)
    assert torch.equal(data.val.tensors[0][:, 0], data.val.tensors[0][:, 2])  # the grey channel, repeated
    assert model.num_classes == 1000 and torch.equal(model.get_classifier().weight, head)  # the user's, kept
    assert not data.labelled and "labels unused" in data.describe()
    assert any("grey channel is repeated" in n for n in notes)
    assert any("classifier kept" in n and "1000" in n and "agreement" in n for n in notes)
    # asked for: a classifier for the data's classes
    model, data, notes = adapt_to_data(loaded.model, digits, other_classes="replace")
    assert model.num_classes == 10 and data.labelled and outputs(model, data.val.tensors[0][:2]).shape == (2, 10)
    assert any("classifier replaced" in n and "1000" in n and "untrained" in n for n in notes)
    with pytest.raises(MixerNASError, match="the model takes 1 input channels but the data has 3"):
        adapt_to_data(tiny_model(), dataclasses.replace(digits, in_chans=3))
    with pytest.raises(MixerNASError, match="--num-classes 7 asks for a new classifier, but the data has 10"):
        adapt_to_data(tiny_model(), digits, num_classes=7)


def test_vit_checkpoint_input_size_is_read_from_its_position_embedding(tmp_path):
    import timm

    from compress.checkpoint import grid_input_size

    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", img_size=48).state_dict()
    assert grid_input_size(state) == 48  # 3x3 patches of 16 + a class token
    assert grid_input_size(timm.create_model("deit_tiny_distilled_patch16_224").state_dict()) == 224  # 2 prefixes
    assert grid_input_size(tiny_model().state_dict()) is None  # no grid: a convolutional model
    torch.save(state, tmp_path / "vit.pth")
    loaded = create_model("vit_tiny_patch16_224", checkpoint=tmp_path / "vit.pth")
    assert loaded.input_size == 48 and loaded.model.pos_embed.shape == (1, 10, 192) and not loaded.notes


def test_timm_vit_checkpoint_at_another_image_size_is_converted_by_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "vit.safetensors")
    loaded = create_model("vit_tiny_patch16_224", checkpoint=tmp_path / "vit.safetensors", input_size=32)
    assert loaded.model.pos_embed.shape == (1, 5, 192)  # 2x2 patches + class token, resampled from 14x14
    assert any("checkpoint_filter_fn" in n for n in loaded.notes)
    assert outputs(loaded.model, torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ----------------------------------------------------------------------------------------------------- low rank


def test_choose_rank_by_energy_ratio_and_rounding():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0] + [0.0] * 28)  # squared: 16, 4, 1, 1 of 22
    assert choose_rank(s, rank_ratio=0.5, energy=None, round_to=1) == 16
    assert choose_rank(s, rank_ratio=0.5, energy=0.7, round_to=1) == 1
    assert choose_rank(s, rank_ratio=0.5, energy=0.9, round_to=1) == 2
    assert choose_rank(s, rank_ratio=0.5, energy=0.999, round_to=1) == 4
    assert choose_rank(s, rank_ratio=0.5, energy=0.9, round_to=8) == 8
    assert choose_rank(s, rank_ratio=1.0, energy=None, round_to=64) == 32


def _low_rank_weights(model: nn.Module, rank: int = 4) -> nn.Module:
    """Make every projection's weight (nearly) rank ``rank``, as trained projections often nearly are."""
    torch.manual_seed(1)
    for m in model.modules():
        if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.kernel_size == (1, 1)):
            out_f, in_f = m.weight.shape[:2]
            w = torch.randn(out_f, rank) @ torch.randn(rank, in_f) / in_f ** 0.5
            m.weight.data = (w + 1e-4 * torch.randn_like(w)).reshape(m.weight.shape)
    return model


def test_low_rank_reduces_params_and_keeps_the_output_close_at_high_energy():
    model = _low_rank_weights(tiny_model())
    recipe = recipe_from_dict({"steps": [{"low_rank": {"energy": 0.999, "exclude": ["head*"]}}]})
    small, report = compress.apply(recipe, model, input_spec=spec(), measure=FAST, step_latency=False,
                                   side_by_side=False, log=lambda m: None)
    figures = report.steps[0].figures
    assert figures["layers"] >= 4 and figures["mean_energy_kept"] > 0.999
    assert report.after["params"] < report.before["params"] and report.after["macs"] < report.before["macs"]
    assert any(isinstance(m, (LowRankLinear, LowRankConv1x1)) for m in small.modules())
    assert not any(isinstance(m, (LowRankLinear, LowRankConv1x1)) for m in model.modules())  # input untouched
    assert not any(isinstance(m, (LowRankLinear, LowRankConv1x1)) for n, m in small.named_modules()
                   if n.startswith("head"))
    x = torch.randn(8, 1, 32, 32)
    before, after = outputs(model, x), outputs(small, x)
    assert (after - before).norm() / before.norm() < 1e-2


def test_low_rank_skips_layers_it_would_not_shrink_and_honours_include():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    ctx = StepContext(model=model, input_spec=None, log=lambda m: None)
    figures = STEPS.get("low_rank").fn(ctx, rank_ratio=0.25, energy=None, round_to=8, include=[], exclude=[])
    assert figures == {"layers": 1, "skipped": 1, "layer_params_before": 64 * 64 + 64,
                       "layer_params_after": 16 * 64 + 64 * 16 + 64, "mean_energy_kept": figures["mean_energy_kept"]}
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], nn.Linear)
    with pytest.raises(RecipeError, match="matches no linear"):
        STEPS.get("low_rank").fn(ctx, rank_ratio=0.25, energy=None, round_to=8, include=["nothing.*"], exclude=[])


# ------------------------------------------------------------------------------------------------------ distill


def test_distill_improves_agreement_with_the_teacher(digits):
    teacher = tiny_model(seed=0)
    with torch.no_grad():
        teacher.head.fc.weight.mul_(50)  # a teacher with confident, input-dependent predictions
    student = tiny_model(seed=1)
    recipe = {"steps": [{"distill": {"steps": 24, "lr": 3e-3, "alpha": 1.0, "temperature": 2.0, "warmup": 0.0}}]}
    _, report = compress.apply(recipe, student, digits, teacher=teacher, measure=FAST, step_latency=False,
                               side_by_side=False, log=lambda m: None)
    figures = report.steps[0].figures
    assert figures["steps"] == 24
    assert figures["teacher_agreement"] > figures["teacher_agreement_before"] + 0.2


def test_distill_feature_matching_with_an_adapter_for_other_widths(digits):
    teacher = tiny_model(seed=0)
    narrow = Arch(stages=(Stage(mixer="pooling", depth=1, width=16), Stage(mixer="attention", depth=1, width=32)))
    student = build_model(narrow, num_classes=10, in_chans=1)
    recipe = {"steps": [{"distill": {"steps": 3, "features": True}}]}
    small, report = compress.apply(recipe, student, digits, teacher=teacher, measure=FAST, step_latency=False,
                                   side_by_side=False, log=lambda m: None)
    assert report.steps[0].figures["steps"] == 3
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in student.parameters())  # no adapter


# ------------------------------------------------------------------------------------------------ save, reload


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")  # StarReLU's scalar scale and bias: nothing to prune
def test_save_reload_identical_after_channel_pruning(tmp_path):
    import torch_pruning as tp

    from searchspace.pruning import pruning_kwargs

    model = tiny_model()
    full = sum(p.numel() for p in model.parameters())
    kwargs = pruning_kwargs(model)
    kwargs["ignored_layers"].append(model.head.fc)
    tp.pruner.MetaPruner(model, torch.randn(1, 1, 32, 32), importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.5, round_to=8, **kwargs).step()
    assert sum(p.numel() for p in model.parameters()) < full / 2
    saving.save(model, tmp_path / "m", example=spec())
    manifest = json.loads((tmp_path / "m" / "compressed.json").read_text())
    assert manifest["source"]["kind"] == "mixernas" and manifest["attributes"]  # pruned channel counts, as data
    reloaded = compress.load(tmp_path / "m")
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(outputs(reloaded, x), outputs(model, x)) and same_layout(reloaded, model)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_save_reload_identical_after_low_rank_and_pruning_on_timm_models(tmp_path):
    import timm
    import torch_pruning as tp

    for name in ("poolformerv2_s12", "vit_tiny_patch16_224"):
        loaded = create_model(name, num_classes=10, input_size=32)
        model = _low_rank_weights(loaded.model.eval())
        for block in [m for m in model.modules() if isinstance(m, timm.layers.Mlp)][:2]:  # MLP hidden width halved
            keep = block.fc1.weight.shape[0] // 2
            drop = list(range(keep, 2 * keep))
            prune_out = tp.prune_conv_out_channels if isinstance(block.fc1, nn.Conv2d) else tp.prune_linear_out_channels
            prune_in = tp.prune_conv_in_channels if isinstance(block.fc2, nn.Conv2d) else tp.prune_linear_in_channels
            prune_out(block.fc1, drop)
            prune_in(block.fc2, drop)
        recipe = {"steps": [{"low_rank": {"energy": 0.99, "include": ["stages.[01].*", "blocks.*"]}}]}  # small SVDs
        small, _ = compress.apply(recipe, model, input_spec=spec(3), measure=FAST, step_latency=False,
                                  side_by_side=False, log=lambda m: None)
        saving.save(small, tmp_path / name, example=spec(3))
        manifest = json.loads((tmp_path / name / "compressed.json").read_text())
        assert manifest["source"] == {"kind": "timm", "name": name,
                                      "kwargs": {"num_classes": 10, **({"img_size": 32} if "vit" in name else {})}}
        assert [r["name"] for r in manifest["rebuild"]] == ["low_rank"]
        reloaded = compress.load(tmp_path / name)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(outputs(reloaded, x), outputs(small, x)) and same_layout(reloaded, small), name


@pytest.mark.parametrize("name", ["poolformerv2_s12", "vit_tiny_patch16_224"])
def test_save_reload_identical_after_the_channel_pruning_step_on_timm_models(tmp_path, name):
    channel = pytest.importorskip("compress.steps.channel")  # written beside this module
    model = create_model(name, num_classes=10, input_size=32).model.eval()
    x = torch.randn(2, 3, 32, 32)
    channel.prune_channels(model, x[:1], ratio=0.5)  # heads, head_dim, scale and Scale.shape change with it
    saving.save(model, tmp_path / "m", example=x[:1])
    reloaded = compress.load(tmp_path / "m")
    assert torch.equal(outputs(reloaded, x), outputs(model, x))
    assert torch.equal(outputs(reloaded, x[:1]), outputs(model, x[:1]))  # batch 1 as well: another BLAS call
    assert same_layout(reloaded, model)


def test_an_unrecorded_structural_change_is_caught_at_save_time(tmp_path):
    class Doubled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model = tiny_model()
    model.head_norm = Doubled(model.head_norm)  # new module names, not recorded
    with pytest.raises(saving.SaveError, match="record_rebuild"):
        saving.save(model, tmp_path / "a", example=spec())
    model = tiny_model()
    model.head.register_forward_hook(lambda m, i, o: o * 2)  # same modules, other behaviour
    with pytest.raises(saving.SaveError, match="does not reproduce"):
        saving.save(model, tmp_path / "b", example=spec())
    assert not (tmp_path / "b" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------- CLI


def _arch_file(tmp_path: Path) -> Path:
    path = tmp_path / "arch.json"
    tiny_arch().save(path)
    return path


def _write_recipe(tmp_path: Path, steps: list) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "description": "a tiny test recipe", "steps": steps}))
    return path


def test_cli_runs_a_recipe_and_writes_model_report_and_recipe(tmp_path, capsys):
    torch.save({"state_dict": tiny_model().state_dict(), "epoch": 1}, tmp_path / "tiny.pth")
    recipe = _write_recipe(tmp_path, ["measure", {"low_rank": {"rank_ratio": 0.25}}, {"finetune": {"epochs": 1}}])
    out = tmp_path / "out"
    argv = ["--recipe", str(recipe), "--model", str(_arch_file(tmp_path)), "--checkpoint", str(tmp_path / "tiny.pth"),
            "--out", str(out), "--quiet", "--input-size", "32", *CLI_FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "side by side" in printed and str(out) in printed
    for name in ("model/compressed.json", "model/model.safetensors", "report.json", "report.md", "recipe.yaml"):
        assert (out / name).exists(), name
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["measure", "low_rank", "finetune"]
    for figures in [report["before"]] + [s["after"] for s in report["steps"]] + [report["after"]]:
        assert {"params", "macs", "latency_ms", "latency_spread", "latency_context", "accuracy",
                "agreement"} <= set(figures)
    assert report["after"]["params"] < report["before"]["params"]
    assert report["side_by_side"]["speedup"] > 0 and "1 thread" in report["side_by_side"]["context"]
    assert {"params_ratio", "macs_ratio", "speedup", "accuracy_change"} <= set(report["change"])
    assert report["steps"][2]["figures"]["steps"] > 0
    markdown = (out / "report.md").read_text()
    assert "| before |" in markdown and "| 1. low_rank |" in markdown and "Before vs after" in markdown
    model = compress.load(out)
    assert outputs(model, torch.randn(1, 1, 32, 32)).shape == (1, 10)
    manifest = saving.read_manifest(out)
    assert manifest["extra"]["input_size"] == 32 and manifest["extra"]["recipe"] == "tiny"


def test_cli_compressing_a_timm_checkpoint_without_data_keeps_its_input_size_and_classes(tmp_path, capsys):
    """The issue's case: a timm ViT checkpoint (here trained at 48x48, a grid of 3x3 patches) and no --data. The
    compressed model takes the same input and predicts the same 1000 classes; the training step learnt the original
    model's outputs on the digits (no labels of its classes), and the report gives agreement, not accuracy."""
    import timm

    torch.manual_seed(0)
    original = timm.create_model("vit_tiny_patch16_224", img_size=48).eval()
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, tmp_path / "vit.pth")
    recipe = _write_recipe(tmp_path, [{"token_prune": {"keep_rate": 0.7}}, {"distill": {"steps": 2}},
                                      {"finetune": {"steps": 1}}])
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"),
                 "--out", str(out), "--quiet", "--no-step-latency", *CLI_FAST]) == 0
    printed = capsys.readouterr().out
    assert "Note: classifier kept" in printed and "Agreement with the original model" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 3, 48, 48]
    assert report["after"].get("accuracy") is None and 0 <= report["after"]["agreement"] <= 1
    assert report["before"]["agreement"] == 1.0
    model = compress.load(out)
    assert outputs(model, torch.randn(2, 3, 48, 48)).shape == (2, 1000)
    manifest = saving.read_manifest(out)
    assert manifest["extra"]["input_size"] == 48 and manifest["extra"]["num_classes"] == 1000
    # the classifier was trained towards the original's outputs, never replaced
    assert model.get_classifier().weight.shape == original.get_classifier().weight.shape


def test_cli_a_labelled_folder_of_other_classes_replaces_the_classifier_and_says_so(tmp_path, capsys):
    import timm
    from PIL import Image

    for label in ("cat", "dog", "owl"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 90, 60 * len(label))).save(tmp_path / "photos" / label / f"{i}.png")
    torch.save(timm.create_model("poolformerv2_s12").state_dict(), tmp_path / "pf.pth")
    recipe = _write_recipe(tmp_path, [{"measure": {"latency": False}}])
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "--model", "poolformerv2_s12", "--checkpoint", str(tmp_path / "pf.pth"),
                 "--data", str(tmp_path / "photos"), "--input-size", "32", "--out", str(out), "--quiet",
                 "--no-step-latency", *CLI_FAST]) == 0
    assert "Note: classifier replaced: the checkpoint predicts 1000 classes, the data has 3" in capsys.readouterr().out
    assert compress.load(out).num_classes == 3


def test_cli_a_folder_of_loose_images_is_unlabelled_data(tmp_path):
    from PIL import Image

    (tmp_path / "loose").mkdir()
    for i in range(6):
        Image.new("L", (20, 20), 40 * i).save(tmp_path / "loose" / f"{i}.png")
    torch.save(tiny_model(in_chans=3).state_dict(), tmp_path / "tiny.pth")
    out = tmp_path / "out"
    assert main(["--recipe", str(_write_recipe(tmp_path, [{"finetune": {"steps": 1}}])), "--model",
                 str(_arch_file(tmp_path)), "--checkpoint", str(tmp_path / "tiny.pth"),
                 "--data", str(tmp_path / "loose"), "--input-size", "32", "--out", str(out), "--quiet",
                 "--no-step-latency", *CLI_FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "unlabelled" in report["data"] and report["after"].get("accuracy") is None
    assert any("no labels" in n for n in report["notes"]) and compress.load(out).num_classes == 10


def test_distilling_from_a_teacher_whose_classifier_was_replaced_is_flagged(digits):
    model, data, _ = adapt_to_data(tiny_model(num_classes=5), digits, other_classes="replace")
    recipe = {"steps": [{"low_rank": {"rank_ratio": 0.25}}, {"distill": {"steps": 1}}]}
    _, report = compress.apply(recipe, model, data, measure=FAST, step_latency=False, side_by_side=False,
                               log=lambda m: None)
    assert any("put a finetune step before steps[0]" in n for n in report.notes)
    recipe = {"steps": [{"finetune": {"steps": 1}}, {"low_rank": {"rank_ratio": 0.25}}, {"distill": {"steps": 1}}]}
    _, report = compress.apply(recipe, model, data, measure=FAST, step_latency=False, side_by_side=False,
                               log=lambda m: None)
    assert not report.notes


def test_cli_a_folder_of_photos_does_not_fit_a_grey_checkpoint(tmp_path, capsys):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / "photos" / label / f"{i}.png")
    torch.save(tiny_model().state_dict(), tmp_path / "tiny.pth")
    code = main(["--recipe", str(_write_recipe(tmp_path, ["measure"])), "--model", str(_arch_file(tmp_path)),
                 "--checkpoint", str(tmp_path / "tiny.pth"), "--data", str(tmp_path / "photos"), *CLI_FAST])
    assert code == 2
    assert "the model takes 1 input channels but the data has 3" in capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    torch.save(tiny_model().state_dict(), tmp_path / "tiny.pth")
    torch.save(tiny_model(num_classes=5).state_dict(), tmp_path / "five.pth")
    good, arch = str(_write_recipe(tmp_path, ["measure"])), str(_arch_file(tmp_path))
    (tmp_path / "bad.yaml").write_text("steps:\n  - low_rnak: {energy: 0.5}\n")
    ckpt = ["--checkpoint", str(tmp_path / "tiny.pth")]
    cases = [
        (["--recipe", str(tmp_path / "none.yaml"), "--model", arch, *ckpt], "does not exist"),
        (["--recipe", str(tmp_path / "bad.yaml"), "--model", arch, *ckpt], "did you mean 'low_rank'"),
        (["--recipe", good, "--model", "convformer_s19", *ckpt], "'convformer_s18'"),
        (["--recipe", good, "--model", arch], "--checkpoint is required"),
        (["--recipe", good, "--model", "IdentityFormer-S12", *ckpt], "does not fit"),
        (["--recipe", good, "--model", arch, "--checkpoint", str(tmp_path / "five.pth"), "--num-classes", "7"],
         "--num-classes 7 asks for a new classifier, but the data has 10 labelled classes"),
        (["--recipe", good, "--model", arch, *ckpt, "--threads", "0"], "--threads must be at least 1"),
        (["--recipe", good, "--model", arch, *ckpt, "--device", "tpu"], "device"),
        (["--recipe", good, "--model", arch, *ckpt, "--frobnicate"], "frobnicate"),
        (["--model", arch, *ckpt], "--recipe is required"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_cli_help_explains_units_and_list_steps(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in ("milliseconds", "MACs", "pixels", "default: cpu", "weights_only", "side by side", "exit status"):
        assert words in out, words
    assert main(["--list-steps"]) == 0
    out = capsys.readouterr().out
    assert "low_rank:" in out and "    energy:" in out and "distill (needs data)" in out
