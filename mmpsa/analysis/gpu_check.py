"""The sections of ``tools/dev/gpu_check.sh``: what a first run on a bare GPU machine must answer.

A bare GPU machine has python, torch, triton and timm, and none of mmengine, mmcv, cv2,
mmseg, mmpose, mmdet: this module imports torch alone (mmpsa's layers and benchmarks
inside the functions). Each section prints Markdown as it goes and returns an exit code
(0: everything asked for ran and passed); the shell script runs each under its own
``timeout`` into ``OUT/<section>.md``::

    python -m mmpsa.analysis.gpu_check preflight|parity|kernels|block|network [--preset gpu|smoke]

Sections, in the order a first run must answer them (:data:`SECTIONS`):

* ``preflight``: mmpsa.layers imports, CUDA is visible, triton's version, ``mmpsa._ext``'s
  state (the ATen rows say ``n/a`` where it is not built for this Python);
* ``parity``: each fused path (auto, triton, aten) against the literal form in fp64, on
  multi-tile, unaligned, channels_last and segmentation shapes, every variant x mode;
  error = max over the output and every gradient of ``max|err| / max|ref|`` within
  :data:`mmpsa.analysis.benchmark.TOLERANCES`, and two runs bitwise equal;
* ``kernels``: registers and spills (``n_regs``, ``n_spills``) of each compiled Triton
  kernel, read from the JIT cache of each ``@triton.jit`` kernel after launching them;
* ``block``: fwd+bwd times (CUDA events) of the literal form, the Triton and ATen paths and
  BatchNorm2d at HRNet-W48 shapes, fp32 and bf16, and a ``torch.profiler`` split (Triton
  kernels, other kernels, host);
* ``network``: timm's HRNet-W48 train step, stock vs PSA, bf16 autocast
  (:mod:`mmpsa.analysis.benchmark_backbone`).

``--preset smoke`` runs the same code on CPU under ``TRITON_INTERPRET=1`` with tiny shapes
and the timm-free test network (the CI test of the script).
"""
import argparse
import os
import platform
import signal
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

#: What a bare GPU machine lacks (and the CI smoke run blocks): none may be needed.
OPENMMLAB = ('mmengine', 'mmcv', 'cv2', 'mmseg', 'mmpose', 'mmdet')
#: The sections, in order.
SECTIONS = ('preflight', 'parity', 'kernels', 'block', 'network')
DTYPES = {'fp64': torch.float64, 'fp32': torch.float32, 'bf16': torch.bfloat16}
CONFIGS = ('paper:parallel', 'paper:sequential', 'official:parallel', 'official:sequential')

