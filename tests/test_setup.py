"""The README's set-up on a fresh clone: ``./scripts/serve`` with the system Python.

Debian's ``/usr/bin/python3`` is "externally managed" (PEP 668): pip refuses to install into
it, so the scripts make a virtual environment in ``.venv`` and install there. The module clones
this checkout (committed files only), runs ``./scripts/serve`` with ``python3`` on PATH being
``/usr/bin/python3``, waits for ``/healthz``, stops it with SIGINT, then starts it again and
checks that the second start does not reinstall. One venv is made for the whole module (it
downloads tether's dependencies, so it takes a while).

The error paths (no Python 3.11+, Debian's python3-venv missing) run with fake ``python3`` and
``apt-get`` commands on PATH and a copy of the script, with no network and no real apt-get.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
STAMP = Path(".venv") / "tether-install.stamp"
UP_TO_DATE = ".venv is up to date with pyproject.toml: not reinstalling"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _system_python_version() -> tuple[int, int] | None:
    if not SYSTEM_PYTHON.exists():
        return None
    done = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(*sys.version_info[:2])"],
                          capture_output=True, text=True, timeout=30)
    major, minor = done.stdout.split()
    return int(major), int(minor)


def _env(bindir: Path) -> dict[str, str]:
    """This environment with ``bindir`` first on PATH and no trace of the venv running pytest."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    ours = {Path(sys.executable).parent, Path(sys.prefix) / "bin"}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) not in ours]
    env["PATH"] = os.pathsep.join([str(bindir), *path])
    return env


def _healthz(port: int) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@dataclass
class Start:
    output: str
    seconds: float  # from the command to /healthz answering 200
    returncode: int  # after SIGINT


STOPPED = (0, 130, -signal.SIGINT)  # how `tether serve` may exit on Ctrl-C


def serve_once(clone: Path, env: dict[str, str], timeout: float = 540) -> Start:
    """``./scripts/serve --port N`` in ``clone``: waits for /healthz 200, then SIGINT."""
    port = free_port()
    log_path = clone.parent / f"serve-{port}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["./scripts/serve", "--port", str(port)], cwd=clone, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = started + timeout
            while _healthz(port) != 200:
                if proc.poll() is not None:
                    pytest.fail(f"./scripts/serve exited with {proc.returncode}:\n"
                                + log_path.read_text(errors="replace")[-6000:])
                if time.monotonic() > deadline:
                    pytest.fail("no /healthz 200 in time:\n"
                                + log_path.read_text(errors="replace")[-6000:])
                time.sleep(0.2)
            seconds = time.monotonic() - started
            proc.send_signal(signal.SIGINT)  # the script exec'd `python -m tether serve`
            returncode = proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # pip or the server, whatever still runs
                proc.wait(10)
    return Start(log_path.read_text(errors="replace"), seconds, returncode)


@dataclass
class Clone:
    path: Path
    env: dict[str, str]
    first: Start


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clone]:
    """A fresh clone set up by its first ``./scripts/serve`` with the system Python."""
    version = _system_python_version()
    if version is None:
        pytest.skip(f"{SYSTEM_PYTHON} is missing (this test sets up with the system Python)")
    if version < (3, 11):
        pytest.skip(f"{SYSTEM_PYTHON} is {version[0]}.{version[1]}; tether needs 3.11+")
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout with git installed: nothing to clone")
    base = tmp_path_factory.mktemp("setup")
    subprocess.run([git, "clone", "-q", "--local", str(ROOT), str(base / "tether")],
                   check=True, timeout=120)
    bindir = base / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(SYSTEM_PYTHON)
    env = {**_env(bindir), "XDG_CONFIG_HOME": str(base / "config")}  # a secret of its own
    path = base / "tether"
    first = serve_once(path, env)
    print(f"\nfirst ./scripts/serve (venv + install): {first.seconds:.1f} s to /healthz 200")
    yield Clone(path, env, first)


