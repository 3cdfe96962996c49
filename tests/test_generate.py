"""Sampling functions, the KV-cached decode loop, batching, streaming and stop strings."""

from __future__ import annotations

import warnings

import pytest
import torch

from scratchgpt import GPT, GPTConfig, SamplingConfig
from scratchgpt.inference.generate import (
    TextAssembler,
    generate,
    generate_text,
    iter_generate,
    left_pad,
    make_generator,
    stream_text,
)
from scratchgpt.inference.sampling import apply_repetition_penalty, filter_logits, sample_next_token
from scratchgpt.inference.speculative import lookup_draft


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is end-of-text. Lets tests split UTF-8 characters at will."""

    vocab_size = 257
    eot_id = 256
    name = "bytes"

    def encode(self, text: str, *, allowed_special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class AsciiTokenizer(ByteTokenizer):
    """Token i < 95 is the printable ASCII character chr(32 + i); 95 is end-of-text."""

    vocab_size = 96
    eot_id = 95

    def encode(self, text: str, *, allowed_special: bool = False) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode_bytes(self, ids) -> bytes:
        return bytes(i + 32 for i in ids if i < 95)


def tiny_model(*, vocab_size: int = 97, n_positions: int = 32, seed: int = 0) -> GPT:
    config = GPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)
    return GPT(config, generator=torch.Generator().manual_seed(seed)).eval()


GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


# -- pure functions --------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum().item() == 2
    assert torch.isfinite(out[0, [1, 2, 3, 5]]).sum().item() == 2  # two of the four tied maxima


def test_top_p_one_is_a_no_op_and_small_top_p_keeps_only_the_best():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    out = filter_logits(logits, top_p=1e-6)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(3, dtype=torch.long))
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.8)  # 0.5 + 0.3 reaches 0.8 exactly: two survive
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_logits(probs.log(), top_p=0.81)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = filter_logits(probs.log(), min_p=0.2)  # threshold 0.12
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_temperature_zero_is_argmax_and_first_max_wins_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert sample_next_token(logits, SamplingConfig(temperature=0.0)).item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_are_argmax_with_ties_nan_and_infinities(dtype):
    """greedy_tokens (max's indices, faster on the CPU) picks exactly what argmax picks: the first maximum."""
    from scratchgpt.inference.sampling import greedy_tokens

    gen = torch.Generator().manual_seed(0)
    for V in (1, 7, 50257):
        x = torch.randint(-3, 3, (4, V), generator=gen).to(dtype)  # many ties
        x[1, V // 2] = float("nan")  # a NaN is the maximum, as in argmax
        x[2] = float("-inf")  # a row with nothing allowed
        x[3, -1] = float("inf")
        assert torch.equal(greedy_tokens(x), x.argmax(dim=-1)), V
        assert torch.equal(greedy_tokens(x[0]), x[0].argmax())  # one row, no batch dimension


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([0]), 1.0), logits)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0)
    draws = lambda seed: [sample_next_token(logits, cfg, generator=g).item()  # noqa: E731
                          for g in [make_generator(seed)] for _ in range(20)]
    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_sampling_config_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=0)
    assert SamplingConfig(stop="###").stop == ("###",)


# -- the decode loop -------------------------------------------------------------------------------


def test_cached_and_uncached_greedy_generation_give_the_same_tokens():
    model = tiny_model()
    prompt = [5, 17, 3, 9, 44]
    cached = generate(model, prompt, GREEDY, use_cache=True)
    uncached = generate(model, prompt, GREEDY, use_cache=False)
    assert cached == uncached
    assert len(cached[0]) == 12


def test_generation_past_the_context_slides_the_window_like_the_uncached_loop():
    model = tiny_model(n_positions=16)
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.0)  # 6 + 30 > 16 positions
    assert generate(model, [1, 2, 3, 4, 5, 6], cfg) == generate(model, [1, 2, 3, 4, 5, 6], cfg, use_cache=False)