#: Shapes are ``CxHxW`` (``:cl``: channels_last), batch ``batch``.
PRESETS: Dict[str, dict] = {
    'gpu':
    dict(
        device='cuda',
        configs=CONFIGS,
        # (dtype, shapes) in the order they run: the C=48 set (HRNet multi-tile, unaligned
        # 12x9 and 13x21, channels_last) in every dtype, then the segmentation shapes
        parity=(
            ('fp32', ('48x64x48', '48x12x9', '48x13x21', '48x13x21:cl')),
            ('bf16', ('48x64x48', '48x12x9', '48x13x21', '48x13x21:cl')),
            ('fp64', ('48x64x48', '48x12x9', '48x13x21', '48x13x21:cl')),
            ('fp32', ('48x128x256', '96x64x128', '192x32x64', '384x16x32', '96x64x128:cl')),
            ('bf16', ('48x128x256', '96x64x128', '192x32x64', '384x16x32', '96x64x128:cl')),
        ),
        parity_batch=2,
        # one parity shape per tile width (C rounded up to 64, 128, 256, 512) and dtype: the
        # binaries come from the disk cache the parity section filled
        kernels=(('fp32', ('48x64x48', '96x64x128', '192x32x64', '384x16x32')),
                 ('bf16', ('48x64x48', '96x64x128', '192x32x64', '384x16x32')), ('fp64',
                                                                                 ('48x64x48', ))),
        block_shapes=('48x64x48', '96x32x24', '192x16x12', '384x8x6', '64x64x48'),
        block_configs=CONFIGS,
        block_dtypes=('bf16', 'fp32'),
        block_batch=32,
        block_reps=20,
        profile_steps=5,
        network='hrnet-w48',
        network_batch=32,
        network_reps=10,
        network_warmup=3),
    'smoke':
    dict(
        device='cpu',
        configs=CONFIGS,
        # C=32: at C=16 the fp32 literal form itself is 2e-3 off in official sequential
        parity=(('fp32', ('32x5x3', )), ('fp32', ('32x13x21:cl', ), ('paper:sequential', )),
                ('bf16', ('32x5x3', ), ('official:parallel', )), ('fp64', ('32x5x3', ),
                                                                  ('official:sequential', ))),
        parity_batch=2,
        kernels=(('fp32', ('32x5x3', )), ),
        block_shapes=('32x5x3', ),
        block_configs=('paper:parallel', ),
        block_dtypes=('fp32', ),
        block_batch=2,
        block_reps=1,
        profile_steps=1,
        network='tiny',
        network_batch=2,
        network_reps=1,
        network_warmup=1),
}
#: The paths of the parity and timing sections.
PARITY_PATHS = ('literal', 'auto', 'triton', 'aten')
BLOCK_PATHS = ('literal', 'triton', 'aten', 'bn')


def parse_shape(text: str) -> Tuple[Tuple[int, int, int], bool]:
    """``'48x13x21:cl'`` -> ``((48, 13, 21), True)`` (channels_last)."""
    dims, _, layout = text.partition(':')
    if layout not in ('', 'cl'):
        raise ValueError(f'shape must read CxHxW or CxHxW:cl, got {text!r}')
    c, h, w = (int(v) for v in dims.lower().split('x'))
    return (c, h, w), layout == 'cl'


def _configs(configs: Sequence[str]) -> List[Tuple[str, str]]:
    return [tuple(c.split(':')) for c in configs]  # type: ignore


def _out(line: str = '') -> None:
    print(line, flush=True)


def _not_available(path: str, result) -> bool:
    """Whether ``result`` (an error message) is the ATen path without ``mmpsa._ext``: n/a,
    not a failure."""
    from mmpsa.layers import dispatch
    return isinstance(result, str) and path == 'aten' and dispatch.extension() is None


def ext_state() -> str:
    """One line on ``mmpsa._ext``: built and loaded for this Python, or not (and so n/a)."""
    from mmpsa.layers import dispatch
    if dispatch.extension() is not None:
        return f'mmpsa._ext: built and loaded for Python {platform.python_version()}'
    return (f'mmpsa._ext: not built for Python {platform.python_version()} (the ATen rows '
            'say n/a; no build section runs by default: tools/dev/gpu_check.sh OUT --build)')


