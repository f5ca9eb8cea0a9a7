"""Study storage URLs as users write them, against a real PostgreSQL server the tests start (conftest.py)."""

import importlib.util
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from searchspace.errors import MixerNASError
from searchspace.nas.storage import display_url, open_storage

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-pw"
FAST = ["--evaluator", "zero-cost", "--space", "tiny", "--epochs", "1", "--final-epochs", "1", "--input-size", "16",
        "--quiet", "--timeout", "300", "--train-threads", "1", "--baselines", "none"]


def as_user_writes_it(url: str) -> str:
    """The fixture's URL without the driver: ``postgresql://postgres@127.0.0.1:PORT/mixernas``."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search_py(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "search.py"), "--latency-budget", "50ms", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("search.py: error: ")
    return lines[-1]


# ----------------------------------------------------------------------------------------------- a real server


def test_a_postgresql_url_without_driver_creates_and_reloads_a_study(postgres_url):
    url, name = as_user_writes_it(postgres_url), f"roundtrip-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    for spelling in (url, url.replace("postgresql://", "postgres://", 1), postgres_url):
        reloaded = optuna.load_study(study_name=name, storage=open_storage(spelling))
        assert [t.params for t in reloaded.trials] == [t.params for t in study.trials]
        assert all(t.state == TrialState.COMPLETE for t in reloaded.trials)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_heartbeat_arguments_reach_optuna(postgres_url):
    # Optuna 4.9 renamed the callback (RetryFailedTrialCallback, failed_trial_callback); both spellings work
    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
        or optuna.storages.RetryFailedTrialCallback
    retry = retry_class(max_retry=1)
    storage = open_storage(postgres_url, heartbeat_interval=5, grace_period=20, failed_trial_callback=retry)
    assert storage.get_heartbeat_interval() == 5
    assert storage.grace_period == 20
    getter = getattr(storage, "get_heartbeat_stale_trial_callback", None) or storage.get_failed_trial_callback
    assert getter() is retry


def test_a_missing_database_names_the_server_and_the_fix(postgres_url):
    url = as_user_writes_it(postgres_url).rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(MixerNASError) as info:
        open_storage(url)
    message = str(info.value)
    assert "\n" not in message and "no_such_db" in message and "127.0.0.1:" in message
    assert "database name" in message


@pytest.mark.slow
def test_search_py_runs_a_study_in_postgresql(postgres_url, tmp_path):
    name = f"search-{uuid.uuid4().hex[:8]}"
    result = search_py("--trials", "3", "--storage", as_user_writes_it(postgres_url), "--study-name", name,
                       "--out", str(tmp_path / "run"), *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name=name, storage=postgres_url).trials
    # evaluated trials; a draw that repeats an earlier candidate is recorded as failed and not counted
    evaluated = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(evaluated) == 3, [(t.state.name, t.user_attrs) for t in trials]
    assert all(t.state.is_finished() for t in trials)
    assert (tmp_path / "run" / "best.json").exists()


# ----------------------------------------------------------------------------------------------- failures: one line


def test_an_unreachable_server_is_one_line_naming_host_port_without_the_password():
    port = closed_port()
    with pytest.raises(MixerNASError) as info:
        open_storage(f"postgresql://mixer:{PASSWORD}@127.0.0.1:{port}/nas")
    message = str(info.value)
    assert "\n" not in message and PASSWORD not in message
    assert f"127.0.0.1:{port}" in message and "running" in message
    assert "postgresql://mixer:***@127.0.0.1" in message  # the URL as written, password masked


@pytest.mark.slow
def test_search_py_with_an_unreachable_server_exits_2_with_one_line(tmp_path):
    port = closed_port()
    result = search_py("--trials", "3", "--storage", f"postgresql://mixer:{PASSWORD}@127.0.0.1:{port}/nas",
                       "--out", str(tmp_path / "run"), *FAST)
    line = one_error_line(result)
    assert f"127.0.0.1:{port}" in line and "server is running" in line
    assert PASSWORD not in result.stderr + result.stdout


def _missing_driver() -> str:
    for driver in ("pg8000", "psycopg2", "asyncpg"):
        if importlib.util.find_spec(driver) is None:
            return driver
    pytest.skip("pg8000, psycopg2 and asyncpg are all installed: no missing driver to ask for")


@pytest.mark.slow
def test_search_py_with_a_missing_driver_exits_2_naming_the_install(tmp_path):
    driver = _missing_driver()
    result = search_py("--trials", "3", "--storage", f"postgresql+{driver}://mixer:{PASSWORD}@127.0.0.1:1/nas",
                       "--out", str(tmp_path / "run"), *FAST)
    line = one_error_line(result)
    assert f"pip install {driver}" in line and "pip install 'mixernas[postgres]'" in line
    assert PASSWORD not in result.stderr + result.stdout


def test_without_psycopg_the_message_names_the_postgres_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails, as when it is not installed
    with pytest.raises(MixerNASError, match=r"needs the psycopg driver.*pip install 'mixernas\[postgres\]'") as info:
        open_storage(f"postgresql://mixer:{PASSWORD}@db.example:5432/nas")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("url, expected", [
    ("not a url", "malformed storage URL"),
    (f"postgresql://mixer:{PASSWORD}@host:port/nas", "malformed storage URL"),
    ("nosuchdb://host/nas", "unknown database or driver 'nosuchdb'"),
    ("postgresql+nosuchdriver://host/nas", "unknown database or driver"),
])
def test_a_malformed_url_is_one_line(url, expected):
    with pytest.raises(MixerNASError, match=expected) as info:
        open_storage(url)
    assert "\n" not in str(info.value) and PASSWORD not in str(info.value)


# ----------------------------------------------------------------------------------------------- SQLite, display


def test_sqlite_waits_for_the_lock_of_other_processes(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert storage.engine_kwargs == {"connect_args": {"timeout": 60}}
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_int("n", 0, 3), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=open_storage(storage.url)).trials) == 1


def test_a_sqlite_file_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(MixerNASError, match="cannot open the storage .*folder exists"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'study.db'}")


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://mixer:{PASSWORD}@db.lan:5432/nas", "postgresql://mixer:***@db.lan:5432/nas"),
    ("postgresql://mixer@db.lan/nas", "postgresql://mixer@db.lan/nas"),
    (f"postgresql://mixer:{PASSWORD}@db.lan:port/nas", "postgresql://mixer:***@db.lan:port/nas"),  # unparseable
    ("sqlite:///runs/study.db", "sqlite:///runs/study.db"),
])
def test_display_url_hides_the_password(url, shown):
    assert display_url(url) == shown
