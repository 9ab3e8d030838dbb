"""One QMP session, sans I/O: bytes in, commands to run, reply bytes out.

Theory of operation
-------------------
A ``QmpSession`` is the server's half of one QMP connection with no socket,
clock or thread of its own: its owner feeds it what the peer wrote
(``receive_data``), asks it for the next command to run (``next_command``),
answers that command (``reply`` or ``fail``), hands it events
(``send_event``) and writes out what it says (``data_to_send``, then
``data_sent`` with how much the socket took).

States, each entered only from the one before::

    GREETING --qmp_capabilities answered--> NEGOTIATED
        |                                        |
        +---- close, end of input answered, input too large, output overflow ----> CLOSED

- ``GREETING``: the greeting is queued at creation.  Only ``qmp_capabilities``
  is run; any other command gets CommandNotFound.  Events are dropped.
- ``NEGOTIATED``: commands run; a second ``qmp_capabilities`` is refused;
  events go out as they come, between replies.
- ``CLOSED``: nothing more is queued (what was queued before, such as the error
  that closed the session, is still handed out).  Input is ignored, answers to
  a command that was running are dropped.

Rules:

- End of input (``receive_data(b"")``: the peer shut down its writing side,
  or hung up) is no reason to drop what came before: those commands are
  still run and answered, in order, and then the session closes (a script
  that writes its commands and closes its end reads every reply).
- Commands run one at a time, in the order they came (QEMU's in-band
  commands; no OOB): ``next_command`` gives a command only once the one before
  was answered, and answering does not run anything.  The owner loops on
  ``next_command`` until it returns ``None`` (a command is running, or the
  input is used up), so any number of commands answered at once costs no stack.
- Every input gets exactly one reply, in input order, with its ``id`` when it
  had one (any JSON value, null included, echoed as it came; none when
  absent): bad JSON and bad envelopes are answered by the session itself
  (GenericError, QEMU's texts), when their turn comes.
- Arguments are the owner's business (which commands exist and what they
  take), ``qmp_capabilities``' included: the session yields it like any
  command.  What it means is the session's: a reply to it ends negotiation,
  unless it asked for a capability, and this server offers none.
- Input is taken only as fast as it is answered: ``wants_input`` is false
  while ``MAX_QUEUED_COMMANDS`` commands wait (QEMU's QMP_REQ_QUEUE_LEN_MAX:
  it stops reading a monitor then) or while replies wait to go out past
  ``OUTPUT_PAUSE_BYTES`` (a peer that sends without reading), and the owner
  then reads nothing more until it is true again: what one session holds is
  bounded by what one read brings, whatever the peer writes.
- Output is bounded: when unsent output passes ``max_output_bytes`` (events
  to a peer that does not read), the session drops it and closes.  Input is
  bounded per message (``max_message_bytes``); a larger one is answered and
  closes the session.
- Nothing the peer sends makes a method raise.  Misuse by the owner (answering
  when no command runs, acknowledging bytes never handed out) raises.

Not thread-safe: one thread drives a session.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .._errors import LocalProtocolError, StateError
from ._wire import QmpDecoder, QmpInputError, qmp_error, qmp_line, qmp_return

__all__ = ["QmpCommand", "QmpSession", "QmpSessionState"]

CAPABILITIES_COMMAND = "qmp_capabilities"
MAX_QUEUED_COMMANDS = 8  # QEMU's QMP_REQ_QUEUE_LEN_MAX: no more input read while this many wait
OUTPUT_PAUSE_BYTES = 256 * 1024  # no more input read while this much output waits to go out
_ENVELOPE_MEMBERS = ("execute", "arguments", "id")


class QmpSessionState(Enum):
    #: The greeting went out; only qmp_capabilities runs, events are dropped.
    GREETING = "greeting"
    #: Capabilities negotiated: commands run and events go out.
    NEGOTIATED = "negotiated"
    #: Nothing more goes out.
    CLOSED = "closed"


@dataclass(frozen=True)
class QmpCommand:
    """A command to run: its name, its arguments (``{}`` when absent) and its id.

    ``has_id`` tells an absent id from ``"id": null``; the id is echoed verbatim.
    """

    name: str
    arguments: dict[str, Any]
    has_id: bool = False
    id: Any = None


class QmpSession:
    """The protocol state of one QMP connection.

    :param version: the greeting's version, in ``query-version``'s shape.
    :param max_message_bytes: the largest input message taken.
    :param max_output_bytes: the most unsent output kept before closing.
    """

    def __init__(self, version: dict[str, Any], *, max_message_bytes: int = 1 << 20,
                 max_output_bytes: int = 16 << 20) -> None:
        self.state = QmpSessionState.GREETING
        #: Why the session closed by itself (None while open, or when its owner
        #: or the peer closed it).
        self.close_reason: str | None = None
        self.max_output_bytes = max_output_bytes
        self._decoder = QmpDecoder(max_message_bytes)
        self._input: deque[dict[str, Any] | QmpInputError] = deque()
        self._input_ended = False  # past a fatal input error: the rest is not read
        self._peer_done = False  # end of file: what came before is still run and answered, then it closes
        self._running: QmpCommand | None = None
        self._out = bytearray()
        self._queue({"QMP": {"version": version, "capabilities": []}})

    @property
    def closed(self) -> bool:
        return self.state is QmpSessionState.CLOSED

    @property
    def running(self) -> QmpCommand | None:
        """The command handed out and not answered yet."""
        return self._running

    # -- input -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes the peer wrote; ``b""`` means it will write no more: the
        commands it sent before are still run and answered, in order, then the
        session closes (a peer that shut down its writing side reads them all)."""
        if self.closed:
            return
        if not data:
            self._peer_done = True
            self._input_ended = True
            self._finish_if_done()
            return
        if self._input_ended:
            return
        for item in self._decoder.feed(data):
            self._input.append(item)
            if isinstance(item, QmpInputError) and item.fatal:
                self._input_ended = True
                break

    @property
    def wants_input(self) -> bool:
        """Whether the owner should read more of the peer's input now: not
        while ``MAX_QUEUED_COMMANDS`` inputs wait to be run or answered, nor
        while more than ``OUTPUT_PAUSE_BYTES`` of output wait to go out, nor
        after end of input or once closed.  The owner checks again after running commands and after
        sending output."""
        return (not self.closed and not self._peer_done and len(self._input) < MAX_QUEUED_COMMANDS
                and len(self._out) <= OUTPUT_PAUSE_BYTES)

    def next_command(self) -> QmpCommand | None:
        """The next command to run, or None while one runs or no input is left.

        Input errors and envelope errors met on the way are answered here.
        """
        command = self._next_command()
        if command is None:
            self._finish_if_done()
        return command

    def _finish_if_done(self) -> None:
        """After end of file: close once every command it sent is answered."""
        if self._peer_done and self._running is None and not self._input:
            self._close(None)

    def _next_command(self) -> QmpCommand | None:
        while self._running is None and self._input and not self.closed:
            item = self._input.popleft()
            if isinstance(item, QmpInputError):
                self._queue(qmp_error("GenericError", item.desc))
                if item.fatal:
                    self._close(f"its input ran past {self._decoder.max_message_bytes} bytes")
                continue
            command = self._command(item)
            if command is not None:
                self._running = command
                return command
        return None

    def _command(self, msg: dict[str, Any]) -> QmpCommand | None:
        """The command ``msg`` asks for, or None when it was refused (and answered)."""
        has_id, ident = "id" in msg, msg.get("id")

        def refuse(error_class: str, desc: str) -> None:
            self._queue(qmp_error(error_class, desc, has_id, ident))

        for key in msg:
            if key not in _ENVELOPE_MEMBERS:
                refuse("GenericError", f"QMP input member '{key}' is unexpected")
                return None
        if "execute" not in msg:
            refuse("GenericError", "QMP input lacks member 'execute'")
            return None
        name = msg["execute"]
        if not isinstance(name, str):  # null included
            refuse("GenericError", "QMP input member 'execute' must be a string")
            return None
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            refuse("GenericError", "QMP input member 'arguments' must be an object")
            return None
        negotiating = self.state is QmpSessionState.GREETING
        if negotiating and name != CAPABILITIES_COMMAND:
            refuse("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            return None
        if not negotiating and name == CAPABILITIES_COMMAND:
            refuse("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
            return None
        return QmpCommand(name, arguments, has_id, ident)

    # -- answers and events ----------------------------------------------------

    def reply(self, value: Any) -> None:
        """Answer the running command with a return value.

        The answer to ``qmp_capabilities`` is ``{}`` and ends negotiation, unless
        it asked for a capability (none is offered).
        """
        command = self._answered()
        if command is None:
            return
        if command.name == CAPABILITIES_COMMAND:
            enable = command.arguments.get("enable", [])
            if enable:
                first = enable[0] if isinstance(enable, list) else enable
                self._queue(qmp_error("GenericError", f"Capability {first} not available",
                                      command.has_id, command.id))
                return
            self.state = QmpSessionState.NEGOTIATED
            value = {}
        try:
            line = qmp_line(qmp_return(value, command.has_id, command.id))
        except (TypeError, ValueError) as exc:  # not JSON: the command is answered all the same
            line = qmp_line(qmp_error("GenericError", f"the result of '{command.name}' cannot be sent: {exc}",
                                      command.has_id, command.id))
        self._queue_line(line)

    def fail(self, error_class: str, desc: str) -> None:
        """Answer the running command with an error."""
        command = self._answered()
        if command is not None:
            self._queue(qmp_error(error_class, desc, command.has_id, command.id))

    def _answered(self) -> QmpCommand | None:
        """The running command, now answered; None when closed (the answer is dropped)."""
        command, self._running = self._running, None
        if self.closed:
            return None
        if command is None:
            raise StateError("no QMP command is running: there is nothing to answer")
        return command

    def send_event(self, event: dict[str, Any]) -> None:
        """Queue an event (``qmp_event``'s shape); dropped until negotiation is done."""
        if self.state is QmpSessionState.NEGOTIATED:
            self._queue(event)

    # -- output ----------------------------------------------------------------

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Unsent output (at most ``max_bytes``), kept until ``data_sent`` says it went out."""
        return bytes(self._out if max_bytes is None else self._out[:max_bytes])

    def data_sent(self, nbytes: int) -> None:
        """The first ``nbytes`` of the unsent output went out."""
        if not 0 <= nbytes <= len(self._out):
            raise LocalProtocolError(f"{nbytes} bytes sent, but {len(self._out)} were waiting")
        del self._out[:nbytes]

    def _queue(self, obj: dict[str, Any]) -> None:
        self._queue_line(qmp_line(obj))

    def _queue_line(self, line: bytes) -> None:
        if self.closed:
            return
        self._out += line
        if len(self._out) > self.max_output_bytes:
            self._out.clear()
            self._close("it does not read its replies and events")

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the session: input is dropped, nothing more is queued."""
        self._close(None)

    def _close(self, reason: str | None) -> None:
        if self.closed:
            return
        self.state = QmpSessionState.CLOSED
        self.close_reason = reason
        self._input.clear()
        self._input_ended = True