def test_prompt_longer_than_context_is_cropped_with_a_warning():
    model = tiny_model(n_positions=16)
    long_prompt = list(range(1, 40))
    with pytest.warns(UserWarning, match="last 16 tokens"):
        out = generate(model, long_prompt, SamplingConfig(max_new_tokens=3, temperature=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out == generate(model, long_prompt[-16:], SamplingConfig(max_new_tokens=3, temperature=0.0))


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batched = generate(model, prompts, GREEDY)
    assert batched == [generate(model, p, GREEDY)[0] for p in prompts]
    assert batched == generate(model, prompts, GREEDY, use_cache=False)


def test_sampled_batch_rows_with_own_generators_equal_rows_alone():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=20)

    def tokens(ps, seeds):
        out = [[] for _ in ps]
        for steps in iter_generate(model, ps, cfg, generators=[make_generator(s) for s in seeds]):
            for s in steps:
                out[s.row].append(s.token)
        return out

    together = tokens(prompts, [11, 12])
    assert together == [tokens([prompts[0]], [11])[0], tokens([prompts[1]], [12])[0]]


def test_left_pad_builds_mask_and_positions():
    ids, mask, pos = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_generation_matches_transformers_greedy_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from scratchgpt.checkpoint import load_hf

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None,
    )).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, prompt, SamplingConfig(max_new_tokens=20, temperature=0.0)) == [ref]


def test_stops_at_end_of_text_and_max_new_tokens_zero():
    model = tiny_model(vocab_size=97)
    first = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=1, temperature=0.0))[0][0]
    # Declare the token greedy decoding picks first to be end-of-text: nothing is returned.
    assert generate(model, [1, 2, 3], GREEDY, eot_id=first) == [[]]
    assert generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=0)) == [[]]
    no_stop = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eot=False)
    assert len(generate(model, [1, 2, 3], no_stop, eot_id=first)[0]) == 12


def test_finish_reasons():
    model = tiny_model()
    steps = [s for batch in iter_generate(model, [[1, 2]], SamplingConfig(max_new_tokens=4, temperature=0))
             for s in batch]
    assert [s.finish_reason for s in steps] == [None, None, None, "length"]


# -- text: streaming and stop strings --------------------------------------------------------------


def test_text_assembler_never_splits_a_utf8_character():
    tok = ByteTokenizer()
    asm = TextAssembler(tok)
    pieces = [asm.push(b) for b in "héllo → 世界".encode()] + [asm.finish()]
    assert "".join(pieces) == "héllo → 世界"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == ""  # first byte of 'é' alone is held back


def test_text_assembler_stops_at_a_stop_string_and_never_leaks_it():
    tok = ByteTokenizer()
    asm = TextAssembler(tok, stop=("###", "END"))
    shown = ""
    for b in b"answer: 42 ## not yet ### more":
        shown += asm.push(b)
        if asm.stopped:
            break
    shown += asm.finish()
    assert shown == "answer: 42 ## not yet "
    assert asm.stopped


def test_stream_text_joins_to_generate_text_and_respects_stop_strings():
    tok = AsciiTokenizer()
    model = tiny_model(vocab_size=96, n_positions=64, seed=3)
    cfg = SamplingConfig(max_new_tokens=25, temperature=1.0, seed=7, stop_at_eot=False)
    full = generate_text(model, tok, "hi", cfg)
    assert "".join(stream_text(model, tok, "hi", cfg)) == full
    assert full == tok.decode(generate(model, tok.encode("hi"), cfg, generator=make_generator(7))[0])
    # Use a piece of the sampled text itself as a stop string: output is cut right before it.
    stop = full[5:8]
    cut_at = full.find(stop)
    assert len(stop) == 3 and 0 < cut_at <= 5
    cut = generate_text(model, tok, "hi", SamplingConfig(max_new_tokens=25, temperature=1.0, seed=7, stop=(stop,)))
    assert cut == full[:cut_at]


def test_seeded_text_generation_is_reproducible():
    tok = ByteTokenizer()
    model = tiny_model(vocab_size=257, n_positions=64)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=1234)
    assert generate_text(model, tok, "abc", cfg) == generate_text(model, tok, "abc", cfg)


# -- prompt-lookup decoding ------------------------------------------------------------------------


