"""Byte-pair encoding trained from scratch: the whole algorithm, on counted byte chunks.

Training starts from the 256 single bytes. Text has already been cut into pre-token chunks (words,
runs of digits or punctuation: `ByteBPETokenizer.train` does that with GPT-2's regex) and counted, so
a merge never joins two chunks. Then, `n_merges` times: count every adjacent pair of ids over all
chunks (weighted by how often each chunk occurs), take the most frequent pair (ties to the smallest
pair, so the same text always gives the same merges), give it the next id (256, 257, ...) and replace
it in every chunk that holds it.

A textbook loop counts every pair again after each merge; here only the chunks that held the merged
pair are recounted, and a heap keeps the counts ordered, so a merge costs time in proportion to the
chunks it changes rather than to the whole corpus. The merges are exactly the textbook loop's
(tests/test_tokenizer.py compares the two).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    left, right = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == left and ids[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_merges(chunk_counts: Mapping[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Up to `n_merges` BPE merges over byte chunks; the most frequent pair wins, ties to the smallest."""
    words = [list(chunk) for chunk in chunk_counts]  # token ids of each distinct chunk
    freqs = list(chunk_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}  # pair -> indices of the words holding it
    for w, (ids, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            pair_counts[pair] += freq
            where.setdefault(pair, set()).add(w)
    # A max-heap by (count, then smallest pair); an entry is stale once its count no longer matches.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        # Only the words holding `pair` change; recount just their pairs.
        delta: Counter[tuple[int, int]] = Counter()
        for w in where.pop(pair):
            old, freq = words[w], freqs[w]
            new = merge(old, pair, new_id)
            words[w] = new
            old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
            for p in old_pairs:
                delta[p] -= freq
            for p in new_pairs:
                delta[p] += freq
            for p in set(old_pairs) - set(new_pairs) - {pair}:
                where[p].discard(w)
            for p in set(new_pairs) - set(old_pairs):
                where.setdefault(p, set()).add(w)
        for p, d in delta.items():
            if d == 0:
                continue
            count = pair_counts[p] + d
            if count > 0:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, p))
            else:
                del pair_counts[p]
                where.pop(p, None)
    return merges
