"""A toy model and a randomly augmented toy dataset, registered for the engine tests.

Training draws from torch's RNG (dropout) and the data from torch, numpy and python's
``random``: exact resume must restore all three.
"""
import random
from typing import List

import numpy as np
import torch
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch.utils.data import Dataset


@MODELS.register_module(name='PsaTestToyModel', force=True)
class ToyModel(BaseModel):
    """y = w.x + b with dropout on x."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, inputs: List[torch.Tensor], labels: List[torch.Tensor], mode: str = 'tensor'):
        out = self.linear(self.dropout(torch.stack(inputs)))
        if mode == 'loss':
            return dict(loss=((out - torch.stack(labels))**2).mean())
        return [dict(pred=float(o)) for o in out]


@DATASETS.register_module(name='PsaTestAugDataset', force=True)
class AugDataset(Dataset):
    """Eight samples, each randomly 'augmented' with torch, numpy and python draws."""

    metainfo: dict = dict()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        x = torch.full((4, ), float(i)) + torch.rand(4) + float(np.random.rand())
        return dict(
            inputs=x * random.uniform(0.5, 1.5), labels=torch.tensor([i % 3], dtype=torch.float))
