"""qemu-storage-daemon's option syntax: QEMU's keyval and JSON forms.

``--object iothread,id=io0,poll-max-ns=32768`` and
``--object '{"qom-type": "iothread", "id": "io0", "poll-max-ns": 32768}'``
describe the same iothread.  In the keyval form the first element, without
``=``, is the implied ``qom-type``; a literal comma inside a value is written
``,,``; a dotted key is a member of a nested object (``cache.direct=on``).

What ``--object``, ``--blockdev``, ``--nbd-server`` and ``--export`` take is
declared once, in ``protocol.schema`` (ObjectOptions, BlockdevOptions,
NbdServerOptions, BlockExportOptions): keyval strings are converted per the
declared types, JSON values must have them, and QMP's ``object-add``,
``blockdev-add``, ``nbd-server-start`` and ``block-export-add`` check the
same declarations (``nbd-server-start``'s address in QMP's older form).
``--chardev`` and ``--monitor`` follow QEMU's older option syntax (QemuOpts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from protocol.schema import (
    INT64_MAX,
    BlockExportOptions,
    BlockExportOptionsBase,
    BlockdevOptions,
    FlatUnion,
    NbdServerOptions,
    ObjectOptions,
    SchemaError,
    blockdev_to_wire,
    id_wellformed,
    parse,
    parse_bool,
    unflatten,
)
from protocol.schema import parse_size as schema_parse_size

from ..cluster._cluster import IOThreadConfig
from ..qmp._monitor import iothread_config

__all__ = ["BlockdevSpec", "OptionError", "parse_blockdev", "parse_export", "parse_keyval", "parse_nbd_server",
           "parse_object", "parse_size"]

T = TypeVar("T")


class OptionError(ValueError):
    """A command-line value is wrong; the text says which and why."""


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, str]:
    """QEMU's keyval: ``a=1,b=x,,y`` -> ``{"a": "1", "b": "x,y"}``.

    The first element may lack ``=`` when ``implied_key`` is given.
    """
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    result: dict[str, str] = {}
    for n, item in enumerate(items):
        if "=" not in item:
            if n == 0 and implied_key is not None and item:
                result[implied_key] = item
                continue
            raise OptionError(f"Expected '=' after parameter '{item}'" if item else "Expected parameter before ','")
        key, _, value = item.partition("=")
        if not key:
            raise OptionError("Invalid parameter ''")
        if key in result:
            raise OptionError(f"Parameter '{key}' is given twice")
        result[key] = value
    return result


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def _no_constant(name: str) -> Any:
    """NaN and the infinities are not JSON: refused, as QMP refuses them."""
    raise ValueError(f"invalid keyword '{name}'")


def _json(text: str) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise OptionError(f"JSON parse error: {exc.msg}") from None
    except ValueError as exc:
        raise OptionError(f"JSON parse error: {exc}") from None
    except RecursionError:
        raise OptionError("JSON parse error: nested too deeply") from None
    return value


def _properties(text: str, implied_key: str | None) -> dict[str, Any]:
    """An option's properties from its JSON form (``{...}``) or keyval form."""
    return _json(text) if _is_json(text) else dict(parse_keyval(text, implied_key=implied_key))


def _parse_declared(declared: FlatUnion[T] | type[T], text: str, implied_key: str | None) -> T:
    """An option value (keyval or JSON) checked against its declaration (a union or a struct)."""
    try:
        value: object = _json(text) if _is_json(text) else unflatten(parse_keyval(text, implied_key))
        typed: T = parse(declared, value, keyval=not _is_json(text))
        return typed
    except SchemaError as exc:
        raise OptionError(exc.desc) from None


def parse_object(text: str) -> IOThreadConfig:
    """An ``--object`` value (keyval or JSON): an ObjectOptions, an iothread."""
    return iothread_config(_parse_declared(ObjectOptions, text, implied_key="qom-type"))


@dataclass(frozen=True)
class BlockdevSpec:
    """A ``--blockdev`` value: node name, driver, its validated options as the
    ``BlockdevAdd`` message carries them, and the iothread."""

    node_name: str
    driver: str
    options: dict[str, str | int | bool]
    iothread: str | None = None


