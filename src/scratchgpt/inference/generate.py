"""Text generation as small pure functions: filter logits, sample, prefill, decode one token, stream.

Everything random takes a `torch.Generator`, so a seed reproduces a completion exactly. The decode
loop (`iter_generate`) serves single prompts and batches of prompts of different lengths (left
padding + attention mask + per-row position ids): each row comes out as if it ran alone.

Shape legend: B batch, T time, S cached positions, V vocab.
"""

from __future__ import annotations

import codecs
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from scratchgpt.config import SamplingConfig
from scratchgpt.model.fast_linear import Linear
from scratchgpt.model.gpt import GPT, KVCache

# ---------------------------------------------------------------------------------------------
# Pure sampling functions
# ---------------------------------------------------------------------------------------------


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
        return logits.argmax(dim=-1)
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


# ---------------------------------------------------------------------------------------------
# Text assembly: UTF-8-safe streaming and stop strings
# ---------------------------------------------------------------------------------------------


class TextAssembler:
    """Turns a token stream into text pieces that never split a UTF-8 character or leak a stop string.

    Text that could still be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self._emitted = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty)."""
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is left (an incomplete UTF-8 tail becomes U+FFFD)."""
        self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stop:
            longest = max(map(len, self.stop))
            window_start = max(0, self._emitted - longest)
            hits = [i for s in self.stop if (i := self.text.find(s, window_start)) != -1]
            if hits:
                self.stopped = True
                end = min(hits)
                self.text = self.text[:end]
            elif not final:
                end -= self._held_back(longest)
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self, longest: int) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        tail = self.text[-(longest - 1) :] if longest > 1 else ""
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0


class Completion:
    """One row's progress: the tokens sampled so far, the text released, and why it finished.

    The one place that decides when a completion ends (end-of-text, a stop string, max_new_tokens);
    `iter_generate` and the server's continuous batcher both use it.
    """

    def __init__(self, sampling: SamplingConfig, *, tokenizer=None, eot_id: int | None = None):
        self.sampling = sampling
        self.eot_id = eot_id
        self.assembler = TextAssembler(tokenizer, sampling.stop) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length"

    def push(self, token: int) -> str:
        """Record the next token; return the text it releases (the rest of the text when it finishes)."""
        self.tokens.append(token)
        text = ""
        if self.eot_id is not None and token == self.eot_id and self.sampling.stop_at_eot:
            self.finish_reason = "stop"
        elif self.assembler is not None:
            text = self.assembler.push(token)
            if self.assembler.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.assembler is not None:
            text += self.assembler.finish()
        return text


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One row's new token in one decode step. `finish_reason` is set on the row's last step."""

    row: int
    token: int
    text: str = ""
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length"


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad prompts to one length: ids (B, T), attention mask (B, T), position ids (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p) :] = torch.as_tensor(p, dtype=torch.long, device=device)
            mask[i, T - len(p) :] = 1
    return ids, mask, positions_from_mask(mask)


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids that count real tokens only, so a padded row sees positions 0, 1, 2, ... (B, T)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


@torch.inference_mode()
def prefill(model: GPT, ids: Tensor, cache: KVCache, *, mask: Tensor | None, positions: Tensor | None) -> Tensor:
    """Run the prompts (B, T) through the model, filling the cache; logits of the last position (B, V)."""
    logits, _ = model(ids, kv_cache=cache, attention_mask=mask, position_ids=positions, last_token_only=True)
    return logits[:, -1, :]


@torch.inference_mode()
def decode_one_token(model: GPT, token: Tensor, cache: KVCache, *, positions: Tensor | None) -> Tensor:
    """Feed one new token per row (B, 1) through the cached model; logits (B, V)."""
    logits, _ = model(token, kv_cache=cache, position_ids=positions)
    return logits[:, -1, :]