def test_the_readme_sets_up_with_the_two_scripts() -> None:
    """What this module runs is what the README's "Run it" tells a newcomer to run."""
    readme = (ROOT / "README.md").read_text()
    run_it = readme.split("## Run it", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in run_it.split("```sh\n")[1:]]
    commands = [line.split("#", 1)[0].strip() for block in blocks
                for line in block.splitlines() if line.strip()]
    assert commands == ["./scripts/serve", "./scripts/test"]
    assert ".venv/bin/tether" in run_it and ". .venv/bin/activate" in run_it


def test_first_start_makes_the_venv_with_the_system_python(clone: Clone) -> None:
    out = clone.first.output
    assert "externally-managed-environment" not in out
    assert "creating .venv with" in out and "installing tether into .venv" in out, out[-3000:]
    assert clone.first.returncode in STOPPED, out[-3000:]
    cfg = (clone.path / ".venv" / "pyvenv.cfg").read_text()
    system = subprocess.run([str(SYSTEM_PYTHON), "--version"], capture_output=True, text=True,
                            check=True).stdout.split()[1]
    assert f"version = {system}" in cfg  # made by /usr/bin/python3, not pyenv's
    assert (clone.path / STAMP).is_file()
    assert (clone.path / "tether-data").is_dir()  # the README: data in ./tether-data


def test_second_start_does_not_reinstall(clone: Clone) -> None:
    stamp = (clone.path / STAMP).stat().st_mtime_ns
    second = serve_once(clone.path, clone.env, timeout=60)
    print(f"\nsecond ./scripts/serve: {second.seconds:.1f} s to /healthz 200")
    assert UP_TO_DATE in second.output, second.output[-3000:]
    assert "installing tether" not in second.output and "Collecting" not in second.output
    assert "WARNING: Location" not in second.output  # no pip at all
    assert (clone.path / STAMP).stat().st_mtime_ns == stamp
    assert second.returncode in STOPPED, second.output[-3000:]


