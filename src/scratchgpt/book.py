"""The book's own helpers, under the names "Build a Large Language Model (From Scratch)" gives them.

Readers of the book reach for `GPTModel(GPT_CONFIG_124M)`, `generate_text_simple`, `create_dataloader_v1`,
`calc_loss_loader` and friends. Each one here is a thin wrapper over the piece of scratchgpt that already
does the job (the textbook model, the GPT-2 tokenizer, the window arithmetic of the token samplers, the
one Hugging Face name map), so a reader can run the chapter code unchanged and then find the production
version one import away. The exception is `generate`'s draw: it is the book's own (`torch.multinomial` on
the global RNG), because scratchgpt's faster sampler would print other text for the same seed. With the
book's seeds and settings they reproduce the book's printed outputs token for token (tests/test_book.py).

The helpers accept both the book's `GPTModel` (whose forward returns logits) and scratchgpt's `GPT` (whose
forward returns `(logits, loss)`), and both a tiktoken `Encoding` and a scratchgpt `Tokenizer`.

Shape legend: B batch, T time, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from scratchgpt.config import check_temperature, is_greedy
from scratchgpt.data.samplers import SequentialWindows
from scratchgpt.data.tokenizers import Tokenizer, gpt2_tokenizer
from scratchgpt.hf import hf_to_scratchgpt
from scratchgpt.model.gpt import GPT
from scratchgpt.model.textbook import GPT_CONFIG_124M, GPTModel, textbook_state_from_gpt_state

__all__ = [
    "GPT_CONFIG_124M",
    "GPTDatasetV1",
    "GPTModel",
    "calc_loss_batch",
    "calc_loss_loader",
    "create_dataloader_v1",
    "generate",
    "generate_text_simple",
    "load_weights_into_gpt",
    "text_to_token_ids",
    "token_ids_to_text",
]

_EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Chapter 2: text -> token ids -> sliding windows
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` with `<|endoftext|>` allowed, for a scratchgpt Tokenizer or a tiktoken Encoding."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, allowed_special=True)
    return tokenizer.encode(text, allowed_special={_EOT})  # tiktoken's signature, as the book calls it


class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; each target is its input shifted by one."""

    def __init__(self, txt: str, tokenizer: Any, max_length: int, stride: int):
        tokens = np.asarray(_encode(tokenizer, txt), dtype=np.int64)
        # The same window rule as the pretraining sampler: starts 0, stride, 2·stride, ... while a full
        # window plus its one-token-later target still fits in the text.
        windows = SequentialWindows(tokens, block_size=max_length, batch_size=1, stride=stride, shuffle=False)
        starts = torch.arange(len(windows)) * windows.stride
        offsets = torch.arange(max_length + 1)
        rows = torch.from_numpy(tokens)[starts[:, None] + offsets]  # (N, T + 1)
        self.input_ids = list(rows[:, :-1])  # N tensors of (T,)
        self.target_ids = list(rows[:, 1:])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(
    txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128, shuffle: bool = True,
    drop_last: bool = True, num_workers: int = 0, *, tokenizer: Any = None,
) -> DataLoader:
    """A DataLoader of (input, target) batches (B, T) over GPT-2 tokens of `txt` (the book's chapter 2)."""
    # The book builds tiktoken's "gpt2" encoding here; scratchgpt's is the same vocabulary, found locally
    # ($SCRATCHGPT_GPT2_DIR, the cache) or downloaded once with a clear error when offline.
    tokenizer = gpt2_tokenizer() if tokenizer is None else tokenizer
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)


def text_to_token_ids(text: str, tokenizer: Any) -> Tensor:
    """(1, T) ids of `text`: the batch dimension the models expect."""
    return torch.tensor(_encode(tokenizer, text)).unsqueeze(0)


