"""Redis clients from METER_REDIS_URL: single server (redis, rediss, unix) or Redis Cluster."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def _cluster(url: str, *, pool_size: int, timeout_s: float) -> RedisCluster:
    scheme, rest = url.split("://", 1)
    username = password = None
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    hosts = rest.split("/", 1)[0].split("?", 1)[0]
    nodes = []
    for hostport in hosts.split(","):
        parsed = urlsplit(f"//{hostport}")
        nodes.append(ClusterNode(parsed.hostname or "127.0.0.1", parsed.port or 6379))
    return RedisCluster(
        startup_nodes=nodes,
        username=username,
        password=password,
        ssl=scheme.startswith("rediss"),
        decode_responses=True,
        max_connections=pool_size,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )


def make_client(url: str, *, pool_size: int = 64, timeout_s: float = 5.0) -> Any:
    """A redis.asyncio client with a blocking, bounded connection pool (hiredis parser)."""
    if is_cluster_url(url):
        return _cluster(url, pool_size=pool_size, timeout_s=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


async def warm_up(client: Any, connections: int) -> None:
    """Opens `connections` pooled connections now rather than on the first requests.

    One call first: a cluster client discovers its nodes on its first command, and concurrent
    first commands would each build (and leak) a set of node connections.
    """
    await client.ping()
    await asyncio.gather(*(client.ping() for _ in range(connections - 1)))
