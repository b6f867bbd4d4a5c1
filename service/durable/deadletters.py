"""Dead letters: outbox entries that failed to reach PostgreSQL again and again, kept in
the event's dead-letter stream for an operator to list, replay (after fixing the cause)
or discard. Used by the admin API and by `boxoffice dead-letters`."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Annotated, Any

import msgspec

from service.core import errors
from service.core.keys import event_keys
from service.core.settings import Settings
from service.core.timefmt import from_ms
from service.durable import outbox
from service.durable.live import ensure_loaded, live_event_ids
from service.hotpath.context import Services

# A stream entry id; anything else names no dead letter (and never reaches Redis).
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class DeadLetter(msgspec.Struct):
    id: Annotated[str, _doc("The dead letter's id: replay or discard it by this.")]
    op: Annotated[str | None, _doc("`confirm` or `cancel` (or what a broken entry said).")]
    booking_id: Annotated[str | None, _doc("null when the entry is too broken to tell.")]
    attempts: Annotated[
        int | None, _doc("Times it failed; null for a dead letter older than this field.")
    ]
    error: Annotated[str, _doc("Why it failed, the last time.")]
    first_failed_at: Annotated[str | None, _doc("When it first failed (null: not recorded).")]


class DeadLetterList(msgspec.Struct):
    dead_letters: list[DeadLetter]


def _int(value: bytes | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _view(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    op = outbox.op(fields)
    first = _int(fields.get(b"first_failed_at"))
    return DeadLetter(
        id=entry_id.decode(),
        op=None if op is None else op.decode(errors="replace"),
        booking_id=outbox.booking_id(fields),
        attempts=_int(fields.get(b"attempts")),
        error=fields.get(b"error", b"").decode(errors="replace"),
        first_failed_at=None if first is None else from_ms(first),
    )


async def list_dead_letters(svc: Services, event_id: str) -> DeadLetterList:
    entries: Any = await svc.redis.xrange(event_keys(event_id).deadletter)
    if not entries:
        await ensure_loaded(svc, event_id)  # event_not_found, if that is what it is
    return DeadLetterList([_view(i, f) for i, f in entries])


async def _not_found(svc: Services, event_id: str, dead_letter_id: str) -> errors.BoxofficeError:
    await ensure_loaded(svc, event_id)  # event_not_found first
    return errors.DeadLetterNotFound(f"no dead letter {dead_letter_id!r} in this event")


async def replay(svc: Services, event_id: str, dead_letter_id: str) -> None:
    """Move the dead letter back to the outbox, as the entry it was."""
    if _ENTRY_ID.fullmatch(dead_letter_id) and await svc.scripts.call_event(
        "replay_dead_letter",
        event_id,
        dead_letter_id,
        *outbox.DEAD_LETTER_META,
        extra_keys=(event_keys(event_id).deadletter,),
    ):
        return
    raise await _not_found(svc, event_id, dead_letter_id)


async def discard(svc: Services, event_id: str, dead_letter_id: str) -> None:
    """Drop the dead letter for good: its booking change never reaches PostgreSQL unless
    reconcile --repair can write it from what Redis has."""
    if _ENTRY_ID.fullmatch(dead_letter_id) and await svc.redis.xdel(
        event_keys(event_id).deadletter, dead_letter_id
    ):
        return
    raise await _not_found(svc, event_id, dead_letter_id)


# --- the command ------------------------------------------------------------------------


def render(listing: dict[str, DeadLetterList]) -> str:
    """A table for people: the events that have dead letters, then a total."""
    lines = []
    for event_id, dead in listing.items():
        if not dead.dead_letters:
            continue
        lines.append(f"event {event_id}: {len(dead.dead_letters)} dead letter(s)")
        for d in dead.dead_letters:
            lines.append(
                f"  {d.id}  {d.op} {d.booking_id or '?'}  attempts {d.attempts or '?'}"
                f"  first failed {d.first_failed_at or '?'}"
            )
            lines.append(f"    {d.error}")
    total = sum(len(d.dead_letters) for d in listing.values())
    lines.append(f"{total} dead letter(s) in {len(listing)} event(s)")
    return "\n".join(lines) + "\n"


async def _command(svc: Services, action: str | None, event: str | None, ids: list[str]) -> Any:
    if action is None:
        events = [event] if event is not None else await live_event_ids(svc)
        return {e: await list_dead_letters(svc, e) for e in events}
    act = replay if action == "replay" else discard
    missing = []
    for dead_letter_id in ids:
        try:
            await act(svc, event or "", dead_letter_id)
        except errors.DeadLetterNotFound:
            missing.append(dead_letter_id)
    return missing


def command(
    settings: Settings, action: str | None, event: str | None, ids: list[str], as_json: bool
) -> int:
    """`boxoffice dead-letters [replay|discard]`; the exit status (cli.DEAD_LETTERS_EXIT)."""
    name = "boxoffice dead-letters"
    if action is not None and event is None:
        print(f"{name} {action}: --event ID is required", file=sys.stderr)
        return 2

    async def run() -> Any:
        svc = Services.open(settings)
        try:
            await svc.start()
            return await _command(svc, action, event, ids)
        finally:
            await svc.close()

    try:
        result = asyncio.run(run())
    except errors.EventNotFound:
        print(f"{name}: no event {event!r}", file=sys.stderr)
        return 2
    except Exception as e:
        if not errors.unavailable(e):
            raise
        print(f"{name}: cannot run, Redis or PostgreSQL unreachable: {e}", file=sys.stderr)
        return 2
    if action is None:
        if as_json:
            body = {
                "events": [{"event_id": e, **msgspec.to_builtins(d)} for e, d in result.items()]
            }
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(body)).decode() + "\n")
        else:
            sys.stdout.write(render(result))
        return 0
    for dead_letter_id in result:
        print(f"{name} {action}: no dead letter {dead_letter_id!r} in {event}", file=sys.stderr)
    done = len(ids) - len(result)
    print(
        f"{'replayed' if action == 'replay' else 'discarded'} {done} of {len(ids)} dead letter(s)"
    )
    return 1 if result else 0
