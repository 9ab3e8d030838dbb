"""The schema's type system: declared types, and one validator for both input forms.

A struct is a frozen, keyword-only dataclass made by ``@struct``; each field
is a member, declared with ``member(doc=..., default=...)``.  The field's
annotation is its type:

=====================================  ==========================================
annotation                             QAPI type
=====================================  ==========================================
``str``, ``bool``, ``int``             str, bool, int (int64)
``Annotated[int, Range(lo, hi)]``      an int between lo and hi (``UInt64``)
``Size``                               size (keyval: ``4k``, ``1.5M``; JSON: an integer)
``Annotated[str, Check(...)]``         a str that must pass a test (identifiers)
an ``enum.StrEnum``                    an enum (its values are the names)
another ``@struct`` class              a nested object
``Annotated[Base, union]``             a nested flat union (``union``: a ``FlatUnion``
                                       whose base is ``Base``)
``tuple[T, ...]``                      a list of T
``Any``                                any JSON value
``T | None = member(default=None)``    an optional member without a default
=====================================  ==========================================

A member's name on the wire is its field's name with ``-`` for ``_``
(``node_name`` is ``node-name``).  A member without a default is required.
``FlatUnion`` is QAPI's flat union: a base struct whose enum member (the
discriminator) picks a branch, a subclass of the base adding its members.

``parse(type, value, keyval=...)`` checks a value and returns it typed, with
defaults filled in, or raises ``SchemaError``:

* JSON input (QMP arguments, the CLI's ``{...}`` form, messages): every value
  must have the declared JSON type (``true``, not ``"on"``);
* keyval input (the CLI's ``a=1,b.c=on`` form): every scalar is a string,
  converted per the declared type as QEMU's keyval visitor does (integers in
  C syntax, booleans ``on``/``off`` and the other spellings QEMU takes, sizes
  with suffixes).

Unknown members are reported first (a typo names itself rather than passing
as a missing member), then members in their declared order.
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar, dataclass_transform, overload

from .._errors import EvloopError

__all__ = [
    "INT64_MAX",
    "UINT64_MAX",
    "Check",
    "FlatUnion",
    "Member",
    "Range",
    "SchemaError",
    "Size",
    "UInt32",
    "UInt64",
    "dump",
    "flatten",
    "id_wellformed",
    "member",
    "members",
    "parse",
    "parse_bool",
    "parse_member",
    "parse_size",
    "struct",
    "type_name",
    "unflatten",
]

T = TypeVar("T")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1


class SchemaError(EvloopError, ValueError):
    """A value a declared type refuses: QEMU's error class and text.

    :ivar desc: the text (QEMU's words: "Parameter 'x' is missing", ...)
    :ivar error_class: QMP's error class (``GenericError`` for all of these)
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _missing(path: str) -> SchemaError:
    return SchemaError(f"Parameter '{path}' is missing")


def _unexpected(path: str) -> SchemaError:
    return SchemaError(f"Parameter '{path}' is unexpected")


def _wrong_type(path: str, expected: str) -> SchemaError:
    return SchemaError(f"Invalid parameter type for '{path}', expected: {expected}")


def _wrong_value(path: str, expected: str) -> SchemaError:
    return SchemaError(f"Parameter '{path}' expects {expected}")


# -- declarations ------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The bounds of an integer member, both included."""

    min: int
    max: int


@dataclass(frozen=True)
class Check:
    """A rule for a string member beyond its type: ``test(value)`` must
    hold, else ``message`` (with ``{name}`` and ``{value}`` filled in)."""

    test: Callable[[str], bool]
    message: str


class _SizeMarker:
    """Marks ``Size``: QAPI's size type."""


Size = Annotated[int, _SizeMarker()]
UInt64 = Annotated[int, Range(0, UINT64_MAX)]
UInt32 = Annotated[int, Range(0, UINT32_MAX)]


def id_wellformed(name: str) -> bool:
    """QEMU's rule for ids and node names: a letter, then letters, digits, '-', '.', '_'."""
    return bool(name) and name[0].isascii() and name[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in name)


def member(*, doc: str, default: Any = MISSING, default_factory: Any = MISSING, name: str | None = None) -> Any:
    """Declare a member of a ``@struct``: its documentation, its default (none:
    required), and its wire name if it is not the field's with ``-`` for ``_``."""
    return field(default=default, default_factory=default_factory, metadata={"doc": doc, "name": name})


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(member,))
def struct(cls: type[T]) -> type[T]:
    """Declare a struct type: a frozen, keyword-only dataclass of members."""
    return dataclass(frozen=True, kw_only=True)(cls)


