"""Baseline servers, run as subprocesses by the benchmarks: ``python -m bench.baselines MODE``.

Each is the smallest idiomatic server doing the same job as tether without a store, envelope,
auth or protocol, so the ratio shows what tether's guarantees cost on top of the WebSocket stack.

Modes (aiohttp unless stated, uvloop, compression off):

``broadcast``  ``/sub`` connections only listen; every message received on ``/pub`` is written
               (encoded once) to every subscriber, then acknowledged to the publisher with a
               short frame, so the publisher can bound its messages in flight.
``relay``      every message received on ``/pub/{i}`` is forwarded to ``/sub/{i}``; with
               ``--ack``, then acknowledged to the publisher with a short frame.
``idle``       ``/ws`` accepts and reads; nothing else (idle memory per connection).
``push``       ``/ws`` writes ``--frames`` pre-encoded frames of ``--size`` bytes on connect.
``socketio``   python-socketio ASGI app under uvicorn: event ``join`` enters room ``r``; event
               ``pub`` emits ``delta`` with the same data to room ``r`` and acknowledges.
``picows-broadcast``, ``picows-relay``
               ``broadcast`` and ``relay`` (``--ack`` too) on picows instead of aiohttp: a
               WebSocket stack written in Cython, frames handled in a callback, no task or
               message object per frame. What a lighter WebSocket layer does with the same job.
``front-relay`` ``picows-relay`` behind a front protocol that shares its one port with an
               aiohttp application (``GET /healthz``): each connection's request head is read
               first, then the socket and the bytes read are handed to picows (WebSocket
               upgrades of ``/pub/`` and ``/sub/``) or to aiohttp (everything else). How
               tether could serve ``/v1/ws`` on picows and HTTP on aiohttp, on one port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from aiohttp import WSMsgType, web

ACK = b'{"ok":1}'


def _ws() -> web.WebSocketResponse:
    return web.WebSocketResponse(compress=False, max_msg_size=1 << 20)


def broadcast_app() -> web.Application:
    subscribers: list[web.WebSocketResponse] = []

    async def sub(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        subscribers.append(ws)
        try:
            async for _ in ws:
                pass
        finally:
            subscribers.remove(ws)
        return ws

    async def pub(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            data = msg.data.encode()  # encode once, the same bytes for every subscriber
            for target in tuple(subscribers):
                with contextlib.suppress(ConnectionError):
                    await target.send_frame(data, WSMsgType.TEXT)
            await ws.send_frame(ACK, WSMsgType.TEXT)
        return ws

    app = web.Application()
    app.router.add_get("/sub", sub)
    app.router.add_get("/pub", pub)
    return app


def relay_app(ack: bool = False) -> web.Application:
    subscribers: dict[str, web.WebSocketResponse] = {}

    async def sub(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        name = request.match_info["i"]
        subscribers[name] = ws
        try:
            async for _ in ws:
                pass
        finally:
            subscribers.pop(name, None)
        return ws

    async def pub(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        name = request.match_info["i"]
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            target = subscribers.get(name)
            if target is not None:
                await target.send_frame(msg.data.encode(), WSMsgType.TEXT)
            if ack:
                await ws.send_frame(ACK, WSMsgType.TEXT)
        return ws

    app = web.Application()
    app.router.add_get("/sub/{i}", sub)
    app.router.add_get("/pub/{i}", pub)
    return app


def idle_app() -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return app


def push_app(frames: int, size: int) -> web.Application:
    payloads = []
    for seq in range(1, frames + 1):
        head = b'{"type":"delta","seq":%d,"text":"' % seq
        payloads.append(head + b"x" * max(0, size - len(head) - 2) + b'"}')

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = _ws()
        await ws.prepare(request)
        for data in payloads:
            await ws.send_frame(data, WSMsgType.TEXT)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return app


def picows_factory(mode: str, ack: bool) -> Any:
    """The listener factory of ``picows-broadcast`` / ``picows-relay``."""
    import picows

    text = picows.WSMsgType.TEXT
    subscribers: dict[str, Any] = {}  # relay: name -> transport; broadcast: id -> transport

    class Sub(picows.WSListener):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        def on_ws_connected(self, transport: Any) -> None:
            subscribers[self.name] = transport

        def on_ws_disconnected(self, transport: Any) -> None:
            subscribers.pop(self.name, None)

    class Pub(picows.WSListener):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type != text:
                return
            data = frame.get_payload_as_bytes()  # once, the same bytes for every subscriber
            if mode == "broadcast":
                for target in tuple(subscribers.values()):
                    target.send(text, data)
            else:
                target = subscribers.get(self.name)
                if target is not None:
                    target.send(text, data)
            if ack:
                transport.send(text, ACK)

    count = 0

    def factory(request: Any) -> Any:
        nonlocal count
        path = request.path.decode() if isinstance(request.path, bytes) else request.path
        kind, _, name = path.strip("/").partition("/")
        if mode == "broadcast":
            count += 1
            name = str(count)
        if kind == "sub":
            return Sub(name)
        if kind == "pub":
            return Pub(name)
        return None

    return factory


async def serve_picows(mode: str, port: int, ack: bool) -> None:
    import picows

    server = await picows.ws_create_server(picows_factory(mode, ack), "127.0.0.1", port,
                                           reuse_address=True, backlog=4096,
                                           max_frame_size=1 << 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def _is_relay_upgrade(head: bytes) -> bool:
    first, _, headers = head.partition(b"\r\n")
    parts = first.split(b" ")
    return (len(parts) == 3 and parts[0] == b"GET" and parts[1].startswith((b"/pub/", b"/sub/"))
            and b"upgrade: websocket" in headers.lower())


async def serve_front(port: int, ack: bool) -> None:
    import logging

    from picows.picows import WSAutoPingStrategy, WSProtocol

    from tether.server.front import Front  # the head reader tether's own port uses

    factory = picows_factory("relay", ack)
    logger = logging.getLogger("picows.server")

    def websocket() -> asyncio.BaseProtocol:
        # The arguments picows.ws_create_server gives each connection's protocol.
        protocol: asyncio.BaseProtocol = WSProtocol(
            None, None, False, factory, logger, True, 5, False, 20, 20,
            WSAutoPingStrategy.PING_WHEN_IDLE, True, 1 << 20, None, 16 * 1024)
        return protocol

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    http = runner.server
    assert http is not None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Front(websocket, http, _is_relay_upgrade), "127.0.0.1", port,
        reuse_address=True, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await runner.cleanup()


async def serve_aiohttp(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def socketio_ws_impl() -> str:
    try:
        import websockets  # noqa: F401
    except ImportError:
        return "wsproto"
    return "websockets-sansio"


def serve_socketio(port: int) -> None:
    import socketio
    import uvicorn

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*",
                               http_compression=False, compression_threshold=1 << 30)

    @sio.event  # type: ignore[misc]
    async def join(sid: str, *_: Any) -> int:
        await sio.enter_room(sid, "r")
        return 1

    @sio.event  # type: ignore[misc]
    async def pub(sid: str, data: Any) -> int:
        await sio.emit("delta", data, room="r")
        return 1

    app = socketio.ASGIApp(sio)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", ws=socketio_ws_impl(),
                log_level="warning", lifespan="off", access_log=False,
                ws_per_message_deflate=False, backlog=4096)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["broadcast", "relay", "idle", "push", "socketio",
                                    "picows-broadcast", "picows-relay", "front-relay"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--ack", action="store_true", help="relay: acknowledge every message")
    args = p.parse_args()
    if args.mode == "socketio":
        serve_socketio(args.port)
        return
    import uvloop

    if args.mode.startswith("picows-"):
        mode = args.mode.removeprefix("picows-")
        # The broadcast baseline acknowledges every message, as the aiohttp one does.
        uvloop.run(serve_picows(mode, args.port, args.ack or mode == "broadcast"))
        return
    if args.mode == "front-relay":
        uvloop.run(serve_front(args.port, args.ack))
        return
    if args.mode == "push":
        app = push_app(args.frames, args.size)
    elif args.mode == "relay":
        app = relay_app(args.ack)
    else:
        app = {"broadcast": broadcast_app, "idle": idle_app}[args.mode]()
    uvloop.run(serve_aiohttp(app, args.port))


if __name__ == "__main__":
    main()
