"""Ids from the pool of random bytes (service/core/randompool.py): well-formed, unique, and
never the same in a forked child as in its parent."""

from __future__ import annotations

import base64
import os
import re

from service.core import randompool


def test_ids_are_22_urlsafe_characters_of_128_bits_each_once() -> None:
    ids = [randompool.token_urlsafe() for _ in range(5000)]  # the pool refilled ~20 times
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", text)
        raw = base64.urlsafe_b64decode(text + "==")
        assert len(raw) == 16
        assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == text  # canonical
    # Every character of the alphabet turns up (the translated '-' and '_' included).
    assert set("".join(ids)) >= set("-_")


def test_randbits_stay_in_range_and_vary() -> None:
    values = [randompool.randbits(52) for _ in range(2000)]
    assert all(0 <= v < 2**52 for v in values)
    assert len(set(values)) == len(values)
    assert max(values) > 2**51  # the top bit is used


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    randompool.token_urlsafe()  # the pool filled before the fork: the child has a copy
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.close(reading)
            ids = " ".join(randompool.token_urlsafe() for _ in range(300))
            os.write(writing, ids.encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        child = pipe.read().decode().split()
    os.waitpid(pid, 0)
    parent = [randompool.token_urlsafe() for _ in range(300)]
    assert len(child) == 300
    assert not set(child) & set(parent)
