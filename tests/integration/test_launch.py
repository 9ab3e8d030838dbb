"""``iothreads launch`` as a user runs it: ready line, clean exit on SIGTERM
and SIGINT, iothreads that follow a killed launcher, one-line option errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from protocol import ClusterState, cluster_state_path

from .support import COMMAND, Clusters, iothreads_of, janitor_of, wait_gone


def iothread_pids(ready: dict[str, object]) -> list[int]:
    return [t["pid"] for t in ready["iothreads"]]  # type: ignore[index, attr-defined]


def group_members(pgid: int) -> list[int]:
    """The processes of a process group, zombies included (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def run_alone(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run to completion in a session of its own (nothing it signals can reach
    pytest); every process of its group, and every iothread it started, must
    be gone when it exits."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        left = group_members(proc.pid) + iothreads_of(proc.pid)  # its iothreads have sessions of their own
        if proc.poll() is None or left:
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in iothreads_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.communicate()
    assert left == [], f"processes outlived the launcher: {left}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_every_line_is_an_event_and_ready_comes_last(clusters: Clusters, short_dir: str) -> None:
    """Regression: the ready line was flat (``{"event": "READY", "pid": ...}``)
    while the IOTHREAD_READY lines before it were ``{"event", "data"}``.  Every
    line has the one shape, and READY comes last, once every iothread has
    answered and every --blockdev is added."""
    proc = clusters.spawn("--iothreads", "2", "--runtime-dir", short_dir,
                          "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io1")
    assert proc.stdout is not None
    try:
        events = []
        for line in proc.stdout:  # bounded by the launcher's own handshake deadline
            events.append(json.loads(line))
            if events[-1]["event"] == "READY":
                break
        assert all(set(e) == {"event", "data"} and isinstance(e["data"], dict) for e in events), events
        assert [e["event"] for e in events] == ["IOTHREAD_READY", "IOTHREAD_READY", "READY"]
        assert sorted(e["data"]["id"] for e in events[:2]) == ["io0", "io1"]
        ready = events[-1]["data"]
        assert ready["pid"] == proc.pid and ready["runtime_dir"] == short_dir
        assert ready["qmp"] == [f"{short_dir}/qmp.sock"]
        assert [t["state"] for t in ready["iothreads"]] == ["running", "running"]
        assert ready["nodes"]["null0"] == {"iothread": "io1", "driver": "null-co", "size": 1 << 20}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything_and_removes_socket_files(clusters: Clusters, short_dir: str,
                                                          sig: signal.Signals) -> None:
    pidfile = os.path.join(short_dir, "pid")
    proc, ready = clusters.launch("--iothreads", "2", "--runtime-dir", short_dir, "--pidfile", pidfile)
    pids = iothread_pids(ready)
    assert ready["runtime_dir"] == short_dir and len(pids) == 2
    assert ready["control"] == f"ipc://{short_dir}/control"
    assert os.path.exists(f"{short_dir}/control")
    with open(pidfile) as f:
        assert int(f.read()) == proc.pid
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    wait_gone(pids, 5, "the iothreads of a stopped launcher")
    assert os.listdir(short_dir) == []  # no socket file, no pidfile


def test_no_options_starts_two_iothreads_in_a_private_directory(clusters: Clusters) -> None:
    proc, ready = clusters.launch()
    runtime_dir = str(ready["runtime_dir"])
    assert [t["id"] for t in ready["iothreads"]] == ["io0", "io1"]  # type: ignore[attr-defined]
    assert oct(os.stat(runtime_dir).st_mode & 0o777) == "0o700"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not os.path.exists(runtime_dir)


def test_iothreads_exit_by_themselves_when_the_launcher_is_killed(clusters: Clusters, short_dir: str) -> None:
    pidfile = os.path.join(short_dir, "pid")
    proc, ready = clusters.launch("--iothreads", "3", "--runtime-dir", short_dir, "--pidfile", pidfile,
                                  clean_exit=False)
    pids = iothread_pids(ready)
    janitor = janitor_of(proc.pid)
    assert janitor is not None
    os.kill(janitor, signal.SIGKILL)  # (killed with it: else it would clean the directory up)
    wait_gone([janitor], 2.0, "the janitor")
    proc.kill()
    proc.communicate(timeout=30)
    wait_gone(pids, 2.0, "the iothreads of a killed launcher")
    # Its locks died with it: the next launcher takes the directory and the pidfile over.
    assert "lock" in os.listdir(short_dir) and os.path.exists(pidfile)
    proc, _ = clusters.launch("--iothreads", "1", "--runtime-dir", short_dir, "--pidfile", pidfile)
    with open(pidfile) as f:
        assert int(f.read()) == proc.pid
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and os.listdir(short_dir) == []


def file_ids(directory: str) -> dict[str, tuple[int, int]]:
    """Each file's inode and change time: a file replaced or rewritten changes."""
    stats = {name: os.stat(os.path.join(directory, name)) for name in os.listdir(directory)}
    return {name: (st.st_ino, st.st_ctime_ns) for name, st in stats.items()}


def test_a_runtime_dir_and_a_pidfile_serve_one_launcher_at_a_time(clusters: Clusters, short_dir: str) -> None:
    run, pidfile = os.path.join(short_dir, "run"), os.path.join(short_dir, "pid")
    first, _ = clusters.launch("--iothreads", "1", "--runtime-dir", run, "--pidfile", pidfile)
    try:
        before = file_ids(run)
        assert {"control", "io0.data", "qmp.sock"} <= set(before)
        other_dir, other_pidfile = os.path.join(short_dir, "b"), os.path.join(short_dir, "b.pid")
        for option, value, args in [("--runtime-dir", run, ["--runtime-dir", run, "--pidfile", other_pidfile]),
                                    ("--pidfile", pidfile, ["--runtime-dir", other_dir, "--pidfile", pidfile])]:
            second = run_alone([*COMMAND, "launch", "--iothreads", "1", *args])
            assert second.returncode == 1 and second.stdout == ""
            assert second.stderr.splitlines() == [
                f"iothreads: {option} {value}: locked by another process (pid {first.pid})"]
        assert file_ids(run) == before  # the first one's sockets untouched
        assert os.listdir(other_dir) == [] and not os.path.exists(other_pidfile)
        with open(pidfile) as f:
            assert int(f.read()) == first.pid
        # Replaced behind the launcher's back: no longer its file, so it is left alone at exit.
        os.unlink(pidfile)
        with open(pidfile, "w") as f:
            f.write("someone else's\n")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0 and os.listdir(run) == []
    with open(pidfile) as f:
        assert f.read() == "someone else's\n"


def test_a_pidfile_that_cannot_be_made_is_named_and_nothing_is_left(short_dir: str) -> None:
    pidfile = os.path.join(short_dir, "nodir", "pid")
    out = run_alone([*COMMAND, "launch", "--iothreads", "1", "--runtime-dir", short_dir, "--pidfile", pidfile])
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"iothreads: --pidfile {pidfile}: No such file or directory"]
    assert os.listdir(short_dir) == []


def test_objects_in_keyval_and_json_forms(clusters: Clusters, short_dir: str) -> None:
    proc, ready = clusters.launch(
        "--object", "iothread,id=disk-io,poll-max-ns=0",
        "--object", '{"qom-type": "iothread", "id": "net.io", "poll-grow": 4}',
        "--runtime-dir", short_dir,
    )
    assert [t["id"] for t in ready["iothreads"]] == ["disk-io", "net.io"]  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--object", "iothread,id=io0,bogus=1"], "--object iothread,id=io0,bogus=1: Parameter 'bogus' is unexpected"),
        (["--object", "iothread,id=io0,poll-max-ns=lots"], "Parameter 'poll-max-ns' expects integer"),
        (["--object", "iothread,id=io0,poll-grow=-1"], "poll-grow value must be in range [0, 9223372036854775807]"),
        (["--object", "iothread"], "Parameter 'id' is missing"),
        (["--object", "memory-backend-ram,id=m0"], "Parameter 'qom-type' does not accept value 'memory-backend-ram'"),
        (["--object", "iothread,id=io0", "--object", "iothread,id=io0"], "duplicate iothread id 'io0'"),
        (["--object", '{"qom-type": "iothread", "id": 5}'], "Invalid parameter type for 'id', expected: string"),
        (["--object", "iothread,id=5"], "Parameter 'id' expects an identifier"),
        (["--object", "{not json"], "JSON parse error"),
        (["--iothreads", "two"], "argument --iothreads: 'two' is not a number"),
        (["--iothreads", "-1"], "must not be negative"),
        (["--iothreads", "99999999999999999999"], "argument --iothreads: '99999999999999999999' is more than 256"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--runtime-dir", "/tmp/" + "x" * 100], "path too long"),
        (["--monitor", "chardev=nope"], "--monitor chardev=nope: chardev 'nope' not found"),
        (["--chardev", "socket,id=m,path=/tmp/x.sock,server=on,wait=on"], "wait=on is not supported"),
        (["--chardev", "pty,id=m"], "chardev backend 'pty' is not supported"),
        (["--chardev", "socket,id=m,server=on,wait=off"], "needs path=PATH or host=HOST,port=PORT"),
        (["--blockdev", "driver=file,node-name=d,filename=/x,iothread=io9"], "Cannot find iothread io9"),
        (["--blockdev", "driver=null-co,node-name=n0,size=1.e400"], "Parameter 'size' expects size"),
        (["--chardev", '{"backend": "socket", "id": "c0", "host": "::1", "port": [1], "server": true, '
                       '"wait": false}', "--monitor", "chardev=c0"], "Parameter 'port' expects a port number"),
    ],
)
def test_bad_options_give_one_line_and_exit_1(args: list[str], message: str) -> None:
    out = subprocess.run([*COMMAND, "launch", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("iothreads: ") and message in lines[0]
    assert out.stdout == ""


@pytest.mark.parametrize("explicit_dir", [True, False])
def test_an_iothread_id_too_long_for_the_socket_paths_is_refused_before_anything_starts(
        short_dir: str, explicit_dir: bool) -> None:
    long_id = "a" * 95
    run = os.path.join(short_dir, "run")
    where = ["--runtime-dir", run] if explicit_dir else []
    out = run_alone([*COMMAND, "launch", *where, "--object", "iothread,id=io0",
                     "--object", f"iothread,id={long_id}"])
    assert out.returncode == 1 and out.stdout == ""  # no iothread started
    [line] = out.stderr.splitlines()
    path = line.split("'")[1]  # the data socket's path, in the message
    assert line.startswith(f"iothreads: --object id={long_id}: socket path '")
    assert path.endswith(f"/{long_id}.data") and "the limit is 107" in line
    assert not os.path.exists(os.path.dirname(path))  # the runtime directory was not left behind
    assert explicit_dir == (os.path.dirname(path) == run)


# cli.main with Cluster.add failing (ValueError) for the second iothread, once the first has started.
FAILING_ADD = """
import sys
from mainloop import cli
from mainloop.cluster._cluster import Cluster

real_add = Cluster.add


def add(self, config):
    if config.id == "io1":
        raise ValueError("io1 cannot start")
    return real_add(self, config)


Cluster.add = add
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_value_error_during_start_up_is_reported_not_raised_and_leaves_nothing(short_dir: str) -> None:
    out = run_alone([sys.executable, "-c", FAILING_ADD, "launch", "--iothreads", "2", "--runtime-dir", short_dir])
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == "iothreads: io1 cannot start"
    assert os.listdir(short_dir) == []  # no socket file


def test_runtime_dir_problems_name_the_runtime_dir(short_dir: str) -> None:
    os.mkdir(os.path.join(short_dir, "control"))  # where the control socket goes
    out = run_alone([*COMMAND, "launch", "--iothreads", "1", "--runtime-dir", short_dir])
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"iothreads: --runtime-dir {short_dir}: Address already in use (addr='ipc://{short_dir}/control')"]
    assert os.listdir(short_dir) == ["control"]
    a_file = os.path.join(short_dir, "file")
    open(a_file, "w").close()
    out = run_alone([*COMMAND, "launch", "--iothreads", "1", "--runtime-dir", a_file])
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"iothreads: --runtime-dir {a_file}: Not a directory"]


def test_help_and_version() -> None:
    out = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "launch" in out.stdout
    out = subprocess.run([*COMMAND, "launch", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--object" in out.stdout and "--runtime-dir" in out.stdout
    out = subprocess.run([*COMMAND, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("iothreads ")
    out = subprocess.run(COMMAND, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "a command is required" in out.stderr


def test_control_channel_over_tcp(clusters: Clusters, short_dir: str) -> None:
    proc, ready = clusters.launch("--iothreads", "1", "--control", "tcp://127.0.0.1:0",
                                  "--runtime-dir", short_dir)
    control = str(ready["control"])
    assert control.startswith("tcp://127.0.0.1:") and not control.endswith(":0")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_bad_control_endpoint() -> None:
    out = subprocess.run([*COMMAND, "launch", "--control", "tcp://256.1.1.1:0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("iothreads: --control tcp://256.1.1.1:0")
    out = subprocess.run([*COMMAND, "launch", "--control", "udp://x"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "expected tcp://HOST:PORT" in out.stderr


def test_blockdevs_without_an_iothread_are_spread_over_the_iothreads(clusters: Clusters,
                                                                     short_dir: str) -> None:
    """Regression: several --blockdev without iothread= all went to io0 (the
    placement counted the nodes added, not the adds still waiting for their
    answers).  Each goes to the iothread with the fewest nodes, those counted."""
    blockdevs = [arg for i in range(4) for arg in ("--blockdev", f"driver=null-co,node-name=n{i},size=1M")]
    proc, _ = clusters.launch("--iothreads", "2", "--runtime-dir", short_dir, *blockdevs)
    try:
        with open(cluster_state_path(short_dir), encoding="utf-8") as f:
            state = ClusterState.from_json(f.read())
        assert sorted(state.nodes) == ["n0", "n1", "n2", "n3"]
        assert sorted(n.iothread for n in state.nodes.values()) == ["io0", "io0", "io1", "io1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# cli.main with io0 held (SIGSTOP) from the blockdev-add sent to it until the
# main loop has the answers of both nodes in io1: the answers come in another
# order than the --blockdev options.
HELD_IO0 = """
import os
import signal
import sys
from mainloop import cli
from mainloop.cluster._cluster import Cluster

real_add, real_write_state = Cluster.blockdev_add, Cluster.write_state
held = []


def blockdev_add(self, node_name, driver, options, callback, iothread=None):
    if iothread == "io0":
        held.append(self.iothreads["io0"].pid)
        os.kill(held[-1], signal.SIGSTOP)
    real_add(self, node_name, driver, options, callback, iothread)


def write_state(self):
    real_write_state(self)
    if held and {"first", "last"} <= set(self.nodes):
        os.kill(held.pop(), signal.SIGCONT)


Cluster.blockdev_add, Cluster.write_state = blockdev_add, write_state
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failing_blockdev_is_named_whatever_the_order_of_the_answers(short_dir: str) -> None:
    """Regression: the answers to the --blockdev adds were matched to the
    options in the order they arrived, so a node that failed after others in
    other iothreads had answered was reported under another node's name."""
    run, missing = os.path.join(short_dir, "run"), os.path.join(short_dir, "missing.img")
    out = run_alone([sys.executable, "-c", HELD_IO0, "launch", "--iothreads", "2", "--runtime-dir", run,
                     "--blockdev", "driver=null-co,node-name=first,size=1M,iothread=io1",
                     "--blockdev", f"driver=file,node-name=bad,filename={missing},iothread=io0",
                     "--blockdev", "driver=null-co,node-name=last,size=1M,iothread=io1"])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = [line for line in out.stderr.splitlines() if "--blockdev" in line]
    assert line.startswith("iothreads: --blockdev node-name=bad: ")
    assert f"could not open '{missing}': No such file or directory" in line
    assert os.listdir(run) == []
