"""The samplers: (x, y) windows of token files, random or sequential, rank-aware, resumable."""

import json

import numpy as np
import pytest
import torch

from scratchgpt.data.samplers import RandomWindows, SequentialWindows
from scratchgpt.data.sources import DataError

TOKENS = np.arange(1000, dtype=np.uint16)  # token i at position i, so a window's start is its first id


def test_random_windows_shapes_shift_and_resume() -> None:
    s = RandomWindows(TOKENS, block_size=16, batch_size=4, seed=7)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the next token
    s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # JSON-able
    expected = [s.next_batch() for _ in range(3)]
    resumed = RandomWindows(TOKENS, block_size=16, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)
    assert int(x.max()) + 1 < len(TOKENS)  # windows stay inside the file


def test_random_windows_ranks_split_the_global_batch() -> None:
    whole = RandomWindows(TOKENS, block_size=8, batch_size=6, seed=3)
    ranks = [RandomWindows(TOKENS, block_size=8, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def _starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_sequential_windows_visit_each_window_once_per_epoch() -> None:
    s = SequentialWindows(TOKENS, block_size=10, batch_size=7, stride=5, seed=1)
    n = len(s)
    assert n == (1000 - 10 - 1) // 5 + 1
    seen = [start for _ in range(n) for start in _starts(s.next_batch()[0])]  # 7 epochs' worth
    for epoch in range(7):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(0, 5 * n, 5))  # no repeats, none missed
    assert seen[:n] != sorted(seen[:n])  # shuffled
    assert seen[:n] != seen[n : 2 * n]  # reshuffled each epoch


def test_sequential_windows_unshuffled_is_the_textbook_order() -> None:
    s = SequentialWindows(TOKENS, block_size=4, batch_size=2, stride=4, shuffle=False)
    x, y = s.next_batch()
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_sequential_windows_ranks_disjoint_and_resume() -> None:
    ranks = [SequentialWindows(TOKENS, block_size=10, batch_size=4, seed=2, rank=r, world_size=3) for r in range(3)]
    whole = SequentialWindows(TOKENS, block_size=10, batch_size=12, seed=2)
    per_rank: list[set[int]] = [set(), set(), set()]
    for _ in range(5):
        parts = [_starts(r.next_batch()[0]) for r in ranks]
        assert sum(parts, []) == _starts(whole.next_batch()[0])
        for r, p in enumerate(parts):
            per_rank[r].update(p)
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2])
    state = ranks[1].state_dict()
    assert state == ranks[0].state_dict()  # identical on every rank: rank 0 may save it for all
    expected = _starts(ranks[1].next_batch()[0])
    again = SequentialWindows(TOKENS, block_size=10, batch_size=4, seed=2, rank=1, world_size=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert _starts(again.next_batch()[0]) == expected
    with pytest.raises(DataError, match="same data and block size"):
        SequentialWindows(TOKENS, block_size=20, batch_size=4).load_state_dict(state)


def test_sampler_needs_one_window() -> None:
    with pytest.raises(DataError, match="shorter than one window"):
        RandomWindows(TOKENS[:16], block_size=16, batch_size=1)
