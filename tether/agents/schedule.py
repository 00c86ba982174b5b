"""Push without a caller: schedules that start runs, webhooks that call people back.

Both are kept in the run index (session ``tether.runs``) as events, so every node sees the
same schedules and webhooks and a restart loses none:

* ``tether.schedule`` {id, session, agent, every | cron, input, deleted?}. Each firing is
  claimed with an idempotency key ``fire:{id}:{time}``, so exactly one node starts the run.
* ``tether.webhook`` {session, url, secret | null}. When a run of the session needs a person
  (``awaiting_approval``, ``awaiting_tool``) or ends, the node driving it POSTs
  ``{"session", "run", "state", "time"}`` signed with HMAC-SHA256 of the body in
  ``X-Tether-Signature: sha256=<hex>``, retrying with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from cronsim import CronSim, CronSimError

from tether.agents.runner import RUN_INDEX, RunManager
from tether.agents.state import RunState
from tether.protocol.codes import ErrorCode, RequestError
from tether.protocol.events import Sender
from tether.store.base import StoreError

log = logging.getLogger("tether.schedule")

NOTIFY_STATES = frozenset({RunState.AWAITING_APPROVAL, RunState.AWAITING_TOOL,
                           RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED})


@dataclass
class Schedule:
    id: str
    session: str
    agent: str | None
    input: Any
    every: float | None = None
    cron: str | None = None

    def next_after(self, moment: float) -> float:
        """The first firing time strictly after ``moment`` (seconds since the epoch)."""
        if self.every is not None:
            return (moment // self.every + 1) * self.every
        assert self.cron is not None
        start = datetime.datetime.fromtimestamp(moment, datetime.UTC)
        return next(CronSim(self.cron, start)).timestamp()

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session, "agent": self.agent,
                "input": self.input, "every": self.every, "cron": self.cron}


def parse_schedule(session: str, body: Any) -> Schedule:
    """A schedule from an API body; :class:`RequestError` (``invalid``) when malformed."""
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID, "a schedule is a JSON object")
    every, cron = body.get("every"), body.get("cron")
    if (every is None) == (cron is None):
        raise RequestError(ErrorCode.INVALID, "give exactly one of 'every' (seconds) and 'cron'")
    if every is not None and (not isinstance(every, int | float) or isinstance(every, bool)
                              or not 0.1 <= every <= 366 * 86400):
        raise RequestError(ErrorCode.INVALID, "'every' must be seconds between 0.1 and a year")
    if cron is not None:
        if not isinstance(cron, str):
            raise RequestError(ErrorCode.INVALID, "'cron' must be a string")
        try:
            next(CronSim(cron, datetime.datetime.now(datetime.UTC)))
        except (CronSimError, StopIteration) as exc:
            raise RequestError(ErrorCode.INVALID, f"bad cron expression {cron!r}: {exc}") \
                from None
    agent = body.get("agent")
    if agent is not None and not isinstance(agent, str):
        raise RequestError(ErrorCode.INVALID, "'agent' must be a string")
    return Schedule("sch_" + secrets.token_hex(6), session, agent, body.get("input"),
                    float(every) if every is not None else None, cron)


class Scheduler:
    """Fires schedules (one node per firing) and delivers webhooks for this node's runs."""

    def __init__(self, runs: RunManager) -> None:
        self.runs = runs
        self.store = runs.store
        self.schedules: dict[str, Schedule] = {}
        self.webhooks: dict[str, tuple[str, str | None]] = {}
        self.system = Sender("tether", runs.node, "system")
        self._seen = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.retry_base = 0.5

    async def start(self) -> None:
        await self.sync()
        self.store.listen(RUN_INDEX, self._on_index)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self.store.unlisten(RUN_INDEX, self._on_index)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def _on_index(self, event: Any) -> None:
        if event.type in ("tether.schedule", "tether.webhook"):
            self._wake.set()

    async def sync(self) -> None:
        """Read schedules and webhooks added to the index since the last read."""
        while True:
            page = await self.store.read(RUN_INDEX, self._seen, 1000)
            for event in page:
                self._seen = event.seq
                data = event.data
                if event.type == "tether.schedule" and isinstance(data, dict):
                    if data.get("deleted"):
                        self.schedules.pop(data["id"], None)
                    else:
                        self.schedules[data["id"]] = Schedule(
                            data["id"], data["session"], data.get("agent"), data.get("input"),
                            data.get("every"), data.get("cron"))
                elif event.type == "tether.webhook" and isinstance(data, dict):
                    if data.get("url"):
                        self.webhooks[data["session"]] = (data["url"], data.get("secret"))
                    else:
                        self.webhooks.pop(data["session"], None)
            if len(page) < 1000:
                return

    # --- schedules --------------------------------------------------------------------------

    async def add(self, schedule: Schedule) -> None:
        if self.runs.agent_for(schedule.session, schedule.agent) is None:
            raise RequestError(ErrorCode.INVALID, f"no agent serves {schedule.session!r}")
        await self.store.append(RUN_INDEX, "tether.schedule", schedule.to_dict(), self.system)
        await self.sync()
        self._wake.set()

    async def remove(self, session: str, schedule_id: str) -> None:
        found = self.schedules.get(schedule_id)
        if found is None or found.session != session:
            raise RequestError(ErrorCode.NOT_FOUND, f"no schedule {schedule_id!r}")
        await self.store.append(RUN_INDEX, "tether.schedule",
                                {"id": schedule_id, "session": session, "deleted": True},
                                self.system)
        await self.sync()

    async def _loop(self) -> None:
        last = time.time()
        while True:
            now = time.time()
            due = [(s, s.next_after(last)) for s in list(self.schedules.values())]
            for schedule, at in due:
                if at <= now:
                    await self._fire(schedule, at)
            last = now
            upcoming = [s.next_after(now) for s in self.schedules.values()]
            delay = min(upcoming, default=now + 60) - time.time()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(delay, 60)))
            try:
                await self.sync()
            except StoreError as exc:
                log.warning("schedule sync failed: %s", exc)

    async def _fire(self, schedule: Schedule, at: float) -> None:
        try:
            claim = await self.store.append(RUN_INDEX, "tether.fire", {
                "schedule": schedule.id, "at": at, "node": self.runs.node},
                Sender("tether", "scheduler", "system"), key=f"fire:{schedule.id}:{at:.3f}")
            if claim.duplicate:
                return  # another node fired it
            agent = self.runs.agent_for(schedule.session, schedule.agent)
            if agent is None:
                log.warning("schedule %s: no agent serves %s", schedule.id, schedule.session)
                return
            await self.runs.create_run(schedule.session, agent, schedule.input, "schedule")
        except StoreError as exc:
            log.warning("schedule %s did not fire: %s", schedule.id, exc)

    # --- webhooks ---------------------------------------------------------------------------

    async def set_webhook(self, session: str, url: str | None, secret: str | None) -> None:
        await self.store.append(RUN_INDEX, "tether.webhook",
                                {"session": session, "url": url, "secret": secret},
                                self.system)
        await self.sync()

    def on_run_change(self, session: str, run: str, state: RunState) -> None:
        hook = self.webhooks.get(session)
        if hook is None or state not in NOTIFY_STATES:
            return
        body = orjson.dumps({"session": session, "run": run, "state": str(state),
                             "time": int(time.time() * 1000)})
        task = asyncio.get_running_loop().create_task(self._deliver(hook[0], hook[1], body))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, secret: str | None, body: bytes,
                       attempts: int = 6) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "tether-webhook"}
        if secret:
            digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Tether-Signature"] = f"sha256={digest}"
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for attempt in range(attempts):
            try:
                async with self._http.post(url, data=body, headers=headers) as resp:
                    if resp.status < 300:
                        return
                    log.info("webhook %s answered %d", url, resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("webhook %s failed: %s", url, exc)
            # Exponential backoff with full jitter, as clients reconnect.
            await asyncio.sleep(random.uniform(0, self.retry_base * 2 ** attempt))
        log.warning("webhook %s gave up after %d attempts", url, attempts)
