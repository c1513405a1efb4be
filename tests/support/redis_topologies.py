"""Redis topologies of a test's own, from the ``redis-server`` binary: Sentinel and Cluster.

* :func:`sentinel_setup`: one master, one replica and three Sentinels
  watching them as ``mymaster`` (quorum 2), tuned so that a failover
  completes in a few seconds; :meth:`SentinelSetup.kill_master` SIGKILLs the
  master and returns once the Sentinels name the promoted replica.
* :func:`redis_cluster`: a Redis Cluster of three masters and no replica,
  created with ``redis-cli --cluster create``.

Every server listens on a free port of 127.0.0.1 (never 6379), keeps its
files in a directory of the caller's, runs as a :class:`Process` (its own
process group, its output in ``NAME.log``) and is stopped when the context
ends, on failure too. Every wait is bounded in time. The binaries are the
system's (Debian's ``redis-server`` and ``redis-cli``, Redis 7), found on
``PATH`` or in ``/usr/bin``: Sentinel and ``--cluster create`` need a whole
Redis, not only the embedded server's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app.embedded_redis import free_port
from tests.support.processes import Process
from tests.support.waiting import wait_for

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
RESERVED_PORTS = frozenset({6379, 26379})  # a developer's or CI's own Redis and Sentinel


def binary(name: str) -> str:
    """``redis-server`` or ``redis-cli``; RuntimeError naming the package when it is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        raise RuntimeError(f"{name} not found: install Redis 7 (Debian: apt-get install redis-server)")
    return path


def available() -> bool:
    try:
        binary("redis-server")
        binary("redis-cli")
    except RuntimeError:
        return False
    return True


class _Ports:
    """Free ports of 127.0.0.1, none reserved, none handed out twice."""

    def __init__(self) -> None:
        self.given: set[int] = set()

    def __call__(self) -> int:
        for _ in range(50):
            port = free_port()
            if port not in RESERVED_PORTS and port not in self.given:
                self.given.add(port)
                return port
        raise RuntimeError("no free port found on 127.0.0.1")


def _client(port: int) -> redis.Redis:
    return redis.Redis(HOST, port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)


def _answers(port: int) -> bool:
    try:
        return bool(_client(port).ping())
    except redis.RedisError:
        return False