def _as_prompt_list(prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        return [row.tolist() for row in (prompts if prompts.dim() == 2 else prompts[None])]
    if len(prompts) and isinstance(prompts[0], int):
        return [list(prompts)]  # type: ignore[arg-type]
    return [list(p) for p in prompts]  # type: ignore[union-attr]


@dataclass(frozen=True)
class DecodePath:
    """Which `Linear` layers take the few-row path (W @ xᵀ) when decoding: the blocks', the LM head's."""

    blocks: bool = False
    head: bool = False


def pick_decode_path(step_seconds: dict[DecodePath, float], *, margin: float = 0.9) -> DecodePath:
    """The path from measured decode-step times of `DecodePath()`, `DecodePath(blocks=True)` and
    `DecodePath(head=True)`: a group switches to W @ xᵀ only when that made the whole step at least
    1 - `margin` (10%) faster than the plain path. Deterministic given the times."""
    plain = step_seconds[DecodePath()]
    return DecodePath(blocks=step_seconds[DecodePath(blocks=True)] < margin * plain,
                      head=step_seconds[DecodePath(head=True)] < margin * plain)


def set_decode_path(model: GPT, path: DecodePath) -> None:
    """Turn `Linear`'s few-row path on or off per group: the LM head, and every other layer."""
    head = getattr(model, "lm_head", None)
    for m in model.modules():
        if isinstance(m, Linear):
            m.few_rows = 16 if (path.head if m is head else path.blocks) else 0


@torch.inference_mode()
def choose_decode_path(
    model: GPT, *, repeats: int = 3, step_time: Callable[[DecodePath], float] | None = None,
) -> DecodePath:
    """Measure, once per model, which `Linear` layers decode faster with the few-row path; set it.

    What is timed is the real work: whole batch-1 decode steps through the model (`decode_one_token`
    on a KV cache), plain, with W @ xᵀ in the blocks, and with it in the LM head, interleaved, best of
    `repeats` each. A hot loop over one matrix measures the wrong thing: the matrix stays in the
    last-level cache after the first call, while a decode step streams every weight from DRAM, and the
    two paths rank differently there (Zen 4: 58 vs 40 GB/s cache-resident but 12.7 vs 26 GB/s from
    DRAM for the V-wide head). The head is its own group because its shape (V × C, ~30% of GPT-2's
    weights) ranks the paths differently from the block layers on some CPUs.
    Costs 3·`repeats` decode steps (the first round also warms every path up; best-of discards it);
    the answer is kept on the model, so later calls return at once. `step_time(path)` replaces the
    measurement (seconds for one step), for tests.
    """
    chosen = getattr(model, "_decode_path", None)
    if chosen is not None:
        return chosen
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    measurable = all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
    path = DecodePath()
    if weights and (measurable or step_time is not None):
        candidates = (DecodePath(), DecodePath(blocks=True), DecodePath(head=True))
        step_time = step_time or _decode_step_timer(model)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats):  # interleaved: a machine that slows down mid-way slows every candidate
            for c in candidates:
                best[c] = min(best[c], step_time(c))
        path = pick_decode_path(best)
    set_decode_path(model, path)
    model._decode_path = path
    return path


def _decode_step_timer(model: GPT) -> Callable[[DecodePath], float]:
    """Seconds for one real decode step (batch 1, one token into the KV cache) with the given path."""
    cache = KVCache.empty(model.config, batch_size=1, max_len=1, device="cpu", dtype=torch.float32)
    token = torch.zeros(1, 1, dtype=torch.long)

    def step_time(path: DecodePath) -> float:
        set_decode_path(model, path)
        cache.length = 0  # the same step every time: the first token, so no prefill is needed
        t0 = time.perf_counter()
        decode_one_token(model, token, cache, positions=None)
        return time.perf_counter() - t0

    return step_time


