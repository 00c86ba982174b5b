"""Tokens: JWTs naming a subject, the sessions it may touch and what it may do there.

Claims: ``sub`` (subject), ``sessions`` (exact ids or ``fnmatch`` globs such as ``demo-*``),
``caps`` (a subset of :data:`CAPABILITIES`), ``exp`` (expiry, seconds since the epoch).

Keys (see ``docs/protocol.md``, "Tokens"): HS256 secrets, optionally several selected by the
token header's ``kid``; public keys (RS256, ES256, EdDSA, …) from PEM files, JWKS files and
JWKS URLs, always selected by ``kid``. Each key pins its one algorithm: the token's ``alg``
never chooses how a signature is checked, so an HS256 token "signed" with a public key's bytes
is refused, and ``none`` is never accepted. A token without ``kid`` is checked against the
default secret only (the one that signs).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from tether.protocol.codes import CloseCode, ErrorCode, RequestError, TetherError

if TYPE_CHECKING:
    from tether.server.config import ServerConfig

log = logging.getLogger("tether.auth")

CAPABILITIES = ("subscribe", "publish", "presence", "approve", "admin")
INTERNAL_PREFIX = "tether."  # sessions the server keeps for itself (the run index): admin only
ALGORITHM = "HS256"  # the one algorithm of secrets (and of the tokens tether mints)
SECRET_FILE = "secret"
# Public-key algorithms a key may be pinned to; HS* only ever comes from secrets.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})
KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_KEYED_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._:-]{0,127})=([^=].*)")
MAX_KID = 128
JWKS_TIMEOUT = 5.0  # seconds for one JWKS fetch
JWKS_MAX_BYTES = 1 << 20


class AuthError(TetherError):
    """A token was refused; ``close_code`` tells a WebSocket client whether a retry can help.

    Over HTTP it is a 401 ``unauthorized``.
    """

    code = ErrorCode.UNAUTHORIZED

    def __init__(self, close_code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code


class KeyConfigError(ValueError):
    """A key setting cannot be used (unreadable file, bad PEM or JWKS, duplicate ``kid``)."""


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
        # "*" (every session) is the common pattern: no fnmatch for it. One token shared by
        # many connections fills the memo past its bound, so this runs again and again.
        return any(
            pattern == session or pattern == "*" or fnmatch.fnmatchcase(session, pattern)
            for pattern in self.sessions
        )


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key, pinned to one algorithm."""

    kid: str | None
    algorithm: str
    key: Any  # str for HS256; a ``cryptography`` public key otherwise
    source: str  # where it came from, for logs and errors


def issue_token(secret: str, sub: str, sessions: list[str], caps: list[str],
                ttl: float | None = 3600.0, kid: str | None = None) -> str:
    """An HS256 token; ``kid`` goes into the header when the server holds several secrets."""
    unknown = set(caps) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities: {', '.join(sorted(unknown))}")
    claims: dict[str, object] = {"sub": sub, "sessions": sessions, "caps": caps,
                                 "iat": int(time.time())}
    if ttl is not None:
        # Rounded up: a token lives at least ``ttl`` seconds (truncated, a one-second token
        # issued late in a second would expire within milliseconds).
        claims["exp"] = math.ceil(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=ALGORITHM,
                      headers={"kid": kid} if kid else None)


