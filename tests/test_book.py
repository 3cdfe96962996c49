"""The book's API (scratchgpt.book): its chapter 4 and 5 outputs, reproduced token for token.

The expected values are the outputs printed in "Build a Large Language Model (From Scratch)" for the
book's own seeds and settings (torch.manual_seed(123), GPT_CONFIG_124M, "Hello, I am",
"Every effort moves you", the-verdict.txt with a 90/10 split).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from scratchgpt.book import (
    GPT_CONFIG_124M,
    GPTDatasetV1,
    GPTModel,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader_v1,
    generate,
    generate_text_simple,
    load_weights_into_gpt,
    text_to_token_ids,
    token_ids_to_text,
)
from scratchgpt.model.gpt import GPT
from scratchgpt.model.textbook import gpt_from_textbook

# The book's dict exactly: the keys scratchgpt's own GPT_CONFIG_124M adds (pos_encoding, per_head_attention)
# are absent, as in a reader's notebook.
BOOK_CONFIG = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
               "drop_rate": 0.1, "qkv_bias": False}


def _book_model(**overrides) -> GPTModel:
    torch.manual_seed(123)
    model = GPTModel({**BOOK_CONFIG, **overrides})
    model.eval()
    return model


def test_book_config_is_scratchgpts():
    assert {k: GPT_CONFIG_124M[k] for k in BOOK_CONFIG} == BOOK_CONFIG


def test_chapter4_generate_text_simple(gpt2_tokenizer):
    """Chapter 4 (and its gpt.py): 'Hello, I am' + 10 greedy tokens from the untrained 124M model."""
    model = _book_model()
    encoded = text_to_token_ids("Hello, I am", gpt2_tokenizer)
    assert encoded.tolist() == [[15496, 11, 314, 716]]
    out = generate_text_simple(model=model, idx=encoded, max_new_tokens=10, context_size=1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267,
                             49706, 43231, 47062, 34657]]
    assert token_ids_to_text(out, gpt2_tokenizer) == (
        "Hello, I am Featureiman Byeswickattribute argue logger Normandy Compton analogous"
    )


@pytest.fixture(scope="module")
def chapter5_model() -> GPTModel:
    return _book_model(context_length=256)


def test_chapter5_untrained_text(chapter5_model, gpt2_tokenizer):
    token_ids = generate_text_simple(
        model=chapter5_model, idx=text_to_token_ids("Every effort moves you", gpt2_tokenizer),
        max_new_tokens=10, context_size=256,
    )
    assert token_ids_to_text(token_ids, gpt2_tokenizer) == (
        "Every effort moves you rentingetic wasnم refres RexMeCHicular stren"
    )


def test_chapter5_initial_losses(chapter5_model, data_dir: Path, gpt2_tokenizer):
    """Section 5.1.3: train/val loss of the untrained model on the-verdict.txt (90/10 split)."""
    text = (data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")
    split = int(0.90 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True, num_workers=0, tokenizer=gpt2_tokenizer)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False, num_workers=0, tokenizer=gpt2_tokenizer)
    assert (len(train_loader), len(val_loader)) == (9, 1)  # the book: 9 training batches, 1 validation batch
    torch.manual_seed(123)  # the book seeds again: the training loader shuffles when iterated
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, chapter5_model, "cpu")
        val_loss = calc_loss_loader(val_loader, chapter5_model, "cpu")
    # The book prints 10.98758347829183 and 10.98110580444336 (other printings: 10.981106758117676):
    # float32 sums differ in the last digits between machines.
    assert train_loss == pytest.approx(10.98758347829183, abs=1e-4)
    assert val_loss == pytest.approx(10.98110580444336, abs=1e-4)


def test_dataset_windows_follow_the_book(gpt2_tokenizer):
    """Chapter 2's example: max_length 4, stride 1 over 'the-verdict'-like text, and the window count rule."""
    ids = list(range(100, 120))  # 20 tokens
    text = gpt2_tokenizer.decode(ids)
    n = len(gpt2_tokenizer.encode(text))
    ds = GPTDatasetV1(text, gpt2_tokenizer, max_length=4, stride=3)
    tokens = gpt2_tokenizer.encode(text)
    assert len(ds) == len(range(0, n - 4, 3))  # the book's range(0, len - max_length, stride)
    for i, start in enumerate(range(0, n - 4, 3)):
        x, y = ds[i]
        assert x.tolist() == tokens[start : start + 4]
        assert y.tolist() == tokens[start + 1 : start + 5]


