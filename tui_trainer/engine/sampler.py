"""The seekable sampler: batches of block indices in an order that is a pure function of (seed, epoch), so
resume seeks straight to its cursor; under data parallelism each rank keeps its slice of every global batch.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s share of one global micro-batch: contiguous equal slices in rank order, so the ranks'
    slices concatenated are the global batch and a step sees the same blocks whatever the world size."""
    per_rank = len(global_batch) // world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


class BlockSampler:
    """Batches of block indices. Epoch e's order is randperm(seed, e), so the cursor (epoch, position)
    is the whole sampler state and seeking is one permutation away, never a skip through batches.

    Under data parallelism every rank walks the same global order: each micro-step draws
    batch_size * world_size indices and a rank keeps its `rank_slice`. The cursor counts global indices,
    so it is the same on every rank and one checkpoint's cursor serves any world size."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int, *, world_size: int = 1, rank: int = 0) -> None:
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_blocks, generator=generator)

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._order = epoch, position, None

    def state_dict(self) -> dict[str, int]:
        """The data cursor, as trainer_state.json holds it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seek(int(state["epoch"]), int(state["position"]))

    def next_indices(self) -> torch.Tensor:
        size = self.batch_size * self.world_size
        if self.position + size > self.n_blocks:  # drop the ragged end of an epoch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        start = self.position
        self.position += size
        return rank_slice(self._order[start : self.position], self.rank, self.world_size)
