"""The Ray Tune backend: the same objective as the Optuna backend, run as Tune trials on a Ray cluster.

Tune drives the search with the study's Optuna sampler as its searcher (:class:`StudySearch`: each Tune trial is one
Optuna trial, asked from the study, its candidate drawn by ``space.sample(trial)``, so parameter names are the
space's stable dotted paths) and ASHA as its scheduler (per-epoch validation accuracy, ``time_attr="epoch"``; FIFO
for the Pareto objective and for zero-cost proxies, which have no epochs). Each trial evaluates one candidate with
the search's :class:`CandidateRunner`.

**The study is the record.** The searcher's Optuna study lives in the same storage as the Optuna backend's (SQLite
in the results folder, or ``--storage``), opened by the backends' shared base (:class:`~searchspace.nas.backend.
Backend`), and every trial follows the same protocol (:mod:`searchspace.nas.study`: claimed, checked for a
duplicate draw, its outcome recorded by :func:`~searchspace.nas.study.record`), so ``trials.csv``, the winner
choice and the report read it unchanged, and Ray drivers and Optuna workers can share one study. Tune's own
files (per-trial ``result.json``, ``error.txt``) go to
``<out>/ray/run-<time>/trial-<study trial number>/``.

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

**Where latency is measured: the driver's node.** The measuring actor runs on the node of the process that runs
``search.py`` (the *driver*), and nowhere else: that machine is the *target device*. Its latency table was built
there, the winner and the presets are re-measured there after the search, and trials that land on it make way
through the gate. So run ``search.py`` on the device whose latency you optimise, as a node of the cluster (the head,
or a node joined with ``ray start --address``). To keep training off the target altogether, give its node no CPUs
for trials (``ray start --head --num-cpus=0``): the measuring actor asks for none. With Ray Client (``ray://``)
the driver is on no node; the actor then runs wherever Ray puts it, and that node is measured.

**Joining a cluster** (``--ray-address host:port``, ``auto`` or ``ray://host:port``):

* The address is tried first (a TCP connection, ``CONNECT_TIMEOUT_S``): a cluster that is not there is one line,
  not minutes of Ray retrying.
* Token authentication. Ray 2.60's ``ray start --head`` turns it on when a token is at hand (``RAY_AUTH_TOKEN``,
  the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``, which every local ``ray.init`` creates), and a
  driver is then let in only in token mode with the same token. Ray itself enters token mode only for
  ``address="auto"``; here, when ``RAY_AUTH_MODE`` is unset and a token is found in one of those places,
  ``RAY_AUTH_MODE=token`` is set for this process before Ray is imported (a cluster without authentication still
  accepts such a driver). A cluster that refuses the driver's token, or wants one that this machine lacks, is one
  line saying what to set (the head's token is printed by ``ray get-auth-token`` on the head).
* The cluster's workers get this package from the driver (``runtime_env`` ``py_modules``); Tune's files stay in
  the results folder on the driver's machine.

**A trial whose process dies** (killed, out of memory, its node lost) loses only itself: Tune runs it again from the
start with the same candidate (``FailureConfig(max_failures=TRIAL_RETRIES)``), as the same Optuna trial, which the
driver holds open meanwhile; the study counts it once and notes the lost attempts in its ``ray_retries`` attribute.
A candidate whose process dies more often than that is recorded as failed and the search goes on. The lease a
dead process held on the gate is dropped (its pid is gone). The driver beats Optuna's heartbeat for every trial it
has open (when the storage has one), so other workers on the study see them alive, and a dead driver's trials go
stale and are run again by the next worker.

**Resume.** Re-running the same command with the same ``--out`` reopens the study and runs only the missing
trials as a new Tune experiment, whose searcher sees every earlier trial through the study. ``Tuner.restore`` is
deliberately not used: it replays the cut-off trials with the original ``num_samples``, so it cannot extend a
search to more trials, and its searcher checkpoint lags the study. Ctrl-C: Tune stops its trials and returns;
finished trials are in the study; the trials in flight are lost.

**Timeout.** ``--timeout`` stops starting new trials (as with Optuna); trials already running finish.

Only public APIs of Optuna and Ray are used: the searcher is a plain :class:`ray.tune.search.Searcher` that asks and
tells the study (Optuna's ask-and-tell interface), not Ray's ``OptunaSearch`` and its private state.

**A cluster on one machine, and on two** (``tests/test_ray_cluster.py`` runs the first, and a two-node cluster
whose second node is in a network namespace; across machines it is a check by hand)::

    # one machine, loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on 127.0.0.1)
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=2
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python search.py --backend ray --ray-address 127.0.0.1:6379 --workers 2 \
        --evaluator zero-cost --trials 8 --latency-budget 5ms --out runs/ray-demo
    ray stop

    # two machines: the head is the target device, and runs search.py
    head$   ray get-auth-token --generate     # creates ~/.ray/auth_token if missing and prints it: copy it
    head$   ray start --head --port=6379 --num-cpus=1          # token authentication is on (the token exists)
    other$  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token> ray start --address=<head-ip>:6379 --num-cpus=2
    head$   python search.py --backend ray --ray-address <head-ip>:6379 --workers 3 --evaluator train \
                --trials 12 --latency-budget 5ms --out runs/ray-2nodes
    # check: the search says "2 node(s)"; the result.json files under runs/ray-2nodes/ray/run-*/trial-*/ name both
    # machines' node_ip (Tune reuses a trial's process for the next trial, so trials of a second or two may all
    # stay on the first node that is ready); trials.csv has 12 rows; `kill -9` of a `ray::ImplicitFunc.train`
    # process on `other` mid-search prints "running it again" and still ends with 12 rows
    head$ ray stop;  other$ ray stop
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..arch import Arch
from ..errors import MixerNASError, first_line
from .backend import MAX_DUPLICATES, Backend
from .candidate import CandidateRunner, Outcome, arch_model
from .config import SearchConfig
from .study import SearchStudy, Skipped, Surplus, pid_alive, record

NAMESPACE = "mixernas"
ARCH_KEY = "_arch"  # the candidate, as JSON, in a Tune trial's config
NUMBER_KEY = "trial"  # the study's trial number, in a Tune trial's config (and its folder's name)
SAMPLE_ERROR_KEY = "_sample_error"  # the space could not produce a candidate; the trial records the failure
PAUSE_POLL_S = 0.2  # how often a training trial asks whether a measurement is waiting
GATE_TIMEOUT_S = 600.0  # a measurement gives up (its trial fails) if trials do not make way for this long
DEAD_CHECK_S = 1.0  # how often a waiting measurement checks that lease holders are still alive
MEASURER_GPU_SHARE = 0.1  # on CUDA, the GPU share the measuring actor reserves; trials share the rest
TRIAL_RETRIES = 1  # a trial whose process dies runs again this often; a candidate that keeps killing it fails
RETRIES_ATTR = "ray_retries"  # a study trial's attempts lost to a dead process (absent: none)
CONNECT_TIMEOUT_S = 5.0  # how long the cluster's address may take to answer before it counts as unreachable
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch for token authentication ("token", "disabled")
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"  # where Ray keeps (and `ray start --head` looks for) the token

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
        """Take a shared lease, waiting while a measurement runs or waits. Re-acquiring only updates the token."""
        with self._cond:
            if holder in self._leases:  # e.g. a trial run again after its process died: the new process holds it
                self._leases[holder] = token
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
    """``trial-<study trial number>``: Tune's folder of a trial is named as in ``trials.csv``."""
    return f"trial-{trial.config.get(NUMBER_KEY, trial.trial_id)}"


