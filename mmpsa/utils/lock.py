"""The lock: every package the set-up installs, pinned (``requirements/lock/torch<X.Y>.txt``).

A lock file is pip's requirements format, one ``name==version`` per line (names normalised,
sorted), ``#`` comments on top saying which ``TORCH_SPEC`` and Python it is for and how it was
made; ``mmpsa`` itself is never in it. ``tools/dev/setup_env.sh`` installs every step under it as
pip constraints (``PIP_CONSTRAINT``; mmcv, installed from the wheel ``tools/dev/build_mmcv.py``
builds, is checked but not a pip constraint), then checks the venv against it. The hash of a
lock is :func:`packages_hash` of its lines, so a venv that matches its
lock records the lock's hash in every run (the demo's "lock <hash>").

    python -m mmpsa.utils.lock write requirements/lock/torch2.14.txt --for 'TORCH_SPEC=...'
    python -m mmpsa.utils.lock check requirements/lock/torch2.14.txt
    python -m mmpsa.utils.lock constraints requirements/lock/torch2.14.txt OUT
"""
import argparse
import hashlib
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

#: Packages a lock never pins: the project itself.
NOT_LOCKED = ('mmpsa', )
#: Locked, but not given to pip as a constraint (installed from a local wheel).
NOT_CONSTRAINED = ('mmcv', )


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r'[-_.]+', '-', name).lower()


def _vendored(dist: metadata.Distribution) -> bool:
    """A copy another package ships inside itself (``setuptools/_vendor``), not an install.

    Importing ``pkg_resources`` (mmengine and mim do) puts ``setuptools/_vendor`` on
    ``sys.path``, so those copies became visible inside training jobs and not outside: the
    same venv hashed two ways (``83351a…`` in jobs, the lock's ``26764f…`` outside).
    """
    return '_vendor' in Path(str(dist.locate_file(''))).parts


def installed_packages() -> List[str]:
    """``name==version`` of every distribution installed here but mmpsa itself, sorted
    (``pip freeze``'s set, names normalised; a package found twice counts once; copies
    vendored inside another package are not installs)."""
    seen = {}
    for dist in metadata.distributions():
        if _vendored(dist):
            continue
        name = normalise(dist.metadata.get('Name') or '')
        if name and name not in seen and name not in NOT_LOCKED:
            seen[name] = dist.version
    return [f'{name}=={version}' for name, version in sorted(seen.items())]


def packages_hash(packages: Optional[List[str]] = None) -> str:
    """The first 16 hex digits of the sha256 of ``name==version`` lines (sorted; default:
    :func:`installed_packages`)."""
    packages = installed_packages() if packages is None else packages
    return hashlib.sha256('\n'.join(sorted(packages)).encode()).hexdigest()[:16]


def read_lock(path: str) -> List[str]:
    """The ``name==version`` lines of a lock file (normalised, sorted)."""
    pins = []
    for line in Path(path).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition('==')
        if not sep:
            raise ValueError(f'{path}: every line must be name==version, got {line!r}')
        pins.append(f'{normalise(name.strip())}=={version.strip()}')
    return sorted(pins)


def lock_hash(path: str) -> str:
    """The hash of a lock: that of the package set it pins."""
    return packages_hash(read_lock(path))


def differences(path: str, installed: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """How the installed set differs from a lock.

    Returns:
        ``{'missing': [...], 'other_version': ['name: installed X, lock Y'], 'extra': [...]}``.
    """
    have = dict(p.split('==', 1) for p in (installed or installed_packages()))
    want = dict(p.split('==', 1) for p in read_lock(path))
    return {
        'missing':
        sorted(n for n in want if n not in have),
        'other_version':
        sorted(f'{n}: installed {have[n]}, lock {want[n]}' for n in want
               if n in have and have[n] != want[n]),
        'extra':
        sorted(f'{n}=={have[n]}' for n in have if n not in want),
    }


def write_lock(path: str, made_for: str) -> Tuple[Path, str]:
    """Write the installed set as a lock; return its path and hash."""
    pins = sorted(installed_packages())
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f'# Every package tools/dev/setup_env.sh installs for {made_for}, Python '
        f'{platform.python_version()} ({platform.machine()}), pinned.\n'
        '# Written from the set-up venv by `python -m mmpsa.utils.lock write`; the set-up\n'
        '# installs under it (pip constraints; mmcv from its built wheel) and checks the venv.\n'
        f'# lock hash {packages_hash(pins)}\n' + ''.join(f'{p}\n' for p in pins))
    return out, packages_hash(pins)


def write_constraints(path: str, out: str) -> None:
    """The lock as a pip constraints file (without :data:`NOT_CONSTRAINED`)."""
    pins = [p for p in read_lock(path) if p.split('==')[0] not in NOT_CONSTRAINED]
    Path(out).write_text(''.join(f'{p}\n' for p in pins))


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: ``write``, ``check`` or ``constraints``."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('action', choices=('write', 'check', 'constraints'))
    parser.add_argument('lock', help='the lock file')
    parser.add_argument('out', nargs='?', help='constraints: the file to write')
    parser.add_argument('--for', dest='made_for', default='this venv', help='write: what for')
    args = parser.parse_args(argv)
    if args.action == 'write':
        path, digest = write_lock(args.lock, args.made_for)
        print(f'wrote {path} (lock {digest})')
    elif args.action == 'constraints':
        write_constraints(args.lock, args.out)
    else:
        found = differences(args.lock)
        if found['missing'] or found['other_version']:
            sys.exit(f'the venv does not match {args.lock}:\n' +
                     '\n'.join([f'  missing: {n}' for n in found['missing']] +
                               [f'  {d}' for d in found['other_version']]))
        extra = (f'; not in the lock: {", ".join(found["extra"])}' if found['extra'] else '')
        print(f'installed packages match {args.lock} (lock {lock_hash(args.lock)}){extra}')


if __name__ == '__main__':
    main()