class FlatUnion(Generic[T]):
    """QAPI's flat union: the enum member ``discriminator`` of ``base`` picks a
    branch, a subclass of ``base`` (a value without a branch is the base alone)."""

    def __init__(self, name: str, base: type[T], discriminator: str, branches: Mapping[str, type[T]],
                 doc: str) -> None:
        for branch in branches.values():
            if not issubclass(branch, base):
                raise TypeError(f"{name}: branch {branch.__name__} does not extend {base.__name__}")
        self.name = name
        self.base = base
        self.discriminator = discriminator
        self.branches = dict(branches)
        self.doc = doc

    def __repr__(self) -> str:
        return f"FlatUnion({self.name})"


# -- the types ------------------------------------------------------------------


class _Type:
    """One declared type: how input becomes a typed value, and back."""

    name = "any"

    def visit(self, value: object, path: str, keyval: bool) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value


class _Any(_Type):
    def visit(self, value: object, path: str, keyval: bool) -> Any:
        return value


class _Scalar(_Type):
    """A scalar: in keyval input a string to convert; in JSON input a value of one JSON type."""

    json_type = ""
    py_type: type = object

    def visit(self, value: object, path: str, keyval: bool) -> Any:
        if keyval:
            if isinstance(value, dict):
                raise SchemaError(f"Parameters '{path}.*' are unexpected")
            if isinstance(value, str):
                return self.check(self.from_text(value, path), path)
        if type(value) is not self.py_type:
            raise _wrong_type(path, self.json_type)
        return self.check(value, path)

    def from_text(self, text: str, path: str) -> Any:
        return text

    def check(self, value: Any, path: str) -> Any:
        return value


class _Str(_Scalar):
    name, json_type, py_type = "str", "string", str

    def __init__(self, rule: Check | None = None) -> None:
        self.rule = rule

    def check(self, value: Any, path: str) -> Any:
        if self.rule is not None and not self.rule.test(value):
            raise SchemaError(self.rule.message.format(name=path, value=value))
        return value


_TRUE_TEXTS = ("on", "yes", "true", "y")
_FALSE_TEXTS = ("off", "no", "false", "n")


def parse_bool(text: str) -> bool | None:
    """A boolean as QEMU's keyval and QemuOpts read one (``qapi_bool_parse``):
    ``on``, ``yes``, ``true``, ``y`` or ``off``, ``no``, ``false``, ``n``
    (lower case); None for anything else."""
    if text in _TRUE_TEXTS:
        return True
    if text in _FALSE_TEXTS:
        return False
    return None


class _Bool(_Scalar):
    name, json_type, py_type = "bool", "boolean", bool

    def from_text(self, text: str, path: str) -> Any:
        value = parse_bool(text)
        if value is None:
            raise _wrong_value(path, "'on' or 'off'")  # QEMU names the preferred spelling only
        return value


_C_INTEGER = re.compile(r"\s*([-+]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _c_integer(text: str) -> int | None:
    """A whole string in C's syntax for integers (``strtoll`` with base 0):
    decimal, ``0x`` hexadecimal or ``0`` octal, with an optional sign."""
    m = _C_INTEGER.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        number = int(digits[2:], 16)
    else:
        number = int(digits, 8) if digits.startswith("0") else int(digits)
    return -number if sign == "-" else number


class _Int(_Scalar):
    name, json_type, py_type = "int", "integer", int

    def __init__(self, bounds: Range = Range(INT64_MIN, INT64_MAX)) -> None:
        self.bounds = bounds
        if bounds.min >= 0 and bounds.max > INT64_MAX:
            self.name = "uint64"

    def from_text(self, text: str, path: str) -> Any:
        number = _c_integer(text)
        if number is None or not INT64_MIN <= number <= UINT64_MAX:
            raise _wrong_value(path, "integer")
        return number

    def check(self, value: Any, path: str) -> Any:
        if not self.bounds.min <= value <= self.bounds.max:
            raise SchemaError(f"{path} value must be in range [{self.bounds.min}, {self.bounds.max}]")
        return value


_SIZE_TEXT = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+)|([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBkKmMgGtTpPeE]?))")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int | None:
    """A size as QEMU writes them (``4096``, ``0x1000``, ``4k``, ``1.5M``: powers
    of 1024, no fraction of a byte), or None if ``text`` is not one or exceeds 2**64 - 1."""
    m = _SIZE_TEXT.fullmatch(text)
    if m is None:
        return None
    hex_digits, number, unit = m.groups()
    if hex_digits is not None:
        size = int(hex_digits, 16)
    else:
        multiplier = _SIZE_UNITS[unit.lower()]
        if "." in number and multiplier == 1:
            return None
        size = int(Decimal(number) * multiplier)
    return size if size <= UINT64_MAX else None


