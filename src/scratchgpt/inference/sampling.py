"""Pure sampling functions: logits (B, V) in, one token per row out; every draw takes a `torch.Generator`.

Temperature, top-k, top-p (nucleus), min-p, the repetition penalty, and the block sampler that draws from the
resulting distribution. Nothing here knows about the model or a KV cache: the decode loop
(`inference.generate`) and speculative decoding (`inference.speculative`) both call these.

Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scratchgpt.config import SamplingConfig


def greedy_tokens(logits: Tensor) -> Tensor:
    """The first maximum of each row: (..., V) -> (...), what `argmax(dim=-1)` returns (ties, NaN, -inf alike).

    Why not argmax: torch's CPU argmax over a GPT-2 vocabulary (50,257) took 70 µs in float32 and 168 µs in
    bfloat16, its max with indices 28 and 43 µs (Intel Xeon here, hot): up to 1-2% of a bf16 or int8 token,
    though whole generations, paired, did not resolve it from this machine's ±5% noise.
    """
    return logits.max(dim=-1).indices


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens in `seen` (1-D ids): positive logits ÷ penalty, negative × penalty."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    ids = seen.unique()
    score = logits[..., ids]
    logits[..., ids] = torch.where(score > 0, score / penalty, score * penalty)
    return logits


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf every logit that top-k, then top-p (nucleus), then min-p would drop. (B, V) -> (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        # topk returns exactly k indices even when values tie, so exactly k tokens survive.
        kept = logits.topk(top_k, dim=-1).indices
        out = torch.full_like(logits, float("-inf"))
        logits = out.scatter(-1, kept, logits.gather(-1, kept))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token if the mass strictly before it is still below top_p: the smallest prefix whose
        # mass reaches top_p. The most likely token is always kept.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample_next_token(
    logits: Tensor, sampling: SamplingConfig, *, generator: torch.Generator | None = None, seen: Tensor | None = None
) -> Tensor:
    """Pick one token per row from logits (B, V) -> (B,). Greedy (`sampling.greedy`) takes the first max."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return greedy_tokens(logits)
    return sample_from_probs(token_probs(logits, sampling), generator=generator)


def token_probs(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """The distribution sampling draws from: softmax of the temperature-scaled, filtered logits. (B, V)."""
    logits = logits.float() / sampling.temperature
    logits = filter_logits(logits, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p)
    return logits.softmax(dim=-1)


def sample_from_probs(probs: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probs (B, V) -> (B,): inverse-CDF over blocks, then a race inside one block.

    torch.multinomial draws an exponential for every one of the 50k tokens (~0.9 ms per row). Here
    one uniform picks a block of `_SAMPLE_BLOCK` tokens by its share of the mass (a search in the
    cumulative block masses), and `_SAMPLE_BLOCK` exponentials pick the token inside it
    (argmax p/E, E ~ Exp(1), which draws j with probability p_j / block mass). The product is
    exactly p_j / total. Why not a plain search over all 50k cumulative probabilities: float
    rounding noise in the logits (a row decoded in a batch vs alone) accumulates along a 50k-long
    cumulative sum and moved a draw to the neighbouring token about once per thousand tokens; over
    ~200 block masses, each far wider than one token's probability, that is ~256x rarer, and the
    race inside a block flips only when two tokens tie to within the noise.
    `probs` need not sum to one (it is rescaled), so it also samples unnormalised residuals.
    """
    B, V = probs.shape
    n_blocks = -(-V // _SAMPLE_BLOCK)
    p = F.pad(probs.double(), (0, n_blocks * _SAMPLE_BLOCK - V)).view(B, n_blocks, _SAMPLE_BLOCK)
    mass = p.sum(dim=-1)  # (B, n_blocks)
    cdf = mass.cumsum(dim=-1)
    u = torch.rand((B, 1), generator=generator, device=probs.device, dtype=torch.float64)
    # right=True returns the first block whose cdf exceeds u·total: a block without mass (cdf equal
    # to its left neighbour's) is never picked, except when u·total rounds up to the total itself.
    block = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    last = n_blocks - 1 - (mass.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    block = torch.minimum(block, last)
    inside = p[torch.arange(B, device=p.device), block]  # (B, _SAMPLE_BLOCK)
    race = torch.empty_like(inside).exponential_(generator=generator)
    return block * _SAMPLE_BLOCK + (inside / race).argmax(dim=-1)


_SAMPLE_BLOCK = 256
