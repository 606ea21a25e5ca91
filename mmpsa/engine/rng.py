"""A snapshot of every RNG a training step draws from: torch (and CUDA), numpy, ``random``.

:class:`~mmpsa.engine.hooks.SafeCheckpointHook` saves one snapshot per rank with each
checkpoint, under :data:`RNG_STATES_KEY` of the message hub's runtime info (which mmengine
already saves and resumes); the exact-resume loops of :mod:`mmpsa.engine.loops` put them back
and run validation inside :func:`isolated_rng`.
"""
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

#: Message-hub runtime-info key of the gathered RNG states:
#: ``dict(epoch=int, iter=int, states=[one get_rng_state() per rank])``, where ``epoch`` and
#: ``iter`` are the loop counters a run resumed from that checkpoint starts with.
RNG_STATES_KEY = 'rng_states'


def get_rng_state() -> dict:
    """This process's torch, CUDA, numpy and python RNG states, in a ``weights_only`` form.

    Everything is a tensor, an int, a float, a str or None, so that a checkpoint holding it
    loads with ``torch.load(weights_only=True)`` without widening the allow-list.

    Returns:
        A dict for :func:`set_rng_state`.
    """
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(
            bit_generator=str(bit_generator),
            keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian)),
        python=dict(
            version=int(py_version),
            internal=torch.tensor(py_internal, dtype=torch.int64),
            gauss_next=py_gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states returned by :func:`get_rng_state`.

    Args:
        state: A dict from :func:`get_rng_state`.
    """
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state((np_state['bit_generator'], np_state['keys'].numpy().astype(np.uint32),
                         np_state['pos'], np_state['has_gauss'], np_state['cached_gaussian']))
    py_state = state['python']
    random.setstate((py_state['version'], tuple(int(v) for v in py_state['internal'].tolist()),
                     py_state['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without it changing any RNG state seen after it (e.g. a validation)."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
