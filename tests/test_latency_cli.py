"""``python -m searchspace.latency``: a preset measured for real (tiny input, few runs) prints its latency with
its 95% interval, context, counts and the table's prediction; the measuring flags reach the measurement; bad input
is one line on stderr and exit status 2, no traceback."""

import json
import math
import re

import pytest
import torch

from searchspace.latency import __main__ as cli_module
from searchspace.latency.__main__ import main, parse_size
from searchspace.latency.measure import (
    REFERENCE_OPTION,
    InputSpec,
    LatencyContext,
    LatencyResult,
    reference_key,
)
from searchspace.latency.reference import Anchor, write_anchor

FAST = ["--input-size", "32", "--threads", "1", "--rounds", "2", "--max-extra-rounds", "2", "--warmup", "1",
        "--round-ms", "5"]
# the smallest useful input: 32x32 digits, one channel, no table
SMALL = ["IdentityFormer-S12", "--input-size", "32", "--channels", "1", "--threads", "1", "--rounds", "3",
         "--max-extra-rounds", "2", "--warmup", "1", "--round-ms", "5", "--no-table"]
MEASURED = re.compile(r"measured    \S+ \S+ \+-\d+\.\d% \(95% interval \S+ \S+ to \S+ \S+(, wider than the "
                      r"\+-\d+\.\d% asked for)?; \d+ rounds of \d+ runs(?P<ref>, reference-corrected \(machine at "
                      r"\d+\.\d\dx its anchor\)(?P<busy>; \d+ busy rounds? left out)?)?\)")


def line(out, label):
    [found] = [x for x in out.splitlines() if x.startswith(label)]
    return found