def test_the_venv_has_the_tether_command(clone: Clone) -> None:
    """The README's ``.venv/bin/tether …`` runs from the clone."""
    done = subprocess.run([".venv/bin/tether", "token", "--sub", "alice", "--session", "demo*",
                           "--ttl", "1h"], cwd=clone.path, env=clone.env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(".") == 2  # a JWT


def test_a_changed_pyproject_reinstalls(clone: Clone) -> None:
    pyproject = clone.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# changed\n")
    done = subprocess.run(["bash", "-c", "source scripts/serve && ensure_venv"], cwd=clone.path,
                          env=clone.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "installing tether into .venv" in done.stderr
    done = subprocess.run(["bash", "-c", "source scripts/serve && ensure_venv"], cwd=clone.path,
                          env=clone.env, capture_output=True, text=True, timeout=60)
    assert UP_TO_DATE in done.stderr and "installing tether" not in done.stderr


# --- error paths, with fake commands ------------------------------------------------------------


def _script_copy(tmp_path: Path) -> Path:
    """scripts/serve and pyproject.toml alone in a folder with no .venv."""
    (tmp_path / "proj" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "serve", tmp_path / "proj" / "scripts" / "serve")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "proj" / "pyproject.toml")
    return tmp_path / "proj"


def _fake(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text("#!/bin/sh\n" + body)
    (bindir / name).chmod(0o755)


def test_an_old_python_gets_one_line_saying_how_to_get_3_11(tmp_path: Path) -> None:
    proj = _script_copy(tmp_path)
    _fake(tmp_path / "bin", "python3", 'echo 3.9\n')
    done = subprocess.run(["./scripts/serve"], cwd=proj, env=_env(tmp_path / "bin"),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Python 3.11 or newer" in lines[0] and "python3 is 3.9" in lines[0]
    assert "apt-get install python3" in lines[0] and "pyenv" in lines[0]
    assert not (proj / ".venv").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root the script would sudo the real apt-get")
def test_a_missing_python3_venv_is_installed_with_apt_get(tmp_path: Path) -> None:
    """Debian's python3 without python3.X-venv: `python3 -m venv` fails naming the package."""
    proj = _script_copy(tmp_path)
    bindir, log = tmp_path / "bin", tmp_path / "apt.log"
    _fake(bindir, "python3", f"""\
case "$*" in
  *version_info*) echo 3.11 ;;
  --version) echo Python 3.11.2 ;;
  "-m venv .venv")
    if [ -e {log} ]; then mkdir -p .venv; exit 0; fi
    mkdir -p .venv/bin
    echo "The virtual environment was not created successfully because ensurepip is not"
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
    echo "package using the following command."
    echo "    apt install python3.11-venv"
    exit 1 ;;
  *) exit 3 ;;
esac
""")
    _fake(bindir, "apt-get", f'echo "$*" >> {log}\n')
    done = subprocess.run(["./scripts/serve"], cwd=proj, env=_env(bindir),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "installing python3.11-venv" in done.stderr, done.stderr
    assert log.read_text().splitlines() == ["update -qq", "install -y -qq python3.11-venv"]
    # The fake venv has no python: the install after it fails, and says so.
    assert done.returncode != 0


# --- from the fresh clone to an answer ------------------------------------------------------------


@contextlib.contextmanager
def serving(clone: Clone) -> Iterator[int]:
    """``./scripts/serve`` of the clone, running (already set up): yields its port."""
    port = free_port()
    log_path = clone.path.parent / f"serving-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["./scripts/serve", "--port", str(port)], cwd=clone.path,
                                env=clone.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while _healthz(port) != 200:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.1)
            yield port
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def readme_block(section: str, language: str) -> str:
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_quickstart_and_the_python_snippet_work_next_to_the_clone(clone: Clone) -> None:
    """The README's quickstart, in a second terminal opened outside the clone — in the folder
    that holds the clone (named ``tether``, so it could shadow the package) — and its Python
    snippet saved there."""
    outside = clone.path.parent
    assert (outside / "tether").is_dir()  # the clone itself: the reported shadowing case
    lines = [line.split("  #", 1)[0].strip()
             for line in readme_block("Quickstart", "sh").splitlines() if line.strip()]
    activate, *commands = lines
    assert activate.startswith(". ") and activate.endswith("/.venv/bin/activate")
    tail = commands.pop()
    assert tail.startswith("tether tail ")
    with serving(clone) as port:
        url = f"ws://127.0.0.1:{port}"
        script = "\n".join([
            "set -euo pipefail",
            f". {clone.path}/.venv/bin/activate",
            *[c + f" --url {url}" if c.startswith("tether publish") else c for c in commands],
            f"timeout -s INT 5 {tail} --url {url} || test $? -eq 124 -o $? -eq 130",
        ])
        done = subprocess.run(["bash", "-c", script], cwd=outside, env=clone.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr
        assert '"text": "hello"' in done.stdout or '"hello"' in done.stdout, done.stdout

        snippet = readme_block("Quickstart", "python").replace("127.0.0.1:8765",
                                                               f"127.0.0.1:{port}")
        (outside / "snippet.py").write_text(snippet)
        token = subprocess.run(
            [str(clone.path / ".venv/bin/tether"), "token", "--sub", "alice", "--session",
             "demo*", "--caps", "subscribe,publish,presence", "--ttl", "1h"], cwd=outside,
            env=clone.env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        run = subprocess.run([str(clone.path / ".venv/bin/python"), "snippet.py"], cwd=outside,
                             env={**clone.env, "TETHER_TOKEN": token}, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "committed at" in run.stdout


def test_a_streamed_answer_in_the_browser(clone: Clone) -> None:
    """The fresh clone's server, the web app in Chromium: sign in, ask, get a streamed answer
    from the demo agent on the simulated model."""
    from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, _skip_reason

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with serving(clone) as port, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(30000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#login-name", "newcomer")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector('#app[data-view="home"]')
        page.goto(f"http://127.0.0.1:{port}/s/demo-first-ten-minutes")
        page.wait_for_selector('#conn[data-state="connected"]')
        page.fill("#composer-input", "hello")
        page.press("#composer-input", "Enter")
        page.wait_for_function("""() => {
          const done = document.querySelector("#transcript .msg.assistant:not(.streaming) .body");
          return done !== null && done.innerText.split(/\\s+/).length > 5;
        }""")
        answer = page.inner_text("#transcript .msg.assistant .body")
        browser.close()
    assert answer.strip()[0].isupper() and answer.strip().endswith(".")
    assert not errors, errors
