"""Measure what the checkpoint door's checks cost on a checkpoint of a given size.

    python tools/analysis_tools/checkpoint_door_cost.py [--mb 300] [--repeat 3] [--dir /tmp]

Writes a checkpoint shaped like an mmengine Runner's (a state_dict of ~300 float32 tensors, a
message hub with HistoryBuffers, numpy dataset metadata) and times, best of ``--repeat``: the
CRC check of every record (:func:`mmpsa.checkpoint.verify_checkpoint_file`), the unpickling on
each branch (torch's weights-only unpickler + ``add_safe_globals``; the restricted unpickler a
torch without it gets), and the whole door (:func:`mmpsa.checkpoint.read_checkpoint`).
"""
import argparse
import os
import tempfile
import time
from collections import OrderedDict
from typing import Callable, List, Optional

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

import mmpsa.compat
from mmpsa.checkpoint import door, read_checkpoint, verify_checkpoint_file


def make_checkpoint(path: str, megabytes: int) -> None:
    """An mmengine-like checkpoint of about ``megabytes`` MB."""
    count = 300
    numel = megabytes * 2**20 // 4 // count
    state = OrderedDict((f'backbone.layer{i}.weight', torch.randn(numel)) for i in range(count))
    buffers = OrderedDict()
    for name in ('loss', 'lr', 'time'):
        buf = HistoryBuffer()
        for v in range(50):
            buf.update(float(v))
        buf.statistics('mean')
        buffers[name] = buf
    meta = dict(
        iter=1000, dataset_meta=dict(palette=np.zeros((19, 3), np.uint8), flip=np.arange(17)))
    torch.save(dict(state_dict=state, meta=meta, message_hub=dict(log_scalars=buffers)), path)


def best(fn: Callable[[], object], repeat: int, before: Optional[Callable] = None) -> float:
    times: List[float] = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mb', type=int, default=300, help='checkpoint size in MB')
    parser.add_argument('--repeat', type=int, default=3, help='runs per measurement (best)')
    parser.add_argument('--dir', default=tempfile.gettempdir(), help='where the file goes')
    args = parser.parse_args(argv)
    path = os.path.join(args.dir, f'door_cost_{args.mb}mb.pth')
    make_checkpoint(path, args.mb)
    size = os.path.getsize(path) / 2**20
    forget = door._VERIFIED.clear  # the CRC check is cached per file and mtime
    crc = best(lambda: verify_checkpoint_file(path), args.repeat, forget)
    weights_only = best(lambda: door._torch_load(path, 'cpu'), args.repeat)
    has = mmpsa.compat.has_add_safe_globals
    mmpsa.compat.has_add_safe_globals = lambda: False
    try:
        restricted = best(lambda: door._torch_load(path, 'cpu'), args.repeat)
    finally:
        mmpsa.compat.has_add_safe_globals = has
    whole = best(lambda: read_checkpoint(path), args.repeat, forget)
    os.remove(path)
    print(f'checkpoint: {size:.0f} MB, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads; best of {args.repeat}')
    print(f'  CRC check of every record:            {crc:6.3f} s')
    print(f'  unpickle, weights-only + allow-list:  {weights_only:6.3f} s')
    print(f'  unpickle, restricted unpickler:       {restricted:6.3f} s')
    print(f'  read_checkpoint (CRC + unpickle):     {whole:6.3f} s')


if __name__ == '__main__':
    main()
