"""The latency lookup table: keys and files (storage), reuse across opens and processes, rebuild, concurrent
writers, the parts and their geometry (parts), the predictor's forms and its accuracy figures (predictor), the
table's calibration from whole models (observe, calibrate, ensure_calibrated, check) and the build command.

Timing is replaced by fake measure functions (deterministic, counting their calls): parts get a 'latency' from
their parameter count and input, whole models one made from their parts by a known formula, so every figure
asserted here is exact and nothing depends on the clock. One test measures a few tiny parts for real, to check
that real measurement works at all."""

import dataclasses
import json
import math
import multiprocessing
import random
import warnings
from types import SimpleNamespace

import pytest
import torch

import searchspace
from searchspace import Arch, MixerNASError, Stage
from searchspace.arch import Blocks
from searchspace.blocks import DOWNSAMPLES, STEMS
from searchspace.latency import InputSpec, MeasurementError, storage
from searchspace.latency import __main__ as latency_cli
from searchspace.latency import measure as measure_mod
from searchspace.latency import table as table_mod
from searchspace.latency.measure import as_model
from searchspace.latency.parts import (
    BlockPart,
    DownsamplePart,
    HeadPart,
    StemPart,
    arch_parts,
    follow_layouts,
    output_channels_last,
    part_from_dict,
    part_to_dict,
    space_parts,
)
from searchspace.latency.predictor import (
    FORMS,
    MEAN,
    NEAR_BEST,
    TIE,
    Accuracy,
    Calibration,
    CalibrationError,
    Features,
    accuracy,
    fit_calibration,
    holdout_predictions,
    kendall_tau,
    min_models,
)
from searchspace.latency.reference import Anchor, Reference
from searchspace.latency.storage import TABLE_FORMAT, Observation, table_key
from searchspace.latency.table import LatencyTable, PartProtocol, level_scale, sample_archs
from searchspace.model import stage_resolutions
from searchspace.space import SPACES, ChoiceSpace, StageChoices, register_space

SPEC = InputSpec(height=32, width=32)


class FakeMeasure:
    """``measure(modules, specs)``: a deterministic 'latency' per module (from its parameter count and input)."""

    def __init__(self):
        self.calls = 0
        self.parts = 0

    def __call__(self, modules, specs):
        self.calls += 1
        self.parts += len(modules)
        return [fake_ms(m, s) for m, s in zip(modules, specs)]


def fake_ms(module, spec):
    params = sum(p.numel() for p in module.parameters())
    return 0.01 + (params % 1009) / 1000 + spec.height * spec.width / 1e4


class FakeModels:
    """``measure_models(archs)``: a whole model's 'latency' made from what the table knows of it by a known formula
    (``coefficients . features``, as a form of the predictor), so the fit has an exact answer. Counts its calls."""

    def __init__(self, form="per_part", coefficients=(1.3, 0.05)):
        self.truth = Calibration(form, tuple(coefficients))
        self.table = None  # set by open_table: the features come from the table being calibrated
        self.calls = 0
        self.archs = []

    def ms(self, arch):
        return self.truth.apply(self.table.features(arch))

    def __call__(self, archs):
        self.calls += 1
        self.archs += list(archs)
        return [self.ms(a) for a in archs]


def tiny_archs(n=6, seed=0):
    space = searchspace.get_space("tiny")
    rng = random.Random(seed)

    class Trial:
        def suggest_categorical(self, name, choices):
            return rng.choice(list(choices))

    return [space.define(Trial()) for _ in range(n)]


def distinct_tiny(n, seed=0):
    return sample_archs(searchspace.get_space("tiny"), n, seed=seed)


def open_table(tmp_path, measure=None, spec=SPEC, models=None, **kwargs):
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=tmp_path, measure=measure or FakeMeasure(),
                              measure_models=models, **kwargs)
    if models is not None:
        models.table = table
    return table


# --------------------------------------------------------------------------------------------------------- keys


def test_every_part_of_the_key_gives_its_own_file(tmp_path, monkeypatch):
    base = open_table(tmp_path).path
    others = {
        "input size": open_table(tmp_path, spec=InputSpec(height=32, width=48)).path,
        "batch": open_table(tmp_path, spec=InputSpec(batch=2, height=32, width=32)).path,
        "dtype": open_table(tmp_path, spec=InputSpec(height=32, width=32, dtype="bfloat16")).path,
        "channels": open_table(tmp_path, spec=InputSpec(channels=1, height=32, width=32)).path,
        "threads": LatencyTable.open("cpu", SPEC, threads=2, cache_dir=tmp_path).path,
    }
    monkeypatch.setattr(storage, "device_name", lambda device: "Some Other CPU")
    others["device"] = open_table(tmp_path).path
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "9.9.0")
    others["torch version"] = open_table(tmp_path).path
    for what, path in others.items():
        assert path != base, what
    assert len(set(others.values())) == len(others)


def test_key_is_a_dataclass_of_the_context_not_a_hand_built_string():
    key = table_key("cpu", SPEC, threads=1)
    assert (key.device, key.threads, key.batch, key.height, key.width, key.dtype) == ("cpu", 1, 1, 32, 32, "float32")
    assert key.torch_version == torch.__version__.split("+")[0]
    assert dataclasses.replace(key, batch=2).filename() != key.filename()
    assert table_key("cpu", SPEC, threads=None).threads == torch.get_num_threads()
    assert key.input_spec == SPEC


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_a_key_needs_a_positive_thread_count(threads):
    with pytest.raises(MeasurementError, match="threads"):
        table_key("cpu", SPEC, threads=threads)


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERNAS_CACHE_DIR", str(tmp_path / "mine"))
    assert LatencyTable.open("cpu", SPEC, threads=1).path.is_relative_to(tmp_path / "mine")
    monkeypatch.delenv("MIXERNAS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert LatencyTable.open("cpu", SPEC, threads=1).path.is_relative_to(tmp_path / "xdg" / "mixernas")


def test_a_file_with_another_key_inside_is_not_trusted(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(2), progress=False)
    data = json.loads(table.path.read_text())
    data["key"]["torch_version"] = "0.1"
    table.path.write_text(json.dumps(data))
    assert len(open_table(tmp_path)) == 0


def test_a_file_of_an_older_format_is_ignored_quietly(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(1), progress=False)
    data = json.loads(table.path.read_text())
    assert data["format"] == TABLE_FORMAT
    data["format"] = TABLE_FORMAT - 1
    table.path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_table(tmp_path)) == 0


def test_a_damaged_file_warns_and_reads_as_empty(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(1), progress=False)
    table.path.write_text('{"format": 1, "key": ')
    with pytest.warns(UserWarning, match="damaged"):
        assert len(open_table(tmp_path)) == 0


def test_a_damaged_observation_warns_and_the_file_reads_as_empty(tmp_path):
    table = open_table(tmp_path)
    arch = distinct_tiny(1)[0]
    table.observe(arch, 2.0)
    data = json.loads(table.path.read_text())
    data["observations"][0]["arch"]["stages"][0]["mixer"] = 7
    table.path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="damaged"):
        again = open_table(tmp_path)
    assert len(again) == 0 and again.observations == [] and again.calibration.models == 0


# ------------------------------------------------------------------------------------------ reuse and rebuild


def test_a_second_open_reuses_the_entries_without_measuring(tmp_path):
    archs = tiny_archs()
    first = FakeMeasure()
    table = open_table(tmp_path, first)
    measured = table.ensure(archs, progress=False)
    assert measured == len(table) > 0 and first.calls > 0

    second = FakeMeasure()
    table = open_table(tmp_path, second)
    assert table.ensure(archs, progress=False) == 0
    predictions = [table.predict(a) for a in archs]
    assert second.calls == 0
    assert all(p.complete for p in predictions)


def test_predict_measures_missing_parts_on_demand_and_stores_them(tmp_path):
    arch = tiny_archs(1)[0]
    measure = FakeMeasure()
    table = open_table(tmp_path, measure)
    table.predict(arch)
    assert measure.calls == 1  # all missing parts of one architecture in one interleaved batch
    assert open_table(tmp_path, FakeMeasure()).predict(arch, measure_missing=False).complete


def test_a_measure_function_returning_the_wrong_count_is_an_error(tmp_path):
    table = open_table(tmp_path, measure=lambda modules, specs: [1.0])
    with pytest.raises(MeasurementError, match="returned 1 times"):
        table.predict(tiny_archs(1)[0])


class ShiftingMeasure(FakeMeasure):
    """The machine runs ``factor`` times slower from the second batch on (a level shift between batches); the
    modules of each call are recorded."""

    def __init__(self, factor):
        super().__init__()
        self.factor, self.batches = factor, []

    def __call__(self, modules, specs):
        self.batches.append(list(modules))
        times = super().__call__(modules, specs)
        return times if self.calls == 1 else [t * self.factor for t in times]