# --------------------------------------------------------------------------------------------- searcher


def _searcher_class():
    """:class:`StudySearch`, made on first use (Ray is imported only when this backend runs)."""
    from ray.tune.search import Searcher

    class StudySearch(Searcher):
        """Tune's searcher on the search's own study: each Tune trial is one Optuna trial, asked and told.

        ``suggest`` asks the study for a trial (the study's sampler, and its queue of presets, decide) and draws the
        candidate with ``space.sample``; ``on_trial_complete`` records the outcome as the Optuna backend does and
        tells the study. A trial that Tune runs again after its process died stays the same open Optuna trial.
        While trials are open, a thread beats the storage's heartbeat for them (Optuna's ``optimize`` does the same
        for its own trials).
        """

        def __init__(self, shared: SearchStudy, space, config: SearchConfig, *, deadline: float | None,
                     on_finished: Callable[[TrialState], None], echo: Callable[[str], None]):
            pareto = config.objective == "pareto"
            super().__init__(metric="objective", mode="max")
            self.shared, self.study = shared, shared.study
            self.space, self.config, self.pareto = space, config, pareto
            self.deadline, self.on_finished, self.echo = deadline, on_finished, echo
            self.trials: dict[str, optuna.trial.Trial] = {}  # Tune trial id -> open Optuna trial
            self.reported: dict[str, set[int]] = {}  # epochs already given to Optuna as intermediate values
            self.finished_early = False  # the timeout, or no trial left to start in the study
            self.told = 0
            self.heartbeat = _Heartbeat(self.study)

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            for _ in range(MAX_DUPLICATES):
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.finished_early = True
                    return Searcher.FINISHED
                with warnings.catch_warnings():  # "heartbeat ... supposed to be used with Study.optimize": we beat
                    warnings.simplefilter("ignore", UserWarning)
                    trial = self.study.ask()
                self.heartbeat.add(trial)
                try:
                    arch = self.space.sample(trial)
                except Exception as exc:  # a space that cannot produce a candidate: that trial fails, the search
                    self.trials[trial_id] = trial  # goes on
                    return {NUMBER_KEY: trial.number, SAMPLE_ERROR_KEY: f"{type(exc).__name__}: {exc}"}
                try:  # the same protocol as every backend's (see searchspace.nas.study)
                    self.shared.admit(trial)
                except Skipped as skipped:
                    self.study.tell(trial, state=TrialState.FAIL)
                    self.heartbeat.discard(trial)
                    if isinstance(skipped, Surplus):
                        self.finished_early = True
                        return Searcher.FINISHED
                    continue
                self.trials[trial_id] = trial
                trial.set_user_attr("arch", arch.to_dict())
                return {NUMBER_KEY: trial.number, ARCH_KEY: arch.to_json()}
            self.echo(f"{MAX_DUPLICATES} draws in a row repeated earlier candidates: the space seems exhausted")
            self.finished_early = True
            return Searcher.FINISHED

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """Per-epoch accuracy as the Optuna trial's intermediate values (curves in optuna-dashboard)."""
            trial = self.trials.get(trial_id)
            epoch = result.get("epoch")
            if self.pareto or trial is None or result.get("state") != "running" or not isinstance(epoch, int):
                return
            seen = self.reported.setdefault(trial_id, set())
            if epoch not in seen:  # a trial run again reports its epochs again
                seen.add(epoch)
                trial.report(float(result["accuracy"]), epoch)

        def on_trial_recover(self, trial_id: str, failures: int) -> None:
            """Tune runs the trial again after its process died: note the lost attempt on the study's trial."""
            trial = self.trials.get(trial_id)
            if trial is None:
                return
            trial.set_user_attr(RETRIES_ATTR, failures)
            self.echo(f"trial {trial.number}: its Ray worker process stopped mid-trial; running it again "
                      f"({failures} of {TRIAL_RETRIES})")

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            trial = self.trials.pop(trial_id, None)
            self.reported.pop(trial_id, None)
            if trial is None:
                return
            state, values = _record_result(trial, result, error, self.config.budget_ms, self.pareto)
            try:
                self.study.tell(trial, values, state=state)
            except Exception as exc:  # e.g. a value Optuna refuses; the attributes are stored already
                log.warning("could not tell Optuna about trial %s: %s", trial.number, exc)
            self.heartbeat.discard(trial)
            self.told += 1
            self.on_finished(state)

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its searcher into the experiment's folder for Tuner.restore, which is not used (see the
            # module docstring on resume): the live parts (the study, whose sampler holds a lock) stay out
            live = ("shared", "study", "space", "trials", "heartbeat", "on_finished", "echo")
            return {k: v for k, v in self.__dict__.items() if k not in live}

        def save(self, checkpoint_path: str) -> None:
            pass  # the study (in its storage) is the searcher's state; see the module docstring on resume

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StudySearch


