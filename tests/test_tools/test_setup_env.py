"""tools/dev/setup_env.sh stops at the step that fails, saying why.

Both cases run the real script on a throw-away venv path; neither installs anything.
"""
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / 'tools' / 'dev' / 'setup_env.sh'


def _run_setup(venv: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, 'VENV': str(venv), **env}
    return subprocess.run(['bash', str(SETUP)],
                          env=full_env,
                          capture_output=True,
                          text=True,
                          timeout=120)


def test_failed_pip_install_stops_the_setup(tmp_path: Path) -> None:
    """A pip failure (here exit 3, as with a full disk) ends the set-up at that step."""
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    fake_python = venv / 'bin' / 'python'
    calls = tmp_path / 'calls.txt'
    fake_python.write_text('#!/usr/bin/env bash\n'
                           f'echo "$*" >> {calls}\n'
                           'echo "ERROR: Could not install packages due to an OSError: '
                           '[Errno 28] No space left on device" >&2\n'
                           'exit 3\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)

    result = _run_setup(venv)

    assert result.returncode == 3, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert 'No space left on device' in out
    assert "'pip install pip>=24.1" in out and 'failed (exit 3)' in out
    # nothing after the failed step ran: one call, the first pip install, and no stamp
    python_calls = calls.read_text().splitlines()
    assert len(python_calls) == 1, python_calls
    assert python_calls[0].startswith('-m pip install -q pip>=24.1')
    assert '[setup' in out and 'mmcv 2.1.0' not in out
    assert not (venv / '.mmpsa-setup').exists()


def test_new_venv_needs_free_space(tmp_path: Path) -> None:
    """Too little free space for a new venv is said before anything is created."""
    venv = tmp_path / 'venv'
    result = _run_setup(venv, MMPSA_SETUP_NEED_GB='1000000')

    assert result.returncode == 1
    assert f'under {tmp_path}, a new {venv} needs about 1000000 GB' in result.stderr
    assert not venv.exists()


def test_free_space_setting_must_be_a_number(tmp_path: Path) -> None:
    """A threshold that is not a whole number of GB is named with its value."""
    venv = tmp_path / 'venv'
    result = _run_setup(venv, MMPSA_SETUP_NEED_GB='8x')

    assert result.returncode == 1
    assert "MMPSA_SETUP_NEED_GB must be a whole number of GB, not '8x'" in result.stderr
    assert not venv.exists()