class _Size(_Int):
    name = "size"

    def __init__(self) -> None:
        super().__init__(Range(0, INT64_MAX))

    def from_text(self, text: str, path: str) -> Any:
        size = parse_size(text)
        if size is None:
            raise _wrong_value(path, "size")
        return size


class _Enum(_Scalar):
    json_type, py_type = "string", str

    def __init__(self, cls: type[enum.StrEnum]) -> None:
        self.cls = cls
        self.name = cls.__name__

    def check(self, value: Any, path: str) -> Any:
        try:
            return self.cls(value)
        except ValueError:
            raise SchemaError(f"Parameter '{path}' does not accept value '{value}'") from None

    def dump(self, value: Any) -> Any:
        return str(value)


class _List(_Type):
    """A list: a JSON array; in keyval input, members ``0``, ``1``, ... (``a.0=x,a.1=y``)."""

    def __init__(self, item: _Type) -> None:
        self.item = item
        self.name = f"[{item.name}]"

    def visit(self, value: object, path: str, keyval: bool) -> Any:
        if keyval and isinstance(value, dict) and list(value) == [str(i) for i in range(len(value))]:
            return tuple(self.item.visit(v, f"{path}.{i}", keyval) for i, v in enumerate(value.values()))
        if not isinstance(value, list):
            raise _wrong_type(path, "array")
        return tuple(self.item.visit(v, f"{path}[{i}]", keyval) for i, v in enumerate(value))

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


@dataclass(frozen=True)
class Member:
    """A struct's member: wire name, field name, type, default, documentation."""

    name: str
    attr: str
    type: _Type
    required: bool
    default: Callable[[], Any]
    optional: bool  # absent is None: not written out
    doc: str


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Struct(_Type):
    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__
        self._members: list[Member] | None = None

    @property
    def members(self) -> list[Member]:
        if self._members is None:  # resolved at first use: annotations may name later declarations
            hints = typing.get_type_hints(self.cls, include_extras=True)
            found = []
            for f in fields(self.cls):
                tp, optional = hints[f.name], False
                if typing.get_origin(tp) in (typing.Union, _UnionType) and type(None) in typing.get_args(tp):
                    tp = next(a for a in typing.get_args(tp) if a is not type(None))
                    optional = True
                if f.default is not MISSING:
                    default: Callable[[], Any] = lambda d=f.default: d  # type: ignore[misc]
                elif f.default_factory is not MISSING:
                    default = f.default_factory
                else:
                    default = _no_default
                found.append(Member(f.metadata.get("name") or f.name.replace("_", "-"), f.name, _type_of(tp),
                                    default is _no_default, default, optional, f.metadata.get("doc", "")))
            self._members = found
        return self._members

    def visit(self, value: object, path: str, keyval: bool) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path or "<anonymous>", "object")
        members = self.members
        known = {m.name for m in members}
        for key in value:
            if key not in known:
                raise _unexpected(_join(path, key))
        kwargs = {}
        for m in members:
            if m.name in value:
                kwargs[m.attr] = m.type.visit(value[m.name], _join(path, m.name), keyval)
            elif m.required:
                raise _missing(_join(path, m.name))
            else:
                kwargs[m.attr] = m.default()
        return self.cls(**kwargs)

    def dump(self, value: Any) -> Any:
        out = {}
        for m in _struct(type(value)).members:
            v = getattr(value, m.attr)
            if not (m.optional and v is None):
                out[m.name] = m.type.dump(v)
        return out


class _Union(_Type):
    def __init__(self, union: FlatUnion[Any]) -> None:
        self.union = union
        self.name = union.name
        base = _struct(union.base)
        self.tag = next(m for m in base.members if m.name == union.discriminator)

    def visit(self, value: object, path: str, keyval: bool) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path or "<anonymous>", "object")
        name = self.union.discriminator
        if name not in value:
            raise _missing(_join(path, name))
        tag = self.tag.type.visit(value[name], _join(path, name), keyval)
        return _struct(self.union.branches.get(tag, self.union.base)).visit(value, path, keyval)

    def dump(self, value: Any) -> Any:
        return _struct(type(value)).dump(value)


def _no_default() -> Any:
    raise AssertionError("a required member has no default")


_UnionType = type(int | None)
_STRUCTS: dict[type, _Struct] = {}


