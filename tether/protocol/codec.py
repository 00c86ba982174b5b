"""Codecs, negotiated by WebSocket subprotocol: ``tether.v1.json`` and ``tether.v1.msgpack``.

JSON frames travel as text frames, MessagePack frames as binary frames. Both carry the same
objects; a frame must decode to a map.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgpack
import orjson

JSON_SUBPROTOCOL = "tether.v1.json"
MSGPACK_SUBPROTOCOL = "tether.v1.msgpack"


class DecodeError(ValueError):
    """Bytes that are not one frame of this codec."""


class Codec(Protocol):
    subprotocol: str
    binary: bool

    def encode(self, frame: dict[str, Any]) -> bytes: ...

    def decode(self, data: bytes | str) -> dict[str, Any]: ...


class JsonCodec:
    subprotocol = JSON_SUBPROTOCOL
    binary = False

    def encode(self, frame: dict[str, Any]) -> bytes:
        return orjson.dumps(frame)

    def decode(self, data: bytes | str) -> dict[str, Any]:
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"malformed JSON: {exc}") from None
        if not isinstance(frame, dict):
            raise DecodeError("a frame must be a JSON object")
        return frame


class MsgpackCodec:
    subprotocol = MSGPACK_SUBPROTOCOL
    binary = True

    def encode(self, frame: dict[str, Any]) -> bytes:
        return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]

    def decode(self, data: bytes | str) -> dict[str, Any]:
        if isinstance(data, str):
            raise DecodeError("MessagePack frames must be binary")
        try:
            frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated exception types
            raise DecodeError(f"malformed MessagePack: {type(exc).__name__}") from None
        if not isinstance(frame, dict):
            raise DecodeError("a frame must be a MessagePack map")
        return frame


JSON = JsonCodec()
MSGPACK = MsgpackCodec()
CODECS: dict[str, Codec] = {JSON_SUBPROTOCOL: JSON, MSGPACK_SUBPROTOCOL: MSGPACK}
SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)
