"""permessage-deflate that costs little memory per connection (RFC 7692).

aiohttp's own deflate gives every connection that accepts it a zlib compressor with a 32 KiB
window at memory level 8 (256 KiB allocated, ~80 KiB of it touched) and, once the client sends
one compressed frame, a decompressor with another 32 KiB window: ~120 KiB per connection for the
life of the socket, 7× an idle connection's whole cost. This module negotiates the extension
itself and keeps it small:

- **server → client** keeps context takeover (token-stream frames repeat the previous frames'
  keys; without takeover most of the saving goes) but with a small negotiated window
  (``server_max_window_bits``, default 10: 1 KiB) and memory level (default 1). Measured on a
  token stream, window 10 keeps 98 % of the byte saving of aiohttp's 32 KiB window, for ~11 KiB
  of zlib state instead of ~256 KiB. Frames under a size threshold go out uncompressed (a
  compressed frame must say so with RSV1, so skipping one is always allowed). The compressor
  is built only at a connection's fourth frame since the last heartbeat ping (before that,
  frames of 1 KiB or more are compressed each with a throwaway one), and a connection that
  sent nothing between two pings drops it: the next frame starts a fresh one, which is valid
  deflate for the client's decompressor (it just refers to no older data). A connection that
  attaches and stays idle never holds zlib state.
- **client → server** is asked for ``client_no_context_takeover`` (and, when the client offers
  it, a ``client_max_window_bits`` as small as ours): every client message then decompresses on
  its own, so no decompressor outlives the message it decodes.

Offers the server cannot accept (a ``server_max_window_bits`` below 9, which zlib cannot do,
malformed parameters) are skipped; no acceptable offer means no compression, never a failed
handshake.

The shim overrides three private hooks of :class:`aiohttp.web.WebSocketResponse` (``_handshake``,
``_pre_start``, ``_post_start``); :data:`SUPPORTED` is false on an aiohttp other than 3.14 (the
version they were written against), and the endpoint then falls back to aiohttp's own deflate.
"""

from __future__ import annotations

import asyncio
import functools
import re
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp._websocket.models import WS_DEFLATE_TRAILING, WebSocketError, WSCloseCode
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.compression_utils import ZLibCompressor
from aiohttp.helpers import DEFAULT_CHUNK_SIZE

from tether.server.config import ServerConfig

# The hooks and the reader's constructor are those of aiohttp 3.14 (checked by the tests); any
# other version falls back to aiohttp's own deflate rather than risk a mismatch at run time.
SUPPORTED = aiohttp.__version__.startswith("3.14.") and all(
    hasattr(web.WebSocketResponse, name) for name in (
        "_handshake", "_pre_start", "_post_start", "_reset_heartbeat", "_on_data_received"))

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_PING = 0x9
_PARAM = re.compile(r"^\s*([a-z_]+)\s*(?:=\s*\"?(\d+)\"?)?\s*$")
# The largest payload compressed inline; larger ones go to aiohttp's executor path.
_SYNC_LIMIT = 16 * 1024
# A connection's persistent compressor is made at its _WARM-th data frame since the last
# heartbeat ping; before that only frames of _COLD_LARGE bytes or more are compressed.
_WARM = 4
_COLD_LARGE = 1024


@dataclass(frozen=True, slots=True)
class DeflateSettings:
    """What the server accepts and asks for; see ``compression_*`` in ``docs/operations.md``."""

    window_bits: int = 10  # server → client LZ77 window: 2**bits bytes, 9..15
    mem_level: int = 1  # zlib memLevel of the server's compressor, 1..9
    threshold: int = 64  # frames shorter than this many bytes go out uncompressed
    level: int = 1  # zlib compression level

    def __post_init__(self) -> None:
        if not 9 <= self.window_bits <= 15:
            raise ValueError("compression window bits must be between 9 and 15")
        if not 1 <= self.mem_level <= 9:
            raise ValueError("compression memory level must be between 1 and 9")


@dataclass(frozen=True, slots=True)
class Agreement:
    """One accepted offer: the response header and what each side may do."""

    header: str
    server_bits: int
    server_takeover: bool
    client_bits: int


def negotiate(offers: str | None, settings: DeflateSettings) -> Agreement | None:
    """The first acceptable ``permessage-deflate`` offer in a Sec-WebSocket-Extensions value."""
    if not offers:
        return None
    for offer in offers.split(","):
        name, _, rest = offer.partition(";")
        if name.strip().lower() != "permessage-deflate":
            continue
        agreement = _accept(rest, settings)
        if agreement is not None:
            return agreement
    return None


