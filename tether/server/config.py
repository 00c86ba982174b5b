"""Server settings: one dataclass, filled from CLI arguments first, environment second.

Every setting is listed in ``docs/operations.md`` with its flag and environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from tether.store.base import Retention


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("tether-data")
    # None = sqlite in data_dir; otherwise memory://, sqlite:///DIR or redis://HOST:PORT/DB
    store_url: str | None = None
    secret: str | None = None  # None = TETHER_SECRET, else a file in data_dir (created once)
    heartbeat: float = 15.0  # seconds between server pings; a peer has heartbeat/2 to pong
    hello_timeout: float = 10.0  # seconds to send hello after the upgrade
    max_frame_bytes: int = 1 << 20  # a larger incoming frame closes with 1009
    max_event_bytes: int = 256 << 10  # encoded event data larger than this: too_large
    max_sessions_per_connection: int = 100
    publish_rate: float = 1000.0  # sustained publishes per second per connection
    publish_burst: int = 2000  # token-bucket depth for the publish rate
    max_inflight_publishes: int = 1000  # per connection; reading pauses beyond this
    outbound_buffer_bytes: int = 1 << 20  # per connection; beyond it live → catch-up from store
    catchup_page: int = 500  # events per store read while catching up
    snapshot_events: int = 200  # events in an attached{resumed:false} snapshot
    presence_ttl: float = 60.0  # seconds a presence entry lives without refresh
    trim_interval: float = 60.0  # seconds between retention passes
    lease_seconds: float = 10.0  # a run's lease period; a dead node's runs move after ~2 of them
    tail_check_interval: float = 2.0  # lossy live channels (Redis): heal a lost last event
    max_errors_in_row: int = 100  # request errors in a row before closing the connection
    compression: bool = True  # offer permessage-deflate
    node_id: str = field(default_factory=lambda: os.environ.get("TETHER_NODE", ""))
    retention: Retention = field(default_factory=Retention)
    log_level: str = "info"

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        """Settings from ``TETHER_*`` environment variables, then ``overrides`` (not None)."""
        config = cls()
        env = os.environ
        for f in fields(cls):
            value = env.get(f"TETHER_{f.name.upper()}")
            if value is None or f.name == "retention":
                continue
            current = getattr(config, f.name)
            if isinstance(current, bool):
                setattr(config, f.name, value.lower() in ("1", "true", "yes", "on"))
            elif isinstance(current, int):
                setattr(config, f.name, int(value))
            elif isinstance(current, float):
                setattr(config, f.name, float(value))
            elif isinstance(current, Path):
                setattr(config, f.name, Path(value))
            else:
                setattr(config, f.name, value)
        config.retention = Retention(
            max_events=int(env.get("TETHER_RETENTION_EVENTS", config.retention.max_events)),
            max_age=float(env.get("TETHER_RETENTION_AGE", config.retention.max_age)),
            idempotency_window=float(env.get("TETHER_IDEMPOTENCY_WINDOW",
                                             config.retention.idempotency_window)),
        )
        store = env.get("TETHER_STORE")
        if store:
            config.store_url = store
        if "TETHER_DATA" in env:
            config.data_dir = Path(env["TETHER_DATA"])
        for name, override in overrides.items():
            if override is not None:
                setattr(config, name, override)
        return config

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite://{self.data_dir}"
