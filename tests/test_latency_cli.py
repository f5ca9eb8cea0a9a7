"""``python -m searchspace.latency``: a preset measured for real (tiny input, few runs) prints its latency with
context, counts and the table's prediction; bad input is one line on stderr and exit status 2, no traceback."""

import json

import pytest

from searchspace.latency.__main__ import main, parse_size

FAST = ["--input-size", "32", "--threads", "1", "--rounds", "1", "--warmup", "1", "--round-ms", "5"]


def test_a_preset_prints_latency_context_counts_and_prediction(tmp_path, capsys):
    assert main(["IdentityFormer-S12", *FAST, "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("measured", "context", "params", "MACs", "predicted", "table"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "1 thread" in out and "1x3x32x32" in out and "torch" in out
    assert "FlopCounterMode" in out
    assert "vs measured" in out and "spread" in out
    assert list(tmp_path.glob("latency/latency-cpu-32x32-*.json"))


def test_json_output_and_an_arch_file(tmp_path, capsys):
    import searchspace

    path = tmp_path / "arch.json"
    searchspace.preset("PoolFormerV2-S12").save(path)
    assert main([str(path), *FAST, "--input-size", "33x31", "--cache-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured"]["context"]["input_shape"] == [1, 3, 33, 31]
    assert data["params"] > 0 and data["macs"] > 0 and data["counter"] == "torch FlopCounterMode"
    assert data["predicted_ms"] > 0 and set(data["breakdown_ms"]) == {"stem", "s1", "s2", "s3", "s4", "head"}


def test_no_table_skips_the_prediction(tmp_path, capsys):
    assert main(["IdentityFormer-S12", *FAST, "--no-table", "--cache-dir", str(tmp_path)]) == 0
    assert "predicted" not in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_help_explains_units_and_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "milliseconds" in out and "default: 224" in out and "default: cpu" in out and "MACs" in out


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
    assert "thread CPU time" in capsys.readouterr().out