def _retry_callback(searcher):
    """A Tune callback that tells ``searcher`` when Tune runs a trial again after its process died."""
    from ray import tune

    class _OnRecover(tune.Callback):
        def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
            searcher.on_trial_recover(trial.trial_id, trial.num_failures)

    return _OnRecover()


class _Heartbeat:
    """Beats the storage's heartbeat for the driver's open trials, every heartbeat interval, from a thread.

    Only with a storage that has a heartbeat (Optuna's :class:`~optuna.storages.RDBStorage` opened with
    ``heartbeat_interval``); otherwise it does nothing. Public storage methods only.
    """

    def __init__(self, study: optuna.Study):
        self.study = study
        self.ids: dict[int, int] = {}  # trial number -> storage trial id
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.storage = None
        self.interval: float | None = None

    def add(self, trial: optuna.trial.Trial) -> None:
        storage = trial.storage
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        if not interval:
            return
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(self.study.study_name), trial.number)
        with self.lock:
            self.storage, self.interval = storage, float(interval)
            self.ids[trial.number] = trial_id
        storage.record_heartbeat(trial_id)  # at once: a trial without a heartbeat is never seen to go stale
        if self.thread is None:
            self.thread = threading.Thread(target=self._beat, name="mixernas-heartbeat", daemon=True)
            self.thread.start()

    def discard(self, trial: optuna.trial.Trial) -> None:
        with self.lock:
            self.ids.pop(trial.number, None)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = list(self.ids.values())
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a storage hiccup: the next beat may get through
                    log.warning("heartbeat of trial %s: %s", trial_id, exc)


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


