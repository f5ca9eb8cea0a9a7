"""A throwaway Ray cluster for tests: ``ray start --head`` on 127.0.0.1 in a temporary folder, stopped afterwards.

::

    with ray_head(num_cpus=2) as head:
        subprocess.run([sys.executable, "search.py", "--backend", "ray", "--ray-address", head.address, ...],
                       env=head.env())

The head is started as a user starts one (``ray start --head``), with one difference each, so that a test never
touches the machine's network or the user's files:

* **Loopback only.** ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every address of the node on 127.0.0.1 (by
  default Ray advertises the machine's network address even when told 127.0.0.1; with it, Ray also refuses a
  second node on this machine). Clients need it too: :meth:`RayHead.env` sets it.
* **Its own token.** Token authentication is on, as ``ray start`` turns it on when a token exists, but the token
  is a file in the temporary folder (``RAY_AUTH_TOKEN_PATH``), never ``~/.ray/auth_token``. :meth:`RayHead.env`
  passes the token's path and leaves ``RAY_AUTH_MODE`` unset, as in a user's shell.
* **Stopped by its own process ids.** ``ray start --block`` runs in a session of its own; every process of the
  node (GCS, raylet, workers) stays in that session, and stopping the node signals exactly those processes.
  Never ``ray stop``: it stops every Ray on the machine, other people's included.

A second node cannot share 127.0.0.1 with the head. :func:`netns_link` makes a network namespace joined to this one
by a veth pair with a /30 of its own (root only); the head listens on this side's address and
:func:`ray_node_in` starts the second node inside the namespace::

    with netns_link() as link, ray_head(num_cpus=0, node_ip=link.host_ip) as head, ray_node_in(link, head):
        ...  # a two-node cluster at head.address; nothing listens on the machine's network
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0  # a loaded 2-core machine starts a head in 5-20 s
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL what is left of the session (Ray would drain for 30 s)
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # never inherited from the caller


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def loopback_env(token_file: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a Ray process kept on loopback, with ``token_file`` as its token (if given)
    and no Ray address, authentication mode or token inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    env.update(extra)
    return env


def write_token(path: Path) -> Path:
    """A new authentication token (as ``ray get-auth-token --generate`` makes one) in ``path``."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def session_processes(session: int) -> list[int]:
    """The ids of the live processes in session ``session`` (from ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry.name))
    return pids


@dataclass
class RayProcess:
    """A ``ray start --block`` process, leader of a session that holds every process of its node."""

    process: subprocess.Popen = field(repr=False)
    temp_dir: Path  # Ray's --temp-dir: sessions, logs, sockets
    log: Path = field(repr=False)

    def processes(self) -> list[int]:
        """Every live process of the node (its Ray services and its workers)."""
        return session_processes(self.process.pid)

    def stop(self) -> None:
        """Stop every process of the node, by id; idempotent."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            pids = self.processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.1)  # reap the leader: ours to wait for
                pids = self.processes()
            if not pids:
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


@dataclass
class RayHead(RayProcess):
    """A running head: where to reach it, and how to make a client of it."""

    address: str = ""  # host:port, for --ray-address
    token_file: Path = Path()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client on this machine: the head's token file, ``RAY_AUTH_MODE`` unset, and on
        loopback when the head is."""
        return ray_env(self.address.rpartition(":")[0], self.token_file, **extra)


def ray_env(node_ip: str, token_file: Path | None = None, **extra: str) -> dict[str, str]:
    """:func:`loopback_env` for a node or client on 127.0.0.1; else the same without the loopback switch (with it,
    ``ray start --address`` refuses to add a node)."""
    env = loopback_env(token_file, **extra)
    if node_ip != LOOPBACK:
        del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    return env


def _start(command: list[str], env: dict[str, str], temp_dir: Path, timeout_s: float) -> RayProcess:
    """Run ``ray start ... --block`` in a session of its own; return once Ray says the node runs."""
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    node = RayProcess(process=process, temp_dir=temp_dir, log=log)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            node.stop()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"`{' '.join(command[:3])}` did not start within {timeout_s:.0f} s "
                               f"(exit status {process.poll()}):\n{tail}")
        time.sleep(0.2)
    return node


def _ray_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", *args, "--block", "--num-gpus=0",
            "--disable-usage-stats"]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, *, node_ip: str = LOOPBACK, root: Path | None = None, args: tuple[str, ...] = (),
             timeout_s: float = START_TIMEOUT_S) -> Iterator[RayHead]:
    """Start ``ray start --head`` at ``node_ip`` (127.0.0.1, or an address of this machine's own, such as a veth of
    :func:`netns_link`), on a free port, with ``num_cpus`` CPUs for tasks and no dashboard, in a temporary folder
    under ``root`` (default: the system's; Ray's socket paths must stay short); stop it and remove the folder on
    exit. ``args`` are passed on to ``ray start``."""
    temp_dir = Path(tempfile.mkdtemp(prefix="mxray-", dir=root))
    token_file = write_token(temp_dir / "auth_token")
    port = free_port()
    command = _ray_command("--head", f"--node-ip-address={node_ip}", f"--port={port}", f"--num-cpus={num_cpus}",
                           "--include-dashboard=false", f"--temp-dir={temp_dir}", *args)
    try:
        node = _start(command, ray_env(node_ip, token_file), temp_dir, timeout_s)
        head = RayHead(process=node.process, temp_dir=temp_dir, log=node.log, address=f"{node_ip}:{port}",
                       token_file=token_file)
        try:
            yield head
        finally:
            head.stop()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------- a second node, in a namespace


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot create a network namespace and a veth pair."""


