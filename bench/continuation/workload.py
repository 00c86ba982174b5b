"""The agent's script: instructions, tools, the task, and seeded tool outputs of 2–20 KB.

Tool outputs look like what a coding agent reads back: source files, test runs, logs and grep
results — text with the repetition and entropy of the real thing, generated from a seed so that
every transport sees byte-identical inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

INSTRUCTIONS = (
    "You are a coding agent working in a Python repository. Work in small steps: read the "
    "relevant files, run the tests, search the code, and only then propose a change. Call one "
    "tool at a time and wait for its result. Quote file paths and line numbers when you refer "
    "to code. Never invent the content of a file you have not read. When the tests pass and you "
    "understand the failure, stop calling tools and answer with a short explanation of the "
    "cause, the fix as a unified diff, and how you verified it. Keep answers under 200 words."
)

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "read_file",
     "description": "Read a file of the repository and return its content with line numbers.",
     "parameters": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the repository root"},
         "start": {"type": "integer", "description": "First line to return (1-based)"}},
         "required": ["path"], "additionalProperties": False}},
    {"type": "function", "name": "run_tests",
     "description": "Run pytest on a target and return its output and exit status.",
     "parameters": {"type": "object", "properties": {
         "target": {"type": "string", "description": "A test file, node id or folder"},
         "verbose": {"type": "boolean"}},
         "required": ["target"], "additionalProperties": False}},
    {"type": "function", "name": "grep",
     "description": "Search the repository with a regular expression; returns matching lines.",
     "parameters": {"type": "object", "properties": {
         "pattern": {"type": "string"}, "path": {"type": "string"}},
         "required": ["pattern"], "additionalProperties": False}},
]

TASK = (
    "CI is red on main: tests/store/test_contract.py::test_resume_after_trim fails "
    "intermittently with `AssertionError: expected seq 41, got 43` on the Redis job only. It "
    "started after the batched commit change (#412). Find the cause and propose a fix. The "
    "store is in tether/store/, the resume logic in tether/server/hub.py."
)

_NAMES = ["session", "cursor", "epoch", "append", "flush", "batch", "listener", "channel",
          "outbox", "resume", "retention", "presence", "payload", "stream", "commit", "seq"]
_LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR"]
_MESSAGES = ["commit batch size=%d took %.3fms", "listener of %r failed: %s",
             "catch-up read after seq %d returned %d events", "retention removed %d events",
             "client %s resumed at cursor %s", "gap detected: expected %d got %d",
             "redis EVALSHA batch of %d appended", "connection %s closed with %d"]


def _identifier(rng: random.Random) -> str:
    return "_".join(rng.sample(_NAMES, rng.randint(1, 3)))


def _code(rng: random.Random, size: int) -> str:
    lines = [f'"""{rng.choice(_NAMES).capitalize()} handling for the {rng.choice(_NAMES)} '
             f'store."""', "", "from __future__ import annotations", "", "import asyncio",
             "from dataclasses import dataclass", ""]
    n = 1
    while sum(len(line) + 7 for line in lines) < size:
        name = _identifier(rng)
        if rng.random() < 0.25:
            lines += ["", "@dataclass(slots=True)", f"class {name.title().replace('_', '')}:"]
            for _ in range(rng.randint(2, 5)):
                lines.append(f"    {_identifier(rng)}: {rng.choice(['int', 'str', 'bytes'])}")
        else:
            args = ", ".join(_identifier(rng) for _ in range(rng.randint(1, 3)))
            lines += ["", f"async def {name}(self, {args}) -> int:",
                      f'    """Return the {rng.choice(_NAMES)} after {rng.choice(_NAMES)}."""']
            for _ in range(rng.randint(3, 9)):
                lhs, rhs = _identifier(rng), _identifier(rng)
                kind = rng.random()
                if kind < 0.3:
                    lines.append(f"    if {lhs} > self.{rhs}:")
                    lines.append(f"        {lhs} = await self._{rhs}({lhs}, {rng.randint(0, 99)})")
                elif kind < 0.5:
                    lines.append(f"    for {lhs} in self.{rhs}:")
                    lines.append(f"        self.{rhs}[{lhs}] += 1")
                else:
                    lines.append(f"    {lhs} = self.{rhs}.get({lhs!r}, {rng.randint(0, 500)})")
            lines.append(f"    return {_identifier(rng)}")
    numbered = [f"{i + n:5d}  {line}" for i, line in enumerate(lines)]
    return "\n".join(numbered)[:size]


