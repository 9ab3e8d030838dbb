"""The sans-I/O QMP session: QEMU's texts, negotiation, order of replies, bounds, closing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import (
    LocalProtocolError,
    QmpCommand,
    QmpSession,
    QmpSessionState,
    StateError,
    qmp_event,
)
from protocol.qmp._session import MAX_QUEUED_COMMANDS, OUTPUT_PAUSE_BYTES

VERSION = {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "test"}
NEGOTIATE = b'{"execute": "qmp_capabilities"}'


def lines(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of some output: one per CRLF-terminated ASCII line."""
    assert data == b"" or data.endswith(b"\r\n")
    return [json.loads(line.decode("ascii")) for line in data.split(b"\r\n")[:-1]]


def take(session: QmpSession) -> bytes:
    """All the output, as a socket that takes everything would."""
    data = session.data_to_send()
    session.data_sent(len(data))
    return data


def answer(session: QmpSession, command: QmpCommand) -> None:
    """A command's answer, a function of the command alone: ``fail-*`` fail."""
    if command.name.startswith("fail"):
        session.fail("GenericError", f"{command.name} failed")
    else:
        session.reply({"ran": command.name, "arguments": command.arguments})


class Driver:
    """Feeds a session and answers its commands, at once or when the next input comes."""

    def __init__(self, session: QmpSession) -> None:
        self.session = session
        self.commands: list[QmpCommand] = []
        self.output = take(session)

    def feed(self, data: bytes, defer: bool = False) -> None:
        waiting = self.session.running
        if waiting is not None:
            answer(self.session, waiting)
        self.session.receive_data(data)
        self.run(defer)

    def run(self, defer: bool = False) -> None:
        while (command := self.session.next_command()) is not None:
            self.commands.append(command)
            if defer:
                break  # answered later, as a command that waits for an iothread
            answer(self.session, command)
        self.output += take(self.session)

    def finish(self) -> None:
        waiting = self.session.running
        if waiting is not None:
            answer(self.session, waiting)
        self.run()


def negotiated(**kwargs: int) -> QmpSession:
    s = QmpSession(VERSION, **kwargs)
    s.receive_data(NEGOTIATE)
    command = s.next_command()
    assert command == QmpCommand("qmp_capabilities", {})
    s.reply({})
    take(s)
    return s


# -- the protocol, step by step ----------------------------------------------------


