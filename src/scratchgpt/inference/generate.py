"""Text generation as small functions: prefill, decode one token, sample, stream.

The decode loop (`iter_generate`) reads as gpt-fast's: `prefill` runs the prompts through the model and
fills the KV cache, then each step samples one token per row (`sample_rows`, over the pure functions of
`inference.sampling`) and feeds it back with `decode_one_token`. It serves single prompts and batches of
prompts of different lengths (left padding + attention mask + per-row position ids): each row comes out
as if it ran alone. Speculative and prompt-lookup decoding (`inference.speculative`) plug into the loop
as one optional step that proposes several tokens and verifies them in one pass.

Everything random takes a `torch.Generator`, so a seed reproduces a completion exactly.

Shape legend: B batch, T time, S cached positions, V vocab.
"""

from __future__ import annotations

import codecs
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scratchgpt.config import DRAFT_TOKENS, SamplingConfig
from scratchgpt.device import native_bf16
from scratchgpt.inference.sampling import greedy_tokens, sample_next_token
from scratchgpt.inference.speculative import Speculator, make_speculator
from scratchgpt.model.fast_linear import Linear, split_parts, store_input_major
from scratchgpt.model.fused_decode import fuse_decode_steps
from scratchgpt.model.gpt import GPT, KVCache
from scratchgpt.model.native import native_kernels

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
# The decode loop: prefill -> sample -> decode_one_token
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


def _full_forward(model: GPT, seq: Tensor, mask: Tensor, padded: bool) -> Tensor:
    """Logits (B, V) after the last position of seq (B, T), recomputed without a cache (the sliding window)."""
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
    if logits.size(0) == 1 and (active is None or active[0]) and samplings[0].greedy \
            and samplings[0].repetition_penalty == 1.0:
        return greedy_tokens(logits)  # one greedy row (the common decode): no per-row bookkeeping
    out = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    rows = [r for r in range(logits.size(0)) if active is None or active[r]]
    greedy = [r for r in rows if samplings[r].greedy and samplings[r].repetition_penalty == 1.0]
    if greedy:
        out[greedy] = greedy_tokens(logits[greedy])
    for r in rows:
        if r in greedy:
            continue
        seen = history(r) if history is not None and samplings[r].repetition_penalty != 1.0 else None
        out[r] = sample_next_token(logits[r : r + 1], samplings[r], generator=generators[r], seen=seen)[0]
    return out


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
    draft_tokens: int = DRAFT_TOKENS,
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
    pass (how many adapts to the text: `inference.speculative.DraftModel`). Greedy output is identical
    to plain decoding; sampled output follows the same distribution (standard accept/reject rule, see
    `inference.speculative.accept_reject`). `stats`, if given, receives "drafted" and "accepted" counts
    (acceptance rate = accepted / drafted).
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

    device = next(model.parameters()).device
    gens = seeded_generators(samplings, gens, device)
    # The KV cache holds the longest prompt and every new token, up to the context.
    cache_len = min(n_ctx, max(len(p) for p in prompts) + max(s.max_new_tokens for s in samplings))
    speculator = make_speculator(model, samplings, gens, use_cache=use_cache, prompt_lookup=prompt_lookup,
                                 draft=draft, draft_tokens=draft_tokens, stats=stats, max_len=cache_len)
    was_training = model.training
    model.eval()
    if draft is not None:
        choose_decode_path(draft)
        draft.eval()
    try:
        yield from _decode(model, [list(p) for p in prompts], samplings, gens, eot_id=eot_id, tokenizer=tokenizer,
                           cache_len=cache_len if use_cache else None, speculator=speculator)
    finally:
        model.train(was_training)


