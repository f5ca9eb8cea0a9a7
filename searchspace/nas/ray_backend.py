"""The Ray Tune backend: the same objective as the Optuna backend, run as Tune trials on a Ray cluster.

Tune drives the search with Optuna as its searcher (``OptunaSearch`` over a define-by-run function that calls
``space.sample(trial)``, so parameter names are the space's stable dotted paths) and ASHA as its scheduler (per-epoch
validation accuracy, ``time_attr="epoch"``; FIFO for the Pareto objective and for zero-cost proxies, which have no
epochs). Each trial evaluates one candidate with the search's :class:`CandidateRunner`.

**The study is the record.** The searcher's Optuna study lives in the same storage as the Optuna backend's (SQLite
in the results folder, or ``--storage``), and every finished trial's outcome is written to its user attributes
exactly as :func:`optuna_backend.record` does, so ``trials.csv``, the winner choice and the report read it with
:func:`optuna_backend.trial_rows` unchanged. Tune's own files (per-trial ``result.json``, ``error.txt``) go to
``<out>/ray/run-<time>/``.

**Latency is measured in isolation.** A CPU (or GPU) that trains other candidates while a latency is measured gives
numbers that are off by 2-40x on a small machine. So:

* One *measuring actor* per device (a named Ray actor, ``mixernas-measure-<device>@<node>`` in namespace
  ``mixernas``, pinned to the driver's node, where the latency table was built and the finalists are re-measured)
  does every latency measurement of the search: whole candidates, and table parts that are still missing. Its
  measuring methods run one at a time (a concurrency group of size 1).
* The actor holds a :class:`ProcessorGate`, a writer-preferring read-write lock: every trial running on that node
  holds a shared *lease* while it computes (building, counting, training, scoring); a measurement takes the gate
  exclusively. Once a measurement is waiting, no new lease is granted, and it starts when the last lease is given
  back.
* Trials give their lease back at *pause points*: at most every 0.2 s at the start of a module's forward (a
  process-wide forward pre-hook installed only inside Ray trial processes: that is between and within batches),
  after every epoch, around every ``tune.report`` and while they wait for their own measurement. A paused trial
  waits inside the gate and resumes when the measurement is over.
* A lease whose process has died (out of memory, a crash) is dropped by the gate: the lease records the holder's
  pid (leases exist only on the measuring node). ASHA stops a trial inside ``tune.report``, where it holds no
  lease. A measurement that cannot get the processor within ``GATE_TIMEOUT_S`` fails its trial with a message
  instead of hanging the search. Each trial's ``result.json`` counts its pauses (``gate_pauses``).

Trials on other nodes of a cluster do not load the measuring node's processor and take no lease. The driver's own
bookkeeping (Tune's loop, sampling the next candidate) is not gated: it is light and brief.

**Resume.** Re-running the same command with the same ``--out`` reopens the study, marks trials cut off by a stop
as failed, and runs only the missing trials as a new Tune experiment, whose searcher sees every earlier trial
through the study. ``Tuner.restore`` is deliberately not used: it replays the cut-off trials with the original
``num_samples``, so it cannot extend a search to more trials, and its searcher checkpoint lags the study.
Ctrl-C: Tune stops its trials and returns; finished trials are in the study; the trials in flight are lost.

**Timeout.** ``--timeout`` stops starting new trials (as with Optuna); trials already running finish.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..arch import Arch
from ..errors import MixerNASError
from .candidate import CandidateRunner, Outcome, arch_model
from .config import SearchConfig
from .optuna_backend import (
    FINISHED,
    _best_feasible,
    _enqueue_presets_in_space,
    open_study,
    record,
    trial_rows,
)

NAMESPACE = "mixernas"
ARCH_KEY = "_arch"  # the candidate, as JSON, in a Tune trial's config (besides the space's parameters)
SAMPLE_ERROR_KEY = "_sample_error"  # the space could not produce a candidate; the trial records the failure
PAUSE_POLL_S = 0.2  # how often a training trial asks whether a measurement is waiting
GATE_TIMEOUT_S = 600.0  # a measurement gives up (its trial fails) if trials do not make way for this long
DEAD_CHECK_S = 1.0  # how often a waiting measurement checks that lease holders are still alive
MEASURER_GPU_SHARE = 0.1  # on CUDA, the GPU share the measuring actor reserves; trials share the rest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the gate


class ProcessorGate:
    """Who may use a processor: any number of trainers at once, or one measurement alone.

    A writer-preferring read-write lock with named holders. Trainers :meth:`acquire` a shared lease and
    :meth:`release` it; between the two they call :meth:`pause` at convenient points, which gives way to a waiting
    measurement. A measurement enters :meth:`exclusive`: from then on no lease is granted, and it starts once every
    lease is back. Leases of dead holders are dropped: ``is_alive(token)`` is asked about each holder's token (a
    pid on the measuring node) while a measurement waits::

        gate = ProcessorGate()
        gate.acquire("trial-1", os.getpid())     # a trainer
        ...                                      # train a batch
        gate.pause("trial-1", os.getpid())       # returns at once, or after a measurement
        gate.release("trial-1")

        with gate.exclusive(timeout=600):        # the measuring actor
            measure()

    Thread-safe; plain Python (the Ray actor wraps one).
    """

    def __init__(self, is_alive: Callable[[Any], bool] | None = None, dead_check_s: float = DEAD_CHECK_S):
        self._cond = threading.Condition()
        self._leases: dict[str, Any] = {}  # holder -> token
        self._measuring = False
        self._waiting = 0  # measurements waiting for the leases to come back
        self._is_alive = is_alive or pid_alive
        self._dead_check_s = dead_check_s
        self.measurements = 0  # completed exclusive sections
        self.sections: collections.deque[tuple[float, float]] = collections.deque(maxlen=1000)  # (start, end)
        self.dropped: list[str] = []  # holders whose lease was dropped because they died

    @property
    def holders(self) -> list[str]:
        with self._cond:
            return sorted(self._leases)

    def pause_requested(self) -> bool:
        """True while a measurement runs or waits: trainers should call :meth:`pause`."""
        return self._measuring or self._waiting > 0

    def acquire(self, holder: str, token: Any = None, timeout: float | None = None) -> None:
        """Take a shared lease, waiting while a measurement runs or waits. Re-acquiring is a no-op."""
        with self._cond:
            if holder in self._leases:
                return
            if not self._cond.wait_for(lambda: not self._measuring and not self._waiting, timeout):
                raise TimeoutError(f"{holder} waited {timeout:.0f} s for a latency measurement to finish")
            self._leases[holder] = token

    def release(self, holder: str) -> None:
        """Give the lease back (no-op if not held)."""
        with self._cond:
            self._leases.pop(holder, None)
            self._cond.notify_all()

    def pause(self, holder: str, token: Any = None, timeout: float | None = None) -> bool:
        """Give way to a waiting measurement and take the lease again; returns whether it paused."""
        with self._cond:
            if not self.pause_requested():
                return False
            self._leases.pop(holder, None)
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: not self._measuring and not self._waiting, timeout):
                raise TimeoutError(f"{holder} waited {timeout:.0f} s for a latency measurement to finish")
            self._leases[holder] = token
            return True

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the processor alone: wait until every lease is back (and no other measurement runs)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._leases or self._measuring:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(
                            f"the processor stayed busy for {timeout:.0f} s (trials holding it: "
                            f"{', '.join(sorted(self._leases)) or 'none'}), so no latency was measured")
                    self._cond.wait(self._dead_check_s if left is None else min(left, self._dead_check_s))
                    self._drop_dead()
                self._measuring = True
            finally:
                self._waiting -= 1
                self._cond.notify_all()
        start = time.time()  # wall clock: comparable with the trainers' processes on this machine
        try:
            yield
        finally:
            with self._cond:
                self._measuring = False
                self.measurements += 1
                self.sections.append((start, time.time()))
                self._cond.notify_all()

    def _drop_dead(self) -> None:
        for holder, token in list(self._leases.items()):
            if token is not None and not self._is_alive(token):
                del self._leases[holder]
                self.dropped.append(holder)
                log.warning("latency gate: dropped the lease of %s (its process is gone)", holder)


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` (on this machine) is running; zombies count as dead."""
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------------- the measuring actor

