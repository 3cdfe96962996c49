"""Speculative and prompt-lookup decoding: guess several next tokens cheaply, let the model check them in one pass.

Decoding one token at a time reads every weight once per token. Both methods here propose k tokens and run
them through the model in a single forward pass (`verify_draft`), which reads the weights once for all
k + 1 positions, and keep the prefix the model agrees with:

- `PromptLookup` copies the proposal from where the last few tokens occurred earlier in the text
  (`lookup_draft`); exact for greedy decoding, where a token is kept iff it is the model's argmax.
- `DraftModel` lets a small model with the same tokenizer propose (`draft_propose`). Greedy output is the
  plain greedy output; sampled output keeps the model's distribution through speculative sampling's
  accept/reject rule (`accept_reject`).

The decode loop (`inference.generate.iter_generate`) takes a `Speculator` from `make_speculator` and asks
it for a proposal before each step; with none (or an empty one) it decodes one token as usual.

Shape legend: T time, V vocab, k draft tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from scratchgpt.config import DRAFT_TOKENS, SamplingConfig
from scratchgpt.inference.sampling import greedy_tokens, sample_from_probs, token_probs
from scratchgpt.model.gpt import GPT, KVCache

Verified = tuple[Tensor, list[int], Tensor | None]  # logits after the last kept token (1, V), kept tokens, next


class Speculator(Protocol):
    """What the decode loop asks of a speculative method: a proposal, then the model's verdict on it."""

    def propose(self, tokens: list[int], *, room: int) -> list[int]:
        """Up to `room` tokens to follow `tokens` (the sequence so far, its last token not yet fed)."""
        ...

    def verify(self, model: GPT, token: Tensor, proposal: list[int], cache: KVCache) -> Verified:
        """Feed [token, *proposal] through `model` on `cache` in one pass; see `verify_draft`."""
        ...


class PromptLookup:
    """Prompt-lookup decoding: up to `k` draft tokens copied from an earlier occurrence of the last n-gram."""

    def __init__(self, k: int):
        self.k = k

    def propose(self, tokens: list[int], *, room: int) -> list[int]:
        return lookup_draft(tokens, min(self.k, room))

    def verify(self, model: GPT, token: Tensor, proposal: list[int], cache: KVCache) -> Verified:
        return verify_draft(model, token, proposal, cache)


class DraftModel:
    """Speculative decoding with a draft model, one prompt at a time, on its own KV cache.

    How many tokens the draft proposes adapts to the text: one fewer after a pass with a rejection, two
    more (up to `max_tokens`) after a pass that kept them all, so easy stretches go fast and hard ones
    waste little draft work (the schedule of transformers' assisted generation). `stats` receives
    "drafted" and "accepted" counts (acceptance rate = accepted / drafted).
    """

    def __init__(
        self, draft: GPT, *, max_tokens: int, sampling: SamplingConfig, generator: torch.Generator | None,
        stats: dict[str, int], max_len: int,
    ):
        self.draft = draft
        self.max_tokens = max_tokens
        self.k = max_tokens
        self.sampling = sampling
        self.generator = generator
        self.stats = stats
        stats.setdefault("drafted", 0)
        stats.setdefault("accepted", 0)
        param = next(draft.parameters())
        self.cache = KVCache.empty(draft.config, batch_size=1, max_len=min(max_len, draft.config.n_positions),
                                   device=param.device, dtype=param.dtype, step_memo=True)  # (one generation's)
        self._n_fed = 0  # len(tokens) of the last proposal
        self._q: Tensor | None = None  # the draft's distributions for the last proposal (sampling only)

    def propose(self, tokens: list[int], *, room: int) -> list[int]:
        # The draft model's cache may be shorter than ours (its context); stop drafting there.
        room = min(room, self.cache.max_len - len(tokens))
        if room <= 0:
            return []
        self._n_fed = len(tokens)
        proposal, self._q = draft_propose(self.draft, self.cache, tokens, min(self.k, room), self.sampling,
                                          self.generator)
        return proposal

    def verify(self, model: GPT, token: Tensor, proposal: list[int], cache: KVCache) -> Verified:
        accept = None if self.sampling.greedy else partial(
            accept_reject, q=self._q, draft=proposal, sampling=self.sampling, generator=self.generator)
        logits, accepted, chosen = verify_draft(model, token, proposal, cache, accept=accept)
        # The draft cache holds tokens + proposal[:-1]; keep only what was accepted.
        self.cache.length = min(self.cache.length, self._n_fed + len(accepted))
        self.stats["drafted"] += len(proposal)
        self.stats["accepted"] += len(accepted)
        # Whether to draft more or fewer next time depends only on passes already made,
        # so the accept/reject rule stays exact.
        self.k = min(self.k + 2, self.max_tokens) if len(accepted) == len(proposal) else max(self.k - 1, 1)
        return logits, accepted, chosen


