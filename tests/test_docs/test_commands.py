"""The commands the README and Get started mark ``<!-- runnable -->`` run and exit 0.

Each runs in the repository root with this Python's folder first on ``PATH`` (so ``python`` is
the venv's), under a timeout. Only cheap commands are marked: ``--help``, ``--dry-run``, tiny data
under ``outputs/``. See docs/en/advanced_guides/tests.md.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .markdown import COMMAND_FILES, REPO, blocks, commands, runnable_commands

TIMEOUT_S = 120
COMMANDS = [item for path in COMMAND_FILES for item in runnable_commands(path)]


def run(command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env['PATH'] = str(Path(sys.executable).parent) + os.pathsep + env.get('PATH', '')
    env.setdefault('CUDA_VISIBLE_DEVICES', '')
    return subprocess.run(['bash', '-o', 'pipefail', '-c', command],
                          cwd=REPO,
                          env=env,
                          stdin=subprocess.DEVNULL,
                          capture_output=True,
                          text=True,
                          timeout=TIMEOUT_S)


def test_both_files_mark_commands():
    for path in COMMAND_FILES:
        assert runnable_commands(path), f'{path.relative_to(REPO)} marks no runnable command'


@pytest.mark.parametrize('where,command', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, command):
    result = run(command)
    assert result.returncode == 0, (f'{where}: `{command}` exited {result.returncode}\n'
                                    f'{result.stdout[-2000:]}\n{result.stderr[-3000:]}')


def test_the_marker_and_the_parser():
    text = '\n'.join([
        '<!-- runnable -->', '', '```bash', '# a comment', 'python a.py \\', '    --flag  # note',
        'python b.py', '```', '', '```bash', 'make demo', '```', '<!-- runnable -->', 'text',
        '```bash', 'make test', '```'
    ])
    found = list(blocks(text))
    assert [(lang, marked) for _, lang, _, marked in found] == [('bash', True), ('bash', False),
                                                                ('bash', False)]
    assert commands(found[0][2]) == ['python a.py --flag  # note', 'python b.py']
