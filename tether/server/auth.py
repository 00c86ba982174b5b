"""Tokens: HS256 JWTs naming a subject, the sessions it may touch and what it may do there.

Claims: ``sub`` (subject), ``sessions`` (exact ids or ``fnmatch`` globs such as ``demo-*``),
``caps`` (a subset of :data:`CAPABILITIES`), ``exp`` (expiry, seconds since the epoch).
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from tether.protocol.codes import CloseCode, ErrorCode, RequestError, TetherError

CAPABILITIES = ("subscribe", "publish", "presence", "approve", "admin")
INTERNAL_PREFIX = "tether."  # sessions the server keeps for itself (the run index): admin only
ALGORITHM = "HS256"
SECRET_FILE = "secret"


class AuthError(TetherError):
    """A token was refused; ``close_code`` tells a WebSocket client whether a retry can help.

    Over HTTP it is a 401 ``unauthorized``.
    """

    code = ErrorCode.UNAUTHORIZED

    def __init__(self, close_code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    sub: str
    sessions: tuple[str, ...]
    caps: frozenset[str]
    exp: float | None
    _allowed: dict[tuple[str, str], bool] = field(default_factory=dict, compare=False,
                                                  repr=False)

    def allows(self, session: str, cap: str) -> bool:
        """Whether the token grants ``cap`` on ``session`` (memoised: checked per frame)."""
        key = (session, cap)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = self._allows(session, cap)
            if len(self._allowed) > 1024:  # a token can name unboundedly many sessions
                self._allowed.clear()
        return allowed

    def _allows(self, session: str, cap: str) -> bool:
        if "admin" not in self.caps and (cap not in self.caps
                                         or session.startswith(INTERNAL_PREFIX)):
            return False
        return any(
            pattern == session or fnmatch.fnmatchcase(session, pattern)
            for pattern in self.sessions
        )


def issue_token(secret: str, sub: str, sessions: list[str], caps: list[str],
                ttl: float | None = 3600.0) -> str:
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities: {', '.join(sorted(unknown))}")
    claims: dict[str, object] = {"sub": sub, "sessions": sessions, "caps": caps,
                                 "iat": int(time.time())}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str | None) -> Grant:
    if not token:
        raise AuthError(CloseCode.UNAUTHORIZED, "no token")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError(CloseCode.TOKEN_EXPIRED, "token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(CloseCode.UNAUTHORIZED, f"invalid token: {exc}") from None
    sessions = claims.get("sessions", [])
    caps = claims.get("caps", [])
    if (not isinstance(claims["sub"], str) or not isinstance(sessions, list)
            or not isinstance(caps, list)
            or not all(isinstance(s, str) for s in sessions + caps)):
        raise AuthError(CloseCode.UNAUTHORIZED, "invalid token: malformed claims")
    exp = claims.get("exp")
    return Grant(claims["sub"], tuple(sessions), frozenset(caps),
                 float(exp) if isinstance(exp, int | float) else None)


class Authenticator:
    """Verifies tokens for every transport, remembering verified ones.

    Reconnect storms re-send the same few tokens; a verified token is kept (bounded) until it
    expires, so a storm costs one signature check per token, not per connection.
    """

    def __init__(self, secret: str, cache_size: int = 10_000) -> None:
        self.secret = secret
        self._cache_size = cache_size
        self._grants: dict[str, Grant] = {}

    def verify(self, token: str | None) -> Grant:
        if token:
            cached = self._grants.get(token)
            if cached is not None and (cached.exp is None or cached.exp > time.time()):
                return cached
        grant = verify_token(self.secret, token)
        assert token is not None
        if len(self._grants) >= self._cache_size:
            self._grants.pop(next(iter(self._grants)))
        self._grants[token] = grant
        return grant

    def require(self, token: str | None, session: str, cap: str) -> Grant:
        """The grant of ``token`` if it allows ``cap`` on ``session``; else raise."""
        grant = self.verify(token)
        require(grant, session, cap)
        return grant


def require(grant: Grant, session: str, cap: str) -> None:
    """Raise ``forbidden`` unless ``grant`` allows ``cap`` on ``session``."""
    if not grant.allows(session, cap):
        raise RequestError(ErrorCode.FORBIDDEN,
                           f"token does not allow {cap!r} on session {session!r}")


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def load_secret(explicit: str | None, data_dir: Path) -> str:
    """The signing secret: ``explicit``, else ``TETHER_SECRET``, else ``DATA/secret`` (created)."""
    if explicit:
        return explicit
    env = os.environ.get("TETHER_SECRET")
    if env:
        return env
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    # Create with 0600 before writing so the secret is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret
