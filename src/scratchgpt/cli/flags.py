"""From config dataclasses to command-line flags, and from `-c FILE.toml` plus flags back to configs.

Every command reads its settings through this one path: `add_config_sections` gives it `-c FILE.toml` and
one `--flag` per config field (type, choices and help taken from the field), and `read_config_sections`
fills each config from its TOML table, then from the flags the user gave, and builds it once; the config
class validates it. A flag's default stays None, so the dataclass alone owns every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin

from scratchgpt.config import config_from_dict, read_toml


def parse_bool(text: str) -> bool:
    """argparse type of a boolean flag: true/false, yes/no, on/off, 1/0."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _arg_type(hint: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type=` and extra kwargs for one dataclass field type."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _arg_type(inner[0]) if len(inner) == 1 else (str, {})
    if origin is Literal:
        choices = get_args(hint)
        return type(choices[0]), {"choices": list(choices)}
    if origin is tuple:
        return (get_args(hint) or (str,))[0], {"nargs": "*"}
    if hint is bool:
        # One style for every boolean: `--x` alone means true, `--x false` still works, `--no-x` is false.
        return parse_bool, {"metavar": "{true,false}", "nargs": "?", "const": True}
    return (hint if hint in (int, float, str) else str), {}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of dataclass `cls`; defaults stay None so the dataclass owns them."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        typ, extra = _arg_type(hints[f.name])
        if "choices" in f.metadata:
            extra["choices"] = list(f.metadata["choices"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag, dest = f"--{prefix}{f.name.replace('_', '-')}", f"{prefix.replace('-', '_')}{f.name}"
        group.add_argument(flag, dest=dest, type=typ, default=None,
                           help=f"{f.metadata.get('help', '')} (default: {default!r})".strip(), **extra)
        if typ is parse_bool:
            group.add_argument(f"--{prefix}no-{f.name.replace('_', '-')}", dest=dest, action="store_const",
                               const=False, help=f"the same as {flag} false")


def flag_values(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user set on the command line (as parsed: the config checks and converts them)."""
    values = {f.name: getattr(args, f"{prefix.replace('-', '_')}{f.name}", None) for f in fields(cls)}
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class Section:
    """One [table] of a command's TOML file (-c), the config class it fills, and that class's flags."""

    name: str
    cls: type
    prefix: str = ""  # flag prefix, e.g. "lora-" for --lora-rank
    skip: tuple[str, ...] = ()  # fields this command does not take: no flag, and refused in the file
    file_only: tuple[str, ...] = ()  # fields with no flag that the file may still set (a shared run file)


def add_config_sections(p: argparse.ArgumentParser, *sections: Section, read_past: tuple[str, ...] = ()) -> None:
    """Give a command `-c FILE.toml` and one flag per field of each section's config class.

    Every command gets the same rules this way: the file's tables fill the configs, flags override the
    file field by field, and unknown tables, unknown keys or wrong types are one error naming the file.
    `read_past`: tables of a shared file that belong to another command (prepare reads a run file's
    [data] and leaves [model] and [train] to train). Read them back with `read_config_sections(args)`.
    """
    tables = ", ".join(f"[{s.name}]" for s in sections)
    p.add_argument("--config", "-c", metavar="FILE.toml", help=f"TOML file with {tables}; flags override it")
    for s in sections:
        add_dataclass_args(p, s.cls, prefix=s.prefix, skip=s.skip + s.file_only)
    p.set_defaults(config_sections=sections, config_read_past=read_past)


def read_config_tables(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The values given per section: the file's table, then the flags the user set on top, field by field."""
    sections: tuple[Section, ...] = args.config_sections
    source = args.config or "command line"
    tables = read_toml(args.config) if args.config else {}
    unknown = sorted(set(tables) - {s.name for s in sections} - set(args.config_read_past))
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {unknown}; this command reads {[s.name for s in sections]}")
    given: dict[str, dict[str, Any]] = {}
    for s in sections:
        table = tables.get(s.name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{s.name}] must be a table of fields, got {type(table).__name__}")
        refused = sorted(set(table) & set(s.skip))
        if refused:
            raise ValueError(f"{source} [{s.name}]: {refused} cannot be set for this command")
        given[s.name] = {**table, **flag_values(args, s.cls, prefix=s.prefix)}
    return given


def read_config_sections(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(config per section, the values given per section): each config built once, file first, then flags."""
    given = read_config_tables(args)
    source = args.config or "command line"
    configs = {s.name: config_from_dict(s.cls, given[s.name], source=f"{source} [{s.name}]")
               for s in args.config_sections}
    return configs, given
