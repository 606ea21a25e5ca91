"""tools/reproduce.py: the dry-run commands parse with the launchers' own parsers, and a small
table's gathered numbers are the runs' own logged metrics (a killed run resumes; an unfinished
one is reported as such)."""
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Tuple

import pytest

from mmpsa.utils.reproduce import (FINISHED, LAUNCHERS, NOT_STARTED, UNFINISHED, LaunchOptions,
                                   gather, launch, load_table)

REPO = Path(__file__).resolve().parents[2]
OPTS = {
    'local': LaunchOptions('local'),
    'pytorch': LaunchOptions('pytorch', gpus=8, nnodes=2),
    'slurm': LaunchOptions('slurm', gpus=16, gpus_per_node=8, partition='gpu'),
    'mim': LaunchOptions('mim', gpus=4),
}


def _module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_parser(path: Path):
    """``parse_args(argv)`` of a tools/*.py (mmpsa's take argv; the stock ones read sys.argv)."""
    module = _module(path, f'tool_{abs(hash(str(path)))}')

    def parse(argv: List[str]):
        saved = sys.argv
        sys.argv = [str(path)] + list(argv)
        try:
            return module.parse_args()
        finally:
            sys.argv = saved

    return parse


def _dry_run(table: str, opts: LaunchOptions, tmp_path: Path) -> List[Tuple[str, Dict, List]]:
    """``(step, env, argv)`` of every command the dry run prints."""
    lines: List[str] = []
    launch(load_table(table), str(tmp_path / 'w'), opts, dry_run=True, echo=lines.append)
    commands = []
    for line in lines:
        match = re.match(r'\[\d+/\d+\] \S+: (train|test): (.*)$', line)
        if match:
            words = shlex.split(match.group(2))
            env = {}
            while '=' in words[0] and not words[0].startswith('-'):
                key, value = words.pop(0).split('=', 1)
                env[key] = value
            commands.append((match.group(1), env, words))
    assert commands and len(commands) == 2 * len([line
                                                  for line in lines if ': test: ' in line]), lines
    return commands


