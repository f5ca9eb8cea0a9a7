"""search.py end to end, in-process, on the tiny space: results, resume, failures, bad input."""

import csv
import json

import pytest
import torch

import search
import searchspace
from searchspace.latency import InputSpec
from searchspace.latency.table import CALIBRATION_MODELS, LatencyTable
from searchspace.nas import SearchConfig
from searchspace.nas import engine as engine_module

# one training thread keeps the tests quick and steady on a shared 2-core machine
FAST = ["--space", "tiny", "--epochs", "1", "--final-epochs", "1", "--input-size", "16", "--quiet",
        "--timeout", "300", "--train-threads", "1"]


@pytest.fixture(autouse=True)
def shared_latency_cache(tmp_path_factory, monkeypatch):
    # one table cache for the whole session: later tests reuse the blocks earlier ones measured
    cache = tmp_path_factory.getbasetemp() / "latency-cache"
    monkeypatch.setenv("MIXERNAS_CACHE_DIR", str(cache))
    # The whole models a new table is calibrated on when the search opens it (tests/test_latency_table.py checks
    # that step) stand in as their plain sum of parts: 30 s of measurement saved. Candidates are measured for real.
    monkeypatch.setattr(LatencyTable, "_measure_whole",
                        lambda self, archs: [self.predict(a, calibrated=False).sum_ms for a in archs])


def search_table():
    """The table the searches below use: the CPU, one thread, 1x1x16x16 digits."""
    return LatencyTable.open("cpu", InputSpec(channels=1, height=16, width=16), threads=1, num_classes=10)