def test_lookup_draft_copies_what_followed_the_latest_match_of_the_last_ngram():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # latest trigram match
    assert lookup_draft([5, 6, 1, 2], 3) == []  # trailing 2 never occurred before
    assert lookup_draft([4, 4, 4, 4, 4], 5) == [4, 4]  # no full draft: the longest continuation
    assert lookup_draft([7, 4, 4, 4, 4, 4], 2) == [4, 4]  # a run: a match far enough back fills k
    assert lookup_draft([1, 2, 1, 2], 0) == []


@pytest.mark.parametrize("n_positions", [64, 24])
def test_prompt_lookup_decoding_gives_the_plain_greedy_tokens(n_positions):
    model = tiny_model(n_positions=n_positions, seed=1)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    plain = generate(model, prompt, cfg)
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    assert generate(model, prompt, cfg, prompt_lookup=5) == plain
    hook.remove()
    assert len(plain[0]) == 40
    assert len(passes) < 40  # drafts were accepted: fewer forward passes than tokens


def test_sampling_seed_is_honoured_without_a_generator() -> None:
    from scratchgpt.inference.generate import generate as gen

    model = tiny_model()
    sampling = SamplingConfig(seed=42, temperature=1.0, max_new_tokens=12, stop_at_eot=False)
    first = gen(model, [1, 2, 3], sampling)
    torch.manual_seed(123)  # the global RNG must not matter
    assert gen(model, [1, 2, 3], sampling) == first
    assert gen(model, [[1, 2, 3], [4, 5]], sampling) == gen(model, [[1, 2, 3], [4, 5]], sampling)
    other = gen(model, [1, 2, 3], SamplingConfig(seed=43, temperature=1.0, max_new_tokens=12, stop_at_eot=False))
    assert other != first
    # An explicit generator still wins over the seed.
    g = torch.Generator().manual_seed(7)
    assert gen(model, [1, 2, 3], sampling, generator=g) == gen(
        model, [1, 2, 3], SamplingConfig(temperature=1.0, max_new_tokens=12, stop_at_eot=False),
        generator=torch.Generator().manual_seed(7))


# -- inverse-CDF sampling --------------------------------------------------------------------------


