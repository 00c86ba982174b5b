"""Presence in Redis: who is attached to a session, shared by every node.

Per session a sorted set maps each member to its expiry (ms, the Redis server's clock) and a
hash maps it to its info JSON (``keys.py``). Setting is one script that also moves both keys'
own expiry to the latest member's, so an abandoned session's presence vanishes on its own;
reading is one script that drops expired members and returns the rest. Presence never touches
the log or the live channel; telling listeners about a change is the caller's business.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from redis.exceptions import RedisError

from tether.store.base import StoreError
from tether.store.redis.client import RedisClient
from tether.store.redis.keys import KeySpace
from tether.store.redis.scripts import PRESENCE_GET, PRESENCE_SET


class RedisPresence:
    """A :class:`~tether.store.base.PresenceStore` on a sorted set and a hash per session."""

    def __init__(self, client: RedisClient, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys

    async def set_presence(self, session: str, member: str, info: dict[str, Any],
                           ttl: float) -> None:
        keys = self._keys.of(session)
        await self._client.eval(PRESENCE_SET, (keys.presence, keys.members),
                                (member, orjson.dumps(info), max(1, math.ceil(ttl * 1000))))

    async def clear_presence(self, session: str, member: str) -> None:
        keys = self._keys.of(session)
        try:
            # MULTI in a cluster needs redis-py 6; presence() skips a member whose info is
            # gone, so the two commands need not be atomic there.
            pipe = self._client.redis().pipeline(transaction=not self._client.cluster)
            pipe.zrem(keys.presence, member)
            pipe.hdel(keys.members, member)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def presence(self, session: str) -> list[dict[str, Any]]:
        keys = self._keys.of(session)
        infos = await self._client.eval(PRESENCE_GET, (keys.presence, keys.members), ())
        return [orjson.loads(info) for info in infos]
