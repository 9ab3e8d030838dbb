"""One declaration, three forms: ``--blockdev``, ``--object``, ``--nbd-server``
and ``--export`` in keyval form, the same options in JSON form, and QMP's
``blockdev-add``, ``object-add``, ``nbd-server-start`` and ``block-export-add``
accept and refuse the same option sets, with the same meaning.
(``nbd-server-start`` takes its address in QEMU's older form, ``{"type": T,
"data": {...}}``, where the command line's is flat: the QMP form here is the
same address so written, and its messages name ``addr.data.X`` where the
others name ``addr.X``.)

Hypothesis writes option sets (valid ones, and ones with an unknown driver or
object type, members missing, unknown or of the other driver, values of the
wrong type, bad sizes and integers, booleans in every spelling) in each form
and hands them to the code a user reaches:

* the CLI forms to the launcher's own option handling (``_blockdevs`` and
  ``_configs``: what ``iothreads launch`` runs, in process);
* the QMP form to a monitor, as the bytes a client sends, decoded by a
  ``QmpSession`` and run by ``Monitor.execute`` (what a QMP connection runs),
  over a cluster that records what it is asked to create instead of doing it.

The rule (QEMU's):

1. An accepted set gives the same thing in every form: the same node (name,
   driver, iothread, and the options its ``BlockdevAdd`` message carries) or
   the same iothread configuration.  And it means what was written: every
   member given arrives with its value (``read-only`` too, whatever the
   driver), every other one with its declared default.
2. A refused set gives the same message in every form, and nothing is
   created.  The CLI puts the option in front (``--blockdev VALUE: ``, as
   QEMU's location prefix does); QMP gives it bare, as a GenericError's desc.
3. Except where a value's *type* is wrong, which the two syntaxes say in their
   own words (QEMU's keyval visitor and its QObject visitor): a scalar the
   keyval form cannot read as its type (``size=lots``, ``read-only=maybe``)
   is "Parameter 'P' expects T", an object where a scalar goes
   (``size.x=1``) is "Parameters 'P.*' are unexpected"; the JSON forms say
   "Invalid parameter type for 'P', expected: J" for both.  Both refuse, and
   name the same parameter P.
4. What only JSON can write (a number where a string goes, ``null``, a list,
   a string where a boolean goes) is compared between the CLI's JSON form and
   QMP: rule 2, word for word.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mainloop import Cluster, IOThreadConfig
from mainloop.cli._main import _blockdevs, _configs, _exports, _nbd_server, build_parser
from mainloop.cli._options import BlockdevSpec, OptionError
from mainloop.nbd import NbdServer
from mainloop.qmp import Monitor, QmpFailure
from mainloop.qmp._monitor import VERSION
from protocol import QmpSession, QueryReply
from protocol.schema import (
    INT64_MAX,
    BlockExportOptions,
    BlockExportOptionsBase,
    BlockExportOptionsNbd,
    BlockExportType,
    BlockdevCacheOptions,
    BlockdevDriver,
    BlockdevOnError,
    BlockdevOptions,
    BlockdevOptionsFile,
    BlockdevOptionsNull,
    IothreadOptions,
    IothreadProperties,
    Member,
    NbdServerOptions,
    ObjectType,
    SchemaError,
    SocketAddressBase,
    SocketAddressInet,
    SocketAddressType,
    SocketAddressUnix,
    blockdev_from_wire,
    flatten,
    members,
    parse,
)

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1


# -- option sets, and how each form writes them ------------------------------------------


@dataclass(frozen=True)
class Good:
    """A value of its member's type, as JSON has it and as keyval spells it."""

    json: object
    keyval: str


@dataclass(frozen=True)
class Mistyped:
    """A value of the wrong type in both syntaxes (rule 3): keyval text its
    type cannot read, or dotted members under a scalar; JSON the same as a
    string, or an object."""

    json: object
    keyval: str | dict[str, str]