def test_sample_from_probs_follows_the_distribution_and_never_picks_zero_mass():
    from scratchgpt.inference.sampling import sample_from_probs

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    g = make_generator(0)
    n = 20000
    draws = torch.stack([sample_from_probs(probs, generator=g) for _ in range(n)]).flatten()
    counts = torch.bincount(draws, minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    assert (counts - probs[0].double()).abs().max() < 0.015
    # Unnormalised weights sample like their normalised version; a seed reproduces the draws.
    g1, g2 = make_generator(3), make_generator(3)
    a = [int(sample_from_probs(probs * 7.0, generator=g1)) for _ in range(50)]
    b = [int(sample_from_probs(probs, generator=g2)) for _ in range(50)]
    assert a == b and len(set(a)) == 3


def test_sample_from_probs_picks_a_block_by_cumulative_mass_then_races_inside_it():
    from scratchgpt.inference.sampling import _SAMPLE_BLOCK, sample_from_probs

    probs = torch.softmax(torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = sample_from_probs(probs, generator=make_generator(5))
    g = make_generator(5)
    u = torch.rand((4, 1), generator=g, dtype=torch.float64)
    padded = torch.nn.functional.pad(probs.double(), (0, (-50257) % _SAMPLE_BLOCK)).view(4, -1, _SAMPLE_BLOCK)
    cdf = padded.sum(-1).cumsum(-1)
    for r in range(4):  # the first block whose cumulative mass exceeds the row's uniform
        block = int((cdf[r] <= u[r, 0] * cdf[r, -1]).sum())
        assert out[r].item() // _SAMPLE_BLOCK == block


def test_sample_from_probs_is_robust_to_rounding_noise_in_the_logits():
    """A batch and a lone row differ in the last float bits; their draws must (almost) never differ."""
    from scratchgpt.inference.sampling import sample_from_probs

    logits = torch.randn(1, 50257, generator=torch.Generator().manual_seed(1)) * 0.3  # flat: the hard case
    # Exaggerated noise (1e-3 absolute): a plain 50k-long inverse-CDF search moved 26 of these 300
    # draws to another token; the block search + race moved none.
    noisy = logits + 1e-3 * torch.randn(1, 50257, generator=torch.Generator().manual_seed(2))
    flips = sum(int(sample_from_probs(logits.softmax(-1), generator=make_generator(s)))
                != int(sample_from_probs(noisy.softmax(-1), generator=make_generator(s))) for s in range(300))
    assert flips <= 2


# -- speculative decoding with a draft model -------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_gives_exactly_the_plain_greedy_tokens(k):
    model = tiny_model(n_positions=48, seed=1)
    draft = GPT(GPTConfig(vocab_size=97, n_positions=48, n_embd=16, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(9)).eval()
    prompt = [5, 6, 7, 8, 9]
    cfg = SamplingConfig(max_new_tokens=60, temperature=0.0)  # runs past the context: window slides
    plain = generate(model, prompt, cfg)
    stats: dict[str, int] = {}
    assert generate(model, prompt, cfg, draft=draft, draft_tokens=k, stats=stats) == plain
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
    # The model as its own draft: every proposal is accepted, k+1 tokens per verification pass.
    stats = {}
    short = SamplingConfig(max_new_tokens=30, temperature=0.0)
    assert generate(model, prompt, short, draft=model, draft_tokens=k, stats=stats) == generate(model, prompt, short)
    assert stats["accepted"] == stats["drafted"] > 0


def test_accept_reject_rule_emits_tokens_distributed_as_the_model():
    """One verification step with fixed distributions: whatever the draft proposes, the first
    emitted token follows p_0 and the bonus/next tokens follow the model too."""
    from scratchgpt.inference.sampling import sample_from_probs
    from scratchgpt.inference.speculative import accept_reject

    cfg = SamplingConfig(temperature=1.0)
    p_logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.5, 0.0, -2.0], [1.0, 1.0, -1.0, 0.0]])  # (1+k, V)
    q = torch.tensor([[0.05, 0.6, 0.3, 0.05], [0.7, 0.1, 0.1, 0.1]])  # (k, V): far from p
    p = p_logits.softmax(-1)
    g, n = make_generator(0), 3000
    first = torch.zeros(4)
    kept_all = 0
    for _ in range(n):
        d = [int(sample_from_probs(q[i : i + 1], generator=g)) for i in range(2)]
        n_ok, nxt = accept_reject(p_logits, q, d, cfg, g)
        first[(d + [int(nxt)])[0] if n_ok > 0 else int(nxt)] += 1
        kept_all += n_ok == 2
    assert (first / n - p[0]).abs().max() < 0.035
    assert (q[0] - p[0]).abs().max() > 0.3  # keeping every draft token would fail the check above
    # All kept happens with probability sum_x min(p0, q0) * sum_x min(p1, q1) (independent here).
    both = float(torch.minimum(p[0], q[0]).sum() * torch.minimum(p[1], q[1]).sum())
    assert abs(kept_all / n - both) < 0.035


def test_speculative_sampling_keeps_the_models_distribution():
    """Empirical joint distribution of 3 sampled tokens (vocab of 3) vs the exact one of the model."""
    import itertools

    from scratchgpt.inference.sampling import token_probs

    V = 3
    model = tiny_model(vocab_size=V, n_positions=16, seed=2)
    draft = tiny_model(vocab_size=V, n_positions=16, seed=7)
    with torch.no_grad():  # sharpen both (tied: embeddings too) so that p and q differ clearly
        model.lm_head.weight.mul_(3.0)
        draft.lm_head.weight.mul_(3.0)
    prompt = [0, 1]
    cfg = SamplingConfig(max_new_tokens=3, temperature=1.0, stop_at_eot=False)

    def joint(m: GPT) -> dict[tuple, float]:
        out = {}
        with torch.no_grad():
            for seq in itertools.product(range(V), repeat=3):
                p, ctx = 1.0, list(prompt)
                for t in seq:
                    p *= float(token_probs(m(torch.tensor([ctx]))[0][:, -1], cfg)[0, t])
                    ctx.append(t)
                out[seq] = p
        return out

    exact, drafts_own = joint(model), joint(draft)
    tv = lambda a, b: 0.5 * sum(abs(a[s] - b.get(s, 0.0)) for s in a)  # noqa: E731
    assert tv(exact, drafts_own) > 0.2  # a rule that kept every draft token would fail below

    n, g, stats = 1500, make_generator(11), {}
    counts: dict[tuple, int] = {}
    for _ in range(n):
        toks = tuple(generate(model, prompt, cfg, generator=g, draft=draft, draft_tokens=2, stats=stats)[0])
        counts[toks] = counts.get(toks, 0) + 1
    empirical = {s: c / n for s, c in counts.items()}
    assert tv(exact, empirical) < 0.08  # ~0.035 expected from sampling noise at n=1500
    assert 0 < stats["accepted"] < stats["drafted"]  # both accept and reject branches ran