def make_speculator(
    model: GPT,
    samplings: Sequence[SamplingConfig],
    generators: Sequence[torch.Generator | None],
    *,
    use_cache: bool,
    prompt_lookup: int = 0,
    draft: GPT | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    stats: dict[str, int] | None = None,
    max_len: int,
) -> Speculator | None:
    """The speculator for this decode (one row per entry of `samplings`), or None for plain decoding.

    A `draft` that cannot serve is a one-line error; prompt lookup silently stays off where it would not be
    exact (several prompts, no cache, sampling, a repetition penalty). `max_len` is the model's cache length.
    """
    if draft is not None:
        check_draft(model, draft)
        if len(samplings) != 1 or not use_cache:
            raise ValueError("speculative decoding with a draft model runs one prompt at a time, with the KV cache")
        if samplings[0].repetition_penalty != 1.0:
            raise ValueError("speculative decoding does not support repetition_penalty; leave it at 1.0")
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens} must be >= 1")
        return DraftModel(draft, max_tokens=draft_tokens, sampling=samplings[0], generator=generators[0],
                          stats=stats if stats is not None else {}, max_len=max_len)
    # Prompt lookup is exact only for greedy decoding, where a draft token is accepted iff it is
    # the argmax the model would have produced anyway.
    exact = len(samplings) == 1 and use_cache and samplings[0].greedy and samplings[0].repetition_penalty == 1.0
    return PromptLookup(prompt_lookup) if prompt_lookup and exact else None


def _encode_or_none(tokenizer, text: str) -> list[int] | None:
    """`text`'s ids, or None where the tokenizer cannot encode it (a character-level alphabet without
    one of its characters: two such tokenizers are already told apart by what every id decodes to)."""
    try:
        return tokenizer.encode(text)
    except ValueError:
        return None


def check_draft(model: GPT, draft: GPT, *, model_tokenizer=None, draft_tokenizer=None) -> None:
    """A one-line error unless `draft` can propose tokens for `model`: same vocabulary and tokenizer."""
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens but the model's has "
                         f"{model.config.vocab_size}; a draft must use the same tokenizer")
    if model_tokenizer is not None and draft_tokenizer is not None:
        probe = "The quick brown fox, 3.14 é\n"
        same = (type(model_tokenizer) is type(draft_tokenizer) and model_tokenizer.eot_id == draft_tokenizer.eot_id
                and model_tokenizer.vocab_size == draft_tokenizer.vocab_size
                and model_tokenizer.decode_bytes(range(model_tokenizer.vocab_size))
                == draft_tokenizer.decode_bytes(range(draft_tokenizer.vocab_size))
                and _encode_or_none(model_tokenizer, probe) == _encode_or_none(draft_tokenizer, probe))
        if not same:
            raise ValueError(f"the draft model's tokenizer ({draft_tokenizer!r}) differs from the model's "
                             f"({model_tokenizer!r}); a draft must use the same tokenizer")


