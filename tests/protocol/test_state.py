"""The cluster's state file: one typed shape for the main loop that writes it
and the clients that read it; anything else is refused with a message that
says what is wrong, never a KeyError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    CLUSTER_STATE_FILE,
    ClusterState,
    ExportEntry,
    IOThreadEntry,
    NodeEntry,
    RemoteProtocolError,
    cluster_state_path,
)

STATE = ClusterState(
    "/run/evl", "ipc:///run/evl/control",
    (IOThreadEntry("io0", 101, "running", "ipc:///run/evl/io0.data"), IOThreadEntry("io1", 102, "starting")),
    {"disk0": NodeEntry("io0", "file", 1 << 30), "null0": NodeEntry("io0", "null-co", 0)},
    {"exp0": ExportEntry("disk0", "nbd+unix:///disk0?socket=/run/evl/nbd.sock")},
)

names = st.text(min_size=1, max_size=12)


@given(st.builds(
    ClusterState, runtime_dir=st.text(), control=st.text(),
    iothreads=st.lists(st.builds(IOThreadEntry, id=names, pid=st.integers(0, 2**22),
                                 state=st.sampled_from(["starting", "running", "stopping", "exited"]),
                                 data=st.text(), curve=st.text(), host=st.text()), unique_by=lambda t: t.id).map(tuple),
    nodes=st.dictionaries(names, st.builds(NodeEntry, iothread=names, driver=names,
                                           size=st.integers(0, 2**63))),
    exports=st.dictionaries(names, st.builds(ExportEntry, node=names, uri=st.text()))))
def test_round_trip(state: ClusterState) -> None:
    assert ClusterState.from_json(state.to_json()) == state
    assert ClusterState.from_json(state.to_json().encode()) == state


def test_the_file_shape() -> None:
    """The shape clients (and the launcher's READY line) see: plain JSON."""
    assert json.loads(STATE.to_json()) == {
        "runtime_dir": "/run/evl",
        "control": "ipc:///run/evl/control",
        "iothreads": [{"id": "io0", "pid": 101, "state": "running", "data": "ipc:///run/evl/io0.data",
                       "curve": "", "host": ""},
                      {"id": "io1", "pid": 102, "state": "starting", "data": "", "curve": "", "host": ""}],
        "nodes": {"disk0": {"iothread": "io0", "driver": "file", "size": 1 << 30},
                  "null0": {"iothread": "io0", "driver": "null-co", "size": 0}},
        "exports": {"exp0": {"node": "disk0", "uri": "nbd+unix:///disk0?socket=/run/evl/nbd.sock"}},
    }
    assert STATE.iothread("io1") == IOThreadEntry("io1", 102, "starting") and STATE.iothread("io9") is None
    assert cluster_state_path("/run/evl") == f"/run/evl/{CLUSTER_STATE_FILE}"


def _with(change: dict[str, Any]) -> str:
    """The sample state's JSON with top-level keys replaced (None: removed)."""
    value = STATE.as_dict()
    for key, new in change.items():
        if new is None:
            del value[key]
        else:
            value[key] = new
    return json.dumps(value)


def _iothread(**change: object) -> str:
    return _with({"iothreads": [{"id": "io0", "pid": 1, "state": "running", "data": "", "curve": "", "host": "",
                                 **change}]})


def _node(**change: object) -> str:
    return _with({"nodes": {"d": {"iothread": "io0", "driver": "file", "size": 0, **change}}})


@pytest.mark.parametrize(("text", "message"), [
    ("", "not a cluster state file: Expecting value"),
    ('{"iothreads": [', "not a cluster state file"),  # torn
    (b"\xff\xfe", "not a cluster state file"),
    ("[" * 100_000, "not a cluster state file"),
    ("[]", "cluster state: expected an object, not a list"),
    ('{"name": "something else"}',
     "cluster state: missing 'runtime_dir', 'control', 'iothreads', 'nodes', 'exports'"),
    (_with({"exports": None}), "cluster state: missing 'exports'"),
    (_with({"exports": [["exp0", "nbd://h/x"]]}), "cluster state: 'exports' must be an object, not a list"),
    (_with({"exports": {"e": "nbd://h/x"}}), "cluster state: export 'e': expected an object, not a string"),
    (_with({"exports": {"e": {"node": "d"}}}), "cluster state: export 'e': missing 'uri'"),
    (_with({"exports": {"e": {"node": "d", "uri": 1}}}), "export 'e': 'uri' must be a string, not an integer"),
    (_with({"nodes": None}), "cluster state: missing 'nodes'"),
    (_with({"extra": 1}), "cluster state: unexpected 'extra'"),
    (_with({"control": 5}), "cluster state: 'control' must be a string, not an integer"),
    (_with({"iothreads": {}}), "cluster state: 'iothreads' must be a list, not an object"),
    (_with({"nodes": []}), "cluster state: 'nodes' must be an object, not a list"),
    (_with({"iothreads": ["io0"]}), "cluster state: iothreads[0]: expected an object, not a string"),
    (_iothread(pid=True), "iothreads[0]: 'pid' must be a non-negative integer, not a boolean"),
    (_iothread(pid=-1), "iothreads[0]: 'pid' must be a non-negative integer, not an integer -1"),
    (_iothread(pid=1.5), "'pid' must be a non-negative integer, not a number"),
    (_iothread(state="asleep"), "iothreads[0]: 'state' is 'asleep', not one of starting, running"),
    (_iothread(data=None), "iothreads[0]: 'data' must be a string, not null"),
    (_with({"iothreads": [{"id": "io0"}]}), "iothreads[0]: missing 'pid', 'state', 'data', 'curve', 'host'"),
    (_iothread(host=7), "iothreads[0]: 'host' must be a string, not an integer"),
    (_with({"iothreads": [{"id": "a", "pid": 1, "state": "running", "data": "", "curve": "", "host": ""}] * 2}),
     "an iothread id appears twice"),
    (_node(size="1G"), "node 'd': 'size' must be a non-negative integer, not a string"),
    (_node(iothread=["io0"]), "node 'd': 'iothread' must be a string, not a list"),
    (_node(moving=True), "node 'd': unexpected 'moving'"),
])
def test_malformed_or_foreign_files_are_refused_clearly(text: str | bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ClusterState.from_json(text)
    assert message in str(info.value)
