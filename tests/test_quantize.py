"""int8 weight quantization (reference vs fast kernels, save/load, errors) and bfloat16 weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from scratchgpt import GPT, GPTConfig, SamplingConfig
from scratchgpt.checkpoint import load_any, quantize_checkpoint, save_model, save_quantized
from scratchgpt.device import native_bf16
from scratchgpt.inference.generate import generate
from scratchgpt.model.quantize import (
    Int8Embedding,
    Int8Linear,
    cast_weights,
    default_kernel,
    dequantize_model,
    prepare_for_inference,
    quantize_model,
    quantize_weight,
    set_kernel,
)


def tiny(seed: int = 0, vocab_size: int = 97) -> GPT:
    config = GPTConfig(vocab_size=vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return GPT(config, generator=torch.Generator().manual_seed(seed)).eval()


def fast_kernels() -> list[str]:
    kernels = []
    if "fbgemm" in torch.backends.quantized.supported_engines:
        kernels.append("fbgemm")
    try:
        torch._weight_int8pack_mm(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(8, 8, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
        kernels.append("int8pack")
    except (RuntimeError, NotImplementedError):
        pass
    return kernels


def test_quantize_weight_is_per_row_symmetric_and_within_half_a_step():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q.abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.full((5,), 127, dtype=torch.int8))
    assert (w - q.float() * scale[:, None]).abs().le(scale[:, None] / 2 + 1e-7).all()
    assert q[2].eq(0).all()


@pytest.mark.parametrize("kernel", fast_kernels())
def test_fast_kernel_matches_the_dequantize_then_matmul_reference(kernel):
    lin = torch.nn.Linear(256, 192)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    layer = Int8Linear.from_linear(lin, kernel="reference")
    for rows in (1, 2, 7, 40):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        ref = layer(x)
        layer.kernel = kernel
        got = layer(x.view(1, rows, 256)).view(rows, 192)
        layer.kernel = "reference"
        # fbgemm rounds the activations to 8 bits per call, int8pack to bf16: both a few 0.1% apart.
        assert ((got - ref).norm() / ref.norm()) < 0.02, (kernel, rows)
    assert (ref - lin(x)).norm() / lin(x).norm() < 0.02  # and the reference is close to float


@pytest.mark.parametrize("kernel", ["reference", *fast_kernels()])
def test_gradient_reaches_the_input_through_the_dequantized_weight_without_storing_it(kernel):
    """Training below a frozen int8 layer (LoRA over an int8 base): dL/dx = dL/dy · (s ⊙ q) with every kernel
    (fbgemm alone would silently give none), and the backward keeps no (out, in) float weight alive."""
    lin = torch.nn.Linear(48, 40)
    layer = Int8Linear.from_linear(lin, kernel=kernel)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad_y = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.backward(grad_y)
    assert torch.allclose(x.grad, grad_y @ layer.dequantized(), atol=1e-6)
    assert torch.Size([40, 48]) not in saved  # nothing the size of the weight waits for the backward
    with torch.no_grad():  # and inference takes the kernel's own path, as before
        assert torch.equal(layer(x.detach()), layer._kernel_forward(x.detach()))


def test_dequantize_model_inverts_quantize_model_and_reties_the_head():
    model = quantize_model(tiny(), "int8", kernel="reference")
    x = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = model(x)[0]
    dequantize_model(model)
    assert not any(isinstance(m, Int8Linear | Int8Embedding) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again, as before quantizing
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (model(x)[0] - expected).abs().max().item() < 1e-5


def test_quantize_model_leaves_skipped_modules_float():
    model = tiny()
    model.lm_head = torch.nn.Linear(64, 3)  # a classification head that trains
    quantize_model(model, "int8", skip=("lm_head",))
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.transformer.h[0].mlp.c_fc, Int8Linear)


@pytest.mark.parametrize("kernel", fast_kernels())
def test_fast_kernel_sees_weights_changed_after_first_use(kernel):
    """A kernel that caches a packed copy of the weights must notice every way they can change."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    for lin in (a, b):
        torch.nn.init.normal_(lin.weight, std=0.02, generator=gen)
        torch.nn.init.normal_(lin.bias, std=0.5, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    fresh_b = Int8Linear.from_linear(b, kernel=kernel)(x)

    layer = Int8Linear.from_linear(a, kernel=kernel)
    layer(x)  # packs a's weights
    layer.load_state_dict(Int8Linear.from_linear(b).state_dict())  # in place (copy_)
    torch.testing.assert_close(layer(x), fresh_b, rtol=0, atol=0)

    layer = Int8Linear.from_linear(a, kernel=kernel)
    layer(x)
    layer.load_state_dict(Int8Linear.from_linear(b).state_dict(), assign=True)  # buffers replaced
    torch.testing.assert_close(layer(x), fresh_b, rtol=0, atol=0)

    layer = Int8Linear.from_linear(a, kernel=kernel)
    layer(x)
    with torch.no_grad():
        layer.bias.copy_(b.bias)  # only the bias, in place: the pack must not keep a's
        layer.weight.copy_(Int8Linear.from_linear(b).weight)
        layer.weight_scale.copy_(Int8Linear.from_linear(b).weight_scale)
    torch.testing.assert_close(layer(x), fresh_b, rtol=0, atol=0)


def test_quantized_model_tracks_float_logits_and_every_linear_is_int8():
    model = tiny()
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = model(x)[0]
    q = quantize_model(copy.deepcopy(model), "int8", kernel="reference")
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and sum(isinstance(m, Int8Linear) for m in q.modules()) == 2 * 4 + 1
    out = q(x)[0]
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    for kernel in fast_kernels():
        set_kernel(q, kernel)
        assert torch.nn.functional.cosine_similarity(q(x)[0].flatten(), ref.flatten(), dim=0) > 0.995
    # Every matrix is int8, embeddings included; the tied head shares the embedding's int8 matrix.
    assert q.transformer.wte.weight.dtype == torch.int8 and q.transformer.wpe.weight.dtype == torch.int8
    assert q.lm_head.weight is q.transformer.wte.weight and q.lm_head.weight_scale is q.transformer.wte.weight_scale
    assert [p for p in q.parameters() if p.dim() == 2] == []
    # A lookup returns exactly the dequantized rows.
    table = q.transformer.wte
    torch.testing.assert_close(table(x), (table.weight.float() * table.weight_scale[:, None])[x], rtol=0, atol=0)
    # Cached generation still equals uncached generation on the quantized model.
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0)
    assert generate(q, [1, 2, 3], cfg) == generate(q, [1, 2, 3], cfg, use_cache=False)