class RayBackend(Backend):
    """Tune runs the trials, ``config.workers`` at once, on the cluster; the study is shared as in every backend."""

    label = "ray search"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.started_ray: bool | None = None  # whether this process started Ray (and must stop it)

    def _description(self) -> str:
        limit = f", {self.config.timeout_s:.0f} s max" if self.config.timeout_s else ""
        return f"{self.label} ({self.config.trials} trials, {self.config.workers} at once{limit})"

    def _summary(self) -> str:
        return f" on Ray (Tune's own results in {self.config.out_dir / 'ray'})"

    def search(self) -> bool:
        if self.started_ray is None:
            self.started_ray = _connect(self.config, self.echo)
        tally = self.tally()
        return _tune(self, tally.free + tally.waiting)


def run_study(config: SearchConfig, space, runner: CandidateRunner, *, progress: bool,
              echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
    """Run this worker's share of the study on Ray Tune; returns (rows of all finished trials, interrupted?)."""
    if config.ray_address:
        prepare_join(config.ray_address, echo)  # before Ray is imported: it reads RAY_AUTH_MODE once, on import
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as exc:
        raise MixerNASError(f"--backend ray needs Ray Tune: pip install 'ray[tune]' ({exc})") from None
    backend = RayBackend(config, space, runner, progress=progress, echo=echo)
    try:
        return backend.run()
    finally:
        if backend.started_ray:
            ray.shutdown()


def _tune(backend: RayBackend, remaining: int) -> bool:
    """One Tune experiment of ``remaining`` trials in ``<out>/ray/run-<time>``; returns whether it was interrupted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    config, space, runner, echo, bar = backend.config, backend.space, backend.runner, backend.echo, backend.bar

    def on_finished(state: TrialState) -> None:
        backend.best = backend.study.best_feasible()
        backend.after_trial()

    key = f"{config.name}-{os.getpid()}-{time.time_ns()}"
    measurer = get_measurer(runner.device)
    ray_runner = RayCandidateRunner(runner, measurer=measurer, key=key)
    ray_runner.node_id = _get(measurer.register.remote(key, ray_runner.for_actor(_measure_threads(runner))))

    def say(message: str) -> None:  # a line between the progress bar's updates
        with bar.external_write_mode():
            echo(message)

    searcher = _searcher_class()(backend.study, space, config, deadline=backend.deadline, on_finished=on_finished,
                                 echo=say)
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
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  callbacks=[_retry_callback(searcher)]),
    )
    interrupted = False
    try:
        with _env(RAY_AIR_NEW_OUTPUT="0"):  # Tune's newer console output prints tables even at verbose=0
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        searcher.heartbeat.close()
    # Tune handles the first Ctrl-C itself (stops its trials and returns): trials then are missing
    interrupted = interrupted or (searcher.told < remaining and not searcher.finished_early)
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
        captured: list[str] = []
        try:
            with _stderr_into(captured):  # Ray's C++ client logs every failed try there; the message says it once
                ray.init(address=config.ray_address, **options)
        except Exception as exc:
            raise _join_error(config.ray_address, exc, "".join(captured)) from None
        echo(f"joined the Ray cluster at {config.ray_address} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
             f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s)); latencies are measured on this node, "
             f"{ray.util.get_node_ip_address()}")
    else:
        paths = [str(package.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")]
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}}
        ray.init(num_cpus=config.workers, **options)
        echo(f"started a local Ray with {config.workers} CPU(s) for trials (--workers)")
    return True


# ------------------------------------------------------------------------------------------ joining a cluster


def prepare_join(address: str, echo: Callable[[str], None]) -> None:
    """Before joining ``address``: check that it answers, and enter token mode when this machine has a token.

    Call it before Ray is imported: Ray reads ``RAY_AUTH_MODE`` once, on import. Raises :class:`MixerNASError`
    (one line) for an address that is malformed or does not answer.
    """
    check_reachable(address)
    source = token_source()
    if os.environ.get(AUTH_MODE_ENV) is None and source is not None and "ray" not in sys.modules:
        # what Ray does itself for address="auto"; a cluster without authentication accepts such a driver too
        os.environ[AUTH_MODE_ENV] = "token"
        echo(f"Ray token authentication: {AUTH_MODE_ENV}=token, with the token in {source}")


def token_source() -> str | None:
    """Where Ray would find this machine's authentication token (in Ray's order), or None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        return f"RAY_AUTH_TOKEN_PATH ({named})" if _nonempty_file(Path(named).expanduser()) else None
    return DEFAULT_TOKEN_FILE if _nonempty_file(Path(DEFAULT_TOKEN_FILE).expanduser()) else None


