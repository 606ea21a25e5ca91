"""The RNG snapshot a checkpoint carries: it restores every stream and loads weights_only."""
import contextlib
import random

import numpy as np
import torch

from mmpsa.engine.rng import get_rng_state, isolated_rng, set_rng_state


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    state = get_rng_state()
    path = tmp_path / 'rng.pth'
    torch.save(state, path)
    # Plain tensors/ints/floats/str/None: loads without any allow-listed global (torch's own
    # weights-only set: on torch < 2.4, which has no added globals, that is all there is).
    only_torch_set = getattr(torch.serialization, 'safe_globals', None)  # torch >= 2.5
    with only_torch_set([]) if only_torch_set else contextlib.nullcontext():
        loaded = torch.load(path, weights_only=True)
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_isolated_rng_undoes_the_draws_inside():
    with isolated_rng():
        inside = (torch.rand(2), np.random.rand(2), random.random())
    after = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(inside[0], after[0]) and np.array_equal(inside[1], after[1])
    assert inside[2] == after[2]
