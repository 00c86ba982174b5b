"""Key management: several HS256 secrets by kid, public keys (PEM, JWKS file, JWKS URL).

Every acceptance and refusal is checked against a running server: a WebSocket ``hello``
(refused with close 4500) and an HTTP read (refused with 401).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.conftest import free_port, wait_for_port
from tests.helpers import Peer
from tether.cli import main as cli_main
from tether.protocol.codes import CloseCode
from tether.server import Server, ServerConfig
from tether.server.auth import Authenticator, AuthError, KeyConfigError, parse_secrets
from tether.store import MemoryStore

ROOT = Path(__file__).resolve().parents[2]
OLD = "old-secret-" + "o" * 40
NEW = "new-secret-" + "n" * 40
CLAIMS = {"sub": "alice", "sessions": ["*"], "caps": ["subscribe", "publish"]}


def claims(ttl: float = 600) -> dict[str, Any]:
    return {**CLAIMS, "exp": int(time.time() + ttl)}


def sign(key: Any, algorithm: str, kid: str | None) -> str:
    return jwt.encode(claims(), key, algorithm=algorithm,
                      headers={"kid": kid} if kid is not None else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand: PyJWT refuses to make the dangerous ones."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims()))}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(),
                                                 hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def pem(private: Any) -> bytes:
    return bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig", **extra}


@pytest.fixture(scope="module")
def keypairs() -> dict[str, tuple[Any, str]]:
    """Private keys by algorithm, with the algorithm PyJWT signs with."""
    return {
        "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "ES256": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "EdDSA": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    }


@contextlib.asynccontextmanager
async def running(data: Path, **settings: Any) -> AsyncIterator[Server]:
    server = Server(ServerConfig(port=0, data_dir=data, **settings), store=MemoryStore())
    await server.auth.start()  # idempotent: also the application's lifespan once wired
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await server.auth.close()


async def ws_refusal(server: Server, tok: str) -> int | None:
    """None if ``hello`` is welcomed, else the close code."""
    peer = await Peer.connect(server.port)
    try:
        await peer.send({"op": "hello", "id": 1, "token": tok})
        while True:
            frame = await peer.recv()
            if frame.get("op") == "welcome":
                return None
    except ConnectionError:
        return peer.close_code
    finally:
        await peer.close()


async def http_status(server: Server, tok: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{server.port}/v1/sessions/s/events?limit=1",
            headers={"Authorization": f"Bearer {tok}"}) as resp:
        return resp.status


async def accepted(server: Server, tok: str) -> bool:
    refusal, status = await ws_refusal(server, tok), await http_status(server, tok)
    assert (refusal is None) == (status == 200), (refusal, status)
    if refusal is not None:
        assert refusal == CloseCode.UNAUTHORIZED and status == 401, (refusal, status)
    return refusal is None


def write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# --- secrets by kid --------------------------------------------------------------------------


async def test_rotation_accepts_both_kids_then_refuses_the_removed_one(tmp_path: Path) -> None:
    secret_file = write_secret(tmp_path / "secrets", f"# newest first: it signs\n"
                                                     f"k2={NEW}\nk1={OLD}\n")
    async with running(tmp_path / "data", secret_file=secret_file) as server:
        assert server.secret == NEW and server.auth.signing_kid == "k2"
        minted = server.auth.issue("alice", ["*"], ["subscribe"])
        assert jwt.get_unverified_header(minted)["kid"] == "k2"
        assert await accepted(server, minted)
        assert await accepted(server, sign(NEW, "HS256", "k2"))
        assert await accepted(server, sign(OLD, "HS256", "k1"))
        # Without kid: the default (signing) secret only.
        assert await accepted(server, sign(NEW, "HS256", None))
        assert not await accepted(server, sign(OLD, "HS256", None))
        # A kid names one secret: the other's signature does not pass under it.
        assert not await accepted(server, sign(OLD, "HS256", "k2"))
        assert not await accepted(server, sign(NEW, "HS256", "k3"))
        assert not (tmp_path / "data" / "secret").exists()  # the file replaces DATA/secret

    write_secret(secret_file, orjson.dumps({"k2": NEW}).decode())  # k1 retired (JSON form)
    async with running(tmp_path / "data", secret_file=secret_file) as server:
        assert await accepted(server, sign(NEW, "HS256", "k2"))
        assert not await accepted(server, sign(OLD, "HS256", "k1"))


async def test_inline_and_data_folder_secrets_work_as_before(tmp_path: Path) -> None:
    async with running(tmp_path / "a", secret=NEW) as server:
        assert server.auth.signing_kid is None
        assert await accepted(server, sign(NEW, "HS256", None))
        assert await accepted(server, server.auth.issue("alice", ["*"], ["subscribe"]))
        assert not await accepted(server, sign(NEW, "HS256", "k1"))  # no secret has a kid
    async with running(tmp_path / "b") as server:  # generated once into DATA/secret
        stored = (tmp_path / "b" / "secret").read_text().strip()
        assert server.secret == stored
        assert await accepted(server, sign(stored, "HS256", None))


def test_secret_file_forms() -> None:
    assert parse_secrets(f"{NEW}\n") == [(None, NEW)]
    assert parse_secrets("a==\n") == [(None, "a==")]  # base64 padding is not kid=secret
    assert parse_secrets(f"\n# c\nb={NEW}\na={OLD}\n") == [("b", NEW), ("a", OLD)]
    assert parse_secrets(f'{{"b": "{NEW}", "a": "{OLD}"}}') == [("b", NEW), ("a", OLD)]
    for bad in ("", "one\ntwo\n", "{}", '{"a": 1}', f"a={NEW}\na={OLD}"):
        with pytest.raises(KeyConfigError):
            parse_secrets(bad)


def test_settings_that_cannot_work_are_refused(tmp_path: Path,
                                               keypairs: dict[str, tuple[Any, str]]) -> None:
    secret_file = write_secret(tmp_path / "s", NEW)
    with pytest.raises(KeyConfigError, match="not both"):
        Authenticator.from_config(ServerConfig(data_dir=tmp_path, secret=NEW,
                                               secret_file=secret_file))
    private = keypairs["RS256"][0]
    (tmp_path / "private.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(KeyConfigError, match="private key"):
        Authenticator.from_config(ServerConfig(data_dir=tmp_path, secret=NEW,
                                               public_key_file=(str(tmp_path / "private.pem"),)))
    (tmp_path / "rsa.pem").write_bytes(pem(private))
    with pytest.raises(KeyConfigError, match="twice"):
        Authenticator.from_config(ServerConfig(data_dir=tmp_path, secret_file=write_secret(
            tmp_path / "s2", f"rsa={NEW}\n"), public_key_file=(str(tmp_path / "rsa.pem"),)))
    with pytest.raises(KeyConfigError):
        Authenticator.from_config(ServerConfig(data_dir=tmp_path, secret=NEW,
                                               jwks=(str(tmp_path / "missing.json"),)))


def test_a_flag_beats_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_SECRET", OLD)
    monkeypatch.setenv("TETHER_PUBLIC_KEY_FILE", "a=/x/a.pem, /x/b.pem")
    monkeypatch.setenv("TETHER_JWKS", "https://example.test/jwks.json")
    config = ServerConfig.from_env(secret_file=tmp_path / "s")
    assert config.secret is None and config.secret_file == tmp_path / "s"
    assert config.public_key_file == ("a=/x/a.pem", "/x/b.pem")
    assert config.jwks == ("https://example.test/jwks.json",)
    monkeypatch.setenv("TETHER_SECRET_FILE", str(tmp_path / "s"))
    config = ServerConfig.from_env(secret=NEW)
    assert config.secret == NEW and config.secret_file is None


# --- public keys -----------------------------------------------------------------------------


async def test_public_keys_from_pem_files(tmp_path: Path,
                                          keypairs: dict[str, tuple[Any, str]]) -> None:
    specs = []
    for name, (private, _) in keypairs.items():
        (tmp_path / f"{name.lower()}.pem").write_bytes(pem(private))
        specs.append(f"{name.lower()}.pem")
    # KID=FILE names the kid; a bare FILE's kid is its name without extension.
    specs = [f"backend-rsa={tmp_path / specs[0]}", *(str(tmp_path / s) for s in specs[1:])]
    kids = {"RS256": "backend-rsa", "ES256": "es256", "EdDSA": "eddsa"}
    async with running(tmp_path / "data", secret=NEW, public_key_file=tuple(specs)) as server:
        for name, (private, algorithm) in keypairs.items():
            assert await accepted(server, sign(private, algorithm, kids[name])), name
            assert not await accepted(server, sign(private, algorithm, None)), name
        # A key's kid with another key's signature.
        assert not await accepted(server, sign(keypairs["ES256"][0], "ES256", "backend-rsa"))
        assert await accepted(server, sign(NEW, "HS256", None))  # the secret still works


async def test_public_keys_from_a_jwks_file(tmp_path: Path,
                                            keypairs: dict[str, tuple[Any, str]]) -> None:
    document = {"keys": [jwk(private, f"k-{name}") for name, (private, _) in keypairs.items()]
                + [{"kty": "oct", "kid": "sym", "k": b64(NEW.encode())}]}  # ignored: a secret
    (tmp_path / "jwks.json").write_bytes(orjson.dumps(document))
    async with running(tmp_path / "data", secret=NEW,
                       jwks=(str(tmp_path / "jwks.json"),)) as server:
        for name, (private, algorithm) in keypairs.items():
            assert await accepted(server, sign(private, algorithm, f"k-{name}")), name
        assert not await accepted(server, sign(NEW, "HS256", "sym"))
        assert not await accepted(server, sign(keypairs["RS256"][0], "RS256", "unknown"))


async def test_alg_confusion_and_none_are_refused(tmp_path: Path,
                                                  keypairs: dict[str, tuple[Any, str]]) -> None:
    private = keypairs["RS256"][0]
    (tmp_path / "rsa.pem").write_bytes(pem(private))
    async with running(tmp_path / "data", secret=NEW,
                       public_key_file=(f"rsa={tmp_path / 'rsa.pem'}",)) as server:
        assert await accepted(server, sign(private, "RS256", "rsa"))
        public_pem = pem(private)
        for variant in (public_pem, public_pem.strip(), public_pem.decode().strip().encode()):
            # HS256 "signed" with the public key's bytes: under its kid, and without one.
            assert not await accepted(server, hand_made({"alg": "HS256", "kid": "rsa"},
                                                        variant))
            assert not await accepted(server, hand_made({"alg": "HS256"}, variant))
        # The same key under a different RSA algorithm than it is pinned to.
        assert not await accepted(server, sign(private, "RS512", "rsa"))
        assert not await accepted(server, sign(private, "PS256", "rsa"))
        for header in ({"alg": "none"}, {"alg": "none", "kid": "rsa"}, {"alg": "None"},
                       {"alg": "none", "typ": "JWT"}):
            assert not await accepted(server, hand_made(header, None))
        # An HMAC token whose kid is the HS secret's own value, and other header oddities.
        assert not await accepted(server, hand_made({"alg": "HS256", "kid": 7},
                                                    NEW.encode()))
        assert not await accepted(server, hand_made({"alg": "HS256", "kid": "x" * 500},
                                                    NEW.encode()))
        assert await accepted(server, hand_made({"alg": "HS256"}, NEW.encode()))


# --- JWKS over HTTP --------------------------------------------------------------------------


class JwksServer:
    """A tiny JWKS endpoint on 127.0.0.1 whose keys a test can change."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": self.keys})

    async def __aenter__(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self.serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_jwks_url_rotation_on_unknown_kid_is_rate_limited(
        tmp_path: Path, keypairs: dict[str, tuple[Any, str]]) -> None:
    rsa_key, es_key = keypairs["RS256"][0], keypairs["ES256"][0]
    async with JwksServer() as jwks:
        jwks.keys = [jwk(rsa_key, "2024")]
        async with running(tmp_path / "data", secret=NEW, jwks=(jwks.url,),
                           jwks_refresh=3600, jwks_cooldown=0.5) as server:
            # Fetched at start: the first token is accepted at once.
            assert await accepted(server, sign(rsa_key, "RS256", "2024"))
            assert jwks.hits == 1

            # Forged kids by the hundred: at most one fetch per cooldown.
            for n in range(200):
                with pytest.raises(AuthError):
                    server.auth.verify(sign(rsa_key, "RS256", f"forged-{n}"))
            await asyncio.sleep(1.0)
            assert 2 <= jwks.hits <= 3

            # Rotation at the URL: the new kid is fetched on first sight; the old one leaves.
            jwks.keys = [jwk(es_key, "2025")]
            await eventually(lambda: accepted(server, sign(es_key, "ES256", "2025")))
            assert not await accepted(server, sign(rsa_key, "RS256", "2024"))


async def test_jwks_url_is_refreshed_periodically(
        tmp_path: Path, keypairs: dict[str, tuple[Any, str]]) -> None:
    ed_key, rsa_key = keypairs["EdDSA"][0], keypairs["RS256"][0]
    async with JwksServer() as jwks:
        jwks.keys = [jwk(ed_key, "a")]
        async with running(tmp_path / "data", secret=NEW, jwks=(jwks.url,),
                           jwks_refresh=0.3, jwks_cooldown=60) as server:
            old = sign(ed_key, "EdDSA", "a")
            assert await accepted(server, old)  # and now cached
            jwks.keys = [jwk(rsa_key, "b")]
            hits = jwks.hits
            await eventually(lambda: asyncio.sleep(0, jwks.hits >= hits + 2))
            # No unknown kid was needed: the periodic fetch already holds "b", dropped "a".
            assert "b" in server.auth.jwks[0].keys
            assert await accepted(server, sign(rsa_key, "RS256", "b"))
            assert not await accepted(server, old)


async def test_an_unreachable_jwks_url_does_not_stop_the_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    async with running(tmp_path / "data", secret=NEW, jwks=(url,)) as server:
        assert server.auth.jwks[0].keys == {}
        assert await accepted(server, sign(NEW, "HS256", None))


# --- secrets stay off command lines ----------------------------------------------------------


def test_docs_show_no_secret_on_a_command_line() -> None:
    docs = [ROOT / "README.md", ROOT / "docs" / "operations.md", ROOT / "docs" / "protocol.md"]
    text = "\n".join(path.read_text() for path in docs)
    assert not re.search(r"--secret[ =]", text), "documented commands must use --secret-file"
    assert "--secret-file" in text


def test_tether_token_validates_before_creating_a_secret(tmp_path: Path) -> None:
    for args in (["--caps", "subscribe,fly"], ["--ttl", "soon"]):
        with pytest.raises(SystemExit):
            cli_main(["token", "--sub", "a", "--data", str(tmp_path), *args])
    assert not (tmp_path / "secret").exists()


def test_a_refused_key_setting_leaves_no_generated_secret(tmp_path: Path) -> None:
    for settings in ({"public_key_file": (str(tmp_path / "missing.pem"),)},
                     {"jwks": (str(tmp_path / "missing.json"),)}, {"jwks_refresh": 0.0}):
        with pytest.raises(KeyConfigError):
            Authenticator.from_config(ServerConfig(data_dir=tmp_path, **settings))
    assert not (tmp_path / "secret").exists()


def test_serve_with_a_secret_file_keeps_it_out_of_ps(tmp_path: Path) -> None:
    secret_file = write_secret(tmp_path / "secrets", f"k2={NEW}\nk1={OLD}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--port", str(port), "--data",
         str(tmp_path / "data"), "--secret-file", str(secret_file), "--agent", "none",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_port(port, 30)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert NEW not in cmdline and OLD not in cmdline
        minted = subprocess.run(
            [sys.executable, "-m", "tether", "token", "--sub", "alice", "--secret-file",
             str(secret_file), "--data", str(tmp_path / "data")],
            capture_output=True, text=True, check=True, env=env).stdout.strip()
        assert jwt.get_unverified_header(minted)["kid"] == "k2"
        by_env = subprocess.run(
            [sys.executable, "-m", "tether", "token", "--sub", "bob"],
            capture_output=True, text=True, check=True,
            env={**env, "TETHER_SECRET_FILE": str(secret_file)}).stdout.strip()
        old = sign(OLD, "HS256", "k1")
        for tok, status in ((minted, 200), (by_env, 200), (old, 200),
                            (sign(OLD, "HS256", None), 401)):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/sessions/s/events?limit=1",
                headers={"Authorization": f"Bearer {tok}"})
            try:
                got = urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == status
        assert not (tmp_path / "data" / "secret").exists()
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