# ------------------------------------------------------------------ preflight
def preflight(device: str) -> int:
    """Imports, the device, triton and the extension; 1 where the check cannot go on."""
    t0 = time.perf_counter()
    rc = 0
    _out(f'- python {platform.python_version()}, torch {torch.__version__}')
    try:
        from mmpsa import compat
        from mmpsa.layers import PolarizedSelfAttention, dispatch  # noqa: F401
        _out('- mmpsa.layers: imported')
    except Exception as e:  # noqa: BLE001  (say what broke, whatever it is)
        _out(f'- mmpsa.layers: FAILED to import: {type(e).__name__}: {e}')
        return 1
    if device == 'cuda':
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            _out(f'- CUDA: {torch.cuda.device_count()} device(s), {props.name} (sm_'
                 f'{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), CUDA '
                 f'{torch.version.cuda}')
        else:
            _out('- CUDA: NOT visible to torch (torch.cuda.is_available() is False)')
            rc = 1
    else:
        _out(f'- device: {device} (CUDA {"visible" if torch.cuda.is_available() else "not used"})')
    version = compat.triton_version()
    need = '.'.join(map(str, dispatch.MIN_TRITON))
    if version is None:
        _out(f'- triton: not importable (the Triton path needs triton >= {need})')
        rc = 1
    else:
        import triton
        ok = version >= dispatch.MIN_TRITON
        _out(f'- triton {triton.__version__} ({"tested: >= " if ok else "TOO OLD: needs >= "}'
             f'{need}); TRITON_INTERPRET={os.environ.get("TRITON_INTERPRET", "0")}')
        rc = rc or int(not ok)
    _out(f'- {ext_state()}')
    loaded = [name for name in OPENMMLAB if sys.modules.get(name) is not None]
    _out(f'- OpenMMLab modules imported: {", ".join(loaded) or "none"}')
    _out(f'- preflight took {time.perf_counter() - t0:.1f} s')
    return rc


# ------------------------------------------------------------------ parity
def _parity_cell(path: str, result) -> str:
    if isinstance(result, str):
        return 'n/a' if _not_available(path, result) else 'ERROR'
    return f'{result["error"]:.1e} {result["ran"]}'


def parity_section(plan: Sequence[tuple],
                   configs: Sequence[str] = CONFIGS,
                   paths: Sequence[str] = PARITY_PATHS,
                   device: str = 'cuda',
                   batch: int = 2) -> int:
    """Each fused path against the literal form in fp64; a row per (dtype, shape, config).

    ``plan``: ``(dtype name, shapes)`` or ``(dtype name, shapes, configs)`` entries, in order
    (``configs`` by default).

    A row passes when every path that can run here is within the dtype's tolerance and its
    two runs are bitwise equal (the ATen path without ``mmpsa._ext`` is ``n/a``); returns 1
    when a row fails.
    """
    from mmpsa.analysis.benchmark import TOLERANCES, parity
    _out('Error = max over the output, dX and every parameter gradient (ch_wq.bias, exactly '
         '0, left out) of max|got - ref| / max|ref|, ref = the literal form in fp64; each '
         'cell: error and the path that ran (block.last_path); the literal column (the '
         'literal form in the row\'s dtype: what rounding alone gives) is context, not judged. '
         'bitwise: two runs of each path gave bitwise equal output and gradients. result: '
         'pass when every fused path that can run here is within tol and bitwise equal.')
    _out(f'- {ext_state()}')
    _out()
    _out('| variant | mode | dtype | B x C @ H x W | layout | tol | ' + ' | '.join(paths) +
         ' | bitwise | result |')
    _out('|' + '---|' * 6 + '---:|' * len(paths) + '---|---|')
    failed, rows, errors = 0, 0, {}
    for dtype_name, shapes, *only in plan:
        dtype = DTYPES[dtype_name]
        tol = TOLERANCES[dtype]
        for text in shapes:
            shape, cl = parse_shape(text)
            for variant, mode in _configs(only[0] if only else configs):
                res = parity(variant, mode, shape, paths, batch, dtype, device, channels_last=cl)
                ok, differ = True, []
                for path, r in res.items():
                    if path == 'literal':  # the reference's own rounding: context, not judged
                        continue
                    if isinstance(r, str):
                        if not _not_available(path, r):
                            ok = False
                            errors.setdefault(path, r)
                        continue
                    ok = ok and r['error'] <= tol and r['bitwise']
                    if not r['bitwise']:
                        differ.append(path)
                rows += 1
                failed += not ok
                c, h, w = shape
                _out(f'| {variant} | {mode} | {dtype_name} | {batch} x {c} @ {h} x {w} | '
                     f'{"channels_last" if cl else "contiguous"} | {tol:.0e} | ' +
                     ' | '.join(_parity_cell(p, r) for p, r in res.items()) +
                     f' | {"no: " + ", ".join(differ) if differ else "yes"} | '
                     f'{"pass" if ok else "FAIL"} |')
    _out()
    for path, message in errors.items():
        _out(f'- {path} ERROR: {message}')
    _out(f'- {rows} rows: {rows - failed} pass, {failed} fail')
    return int(failed > 0)