def _fill(rng: random.Random, template: str) -> str:
    """Fill a printf-style template with plausible values."""
    out = template.replace("%.3f", f"{rng.random() * 5:.3f}")
    out = out.replace("%r", repr(f"{_identifier(rng)}-{rng.randint(1, 99)}"))
    while "%d" in out:
        out = out.replace("%d", str(rng.randint(1, 5000)), 1)
    while "%s" in out:
        out = out.replace("%s", f"{_identifier(rng)}-{rng.randint(1, 99)}", 1)
    return out


def _log(rng: random.Random, size: int) -> str:
    out = []
    t = rng.randint(0, 80_000)
    total = 0
    while total < size:
        t += rng.randint(1, 900)
        line = (f"2026-05-{rng.randint(1, 28):02d}T{(t // 3600) % 24:02d}:{(t // 60) % 60:02d}:"
                f"{t % 60:02d}.{rng.randint(0, 999):03d}Z {rng.choice(_LEVELS):7s} "
                f"tether.{rng.choice(_NAMES)} node=node-{rng.randint(1, 3)} "
                f"{_fill(rng, rng.choice(_MESSAGES))}")
        out.append(line)
        total += len(line) + 1
    return "\n".join(out)[:size]


def _tests(rng: random.Random, size: int) -> str:
    out = ["============================= test session starts ==============================",
           "platform linux -- Python 3.11.7, pytest-8.3.2, pluggy-1.5.0",
           f"collected {rng.randint(80, 400)} items", ""]
    total = sum(len(line) for line in out)
    while total < size:
        name = f"tests/{rng.choice(_NAMES)}/test_{_identifier(rng)}.py"
        marks = "".join(rng.choice("....................F.s") for _ in range(rng.randint(5, 40)))
        line = f"{name} {marks:<45} [{rng.randint(1, 100):3d}%]"
        out.append(line)
        total += len(line) + 1
        if "F" in marks and rng.random() < 0.3:
            block = [f"____ test_{_identifier(rng)} ____", "",
                     f"    async def test_{_identifier(rng)}(store):",
                     f"        await store.append('s', 'm', {rng.randint(1, 9)}, SENDER)",
                     f">       assert head.last_seq == {rng.randint(30, 50)}",
                     f"E       AssertionError: expected seq {rng.randint(30, 50)}, got "
                     f"{rng.randint(30, 50)}", ""]
            out += block
            total += sum(len(b) + 1 for b in block)
    return "\n".join(out)[:size]


def _grep(rng: random.Random, size: int) -> str:
    out = []
    total = 0
    while total < size:
        line = (f"tether/{rng.choice(_NAMES)}/{_identifier(rng)}.py:{rng.randint(1, 900)}:    "
                f"{_identifier(rng)} = self.{_identifier(rng)}({_identifier(rng)}, "
                f"{rng.randint(0, 99)})")
        out.append(line)
        total += len(line) + 1
    return "\n".join(out)[:size]


_KINDS = {"read_file": (_code,), "run_tests": (_tests, _log), "grep": (_grep,)}


@dataclass(frozen=True)
class Workload:
    seed: int = 7
    min_bytes: int = 2 << 10
    max_bytes: int = 20 << 10

    def tool_output(self, turn: int, tool: str) -> str:
        """The output of the tool called at ``turn`` (same for every transport)."""
        rng = random.Random(f"{self.seed}:{turn}:{tool}")
        size = rng.randint(self.min_bytes, self.max_bytes)
        kind = rng.choice(_KINDS.get(tool, (_log,)))
        return kind(rng, size)