_ACTOR_CLASS = None


def _measurer_class():
    """The Ray actor class, made on first use (Ray is imported only when this backend runs)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is not None:
        return _ACTOR_CLASS
    import ray

    @ray.remote(concurrency_groups={"gate": 64, "measure": 1})
    class LatencyMeasurer:
        """Measures latencies on its node's device, alone: trials on the node make way through the gate."""

        def __init__(self) -> None:
            self.gate = ProcessorGate()
            self.searches: dict[str, CandidateRunner] = {}

        # -- the gate (many callers at once)
        @ray.method(concurrency_group="gate")
        def acquire(self, holder: str, pid: int) -> None:
            self.gate.acquire(holder, pid, timeout=GATE_TIMEOUT_S * 2)

        @ray.method(concurrency_group="gate")
        def release(self, holder: str) -> None:
            self.gate.release(holder)

        @ray.method(concurrency_group="gate")
        def pause_requested(self) -> bool:
            return self.gate.pause_requested()

        @ray.method(concurrency_group="gate")
        def pause(self, holder: str, pid: int) -> bool:
            return self.gate.pause(holder, pid, timeout=GATE_TIMEOUT_S * 2)

        @ray.method(concurrency_group="gate")
        def register(self, key: str, runner: CandidateRunner) -> str:
            """Take a search's measuring settings and table; returns this actor's node (where leases matter)."""
            self.searches[key] = runner
            return ray.get_runtime_context().get_node_id()

        @ray.method(concurrency_group="gate")
        def unregister(self, key: str) -> dict[str, Any]:
            self.searches.pop(key, None)
            return self.stats()

        @ray.method(concurrency_group="gate")
        def stats(self) -> dict[str, Any]:
            """Measurements so far, their (start, end) wall-clock times, and leases dropped for dead holders."""
            return {"measurements": self.gate.measurements, "sections": list(self.gate.sections),
                    "dropped": list(self.gate.dropped)}

        # -- measuring (one at a time)
        @ray.method(concurrency_group="measure")
        def measure(self, key: str, arch: dict) -> Any:
            runner = self.searches[key]
            model = arch_model(Arch.from_dict(arch), runner.data)
            with self.gate.exclusive(timeout=GATE_TIMEOUT_S):
                result = CandidateRunner.measure(runner, model)
                CandidateRunner.observe(runner, Arch.from_dict(arch), result.value_ms)  # refines the table
                return result

        @ray.method(concurrency_group="measure")
        def predict(self, key: str, arch: dict) -> float:
            table = self.searches[key].predictor
            arch_ = Arch.from_dict(arch)
            table.refresh()
            prediction = table.predict(arch_, measure_missing=False)
            if prediction.missing:
                with self.gate.exclusive(timeout=GATE_TIMEOUT_S):
                    prediction = table.predict(arch_)  # measures the missing parts and saves them
            return float(prediction.total_ms)

    _ACTOR_CLASS = LatencyMeasurer
    return LatencyMeasurer


