"""Test-session settings shared by every test file.

The latency cache (``$MIXERNAS_CACHE_DIR``: lookup tables and the reference workload's anchors) points at one
temporary folder for the whole session, so no test reads or writes the user's ``~/.cache/mixernas``, and the
reference anchor of each input is measured once per session rather than once per test.

It is set once for the session (not per test) so that a test or a module fixture that points the variable
elsewhere itself (``monkeypatch.setenv``, ``pytest.MonkeyPatch.context()``) overrides it for its own scope and
is undone back to the session folder afterwards.

``postgres_url`` is a real PostgreSQL server, started once per session on 127.0.0.1 in a temporary folder
(:mod:`searchspace.testing.postgres`). Without the server binaries or the psycopg driver its tests are skipped,
except in CI (``$CI`` set), where they fail: CI must run them.
"""

import importlib.util
import os

import pytest
import torch

from searchspace.latency.cache import CACHE_ENV


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory):
    """The session's latency cache folder (what ``$MIXERNAS_CACHE_DIR`` points at unless a test says otherwise)."""
    return tmp_path_factory.mktemp("mixernas-cache")


@pytest.fixture(scope="session", autouse=True)
def _latency_cache_in_a_temporary_folder(session_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(session_cache_dir))
        yield session_cache_dir


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """SQLAlchemy URL of a throwaway PostgreSQL database, ``postgresql+psycopg://postgres@127.0.0.1:PORT/mixernas``."""
    from searchspace.testing.postgres import PostgresNotFound, postgres_bindir, postgres_server

    try:
        bindir = postgres_bindir()
        if importlib.util.find_spec("psycopg") is None:
            raise PostgresNotFound("the psycopg driver is not installed: pip install -e '.[postgres]'")
    except PostgresNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}")
        pytest.skip(str(exc))
    with postgres_server(tmp_path_factory.mktemp("postgres"), bindir=bindir) as url:
        yield url


@pytest.fixture
def one_torch_thread():
    """Torch computes on one thread during the test (steadier on a small shared CPU), then gets its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