def test_greeting_then_negotiation() -> None:
    s = QmpSession(VERSION)
    assert s.state is QmpSessionState.GREETING
    assert take(s) == b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "test"}, ' \
                      b'"capabilities": []}}\r\n'
    s.send_event(qmp_event("DROPPED"))  # no event before negotiation
    s.receive_data(b'{"execute": "query-status", "id": 1}' + NEGOTIATE[:-1])
    assert s.next_command() is None  # refused, and the capabilities command is not complete yet
    assert lines(take(s)) == [{"error": {"class": "CommandNotFound",
                                         "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                               "id": 1}]
    s.receive_data(b"}")
    assert s.next_command() == QmpCommand("qmp_capabilities", {})
    assert s.next_command() is None  # one at a time
    s.reply(None)  # whatever the owner's value, the answer is {}
    assert s.state is QmpSessionState.NEGOTIATED
    assert take(s) == b'{"return": {}}\r\n'
    s.receive_data(b'{"execute": "qmp_capabilities", "id": "again"}')
    assert s.next_command() is None
    assert lines(take(s)) == [{"error": {"class": "CommandNotFound",
                                         "desc": "Capabilities negotiation is already complete, command ignored"},
                               "id": "again"}]
    s.send_event(qmp_event("SEEN", {"x": 1}))
    assert [e["event"] for e in lines(take(s))] == ["SEEN"]


def test_a_capability_asked_for_is_refused_and_negotiation_goes_on() -> None:
    s = QmpSession(VERSION)
    take(s)
    s.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 7}')
    command = s.next_command()
    assert command == QmpCommand("qmp_capabilities", {"enable": ["oob"]}, True, 7)
    s.reply({})
    assert lines(take(s)) == [{"error": {"class": "GenericError", "desc": "Capability oob not available"},
                               "id": 7}]
    assert s.state is QmpSessionState.GREETING
    s.receive_data(NEGOTIATE)
    command = s.next_command()
    assert command is not None
    s.fail("GenericError", "Parameter 'x' is unexpected")  # the owner's argument check refused it
    assert s.state is QmpSessionState.GREETING
    take(s)
    s.receive_data(NEGOTIATE)
    assert s.next_command() is not None
    s.reply({})
    assert s.state is QmpSessionState.NEGOTIATED


@pytest.mark.parametrize(("raw", "desc"), [
    (b'{"execute": "x", "frobnicate": 1, "id": 3}', "QMP input member 'frobnicate' is unexpected"),
    (b'{"arguments": {}, "id": 3}', "QMP input lacks member 'execute'"),
    (b'{"execute": null, "id": 3}', "QMP input member 'execute' must be a string"),
    (b'{"execute": 5, "id": 3}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": [1], "id": 3}', "QMP input member 'arguments' must be an object"),
])
def test_envelope_errors_in_qemus_words_with_the_id(raw: bytes, desc: str) -> None:
    s = negotiated()
    s.receive_data(raw)
    assert s.next_command() is None
    assert lines(take(s)) == [{"error": {"class": "GenericError", "desc": desc}, "id": 3}]


@pytest.mark.parametrize(("raw", "desc"), [
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'"text" ', "QMP input must be a JSON object"),
    (b'{"execute": }', "JSON parse error, Expecting value: line 1 column 13 (char 12)"),
    (b'{"execute": "\xc3\x28"}', "JSON parse error, invalid UTF-8 sequence in string"),
])
def test_input_errors_have_no_id(raw: bytes, desc: str) -> None:
    s = negotiated()
    s.receive_data(raw)
    assert s.next_command() is None
    assert lines(take(s)) == [{"error": {"class": "GenericError", "desc": desc}}]


def test_a_null_id_is_echoed_and_an_absent_one_is_not() -> None:
    s = negotiated()
    s.receive_data(b'{"execute": "a", "id": null}{"execute": "b"}')
    a = s.next_command()  # one at a time: "b" comes once "a" is answered
    assert a == QmpCommand("a", {}, has_id=True, id=None)
    s.reply(1)
    b = s.next_command()
    assert b == QmpCommand("b", {}, has_id=False)
    s.fail("GenericError", "no")
    assert s.next_command() is None
    assert take(s) == b'{"return": 1, "id": null}\r\n{"error": {"class": "GenericError", "desc": "no"}}\r\n'


def test_errors_wait_their_turn_behind_a_running_command() -> None:
    s = negotiated()
    s.receive_data(b'{"execute": "slow", "id": 1}[0]{"execute": "next", "id": 2}')
    slow = s.next_command()
    assert slow is not None and slow.id == 1
    s.send_event(qmp_event("MEANWHILE"))  # events do not wait
    assert s.next_command() is None
    assert [m.get("event") for m in lines(take(s))] == ["MEANWHILE"]
    s.reply("done")
    following = s.next_command()
    assert following is not None and following.id == 2
    s.reply("next done")
    assert lines(take(s)) == [{"return": "done", "id": 1},
                              {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}},
                              {"return": "next done", "id": 2}]


def test_ten_thousand_pipelined_commands_answered_at_once() -> None:
    s = negotiated()
    count = 10_000
    s.receive_data(b"".join(b'{"execute": "query-status", "id": %d}' % i for i in range(count)))
    seen = 0
    while (command := s.next_command()) is not None:
        assert command.id == seen
        s.reply({"running": True})
        seen += 1
    assert seen == count
    assert [m["id"] for m in lines(take(s))] == list(range(count))


def test_input_too_large_is_answered_then_the_session_closes() -> None:
    s = negotiated(max_message_bytes=100)
    s.receive_data(b'{"execute": "ok", "id": 1}{"execute": "big", "id": "' + b"x" * 200)
    ok = s.next_command()
    assert ok is not None
    s.receive_data(b'"}{"execute": "after"}')  # past the bound: not read
    s.reply({})
    assert s.next_command() is None
    assert s.closed and s.close_reason == "its input ran past 100 bytes"
    assert lines(take(s)) == [{"return": {}, "id": 1},
                              {"error": {"class": "GenericError",
                                         "desc": "JSON parse error, input larger than 100 bytes"}}]


def test_a_peer_that_does_not_read_is_closed_and_its_output_dropped() -> None:
    s = negotiated(max_output_bytes=1000)
    s.receive_data(b'{"execute": "chatty"}' * 100)
    replies = 0
    while (command := s.next_command()) is not None:
        s.reply("y" * 50)
        replies += 1
    assert s.closed and s.close_reason == "it does not read its replies and events"
    assert replies < 100 and s.data_to_send() == b""


def test_a_peer_that_reads_is_not_closed() -> None:
    s = negotiated(max_output_bytes=1000)
    for _ in range(100):
        s.receive_data(b'{"execute": "chatty"}')
        command = s.next_command()
        assert command is not None
        s.reply("y" * 50)
        take(s)
    assert s.state is QmpSessionState.NEGOTIATED


