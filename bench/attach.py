"""Server CPU per hello + attach: first attach, and re-attach with a cursor (a reconnect).

The reconnect storm (bench/storm.py) is limited by the server's CPU per re-attach; this
measures that figure alone, without the storm's kill, restart and backoff: ``--clients``
raw WebSocket clients over ``--sessions`` sessions (several members share each session, as in
the storm) say hello and attach; then every one closes, and all attach again with the cursor
they had. The server's process tree's CPU is read around each phase, once with a token that
has the ``presence`` capability (each attach joins the session's presence, announced to the
other members) and once without.

``--tree DIR`` runs a second server from another checkout of tether (``git archive`` of a
commit) in the same run, so a change is measured against its baseline on the same machine
state: each variant is run ``--repeat`` times, alternating the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from bench import common as c
from bench.connections import RawWS, tree_cpu


class _Client(RawWS):
    """RawWS that keeps the cursor of the last event it saw."""

    def __init__(self) -> None:
        super().__init__([])
        self.cursor: str | None = None

    def _frame(self, b0: int, payload: bytes) -> None:
        if b0 & 0x0F == 0x1 and payload.startswith(b'{"op":"event"'):
            frame = orjson.loads(payload)
            if frame.get("cursor"):
                self.cursor = frame["cursor"]
            return
        super()._frame(b0, payload)


async def _open(port: int, tok: str, session: str, cursor: str | None) -> _Client:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Client, "127.0.0.1", port)
    await conn.open(port, "/v1/ws", False)
    await conn.request({"op": "hello", "id": 1, "token": tok})
    reply = await conn.request({"op": "attach", "id": 2, "session": session, "cursor": cursor})
    conn.cursor = conn.cursor or reply.get("cursor")
    return conn


async def _publish(port: int, tok: str, sessions: list[str]) -> None:
    """One event per session, so that a re-attach resumes from a real cursor."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Client, "127.0.0.1", port)
    await conn.open(port, "/v1/ws", False)
    await conn.request({"op": "hello", "id": 1, "token": tok})
    for i, session in enumerate(sessions):
        await conn.request({"op": "publish", "id": 10 + i, "session": session, "type": "tick",
                            "data": {"i": i}})
    assert conn.transport is not None
    conn.transport.close()


async def _phases(proc: c.Proc, tok: str, prefix: str, args: Any) -> dict[str, float]:
    names = [f"{prefix}-{i % args.sessions}" for i in range(args.clients)]
    await _publish(proc.port, tok, sorted(set(names)))
    await asyncio.sleep(0.5)
    cpu0, t0 = tree_cpu(proc.pid), time.perf_counter()
    conns: list[_Client] = await c.gather_limited(
        [_open(proc.port, tok, name, None) for name in names], args.concurrency)
    first_cpu, first_wall = tree_cpu(proc.pid) - cpu0, time.perf_counter() - t0
    cursors = [conn.cursor for conn in conns]
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(args.settle)  # the server handles the closes (and presence leaves)
    cpu0, t0 = tree_cpu(proc.pid), time.perf_counter()
    conns = await c.gather_limited(
        [_open(proc.port, tok, name, cursor) for name, cursor in zip(names, cursors,
                                                                     strict=True)],
        args.concurrency)
    again_cpu, again_wall = tree_cpu(proc.pid) - cpu0, time.perf_counter() - t0
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(args.settle)
    n = len(names)
    return {"attach_cpu_ms": first_cpu / n * 1000, "attach_per_s": n / first_wall,
            "reattach_cpu_ms": again_cpu / n * 1000, "reattach_per_s": n / again_wall}


def _server(tree: str | None, workers: int) -> c.Proc:
    proc = c.tether_server(workers=workers)
    if tree:
        # `python -m` imports from the working directory first, and workers are started the
        # same way: the other checkout's directory is their working directory.
        proc.cmd = ["env", "-C", tree, *proc.cmd]
        proc.env["PYTHONPATH"] = tree
    return proc


def run(args: Any) -> list[dict[str, Any]]:
    servers = {"this": None} if not args.tree else {"baseline": args.tree, "this": None}
    variants = {"presence": c.token(sub="with", caps=["subscribe", "publish", "presence"]),
                "no presence": c.token(sub="without", caps=["subscribe", "publish"])}
    if args.only:
        variants = {args.only: variants[args.only]}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(args.repeat):
        for name, tree in servers.items():
            with _server(tree, args.workers) as proc:
                for variant, tok in variants.items():
                    prefix = f"a{rep}-{variant[0]}"
                    r = asyncio.run(_phases(proc, tok, prefix, args))
                    results.setdefault((name, variant), []).append(r)
                    print(f"  {name:8} {variant:11} " + "  ".join(
                        f"{k} {v:,.2f}" for k, v in r.items()), flush=True)
    out = []
    for (name, variant), rs in results.items():
        row: dict[str, Any] = {"server": name, "variant": variant, "runs": len(rs)}
        for key in rs[0]:
            row[key] = statistics.median(r[key] for r in rs)
            row[key + "_all"] = [round(r[key], 3) for r in rs]
        out.append(row)
    return out


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="tether serve --workers N")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--only", choices=["presence", "no presence"], default=None)
    p.add_argument("--tree", default="", help="also run the server from this checkout")
    args = p.parse_args()
    c.raise_nofile()
    c.install_uvloop()
    with contextlib.suppress(AttributeError):
        args.quick and setattr(args, "clients", 1000)
    rows = run(args)
    keys = ["attach_cpu_ms", "reattach_cpu_ms", "attach_per_s", "reattach_per_s"]
    print(c.table(["server", "variant", *keys],
                  [[r["server"], r["variant"], *(f"{r[k]:,.3f}" for k in keys)] for r in rows]))
    if args.tree:
        base = {r["variant"]: r for r in rows if r["server"] == "baseline"}
        for r in rows:
            if r["server"] == "this":
                b = base[r["variant"]]
                print(f"{r['variant']}: attach CPU {r['attach_cpu_ms'] / b['attach_cpu_ms']:.2f}x"
                      f", re-attach CPU {r['reattach_cpu_ms'] / b['reattach_cpu_ms']:.2f}x "
                      "the baseline's")
    path = c.write_results("attach", {"config": vars(args), "result": rows,
                                      "tree": str(Path(args.tree).resolve()) if args.tree
                                      else None})
    print(f"wrote {path.relative_to(c.ROOT)}")


if __name__ == "__main__":
    main()
