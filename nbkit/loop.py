"""nbkit's own event loop, on one daemon thread, shared by all of nbkit's I/O.

Why: ipykernel 7 stalls asyncio tasks left on the kernel's loop once a cell finishes, and an
``httpx.AsyncClient`` must stay on the loop that made it. So every coroutine of nbkit runs on
this loop, and callers bridge to it::

    from nbkit.loop import run, wrap
    run(coro)            # blocking: scripts, notebook cells, nbmake, other threads
    await wrap(coro)     # awaitable: from any other running loop (a notebook cell, asyncio.run)

The thread also spawns nbkit's child processes, so a parent-death signal tied to the spawning
thread (PR_SET_PDEATHSIG) only fires when the whole process dies.

The loop is uvloop's when uvloop is installed (it comes with uvicorn[standard] and vLLM), which
roughly halves the router's CPU time per request; ``NBKIT_LOOP=asyncio`` picks asyncio's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import os
import threading
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``NBKIT_LOOP`` asks for (``uvloop``, the default when it is
    installed, or ``asyncio``)."""
    kind = os.environ.get("NBKIT_LOOP", "uvloop").strip().lower()
    if kind not in ("uvloop", "asyncio"):
        raise ValueError(f"NBKIT_LOOP={kind!r}: expected 'uvloop' or 'asyncio'")
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_kind() -> str:
    """``"uvloop"`` or ``"asyncio"``: what the background loop is."""
    return "uvloop" if type(get_loop()).__module__.startswith("uvloop") else "asyncio"


def get_loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            loop = new_loop()
            ready = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=_run, name="nbkit-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop; returns a concurrent future."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and block until it is done.

    Cancels the coroutine if the caller is interrupted (KeyboardInterrupt in a notebook).
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError("nbkit: a blocking call was made from nbkit's own loop; use the async form")
    fut = submit(coro)
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


async def wrap(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` (which runs on the background loop) from whatever loop the caller is on.

    One wake-up of each loop and no ``concurrent.futures`` machinery in between: this hop is on
    the path of every request a RoutedClient sends, so it is kept as short as it can be. If the
    caller is cancelled, the task on nbkit's loop is cancelled too."""
    if in_loop_thread():
        return await coro
    caller = asyncio.get_running_loop()
    home = get_loop()
    fut = caller.create_future()
    box: dict[str, Any] = {}

    def deliver(task: asyncio.Task) -> None:  # on the caller's loop
        if fut.done():
            return
        if task.cancelled():
            fut.cancel()
        elif task.exception() is not None:
            fut.set_exception(task.exception())
        else:
            fut.set_result(task.result())

    def done(task: asyncio.Task) -> None:  # on nbkit's loop
        try:
            caller.call_soon_threadsafe(deliver, task)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
            pass

    def start() -> None:  # on nbkit's loop
        task = box["task"] = home.create_task(coro)
        task.add_done_callback(done)
        if box.get("cancelled"):
            task.cancel()

    home.call_soon_threadsafe(start)
    try:
        return await fut
    except asyncio.CancelledError:
        box["cancelled"] = True
        task = box.get("task")
        if task is not None:
            home.call_soon_threadsafe(task.cancel)
        raise


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` on the background loop's thread."""
    get_loop().call_soon_threadsafe(fn, *args)


def run_in_loop_thread(fn: Callable[[], T]) -> T:
    """Call a plain function on the loop's thread and return its result (blocking)."""
    if in_loop_thread():
        return fn()

    async def _call() -> T:
        return fn()

    return run(_call())



# -- one implementation, two forms ----------------------------------------------------------------
def on_loop(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Coroutine[Any, Any, T]]:
    """Decorate an ``async def`` whose body must run on nbkit's loop: the result is awaitable from
    any loop (a notebook cell, ``asyncio.run``, nbkit's own loop). Pair it with :class:`blocking`::

        class Cluster:
            @loop.on_loop
            async def astart(self, timeout=None):
                \"\"\"Start every replica ...\"\"\"
            start = loop.blocking(astart)       # cluster.start(): the same body, blocking
    """
    @functools.wraps(fn)
    async def awaitable(*args: Any, **kwargs: Any) -> T:
        return await wrap(fn(*args, **kwargs))

    awaitable.on_loop = fn  # type: ignore[attr-defined]
    return awaitable


class blocking:
    """The blocking form of an :func:`on_loop` method (``start = blocking(astart)``): it runs the same
    body on nbkit's loop and waits for it, from scripts, notebook cells, nbmake and other threads."""

    def __init__(self, afn: Callable[..., Any]):
        self.impl = afn.on_loop  # type: ignore[attr-defined]
        self.async_name = afn.__name__
        self.name = afn.__name__.removeprefix("a")
        params = list(inspect.signature(self.impl).parameters.values())[1:]  # without self
        self.signature = inspect.signature(self.impl).replace(parameters=params)
        self.__doc__ = f"Blocking :meth:`{self.async_name}`."

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        impl = self.impl

        def call(*args: Any, **kwargs: Any) -> Any:
            return run(impl(obj, *args, **kwargs))

        call.__name__ = call.__qualname__ = self.name
        call.__doc__ = self.__doc__
        call.__signature__ = self.signature  # type: ignore[attr-defined]
        return call
