"""Request ids: 16 hex digits, never repeated within a process, across its counter's wrap, or in a fork."""

from __future__ import annotations

import os
import string

from proxy.gateway.handler import _RequestIds


def test_ids_are_16_hex_digits_and_distinct() -> None:
    ids = _RequestIds()
    drawn = [ids() for _ in range(10_000)]
    assert all(len(i) == 16 and set(i) <= set(string.hexdigits.lower()) for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_a_wrapped_counter_draws_a_new_prefix() -> None:
    ids = _RequestIds()
    first = ids()
    ids._next = 1 << 24  # as after 16.7 million requests
    after = ids()
    assert after[:10] != first[:10] and after.endswith("000000")


def test_a_forked_child_draws_its_own_prefix() -> None:
    ids = _RequestIds()
    parent = ids()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child[:10] != parent[:10] and child != ids()
