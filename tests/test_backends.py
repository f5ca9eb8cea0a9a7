"""Search backends besides Optuna: Ray Tune (latency measured in isolation from training trials) and NNI."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from searchspace import Arch, MixerNASError
from searchspace.nas import SearchConfig, run
from searchspace.nas.candidate import STATES, Outcome
from searchspace.nas.nni_backend import space_decisions, used_params
from searchspace.nas.optuna_backend import trial_rows
from searchspace.nas.ray_backend import ProcessorGate, _record_result, pid_alive
from searchspace.space import get_space

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_NNI = importlib.util.find_spec("nni") is not None
BUDGET_MS = 1000.0  # generous: these tests check the plumbing, and a shared CI machine can be 40x slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One latency-table cache for the module (the tiny space's table is built once), not the user's."""
    path = tmp_path_factory.mktemp("latency-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXERNAS_CACHE_DIR", str(path))
        yield path


def tiny_config(out: Path, **overrides) -> SearchConfig:
    # 16x16 digits: every stage still has tokens, and an epoch costs a quarter of the default 32x32
    options = dict(budget_ms=BUDGET_MS, space="tiny", trials=3, evaluator="zero-cost", threads=1, out=str(out),
                   baselines=(), final_epochs=1, timeout_s=None, workers=2, input_size=16)
    return SearchConfig(**{**options, **overrides})


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_results(out: Path, trials: int) -> dict:
    rows = read_rows(out)
    assert len(rows) == trials
    assert [int(r["trial"]) for r in rows] == list(range(trials))
    assert {r["state"] for r in rows} <= set(STATES)
    for r in rows:
        assert json.loads(r["arch"])["stages"]
        assert any(k.startswith("param.") and r[k] for k in r)
        if r["state"] == "complete":
            assert float(r["measured_ms"]) <= BUDGET_MS and float(r["score"]) > 0 and int(r["params"]) > 0
    best = json.loads((out / "best.json").read_text())
    assert best["latency_ms"] <= best["budget_ms"] == BUDGET_MS
    return best


# --------------------------------------------------------------------------- the gate (plain threads, no Ray)


def test_measurement_waits_for_trainers_and_pauses_them():
    gate = ProcessorGate()
    trains: list[tuple[float, float]] = []
    measures: list[tuple[float, float]] = []
    stop = threading.Event()

    def trainer(name: str) -> None:
        gate.acquire(name)
        try:
            while not stop.is_set():
                gate.pause(name)  # a pause point between batches
                start = time.perf_counter()
                while time.perf_counter() - start < 0.003:  # a "batch"
                    pass
                trains.append((start, time.perf_counter()))
        finally:
            gate.release(name)

    workers = [threading.Thread(target=trainer, args=(f"trial-{i}",)) for i in range(2)]
    for w in workers:
        w.start()
    while len(gate.holders) < 2:
        time.sleep(0.001)
    for _ in range(3):
        with gate.exclusive(timeout=10):
            assert gate.holders == []  # every trainer gave its lease back
            start = time.perf_counter()
            time.sleep(0.05)
            measures.append((start, time.perf_counter()))
        time.sleep(0.03)
    stop.set()
    for w in workers:
        w.join()
    assert gate.measurements == 3
    assert not [(t, m) for t in trains for m in measures if t[0] < m[1] and m[0] < t[1]], "trained while measuring"
    assert any(t[0] > measures[-1][1] for t in trains), "trainers did not resume after the measurements"


def test_new_leases_wait_while_a_measurement_waits():
    gate = ProcessorGate()
    gate.acquire("busy")
    entered = threading.Event()

    def measure() -> None:
        with gate.exclusive(timeout=10):
            entered.set()

    m = threading.Thread(target=measure)
    m.start()
    while not gate.pause_requested():
        time.sleep(0.001)
    with pytest.raises(TimeoutError):  # a waiting measurement is not starved by newcomers
        gate.acquire("newcomer", timeout=0.05)
    assert not entered.is_set()  # and it does not start while "busy" holds its lease
    gate.release("busy")
    m.join(5)
    assert entered.is_set()
    gate.acquire("newcomer", timeout=1)  # afterwards the processor is shared again
    assert gate.holders == ["newcomer"]


