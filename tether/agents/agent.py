"""Agents: a model, instructions, tools, and what to do with a message that arrives mid-run.

An agent is registered with the server (``tether serve --agent module:object`` or
``server.runs.register(agent)``) for the sessions matching its patterns. Its
:meth:`Agent.respond` drives one run through a :class:`~tether.agents.runner.Run`: the default
is the usual loop — stream the model, call tools, feed results back, until the model answers
with text. Override it to drive a run some other way; everything a run can do is a method of
``Run`` (``stream_text``, ``call_tool``, ``set_state``).
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tether.agents.models import Model, SimulatedModel, TextDelta, ToolCallDelta
from tether.agents.tools import Tool

if TYPE_CHECKING:
    from tether.agents.runner import Run


class BusyPolicy(enum.StrEnum):
    """What a new user message does while a run of the session is active."""

    QUEUE = "queue"  # start a new run after the active one ends (default)
    INTERRUPT = "interrupt"  # cancel the active run, start a new one
    MERGE = "merge"  # inject the message into the active run (as run.steer does)


class Agent:
    def __init__(self, name: str, model: Model | None = None, *, instructions: str = "",
                 tools: Sequence[Tool] = (), sessions: Sequence[str] = ("*",),
                 busy: BusyPolicy | str = BusyPolicy.QUEUE, max_steps: int = 16,
                 coalesce_window: float = 0.020, coalesce_bytes: int = 256) -> None:
        self.name = name
        self.model: Model = model or SimulatedModel()
        self.instructions = instructions
        self.tools = {t.name: t for t in tools}
        self.sessions = tuple(sessions)
        self.busy = BusyPolicy(busy)
        self.max_steps = max_steps
        self.coalesce_window = coalesce_window
        self.coalesce_bytes = coalesce_bytes

    def serves(self, session: str) -> bool:
        return any(fnmatch.fnmatchcase(session, pattern) for pattern in self.sessions)

    async def recover(self, run: Run) -> None:
        """Bring a run recovered from the log (after a restart or a lease change) to where
        :meth:`respond` can take over. The default finishes what the default loop was doing:
        a step cut off is run again, a wait for an approval or a front-end tool goes on.
        Agents that keep their own state (framework integrations) override this to only end
        the cut-off streams (:meth:`Run.restart_step`) and resume in :meth:`respond`."""
        await run.resume()

    async def respond(self, run: Run) -> None:
        """The default loop: model step, tools, repeat, until the model answers with text
        and no steer arrived meanwhile (the model sees steers as user messages)."""
        run.take_steers()  # those already in the log are in the conversation
        for _ in range(self.max_steps):
            calls: dict[int, list[str]] = {}  # index → [id, name, arguments]
            async with run.stream_text() as text:
                async for chunk in self.model.stream(run.messages(), [t.spec for t in
                                                                      self.tools.values()]):
                    if isinstance(chunk, TextDelta):
                        text.write(chunk.text)
                    elif isinstance(chunk, ToolCallDelta):
                        call = calls.setdefault(chunk.index, ["", "", ""])
                        call[0] = chunk.id or call[0]
                        call[1] = chunk.name or call[1]
                        call[2] += chunk.arguments
            if not calls:
                if run.take_steers():
                    continue  # steered while answering: answer the new input too
                return
            # The model's own call ids are not used: a decision or a front-end result names
            # its call, so the id must be unguessable, and models do not choose ids to be
            # secret (the simulated model derives them from its seed). The run mints each.
            for _, name, arguments in calls.values():
                await run.call_tool("", name, arguments)
        await run.fail(f"no answer after {self.max_steps} model steps")