def iter_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | Sequence[SamplingConfig],
    *,
    eot_id: int | None = None,
    tokenizer=None,
    generators: Sequence[torch.Generator | None] | None = None,
    use_cache: bool = True,
    prompt_lookup: int = 0,
    draft: GPT | None = None,
    draft_tokens: int = 4,
    stats: dict[str, int] | None = None,
) -> Iterator[list[Step]]:
    """Decode a batch of prompts together; yield, per step, the new token of every unfinished row.

    `sampling` and `generators` may be one for all rows or one per row. Stop strings need a
    `tokenizer`; with one, each Step also carries the row's newly released text. `prompt_lookup` > 0
    turns on prompt-lookup decoding for a single greedy prompt: up to that many draft tokens, copied
    from where the last few tokens occurred before, are checked in one forward pass. The output is
    the same greedy text; repetitive text (code, quotes, summaries) comes out several tokens per pass.

    `draft` (a smaller model with the same tokenizer) turns on speculative decoding for a single
    prompt: the draft proposes up to `draft_tokens` tokens one by one, the model checks them in one
    pass. How many adapts to the text: one fewer after a pass with a rejection, two more (up to
    `draft_tokens`) after a pass that kept them all, so easy stretches go fast and hard ones waste
    little draft work (the schedule of transformers' assisted generation).
    Greedy output is identical to plain decoding; sampled output follows the same distribution
    (standard accept/reject rule, see `_accept_reject`). `stats`, if given, receives "drafted" and
    "accepted" counts (acceptance rate = accepted / drafted).
    """
    B = len(prompts)
    if B == 0:
        return
    samplings = list(sampling) if isinstance(sampling, Sequence) else [sampling] * B
    gens = list(generators) if generators is not None else [None] * B
    if len(samplings) != B or len(gens) != B:
        raise ValueError(f"got {B} prompts but {len(samplings)} sampling configs and {len(gens)} generators")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(s.stop for s in samplings) and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    choose_decode_path(model)
    n_ctx = model.config.n_positions
    if max(len(p) for p in prompts) > n_ctx:
        warnings.warn(f"prompt longer than the context ({n_ctx} tokens): keeping its last {n_ctx} tokens", stacklevel=2)
        prompts = [list(p)[-n_ctx:] for p in prompts]

    if draft is not None:
        check_draft(model, draft)
        choose_decode_path(draft)
        if B != 1 or not use_cache:
            raise ValueError("speculative decoding with a draft model runs one prompt at a time, with the KV cache")
        if samplings[0].repetition_penalty != 1.0:
            raise ValueError("speculative decoding does not support repetition_penalty; leave it at 1.0")
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens} must be >= 1")

    device = next(model.parameters()).device
    gens = seeded_generators(samplings, gens, device)
    was_training = model.training
    model.eval()
    if draft is not None:
        draft.eval()
    spec = (draft, draft_tokens, stats if stats is not None else {})
    try:
        yield from _decode(model, [list(p) for p in prompts], samplings, gens, eot_id, tokenizer, use_cache, device,
                           prompt_lookup, spec)
    finally:
        model.train(was_training)


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


