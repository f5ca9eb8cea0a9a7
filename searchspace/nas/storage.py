"""Opening a study storage from the URL a user writes: SQLite in the results folder, or a database server.

``--storage postgresql://user@host/db`` works as written: a URL without a driver gets psycopg 3 (the ``postgres``
extra), and every way it can fail (no driver, no server, wrong credentials, a malformed URL) is one line that names
the fix, with the password masked.

>>> display_url("postgresql://mixer:secret@db.lan:5432/nas")
'postgresql://mixer:***@db.lan:5432/nas'
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from ..errors import MixerNASError, first_line

POSTGRES_INSTALL = "pip install 'mixernas[postgres]'"
CONNECT_TIMEOUT_S = 10  # an address that drops packets fails in seconds, not after the OS's minutes-long TCP timeout
SQLITE_LOCK_TIMEOUT_S = 60  # several local processes may share one SQLite file: wait for its lock, do not fail
CREATE_ATTEMPTS = 5  # opens of a new database, racing other workers to create its tables, a moment apart
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")  # for strings too malformed for SQLAlchemy to parse

FailedTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 failed_trial_callback: FailedTrialCallback | None = None) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url``, connected and with its tables created.

    ``postgresql://`` (or ``postgres://``) without a driver means psycopg 3; an explicit driver
    (``postgresql+psycopg2://``) is kept. The heartbeat arguments are Optuna's (:class:`optuna.storages.RDBStorage`):
    a trial whose process stops beating for ``grace_period`` seconds is failed, and ``failed_trial_callback`` (e.g.
    a retry callback) is called on it. Every failure to open is a :class:`~searchspace.errors.MixerNASError`.

    >>> storage = open_storage("sqlite:///:memory:")
    >>> optuna.create_study(storage=storage, study_name="demo").study_name
    'demo'
    """
    shown = display_url(url)  # as the user wrote it
    url = _with_driver(url)
    parsed = _parse(url, shown)
    _check_driver(parsed, shown)
    try:
        for attempt in range(CREATE_ATTEMPTS):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" to Optuna; the caller asked for them
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=_engine_kwargs(parsed),
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=failed_trial_callback)
            except sqlalchemy.exc.DBAPIError as exc:
                # workers that open a new database at the same moment race to create Optuna's tables: the ones
                # that lose find them made, and open it again
                if attempt + 1 == CREATE_ATTEMPTS or not _tables_made_meanwhile(exc):
                    raise
                time.sleep(0.1 * (attempt + 1))  # let the winner finish stamping the schema's version
    except sqlalchemy.exc.OperationalError as exc:  # no server, refused, wrong credentials, no such database/file
        raise MixerNASError(_connect_problem(parsed, shown, exc)) from None
    except sqlalchemy.exc.DBAPIError as exc:  # e.g. a user without the right to create Optuna's tables
        raise MixerNASError(f"cannot use the storage {shown}: {_reason(exc, parsed)}") from None
    except ImportError as exc:  # a module the driver itself needs
        raise MixerNASError(f"the storage {shown} needs a database driver that fails to import "
                            f"({first_line(exc.__cause__ or exc)}); install it, for PostgreSQL with "
                            f"{POSTGRES_INSTALL}") from None


def display_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and reports (malformed URLs are masked too)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return _PASSWORD_IN_URL.sub(r"\1***@", url)


# ----------------------------------------------------------------------------------------------- internals


def _with_driver(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):  # no driver named: psycopg 3, the postgres extra
        return f"postgresql+psycopg://{rest}"
    return url


def _parse(url: str, shown: str) -> URL:
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise MixerNASError(f"malformed storage URL {shown!r} ({first_line(exc)}); write e.g. "
                            f"postgresql://user@host:5432/db or sqlite:///path/study.db") from None


def _check_driver(url: URL, shown: str) -> None:
    """Fail now, naming the package, if the URL's database or driver is unknown or not installed."""
    try:
        dialect = url.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise MixerNASError(f"unknown database or driver {url.drivername!r} in the storage {shown}; write e.g. "
                            f"postgresql://user@host:5432/db or sqlite:///path/study.db") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = dialect.driver
        if url.get_backend_name() == "postgresql" and driver == "psycopg":
            fix = POSTGRES_INSTALL
        elif url.get_backend_name() == "postgresql":
            fix = f"pip install {driver}, or write postgresql:// without a driver to use psycopg ({POSTGRES_INSTALL})"
        else:
            fix = f"install the {driver} driver with pip ({first_line(exc)})"
        raise MixerNASError(f"the storage {shown} needs the {driver} driver, which is not installed: {fix}") from None


def _engine_kwargs(url: URL) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2") \
            and "connect_timeout" not in url.query:
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


def _tables_made_meanwhile(exc: sqlalchemy.exc.DBAPIError) -> bool:
    """The error of creating a table, or stamping its version, that another process has just made."""
    if isinstance(exc, sqlalchemy.exc.IntegrityError):  # the version stamp (alembic_version) written twice
        return True
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return "already exists" in text or "duplicate key" in text


def _reason(exc: sqlalchemy.exc.DBAPIError, url: URL) -> str:
    """The driver's own message on one line (SQLAlchemy's adds the SQL and a link), never with the password."""
    lines = str(exc.orig if exc.orig is not None else exc).splitlines()
    # libpq's hint "Is the server running on that host...?" is dropped: the message ends with a fuller one
    reason = " ".join(" ".join(line.split()) for line in lines if not line.strip().startswith("Is the server"))
    reason = reason or type(exc.orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


def _connect_problem(url: URL, shown: str, exc: sqlalchemy.exc.OperationalError) -> str:
    reason = _reason(exc, url)
    if url.get_backend_name() == "sqlite":
        return f"cannot open the storage {shown}: {reason}; check that the file's folder exists and is writable"
    host = url.host or url.query.get("host") or "localhost"  # a query's host= may name libpq's socket folder
    port = url.port or url.query.get("port") or _DEFAULT_PORTS.get(url.get_backend_name(), "?")
    where = f"{host}:{port}"
    return (f"cannot connect to the storage {shown} at {where}: {reason}; check that the database server is "
            f"running and reachable there, and the URL's user, password and database name")
