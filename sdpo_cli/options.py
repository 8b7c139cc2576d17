"""Command-line flags generated from config dataclasses, and the same typed values from ``--config file.yaml``.

Every field of a config dataclass (``field(metadata={"help": ...})``) becomes a flag, spelled with dashes or
underscores (``--max-length`` / ``--max_length``). One converter per field type turns a flag's text or a YAML value
into the field's type and refuses anything else with one line:

* booleans: ``true/false/yes/no/1/0`` (any case) and nothing else; ``--flag`` alone means true, ``--no-flag``
  false, and ``--flag false`` / ``--flag=false`` work as in TRL's and transformers' parsers;
* integers and floats: numbers (a YAML list, a boolean or NaN is refused); strings (paths, names): strings only;
* lists: comma-separated text or a YAML list; mappings: JSON text or a YAML mapping.

A nested config (a composition such as ``RunConfig``, its fields declared with :func:`sdpo_core.config.section`)
gives each of its fields a flag ``--name`` (setting every nested field of that name where several share it) and
``--section.name`` (setting one); YAML takes them flat, dotted or nested.

Values from a YAML file (:mod:`sdpo_cli.config_file`) are checked the same way; flags on the command line win over
the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import types
import typing
from pathlib import Path

from sdpo_core.errors import ConfigError

from .config_file import load_config

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
BOOL_WORDS = _TRUE + _FALSE


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_bool(value, name: str = "value") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: expected true/false/yes/no/1/0, got {_short(value)}")


def _members(annotation) -> tuple[list, bool]:
    """The non-None members of a (possibly Optional / Union) annotation, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(annotation))
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], annotation is type(None)


def converter(annotation, name: str):
    """A function that turns flag text or a YAML value into ``annotation``'s type (ConfigError otherwise)."""
    members, optional = _members(annotation)

    def convert(value):
        text_none = optional and str not in members and isinstance(value, str) and value.strip().lower() in (
            "none", "null")
        if value is None or text_none:
            if optional:
                return None
            raise ConfigError(f"{name}: a value is required")
        errors = []
        for member in members:
            try:
                return _convert_one(member, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {_short(value)} fits none of its types")

    return convert


def _convert_one(member, value, name: str):
    origin = typing.get_origin(member)
    if member is bool:
        return parse_bool(value, name)
    if member is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}: expected an integer, got {_short(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {_short(value)}") from None
    if member is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected a number, got {_short(value)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {_short(value)}") from None
        except OverflowError:  # an integer past float's range: infinite, as its text would parse
            number = math.inf if value > 0 else -math.inf
        if math.isnan(number):  # 'nan' parses as a float but means nothing as a setting (TRL's options too)
            raise ConfigError(f"{name}: expected a number, not {_short(value)}")
        return number
    if member is str or member is Path or (isinstance(member, type) and issubclass(member, enum.Enum)):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected text (a string), got {_short(value)}")
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(member):
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, typing.get_args(member)))}, got "
                              f"{_short(value)}")
        return value
    if member is list or origin is list:
        (item,) = typing.get_args(member) or (str,)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{name}: expected a list (comma-separated or a YAML list), got {_short(value)}")
        convert = converter(item, name)
        return [convert(v.strip() if isinstance(v, str) else v) for v in items]
    if member is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a JSON object, got {_short(value)}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_short(value)}")
        return value
    if member is typing.Any or member is object:
        return value
    raise ConfigError(f"{name}: cannot take a value of type {member!r} from the command line")


def is_bool(annotation) -> bool:
    members, _ = _members(annotation)
    return members == [bool]


def flag_names(dest: str) -> list[str]:
    dashed = "--" + dest.replace("_", "-")
    return [dashed] if dashed == "--" + dest else [dashed, "--" + dest]