def test_dead_holders_lose_their_lease_and_a_busy_processor_times_out():
    gate = ProcessorGate(is_alive=lambda token: token != "dead", dead_check_s=0.01)
    gate.acquire("crashed-trial", "dead")
    with gate.exclusive(timeout=5):
        pass
    assert gate.dropped == ["crashed-trial"]
    gate.acquire("slow-trial", "alive")
    with pytest.raises(TimeoutError, match="slow-trial"):
        with gate.exclusive(timeout=0.05):
            pass
    assert not gate.pause_requested()  # a measurement that gave up does not leave trainers paused


def test_a_trial_run_again_holds_its_lease_in_its_new_process():
    alive = {101: False, 102: True}  # the trial's first process was killed; Tune runs it again in another
    gate = ProcessorGate(is_alive=lambda pid: alive[pid], dead_check_s=0.01)
    gate.acquire("trial-1", 101)
    gate.acquire("trial-1", 102)
    with pytest.raises(TimeoutError), gate.exclusive(timeout=0.1):
        pass
    assert gate.holders == ["trial-1"] and not gate.dropped  # not measured beside the running trial


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


# ------------------------------------------------------------------ how Ray results become study records


@pytest.mark.parametrize("case, state", [("complete", "complete"), ("screened", "screened"),
                                         ("stopped-by-asha", "pruned"), ("failed", "failed"),
                                         ("worker-died", "failed")])
