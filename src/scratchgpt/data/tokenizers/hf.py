"""A model's own Hugging Face tokenizer.json (Llama 3, Qwen, ...), run by the `tokenizers` library (Rust),
with the special tokens and chat template of its tokenizer_config.json."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scratchgpt.data.chat_template import ChatTemplate
from scratchgpt.data.tokenizers.base import EOT_TEXT, TOKENIZER_FILE, Tokenizer
from scratchgpt.data.tokenizers.gpt2 import gpt2_byte_to_unicode

HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list: Llama 3 Instruct stops at three), else []."""
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []  # the file only adds stop tokens; a broken one must not block loading the tokenizer
    eos = [eos] if isinstance(eos, int) else eos
    return [i for i in eos if isinstance(i, int) and not isinstance(i, bool)] if isinstance(eos, list) else []


def is_hf_tokenizer_json(meta: Any) -> bool:
    """True for the `tokenizers` library's own file format (it has a "model"; ours has a "type")."""
    return isinstance(meta, dict) and "model" in meta and "type" not in meta


class HFTokenizer(Tokenizer):
    """A model's own `tokenizer.json`, encoded by Hugging Face's `tokenizers` (Rust), plus the
    special tokens and chat template of its `tokenizer_config.json` when present.

    End of text is the config's `eos_token` (e.g. `<|im_end|>` for Qwen3 chat, `<|eot_id|>` for
    Llama 3.2 Instruct), else `<|endoftext|>` / `<|end_of_text|>`. `encode` adds no BOS token,
    like the other tokenizers here; chat templates write it themselves.
    """

    name = "hf"

    def __init__(self, tokenizer_json: str, tokenizer_config: Mapping[str, Any] | None = None, *,
                 source: str | Path | None = None, extra_eos_ids: Sequence[int] = ()) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ImportError("tokenizer.json files need the `tokenizers` library: pip install tokenizers") from None
        self._json = tokenizer_json
        self._tok = RustTokenizer.from_str(tokenizer_json)
        self.config: dict[str, Any] = dict(tokenizer_config or {})
        self.source = source  # the folder it came from: errors in its chat template name it
        self._template_file = HF_TOKENIZER_CONFIG  # or chat_template.jinja (see from_dir)
        self._template: ChatTemplate | None = None  # compiled on first use; again if config's text changes
        self._extra_eos = tuple(extra_eos_ids)
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._eot = self._find_eot()
        decoder = (json.loads(tokenizer_json).get("decoder") or {})
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        # Byte-level BPE (GPT-2, Llama 3, Qwen) spells bytes as printable characters: map them back, so
        # one token can end inside a UTF-8 character and streaming still never splits one.
        self._byte_level = "ByteLevel" in kinds
        self._unicode_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}

    def _find_eot(self) -> int:
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for text in (eos, EOT_TEXT, "<|end_of_text|>", "</s>"):
            if isinstance(text, str) and self._tok.token_to_id(text) is not None:
                return self._tok.token_to_id(text)
        raise ValueError("tokenizer.json has no end-of-text token (no eos_token in tokenizer_config.json, no "
                         f"{EOT_TEXT!r}); add eos_token to tokenizer_config.json")

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """The tokenizer of an HF model folder: tokenizer.json (+ tokenizer_config.json if present)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        config_path = directory / HF_TOKENIZER_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, ValueError) as err:
            raise ValueError(f"{config_path}: not valid JSON ({err}); restore the model's original file") from None
        config = config if isinstance(config, dict) else {}
        jinja = directory / HF_CHAT_TEMPLATE_FILE
        from_jinja = "chat_template" not in config and jinja.is_file()
        if from_jinja:  # newer transformers save the template beside the config rather than inside it
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        try:
            tok = cls(path.read_text(encoding="utf-8"), config, source=directory,
                      extra_eos_ids=_generation_eos_ids(directory / "generation_config.json"))
            if from_jinja:
                tok._template_file = HF_CHAT_TEMPLATE_FILE
            return tok
        except Exception as err:  # noqa: BLE001 - the Rust parser raises its own exception type
            raise ValueError(f"{path}: cannot be read by the tokenizers library ({str(err).splitlines()[0]}); "
                             f"restore the model's original tokenizer.json") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer.json text this tokenizer was built from."""
        return self._json

    @property
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer` (Rust) that encodes: its vocabulary, added tokens and post-processor."""
        return self._tok

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template from tokenizer_config.json, or None."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None

    @property
    def chat_template_path(self) -> str:
        """Where the chat template came from (the folder's tokenizer_config.json or chat_template.jinja)."""
        return str(Path(self.source) / self._template_file) if self.source else self._template_file

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` with the model's own chat template (Jinja, sandboxed as transformers does).

        Any failure, a syntax error or the template's own `raise_exception` (e.g. "System role not
        supported"), is one ValueError naming the file the template came from.
        """
        template = self.chat_template
        where = self.chat_template_path
        if template is None:
            raise ValueError(f"{where}: no chat_template; choose --chat-template alpaca or chatml")
        if self._template is None or (self._template.text, self._template.where) != (template, where):
            self._template = ChatTemplate(template, where=where)
        # As transformers calls it: the config's special tokens (bos_token, eos_token, ...) are variables.
        specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                    if k.endswith("_token") and isinstance(v, str | dict)}
        return self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     **{**specials, **variables})

    @functools.cached_property
    def chat_stop_texts(self) -> tuple[str, ...]:
        """Special-token texts that end an assistant reply under the chat template: the end-of-text
        token(s) (tokenizer_config's eos_token, generation_config.json's eos_token_id) and every
        special token the template itself writes (end-of-turn markers such as <|im_end|> or
        <|eot_id|>, and the markers that open a turn, which the reply must not produce either)."""
        ids = (self._eot, *self._extra_eos)
        texts = [self._tok.id_to_token(i) for i in ids if self._tok.id_to_token(i) in self._specials]
        sample = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}]
        rendered = ""
        for messages in ([{"role": "system", "content": "s"}, *sample], sample):
            try:
                rendered = self.apply_chat_template(messages, add_generation_prompt=True)
                break
            except ValueError:
                continue  # e.g. a template without a system role: try the plain conversation
        if self._specials and rendered:
            texts += [t for t in self._special_splitter().split(rendered)[1::2]
                      if self._specials[t] not in self._bos_ids()]
        return tuple(dict.fromkeys(texts))

    def _bos_ids(self) -> set[int]:
        bos = self.config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return {self._specials[bos]} if isinstance(bos, str) and bos in self._specials else set()

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of `messages` rendered with the chat template: the template's markers become special
        tokens, while a special-token text inside a message's content is refused (it cannot forge a turn)."""
        self.check_chat_content(messages)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, allowed_special=True)

    def check_chat_content(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """One ValueError when a message's content holds a special-token text (it would forge a turn)."""
        for i, m in enumerate(messages):
            content = str(m.get("content", ""))
            for special in self.special_tokens:
                if special in content:
                    raise ValueError(f"messages[{i}]: the content holds the special token {special!r}, which would "
                                     f"forge the chat template's markup; remove it")

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if any(i < 0 for i in ids):
            raise ValueError(f"token id {min(ids)} is negative")
        out = bytearray()
        for i in ids:
            token = self._tok.id_to_token(i)
            if token is None:
                # Models round their embedding up (Qwen3: 151,936 rows for 151,669 tokens); the extra
                # rows are never trained, and an id there decodes to nothing rather than failing a stream.
                continue
            if token in self._specials or not (self._byte_level or token.startswith("<0x") or "▁" in token):
                out += token.encode("utf-8")
            elif self._byte_level:
                out += bytes(self._unicode_to_byte.get(c, 0x3F) for c in token)
            elif m := _BYTE_FALLBACK.fullmatch(token):
                out.append(int(m.group(1), 16))  # SentencePiece byte fallback
            else:
                out += token.replace("▁", " ").encode("utf-8")  # SentencePiece marks spaces with ▁
        return bytes(out)

    def save(self, directory: str | Path) -> None:
        self.save_hf(directory)

    def save_hf(self, directory: str | Path) -> None:
        """Write tokenizer.json (+ tokenizer_config.json) as the `tokenizers` library reads them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        if self.config:
            (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        generation = directory / "generation_config.json"
        if self._extra_eos and not generation.exists():  # keep the extra stop ids (e.g. in a run directory)
            generation.write_text(json.dumps({"eos_token_id": list(self._extra_eos)}) + "\n", encoding="utf-8")