def read_trials(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_search_writes_a_results_folder_whose_best_fits(tmp_path, capsys):
    out = tmp_path / "run"
    code = search.main(["--latency-budget", "50ms", "--trials", "3", "--out", str(out),
                        "--baselines", "IdentityFormer-S12", *FAST])
    assert code == 0
    for name in ("trials.csv", "best.json", "report.md", "accuracy_vs_latency.png", "history.png", "study.db",
                 "config.json", "baselines.json", "best/arch.json", "best/model.safetensors"):
        assert (out / name).exists(), name
    best = json.loads((out / "best.json").read_text())
    for key in ("arch", "accuracy", "latency_ms", "input_size", "batch_size", "device", "budget_ms", "environment"):
        assert key in best
    assert best["latency_ms"] <= best["budget_ms"] == 50.0
    assert best["input_size"] == 16 and best["batch_size"] == 1
    rows = read_trials(out)
    assert len(rows) == 3
    assert {"state", "accuracy", "predicted_ms", "measured_ms", "params", "macs", "seconds", "arch"} <= set(rows[0])
    # the saved model reloads with its weights and classifies digits
    model = searchspace.load_model(out)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    baselines = json.loads((out / "baselines.json").read_text())
    assert [b["name"] for b in baselines] == ["IdentityFormer-S12"]
    captured = capsys.readouterr()
    assert "best:" in captured.out
    assert "device cpu" in (out / "report.md").read_text()  # what --device auto resolved to
    # the table's figures when the search opens it (calibrated on CALIBRATION_MODELS whole models) and after the
    # trials refined it
    opened = next(line for line in captured.err.splitlines() if line.startswith("latency table prediction"))
    assert "fitted on" in opened and "held out: mean error" in opened and "Kendall tau" in opened
    refined = next(line for line in captured.err.splitlines()
                   if line.startswith("latency table, refined by this search's measurements: "))
    assert "fitted on" in refined and "held out: mean error" in refined
    assert "parts and" in captured.err and "whole models cached" in captured.err
    # every candidate measured (the baseline included) is an observation of the table, and refits it
    table = search_table()
    observed = {(o.arch, o.ms) for o in table.observations}
    measured = [(searchspace.Arch.from_json(r["arch"]), float(r["measured_ms"])) for r in rows if r["measured_ms"]]
    measured += [(searchspace.preset(b["name"]), b["measured_ms"]) for b in baselines if b.get("measured_ms")]
    assert len(measured) >= 2 and measured[-1][0].name == "IdentityFormer-S12"
    for arch, ms in measured:
        assert any(a == arch and o == pytest.approx(ms) for a, o in observed), arch.summary()
    assert table.calibration.models == len(table.observations) >= CALIBRATION_MODELS + len(measured)


def test_rerun_resumes_up_to_the_requested_trials(tmp_path):
    out = tmp_path / "run"
    args = ["--latency-budget", "50ms", "--out", str(out), "--baselines", "none", *FAST]
    assert search.main(["--trials", "2", *args]) == 0
    first = read_trials(out)
    assert search.main(["--trials", "4", *args]) == 0
    second = read_trials(out)
    assert len(first) == 2 and len(second) == 4
    assert [r["arch"] for r in second[:2]] == [r["arch"] for r in first]  # the old trials are kept, not redone


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--baselines", "none", "--trials", "1", *FAST]
    assert search.main(["--latency-budget", "50ms", *args]) == 0
    assert search.main(["--latency-budget", "20ms", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a different search" in err and "budget_ms" in err


def test_resume_after_the_space_changed_is_refused(tmp_path, capsys):
    # A space of the same name whose choices changed (a new MixerNAS version, an edited user space): the old trials
    # are not points of it, and Optuna would fail every new trial whose choices differ from the stored ones.
    out = tmp_path / "run"
    args = ["--latency-budget", "50ms", "--out", str(out), "--baselines", "none", *FAST]
    assert search.main(["--trials", "1", *args]) == 0
    original = searchspace.get_space("tiny")
    changed = searchspace.ChoiceSpace([searchspace.StageChoices(("pooling", "sepconv"), depths=(1,), widths=(48,),
                                                                mlp_ratios=(2.0,))] * 4)
    searchspace.register_space("tiny", changed, overwrite=True)
    try:
        assert search.main(["--trials", "2", *args]) == 2
    finally:
        searchspace.register_space("tiny", original, overwrite=True)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was made with another version of space 'tiny'" in err and "--out NEW_FOLDER" in err
    assert len(read_trials(out)) == 1  # nothing run, nothing lost
    assert search.main(["--trials", "2", *args]) == 0  # the space as it was: the search resumes
    assert len(read_trials(out)) == 2


def test_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    original = engine_module.CandidateRunner.run
    calls = []

    def flaky(self, arch, report=None):
        calls.append(arch)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(self, arch, report)

    monkeypatch.setattr(engine_module.CandidateRunner, "run", flaky)
    out = tmp_path / "run"
    assert search.main(["--latency-budget", "50ms", "--trials", "3", "--out", str(out), "--baselines", "none",
                        *FAST]) == 0
    rows = read_trials(out)
    states = [r["state"] for r in rows]
    assert states.count("failed") == 1 and len(rows) == 3
    failed = rows[states.index("failed")]
    assert "out of memory" in failed["error"]


def test_interrupt_keeps_finished_trials_and_resumes(tmp_path, monkeypatch):
    original = engine_module.CandidateRunner.run
    calls = []

    def interrupted(self, arch, report=None):
        calls.append(arch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, arch, report)

    monkeypatch.setattr(engine_module.CandidateRunner, "run", interrupted)
    out = tmp_path / "run"
    args = ["--latency-budget", "50ms", "--trials", "3", "--out", str(out), "--baselines", "none", *FAST]
    assert search.main(args) == 130
    assert len([r for r in read_trials(out) if r["state"] != "failed"]) == 1
    report = (out / "report.md").read_text()
    assert "interrupted" in report and "device cpu" in report  # resolved even with no winner yet
    monkeypatch.setattr(engine_module.CandidateRunner, "run", original)
    assert search.main(args) == 0
    rows = read_trials(out)  # the study's 3 trials, and the one the interrupt cut off (not counted, recorded)
    assert len([r for r in rows if r["state"] != "failed"]) == 3
    assert [r["error"] for r in rows if r["state"] == "failed"] == ["interrupted: stopped mid-trial"]


def test_a_fitting_preset_that_beats_every_trial_is_the_winner(tmp_path, monkeypatch, capsys):
    original = engine_module.CandidateRunner.run
    target = searchspace.preset("IdentityFormer-S12")

    def run(self, arch, report=None):  # the same evaluation, with the preset scoring best
        outcome = original(self, arch, report)
        if outcome.state == "complete":
            outcome.accuracy = 0.99 if arch == target else 0.5
        return outcome

    monkeypatch.setattr(engine_module.CandidateRunner, "run", run)
    out = tmp_path / "run"
    assert search.main(["--latency-budget", "50ms", "--trials", "2", "--out", str(out),
                        "--baselines", "IdentityFormer-S12", *FAST]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["preset"] == "IdentityFormer-S12" and best["trial"] is None
    assert searchspace.Arch.from_dict(best["arch"]) == target
    assert best["search_accuracy"] == 0.99 and best["latency_ms"] <= 50.0
    assert searchspace.load_model(out)(torch.randn(1, 1, 16, 16)).shape == (1, 10)
    printed = capsys.readouterr().out
    assert "winner (preset IdentityFormer-S12)" in printed and printed.count("IdentityFormer-S12") == 1
    assert "the preset **IdentityFormer-S12**" in (out / "report.md").read_text()


def test_budget_nothing_meets_says_so_and_suggests_one(tmp_path, capsys):
    code = search.main(["--latency-budget", "1us", "--trials", "2", "--out", str(tmp_path / "run"),
                        "--baselines", "none", *FAST])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no architecture fits 1.00 µs" in err and "try --latency-budget" in err
    assert {r["state"] for r in read_trials(tmp_path / "run")} == {"screened"}  # nothing was built or trained


def test_zero_cost_and_pareto(tmp_path):
    out = tmp_path / "zc"
    assert search.main(["--latency-budget", "50ms", "--trials", "3", "--evaluator", "zero-cost", "--out", str(out),
                        "--baselines", "none", *FAST]) == 0
    rows = read_trials(out)
    assert all(r["score"] for r in rows if r["state"] == "complete") and not any(r["accuracy"] for r in rows)
    assert json.loads((out / "best.json").read_text())["accuracy"] > 0  # the winner is trained at the end

    out = tmp_path / "pareto"
    assert search.main(["--latency-budget", "50ms", "--trials", "3", "--objective", "pareto", "--out", str(out),
                        "--baselines", "none", *FAST]) == 0
    with open(out / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    assert front and all(float(r["measured_ms"]) > 0 for r in front)
    lat = [float(r["measured_ms"]) for r in front]
    acc = [float(r["accuracy"]) for r in front]
    assert lat == sorted(lat) and acc == sorted(acc)  # a front: slower only when more accurate


@pytest.mark.parametrize("argv, message", [
    (["--latency-budget", "5"], "unit is missing"),
    (["--latency-budget=-3ms"], "latency budget"),
    (["--latency-budget", "5 parsecs"], "latency budget"),
    (["--latency-budget", "5ms", "--space", "defualt"], "did you mean 'default'"),
    (["--latency-budget", "5ms", "--space", "nomodule:space"], "cannot import"),
    (["--latency-budget", "5ms", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--latency-budget", "5ms", "--baselines", "CAFormer-S81"], "CAFormer-S18"),
    (["--latency-budget", "5ms", "--trials", "0"], "--trials"),
    (["--latency-budget", "5ms", "--device", "tpu"], "unknown device"),
    (["--latency-budget", "5ms", "--runtime", "onnxrt"], "did you mean 'onnxruntime'"),
    (["--latency-budget", "5ms", "--runtime", "tensorrt", "--device", "cpu"], "does not run on cpu"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = search.main([*argv, "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err
    # nothing is left behind that would stop the corrected command ("holds a different search")
    assert not (tmp_path / "run" / "config.json").exists()


def test_empty_data_folder_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert search.main(["--latency-budget", "5ms", "--data", str(tmp_path / "images"), "--out",
                        str(tmp_path / "run"), "--quiet"]) == 2
    assert "class" in capsys.readouterr().err


def test_python_api_returns_a_result(tmp_path):
    result = searchspace.search("50ms", space="tiny", trials=2, epochs=1, final_epochs=1, input_size=16,
                                baselines=(), train_threads=1, out=str(tmp_path / "api"))
    assert result.best["latency_ms"] <= 50.0
    assert isinstance(result.arch, searchspace.Arch)
    assert result.load_model()(torch.randn(1, 1, 16, 16)).shape == (1, 10)
    assert SearchConfig(budget_ms=5.0).out_dir.name == "default-5.00ms"
    assert SearchConfig(budget_ms=5.0, runtime="onnxruntime").out_dir.name == "default-5.00ms-onnxruntime"


def test_tpe_is_guided_within_the_default_time_budget(tmp_path):
    # the default search finishes 12-20 trials in its time budget: most of them must be TPE-guided, not random
    from searchspace.nas.optuna_backend import create_study, tpe_startup_trials

    assert [tpe_startup_trials(n) for n in (12, 16, 40, 60, 500)] == [4, 4, 6, 10, 10]
    study = create_study(SearchConfig(budget_ms=5.0, trials=40, out=str(tmp_path)))
    assert study.sampler.inner._n_startup_trials == 6


@pytest.mark.slow
def test_a_search_on_onnxruntime_judges_the_budget_there_and_exports_the_winner(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "run"
    assert search.main(["--latency-budget", "50ms", "--trials", "2", "--out", str(out), "--baselines", "none",
                        "--evaluator", "zero-cost", "--runtime", "onnxruntime", *FAST]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["runtime"].startswith("onnxruntime ") and "(CPUExecutionProvider)" in best["runtime"]
    assert best["onnx"] == "model.onnx" and (out / "best" / "model.onnx").is_file()
    assert "onnxruntime" in capsys.readouterr().out  # the summary line says what the latency was measured on
    # the runtime's own table, apart from eager's
    table = LatencyTable.open("cpu", InputSpec(channels=1, height=16, width=16), threads=1, num_classes=10,
                              runtime="onnxruntime")
    assert table.key.runtime == "onnxruntime" and table.path != search_table().path and len(table) > 0


def test_a_candidate_the_runtime_cannot_run_is_a_failed_trial_with_the_reason(tmp_path, monkeypatch):
    from searchspace import runtimes
    from searchspace.mixers.attention import Attention

    class NoAttention(runtimes.Eager):  # a runtime without an attention kernel
        name = "no-attention"

        def prepare(self, model, example, *, device, threads):
            if any(isinstance(m, Attention) for m in model.modules()):
                raise runtimes.RuntimeUnavailableError("runtime 'no-attention' cannot run attention")
            return super().prepare(model, example, device=device, threads=threads)

    monkeypatch.setattr(runtimes, "RUNTIMES", type(runtimes.RUNTIMES)("runtime"))
    for rt in (runtimes.Eager(), NoAttention()):
        runtimes.register_runtime(rt)
    out = tmp_path / "run"
    assert search.main(["--latency-budget", "50ms", "--trials", "8", "--out", str(out), "--baselines", "none",
                        "--evaluator", "zero-cost", "--runtime", "no-attention", *FAST]) == 0
    rows = read_trials(out)
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(rows) == 8 and failed and len(failed) < 8
    assert all("cannot run attention" in r["error"] and "attention" in r["arch"] for r in failed)
    best = json.loads((out / "best.json").read_text())
    assert "attention" not in best["summary"] and best["runtime"].startswith("no-attention ")
