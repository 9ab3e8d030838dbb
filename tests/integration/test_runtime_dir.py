"""The runtime directory and the pidfile against other users: a directory
someone else owns or may write is refused, symbolic links are never followed,
and what the launcher creates gives others no access, whatever the umask.

Run as root (as CI is), "another user" is uid 65534: a directory is given to
it with chown, and a forked child takes its identity to try the sockets.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat

import pytest

from protocol import ClusterState, cluster_state_path

from .support import COMMAND, Clusters
from .test_launch import run_alone

OTHER_UID = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to chown, and to become another user)")


def plant_victim(path: str) -> tuple[bytes, int]:
    """A file only its owner may read (a stand-in for a root-only file the
    launcher must never touch): its content and mode, to compare afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(b"secret: not the launcher's\n")
    return fingerprint(path)


def fingerprint(path: str) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mode


def launch_argv(*args: str) -> list[str]:
    return [*COMMAND, "launch", "--iothreads", "1", *args]


# -- a directory that is not the user's alone ------------------------------------------


def world_writable(d: str) -> str:
    os.chmod(d, 0o777)
    return "is writable by others (mode 0777)"


def sticky_world_writable(d: str) -> str:
    os.chmod(d, 0o1777)  # like /tmp: others may still create the names the launcher uses
    return "is writable by others (mode 1777)"


def group_writable(d: str) -> str:
    os.chmod(d, 0o770)
    return "is writable by its group (mode 0770)"


def another_users(d: str) -> str:
    os.chown(d, OTHER_UID, OTHER_UID)
    return f"is owned by uid {OTHER_UID}, not by this user (uid {os.geteuid()})"


def another_users_world_writable(d: str) -> str:
    os.chown(d, OTHER_UID, OTHER_UID)
    os.chmod(d, 0o777)
    return f"is owned by uid {OTHER_UID}, not by this user (uid {os.geteuid()})"


@pytest.mark.parametrize("make_unsafe", [
    world_writable, sticky_world_writable, group_writable,
    pytest.param(another_users, marks=as_root), pytest.param(another_users_world_writable, marks=as_root),
])
def test_a_runtime_dir_others_own_or_may_write_is_refused_and_nothing_in_it_is_touched(
        short_dir: str, make_unsafe: object) -> None:
    """Someone else's directory, with links planted where the launcher puts its
    lock and its state file's temporary copy: refused before anything is made."""
    run = os.path.join(short_dir, "run")
    os.mkdir(run, 0o700)
    victims = {name: os.path.join(short_dir, f"victim-{name}") for name in ("lock", "cluster.json.tmp")}
    before = {name: plant_victim(path) for name, path in victims.items()}
    for name, path in victims.items():
        os.symlink(path, os.path.join(run, name))
    assert callable(make_unsafe)
    reason = make_unsafe(run)
    mode = os.lstat(run).st_mode

    out = run_alone(launch_argv("--runtime-dir", run))

    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"iothreads: --runtime-dir {run}: {reason}"]
    assert {name: fingerprint(path) for name, path in victims.items()} == before
    assert sorted(os.listdir(run)) == sorted(victims)  # nothing made, nothing removed
    assert os.lstat(run).st_mode == mode


def test_a_runtime_dir_that_is_a_symbolic_link_is_refused(short_dir: str) -> None:
    private = os.path.join(short_dir, "private")
    os.mkdir(private, 0o700)
    link = os.path.join(short_dir, "run")
    os.symlink(private, link)
    out = run_alone(launch_argv("--runtime-dir", link))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"iothreads: --runtime-dir {link}: is a symbolic link"]
    assert os.listdir(private) == []


# -- symbolic links in the user's own directory ---------------------------------------


@pytest.mark.parametrize("planted", ["lock", "qmp.sock", "pidfile"])
def test_a_symbolic_link_where_the_launcher_creates_a_file_is_refused_not_followed(
        short_dir: str, planted: str) -> None:
    """A link where the lock, the QMP socket or the pidfile goes: the launcher
    exits 1 naming it, the file it points to is untouched, and what the
    launcher made meanwhile is gone."""
    run = os.path.join(short_dir, "run")
    os.mkdir(run, 0o700)
    victim = os.path.join(short_dir, "victim")
    before = plant_victim(victim)
    pidfile = os.path.join(short_dir, "launch.pid")
    link = pidfile if planted == "pidfile" else os.path.join(run, planted)
    os.symlink(victim, link)

    out = run_alone(launch_argv("--runtime-dir", run, "--pidfile", pidfile))

    option = f"--pidfile {pidfile}" if planted == "pidfile" else f"--runtime-dir {run}"
    assert out.returncode == 1 and '"READY"' not in out.stdout  # the QMP socket comes after the iothreads
    assert f"iothreads: {option}: {link}: is a symbolic link" in out.stderr.splitlines()
    assert "Traceback" not in out.stderr
    assert fingerprint(victim) == before
    assert os.readlink(link) == victim  # the link itself left as it was
    assert sorted(os.listdir(run)) == ([planted] if link.startswith(run) else [])
    assert os.path.islink(pidfile) == (planted == "pidfile")  # a pidfile made is removed


