"""nbkit.loop: the bridge between a caller's event loop and nbkit's loop thread."""

import asyncio
import threading

import pytest

from nbkit import loop


def test_wrap_runs_on_nbkits_thread_and_returns_the_result():
    async def where():
        return threading.current_thread().name

    async def main():
        return await loop.wrap(where())

    assert asyncio.run(main()) == "nbkit-loop"


def test_wrap_passes_the_exception_through():
    async def boom():
        raise KeyError("x")

    async def main():
        await loop.wrap(boom())

    with pytest.raises(KeyError):
        asyncio.run(main())


def test_cancelling_the_caller_cancels_the_coroutine_on_nbkits_loop():
    state = {"started": threading.Event(), "cancelled": threading.Event()}

    async def slow():
        state["started"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"].set()
            raise

    async def main():
        task = asyncio.ensure_future(loop.wrap(slow()))
        while not state["started"].is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert state["cancelled"].wait(5), "the coroutine on nbkit's loop was not cancelled"