def _recorded(script_argv: List[str], env: Dict[str, str], stand_in: str,
              tmp_path: Path) -> List[str]:
    """Run a wrapper script with a stand-in executable first on PATH; its recorded argv."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / 'argv'
    fake = bin_dir / stand_in
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > {record}\n')
    fake.chmod(0o755)
    run_env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', **env)
    subprocess.run(script_argv, env=run_env, check=True, capture_output=True, cwd=REPO)
    return record.read_bytes().decode().split('\0')[:-1]


def _check_mmpsa_tool(step: str, argv: List[str], work_dir_end: str) -> None:
    args = _tool_parser(REPO / 'tools' / f'{step}.py')(argv)
    assert Path(args.config).name.endswith('.py')
    assert args.work_dir.endswith(work_dir_end)
    if step == 'train':  # exact resume injected wherever mmpsa's tools/train.py runs
        assert args.cfg_options['runner_type'] == 'mmpsa.engine.ExactResumeRunner'
    else:
        assert args.checkpoint.endswith('.pth')


@pytest.mark.parametrize('table', ['cityscapes', 'coco'])
@pytest.mark.parametrize('launcher', LAUNCHERS)
def test_dry_run_commands_parse_as_the_launchers_do(table, launcher, tmp_path):
    opts = OPTS[launcher]
    if launcher == 'slurm':  # a data root with a space: the scripts must keep it one argument
        opts = LaunchOptions(
            'slurm', gpus=16, gpus_per_node=8, partition='gpu', data_root=str(tmp_path / 'my data'))
    for step, env, argv in _dry_run(table, opts, tmp_path):
        end = 'test' if step == 'test' else argv[argv.index('--work-dir') + 1].split('/')[-1]
        if launcher == 'local':
            assert argv[1].endswith(f'tools/{step}.py')
            _check_mmpsa_tool(step, argv[2:], end)
        elif launcher == 'pytorch':
            from torch.distributed.run import get_args_parser
            assert argv[:2] == ['bash', f'tools/dist_{step}.sh']
            recorded = _recorded(argv, env, 'python', tmp_path)
            assert recorded[:2] == ['-m', 'torch.distributed.run']
            ns = get_args_parser().parse_args(recorded[2:])
            assert (ns.nnodes, ns.nproc_per_node) == ('2', '8')
            assert ns.training_script.endswith(f'tools/{step}.py')
            _check_mmpsa_tool(step, ns.training_script_args, end)
        elif launcher == 'slurm':
            assert argv[:2] == ['bash', f'tools/slurm_{step}.sh']
            recorded = _recorded(argv, env, 'srun', tmp_path)
            at = recorded.index('python')
            assert {'-p', 'gpu', '--ntasks=16', '--ntasks-per-node=8'} <= set(recorded[:at])
            assert recorded[at + 1:at + 3] == ['-u', f'tools/../tools/{step}.py'] or \
                recorded[at + 2].endswith(f'tools/{step}.py')
            args = recorded[at + 3:]
            _check_mmpsa_tool(step, args, end)
            assert f'train_dataloader.dataset.data_root={tmp_path}/my data/' in args
        else:
            from mim.commands.test import cli as mim_test
            from mim.commands.train import cli as mim_train
            assert argv[:2] == ['mim', step]
            cli = mim_train if step == 'train' else mim_test
            params = cli.make_context(step, argv[2:]).params
            assert (params['gpus'], params['launcher']) == (4, 'pytorch')
            assert Path(params['config']).is_file(), params['config']
            package = params['package']
            other = list(params['other_args'])
            if step == 'test':
                other = [params['config'], params['checkpoint']] + other
            else:
                other = [params['config']] + other
            spec = importlib.util.find_spec(package)
            stock_tool = Path(spec.origin).parent / '.mim' / 'tools' / f'{step}.py'
            args = _tool_parser(stock_tool)(other)
            assert args.work_dir.endswith(end)
            if step == 'train':  # mmseg's tool honours runner_type, mmpose's ignores it
                has = (args.cfg_options or {}).get('runner_type')
                assert bool(has) == (package == 'mmseg')


SMALL_TABLE = """
title = 'small'
task = 'Demo'
dataset = 'tiny synthetic data'
data = 'tiny'
rows = [dict(psa='mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py',
             stock='mmseg/tiny/fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py',
             metric='mIoU', label='mIoU',
             cfg_options={'train_cfg.max_iters': 8, 'train_cfg.val_interval': 8,
                          'default_hooks.checkpoint.interval': 4,
                          'default_hooks.logger.interval': 2})]
"""


def _logged_miou(run_dir: Path) -> float:
    """The mIoU that the test run's own text log prints."""
    logs = sorted((run_dir / 'test').glob('*/*.log'))
    found = re.findall(r'mIoU: ([0-9.]+)', logs[-1].read_text())
    return float(found[-1])


def test_killed_run_resumes_and_gather_reports_the_logged_metrics(tmp_path):
    table = tmp_path / 'small.py'
    table.write_text(SMALL_TABLE)
    work = tmp_path / 'w'
    cmd = [
        sys.executable,
        str(REPO / 'tools/reproduce.py'),
        str(table), 'launch', '--work-dir',
        str(work)
    ]
    psa_dir = work / 'small' / 'psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128'
    # kill the launch (and its training) once the first checkpoint is written
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (psa_dir / 'last_checkpoint').is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (psa_dir / 'iter_4.pth').is_file() and not (psa_dir / 'iter_8.pth').exists()

    rows = gather(load_table(str(table)), str(work))
    assert (rows[0]['psa'], rows[0]['psa_state']) == (None, UNFINISHED)
    assert (rows[0]['stock'], rows[0]['stock_state']) == (None, NOT_STARTED)

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert 'resumed and trained' in out.splitlines()[0], out
    assert len(out.splitlines()) == 4, out  # one line per train and per test
    train_log = sorted(psa_dir.glob('2*/*.log'))[-1].read_text()
    assert 'resumed' in train_log.lower()

    rows = gather(load_table(str(table)), str(work))
    stock_dir = work / 'small' / 'fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128'
    assert rows[0]['psa_state'] == rows[0]['stock_state'] == FINISHED
    assert rows[0]['psa'] == _logged_miou(psa_dir)
    assert rows[0]['stock'] == _logged_miou(stock_dir)
    assert rows[0]['delta'] == round(rows[0]['psa'] - rows[0]['stock'], 2)
    assert rows[0]['checkpoint'].endswith('iter_8.pth')
    assert rows[0]['memory_mb'] is None  # CPU: the logs have none