def test_a_preset_prints_latency_context_counts_and_prediction(tmp_path, capsys):
    assert main(["IdentityFormer-S12", *FAST, "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("measured", "context", "params", "MACs", "predicted", "table"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "1 thread" in out and "1x3x32x32" in out and "torch" in out
    assert "FlopCounterMode" in out
    assert "vs measured" in out
    match = MEASURED.fullmatch(line(out, "measured"))  # the value, its interval and how it was measured
    assert match and match["ref"], line(out, "measured")  # corrected by the reference on the CPU, by default
    assert REFERENCE_OPTION in line(out, "context")
    assert list(tmp_path.glob("latency/latency-cpu-eager-32x32-*.json"))


def test_json_output_and_an_arch_file(tmp_path, capsys):
    import searchspace

    path = tmp_path / "arch.json"
    searchspace.preset("PoolFormerV2-S12").save(path)
    assert main([str(path), *FAST, "--input-size", "33x31", "--cache-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = data["measured"]
    assert measured["context"]["input_shape"] == [1, 3, 33, 31]
    assert measured["ci_low_ms"] <= measured["value_ms"] <= measured["ci_high_ms"]
    assert measured["precision"] >= 0 and isinstance(measured["converged"], bool) and measured["tolerance"] == 0.02
    assert measured["anchor_ms"] > 0 and measured["drift"] > 0 and measured["raw_ms"] > 0
    assert REFERENCE_OPTION in measured["context"]["options"]
    assert data["params"] > 0 and data["macs"] > 0 and data["counter"] == "torch FlopCounterMode"
    assert data["predicted_ms"] > 0 and set(data["breakdown_ms"]) == {"stem", "s1", "s2", "s3", "s4", "head"}


def test_the_measurement_is_corrected_by_the_anchor_of_the_table_it_is_compared_with(tmp_path, capsys):
    # The table in --cache-dir holds figures in the unit of its own anchor (the reference workload's latency
    # stored beside it); the measured figure printed beside its prediction must be in the same unit, not
    # corrected by an anchor from another folder (here: the session's $MIXERNAS_CACHE_DIR).
    spec = InputSpec(channels=1, height=32, width=32)
    write_anchor(reference_key(torch.device("cpu"), spec, 1, "thread"), Anchor(1.0, 0.99, 1.01, 40, 0.0), tmp_path)
    assert main(["IdentityFormer-S12", *FAST, "--channels", "1", "--cache-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured"]["anchor_ms"] == 1.0


def test_no_table_skips_the_prediction(tmp_path, capsys):
    assert main(["IdentityFormer-S12", *FAST, "--no-table", "--cache-dir", str(tmp_path)]) == 0
    assert "predicted" not in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_no_reference_reports_plain_round_medians(capsys):
    assert main([*SMALL, "--no-reference"]) == 0
    plain = capsys.readouterr().out
    assert main(SMALL) == 0
    corrected = capsys.readouterr().out
    assert "reference-corrected" not in plain and "reference-corrected" in corrected
    assert not MEASURED.fullmatch(line(plain, "measured"))["ref"]
    assert MEASURED.fullmatch(line(corrected, "measured"))["ref"]
    assert "1x1x32x32" in line(plain, "context") and "1x1x32x32" in line(corrected, "context")
    assert main([*SMALL, "--no-reference", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["measured"]
    assert data["anchor_ms"] is None and data["drift"] is None and data["raw_ms"] == data["value_ms"]


def canned_result(spec):
    ctx = LatencyContext(device="cpu", device_name="Test CPU", threads=1, batch=1, input_shape=spec.shape,
                         layout="nchw", dtype="float32", torch_version="2.0", options=(REFERENCE_OPTION,))
    return LatencyResult(4.2, 0.01, (4.1, 4.2, 4.3), 9, 3, remeasured=True, context=ctx, ci_low_ms=4.1,
                         ci_high_ms=4.3, converged=False, tolerance=0.01, raw_ms=5.0, anchor_ms=3.0, drift=1.2)


@pytest.mark.parametrize("flags, expected", [
    ([], dict(tolerance=0.02, max_extra_rounds=40, reference="auto", rounds=10, warmup=10, target_round_ms=20.0)),
    (["--tolerance", "0.05", "--max-extra-rounds", "7", "--no-reference", "--rounds", "4", "--warmup", "3",
      "--round-ms", "8"],
     dict(tolerance=0.05, max_extra_rounds=7, reference=False, rounds=4, warmup=3, target_round_ms=8.0)),
])
def test_measuring_flags_reach_the_measurement_and_its_line_is_describe(flags, expected, monkeypatch, capsys):
    seen = {}

    def measure(model, spec, **kwargs):
        seen.update(kwargs)
        seen["result"] = canned_result(spec)
        return seen["result"]

    monkeypatch.setattr(cli_module, "measure_latency", measure)
    assert main(["IdentityFormer-S12", "--input-size", "32", "--channels", "1", "--threads", "1", "--no-table",
                 *flags]) == 0
    out = capsys.readouterr().out
    assert {k: seen[k] for k in expected} == expected
    assert f"measured    {seen['result'].describe()}" in out.splitlines()
    assert "95% interval 4.10 ms to 4.30 ms, wider than the +-1.0% asked for" in out


def test_help_explains_units_and_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "milliseconds" in out and "default: 224" in out and "default: cpu" in out and "MACs" in out
    assert "95% interval" in out and "--tolerance" in out and "--max-extra-rounds" in out
    assert "--no-reference" in out and "reference" in out


@pytest.mark.parametrize("argv, says", [
    (["PoolFormerV2-S13"], "PoolFormerV2-S12"),  # close matches listed
    (["missing.json"], "cannot read"),
    (["{bad}.json"], "cannot read"),
    (["PoolFormerV2-S12", "--input-size", "22x"], "--input-size"),
    (["PoolFormerV2-S12", "--input-size", "0"], "--input-size"),
    (["PoolFormerV2-S12", "--input-size", "big"], "--input-size"),
    (["PoolFormerV2-S12", "--batch-size", "two"], "--batch-size"),
    (["PoolFormerV2-S12", "--batch-size", "0"], "batch"),
    (["PoolFormerV2-S12", "--threads", "0"], "threads"),
    (["PoolFormerV2-S12", "--dtype", "float64"], "dtype"),
    (["PoolFormerV2-S12", "--device", "tpu"], "device"),
    (["PoolFormerV2-S12", "--rounds", "0"], "rounds"),
    (["PoolFormerV2-S12", "--tolerance", "-0.1"], "tolerance must be"),
    (["PoolFormerV2-S12", "--tolerance", "nan"], "tolerance must be"),
    (["PoolFormerV2-S12", "--tolerance", "tight"], "--tolerance"),
    (["PoolFormerV2-S12", "--max-extra-rounds", "-1"], "max_extra_rounds must be"),
    (["PoolFormerV2-S12", "--max-extra-rounds", "1.5"], "--max-extra-rounds"),
    (["PoolFormerV2-S12", "--round-ms", "0"], "target_round_ms"),
    (["PoolFormerV2-S12", "--no-reference=yes"], "--no-reference"),
    (["PoolFormerV2-S12", "--frobnicate"], "frobnicate"),
    ([], "arch"),
])
def test_bad_input_is_one_line_and_status_2(argv, says, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], captured.err
    assert "Traceback" not in captured.err and not captured.out


def test_malformed_json_file(tmp_path, capsys):
    path = tmp_path / "arch.json"
    path.write_text('{"stages": [')
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "malformed" in err
    path.write_text('{"stages": [{"mixer": "pooling", "depth": 1, "widht": 8}]}')
    assert main([str(path)]) == 2
    assert "widht" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("224") == (224, 224)
    assert parse_size("256x192") == (256, 192)
    assert parse_size(" 65 X 63 ") == (65, 63)


def test_thread_clock_needs_one_thread(capsys):
    assert main(["IdentityFormer-S12", "--clock", "thread", "--threads", "2"]) == 2
    assert "--threads 1" in capsys.readouterr().err


def test_thread_clock_is_named_in_the_context(capsys):
    assert main(["IdentityFormer-S12", *FAST, "--clock", "thread", "--no-table"]) == 0
    out = capsys.readouterr().out
    assert "thread CPU time" in line(out, "context")
    assert MEASURED.fullmatch(line(out, "measured"))
    assert not math.isnan(float(line(out, "measured").split()[1]))
