"""The one config validator: config trees made of dataclasses, loaded from YAML-like mappings.

Every config of the project is validated here (``TrainConfig`` and the sections it nests,
``ModelSpec``, ``TTTConfig``, ``ServeConfig``, ``ScoringConfig``), and every message has one
form: ``key: expected WHAT, got TYPE VALUE`` (or ``unknown key 'k': did you mean 'key'?``).

- ``build(cls, data)``: keys are checked recursively; an unknown or misspelt key is a
  ``ValueError`` naming the full dotted key (``data.state_cary``) and the closest valid key,
  searched in the same section, then as a leaf name anywhere in the tree, then in ``aliases``
  (names used by other tools, e.g. moshi-finetune's ``num_microbatches``).
- ``validate(obj)``: the field types (from the annotations: ``int``, ``float``, ``bool``, ``str``,
  ``Literal``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict``, nested dataclasses) and the
  bounds declared with ``option(..., ge=0)`` are checked, values are normalised in place (an int
  for a float field becomes a float, a list for a tuple field a tuple; frozen dataclasses too),
  then each dataclass's ``rules()`` (the checks between keys or beyond a type) runs, its
  messages (keys relative to that dataclass) prefixed with the dotted key of the section.
- ``apply_overrides(mapping, ["optim.weight_decay=0.0"])``: ``--set`` style edits, values parsed
  with ``yaml.safe_load``.
- ``to_dict(obj)``: plain YAML/JSON-safe types.

Why not a library (pydantic v2): written both ways for the ``optim`` section, the library
version needs more lines per section plus a translator of its error types to keep these
messages (docs/architecture.md, "One config validator").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

_BOUNDS = ("ge", "gt", "le", "lt")
_YAML_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
) -> Any:
    """A dataclass field with bounds checked by ``validate`` (``nonempty`` for str/list)."""
    meta = {k: v for k, v in zip(_BOUNDS, (ge, gt, le, lt), strict=True) if v is not None}
    if nonempty:
        meta["nonempty"] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# -- keys -----------------------------------------------------------------------------------
def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type in ``hint`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of the config tree rooted at dataclass ``cls``."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        sub = _dataclass_in(hints.get(f.name))
        if sub is not None:
            out += dotted_keys(sub, key + ".")
    return out


def suggest(key: str, root: type, aliases: Mapping[str, str] | None = None) -> str | None:
    """The valid key closest to the unknown dotted ``key`` of the tree rooted at ``root``."""
    valid = dotted_keys(root)
    section, _, leaf = key.rpartition(".")
    if aliases:
        for name in (key, leaf):
            if name in aliases:
                return aliases[name]
    same_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    siblings = [k for k in valid if k.rpartition(".")[0] == section]
    for pool in (siblings, valid):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def build(
    cls: type,
    data: Any,
    *,
    prefix: str = "",
    root: type | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursively; unknown keys are errors.

    Types and bounds are not checked here (``validate`` does it, normally from the root's
    ``__post_init__``) but a dataclass's own constructor checks (``TTTConfig``) are, with their
    messages renamed to the dotted key (``TTTConfig.kind`` -> ``ttt.kind``).
    """
    root = root or cls
    where = prefix[:-1] if prefix else cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of keys, got {_show(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = suggest(str(dotted), root, aliases)
            tail = f"did you mean {hint!r}?" if hint else f"valid keys here: {sorted(names)}"
            raise ValueError(f"unknown key {dotted!r}: {tail}")
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, Mapping):
            value = build(sub, value, prefix=dotted + ".", root=root, aliases=aliases)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(_rename(str(e), cls, prefix)) from None


def _rename(message: str, cls: type, prefix: str) -> str:
    """``"TTTConfig.kind: ..."`` -> ``"ttt.kind: ..."`` for a nested dataclass at ``prefix``."""
    if not prefix:
        return message
    return message.replace(f"{cls.__name__}.", prefix)


# -- types and bounds -----------------------------------------------------------------------
def validate(obj: Any, prefix: str = "") -> None:
    """Check (and normalise in place) every field of dataclass ``obj`` and of those it nests,
    then run ``obj.rules()`` if it has one. ``prefix``: the dotted key of ``obj`` (``"ttt."``),
    or the class name (``"TTTConfig."``) for a config validated on its own."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = _coerce(getattr(obj, f.name), hints[f.name], key)
        _check_bounds(value, f.metadata, key)
        object.__setattr__(obj, f.name, value)  # frozen dataclasses are normalised too
    rules = getattr(obj, "rules", None)
    if callable(rules):
        try:
            rules()
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (and a nested section's)
            return _coerce(value, options[0], key)
        for option_hint in options:
            try:
                return _coerce(value, option_hint, key)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {describe(hint)}, got {_show(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{key}: expected one of {list(args)}, got {_show(value)}")
    sub = _dataclass_in(hint)
    if sub is not None:
        if isinstance(value, Mapping):
            value = build(sub, value, prefix=key + ".")
        if not isinstance(value, sub):
            raise ValueError(f"{key}: expected a mapping ({sub.__name__}), got {_show(value)}")
        validate(value, key + ".")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = _to_float(value)
        if number is not None:
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # a single path where a list of paths is expected
        if isinstance(value, (list, tuple)):
            return [
                _coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)
            ]
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis:
                items: list[Any] | None = [args[0]] * len(value)
            else:
                items = list(args) if len(args) == len(value) else None
            if items is not None:
                return tuple(
                    _coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, items))
                )
    elif origin is dict or hint is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    else:
        return value  # a type this schema does not know: left to the owner's own checks
    raise ValueError(f"{key}: expected {describe(hint)}, got {_show(value)}")


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and _YAML_EXPONENT.match(value.strip()):
        number = float(value.strip())  # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string
    else:
        return None
    return number if math.isfinite(number) else None


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or not meta:
        return
    if meta.get("nonempty") and isinstance(value, (str, list, tuple)) and len(value) == 0:
        raise ValueError(f"{key}: expected a non-empty value, got {_show(value)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (
        ("ge", ">=", value >= meta.get("ge", 0)),
        ("gt", ">", value > meta.get("gt", 0)),
        ("le", "<=", value <= meta.get("le", 0)),
        ("lt", "<", value < meta.get("lt", 0)),
    )
    if any(name in meta and not ok for name, _, ok in checks):
        wanted = " and ".join(f"{sym} {meta[name]}" for name, sym, _ in checks if name in meta)
        raise ValueError(f"{key}: expected a value {wanted}, got {_show(value)}")


def describe(hint: Any) -> str:
    """Human wording of a type hint, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        if not args:
            return "a list"
        return "a list of " + describe(args[0]).removeprefix("an ").removeprefix("a ") + "s"
    if origin is tuple:
        return f"a list of {len(args)} values" if args and args[-1] is not Ellipsis else "a list"
    if origin is dict or hint is dict:
        return "a mapping with string keys"
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number"}
    return names.get(hint, "a string" if hint is str else getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(value).__name__} {text}"


# -- (de)serialisation ----------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """Plain types only (YAML/JSON safe): nested dataclasses become dicts, tuples lists.

    A nested dataclass with its own ``to_dict()`` (``TTTConfig``) is written by it.
    """
    return _plain(obj, nested=False)


def _plain(obj: Any, nested: bool) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        own = getattr(obj, "to_dict", None)
        if nested and callable(own):
            return own()
        return {f.name: _plain(getattr(obj, f.name), True) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, True) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, True) for k, v in obj.items()}
    return obj


def apply_overrides(data: Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``key.sub=value`` overrides applied (values via yaml.safe_load).

    ``a.b=`` sets null; missing intermediate sections are created. The keys are not checked
    here: ``build`` does it (so a misspelt override gets the same closest-key message).
    """
    out = _deep_copy(dict(data or {}))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r}: expected key=value (e.g. optim.weight_decay=0)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(f"override {item!r}: {where!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    return data
