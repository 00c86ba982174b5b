"""Server settings: one dataclass, filled from CLI arguments first, environment second.

Every setting is listed in ``docs/operations.md`` with its flag and environment variable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from tether.store.base import Retention

_N = TypeVar("_N", int, float)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("tether-data")
    # None = sqlite in data_dir; otherwise memory://, sqlite:///DIR or redis://HOST:PORT/DB
    store_url: str | None = None
    secret: str | None = None  # None = TETHER_SECRET, else a file in data_dir (created once)
    # Where a secret is looked for after DATA/secret, and created when there is none at all
    # (instead of DATA/secret). `tether serve` and `tether token` set the per-user file
    # ($XDG_CONFIG_HOME/tether/secret) so they agree whatever their working directories.
    user_secret: Path | None = None
    # A file of one secret, or of kid=secret lines / a JSON {kid: secret}: the first signs.
    # Replaces `secret` (both set: an error). Keeps secrets out of `ps` and the environment.
    secret_file: Path | None = None
    # PEM public keys, "[KID=]FILE" (kid defaults to the file name without extension).
    public_key_file: tuple[str, ...] = ()
    jwks: tuple[str, ...] = ()  # JWKS files or http(s) URLs
    jwks_refresh: float = 300.0  # seconds between fetches of each JWKS URL
    jwks_cooldown: float = 10.0  # least seconds between fetches caused by unknown kids
    heartbeat: float = 15.0  # seconds between server pings; a peer has heartbeat/2 to pong
    hello_timeout: float = 10.0  # seconds to send hello after the upgrade
    max_frame_bytes: int = 1 << 20  # a larger incoming frame closes with 1009
    max_event_bytes: int = 256 << 10  # encoded event data larger than this: too_large
    max_event_depth: int = 32  # event data or presence state nested deeper: invalid
    max_presence_bytes: int = 4096  # one presence state (JSON) larger than this: too_large
    max_presence_total_bytes: int = 65536  # a connection's presence states, all sessions
    max_sessions_per_connection: int = 100
    publish_rate: float = 1000.0  # sustained publishes per second per connection
    publish_burst: int = 2000  # token-bucket depth for the publish rate
    # Per subject (the token's sub), across WebSocket, HTTP and SSE; 0 turns a limit off.
    subject_publish_rate: float = 5000.0  # publishes per second, all connections together
    subject_publish_burst: int = 10000
    subject_presence_rate: float = 50.0  # presence.set per second
    subject_presence_burst: int = 200
    subject_attach_rate: float = 500.0  # attaches (and SSE/AG-UI opens) per second
    subject_attach_burst: int = 5000
    subject_connections: int = 1000  # open WebSocket connections at once
    subject_streams: int = 100  # open SSE and AG-UI streams at once
    max_inflight_publishes: int = 1000  # per connection; reading pauses beyond this
    outbound_buffer_bytes: int = 1 << 20  # per connection; beyond it live → catch-up from store
    catchup_page: int = 500  # events per store read while catching up
    snapshot_events: int = 200  # events in an attached{resumed:false} snapshot
    presence_ttl: float = 60.0  # seconds a presence entry lives without refresh
    store_unhealthy_after: float = 5.0  # seconds of failing commits before /healthz says 503
    trim_interval: float = 60.0  # seconds between retention passes
    lease_seconds: float = 10.0  # a run's lease period; a dead node's runs move after ~2 of them
    tail_check_interval: float = 2.0  # lossy live channels (Redis): heal a lost last event
    max_errors_in_row: int = 100  # request errors in a row before closing the connection
    compression: bool = True  # offer permessage-deflate
    # What serves /v1/ws for clients that do not take permessage-deflate: "picows" (C framing,
    # behind the port's front, tether/server/front.py) or "aiohttp" (every socket on aiohttp).
    ws_engine: str = "picows"
    # Worker processes serving the port (`tether serve --workers N`); 0 = one per core.
    workers: int = 0
    reuse_port: bool = False  # bind with SO_REUSEPORT: set in each worker of --workers
    # permessage-deflate as tether runs it (tether/server/deflate.py): the server's LZ77
    # window (2**bits bytes) and zlib memory level set its per-connection cost; frames under
    # the threshold (bytes) go out uncompressed.
    compression_window_bits: int = 10
    compression_mem_level: int = 1
    compression_threshold: int = 64
    # New WebSockets admitted per second per process (0: no limit); beyond it a socket is
    # closed with 4003 try_again_later and a retry_after (tether/server/admission.py).
    max_connect_rate: float = 0.0
    max_connect_burst: int = 0  # bucket depth; 0: one second of the rate
    node_id: str = field(default_factory=lambda: os.environ.get("TETHER_NODE", ""))
    retention: Retention = field(default_factory=Retention)
    log_level: str = "info"
    # Requests without a token get these grants, "PATTERN=CAPS" each (Durable Streams routes
    # only); refused at startup unless bound to loopback or anonymous_public is set.
    anonymous: tuple[str, ...] = ()
    anonymous_public: bool = False

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        """Settings from ``TETHER_*`` environment variables, then ``overrides`` (not None)."""
        config = cls()
        env = os.environ
        for f in fields(cls):
            value = env.get(f"TETHER_{f.name.upper()}")
            if value is None or f.name in ("retention", "secret_file", "public_key_file",
                                           "jwks", "user_secret", "anonymous"):
                continue
            current = getattr(config, f.name)
            if isinstance(current, bool):
                setattr(config, f.name, value.lower() in ("1", "true", "yes", "on"))
            elif isinstance(current, int):
                setattr(config, f.name, _number(int, f"TETHER_{f.name.upper()}", value))
            elif isinstance(current, float):
                setattr(config, f.name, _number(float, f"TETHER_{f.name.upper()}", value))
            elif isinstance(current, Path):
                setattr(config, f.name, Path(value))
            else:
                setattr(config, f.name, value)
        config.retention = Retention(
            max_events=_number(int, "TETHER_RETENTION_EVENTS", env.get(
                "TETHER_RETENTION_EVENTS", str(config.retention.max_events))),
            max_age=_number(float, "TETHER_RETENTION_AGE", env.get(
                "TETHER_RETENTION_AGE", str(config.retention.max_age))),
            idempotency_window=_number(float, "TETHER_IDEMPOTENCY_WINDOW", env.get(
                "TETHER_IDEMPOTENCY_WINDOW", str(config.retention.idempotency_window))),
        )
        store = env.get("TETHER_STORE")
        if store:
            config.store_url = store
        if "TETHER_DATA" in env:
            config.data_dir = Path(env["TETHER_DATA"])
        if env.get("TETHER_SECRET_FILE"):
            config.secret_file = Path(env["TETHER_SECRET_FILE"])
        config.public_key_file = split_list(env.get("TETHER_PUBLIC_KEY_FILE", ""))
        config.jwks = split_list(env.get("TETHER_JWKS", ""))
        # Rules hold commas ('*=subscribe,publish'): several are separated by ';'.
        config.anonymous = tuple(r.strip() for r in env.get("TETHER_ANONYMOUS", "").split(";")
                                 if r.strip())
        if config.ws_engine not in ("picows", "aiohttp") and overrides.get("ws_engine") is None:
            raise ValueError(f"TETHER_WS_ENGINE={config.ws_engine!r}: picows or aiohttp")
        # A flag beats the environment: --secret-file hides TETHER_SECRET, and the reverse.
        if overrides.get("secret_file") is not None and overrides.get("secret") is None:
            config.secret = None
        if overrides.get("secret") is not None and overrides.get("secret_file") is None:
            config.secret_file = None
        for name, override in overrides.items():
            if override is not None:
                setattr(config, name, override)
        return config

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite://{self.data_dir}"

    def check_anonymous(self) -> None:
        """Refuse anonymous access on a non-loopback address unless ``anonymous_public``."""
        from tether.server.auth import parse_anonymous

        for rule in self.anonymous:
            parse_anonymous(rule)
        if self.anonymous and not self.anonymous_public and not is_loopback(self.host):
            raise ValueError(f"--anonymous on {self.host}, which is not a loopback address: "
                             "anyone who reaches it could read and write; add "
                             "--anonymous-public to allow that")

    @property
    def shared_store(self) -> bool:
        """Whether several nodes may share the store (Redis): they must share keys too."""
        return self.resolved_store_url().startswith(
            ("redis:", "rediss:", "unix:", "redis+cluster:", "rediss+cluster:"))


def _number(kind: type[_N], name: str, value: str) -> _N:
    """``value`` as ``kind``; a ValueError that names the variable otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated environment value as a tuple."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def node_id(data_dir: Path) -> str:
    """This node's id, kept in the data folder so a restarted node reclaims its own runs."""
    path = data_dir / "node"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    node = "node-" + secrets.token_hex(4)
    with contextlib.suppress(OSError):
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(node + "\n")
    return node
