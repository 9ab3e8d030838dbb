"""The block client and the state file it reads: a missing or foreign file is
refused with a clear error; a blocking call that times out is given up."""

from __future__ import annotations

import errno
import socket

import pytest

from iothreads import BlockClient, BlockIOError
from protocol import (
    ClusterState,
    IOThreadEntry,
    NodeEntry,
    StateError,
    cluster_state_path,
    ipc_endpoint,
)


def _write(runtime_dir: str, text: str) -> None:
    with open(cluster_state_path(runtime_dir), "w", encoding="utf-8") as f:
        f.write(text)


def test_no_cluster_or_a_foreign_file_is_a_clear_state_error(runtime_dir: str) -> None:
    with pytest.raises(StateError, match=f"no running cluster in {runtime_dir}"):
        BlockClient(runtime_dir)
    _write(runtime_dir, '{"name": "another program\'s file"}')
    with pytest.raises(StateError) as info:
        BlockClient(runtime_dir)
    assert str(info.value) == (f"{cluster_state_path(runtime_dir)}: cluster state: "
                               "missing 'runtime_dir', 'control', 'iothreads', 'nodes', 'exports'")
    _write(runtime_dir, '{"runtime_dir": "')  # torn
    with pytest.raises(StateError, match="not a cluster state file"):
        BlockClient(runtime_dir)


def test_the_client_finds_nodes_in_the_typed_state(runtime_dir: str) -> None:
    state = ClusterState(runtime_dir, "", (IOThreadEntry("io0", 1, "running"),),
                         {"n0": NodeEntry("io0", "null-co", 4096)})
    _write(runtime_dir, state.to_json())
    with BlockClient(runtime_dir) as client:
        assert client.state == state
        assert client.nodes() == {"n0": NodeEntry("io0", "null-co", 4096)} and client.node_size("n0") == 4096
        with pytest.raises(BlockIOError) as info:
            client.node_size("n1")
        assert info.value.errno == errno.ENODEV
        with pytest.raises(StateError, match="iothread 'io0' has no data endpoint"):
            client.read("n0", 0, 512)  # its handshake has not told it yet
        assert client.in_flight == 0


def test_a_blocking_call_that_times_out_is_given_up(runtime_dir: str, request: pytest.FixtureRequest) -> None:
    """Nobody serves the iothread's endpoint (its socket file is there, bound
    and never listened on): the call raises TimeoutError at its deadline, and
    the request is no longer pending (it used to stay counted in
    ``in_flight``, waiting for an answer nobody waits for)."""
    endpoint = ipc_endpoint(runtime_dir, "io0.data")
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(endpoint.removeprefix("ipc://"))
    request.addfinalizer(deaf.close)
    _write(runtime_dir, ClusterState(runtime_dir, "", (IOThreadEntry("io0", 1, "running", endpoint),),
                                     {"n0": NodeEntry("io0", "null-co", 4096)}).to_json())
    with BlockClient(runtime_dir, timeout_s=0.2) as client:
        with pytest.raises(TimeoutError, match="read on node 'n0' did not complete in 0.2 s"):
            client.read("n0", 0, 512)
        assert client.in_flight == 0
        completions: list[int] = []
        client.submit("n0", "read", 0, 512, callback=lambda status, message, data: completions.append(status))
        assert client.in_flight == 1  # a callback request has no deadline: it waits
        assert completions == []


def test_an_endpoint_with_no_socket_file_is_refused_at_once(runtime_dir: str) -> None:
    """An iothread at its limit of clients moves its socket file aside: a new
    client is told so at once, not left waiting for a connection."""
    endpoint = ipc_endpoint(runtime_dir, "io0.data")
    _write(runtime_dir, ClusterState(runtime_dir, "", (IOThreadEntry("io0", 1, "running", endpoint),),
                                     {"n0": NodeEntry("io0", "null-co", 4096)}).to_json())
    with BlockClient(runtime_dir, timeout_s=10) as client:
        with pytest.raises(BlockIOError) as info:
            client.read("n0", 0, 512)
        assert info.value.errno == errno.ECONNREFUSED and "takes no new clients now" in str(info.value)
