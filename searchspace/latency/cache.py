"""Where measured latencies are kept on disk, and the lock that lets processes share them.

One folder: ``$MIXERNAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixernas``, else ``~/.cache/mixernas``; latency
files live in its ``latency/`` sub-folder. Writes are atomic and made under an exclusive lock (``fcntl.flock`` on a
``.lock`` file beside the data), so two processes filling the same file never lose each other's work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CACHE_ENV = "MIXERNAS_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$MIXERNAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixernas``, else ``~/.cache/mixernas``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "mixernas"


def latency_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of latency files under ``cache_dir`` (None: :func:`default_cache_dir`)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "latency"


def digest(fields: Mapping[str, Any]) -> str:
    """A short, stable name for a key of plain fields (a file name, never parsed back)."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path.lock`` between processes (released when the file is closed, even on a crash)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