def test_later_batches_are_brought_to_the_first_batchs_level_by_the_yardsticks(tmp_path):
    archs = distinct_tiny(12, seed=2)
    measure = ShiftingMeasure(1.2)
    table = open_table(tmp_path, measure, protocol=PartProtocol(batch=4, yardsticks=3))
    table.ensure(archs, progress=False)
    assert measure.calls > 2
    # every batch after the first re-timed 3 stored parts beside its own 4 (or fewer, the last one)
    assert len(measure.batches[0]) == 4 and all(4 <= len(b) <= 7 for b in measure.batches[1:])
    assert table.level_scales[0] == 1.0 and table.level_scales[1:] == pytest.approx([1 / 1.2] * (measure.calls - 1))
    # so the whole table sits at the level of the first batch: what the machine gave before it slowed down
    unshifted = FakeMeasure()
    for part, ms in table.entries.items():
        assert ms == pytest.approx(unshifted([part.build()], [part.input_spec(1, "float32")])[0])


def test_without_yardsticks_a_level_shift_stays_in_the_table(tmp_path):
    measure = ShiftingMeasure(1.2)
    table = open_table(tmp_path, measure, protocol=PartProtocol(batch=4, yardsticks=0))
    table.ensure(distinct_tiny(12, seed=2), progress=False)
    assert all(len(b) <= 4 for b in measure.batches) and set(table.level_scales) == {1.0}
    unshifted = FakeMeasure()
    shifted = [ms / unshifted([p.build()], [p.input_spec(1, "float32")])[0] for p, ms in table.entries.items()]
    assert min(shifted) == pytest.approx(1.0) and max(shifted) == pytest.approx(1.2)


def test_yardsticks_are_spread_over_the_stored_times_and_never_in_the_batch(tmp_path):
    table = open_table(tmp_path, protocol=PartProtocol(yardsticks=4))
    table.ensure(distinct_tiny(6, seed=4), progress=False)
    stored = sorted(table.entries.items(), key=lambda item: item[1])
    batch = [p for p, _ in stored[:3]]
    sticks = table._yardsticks(batch)
    assert len(sticks) == 4 == len(set(sticks)) and not set(sticks) & set(batch)
    times = [table.get(p) for p in sticks]
    assert times == sorted(times) and times[0] < times[-1]  # from the fast end to the slow end, not one cluster
    assert open_table(tmp_path / "empty", protocol=PartProtocol(yardsticks=4))._yardsticks(batch) == []


def test_the_level_is_the_median_ratio_so_one_disturbed_yardstick_does_not_move_it():
    assert level_scale([1.0, 2.0, 4.0], [1.1, 2.2, 4.4]) == pytest.approx(1 / 1.1)
    assert level_scale([1.0, 2.0, 4.0, 3.0, 5.0], [1.1, 2.2, 4.4, 3.3, 50.0]) == pytest.approx(1 / 1.1)
    assert level_scale([], []) == 1.0 and level_scale([1.0], [0.0]) == 1.0


def test_rebuild_forgets_entries_observations_and_calibration(tmp_path):
    archs = distinct_tiny(3)
    table = open_table(tmp_path)
    table.ensure(archs, progress=False)
    table.calibrate(archs, measured_ms=[1.0, 2.0, 3.0], progress=False)
    kept = open_table(tmp_path)
    assert kept.calibration.models == 3 and len(kept.observations) == 3

    measure = FakeMeasure()
    rebuilt = open_table(tmp_path, measure, rebuild=True)
    assert len(rebuilt) == 0 and rebuilt.calibration.models == 0 and rebuilt.observations == []
    assert rebuilt.ensure(archs, progress=False) == len(rebuilt) > 0 and measure.calls > 0
    assert open_table(tmp_path).observations == []  # forgotten on disk too


def test_reset_calibration_forgets_the_observations_but_keeps_the_entries(tmp_path):
    archs = distinct_tiny(4)
    table = open_table(tmp_path)
    table.calibrate(archs, measured_ms=[1.0, 2.0, 3.0, 4.0], progress=False)
    entries = table.entries
    table.reset_calibration()
    again = open_table(tmp_path)
    assert again.observations == [] and again.calibration == Calibration() and again.entries == entries


def _writer(cache_dir, seed, barrier):
    table = LatencyTable.open("cpu", SPEC, threads=1, cache_dir=cache_dir, measure=FakeMeasure(),
                              protocol=PartProtocol(batch=1))  # one save per part: many chances to race
    barrier.wait()
    table.ensure(tiny_archs(4, seed), progress=False)
    for i, arch in enumerate(distinct_tiny(3, seed=seed)):  # each save refits on both processes' observations
        table.observe(arch, 1.0 + seed + i / 10)