def lookup_draft(tokens: list[int], k: int, *, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup draft: up to k tokens that followed an earlier occurrence of the last n-gram.

    Prefers the latest occurrence that is followed by k tokens (recent context predicts best),
    else the occurrence followed by the most tokens; longer n-grams are tried first.
    """
    if k <= 0:
        return []
    n_tok = len(tokens)
    for n in range(min(max_ngram, n_tok - 1), 0, -1):
        tail = tokens[n_tok - n :]
        best: list[int] = []
        for i in range(n_tok - n - 1, -1, -1):
            if tokens[i : i + n] == tail:
                follow = tokens[i + n : i + n + k]
                if len(follow) == k:
                    return follow
                best = follow if len(follow) > len(best) else best
        if best:
            return best
    return []


@torch.inference_mode()
def verify_draft(
    model: GPT, token: Tensor, draft: list[int], cache: KVCache,
    *, accept: Callable[[Tensor], tuple[int, Tensor | None]] | None = None,
) -> tuple[Tensor, list[int], Tensor | None]:
    """Run [token, *draft] (1, 1+k) in one pass; keep the draft prefix the model agrees with.

    By default "agrees" is greedy: a draft token is kept iff it is the argmax. `accept(logits)` with
    logits (1+k, V) replaces that rule and may also return the next token itself (speculative
    sampling). Returns the logits that follow the last kept token (1, V), the kept draft tokens and
    the next token if `accept` chose it (else None). The cache is rolled back past rejected tokens;
    their stale entries are overwritten by the next write.
    """
    start = cache.length
    inp = torch.cat([token.view(1, 1), token.new_tensor([draft])], dim=1)  # (1, 1+k)
    logits, _ = model(inp, kv_cache=cache)  # (1, 1+k, V): reads the weights once for 1+k tokens
    chosen = None
    if accept is None:
        preds = greedy_tokens(logits[0]).tolist()  # greedy choice after each input position
        n_ok = 0
        while n_ok < len(draft) and preds[n_ok] == draft[n_ok]:
            n_ok += 1
    else:
        n_ok, chosen = accept(logits[0])
    cache.length = start + 1 + n_ok
    return logits[:, n_ok, :], draft[:n_ok], chosen


@torch.inference_mode()
def draft_propose(
    draft: GPT, dcache: KVCache, tokens: list[int], k: int, sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[list[int], Tensor | None]:
    """Let the draft model continue `tokens` by k tokens, one cached step each.

    Feeds the draft whatever of `tokens` its cache lacks, then its own picks; the last pick is not
    fed (the model's verification pass decides whether it stays). Returns the k tokens and, when
    sampling, the draft's distributions q (k, V) they were drawn from.
    """
    inp = torch.tensor([tokens[dcache.length :]], dtype=torch.long, device=dcache.k.device)  # (1, new)
    proposal: list[int] = []
    qs: list[Tensor] = []
    for i in range(k):
        logits, _ = draft(inp, kv_cache=dcache, last_token_only=True)
        if sampling.greedy:
            tok = int(greedy_tokens(logits[0, -1]))
        else:
            q = token_probs(logits[:, -1], sampling)  # (1, V)
            tok = int(sample_from_probs(q, generator=generator)[0])
            qs.append(q[0])
        proposal.append(tok)
        if i + 1 < k:
            inp = inp.new_tensor([[tok]])
    return proposal, (torch.stack(qs) if qs else None)


def accept_reject(
    logits: Tensor, q: Tensor, draft: list[int], sampling: SamplingConfig, generator: torch.Generator | None,
) -> tuple[int, Tensor]:
    """Speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023) for one verified pass.

    logits (1+k, V) are the model's after each input position; q (k, V) the draft's distributions.
    Draft token d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)). At the first rejection the
    next token is drawn from norm(max(0, p_i - q_i)), the part of p that q under-covers; if all k are
    kept, a bonus token is drawn from p_k. Each emitted token is then distributed exactly as p, the
    model's own (filtered, temperature-scaled) distribution. Returns (kept count, next token (1,)).
    """
    p = token_probs(logits, sampling)  # (1+k, V)
    k = len(draft)
    d = torch.tensor(draft, device=p.device)
    ratio = p[torch.arange(k), d].double() / q[torch.arange(k), d].double()  # q(d_i) > 0: d_i was drawn from q
    u = torch.rand(k, generator=generator, device=p.device, dtype=torch.float64)
    rejected = (u >= ratio).nonzero()
    if len(rejected) == 0:
        return k, sample_from_probs(p[k : k + 1], generator=generator)
    i = int(rejected[0])
    residual = (p[i] - q[i]).clamp(min=0)[None]  # (1, V); sample_from_probs rescales it
    if not bool((residual > 0).any()):  # p == q exactly: then rejection had probability 0; use p
        residual = p[i : i + 1]
    return i, sample_from_probs(residual, generator=generator)
