"""The lock's view of the installed packages (``mmpsa.utils.lock``): the same venv hashes the same
inside a training job and outside it."""
import json
import subprocess
import sys
from pathlib import Path

from mmpsa.utils.lock import installed_packages, packages_hash, read_lock

REPO = Path(__file__).resolve().parents[1]

HASH_AFTER = r'''
import json, sys, warnings
warnings.simplefilter('ignore')
from mmpsa.utils.lock import installed_packages
before = installed_packages()
IMPORT
print(json.dumps(dict(before=before, after=installed_packages())))
'''


def test_importing_pkg_resources_does_not_change_the_package_set():
    """``pkg_resources`` (imported by mmengine and mim inside every job) puts setuptools'
    vendored copies on ``sys.path``; they are not installs and do not count."""
    code = HASH_AFTER.replace('IMPORT', 'import pkg_resources  # noqa: F401')
    done = subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True,
                          check=True,
                          timeout=120)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen['after'] == seen['before']
    assert packages_hash(seen['after']) == packages_hash(seen['before'])


def test_lock_lines_hash_as_the_header_says():
    lock = REPO / 'requirements' / 'lock' / 'torch2.14.txt'
    header = [ln for ln in lock.read_text().splitlines() if ln.startswith('# lock hash ')]
    assert header == [f'# lock hash {packages_hash(read_lock(str(lock)))}']
    assert all('==' in line for line in installed_packages())
