"""``search.py --backend ray --ray-address`` against a real Ray cluster, started with ``ray start --head``.

The cluster (:mod:`searchspace.testing.ray_cluster`) is on 127.0.0.1 only, in a temporary folder, with token
authentication on and a token of its own; it is stopped by its own process ids. The two-node cluster puts its second
node in a network namespace the test creates (a veth pair with addresses of its own; root only, else skipped).
Each search runs as a user runs it, in a process of its own, on the tiny space at 16x16.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from searchspace.nas.ray_backend import RETRIES_ATTR
from searchspace.testing.ray_cluster import (
    NetnsUnavailable,
    free_port,
    loopback_env,
    netns_link,
    ray_head,
    ray_node_in,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = importlib.util.find_spec("ray") is not None
SEARCH_TIMEOUT_S = 420  # a search of a few trials; on a loaded 2-core machine Ray's start-up alone can take 30 s

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not HAS_RAY, reason="needs Ray (the ray extra)"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the cluster's processes in /proc")]


@pytest.fixture(scope="module")
def head():
    with ray_head(num_cpus=2) as head:
        yield head


def search_command(address: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), "--backend", "ray", "--ray-address", address,
            "--latency-budget", "50ms", "--out", str(out), "--baselines", "none", "--space", "tiny",
            "--input-size", "16", "--threads", "1", "--final-epochs", "1", "--quiet", *extra]


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def tune_results(out: Path) -> dict[str, list[dict]]:
    """Tune's per-trial results (``<out>/ray/run-*/trial-<n>/result.json``), by trial folder."""
    results = {}
    for path in sorted(out.glob("ray/run-*/trial-*/result.json")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        results[path.parent.name] = [json.loads(line) for line in lines]
    return results


def test_search_joins_a_cluster_started_with_ray_start(head, tmp_path):
    """The head has token authentication on; the search finds the token and joins without being told."""
    out = tmp_path / "run"
    done = subprocess.run(search_command(head.address, out, "--evaluator", "zero-cost", "--trials", "4",
                                         "--workers", "2"),
                          env=head.env(), cwd=tmp_path, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RAY_AUTH_MODE=token, with the token in RAY_AUTH_TOKEN_PATH" in done.stderr
    assert f"joined the Ray cluster at {head.address}" in done.stderr
    rows = read_rows(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] in ("complete", "screened", "infeasible") for r in rows), [r["error"] for r in rows]
    assert any(r["state"] == "complete" and float(r["measured_ms"]) > 0 for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["latency_ms"] <= 50.0
    results = tune_results(out)
    assert sorted(results) == [f"trial-{n}" for n in range(4)]  # Tune's folders are named as in trials.csv
    assert {r[-1]["node_ip"] for r in results.values()} == {"127.0.0.1"}  # the cluster's one node, on loopback


def test_trials_run_on_other_nodes_and_latency_on_the_drivers(tmp_path):
    """Two nodes: the head (the target device, the driver's node) gives no CPU to trials, the second node two.
    Every trial runs on the second node; every latency is measured on the head."""
    out = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        try:
            link = stack.enter_context(netns_link())
        except NetnsUnavailable as exc:
            pytest.skip(f"no network namespace for a second node: {exc}")
        head = stack.enter_context(ray_head(num_cpus=0, node_ip=link.host_ip))
        stack.enter_context(ray_node_in(link, head, num_cpus=2))
        done = subprocess.run(search_command(head.address, out, "--evaluator", "zero-cost", "--trials", "4",
                                             "--workers", "2"),
                              env=head.env(), cwd=tmp_path, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(2 CPUs, 2 node(s)); latencies are measured on this node, {link.host_ip}" in done.stderr
    rows = read_rows(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["measured_ms"] for r in rows if r["state"] == "complete")
    assert {r[-1]["node_ip"] for r in tune_results(out).values()} == {link.ns_ip}


def running_trials(head) -> list[int]:
    """The cluster's worker processes that run a Tune trial right now (Ray titles a worker by the task it runs)."""
    pids = []
    for pid in head.processes():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::ImplicitFunc.train"):
            pids.append(pid)
    return pids


def test_a_worker_killed_mid_trial_loses_only_that_trial(head, tmp_path):
    """SIGKILL to a trial's Ray worker process: Tune runs the trial again, the study records it once."""
    out = tmp_path / "run"
    # training trials last seconds (three epochs); Pareto keeps ASHA from stopping any
    search = subprocess.Popen(search_command(head.address, out, "--evaluator", "train", "--epochs", "3",
                                             "--objective", "pareto", "--trials", "2", "--workers", "2"),
                              env=head.env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + SEARCH_TIMEOUT_S
        first_seen: dict[int, float] = {}
        while killed is None and search.poll() is None and time.monotonic() < deadline:
            for pid in running_trials(head):
                if time.monotonic() - first_seen.setdefault(pid, time.monotonic()) > 1.0:  # well into its trial
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.1)
        assert killed is not None, "no trial ran on the cluster"
        stdout, stderr = search.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    assert search.returncode == 0, stderr[-3000:]
    (error,) = out.glob("ray/run-*/trial-*/error.txt")  # Tune keeps the lost attempt's error, in its trial's folder
    number = int(error.parent.name.removeprefix("trial-"))
    assert f"trial {number}: its Ray worker process stopped mid-trial; running it again (1 of 1)" in stderr
    rows = read_rows(out)
    assert [int(r["trial"]) for r in rows] == [0, 1]  # the requested trials, nothing lost and nothing extra
    assert {r["state"] for r in rows} <= {"complete", "screened", "infeasible"}, [r["error"] for r in rows]
    if rows[number]["state"] == "complete":
        assert int(rows[number]["epochs"]) == 3  # run again from the start, to the end
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    assert {t.number: t.user_attrs.get(RETRIES_ATTR) for t in study.trials} == {0: None, 1: None, number: 1}


def test_an_address_with_no_cluster_is_one_line(tmp_path):
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(search_command(f"127.0.0.1:{port}", tmp_path / "run", "--evaluator", "zero-cost",
                                         "--trials", "2"),
                          env=loopback_env(), cwd=tmp_path, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in last and "ray start --head" in last
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 120  # not minutes of Ray retrying


@pytest.mark.parametrize("token", ["missing", "wrong"])
def test_a_cluster_that_refuses_this_machine_is_one_line(head, tmp_path, token):
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    env = head.env(HOME=str(home), RAY_gcs_server_port_wait_time_s="2")  # Ray's retries of a refused join: 2 s
    del env["RAY_AUTH_TOKEN_PATH"]
    if token == "wrong":
        env["RAY_AUTH_TOKEN"] = "0" * 64
    done = subprocess.run(search_command(head.address, tmp_path / "run", "--evaluator", "zero-cost", "--trials", "2"),
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "gcs_client" not in done.stderr  # Ray's own retries are not shown
    last = done.stderr.strip().splitlines()[-1]
    assert "ray get-auth-token" in last and "RAY_AUTH_TOKEN" in last
    if token == "missing":
        assert "uses token authentication: set RAY_AUTH_MODE=token" in last
    else:
        assert "refused the authentication token in RAY_AUTH_TOKEN" in last