def _accept(params: str, settings: DeflateSettings) -> Agreement | None:
    seen: dict[str, int | None] = {}
    for raw in filter(None, (p.strip() for p in params.split(";"))):
        match = _PARAM.match(raw.lower())
        if match is None or match.group(1) in seen:
            return None  # malformed or repeated: decline this offer (RFC 7692 §5)
        name, value = match.group(1), match.group(2)
        seen[name] = int(value) if value is not None else None
    server_bits = settings.window_bits
    server_takeover = "server_no_context_takeover" not in seen
    header = ["permessage-deflate"]
    if "server_max_window_bits" in seen:
        offered = seen["server_max_window_bits"]
        if offered is None or not 8 <= offered <= 15:
            return None
        if offered < 9:
            return None  # zlib's raw deflate cannot use a 256-byte window
        server_bits = min(server_bits, offered)
    header.append(f"server_max_window_bits={server_bits}")
    if not server_takeover:
        header.append("server_no_context_takeover")
    # Each client message on its own: no decompressor lives between messages.
    header.append("client_no_context_takeover")
    client_bits = 15
    if "client_max_window_bits" in seen:
        offered = seen["client_max_window_bits"]
        if offered is not None and not 8 <= offered <= 15:
            return None
        client_bits = max(9, min(settings.window_bits, offered or 15))
        header.append(f"client_max_window_bits={client_bits}")
    unknown = set(seen) - {"server_no_context_takeover", "client_no_context_takeover",
                           "server_max_window_bits", "client_max_window_bits"}
    if unknown:
        return None
    return Agreement("; ".join(header), server_bits, server_takeover, client_bits)


class _Deflater(ZLibCompressor):
    """aiohttp's compressor interface over a zlib compressor with a chosen memory level."""

    def __init__(self, level: int, bits: int, mem_level: int) -> None:
        # Not super().__init__: it would allocate (and we would drop) a memLevel-8 compressor.
        self._executor = None
        self._max_sync_chunk_size = _SYNC_LIMIT
        self._mode = -bits
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -bits, mem_level)

    def flush(self, mode: int | None = None) -> bytes:
        return self._compressor.flush(zlib.Z_FINISH if mode is None else mode)


class _Writer(WebSocketWriter):
    """aiohttp's writer with the tuned compressor, a size threshold and idle release."""

    def __init__(self, base: WebSocketWriter, settings: DeflateSettings) -> None:
        super().__init__(base.protocol, base.transport, compress=base.compress,
                         notakeover=base.notakeover, limit=base._limit)
        self._settings = settings
        self._sent_since_ping = 0  # data frames since the last heartbeat ping

    def _get_compressor(self, compress: int | None) -> ZLibCompressor:
        settings = self._settings
        if compress:
            return _Deflater(settings.level, compress, settings.mem_level)
        if self._compressobj is None:
            self._compressobj = _Deflater(settings.level, self.compress, settings.mem_level)
        return self._compressobj

    async def send_frame(self, message: bytes, opcode: int, compress: int | None = None
                         ) -> None:
        if opcode >= 0x8:
            if opcode == _OP_PING:
                # A heartbeat interval with nothing sent: let the compressor go (see module doc).
                if not self._sent_since_ping and not self._send_lock.locked():
                    self._compressobj = None
                self._sent_since_ping = 0
            await super().send_frame(message, opcode, compress)
            return
        self._sent_since_ping += 1
        if compress is None and self._compressobj is None and self._sent_since_ping < _WARM:
            # Cold: the handshake's few frames (welcome, attached, presence) would make every
            # connection build a compressor it may never use again. Large ones are compressed
            # with a throwaway compressor instead; small ones go as they are.
            if len(message) >= _COLD_LARGE:
                await super().send_frame(message, opcode, self.compress)
                return
            compress = 0
        if compress == 0 or (len(message) < self._settings.threshold and compress is None):
            if not self._send_lock.locked() and not self._closing:
                # Small frames cost more CPU to compress than the bytes they save; a frame
                # without RSV1 is sent as is and leaves the compression context untouched.
                self._write_websocket_frame(message, opcode, 0)
                if self._output_size > self._limit:
                    self._output_size = 0
                    if self.protocol._paused:
                        await self.protocol._drain_helper()
                return
            compress = None
        await super().send_frame(message, opcode, compress)