def test_ray_results_are_recorded_like_optuna_trials(case, state):
    space = get_space("tiny")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    arch = space.sample(trial)
    trial.set_user_attr("arch", arch.to_dict())
    partial = {"predicted_ms": 1.5, "measured_ms": 1.2, "measured_spread": 0.03, "params": 1000, "macs": 5000}
    result, error = None, False
    if case == "complete":
        outcome = Outcome(arch=arch, state="complete", predicted_ms=1.5, measured_ms=1.2, accuracy=0.9, epochs=2,
                          params=1000, macs=5000, curve=[0.8, 0.9])
        result = {"state": "complete", "outcome": json.dumps(outcome.to_attrs())}
    elif case == "screened":
        outcome = Outcome(arch=arch, state="screened", predicted_ms=5000.0)
        result = {"state": "screened", "outcome": json.dumps(outcome.to_attrs())}
    elif case == "stopped-by-asha":
        result = {"state": "running", "partial": json.dumps({**partial, "accuracy": 0.4, "epochs": 1})}
    elif case == "failed":
        result = {"state": "failed", "error": "TrainingDiverged: loss is nan", "partial": json.dumps(partial)}
    else:
        error = True
    optuna_state, values = _record_result(trial, result, error, budget_ms=10.0, pareto=False)
    study.tell(trial, values, state=optuna_state)
    (row,) = trial_rows(study)
    assert row["state"] == state
    assert json.loads(row["arch"]) == arch.to_dict()
    if case == "complete":
        assert (row["accuracy"], row["measured_ms"], row["epochs"]) == (0.9, 1.2, 2)
        assert study.trials[0].value == 0.9 and max(study.trials[0].constraints.values()) < 0  # Optuna's own
    if case == "screened":
        assert max(study.trials[0].constraints.values()) > 0  # infeasible for the sampler and optuna-dashboard
    if case == "stopped-by-asha":
        assert (row["accuracy"], row["measured_ms"], row["epochs"]) == (0.4, 1.2, 1)
    if case == "failed":
        assert row["error"].startswith("TrainingDiverged") and row["measured_ms"] == 1.2
    if case == "worker-died":
        assert "error.txt" in row["error"]


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_on_loopback(tmp_path_factory):
    """A local Ray (``ray.init``) on 127.0.0.1 only, with a token of its own rather than ``~/.ray/auth_token``.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is read once, when Ray is imported: this fixture must come first.
    Ray sets ``RAY_AUTH_MODE=token`` in the environment when it starts a local cluster; it is undone afterwards.
    """
    from searchspace.testing.ray_cluster import RAY_ENV, write_token

    with pytest.MonkeyPatch.context() as mp:
        for name in RAY_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(write_token(tmp_path_factory.mktemp("ray-token") / "auth_token")))
        import ray

        if not ray.is_initialized() and ray.util.get_node_ip_address() != "127.0.0.1":
            pytest.fail("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: its nodes would "
                        "listen on this machine's network address; set it in the environment of pytest")
        yield


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_on_loopback")
@pytest.mark.skipif(not HAS_RAY, reason="needs Ray (the ray extra)")
def test_measuring_actor_measures_only_while_trainers_pause(cache_dir):
    """Two trainer tasks hold leases and compute; the actor's measurements fall exactly in their pauses."""
    import ray
    import torch

    from searchspace.latency import InputSpec
    from searchspace.nas import ray_backend
    from searchspace.nas.candidate import CandidateRunner

    root = Path(__file__).resolve().parents[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        measurer = ray_backend.get_measurer("cpu")
        plain = CandidateRunner(budget_ms=BUDGET_MS, predictor=None, evaluator=None,
                                data=SimpleNamespace(num_classes=10, in_chans=1),
                                input_spec=InputSpec(batch=1, channels=1, height=32, width=32), device="cpu",
                                threads=1, measure_rounds=2)
        ray.get(measurer.register.remote("test", plain))

        @ray.remote(num_cpus=1)
        def trainer(name: str, flag: str, hooked: bool) -> tuple[list, int]:
            """Computes for 8 s holding a lease; records the intervals in which it computed."""
            lease = ray_backend.Lease(measurer, name, active=True)
            x, w = torch.randn(64, 256), torch.randn(256, 256)
            net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
            chunks: list[tuple[float, float]] = []
            for layer in net:  # a layer's own hooks run after the lease's pause point (a global pre-hook)
                layer.register_forward_pre_hook(lambda m, a: chunks.append((time.time(), None)))
                layer.register_forward_hook(lambda m, a, o: chunks.append((chunks.pop()[0], time.time())))
            with lease, torch.no_grad():
                Path(flag).touch()
                end = time.time() + 8
                while time.time() < end:
                    if hooked:
                        net(x)  # pause points: the forward pre-hook the lease installs
                    else:
                        lease.pause_point()  # an explicit pause point between "batches"
                        start = time.time()
                        for _ in range(5):
                            x @ w
                        chunks.append((start, time.time()))
            return chunks, lease.pauses

        flags = [cache_dir / f"started-{i}" for i in range(2)]
        jobs = [trainer.remote(f"trial-{i}", str(f), hooked=i == 0) for i, f in enumerate(flags)]
        deadline = time.time() + 60
        while not all(f.exists() for f in flags) and time.time() < deadline:
            time.sleep(0.1)
        arch = get_space("tiny").sample({"s1.mixer": "pooling", "s2.mixer": "pooling", "s3.mixer": "pooling",
                                         "s3.depth": 1, "s3.width": 32, "s4.mixer": "pooling"})
        results = [ray.get(measurer.measure.remote("test", arch.to_dict())) for _ in range(3)]
        done = ray.get(jobs)
        sections = ray.get(measurer.stats.remote())["sections"]
    finally:
        ray.shutdown()
    assert all(r.value_ms > 0 and r.context.threads == 1 for r in results)
    assert len(sections) == 3
    for chunks, pauses in done:
        assert pauses >= 1 and len(chunks) > 20  # it trained throughout (fewer chunks on a busy machine)
        assert not [c for c in chunks for s in sections if c[0] < s[1] and s[0] < c[1]], "trained while measuring"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_on_loopback")
@pytest.mark.skipif(not HAS_RAY, reason="needs Ray (the ray extra)")
def test_ray_search_writes_results_and_resumes(tmp_path, cache_dir):
    out = tmp_path / "ray-run"
    messages: list[str] = []
    result = run(tiny_config(out, backend="ray", trials=2), progress=False, echo=messages.append)
    assert not result.interrupted
    best = check_results(out, trials=2)
    assert best["trial"] == result.best["trial"]
    assert list((out / "ray").glob("run-*/trial-*/result.json")), "Tune's own results are kept under out/ray"
    assert any("started a local Ray" in m for m in messages)
    # the measuring actor gives every candidate it measured to the latency table, which the driver reads back
    from searchspace.latency import InputSpec
    from searchspace.latency.table import LatencyTable

    table = LatencyTable.open("cpu", InputSpec(channels=1, height=16, width=16), threads=1, cache_dir=cache_dir)
    observed = {o.arch for o in table.observations}
    measured = [Arch.from_json(r["arch"]) for r in read_rows(out) if r["measured_ms"]]
    assert measured and set(measured) <= observed
    assert any("refined by this search's measurements" in m for m in messages)

    import ray

    root = Path(__file__).resolve().parents[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    try:  # the same command again, this time inside a Ray session the caller started (and keeps)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        messages.clear()
        run(tiny_config(out, backend="ray", trials=3), progress=False, echo=messages.append)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert any("2 of 3 trials finished" in m for m in messages)
    check_results(out, trials=3)
    assert len(list((out / "ray").glob("run-*"))) == 2


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_on_loopback")
@pytest.mark.skipif(not HAS_RAY, reason="needs Ray (the ray extra)")
def test_ray_search_with_training_and_asha(tmp_path, cache_dir):
    out = tmp_path / "ray-train"
    run(tiny_config(out, backend="ray", trials=4, evaluator="train", epochs=2), progress=False, echo=lambda m: None)
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["state"] in ("complete", "pruned", "screened", "infeasible"), r["error"]
        if r["state"] in ("complete", "pruned"):
            assert 0 < float(r["accuracy"]) <= 1 and int(r["epochs"]) in (1, 2) and float(r["measured_ms"]) > 0
    assert json.loads((out / "best.json").read_text())["accuracy"] > 0


# ------------------------------------------------------------------------------------------------ NNI


def test_nni_sees_every_decision_of_the_space():
    space = get_space("tiny")
    decisions = space_decisions(space)
    study = optuna.create_study()
    for _ in range(20):
        trial = study.ask()
        space.sample(trial)
        assert set(trial.params) <= set(decisions)
        sample = {name: choices[-1] for name, choices in decisions.items()}
        assert set(used_params(space, sample)) <= set(decisions)
    assert all(len(choices) > 1 for choices in decisions.values())


@pytest.mark.nni
@pytest.mark.slow
@pytest.mark.skipif(not HAS_NNI, reason="needs NNI (the nni extra)")
def test_nni_search_writes_results_and_resumes(tmp_path, cache_dir):
    out = tmp_path / "nni-run"
    result = run(tiny_config(out, backend="nni", workers=1), progress=False, echo=lambda m: None)
    assert not result.interrupted
    check_results(out, trials=3)
    messages: list[str] = []
    run(tiny_config(out, backend="nni", workers=1, trials=5), progress=False, echo=messages.append)
    assert any("3 of 5 trials finished" in m for m in messages)
    check_results(out, trials=5)
    rows = read_rows(out)
    params = [tuple(sorted((k, v) for k, v in r.items() if k.startswith("param.") and v)) for r in rows]
    assert len(set(params)) == 5, "the resumed evolution proposed a candidate again"


@pytest.mark.nni
@pytest.mark.skipif(not HAS_NNI, reason="needs NNI (the nni extra)")
def test_nni_refuses_the_pareto_objective(tmp_path, cache_dir):
    with pytest.raises(MixerNASError, match="(?i)pareto"):
        run(tiny_config(tmp_path / "nni-pareto", backend="nni", objective="pareto"), progress=False,
            echo=lambda m: None)