def test_input_is_wanted_only_while_few_commands_wait_and_little_output_does() -> None:
    """QEMU stops reading a monitor with 8 commands queued; so does the owner
    of a session, told by ``wants_input``.  Output that waits to go out (a peer
    that does not read) stops it too; both start it again once cleared."""
    s = negotiated()
    assert s.wants_input
    s.receive_data(b'{"execute": "slow"}')
    command = s.next_command()
    assert command is not None and s.wants_input  # one running, none queued
    s.receive_data(b'{"execute": "next"}' * (MAX_QUEUED_COMMANDS - 1))
    assert s.next_command() is None and s.wants_input  # the first still runs: 7 wait
    s.receive_data(b'{"execute": "next"}')
    assert not s.wants_input  # 8 wait
    s.reply(None)
    assert s.next_command() is not None and s.wants_input  # 7 wait again
    while s.running is not None:
        s.reply("y" * 100_000)
        s.next_command()
    assert not s.wants_input  # more than OUTPUT_PAUSE_BYTES wait to go out
    assert len(s.data_to_send()) > OUTPUT_PAUSE_BYTES
    take(s)
    assert s.wants_input
    s.close()
    assert not s.wants_input


def test_a_result_that_is_not_json_is_answered_with_an_error() -> None:
    """Every command gets exactly one reply: a result the owner got wrong (not
    JSON) becomes a GenericError with the command's id, and the next runs."""
    s = negotiated()
    s.receive_data(b'{"execute": "odd", "id": 7}{"execute": "next", "id": 8}')
    assert s.next_command() is not None
    s.reply({"value": object()})
    command = s.next_command()
    assert command is not None and command.id == 8
    s.reply(None)
    first, second = lines(take(s))
    assert first["id"] == 7 and first["error"]["class"] == "GenericError"
    assert first["error"]["desc"].startswith("the result of 'odd' cannot be sent")
    assert second == {"return": None, "id": 8}


def test_end_of_input_closes_the_session_once_what_came_before_is_answered() -> None:
    """Regression: end of file right after a command that waited for an answer
    (a script piping commands to the socket, then shutting down its writing
    side) dropped that command's answer and every command after it."""
    s = negotiated()
    s.receive_data(b'{"execute": "slow", "id": 1}{"execute": "queued", "id": 2}')
    assert s.next_command() is not None
    s.receive_data(b"")
    s.receive_data(b'{"execute": "too-late"}')  # nothing past the end is read
    assert not s.closed and not s.wants_input
    s.reply("slow's")
    command = s.next_command()
    assert command is not None and command.name == "queued" and not s.closed
    s.reply("queued's")
    assert s.next_command() is None and s.closed and s.close_reason is None
    assert lines(take(s)) == [{"return": "slow's", "id": 1}, {"return": "queued's", "id": 2}]


def test_end_of_input_with_nothing_to_answer_closes_at_once() -> None:
    s = negotiated()
    s.receive_data(b"")
    assert s.closed and s.close_reason is None and s.data_to_send() == b""


def test_misuse_by_the_owner_raises() -> None:
    s = negotiated()
    with pytest.raises(StateError):
        s.reply({})
    with pytest.raises(StateError):
        s.fail("GenericError", "no")
    s.send_event(qmp_event("E"))
    pending = len(s.data_to_send())
    with pytest.raises(LocalProtocolError):
        s.data_sent(pending + 1)
    s.data_sent(10)
    assert len(s.data_to_send()) == pending - 10
    assert len(s.data_to_send(5)) == 5


# -- properties ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(["qmp_capabilities", "query-a", "query-b", "fail-c"])
commands = st.fixed_dictionaries(
    {"execute": names},
    optional={"arguments": st.dictionaries(st.text(max_size=4), json_values, max_size=2), "id": json_values})
bad_inputs = st.sampled_from([
    b'{"execute": 5}', b'{"arguments": {}}', b'{"execute": "x", "arguments": [1]}', b'{"execute": "x", "y": 1}',
    b"[1, 2]", b'"text"', b"42", b'{"execute": }', b"\x01", b'{"execute": "\xc3\x28"}', b'{"a": NaN}',
])
inputs = st.lists(commands.map(lambda m: json.dumps(m).encode()) | bad_inputs, max_size=12)