def test_draft_with_another_vocabulary_or_tokenizer_is_one_clear_error():
    from scratchgpt.inference.speculative import check_draft

    model = tiny_model(vocab_size=97)
    with pytest.raises(ValueError, match="vocabulary has 96 tokens.*same tokenizer"):
        generate(model, [1, 2], GREEDY, draft=tiny_model(vocab_size=96))
    with pytest.raises(ValueError, match="tokenizer .* differs"):
        check_draft(tiny_model(vocab_size=257), tiny_model(vocab_size=257), model_tokenizer=ByteTokenizer(),
                    draft_tokenizer=type("Other", (ByteTokenizer,), {"encode": lambda s, t, **k: [1]})())
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate(model, [[1, 2], [3]], GREEDY, draft=tiny_model(vocab_size=97, seed=1))


def test_draft_check_accepts_char_tokenizers_without_the_probes_characters():
    """Issue 21: the demo's char model (no digits or accents in some corpora) and a draft trained on the same
    data were refused because the check encoded a probe text the alphabet lacks; different alphabets still fail."""
    from scratchgpt.data.tokenizers import CharTokenizer
    from scratchgpt.inference.speculative import check_draft

    alphabet = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's, less a few
    model, draft = tiny_model(vocab_size=len(alphabet) + 1), tiny_model(vocab_size=len(alphabet) + 1, seed=1)
    check_draft(model, draft, model_tokenizer=CharTokenizer(alphabet), draft_tokenizer=CharTokenizer(alphabet))
    other = alphabet.replace("z", "3")
    with pytest.raises(ValueError, match="tokenizer .* differs"):
        check_draft(model, draft, model_tokenizer=CharTokenizer(alphabet), draft_tokenizer=CharTokenizer(other))


def test_decode_path_is_measured_once_and_both_paths_agree() -> None:
    from scratchgpt.inference.generate import DecodePath, choose_decode_path
    from scratchgpt.model.fast_linear import Linear

    model = tiny_model()
    path = choose_decode_path(model)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert {m.few_rows for m in layers if m is not model.lm_head} == {16 if path.blocks else 0}
    assert model.lm_head.few_rows == (16 if path.head else 0)
    assert choose_decode_path(model) is path  # kept on the model: not measured again
    # Every path computes the same greedy tokens (W @ xᵀ differs from F.linear by rounding only).
    prompt = [1, 2, 3]
    outs = []
    for rows in (0, 16):
        for m in layers:
            m.few_rows = rows
        with torch.no_grad():
            x = torch.randn(1, layers[0].in_features)
            torch.testing.assert_close(layers[0](x), torch.nn.functional.linear(x, layers[0].weight, layers[0].bias))
        outs.append(generate(model, prompt, GREEDY))
    assert outs[0] == outs[1]
    assert DecodePath() == DecodePath(blocks=False, head=False)