def get_measurer(device: str):
    """The measuring actor for ``device`` on this (the driver's) node.

    Created on first use and found by name afterwards, so searches on the same machine share it (and never measure
    at the same time). It belongs to the driver that created it and ends with that driver.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # Ray Client: the driver is not on a node; measure wherever the actor lands
        node_id = None
    options: dict[str, Any] = {"name": f"mixernas-measure-{device}@{(node_id or 'any')[:12]}",
                               "namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0,
                               "max_concurrency": 64}
    if node_id:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    if device.startswith("cuda"):
        options["num_gpus"] = MEASURER_GPU_SHARE
    return _measurer_class().options(**options).remote()


# --------------------------------------------------------------------------------------- trial side


class Lease:
    """A trial's side of the gate: hold the processor while computing, give way at pause points."""

    def __init__(self, measurer, holder: str, active: bool):
        self.measurer, self.holder, self.active = measurer, holder, active
        self.held = False
        self.pauses = 0
        self._next_poll = 0.0
        self._hook = None

    def acquire(self) -> None:
        if self.active and not self.held:
            _get(self.measurer.acquire.remote(self.holder, os.getpid()))
            self.held = True
            self._next_poll = time.monotonic() + PAUSE_POLL_S

    def release(self) -> None:
        if self.held:
            self.held = False
            _get(self.measurer.release.remote(self.holder))

    def pause_point(self, *_: Any) -> None:
        """Called often (every module forward): asks the gate at most every PAUSE_POLL_S seconds."""
        if not self.held or time.monotonic() < self._next_poll:
            return
        if _get(self.measurer.pause_requested.remote()):
            self.pauses += int(bool(_get(self.measurer.pause.remote(self.holder, os.getpid()))))
        self._next_poll = time.monotonic() + PAUSE_POLL_S

    @contextlib.contextmanager
    def given_up(self) -> Iterator[None]:
        """Without the lease inside (an exception leaves it released: the trial is ending)."""
        held = self.held
        self.release()
        yield
        if held:
            self.acquire()

    def __enter__(self) -> Lease:
        if self.active:
            from torch.nn.modules.module import register_module_forward_pre_hook

            self._hook = register_module_forward_pre_hook(self.pause_point)
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.release()


