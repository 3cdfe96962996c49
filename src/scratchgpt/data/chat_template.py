"""A model's own Jinja chat template (Llama 3 Instruct, Qwen, ...), run in a sandbox as transformers runs it.

Hugging Face models ship their prompt format as a Jinja template (tokenizer_config.json's
`chat_template`, or chat_template.jinja beside it); `HFTokenizer.apply_chat_template` renders it with a
`ChatTemplate`. The text templates of `chat.py` (alpaca, chatml) need none of this.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


class _TemplateRefusal(Exception):
    """A chat template's own `raise_exception(message)`: it refuses the conversation it was given."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


@functools.lru_cache(maxsize=1)
def _chat_template_env() -> Any:
    """The Jinja environment chat templates run in: a template is code from a downloaded folder.

    ImmutableSandboxedEnvironment refuses underscore attributes (no way to Python internals) and
    any mutation of the data passed in; on top, `namespace()` refuses underscore names, and `dict`
    is a plain constructor. The globals and filters are the ones transformers gives templates.
    """
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError:  # a ValueError, like every other reason a template cannot render: one line
        raise ValueError("chat templates need the `jinja2` library: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # Older releases have published sandbox escapes.
        raise ValueError(f"chat templates need jinja2>=3.1.6 (found {jinja2.__version__}): "
                         f"pip install -U 'jinja2>=3.1.6'")

    class SafeNamespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature: `self` may be a key
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                SafeNamespace.check(name)
            Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the name {name!r}")

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks;
        rendering a prompt only needs the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.globals.update(
        raise_exception=_raise_exception, namespace=SafeNamespace, dict=lambda *a, **k: dict(*a, **k),
        strftime_now=lambda fmt: time.strftime(fmt),  # Llama 3.1+ templates print today's date
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env


@contextlib.contextmanager
def _one_line_errors(where: str) -> Iterator[None]:
    """Any failure of a template, a syntax error or its own `raise_exception` (e.g. "System role not
    supported"), as one ValueError naming the file the template came from."""
    from jinja2 import TemplateError

    try:
        yield
    except _TemplateRefusal as e:
        raise ValueError(f"{where}: the chat template refuses this conversation: {e}") from None
    except (TemplateError, TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{where}: the chat template fails ({type(e).__name__}: {first}); "
                         f"fix chat_template or choose --chat-template alpaca or chatml") from None


class ChatTemplate:
    """A Jinja chat template compiled in the sandbox; `where` (its file) names it in every error."""

    def __init__(self, text: str, *, where: str) -> None:
        self.text, self.where = text, where
        env = _chat_template_env()  # outside the guard: a missing jinja2 is its own one-line error
        with _one_line_errors(where):
            self._compiled = env.from_string(text)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The text of `messages`, called as transformers calls a template: `tools` and `documents` are
        None unless given in `variables`, which also carry the tokenizer's special tokens (bos_token, ...)."""
        with _one_line_errors(self.where):
            return self._compiled.render(**{
                "tools": None, "documents": None, **variables,
                "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt})