def test_calc_loss_batch_same_for_book_model_and_gpt(gpt2_tokenizer):
    torch.manual_seed(0)
    cfg = {"vocab_size": 97, "context_length": 16, "emb_dim": 24, "n_heads": 3, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    book = GPTModel(cfg).eval()
    gpt = gpt_from_textbook(book, cfg).eval()
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(calc_loss_batch(x, y, book, "cpu"), calc_loss_batch(x, y, gpt, "cpu"))
    # generate works on both formulations and agrees
    assert torch.equal(generate_text_simple(book, x[:1, :4], 8, 16), generate_text_simple(gpt, x[:1, :4], 8, 16))


def test_generate_top_k_temperature_and_eos():
    torch.manual_seed(0)
    cfg = {"vocab_size": 11, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    model = GPTModel(cfg).eval()
    idx = torch.tensor([[1, 2, 3]])
    # top_k=1 is greedy whatever the temperature
    torch.manual_seed(5)
    assert torch.equal(generate(model, idx, 6, 8, temperature=2.0, top_k=1), generate_text_simple(model, idx, 6, 8))
    # the same global seed gives the same sample; the context is cropped to its last 8 tokens
    torch.manual_seed(7)
    a = generate(model, idx, 12, 8, temperature=1.4, top_k=5)
    torch.manual_seed(7)
    b = generate(model, idx, 12, 8, temperature=1.4, top_k=5)
    assert torch.equal(a, b) and a.shape == (1, 15)
    # eos: stop before appending it
    greedy = generate_text_simple(model, idx, 6, 8)
    eos = int(greedy[0, 5])
    stopped = generate(model, idx, 6, 8, eos_id=eos)
    assert stopped[0].tolist() == greedy[0, : greedy[0, 3:].tolist().index(eos) + 3].tolist()


def book_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """Chapter 5's `generate`, as the book prints it (only `top_logits[:, -1:]` keeps a batch dimension,
    which changes nothing for the book's batch of one)."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1:]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)
        if temperature > 0.0:
            logits = logits / temperature
            probs = torch.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


class TiedLogits(torch.nn.Module):
    """A stand-in model whose logits come in steps of 0.5, so top-k meets ties at its k-th value."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.model(idx) * 8).round() / 2


@pytest.mark.parametrize("temperature, top_k", [(1.4, 25), (1.0, None), (0.5, 3), (2.0, 1), (0.0, 3), (1.5, 50)])
def test_generate_draws_what_the_books_generate_draws(temperature, top_k):
    # The same global seed and the same logits must give the book's tokens: same top-k mask (ties kept),
    # same temperature division, same softmax, same torch.multinomial call on the same RNG.
    torch.manual_seed(0)
    cfg = {"vocab_size": 97, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    for model in (GPTModel(cfg).eval(), TiedLogits(GPTModel(cfg).eval())):
        idx = torch.tensor([[5, 6, 7]])
        torch.manual_seed(123)
        expected = book_generate(model, idx, 30, 16, temperature=temperature, top_k=top_k)
        rng_after_book = torch.get_rng_state()
        torch.manual_seed(123)
        got = generate(model, idx, 30, 16, temperature=temperature, top_k=top_k)
        assert got.tolist() == expected.tolist()
        # The RNG is left where the book leaves it, so the reader's next draw matches too.
        assert torch.equal(torch.get_rng_state(), rng_after_book)


def test_generate_stops_at_eos_as_the_book_does():
    torch.manual_seed(0)
    cfg = {"vocab_size": 11, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    model = GPTModel(cfg).eval()
    idx = torch.tensor([[1, 2, 3]])
    torch.manual_seed(123)
    full = book_generate(model, idx, 40, 8, temperature=1.0)
    eos = int(full[0, 10])  # a token the seeded run draws, so both must stop at its first draw
    torch.manual_seed(123)
    expected = book_generate(model, idx, 40, 8, temperature=1.0, eos_id=eos)
    torch.manual_seed(123)
    got = generate(model, idx, 40, 8, temperature=1.0, eos_id=eos)
    assert got.tolist() == expected.tolist() and got.shape[1] <= 10


def test_generate_refuses_what_the_other_entry_points_refuse():
    model = GPTModel({"vocab_size": 11, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False}).eval()
    idx = torch.tensor([[1, 2, 3]])
    for bad in (-0.5, 2.5, float("nan")):
        with pytest.raises(ValueError, match="generate.temperature"):
            generate(model, idx, 2, 8, temperature=bad)
    with pytest.raises(ValueError, match="generate.top_k"):
        generate(model, idx, 2, 8, temperature=1.0, top_k=0)


def test_state_dict_saved_by_the_books_model_loads_strictly():
    """The book's GPTModel keeps its causal mask as a persistent buffer: its state dicts have `att.mask`."""
    cfg = {"vocab_size": 50, "context_length": 12, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.1, "qkv_bias": False}
    torch.manual_seed(1)
    source = GPTModel(cfg)
    saved = dict(source.state_dict())
    for i in range(cfg["n_layers"]):
        saved[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(12, 12), diagonal=1)  # as the book saves it
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target = GPTModel(cfg)
    target.load_state_dict(state, strict=True)  # no unexpected keys
    x = torch.randint(0, 50, (1, 12))
    torch.testing.assert_close(target.eval()(x), source.eval()(x))
    # a mask that is not this model's causal mask is refused
    state["trf_blocks.0.att.mask"] = torch.zeros(12, 12)
    with pytest.raises(ValueError, match="not the causal mask"):
        GPTModel(cfg).load_state_dict(state)


def _openai_params(hf_model) -> dict:
    """OpenAI's checkpoint layout, as the book's gpt_download.py returns it, built from an HF GPT-2."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = {"wte": sd["transformer.wte.weight"], "wpe": sd["transformer.wpe.weight"],
              "g": sd["transformer.ln_f.weight"], "b": sd["transformer.ln_f.bias"], "blocks": []}
    for i in range(hf_model.config.n_layer):
        p = f"transformer.h.{i}."
        params["blocks"].append({
            "attn": {n: {"w": sd[p + f"attn.{n}.weight"], "b": sd[p + f"attn.{n}.bias"]} for n in ("c_attn", "c_proj")},
            "mlp": {n: {"w": sd[p + f"mlp.{n}.weight"], "b": sd[p + f"mlp.{n}.bias"]} for n in ("c_fc", "c_proj")},
            "ln_1": {"g": sd[p + "ln_1.weight"], "b": sd[p + "ln_1.bias"]},
            "ln_2": {"g": sd[p + "ln_2.weight"], "b": sd[p + "ln_2.bias"]},
        })
    return params


def test_load_weights_into_gpt_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=20, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )).eval()
    params = _openai_params(hf)
    cfg = {"vocab_size": 97, "context_length": 20, "emb_dim": 24, "n_heads": 3, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg).eval()
    load_weights_into_gpt(model, params)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    # the same through scratchgpt's GPT: the book's model converts without loss
    gpt = gpt_from_textbook(model, cfg).eval()
    assert isinstance(gpt, GPT) and gpt.config.tie_word_embeddings
    with pytest.raises(ValueError, match="qkv_bias"):
        load_weights_into_gpt(GPTModel({**cfg, "qkv_bias": False}), params)
    with pytest.raises(ValueError, match="shape"):
        load_weights_into_gpt(GPTModel({**cfg, "emb_dim": 30}), params)


def test_token_helpers_allow_end_of_text_as_the_book_does(gpt2_tokenizer):
    ids = text_to_token_ids("Hi<|endoftext|>there", gpt2_tokenizer)
    assert ids.shape[0] == 1 and 50256 in ids[0].tolist()
    assert token_ids_to_text(ids, gpt2_tokenizer) == "Hi<|endoftext|>there"
    assert token_ids_to_text(ids[0], gpt2_tokenizer) == "Hi<|endoftext|>there"