def _decode(model, prompts, samplings, gens, eot_id, tokenizer, use_cache, device, lookup,
            spec) -> Iterator[list[Step]]:
    B = len(prompts)
    n_ctx = model.config.n_positions
    max_new = max(s.max_new_tokens for s in samplings)
    rows = [Completion(s, tokenizer=tokenizer, eot_id=eot_id) for s in samplings]
    # seq holds every row's tokens so far (left-padded); mask marks the real ones.
    seq, mask, positions = left_pad(prompts, device=device)
    padded = bool((mask == 0).any())
    active = [s.max_new_tokens > 0 for s in samplings]
    if not any(active):
        return
    needs_history = any(s.repetition_penalty != 1.0 for s in samplings)
    # Prompt lookup is exact only for greedy decoding, where a draft token is accepted iff it is
    # the argmax the model would have produced anyway.
    lookup = lookup if (B == 1 and use_cache and samplings[0].greedy and not needs_history) else 0

    def emit(r: int, tok: int) -> Step:
        text = rows[r].push(tok)
        active[r] = rows[r].finish_reason is None
        return Step(row=r, token=tok, text=text, finish_reason=rows[r].finish_reason)

    cache = None
    if use_cache:
        cache = KVCache.empty(model.config, batch_size=B, max_len=min(n_ctx, seq.size(1) + max_new), device=device,
                              dtype=next(model.parameters()).dtype)
        logits = prefill(model, seq, cache, mask=mask if padded else None, positions=positions if padded else None)
    else:
        logits = _full_forward(model, seq, mask, padded)
    draft, k_max, stats = spec
    k_draft = k_max  # adapts after every verification pass (see iter_generate)
    dcache = None
    if draft is not None:
        lookup = 0
        stats.setdefault("drafted", 0)
        stats.setdefault("accepted", 0)
        d_len = min(cache.max_len, draft.config.n_positions)
        dcache = KVCache.empty(draft.config, batch_size=1, max_len=d_len, device=device,
                               dtype=next(draft.parameters()).dtype)
    preset: Tensor | None = None  # a next token already drawn by speculative sampling's accept/reject step

    while True:
        if preset is not None:
            next_tokens, preset = preset, None
        else:
            next_tokens = sample_rows(logits, samplings, gens, active=active,
                                      history=lambda r, seq=seq, mask=mask: seq[r][mask[r].bool()])
        yield [emit(r, int(next_tokens[r])) for r in range(B) if active[r]]
        if not any(active):
            return

        # -- extend every row (finished ones too: keeping the batch rectangular is cheaper) --------
        seq = torch.cat([seq, next_tokens.view(B, 1).to(seq.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if cache is not None and cache.length < cache.max_len:
            room = min(cache.max_len - cache.length - 1, samplings[0].max_new_tokens - len(rows[0].tokens) - 1)
            proposal = _lookup_draft(seq[0].tolist(), min(lookup, room)) if lookup else []
            accept = None
            if dcache is not None:
                # The draft model's cache may be shorter than ours (its context); stop drafting there.
                room = min(room, dcache.max_len - seq.size(1))
                if room > 0:
                    proposal, q = _draft_propose(draft, dcache, seq[0].tolist(), min(k_draft, room), samplings[0],
                                                 gens[0])
                    accept = None if samplings[0].greedy else (
                        lambda lg, q=q, d=proposal: _accept_reject(lg, q, d, samplings[0], gens[0]))
            if proposal:
                n_fed = seq.size(1)
                logits, accepted, preset = _verify_draft(model, next_tokens, proposal, cache, accept=accept)
                if dcache is not None:
                    # The draft cache holds seq + proposal[:-1]; keep only what was accepted.
                    dcache.length = min(dcache.length, n_fed + len(accepted))
                    stats["drafted"] += len(proposal)
                    stats["accepted"] += len(accepted)
                    # Whether to draft more or fewer next time depends only on passes already made,
                    # so the accept/reject rule stays exact.
                    k_draft = min(k_draft + 2, k_max) if len(accepted) == len(proposal) else max(k_draft - 1, 1)
                for tok in accepted:
                    yield [emit(0, tok)]
                    if not active[0]:
                        return
                seq = torch.cat([seq, seq.new_tensor([accepted])], dim=1)
                mask = torch.cat([mask, mask.new_ones(1, len(accepted))], dim=1)
            else:
                pos = positions_from_mask(mask)[:, -1:] if padded else None
                logits = decode_one_token(model, next_tokens.view(B, 1), cache, positions=pos)
        else:
            # No cache, or the context is full: slide the window over the last n_ctx tokens and
            # recompute, exactly like the textbook's uncached generate loop.
            cache = None
            seq, mask = seq[:, -n_ctx:], mask[:, -n_ctx:]
            logits = _full_forward(model, seq, mask, padded)


def _lookup_draft(tokens: list[int], k: int, *, max_ngram: int = 3) -> list[int]:
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
def _verify_draft(
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
        preds = logits[0].argmax(dim=-1).tolist()  # greedy choice after each input position
        n_ok = 0
        while n_ok < len(draft) and preds[n_ok] == draft[n_ok]:
            n_ok += 1
    else:
        n_ok, chosen = accept(logits[0])
    cache.length = start + 1 + n_ok
    return logits[:, n_ok, :], draft[:n_ok], chosen


@torch.inference_mode()
def _draft_propose(
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
            tok = int(logits[0, -1].argmax())
        else:
            q = token_probs(logits[:, -1], sampling)  # (1, V)
            tok = int(sample_from_probs(q, generator=generator)[0])
            qs.append(q[0])
        proposal.append(tok)
        if i + 1 < k:
            inp = inp.new_tensor([[tok]])
    return proposal, (torch.stack(qs) if qs else None)


def _accept_reject(
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


def _full_forward(model: GPT, seq: Tensor, mask: Tensor, padded: bool) -> Tensor:
    if padded:
        logits, _ = model(seq, attention_mask=mask, position_ids=positions_from_mask(mask), last_token_only=True)
    else:
        logits, _ = model(seq, last_token_only=True)
    return logits[:, -1, :]


def sample_rows(
    logits: Tensor,
    samplings: Sequence[SamplingConfig],
    generators: Sequence[torch.Generator | None],
    *,
    active: Sequence[bool] | None = None,
    history: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """One next token per row of logits (B, V) -> (B,), each row with its own settings and generator.

    Plain greedy rows share one argmax; every other row samples alone, so a row's draws never depend
    on which rows share the batch. `history(r)` gives row r's tokens so far (1-D), needed only for a
    repetition penalty. Rows marked inactive get token 0.
    """
    out = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    rows = [r for r in range(logits.size(0)) if active is None or active[r]]
    greedy = [r for r in rows if samplings[r].greedy and samplings[r].repetition_penalty == 1.0]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=-1)
    for r in rows:
        if r in greedy:
            continue
        seen = history(r) if history is not None and samplings[r].repetition_penalty != 1.0 else None
        out[r] = sample_next_token(logits[r : r + 1], samplings[r], generator=generators[r], seen=seen)[0]
    return out


# ---------------------------------------------------------------------------------------------
# Convenience wrappers
# ---------------------------------------------------------------------------------------------


def seeded_generators(
    samplings: Sequence[SamplingConfig], generators: Sequence[torch.Generator | None], device: torch.device | str
) -> list[torch.Generator | None]:
    """Fill in a generator seeded with `sampling.seed` for every row that has a seed but no generator.

    Rows that share one SamplingConfig share one generator (drawing in row order, as one generator
    passed for all rows would), so a seeded call gives the same tokens every time it is made.
    """
    made: dict[int, torch.Generator | None] = {}
    out = []
    for s, g in zip(samplings, generators, strict=True):
        if g is None and s.seed is not None:
            if id(s) not in made:
                made[id(s)] = make_generator(s.seed, device)
            g = made[id(s)]
        out.append(g)
    return out


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator seeded with `seed`, or None (the global RNG) when seed is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def generate(
    model: GPT,
    prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    sampling: SamplingConfig,
    *,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    tokenizer=None,
    prompt_lookup: int = 0,
    draft: GPT | None = None,
    draft_tokens: int = 4,
    stats: dict[str, int] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (end-of-text excluded). One prompt or a batch of any lengths.

    Without a `generator`, `sampling.seed` (when set) seeds one: the same call gives the same tokens.
    """
    rows = _as_prompt_list(prompts)
    out: list[list[int]] = [[] for _ in rows]
    # With one shared generator, rows draw from it in row order; pass per-row generators to
    # iter_generate for draws independent of batch composition.
    for steps in iter_generate(model, rows, sampling, eot_id=eot_id, tokenizer=tokenizer,
                               generators=[generator] * len(rows), use_cache=use_cache,
                               prompt_lookup=prompt_lookup, draft=draft, draft_tokens=draft_tokens, stats=stats):
        for s in steps:
            if not (s.finish_reason == "stop" and s.token == eot_id and sampling.stop_at_eot):
                out[s.row].append(s.token)
    return out


def stream_text(
    model: GPT, tokenizer, prompt: str, sampling: SamplingConfig, *,
    generator: torch.Generator | None = None, use_cache: bool = True, prompt_lookup: int = 0,
    draft: GPT | None = None, draft_tokens: int = 4, stats: dict[str, int] | None = None,
) -> Iterator[str]:
    """Yield the completion of `prompt` as text pieces, never splitting a UTF-8 character."""
    # An empty prompt starts from end-of-text, the token GPT-2 saw between documents.
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    for steps in iter_generate(model, [ids], sampling, eot_id=tokenizer.eot_id, tokenizer=tokenizer,
                               generators=[generator], use_cache=use_cache, prompt_lookup=prompt_lookup,
                               draft=draft, draft_tokens=draft_tokens, stats=stats):
        for s in steps:
            if s.text:
                yield s.text


def generate_text(
    model: GPT, tokenizer, prompt: str, sampling: SamplingConfig, *, generator: torch.Generator | None = None,
) -> str:
    """The completion of `prompt` (without the prompt), stopping at end-of-text or a stop string."""
    return "".join(stream_text(model, tokenizer, prompt, sampling, generator=generator))
