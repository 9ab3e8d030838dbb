"""CURVE key files, the ZAP request codec and policy, and the ZAP handler
with real ZeroMQ sockets (protocol.channel's _curve)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from zmq.utils import z85

from protocol import RemoteProtocolError, UnsafePathError
from protocol.channel import (
    KeyPair,
    Refusal,
    ZapHandler,
    ZapPolicy,
    ZapRequest,
    curve_client,
    curve_server,
    generate_key_pair,
    handshake_refusal,
    load_authorized_keys,
    load_key_pair,
    load_public_key,
    write_key_file,
)

# -- key files -------------------------------------------------------------------


def test_keygen_writes_a_pair_that_loads_back(tmp_path: Any) -> None:
    keys = str(tmp_path / "keys")
    public, secret = generate_key_pair(keys, "node-1")
    assert (public, secret) == (f"{keys}/node-1.key", f"{keys}/node-1.key_secret")
    assert os.stat(keys).st_mode & 0o777 == 0o700
    assert os.stat(secret).st_mode & 0o777 == 0o600 and os.stat(public).st_mode & 0o777 == 0o644
    pair = load_key_pair(secret)
    assert load_public_key(public) == pair.public and len(pair.secret) == 40
    assert zmq.curve_public(pair.secret) == pair.public  # the two halves belong together
    with pytest.raises(FileExistsError):
        generate_key_pair(keys, "node-1")  # never overwritten
    assert load_key_pair(secret) == pair


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a b", "x" * 65, "é"])
def test_keygen_refuses_a_bad_name(tmp_path: Any, name: str) -> None:
    with pytest.raises(ValueError, match="not a key name"):
        generate_key_pair(str(tmp_path), name)
    assert os.listdir(tmp_path) == []


def test_a_secret_key_others_can_read_is_refused(tmp_path: Any) -> None:
    _, secret = generate_key_pair(str(tmp_path / "k"), "a")
    os.chmod(secret, 0o640)
    with pytest.raises(UnsafePathError, match="chmod 600"):
        load_key_pair(secret)
    link = str(tmp_path / "link.key_secret")
    os.chmod(secret, 0o600)
    os.symlink(secret, link)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        load_key_pair(link)


def test_files_that_are_no_keys_are_refused_clearly(tmp_path: Any) -> None:
    path = tmp_path / "x.key"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="not a ZeroMQ key file"):
        load_public_key(str(path))
    path.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(ValueError, match="no public key"):
        load_public_key(str(path))
    path.write_text('curve\n    public-key = "' + "~" * 40 + '"\n')  # forty characters, not Z85
    with pytest.raises(ValueError, match="not Z85"):
        load_public_key(str(path))
    big = tmp_path / "big.key"
    big.write_bytes(b"#" * (1 << 20))
    with pytest.raises(ValueError, match="bytes"):
        load_public_key(str(big))
    public_only = tmp_path / "p.key_secret"
    write_key_file(str(public_only), KeyPair.generate().public)
    os.chmod(public_only, 0o600)
    with pytest.raises(ValueError, match="no secret key"):
        load_key_pair(str(public_only))


def test_authorized_keys_directory(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o700)
    publics = {}
    for name in ("r0", "r1"):
        public, _ = generate_key_pair(str(keys), name)
        (auth / f"{name}.key").write_bytes(open(public, "rb").read())
        publics[load_public_key(public)] = name
    (auth / "README").write_text("not a key: ignored\n")
    assert load_authorized_keys(str(auth)) == publics
    # A planted link is refused, not followed; so is a key file others may write, and the directory too.
    os.symlink(str(keys / "r0.key"), auth / "planted.key")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        load_authorized_keys(str(auth))
    os.unlink(auth / "planted.key")
    os.chmod(auth / "r1.key", 0o666)
    with pytest.raises(UnsafePathError, match="writable by others"):
        load_authorized_keys(str(auth))
    os.chmod(auth / "r1.key", 0o644)
    os.chmod(auth, 0o777)
    with pytest.raises(UnsafePathError, match="writable by others"):
        load_authorized_keys(str(auth))
    os.chmod(auth, 0o700)
    with pytest.raises(UnsafePathError, match="not a directory"):
        load_authorized_keys(str(auth / "r0.key"))


# -- ZAP, pure ---------------------------------------------------------------------

CLIENT = KeyPair.generate()
RAW_CLIENT_KEY = z85.decode(CLIENT.public)


def _frames(mechanism: bytes = b"CURVE", credentials: tuple[bytes, ...] = (RAW_CLIENT_KEY,)) -> list[bytes]:
    return [b"1.0", b"7", b"data", b"192.0.2.2", b"", mechanism, *credentials]


def test_the_policy_lets_in_authorised_curve_keys_only() -> None:
    policy = ZapPolicy({CLIENT.public: "r0"})
    assert policy.decide(ZapRequest.from_frames(_frames())) == (True, "r0")
    request = ZapRequest.from_frames(_frames())
    assert (request.domain, request.address, request.client_key()) == ("data", "192.0.2.2", CLIENT.public.decode())
    other = z85.decode(KeyPair.generate().public)
    assert policy.decide(ZapRequest.from_frames(_frames(credentials=(other,)))) == (
        False, "its key is not authorised")
    assert policy.decide(ZapRequest.from_frames(_frames(b"NULL", ()))) == (
        False, "the NULL mechanism is not accepted: CURVE only")
    assert policy.decide(ZapRequest.from_frames(_frames(credentials=(b"short",))))[0] is False
    policy.set_authorized([])
    assert policy.decide(ZapRequest.from_frames(_frames()))[0] is False


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_frames_parse_or_raise_remote_protocol_error(frames: list[bytes]) -> None:
    try:
        request = ZapRequest.from_frames(frames)
    except RemoteProtocolError:
        return
    assert frames[0] == b"1.0" and 6 <= len(frames) <= 16
    ZapPolicy({CLIENT.public: "r0"}).decide(request)  # decides, never raises


@pytest.mark.parametrize("cut", range(6))
def test_every_truncation_of_a_request_is_refused(cut: int) -> None:
    with pytest.raises(RemoteProtocolError):
        ZapRequest.from_frames(_frames()[:cut])


def test_handshake_failures_map_to_refusals() -> None:
    crypto = handshake_refusal(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, "control")
    assert crypto is not None and "wrong server key" in crypto.reason and crypto.channel == "control"
    mismatch = handshake_refusal(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                 zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, "data")
    assert mismatch is not None and "no CURVE" in mismatch.reason
    assert handshake_refusal(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, "data") is not None
    assert handshake_refusal(zmq.EVENT_ACCEPTED, 0, "data") is None


# -- the handler, with real sockets --------------------------------------------------


def test_the_handler_keeps_out_whoever_is_not_authorised() -> None:
    """A ROUTER serving CURVE behind a ZapHandler: an authorised client's
    message arrives; an unauthorised key, a wrong server key and a plain
    client are refused, the first with its address and key."""
    zctx = zmq.Context()
    refused: list[Refusal] = []
    server = KeyPair.generate()
    handler = ZapHandler(zctx, ZapPolicy({CLIENT.public: "good"}), refused.append)
    router = zctx.socket(zmq.ROUTER)
    sockets = [router]
    try:
        curve_server(router, server, "data")
        router.bind("tcp://127.0.0.1:*")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)

        def client(keys: KeyPair | None, server_key: bytes, name: bytes) -> None:
            sock = zctx.socket(zmq.DEALER)
            sockets.append(sock)
            sock.identity = name
            if keys is not None:
                curve_client(sock, keys, server_key)
            sock.connect(endpoint)
            sock.send(b"hello from " + name)

        client(CLIENT, server.public, b"good")
        client(KeyPair.generate(), server.public, b"stranger")
        client(CLIENT, KeyPair.generate().public, b"wrong-server")
        client(None, b"", b"plain")
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(handler.socket, zmq.POLLIN)
        received: list[list[bytes]] = []
        deadline = time.monotonic() + 10
        while not (received and refused) and time.monotonic() < deadline:
            for sock, _ in poller.poll(100):
                if sock is router:
                    received.append(router.recv_multipart())
                else:
                    handler.drain()
        assert received == [[b"good", b"hello from good"]]
        assert [(r.channel, r.address, r.key, r.reason) for r in refused] == [
            ("data", "127.0.0.1", refused[0].key, "its key is not authorised")]
        assert refused[0].key != CLIENT.public.decode() and len(refused[0].key) == 40
        assert router.poll(0) == 0  # nobody else got through
    finally:
        for sock in sockets:
            sock.close(linger=0)
        handler.close()
        zctx.term()
