"""The README's promises: its set-up command is what CI runs, and its Python examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    commands = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, "the README gives exactly one test command"
    install_and_test = commands[0].split("&&", 2)[-1].strip()  # after creating and activating the venv
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci, f".ci/run must run the README's command: {install_and_test}"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    blocks = _python_blocks()
    api, timm_block, mixer, contract = blocks[0], blocks[1], blocks[2], blocks[3]
    script = "\n".join([api, timm_block, mixer, contract])
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 10])" in result.stdout
