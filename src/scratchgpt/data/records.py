"""Fine-tuning data: the records of a data file, and the shapes instruction and preference records take.

A data file is a JSON list (*.json, and any name not below), JSONL (*.jsonl, *.ndjson, also compressed
.gz/.xz/.zst), Parquet or Arrow; the last three are read by `sources.iter_objects`, the reader `prepare`
streams. An instruction file's records are, per file, in one of three shapes (its first record says which):

    alpaca     {"instruction": str, "input": str (optional), "output": str}
    messages   {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}  (OpenAI style)
    sharegpt   {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}

A conversation ends in an assistant turn; every assistant turn is learnt (see `chat.conversation_segments`).
A preference (DPO) record is {"prompt", "chosen", "rejected"}: the prompt a string (one user turn) or a
messages list ending in a user turn; each answer a string, an assistant message, or a messages list
ending in one (a whole conversation, as UltraFeedback stores it: what comes before the answer must be the
prompt, and without a "prompt" it is the prompt). The Alpaca form {"instruction", "input", "chosen",
"rejected"} stays. Every error is one DataError naming the file, the record and the field.

Entries come out as dicts with "index" (0-based record), "where" (file and record) and either the Alpaca
fields or "messages": the conversation before the final answer, whose text is "output" (or "chosen" and
"rejected").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from scratchgpt.data.chat import Message
from scratchgpt.data.dataset import read_text
from scratchgpt.data.sources import DataError, Source, iter_objects

RecordFormat = Literal["json", "jsonl", "parquet", "arrow"]
RECORD_FORMATS: tuple[str, ...] = ("json", "jsonl", "parquet", "arrow")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
          dict: "an object", str: "a string"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _turn(message: Message) -> str:
    return f"{'an' if message['role'] == 'assistant' else 'a'} {message['role']} turn"


def _keys(obj: dict[str, Any]) -> str:
    return f"it has {sorted(obj)}"


def read_objects(path: str | Path, *, format: RecordFormat | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) per record of a JSON list, JSONL, Parquet or Arrow file (`format`, else by its name).

    `where` names the file and the entry (JSON list), line (JSONL) or row (Parquet, Arrow).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    source = Source.of(path) if format in (None, "json") else Source(path, format)
    if format != "json" and source.holds_records:
        yield from iter_objects(source)
        return
    text = read_text(path)  # UTF-8 (a byte order mark dropped); UTF-16 or bad bytes: one line naming the file
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); a .json data file holds one list of objects "
                        f"(name a file of one object per line *.jsonl)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: entry {i}: expected an object, got {type(obj).__name__}")
        yield f"{path}: entry {i}", obj


def _string(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    """obj[key], a string ("" for a missing or null optional one); else one DataError."""
    value = obj.get(key)
    if value is None and optional:
        return ""
    if key not in obj:
        raise DataError(f"{where}: no {key!r} ({_keys(obj)})")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def read_entries(path: str | Path, *, required: Sequence[str], optional: Sequence[str] = ("input",)) -> list[dict]:
    """Alpaca-style entries: records with string `required` keys (missing or null optional ones become "")."""
    entries = [{"index": index, "where": where, **_alpaca(obj, where, required, optional)}
               for index, (where, obj) in enumerate(read_objects(path))]
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries


def _alpaca(obj: dict[str, Any], where: str, required: Sequence[str], optional: Sequence[str]) -> dict[str, str]:
    for key in required:
        if key not in obj:
            raise DataError(f"{where}: no {key!r} ({_keys(obj)})")
    return {key: _string(obj, key, where, optional=key in optional) for key in (*required, *optional)}


# ---------------------------------------------------------------------------------------------
# Conversations: messages and ShareGPT
# ---------------------------------------------------------------------------------------------


def conversation(value: Any, where: str, *, field: str = "messages") -> list[Message]:
    """A messages list (or, for field "conversations", a ShareGPT one) as checked messages; else one DataError."""
    sharegpt = field == "conversations"
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ("system", "user", "assistant")}
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _kind(value)
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects, "
                        f"got {got}")
    out: list[Message] = []
    for i, m in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: {_kind(m)}, not an object with {role_key!r} and {text_key!r}")
        if m.get(role_key) not in roles:
            got = f"{m[role_key]!r}" if role_key in m else "missing"
            raise DataError(f"{at}.{role_key} is {got}; it must be one of {', '.join(map(repr, roles))}")
        if not isinstance(m.get(text_key), str):
            got = _kind(m[text_key]) if text_key in m else "missing"
            raise DataError(f"{at}.{text_key} is {got}, not a string")
        out.append({"role": roles[m[role_key]], "content": m[text_key]})  # type: ignore[typeddict-item]
    for i, m in enumerate(out[1:], 1):
        if m["role"] == "system":
            raise DataError(f"{where}: {field}[{i}] is a system message after the first turn; put it first")
    return out


def _instruction_shape(obj: dict[str, Any], where: str) -> str:
    for shape in ("messages", "conversations", "instruction"):
        if shape in obj:
            return shape
    raise DataError(f"{where}: no 'instruction' (nor 'messages' or 'conversations'; {_keys(obj)}): a record is "
                    f"Alpaca's {{instruction, input, output}}, {{messages: [{{role, content}}]}} or ShareGPT's "
                    f"{{conversations: [{{from, value}}]}}")


def read_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Instruction entries of a data file: Alpaca ones as `read_entries` gives them, conversations as
    {"messages": the turns before the last assistant turn, "output": its content}."""
    entries: list[dict[str, Any]] = []
    shape = None
    for index, (where, obj) in enumerate(read_objects(path)):
        shape = shape or _instruction_shape(obj, where)
        head = {"index": index, "where": where}
        if shape == "instruction":
            entries.append({**head, **_alpaca(obj, where, ("instruction", "output"), ("input",))})
            continue
        if shape not in obj:
            raise DataError(f"{where}: no {shape!r} ({_keys(obj)}); the file's first record holds {shape!r}, so "
                            f"every record must")
        messages = conversation(obj[shape], where, field=shape)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: {shape}[{len(messages) - 1}] is {_turn(messages[-1])}; a conversation "
                            f"must end with an assistant turn (the answer learnt)")
        if messages[0]["role"] == "assistant" or (messages[0]["role"] == "system" and messages[1]["role"] != "user"):
            raise DataError(f"{where}: {shape!r} starts with an assistant turn; a user turn must come first")
        if messages[-2]["role"] != "user":  # the prompt of the last answer is what test responses ask
            raise DataError(f"{where}: {shape}[{len(messages) - 2}] is {_turn(messages[-2])}; the last assistant turn "
                            f"must answer a user turn")
        entries.append({**head, "messages": messages[:-1], "output": messages[-1]["content"]})
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries


