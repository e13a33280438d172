"""The run's data loader: one iterator over every epoch, with per-item seeded augmentation.

:class:`Plan` owns the arithmetic of a run's length (batches per sampler-epoch, sampler-epochs,
steps per pass over the data); :class:`RunSampler` and the trainer both read it, so an epoch
ends in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import dist
from . import signals


@dataclass(frozen=True)
class Plan:
    """A run's length. ``batch_size`` is per rank; a sampler-epoch is cut to whole batches."""

    batch_size: int
    steps_per_sampler_epoch: int
    num_epochs: int  # sampler-epochs
    passes_per_epoch: float  # passes over the N training images in one sampler-epoch

    @classmethod
    def of(cls, sampler: Any, batch_size: int, epochs: float) -> Plan:
        """The plan for ``epochs`` passes over the data with ``sampler`` (per-rank length)."""
        steps = len(sampler) // batch_size
        if steps == 0:
            raise ValueError(f"trainer.batch_size={batch_size * dist.get_world_size()} is larger "
                             f"than one epoch of the sampler ({len(sampler)} samples per process)")
        num_epochs = math.ceil(epochs / sampler.passes_per_epoch - 1e-9)
        return cls(batch_size, steps, num_epochs, sampler.passes_per_epoch)

    @property
    def epoch_len(self) -> int:
        """Samples of one rank in one sampler-epoch."""
        return self.steps_per_sampler_epoch * self.batch_size

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.steps_per_sampler_epoch

    @property
    def steps_per_pass(self) -> float:
        """Steps of one pass over the N training images (what schedules call an epoch)."""
        return self.steps_per_sampler_epoch / self.passes_per_epoch

    def epoch_done(self, position: int) -> bool:
        """Whether a rank that has consumed ``position`` samples of its epoch has finished it."""
        return position >= self.epoch_len


class SeededItems(torch.utils.data.Dataset):
    """Makes each item with the augmentation's generators seeded from (seed, epoch, global
    position), leaving the caller's generators as they were.

    The random augmentation of a sample is then a function of those numbers alone: independent
    of the number of loader workers, identical after a resume, and — since rank r's p-th sample
    is the global window's (p·world + r)-th — the same for any number of processes. Indices
    come from :class:`RunSampler` as ``(epoch, position, index)``.

    torchvision's transforms draw from the global torch generator and take no generator of
    their own (nor do ours: the augmentations draw from torch's generator only, never from
    Python's ``random``), so the item is made with the global CPU generator seeded for it and
    its state restored after. A method drawing from the global generator in the main process
    (InstDisc's negatives) then sees the same stream with 0 workers (items made in the main
    process) as with worker processes. Seeding the CPU generator alone costs ~20 µs; a
    ``torch.manual_seed`` also seeds every other backend (CUDA lazily, with a stack trace),
    ~1.2 ms per item (AMD EPYC, this session's 2-core machine).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset = dataset
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, position, index = key
        global_position = position * self.world_size + self.rank
        item_seed = hash((self.seed, epoch, global_position)) & 0x7FFF_FFFF_FFFF
        generator = torch.default_generator
        caller_state = generator.get_state()
        generator.manual_seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(caller_state)


class RunSampler(torch.utils.data.Sampler):
    """All the indices of a run, epoch after epoch, tagged ``(epoch, position, index)``.

    One loader serves the whole run (workers and prefetching carry across epochs). Each epoch
    is cut to :attr:`Plan.epoch_len` samples, so no batch straddles two epochs, and the run
    starts at (``epoch``, ``start``) — a mid-epoch resume.
    """

    def __init__(self, sampler: Any, plan: Plan, epoch: int, start: int) -> None:
        self.sampler, self.plan = sampler, plan
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, (self.plan.num_epochs - self.epoch) * self.plan.epoch_len - self.start)

    def __iter__(self):
        start = self.start
        for epoch in range(self.epoch, self.plan.num_epochs):
            self.sampler.set_epoch(epoch, start)
            for position, index in enumerate(self.sampler, start):
                if self.plan.epoch_done(position):
                    break
                yield (epoch, position, int(index))
            start = 0


def run_loader(dataset: torch.utils.data.Dataset, sampler: Any, plan: Plan, epoch: int,
               start: int, seed: int, num_workers: int,
               device: torch.device) -> torch.utils.data.DataLoader:
    """One DataLoader for the rest of the run from (``epoch``, ``start``): its workers start
    once and keep 4 batches each in flight, ignoring stop signals (the trainer stops them);
    batches are pinned on CUDA."""
    return torch.utils.data.DataLoader(
        SeededItems(dataset, seed, dist.get_rank(), dist.get_world_size()),
        sampler=RunSampler(sampler, plan, epoch, start), batch_size=plan.batch_size,
        num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=signals.ignore_in_worker if num_workers else None)
