"""A client's credit at an iothread: requests and bytes in flight, admitted
or refused with the reason, released as completions leave."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol import ClientCredit, InFlight, request_bytes


def test_requests_past_the_credit_are_refused_with_the_reason() -> None:
    f = InFlight(ClientCredit(max_requests=2, max_bytes=100), max_total_bytes=1000)
    assert f.admit(b"a", 60) is None and f.admit(b"a", 40) is None
    assert "2 requests in flight" in (f.admit(b"a", 0) or "")
    f.release(b"a", 40)
    assert "limit is 0 MiB" in (f.admit(b"a", 41) or "")  # 60 + 41 bytes > 100
    assert f.admit(b"b", 100) is None  # another client has its own credit
    assert f.of(b"a") == (1, 60) and f.of(b"b") == (1, 100) and f.refused == 2


def test_what_waits_to_be_sent_to_the_client_counts_as_in_flight() -> None:
    f = InFlight(ClientCredit(max_requests=4, max_bytes=100), max_total_bytes=1000)
    assert f.admit(b"a", 10, backlog=(3, 50)) is None
    assert f.admit(b"a", 10, backlog=(3, 50)) is not None  # 1 + 3 waiting: the fourth is refused
    assert f.admit(b"b", 60, backlog=(1, 50)) is not None  # 50 waiting + 60 > 100


def test_the_iothreads_total_is_shared_but_one_request_always_fits_an_idle_one() -> None:
    f = InFlight(ClientCredit(max_requests=10, max_bytes=100), max_total_bytes=150)
    assert f.admit(b"a", 100) is None
    assert "the iothread has" in (f.admit(b"b", 60) or "")
    f.release(b"a", 100)
    assert f.admit(b"b", 100) is None and f.total_bytes == 100
    assert InFlight(ClientCredit(max_bytes=1 << 30), max_total_bytes=10).admit(b"c", 1 << 20) is None


def test_the_headroom_is_what_admit_takes() -> None:
    """What ``headroom`` says a client may still start is what ``admit``
    takes (an inline path counts on it), at each of its limits."""
    f = InFlight(ClientCredit(max_requests=4, max_bytes=10_000), max_total_bytes=15_000)
    for backlog in ((0, 0), (2, 3000), (3, 9000), (4, 0)):
        for others in (0, 1, 2):  # another client's bytes in flight (the iothread's total)
            for i in range(others):
                assert f.admit(b"other%d" % i, 6000) is None
            requests_left, bytes_left, total_left = f.headroom(b"me", backlog)
            for nbytes in (0, 1000, 5000, 7000, 9000, 10_000, 12_000):
                expected = requests_left > 0 and nbytes <= bytes_left and nbytes <= total_left
                assert (f.admit(b"me", nbytes, backlog) is None) == expected, (backlog, others, nbytes)
                if expected:
                    f.release(b"me", nbytes)
            for i in range(others):
                f.release(b"other%d" % i, 6000)


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 50), st.booleans()), max_size=200))
def test_admitted_minus_released_is_what_is_counted(ops: list[tuple[bytes, int, bool]]) -> None:
    f = InFlight(ClientCredit(max_requests=5, max_bytes=120), max_total_bytes=200)
    held: dict[bytes, list[int]] = {b"a": [], b"b": [], b"c": []}
    for client, nbytes, release in ops:
        if release and held[client]:
            f.release(client, held[client].pop())
        elif f.admit(client, nbytes) is None:
            held[client].append(nbytes)
        for c, sizes in held.items():
            assert f.of(c) == (len(sizes), sum(sizes))
            assert len(sizes) <= 5 and sum(sizes) <= 120
        assert f.total_bytes == sum(map(sum, held.values())) <= 200
        assert f.clients == sum(1 for sizes in held.values() if sizes)


def test_the_bytes_a_request_moves() -> None:
    assert request_bytes("read", 4096, b"") == 4096
    assert request_bytes("write", 4096, b"x" * 4096) == 4096
    assert request_bytes("flush", 0, b"") == 0
