"""Test-session settings shared by every test file.

The latency cache (``$MIXERNAS_CACHE_DIR``: lookup tables and the reference workload's anchors) points at one
temporary folder for the whole session, so no test reads or writes the user's ``~/.cache/mixernas``, and the
reference anchor of each input is measured once per session rather than once per test.

It is set once for the session (not per test) so that a test or a module fixture that points the variable
elsewhere itself (``monkeypatch.setenv``, ``pytest.MonkeyPatch.context()``) overrides it for its own scope and
is undone back to the session folder afterwards.
"""

import pytest

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