# ---------------------------------------------------------------------------------------------
# Preferences (DPO)
# ---------------------------------------------------------------------------------------------


def _prompt(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = conversation(value, where, field="prompt")
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: prompt[{len(messages) - 1}] is {_turn(messages[-1])}; a prompt must end "
                        f"with a user turn")
    return messages


def _answer(obj: dict[str, Any], key: str, where: str) -> tuple[list[Message] | None, str]:
    """(the messages before the answer, or None when the answer stands alone; the answer's text)."""
    value = obj.get(key)
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a string, an assistant message or a messages list, got "
                        f"{_kind(value)}")
    messages = conversation(value, where, field=key)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key}[{len(messages) - 1}] is {_turn(messages[-1])}; {key!r} must end with "
                        f"the assistant's answer")
    return messages[:-1] or None, messages[-1]["content"]


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """Preference entries: Alpaca-style ones as `read_entries` gives them (instruction, input, chosen,
    rejected), the others as {"messages": the prompt, "chosen": str, "rejected": str}."""
    entries: list[dict[str, Any]] = []
    for index, (where, obj) in enumerate(read_objects(path)):
        head = {"index": index, "where": where}
        if "instruction" in obj:
            entries.append({**head, **_alpaca(obj, where, ("instruction", "chosen", "rejected"), ("input",))})
            continue
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise DataError(f"{where}: no {key!r} ({_keys(obj)})")
        (before_c, chosen), (before_r, rejected) = _answer(obj, "chosen", where), _answer(obj, "rejected", where)
        if "prompt" in obj:
            prompt = _prompt(obj["prompt"], where)
        elif before_c is not None and before_c == before_r:
            prompt = before_c  # whole conversations that differ only in the answer: the rest is the prompt
        else:
            raise DataError(f"{where}: no 'prompt' ({_keys(obj)}), and 'chosen' and 'rejected' are not two "
                            f"conversations that differ only in their last turn")
        for key, before in (("chosen", before_c), ("rejected", before_r)):
            if before is not None and before != prompt:
                raise DataError(f"{where}: the turns before {key!r}'s answer are not the prompt; give the answer "
                                f"alone, or the prompt's turns followed by it")
        entries.append({**head, "messages": prompt, "chosen": chosen, "rejected": rejected})
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries
