"""Token files -> (x, y) training windows: random windows or a strided sliding window.

The samplers read those files through `numpy.memmap` and yield (x, y) pairs of (B, T) int64 tensors
(y is x shifted by one token). Shards are read as one sequence (`token_files.ShardedTokens`): a window
may cross a shard boundary, so a sharded folder gives exactly the batches of the single-file one and no
tokens are lost at shard ends. Both samplers are rank-aware: at every step the *global* batch of B * world_size
windows is the same whatever the world size, and rank r takes rows [r*B, (r+1)*B) of it. Their
state is one JSON-able dict, identical on every rank, so a resumed run continues at the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from scratchgpt.data.sources import DataError
from scratchgpt.data.token_files import Tokens

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64), for per-batch generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _windows(tokens: Tokens, starts: Sequence[int], block_size: int) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, T) int64, for windows beginning at `starts`."""
    if isinstance(tokens, np.ndarray):  # one file: a single gather (B slices and a stack took ~20x longer)
        rows = tokens[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size + 1)].astype(np.int64)
    else:  # shards read as one sequence: each window by slicing (it may cross a shard boundary)
        rows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1], rows_t[:, 1:]


class RandomWindows:
    """Windows at uniformly random offsets (with replacement), for pretraining.

    Global batch n draws its B * world_size offsets from a torch.Generator seeded with (seed, n), so the
    state is just n and any batch can be recomputed; rank r keeps rows [r*B, (r+1)*B).
    """

    def __init__(
        self, tokens: Tokens, *, block_size: int, batch_size: int, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens is shorter than one window (block_size {block_size} + 1)")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_drawn = 0
        self._gen = torch.Generator()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the CPU."""
        self._gen.manual_seed(_mix_seed(self.seed, self.batches_drawn))
        G = self.batch_size * self.world_size
        starts = torch.randint(len(self.tokens) - self.block_size, (G,), generator=self._gen)  # (G,)
        self.batches_drawn += 1
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine.tolist(), self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "random")
        self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])


class SequentialWindows:
    """Every window once per epoch, without replacement: starts 0, stride, 2*stride, ... (GPTDataset).

    The windows of all epochs form one stream (each epoch shuffled by a generator seeded with
    (seed, epoch) when `shuffle`); global batch n is stream positions [n*G, (n+1)*G), G = B * world_size,
    and rank r takes its B of them. A batch may straddle two epochs, so none is ever dropped.
    """

    def __init__(
        self, tokens: Tokens, *, block_size: int, batch_size: int, stride: int | None = None,
        shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens is shorter than one window (block_size {block_size} + 1)")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.stride = stride or block_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        # Window i covers tokens[i*stride : i*stride + T + 1]; the last must end inside the file.
        self.num_windows = (len(tokens) - block_size - 1) // self.stride + 1
        self.position = 0  # windows consumed so far, over all ranks and epochs
        self._order: tuple[int, Tensor] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        return self.num_windows

    @property
    def epoch(self) -> int:
        return self.position // self.num_windows

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
                order = torch.randperm(self.num_windows, generator=gen)
            else:
                order = torch.arange(self.num_windows)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the CPU."""
        first = self.position + self.rank * self.batch_size
        starts = []
        for p in range(first, first + self.batch_size):
            epoch, offset = divmod(p, self.num_windows)
            starts.append(int(self._epoch_order(epoch)[offset]) * self.stride)
        self.position += self.batch_size * self.world_size
        return _windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sequential", "seed": self.seed, "position": self.position,
                "num_windows": self.num_windows, "stride": self.stride, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "sequential")
        if (state["num_windows"], state["stride"]) != (self.num_windows, self.stride):
            raise DataError(
                f"sampler state is for {state['num_windows']} windows of stride {state['stride']}, but this data "
                f"has {self.num_windows} of stride {self.stride}; resume with the same data and block size"
            )
        self.seed, self.position, self.shuffle = int(state["seed"]), int(state["position"]), bool(state["shuffle"])
        self._order = None


def _expect_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise DataError(f"sampler state is for a {state.get('kind')!r} sampler, not {kind!r}")


def make_sampler(
    tokens: Tokens, *, kind: Literal["random", "sequential"], block_size: int, batch_size: int, seed: int,
    stride: int | None = None, shuffle: bool = True, rank: int = 0, world_size: int = 1,
) -> RandomWindows | SequentialWindows:
    """The sampler DataConfig.sampler names."""
    common = dict(block_size=block_size, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if kind == "random":
        return RandomWindows(tokens, **common)
    return SequentialWindows(tokens, stride=stride, shuffle=shuffle, **common)
