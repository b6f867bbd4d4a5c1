"""The loop a NodePipe keeps (service/hotpath/loops.py KeptLoop): always the loop that
calls, whether the pipe goes on to another loop, another thread's, or a forked child's."""

from __future__ import annotations

import asyncio
import os
import threading

import uvloop

from service.hotpath.nodepipe import NodePipe


def _pipe() -> NodePipe:
    return NodePipe({"host": "127.0.0.1", "port": 1})  # never dialled here


async def _kept(pipe: NodePipe) -> bool:
    """Whether the pipe's loop is the running one, asked twice (the second time, kept)."""
    running = asyncio.get_running_loop()
    return pipe._loop.running() is running and pipe._loop.running() is running


def test_a_pipe_follows_its_callers_from_loop_to_loop() -> None:
    pipe = _pipe()
    assert asyncio.run(_kept(pipe))
    assert uvloop.run(_kept(pipe))  # a new loop, of another kind, after the first closed
    assert asyncio.run(_kept(pipe))


def test_a_pipe_called_from_another_threads_loop_gets_that_loop() -> None:
    pipe = _pipe()
    answers: list[bool] = []

    async def main() -> None:
        assert await _kept(pipe)  # this loop kept, and running while the thread calls
        thread = threading.Thread(target=lambda: answers.append(asyncio.run(_kept(pipe))))
        thread.start()
        await asyncio.to_thread(thread.join)
        assert await _kept(pipe)

    asyncio.run(main())
    assert answers == [True]


def test_a_forked_child_does_not_get_its_parents_loop() -> None:
    pipe = _pipe()

    async def main() -> int:
        assert await _kept(pipe)
        pid = os.fork()  # inside the running loop: the child's copy of it says it runs
        if pid == 0:
            code = 1
            try:
                code = 0 if asyncio.run(_kept(pipe)) else 1
            finally:
                os._exit(code)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        return os.waitstatus_to_exitcode(status)

    assert asyncio.run(main()) == 0
