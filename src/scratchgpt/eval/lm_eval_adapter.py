"""scratchgpt as an lm-evaluation-harness model (`--model scratchgpt`), on scratchgpt's own scoring.

lm-eval 0.4 finds models only in its own registry (no plugin entry points for models), so the model
is registered by `register()`, and this module's command registers it and then hands over to
lm-eval's own command line:

    python -m scratchgpt.eval.lm_eval_adapter --model scratchgpt \\
        --model_args checkpoint=runs/shakespeare,batch_size=16 --tasks hellaswag

(the same flags as `lm_eval`). From Python: `register()` then `lm_eval.simple_evaluate(model="scratchgpt", ...)`.

- loglikelihood: lm-eval's own context/continuation tokenization, scored by
  `multiple_choice.score_requests` (one pass per shared context, choices from an expanded KV cache).
- loglikelihood_rolling: `perplexity.score_documents` with stride = context and an end-of-text
  prefix, which is exactly lm-eval's disjoint rolling windows; word/byte perplexity therefore equal
  `scratchgpt eval perplexity` on the same texts.
- generate_until: batched `inference.generate.iter_generate` with the request's stop strings.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

MODEL_NAME = "scratchgpt"


def _model_class() -> type:
    """The LM subclass (built on first use: importing lm_eval is slow and it is an optional extra)."""
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError as e:
        raise ValueError(f"the lm-eval adapter needs the `eval` extra ({e}); pip install 'scratchgpt[eval]'") from None

    from scratchgpt.checkpoint import load_any
    from scratchgpt.config import SamplingConfig
    from scratchgpt.eval.multiple_choice import score_requests
    from scratchgpt.eval.perplexity import score_documents
    from scratchgpt.inference.generate import iter_generate

    class ScratchGPTLM(TemplateLM):
        """lm-eval model over a scratchgpt-loadable checkpoint (run dir, HF GPT-2 folder or hub name)."""

        def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, device: str = "cpu",
                     batch_size: int | str = 16, max_batch_size: int | None = None, max_length: int | None = None,
                     max_gen_toks: int = 256, model: Any = None, tokenizer: Any = None, **_ignored: Any) -> None:
            super().__init__()
            if model is None:
                path = checkpoint or pretrained
                if not path:
                    raise ValueError("pass --model_args checkpoint=RUN_DIR (a scratchgpt or Hugging Face GPT-2 dir)")
                model, tokenizer = load_any(path, device=_usable_device(device))
            self.model, self.tokenizer = model.eval(), tokenizer
            self._device = next(model.parameters()).device
            # "auto" (lm-eval's batch-size search) has no meaning here: fall back to the default.
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
            self.max_length = int(max_length or model.config.n_positions)
            self.max_gen_toks = int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eot_id

        @property
        def device(self):
            return self._device

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.tokenizer.encode(string, allowed_special=True)

        def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
            return self.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            out = score_requests(self.model, pairs, batch_size=self.batch_size, progress=not disable_tqdm)
            for (key, _, _), value in zip(requests, out, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, value)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            docs = [self.tok_encode(req.args[0]) for req in requests]
            nonempty = [i for i, d in enumerate(docs) if d]
            nlls, _, _ = score_documents(self.model, [docs[i] for i in nonempty], context=self.max_length,
                                         stride=self.max_length, prefix=self.eot_token_id,
                                         batch_size=self.batch_size, progress=not disable_tqdm)
            out = [0.0] * len(docs)
            for i, nll in zip(nonempty, nlls, strict=True):
                out[i] = -nll
            for req, ll in zip(requests, out, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), ll)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
                sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature,
                                          stop=tuple(s for s in until if s))
                keep = max(self.max_length - max_new, 1)  # leave room for the answer, as lm-eval's HF model does
                for start in range(0, len(members), self.batch_size):
                    rows = members[start : start + self.batch_size]
                    prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in rows]
                    texts = [""] * len(rows)
                    for steps in iter_generate(self.model, prompts, sampling, eot_id=self.eot_token_id,
                                               tokenizer=self.tokenizer):
                        for s in steps:
                            texts[s.row] += s.text
                    for i, text in zip(rows, texts, strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out  # type: ignore[return-value]

    return ScratchGPTLM


def _usable_device(device: str | None) -> str:
    """`device`, except that lm-eval's default "cuda" becomes "cpu" on a machine without CUDA."""
    import torch

    if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def register() -> type:
    """Register the `scratchgpt` model with lm-eval (idempotent); returns its class."""
    # lm-eval fills its registry with the built-in models only while it is empty: do that first, or
    # registering ours would hide `hf` and the rest.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_model_class())
    return model_registry.get(MODEL_NAME)


def main(argv: Sequence[str] | None = None) -> None:
    """`lm_eval` with the scratchgpt model registered: same flags, same output."""
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
