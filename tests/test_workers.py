"""Many workers on one study: the study's total, dead workers' trials, fresh draws, constraints, optuna-dashboard.

The multi-process tests start real ``search.py`` processes on one study (SQLite file, and the real PostgreSQL server
of the ``postgres_url`` fixture), kill one with SIGKILL in the middle of a trial, and start it again.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, distribution_to_json
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from searchspace import preset
from searchspace.nas.candidate import Outcome
from searchspace.nas.config import SearchConfig
from searchspace.nas.storage import open_storage
from searchspace.nas.study import (
    CONSTRAINTS_KEY,
    WORKER_ATTR,
    Duplicate,
    SearchStudy,
    Surplus,
    counts,
    record,
    trial_rows,
    worker_id,
    worker_of,
)
from searchspace.space import get_space

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _config(tmp_path, **kw) -> SearchConfig:
    kw.setdefault("trials", 4)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return SearchConfig(budget_ms=5.0, out=str(tmp_path / "run"), **kw)


def _draws(study: SearchStudy, n: int, space) -> None:
    def objective(trial):
        space.sample(trial)
        return 0.5

    study.study.optimize(objective, n_trials=n)


def test_a_resumed_study_draws_new_candidates_and_draws_are_reproducible(tmp_path):
    space = get_space("default")
    first = SearchStudy(_config(tmp_path, sampler="random"))
    _draws(first, 3, space)
    again = SearchStudy(_config(tmp_path, sampler="random"))  # a second run (or worker) on the same study
    _draws(again, 2, space)
    params = [t.params for t in again.trials()]
    assert len(params) == 5 and all(params.count(p) == 1 for p in params)

    other = SearchStudy(_config(tmp_path / "b", sampler="random"))  # same seed, fresh study: the same draws
    _draws(other, 3, space)
    assert [t.params for t in other.trials()] == params[:3]


def test_the_later_of_two_trials_racing_for_the_last_place_is_surplus(tmp_path):
    study = SearchStudy(_config(tmp_path, trials=2), heartbeat=False)
    first = study.study.ask()
    study.claim(first)
    study.study.tell(first, 0.5)
    a, b = study.study.ask(), study.study.ask()  # two workers start trials at the same moment
    study.claim(a)
    with pytest.raises(Surplus):
        study.claim(b)
    study.claim(a)  # a later trial never takes the place of an earlier one
    study.study.tell(b, state=TrialState.FAIL)
    study.study.tell(a, 0.7)
    assert study.tally().counted == 2 and study.tally().settled
    assert [r["trial"] for r in trial_rows(study.study)] == [0, 1]  # the surplus trial is not a result

    queued = SearchStudy(_config(tmp_path / "q", trials=1), heartbeat=False)
    queued.study.enqueue_trial({}, user_attrs={"queued": "preset"})
    queued.study.enqueue_trial({}, user_attrs={"queued": "preset"})
    for _ in range(2):  # queued work was counted when it was queued: never surplus
        queued.claim(queued.study.ask())


def test_a_candidate_already_evaluated_is_not_evaluated_again(tmp_path):
    study = SearchStudy(_config(tmp_path), heartbeat=False)
    study.study.enqueue_trial({"x": "a"})
    study.study.enqueue_trial({"x": "a"})
    done = study.study.ask()
    done.suggest_categorical("x", ["a", "b"])
    study.study.tell(done, 0.5)
    again = study.study.ask()
    again.suggest_categorical("x", ["a", "b"])
    with pytest.raises(Duplicate):
        study.check_new(again)
    study.study.tell(again, state=TrialState.FAIL)
    assert not counts(study.trials()[-1])
    study.study.ask()  # after a repeated candidate the next draw is random, then TPE again
    assert isinstance(study.sampler.inner, optuna.samplers.RandomSampler)
    study.study.ask()
    assert isinstance(study.sampler.inner, optuna.samplers.TPESampler)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_local_workers_trial_is_failed_and_queued_again(tmp_path):
    study = SearchStudy(_config(tmp_path), heartbeat=False)
    trial = study.study.ask()
    here = worker_id().rsplit(":", 1)[0]
    choice = distribution_to_json(CategoricalDistribution(["a", "b"]))
    trial.set_user_attr(WORKER_ATTR, {"id": f"{here}:{_dead_pid()}", "params": {"x": "b"},
                                      "distributions": {"x": choice}})
    alive = study.study.ask()  # a live process on this machine keeps its trial
    alive.set_user_attr(WORKER_ATTR, f"{here}:{os.getppid()}")
    elsewhere = study.study.ask()  # another machine's trial waits for its heartbeat to go stale
    elsewhere.set_user_attr(WORKER_ATTR, "other-host/12345678:1")

    assert study.release_dead_workers() == 1
    dead, kept, remote, retry = study.trials()
    assert dead.state == TrialState.FAIL and "worker stopped" in dead.user_attrs["error"]
    assert kept.state == remote.state == TrialState.RUNNING
    assert retry.state == TrialState.WAITING and retry.params == {"x": "b"}  # the draw, though Optuna had not stored it
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == dead.number
    assert "error" not in retry.user_attrs and WORKER_ATTR not in retry.user_attrs  # no worker runs it yet
    tally = study.tally()
    assert (tally.counted, tally.running, tally.waiting) == (0, 2, 1)


def test_budget_violations_are_optuna_constraints(tmp_path):
    study = SearchStudy(_config(tmp_path), heartbeat=False)
    arch = preset("IdentityFormer-S12")  # any candidate
    for state, latency in (("screened", 9.0), ("complete", 4.0)):
        trial = study.study.ask()
        outcome = Outcome(arch=arch, state=state, predicted_ms=latency,
                          measured_ms=latency if state == "complete" else None, score=0.1)
        record(trial, outcome, 5.0)
        study.study.tell(trial, 0.0)
    screened, fits = study.trials()
    assert screened.system_attrs[CONSTRAINTS_KEY] == [4.0] and fits.system_attrs[CONSTRAINTS_KEY] == [-1.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optuna_dashboard_serves_a_search_study_with_its_constraints(tmp_path):
    pytest.importorskip("optuna_dashboard")
    config = _config(tmp_path)
    study = SearchStudy(config, heartbeat=False)
    arch = preset("IdentityFormer-S12")
    trial = study.study.ask()
    record(trial, Outcome(arch=arch, state="screened", predicted_ms=9.0), config.budget_ms)
    study.study.tell(trial, 0.0)
    port = _free_port()
    command = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    server = subprocess.Popen([command, config.storage_url, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = None
        for _ in range(150):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        assert studies is not None, "optuna-dashboard did not answer"
        (summary,) = [s for s in studies if s["study_name"] == config.name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as r:
            detail = json.load(r)
        (served,) = detail["trials"]
        assert served["constraints"] == [4.0]  # shown as infeasible by the dashboard
    finally:
        server.terminate()
        server.wait(timeout=20)


# ---------------------------------------------------------------------------------------------- many processes

WORKER_ARGS = ["--latency-budget", "50ms", "--space", "tiny", "--evaluator", "zero-cost", "--input-size", "16",
               "--final-epochs", "1", "--baselines", "none", "--quiet", "--timeout", "400", "--train-threads", "1"]


def _worker(storage: str, out: Path, trials: int) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "search.py"), *WORKER_ARGS, "--storage", storage, "--study-name", "shared",
            "--trials", str(trials), "--out", str(out)]
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _running_trial_of(url: str, pid: int, deadline: float) -> int | None:
    storage = open_storage(url)  # one connection pool for the whole poll (a new one per look exhausts the server)
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (worker_of(t) or "").endswith(f":{pid}"):
                    return t.number
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.05)
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.slow
def test_three_workers_share_the_trials_and_a_killed_one_loses_nothing(shared_storage, tmp_path):
    trials = 7
    outs = [tmp_path / f"w{i}" for i in range(3)]
    procs = [_worker(shared_storage, out, trials) for out in outs]
    try:
        victim = procs[0]
        number = _running_trial_of(shared_storage, victim.pid, time.monotonic() + 240)
        assert number is not None, "no trial of the first worker was seen running"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        procs[0] = _worker(shared_storage, outs[0], trials)  # started again, as a user would
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {out: out.with_suffix(".log").read_text() for out in outs}
    assert codes == [0, 0, 0], logs

    study = optuna.load_study(study_name="shared", storage=shared_storage)
    finished = [t for t in study.get_trials() if counts(t)]
    assert len(finished) == trials  # the study's total, shared: exactly that many, whoever ran them
    params = [json.dumps(t.params, sort_keys=True) for t in finished]
    assert len(set(params)) == trials  # no candidate evaluated twice
    killed = study.get_trials()[number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.get_trials() if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]
    assert len(retries) == 1 and counts(retries[0])
    assert retries[0].params == killed.user_attrs[WORKER_ATTR]["params"]  # the same candidate, run again
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))

    winners = set()
    for out in outs:  # every worker's results cover every worker's trials
        with open(out / "trials.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == trials + 1, logs[out]  # the killed trial is listed too, as failed
        winners.add(json.loads((out / "best.json").read_text())["trial"])
    assert len(winners) == 1
