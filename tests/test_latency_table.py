"""The latency lookup table: keys, reuse across opens and processes, rebuild, concurrent writers, the documented
prediction sum, stage resolutions at odd sizes, and the parts of a space. Timing is replaced by a fake measure
function (deterministic, counts its calls), so nothing here depends on the clock."""

import dataclasses
import json
import math
import multiprocessing
import random

import pytest
import torch

import searchspace
from searchspace import Arch, Stage
from searchspace.blocks import DOWNSAMPLES, STEMS
from searchspace.latency import InputSpec
from searchspace.latency import table as table_mod
from searchspace.latency.table import (
    BlockPart,
    Calibration,
    DownsamplePart,
    HeadPart,
    LatencyTable,
    StemPart,
    arch_parts,
    fit_calibration,
    part_from_dict,
    part_to_dict,
    space_parts,
    stage_resolutions,
    table_key,
)

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


def tiny_archs(n=6, seed=0):
    space = searchspace.get_space("tiny")
    rng = random.Random(seed)

    class Trial:
        def suggest_categorical(self, name, choices):
            return rng.choice(list(choices))

    return [space.define(Trial()) for _ in range(n)]


def open_table(tmp_path, measure=None, spec=SPEC, **kwargs):
    return LatencyTable.open("cpu", spec, threads=1, cache_dir=tmp_path, measure=measure or FakeMeasure(), **kwargs)


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
    monkeypatch.setattr(table_mod, "device_name", lambda device: "Some Other CPU")
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


def test_a_damaged_file_warns_and_reads_as_empty(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(1), progress=False)
    table.path.write_text('{"format": 1, "key": ')
    with pytest.warns(UserWarning, match="damaged"):
        assert len(open_table(tmp_path)) == 0


# ------------------------------------------------------------------------------------------ reuse and rebuild


def test_a_second_open_reuses_the_entries_without_measuring(tmp_path):
    archs = tiny_archs()
    first = FakeMeasure()
    measured = open_table(tmp_path, first).ensure(archs, progress=False)
    assert measured == first.parts > 0

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


def test_rebuild_forgets_entries_and_calibration(tmp_path):
    archs = tiny_archs(3)
    table = open_table(tmp_path)
    table.ensure(archs, progress=False)
    table.calibrate(archs, measured_ms=[1.0, 2.0, 3.0], progress=False)
    assert open_table(tmp_path).calibration.models == 3

    measure = FakeMeasure()
    rebuilt = open_table(tmp_path, measure, rebuild=True)
    assert len(rebuilt) == 0 and rebuilt.calibration.models == 0
    assert rebuilt.ensure(archs, progress=False) == measure.parts > 0


def _writer(cache_dir, seed, barrier):
    table = LatencyTable.open("cpu", SPEC, threads=1, cache_dir=cache_dir, measure=FakeMeasure(),
                              protocol=table_mod.PartProtocol(batch=1))  # one save per part: many chances to race
    barrier.wait()
    table.ensure(tiny_archs(4, seed), progress=False)


def test_two_processes_filling_one_table_keep_each_others_entries(tmp_path):
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


# ---------------------------------------------------------------------------------------------- the prediction


def test_prediction_is_the_documented_sum_of_parts(tmp_path):
    arch = searchspace.preset("EfficientMod-xxs")  # cycled mixer arguments, extra attention runs, fused blocks
    table = open_table(tmp_path)
    pred = table.predict(arch)
    uses = table.parts(arch)
    assert [u for u, _ in pred.parts] == list(uses)
    assert pred.sum_ms == pytest.approx(math.fsum(table.get(u.part) for u in uses))
    assert pred.total_ms == pred.sum_ms  # identity calibration
    assert math.fsum(pred.breakdown.values()) == pytest.approx(pred.sum_ms)
    assert list(pred.breakdown) == ["stem", "s1", "s2", "s3", "s4", "head"]
    assert len(uses) == 1 + sum(arch.depths) + (len(arch.stages) - 1) + 1

    calibration = table.calibrate([arch], measured_ms=[2 * pred.sum_ms], progress=False)
    assert calibration.scale == pytest.approx(2.0) and calibration.offset_ms == 0.0
    again = open_table(tmp_path).predict(arch)
    assert again.total_ms == pytest.approx(2 * pred.sum_ms) and again.sum_ms == pytest.approx(pred.sum_ms)
    assert table.predict(arch, calibrated=False).total_ms == pytest.approx(pred.sum_ms)


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