def token_ids_to_text(token_ids: Tensor, tokenizer: Any) -> str:
    """Text of a (1, T) or (T,) tensor of ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ---------------------------------------------------------------------------------------------
# Chapters 4 and 5: generation and the loss
# ---------------------------------------------------------------------------------------------


def _logits(model: nn.Module, idx: Tensor) -> Tensor:
    """Logits (B, T, V) from the book's GPTModel or from scratchgpt's GPT."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def _book_next_token(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """The book's draw for logits (B, V) -> (B, 1): top-k mask, temperature, softmax, torch.multinomial.

    Step for step as chapter 5 writes it, so the same `torch.manual_seed` gives the same tokens as the book.
    scratchgpt's own sampler (inference.generate) draws differently (one uniform per row, its own top-k) and is
    faster; the book's readers compare text, so here the book's order of operations and RNG calls win.
    """
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)  # (B, k), largest first
        # Below the k-th largest -> -inf; a tie with the k-th stays in, as in the book.
        logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf"), device=logits.device), logits)
    # The book samples whenever temperature > 0; scratchgpt's one rule (is_greedy) also decodes greedily below
    # 1e-4, where the book's softmax is one-hot in all but name. From 1e-4 up the draws are the book's.
    if is_greedy(temperature):
        return torch.argmax(logits, dim=-1, keepdim=True)  # (B, 1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1)  # (B, 1): draws from torch's global RNG


def generate(
    model: nn.Module, idx: Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
    top_k: int | None = None, eos_id: int | None = None,
) -> Tensor:
    """Append up to `max_new_tokens` to `idx` (B, T): greedy at temperature 0, else sampled after top-k.

    The chapter 5 version: the model sees at most the last `context_size` tokens; generation stops early
    when the next token is `eos_id` (in every row). Sampling calls `torch.multinomial` on torch's global
    RNG exactly as the book does, so `torch.manual_seed(123)` reproduces the book's sampled text.
    """
    check_temperature("generate", "temperature", temperature)
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate.top_k={top_k!r} must be None or an integer >= 1")
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = _logits(model, idx[:, -context_size:])[:, -1, :]  # (B, V): only the last position
        idx_next = _book_next_token(logits, temperature, top_k)  # (B, 1)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
    return idx


def generate_text_simple(model: nn.Module, idx: Tensor, max_new_tokens: int, context_size: int) -> Tensor:
    """Greedy decoding, chapter 4: append the most likely next token `max_new_tokens` times."""
    return generate(model, idx, max_new_tokens, context_size, temperature=0.0)


def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: nn.Module, device: Any) -> Tensor:
    """Mean next-token cross-entropy of one (B, T) batch, computed on `device`."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if isinstance(model, GPT):
        return model(input_batch, target_batch)[1]  # the GPT computes the same cross-entropy itself
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: DataLoader, model: nn.Module, device: Any, num_batches: int | None = None) -> float:
    """Mean of `calc_loss_batch` over the first `num_batches` batches (all by default); NaN if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


# ---------------------------------------------------------------------------------------------
# Chapter 5: OpenAI's GPT-2 weights into the book's model
# ---------------------------------------------------------------------------------------------


def _openai_params_to_hf(params: Mapping[str, Any]) -> dict[str, Tensor]:
    """The book's `params` (OpenAI's TensorFlow checkpoint as nested dicts of arrays) under HF GPT-2 names.

    OpenAI's checkpoint and Hugging Face's GPT-2 share Conv1D's (in, out) layout, so this is renaming only;
    the one tested name map (`hf.hf_to_scratchgpt`) does the transposes from there.
    """

    def t(x: Any) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32))

    hf = {"wte.weight": t(params["wte"]), "wpe.weight": t(params["wpe"]),
          "ln_f.weight": t(params["g"]), "ln_f.bias": t(params["b"])}
    for i, block in enumerate(params["blocks"]):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            group, name = layer.split(".")
            hf[f"h.{i}.{layer}.weight"] = t(block[group][name]["w"])
            hf[f"h.{i}.{layer}.bias"] = t(block[group][name]["b"])
        for norm in ("ln_1", "ln_2"):
            hf[f"h.{i}.{norm}.weight"] = t(block[norm]["g"])
            hf[f"h.{i}.{norm}.bias"] = t(block[norm]["b"])
    return hf


def load_weights_into_gpt(gpt: GPTModel, params: Mapping[str, Any]) -> None:
    """Copy OpenAI's GPT-2 weights (the book's `params` dict) into the book's `GPTModel`, shapes checked.

    GPT-2 has biases on its query/key/value projections: build the model with `qkv_bias=True`, as the
    book does before loading. The output head receives the token embedding (GPT-2 ties the two).
    """
    cfg = gpt.cfg
    if not cfg["qkv_bias"]:
        raise ValueError("GPT-2's query/key/value projections have biases: build GPTModel with "
                         "{..., 'qkv_bias': True} before loading its weights")
    state = hf_to_scratchgpt(_openai_params_to_hf(params))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    textbook_state = textbook_state_from_gpt_state(state, cfg)
    own = gpt.state_dict()
    for name, tensor in textbook_state.items():
        if name not in own:
            raise ValueError(f"params hold {name!r}, which this GPTModel lacks; check n_layers and the config")
        if own[name].shape != tensor.shape:
            raise ValueError(f"params give {name!r} shape {tuple(tensor.shape)}, the model has "
                             f"{tuple(own[name].shape)}; build GPTModel with the config of these weights")
    missing = sorted(set(own) - set(textbook_state))
    if missing:
        raise ValueError(f"params lack {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                         "check n_layers and the config")
    gpt.load_state_dict(textbook_state)