def parse_blockdev(text: str) -> BlockdevSpec:
    """A ``--blockdev`` value (keyval or JSON): a BlockdevOptions."""
    options = _parse_declared(BlockdevOptions, text, implied_key=None)
    return BlockdevSpec(options.node_name, options.driver.value, blockdev_to_wire(options), options.iothread)


def parse_nbd_server(text: str) -> NbdServerOptions:
    """An ``--nbd-server`` value (keyval or JSON): an NbdServerOptions (its address flat:
    ``addr.type=unix,addr.path=PATH``)."""
    return _parse_declared(NbdServerOptions, text, implied_key=None)


def parse_export(text: str) -> BlockExportOptionsBase:
    """An ``--export`` value (keyval or JSON): a BlockExportOptions (``[type=]nbd,id=ID,node-name=NODE,...``)."""
    return _parse_declared(BlockExportOptions, text, implied_key="type")


def parse_size(key: str, text: str) -> int:
    """A size in QEMU's notation: ``4096``, ``512K``, ``1.5G`` (powers of 1024)."""
    size = schema_parse_size(text)
    if size is None or size > INT64_MAX:
        raise OptionError(f"Parameter '{key}' expects a size (e.g. 4096, 512K, 1G)")
    return size


def _on_off(key: str, value: object) -> bool:
    """A QemuOpts boolean: the spellings keyval takes (``on``, ``off``, ...), or a JSON boolean."""
    if isinstance(value, bool):
        return value
    flag = parse_bool(value) if isinstance(value, str) else None
    if flag is None:
        raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")
    return flag


@dataclass(frozen=True)
class ChardevSpec:
    """A ``--chardev socket,...`` for a QMP monitor: a Unix path or host and port."""

    id: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


def parse_chardev(text: str) -> ChardevSpec:
    """``socket,id=ID,path=PATH,server=on,wait=off`` or ``...,host=H,port=P,...``."""
    props = _properties(text, implied_key="backend")
    backend = props.pop("backend", None)
    if backend != "socket":
        raise OptionError(f"chardev backend '{backend}' is not supported (only 'socket')")
    ident = props.pop("id", None)
    if not isinstance(ident, str) or not id_wellformed(ident):
        raise OptionError("Parameter 'id' is missing" if ident is None else f"Invalid id: '{ident}'")
    if not _on_off("server", props.pop("server", "off")):
        raise OptionError("only server=on sockets are supported")
    if _on_off("wait", props.pop("wait", "on")):
        raise OptionError("wait=on is not supported: use wait=off")
    path, host, port = props.pop("path", None), props.pop("host", None), props.pop("port", None)
    if props:
        raise OptionError(f"Invalid parameter '{sorted(props)[0]}'")
    if path is not None:
        if host is not None or port is not None:
            raise OptionError("give either path or host and port")
        return ChardevSpec(ident, path=os.path.abspath(_string("path", path)))
    if host is None or port is None:
        raise OptionError("a socket chardev needs path=PATH or host=HOST,port=PORT")
    return ChardevSpec(ident, host=_string("host", host), port=_port(port))


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(f"Parameter '{key}' expects a string")
    return value


def _port(value: object) -> int:
    """A TCP port, 0 to 65535: an integer, or its decimal digits."""
    port = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OptionError(f"Parameter 'port' expects a port number, not '{value}'")
    return port


def parse_monitor(text: str) -> str:
    """``chardev=ID[,mode=control]``: the chardev the QMP monitor serves."""
    props = _properties(text, implied_key=None)
    chardev = props.pop("chardev", None)
    if not isinstance(chardev, str):
        raise OptionError("Parameter 'chardev' is missing")
    mode = props.pop("mode", "control")
    if mode != "control":
        raise OptionError(f"monitor mode '{mode}' is not supported (only 'control', QMP)")
    props.pop("pretty", None)
    if props:
        raise OptionError(f"Invalid parameter '{sorted(props)[0]}'")
    return chardev
