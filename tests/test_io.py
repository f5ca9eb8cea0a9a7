"""Result files are written whole and readable by whoever shares the folder (the umask decides, as for open())."""

from __future__ import annotations

import os
import stat

import pytest

from searchspace._io import atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "# result\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == mode
    assert (tmp_path / "report.md").read_text() == "# result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left beside it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "best.json", "{}")
    with pytest.raises(AttributeError):
        atomic_write_text(tmp_path / "best.json", None)  # type: ignore[arg-type]
    assert (tmp_path / "best.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1
