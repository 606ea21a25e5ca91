"""tools/reproduce.py: the dry-run commands parse with the launchers' own parsers, a small
table's gathered numbers are the runs' own logged metrics (a killed run resumes; an unfinished
one is reported as such), and publish writes only what the runs logged and recorded."""
import importlib.util
import json
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
import yaml

from mmpsa.analysis.model_index import COLLECTIONS
from mmpsa.analysis.reproduce import (FINISHED, LAUNCHERS, NOT_STARTED, UNFINISHED, LaunchOptions,
                                      gather, launch, load_table, publish)
from mmpsa.utils import run_record

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
        match = re.match(r'\[\d+/\d+\] \S+: (train|convert|test): (.*)$', line)
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
    # every job writes its run record
    assert args.cfg_options['default_hooks.run_record.type'] == run_record.HOOK_TYPE
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
        if step == 'convert':  # released weights: the converter, in this process's python
            module = _module(REPO / 'tools/model_converters/psa_official_to_mmseg.py', 'convert')
            args = module.parse_args(argv[2:])
            assert argv[0] == sys.executable and args.src in ('RELEASED_PSA_P.pth',
                                                              'RELEASED_PSA_S.pth')
            assert args.dst.endswith('converted.pth') and Path(args.config).is_file()
            assert 'official' in args.config and Path(args.dst).parent.name in args.config
            continue
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
            assert args.cfg_options['default_hooks.run_record.type'] == run_record.HOOK_TYPE


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


PSA_NAME = 'psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128'
STOCK_NAME = 'fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128'


@pytest.fixture(scope='module')
def small_run(tmp_path_factory) -> Dict:
    """A launch of the one-row small table, killed after its first checkpoint, gathered, then
    launched again to the end; what each step saw."""
    tmp_path = tmp_path_factory.mktemp('small')
    table = tmp_path / 'small.py'
    table.write_text(SMALL_TABLE)
    work = tmp_path / 'w'
    cmd = [
        sys.executable,
        str(REPO / 'tools/reproduce.py'),
        str(table), 'launch', '--work-dir',
        str(work)
    ]
    psa_dir = work / 'small' / PSA_NAME
    # kill the launch (and its training) once the first checkpoint is written
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (psa_dir / 'last_checkpoint').is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {
        'files': (psa_dir / 'iter_4.pth').is_file() and not (psa_dir / 'iter_8.pth').exists(),
        'rows': gather(load_table(str(table)), str(work)),
    }
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {'table': table, 'work': work, 'psa_dir': psa_dir, 'killed': killed, 'out': out}


def test_killed_run_resumes_and_gather_reports_the_logged_metrics(small_run):
    work, psa_dir, out = small_run['work'], small_run['psa_dir'], small_run['out']
    assert small_run['killed']['files']
    rows = small_run['killed']['rows']
    assert (rows[0]['psa'], rows[0]['psa_state']) == (None, UNFINISHED)
    assert (rows[0]['stock'], rows[0]['stock_state']) == (None, NOT_STARTED)

    assert 'resumed and trained' in out.splitlines()[0], out
    assert len(out.splitlines()) == 4, out  # one line per train and per test
    train_log = sorted(psa_dir.glob('2*/*.log'))[-1].read_text()
    assert 'resumed' in train_log.lower()

    rows = gather(load_table(str(small_run['table'])), str(work))
    stock_dir = work / 'small' / STOCK_NAME
    assert rows[0]['psa_state'] == rows[0]['stock_state'] == FINISHED
    assert rows[0]['psa'] == _logged_miou(psa_dir)
    assert rows[0]['stock'] == _logged_miou(stock_dir)
    assert rows[0]['delta'] == round(rows[0]['psa'] - rows[0]['stock'], 2)
    assert rows[0]['checkpoint'].endswith('iter_8.pth')
    assert rows[0]['memory_mb'] is None  # CPU: the logs have none


def _git_commit() -> str:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    return head or run_record.NOT_A_CHECKOUT


