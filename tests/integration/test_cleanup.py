"""What a launcher killed with SIGKILL leaves behind, and ``iothreads
cleanup`` (or the next launcher) removing it: only a runtime directory whose
lock is free; never a live cluster's, a symbolic link, or another user's.

The default runtime directories are made under ``$TMPDIR``: each test sets
it to a directory of its own, so that no other launcher (another test's)
cleans up what this one looks at."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any

import pytest

from .support import COMMAND, GONE_S, STOP_S, Clusters, janitor_of, wait_gone
from .test_runtime_dir import OTHER_UID, as_root

STALE_PID = "4242\n"  # what a dead launcher's lock file holds


def cleanup(*args: str) -> subprocess.CompletedProcess[str]:
    """``iothreads cleanup ARGS``, as a user runs it."""
    return subprocess.run([*COMMAND, "cleanup", *args], capture_output=True, text=True, timeout=STOP_S)


def kill_launcher(proc: subprocess.Popen[str], ready: dict[str, Any]) -> None:
    """SIGKILL of the launcher and of its janitor (as an OOM kill of both
    would): what ``iothreads cleanup`` is for; its iothreads exit by
    themselves (their launcher is gone)."""
    janitor = janitor_of(proc.pid)
    assert janitor is not None
    os.kill(janitor, signal.SIGKILL)
    wait_gone([janitor], GONE_S, "the janitor")
    proc.kill()
    proc.communicate(timeout=STOP_S)
    wait_gone([t["pid"] for t in ready["iothreads"]], GONE_S, "the iothreads of a killed launcher")


def test_a_launcher_killed_alone_is_cleaned_up_after_by_its_janitor(clusters: Clusters, tmpdir_env: str,
                                                                     short_dir: str) -> None:
    """SIGKILL of the launcher alone: its janitor (in a session of its own,
    woken by the launcher's exit) removes the runtime directory, as
    ``iothreads cleanup`` would; with a --runtime-dir, the launcher's files
    in it only.  Nothing of the cluster is left."""
    given = os.path.join(short_dir, "given")
    os.mkdir(given, 0o700)
    nbd_sock = os.path.join(short_dir, "nbd.sock")
    for extra in ((), ("--runtime-dir", given)):
        proc, ready = clusters.launch("--iothreads", "2", *extra, "--nbd-server",
                                      f"addr.type=unix,addr.path={nbd_sock}", clean_exit=False)
        assert os.path.exists(nbd_sock)
        run = ready["runtime_dir"]
        janitor = janitor_of(proc.pid)
        assert janitor is not None and os.getsid(janitor) == janitor  # (a session of its own)
        proc.kill()
        proc.communicate(timeout=STOP_S)
        wait_gone([janitor] + [t["pid"] for t in ready["iothreads"]], GONE_S, "the killed launcher's processes")
        if extra:
            assert os.listdir(run) == []
        else:
            assert not os.path.exists(run)
        assert not os.path.exists(nbd_sock)  # (its NBD server's socket, outside the directory, too)


def test_a_janitor_removes_only_the_sockets_nothing_listens_on(short_dir: str) -> None:
    """``--socket``: a socket file whose listener is gone is removed; one that
    another process listens on now, or a file that is not a socket, is not."""
    stale, live, plain = (os.path.join(short_dir, name) for name in ("stale.sock", "live.sock", "plain"))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale)  # (closed without unlinking: what a killed process leaves)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(live)
    listener.listen()
    open(plain, "w").close()
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        done = cleanup("--when-gone", str(gone.pid), "--runtime-dir", os.path.join(short_dir, "none"),
                       "--socket", stale, "--socket", live, "--socket", plain)
        assert done.returncode == 0, done
        assert sorted(os.listdir(short_dir)) == ["live.sock", "plain"]
    finally:
        listener.close()
    assert cleanup("--socket", live).returncode == 1  # (only with --when-gone)
    for bad in ("-5", "0", "abc"):
        refused = cleanup("--when-gone", bad, "--runtime-dir", short_dir)
        assert refused.returncode == 1 and f"'{bad}' is not a process id" in refused.stderr, refused


def test_a_launcher_that_exits_in_order_stops_its_janitor(clusters: Clusters, tmpdir_env: str) -> None:
    proc, ready = clusters.launch("--iothreads", "1")
    janitor = janitor_of(proc.pid)
    assert janitor is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_S) == 0
    assert janitor_of(proc.pid) is None  # stopped and reaped by the launcher before it exited
    assert not os.path.exists(ready["runtime_dir"])


def stale_dir(path: str, lock: str = STALE_PID) -> str:
    """A directory as a killed launcher leaves it: private, a free lock holding its pid."""
    os.mkdir(path, 0o700)
    with open(os.path.join(path, "lock"), "w") as f:
        f.write(lock)
    with open(os.path.join(path, "cluster.json"), "w") as f:
        f.write("{}")
    return path


@pytest.fixture
def tmpdir_env(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``$TMPDIR`` for the launchers and the cleanups of the test: a directory of its own."""
    monkeypatch.setenv("TMPDIR", short_dir)
    return short_dir


def test_cleanup_removes_the_directory_of_a_killed_launcher(clusters: Clusters, tmpdir_env: str) -> None:
    proc, ready = clusters.launch("--iothreads", "2", clean_exit=False)
    run = ready["runtime_dir"]
    assert os.path.dirname(run) == tmpdir_env
    kill_launcher(proc, ready)
    assert {"lock", "cluster.json", "qmp.sock", "control"} <= set(os.listdir(run))  # left behind
    dry = cleanup("--dry-run")
    assert (dry.returncode, dry.stdout) == (0, f"would remove {run} (launcher pid {proc.pid}, gone)\n"), dry
    assert os.path.isdir(run)
    done = cleanup()
    assert (done.returncode, done.stdout, done.stderr) == (0, f"removed {run} (launcher pid {proc.pid}, gone)\n",
                                                           ""), done
    assert not os.path.exists(run)
    again = cleanup()
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_cleanup_of_a_given_runtime_dir_removes_the_launchers_files_only(clusters: Clusters,
                                                                          short_dir: str) -> None:
    run = os.path.join(short_dir, "run")
    proc, ready = clusters.launch("--iothreads", "1", "--runtime-dir", run, clean_exit=False)
    kill_launcher(proc, ready)
    with open(os.path.join(run, "notes.txt"), "w") as f:  # the user's own: not a launcher's file
        f.write("mine\n")
    done = cleanup("--runtime-dir", run)
    assert (done.returncode, done.stdout) == (0, f"removed the files of a launcher from {run} "
                                                 f"(launcher pid {proc.pid}, gone)\n"), done
    assert os.listdir(run) == ["notes.txt"]


def test_a_live_clusters_directory_is_never_removed(clusters: Clusters, tmpdir_env: str) -> None:
    proc, ready = clusters.launch("--iothreads", "1")
    run = ready["runtime_dir"]
    files = sorted(os.listdir(run))
    for args in ((), ("--runtime-dir", run)):
        result = cleanup(*args)
        assert result.stdout == ""
        assert f"left alone: {run} is in use by a running launcher (pid {proc.pid})" in result.stderr, result
        assert result.returncode == (1 if args else 0)
    assert sorted(os.listdir(run)) == files
    # The cluster is not disturbed: it stops as usual (the fixture checks it exits 0 and leaves nothing).


def test_a_launcher_with_a_made_directory_removes_stale_ones_beside_it(clusters: Clusters,
                                                                       tmpdir_env: str) -> None:
    killed, ready = clusters.launch("--iothreads", "1", clean_exit=False)
    stale = ready["runtime_dir"]
    kill_launcher(killed, ready)
    proc, ready = clusters.launch("--iothreads", "1")
    assert not os.path.exists(stale)
    assert os.path.isdir(ready["runtime_dir"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STOP_S)
    assert f"removed {stale}, left behind by a killed launcher (pid {killed.pid})" in err, err


@as_root
def test_links_and_other_users_directories_are_left_alone(tmpdir_env: str) -> None:
    # Something that would be removed if followed: a stale-looking directory outside the candidates' names.
    target = stale_dir(os.path.join(tmpdir_env, "target"))
    link = os.path.join(tmpdir_env, "evllink0001")
    os.symlink(target, link)
    other = stale_dir(os.path.join(tmpdir_env, "evlother001"))
    for name in ("", "lock", "cluster.json"):
        os.chown(os.path.join(other, name), OTHER_UID, OTHER_UID)
    lock_link = os.path.join(tmpdir_env, "evllocklnk1")
    os.mkdir(lock_link, 0o700)
    os.symlink(os.path.join(target, "lock"), os.path.join(lock_link, "lock"))
    open_to_all = stale_dir(os.path.join(tmpdir_env, "evlopen0001"))
    os.chmod(open_to_all, 0o777)
    stale = stale_dir(os.path.join(tmpdir_env, "evlstale001"))  # beside them: this one goes
    before = {p: sorted(os.listdir(p)) for p in (target, other, lock_link, open_to_all)}

    result = cleanup()
    assert (result.returncode, result.stdout) == (0, f"removed {stale} (launcher pid 4242, gone)\n"), result
    said = result.stderr.splitlines()
    assert said == [
        f"iothreads: left alone: {link} is a symbolic link",
        f"iothreads: left alone: {lock_link} has a lock file that is a symbolic link",
        f"iothreads: left alone: {open_to_all} is writable by others (mode 0777)",
        f"iothreads: left alone: {other} is owned by uid {OTHER_UID}, not by this user (uid 0)",
    ], result.stderr
    assert not os.path.exists(stale)
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert os.path.islink(link) and os.path.islink(os.path.join(lock_link, "lock"))
    with open(os.path.join(target, "lock")) as f:
        assert f.read() == STALE_PID
    named = cleanup("--runtime-dir", link)
    assert (named.returncode, named.stderr) == (1, f"iothreads: left alone: {link} is a symbolic link\n")
    assert sorted(os.listdir(target)) == ["cluster.json", "lock"]