def test_decode_path_follows_the_faster_real_step_per_group() -> None:
    """The choice is made from whole-step times, one decision for the blocks and one for the head."""
    from scratchgpt.inference.generate import NATIVE, DecodePath, choose_decode_path, pick_decode_path

    plain, blocks, head = DecodePath(), DecodePath(blocks=True), DecodePath(head=True)
    # The Zen 4 case: W @ xᵀ streams the head from DRAM twice as fast; the blocks gain nothing.
    assert pick_decode_path({plain: 30e-3, blocks: 29e-3, head: 22e-3}) == DecodePath(head=True)
    assert pick_decode_path({plain: 30e-3, blocks: 20e-3, head: 40e-3}) == DecodePath(blocks=True)
    assert pick_decode_path({plain: 30e-3, blocks: 20e-3, head: 25e-3}) == DecodePath(blocks=True, head=True)
    assert pick_decode_path({plain: 30e-3, blocks: 31e-3, head: 60e-3}) == DecodePath()
    # Best of the repeats: one slow outlier (another process) does not decide.
    times = {plain: iter([30e-3, 90e-3]), blocks: iter([95e-3, 29e-3]), head: iter([15e-3, 16e-3]),
             NATIVE: iter([40e-3, 40e-3])}  # (asked where scratchgpt's kernels build)
    model = tiny_model().train()  # (a model still in training mode is timed as it decodes: in eval mode)
    modes: list[bool] = []
    chosen = choose_decode_path(model, repeats=2, step_time=lambda p: modes.append(model.training) or next(times[p]))
    assert chosen == DecodePath(head=True)
    assert modes == [False] * 8 and model.training  # each step timed in eval mode; the mode given back
    assert model.lm_head.few_rows == 16
    assert {m.few_rows for m in model.transformer.modules() if isinstance(m, torch.nn.Linear)} == {0}


def test_input_major_storage_is_tried_only_on_a_frozen_model_and_changes_no_value(tmp_path) -> None:
    """Input-major storage (Wᵀ contiguous, `weight` its view) wins only when its whole step is 10% faster
    than every other path; only a frozen model tries it; tokens, logits and saved bytes stay the same."""
    from scratchgpt.checkpoint import save_model
    from scratchgpt.inference.generate import (
        INPUT_MAJOR,
        NATIVE,
        SPLIT_K,
        DecodePath,
        choose_decode_path,
        pick_decode_path,
    )
    from scratchgpt.model.fast_linear import Linear, is_input_major

    plain, blocks, head = DecodePath(), DecodePath(blocks=True), DecodePath(head=True)
    assert pick_decode_path({plain: 30e-3, blocks: 29e-3, head: 22e-3, INPUT_MAJOR: 19e-3}) == INPUT_MAJOR
    assert pick_decode_path({plain: 30e-3, blocks: 29e-3, head: 22e-3, INPUT_MAJOR: 20e-3}) == head  # not 10%
    assert pick_decode_path({plain: 30e-3, blocks: 31e-3, head: 33e-3, INPUT_MAJOR: 35e-3}) == plain

    def timed(times: dict) -> tuple[list, object]:
        asked: list[DecodePath] = []

        def step(p: DecodePath) -> float:
            asked.append(p)
            return times[p]
        return asked, step

    times = {plain: 30e-3, blocks: 31e-3, head: 40e-3, INPUT_MAJOR: 20e-3, SPLIT_K: 21e-3, NATIVE: 32e-3}
    training = tiny_model()  # parameters require gradients: an optimizer may hold moments laid out like them
    asked, step = timed(times)
    assert choose_decode_path(training, step_time=step) == plain and not any(p.input_major for p in asked)
    assert not any(is_input_major(m) for m in training.modules() if isinstance(m, Linear))

    model, reference = tiny_model().requires_grad_(False), tiny_model()  # the same weights (same seed)
    save_model(model, tmp_path / "before")
    prompt = [5, 6, 7]
    x = torch.tensor([prompt])
    with torch.no_grad():
        logits = reference(x)[0]
    want = generate(reference, prompt, GREEDY)
    asked, step = timed(times)
    assert choose_decode_path(model, step_time=step) == INPUT_MAJOR and asked.count(INPUT_MAJOR) == 3
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(is_input_major(m) and m.few_rows == 0 for m in layers)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: the same parameter, re-laid out
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], logits, rtol=1e-5, atol=1e-6)  # another BLAS orientation
    assert generate(model, prompt, GREEDY) == want
    save_model(model, tmp_path / "after")
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == \
        (tmp_path / "before" / "model.safetensors").read_bytes()
    # Not chosen: measured, then put back in nn.Linear's layout.
    again = tiny_model().requires_grad_(False)
    asked, step = timed({**times, INPUT_MAJOR: 29e-3, SPLIT_K: 28e-3})
    assert choose_decode_path(again, step_time=step) == plain and INPUT_MAJOR in asked
    assert not any(is_input_major(m) or m.split_k for m in again.modules() if isinstance(m, Linear))