def _decode(
    model: GPT, prompts: list[list[int]], samplings: list[SamplingConfig], gens: list[torch.Generator | None], *,
    eot_id: int | None, tokenizer, cache_len: int | None, speculator: Speculator | None,
) -> Iterator[list[Step]]:
    """The loop of `iter_generate`: prefill, then sample -> decode_one_token until every row has finished.

    Without a cache (`cache_len` None), or once the context is full, every step recomputes the last
    n_positions tokens instead. A `speculator` may replace a step by a verified proposal of several tokens.
    """
    B = len(prompts)
    n_ctx = model.config.n_positions
    device = next(model.parameters()).device
    rows = [Completion(s, tokenizer=tokenizer, eot_id=eot_id) for s in samplings]
    # seq holds every row's tokens so far (left-padded); mask marks the real ones.
    seq, mask, positions = left_pad(prompts, device=device)
    padded = bool((mask == 0).any())
    active = [s.max_new_tokens > 0 for s in samplings]
    if not any(active):
        return

    def emit(r: int, tok: int) -> Step:
        text = rows[r].push(tok)
        active[r] = rows[r].finish_reason is None
        return Step(row=r, token=tok, text=text, finish_reason=rows[r].finish_reason)

    cache = None
    if cache_len is not None:
        cache = KVCache.empty(model.config, batch_size=B, max_len=cache_len, device=device,
                              dtype=next(model.parameters()).dtype, step_memo=True)  # (this loop's own)
        logits = prefill(model, seq, cache, mask=mask if padded else None, positions=positions if padded else None)
    else:
        logits = _full_forward(model, seq, mask, padded)
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

        # Extend every row (finished ones too: keeping the batch rectangular is cheaper).
        seq = torch.cat([seq, next_tokens.view(B, 1).to(seq.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if cache is None or cache.length >= cache.max_len:
            # No cache, or the context is full: slide the window over the last n_ctx tokens and
            # recompute, exactly like the textbook's uncached generate loop.
            cache = None
            seq, mask = seq[:, -n_ctx:], mask[:, -n_ctx:]
            logits = _full_forward(model, seq, mask, padded)
            continue

        proposal: list[int] = []
        if speculator is not None:  # one row: the speculators refuse or stay off for batches
            room = min(cache.max_len - cache.length - 1, samplings[0].max_new_tokens - len(rows[0].tokens) - 1)
            proposal = speculator.propose(seq[0].tolist(), room=room)
        if not proposal:
            pos = positions_from_mask(mask)[:, -1:] if padded else None
            logits = decode_one_token(model, next_tokens.view(B, 1), cache, positions=pos)
            continue

        # Speculative step: the model checks [next token, *proposal] in one pass and keeps what it agrees with.
        logits, accepted, preset = speculator.verify(model, next_tokens, proposal, cache)
        for tok in accepted:
            yield [emit(0, tok)]
            if not active[0]:
                return
        seq = torch.cat([seq, seq.new_tensor([accepted])], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, len(accepted))], dim=1)


# ---------------------------------------------------------------------------------------------
# Which CPU path the Linear layers take when decoding (see model.fast_linear)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePath:
    """How the `Linear` layers decode: the few-row path (W @ xᵀ) for the blocks' and/or the LM head's, or
    every weight stored input-major (`model.fast_linear.store_input_major`; then no few-row path), its
    products optionally split over the threads (`split`: `Linear.split_k`), or every layer's few-row
    products on scratchgpt's own kernel (`native`: `Linear.native`, the weights as stored)."""

    blocks: bool = False
    head: bool = False
    input_major: bool = False
    split: bool = False
    native: bool = False


INPUT_MAJOR = DecodePath(input_major=True)
SPLIT_K = DecodePath(input_major=True, split=True)
NATIVE = DecodePath(native=True)


def pick_decode_path(step_seconds: dict[DecodePath, float], *, margin: float = 0.9) -> DecodePath:
    """The path from measured decode-step times of `DecodePath()`, `DecodePath(blocks=True)`,
    `DecodePath(head=True)` and (when measured) `NATIVE`, `INPUT_MAJOR` and `SPLIT_K`: a group switches to
    W @ xᵀ only when that made the whole step at least 1 - `margin` (10%) faster than the plain path;
    scratchgpt's kernel wins when its step was the fastest of those (it changes no storage, so no margin);
    input-major storage (the faster of its two variants) wins only when its step was 10% faster than every
    other measured one. Deterministic given the times."""
    plain = step_seconds[DecodePath()]
    few = DecodePath(blocks=step_seconds[DecodePath(blocks=True)] < margin * plain,
                     head=step_seconds[DecodePath(head=True)] < margin * plain)
    others = min(t for p, t in step_seconds.items() if not p.input_major)
    if NATIVE in step_seconds and step_seconds[NATIVE] == others:
        few = NATIVE
    stored = min((p for p in (INPUT_MAJOR, SPLIT_K) if p in step_seconds), key=step_seconds.__getitem__,
                 default=None)
    return stored if stored is not None and step_seconds[stored] < margin * others else few


def set_decode_path(model: GPT, path: DecodePath) -> None:
    """Turn `Linear`'s few-row path on or off per group (the LM head, every other layer), store the
    weights input-major or not, split their products over the threads or not, and run them on
    scratchgpt's kernel or not."""
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    threads = torch.get_num_threads()
    for m in layers:
        m.few_rows = 16 if (path.head if m is head else path.blocks) else 0
        m.split_k = split_parts(m.in_features, threads) if path.split else 0
        m.native = path.native
    store_input_major(layers, path.input_major)


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
    measurement (seconds for one step), for tests. Measured: CPU models with float32 weights, and with
    bfloat16 ones where the CPU multiplies bf16 natively; any other keeps the plain path.

    A frozen model (no parameter requires a gradient: what the CLI, the server and `load_any(...,
    for_inference)` give) also tries input-major storage, after the others: switching it copies every
    weight once, so it is not interleaved with them. Its two variants, whole products and products split
    over the threads (`SPLIT_K`, tried with two threads or more), change no storage between them, so
    they are interleaved, `repeats` steps each. A model that may still train keeps nn.Linear's layout
    (an optimizer's moment buffers are laid out like the weights).
    """
    chosen = getattr(model, "_decode_path", None)
    if chosen is not None:
        return chosen
    # Timed as it will decode: in eval mode (a model still in training mode would time its dropout, and its
    # blocks' one-call step refuses to run in training mode), with each block's one-call decode step
    # (model/fused_decode.py) on wherever its products run on scratchgpt's kernels.
    was_training = model.training
    model.eval()
    try:
        return _measure_decode_path(model, repeats=repeats, step_time=step_time)
    finally:
        model.train(was_training)


def _measure_decode_path(model: GPT, *, repeats: int, step_time: Callable[[DecodePath], float] | None) -> DecodePath:
    """choose_decode_path's measurement (the model in eval mode), kept on the model."""
    fuse_decode_steps(model)
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    dtypes = {w.dtype for w in weights}
    # bfloat16 weights are measured only where bf16 products run natively: emulated, a 1B model's decode
    # step takes seconds, and none of the paths would change that.
    measurable = all(w.device.type == "cpu" for w in weights) and (
        dtypes == {torch.float32} or (dtypes == {torch.bfloat16} and native_bf16("cpu")))
    path = DecodePath()
    if weights and (measurable or step_time is not None):
        candidates = (DecodePath(), DecodePath(blocks=True), DecodePath(head=True))
        if native_kernels() is not None:  # (built on first use; where it cannot be, not a candidate)
            candidates += (NATIVE,)
        step_time = step_time or _decode_step_timer(model)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats):  # interleaved: a machine that slows down mid-way slows every candidate
            for c in candidates:
                best[c] = min(best[c], step_time(c))
        if not any(p.requires_grad for p in model.parameters()):
            stored = (INPUT_MAJOR, SPLIT_K) if torch.get_num_threads() > 1 else (INPUT_MAJOR,)
            best.update(dict.fromkeys(stored, float("inf")))
            for _ in range(repeats):
                for c in stored:
                    best[c] = min(best[c], step_time(c))
        path = pick_decode_path(best)
    keep_decode_path(model, path)
    return path


def keep_decode_path(model: GPT, path: DecodePath | None = None) -> DecodePath:
    """Decode `model` with `path` from now on, unmeasured: `choose_decode_path` returns it from then on. With
    no `path`, the one already chosen, else the plain path: for decoding too short to be worth a measurement
    (a sample during training; the plain path needs no kernel build either)."""
    if path is None:
        path = getattr(model, "_decode_path", None)
    if path is None:
        path = DecodePath()
    set_decode_path(model, path)
    model._decode_path = path
    return path


def _decode_step_timer(model: GPT) -> Callable[[DecodePath], float]:
    """Seconds for one real decode step (batch 1, one token into the KV cache) with the given path."""
    dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, Linear))
    cache = KVCache.empty(model.config, batch_size=1, max_len=1, device="cpu", dtype=dtype)
    token = torch.zeros(1, 1, dtype=torch.long)

    def step_time(path: DecodePath) -> float:
        set_decode_path(model, path)
        cache.length = 0  # the same step every time: the first token, so no prefill is needed
        t0 = time.perf_counter()
        decode_one_token(model, token, cache, positions=None)
        return time.perf_counter() - t0

    return step_time


# ---------------------------------------------------------------------------------------------
# Convenience wrappers
# ---------------------------------------------------------------------------------------------


def _as_prompt_list(prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        return [row.tolist() for row in (prompts if prompts.dim() == 2 else prompts[None])]
    if len(prompts) and isinstance(prompts[0], int):
        return [list(prompts)]  # type: ignore[arg-type]
    return [list(p) for p in prompts]  # type: ignore[union-attr]


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
    draft_tokens: int = DRAFT_TOKENS,
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
    draft: GPT | None = None, draft_tokens: int = DRAFT_TOKENS, stats: dict[str, int] | None = None,
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