# ------------------------------------------------------------------ kernels
def compiled_kernels(fn) -> Iterator[Tuple[object, object]]:
    """``(device, CompiledKernel)`` for each binary in ``fn``'s (a ``@triton.jit``
    function's) JIT cache.

    triton >= 3.2 keeps ``fn.device_caches[device]``, a tuple whose first item is the dict
    ``key -> CompiledKernel``; triton 3.0/3.1 kept ``fn.cache[device]``, that dict itself.
    An interpreted function (``TRITON_INTERPRET=1``) has neither: nothing was compiled.
    """
    caches = getattr(fn, 'device_caches', None)
    if caches is None:
        caches = getattr(fn, 'cache', None) or {}
    for device, entry in list(caches.items()):
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kernel in list(cache.values()):
            yield device, kernel


def kernel_row(name: str, fn, kernel) -> dict:
    """What a compiled kernel says about itself: its pointer dtype, constexprs, warps,
    stages, shared memory, and ``n_regs`` / ``n_spills`` (set when the binary is loaded
    on the GPU, i.e. at its first launch)."""
    if getattr(kernel, 'n_regs', None) is None and hasattr(kernel, '_init_handles'):
        try:
            kernel._init_handles()
        except Exception:  # noqa: BLE001  (the row then says unknown)
            pass
    src, meta = getattr(kernel, 'src', None), getattr(kernel, 'metadata', None)
    arg_names = list(getattr(fn, 'arg_names', ()))
    signature = dict(getattr(src, 'signature', None) or {})
    constants = dict(getattr(src, 'constants', None) or getattr(src, 'constexprs', None) or {})
    named = {}
    for key, value in constants.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        arg = arg_names[idx] if isinstance(idx, int) and idx < len(arg_names) else str(idx)
        if arg.isupper():
            named[arg] = getattr(value, 'name', value)
    pointer = next((str(t) for t in signature.values() if str(t).startswith('*')), '?')
    return dict(
        kernel=name,
        dtype=pointer.lstrip('*'),
        constexprs=', '.join(f'{k}={v}' for k, v in sorted(named.items())),
        num_warps=getattr(meta, 'num_warps', None),
        num_stages=getattr(meta, 'num_stages', None),
        shared=getattr(meta, 'shared', None),
        n_regs=getattr(kernel, 'n_regs', None),
        n_spills=getattr(kernel, 'n_spills', None))


def kernel_rows(kernels: Dict[str, object]) -> List[dict]:
    """:func:`kernel_row` of every compiled binary of ``kernels`` (name -> jit function)."""
    return [
        kernel_row(name, fn, kernel) for name, fn in sorted(kernels.items())
        for _, kernel in compiled_kernels(fn)
    ]