def _nonempty_file(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`MixerNASError` unless something accepts TCP connections at ``address`` (``host:port`` or
    ``ray://host:port``; ``auto`` is left to Ray, which looks for a cluster on this machine).

    A loopback host also counts as reachable at this machine's network address: Ray joins a local cluster there.
    """
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise MixerNASError(f"--ray-address {address!r} is not an address of a Ray cluster: give host:port "
                            f"(e.g. head-node:6379, as `ray start --head` printed it) or auto")
    hosts = [host]
    if _is_loopback(host) and "://" not in address:
        hosts.append(_primary_ip())
    reasons = []
    for candidate in dict.fromkeys(h for h in hosts if h):
        try:
            with socket.create_connection((candidate, int(port)), timeout=timeout):
                return
        except socket.gaierror:
            reasons.append(f"unknown host {candidate!r}")
        except TimeoutError:
            reasons.append(f"no answer from {candidate} within {timeout:.0f} s")
        except OSError as exc:
            reasons.append(f"{candidate}: {exc.strerror or type(exc).__name__}".lower())
    raise MixerNASError(f"cannot reach the Ray cluster at {address} ({'; '.join(reasons)}): start it with "
                        f"`ray start --head --port={port}` on that machine, or check --ray-address")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _primary_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), as Ray picks it for a node."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))
            return s.getsockname()[0]
    except OSError:
        return None


@contextlib.contextmanager
def _stderr_into(captured: list[str]) -> Iterator[None]:
    """What this process (C++ libraries included) writes to file descriptor 2 inside the block, into ``captured``."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def _join_error(address: str, exc: Exception, stderr: str) -> MixerNASError:
    """One line for a failed ``ray.init(address=...)``: what was wrong, and what to set."""
    refused = "InvalidAuthToken" in stderr or "Unauthenticated" in stderr or type(exc).__name__ == "AuthenticationError"
    get_token = "the head's token (`ray get-auth-token` on the head prints it)"
    if refused and os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        source = token_source()
        if source is None:
            return MixerNASError(f"the Ray cluster at {address} needs an authentication token and this machine has "
                                 f"none: set RAY_AUTH_TOKEN to {get_token}, or copy it to {DEFAULT_TOKEN_FILE}")
        return MixerNASError(f"the Ray cluster at {address} refused the authentication token in {source}: set "
                             f"RAY_AUTH_TOKEN to {get_token}")
    if refused:
        return MixerNASError(f"the Ray cluster at {address} uses token authentication: set {AUTH_MODE_ENV}=token "
                             f"and RAY_AUTH_TOKEN to {get_token}, before Python starts")
    return MixerNASError(f"cannot join the Ray cluster at {address}: {first_line(exc) or type(exc).__name__}; "
                         f"check --ray-address (e.g. auto, or head-node:6379 as `ray start --head` printed it)")