def test_split_k_products_equal_f_linear_and_are_chosen_only_when_the_step_is_faster(monkeypatch) -> None:
    """Split-K (x's input dimension cut into slices, one bmm product per thread, summed) computes x @ Wᵀ up
    to rounding for 1..SPLIT_ROWS rows, with and without a bias; more rows, a layer not stored input-major or
    one thread take the plain path; the choice follows the measured whole steps."""
    from scratchgpt.inference.generate import (
        INPUT_MAJOR,
        NATIVE,
        SPLIT_K,
        DecodePath,
        choose_decode_path,
        pick_decode_path,
    )
    from scratchgpt.model.fast_linear import SPLIT_ROWS, Linear, split_parts, store_input_major

    assert [split_parts(768, t) for t in (1, 2, 4, 5, 16)] == [0, 2, 4, 4, 16]
    assert split_parts(100, 2) == 2 and split_parts(129, 2) == 0 and split_parts(30, 2) == 0
    assert split_parts(96, 5) == 4 and split_parts(48, 4) == 3
    torch.manual_seed(0)
    for bias in (True, False):
        layer = Linear(256, 96, bias=bias).requires_grad_(False)
        store_input_major([layer])
        layer.split_k = 2
        bmm_calls = []
        monkeypatch.setattr(torch, "bmm", lambda *a, _bmm=torch.bmm, _calls=bmm_calls: _calls.append(1) or _bmm(*a))
        for rows in (1, 2, 5, SPLIT_ROWS, SPLIT_ROWS + 1):
            x = torch.randn(1, rows, 256)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert len(bmm_calls) == 4  # the split path ran for 1..SPLIT_ROWS rows, not for SPLIT_ROWS + 1
        monkeypatch.undo()

    plain, blocks, head = DecodePath(), DecodePath(blocks=True), DecodePath(head=True)
    base = {plain: 30e-3, blocks: 29e-3, head: 31e-3}
    assert pick_decode_path({**base, INPUT_MAJOR: 26e-3, SPLIT_K: 18e-3}) == SPLIT_K
    assert pick_decode_path({**base, INPUT_MAJOR: 18e-3, SPLIT_K: 19e-3}) == INPUT_MAJOR  # the faster variant
    assert pick_decode_path({**base, INPUT_MAJOR: 30e-3, SPLIT_K: 27e-3}) == plain  # not 10% faster

    def chosen(threads: int, split_seconds: float) -> tuple[DecodePath, list, object]:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        asked: list[DecodePath] = []
        times = {**base, INPUT_MAJOR: 26e-3, SPLIT_K: split_seconds, NATIVE: 35e-3}
        model = tiny_model().requires_grad_(False)
        path = choose_decode_path(model, step_time=lambda p: asked.append(p) or times[p])
        monkeypatch.undo()
        return path, asked, model

    path, asked, model = chosen(2, 18e-3)
    assert path == SPLIT_K and asked[-6:] == [INPUT_MAJOR, SPLIT_K] * 3  # interleaved, same storage
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert {m.split_k for m in layers} == {2}
    want = generate(tiny_model(), [5, 6, 7], GREEDY)  # the same weights, nn.Linear's path
    assert generate(model, [5, 6, 7], GREEDY) == want
    assert generate(model, [5, 6, 7], GREEDY, use_cache=False) == want
    path, asked, model = chosen(1, 1e-3)  # one thread: nothing to split over, not tried
    assert path == INPUT_MAJOR and SPLIT_K not in asked
    assert {m.split_k for m in model.modules() if isinstance(m, Linear)} == {0}