def test_calibration_recovers_scale_and_offset():
    sums = [2.0, 5.0, 11.0, 40.0]
    c = fit_calibration(sums, [1.1 * s + 0.3 for s in sums], form="offset")
    assert c.scale == pytest.approx(1.1) and c.offset_ms == pytest.approx(0.3) and c.fit_mape == pytest.approx(0)
    scale_only = fit_calibration(sums, [1.25 * s for s in sums], form="scale")
    assert scale_only.scale == pytest.approx(1.25) and scale_only.offset_ms == 0.0
    # in relative error, a 2 ms model weighs as much as a 40 ms one: 10% over on one, 10% under on the other
    assert fit_calibration([2.0, 40.0], [2.0 / 1.1, 40.0 / 0.9]).scale == pytest.approx(1.0, abs=0.01)
    single = fit_calibration([4.0], [5.0])
    assert single.apply(4.0) == pytest.approx(5.0) and single.offset_ms == 0.0
    assert Calibration().apply(3.0) == 3.0
    with pytest.raises(searchspace.MixerNASError):
        fit_calibration([1.0, 2.0], [1.0])


NOISE = [0.01, -0.012, 0.008, -0.01, 0.011, -0.009]  # +-1% measurement noise, fixed


def test_calibration_keeps_an_offset_only_where_it_predicts_better_held_out():
    sums = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    # a fixed cost per forward pass (0.5 ms) on top of a proportional gap: the offset form wins held out
    fixed = fit_calibration(sums, [(1.05 * s + 0.5) * (1 + n) for s, n in zip(sums, NOISE)], [9] * 6)
    assert fixed.offset_ms == pytest.approx(0.5, abs=0.1) and fixed.scale == pytest.approx(1.05, abs=0.03)
    forced_scale = fit_calibration(sums, [(1.05 * s + 0.5) * (1 + n) for s, n in zip(sums, NOISE)], form="scale")
    assert fixed.holdout_mape < forced_scale.holdout_mape and fixed.fit_mape < forced_scale.fit_mape
    # a purely proportional gap: the offset would only fit the noise, so the scale alone is kept
    prop = fit_calibration(sums, [1.2 * s * (1 + n) for s, n in zip(sums, NOISE)])
    assert prop.offset_ms == 0.0 and prop.scale == pytest.approx(1.2, abs=0.02)
    assert prop.holdout_mape < fit_calibration(sums, [1.2 * s * (1 + n) for s, n in zip(sums, NOISE)],
                                               form="offset").holdout_mape
    # three models are too few to judge two numbers held out: the scale alone, and no held-out figure
    few = fit_calibration(sums[:3], [1.05 * s + 0.5 for s in sums[:3]])
    assert few.offset_ms == 0.0 and few.holdout_mape is None and few.models == 3
    assert "held out" in str(fixed) and "held out" not in str(few)


def test_calibration_finds_a_cost_per_part():
    # small models pay a fixed cost per part that parts timed alone do not: 20 us each on top of a 3% gap
    sums, parts = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0], [30, 12, 25, 8, 20, 14]
    measured = [(1.03 * s + 0.02 * k) * (1 + e) for s, k, e in zip(sums, parts, NOISE)]
    c = fit_calibration(sums, measured, parts)
    assert c.form == "per_part" and c.per_part_ms == pytest.approx(0.02, abs=0.005) and c.offset_ms == 0.0
    assert c.apply(2.0, 10) == pytest.approx(c.scale * 2.0 + c.per_part_ms * 10)
    assert "us per part" in str(c)
    # without part counts the per-part form is not a candidate
    assert fit_calibration(sums, measured).form != "per_part"
    with pytest.raises(searchspace.MixerNASError, match="part count"):
        fit_calibration(sums, measured, form="per_part")
    with pytest.raises(searchspace.MixerNASError, match="form"):
        fit_calibration(sums, measured, parts, form="quadratic")


def test_table_prediction_applies_the_per_part_calibration(tmp_path):
    table = open_table(tmp_path)
    archs = [Arch(stages=tuple(Stage(mixer="pooling", depth=d, width=w, mlp_ratio=1.0) for d, w in zip(depths, widths)))
             for depths, widths in (((1, 1, 1, 1), (16, 16, 32, 32)), ((2, 1, 3, 1), (16, 32, 32, 64)),
                                    ((1, 2, 1, 2), (32, 32, 64, 64)), ((3, 3, 1, 1), (16, 16, 16, 16)))]
    preds = [table.predict(a) for a in archs]
    counts = [len(table.parts(a)) for a in archs]
    table.calibrate(archs, measured_ms=[1.1 * p.sum_ms + 0.01 * k for p, k in zip(preds, counts)], progress=False,
                    form="per_part")
    again = open_table(tmp_path)  # stored with the table
    assert again.calibration.per_part_ms == pytest.approx(0.01)
    for a, p, k in zip(archs, preds, counts):
        assert again.predict(a).total_ms == pytest.approx(1.1 * p.sum_ms + 0.01 * k)


