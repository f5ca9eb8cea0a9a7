"""Many workers on one PostgreSQL study: throughput, storage overhead per trial, repeated and lost trials.

Starts a throwaway PostgreSQL server on 127.0.0.1 (:mod:`searchspace.testing.postgres`), then for 1, 2 and 4
workers:

* **search**: that many ``search.py`` processes with the zero-cost evaluator on one study (``--storage``,
  ``--study-name``, ``--trials`` the study's total). From the study: trials per minute while trials ran (first
  trial start to last trial end), repeated parameters among the counted trials (target 0), lost trials: the total
  minus the trials that counted (target 0).
* **protocol**: the same number of processes running the search's trial protocol (claim, sample, check for
  duplicates, record, the tally after each trial, Optuna's ask/tell and heartbeat) with a candidate that costs
  nothing and a random sampler. Every call on the storage object is timed, the private methods through which
  Optuna's cache layer writes parameters and reads trials included (outermost calls only): milliseconds of storage
  calls per trial (target at most 10 ms) and SQL statements per trial, beside the same figures for Optuna alone
  (ask, the space's suggestions, tell and the heartbeat, with no attribute of ours), which no protocol on this
  storage can go below.

    python bench/workers.py                       # 1, 2 and 4 workers, 16 search trials, 200 protocol trials
    python bench/workers.py --workers 1,2 --trials 8

The last line is ``key=value`` figures. Prints the CPU model; figures are for this machine only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERHEAD_TARGET_MS = 10.0


def _timed(storage, stats: dict[str, list[float]]):
    """Time every method of ``storage``, Optuna's private ones included (its cache layer writes parameters and
    reads trials through them), counting only the outermost call of each thread, so nothing is counted twice; and
    count the SQL statements it sends (``stats["sql statements"]``)."""
    depth = threading.local()
    for name in dir(type(storage)):
        method = getattr(storage, name)
        if name.startswith("__") or not callable(method):
            continue

        def timed(*args, _method=method, _name=name, **kwargs):
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                depth.n -= 1
                if outer:
                    entry = stats.setdefault(_name, [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.perf_counter() - started

        setattr(storage, name, timed)
    statements = stats.setdefault("sql statements", [0, 0.0])
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute",
                            lambda *a, **k: statements.__setitem__(0, statements[0] + 1))
    return storage


def _protocol_worker(url: str, study: str, trials: int, out: str, plain: bool) -> None:
    """One process of the protocol measurement (run by the bench itself); writes its storage times to ``out``.json.

    ``plain``: Optuna alone (ask, the space's suggestions, tell, heartbeat), the baseline of the search's protocol.
    """
    import optuna

    import searchspace.nas.study as study_module
    from searchspace.nas.candidate import Outcome
    from searchspace.nas.config import SearchConfig
    from searchspace.nas.optuna_backend import OptunaBackend
    from searchspace.space import get_space

    stats: dict[str, list[float]] = {}
    space = get_space("default")
    if plain:
        storage = _timed(study_module.open_storage(url, heartbeat_interval=study_module.HEARTBEAT_S,
                                                   grace_period=study_module.GRACE_S), stats)
        s = optuna.create_study(storage=storage, study_name=study, sampler=optuna.samplers.RandomSampler(seed=0),
                                direction="maximize", load_if_exists=True)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        s.optimize(lambda trial: (space.sample(trial), 0.5)[1], n_trials=trials)
    else:
        opened = study_module.open_storage
        study_module.open_storage = lambda *a, **k: _timed(opened(*a, **k), stats)

        class FreeCandidate:  # what a candidate costs here: nothing, so the trial's time is the protocol's
            def run(self, arch, report=None):
                return Outcome(arch=arch, state="complete", predicted_ms=1.0, measured_ms=1.0, score=0.5)

        config = SearchConfig(budget_ms=5.0, trials=trials, storage=url, study_name=study, sampler="random",
                              evaluator="zero-cost", out=out, seed=0)
        OptunaBackend(config, space, FreeCandidate(), progress=False, echo=lambda _: None).run()
    Path(out + ".json").write_text(json.dumps(stats))


def _storage_ms(outs: list[str], trials: int) -> tuple[float, dict[str, float], float]:
    """Milliseconds of storage calls per trial, over the workers; the same per method; SQL statements per trial."""
    total: dict[str, float] = {}
    statements = 0
    for out in outs:
        for name, (calls, seconds) in json.loads(Path(out + ".json").read_text()).items():
            if name == "sql statements":
                statements += calls
            else:
                total[name] = total.get(name, 0.0) + 1000 * seconds / trials
    return sum(total.values()), total, statements / trials


def _study_figures(url: str, name: str, total: int) -> dict[str, float]:
    import optuna

    from searchspace.nas.storage import open_storage
    from searchspace.nas.study import counts

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if counts(t)]
    params = [json.dumps(t.params, sort_keys=True) for t in counted]
    timed = [t for t in counted if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in timed) - min(t.datetime_start for t in timed)).total_seconds()
    return {"counted": len(counted), "lost": total - len(counted), "repeated": len(params) - len(set(params)),
            "span_s": span, "extra": len(trials) - len(counted)}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], what: str) -> None:
    for p, log in zip(procs, logs):
        if p.wait(timeout=3600) != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"a {what} worker failed (exit {p.returncode}); the end of its log:\n{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="worker counts to compare (default: 1,2,4)")
    parser.add_argument("--trials", type=int, default=16, help="search trials per study (default: 16)")
    parser.add_argument("--protocol-trials", type=int, default=200,
                        help="trials of the protocol measurement per study (default: 200)")
    parser.add_argument("--space", default="tiny", help="search space of the search runs (default: tiny)")
    parser.add_argument("--input-size", type=int, default=16, help="input side of the search runs (default: 16)")
    parser.add_argument("--protocol-worker", nargs=5, metavar=("URL", "STUDY", "TRIALS", "OUT", "PLAIN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.protocol_worker:
        url, study, trials, out, plain = args.protocol_worker
        _protocol_worker(url, study, int(trials), out, plain == "plain")
        return 0

    from searchspace.latency import device_name
    from searchspace.testing.postgres import postgres_server

    counts = [int(n) for n in args.workers.split(",")]
    print(f"CPU: {device_name('cpu')}; PostgreSQL on 127.0.0.1; search: {args.trials} trials of space "
          f"{args.space!r} at {args.input_size}x{args.input_size}, zero-cost evaluator", flush=True)
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mixernas-workers-") as tmp, postgres_server(tmp) as url:
        # the baseline: what Optuna's own ask, suggestions, tell and heartbeat cost a trial in this storage
        base = f"{tmp}/plain"
        _wait_all([_start([sys.executable, __file__, "--protocol-worker", url, "plain", str(args.protocol_trials),
                           base, "plain"], Path(base + ".log"))], [Path(base + ".log")], "protocol")
        plain_ms, _, plain_sql = _storage_ms([base], args.protocol_trials)
        summary["optuna_alone_storage_ms"] = round(plain_ms, 2)
        for n in counts:
            name = f"search-{n}"
            cmd = [sys.executable, str(ROOT / "search.py"), "--latency-budget", "50ms", "--evaluator", "zero-cost",
                   "--space", args.space, "--input-size", str(args.input_size), "--trials", str(args.trials),
                   "--storage", url, "--study-name", name, "--baselines", "none", "--final-epochs", "1",
                   "--quiet", "--train-threads", "1"]
            started = time.perf_counter()
            logs = [Path(tmp) / f"{name}-{i}.log" for i in range(n)]
            procs = [_start([*cmd, "--out", f"{tmp}/{name}-{i}"], log) for i, log in enumerate(logs)]
            _wait_all(procs, logs, "search")
            wall = time.perf_counter() - started
            f = _study_figures(url, name, args.trials)
            rate = 60 * f["counted"] / f["span_s"]
            print(f"{n} worker(s), search: {f['counted']:.0f} trials counted in {f['span_s']:.1f} s of trials "
                  f"({rate:.1f} trials/min; {wall:.0f} s with start-up and the winner's training), repeated "
                  f"parameters {f['repeated']:.0f}, lost {f['lost']:.0f}, not counted {f['extra']:.0f} "
                  f"(surplus, duplicates, failures)", flush=True)

            proto = f"protocol-{n}"
            outs = [f"{tmp}/{proto}-{i}" for i in range(n)]
            logs = [Path(out + ".log") for out in outs]
            procs = [_start([sys.executable, __file__, "--protocol-worker", url, proto, str(args.protocol_trials),
                             out, "search"], log) for out, log in zip(outs, logs)]
            _wait_all(procs, logs, "protocol")
            p = _study_figures(url, proto, args.protocol_trials)
            storage_ms, by_call, sql = _storage_ms(outs, p["counted"])
            top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_call.items(), key=lambda kv: -kv[1])[:4])
            print(f"{n} worker(s), protocol: {p['counted']:.0f} trials in {p['span_s']:.1f} s; storage calls "
                  f"{storage_ms:.1f} ms and {sql:.0f} SQL statements per trial (target <= {OVERHEAD_TARGET_MS:.0f} "
                  f"ms; {top}), Optuna alone {plain_ms:.1f} ms and {plain_sql:.0f} statements; repeated "
                  f"{p['repeated']:.0f}, lost {p['lost']:.0f}", flush=True)
            summary.update({f"w{n}_trials_per_min": round(rate, 2), f"w{n}_storage_ms": round(storage_ms, 2),
                            f"w{n}_repeated": f["repeated"] + p["repeated"], f"w{n}_lost": f["lost"] + p["lost"]})
    worst = max(summary[f"w{n}_storage_ms"] for n in counts)
    repeated = sum(summary[f"w{n}_repeated"] for n in counts)
    lost = sum(summary[f"w{n}_lost"] for n in counts)
    print(" ".join(f"{k}={v}" for k, v in summary.items())
          + f" storage_ms_max={worst} repeated={repeated:.0f} lost={lost:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