def test_two_processes_filling_one_table_keep_each_others_entries_and_observations(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(tmp_path, seed, barrier)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = open_table(tmp_path)
    wanted = {u.part for seed in (1, 2) for a in tiny_archs(4, seed) for u in table.parts(a)}
    assert wanted <= set(table.entries)
    observed = {(o.arch, o.ms) for o in table.observations}
    assert observed == {(a, 1.0 + seed + i / 10) for seed in (1, 2) for i, a in enumerate(distinct_tiny(3, seed))}
    assert table.calibration.models == len(table.observations) == 6  # the last writer fitted on all of them


# ---------------------------------------------------------------------------------------------- the prediction


def test_prediction_is_the_documented_sum_of_parts(tmp_path):
    arch = searchspace.preset("EfficientMod-xxs")  # cycled mixer arguments, extra attention runs, fused blocks
    table = open_table(tmp_path)
    pred = table.predict(arch)
    uses = table.parts(arch)
    assert [u for u, _ in pred.parts] == list(uses)
    assert pred.sum_ms == pytest.approx(math.fsum(table.get(u.part) for u in uses))
    assert pred.total_ms == pred.sum_ms  # identity calibration
    assert pred.calibration == Calibration() and "uncalibrated" in str(pred)
    assert math.fsum(pred.breakdown.values()) == pytest.approx(pred.sum_ms)
    assert list(pred.breakdown) == ["stem", "s1", "s2", "s3", "s4", "head"]
    assert len(uses) == 1 + sum(arch.depths) + (len(arch.stages) - 1) + 1
    assert pred.features.parts == len(uses) and pred.features.sum_ms == pred.sum_ms

    calibration = table.calibrate([arch], measured_ms=[2 * pred.sum_ms], progress=False)
    assert calibration.form == "scale" and calibration.coefficients == pytest.approx((2.0,))
    assert calibration.models == 1 and calibration.holdout is None  # one model: nothing to hold out
    again = open_table(tmp_path).predict(arch)
    assert again.total_ms == pytest.approx(2 * pred.sum_ms) and again.sum_ms == pytest.approx(pred.sum_ms)
    assert table.predict(arch, calibrated=False).total_ms == pytest.approx(pred.sum_ms)


def test_the_weights_feature_is_the_models_own_parameter_count(tmp_path):
    table = open_table(tmp_path)
    half = open_table(tmp_path, spec=InputSpec(height=32, width=32, dtype="bfloat16"))
    for name in ("PoolFormerV2-S12", "CAS-ViT-XS", "EfficientMod-xxs"):
        arch = searchspace.preset(name)
        params = sum(p.numel() for p in searchspace.build_model(arch).parameters())
        features = table.features(arch)
        assert features.weight_mb == pytest.approx(params * 4 / 1e6), name
        assert half.features(arch).weight_mb == pytest.approx(params * 2 / 1e6), name
        assert features.parts == len(table.parts(arch))
        assert features.sum_ms == 0.0  # nothing measured: features() never measures


def test_the_small_map_features_are_the_share_of_the_parts_on_maps_of_at_most_2x2(tmp_path):
    table = open_table(tmp_path, spec=InputSpec(height=32, width=32))  # stage maps 8, 4, 2 and 1 pixels wide
    arch = searchspace.preset("PoolFormerV2-S12")
    table.predict(arch)  # measures its parts (deterministic fake latencies)
    features = table.features(arch)
    small = [u.part for u in table.parts(arch) if u.part.height * u.part.width <= 4]
    assert small and {p.height for p in small} == {2, 1}  # stages 3 and 4, the head, the downsampling into 4
    assert features.small_sum_ms == pytest.approx(sum(table.get(p) for p in small))
    assert 0 < features.small_sum_ms < features.sum_ms and 0 < features.small_weight_mb < features.weight_mb


def test_the_lead_feature_is_the_share_of_blocks_that_follow_a_different_part(tmp_path):
    table = open_table(tmp_path, spec=InputSpec(height=32, width=32))
    arch = searchspace.preset("PoolFormerV2-S12")  # depths 2, 2, 6, 2: four stages, each led by its first block
    table.predict(arch)
    uses = table.parts(arch)
    firsts = [u for u in uses if u.label.endswith(".b0")]
    assert len(firsts) == 4
    features = table.features(arch)
    assert features.lead_sum_ms == pytest.approx(sum(table.get(u.part) for u in firsts))
    # a stage whose blocks are all alike has one leading block; a stage of two runs of different mixers has two
    mixed = arch.replace_stage(2, depth=3, extra=(Blocks(mixer="attention", depth=3),))
    table.predict(mixed)
    leads = [u for prev, u in zip(table.parts(mixed), table.parts(mixed)[1:])
             if u.part.kind == "block" and u.part != prev.part]
    assert [u.label for u in leads] == ["s1.b0", "s2.b0", "s3.b0", "s3.b3", "s4.b0"]
    assert table.features(mixed).lead_sum_ms == pytest.approx(sum(table.get(u.part) for u in leads))


def test_each_part_entry_is_the_measurement_of_that_part_built_alone(tmp_path):
    arch = searchspace.preset("CAS-ViT-XS")
    table = open_table(tmp_path)
    table.predict(arch)
    for use in table.parts(arch):
        assert table.get(use.part) == fake_ms(use.part.build(), use.part.input_spec(1, "float32"))


def test_missing_parts_are_reported_and_the_total_is_a_lower_bound(tmp_path):
    a, b = searchspace.preset("PoolFormerV2-S12"), searchspace.preset("IdentityFormer-S12")
    table = open_table(tmp_path)
    full = table.predict(a)
    partial = table.predict(b, measure_missing=False)
    assert not partial.complete and len(partial.missing) > 0
    assert all(p not in table for p in partial.missing)
    assert partial.total_ms <= table.predict(b).total_ms
    assert full.complete
    assert "parts missing" in str(partial)


# ---------------------------------------------------------------------------------------- the predictor's forms


def synthetic_features(n, seed=0):
    """``n`` models whose sum of parts, part count, weights, small-map and leading-block shares vary independently."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total, weights = rng.uniform(0.5, 20.0), rng.uniform(0.1, 30.0)
        out.append(Features(total, rng.randint(8, 40), weights, total * rng.uniform(0.05, 0.6),
                            weights * rng.uniform(0.1, 0.9), total * rng.uniform(0.2, 0.7)))
    return out


TRUE_COEFFICIENTS = {
    "scale": (1.2,),
    "offset": (1.1, 0.4),
    "per_part": (1.2, 0.05),
    "weights": (1.05, 0.03),
    "per_part+weights": (1.1, 0.04, 0.02),
    "full": (1.1, 0.04, 0.02, 0.5),
    "small_maps": (1.0, 0.3, 0.04, 0.02),
    "small_map_weights": (1.1, 0.04, 0.01, 0.05),
    "lead_blocks": (0.94, 0.14, 0.04, 0.02),
}


def test_the_forms_are_the_documented_features():
    assert list(FORMS) == list(TRUE_COEFFICIENTS)  # simplest first
    f = Features(2.0, 10, 1.5)
    assert f.vector("scale") == [2.0]
    assert f.vector("offset") == [2.0, 1.0]
    assert f.vector("per_part") == [2.0, 10.0]
    assert f.vector("weights") == [2.0, 1.5]
    assert f.vector("per_part+weights") == [2.0, 10.0, 1.5]
    assert f.vector("full") == [2.0, 10.0, 1.5, 1.0]
    g = Features(2.0, 10, 1.5, 0.5, 0.25)  # of which 0.5 ms and 0.25 MB on maps of at most 2x2 pixels
    assert g.vector("small_maps") == [2.0, 0.5, 10.0, 1.5]
    assert g.vector("small_map_weights") == [2.0, 10.0, 1.5, 0.25]
    h = Features(2.0, 10, 1.5, lead_sum_ms=0.8)  # of which 0.8 ms in blocks that follow a different part
    assert h.vector("lead_blocks") == [2.0, 0.8, 10.0, 1.5]
    assert Calibration("full", (1.1, 0.04, 0.02, 0.5)).apply(f) == pytest.approx(2.2 + 0.4 + 0.03 + 0.5)


@pytest.mark.parametrize("form", list(FORMS))
def test_fit_recovers_the_coefficients_of_data_made_by_each_form(form):
    features = synthetic_features(16)
    measured = [Calibration(form, TRUE_COEFFICIENTS[form]).apply(f) for f in features]
    c = fit_calibration(features, measured)
    # the simpler forms miss held out; the richer ones that contain its features predict exactly what it does
    assert c.form == form and c.coefficients == pytest.approx(TRUE_COEFFICIENTS[form], rel=1e-6)
    assert [c.apply(f) for f in features] == pytest.approx(measured, rel=1e-9)
    assert c.models == 16 and c.fit_mape == pytest.approx(0.0, abs=1e-9)
    assert c.holdout.models == 16 and c.holdout.mape == pytest.approx(0.0, abs=1e-9)
    assert c.holdout.within10 == 1.0 and c.holdout.tau == pytest.approx(1.0)
    forced = fit_calibration(features, measured, form=form)
    assert forced.form == form and forced.coefficients == pytest.approx(TRUE_COEFFICIENTS[form], rel=1e-6)
    for simpler in list(FORMS)[:list(FORMS).index(form)]:  # and each simpler one predicts worse held out
        if set(FORMS[simpler]) < set(FORMS[form]):
            worse = fit_calibration(features, measured, form=simpler)
            assert worse.holdout.mape > c.holdout.mape + TIE and simpler not in c.forms, simpler


def fitted_form(calibration, form):
    """The calibration itself if it is ``form``, else its member of that form."""
    return calibration if calibration.form == form else calibration.members[calibration.forms.index(form)]


NOISE = [0.01, -0.012, 0.008, -0.01, 0.011, -0.009, 0.007, -0.011]  # +-1% measurement noise, fixed


def test_proportional_data_keeps_the_plain_scale():
    features = synthetic_features(8, seed=1)
    exact = fit_calibration(features, [1.2 * f.sum_ms for f in features])  # every form fits
    assert "scale" in exact.forms and exact.scale == pytest.approx(1.2)
    assert all(m.coefficients[1:] == pytest.approx((0.0,) * (len(m.coefficients) - 1), abs=1e-9)
               for m in exact.members)  # the richer forms give their extra features nothing
    noisy = [1.2 * f.sum_ms * (1 + n) for f, n in zip(features, NOISE)]
    c = fit_calibration(features, noisy)  # the other forms only fit the noise
    assert "scale" in c.forms and c.scale == pytest.approx(1.2, abs=0.02)
    held = {form: fit_calibration(features, noisy, form=form).holdout.mape
            for form in FORMS if min_models(form) <= len(features)}
    assert set(c.forms) == {form for form, e in held.items() if e <= NEAR_BEST * min(held.values()) + TIE}
    # a mean of predictions is never further from a measurement than the furthest of them
    assert c.holdout.mape <= max(held[form] for form in c.forms) + 1e-12


def test_the_forms_near_the_best_held_out_are_averaged():
    features = synthetic_features(16, seed=3)
    truth = Calibration("per_part+weights", TRUE_COEFFICIENTS["per_part+weights"])
    rng = random.Random(4)
    measured = [truth.apply(f) * (1 + rng.uniform(-0.03, 0.03)) for f in features]  # +-3% noise
    c = fit_calibration(features, measured)
    held = {form: fit_calibration(features, measured, form=form).holdout for form in FORMS}
    best = min(h.mape for h in held.values())
    assert c.form == MEAN and set(c.forms) == {f for f, h in held.items() if h.mape <= NEAR_BEST * best + TIE}
    assert "scale" not in c.forms  # 20-40% off held out: not near the best
    for f in features[:3]:
        assert c.apply(f) == pytest.approx(sum(m.apply(f) for m in c.members) / len(c.members))
    # its held-out predictions are the mean of the members' own, each fitted without the model it predicts
    assert c.holdout == accuracy(holdout_predictions(features, measured, c.forms), measured)
    assert "the mean of" in str(c) and "held out" in str(c)
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_an_offset_is_kept_only_where_it_predicts_better_held_out():
    features = [Features(s, 9, 2.0) for s in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)]  # constant parts and weights
    measured = [(1.05 * f.sum_ms + 0.5) * (1 + n) for f, n in zip(features, NOISE)]
    c = fit_calibration(features, measured)
    assert "offset" in c.forms and "scale" not in c.forms  # per_part and weights are the same fit here
    offset = fitted_form(c, "offset")
    assert offset.coefficients[0] == pytest.approx(1.05, abs=0.03)
    assert offset.coefficients[1] == pytest.approx(0.5, abs=0.1)
    forced_scale = fit_calibration(features, measured, form="scale")
    assert c.holdout.mape < forced_scale.holdout.mape and c.fit_mape < forced_scale.fit_mape
    assert "held out" in str(c) and "offset" in str(c)
    assert "'offset'" in str(fit_calibration(features, measured, form="offset"))


def test_the_fit_minimises_relative_error():
    # a 2 ms model weighs as much as a 40 ms one: 10% over on one, 10% under on the other
    c = fit_calibration([Features(2.0, 5, 1.0), Features(40.0, 5, 1.0)], [2.0 / 1.1, 40.0 / 0.9])
    assert c.scale == pytest.approx(2 / 2.02)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_four_models_fall_back_to_the_scale_without_a_held_out_figure(n):
    features = synthetic_features(n)
    measured = [Calibration("per_part", (1.2, 0.05)).apply(f) for f in features]
    c = fit_calibration(features, measured)
    assert c.form == "scale" and c.models == n and c.holdout is None
    assert "held out" not in str(c)
    if n == 1:
        assert c.apply(features[0]) == pytest.approx(measured[0])


@pytest.mark.parametrize("n", [4, 5, 6, 7, 15, 16])
def test_a_form_is_tried_only_on_enough_models_to_judge_it_held_out(n):
    features = synthetic_features(n, seed=2)
    measured = [Calibration("full", TRUE_COEFFICIENTS["full"]).apply(f) for f in features]
    c = fit_calibration(features, measured)
    assert all(min_models(f) <= n for f in c.forms)
    assert min_models("per_part") == 5 and min_models("per_part+weights") == 6 and min_models("full") == 16
    assert ("full" in c.forms) == (n >= 16) and c.holdout.models == n


def test_a_form_asked_for_by_name_is_fitted_even_on_few_models():
    features = synthetic_features(2)
    measured = [Calibration("per_part", (1.2, 0.05)).apply(f) for f in features]
    c = fit_calibration(features, measured, form="per_part")
    assert c.form == "per_part" and c.coefficients == pytest.approx((1.2, 0.05)) and c.holdout is None


@pytest.mark.parametrize("features, measured, says", [
    ([Features(1.0, 5, 1.0)], [1.0, 2.0], "one measurement per model"),
    ([], [], "one measurement per model"),
    ([Features(1.0, 5, 1.0)], [0.0], "positive"),
    ([Features(1.0, 5, 1.0)], [-1.0], "positive"),
    ([Features(1.0, 5, 1.0)], [math.nan], "positive"),
    ([Features(1.0, 5, 1.0)], [math.inf], "positive"),
    ([Features(0.0, 5, 1.0)], [1.0], "positive"),
    ([Features(-1.0, 5, 1.0)], [1.0], "positive"),
])
def test_calibration_data_that_cannot_be_fitted_is_refused(features, measured, says):
    with pytest.raises(CalibrationError, match=says) as info:
        fit_calibration(features, measured)
    assert isinstance(info.value, MixerNASError)


def test_an_unknown_form_is_refused():
    with pytest.raises(CalibrationError, match="quadratic"):
        fit_calibration(synthetic_features(5), [1.0] * 5, form="quadratic")
    with pytest.raises(CalibrationError, match="form"):
        Calibration.from_dict({"form": "quadratic", "coefficients": [1.0], "models": 1})
    with pytest.raises(CalibrationError, match="form"):  # a known form with the wrong number of coefficients
        Calibration.from_dict({"form": "offset", "coefficients": [1.0], "models": 1})
    with pytest.raises(CalibrationError, match="mean"):  # an average of nothing
        Calibration.from_dict({"form": "mean", "coefficients": [], "models": 1})


def test_a_calibration_round_trips_through_json():
    features = synthetic_features(8)
    c = fit_calibration(features, [Calibration("weights", (1.05, 0.03)).apply(f) for f in features])
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Calibration.from_dict(Calibration().to_dict()) == Calibration()


def test_holdout_predictions_are_each_model_predicted_by_a_fit_on_the_others():
    features = [Features(s, 5, 1.0) for s in (1.0, 2.0, 4.0)]
    measured = [1.0, 2.0, 8.0]
    held = holdout_predictions(features, measured, "scale")
    for i in range(3):
        others = fit_calibration(features[:i] + features[i + 1:], measured[:i] + measured[i + 1:], form="scale")
        assert held[i] == pytest.approx(others.apply(features[i]))
    assert held[2] < 8.0  # the slow one was not seen: under-predicted


# ------------------------------------------------------------------------------------------ the accuracy figures


def test_kendall_tau_on_hand_examples():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 pairs in order, 1 swapped
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))  # tau-b: the tie counts neither way
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1, 1], [2, 2]))  # every pair tied: no order to compare


def test_accuracy_on_a_hand_example():
    a = accuracy([1.0, 2.16, 2.4, 4.0], [1.0, 2.0, 3.0, 5.0])  # 0%, +8%, -20%, -20%
    assert a.mape == pytest.approx(0.12) and a.within10 == 0.5 and a.tau == 1.0 and a.models == 4
    assert str(a) == "mean error 12.0%, 50% within +-10%, Kendall tau 1.000 over 4 models"
    assert accuracy([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]).tau == -1.0
    single = accuracy([1.05], [1.0])
    assert single.mape == pytest.approx(0.05) and single.within10 == 1.0 and math.isnan(single.tau)
    for predicted, measured in (([1.0], [1.0, 2.0]), ([], [])):
        with pytest.raises(CalibrationError, match="as many"):
            accuracy(predicted, measured)


def test_a_prediction_exactly_10_percent_off_counts_as_within_10_percent():
    # the docstring of accuracy() says [1.0, 2.2, 2.9] against [1.0, 2.0, 3.0] is '100% within +-10%'; in floating
    # point (2.2 - 2.0) / 2.0 is 0.10000000000000009, so the boundary case is counted out
    assert accuracy([2.2], [2.0]).within10 == 1.0
    assert str(accuracy([1.0, 2.2, 2.9], [1.0, 2.0, 3.0])).startswith("mean error 4.4%, 100% within +-10%")


# --------------------------------------------------------------------------------- the table's calibration


def test_observe_refits_and_persists_the_observation(tmp_path):
    models = FakeModels("per_part", (1.3, 0.05))
    measure = FakeMeasure()
    table = open_table(tmp_path, measure, models=models)
    archs = distinct_tiny(6, seed=4)
    first = table.observe(archs[0], 1.0)  # measures the parts it lacks first
    assert measure.calls == 1 and first.models == 1
    assert first.form == "scale" and first.scale == pytest.approx(1.0 / table.features(archs[0]).sum_ms)
    measured = [1.0]
    for i, arch in enumerate(archs[1:], start=2):
        table.predict(arch)
        measured.append(models.ms(arch))
        calibration = table.observe(arch, measured[-1])
        assert calibration.models == i and table.calibration == calibration
    again = open_table(tmp_path)
    assert again.observations == table.observations == [Observation(a, ms) for a, ms in zip(archs, measured)]
    assert again.calibration == table.calibration and again.calibration.models == 6
    stored = json.loads(table.path.read_text())
    assert len(stored["observations"]) == 6 and stored["calibration"]["models"] == 6


def test_observe_refuses_a_latency_that_is_not_a_positive_number(tmp_path):
    table = open_table(tmp_path)
    arch = distinct_tiny(1)[0]
    for bad in (0.0, -1.0, math.nan, math.inf, "3ms", None):
        with pytest.raises(MeasurementError, match="positive"):
            table.observe(arch, bad)
    assert table.observations == [] and open_table(tmp_path).observations == []


def test_observations_of_two_tables_on_one_file_are_merged_on_save(tmp_path):
    a, b = open_table(tmp_path), open_table(tmp_path)  # both open before either writes
    x1, x2, x3 = distinct_tiny(3, seed=5)
    a.observe(x1, 1.0)
    b.observe(x2, 2.0)  # b's save reads a's observation and fits on both
    assert b.calibration.models == 2 and {o.arch for o in b.observations} == {x1, x2}
    a.observe(x3, 3.0)
    assert {(o.arch, o.ms) for o in a.observations} == {(x1, 1.0), (x2, 2.0), (x3, 3.0)}
    again = open_table(tmp_path)
    assert {(o.arch, o.ms) for o in again.observations} == {(x1, 1.0), (x2, 2.0), (x3, 3.0)}
    assert again.calibration.models == 3
    b.refresh()
    assert len(b.observations) == 3 and b.calibration == again.calibration


def test_unsaved_observations_survive_a_refresh(tmp_path):
    table = open_table(tmp_path)
    x1, x2 = distinct_tiny(2, seed=6)
    table.predict(x1)
    table.observe(x1, 1.0, save=False)
    open_table(tmp_path).observe(x2, 2.0)  # another process writes meanwhile
    table.refresh()
    assert {o.arch for o in table.observations} == {x1, x2}
    table.save()
    assert {o.arch for o in open_table(tmp_path).observations} == {x1, x2}


def test_only_the_newest_observations_are_kept_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MAX_OBSERVATIONS", 3)
    table = open_table(tmp_path)
    archs = distinct_tiny(5, seed=7)
    for i, arch in enumerate(archs):
        table.observe(arch, 1.0 + i)
    assert [o.arch for o in open_table(tmp_path).observations] == archs[-3:]


def test_the_table_fits_a_cost_per_part_from_whole_models_and_predicts_with_it(tmp_path):
    table = open_table(tmp_path)
    archs = [Arch(stages=tuple(Stage(mixer="pooling", depth=d, width=w, mlp_ratio=1.0) for d, w in zip(depths, widths)))
             for depths, widths in (((1, 1, 1, 1), (16, 16, 32, 32)), ((2, 1, 3, 1), (16, 32, 32, 64)),
                                    ((1, 2, 1, 2), (32, 32, 64, 64)), ((3, 3, 1, 1), (16, 16, 16, 16)),
                                    ((1, 1, 4, 1), (16, 32, 32, 32)), ((2, 2, 2, 2), (32, 32, 32, 64)))]
    preds = [table.predict(a) for a in archs]
    counts = [len(table.parts(a)) for a in archs]
    measured = [1.1 * p.sum_ms + 0.05 * k for p, k in zip(preds, counts)]
    calibration = table.calibrate(archs, measured_ms=measured, progress=False)
    assert calibration.form == "per_part" and calibration.coefficients == pytest.approx((1.1, 0.05))
    again = open_table(tmp_path)  # stored with the table
    assert again.calibration == calibration
    for a, p, k in zip(archs, preds, counts):
        pred = again.predict(a)
        assert pred.total_ms == pytest.approx(1.1 * p.sum_ms + 0.05 * k) and pred.sum_ms == pytest.approx(p.sum_ms)
        assert pred.total_ms != pred.sum_ms and pred.total_ms == calibration.apply(pred.features)
        assert again.predict(a, calibrated=False).total_ms == pytest.approx(p.sum_ms)
    assert again.holdout().mape == pytest.approx(0.0, abs=1e-9) and again.holdout().models == 6


def test_calibrate_measures_the_whole_models_once_when_not_given(tmp_path):
    models = FakeModels("offset", (1.2, 0.3))
    table = open_table(tmp_path, models=models)
    archs = distinct_tiny(5, seed=8)
    calibration = table.calibrate(archs, progress=False)
    assert models.calls == 1 and models.archs == archs  # interleaved: one call for all of them
    assert fitted_form(calibration, "offset").coefficients == pytest.approx((1.2, 0.3))
    assert calibration.holdout.mape <= TIE  # any other form averaged in predicts these models as well
    with pytest.raises(MeasurementError, match="at least one"):
        table.calibrate([], progress=False)
    with pytest.raises(MeasurementError, match="2 latencies for 1"):
        table.calibrate(archs[:1], measured_ms=[1.0, 2.0], progress=False)


def test_the_whole_models_measured_for_calibration_are_the_ones_the_parts_describe(tmp_path, monkeypatch):
    # the parts have this table's input channels and classifier size; the whole models it measures must too
    given = []

    def fake_measure_many(models, input_spec, **kwargs):
        given.extend(as_model(m, input_spec) for m in models)  # what measure_many itself would time
        return [SimpleNamespace(value_ms=1.0) for _ in models]

    monkeypatch.setattr(table_mod, "measure_many", fake_measure_many)
    spec = InputSpec(channels=1, height=32, width=32)
    table = LatencyTable.open("cpu", spec, threads=1, cache_dir=tmp_path, measure=FakeMeasure(), num_classes=10,
                              protocol=PartProtocol(reference=False))
    archs = distinct_tiny(2, seed=13)
    table.calibrate(archs, progress=False)
    assert len(given) == 2
    for arch, model in zip(archs, given):
        params = sum(p.numel() for p in model.parameters())
        assert params * 4 / 1e6 == pytest.approx(table.features(arch).weight_mb)
        with torch.inference_mode():
            assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_holdout_needs_three_observations(tmp_path):
    table = open_table(tmp_path)
    archs = distinct_tiny(3, seed=9)
    assert table.holdout() is None
    table.observe(archs[0], 1.0)
    table.observe(archs[1], 2.0)
    assert table.holdout() is None
    table.observe(archs[2], 3.0)
    assert table.holdout().models == 3


def test_ensure_calibrated_measures_whole_models_once_per_device_and_input(tmp_path):
    models = FakeModels()
    table = open_table(tmp_path, models=models)
    calibration = table.ensure_calibrated("tiny", models=6, progress=False)
    assert models.calls == 1 and len(models.archs) == len(set(models.archs)) == 6
    assert calibration.models == 6 and {o.arch for o in table.observations} == set(models.archs)
    assert calibration.form == "per_part" and calibration.coefficients == pytest.approx((1.3, 0.05))
    assert calibration.holdout.mape == pytest.approx(0.0, abs=1e-9)

    second, measure = FakeModels(), FakeMeasure()
    again = open_table(tmp_path, measure, models=second)
    assert again.ensure_calibrated("tiny", models=6, progress=False) == calibration
    assert second.calls == 0 and measure.calls == 0  # a second open: nothing measured at all


def test_ensure_calibrated_measures_only_the_models_it_lacks(tmp_path, capsys):
    models = FakeModels()
    table = open_table(tmp_path, models=models)
    seen = distinct_tiny(2, seed=10)
    for arch in seen:
        table.observe(arch, 1.0)
    table.ensure_calibrated(searchspace.get_space("tiny"), models=5)  # a space object works as well as a name
    assert models.calls == 1 and len(models.archs) == 3 and not set(models.archs) & set(seen)
    assert len(table.observations) == 5 and table.calibration.models == 5
    assert "measuring 3 whole models" in capsys.readouterr().err


def test_check_scores_the_predictions_made_before_the_measurements_then_refines(tmp_path):
    models = FakeModels("scale", (1.0,))
    table = open_table(tmp_path, models=models)
    fitted = table.ensure_calibrated("tiny", models=5, progress=False)
    assert fitted.form == "scale" and fitted.coefficients == pytest.approx((1.0,))
    fresh = sample_archs(searchspace.get_space("tiny"), 3, seed=11, exclude={o.arch for o in table.observations})
    before = [table.predict(a).total_ms for a in fresh]
    models.truth = Calibration("scale", (2.0,))  # the machine turns out twice as slow on these
    result = table.check(fresh)
    assert models.calls == 2 and models.archs[-3:] == fresh
    assert isinstance(result, Accuracy) and result.models == 3
    assert result.mape == pytest.approx(0.5) and result.within10 == 0.0 and result.tau == pytest.approx(1.0)
    assert table.calibration.models == 8 and len(open_table(tmp_path).observations) == 8  # observed afterwards
    assert all(table.predict(a).total_ms > b * 1.1 for a, b in zip(fresh, before))  # refined towards them


def test_check_with_given_measurements_does_not_measure(tmp_path):
    models = FakeModels("scale", (1.0,))
    table = open_table(tmp_path, models=models)
    table.ensure_calibrated("tiny", models=4, progress=False)
    fresh = sample_archs(searchspace.get_space("tiny"), 2, seed=12, exclude={o.arch for o in table.observations})
    predicted = [table.predict(a).total_ms for a in fresh]
    result = table.check(fresh, measured_ms=[p * 1.05 for p in predicted])
    assert models.calls == 1 and result.mape == pytest.approx(0.05 / 1.05) and result.within10 == 1.0


# ------------------------------------------------------------------------------------------------------- parts


def _arch(stem, downsample, widths=(16, 16, 32, 32)):
    return Arch(stages=tuple(Stage(mixer="pooling", depth=1, width=w, mlp_ratio=1.0) for w in widths),
                stem=stem, downsample=downsample)


@pytest.mark.parametrize("stem", STEMS.names())
@pytest.mark.parametrize("downsample", DOWNSAMPLES.names())
def test_stage_resolutions_follow_the_real_layers_at_odd_sizes(stem, downsample):
    arch = _arch(stem, downsample)
    model = searchspace.build_model(arch).eval()
    for h, w in [(65, 63), (33, 47), (38, 29), (224, 224), (17, 9)]:
        with torch.inference_mode():
            outs = model.forward_intermediates(torch.zeros(1, 3, h, w), intermediates_only=True)
        assert stage_resolutions(arch, h, w) == tuple(tuple(o.shape[-2:]) for o in outs), (h, w)


@pytest.mark.parametrize("name", STEMS.names())
def test_every_built_in_stem_and_downsampling_layer_says_its_output_size(name):
    stem = STEMS.get(name)(3, 16, Arch(stages=(Stage(mixer="identity", depth=1, width=16),)))
    assert hasattr(stem, "output_size")
    for downsample in DOWNSAMPLES.names():
        layer = DOWNSAMPLES.get(downsample)(16, 32, Arch(stages=(Stage(mixer="identity", depth=1, width=16),)))
        assert hasattr(layer, "output_size"), downsample


def test_a_user_registered_stem_is_probed_for_its_resolution():
    STEMS.add("test_conv5_s4", lambda cin, cout, arch: torch.nn.Conv2d(cin, cout, 5, 4, 1))
    try:
        arch = _arch("test_conv5_s4", "norm_conv3")
        with torch.inference_mode():
            outs = searchspace.build_model(arch).eval().forward_intermediates(torch.zeros(1, 3, 41, 30),
                                                                             intermediates_only=True)
        assert stage_resolutions(arch, 41, 30) == tuple(tuple(o.shape[-2:]) for o in outs)
    finally:
        STEMS.remove("test_conv5_s4")


class _NeedsData(torch.nn.Module):
    """A stem whose forward reads a value, which the meta device cannot give."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 4, 4)

    def forward(self, x):
        return self.conv(x) * float(x.abs().max() > 0)


def test_a_stem_that_cannot_tell_its_size_is_refused_with_the_fix():
    STEMS.add("test_needs_data", lambda cin, cout, arch: _NeedsData(cin, cout))
    try:
        with pytest.raises(MixerNASError, match="stem layer 'test_needs_data'.*output_size"):
            searchspace.build_model(_arch("test_needs_data", "norm_conv3"))
    finally:
        STEMS.remove("test_needs_data")


class _SaysItsSize(torch.nn.Module):
    """A stem that states its output size and must not be run to find it."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 4, 4)

    def forward(self, x):
        raise AssertionError("the table ran the layer instead of asking its output_size")

    def output_size(self, height, width):
        return height // 4, width // 4


def test_a_layer_that_states_its_output_size_is_asked_not_run():
    STEMS.add("test_says_its_size", lambda cin, cout, arch: _SaysItsSize(cin, cout))
    try:
        assert stage_resolutions(_arch("test_says_its_size", "norm_conv3"), 64, 48)[0] == (16, 12)
    finally:
        STEMS.remove("test_says_its_size")


def test_a_stem_registered_again_under_its_name_gives_its_own_geometry():
    # the parts cache the layer built for a name: replacing the factory (overwrite=True) must not keep the old one's
    STEMS.add("test_replaced_stem", lambda cin, cout, arch: torch.nn.Conv2d(cin, cout, 4, 4))
    try:
        arch = _arch("test_replaced_stem", "norm_conv3")
        assert stage_resolutions(arch, 64, 64)[0] == (16, 16)
        STEMS.add("test_replaced_stem", lambda cin, cout, arch: torch.nn.Conv2d(cin, cout, 8, 8), overwrite=True)
        with torch.inference_mode():
            outs = searchspace.build_model(arch).eval().forward_intermediates(torch.zeros(1, 3, 64, 64),
                                                                             intermediates_only=True)
        assert stage_resolutions(arch, 64, 64) == tuple(tuple(o.shape[-2:]) for o in outs) == (
            (8, 8), (4, 4), (2, 2), (1, 1))
    finally:
        STEMS.remove("test_replaced_stem")


def test_an_input_too_small_for_the_architecture_is_refused():
    with pytest.raises(MixerNASError, match="too small"):
        stage_resolutions(_arch("conv7_s4", "norm_conv3"), 2, 2)


def test_parts_carry_the_input_each_one_sees():
    arch = searchspace.preset("PoolFormerV2-S12")
    uses = arch_parts(arch, 65, 63)
    assert isinstance(uses[0].part, StemPart) and (uses[0].part.height, uses[0].part.width) == (65, 63)
    downs = [u.part for u in uses if isinstance(u.part, DownsamplePart)]
    assert [(d.in_dim, d.out_dim, d.height, d.width) for d in downs] == [(64, 128, 16, 16), (128, 320, 8, 8),
                                                                         (320, 512, 4, 4)]
    head = uses[-1].part
    assert isinstance(head, HeadPart) and (head.dim, head.num_classes, head.height, head.width) == (512, 1000, 2, 2)
    blocks = [u.part for u in uses if isinstance(u.part, BlockPart)]
    assert [b.res_scale for b in blocks] == [False] * 4 + [True] * 8
    assert len(set(blocks)) == 4  # blocks of a stage share one entry
    assert [u.label for u in uses][:4] == ["stem", "s1.b0", "s1.b1", "s2.down"] and uses[-1].label == "head"


def _channels_last(x):
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels,size", [(1, 32), (3, 64)])
def test_parts_meet_the_memory_format_the_model_hands_them(tmp_path, channels, size):
    # with one input channel the stem answers channels-last, and LayerNorms over channels leave it so; a part timed
    # on a contiguous input instead took another kernel path (GroupNorm blocks: twice the time)
    table = open_table(tmp_path, spec=InputSpec(channels=channels, height=size, width=size), num_classes=10)
    archs = [searchspace.resolve_arch(p) for p in ("PoolFormerV2-S12", "EfficientMod-xxs", "CAS-ViT-XS",
                                                   "ConViT-style-S12")]
    archs += sample_archs(searchspace.get_space("default"), 4, seed=3)
    layouts = set()
    for arch in archs:
        model = searchspace.build_model(arch, num_classes=10, in_chans=channels).eval()
        seen = []
        for name, module in model.named_modules():
            if (name.count(".") == 3 and ".blocks." in name) or (name.endswith("downsample")
                                                                 and name != "stages.0.downsample"):
                module.register_forward_pre_hook(lambda m, inp, seen=seen: seen.append(_channels_last(inp[0])))
        with torch.inference_mode():
            seen.append(_channels_last(model.forward_features(torch.randn(1, channels, size, size))))  # the head's
        parts = [u.part for u in table.parts(arch)]
        assert [p.channels_last for p in parts[1:]] == seen, arch
        layouts.update(seen)
        for part in parts[1:]:
            spec = part.input_spec(1, "float32")
            assert spec.channels_last == part.channels_last and _channels_last(spec.example()) == part.channels_last
    assert layouts == {True, False} if channels == 3 else True in layouts


def test_parts_are_stored_apart_by_their_input_layout_and_timed_on_it(tmp_path):
    measure = FakeMeasure()
    seen = []
    table = open_table(tmp_path, measure=lambda modules, specs: seen.extend(specs) or measure(modules, specs),
                       spec=InputSpec(channels=1, height=32, width=32))
    table.predict(searchspace.preset("PoolFormerV2-S12"))
    stem = [s for s in seen if s.channels == 1]
    assert len(stem) == 1 and not stem[0].channels_last  # the stem gets the user's input as it comes
    assert any(s.channels_last for s in seen)
    block = next(u.part for u in table.parts(searchspace.preset("PoolFormerV2-S12")) if isinstance(u.part, BlockPart))
    assert block.channels_last and block in table
    assert dataclasses.replace(block, channels_last=False) not in table


def test_a_runtime_that_plans_its_own_layouts_times_parts_on_contiguous_inputs(tmp_path):
    table = open_table(tmp_path, spec=InputSpec(channels=1, height=32, width=32), runtime="compile")
    assert not any(u.part.channels_last for u in table.parts(searchspace.preset("PoolFormerV2-S12"))[1:])


def test_asking_a_part_s_layout_leaves_the_random_draws_alone():
    part = arch_parts(searchspace.preset("PoolFormerV2-S12"), 32, 32, 1)[1].part
    output_channels_last.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    follow_layouts(arch_parts(searchspace.preset("PoolFormerV2-S12"), 32, 32, 1))
    assert output_channels_last.cache_info().currsize > 0 and torch.equal(torch.rand(3), expected)
    assert output_channels_last(part) in (True, False)


def test_parts_round_trip_through_json():
    for use in arch_parts(searchspace.preset("EfficientMod-xs"), 64, 64):
        data = json.loads(json.dumps(part_to_dict(use.part)))
        assert part_from_dict(data) == use.part
        assert hash(part_from_dict(data)) == hash(use.part)


def test_space_parts_cover_every_architecture_of_the_space_without_enumerating_them():
    space = searchspace.get_space("tiny")
    parts = space_parts(space, 64, 64)
    archs = tiny_archs(60, seed=3)
    used = {u.part for a in archs for u in arch_parts(a, 64, 64)}
    assert used <= set(parts)
    # one entry per distinct block choice, not per architecture
    stage_blocks = sum(len(sc.mixers) * len(sc.widths) * len(sc.mlp_ratios) for sc in space.stages)
    assert sum(isinstance(p, BlockPart) for p in parts) == stage_blocks


def test_space_parts_cover_activations_and_mixer_arguments():
    space = ChoiceSpace([
        StageChoices(("pooling", "sepconv"), depths=(1,), widths=(8, 16), mlp_ratios=(1.0, 2.0)),
        StageChoices(("pooling",), depths=(1, 2), widths=(16,), mlp_ratios=(1.0,),
                     mixer_args={"pooling": {"pool_size": (3, 5)}}),
    ], choices={"act": ("starrelu", "gelu")}, name="test-acts-args")
    parts = space_parts(space, 32, 32, 1, 10)
    archs = sample_archs(space, 100, seed=0)
    assert len(archs) == 2 * 8 * 4  # every architecture of the space: acts x stage 1 x stage 2
    assert {u.part for a in archs for u in arch_parts(a, 32, 32, 1, 10)} == set(parts)  # exactly theirs
    assert {p.act for p in parts if isinstance(p, BlockPart)} == {"starrelu", "gelu"}
    assert {p.mixer_args.get("pool_size") for p in parts if isinstance(p, BlockPart) and p.dim == 16
            and p.height == 4} == {3, 5}


def test_build_for_space_fills_the_table_once(tmp_path):
    measure = FakeMeasure()
    table = open_table(tmp_path, measure)
    n = table.build_for_space("tiny", progress=False)
    assert n == len(table) > 0 and measure.calls > 0
    assert table.build_for_space("tiny", progress=False) == 0
    for arch in tiny_archs(10, seed=5):
        assert table.predict(arch, measure_missing=False).complete


def test_a_define_by_run_space_asks_for_architectures_instead():
    space = searchspace.space.FunctionSpace(lambda trial: searchspace.preset("PoolFormerV2-S12"), name="fn")
    with pytest.raises(searchspace.MixerNASError, match="ensure"):
        space_parts(space, 64, 64)


def test_sample_archs_draws_distinct_architectures_reproducibly():
    space = searchspace.get_space("tiny")
    first = sample_archs(space, 8, seed=3)
    assert first == sample_archs(space, 8, seed=3) and len(set(first)) == 8
    assert not set(sample_archs(space, 8, seed=3, exclude=first)) & set(first)
    one = searchspace.space.FunctionSpace(lambda trial: searchspace.preset("PoolFormerV2-S12"), name="one")
    assert sample_archs(one, 5) == [searchspace.preset("PoolFormerV2-S12")]  # fewer when the space runs out


@pytest.mark.parametrize("protocol, threads, parts_corrected, models_corrected", [
    (PartProtocol(), 1, False, True),  # the default: thread clock, parts as measured, whole models corrected
    (PartProtocol(), 2, True, True),  # the wall clock: parts corrected too
    (PartProtocol(clock="wall"), 1, True, True),
    (PartProtocol(reference=True), 1, True, True),
    (PartProtocol(reference=False), 1, False, False),
])
def test_parts_on_the_thread_clock_are_taken_as_measured_and_whole_models_are_corrected(
        tmp_path, monkeypatch, protocol, threads, parts_corrected, models_corrected):
    given = []  # (what was measured, the reference it was timed beside)
    probes = []

    def fake_measure_many(models, input_spec, **kwargs):
        ref = kwargs["reference"]
        given.append(("models" if isinstance(input_spec, InputSpec) else "parts", ref))
        # what measure_many answers: the corrected value, the clock's own median and the machine's drift
        return [SimpleNamespace(value_ms=2.0 if ref else 1.0, raw_ms=1.0, drift=1.0 if ref else None)
                for _ in models]

    monkeypatch.setattr(table_mod, "measure_many", fake_measure_many)
    monkeypatch.setattr(table_mod, "reference_for", lambda *a, **k: ANCHOR)
    monkeypatch.setattr(table_mod, "reference_drift", lambda ref, **k: probes.append(ref) or 1.0)
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=threads,
                              cache_dir=tmp_path, num_classes=10, protocol=protocol)
    arch = distinct_tiny(1, seed=13)[0]
    table.calibrate([arch], progress=False)
    kinds = {kind: ref for kind, ref in given}
    assert set(kinds) == {"parts", "models"}
    # parts are timed among the reference's runs only where they are divided by it ...
    assert kinds["parts"] is (ANCHOR if parts_corrected else False)
    assert {table.get(u.part) for u in table.parts(arch)} == {2.0 if parts_corrected else 1.0}
    # ... elsewhere the reference, timed alone after the batch, only tells whether the machine was busy
    assert probes == ([] if parts_corrected or protocol.reference is False else [ANCHOR])
    assert kinds["models"] is (ANCHOR if models_corrected else False)
    assert table.observations[0].ms == (2.0 if models_corrected else 1.0)


def scripted_part_batches(monkeypatch, drifts):
    """measure_many for parts answering batch after batch with the parts' time equal to the machine's drift from
    ``drifts`` (a busy machine makes them slower), and the reference probe after each batch reading that drift;
    counts the attempts."""
    attempts = []

    def fake_measure_many(models, input_spec, **kwargs):
        if isinstance(input_spec, InputSpec):  # whole models: not what this is about
            return [SimpleNamespace(value_ms=1.0, raw_ms=1.0, drift=1.0) for _ in models]
        assert kwargs["reference"] is False  # the reference is not run among the parts' rounds
        attempts.append(drifts[len(attempts)])
        return [SimpleNamespace(value_ms=attempts[-1], raw_ms=attempts[-1], drift=None) for _ in models]

    monkeypatch.setattr(table_mod, "measure_many", fake_measure_many)
    monkeypatch.setattr(table_mod, "reference_for", lambda *a, **k: ANCHOR)
    monkeypatch.setattr(table_mod, "reference_drift", lambda ref, **k: attempts[-1])
    return attempts


@pytest.mark.parametrize("drifts, kept, tries", [
    ([1.1], 1.1, 1),  # calm: measured once
    ([2.0, 1.6, 1.05], 1.05, 3),  # busy, busy, calm: measured again until calm
    ([2.0, 1.9, 1.7, 1.8, 1.0], 1.7, 4),  # busy every time: the calmest of 1 + busy_retries attempts is kept
])
def test_a_batch_of_parts_measured_while_the_machine_is_busy_is_measured_again(tmp_path, monkeypatch, drifts,
                                                                                 kept, tries):
    attempts = scripted_part_batches(monkeypatch, drifts)
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=1, cache_dir=tmp_path,
                              num_classes=10, protocol=PartProtocol(batch=1000))
    arch = distinct_tiny(1, seed=13)[0]
    table.ensure([arch], progress=False)
    assert len(attempts) == tries
    assert {table.get(u.part) for u in table.parts(arch)} == {kept}


def test_busy_means_slower_than_the_calm_batches_so_far(tmp_path, monkeypatch):
    # the anchor was measured while the machine was busy: calm batches read 0.5, and 0.9 is busy beside them
    attempts = scripted_part_batches(monkeypatch, [0.5, 0.9, 0.55] + [0.5] * 50)
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=1, cache_dir=tmp_path,
                              num_classes=10, protocol=PartProtocol(batch=2))
    arch = distinct_tiny(1, seed=13)[0]
    batches = math.ceil(len({u.part for u in table.parts(arch)}) / 2)
    table.ensure([arch], progress=False)
    assert batches >= 2 and len(attempts) == batches + 1  # the second batch was measured twice
    assert sorted(table.entries.values())[-1] == 0.55  # and its calmer attempt kept


def test_one_fast_probe_does_not_make_every_later_batch_busy(tmp_path, monkeypatch):
    # the machine reads 1.0 after every batch but once 0.6 (a burst of the host): the calm level is the batches'
    # lower quartile, not that one reading, so no later batch is measured again (by the lowest reading, each of
    # them would have been measured four times)
    attempts = scripted_part_batches(monkeypatch, [1.0, 1.0, 1.0, 0.6] + [1.0] * 50)
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=1, cache_dir=tmp_path,
                              num_classes=10, protocol=PartProtocol(batch=1, yardsticks=0))
    arch = distinct_tiny(1, seed=13)[0]
    parts = len({u.part for u in table.parts(arch)})
    table.ensure([arch], progress=False)
    assert parts >= 5 and len(attempts) == parts


def test_real_measurement_of_a_few_parts_is_positive(tmp_path):
    table = LatencyTable.open("cpu", InputSpec(height=16, width=16), threads=1, cache_dir=tmp_path,
                              protocol=PartProtocol(warmup=1, rounds=1, target_round_ms=1.0, reference=False))
    pred = table.predict(tiny_archs(1)[0])
    assert pred.total_ms > 0 and all(ms > 0 for _, ms in pred.parts)


# ---------------------------------------------------------------------------------------------- the protocol


def test_the_part_clock_is_thread_cpu_time_only_where_that_is_exact():
    cpu = torch.device("cpu")
    plain = PartProtocol(flush_caches=False)
    assert plain.timer(cpu, 1) is measure_mod.thread_cpu_timer
    assert plain.timer(cpu, 2) is measure_mod.cpu_timer
    assert PartProtocol(flush_caches=False, clock="wall").timer(cpu, 1) is measure_mod.cpu_timer
    with pytest.raises(searchspace.MixerNASError, match="clock"):
        PartProtocol(clock="sundial").timer(cpu, 1)


def test_flushing_timer_runs_the_function_once_and_returns_its_time():
    timer = PartProtocol(flush_caches=True, clock="wall").timer(torch.device("cpu"), 1)
    runs = []
    ms = timer(lambda: runs.append(1))
    assert runs == [1] and 0 <= ms < 1000
    assert table_mod.l2_cache_bytes() > 0


def test_the_file_records_the_protocol(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(1), progress=False)
    assert json.loads(table.path.read_text())["protocol"]["clock"] == "auto"


# ------------------------------------------------------------------------------------------ the build command

ANCHOR = Reference(key={"test": True}, anchor=Anchor(2.0, 1.98, 2.02, 12, 0.0), in_chans=1)
MINI = "test-latency-mini"


@pytest.fixture
def mini_space():
    """A small space registered by name (16 architectures, 5 or 6 parts each), removed afterwards."""
    register_space(MINI, ChoiceSpace([
        StageChoices(("pooling", "sepconv"), depths=(1,), widths=(8, 16), mlp_ratios=(1.0,)),
        StageChoices(("pooling", "modulation"), depths=(1, 2), widths=(16,), mlp_ratios=(1.0,)),
    ], description="two stages, for the build command's tests"))
    yield MINI
    SPACES.remove(MINI)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every measurement the build command makes, replaced: parts by ``fake_ms``, whole models by
    ``1.3 x sum + 0.2 ms x parts`` of the table's own features, the reference by a fixed anchor. Counts them."""
    calls = {"parts": 0, "models": 0}

    def parts(self, modules, specs):
        calls["parts"] += len(modules)
        return [fake_ms(m, s) for m, s in zip(modules, specs)]

    def whole(self, archs):
        calls["models"] += len(archs)
        return [Calibration("per_part", (1.3, 0.2)).apply(self.features(a)) for a in archs]

    monkeypatch.setattr(LatencyTable, "_measure_parts", parts)
    monkeypatch.setattr(LatencyTable, "_measure_whole", whole)
    monkeypatch.setattr(LatencyTable, "reference", lambda self: ANCHOR)
    monkeypatch.setattr(LatencyTable, "_yardsticks", lambda self, batch: [])  # so "parts" counts new parts only
    return calls


def build_argv(tmp_path, *extra):
    return ["build", "--space", MINI, "--input-size", "32", "--channels", "1", "--models", "6", "--check", "4",
            "--cache-dir", str(tmp_path), *extra]


def test_build_measures_fits_and_prints_what_the_table_is_worth(tmp_path, mini_space, fake_clock, capsys):
    assert latency_cli.main(build_argv(tmp_path)) == 0
    captured = capsys.readouterr()
    lines = {line.split()[0]: line for line in captured.out.splitlines()}
    assert set(lines) >= {"table", "device", "reference", "parts", "fitted", "held", "refined"}
    assert "1 thread(s)" in lines["device"] and "1x1x32x32 float32" in lines["device"]
    assert "anchor 2.000 ms +-1.0%" in lines["reference"]
    parts = len(space_parts(searchspace.get_space(MINI), 32, 32, 1, 10))
    assert f"{parts} in the table ({parts} measured now)" in lines["parts"] and fake_clock["parts"] == parts
    assert "form 'per_part': " in lines["fitted"] and "fitted on 6 models" in lines["fitted"]
    assert "held out: mean error 0.0%" in lines["fitted"]
    assert lines["held"].startswith("held out    mean error 0.0%, 100% within +-10%, Kendall tau 1.000 over 4 "
                                    "models")
    assert "fitted on 10 models" in lines["refined"]  # the checked models refine the table
    assert fake_clock["models"] == 10
    assert "checking the table on 4 architectures" in captured.err and "Traceback" not in captured.err
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=1, cache_dir=tmp_path,
                              num_classes=10)
    assert str(table.path) in lines["table"] and len(table.observations) == 10


