"""Typed control-plane messages: `@message` dataclasses <-> msgpack bytes (never pickle).

Every type that crosses the wire is a registered dataclass or Enum, named by its class name.
Each becomes a msgpack array whose first item is a tag (an ext value, which plain data never
contains), so the whole message packs in one pass with no nested buffers:
  dataclass -> [ext 1 "ClassName", field values in declaration order (init fields only)]
  Enum      -> [ext 2 "ClassName", member value]
  tuple     -> [ext 3 "", items...]   (msgpack alone would turn tuples into lists)
Lists, dicts (int or str keys), None, bool, int, float, str and bytes are plain msgpack.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar, overload

import msgpack

T = TypeVar("T")

_EXT_MESSAGE = 1
_EXT_ENUM = 2
_EXT_TUPLE = 3

_TYPES: dict[str, type] = {}  # class name -> registered dataclass or Enum
_FIELDS: dict[type, tuple[str, ...]] = {}  # registered dataclass -> its wire fields
_TAGS: dict[type, msgpack.ExtType] = {}  # registered type -> the tag that leads its array
_TUPLE_TAG = msgpack.ExtType(_EXT_TUPLE, b"")


class _Tag:
    """A decoded tag: tells _list_hook what to build from the rest of the array."""

    __slots__ = ("name", "cls")

    def __init__(self, name: str, cls: type | None) -> None:
        self.name = name
        self.cls = cls


_TUPLE = _Tag("tuple", tuple)
_DECODE_TAGS: dict[tuple[int, bytes], _Tag] = {(_EXT_TUPLE, b""): _TUPLE}


class CodecError(ValueError):
    """A value cannot be encoded, or bytes cannot be decoded into a registered message."""


def message(cls: type[T]) -> type[T]:
    """Register a dataclass (put @message above @dataclass) or an Enum for the wire."""
    is_enum = isinstance(cls, type) and issubclass(cls, enum.Enum)
    if not is_enum and not dataclasses.is_dataclass(cls):
        raise TypeError(f"@message needs a dataclass or Enum, got {cls!r}; put it above @dataclass")
    name = cls.__name__
    existing = _TYPES.get(name)
    if existing is not None and _origin(existing) != _origin(cls):
        raise CodecError(
            f"message name {name!r} is taken by {_origin(existing)}; "
            f"rename {_origin(cls)} (tags are class names)"
        )
    _TYPES[name] = cls
    tag = _TAGS[cls] = msgpack.ExtType(_EXT_ENUM if is_enum else _EXT_MESSAGE, name.encode())
    _DECODE_TAGS[(tag.code, tag.data)] = _Tag(name, cls)
    if not is_enum:
        # init=False fields are derived in __post_init__, so they are not sent.
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    return cls


def _origin(cls: type) -> str:
    # Same module + qualname means the same class re-imported (e.g. reload), not a clash.
    return f"{cls.__module__}.{cls.__qualname__}"


def encode(msg: object) -> bytes:
    """Bytes for a registered message dataclass instance."""
    if type(msg) not in _FIELDS:
        raise CodecError(f"encode() takes a @message dataclass instance, got {type(msg).__name__}")
    try:
        return _pack(msg)
    except (TypeError, ValueError, OverflowError) as e:  # CodecError is a ValueError
        raise CodecError(f"cannot encode {type(msg).__name__}: {e}") from e


@overload
def decode(data: bytes) -> object: ...
@overload
def decode(data: bytes, expect: type[T]) -> T: ...
def decode(data: bytes, expect: type[Any] | None = None) -> Any:
    """The message encoded in `data`; with `expect`, also check its type."""
    try:
        msg = _unpack(data)
    except CodecError:
        raise
    except Exception as e:  # msgpack and message constructors raise many kinds; report one
        raise CodecError(f"malformed message ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if type(msg) not in _FIELDS:
        raise CodecError(f"decoded a {type(msg).__name__}, not a @message dataclass")
    if expect is not None and not isinstance(msg, expect):
        raise CodecError(f"expected a {expect.__name__} message, got {type(msg).__name__}")
    return msg


def _pack(obj: object) -> bytes:
    # strict_types sends tuples, IntEnum and other subclasses to _default instead of
    # silently flattening them into lists and ints.
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data, ext_hook=_ext_hook, list_hook=_list_hook, raw=False, strict_map_key=False
    )


def _default(obj: Any) -> list[Any]:
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is not None:
        return [_TAGS[cls], *[getattr(obj, n) for n in names]]
    if cls is tuple:
        return [_TUPLE_TAG, *obj]
    if isinstance(obj, enum.Enum):
        if _TYPES.get(cls.__name__) is not cls:
            raise CodecError(
                f"enum {cls.__qualname__} is not registered; decorate it with @message"
            )
        return [_TAGS[cls], obj.value]
    if dataclasses.is_dataclass(obj):
        raise CodecError(f"dataclass {cls.__qualname__} is not registered; add @message")
    raise CodecError(
        f"no wire form for {cls.__qualname__} {obj!r:.40}; use dataclasses, enums, lists, "
        "tuples, dicts, None, bool, int (64-bit), float, str or bytes"
    )


def _ext_hook(code: int, data: bytes) -> _Tag:
    tag = _DECODE_TAGS.get((code, data))
    if tag is not None:
        return tag
    if code not in (_EXT_MESSAGE, _EXT_ENUM):
        raise CodecError(f"unknown msgpack ext code {code}")
    kind = "message type" if code == _EXT_MESSAGE else "enum"
    name = data.decode(errors="replace")
    raise CodecError(f"unknown {kind} {name!r}; import the module that defines it")


def _list_hook(items: list[Any]) -> Any:
    if not items or type(items[0]) is not _Tag:
        return items
    tag: _Tag = items[0]
    if tag is _TUPLE:
        return tuple(items[1:])
    names = _FIELDS.get(tag.cls)  # type: ignore[arg-type]
    if names is None:  # an Enum
        return tag.cls(items[1])  # type: ignore[misc]
    if len(items) - 1 != len(names):
        raise CodecError(
            f"{tag.name} has fields ({', '.join(names)}) but {len(items) - 1} values arrived; "
            "sender and receiver run different versions"
        )
    return tag.cls(**dict(zip(names, items[1:], strict=True)))  # type: ignore[misc]