def test_links_where_the_launcher_replaces_or_binds_a_file_are_replaced_never_followed(
        clusters: Clusters, short_dir: str) -> None:
    """Links where the state file, its temporary copy and the iothreads'
    sockets go: the launcher runs, the files pointed to are untouched."""
    run = os.path.join(short_dir, "run")
    os.mkdir(run, 0o700)
    names = ["cluster.json", "cluster.json.tmp", "control", "io0.data"]
    victims = {name: os.path.join(short_dir, f"victim-{name}") for name in names}
    before = {name: plant_victim(path) for name, path in victims.items()}
    for name, path in victims.items():
        os.symlink(path, os.path.join(run, name))

    proc, ready = clusters.launch("--runtime-dir", run, "--iothreads", "1", clean_exit=False)
    state_path = cluster_state_path(run)
    assert stat.S_ISREG(os.lstat(state_path).st_mode)
    with open(state_path, "rb") as f:
        assert ClusterState.from_json(f.read()).control == ready["control"]
    for name in ("control", "io0.data"):
        assert stat.S_ISSOCK(os.lstat(os.path.join(run, name)).st_mode)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err
    assert {name: fingerprint(path) for name, path in victims.items()} == before
    # The one link the launcher had no reason to replace is still there, as it was.
    assert os.listdir(run) == ["cluster.json.tmp"]
    assert os.readlink(os.path.join(run, "cluster.json.tmp")) == victims["cluster.json.tmp"]


# -- modes, whatever the umask ---------------------------------------------------------


def access_as_another_user(paths: dict[str, str]) -> dict[str, str]:
    """What uid 65534 gets trying each path (a socket: connect; a file: open
    for reading and writing): the errno's name, or "ok".  From a forked child
    that takes the other user's identity."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            results = []
            for name, path in paths.items():
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                            s.connect(path)
                    else:
                        os.close(os.open(path, os.O_RDWR))
                    results.append(f"{name}=ok")
                except OSError as exc:
                    results.append(f"{name}={errno.errorcode.get(exc.errno or 0, str(exc.errno))}")
            os.write(write_fd, "\n".join(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with open(read_fd, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.mark.parametrize("kind", ["new", "existing 0700", "existing 0755"])
def test_sockets_and_files_give_others_no_access_whatever_the_umask(
        clusters: Clusters, short_dir: str, kind: str) -> None:
    """umask 000: the runtime directory made is 0700 (its parents too), the
    sockets and the state file give group and others nothing, and no file
    is writable by them; in a directory others may search (0755), another
    user can neither connect to a socket (QMP would let them open any file)
    nor read or write a file."""
    parent = os.path.join(short_dir, "new") if kind == "new" else short_dir
    run = os.path.join(parent, "run")
    if kind != "new":
        os.mkdir(run)
        os.chmod(run, 0o700 if kind == "existing 0700" else 0o755)
    pidfile = os.path.join(short_dir, "launch.pid")

    proc, ready = clusters.launch("--runtime-dir", run, "--iothreads", "1", "--pidfile", pidfile, umask=0)

    modes = {name: os.lstat(os.path.join(run, name)).st_mode for name in os.listdir(run)}
    assert set(modes) == {"control", "io0.data", "qmp.sock", "cluster.json", "lock"}
    for name, mode in modes.items():
        if stat.S_ISSOCK(mode):
            assert mode & 0o077 == 0, f"{name}: {stat.filemode(mode)}"
        else:
            assert stat.S_ISREG(mode) and mode & 0o022 == 0, f"{name}: {stat.filemode(mode)}"
    assert modes["cluster.json"] & 0o077 == 0
    assert os.stat(pidfile).st_mode & 0o022 == 0
    if kind == "new":
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    if os.geteuid() == 0:
        tried = access_as_another_user({name: os.path.join(run, name) for name in modes})
        assert tried == {name: "EACCES" for name in modes}
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