# ------------------------------------------------------------------------------------------------------- parts


def _arch(stem, downsample, widths=(16, 16, 32, 32)):
    return Arch(stages=tuple(Stage(mixer="pooling", depth=1, width=w, mlp_ratio=1.0) for w in widths),
                stem=stem, downsample=downsample)


@pytest.mark.parametrize("stem", STEMS.names())
@pytest.mark.parametrize("downsample", DOWNSAMPLES.names())
def test_stage_resolutions_follow_the_real_layers_at_odd_sizes(stem, downsample):
    arch = _arch(stem, downsample)
    model = searchspace.build_model(arch).eval()
    for h, w in [(65, 63), (33, 47), (38, 29), (224, 224)]:
        with torch.inference_mode():
            outs = model.forward_intermediates(torch.zeros(1, 3, h, w))
        assert stage_resolutions(arch, h, w) == tuple(tuple(o.shape[-2:]) for o in outs), (h, w)


def test_a_user_registered_stem_is_probed_for_its_resolution():
    STEMS.add("test_conv5_s4", lambda cin, cout, arch: torch.nn.Conv2d(cin, cout, 5, 4, 1))
    try:
        arch = _arch("test_conv5_s4", "norm_conv3")
        with torch.inference_mode():
            outs = searchspace.build_model(arch).eval().forward_intermediates(torch.zeros(1, 3, 41, 30))
        assert stage_resolutions(arch, 41, 30) == tuple(tuple(o.shape[-2:]) for o in outs)
    finally:
        STEMS.remove("test_conv5_s4")


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


def test_build_for_space_fills_the_table_once(tmp_path):
    measure = FakeMeasure()
    table = open_table(tmp_path, measure)
    n = table.build_for_space("tiny", progress=False)
    assert n == len(table) == measure.parts
    assert table.build_for_space("tiny", progress=False) == 0
    for arch in tiny_archs(10, seed=5):
        assert table.predict(arch, measure_missing=False).complete


def test_a_define_by_run_space_asks_for_architectures_instead():
    space = searchspace.space.FunctionSpace(lambda trial: searchspace.preset("PoolFormerV2-S12"), name="fn")
    with pytest.raises(searchspace.MixerNASError, match="ensure"):
        space_parts(space, 64, 64)


def test_real_measurement_of_a_few_parts_is_positive(tmp_path):
    table = LatencyTable.open("cpu", InputSpec(height=16, width=16), threads=1, cache_dir=tmp_path,
                              protocol=table_mod.PartProtocol(warmup=1, rounds=1, target_round_ms=1.0))
    pred = table.predict(tiny_archs(1)[0])
    assert pred.total_ms > 0 and all(ms > 0 for _, ms in pred.parts)


# ---------------------------------------------------------------------------------------------- the protocol


def test_the_part_clock_is_thread_cpu_time_only_where_that_is_exact():
    cpu = torch.device("cpu")
    plain = table_mod.PartProtocol(flush_caches=False)
    assert plain.timer(cpu, 1) is table_mod.thread_cpu_timer
    assert plain.timer(cpu, 2) is table_mod.cpu_timer
    assert table_mod.PartProtocol(flush_caches=False, clock="wall").timer(cpu, 1) is table_mod.cpu_timer
    with pytest.raises(searchspace.MixerNASError, match="clock"):
        table_mod.PartProtocol(clock="sundial").timer(cpu, 1)


def test_flushing_timer_runs_the_function_once_and_returns_its_time():
    timer = table_mod.PartProtocol(flush_caches=True, clock="wall").timer(torch.device("cpu"), 1)
    runs = []
    ms = timer(lambda: runs.append(1))
    assert runs == [1] and 0 <= ms < 1000
    assert table_mod.l2_cache_bytes() > 0


def test_the_file_records_the_protocol(tmp_path):
    table = open_table(tmp_path)
    table.ensure(tiny_archs(1), progress=False)
    assert json.loads(table.path.read_text())["protocol"]["clock"] == "auto"
