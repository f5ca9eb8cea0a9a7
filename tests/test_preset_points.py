"""Presets as points of the spaces: which presets the default space holds, that their parameters build exactly the
preset, that a search runs them as its first trials, and that workers starting together queue them once."""

from __future__ import annotations

import csv
import json
import threading

import pytest
import torch
from optuna.trial import TrialState

import search
import searchspace
from searchspace import ChoiceSpace, MixerNASError, StageChoices, build_model, list_presets, preset
from searchspace.nas import engine as engine_module
from searchspace.nas.candidate import Outcome
from searchspace.nas.config import SearchConfig
from searchspace.nas.study import PRESET_ATTR, SearchStudy, trial_rows
from searchspace.space import get_space

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# The MetaFormer baselines and the S12-frame models of the newer mixers. EfficientMod (fused blocks with trailing
# attention runs), CAS-ViT (BatchNorm blocks, two-conv stem, widths such as 48 and 56) and HorNet-T (patch stem,
# 18 blocks in stage 3) are not: the default space would have to take on their whole design.
DEFAULT_POINTS = {"IdentityFormer-S12", "RandFormer-S12", "PoolFormerV2-S12", "ConvFormer-S18", "CAFormer-S18",
                  "S2AFormer-style-S12", "ConViT-style-S12", "Hadamard-S12"}


