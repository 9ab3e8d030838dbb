"""qemu-storage-daemon's option syntax for objects: QEMU's keyval and JSON forms.

``--object iothread,id=io0,poll-max-ns=32768`` and
``--object '{"qom-type": "iothread", "id": "io0", "poll-max-ns": 32768}'``
describe the same iothread.  In the keyval form the first element, without
``=``, is the implied ``qom-type``; a literal comma inside a value is written
``,,``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..cluster._cluster import IOThreadConfig

__all__ = ["BlockdevSpec", "OptionError", "parse_blockdev", "parse_keyval", "parse_object", "parse_size"]

_IOTHREAD_INTS = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")
_MAX_U64 = 2**64 - 1


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


def _properties(text: str, implied_key: str | None) -> dict[str, Any]:
    """An option's properties from its JSON form (``{...}``) or keyval form."""
    if text.lstrip().startswith("{"):
        try:
            props: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"JSON parse error: {exc.msg}") from None
        except RecursionError:
            raise OptionError("JSON parse error: nested too deeply") from None
        return props
    return dict(parse_keyval(text, implied_key=implied_key))


def parse_object(text: str) -> IOThreadConfig:
    """An ``--object`` value (keyval or JSON) describing an iothread."""
    props = _properties(text, implied_key="qom-type")
    qom_type = props.pop("qom-type", None)
    if qom_type is None:
        raise OptionError("Parameter 'qom-type' is missing")
    if qom_type != "iothread":
        raise OptionError(f"invalid object type: {qom_type}")
    object_id = props.pop("id", None)
    if object_id is None:
        raise OptionError("Parameter 'id' is missing")
    if not isinstance(object_id, str) or not _valid_id(object_id):
        raise OptionError(f"Parameter 'id' expects an identifier, not {object_id!r}")
    values: dict[str, int] = {}
    for key in _IOTHREAD_INTS:
        if key in props:
            values[key] = _u64(key, props.pop(key))
    if props:
        raise OptionError(f"Invalid parameter '{sorted(props)[0]}'")
    return IOThreadConfig(
        object_id,
        poll_max_ns=values.get("poll-max-ns", 32768),
        poll_grow=values.get("poll-grow", 0),
        poll_shrink=values.get("poll-shrink", 0),
        aio_max_batch=values.get("aio-max-batch", 0),
    )


def _valid_id(name: str) -> bool:
    """QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    return bool(name) and name[0].isascii() and name[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in name
    )


def _u64(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise OptionError(f"Parameter '{key}' expects an integer")
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise OptionError(f"Parameter '{key}' expects an integer") from None
    if not isinstance(value, int) or not 0 <= value <= _MAX_U64:
        raise OptionError(f"Parameter '{key}' expects a non-negative integer")
    return value


@dataclass(frozen=True)
class BlockdevSpec:
    """A ``--blockdev`` value: node name, driver, its options, and the iothread."""

    node_name: str
    driver: str
    options: dict[str, str | int | bool]
    iothread: str | None = None


_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(key: str, value: object) -> int:
    """QEMU sizes: ``4096``, ``512K``, ``1G`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        number, suffix = (text[:-1], text[-1]) if text and text[-1] in _SUFFIXES else (text, "")
        try:
            size = int(float(number) * _SUFFIXES[suffix]) if "." in number else int(number) * _SUFFIXES[suffix]
        except (ValueError, OverflowError):  # not a number; a float that is infinite
            pass
        else:
            if 0 <= size < 2**63:
                return size
    raise OptionError(f"Parameter '{key}' expects a size (e.g. 4096, 512K, 1G)")


def _on_off(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_blockdev(text: str) -> BlockdevSpec:
    """A ``--blockdev`` value (keyval or JSON): drivers ``file`` and ``null-co``."""
    props = _properties(text, implied_key=None)
    if isinstance(props.get("cache"), dict):  # the JSON form nests cache.direct
        cache = props.pop("cache")
        if "direct" in cache:
            props["cache.direct"] = cache.pop("direct")
        if cache:
            raise OptionError(f"Invalid parameter 'cache.{sorted(cache)[0]}'")
    driver = props.pop("driver", None)
    if driver is None:
        raise OptionError("Parameter 'driver' is missing")
    node_name = props.pop("node-name", None)
    if node_name is None:
        raise OptionError("Parameter 'node-name' is missing")
    if not isinstance(node_name, str) or not _valid_id(node_name):
        raise OptionError(f"Invalid node-name: '{node_name}'")
    iothread = props.pop("iothread", None)
    if iothread is not None and not isinstance(iothread, str):
        raise OptionError("Parameter 'iothread' expects an iothread id")
    options: dict[str, str | int | bool] = {}
    if driver == "file":
        filename = props.pop("filename", None)
        if not isinstance(filename, str) or not filename:
            raise OptionError("Parameter 'filename' is missing")
        options["filename"] = os.path.abspath(filename)
        for key in ("read-only", "cache.direct"):
            if key in props:
                options[key] = _on_off(key, props.pop(key))
    elif driver == "null-co":
        options["size"] = parse_size("size", props.pop("size", "1G"))
        if "read-zeroes" in props:
            options["read-zeroes"] = _on_off("read-zeroes", props.pop("read-zeroes"))
        if "read-only" in props:
            options["read-only"] = _on_off("read-only", props.pop("read-only"))
    else:
        raise OptionError(f"Invalid parameter value for 'driver': '{driver}' (supported: file, null-co)")
    if props:
        raise OptionError(f"Invalid parameter '{sorted(props)[0]}'")
    return BlockdevSpec(node_name, str(driver), options, iothread)


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
    if not isinstance(ident, str) or not _valid_id(ident):
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