def test_scratchgpt_kernel_is_chosen_when_its_whole_step_is_the_fastest() -> None:
    """`NATIVE` (every layer's few-row products on model/csrc/float_linear.cpp) wins when its measured step
    is the fastest of the paths that keep the storage; input-major storage must still beat it by 10%.
    Chosen, it changes no token."""
    from scratchgpt.inference.generate import INPUT_MAJOR, NATIVE, DecodePath, choose_decode_path, pick_decode_path
    from scratchgpt.model.fast_linear import Linear
    from scratchgpt.model.native import native_kernels

    plain, blocks, head = DecodePath(), DecodePath(blocks=True), DecodePath(head=True)
    base = {plain: 30e-3, blocks: 29e-3, head: 25e-3}
    assert pick_decode_path({**base, NATIVE: 24e-3}) == NATIVE  # no margin: it changes no storage
    assert pick_decode_path({**base, NATIVE: 26e-3}) == head
    assert pick_decode_path({**base, NATIVE: 24e-3, INPUT_MAJOR: 22e-3}) == NATIVE  # not 10% faster
    assert pick_decode_path({**base, NATIVE: 24e-3, INPUT_MAJOR: 21e-3}) == INPUT_MAJOR
    if native_kernels() is None:
        pytest.skip("scratchgpt's kernels do not build here")
    model = tiny_model()
    want = generate(tiny_model(), [5, 6, 7], GREEDY)  # the same weights on nn.Linear's path
    asked: list[DecodePath] = []
    assert choose_decode_path(model, step_time=lambda p: asked.append(p) or {**base, NATIVE: 20e-3}[p]) == NATIVE
    assert asked.count(NATIVE) == 3
    assert all(m.native for m in model.modules() if isinstance(m, Linear))
    assert generate(model, [5, 6, 7], GREEDY) == want
    assert generate(model, [[5, 6, 7], [8]], GREEDY)[0] == want[0]  # a batch of two rows: the kernel too


def test_decode_path_times_whole_decode_steps() -> None:
    """What is timed is a real decode step through the model, not one matrix product in a hot loop.

    The injected delays make each candidate's whole step slower or faster the way weights streaming
    from DRAM would; a hot-loop micro-benchmark of one layer would not see them.
    """
    import time

    from scratchgpt.inference.generate import DecodePath, choose_decode_path

    model = tiny_model()

    def slow_when(layer: torch.nn.Module, few: bool) -> None:
        forward = layer.forward

        def delayed(x: torch.Tensor) -> torch.Tensor:
            if x.size(-2) == 1 and (layer.few_rows > 0) == few:  # one decode row on the slowed path
                time.sleep(0.02)
            return forward(x)

        layer.forward = delayed

    slow_when(model.transformer.h[0].mlp.c_fc, few=True)  # the blocks' few-row path is slow
    slow_when(model.lm_head, few=False)  # the head's plain path is slow
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert choose_decode_path(model) == DecodePath(head=True)
    assert len(calls) >= 4  # prefill + warm-up + timed steps, each a full forward of the model


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_weights_are_measured_only_where_bf16_is_native(monkeypatch, native: bool) -> None:
    """Emulated bf16 makes a big model's decode step take seconds: no measuring there (the plain path);
    where the CPU multiplies bf16 natively the paths are timed like float32's, on a bf16 KV cache."""
    import scratchgpt.inference.generate as gen

    monkeypatch.setattr(gen, "native_bf16", lambda device="cpu": native)
    model = tiny_model().to(torch.bfloat16).requires_grad_(False)
    steps = []
    model.register_forward_hook(lambda m, args, kwargs, out: steps.append(kwargs["kv_cache"].k.dtype),
                                with_kwargs=True)
    path = gen.choose_decode_path(model)
    if native:
        assert len(steps) >= 12 and set(steps) == {torch.bfloat16}  # 3 x 3 steps, then the input-major ones
    else:
        assert path == gen.DecodePath() and steps == []
    out = generate(model, [5, 6, 7], GREEDY)[0]
    assert len(out) == GREEDY.max_new_tokens
