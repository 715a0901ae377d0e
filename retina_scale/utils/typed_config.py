"""Typed dataclass configs: load from YAML, JSON or a dict, override from the command line, dump.

A config is a tree of dataclasses whose fields are annotated with ``int``, ``float``, ``str``,
``bool``, ``Optional[...]`` (or ``X | None``), ``Literal[...]``, ``list[...]``, ``tuple[...]``,
``dict[str, ...]`` of those, or another dataclass (a nested section). Loading checks every value:

- an unknown key is an error naming the key and the accepted keys (with a "did you mean");
- a value of the wrong type is an error naming the field, the expected type and the value;
  an int is accepted for a float field (and becomes a float); a bool is never an int;
- a missing key takes the field's default; a field without a default must be given.

Errors are :class:`ConfigError` (a ``UserError``, hence a ``ValueError``), with a one-line message, so the CLI prints
them as user errors.

Command-line overrides are ``key.sub=value`` strings (``stages.1.epochs=3`` indexes a list); the value is parsed as YAML, so ``lr=3e-4``
is a float, ``sizes=[112,224]`` a list, ``name=null`` (or ``name=``) is None, ``note='42'`` a string.
YAML here follows YAML 1.2 for numbers and booleans: ``1e-3`` is a float (PyYAML's YAML 1.1 would
read a string) and only ``true``/``false`` are booleans (``on``, ``no``, ``yes`` stay strings).
Duplicate keys in a file are an error, not a silent last-one-wins.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Optim:
    ...     lr: float = 0.003
    ...     momentum: float = 0.9
    >>> @dataclass
    ... class Run:
    ...     name: str = "quick"
    ...     sizes: tuple[int, ...] = (112, 224)
    ...     optim: Optim = field(default_factory=Optim)
    >>> cfg = load_config(Run, {"sizes": [112, 224, 448]}, overrides=["optim.lr=1e-4"])
    >>> cfg.sizes, cfg.optim.lr
    ((112, 224, 448), 0.0001)
    >>> load_config(Run, {"optim": {"rate": 1}})
    Traceback (most recent call last):
    ...
    retina_scale.utils.typed_config.ConfigError: unknown config key 'optim.rate' (accepted keys: lr, momentum)
"""

import dataclasses
import difflib
import json
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import atomic_path

__all__ = [
    "ConfigError",
    "apply_overrides",
    "dump_config",
    "from_dict",
    "load_config",
    "load_mapping",
    "parse_override",
    "to_dict",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(UserError):
    """A config that cannot be loaded: unknown key, wrong type, unreadable file, bad override."""


# ------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers and booleans, and errors on duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Booleans: YAML 1.2 (true/false only), not YAML 1.1's yes/no/on/off/y/n.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# Floats with an exponent but no dot (1e-3, 2E5), which YAML 1.1 reads as strings.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


MAX_CONFIG_BYTES = 1 << 20
"""The largest config file or override read (1 MiB; a run's config is a few kB)."""
MAX_YAML_NODES = 100_000
"""The most values a YAML document may hold once its aliases (``*name``) are expanded: a "billion laughs"
document of a few hundred bytes expands to 10**9 values, which any later walk over it (an error message's
``repr`` included) would build."""


def _expanded_size(node: yaml.Node, sizes: dict) -> int:
    """The number of values ``node`` holds with every alias expanded (``sizes`` memoises shared nodes, so a
    document that expands to 10**9 values is measured in as many steps as it has nodes)."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise ConfigError("an alias refers to a value that contains it (a recursive YAML structure)")
        return sizes[key]
    sizes[key] = None  # in progress
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[key] = min(size, MAX_YAML_NODES + 1)
    return sizes[key]


def _parse_yaml(text: str, where: str) -> Any:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters; a config holds at most {MAX_CONFIG_BYTES}")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded; a "
                              "config is not that large (a 'billion laughs' document?)")
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())[:500]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deeply") from None
    finally:
        loader.dispose()


def load_mapping(path: str | os.PathLike) -> dict:
    """Reads a ``.yaml``/``.yml`` or ``.json`` file whose top level is a mapping (empty -> ``{}``).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: another suffix, a parse error, a duplicate key, or a top level that is not a
            mapping.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config file holds at most {MAX_CONFIG_BYTES}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            for key in keys:
                if keys.count(key) > 1:
                    raise ConfigError(f"{path}: duplicate key {key!r}")
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: values nested too deeply") from None
    else:
        data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------ conversion


def _type_name(tp: Any) -> str:
    """A readable name for an annotation: ``int``, ``list of float``, ``int or None``..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"mapping of {_type_name(args[1]) if args else 'values'}"
    if dataclasses.is_dataclass(tp):
        return f"mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def _describe(value: Any) -> str:
    """The type and the start of a value, for an error message: bounded, whatever the value's size (a
    plain ``repr`` of a value with shared parts, such as YAML aliases make, can be exponentially long).

    >>> laughs = ["lol"] * 9
    >>> for _ in range(8):
    ...     laughs = [laughs] * 9  # 9**9 "lol"s, shared: repr() would be 2.7 GB
    >>> _describe(laughs)
    'list [[[[...], [...], [...], [...], ...], [[...], [...], [...]...'
    """
    text = _SHORT.repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against annotation ``tp`` and returns it converted; ``key`` is for errors."""

    def wrong() -> ConfigError:
        error = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
        error.key = key
        return error

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, _prefix=key)
        raise wrong()
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                if getattr(exc, "key", None) != key:
                    raise  # the error is deeper inside (e.g. a key of an Optional section)
        raise wrong()
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        raise wrong()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong()
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise wrong()
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{key}.{k}"): _convert(v, value_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r} (see retina_scale.utils.typed_config)")


