"""Structured logs: one JSON object per line, with the record's ``extra`` fields."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every dropped peer at info; those are counted in metrics instead.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    # The HTTP clients of model SDKs (openai, the agent frameworks) log every request at info:
    # one line per model call of every run would drown the server's own lines.
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "openai.agents"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
