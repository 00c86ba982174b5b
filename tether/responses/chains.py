"""Response chains: in memory for speed, in the session store for durability.

Every stored response is one event (type ``response``) in the session
``tether.responses.<sha256(subject)[:24]>.<chain>``, where ``<chain>`` is the 16 hex digits that
the first response of a chain drew and every continuation inherits (they sit in the response id,
``resp_<chain><own>``). So:

* a continuation after a reconnect, a restart or on another node reads one small session — the
  chain's — and rebuilds the history by walking ``previous_response_id``;
* a subject can only ever look in its own sessions: another subject's id names a session that
  does not exist under this subject, so the answer is ``previous_response_not_found`` and no data;
* sessions starting with ``tether.`` are internal: only admin tokens can attach to them.

A record is ``{"v": 1, "id", "prev", "sub", "input": [items], "response": {Response}}``; the
history of a response is its ancestors' ``input`` + ``response.output``, then its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tether.agents.models import Message
from tether.protocol.events import Sender
from tether.responses.items import Item, chain_of, to_messages
from tether.store.base import SessionStore

log = logging.getLogger("tether.responses")

EVENT_TYPE = "response"
SESSION_PREFIX = "tether.responses."
READ_PAGE = 500


def session_for(sub: str, chain: str) -> str:
    return f"{SESSION_PREFIX}{hashlib.sha256(sub.encode()).hexdigest()[:24]}.{chain}"


@dataclass(eq=False, slots=True)
class Node:
    """One finished response and its place in a chain."""

    id: str
    sub: str
    parent: Node | None
    input: list[Item]
    response: dict[str, Any]
    stored: bool
    _messages: tuple[Message, ...] | None = field(default=None, repr=False)

    @property
    def items(self) -> list[Item]:
        return [*self.input, *self.response.get("output", ())]

    def messages(self) -> tuple[Message, ...]:
        """The whole conversation up to and including this response, as model messages.

        Computed once per node from the nearest ancestor that has it; the ancestor then lets
        go of its copy (a fork from it walks up a little further), so a long chain keeps one
        materialised history instead of one per response.
        """
        if self._messages is not None:
            return self._messages
        path: list[Node] = []
        node: Node | None = self
        while node is not None and node._messages is None:
            path.append(node)
            node = node.parent
        base: tuple[Message, ...] = ()
        if node is not None and node._messages is not None:
            base = node._messages
            if path:
                node._messages = None
        for step in reversed(path):
            base = (*base, *to_messages(step.items))
        self._messages = base
        return base

    def record(self) -> dict[str, Any]:
        return {"v": 1, "id": self.id, "prev": self.parent.id if self.parent else None,
                "sub": self.sub, "input": self.input, "response": self.response}


class Chains:
    """Finished responses of this node (bounded, LRU) in front of the session store."""

    def __init__(self, store: SessionStore, cache_size: int = 512) -> None:
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Node] = OrderedDict()

    def remember(self, node: Node) -> None:
        """Keep a stored response for continuations from other connections of this node."""
        if not node.stored or self.cache_size <= 0:
            return
        self._cache[node.id] = node
        self._cache.move_to_end(node.id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cached(self, sub: str, response_id: str) -> Node | None:
        node = self._cache.get(response_id)
        if node is None or node.sub != sub:
            return None
        self._cache.move_to_end(response_id)
        return node

    async def persist(self, node: Node) -> None:
        """Commit the response to its chain's session (idempotent on the response id)."""
        chain = chain_of(node.id)
        assert chain is not None
        await self.store.append(session_for(node.sub, chain), EVENT_TYPE, node.record(),
                                Sender(node.sub, "responses", "agent"), key=node.id)

    async def find(self, sub: str, response_id: str) -> Node | None:
        """The response from memory, else rebuilt from the store; None if not this subject's."""
        node = self.cached(sub, response_id)
        if node is not None:
            return node
        return await self.load(sub, response_id)

    async def load(self, sub: str, response_id: str) -> Node | None:
        chain = chain_of(response_id)
        if chain is None:
            return None
        session = session_for(sub, chain)
        records: dict[str, dict[str, Any]] = {}
        after = 0
        while True:
            events = await self.store.read(session, after, READ_PAGE)
            for event in events:
                data = event.data
                if (event.type == EVENT_TYPE and isinstance(data, dict)
                        and data.get("sub") == sub and isinstance(data.get("id"), str)):
                    records[data["id"]] = data
            if len(events) < READ_PAGE:
                break
            after = events[-1].seq
        # Walk up to the root (or to an ancestor already in memory), then build downwards.
        path: list[dict[str, Any]] = []
        anchor: Node | None = None
        current: str | None = response_id
        while current is not None:
            known = self.cached(sub, current)
            if known is not None:
                anchor = known
                break
            data = records.get(current)
            if data is None:
                log.info("response chain broken", extra={"response": response_id,
                                                         "missing": current})
                return None
            path.append(data)
            current = data.get("prev")
            if len(path) > len(records):  # a cycle cannot happen, but never loop forever
                return None
        node = anchor
        for data in reversed(path):
            node = Node(data["id"], sub, node, list(data.get("input") or []),
                        dict(data.get("response") or {}), stored=True)
            self.remember(node)
        return node
