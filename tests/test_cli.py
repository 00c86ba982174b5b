"""The ``tether`` command as a user runs it: real subprocesses, real servers.

The README's quickstart from another directory, and every expected failure as one
``tether: error:`` line with a non-zero exit and no traceback.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
OTHER_SECRET = "another-secret-" + "y" * 32


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user whose home is ``home``: no TETHER_* settings inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TETHER_") and k != "XDG_CONFIG_HOME"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
                   os.pathsep), **extra)
    return env


def tether(*args: str, cwd: Path, env: dict[str, str],
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tether", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_error(done: subprocess.CompletedProcess[str] | tuple[int, str],
                     *fragments: str) -> str:
    """One ``tether: error:`` line on stderr, a non-zero exit, no traceback; the line."""
    code, stderr = (done.returncode, done.stderr) if isinstance(
        done, subprocess.CompletedProcess) else done
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tether: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def readline(proc: subprocess.Popen[str], stream: str = "stdout", timeout: float = 30) -> str:
    """The next line ``proc`` writes to ``stream`` ('' at EOF), within ``timeout`` seconds."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no line on {stream} within {timeout}s")
    return pipe.readline()


def interrupt(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    return proc.returncode, stderr


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


class Layout:
    """A clone with its data folder, a home, and a directory elsewhere (like ``~``)."""

    def __init__(self, root: Path) -> None:
        self.clone = root / "clone"
        self.data = self.clone / "tether-data"
        self.home = root / "home"
        self.elsewhere = root / "elsewhere"
        for path in (self.clone, self.home, self.elsewhere):
            path.mkdir()
        self.env = cli_env(self.home)
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"

    @property
    def user_secret(self) -> Path:
        return self.home / ".config" / "tether" / "secret"

    def serve(self, *extra: str) -> subprocess.Popen[str]:
        proc = start("serve", "--port", str(self.port), "--data", str(self.data),
                     "--agent", "none", "--log-level", "warning", *extra,
                     cwd=self.clone, env=self.env)
        try:
            wait_for_port(self.port, 30)
        except TimeoutError:
            stop(proc)
            raise
        return proc

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in the other directory, as in the quickstart's second terminal."""
        return tether(*args, cwd=self.elsewhere, env=self.env, timeout=timeout)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def served(layout: Layout) -> Iterator[Layout]:
    proc = layout.serve()
    yield layout
    stop(proc)


def mint(layout: Layout, *args: str) -> str:
    done = layout.run("token", "--sub", "alice", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- the quickstart ---------------------------------------------------------------------------


def test_quickstart_from_another_directory(layout: Layout) -> None:
    server = layout.serve()
    try:
        # The startup line names the secret, created per user (mode 0600), not in the data.
        line = readline(server)
        assert f"secret {layout.user_secret}" in line, line
        assert stat.S_IMODE(layout.user_secret.stat().st_mode) == 0o600
        assert not (layout.data / "secret").exists()

        token = mint(layout, "--session", "demo*", "--caps", "subscribe,publish,presence",
                     "--ttl", "1h")
        env = {**layout.env, "TETHER_TOKEN": token}
        published = tether("publish", "demo", "message", '{"text": "hello"}', "--url",
                           layout.url, cwd=layout.elsewhere, env=env)
        assert published.returncode == 0, published.stderr
        cursor = published.stdout.strip()
        assert ":" in cursor

        tail = start("tail", "demo", "--url", layout.url, cwd=layout.elsewhere, env=env)
        try:
            first = readline(tail)
            assert '"hello"' in first and cursor in first
        finally:
            code, stderr = interrupt(tail)
        assert code == 130 and "Traceback" not in stderr, stderr

        # Resuming after a cursor, under the HTTP parameter's name too.
        again = tether("publish", "demo", "message", '{"text": "again"}', "--url",
                       layout.url, cwd=layout.elsewhere, env=env)
        assert again.returncode == 0, again.stderr
        for flag in ("--cursor", "--after"):
            tail = start("tail", "demo", flag, cursor, "--url", layout.url,
                         cwd=layout.elsewhere, env=env)
            try:
                assert '"again"' in readline(tail)
            finally:
                interrupt(tail)
        # Nothing was created where the second terminal ran.
        assert list(layout.elsewhere.iterdir()) == []
    finally:
        stop(server)


def test_a_token_signed_with_another_secret_is_refused_in_one_line(served: Layout) -> None:
    other = served.home / "other-secret"
    other.write_text(OTHER_SECRET + "\n")
    token = mint(served, "--secret-file", str(other))
    for command in (["publish", "demo", "message", "{}"], ["tail", "demo"]):
        done = served.run(*command, "--url", served.url, "--token", token)
        assert_one_error(done, "the server refused the token",
                         "signed with another secret?")


def test_the_data_folder_secret_of_older_installs_is_still_used(layout: Layout) -> None:
    layout.data.mkdir()
    (layout.data / "secret").write_text(OTHER_SECRET + "\n")
    server = layout.serve()
    try:
        assert f"secret {layout.data / 'secret'}" in readline(server)
        assert not layout.user_secret.exists()
        # From the clone (where ./tether-data is), and anywhere with --data.
        token = tether("token", "--sub", "a", cwd=layout.clone, env=layout.env).stdout.strip()
        done = layout.run("publish", "demo", "message", "{}", "--url", layout.url,
                          "--token", token)
        assert done.returncode == 0, done.stderr
        done = layout.run("publish", "demo", "message", "{}", "--url", layout.url,
                          "--data", str(layout.data))
        assert done.returncode == 0, done.stderr
    finally:
        stop(server)


# --- tokens never create a secret -------------------------------------------------------------


def test_token_creates_no_secret_anywhere(layout: Layout) -> None:
    for args in (["--caps", "read"], ["--caps", "subscribe,fly"], ["--ttl", "soon"], []):
        assert_one_error(layout.run("token", "--sub", "a", *args))
        assert_one_error(tether("token", "--sub", "a", "--data", str(layout.data), *args,
                                cwd=layout.clone, env=layout.env))
    assert_one_error(layout.run("token", "--sub", "a"), "start the server first",
                     "--secret-file")
    assert_one_error(layout.run("publish", "demo", "message", "{}", "--url", layout.url),
                     "start the server first")
    assert list(layout.elsewhere.iterdir()) == []
    assert list(layout.clone.iterdir()) == []
    assert list(layout.home.iterdir()) == []


# --- failing fast, in one line ----------------------------------------------------------------


def test_publish_to_a_dead_port_gives_up_in_one_line(layout: Layout) -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    done = layout.run("publish", "demo", "message", "{}", "--url", url, "--token", "t",
                      "--timeout", "1")
    assert_one_error(done, f"cannot reach {url} (is the server running?)")
    assert_one_error(layout.run("publish", "demo", "message", "{}", "--timeout", "0"),
                     "--timeout")


def test_expected_failures_are_one_line(served: Layout) -> None:
    token = mint(served, "--session", "demo*", "--caps", "subscribe,publish")
    url = ["--url", served.url]
    read_only = mint(served, "--session", "demo*", "--caps", "subscribe")
    cursor = served.run("publish", "demo", "message", "{}", *url, "--token", token)
    assert cursor.returncode == 0, cursor.stderr
    cases = [
        (["publish", "private", "message", "{}", *url, "--token", token], "forbidden"),
        (["tail", "private", *url, "--token", token], "forbidden"),
        (["publish", "demo", "message", "{}", *url, "--token", read_only], "forbidden"),
        (["tail", "demo", "--cursor", "not-a-cursor", *url, "--token", token], "cursor"),
        (["tail", "demo", "--after", "AAAAAAAAAAAAAA:5", *url, "--token", token], "cursor"),
        (["publish", "demo", "message", "{not json", *url, "--token", token], "JSON"),
        (["publish", "demo", "message", "{}", *url, "--token", "not-a-jwt"],
         "the server refused the token"),
        (["publish", "demo", "message", "{}", "--url", "ftp://x", "--token", token], "--url"),
        (["token", "--sub", "a", "--ttl", "soon"], "--ttl"),
        (["token", "--sub", "a", "--caps", "read"], "unknown capability"),
        (["serve", "--port", "99999"], "out of range"),
        (["serve", "--port", "0"], "out of range"),
        (["serve", "--port", "http"], "invalid port"),
    ]
    for args, fragment in cases:
        assert_one_error(served.run(*args), fragment)


def test_serve_refuses_a_port_out_of_range_from_argparse(layout: Layout) -> None:
    done = layout.run("serve", "--port", "99999", timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_error(done, "--port", "out of range (1-65535)")
    env = {**layout.env, "TETHER_PORT": "99999"}
    assert_one_error(tether("serve", cwd=layout.elsewhere, env=env), "out of range")
    env = {**layout.env, "TETHER_PORT": "many"}
    assert_one_error(tether("serve", cwd=layout.elsewhere, env=env), "TETHER_PORT")


def test_serve_on_a_port_in_use_says_so_in_one_line(layout: Layout) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = layout.run("serve", "--port", str(port), "--data", str(layout.data),
                          "--agent", "none", timeout=60)
    assert_one_error(done, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_serve_on_redis_needs_an_explicit_secret(layout: Layout, redis_url: str) -> None:
    done = layout.run("serve", "--port", str(layout.port), "--data", str(layout.data),
                      "--store", redis_url, "--agent", "none", timeout=60)
    assert_one_error(done, redis_url, "--secret-file")
    assert not layout.user_secret.exists() and not (layout.data / "secret").exists()

    secret_file = layout.home / "cluster-secret"
    secret_file.write_text(OTHER_SECRET + "\n")
    secret_file.chmod(0o600)
    server = layout.serve("--store", redis_url, "--secret-file", str(secret_file))
    try:
        assert f"secret secret file {secret_file}" in readline(server)
        done = layout.run("publish", "demo", "message", "{}", "--url", layout.url,
                          "--secret-file", str(secret_file))
        assert done.returncode == 0, done.stderr
    finally:
        stop(server)
    assert not layout.user_secret.exists()


def test_serve_with_an_unreachable_store_says_so_in_one_line(layout: Layout) -> None:
    store = f"redis://127.0.0.1:{free_port()}/0"
    secret_file = layout.home / "cluster-secret"
    secret_file.write_text(OTHER_SECRET + "\n")
    secret_file.chmod(0o600)
    done = layout.run("serve", "--port", str(layout.port), "--data", str(layout.data),
                      "--store", store, "--secret-file", str(secret_file), "--agent", "none")
    assert_one_error(done, "cannot use the store", "unavailable")


# --- Ctrl-C and reconnects --------------------------------------------------------------------


def test_ctrl_c_exits_quietly(layout: Layout) -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    env = {**layout.env, "TETHER_TOKEN": "t"}
    tail = start("tail", "demo", "--url", dead, cwd=layout.elsewhere, env=env)
    # tail keeps trying, and says so.
    assert f"cannot reach {dead}; retrying" in readline(tail, "stderr")
    code, stderr = interrupt(tail)
    assert code == 130 and "Traceback" not in stderr, stderr

    # A server that accepts and never answers: once it has the connection, publish is waiting
    # inside its event loop.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        publish = start("publish", "demo", "message", "{}", "--url", url, "--timeout", "120",
                        cwd=layout.elsewhere, env=env)
        try:
            conn, _ = silent.accept()
        except BaseException:
            stop(publish)
            raise
        with conn:
            code, stderr = interrupt(publish)
    assert code == 130 and stderr == "", stderr

    server = layout.serve()
    readline(server)
    code, stderr = interrupt(server)
    assert code == 130 and "Traceback" not in stderr, stderr


def test_tail_says_when_it_reconnects_and_resumes(layout: Layout) -> None:
    server = layout.serve()
    readline(server)
    env = {**layout.env, "TETHER_TOKEN": mint(layout, "--session", "demo")}
    tail = start("tail", "demo", "--url", layout.url, cwd=layout.elsewhere, env=env)
    try:
        first = tether("publish", "demo", "message", '{"n": 1}', "--url", layout.url,
                       cwd=layout.elsewhere, env=env)
        assert first.returncode == 0, first.stderr
        assert '"n":1' in readline(tail)
        stop(server)
        assert f"lost the connection to {layout.url}; retrying" in readline(tail, "stderr")
        server = layout.serve()
        assert f"connected to {layout.url}" in readline(tail, "stderr")
        second = tether("publish", "demo", "message", '{"n": 2}', "--url", layout.url,
                        cwd=layout.elsewhere, env=env)
        assert second.returncode == 0, second.stderr
        assert '"n":2' in readline(tail)
        code, stderr = interrupt(tail)
        assert code == 130 and "Traceback" not in stderr, stderr
    finally:
        stop(tail)
        stop(server)