def test_quantized_model_saves_as_int8_safetensors_and_loads_back(tmp_path, gpt2_tokenizer):
    model = tiny(vocab_size=gpt2_tokenizer.vocab_size)
    q = quantize_model(copy.deepcopy(model), "int8", kernel="reference")
    save_quantized(q, tmp_path / "q", tokenizer=gpt2_tokenizer)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["mode"] == "int8" and "lm_head" in cfg["quantization"]["layers"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").dtype == torch.int8
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight_scale").dtype == torch.float32
    loaded, tok = load_any(tmp_path / "q")
    set_kernel(loaded, "reference")
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x)[0], q(x)[0])
    assert tok.vocab_size == gpt2_tokenizer.vocab_size
    assert loaded.transformer.wte.weight.data_ptr() != 0 and loaded.transformer.wte.weight.device.type == "cpu"


@pytest.mark.parametrize("tied", [True, False])
def test_int8_export_is_a_quarter_of_the_float_file(tmp_path, gpt2_tokenizer, tied):
    """The file holds every matrix once, in int8: a tied embedding is not kept in float beside an int8 head."""
    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                       tie_word_embeddings=tied)
    model = GPT(config, generator=torch.Generator().manual_seed(0)).eval()
    save_model(model, tmp_path / "f", tokenizer=gpt2_tokenizer)
    quantize_checkpoint(tmp_path / "f", tmp_path / "q")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("f", "q")}
    ratio = size["q"] / size["f"]
    # int8 is 1/4 of float32; the float32 scales (one per row) and norms/biases add a little.
    assert 0.25 <= ratio < 0.27, ratio
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.int8
        assert ("lm_head.weight" in set(f.keys())) is not tied  # a tied head is stored once, as wte
    loaded, _ = load_any(tmp_path / "q")
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) is tied
    set_kernel(loaded, "reference")
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(x)[0]
    # int8 tolerance: per-row rounding of every matrix moves the logits by well under 1% of their norm.
    assert (loaded(x)[0] - ref).norm() / ref.norm() < 0.02
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert generate(loaded, [1, 2, 3], greedy) == generate(loaded, [1, 2, 3], greedy, use_cache=False)


def test_int8_files_with_float_embeddings_still_load(tmp_path, gpt2_tokenizer):
    """Files written before embeddings were quantized (int8 head, float32 wte) load as they were saved."""
    model = tiny(vocab_size=gpt2_tokenizer.vocab_size)
    old = copy.deepcopy(model)
    with torch.no_grad():
        for parent in list(old.modules()):
            for attr, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, attr, Int8Linear.from_linear(child, kernel="reference"))
    save_quantized(old, tmp_path / "old", tokenizer=gpt2_tokenizer)
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    assert cfg["quantization"]["embeddings"] == []
    loaded, _ = load_any(tmp_path / "old")
    set_kernel(loaded, "reference")
    assert loaded.transformer.wte.weight.dtype == torch.float32 and loaded.lm_head.weight.dtype == torch.int8
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x)[0], old(x)[0])