def _decode(key: Key, token: str) -> Grant:
    try:
        claims = jwt.decode(token, key.key, algorithms=[key.algorithm],
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


def verify_token(secret: str, token: str | None) -> Grant:
    """Check ``token`` against one HS256 secret (its ``kid``, if any, is not looked at)."""
    if not token:
        raise AuthError(CloseCode.UNAUTHORIZED, "no token")
    return _decode(Key(None, ALGORITHM, secret, "secret"), token)


# --- key material ----------------------------------------------------------------------------


def parse_secrets(text: str, source: str = "secret file") -> list[tuple[str | None, str]]:
    """The secrets in a secret file: ``[(kid, secret), …]`` in file order.

    The content is a JSON object ``{"kid": "secret", …}``; or lines ``kid=secret`` (blank lines
    and ``#`` comments ignored); or, when it is neither, one secret (kid ``None``).
    """
    stripped = text.strip()
    if not stripped:
        raise KeyConfigError(f"{source} is empty")
    if stripped.startswith("{"):
        try:
            data = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            raise KeyConfigError(f"{source}: bad JSON: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise KeyConfigError(f"{source}: expected a JSON object {{kid: secret}}")
        pairs: list[tuple[str | None, str]] = []
        for kid, secret in data.items():
            if not KID.fullmatch(kid) or not isinstance(secret, str) or not secret.strip():
                raise KeyConfigError(f"{source}: entry {kid!r} needs a kid of letters, digits "
                                     "and . _ : - and a non-empty string secret")
            pairs.append((kid, secret.strip()))
        return pairs
    lines = [line.strip() for line in stripped.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    matches = [_KEYED_LINE.fullmatch(line) for line in lines]
    if lines and all(matches):
        keyed = [(m.group(1), m.group(2).strip()) for m in matches if m is not None]
        kids = [kid for kid, _ in keyed]
        if len(set(kids)) != len(kids):
            raise KeyConfigError(f"{source}: a kid appears twice")
        return list(keyed)
    if len(lines) == 1:
        return [(None, lines[0])]
    raise KeyConfigError(f"{source}: expected one secret, lines kid=secret, or a JSON object")


def _algorithm_for(public: Any, source: str) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if public.curve.name not in curves:
            raise KeyConfigError(f"{source}: unsupported curve {public.curve.name}")
        return curves[public.curve.name]
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    raise KeyConfigError(f"{source}: not an RSA, EC or Ed25519/Ed448 public key")


def _fits(algorithm: str, public: Any) -> bool:
    """Whether ``algorithm`` is the family of ``public`` (JWKS entries may name their alg)."""
    if algorithm.startswith(("RS", "PS")):
        return isinstance(public, rsa.RSAPublicKey)
    if algorithm.startswith("ES"):
        return (isinstance(public, ec.EllipticCurvePublicKey)
                and _algorithm_for(public, "") == algorithm)
    return algorithm == "EdDSA" and isinstance(
        public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def split_spec(spec: str) -> tuple[str, str]:
    """``KID=FILE`` → (kid, file); ``FILE`` → (the file's name without extension, file)."""
    kid, sep, path = spec.partition("=")
    if sep and KID.fullmatch(kid) and not Path(spec).exists():
        return kid, path
    return Path(spec).stem, spec


def load_public_key(spec: str) -> Key:
    """A public key from a PEM file (key or certificate): ``[KID=]FILE``."""
    kid, path = split_spec(spec)
    source = f"public key {path}"
    if not KID.fullmatch(kid):
        raise KeyConfigError(f"{source}: give it a kid: KID={path}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"{source}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise KeyConfigError(f"{source} holds a private key; give the server the public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyConfigError(f"{source}: not a PEM public key ({exc})") from None
    return Key(kid, _algorithm_for(public, source), public, source)


def parse_jwks(data: Any, source: str) -> dict[str, Key]:
    """The usable signature keys of a JWKS document, by kid.

    Skipped, with a warning: entries without ``kid``, ``use`` other than ``sig``, symmetric
    (``oct``) keys (secrets belong in the secret file), algorithms outside
    :data:`ASYMMETRIC_ALGORITHMS`, and an ``alg`` that does not fit the key type.
    """
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeyConfigError(f"{source}: not a JWKS (expected {{\"keys\": [...]}})")
    keys: dict[str, Key] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
            log.warning("%s: skipping a key without a usable kid", source)
            continue
        if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            log.warning("%s: skipping key %r (not a public signature key)", source, kid)
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("%s: skipping key %r: %s", source, kid, exc)
            continue
        public: Any = jwk.key
        if hasattr(public, "private_bytes"):  # a private JWK: keep only its public half
            log.warning("%s: key %r includes private material; publish only public keys",
                        source, kid)
            public = public.public_key()
        algorithm = jwk.algorithm_name
        if algorithm not in ASYMMETRIC_ALGORITHMS or not _fits(algorithm, public):
            log.warning("%s: skipping key %r: algorithm %s", source, kid, algorithm)
            continue
        if kid in keys:
            log.warning("%s: kid %r appears twice; keeping the first", source, kid)
            continue
        keys[kid] = Key(kid, algorithm, public, source)
    return keys


def load_jwks_file(path: str) -> dict[str, Key]:
    source = f"JWKS {path}"
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise KeyConfigError(f"{source}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise KeyConfigError(f"{source}: bad JSON: {exc}") from None
    return parse_jwks(data, source)


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


class JwksUrl:
    """The keys published at a JWKS URL, kept in memory for :meth:`Authenticator.verify`.

    Fetched (asynchronously, with a timeout) at start, every ``refresh`` seconds, and soon
    after a token names a kid this set lacks — at most once per ``cooldown`` seconds, however
    many forged kids arrive. A failed fetch keeps the previous keys.
    """

    def __init__(self, url: str, refresh: float = 300.0, cooldown: float = 10.0,
                 timeout: float = JWKS_TIMEOUT,
                 on_change: Callable[[set[str]], None] | None = None) -> None:
        self.url = url
        self.refresh_interval = refresh
        self.cooldown = cooldown
        self.timeout = timeout
        self.keys: dict[str, Key] = {}
        self.fetches = 0  # attempts, for tests and logs
        self._on_change = on_change
        self._last_fetch = float("-inf")
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def fetch(self) -> bool:
        """Fetch once; replace the keys if the document is usable. Whether it was."""
        self._last_fetch = time.monotonic()
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout,
                                         follow_redirects=True) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            if len(response.content) > JWKS_MAX_BYTES:
                raise KeyConfigError("document too large")
            keys = parse_jwks(orjson.loads(response.content), f"JWKS {self.url}")
        except (httpx.HTTPError, orjson.JSONDecodeError, KeyConfigError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.url, exc or type(exc).__name__)
            return False
        except Exception:  # the refresh loop must outlive any one bad answer
            log.exception("JWKS fetch from %s failed", self.url)
            return False
        removed = set(self.keys) - set(keys)
        if set(keys) != set(self.keys):
            log.info("JWKS %s: kids %s", self.url, ", ".join(sorted(keys)) or "(none)")
        self.keys = keys
        if removed and self._on_change is not None:
            self._on_change(removed)
        return True

    def start(self) -> None:
        """Run the refresh loop on the running event loop (idempotent)."""
        if self.running:
            return
        self._kick = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"jwks {self.url}")

    def request_refresh(self) -> None:
        """A token named an unknown kid: fetch soon (rate-limited). Never blocks."""
        if not self.running:
            try:
                self.start()
            except RuntimeError:  # no running loop: nothing can fetch from here
                return
        assert self._kick is not None
        self._kick.set()

    async def _run(self) -> None:
        assert self._kick is not None
        while True:
            wait = self._last_fetch + self.refresh_interval - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)
            self._kick.clear()
            # Woken by an unknown kid: wait out the cooldown (a periodic fetch is not delayed).
            pause = (self._last_fetch + min(self.cooldown, self.refresh_interval)
                     - time.monotonic())
            if pause > 0:
                await asyncio.sleep(pause)
                self._kick.clear()  # kicks during the cooldown are served by this fetch
            await self.fetch()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- the verifier ----------------------------------------------------------------------------


class Authenticator:
    """Verifies tokens for every transport, remembering verified ones.

    Reconnect storms re-send the same few tokens; a verified token is kept (bounded) until it
    expires, so a storm costs one signature check per token, not per connection.

    ``secret`` signs the tokens tether mints (:meth:`issue`, the ``tether token`` command, the
    dev login) and verifies tokens without ``kid``; ``signing_kid`` is put in minted tokens
    when there are several secrets. ``keys`` are selected by a token's ``kid``: the secrets of a
    secret file, PEM public keys, JWKS files. ``jwks_urls`` add keys fetched over HTTP; their
    fetching runs between :meth:`start` and :meth:`close` (started lazily otherwise).
    :meth:`verify` only reads keys held in memory.
    """

    def __init__(self, secret: str, cache_size: int = 10_000, *,
                 keys: Iterable[Key] = (), signing_kid: str | None = None,
                 jwks_urls: Sequence[str] = (), jwks_refresh: float = 300.0,
                 jwks_cooldown: float = 10.0) -> None:
        self.secret = secret
        self.signing_kid = signing_kid
        self._default = Key(None, ALGORITHM, secret, "the signing secret")
        self.keys: dict[str, Key] = {}
        for key in keys:
            assert key.kid is not None
            if key.kid in self.keys:
                raise KeyConfigError(f"kid {key.kid!r} is given twice "
                                     f"({self.keys[key.kid].source}, {key.source})")
            self.keys[key.kid] = key
        self.jwks = [JwksUrl(url, jwks_refresh, jwks_cooldown, on_change=self._keys_removed)
                     for url in jwks_urls]
        self._cache_size = cache_size
        self._grants: dict[str, Grant] = {}
        self.secret_source = "given"  # where the signing secret came from, for operators

    @classmethod
    def from_config(cls, config: ServerConfig) -> Authenticator:
        """The verifier a server's settings describe (raises :class:`KeyConfigError`).

        Secrets: ``secret_file`` if set, else ``secret`` / ``TETHER_SECRET`` /
        ``DATA/secret`` / ``user_secret`` (created once) as :func:`load_secret` finds it.
        A shared store (Redis) needs a secret every node shares: ``secret_file``, ``secret`` or
        ``TETHER_SECRET``; with public keys only, tether's own tokens (the dev login) are
        signed with a random secret held in memory. Nothing is generated on disk for it.
        """
        if config.secret_file is not None and config.secret:
            raise KeyConfigError("give the secret either inline or as a file, not both")
        if config.jwks_refresh <= 0 or config.jwks_cooldown < 0:
            raise KeyConfigError("the JWKS refresh must be positive, the cooldown not negative")
        # Public keys first: a setting that fails must not leave a generated DATA/secret.
        keys = [load_public_key(spec) for spec in config.public_key_file]
        urls: list[str] = []
        for spec in config.jwks:
            if is_url(spec):
                urls.append(spec)
            else:
                keys += load_jwks_file(spec).values()
        signing_kid: str | None = None
        if config.secret_file is not None:
            pairs = read_secret_file(config.secret_file)
            signing_kid, secret = pairs[0]
            keys += [Key(kid, ALGORITHM, value, f"secret file {config.secret_file}")
                     for kid, value in pairs if kid is not None]
            source = f"secret file {config.secret_file}"
        elif config.shared_store and not (config.secret or os.environ.get("TETHER_SECRET")):
            if not keys and not urls:
                raise KeyConfigError(
                    f"the store {config.resolved_store_url()} is shared by every node, so "
                    "they need the same secret: give it with --secret-file FILE (or "
                    "TETHER_SECRET_FILE), or give public keys (--public-key, --jwks)")
            secret, source = secrets.token_urlsafe(32), "a random secret of this process"
        else:
            secret, source = find_secret(config.secret, config.data_dir,
                                         user_secret=config.user_secret)
        auth = cls(secret, keys=keys, signing_kid=signing_kid, jwks_urls=urls,
                   jwks_refresh=config.jwks_refresh, jwks_cooldown=config.jwks_cooldown)
        auth.secret_source = source
        return auth

    # --- lifecycle (JWKS URLs) ------------------------------------------------------------

    async def start(self) -> None:
        """Fetch every JWKS URL once (a failure is logged, not fatal), then keep them fresh."""
        pending = [source for source in self.jwks if not source.running]
        await asyncio.gather(*(source.fetch() for source in pending))
        for source in pending:
            source.start()

    async def close(self) -> None:
        await asyncio.gather(*(source.close() for source in self.jwks))

    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """For ``aiohttp.web.Application.cleanup_ctx``: :meth:`start`, then :meth:`close`."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # --- tokens ---------------------------------------------------------------------------

    def issue(self, sub: str, sessions: list[str], caps: list[str],
              ttl: float | None = 3600.0) -> str:
        """A token signed with the signing secret (with its kid, if it has one)."""
        return issue_token(self.secret, sub, sessions, caps, ttl, kid=self.signing_kid)

    def key_for(self, token: str) -> Key:
        """The one key that may have signed ``token``, chosen by its ``kid`` alone."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(CloseCode.UNAUTHORIZED, f"invalid token: {exc}") from None
        kid = header.get("kid")
        if kid is None:
            return self._default
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
            raise AuthError(CloseCode.UNAUTHORIZED, "invalid token: bad kid")
        key = self.keys.get(kid)
        if key is not None:
            return key
        for source in self.jwks:
            key = source.keys.get(kid)
            if key is not None:
                return key
        for source in self.jwks:
            source.request_refresh()
        raise AuthError(CloseCode.UNAUTHORIZED, f"invalid token: unknown kid {kid[:64]!r}")

    def verify(self, token: str | None) -> Grant:
        if not token:
            raise AuthError(CloseCode.UNAUTHORIZED, "no token")
        cached = self._grants.get(token)
        if cached is not None and (cached.exp is None or cached.exp > time.time()):
            return cached
        grant = _decode(self.key_for(token), token)
        if len(self._grants) >= self._cache_size:
            self._grants.pop(next(iter(self._grants)))
        self._grants[token] = grant
        return grant

    def _keys_removed(self, kids: set[str]) -> None:
        # A key left its JWKS: tokens it signed must stop working now, not at their expiry.
        self._grants.clear()

    def require(self, token: str | None, session: str, cap: str) -> Grant:
        """The grant of ``token`` if it allows ``cap`` on ``session``; else raise."""
        grant = self.verify(token)
        require(grant, session, cap)
        return grant


ANONYMOUS_SUB = "anonymous"


def parse_anonymous(spec: str) -> tuple[str, frozenset[str]]:
    """One ``--anonymous`` rule, ``PATTERN=CAPS`` (``'*=subscribe,publish'``): the session
    pattern (an id or an ``fnmatch`` glob) and the capabilities requests without a token get
    there. ``admin`` is never granted anonymously."""
    pattern, sep, caps_text = spec.partition("=")
    pattern = pattern.strip()
    caps = frozenset(c.strip() for c in caps_text.split(",") if c.strip())
    if not sep or not pattern or not caps:
        raise ValueError(f"--anonymous {spec!r}: expected PATTERN=CAPS, e.g. '*=subscribe'")
    unknown = caps - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"--anonymous {spec!r}: unknown capabilities {sorted(unknown)}")
    if "admin" in caps:
        raise ValueError(f"--anonymous {spec!r}: admin cannot be granted anonymously")
    return pattern, caps


def anonymous_grant(rules: Sequence[str], session: str) -> Grant | None:
    """The grant of a request without a token on ``session``: the first rule whose pattern
    matches, else None (the request then needs a token)."""
    for rule in rules:
        pattern, caps = parse_anonymous(rule)
        if pattern == session or fnmatch.fnmatchcase(session, pattern):
            return Grant(ANONYMOUS_SUB, (pattern,), caps, None)
    return None


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


def read_secret_file(path: Path | str) -> list[tuple[str | None, str]]:
    """The secrets of a secret file (see :func:`parse_secrets`); warns if others can read it."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyConfigError(f"secret file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        log.warning("secret file %s is readable by other users (chmod 600 it)", path)
    return parse_secrets(text, f"secret file {path}")


def user_secret_path() -> Path:
    """The per-user secret: ``$XDG_CONFIG_HOME/tether/secret`` (``~/.config/tether/secret``).

    ``tether serve`` keeps the secret it generates there (when the data folder has none), and
    ``tether token`` / ``tail`` / ``publish`` read it, so they agree whatever the directory
    each was started in.
    """
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "tether" / SECRET_FILE


class NoSecretError(KeyConfigError):
    """No secret was given or found, and the caller may not create one."""


def signing_secret(explicit: str | None, secret_file: Path | str | None, data_dir: Path, *,
                   user_secret: Path | None = None, create: bool = True
                   ) -> tuple[str, str | None]:
    """(secret, kid) that mints tokens: the first of ``secret_file``, else :func:`load_secret`."""
    if secret_file is not None and explicit:
        raise KeyConfigError("give the secret either inline or as a file, not both")
    if secret_file is not None:
        kid, secret = read_secret_file(secret_file)[0]
        return secret, kid
    return load_secret(explicit, data_dir, user_secret=user_secret, create=create), None


def load_secret(explicit: str | None, data_dir: Path, *, user_secret: Path | None = None,
                create: bool = True) -> str:
    """The signing secret: ``explicit``, else ``TETHER_SECRET``, else ``DATA/secret``, else
    ``user_secret`` (when given); see :func:`find_secret`."""
    return find_secret(explicit, data_dir, user_secret=user_secret, create=create)[0]


def find_secret(explicit: str | None, data_dir: Path, *, user_secret: Path | None = None,
                create: bool = True) -> tuple[str, str]:
    """(secret, where it came from): ``explicit``, else ``TETHER_SECRET``, else an existing
    ``DATA/secret``, else an existing ``user_secret`` (when given).

    With none of them and ``create``: a new secret is written (mode 0600) to ``user_secret``
    when given, else to ``DATA/secret``. Without ``create``: :class:`NoSecretError`.
    """
    if explicit:
        return explicit, "given"
    env = os.environ.get("TETHER_SECRET")
    if env:
        return env, "TETHER_SECRET"
    in_data = data_dir / SECRET_FILE
    candidates = [in_data] if user_secret is None else [in_data, user_secret]
    for path in candidates:
        if path.exists():
            return _read_plain_secret(path), str(path)
    if not create:
        raise NoSecretError(
            "no secret to sign tokens with: none given and none in "
            f"{' or '.join(str(p) for p in candidates)}; start the server first "
            "(`tether serve` creates one) or pass --secret-file FILE (the server's secret)")
    if user_secret is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return _create_secret(in_data), str(in_data)
    user_secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _create_secret(user_secret), str(user_secret)


def _read_plain_secret(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise KeyConfigError(f"secret {path}: {exc.strerror or exc}") from None
    if not secret:
        raise KeyConfigError(f"secret {path} is empty")
    return secret


def _create_secret(path: Path) -> str:
    """A new secret in ``path`` (mode 0600); if another process created it first, theirs.
    The file appears complete or not at all (written aside, then linked into place)."""
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    # Created with 0600 before writing so the secret is never readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        try:
            os.link(tmp, path)  # fails if it exists: never replaces a secret
        except FileExistsError:
            return _read_plain_secret(path)
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return _read_plain_secret(path)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return secret
