"""The runtime directory's safety checks: a directory others own or may write
is refused, files there are opened and replaced without following links, and
sockets bound there give others no access whatever the umask."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from protocol import (
    UnsafePathError,
    bind_owner_only,
    make_runtime_dir,
    open_own_file,
    prepare_runtime_dir,
    remove_stale_socket,
    replace_file,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to give a file to another user)")
OTHER_UID = 65534


@pytest.fixture
def scratch() -> Iterator[str]:
    path = make_runtime_dir(prefix="evlrd")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """The process's umask at 000 for the test (the loosest a user can have)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def refusal(call: Any, *args: Any) -> str:
    with pytest.raises(UnsafePathError) as info:
        call(*args)
    assert str(info.value) == f"{info.value.path}: {info.value.reason}"
    return info.value.reason


def test_the_default_directory_is_private(scratch: str) -> None:
    st = os.lstat(scratch)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


def test_a_missing_directory_and_its_parents_are_made_0700_whatever_the_umask(scratch: str,
                                                                                no_umask: None) -> None:
    run = os.path.join(scratch, "a", "b", "run")
    prepare_runtime_dir(run)
    for path in (os.path.join(scratch, "a"), os.path.join(scratch, "a", "b"), run):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700, path
    prepare_runtime_dir(run)  # an existing private one is taken as it is


@pytest.mark.parametrize("mode, reason", [
    (0o777, "is writable by others (mode 0777)"),
    (0o1777, "is writable by others (mode 1777)"),
    (0o775, "is writable by its group (mode 0775)"),
])
def test_a_directory_others_may_write_is_refused(scratch: str, mode: int, reason: str) -> None:
    run = os.path.join(scratch, "run")
    os.mkdir(run)
    os.chmod(run, mode)
    assert refusal(prepare_runtime_dir, run) == reason
    assert stat.S_IMODE(os.lstat(run).st_mode) == mode  # left as it was


def test_a_directory_others_may_search_is_taken(scratch: str) -> None:
    run = os.path.join(scratch, "run")
    os.mkdir(run)
    os.chmod(run, 0o755)
    prepare_runtime_dir(run)
    assert stat.S_IMODE(os.lstat(run).st_mode) == 0o755


@as_root
def test_another_users_directory_is_refused(scratch: str) -> None:
    run = os.path.join(scratch, "run")
    os.mkdir(run, 0o700)
    os.chown(run, OTHER_UID, OTHER_UID)
    assert refusal(prepare_runtime_dir, run) == f"is owned by uid {OTHER_UID}, not by this user (uid 0)"


def test_a_link_or_a_file_is_refused_as_the_directory(scratch: str) -> None:
    target = os.path.join(scratch, "target")
    os.mkdir(target, 0o700)
    link = os.path.join(scratch, "link")
    os.symlink(target, link)
    assert refusal(prepare_runtime_dir, link) == "is a symbolic link"
    a_file = os.path.join(scratch, "file")
    open(a_file, "w").close()
    assert refusal(prepare_runtime_dir, a_file) == "Not a directory"


def test_open_own_file_opens_a_regular_file_of_ours_and_never_follows_a_link(scratch: str) -> None:
    path = os.path.join(scratch, "lock")
    fd = open_own_file(path, os.O_RDWR | os.O_CREAT)
    try:
        assert os.get_inheritable(fd) is False
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    victim = os.path.join(scratch, "victim")
    with open(victim, "w") as f:
        f.write("untouched")
    link = os.path.join(scratch, "link")
    os.symlink(victim, link)
    assert refusal(open_own_file, link, os.O_RDWR | os.O_CREAT) == "is a symbolic link"
    dangling = os.path.join(scratch, "dangling")
    os.symlink(os.path.join(scratch, "nothing"), dangling)
    assert refusal(open_own_file, dangling, os.O_RDWR | os.O_CREAT) == "is a symbolic link"
    assert not os.path.exists(os.path.join(scratch, "nothing"))
    hard = os.path.join(scratch, "hard")
    os.link(victim, hard)
    assert refusal(open_own_file, hard, os.O_RDWR | os.O_CREAT) == "has 2 hard links"
    fifo = os.path.join(scratch, "fifo")
    os.mkfifo(fifo)
    assert refusal(open_own_file, fifo, os.O_RDONLY) == "is not a regular file"  # and no hang
    with open(victim) as f:
        assert f.read() == "untouched"


@as_root
def test_open_own_file_refuses_another_users_file(scratch: str) -> None:
    path = os.path.join(scratch, "pid")
    open(path, "w").close()
    os.chown(path, OTHER_UID, OTHER_UID)
    assert refusal(open_own_file, path, os.O_RDWR) == f"is owned by uid {OTHER_UID}, not by this user (uid 0)"


def test_replace_file_writes_a_new_private_file_and_follows_no_link(scratch: str, no_umask: None) -> None:
    path = os.path.join(scratch, "cluster.json")
    victims = {name: os.path.join(scratch, f"victim-{name}") for name in ("cluster.json", "cluster.json.tmp")}
    for name, victim in victims.items():
        with open(victim, "w") as f:
            f.write("untouched")
        os.symlink(victim, os.path.join(scratch, name))
    replace_file(path, b"{}")
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    with open(path, "rb") as f:
        assert f.read() == b"{}"
    for victim in victims.values():
        with open(victim) as f:
            assert f.read() == "untouched"
    assert sorted(os.listdir(scratch)) == sorted(["cluster.json", "cluster.json.tmp",
                                                  *(os.path.basename(v) for v in victims.values())])


def test_replace_file_leaves_no_temporary_file_when_it_fails(scratch: str) -> None:
    path = os.path.join(scratch, "state")
    os.mkdir(path)
    open(os.path.join(path, "inside"), "w").close()  # a non-empty directory cannot be replaced
    with pytest.raises(OSError):
        replace_file(path, b"{}")
    assert os.listdir(scratch) == ["state"]


def test_a_stale_socket_is_removed_anything_else_is_refused_and_kept(scratch: str) -> None:
    path = os.path.join(scratch, "qmp.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
    remove_stale_socket(path)
    assert not os.path.lexists(path)
    remove_stale_socket(path)  # nothing there: nothing to do
    os.symlink(os.path.join(scratch, "victim"), path)
    assert refusal(remove_stale_socket, path) == "is a symbolic link"
    os.unlink(path)
    open(path, "w").close()
    assert refusal(remove_stale_socket, path) == "exists and is not a socket"
    assert stat.S_ISREG(os.lstat(path).st_mode)


def test_bound_sockets_give_others_no_access_whatever_the_umask(scratch: str, no_umask: None) -> None:
    zctx: zmq.Context[Any] = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    try:
        bind_owner_only(sock, f"ipc://{scratch}/router")
        assert stat.S_IMODE(os.lstat(f"{scratch}/router").st_mode) == 0o700
        assert os.umask(0) == 0  # the process's umask is back
    finally:
        sock.close(linger=0)
        zctx.term()