class Options:
    """The flags of one subcommand: how each is converted, and the values given (flags over YAML)."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.converters: dict[str, typing.Callable] = {}
        self.bool_dests: set[str] = set()
        self.positional: dict[str, typing.Callable] = {}
        self.flat_owners: dict[str, list[str]] = {}  # flat flag -> the ``section.name`` options it sets

    def add_dataclass(self, cls, title: str | None = None, skip=(), prefix: str = "") -> None:
        """One flag per init field of ``cls`` (help from ``field(metadata={"help": ...})``), named ``prefix + name``.

        A field already added by another dataclass is skipped (the first one's flag sets both). A nested config
        (a field declared with :func:`sdpo_core.config.section`) adds its own fields: see :meth:`_add_section`.
        """
        hints = typing.get_type_hints(cls)
        group = self.parser.add_argument_group(title or cls.__name__)
        fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]
        sections = [f for f in fields if "section" in f.metadata]
        owners: dict[str, list[str]] = {}  # flat flag -> the nested configs it sets
        for f in sections:
            for leaf in dataclasses.fields(f.metadata["section"]):
                if leaf.init:
                    owners.setdefault(f.metadata.get("prefix", "") + leaf.name, []).append(f"{f.name}.{leaf.name}")
        for f in fields:
            if f in sections:
                continue
            dest = prefix + f.name
            if dest in self.converters:
                continue
            self.add(dest, hints[f.name], f.metadata.get("help", ""), _default(f), group=group,
                     choices=f.metadata.get("choices"))
        for f in sections:
            self._add_section(f, owners)
        for flat, qualified in owners.items():
            self.flat_owners.setdefault(flat, []).extend(q for q in qualified if q not in self.flat_owners.get(flat, []))

    def _add_section(self, section_field, owners: dict) -> None:
        """The fields of a nested config: ``--name`` where the name is unique in the composition (it sets every
        nested field of that name otherwise, as the help says), and ``--section.name`` for each one."""
        cls, defaults = section_field.metadata["section"], section_field.metadata["defaults"]
        flat_prefix = section_field.metadata.get("prefix", "")
        hints = typing.get_type_hints(cls)
        group = self.parser.add_argument_group(f"{section_field.name} ({cls.__name__})",
                                               description=section_field.metadata.get("help") or None)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = defaults.get(f.name, _default(f))
            qualified = f"{section_field.name}.{f.name}"
            shared = owners.get(flat_prefix + f.name, [qualified])
            if flat_prefix + f.name not in self.converters:
                if len(shared) > 1:  # one flag for several options: their own flags say what each does
                    self.add(flat_prefix + f.name, hints[f.name], f"Sets {' and '.join(shared)}.", group=group)
                else:
                    self.add(flat_prefix + f.name, hints[f.name], f.metadata.get("help", ""), default, group=group,
                             choices=f.metadata.get("choices"))
            self.add(qualified, hints[f.name], f.metadata.get("help", ""), default, group=group,
                     choices=f.metadata.get("choices"), hidden=len(shared) == 1)

    def add(self, dest: str, annotation, help_: str = "", default=None, *, group=None, choices=None,
            short: str | None = None, required: bool = False, hidden: bool = False) -> None:
        target = group or self.parser
        convert = converter(annotation, dest)
        if choices:
            inner = convert

            def convert(value, inner=inner, choices=tuple(choices)):  # noqa: E731 - closes over the field's choices
                v = inner(value)
                if v is not None and v not in choices:
                    raise ConfigError(f"{dest}: must be one of {', '.join(map(str, choices))}, got {_short(v)}")
                return v

        self.converters[dest] = convert
        shown = "" if default in (None, "", [], {}) else f" (default: {default})"
        if choices:
            shown += f" (one of: {', '.join(map(str, choices))})"
        flags = flag_names(dest) + ([short] if short else [])
        help_ = argparse.SUPPRESS if hidden else f"{help_}{shown}".replace("%", "%%")
        if is_bool(annotation):
            self.bool_dests.add(dest)
            target.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, type=_argparse_type(convert),
                                metavar="{true,false}", help=help_)
            target.add_argument("--no-" + dest.replace("_", "-"), dest=dest, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            target.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, type=_argparse_type(convert),
                                required=required, help=help_, metavar=dest.upper())

    def add_positional(self, dest: str, help_: str, *, many: bool, metavar: str | None = None) -> None:
        """Positional inputs (``many``: a list of them); also settable from YAML under ``dest``."""
        self.positional[dest] = converter(list[str] if many else str, dest)
        self.parser.add_argument(dest, nargs="*" if many else "?", default=argparse.SUPPRESS, help=help_,
                                 metavar=metavar or dest.upper())

    def normalise_argv(self, argv: list[str]) -> list[str]:
        """``--flag`` / ``--flag false`` / ``--flag=no`` of boolean options, as ``--flag=true|false``."""
        bool_flags = {n: d for d in self.bool_dests for n in flag_names(d)}
        out, i = [], 0
        while i < len(argv):
            token = argv[i]
            name, eq, value = token.partition("=")
            if name in bool_flags and not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is not None and nxt.strip().lower() in BOOL_WORDS:
                    out.append(f"{name}={nxt}")
                    i += 2
                    continue
                out.append(f"{name}=true")
            else:
                out.append(token)
            i += 1
        return out

    def values(self, namespace: argparse.Namespace, config_path: str | None) -> dict:
        """The options given: YAML values (checked), then flags over them."""
        converters = {**self.converters, **self.positional}
        values = load_config(config_path, converters, self.flat_owners) if config_path else {}
        given = {k: v for k, v in vars(namespace).items() if k in self.converters or k in self.positional}
        for dest in self.positional:
            if dest in given and given[dest] in ([], None):
                del given[dest]  # not given on the command line: keep the file's
        for dest in given:  # a flat flag wins over the file's `section.name` values it stands for
            for qualified in self.flat_owners.get(dest, ()):
                values.pop(qualified, None)
        return {**values, **given}


def _argparse_type(convert):
    def parse(text):
        try:
            return convert(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    return parse


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING and "section" not in f.metadata:
        return f.default_factory()
    return None


def build(cls, values: dict, prefix: str = "", **overrides):
    """An instance of dataclass ``cls`` from the option values that name its fields (defaults for the rest).

    A nested config field (:func:`sdpo_core.config.section`) is built from the composition's defaults for it, then
    the flat values of its fields' names, then the ``section.name`` values (the most specific wins).
    """
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in overrides:
            continue
        if "section" in f.metadata:
            section_cls, flat_prefix = f.metadata["section"], f.metadata.get("prefix", "")
            given = dict(f.metadata["defaults"])
            for leaf in dataclasses.fields(section_cls):
                for key in (flat_prefix + leaf.name, f"{f.name}.{leaf.name}"):
                    if key in values:
                        given[leaf.name] = values[key]
            kwargs[f.name] = build(section_cls, given)
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a value of the wrong kind that the dataclass's own checks did not catch
        raise ConfigError(f"{cls.__name__}: {str(e).splitlines()[0]}") from e
