"""Every module of tether imports on its own, in a fresh interpreter.

An import cycle shows only when a module is the *first* tether module imported (another test
that imported ``tether.server.auth`` first would hide it), so each module is imported first in
a process of its own: a parent that has loaded only third-party libraries forks one child per
module (fast), and the child imports that module.
"""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import importlib.util, os, pathlib, sys, traceback
import aiohttp, orjson, msgpack, jwt, redis, prometheus_client, httpx  # third party only
root = pathlib.Path(importlib.util.find_spec("tether").origin).parent
names = sorted(
    ".".join(("tether", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    for path in root.rglob("*.py")
    if path.name != "__main__.py")  # __main__ runs the CLI when imported
assert not any(m == "tether" or m.startswith("tether.") for m in sys.modules)
failed = 0
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed += 1
        print("FAILED", name, file=sys.stderr, flush=True)
print(len(names), "modules", failed, "failed")
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    count = int(done.stdout.split()[0])
    assert count > 40  # the walk found the package's modules
