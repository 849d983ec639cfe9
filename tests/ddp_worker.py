"""Run by tests/test_training.py under torchrun (and once in the test process): train a small MLP on
the digits with noise and augmentation on the shared loop, and save the weights (rank 0)."""

from __future__ import annotations

import sys

import torch

from deploypipe.config import DataSpec
from deploypipe.data import load_data
from deploypipe.distributed import barrier, destroy_process_group
from deploypipe.training import GaussianNoise, Trainer, TrainOptions


def train() -> torch.nn.Module:
    torch.manual_seed(0)
    data = load_data(DataSpec(source="digits", limit_train=301, limit_test=50))  # the last global batch: 45
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    options = TrainOptions(epochs=2, batch_size=64, lr=0.05, augment=data.augment, seed=3, schedule="cosine")
    Trainer(model, options, "cpu", [GaussianNoise(0.2, seed=3)]).fit(data.train)
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)
    model = train()
    if torch.distributed.get_rank() == 0:
        torch.save(model.state_dict(), sys.argv[1])
    # leave the group together: a rank that exits with gloo's threads still up can abort at teardown
    # ("terminate called without an active exception", seen once in CI)
    barrier()
    destroy_process_group()