def from_dict(cls: type[T], data: Mapping[str, Any], *, _prefix: str = "") -> T:
    """Builds dataclass ``cls`` from a (nested) mapping, checking keys and types.

    Args:
        cls: a dataclass type.
        data: mapping of field names to values; nested dataclass fields take mappings.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, a missing required key.
    """
    where = f"config section '{_prefix}'" if _prefix else "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:  # string annotations naming a class the module cannot see
        raise TypeError(
            f"cannot resolve the annotations of config class {cls.__name__}: {exc} (define config "
            f"dataclasses at module level)"
        ) from None
    for key in data:
        if key not in fields:
            full = f"{_prefix}.{key}" if _prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}' (accepted keys: {', '.join(fields)}){hint}"
            )
    values = {}
    for name, f in fields.items():
        full = f"{_prefix}.{name}" if _prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{full}' ({_type_name(hints[name])}, required)")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ check of the concrete config
        text = str(exc)
        if _prefix and text.partition(" ")[0] in fields:  # "r must be ..." -> "resample.r must be ..."
            raise ConfigError(f"{_prefix}.{text}") from None
        raise ConfigError(f"{where}: {text}") from None


def to_dict(config: Any) -> Any:
    """The plain-data form of a config: dicts, lists (tuples become lists) and scalars.

    ``from_dict(type(c), to_dict(c)) == c`` for every config ``c``.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    return config


# ------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``"optim.lr=3e-4"`` into ``(["optim", "lr"], 0.0003)``; the value is parsed as YAML.

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} must look like key=value or section.key=value")
    return [p.strip() for p in parts], _parse_yaml(raw, f"override {text!r}")


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """Returns a copy of ``config`` with ``key.sub=value`` overrides applied, in order, and checked.

    A section that is ``None`` (an ``Optional`` nested dataclass) is created with its defaults when
    one of its keys is overridden. Unknown keys and wrong types raise :class:`ConfigError`.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class C:
        ...     epochs: int = 10
        >>> apply_overrides(C(), ["epochs=3"])
        C(epochs=3)
    """
    overrides = list(overrides)
    if not overrides:
        return config
    data = to_dict(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):  # an index into a list of sections: stages.1.epochs=3
                node = _list_item(node, key, text, keys[:depth])
                continue
            child = node.get(key)
            if child is None:  # a section that is None or absent: start from its defaults
                child = node[key] = {}
            if not isinstance(child, (dict, list)):
                section = ".".join(keys[: depth + 1])
                raise ConfigError(
                    f"override {text!r}: '{section}' is a {type(child).__name__} value, not a section"
                )
            node = child
        if isinstance(node, list):
            node[_list_index(node, keys[-1], text, keys[:-1])] = value
        else:
            node[keys[-1]] = value
    return from_dict(type(config), data)


def _list_index(items: list, key: str, text: str, path: list[str]) -> int:
    where = ".".join(path)
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(
            f"override {text!r}: '{where}' is a list of {len(items)} item(s); "
            f"index it with 0..{len(items) - 1}, got {key!r}"
        )
    return int(key)


def _list_item(items: list, key: str, text: str, path: list[str]):
    item = items[_list_index(items, key, text, path)]
    if not isinstance(item, dict):
        raise ConfigError(f"override {text!r}: '{'.'.join(path)}.{key}' is not a section")
    return item


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | Any | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Loads a config of type ``cls``, then applies command-line overrides.

    Args:
        cls: the dataclass type of the config.
        source: a ``.yaml``/``.yml``/``.json`` path, a mapping, an instance of ``cls`` (e.g. a
            preset), or ``None`` for the defaults of ``cls``.
        overrides: ``key.sub=value`` strings, applied in order after ``source``.

    Raises:
        ConfigError, FileNotFoundError: see :func:`load_mapping`, :func:`from_dict`,
            :func:`apply_overrides`.
    """
    if source is None:
        config = from_dict(cls, {})
    elif isinstance(source, cls):
        config = source
    elif isinstance(source, Mapping):
        config = from_dict(cls, source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            config = from_dict(cls, load_mapping(path))
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if str(path) in message else f"{path}: {message}") from None
    else:
        raise ConfigError(
            f"config source must be a file path, a mapping or a {cls.__name__}, got {_describe(source)}"
        )
    return apply_overrides(config, overrides)


# ------------------------------------------------------------------------------------------ dump


def to_yaml(config: Any) -> str:
    """The config as YAML text, fields in declaration order; :func:`load_config` reads it back."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def dump_config(config: Any, path: str | os.PathLike) -> Path:
    """Writes the config to ``path`` (YAML, or JSON for ``.json``) atomically; returns the path.

    The text goes to a temporary file in the same folder, which is then renamed over ``path``, so
    a reader never sees a half-written config.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    if suffix == ".json":
        text = json.dumps(to_dict(config), indent=2, allow_nan=False) + "\n"
    else:
        text = to_yaml(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path