def test_run_records_are_written_by_the_jobs(small_run):
    psa_dir = small_run['psa_dir']
    train = run_record.read_records(psa_dir)
    test = run_record.read_records(psa_dir / 'test')
    assert len(train) == 2 and len(test) == 1  # the killed session, the resumed one; the test
    # one record beside each session's own log, with that session's timestamp
    logs = sorted(psa_dir.glob('2*/*.log'))
    assert [Path(r['log_dir']) for r in train] == [p.parent for p in logs]
    assert train[0]['end'] is None  # killed
    for record in train[1:] + test:
        assert record['start'] <= record['end']
    import mmcv
    import mmengine
    import mmseg
    import torch
    for record in train + test:
        assert (record['launcher'], record['world_size'], record['gpus_per_node'],
                record['gpu']) == ('none', 1, 0, None)
        versions = record['versions']
        assert (versions['torch'].split('+')[0], versions['mmcv'], versions['mmengine'],
                versions['mmsegmentation']) == (torch.__version__.split('+')[0], mmcv.__version__,
                                                mmengine.__version__, mmseg.__version__)
        assert versions['cuda'] == torch.version.cuda and versions['cuda_used'] is False
        assert record['mmpsa_commit'].split('+')[0] == _git_commit()
        assert record['packages_hash'] == run_record.packages_hash()


def _metafiles_with_tiny_entry(root: Path) -> Path:
    """A copy of mmpsa's metafiles, one of them with an entry for the small table's config."""
    for key in COLLECTIONS:
        (root / key).mkdir(parents=True)
        (root / key / 'metafile.yml').write_text(
            (REPO / 'configs' / key / 'metafile.yml').read_text())
    path = root / 'mmseg/psa_hrnet/metafile.yml'
    content = yaml.safe_load(path.read_text())
    content['Models'].append({
        'Name': PSA_NAME,
        'In Collection': content['Collections'][0]['Name'],
        'Config': f'configs/mmseg/tiny/{PSA_NAME}.py',
        'Metadata': {
            'Input': '64x128'
        }
    })
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_publish_writes_only_what_the_runs_logged_and_recorded(small_run, tmp_path):
    table = load_table(str(small_run['table']))
    work, psa_dir = str(small_run['work']), small_run['psa_dir']
    path = _metafiles_with_tiny_entry(tmp_path)
    before = path.read_text()

    def entry() -> Dict:
        return {m['Name']: m for m in yaml.safe_load(path.read_text())['Models']}[PSA_NAME]

    # without --weights-url: the result and what the records say, no Weights, no log
    assert publish(table, work, metafile_root=tmp_path) == [PSA_NAME]
    written = entry()
    assert set(written) == {'Name', 'In Collection', 'Config', 'Metadata', 'Results'}
    assert written['Results'] == [{
        'Task': 'Demo',
        'Dataset': 'tiny synthetic data',
        'Metrics': {
            'mIoU': _logged_miou(psa_dir)
        }
    }]
    train = run_record.read_records(psa_dir)
    versions = train[-1]['versions']
    assert written['Metadata'] == {
        'Input':
        '64x128',
        'Training Resources':
        '1x CPU (no GPU)',  # both sessions: world size 1, no GPU
        'Training Software':
        (f'torch {versions["torch"]} (CUDA {versions["cuda"]}, unused), mmcv {versions["mmcv"]}, '
         f'mmengine {versions["mmengine"]}, mmseg {versions["mmsegmentation"]}, '
         f'mmpose {versions["mmpose"]}, mmpsa {versions["mmpsa"]}; mmpsa commit: '
         f'{train[-1]["mmpsa_commit"]}'),
    }
    # the other models are untouched
    others = [m for m in yaml.safe_load(before)['Models'] if m['Name'] != PSA_NAME]
    now = yaml.safe_load(path.read_text())['Models']
    assert [m for m in now if m['Name'] != PSA_NAME] == others

    # with --weights-url: the tested checkpoint and the last training log under it
    url = 'https://host/mmpsa/'
    publish(table, work, weights_url=url, metafile_root=tmp_path)
    log = sorted(psa_dir.glob('2*/*.log'))[-1]
    assert entry()['Weights'] == f'https://host/mmpsa/{PSA_NAME}/iter_8.pth'
    assert entry()['Training log'] == f'https://host/mmpsa/{PSA_NAME}/{log.parent.name}/{log.name}'

    # a checkpoint that is not there is not published
    path.write_text(before)
    moved = psa_dir / 'iter_8.pth.away'
    (psa_dir / 'iter_8.pth').rename(moved)
    try:
        publish(table, work, weights_url=url, metafile_root=tmp_path)
    finally:
        moved.rename(psa_dir / 'iter_8.pth')
    assert 'Weights' not in entry() and 'Training log' in entry()
    assert json.loads(
        (psa_dir / 'test' / sorted(p.name for p in (psa_dir / 'test').iterdir() if p.is_dir())[-1] /
         'run_record.json').read_text())['launcher'] == 'none'