@dataclass
class Server:
    """One ``redis-server`` (a data node or a Sentinel) and where it keeps its files."""

    name: str
    port: int
    dir: Path
    proc: Process

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def hostport(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self) -> redis.Redis:
        return _client(self.port)

    def alive(self) -> bool:
        return self.proc.alive()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or Sentinels."""
        self.proc.kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.process.wait(10)

    def stop(self) -> None:
        self.proc.stop(timeout=10)

    def output(self) -> str:
        return self.proc.output()


def _start(root: Path, name: str, port: int, lines: list[str], *, sentinel: bool = False) -> Server:
    """Write ``NAME/redis.conf`` and start the server on it; returns once it answers PING (10 s)."""
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    conf = home / ("sentinel.conf" if sentinel else "redis.conf")
    common = [
        f"port {port}",
        f"bind {HOST}",
        f'dir "{home}"',
        'logfile ""',  # stdout: the Process's log file
        "daemonize no",
    ]
    conf.write_text("\n".join(common + lines) + "\n")  # a Sentinel rewrites it: a file of its own
    argv = [binary("redis-server"), str(conf)] + (["--sentinel"] if sentinel else [])
    proc = Process(name, argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, root)
    server = Server(name, port, home, proc)
    try:
        wait_for(lambda: _answers(port) or proc.exited(), 10, f"{name} on port {port} to answer")
        if proc.exited():
            raise RuntimeError(f"{name} exited with {proc.process.returncode}:\n{proc.output()[-3000:]}")
    except BaseException:
        server.stop()
        raise
    return server


DATA_NODE = [
    'save ""',
    "appendonly no",
    "protected-mode no",  # loopback only anyway (bind above)
    "repl-diskless-sync-delay 0",  # a replica syncs at once (the default waits 5 s for others)
]


# -- Sentinel ----------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    promoted: Server
    seconds: float  # from the kill until every Sentinel named the promoted node and it said role:master
    lost_bytes: int  # of the replication stream the promoted node never received


@dataclass
class SentinelSetup:
    master: Server
    replica: Server
    sentinels: list[Server]
    root: Path
    killed: list[Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Waybill's form: ``redis+sentinel://h:p,h:p,h:p/mymaster/0``."""
        hosts = ",".join(s.hostport for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def named_master(self, sentinel: Server) -> tuple[str, int] | None:
        """What one Sentinel answers to ``SENTINEL get-master-addr-by-name``; None if it cannot say."""
        try:
            answer = sentinel.client().execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        except redis.RedisError:
            return None
        if not answer:
            return None
        host, port = answer
        return str(host), int(port)

    def current_master(self) -> Server:
        """The data node every Sentinel names as the master (AssertionError when they disagree)."""
        named = {self.named_master(s) for s in self.sentinels}
        assert len(named) == 1, f"the Sentinels disagree: {named}"
        (address,) = named
        for node in (self.master, self.replica):
            if node.address == address:
                return node
        raise AssertionError(f"the Sentinels name {address}, which is none of ours")

    def _watching(self) -> bool:
        """Every Sentinel knows the two others and the replica, and the replica is in sync."""
        try:
            for s in self.sentinels:
                info = s.client().execute_command("SENTINEL", "master", MASTER_NAME)
                fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
                if int(fields["num-other-sentinels"]) != len(self.sentinels) - 1:
                    return False
                if int(fields["num-slaves"]) < 1:
                    return False
            replication = self.replica.client().info("replication")
            return replication.get("master_link_status") == "up"
        except (redis.RedisError, KeyError, ValueError):
            return False

    def detach_replica(self, timeout: float = 5) -> None:
        """Cut the replica off its master's writes; it keeps (and serves) what it has.

        What asynchronous replication loses in a failover, made certain: the
        replica's link is dropped and every reconnection fails its AUTH (a
        password the master does not have), so whatever the master
        acknowledges from now on never reaches the replica.
        """
        client = self.replica.client()
        client.config_set("masterauth", "not-the-masters-password")
        client.execute_command("CLIENT", "KILL", "TYPE", "master")
        wait_for(
            lambda: client.info("replication").get("master_link_status") == "down",
            timeout,
            "the replica to lose its link",
            interval=0.05,
        )

    def kill_master(self, timeout: float = 30, lose_writes_seconds: float = 0.0) -> Failover:
        """SIGKILL the master; returns once every Sentinel names the promoted replica, which says role:master.

        ``lose_writes_seconds``: first detach the replica (:meth:`detach_replica`)
        for that long, so the writes the master acknowledges meanwhile are lost.
        """
        old = self.current_master()
        new = self.replica if old is self.master else self.master
        lost = 0
        if lose_writes_seconds > 0:
            self.detach_replica()
            time.sleep(lose_writes_seconds)
            old_offset = int(old.client().info("replication")["master_repl_offset"])
            lost = old_offset - int(new.client().info("replication").get("slave_repl_offset", old_offset))
        started = time.monotonic()
        old.kill()
        self.killed.append(old)

        def promoted() -> bool:
            if any(self.named_master(s) != new.address for s in self.sentinels):
                return False
            try:
                return new.client().info("replication").get("role") == "master"
            except redis.RedisError:
                return False

        try:
            wait_for(promoted, timeout, f"the Sentinels to promote {new.name}", interval=0.1)
        except TimeoutError as exc:
            logs = "\n".join(f"--- {s.name}\n{s.output()[-2000:]}" for s in self.sentinels)
            raise TimeoutError(f"{exc}\n{logs}") from None
        new.client().config_set("masterauth", "")
        return Failover(new, time.monotonic() - started, lost)

    def servers(self) -> list[Server]:
        return [self.master, self.replica, *self.sentinels]


@contextlib.contextmanager
def sentinel_setup(
    root: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, ready_timeout: float = 30
) -> Iterator[SentinelSetup]:
    """A master, its replica and three Sentinels (quorum 2) under ``root``; all stopped at the end.

    ``down-after-milliseconds`` 1000: a master silent for a second is down
    for a Sentinel; with ``failover-timeout`` 3000 an election that found no
    leader is tried again within 6 s. Returns once every Sentinel knows the
    replica and the other Sentinels (a failover is possible from then on).
    """
    ports = _Ports()
    started: list[Server] = []
    try:
        master = _start(root, "redis-master", ports(), DATA_NODE)
        started.append(master)
        replica = _start(root, "redis-replica", ports(), [*DATA_NODE, f"replicaof {HOST} {master.port}"])
        started.append(replica)
        wait_for(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            15,
            "the replica to sync with the master",
            interval=0.1,
        )
        sentinels = []
        for i in range(3):
            lines = [
                f"sentinel monitor {MASTER_NAME} {HOST} {master.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]
            sentinel = _start(root, f"sentinel-{i + 1}", ports(), lines, sentinel=True)
            started.append(sentinel)
            sentinels.append(sentinel)
        setup = SentinelSetup(master, replica, sentinels, root)
        # Sentinels find each other through hello messages (every 2 s).
        wait_for(setup._watching, ready_timeout, "the Sentinels to see each other and the replica", 0.2)
        yield setup
    finally:
        for server in reversed(started):
            server.stop()


# -- Cluster -----------------------------------------------------------------------


@dataclass
class ClusterSetup:
    nodes: list[Server]
    root: Path

    @property
    def url(self) -> str:
        """Waybill's form: ``redis+cluster://h:p,h:p,h:p``."""
        return "redis+cluster://" + ",".join(n.hostport for n in self.nodes)

    def masters(self) -> list[str]:
        """``host:port`` of every master ``CLUSTER NODES`` lists (asked of the first node)."""
        listing = self.nodes[0].client().execute_command("CLUSTER", "NODES")
        if isinstance(listing, dict):  # redis-py parses it into {address: fields}
            return sorted(a for a, f in listing.items() if "master" in f["flags"])
        found = []
        for line in str(listing).splitlines():
            parts = line.split()
            if len(parts) > 2 and "master" in parts[2].split(","):
                found.append(parts[1].split("@")[0])
        return sorted(found)

    def flushall(self) -> None:
        """Empty every master (what ``FLUSHDB`` of one server is to a test on plain Redis)."""
        for node in self.nodes:
            if node.client().info("replication").get("role") == "master":
                node.client().flushall()

    def ok(self) -> bool:
        """cluster_state:ok on every node, each knowing every other, every slot assigned."""
        try:
            for node in self.nodes:
                info = node.client().cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(
                    self.nodes
                ):
                    return False
                if int(info.get("cluster_slots_assigned", 0)) != 16384:
                    return False
        except (redis.RedisError, ValueError):
            return False
        return True


@contextlib.contextmanager
def redis_cluster(root: Path, masters: int = 3, ready_timeout: float = 30) -> Iterator[ClusterSetup]:
    """A Redis Cluster of ``masters`` masters (no replica) under ``root``; all stopped at the end.

    Each node's cluster bus port is a free port of its own (``cluster-port``),
    not the default port + 10000, which may be above 65535 or taken.
    """
    ports = _Ports()
    started: list[Server] = []
    try:
        for i in range(masters):
            lines = [
                *DATA_NODE,
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-port {ports()}",
                "cluster-node-timeout 5000",
            ]
            started.append(_start(root, f"cluster-{i + 1}", ports(), lines))
        create = subprocess.run(
            [
                binary("redis-cli"),
                "--cluster",
                "create",
                *(n.hostport for n in started),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        (root / "cluster-create.log").write_text(create.stdout + create.stderr)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        setup = ClusterSetup(started, root)
        wait_for(setup.ok, ready_timeout, "cluster_state:ok on every node", interval=0.1)
        yield setup
    finally:
        for server in reversed(started):
            server.stop()