def _get(ref: Any) -> Any:
    """``ray.get`` that raises the remote exception itself (its message, not a wrapped traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class RayCandidateRunner(CandidateRunner):
    """A :class:`CandidateRunner` whose latency measurements go through the measuring actor.

    Built on the driver from the search's runner; shipped to every trial. ``partial`` keeps what is known of the
    candidate in flight, so a trial that ASHA stops still records its latency, size and accuracy so far.
    """

    def __init__(self, base: CandidateRunner, *, measurer, key: str):
        self.__dict__.update(base.__dict__)
        self._base_fields = tuple(base.__dict__)
        self.measurer, self.key = measurer, key
        self.node_id: str | None = None  # the measuring actor's node (set from its answer to ``register``)
        self.lease: Lease | None = None
        self.partial: dict[str, Any] = {}
        self._arch: Arch | None = None
        self._started = time.perf_counter()

    def start_trial(self, holder: str) -> Lease:
        """A lease for this trial: active only on the measuring actor's node (elsewhere it does not load it)."""
        import ray

        self.lease = Lease(self.measurer, holder, active=self.node_id is None or _node_id(ray) == self.node_id)
        self.partial = {}
        self._started = time.perf_counter()
        return self.lease

    def run(self, arch: Arch, report=None) -> Outcome:
        self._arch = arch
        return super().run(arch, report=report)

    def predict(self, arch: Arch) -> float | None:
        from ..latency.table import LatencyTable

        table = self.predictor
        if isinstance(table, LatencyTable):
            prediction = table.predict(arch, measure_missing=False)
            if prediction.missing:  # another trial may have measured them since
                table.refresh()
                prediction = table.predict(arch, measure_missing=False)
            if prediction.missing:  # measuring parts is a latency measurement too: the actor does it
                with self._without_lease():
                    value = float(_get(self.measurer.predict.remote(self.key, arch.to_dict())))
            else:
                value = float(prediction.total_ms)
        else:
            value = super().predict(arch)
        self.partial["predicted_ms"] = value
        return value

    def measure(self, model):
        from ..latency import count_params_macs

        counts = count_params_macs(model, self.input_spec)
        self.partial.update(params=counts.params, macs=counts.macs)
        arch = self._arch.to_dict() if self._arch is not None else None
        if arch is None:
            raise MixerNASError("RayCandidateRunner.measure needs run() to know the architecture")
        with self._without_lease():
            result = _get(self.measurer.measure.remote(self.key, arch))
        self.partial.update(measured_ms=result.value_ms, measured_spread=result.spread)
        return result

    def observe(self, arch: Arch, measured_ms: float) -> None:
        """Nothing here: the measuring actor gives its measurements to the table it holds."""

    def _without_lease(self):
        return self.lease.given_up() if self.lease is not None else contextlib.nullcontext()

    def for_actor(self, threads: int) -> CandidateRunner:
        """What the measuring actor needs: the measuring settings and the table, without data or evaluator.

        ``threads`` is explicit: a Ray worker's torch default (1) is not the count the table was measured with.
        """
        from types import SimpleNamespace

        plain = CandidateRunner.__new__(CandidateRunner)
        plain.__dict__.update({k: getattr(self, k) for k in self._base_fields if k not in ("evaluator", "data")})
        plain.threads = threads
        plain.data = SimpleNamespace(num_classes=self.data.num_classes, in_chans=self.data.in_chans)
        plain.evaluator = None
        return plain


