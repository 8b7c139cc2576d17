"""``--config file.yaml``: the options of a YAML file, each converted and checked like its flag.

The file is read with bounds on its size and on the nodes its aliases expand to, so an alias bomb fails fast with
one line. An option is given once per file: a key repeated in one mapping, or two spellings of one option (flat,
dotted or nested, dashes or underscores; a flat name that sets several nested options counts as each of them) are
refused with one line naming both, where YAML itself and the spellings' precedence would silently keep one.
"""

from __future__ import annotations

from pathlib import Path

from sdpo_core.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


def _expanded_nodes(node, memo: dict, limit: int) -> int:
    """Nodes ``node`` stands for once every alias is expanded (memoised per node, stops past ``limit``)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1  # a node reached again while being counted: a recursive alias
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(c, memo, limit) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo, limit) + _expanded_nodes(v, memo, limit) for k, v in node.value)
    else:
        total = 1
    memo[key] = min(total, limit + 1)
    return memo[key]


def _repeated_key(node, seen: set) -> tuple[str, int, int] | None:
    """The first key written twice in one mapping of ``node`` (YAML keeps the last silently), with its two lines.

    Keys a merge (``<<: *base``) brings in are not counted: overriding them is what a merge is for. Each node is
    visited once (an alias points at a node already seen).
    """
    import yaml

    if id(node) in seen:
        return None
    seen.add(id(node))
    children = []
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for k, v in node.value:
            children.append(v)
            if k.tag == _MERGE or not isinstance(k, yaml.ScalarNode):
                continue
            if (k.tag, k.value) in lines:
                return k.value, lines[(k.tag, k.value)], k.start_mark.line + 1
            lines[(k.tag, k.value)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    for child in children:
        found = _repeated_key(child, seen)
        if found:
            return found
    return None


def read_yaml(path: str) -> dict:
    """A YAML mapping from ``path``, refusing files over 1 MiB, alias expansions past 100,000 nodes and a key
    repeated in one mapping.

    Raises:
        ConfigError: unreadable, too large, not YAML, a repeated key, or not a mapping (one line).
    """
    import yaml

    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"config {path} is a folder, not a YAML file")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is {size} bytes; config files are limited to {MAX_CONFIG_BYTES}")
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_nodes(node, {}, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise ConfigError(f"config {path} expands to more than {MAX_CONFIG_NODES} YAML nodes (aliases)")
        repeated = _repeated_key(node, set()) if node is not None else None
        if repeated:
            raise ConfigError(f"config {path} gives {repeated[0]!r} twice (lines {repeated[1]} and {repeated[2]})")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config {path} is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"config {path} nests too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping of option: value")
    return data


def load_config(path: str, converters: dict, owners: dict | None = None) -> dict:
    """The options in a YAML config file, each converted and checked like its flag.

    A nested config's options may be given flat (``seed: 1``), dotted (``scoring.seed: 1``) or nested
    (``scoring: {seed: 1}``), each option once. ``owners`` maps a flat option to the ``section.name`` options it
    sets (:attr:`sdpo_cli.options.Options.flat_owners`); any other option sets itself.

    Raises:
        ConfigError: an unknown option, a value its converter refuses, or an option given twice (one line).
    """
    owners = owners or {}
    out: dict = {}
    spelled: dict[str, str] = {}  # each option set so far -> the key that set it
    for dest, key, spelling, value in _flat_items(read_yaml(path), "", "", converters):
        if dest not in converters:
            raise ConfigError(f"unknown option {key!r} in {path}")
        for option in owners.get(dest) or (dest,):
            if option in spelled:
                raise ConfigError(f"config {path} gives {option} twice: as {spelled[option]!r} and as {spelling!r}")
            spelled[option] = spelling
        out[dest] = converters[dest](value)
    return out


def _flat_items(data: dict, prefix: str, outer: str, converters: dict):
    """``(option, dotted key, spelling as written, value)`` of each option in ``data``; a nested one's spelling is
    ``outer: {name}``."""
    for key, value in data.items():
        dest = prefix + str(key).replace("-", "_")
        if isinstance(value, dict) and dest not in converters and any(c.startswith(dest + ".") for c in converters):
            for item in _flat_items(value, dest + ".", f"{outer}{key}: {{", converters):
                yield item[0], item[1], item[2] + "}", item[3]
        else:
            yield dest, prefix + str(key), f"{outer}{key}", value
