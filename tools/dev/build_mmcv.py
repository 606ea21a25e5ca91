"""Build (or reuse) an mmcv wheel with compiled ops for the installed torch.

No mmcv 2.1.0 wheel exists for recent torch releases, and its sdist hard-codes
``-std=c++17`` while torch >= 2.10 headers demand C++20. This tool downloads
the sdist, sets the C++ standard the installed torch needs, builds CPU ops (and
CUDA ops when CUDA is present, honouring ``TORCH_CUDA_ARCH_LIST``) and keeps
the wheel outside any clone, in ``$MMPSA_CACHE_DIR/wheels`` (default
``~/.cache/mmpsa/wheels``), keyed by mmcv, torch, python, C++ standard and ops
in the wheel's build tag, e.g.::

    mmcv-2.1.0-0torch2.14.1.cu130.cxx20.cpuops-cp311-cp311-linux_x86_64.whl

pip's own wheel cache is keyed by the sdist only and would hand a wheel built
for one torch to another (undefined symbols at import), hence this cache.

Usage::

    python tools/dev/build_mmcv.py --install        # build if needed, then install
    python tools/dev/build_mmcv.py --print-path     # only print the cached wheel
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

DEFAULT_VERSION = '2.1.0'
MIN_FREE_GB = 3.0


def cache_dir() -> Path:
    """The wheel cache folder, ``$MMPSA_CACHE_DIR/wheels`` or ``~/.cache/mmpsa/wheels``."""
    root = os.environ.get('MMPSA_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'mmpsa')
    return Path(root) / 'wheels'


def torch_cxx_standard() -> int:
    """The C++ standard the installed torch's headers require (17 or 20)."""
    import torch.utils.cpp_extension as cpp_ext
    for inc in cpp_ext.include_paths():
        aten = Path(inc) / 'ATen' / 'ATen.h'
        if aten.is_file():
            text = aten.read_text(errors='ignore')
            return 20 if 'C++20 or later' in text else 17
    raise SystemExit('build_mmcv: torch headers (ATen/ATen.h) not found; '
                     'is torch installed with its development headers?')


def will_build_cuda() -> bool:
    """Whether mmcv's setup.py will compile CUDA ops (its own rule)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    wanted = torch.cuda.is_available() or os.environ.get('FORCE_CUDA') == '1'
    return bool(wanted and CUDA_HOME and torch.version.cuda)


def build_tag(mmcv_version: str) -> str:
    """The wheel build tag that keys the cache (must start with a digit)."""
    import torch
    torch_version = torch.__version__.replace('+', '.')
    ops = f'cuda{torch.version.cuda}ops' if will_build_cuda() else 'cpuops'
    if will_build_cuda():
        arch = os.environ.get('TORCH_CUDA_ARCH_LIST', 'native')
        ops += '.arch' + re.sub(r'[^0-9A-Za-z]+', '_', arch)
    return f'0torch{torch_version}.cxx{torch_cxx_standard()}.{ops}'


def find_cached(mmcv_version: str) -> Optional[Path]:
    """The cached wheel for this interpreter and torch, if one exists."""
    tag = build_tag(mmcv_version)
    py = f'cp{sys.version_info.major}{sys.version_info.minor}'
    for path in sorted(cache_dir().glob(f'mmcv-{mmcv_version}-{tag}-{py}-*.whl')):
        return path
    return None


def _check_toolchain() -> None:
    for tool in ('gcc', 'g++'):
        if shutil.which(tool) is None:
            raise SystemExit(f'build_mmcv: no {tool} on PATH; install a C++ '
                             'compiler (Debian: apt-get install build-essential)')
    import sysconfig
    include = Path(sysconfig.get_paths()['include']) / 'Python.h'
    if not include.is_file():
        raise SystemExit(f'build_mmcv: Python headers missing ({include}); '
                         'install python3-dev for this interpreter')
    for mod in ('ninja', 'pkg_resources'):
        try:
            __import__(mod)
        except ImportError:
            raise SystemExit(f'build_mmcv: python module {mod!r} is missing; mmcv builds '
                             "with --no-build-isolation and needs 'ninja' and a setuptools "
                             "that ships pkg_resources ('setuptools>=77,<81')")


def _check_disk(path: Path) -> None:
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < MIN_FREE_GB:
        raise SystemExit(f'build_mmcv: only {free_gb:.1f} GiB free under {path}; '
                         f'the build needs about {MIN_FREE_GB} GiB')


def _run_with_progress(cmd: List[str], env: dict, log_path: Path) -> None:
    """Run ``cmd``, show ninja's ``[i/n]`` progress, keep the full log."""
    print(f'build_mmcv: {" ".join(cmd)}\nbuild_mmcv: full log in {log_path}', flush=True)
    progress = re.compile(r'^\s*\[(\d+)/(\d+)\]')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = progress.match(line)
            if match:
                print(f'build_mmcv: compiling {match.group(1)}/{match.group(2)}', flush=True)
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text(errors='ignore').splitlines()[-40:]
        hints = []
        text = '\n'.join(tail)
        if 'No space left' in text:
            hints.append('the disk is full')
        if 'fatal error' in text and '.h: No such file' in text:
            hints.append('a header is missing (python3-dev? CUDA toolkit?)')
        if 'C++20 or later' in text:
            hints.append('torch needs C++20 but the build used an older standard')
        if 'Killed' in text or 'out of memory' in text.lower():
            hints.append('the compiler ran out of memory: lower MAX_JOBS')
        raise SystemExit('build_mmcv: build failed (exit %d)%s\n--- last lines ---\n%s' %
                         (code, ': ' + '; '.join(hints) if hints else '', text))