def _node_id(ray) -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _trial(config: dict[str, Any], runner: RayCandidateRunner) -> None:
    """The Tune trainable: one candidate, per-epoch accuracy reported for ASHA, then the whole outcome."""
    from ray import tune

    if SAMPLE_ERROR_KEY in config:
        tune.report(_final_failed(config[SAMPLE_ERROR_KEY], {}))
        return
    arch = Arch.from_json(config[ARCH_KEY])
    lease = runner.start_trial(tune.get_context().get_trial_id())
    last_epoch = getattr(runner.evaluator, "epochs", None)

    def report(epoch: int, accuracy: float) -> bool:
        if epoch == last_epoch:  # the final report follows at once, with the whole outcome
            return False
        partial = {**runner.partial, "accuracy": accuracy, "epochs": epoch,
                   "seconds": time.perf_counter() - runner._started}
        metrics = {"state": "running", "objective": _finite(accuracy), "accuracy": _finite(accuracy), "epoch": epoch,
                   "latency_ms": runner.partial.get("measured_ms", math.inf), "partial": json.dumps(partial)}
        with lease.given_up():  # Tune may stop the trial inside report (SystemExit); never stop holding the lease
            tune.report(metrics)
        return False  # ASHA stops poor trials itself

    try:
        with lease:
            outcome = runner.run(arch, report=report)
    except Exception as exc:
        partial = {**runner.partial, "seconds": time.perf_counter() - runner._started}
        final = _final_failed(f"{type(exc).__name__}: {exc}", partial)
    else:
        latency = outcome.latency_for_constraint()
        final = {"state": outcome.state, "objective": outcome.objective, "accuracy": _finite(outcome.accuracy),
                 "epoch": outcome.epochs or 0, "latency_ms": latency if latency is not None else math.inf,
                 "outcome": json.dumps(outcome.to_attrs())}
    tune.report({**final, "gate_pauses": lease.pauses})


def _final_failed(error: str, partial: dict[str, Any]) -> dict[str, Any]:
    return {"state": "failed", "objective": 0.0, "accuracy": 0.0, "epoch": 0, "latency_ms": math.inf,
            "error": error[:500], "partial": json.dumps(partial)}


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else 0.0


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


# --------------------------------------------------------------------------------------------- searcher


def _make_searcher(study: optuna.Study, space, config: SearchConfig, *, deadline: float | None,
                   on_finished: Callable[[dict[str, Any]], None]):
    """``OptunaSearch`` on the search's own study, recording every outcome as the Optuna backend does."""
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    pareto = config.objective == "pareto"

    class _Define:
        """The define-by-run function: the space's own parameters, plus the candidate itself as JSON."""

        def __call__(self, trial) -> dict[str, Any]:
            try:
                return {ARCH_KEY: space.sample(trial).to_json()}
            except Exception as exc:  # a space that cannot produce a candidate: that trial fails, the search goes on
                return {SAMPLE_ERROR_KEY: f"{type(exc).__name__}: {exc}"}

    class StudySearch(OptunaSearch):
        def __init__(self) -> None:
            super().__init__(space=_Define(), metric=["objective", "latency_ms"] if pareto else "objective",
                             mode=["max", "min"] if pareto else "max", sampler=study.sampler,
                             study_name=study.study_name, storage=study._storage)
            self.finished_by_deadline = False
            self.told = 0

        def suggest(self, trial_id: str):
            if deadline is not None and time.monotonic() > deadline:
                self.finished_by_deadline = True
                return Searcher.FINISHED
            params = super().suggest(trial_id)
            if params and ARCH_KEY in params:
                self._ot_trials[trial_id].set_user_attr("arch", json.loads(params[ARCH_KEY]))
            return params

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            state, values = _record_result(ot_trial, result, error, config.budget_ms, pareto)
            try:
                self._ot_study.tell(ot_trial, values, state=state)
            except Exception as exc:  # e.g. a value Optuna refuses; the attributes are stored already
                log.warning("could not tell Optuna about trial %s: %s", ot_trial.number, exc)
            self._completed_trials.add(trial_id)
            self.told += 1
            on_finished(ot_trial.user_attrs)

        def save(self, checkpoint_path: str) -> None:
            pass  # the study (in its storage) is the searcher's state; see the module docstring on resume

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StudySearch()


