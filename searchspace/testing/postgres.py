"""A throwaway PostgreSQL server for tests and benches: its own cluster in a temporary folder, on 127.0.0.1 only.

>>> with postgres_server() as url:                                      # doctest: +SKIP
...     optuna.create_study(storage=open_storage(url), study_name="s")
>>> url                                                                  # doctest: +SKIP
'postgresql+psycopg://postgres@127.0.0.1:40123/mixernas'

The cluster trusts every local connection (no password) and listens on 127.0.0.1 and on a unix socket inside its
folder, never on another address. It needs the server binaries (Debian: ``apt-get install postgresql``), found with
``pg_config --bindir``, else under ``/usr/lib/postgresql/<newest>/bin``, else on ``PATH``. PostgreSQL refuses to run
as root; as root the cluster is run as the ``postgres`` system user. Every step has a time limit, and the server is
stopped and its folder removed on exit, whatever happened inside; a watchdog does it if the process that started
the server is killed first.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

DATABASE = "mixernas"
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"  # who runs the server when we are root
STEP_TIMEOUT_S = 60  # initdb, start, create database; each is seconds on a 2-core machine
_NEEDED = ("initdb", "pg_ctl", "postgres")
_MAX_SOCKET_DIR = 80  # a unix socket path is limited to 107 bytes; the folder is followed by "/.s.PGSQL.<port>"


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine (tests skip on it, except in CI)."""


def postgres_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``; :class:`PostgresNotFound` if there is none."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name))
    candidates += reversed(versions)  # Debian's layout, newest first
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)  # through symlinks, to where pg_ctl and postgres are
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in _NEEDED):
            return folder
    raise PostgresNotFound("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found by pg_config, under "
                           "/usr/lib/postgresql/*/bin or on PATH; install them (Debian: apt-get install postgresql)")


@contextlib.contextmanager
def postgres_server(tmp_dir: str | os.PathLike | None = None, *, bindir: str | os.PathLike | None = None,
                    settings: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start a fresh PostgreSQL cluster with an empty database ``mixernas``; yields its SQLAlchemy URL.

    Args:
        tmp_dir: folder the cluster's folder is made in (default: the system's temporary folder). As root, a folder
            the ``postgres`` user cannot enter (pytest's ``tmp_path`` is private to root) is replaced by the
            system's temporary folder, and so is one whose path is too long for a unix socket.
        bindir: the server binaries' folder (default: :func:`postgres_bindir`).
        settings: extra server settings, e.g. ``{"fsync": "off"}``.
    """
    bindir = Path(bindir) if bindir else postgres_bindir()
    as_user = _run_as_prefix()
    folder = _make_folder(tmp_dir, as_user)
    data, log = folder / "data", folder / "server.log"
    watchdog = _watchdog(as_user, bindir, folder, data)
    try:
        _step(as_user, [bindir / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                        "--locale=C", "--no-sync"], folder, "initdb")
        # single-user mode, before the server starts: needs no client binary and no driver
        _step(as_user, [bindir / "postgres", "--single", "-D", data, "postgres"], folder, "create the database",
              stdin=f"CREATE DATABASE {DATABASE};\n")
        port = _start(as_user, bindir, folder, data, log, settings or {})
        try:
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            _stop(as_user, bindir, folder, data)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.killpg(watchdog.pid, signal.SIGKILL)  # its own session: the shell and its sleep
        with contextlib.suppress(subprocess.SubprocessError):
            watchdog.wait(timeout=10)


# ----------------------------------------------------------------------------------------------- internals


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


def _run_as_prefix() -> list[str]:
    """The command prefix that runs the server binaries as a user other than root ([] when we are not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise RuntimeError(f"PostgreSQL refuses to run as root and there is no {SYSTEM_USER!r} user to run it as; "
                           f"create one (useradd --system {SYSTEM_USER}) or run the tests as another user") from None
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", SYSTEM_USER, "--"]
    if setpriv := shutil.which("setpriv"):
        return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"]
    raise RuntimeError(f"PostgreSQL refuses to run as root, and neither runuser nor setpriv is here to run it as "
                       f"{SYSTEM_USER!r}")


def _make_folder(tmp_dir: str | os.PathLike | None, as_user: Sequence[str]) -> Path:
    for parent in ([tmp_dir] if tmp_dir is not None else []) + [None]:
        folder = Path(tempfile.mkdtemp(prefix="pg-", dir=parent))
        if len(str(folder)) <= _MAX_SOCKET_DIR and _usable_by_server(folder, as_user):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"the {SYSTEM_USER!r} user cannot write to a folder in {tempfile.gettempdir()}")


def _usable_by_server(folder: Path, as_user: Sequence[str]) -> bool:
    if not as_user:
        return True
    account = pwd.getpwnam(SYSTEM_USER)
    os.chown(folder, account.pw_uid, account.pw_gid)
    try:
        return subprocess.run([*as_user, "test", "-w", str(folder)], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _step(as_user: Sequence[str], argv: Sequence[str | os.PathLike], cwd: Path, what: str,
          stdin: str | None = None) -> None:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    for name in [n for n in env if n.startswith("PG")]:  # the user's PGHOST/PGPORT/... must not leak in
        del env[name]
    try:
        done = subprocess.run([*as_user, *map(str, argv)], cwd=cwd, env=env, input=stdin, capture_output=True,
                              text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"PostgreSQL test server: {what} took more than {STEP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"PostgreSQL test server: {what} failed (exit status {done.returncode}):\n{tail}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(as_user: Sequence[str], bindir: Path, folder: Path, data: Path, log: Path,
           settings: Mapping[str, str]) -> int:
    for attempt in range(3):  # another process may take the free port between our probe and the server's bind
        port = _free_port()
        options = {"listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": str(folder),
                   **settings}
        try:
            _step(as_user, [bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(STEP_TIMEOUT_S - 10), "-o",
                            " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in options.items()), "start"],
                  folder, "start")
            return port
        except RuntimeError as exc:
            _stop(as_user, bindir, folder, data)
            if attempt == 2:
                log_tail = log.read_text(errors="replace").strip().splitlines()[-10:] if log.exists() else []
                raise RuntimeError("\n".join([str(exc), *log_tail])) from None
    raise AssertionError("unreachable")


def _stop_command(as_user: Sequence[str], bindir: Path, data: Path) -> list[str]:
    return [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "20", "stop"]


def _watchdog(as_user: Sequence[str], bindir: Path, folder: Path, data: Path) -> subprocess.Popen:
    """A shell that stops the server and removes its folder if this process dies without doing it (SIGKILL,
    a CI timeout): no cluster outlives the tests that started it."""
    stop = " ".join(map(shlex.quote, _stop_command(as_user, bindir, data)))
    script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; "
              f"rm -rf {shlex.quote(str(folder))}")
    return subprocess.Popen(["sh", "-c", script], cwd="/", start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(as_user: Sequence[str], bindir: Path, folder: Path, data: Path) -> None:
    try:
        _step([], _stop_command(as_user, bindir, data), folder, "stop")
        return
    except RuntimeError:  # not running (a failed start), or pg_ctl hung: end the server ourselves if it is there
        pass
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        if b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes():  # never a process that reused a stale pid
            os.kill(pid, signal.SIGKILL)
