"""CURVE security for tcp:// channels: key files, and who may come in.

Theory of operation
-------------------
Over tcp:// every channel of a cluster is encrypted and authenticated with
ZeroMQ's CURVE (CurveZMQ: each side proves it holds the secret key of a
public key the other knows).  A socket that *binds* (the main loop's control
ROUTER, an iothread's data ROUTER) is a CURVE server with a key pair of its
own; one that *connects* (an iothread's control DEALER, a block client) is a
CURVE client with its own key pair and the server's public key.  This is
ZeroMQ's "ironhouse" pattern:

* a client that has the wrong server key, or speaks no CURVE at all, fails
  the handshake inside libzmq; the server's socket monitor reports it
  (``HANDSHAKE_FAILED_PROTOCOL``), with the endpoint it came to but not its
  address (``handshake_refusal``);
* a client that passes the handshake is checked by the process's ZAP handler
  (ZeroMQ RFC 27, a REP socket bound at ``ZAP_ENDPOINT`` in the same ZeroMQ
  context; libzmq asks it before the connection carries a message): only
  public keys in the cluster's authorised set get in (``ZapPolicy``), and the
  refusal names the client's address and key.

Every refusal goes to ``on_refused`` (a ``Refusal``): the owner logs it
through a ``ThrottledLog`` and raises an event; a client that keeps
reconnecting with a bad key is refused every time, and said a few times.

The ZAP handler must be bound *before* a secured socket binds: with no
handler, libzmq lets every client with a valid handshake in.

Key files are ZeroMQ's certificate files, written and read by pyzmq's
``zmq.auth`` (``NAME.key``: the public key; ``NAME.key_secret``: both).  A
secret key file must be a regular file of this user that nobody else can
read; a directory of authorised keys one that nobody else can write, holding
regular files only (a symbolic link planted there is refused, not followed).

``ZapRequest``, ``ZapPolicy`` and ``handshake_refusal`` are pure;
``ZapHandler`` owns its socket and is served by an event loop as a
``Channel`` is (``fileno``/``drain``/``pending_input``/``kick``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import zmq
import zmq.auth
from zmq.utils import z85

from ._channel import has_input

from .._errors import RemoteProtocolError, UnsafePathError
from ._runtime_dir import _check_owner, open_own_file, prepare_runtime_dir

__all__ = [
    "KeyPair",
    "Refusal",
    "ZAP_ENDPOINT",
    "ZapHandler",
    "ZapPolicy",
    "ZapRequest",
    "curve_client",
    "curve_server",
    "tcp_heartbeats",
    "generate_key_pair",
    "handshake_refusal",
    "load_authorized_keys",
    "load_key_pair",
    "load_public_key",
    "local_key_paths",
    "write_key_file",
]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks its ZAP handler (RFC 27), in the same ZeroMQ context."""
ZAP_VERSION = b"1.0"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""A key's name (its files' stem): letters, digits, '_', '.', '-'; not hidden."""
Z85_KEY_LENGTH = 40  # a 32-byte CURVE key, Z85-encoded
MAX_ZAP_FRAMES = 16  # a CURVE request has 7; anything longer is not libzmq's
MAX_KEY_FILE_BYTES = 64 * 1024  # a certificate file is a few hundred bytes
LOCAL_SECRET_FILE = "local" + SECRET_SUFFIX
SERVER_PUBLIC_FILE = "server" + PUBLIC_SUFFIX


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, Z85-encoded (40 characters each), as ZeroMQ's options take it."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A peer kept out: which channel it came to ("control", "data": its
    socket's ZAP domain), from where (``address``, "" when libzmq does not
    tell), with which key (Z85, "" if unknown), why."""

    channel: str
    address: str
    key: str
    reason: str

    def as_event(self) -> dict[str, str]:
        return {"channel": self.channel, "address": self.address, "key": self.key, "reason": self.reason}


# -- key files --------------------------------------------------------------


def check_key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a key name (letters, digits, '_', '.' and '-', "
                         "at most 64, not starting with '.' or '-')")
    return name


def local_key_paths(runtime_dir: str) -> tuple[str, str]:
    """Where a tcp:// cluster keeps, in its private runtime directory, the
    key pair of its local iothreads and clients and the main loop's public key."""
    return os.path.join(runtime_dir, LOCAL_SECRET_FILE), os.path.join(runtime_dir, SERVER_PUBLIC_FILE)