def _record_result(ot_trial: optuna.trial.Trial, result: dict | None, error: bool, budget_ms: float,
                   pareto: bool) -> tuple[TrialState, Any]:
    """Store the trial's outcome in its user attributes; returns the state and values to tell Optuna."""
    arch = ot_trial.user_attrs.get("arch")
    if error or not result:
        ot_trial.set_user_attr("state", "failed")
        ot_trial.set_user_attr("error", "the trial's process stopped outside the candidate evaluation (see "
                                        "error.txt in its folder under <out>/ray)" if error else
                                        "stopped before it reported anything (the search was stopped)")
        return TrialState.FAIL, None
    state = result.get("state")
    if state == "failed":
        _set_partial(ot_trial, result)
        ot_trial.set_user_attr("state", "failed")
        ot_trial.set_user_attr("error", result.get("error"))
        return TrialState.FAIL, None
    if state == "running":  # stopped by ASHA after some epoch: pruned, with what it had measured
        attrs = _set_partial(ot_trial, result)
        outcome = _outcome(attrs, arch, state="pruned")
        if outcome is not None:
            record(ot_trial, outcome, budget_ms)
        ot_trial.set_user_attr("state", "pruned")
        return TrialState.PRUNED, None
    outcome = _outcome(json.loads(result["outcome"]), arch)
    record(ot_trial, outcome, budget_ms)
    if outcome.state == "pruned":
        return TrialState.PRUNED, None
    if pareto:
        return TrialState.COMPLETE, [outcome.objective, outcome.latency_for_constraint() or math.inf]
    return TrialState.COMPLETE, outcome.objective


def _set_partial(ot_trial, result: dict) -> dict[str, Any]:
    attrs = json.loads(result.get("partial") or "{}")
    for key, value in attrs.items():
        ot_trial.set_user_attr(key, value)
    return attrs


def _outcome(attrs: dict[str, Any], arch: dict | None, **override: Any) -> Outcome | None:
    from dataclasses import fields

    data = {**attrs, **override}
    arch = data.get("arch", arch)
    if arch is None:
        return None
    known = {f.name for f in fields(Outcome)}
    return Outcome(**{k: v for k, v in data.items() if k in known and k != "arch"}, arch=Arch.from_dict(arch))


# ---------------------------------------------------------------------------------------------- the run