@dataclass(frozen=True)
class JsonOnly:
    """A value of the wrong JSON type, that the keyval form cannot write (rule 4)."""

    json: object


Node = Good | Mistyped | JsonOnly | dict[str, Any]  # dict: a nested object (cache)


def json_form(options: dict[str, Node]) -> dict[str, Any]:
    return {k: json_form(v) if isinstance(v, dict) else v.json for k, v in options.items()}


def _keyval_pairs(options: dict[str, Node], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in options.items():
        path = prefix + key
        if isinstance(value, dict):
            yield from _keyval_pairs(value, path + ".")
        elif isinstance(value, Mistyped) and isinstance(value.keyval, dict):
            yield from ((f"{path}.{k}", v) for k, v in value.keyval.items())
        else:
            assert not isinstance(value, JsonOnly)
            yield path, value.keyval


def keyval_form(options: dict[str, Node], implied_key: str | None = None) -> str | None:
    """The keyval text (commas doubled; the implied key's value first and bare
    when it leads), or None when a value is one only JSON can write."""
    if any(isinstance(v, JsonOnly) for v in _leaves(options)):
        return None
    items = []
    for n, (key, text) in enumerate(_keyval_pairs(options)):
        if n == 0 and key == implied_key and re.fullmatch(r"[a-zA-Z][a-zA-Z0-9-]*", text):
            items.append(text)
        else:
            items.append(f"{key}={text.replace(',', ',,')}")
    return ",".join(items)


def _leaves(options: dict[str, Node]) -> Iterator[Good | Mistyped | JsonOnly]:
    for value in options.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def mistyped_paths(options: dict[str, Node], prefix: str = "") -> set[str]:
    found = set()
    for key, value in options.items():
        if isinstance(value, dict):
            found |= mistyped_paths(value, f"{prefix}{key}.")
        elif isinstance(value, Mistyped):
            found.add(prefix + key)
    return found


# -- values, by the kind of member -----------------------------------------------------


def _one_in(n: int) -> st.SearchStrategy[bool]:
    return st.integers(0, n - 1).map(lambda i: i == 0)


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight says."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


def _mostly(good: st.SearchStrategy[Node], *bad: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    """Good values nineteen times in twenty: many sets are then valid, the
    others mostly wrong in one place."""
    return _weighted((19, good), (1, st.one_of(*bad)))


_TRUE, _FALSE = ["on", "yes", "true", "y"], ["off", "no", "false", "n"]  # QEMU's qapi_bool_parse


def _nested_for_scalar() -> st.SearchStrategy[Node]:
    return st.just(Mistyped({"x": "1"}, {"x": "1"}))


def bools() -> st.SearchStrategy[Node]:
    good = st.booleans().flatmap(lambda b: st.sampled_from(_TRUE if b else _FALSE).map(lambda t: Good(b, t)))
    misspelled = st.sampled_from(["maybe", "On", "TRUE", "1", "0", "", " on"]).map(lambda t: Mistyped(t, t))
    wrong_json = st.sampled_from([None, 1, 0, "on", "true", [True]]).map(JsonOnly)
    return _mostly(good, misspelled, _nested_for_scalar(), wrong_json)


def _int_spellings(n: int) -> st.SearchStrategy[str]:
    """C's spellings of ``n`` (``strtoll`` with base 0, leading blanks allowed)."""
    sign = "-" if n < 0 else ""
    m = abs(n)
    spellings = [str(n), f"{sign}0x{m:x}", f"{sign}0X{m:X}", f" {n}"]
    if n >= 0:
        spellings.append(f"+{n}")
    if m:
        spellings.append(f"{sign}0{m:o}")
    return st.sampled_from(spellings)


_EDGES = [0, 1, INT64_MAX, INT64_MAX + 1, UINT64_MAX]


def ints() -> st.SearchStrategy[Node]:
    """An int64 member that must not be negative (the iothread's properties)."""
    n = _weighted((8, st.integers(0, 1 << 20)), (1, st.sampled_from([*_EDGES, -1, INT64_MIN])),
                  (1, st.integers(INT64_MIN, UINT64_MAX)))
    good = n.flatmap(lambda v: _int_spellings(v).map(lambda t: Good(v, t)))
    misspelled = st.sampled_from(["lots", "1.5", "", "0x", "08", "1k", "1e3", "--1"]).map(lambda t: Mistyped(t, t))
    wrong_json = st.sampled_from([None, True, 1.5, 1.0, "1", [1], UINT64_MAX + 1, INT64_MIN - 1]).map(JsonOnly)
    return _mostly(good, misspelled, _nested_for_scalar(), wrong_json)


_UNITS = [("k", 10), ("M", 20), ("G", 30), ("t", 40), ("P", 50), ("e", 60)]


def _size_spellings(n: int) -> st.SearchStrategy[str]:
    """QEMU's spellings of a size: bytes, hex, a unit (powers of 1024), a half unit."""
    spellings = [str(n), f"0x{n:x}", f"{n}b", f" {n}"]
    for suffix, shift in _UNITS:
        if n and n % (1 << shift) == 0:
            spellings.append(f"{n >> shift}{suffix}")
        if n % (1 << shift) == 1 << (shift - 1):
            spellings.append(f"{n >> shift}.5{suffix}")
    return st.sampled_from(spellings)


def sizes() -> st.SearchStrategy[Node]:
    n = _weighted((8, st.integers(0, 1 << 40).map(lambda v: v & ~511)), (1, st.sampled_from(_EDGES)),
                  (1, st.integers(0, UINT64_MAX)))
    good = n.flatmap(lambda v: _size_spellings(v).map(lambda t: Good(v, t)))
    misspelled = st.sampled_from(["lots", "1.5", "-1", "", "4kk", "1e3", "0x1k", "1.5b", str(UINT64_MAX + 1)]).map(
        lambda t: Mistyped(t, t))
    wrong_json = st.sampled_from([None, True, 1.5, "4096", [4096], -1, UINT64_MAX + 1]).map(JsonOnly)
    return _mostly(good, misspelled, _nested_for_scalar(), wrong_json)


_WRONG_FOR_STRINGS = st.sampled_from([None, 1, True, 1.5, ["a"]]).map(JsonOnly)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)


def strings(good: st.SearchStrategy[str] = _TEXT) -> st.SearchStrategy[Node]:
    return _mostly(good.map(lambda s: Good(s, s)), _nested_for_scalar(), _WRONG_FOR_STRINGS)


def identifiers() -> st.SearchStrategy[Node]:
    """Ids and node names: mostly well-formed, else any text (QEMU's rule decides)."""
    return strings(_weighted((9, st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,7}", fullmatch=True)), (1, _TEXT)))


def enums(values: list[str]) -> st.SearchStrategy[Node]:
    """An enum member: its values, or others (refused alike in every form)."""
    return strings(_weighted((9, st.sampled_from(values)),
                             (1, st.sampled_from(["qcow2", "", "NULL-CO", "nbd", "memory-backend-ram", "Iothread"]))))


def caches() -> st.SearchStrategy[Node]:
    good = st.builds(lambda direct, extra: {"direct": direct, **extra}, bools(),
                     _one_in(8).map(lambda bogus: {"no-flush": Good(True, "on")} if bogus else {}))
    return _mostly(good, st.just(Mistyped("x", "x")), st.sampled_from([None, 1, True, ["a"]]).map(JsonOnly))


# Every member the declarations have, by wire name, with its values: a member
# added to a declaration fails test_every_member_is_generated until it is here.
BLOCKDEV_MEMBERS: dict[str, Callable[[], st.SearchStrategy[Node]]] = {
    "driver": lambda: enums([d.value for d in BlockdevDriver]),
    "node-name": identifiers,
    "read-only": bools,
    "iothread": lambda: strings(st.sampled_from(["io0", "io1"])),  # the launcher's iothreads
    "filename": strings,
    "cache": caches,
    "size": sizes,
    "read-zeroes": bools,
    "werror": lambda: enums([p.value for p in BlockdevOnError]),
    "rerror": lambda: enums([p.value for p in BlockdevOnError]),
    "image": identifiers,
    # Lists of rules (their forms: tests/iothreads/test_blkdebug.py); here, a scalar in their place.
    "inject-error": lambda: st.just(Mistyped("x", "x")),
    "set-state": lambda: st.just(Mistyped("x", "x")),
}
CACHE_MEMBERS = {"direct"}
OBJECT_MEMBERS: dict[str, Callable[[], st.SearchStrategy[Node]]] = {
    "qom-type": lambda: enums([t.value for t in ObjectType]),
    "id": identifiers,
    "poll-max-ns": ints,
    "poll-grow": ints,
    "poll-shrink": ints,
    "aio-max-batch": ints,
}
ADDR_MEMBERS: dict[str, Callable[[], st.SearchStrategy[Node]]] = {
    "type": lambda: enums([t.value for t in SocketAddressType]),
    "host": strings,
    "port": strings,
    "path": strings,
}


def addrs() -> st.SearchStrategy[Node]:
    """A socket address: of a known family, the members of its branch; else the base's."""
    good = option_sets(ADDR_MEMBERS, "type", lambda family: members(
        {"inet": SocketAddressInet, "unix": SocketAddressUnix}.get(family, SocketAddressBase)
        if isinstance(family, str) else SocketAddressBase))
    return _mostly(good, st.just(Mistyped("x", "x")), st.sampled_from([None, 1, "unix", ["a"]]).map(JsonOnly))


NBD_SERVER_MEMBERS: dict[str, Callable[[], st.SearchStrategy[Node]]] = {
    "addr": addrs,
    "max-connections": ints,
    "handshake-max-seconds": ints,
}
EXPORT_MEMBERS: dict[str, Callable[[], st.SearchStrategy[Node]]] = {
    "type": lambda: enums([t.value for t in BlockExportType]),
    "id": identifiers,
    "node-name": identifiers,
    "writable": bools,
    "name": strings,
    "description": strings,
    "allocation-depth": bools,
}
UNKNOWN_MEMBERS = ["bogus", "filenme"]


@st.composite
def option_sets(draw: st.DrawFn, declared: dict[str, Callable[[], st.SearchStrategy[Node]]], lead: str,
                branch: Callable[[object], list[Member]]) -> dict[str, Node]:
    """A set of options, in any order: ``lead`` (the discriminator) and the
    required members of the branch it picks almost always, its optional ones
    half of the time, other members and unknown ones rarely."""
    options: dict[str, Node] = {}
    if not draw(_one_in(20)):
        options[lead] = draw(declared[lead]())
    picked = {m.name: m for m in branch(json_form(options).get(lead))}
    for name, values in declared.items():
        m = picked.get(name)
        leave_out = _one_in(20).map(lambda no: not no) if m is None else (
            _one_in(20) if m.required else st.booleans())
        if name != lead and not draw(leave_out):
            options[name] = draw(values())
    for name in UNKNOWN_MEMBERS:
        if draw(_one_in(40)):
            options[name] = Good("x", "x")
    order = draw(st.permutations(list(options)))
    return {name: options[name] for name in order} or {lead: Good("", "")}


def blockdev_sets() -> st.SearchStrategy[dict[str, Node]]:
    """Of a known driver, the members of its branch; else the base's."""
    return option_sets(BLOCKDEV_MEMBERS, "driver", lambda driver: members(
        BlockdevOptions.branches.get(driver, BlockdevOptions.base) if isinstance(driver, str) else
        BlockdevOptions.base))


def object_sets() -> st.SearchStrategy[dict[str, Node]]:
    return option_sets(OBJECT_MEMBERS, "qom-type", lambda qom_type: members(IothreadOptions))


def nbd_server_sets() -> st.SearchStrategy[dict[str, Node]]:
    """No discriminator: ``addr`` leads (and is required)."""
    return option_sets(NBD_SERVER_MEMBERS, "addr", lambda addr: members(NbdServerOptions))


def export_sets() -> st.SearchStrategy[dict[str, Node]]:
    return option_sets(EXPORT_MEMBERS, "type", lambda export_type: members(
        BlockExportOptions.branches.get(export_type, BlockExportOptions.base) if isinstance(export_type, str) else
        BlockExportOptions.base))


# -- the three forms, as the launcher and the monitor take them ---------------------------------


Outcome = tuple[str, Any]  # ("ok", what would be created) or ("error", the message)
IOTHREADS = [IOThreadConfig("io0"), IOThreadConfig("io1")]
PARSER = build_parser()


def cli(option: str, text: str) -> Outcome:
    """``iothreads launch OPTION TEXT``'s option handling: the node or iothread, or the message."""
    args = PARSER.parse_args(["launch", option, text])
    try:
        created: list[object]
        if option == "--nbd-server":
            server = _nbd_server(args)
            created = [] if server is None else [server]
        elif option == "--export":
            created = list(_exports(args))
        elif option == "--blockdev":
            created = list(_blockdevs(args, IOTHREADS))
        else:
            created = list(_configs(args))
    except OptionError as exc:
        prefix = f"{option} {text}: "
        assert str(exc).startswith(prefix), str(exc)
        return "error", str(exc)[len(prefix):]
    assert len(created) == 1
    return "ok", created[0]


class RecordingCluster:
    """Takes what a monitor asks to create, and records it instead."""

    loop = None

    def __init__(self) -> None:
        self.created: list[BlockdevSpec | IOThreadConfig | NbdServerOptions | BlockExportOptionsBase] = []

    def add_listener(self, listener: object) -> None:
        pass

    def remove_listener(self, listener: object) -> None:
        pass

    def on_exit(self, iothread_id: str, callback: object) -> None:
        pass

    def add(self, config: IOThreadConfig) -> IOThreadConfig:
        self.created.append(config)
        return config  # the monitor then waits for it to be ready: no answer comes

    def blockdev_add(self, node_name: str, driver: str, options: dict[str, str | int | bool],
                     callback: Callable[[QueryReply], object], iothread: str | None = None) -> None:
        self.created.append(BlockdevSpec(node_name, driver, options, iothread))
        callback(QueryReply(0, {}))


class RecordingNbdServer:
    """Takes what a monitor asks of the NBD server, and records it instead
    (a server started: the options it was started with, the address flat)."""

    def __init__(self, cluster: RecordingCluster) -> None:
        self.created = cluster.created

    def add_listener(self, listener: object) -> None:
        pass

    def start(self, addr: SocketAddressBase, *, max_connections: int, handshake_max_seconds: int) -> None:
        self.created.append(NbdServerOptions(addr=addr, max_connections=max_connections,
                                             handshake_max_seconds=handshake_max_seconds))

    def add_export(self, options: BlockExportOptionsBase) -> None:
        self.created.append(options)


def legacy_addr(arguments: object) -> object:
    """nbd-server-start's arguments: the flat address of ``arguments`` in QMP's older form."""
    if not isinstance(arguments, dict) or not isinstance(arguments.get("addr"), dict):
        return arguments
    addr = arguments["addr"]
    legacy = {"data": {k: v for k, v in addr.items() if k != "type"}}
    if "type" in addr:
        legacy = {"type": addr["type"], **legacy}
    return {**arguments, "addr": legacy}


def qmp(command: str, arguments: object) -> Outcome:
    """``command`` sent as a client sends it, run as a QMP connection runs it
    (``nbd-server-start``: with the address as the command line writes it,
    sent in QMP's form, and its messages' ``addr.data.X`` read as ``addr.X``)."""
    if command == "nbd-server-start":
        kind, value = qmp("nbd-server-start-legacy", legacy_addr(arguments))
        return kind, value.replace("'addr.data.", "'addr.") if isinstance(value, str) else value
    command = command.removesuffix("-legacy")
    cluster = RecordingCluster()
    monitor = Monitor(cast(Cluster, cluster), on_quit=lambda: None,
                      nbd=cast(NbdServer, RecordingNbdServer(cluster)))
    session = QmpSession(VERSION)
    session.receive_data(b'{"execute": "qmp_capabilities"}'
                         + json.dumps({"execute": command, "arguments": arguments}).encode())
    while (request := session.next_command()) is not None:
        def done(result: Any) -> None:
            if isinstance(result, QmpFailure):
                session.fail(result.error_class, result.desc)
            else:
                session.reply(result)

        monitor.execute(request.name, request.arguments, done)
    greeting, negotiated, *replies = [json.loads(line) for line in session.data_to_send().splitlines()]
    assert "QMP" in greeting and negotiated == {"return": {}}
    if cluster.created:
        assert len(cluster.created) == 1 and replies in ([], [{"return": {}}]), replies
        return "ok", cluster.created[0]
    [reply] = replies  # refused: answered at once, and nothing was created
    assert reply["error"]["class"] == "GenericError", reply
    return "error", reply["error"]["desc"]


def typed(outcome: Outcome) -> str:
    """An outcome with its JSON types (True is not 1), for comparing."""
    kind, value = outcome
    return json.dumps([kind, dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value],
                      sort_keys=True)


def _type_error_parameter(message: str, keyval: bool) -> str | None:
    """The parameter a type error names, in the keyval or the JSON form's words (rule 3)."""
    patterns = [r"Parameter '(.+)' expects .+", r"Parameters '(.+)\.\*' are unexpected"] if keyval else [
        r"Invalid parameter type for '(.+)', expected: .+"]
    found = (re.fullmatch(p, message) for p in patterns)
    return next((m.group(1) for m in found if m is not None), None)


def assert_forms_agree(options: dict[str, Node], option: str, command: str, implied_key: str | None) -> Outcome:
    """Rules 2 to 4; the outcome, for rule 1."""
    arguments = json_form(options)
    by_qmp = qmp(command, arguments)
    by_json = cli(option, json.dumps(arguments))
    assert typed(by_json) == typed(by_qmp)
    text = keyval_form(options, implied_key)
    if text is not None:
        by_keyval = cli(option, text)
        if typed(by_keyval) != typed(by_json):
            assert by_keyval[0] == by_json[0] == "error", (text, by_keyval, by_json)
            parameter = _type_error_parameter(by_keyval[1], keyval=True)
            assert parameter is not None and parameter == _type_error_parameter(by_json[1], keyval=False), (
                text, by_keyval, by_json)
            assert parameter in mistyped_paths(options), (text, by_keyval, by_json)
    return by_qmp


def _without(value: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k not in keys}


# -- the properties --------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(blockdev_sets())
# The old bug: read-only=on was kept by the CLI but dropped by QMP for null-co.
@example({"driver": Good("null-co", "null-co"), "node-name": Good("n0", "n0"), "size": Good(4096, "4k"),
          "read-only": Good(True, "on")})
@example({"driver": Good("file", "file"), "node-name": Good("d0", "d0"), "filename": Good("/x,y", "/x,y"),
          "read-only": Good(False, "false"), "cache": {"direct": Good(True, "y")}})
# One message for an unknown driver, a missing member, a value of the wrong type.
@example({"driver": Good("x", "x"), "node-name": Good("n0", "n0")})
@example({"driver": Good("null-co", "null-co")})
@example({"driver": Good("null-co", "null-co"), "node-name": Good("n0", "n0"), "size": Mistyped("lots", "lots")})
@example({"driver": Good("null-co", "null-co"), "node-name": Good("n0", "n0"), "size": JsonOnly("4096")})
def test_blockdev_forms_accept_and_refuse_alike(options: dict[str, Node]) -> None:
    outcome = assert_forms_agree(options, "--blockdev", "blockdev-add", implied_key=None)
    if outcome[0] == "error":
        return
    spec: BlockdevSpec = outcome[1]
    given_options = json_form(options)
    assert (spec.node_name, spec.driver, spec.iothread) == (
        given_options["node-name"], given_options["driver"], given_options.get("iothread"))
    carried = flatten(_without(given_options, "driver", "node-name", "iothread"))
    assert {k: json.dumps(spec.options[k]) for k in carried} == {k: json.dumps(v) for k, v in carried.items()}
    branch = BlockdevOptions.branches[spec.driver]
    defaults = {m.name: m.default() for m in members(branch) if m.name not in given_options and not m.required}
    assert spec.options["read-only"] is given_options.get("read-only", False)
    for name, default in defaults.items():
        if name == "cache":
            assert spec.options["cache.direct"] is default.direct
        elif default == ():
            assert not any(key.startswith(f"{name}.") for key in spec.options)  # an empty list: no keys
        elif name != "iothread":
            default = default.value if isinstance(default, enum.Enum) else default  # (an enum: its name)
            assert spec.options[name] == default and type(spec.options[name]) is type(default)
    # The iothread reads the message back as the same options.
    assert blockdev_from_wire(spec.node_name, spec.driver, spec.options) == parse(
        BlockdevOptions, _without(given_options, "iothread"))


@settings(max_examples=300, deadline=None)
@given(object_sets())
@example({"qom-type": Good("iothread", "iothread"), "id": Good("io9", "io9"), "poll-max-ns": Good(16, "0x10")})
@example({"qom-type": Good("memory-backend-ram", "memory-backend-ram"), "id": Good("m0", "m0")})
@example({"qom-type": Good("iothread", "iothread"), "id": Good("io9", "io9"), "poll-grow": Good(-1, "-1")})
def test_object_forms_accept_and_refuse_alike(options: dict[str, Node]) -> None:
    outcome = assert_forms_agree(options, "--object", "object-add", implied_key="qom-type")
    if outcome[0] == "error":
        return
    config: IOThreadConfig = outcome[1]
    given_options = json_form(options)
    assert config.id == given_options["id"] and config.restart is False
    for m in members(IothreadProperties):
        value = getattr(config, m.attr)
        assert value == given_options.get(m.name, m.default()) and type(value) is int, m.name


@settings(max_examples=300, deadline=None)
@given(nbd_server_sets())
@example({"addr": {"type": Good("unix", "unix"), "path": Good("/x,y", "/x,y")}, "max-connections": Good(4, "4")})
@example({"addr": {"type": Good("inet", "inet"), "host": Good("::1", "::1"), "port": Good("0", "0")}})
@example({"addr": {"type": Good("inet", "inet"), "path": Good("/x", "/x")}})
@example({"addr": {"type": Good("vsock", "vsock")}})
@example({"addr": {"path": Good("/x", "/x")}})
@example({"max-connections": Good(1 << 32, str(1 << 32)), "addr": {"type": Good("unix", "unix"),
                                                                   "path": Good("/x", "/x")}})
def test_nbd_server_forms_accept_and_refuse_alike(options: dict[str, Node]) -> None:
    outcome = assert_forms_agree(options, "--nbd-server", "nbd-server-start", implied_key=None)
    if outcome[0] == "error":
        return
    server: NbdServerOptions = outcome[1]
    given_options = json_form(options)
    assert server == parse(NbdServerOptions, given_options)
    assert server.addr.type == given_options["addr"]["type"]
    for m in members(NbdServerOptions):
        if m.name != "addr":
            expected = given_options[m.name] if m.name in given_options else m.default()
            assert json.dumps(getattr(server, m.attr)) == json.dumps(expected), m.name


@settings(max_examples=300, deadline=None)
@given(export_sets())
@example({"type": Good("nbd", "nbd"), "id": Good("e0", "e0"), "node-name": Good("n0", "n0"),
          "writable": Good(True, "on"), "name": Good("a,b", "a,b"), "allocation-depth": Good(False, "off")})
@example({"type": Good("nbd", "nbd"), "id": Good("0e", "0e"), "node-name": Good("n0", "n0")})
@example({"type": Good("fuse", "fuse"), "id": Good("e0", "e0"), "node-name": Good("n0", "n0")})
def test_export_forms_accept_and_refuse_alike(options: dict[str, Node]) -> None:
    outcome = assert_forms_agree(options, "--export", "block-export-add", implied_key="type")
    if outcome[0] == "error":
        return
    export: BlockExportOptionsNbd = outcome[1]
    given_options = json_form(options)
    for m in members(BlockExportOptionsNbd):  # each as given (True, not 1), or its default
        expected = given_options[m.name] if m.name in given_options else m.default()
        assert json.dumps(getattr(export, m.attr)) == json.dumps(expected), m.name


def test_every_member_is_generated() -> None:
    """The generators know every member the declarations have (a new member
    is then part of the properties above)."""
    declared = {m.name for cls in BlockdevOptions.branches.values() for m in members(cls)}
    assert set(BLOCKDEV_MEMBERS) == declared
    assert {m.name for m in members(BlockdevCacheOptions)} == CACHE_MEMBERS
    assert set(OBJECT_MEMBERS) == {m.name for m in members(IothreadOptions)}
    assert set(NBD_SERVER_MEMBERS) == {m.name for m in members(NbdServerOptions)}
    assert set(ADDR_MEMBERS) == {m.name for cls in (SocketAddressInet, SocketAddressUnix) for m in members(cls)}
    assert set(EXPORT_MEMBERS) == {m.name for m in members(BlockExportOptionsNbd)}
    generated = declared | set(OBJECT_MEMBERS) | set(NBD_SERVER_MEMBERS) | set(ADDR_MEMBERS) | set(EXPORT_MEMBERS)
    assert not set(UNKNOWN_MEMBERS) & generated


def test_an_unknown_driver_has_one_message_in_every_form() -> None:
    """The old bug's other half: three places gave three messages."""
    message = "Parameter 'driver' does not accept value 'x'"
    assert cli("--blockdev", "driver=x,node-name=n0") == ("error", message)
    assert cli("--blockdev", '{"driver": "x", "node-name": "n0"}') == ("error", message)
    assert qmp("blockdev-add", {"driver": "x", "node-name": "n0"}) == ("error", message)
    with pytest.raises(SchemaError) as info:  # and the iothread, of a BlockdevAdd message naming it
        blockdev_from_wire("n0", "x", {})
    assert info.value.desc == message


def test_the_cli_json_form_refuses_what_qmp_refuses_as_json() -> None:
    """NaN and the infinities are no JSON, for QMP nor for the command line."""
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = '{"driver": "null-co", "node-name": "n0", "size": %s}' % constant
        assert cli("--blockdev", text) == ("error", f"JSON parse error: invalid keyword '{constant}'")


def test_numbered_iothreads_have_the_declared_defaults() -> None:
    """``--iothreads N`` makes the iothreads an ``--object`` without properties makes."""
    [numbered] = _configs(PARSER.parse_args(["launch", "--iothreads", "1"]))
    assert typed(("ok", numbered)) == typed(cli("--object", f"iothread,id={numbered.id}"))
    assert typed(("ok", numbered)) == typed(qmp("object-add", {"qom-type": "iothread", "id": numbered.id}))