def chunked(stream: bytes, data: st.DataObject) -> list[bytes]:
    """``stream`` cut anywhere, as reads would return it: no empty chunk (an
    empty read is the peer hanging up)."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8))))
    return [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@given(inputs, st.data())
def test_any_split_and_any_answer_timing_give_the_same_commands_and_replies(
        messages: list[bytes], data: st.DataObject) -> None:
    stream = b" ".join([NEGOTIATE, *messages]) + b" "
    whole = Driver(QmpSession(VERSION))
    whole.feed(stream)
    whole.finish()
    split = Driver(QmpSession(VERSION))
    for chunk in chunked(stream, data):
        split.feed(chunk, defer=data.draw(st.booleans()))
    split.finish()
    assert split.commands == whole.commands
    assert split.output == whole.output


kinds = st.sampled_from(["ok", "fail", "member", "arguments", "execute", "lacks", "capabilities"])


def _request(kind: str, ident: int) -> bytes:
    return json.dumps({
        "ok": {"execute": "query-x", "id": ident},
        "fail": {"execute": "fail-x", "id": ident},
        "member": {"execute": "query-x", "id": ident, "extra": 1},
        "arguments": {"execute": "query-x", "arguments": "no", "id": ident},
        "execute": {"execute": ["query-x"], "id": ident},
        "lacks": {"id": ident},
        "capabilities": {"execute": "qmp_capabilities", "id": ident},
    }[kind]).encode()


@given(st.lists(st.tuples(kinds, st.booleans(), st.booleans()), max_size=30))
def test_every_input_gets_one_reply_in_order_with_its_id(plan: list[tuple[str, bool, bool]]) -> None:
    driver = Driver(QmpSession(VERSION))
    driver.feed(b'{"execute": "qmp_capabilities", "id": "negotiate"}')
    for ident, (kind, defer, event) in enumerate(plan):
        driver.feed(_request(kind, ident), defer=defer)
        if event:
            driver.session.send_event(qmp_event("TICK", {"after": ident}))
            driver.run()
    driver.finish()
    replies = [m for m in lines(driver.output)[1:] if "event" not in m]
    assert [m["id"] for m in replies] == ["negotiate", *range(len(plan))]
    assert replies[0] == {"return": {}, "id": "negotiate"}
    for (kind, _, _), reply in zip(plan, replies[1:], strict=True):
        if kind == "ok":
            assert reply["return"] == {"ran": "query-x", "arguments": {}}
        else:
            assert reply["error"]["class"] == ("CommandNotFound" if kind == "capabilities" else "GenericError")
    events = [m["data"]["after"] for m in lines(driver.output) if "event" in m]
    assert events == [i for i, (_, _, event) in enumerate(plan) if event]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64) | inputs.map(b"".join), max_size=6), st.booleans())
def test_no_input_makes_it_raise(chunks: list[bytes], negotiate: bool) -> None:
    driver = Driver(QmpSession(VERSION, max_message_bytes=48, max_output_bytes=2048))
    if negotiate:
        driver.feed(NEGOTIATE)
    for chunk in chunks:
        driver.feed(chunk, defer=True)
    driver.finish()
    for message in lines(driver.output):
        assert set(message) <= {"QMP", "return", "error", "id", "event", "timestamp", "data"}


class SessionMachine(RuleBasedStateMachine):
    """Any sequence of operations: states only move forward, one command runs at
    a time, events only after negotiation, and once closed nothing more goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.s = QmpSession(VERSION, max_message_bytes=200, max_output_bytes=4096)
        self.states = [self.s.state]
        self.unsent = len(self.s.data_to_send())
        self.was_closed = False  # closed before the last step
        self.sent = bytearray()

    @rule(data=st.sampled_from([NEGOTIATE, b'{"execute": "q", "id": 1}', b'{"execute": "fail-q"}', b"[",
                                b"]", b"}", b'{"execute": "q", "arguments": {"enable": ["oob"]}}',
                                b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
                                b'"' + b"z" * 300, b"\x01", b""]))
    def receive(self, data: bytes) -> None:
        self.s.receive_data(data)

    @rule()
    def next_command(self) -> None:
        running = self.s.running
        command = self.s.next_command()
        if running is not None:
            assert command is None
        if self.s.closed:
            assert command is None

    @precondition(lambda self: self.s.running is not None)
    @rule()
    def answer(self) -> None:
        command = self.s.running
        assert command is not None
        answer(self.s, command)

    @rule()
    def event(self) -> None:
        self.s.send_event(qmp_event("E"))

    @rule(n=st.integers(0, 300))
    def write(self, n: int) -> None:
        data = self.s.data_to_send(n)
        self.s.data_sent(len(data))
        self.sent += data

    @rule()
    def close(self) -> None:
        self.s.close()

    @invariant()
    def states_move_forward(self) -> None:
        if self.s.state is not self.states[-1]:
            self.states.append(self.s.state)
        order = list(QmpSessionState)
        assert [order.index(x) for x in self.states] == sorted(order.index(x) for x in self.states)

    @invariant()
    def closed_means_nothing_more_goes_out(self) -> None:
        # The step that closes may queue (the error that closed it); later ones queue nothing.
        unsent = len(self.s.data_to_send())
        if self.was_closed:
            assert unsent <= self.unsent
        self.unsent, self.was_closed = unsent, self.s.closed

    @invariant()
    def events_only_after_negotiation(self) -> None:
        out = lines(bytes(self.sent[:self.sent.rfind(b"\r\n") + 2])) if b"\r\n" in self.sent else []
        negotiated = False
        for message in out:
            if "event" in message:
                assert negotiated
            if message.get("return") == {} and not negotiated:
                negotiated = True


TestSessionMachine = SessionMachine.TestCase
