"""The scale-out store: several server nodes share one Redis (7.0 or later), or one Redis
Cluster (``redis+cluster://``; see ``cluster.py``).

Each session is a Redis Stream whose entry ids are ``{seq}-0``, so "events after seq n" is one
``XRANGE``. One Lua script per batch checks idempotency keys, assigns seqs, appends, and
``PUBLISH``es (on a cluster ``SPUBLISH``es) the committed events, so ordering holds across
nodes and a cursor means the same on every node. Listeners hear committed events only through
pub/sub, which is at-most-once (``RedisStore.live_is_lossy``): the server heals gaps from the
log.

One class, :class:`RedisStore`, in cohesive modules:

``store.py``     the class: lifecycle, reads, heads and retention; it composes the parts below
``commit.py``    appends: queued per session, packed into batched script calls by flusher tasks
``pubsub.py``    the live channel: subscriptions, the reader and writer tasks, delivery
``presence.py``  presence (a sorted set and a hash per session)
``scripts.py``   the Lua sources and the ``Script`` wrapper (source + SHA1)
``keys.py``      key names and hash tags, cached per session with their RESP encoding
``client.py``    the redis-py client and the raw connections of the hot paths
``cluster.py``   on a Redis Cluster: the cluster client and slot map, appends per slot
``shards.py``    on a Redis Cluster: the live channel on shard channels, a connection per master
``codec.py``     decoding stored events' senders and seqs

Failures surface as :class:`~tether.store.base.StoreError`; see ``commit.py`` for what an
error means for an append whose reply was lost.
"""

from tether.store.redis.commit import FLUSH_CONNECTIONS, MAX_SCRIPT_EVENTS
from tether.store.redis.pubsub import (
    PING_INTERVAL,
    RECONNECT_MAX,
    RECONNECT_MIN,
    SUBSCRIBE_WAIT,
)
from tether.store.redis.store import TRIM_PIPELINE, RedisStore

__all__ = [
    "FLUSH_CONNECTIONS",
    "MAX_SCRIPT_EVENTS",
    "PING_INTERVAL",
    "RECONNECT_MAX",
    "RECONNECT_MIN",
    "SUBSCRIBE_WAIT",
    "TRIM_PIPELINE",
    "RedisStore",
]
