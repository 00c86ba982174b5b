"""Wire protocol v1, with no I/O: cursors, events, frames, codecs, close and error codes."""

from tether.protocol.codes import CloseCode, ErrorCode
from tether.protocol.cursor import Cursor
from tether.protocol.events import Event, Sender

__all__ = ["CloseCode", "Cursor", "ErrorCode", "Event", "Sender"]
