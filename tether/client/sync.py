"""A blocking wrapper for scripts: :class:`SyncClient` runs a :class:`Client` on an event loop in
a background thread and hands each call over to it.

::

    with SyncClient("ws://127.0.0.1:8765", token=TOKEN) as client:
        session = client.attach("demo")
        session.publish("message", {"text": "hi"})
        for event in session.events(timeout=5):   # stops after 5 s without an event
            print(event)

It owns the thread and its loop, nothing else: every guarantee is the async client's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from tether.client.client import Client, ConnectionState, Session, SessionState, TokenSource
from tether.client.errors import SessionClosed
from tether.client.protocol import SessionItem

T = TypeVar("T")


class SyncSession:
    """Blocking view of a :class:`~tether.client.client.Session`."""

    def __init__(self, owner: SyncClient, session: Session) -> None:
        self._owner = owner
        self.session = session

    @property
    def name(self) -> str:
        return self.session.name

    @property
    def cursor(self) -> str | None:
        """The cursor of the last item yielded by :meth:`events` / :meth:`next`."""
        return self.session.cursor

    @property
    def resumed(self) -> bool | None:
        return self.session.resumed

    @property
    def state(self) -> SessionState:
        return self.session.state

    @property
    def presence(self) -> dict[str, dict[str, Any]]:
        return self._owner._call(self._presence())

    async def _presence(self) -> dict[str, dict[str, Any]]:
        return self.session.presence

    def publish(self, type: str, data: Any = None, *, key: str | None = None,
                transient: bool = False, timeout: float | None = None) -> str | None:
        """Publish and wait for the commit; see :meth:`Session.publish`."""
        return self._owner._call(
            self.session.publish(type, data, key=key, transient=transient), timeout)

    def set_presence(self, state: dict[str, Any], timeout: float | None = None) -> None:
        self._owner._call(self.session.set_presence(state), timeout)

    def next(self, timeout: float | None = None) -> SessionItem:
        """The next item; ``TimeoutError`` after ``timeout`` seconds, :class:`SessionClosed`
        once detached and drained."""
        return self._owner._call(self._next(timeout))

    async def _next(self, limit: float | None) -> SessionItem:
        async with asyncio.timeout(limit):
            return await self.session.next()

    def events(self, timeout: float | None = None) -> Iterator[SessionItem]:
        """Iterate items; stops after ``timeout`` seconds without one (``None``: never), or
        when the session is detached or the client closed."""
        while True:
            try:
                yield self.next(timeout)
            except (TimeoutError, SessionClosed):
                return

    def detach(self, timeout: float | None = None) -> None:
        self._owner._call(self.session.detach(), timeout)


class SyncClient:
    """Blocking :class:`~tether.client.client.Client`; takes the same arguments."""

    def __init__(self, url: str, *, token: TokenSource = None, **options: Any) -> None:
        self._url = url
        self._token = token
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the SyncClient is not connected")
        return self._client

    @property
    def state(self) -> ConnectionState:
        return self.client.state

    def connect(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="tether-sync-client", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._client = self._call(self._make_client())
            self._call(self._client.connect(), timeout)
        except BaseException:
            self.close()
            raise

    async def _make_client(self) -> Client:
        # Built on the loop thread: asyncio objects belong to the loop that uses them.
        return Client(self._url, token=self._token, **self._options)

    def attach(self, session: str, cursor: str | None = None, *,
               presence: dict[str, Any] | None = None,
               timeout: float | None = None) -> SyncSession:
        return SyncSession(self, self._call(
            self.client.attach(session, cursor, presence=presence), timeout))

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._client is not None:
            self._call(self._client.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the SyncClient is not connected")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncClient methods cannot be called from its own loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # cancels the task on the loop: the call does not linger
            raise TimeoutError(f"no result within {timeout} s") from None