def run_study(config: SearchConfig, space, runner: CandidateRunner, *, progress: bool,
              echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
    """Run the missing trials of the study on Ray Tune; returns (rows of all finished trials, interrupted?)."""
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as exc:
        raise MixerNASError(f"--backend ray needs Ray Tune: pip install 'ray[tune]' ({exc})") from None

    study, done, remaining = open_study(config, echo)
    if not remaining:
        return trial_rows(study), False
    _enqueue_presets_in_space(study, space, done, remaining)

    started = time.perf_counter()
    started_ray = _connect(config, echo)
    try:
        interrupted = _tune(config, space, runner, study, remaining, progress, echo)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if started_ray:
            ray.shutdown()
    if not interrupted:
        ran = len(study.get_trials(deepcopy=False, states=FINISHED)) - done
        echo(f"{ran} trials in {time.perf_counter() - started:.0f} s on Ray (Tune's own results in "
             f"{config.out_dir / 'ray'})")
    return trial_rows(study), interrupted


def _tune(config: SearchConfig, space, runner: CandidateRunner, study: optuna.Study, remaining: int,
          progress: bool, echo: Callable[[str], None]) -> bool:
    """One Tune experiment of ``remaining`` trials in ``<out>/ray/run-<time>``; returns whether it was interrupted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from tqdm.auto import tqdm

    metric = "accuracy" if config.evaluator == "train" else "score"
    best = [_best_feasible(study, metric, config.budget_ms)]
    bar = tqdm(total=remaining, disable=not progress, unit="trial", dynamic_ncols=True,
               desc=f"ray search ({config.trials} trials, {config.workers} at once"
                    + (f", {config.timeout_s:.0f} s max)" if config.timeout_s else ")"))

    def on_finished(ua: dict[str, Any]) -> None:
        value, measured = ua.get(metric), ua.get("measured_ms")
        if (ua.get("state") == "complete" and value is not None and measured is not None
                and measured <= config.budget_ms and (best[0] is None or value > best[0])):
            best[0] = value
        bar.update(1)
        bar.set_postfix_str(f"best {metric} {best[0]:.3f}" if best[0] is not None else f"last: {ua.get('state')}")

    key = f"{config.name}-{os.getpid()}-{time.time_ns()}"
    measurer = get_measurer(runner.device)
    ray_runner = RayCandidateRunner(runner, measurer=measurer, key=key)
    ray_runner.node_id = _get(measurer.register.remote(key, ray_runner.for_actor(_measure_threads(runner))))

    deadline = time.monotonic() + config.timeout_s if config.timeout_s else None
    searcher = _make_searcher(study, space, config, deadline=deadline, on_finished=on_finished)
    epochs = getattr(runner.evaluator, "epochs", None)
    if config.objective == "accuracy" and config.evaluator == "train" and epochs:
        # rungs at epochs 1, 2, 4, ... below the last; the last epoch is reported once, with the outcome
        scheduler = ASHAScheduler(time_attr="epoch", metric="accuracy", mode="max", max_t=epochs, grace_period=1,
                                  reduction_factor=2)
    else:  # Pareto (Optuna cannot prune multi-objective trials either) and proxies (no epochs)
        scheduler = FIFOScheduler()
    resources = {"cpu": 1}
    if runner.device.startswith("cuda"):
        resources["gpu"] = (1 - MEASURER_GPU_SHARE) / config.workers
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, runner=ray_runner), resources),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                    max_concurrent_trials=config.workers, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=time.strftime("run-%Y%m%d-%H%M%S"),
                                  storage_path=str((config.out_dir / "ray").resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    interrupted = False
    try:
        with _env(RAY_AIR_NEW_OUTPUT="0"):  # Tune's newer console output prints tables even at verbose=0
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    # Tune handles the first Ctrl-C itself (stops its trials and returns): trials then are missing
    interrupted = interrupted or (searcher.told < remaining and not searcher.finished_by_deadline)
    if not interrupted:
        stats = _get(measurer.unregister.remote(key))
        if stats["dropped"]:
            echo(f"latency gate: dropped the leases of {len(stats['dropped'])} trial(s) whose process died")
    return interrupted


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the duration of the block, then restored."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure_threads(runner: CandidateRunner) -> int:
    """Threads for measuring: the search's setting, else the table's (the driver's torch default)."""
    if runner.threads:
        return runner.threads
    key = getattr(runner.predictor, "key", None)
    if key is not None and getattr(key, "threads", None):
        return key.threads
    import torch

    return torch.get_num_threads()


def _connect(config: SearchConfig, echo: Callable[[str], None]) -> bool:
    """Join ``config.ray_address`` or start a local Ray; returns whether this call started (and must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    import searchspace

    package = Path(searchspace.__file__).resolve().parent
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                               "namespace": NAMESPACE}
    if config.ray_address:
        # the cluster's workers get this very package (and its registered mixers and spaces) from the driver
        options["runtime_env"] = {"py_modules": [str(package)]}
        try:
            ray.init(address=config.ray_address, **options)
        except Exception as exc:
            raise MixerNASError(f"cannot join the Ray cluster at {config.ray_address!r}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; check "
                                f"--ray-address (e.g. auto, or host:6379); a cluster with token authentication "
                                f"also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or "
                                f"~/.ray/auth_token)") from None
        echo(f"joined the Ray cluster at {config.ray_address} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
    else:
        paths = [str(package.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")]
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}}
        ray.init(num_cpus=config.workers, **options)
        echo(f"started a local Ray with {config.workers} CPU(s) for trials (--workers)")
    return True