def write_key_file(path: str, public: bytes, secret: bytes | None = None) -> None:
    """Write a ZeroMQ certificate file (what ``zmq.auth.load_certificate``
    reads): the public key, and the secret one if given.  Created, never
    replaced (``FileExistsError``), never through a link; mode 0600 with a
    secret key, else 0644."""
    kind = "Secret" if secret is not None else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate",
             "#   Keep the secret key file to yourself: mode 0600." if secret is not None else
             "#   Give this file to the peers that must let its owner in.",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = open_own_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret is not None else 0o644)
    try:
        if secret is None:
            os.fchmod(fd, 0o644)  # (whatever the umask took away: others must read a public key)
        os.write(fd, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(fd)


def generate_key_pair(directory: str, name: str) -> tuple[str, str]:
    """Write a new key pair as ``DIRECTORY/NAME.key`` (public, mode 0644) and
    ``DIRECTORY/NAME.key_secret`` (mode 0600), making the directory (mode
    0700) if it is missing.  Never overwrites: ``FileExistsError`` if either
    file is there.  ``UnsafePathError`` if the directory is not this user's
    private one.  Returns both paths."""
    check_key_name(name)
    prepare_runtime_dir(directory)
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists: remove it first, or choose another name")
    keys = KeyPair.generate()
    write_key_file(secret_path, keys.public, keys.secret)
    write_key_file(public_path, keys.public)
    return public_path, secret_path


def _lstat_regular(path: str) -> os.stat_result:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(path, "is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(path, "is not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: not a ZeroMQ key file ({st.st_size} bytes)")
    return st


def _load(path: str) -> tuple[bytes | None, bytes | None]:
    try:
        return cast("tuple[bytes | None, bytes | None]", zmq.auth.load_certificate(path))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a ZeroMQ key file ({exc})") from None


def _z85_key(value: bytes | None, path: str, what: str) -> bytes:
    if value is None or len(value) != Z85_KEY_LENGTH:
        raise ValueError(f"{path}: no {what} key in it")
    try:
        z85.decode(value)
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{path}: its {what} key is not Z85") from None
    return value


def load_key_pair(secret_path: str) -> KeyPair:
    """A key pair from its ``.key_secret`` file.  ``UnsafePathError`` unless
    the file is a regular file of this user that its group and others cannot
    read or write; ``ValueError`` if it holds no key pair; ``OSError`` if it
    cannot be read."""
    st = _lstat_regular(secret_path)
    _check_owner(secret_path, st)
    if st.st_mode & 0o077:
        raise UnsafePathError(secret_path, f"can be read or written by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                           f"chmod 600 {secret_path}")
    public, secret = _load(secret_path)
    return KeyPair(_z85_key(public, secret_path, "public"), _z85_key(secret, secret_path, "secret"))


def load_public_key(path: str) -> bytes:
    """The public key (Z85) of a ``.key`` file (or of a ``.key_secret``:
    its public half).  ``UnsafePathError`` if it is not a regular file or
    others can write it; ``ValueError`` if it holds no public key."""
    st = _lstat_regular(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
    return _z85_key(_load(path)[0], path, "public")


def load_authorized_keys(directory: str) -> dict[bytes, str]:
    """The public keys let in, from every ``*.key`` file of ``directory``: key
    (Z85) -> name (the file's stem).  ``UnsafePathError`` if the directory is
    a link, not this user's, or writable by others, or if one of its key files
    is not a regular file or is writable by others (a key someone could plant
    is a key anyone could use); ``ValueError`` if a key file holds no key."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(directory, "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(directory, "is not a directory")
    _check_owner(directory, st)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(directory, f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
    keys: dict[bytes, str] = {}
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(PUBLIC_SUFFIX) and not entry.startswith("."):
            keys[load_public_key(os.path.join(directory, entry))] = entry[: -len(PUBLIC_SUFFIX)]
    return keys


def curve_server(sock: zmq.Socket[Any], keys: KeyPair, channel: str) -> None:
    """Make ``sock`` a CURVE server (before it binds) whose refusals name
    ``channel``, with ``tcp_heartbeats``."""
    tcp_heartbeats(sock)
    sock.setsockopt(zmq.ZAP_DOMAIN, channel.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


def curve_client(sock: zmq.Socket[Any], keys: KeyPair, server_key: bytes) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is
    ``server_key`` (Z85; before it connects), with ``tcp_heartbeats``."""
    tcp_heartbeats(sock)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)


TCP_HEARTBEAT_IVL_MS = 1_000  # ZMTP pings on a tcp:// connection ...
TCP_HEARTBEAT_TIMEOUT_MS = 3_000  # ... and the silence after which libzmq drops it (a link down, a host gone)


def tcp_heartbeats(sock: zmq.Socket[Any]) -> None:
    """ZMTP heartbeats on ``sock``'s tcp:// connections (before it binds or
    connects): a connection whose peer is unreachable (a link down, a host
    gone: TCP itself would wait minutes) is dropped after
    ``TCP_HEARTBEAT_TIMEOUT_MS`` of silence, which its socket monitor reports
    (``EVENT_DISCONNECTED``).  libzmq's I/O threads answer the pings, so a
    peer busy in Python is not taken for dead."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, TCP_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, TCP_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, TCP_HEARTBEAT_TIMEOUT_MS)


# -- who may come in (pure) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZapRequest:
    """A ZAP request (RFC 27) as libzmq sends it."""

    request_id: bytes
    domain: str
    address: str
    mechanism: str
    credentials: tuple[bytes, ...]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> ZapRequest:
        """``RemoteProtocolError`` if the frames are not a ZAP request of version 1.0."""
        if len(frames) < 6 or len(frames) > MAX_ZAP_FRAMES:
            raise RemoteProtocolError(f"a ZAP request has 6 frames or more, not {len(frames)}")
        if frames[0] != ZAP_VERSION:
            raise RemoteProtocolError(f"ZAP version {frames[0][:16]!r}, not 1.0")
        try:
            domain, address, mechanism = (f.decode() for f in (frames[2], frames[3], frames[5]))
        except UnicodeDecodeError:
            raise RemoteProtocolError("a ZAP request's domain, address or mechanism is not UTF-8") from None
        return cls(frames[1], domain, address, mechanism, tuple(frames[6:]))

    def client_key(self) -> str:
        """The client's public key (Z85), for CURVE; "" otherwise."""
        if self.mechanism == "CURVE" and len(self.credentials) == 1 and len(self.credentials[0]) == 32:
            return z85.encode(self.credentials[0]).decode()
        return ""


def zap_reply(request_id: bytes, ok: bool, text: str, user_id: str = "") -> list[bytes]:
    """The frames of a ZAP reply: 200 (let in, as ``user_id``) or 400 (refused)."""
    return [ZAP_VERSION, request_id, b"200" if ok else b"400", text.encode(),
            user_id.encode() if ok else b"", b""]


class ZapPolicy:
    """CURVE clients whose key is authorised, and nobody else."""

    def __init__(self, authorized: Mapping[bytes, str] | Iterable[bytes] = ()) -> None:
        self.authorized: dict[str, str] = {}
        self.set_authorized(authorized)

    def set_authorized(self, authorized: Mapping[bytes, str] | Iterable[bytes]) -> None:
        """Replace the keys let in (Z85 -> a name; or Z85 keys alone)."""
        items = authorized.items() if isinstance(authorized, Mapping) else ((k, "") for k in authorized)
        self.authorized = {key.decode() if isinstance(key, bytes) else key: name for key, name in items}

    def decide(self, request: ZapRequest) -> tuple[bool, str]:
        """``(True, user_id)`` to let the client in, else ``(False, why)``."""
        if request.mechanism != "CURVE":
            return False, f"the {request.mechanism} mechanism is not accepted: CURVE only"
        key = request.client_key()
        if not key:
            return False, "no CURVE client key"
        name = self.authorized.get(key)
        if name is None:
            return False, "its key is not authorised"
        return True, name or key


def handshake_refusal(event: int, value: int, channel: str) -> Refusal | None:
    """The refusal a socket monitor's event stands for, if it is one: a
    client that failed the security handshake before the ZAP handler was asked."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            reason = "the peer speaks no CURVE (a mechanism mismatch)"
        elif value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            reason = "the CURVE handshake failed (the peer has the wrong server key?)"
        else:
            reason = f"a security handshake error (ZeroMQ protocol error {value:#x})"
    elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        reason = "the security handshake failed (the peer speaks no CURVE?)"
    else:
        return None
    return Refusal(channel, "", "", reason)


HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
"""The monitor events ``handshake_refusal`` reads."""


# -- the ZAP handler (owns its socket) ---------------------------------------------


class ZapHandler:
    """The ZAP handler of one ZeroMQ context: a REP socket at
    ``ZAP_ENDPOINT``, served by the owner's loop as a ``Channel`` is (an fd
    handler or a source on ``fileno()`` calling ``drain()``).  Home thread
    of that loop only."""

    def __init__(self, zctx: zmq.Context[Any], policy: ZapPolicy,
                 on_refused: Callable[[Refusal], object]) -> None:
        self.policy = policy
        self.on_refused = on_refused
        self.kick: Callable[[], None] = lambda: None
        self.socket = zctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self.socket.close()
            raise
        self._fd = cast(int, self.socket.getsockopt(zmq.FD))

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return bool(self.socket.closed)

    def pending_input(self) -> bool:
        return not self.socket.closed and has_input(self.socket)

    def drain(self) -> int:
        """Answer every request queued (the fd is edge-triggered).  Returns how many."""
        answered = 0
        while self.pending_input():
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                request = ZapRequest.from_frames(frames)
            except RemoteProtocolError as exc:  # not libzmq's: answer, or the REP socket is stuck
                self.socket.send_multipart(zap_reply(frames[1] if len(frames) > 1 else b"", False, str(exc)))
                continue
            ok, text = self.policy.decide(request)
            self.socket.send_multipart(zap_reply(request.request_id, ok, "OK" if ok else text, text if ok else ""))
            answered += 1
            if not ok:
                self.on_refused(Refusal(request.domain, request.address, request.client_key(), text))
        return answered

    def close(self, linger_ms: int = 0) -> None:
        if not self.socket.closed:
            self.socket.close(linger=linger_ms)