def _structure(model: torch.nn.Module) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """Every module's name and type, and every parameter's and buffer's name and shape."""
    modules = [(name, type(m).__name__, None) for name, m in model.named_modules()]
    tensors = [(name, "tensor", tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    return modules + tensors


def test_the_default_space_holds_the_metaformer_presets():
    space = get_space("default")
    points = {name for name in list_presets() if space.params_of(preset(name)) is not None}
    assert points == DEFAULT_POINTS


@pytest.mark.parametrize("name", sorted(DEFAULT_POINTS))
def test_a_point_s_parameters_give_back_the_preset(name):
    space = get_space("default")
    arch = preset(name)
    params = space.params_of(arch)
    rebuilt = space.sample(params)
    assert rebuilt == arch  # every field (the name label aside): the same Arch always builds the same module
    assert {**rebuilt.to_dict(), "name": name} == arch.to_dict()


def test_a_point_builds_the_preset_s_modules_and_weights():
    arch = preset("PoolFormerV2-S12")
    rebuilt = get_space("default").sample(get_space("default").params_of(arch))
    torch.manual_seed(0)
    ours = build_model(rebuilt, num_classes=10, in_chans=1).eval()
    torch.manual_seed(0)
    theirs = build_model(arch, num_classes=10, in_chans=1).eval()
    assert _structure(ours) == _structure(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("name", sorted(set(list_presets()) - DEFAULT_POINTS))
def test_presets_outside_the_grid_are_not_points(name):
    assert get_space("default").params_of(preset(name)) is None
    assert get_space("tiny").params_of(preset(name)) is None


def test_the_presets_space_holds_every_preset():
    space = get_space("presets")
    assert space.size() == len(list_presets())
    for name in list_presets():
        params = space.params_of(preset(name))
        assert params == {"preset": name}
        assert space.sample(params) == preset(name)
    assert space.params_of(preset("PoolFormerV2-S12").replace_stage(0, depth=1)) is None


def test_choices_of_the_whole_architecture_are_checked():
    stages = [StageChoices(("pooling",), depths=(1,), widths=(32,))] * 4
    space = ChoiceSpace(stages, choices={"norm": ("layernorm_nobias", "groupnorm_nobias"), "head": ("linear",)})
    assert space.size() == 2
    arch = space.sample({"norm": "groupnorm_nobias"})  # a single option is fixed, not a parameter
    assert arch.norm == "groupnorm_nobias" and space.params_of(arch) == {"norm": "groupnorm_nobias"}
    with pytest.raises(MixerNASError, match="choices.widht is not a field of Arch"):
        ChoiceSpace(stages, choices={"widht": (1, 2)})
    with pytest.raises(MixerNASError, match="'head' is both fixed in base and a choice"):
        ChoiceSpace(stages, choices={"head": ("linear", "mlp")}, base={"head": "mlp"})
    with pytest.raises(MixerNASError, match="choice norm = 'no-such-norm' cannot build"):
        ChoiceSpace(stages, choices={"norm": ("layernorm", "no-such-norm")})


# ---------------------------------------------------------------------------------------------------- the search

COMPARED = ("PoolFormerV2-S12", "EfficientMod-xxs", "IdentityFormer-S12")  # two points of the space, one not


@pytest.fixture
def no_table(monkeypatch):
    # The default space's lookup table would be built first (minutes of part measurements at a new input; the table
    # has its own tests): without one, every candidate is measured for real, as finalists always are.
    monkeypatch.setattr(engine_module, "_latency_table", lambda *args, **kwargs: None)


@pytest.mark.slow
def test_a_search_runs_the_presets_that_are_points_first(tmp_path, no_table, capsys):
    out = tmp_path / "run"
    assert search.main(["--latency-budget", "50ms", "--space", "default", "--evaluator", "zero-cost", "--trials", "3",
                        "--input-size", "16", "--final-epochs", "1", "--train-threads", "1", "--quiet",
                        "--timeout", "300", "--baselines", ",".join(COMPARED), "--out", str(out)]) == 0
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["preset"] for r in rows] == ["PoolFormerV2-S12", "IdentityFormer-S12", ""]  # in the presets' order
    space = get_space("default")
    for row in rows[:2]:
        assert searchspace.Arch.from_json(row["arch"]) == preset(row["preset"])
        params = {k.removeprefix("param."): v for k, v in row.items() if k.startswith("param.") and v != ""}
        assert set(params) == set(space.params_of(preset(row["preset"])))
    # the preset that is no point of the space is evaluated beside the search, once
    beside = json.loads((out / "baselines.json").read_text())
    assert [b["name"] for b in beside] == ["EfficientMod-xxs"]
    report = (out / "report.md").read_text()
    for name, how in (("PoolFormerV2-S12", "trial 0"), ("IdentityFormer-S12", "trial 1"),
                      ("EfficientMod-xxs", "beside the search")):
        assert f"| {name} | {how} |" in report
    captured = capsys.readouterr()
    assert "the first 2 trials are the presets that are points of the space: PoolFormerV2-S12, IdentityFormer" \
        in captured.err
    for name in COMPARED:  # the summary compares the winner with every preset, each once
        assert captured.out.count(name) == 1


# ------------------------------------------------------------------------------------------------------ workers


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def test_workers_starting_together_queue_the_presets_once(storage_url, tmp_path):
    config = SearchConfig(budget_ms=5.0, out=str(tmp_path / "run"), storage=storage_url,
                          study_name=f"presets-{tmp_path.name}", trials=20)
    space = get_space("default")
    workers = 4
    start = threading.Barrier(workers)
    queued: list[list[str]] = []
    errors: list[BaseException] = []

    def worker():
        try:
            start.wait()
            study = SearchStudy(config, heartbeat=False)  # opening races to create the study ...
            queued.append(study.enqueue_presets(space))  # ... and only its creator queues the presets
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    expected = [name for name in list_presets() if name in DEFAULT_POINTS]
    assert sorted(queued, key=len) == [[]] * (workers - 1) + [expected]
    study = SearchStudy(config, heartbeat=False)  # a later worker, or a resume
    assert study.enqueue_presets(space) == []
    trials = study.trials()
    assert [t.user_attrs[PRESET_ATTR] for t in trials] == expected
    fixed = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in trials]
    assert len(set(fixed)) == len(expected)


def test_a_preset_trial_cut_off_is_no_evaluation_of_the_preset(tmp_path):
    config = SearchConfig(budget_ms=5.0, out=str(tmp_path / "run"), trials=4,
                          baselines=("PoolFormerV2-S12", "IdentityFormer-S12"))
    (tmp_path / "run").mkdir()
    study = SearchStudy(config, heartbeat=False)
    space = get_space("default")
    assert study.enqueue_presets(space) == ["PoolFormerV2-S12", "IdentityFormer-S12"]
    first = study.study.ask()
    assert space.sample(first) == preset("PoolFormerV2-S12")  # the queue's parameters, replayed by the space
    study.study.tell(first, state=TrialState.FAIL)  # Ctrl-C: failed, not counted
    second = study.study.ask()
    arch = space.sample(second)
    study.record(second, Outcome(arch=arch, state="screened", predicted_ms=40.0))
    study.study.tell(second, 0.0)
    rows = trial_rows(study.study)
    # the search evaluates the cut-off preset beside it instead (engine: presets not among the trials' presets)
    assert [r["preset"] for r in rows] == [None, "IdentityFormer-S12"]