def format_kernel_rows(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`kernel_rows`, and the largest register count / spills."""

    def cell(v) -> str:
        return '?' if v is None else str(v)

    lines = [
        '| kernel | x dtype | constexprs | warps | stages | shared B | n_regs | n_spills |',
        '|---|---|---|---:|---:|---:|---:|---:|'
    ]
    for r in rows:
        lines.append(f'| {r["kernel"]} | {r["dtype"]} | {r["constexprs"]} | '
                     f'{cell(r["num_warps"])} | {cell(r["num_stages"])} | {cell(r["shared"])} '
                     f'| {cell(r["n_regs"])} | {cell(r["n_spills"])} |')
    regs = [r['n_regs'] for r in rows if r['n_regs'] is not None]
    spills = [r for r in rows if r['n_spills']]
    lines.append('')
    lines.append(f'- {len(rows)} compiled kernels; most registers: {max(regs) if regs else "?"}; '
                 f'with spills: {len(spills)}')
    return '\n'.join(lines)


def kernels_section(plan: Sequence[Tuple[str, Sequence[str]]],
                    configs: Sequence[str] = CONFIGS,
                    device: str = 'cuda',
                    batch: int = 2,
                    budget_s: Optional[float] = None) -> int:
    """Launch the Triton path (fwd+bwd) for ``plan`` x ``configs`` (from triton's disk cache
    after the parity section), then print each compiled kernel's registers and spills.

    Stops launching new shapes once ``budget_s`` seconds have passed and prints what it has.
    Under ``TRITON_INTERPRET=1`` nothing is compiled: it lists the kernels and says so.
    Returns 1 when the Triton path is not available or a launch fails.
    """
    from mmpsa.analysis.benchmark import _block_and_input, error_text, triton_kernel_names
    from mmpsa.layers import dispatch
    module = dispatch.triton_module()
    if module is None:
        _out(f'- the Triton path is not available here: {dispatch._triton()[1]}')
        return 1
    names = triton_kernel_names()
    _out(f'- @triton.jit kernels of {module.__name__}: {", ".join(names)}')
    if module.INTERPRET:
        _out('- TRITON_INTERPRET=1: the kernels run in triton\'s interpreter, nothing is '
             'compiled, so there are no registers or spills to read (a GPU run gives them; '
             'offline: tools/dev/triton_compile_check.py).')
        rows = kernel_rows({name: getattr(module, name) for name in names})
        _out(f'- compiled binaries in the JIT caches: {len(rows)}')
        return 0
    t0, launched, rc = time.perf_counter(), 0, 0

    def stop(signum, frame):  # the section's timeout: print what is compiled so far
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for dtype_name, shapes in plan:
            for text in shapes:
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    _out(f'- budget of {budget_s:.0f} s spent: {dtype_name} {text} and after '
                         'not launched')
                    break
                shape, cl = parse_shape(text)
                for variant, mode in _configs(configs):
                    block, x, grad = _block_and_input(variant, mode, shape, batch,
                                                      DTYPES[dtype_name], 0, device, cl)
                    try:
                        with dispatch.backend('triton'):
                            block(x).backward(grad)
                        launched += 1
                    except Exception as e:  # noqa: BLE001  (a row of the answer, not a crash)
                        _out(f'- {variant} {mode} {dtype_name} {text}: {error_text(e)}')
                        rc = 1
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize()
    except _Stopped:
        _out('- stopped by the section\'s timeout: the kernels compiled so far')
        rc = 124
    finally:
        signal.signal(signal.SIGTERM, previous)
    _out(f'- launched fwd+bwd of {launched} blocks in {time.perf_counter() - t0:.1f} s')
    _out()
    _out(format_kernel_rows(kernel_rows({name: getattr(module, name) for name in names})))
    return rc


class _Stopped(Exception):
    """SIGTERM (``timeout``) arrived during :func:`kernels_section`'s launches."""


# ------------------------------------------------------------------ block
def block_section(shapes: Sequence[str],
                  dtypes: Sequence[str],
                  configs: Sequence[str] = CONFIGS,
                  paths: Sequence[str] = BLOCK_PATHS,
                  device: str = 'cuda',
                  batch: int = 32,
                  reps: int = 20,
                  profile_steps: int = 5) -> int:
    """fwd+bwd times of each path (CUDA events on a GPU), a table per dtype, then the
    ``torch.profiler`` split of the Triton and ATen paths and BatchNorm2d (first dtype).

    Returns 1 when a path that should run here failed.
    """
    from mmpsa.analysis.benchmark import (bench_paths, error_text, format_paths_table,
                                          format_profile_table, profile_split)
    _out('Median fwd+bwd per path, interleaved, after 3 warm-ups (CUDA events on a GPU); '
         '`(xN lit, M BN)`: speed-up over the literal form, time over BatchNorm2d\'s; ran: '
         'the path each block took.')
    rc = 0
    for dtype_name in dtypes:
        _out()
        _out(f'### {dtype_name}, batch {batch}, {reps} reps')
        _out()
        results = []
        for text in shapes:
            shape, _ = parse_shape(text)
            for variant, mode in _configs(configs):
                r = bench_paths(variant, mode, shape, paths, batch, reps, DTYPES[dtype_name],
                                device)
                results.append(r)
                table = format_paths_table([r]).splitlines()
                if len(results) == 1:
                    _out('\n'.join(table[:2]))
                _out(table[2])
                for path, t in r['times'].items():
                    if isinstance(t, str) and not _not_available(path, t):
                        rc = 1
        _out()
        _out('\n'.join(
            line for line in format_paths_table(results).splitlines()[2:] if line.startswith('- ')))
    dtype_name = dtypes[0]
    _out()
    _out(f'### where the time goes ({dtype_name}, torch.profiler over {profile_steps} steps, '
         'per step)')
    _out()
    rows = []
    for text in shapes:
        shape, _ = parse_shape(text)
        todo = [('paper', 'parallel', 'bn')] + [(v, m, p) for v, m in _configs(configs)
                                                for p in ('triton', 'aten') if p in paths]
        for variant, mode, path in todo:
            try:
                rows.append(
                    profile_split(variant, mode, shape, path, batch, DTYPES[dtype_name], device,
                                  profile_steps))
            except Exception as e:  # noqa: BLE001  (a line of the answer, not a crash)
                if not _not_available(path, str(e)):
                    _out(f'- {variant} {mode} {text} {path}: {error_text(e)}')
                    rc = 1
                continue
            table = format_profile_table(rows[-1:]).splitlines()
            if len(rows) == 1:
                _out('\n'.join(table[:2]))
            _out(table[2])
    return rc


# ------------------------------------------------------------------ network
def network_section(network: str,
                    device: str,
                    batch: int,
                    reps: int,
                    warmup: int,
                    amp: str = 'bf16') -> int:
    """The train step of ``network`` stock vs PSA (fused) under ``amp`` autocast
    (:func:`mmpsa.analysis.benchmark_backbone.run`)."""
    from mmpsa.analysis.benchmark_backbone import run
    _out(
        run([network], ['fused'],
            batch=batch,
            reps=reps,
            warmup=warmup,
            quiet=True,
            device=device,
            amp=amp))
    return 0


def run_section(name: str, preset: str = 'gpu') -> int:
    """Run section ``name`` (:data:`SECTIONS`) with the settings of ``preset``."""
    p = PRESETS[preset]
    device = p['device']
    if name == 'preflight':
        return preflight(device)
    if name == 'parity':
        return parity_section(p['parity'], p['configs'], PARITY_PATHS, device, p['parity_batch'])
    if name == 'kernels':
        return kernels_section(p['kernels'], p['configs'], device, budget_s=p.get('kernels_s'))
    if name == 'block':
        return block_section(p['block_shapes'], p['block_dtypes'], p['block_configs'], BLOCK_PATHS,
                             device, p['block_batch'], p['block_reps'], p['profile_steps'])
    if name == 'network':
        return network_section(p['network'], device, p['network_batch'], p['network_reps'],
                               p['network_warmup'])
    raise ValueError(f'section must be one of {SECTIONS}, got {name!r}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('section', choices=SECTIONS)
    parser.add_argument(
        '--preset',
        choices=sorted(PRESETS),
        default='gpu',
        help='gpu (default): CUDA, the real shapes; smoke: CPU, tiny shapes')
    parser.add_argument(
        '--budget', type=float, help='kernels: stop launching new shapes after this many s')
    args = parser.parse_args(argv)
    if args.budget is not None:
        PRESETS[args.preset]['kernels_s'] = args.budget
    return run_section(args.section, args.preset)


if __name__ == '__main__':
    sys.exit(main())
