"""mmpsa: Polarized Self-Attention for MMSegmentation and MMPose.

OpenMMLab convention: run-time requirements live in ``requirements/``; mmcv and
mmengine are listed in ``requirements/mminstall.txt`` (installed by mim or by
``tools/build_mmcv.py``), never in ``install_requires``, so pip never tries to
build mmcv. mmpose is not in the ``pose`` extra: its metadata names chumpy, which
does not build; install it with ``pip install --no-deps mmpose==1.3.2``.

``mmpsa._ext`` (the fused PolarizedSelfAttention, ``mmpsa/csrc/psa_fused.cpp``) is
compiled against the installed torch, as mmcv's ops are: install with
``pip install --no-build-isolation``. Without torch at build time, or with
``MMPSA_WITH_EXT=0``, the package installs without it and the block runs its fused
maths as plain autograd ops (slower; mmpsa warns).
"""
import hashlib
import os
from pathlib import Path
from typing import List

from setuptools import find_packages, setup

HERE = Path(__file__).parent
EXT_SOURCE = 'mmpsa/csrc/psa_fused.cpp'


def ext_build_args() -> dict:
    """``ext_modules``/``cmdclass`` for ``mmpsa._ext``, or nothing (see above)."""
    if os.environ.get('MMPSA_WITH_EXT', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print('mmpsa: torch is not importable at build time; building without '
              'mmpsa._ext (use pip install --no-build-isolation)')
        return {}
    # the binary records which source it was built from (checked at import)
    digest = hashlib.sha256((HERE / EXT_SOURCE).read_bytes()).hexdigest()[:16]
    ext = CppExtension(
        'mmpsa._ext', [EXT_SOURCE],
        # -fopenmp: at::parallel_for is header code, serial without it; the library
        # resolves to the libgomp.so.1 torch has already loaded (one OpenMP runtime)
        extra_compile_args={'cxx': ['-O3', '-fopenmp', f'-DMMPSA_SOURCE_HASH="{digest}"']},
        extra_link_args=['-fopenmp'])
    return dict(ext_modules=[ext],
                cmdclass={'build_ext': BuildExtension.with_options(use_ninja=True)})


def parse_requirements(name: str) -> List[str]:
    """Read ``requirements/<name>.txt``, dropping comments and blank lines."""
    lines = (HERE / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [ln.split('#')[0].strip() for ln in lines if ln.split('#')[0].strip()]


setup(
    name='mmpsa',
    version='0.1.0',
    description='Polarized Self-Attention (PSA) for MMSegmentation and MMPose',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['mmpsa', 'mmpsa.*']),
    python_requires='>=3.8',
    install_requires=parse_requirements('runtime'),
    extras_require={
        'seg': parse_requirements('seg'),
        'pose': parse_requirements('pose'),
        'mim': parse_requirements('mminstall'),
        'tests': parse_requirements('tests'),
    },
    zip_safe=False,
    **ext_build_args(),
)
