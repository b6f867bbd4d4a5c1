"""Calls of one event's script that leave a process in the same turn of the event loop,
joined into one call of its batch script (lua/hold_batch.lua): Redis does the event's part
(meta, time, reclaim, categories, stock) once and each call's own part in turn, and answers
each call on its own. A call alone in its turn goes as it always did, to the script of one
(`Part.single`); so does a call that a redirect sends again (service/hotpath/clusterpipe.py).

Each call's keys share its event's hash tag (service/core/keys.py), so a batch stays in one
slot. service/hotpath/nodepipe.py groups the parts of a turn and writes the joined call."""

from __future__ import annotations

import asyncio
from typing import Any

from redis._parsers.base import BaseParser
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, ResponseError

from service.core.keys import EVENT_KEY_NAMES
from service.hotpath.connection import bulk

# Calls joined into one script call at most: bounds how long one call keeps Redis from
# everyone else, and the script's unpack() of a batch's records.
MOST = 64

_NKEYS = len(EVENT_KEY_NAMES)
_NCOMMON = 3  # the arguments every event script takes after the fingerprint (lua/lib.lua)
_NO_FINGERPRINT = bulk(b"")


class Part:
    """One call as a part of a batch: the event's keys and the common arguments (RESP, the
    same for every part of a group), its own keys, fingerprint and arguments in RESP (the
    batch script's layout: its fingerprint first), and the script of one, which takes the
    call alone (`single`)."""

    __slots__ = (
        "alone",
        "args",
        "common",
        "event_keys",
        "fingerprint",
        "group",
        "keys",
        "nargs",
        "nkeys",
        "script",
    )

    def __init__(
        self,
        group: tuple[str, str],
        script: AsyncScript,
        alone: AsyncScript,
        event_keys: bytes,
        common: bytes,
        own: tuple[bytes, int, bytes, bytes, int],
    ) -> None:
        """`group`: the batch script's name and the event's id; `script`: the batch script;
        `own`: the part's keys and their count, its fingerprint, its other arguments, and
        the count of its arguments with the fingerprint."""
        self.group = group
        self.script = script
        self.alone = alone
        self.event_keys = event_keys
        self.common = common
        self.keys, self.nkeys, self.fingerprint, self.args, self.nargs = own

    @property
    def single(self) -> bytes:
        """The call as the script of one takes it: built only for a call that goes alone (the
        only one of its group in a turn, a redirect), not for every call (a copy of the
        event's kilobyte of keys each)."""
        nkeys = _NKEYS + self.nkeys
        count = 3 + nkeys + _NCOMMON + self.nargs
        head = b"*%d\r\n" % count + bulk(b"EVALSHA", self.alone.sha.encode(), b"%d" % nkeys)
        return b"".join(
            (head, self.event_keys, self.keys, self.fingerprint, self.common, self.args)
        )


def join(parts: list[Part]) -> bytes:
    """One EVALSHA of the batch script for the parts, in their order."""
    first = parts[0]
    nkeys = _NKEYS + sum(p.nkeys for p in parts)
    count = 3 + nkeys + 1 + _NCOMMON + sum(p.nargs for p in parts)
    head = b"*%d\r\n" % count + bulk(b"EVALSHA", first.script.sha.encode(), b"%d" % nkeys)
    return b"".join(
        (
            head,
            first.event_keys,
            *(p.keys for p in parts),
            _NO_FINGERPRINT,
            first.common,
            *(piece for p in parts for piece in (p.fingerprint, p.args)),
        )
    )


def split(
    futures: list[asyncio.Future[Any]], loop: asyncio.AbstractEventLoop
) -> asyncio.Future[Any]:
    """The future of a joined call, which settles each part's future with its own reply
    (an error reply of a part fails that part alone), or all of them with the call's error."""
    joined: asyncio.Future[Any] = loop.create_future()

    def settle(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            error: BaseException = ConnectionError("a joined script call was cancelled")
        elif (e := done.exception()) is not None:
            error = e
        else:
            replies = done.result()
            if isinstance(replies, list) and len(replies) == len(futures):
                for future, reply in zip(futures, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
                    else:
                        future.set_result(reply)
                return
            error = ResponseError(
                f"a batch script answered {len(futures)} calls with {replies!r:.200}"
            )
        for future in futures:
            if not future.done():
                future.set_exception(error)

    joined.add_done_callback(settle)
    return joined