def test_quantizing_twice_or_unknown_mode_is_one_clear_error(tmp_path, gpt2_tokenizer):
    q = quantize_model(tiny(), "int8")
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_model(q, "int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_model(tiny(), "int4")
    save_quantized(quantize_model(tiny(vocab_size=gpt2_tokenizer.vocab_size)), tmp_path / "q",
                   tokenizer=gpt2_tokenizer)
    with pytest.raises(ValueError, match="already int8-quantized"):
        load_any(tmp_path / "q", quantize="int8")


def test_off_the_cpu_int8_uses_the_reference_and_refuses_cpu_kernels():
    # The meta device is a real non-CPU device (no data, no kernels): the same rule as on CUDA, where
    # fbgemm and _weight_int8pack_mm do not exist (tests/test_gpu.py runs it on a GPU).
    meta = GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4), device="meta")
    assert default_kernel("meta") == "reference" and default_kernel(torch.device("cuda", 0)) == "reference"
    quantize_model(meta)
    assert {m.kernel for m in meta.modules() if isinstance(m, Int8Linear)} == {"reference"}
    for kernel in ("fbgemm", "int8pack"):
        with pytest.raises(ValueError, match=f"int8 kernel '{kernel}' runs on the CPU only; on meta") as e:
            set_kernel(meta, kernel)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="runs on the CPU only"):
            quantize_model(GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4),
                               device="meta"), kernel=kernel)
    set_kernel(meta, "reference")  # the one kernel there is: fine
    assert default_kernel("cpu") == default_kernel()  # the CPU's own choice is unchanged


def test_load_any_quantize_matches_quantize_model(tmp_path, gpt2_tokenizer):
    model = tiny(vocab_size=gpt2_tokenizer.vocab_size)
    save_model(model, tmp_path / "f", tokenizer=gpt2_tokenizer)
    loaded, _ = load_any(tmp_path / "f", quantize="int8")
    set_kernel(loaded, "reference")
    q = quantize_model(copy.deepcopy(model), "int8", kernel="reference")
    x = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x)[0], q(x)[0])


def test_bfloat16_weights_are_refused_on_emulated_bf16(monkeypatch):
    import scratchgpt.model.quantize as mq

    monkeypatch.setattr(mq, "native_bf16", lambda device="cpu": False)
    with pytest.raises(ValueError, match="needs a CPU with native bf16"):
        cast_weights(tiny(), "bfloat16")


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU emulates bf16")
def test_bfloat16_weights_generate_like_float32():
    model = tiny()
    bf = cast_weights(copy.deepcopy(model), "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    x = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    ref, got = model(x)[0], bf(x)[0].float()
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
    assert len(generate(bf, [1, 2, 3], SamplingConfig(max_new_tokens=8, temperature=0.0))[0]) == 8
    # int8 weights with bf16 activations: the int8 embedding's lookups come out in bf16 too.
    both = prepare_for_inference(copy.deepcopy(model), quantize="int8", dtype="bfloat16")
    assert both.transformer.wte(x).dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(ref.flatten(), both(x)[0].float().flatten(), dim=0) > 0.99


def test_cli_generate_with_int8_and_draft(tmp_path, gpt2_tokenizer, capsys):
    from scratchgpt.cli import main

    save_model(tiny(vocab_size=gpt2_tokenizer.vocab_size), tmp_path / "m", tokenizer=gpt2_tokenizer)
    save_model(tiny(seed=3, vocab_size=gpt2_tokenizer.vocab_size), tmp_path / "d", tokenizer=gpt2_tokenizer)
    args = ["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", str(tmp_path / "d")]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "draft acceptance:" in out.err
    assert main(args + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    from scratchgpt.data.tokenizers import build_tokenizer

    chars = build_tokenizer("char", text="abcdefgh Hello")  # another tokenizer, another vocabulary
    save_model(tiny(vocab_size=chars.vocab_size), tmp_path / "other", tokenizer=chars)
    assert main(args + ["--draft", str(tmp_path / "other")]) == 2
    assert "same tokenizer" in capsys.readouterr().err


def test_cli_export_int8_writes_a_run_that_loads_as_it_is(tmp_path, gpt2_tokenizer, capsys):
    from scratchgpt.cli import main

    model = tiny(vocab_size=gpt2_tokenizer.vocab_size)
    save_model(model, tmp_path / "f", tokenizer=gpt2_tokenizer, extra={"chat_template": "chatml"})
    out = tmp_path / "f-int8"
    assert main(["export", "--checkpoint", str(tmp_path / "f"), "--format", "int8", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "int8" and report["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["mode"] == "int8" and cfg["chat_template"] == "chatml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "f-int8"]  # nothing left aside
    # The same numbers as quantizing the float run at load time.
    loaded, _ = load_any(out)
    on_the_fly, _ = load_any(tmp_path / "f", quantize="int8")
    for m in (loaded, on_the_fly):
        set_kernel(m, "reference")
    x = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded(x)[0], on_the_fly(x)[0])
    # One line each: quantizing the int8 run again, and writing over an existing folder.
    assert main(["export", "--checkpoint", str(out), "--format", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "already int8-quantized" in capsys.readouterr().err and not (tmp_path / "again").exists()
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", "--checkpoint", str(tmp_path / "f"), "--format", "int8", "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