class _Reader(WebSocketReader):
    """aiohttp's frame reader, with compressed messages inflated here, one at a time.

    Every compressed message gets a fresh decompressor (the client agreed to no context
    takeover), so none outlives its message. Fragments of a compressed message are gathered
    here and the inflated whole handed to aiohttp's reader as one uncompressed frame.
    """

    def __init__(self, queue: WebSocketDataQueue, max_msg_size: int, decode_text: bool,
                 client_bits: int) -> None:
        super().__init__(queue, max_msg_size, True, decode_text)
        self._limit = max_msg_size
        self._bits = client_bits
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._opcode_z = -1

    def _handle_frame(self, fin: bool, opcode: int, payload: Any, compressed: int) -> None:
        if not compressed or opcode > _OP_BINARY:
            super()._handle_frame(fin, opcode, payload, 0)
            return
        if opcode != _OP_CONTINUATION:
            if self._opcode_z != -1:
                raise WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                     "a new message began inside a fragmented one")
            self._opcode_z = opcode
        elif self._opcode_z == -1:
            raise WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                 "continuation frame for a message never started")
        self._parts.append(bytes(payload))
        self._parts_size += len(payload)
        if self._limit and self._parts_size > self._limit:
            raise WebSocketError(WSCloseCode.MESSAGE_TOO_BIG,
                                 f"message exceeds size limit {self._limit}")
        if not fin:
            return
        data = b"".join(self._parts) + WS_DEFLATE_TRAILING
        opcode, self._opcode_z = self._opcode_z, -1
        self._parts = []
        self._parts_size = 0
        inflater = zlib.decompressobj(-self._bits)
        try:
            out = inflater.decompress(data, self._limit + 1 if self._limit else 0)
        except zlib.error as exc:
            raise WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                 f"bad compressed message: {exc}") from None
        if self._limit and (len(out) > self._limit or inflater.unconsumed_tail):
            raise WebSocketError(WSCloseCode.MESSAGE_TOO_BIG,
                                 f"decompressed message exceeds size limit {self._limit}")
        super()._handle_frame(True, opcode, out, 0)


class LeanWebSocketResponse(web.WebSocketResponse):
    """aiohttp's WebSocketResponse, its heartbeat's two late attributes in slots.

    CPython 3.11 keeps up to 30 attributes of an instance in a compact array (keys shared by
    the class, ~0.26 KiB here). A prepared WebSocketResponse with a heartbeat has 29; the
    first ping sets ``_pong_response_cb`` and ``_ping_task`` (class-level defaults until
    then), the 31st does not fit, and the instance moves to a dictionary grown to three times
    its size: 1.5 KiB more per idle connection during its first heartbeat period
    (``bench/experiments/conn_heap.py --rest``). In slots they take 16 bytes and the array
    stays.
    """

    __slots__ = ("_ping_task", "_pong_response_cb")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # A slot has no class-level default to fall back on.
        self._pong_response_cb: asyncio.TimerHandle | None = None
        self._ping_task: asyncio.Task[None] | None = None


class DeflateWebSocketResponse(LeanWebSocketResponse):
    """A WebSocketResponse that negotiates and runs deflate per :class:`DeflateSettings`."""

    __slots__ = ("_agreement", "_deflate")  # kept out of the shared array too (see above)

    def __init__(self, *, deflate: DeflateSettings, **kwargs: Any) -> None:
        super().__init__(compress=True, **kwargs)
        self._deflate = deflate
        self._agreement: Agreement | None = None

    def _handshake(self, request: web.BaseRequest) -> tuple[Any, str | None, int, bool]:
        self._compress = False  # aiohttp's own negotiation stays out of it
        headers, protocol, _, _ = super()._handshake(request)
        agreement = negotiate(request.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS), self._deflate)
        self._agreement = agreement
        if agreement is None:
            return headers, protocol, 0, False
        headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = agreement.header
        return headers, protocol, agreement.server_bits, not agreement.server_takeover

    def _pre_start(self, request: web.BaseRequest) -> tuple[str | None, WebSocketWriter]:
        protocol, writer = super()._pre_start(request)
        if self._agreement is None:
            return protocol, writer
        return protocol, _Writer(writer, self._deflate)

    def _post_start(self, request: web.BaseRequest, protocol: str | None,
                    writer: WebSocketWriter) -> None:
        agreement = self._agreement
        if agreement is None:
            super()._post_start(request, protocol, writer)
            return
        # aiohttp's _post_start with our reader in place of its own.
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        assert self._loop is not None
        self._reader = WebSocketDataQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop)
        self._parser = _Reader(self._reader, self._max_msg_size, self._decode_text,
                               agreement.client_bits)
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=callback)
        request.protocol.keep_alive(False)


def websocket_response(config: ServerConfig, **kwargs: Any) -> web.WebSocketResponse:
    """The endpoint's WebSocketResponse: deflate as configured (``compression*`` settings)."""
    if not config.compression:
        return LeanWebSocketResponse(compress=False, **kwargs)
    if not SUPPORTED:
        return LeanWebSocketResponse(compress=True, **kwargs)
    return DeflateWebSocketResponse(deflate=_settings(
        config.compression_window_bits, config.compression_mem_level,
        config.compression_threshold), **kwargs)


@functools.lru_cache(maxsize=8)
def _settings(window_bits: int, mem_level: int, threshold: int) -> DeflateSettings:
    return DeflateSettings(window_bits, mem_level, threshold)


__all__ = ["SUPPORTED", "Agreement", "DeflateSettings", "DeflateWebSocketResponse",
           "LeanWebSocketResponse", "negotiate", "websocket_response"]
