"""Two devices with the Python SDK: one starts a run, the other sees the same events and
approves its tool; both transcripts are byte-identical at the end."""

from __future__ import annotations

from typing import Any

import orjson

import tether
from tests.helpers import token
from tether.server import Server

CAPS = ["subscribe", "publish", "presence", "approve"]


def line(event: Any) -> bytes:
    return orjson.dumps({"seq": event.seq, "cursor": event.cursor, "type": event.type,
                         "data": event.data, "sender": event.sender, "time": event.time},
                        option=orjson.OPT_SORT_KEYS)


async def test_two_devices_one_run_one_approval(agent_server: Server) -> None:
    url = f"ws://127.0.0.1:{agent_server.port}"
    async with tether.Client(url, token=token("alice", caps=CAPS), device="laptop") as laptop, \
            tether.Client(url, token=token("bob", caps=CAPS), device="phone") as phone:
        on_laptop = await laptop.attach("s")
        on_phone = await phone.attach("s")
        await on_laptop.publish("message", {"text": "deploy it"})
        transcripts: dict[str, list[bytes]] = {"laptop": [], "phone": []}
        approved = False
        done = set()
        while len(done) < 2:
            for name, session in (("laptop", on_laptop), ("phone", on_phone)):
                if name in done:
                    continue
                event = await session.next()
                if event.transient:
                    continue
                transcripts[name].append(line(event))
                if name == "phone" and event.type == "approval.request" and not approved:
                    await on_phone.approve(event.data["run"], event.data["call"],
                                           {"target": "from-phone"})
                    approved = True
                if event.type == "run.state" and event.data["state"] == "completed":
                    done.add(name)
        assert approved
        assert transcripts["laptop"] == transcripts["phone"]
        decided = next(orjson.loads(b) for b in transcripts["laptop"]
                   if b'"approval.decision"' in b)
        assert decided["data"]["by"]["sub"] == "bob"
        result = next(orjson.loads(b) for b in transcripts["laptop"] if b'"tool.result"' in b)
        assert result["data"]["result"] == {"deployed": "from-phone"}