def test_build_json_and_a_second_run_that_measures_only_the_check(tmp_path, mini_space, fake_clock, capsys):
    assert latency_cli.main(build_argv(tmp_path)) == 0
    capsys.readouterr()
    assert latency_cli.main(build_argv(tmp_path, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"table", "parts", "measured_now", "seconds", "calibration", "check", "refined",
                         "device_name", "anchor_ms"}
    assert data["measured_now"] == 0 and data["parts"] == fake_clock["parts"]  # every part was already there
    assert fake_clock["models"] == 10 + 4  # calibrated already: only the 4 new check models are measured
    assert data["calibration"]["models"] == 10 and data["calibration"]["form"] == "per_part"
    assert data["calibration"]["coefficients"] == pytest.approx([1.3, 0.2])
    assert data["check"]["models"] == 4 and data["check"]["within10"] == 1.0
    assert data["check"]["mape"] == pytest.approx(0.0, abs=1e-9) and data["check"]["tau"] == pytest.approx(1.0)
    assert data["refined"]["models"] == 14 and data["anchor_ms"] == 2.0
    assert data["device_name"] == table_key("cpu", SPEC, 1).device_name


def test_build_with_check_0_skips_the_check_and_rebuild_measures_again(tmp_path, mini_space, fake_clock, capsys):
    assert latency_cli.main(build_argv(tmp_path, "--check", "0")) == 0
    out = capsys.readouterr().out
    assert "held out    " not in out and fake_clock["models"] == 6
    parts = fake_clock["parts"]
    assert latency_cli.main(build_argv(tmp_path, "--check", "0", "--rebuild", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["check"] is None and data["measured_now"] == parts and fake_clock["parts"] == 2 * parts
    assert data["calibration"]["models"] == 6 and fake_clock["models"] == 12  # observations forgotten too


def mini_define(trial):
    """A define-by-run space for the build command: ``--space tests.test_latency_table:mini_define``."""
    return Arch(stages=(Stage(mixer=trial.suggest_categorical("s1", ["pooling", "sepconv"]), depth=1, width=8),
                        Stage(mixer="pooling", depth=trial.suggest_categorical("d2", [1, 2, 3]), width=16),
                        Stage(mixer=trial.suggest_categorical("s3", ["pooling", "modulation"]), depth=1,
                              width=trial.suggest_categorical("w3", [16, 24]))))


def test_build_on_a_define_by_run_space_measures_the_parts_of_the_models_it_draws(tmp_path, fake_clock, capsys):
    argv = ["build", "--space", f"{__name__}:mini_define", "--input-size", "24", "--models", "5", "--check", "3",
            "--cache-dir", str(tmp_path), "--json"]
    assert latency_cli.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parts"] == fake_clock["parts"] > 0 and fake_clock["models"] == 8
    assert data["calibration"]["models"] == 5 and data["check"]["models"] == 3 and data["refined"]["models"] == 8
    assert data["check"]["within10"] == 1.0


def test_build_help_explains_the_steps(capsys):
    assert latency_cli.main(["build", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--models" in out and "--check" in out and "--space" in out
    assert "leave-one-out" in out and "Kendall tau" in out


@pytest.mark.parametrize("extra, says", [
    (["--models", "2"], "--models 2 is too few"),
    (["--models", "-1"], "--models must be >= 0"),
    (["--check", "-1"], "--check must be >= 0"),
    (["--models", "many"], "--models"),
    (["--space", "no-such-space"], "no-such-space"),
    (["--space", "nomodule:space"], "cannot import"),
    (["--input-size", "big"], "--input-size"),
    (["--input-size", "0"], "--input-size"),
    (["--input-size", "22x"], "--input-size"),
    (["--batch-size", "0"], "batch"),
    (["--device", "tpu"], "device"),
    (["--threads", "-2"], "threads"),
    (["--threads", "0"], "threads"),
    (["--num-classes", "-1"], "--num-classes"),
    (["--frobnicate"], "frobnicate"),
])
def test_build_bad_input_is_one_line_and_status_2(extra, says, tmp_path, mini_space, fake_clock, capsys):
    assert latency_cli.main(build_argv(tmp_path, *extra)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], captured.err
    assert "Traceback" not in captured.err and not captured.out
    assert fake_clock == {"parts": 0, "models": 0}
    assert not list(tmp_path.glob("latency/*.json"))  # nothing measured, nothing left behind


def test_the_table_builds_a_model_with_its_own_classes_and_channels(tmp_path):
    from searchspace.latency import InputSpec
    from searchspace.latency.table import LatencyTable

    table = LatencyTable.open("cpu", InputSpec(channels=1, height=32, width=32), threads=1, cache_dir=tmp_path,
                              num_classes=10)
    model = table.model(searchspace.preset("PoolFormerV2-S12")).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)  # not measure_many's 1000-class build of an Arch