def _struct(cls: type) -> _Struct:
    found = _STRUCTS.get(cls)
    if found is None:
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a @struct")
        found = _STRUCTS[cls] = _Struct(cls)
    return found


def _type_of(tp: Any) -> _Type:
    """The type an annotation (or a ``FlatUnion``) declares."""
    if isinstance(tp, FlatUnion):
        return _Union(tp)
    if tp is Any:
        return _Any()
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        for extra in extras:
            if isinstance(extra, FlatUnion):
                return _Union(extra)
            if isinstance(extra, _SizeMarker):
                return _Size()
            if isinstance(extra, Range):
                return _Int(extra)
            if isinstance(extra, Check):
                return _Str(extra)
        return _type_of(inner)
    if origin is tuple:
        return _List(_type_of(typing.get_args(tp)[0]))
    if tp is str:
        return _Str()
    if tp is bool:
        return _Bool()
    if tp is int:
        return _Int()
    if isinstance(tp, type) and issubclass(tp, enum.StrEnum):
        return _Enum(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return _struct(tp)
    raise TypeError(f"no schema type for {tp!r}")


# -- the API ----------------------------------------------------------------------


@overload
def parse(tp: type[T], value: object, *, keyval: bool = False) -> T: ...
@overload
def parse(tp: FlatUnion[T], value: object, *, keyval: bool = False) -> T: ...


def parse(tp: Any, value: object, *, keyval: bool = False) -> Any:
    """``value`` checked against a struct or union, typed, defaults filled in;
    ``keyval``: its scalars are strings to convert (QEMU's keyval visitor).
    Raises ``SchemaError``.  Pure: any thread."""
    return _type_of(tp).visit(value, "", keyval)


def parse_member(cls: type, name: str, value: object, *, keyval: bool = False) -> Any:
    """One member of struct ``cls`` (by wire name) checked and typed, named by
    its name alone (as a QOM property is).  ``KeyError`` if there is no such member."""
    m = {m.name: m for m in _struct(cls).members}[name]
    return m.type.visit(value, name, keyval)


def dump(value: Any, tp: Any = None) -> Any:
    """A typed value back in JSON form (optional members that are absent left
    out).  ``tp``: its declared type (an annotation) when it is not a struct."""
    return (_type_of(tp) if tp is not None else _struct(type(value))).dump(value)


def members(tp: type | FlatUnion[Any]) -> list[Member]:
    """The members of a struct, or of a union's base."""
    return list(_struct(tp.base if isinstance(tp, FlatUnion) else tp).members)


def type_name(tp: Any) -> str:
    """QAPI's name for a declared type (``str``, ``size``, ``[uint64]``, ``BlockdevOptions``, ...)."""
    return _type_of(tp).name


Scalar = str | int | bool


def flatten(value: Mapping[str, Any]) -> dict[str, Scalar]:
    """Nested objects as dotted keys: ``{"cache": {"direct": True}}`` ->
    ``{"cache.direct": True}`` (QEMU's flat option dictionaries); a list's
    items keyed by their index (``{"a": [{"b": 1}]}`` -> ``{"a.0.b": 1}``)."""
    flat: dict[str, Scalar] = {}
    for key, v in value.items():
        if isinstance(v, list | tuple):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, Mapping):
            flat.update({f"{key}.{k}": x for k, x in flatten(v).items()})
        elif isinstance(v, str | int | bool):
            flat[key] = v
        else:
            raise TypeError(f"'{key}': only objects and scalars can be flattened, not {type(v).__name__}")
    return flat


def unflatten(flat: Mapping[str, T], *, lists: bool = False) -> dict[str, Any]:
    """Dotted keys as nested objects (QEMU's keyval): ``{"cache.direct": "on"}``
    -> ``{"cache": {"direct": "on"}}``.  Raises ``SchemaError`` for an empty
    key part or a key that is both a value and an object.  ``lists``: an
    object whose keys are ``0``, ``1``, ... in order is a list (``flatten``'s
    inverse, for JSON-typed values; keyval input keeps them objects, which
    the list type takes there)."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if not all(parts):
            raise SchemaError(f"Invalid parameter '{key}'")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SchemaError(f"Parameter '{'.'.join(parts[:i + 1])}' used inconsistently")
            node = child
        if parts[-1] in node:
            raise SchemaError(f"Parameter '{key}' used inconsistently")
        node[parts[-1]] = value
    return _relist(root) if lists else root


def _relist(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    items = {k: _relist(v) for k, v in value.items()}
    if items and list(items) == [str(i) for i in range(len(items))]:
        return list(items.values())
    return items