@dataclass(frozen=True)
class NetnsLink:
    """A network namespace joined to this one by a veth pair: an address on each side, nothing else."""

    namespace: str
    host_ip: str  # this side (for the head)
    ns_ip: str  # the namespace's side (for the second node)


@contextlib.contextmanager
def netns_link() -> Iterator[NetnsLink]:
    """Create a network namespace and a veth pair with a /30 of 10.x addresses not in use here; delete both on exit.

    Needs root (``CAP_NET_ADMIN``) and ``ip``; raises :class:`NetnsUnavailable` otherwise. The machine's own
    interfaces and routes are not touched: the pair carries only its own /30.
    """
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        raise NetnsUnavailable("needs root and the `ip` command (iproute2)")
    used = subprocess.run([ip, "-o", "addr"], capture_output=True, text=True).stdout
    rng = random.Random()
    while True:
        net = f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.{rng.randrange(0, 256, 4)}"
        base = net.rsplit(".", 1)[0]
        if f" {base}." not in used:
            break
    last = int(net.rsplit(".", 1)[1])
    tag = f"{os.getpid() % 100000}{rng.randint(0, 99):02d}"
    link = NetnsLink(namespace=f"mxray{tag}", host_ip=f"{base}.{last + 1}", ns_ip=f"{base}.{last + 2}")
    here, there = f"mxa{tag}", f"mxb{tag}"
    steps = [[ip, "netns", "add", link.namespace],
             [ip, "link", "add", here, "type", "veth", "peer", "name", there, "netns", link.namespace],
             [ip, "addr", "add", f"{link.host_ip}/30", "dev", here],
             [ip, "link", "set", here, "up"],
             [ip, "-n", link.namespace, "addr", "add", f"{link.ns_ip}/30", "dev", there],
             [ip, "-n", link.namespace, "link", "set", there, "up"],
             [ip, "-n", link.namespace, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                raise NetnsUnavailable(f"`{' '.join(step[1:])}` failed: {done.stderr.strip()}")
        yield link
    finally:  # deleting the namespace deletes its end of the pair, and with it this end
        subprocess.run([ip, "link", "del", here], capture_output=True)
        subprocess.run([ip, "netns", "del", link.namespace], capture_output=True)


@contextlib.contextmanager
def ray_node_in(link: NetnsLink, head: RayHead, num_cpus: int = 2, *, root: Path | None = None,
                timeout_s: float = START_TIMEOUT_S) -> Iterator[RayProcess]:
    """A second node of ``head``'s cluster, ``ray start --address`` run inside ``link``'s namespace at its address
    (the head must listen on ``link.host_ip``); stopped and its folder removed on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="mxray-", dir=root))
    command = [shutil.which("ip") or "ip", "netns", "exec", link.namespace,
               *_ray_command(f"--address={head.address}", f"--node-ip-address={link.ns_ip}",
                             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}")]
    env = ray_env(link.ns_ip, head.token_file, RAY_AUTH_MODE="token")  # a joining node does not look for a token
    try:
        node = _start(command, env, temp_dir, timeout_s)
        try:
            yield node
        finally:
            node.stop()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
