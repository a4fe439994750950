"""``LoopThread``: a private asyncio event loop in a daemon thread.

The synchronous client runs the asynchronous one on it, so there is one
implementation of every call. Blocking callers wait on futures; a caller
interrupted while waiting (``KeyboardInterrupt``) cancels the call it waited on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from sidemesh.core import FailedPreconditionError

T = TypeVar("T")
P = ParamSpec("P")


class LoopThread:
    """Runs coroutines on an event loop owned by a daemon thread, until ``stop``."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The thread that runs the loop."""
        return self._thread

    @property
    def stopped(self) -> bool:
        """True once ``stop`` has been called."""
        return self._stopping

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the loop and waits for its result or exception."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking MeshClient call was made on the client's own loop")
        with self._lock:
            if self._stopping:
                coro.close()
                raise FailedPreconditionError("the client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._pending.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._stopping:
                raise FailedPreconditionError("the client was closed during the call") from None
            raise
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt): stop the work too.
            future.cancel()
            raise
        finally:
            with self._lock:
                self._pending.discard(future)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs the plain function ``fn`` on the loop (for what must be created there)."""

        async def invoke() -> T:
            return fn(*args, **kwargs)

        return self.run(invoke())

    def next(self, iterator: AsyncIterator[T]) -> T:
        """The next item of an async iterator living on the loop; ``StopIteration`` at its end."""
        try:
            return self.run(_anext(iterator))
        except StopAsyncIteration:
            raise StopIteration from None

    def stop(self) -> None:
        """Stops the loop and waits for its thread to end; calls still waiting fail."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            pending = list(self._pending)
        for future in pending:
            future.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(self._loop)
                for task in tasks:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)