def build(mmcv_version: str, jobs: int) -> Path:
    """Download the sdist, patch the C++ standard, build and cache the wheel."""
    _check_toolchain()
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir)
    cxx = torch_cxx_standard()
    tag = build_tag(mmcv_version)
    with tempfile.TemporaryDirectory(prefix='mmcv-build-') as tmp:
        tmp_path = Path(tmp)
        _check_disk(tmp_path)
        print(f'build_mmcv: downloading mmcv=={mmcv_version} sdist', flush=True)
        subprocess.run([
            sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-build-isolation',
            '--no-binary', ':all:', '-q', '-d',
            str(tmp_path), f'mmcv=={mmcv_version}'
        ],
                       check=True)
        sdists = list(tmp_path.glob('mmcv-*.tar.gz'))
        if len(sdists) != 1:
            raise SystemExit(f'build_mmcv: expected one sdist, got {sdists}')
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp_path, filter='data')
        src = tmp_path / f'mmcv-{mmcv_version}'
        setup_py = src / 'setup.py'
        text = setup_py.read_text()
        patched = re.sub(r'-std=c\+\+\d+', f'-std=c++{cxx}', text)
        setup_py.write_text(patched)
        print(
            f'build_mmcv: C++ standard c++{cxx}; ops: '
            f'{"CPU + CUDA" if will_build_cuda() else "CPU only"}',
            flush=True)
        env = dict(os.environ, MMCV_WITH_OPS='1', MAX_JOBS=str(jobs))
        wheel_dir = tmp_path / 'dist'
        _run_with_progress([
            sys.executable, '-m', 'pip', 'wheel', '--no-build-isolation', '--no-deps', '-v', '-w',
            str(wheel_dir),
            str(src)
        ], env, out_dir / f'build-mmcv-{mmcv_version}-{tag}.log')
        built = list(wheel_dir.glob('mmcv-*.whl'))
        if len(built) != 1:
            raise SystemExit(f'build_mmcv: expected one wheel, got {built}')
        # mmcv-2.1.0-cp311-cp311-linux_x86_64.whl -> insert the build tag.
        name, version, rest = built[0].name.split('-', 2)
        final = out_dir / f'{name}-{version}-{tag}-{rest}'
        partial = final.with_name(final.name + '.partial')
        shutil.copyfile(built[0], partial)
        os.replace(partial, final)  # never a half-written wheel under its name
    print(f'build_mmcv: cached {final}', flush=True)
    return final


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--version', default=DEFAULT_VERSION, help='mmcv version (default: %(default)s)')
    parser.add_argument(
        '--install', action='store_true', help='pip install the (cached or new) wheel')
    parser.add_argument(
        '--print-path',
        action='store_true',
        help='print the cached wheel path and exit (1 if none)')
    parser.add_argument(
        '--rebuild', action='store_true', help='build even if a cached wheel exists')
    parser.add_argument(
        '--jobs', type=int, default=os.cpu_count() or 1, help='parallel compile jobs (MAX_JOBS)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f'build_mmcv: --jobs must be >= 1, got {args.jobs}')
    wheel = None if args.rebuild else find_cached(args.version)
    if args.print_path:
        if wheel is None:
            raise SystemExit(1)
        print(wheel)
        return
    if wheel is None:
        wheel = build(args.version, args.jobs)
    else:
        print(f'build_mmcv: reusing {wheel}', flush=True)
    if args.install:
        subprocess.run([
            sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--force-reinstall',
            str(wheel)
        ],
                       check=True)
        print(f'build_mmcv: installed {wheel.name}', flush=True)


if __name__ == '__main__':
    main()
