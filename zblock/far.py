"""The far tier's client: compressed pages in a Redis Cluster's memory (redis-py's RedisCluster).

Keys and values:
    key    zb{INSTANCE:EXTENT}VERSION (hex). The hash tag {INSTANCE:EXTENT} puts one extent's
           pages (1 << EXTENT_SHIFT of them) in one slot, so they live on one node and pipeline
           together. VERSION is new at every put, so a delete queued for an old copy can never
           remove a newer one; a mount first deletes every key of its instance (purge), so
           versions restart at 0. Short keys: Redis keeps each key beside its value.
    value  a header (format, algorithm, length, CRC32C of the payload, page, instance), then
           the payload: the compressed object as the pool holds it, or the raw page. get()
           checks the header: a mismatch is FarCorrupt, never wrong bytes.

Writes go out per node as one pipeline of SETs ending in WAIT: a page counts as stored only
when its master and `replicas` replicas acknowledged it. Reads retry with bounded backoff until
a deadline (`timeout`); after a failed write the tier is `down` for a backoff period and
callers send pages to disk instead.

Not here: which pages go far, or the entry table (zblock.farpages).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import crc32c

from . import PAGE_SIZE
from .errors import ConfigError, ZblockError
from .seal import VALUE_OVERHEAD

log = logging.getLogger(__name__)

FORMAT = 1
# format, algorithm id, payload length, crc32c(payload), page, instance
HEADER = struct.Struct("<BBHIQ8s")
ALGORITHMS = ("raw", "lz4", "lzo", "zstd", "deflate")       # id = index; raw: a whole page
EXTENT_SHIFT = 8            # 256 pages (1 MiB) share a hash tag
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
DOWN_MIN = 0.5              # after a failed write, send pages to disk for this long (doubling)
DOWN_MAX = 5.0
LATENCY_SAMPLES = 4096


def _client_errors() -> tuple:
    """What redis-py raises when a node or the cluster fails (imported on first use: the far
    tier's client is loaded only by mounts that use it)."""
    from redis.exceptions import RedisClusterException, RedisError
    return (RedisError, RedisClusterException, OSError)


class FarError(ZblockError):
    """The far tier could not serve a request (unreachable past the deadline, refused)."""


class FarCorrupt(FarError):
    """A far value whose header or checksum does not match the page asked for."""


@dataclass
class Endpoint:
    nodes: list[tuple[str, int]]
    tls: bool


def parse_url(text: str) -> Endpoint:
    """redis://HOST:PORT[,HOST:PORT...] (or `+` between nodes) or rediss:// (TLS).
    ConfigError naming the problem."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"--far {text!r}: want redis://HOST:PORT[,HOST:PORT...] or rediss://")
    if parts.username or parts.password:
        raise ConfigError("--far: credentials do not go in the URL (the command line is visible "
                          "to every user); use --far-auth-file")
    nodes = []
    # `+` as well as `,`: mount -o splits its options at commas
    for item in re.split(r"[,+]", parts.netloc):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--far {text!r}: {item!r} is not HOST:PORT")
        nodes.append((host.strip("[]"), int(port)))
    return Endpoint(nodes, parts.scheme == "rediss")


def read_auth_file(path: str) -> tuple[str, str]:
    """The ACL user and password: one line `USER PASSWORD` (or just `PASSWORD` for the default
    user). Refused if others may read it."""
    try:
        st = os.stat(path)
        with open(path) as f:
            words = f.read().split()
    except OSError as e:
        raise ConfigError(f"--far-auth-file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--far-auth-file {path}: readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if len(words) == 1:
        return "default", words[0]
    if len(words) == 2:
        return words[0], words[1]
    raise ConfigError(f"--far-auth-file {path}: want one line `USER PASSWORD`")


def instance_id(backing_path: str) -> str:
    """16 hex digits naming one backing file on one machine: stable across mounts, so a mount
    can delete what an earlier mount of the same file left in the cluster."""
    st = os.stat(backing_path)
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = os.uname().nodename
    import hashlib      # here: its OpenSSL half costs a mount without a far tier ~3 MiB
    return hashlib.blake2b(f"{machine}:{st.st_dev}:{st.st_ino}".encode(), digest_size=8).hexdigest()


class FarTier:
    """One instance's connection to the cluster. Thread-safe."""

    def __init__(self, url: str, instance: str, *, replicas: int = 1, timeout: float = 5.0,
                 auth_file: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, sealer=None):
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        ep = parse_url(url)
        self.instance = instance
        self.tag = bytes.fromhex(instance)
        self.replicas = replicas
        self.timeout = timeout
        kw = {}
        if auth_file:
            kw["username"], kw["password"] = read_auth_file(auth_file)
        if ep.tls:
            kw.update(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=tls_ca or None,
                      ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None)
        # zblock retries itself, within its own deadline: the client's retries would stack
        # their backoffs on top of it
        self._rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in ep.nodes],
                                socket_timeout=timeout, socket_connect_timeout=min(timeout, 2.0),
                                retry=Retry(NoBackoff(), 0), require_full_coverage=False,
                                **kw)
        self._lock = threading.Lock()
        self._version = 0
        self.down_until = 0.0
        self._down_for = DOWN_MIN
        self._deletes: collections.deque = collections.deque()
        self._latency: collections.deque = collections.deque(maxlen=LATENCY_SAMPLES)
        self.errors = 0             # far_errors: reads that failed, pages that could not be had
        self.checksum_errors = 0
        self.sealer = sealer        # --encrypt: values are sealed (zblock.seal)
        self.value_overhead = HEADER.size + (VALUE_OVERHEAD if sealer is not None else 0)

    @classmethod
    def connect(cls, url: str, instance: str, **kw) -> "FarTier":
        """Connect and check that the cluster is fit to hold pages; ConfigError saying why not."""
        try:
            far = cls(url, instance, **kw)
            far.check()
        except _client_errors() as e:
            raise FarError(f"--far {url}: cannot use the cluster: {e}") from None
        return far

    def check(self) -> None:
        """Refuse a cluster that may evict keys (an evicted page is lost data) or that has
        fewer replicas than `replicas` (no write would ever be acknowledged)."""
        for node in self._rc.get_primaries():
            client = self._rc.get_redis_connection(node)
            info = client.info("memory")
            policy = info.get("maxmemory_policy", "noeviction")
            if policy != "noeviction":
                raise ConfigError(
                    f"far tier: node {node.name} has maxmemory-policy {policy}: it may evict "
                    f"keys, and an evicted page is lost data. Set maxmemory-policy noeviction")
            connected = client.info("replication").get("connected_slaves", 0)
            if connected < self.replicas:
                raise ConfigError(
                    f"far tier: master {node.name} has {connected} replica(s), --far-replicas "
                    f"is {self.replicas}: no page could be acknowledged")

    # ---- keys and values --------------------------------------------------------------------

    def next_version(self, count: int) -> int:
        """`count` fresh versions, the first returned."""
        with self._lock:
            first = self._version
            self._version += count
        return first

    def key(self, page: int, version: int) -> str:
        return f"zb{{{self.instance}:{page >> EXTENT_SHIFT:x}}}{version:x}"

    def encode(self, page: int, version: int, algorithm: str, payload) -> bytes:
        if self.sealer is not None:
            payload = self.sealer.seal_value(page, version, payload)
        return HEADER.pack(FORMAT, ALGORITHMS.index(algorithm), len(payload),
                           crc32c.crc32c(payload), page, self.tag) + bytes(payload)

    def decode(self, page: int, version: int, value: bytes) -> tuple[str, bytes]:
        """(algorithm, payload) of a value read for `page` at `version`; FarCorrupt if it is
        not that."""
        if len(value) < HEADER.size:
            raise FarCorrupt(f"page {page}: far value too short ({len(value)} bytes)")
        fmt, alg, length, crc, vpage, tag = HEADER.unpack_from(value)
        payload = value[HEADER.size:]
        if fmt != FORMAT or vpage != page or tag != self.tag or alg >= len(ALGORITHMS) or \
                length != len(payload) or length > PAGE_SIZE + VALUE_OVERHEAD or \
                crc32c.crc32c(payload) != crc:
            raise FarCorrupt(f"page {page}: far value fails its header check")
        if self.sealer is not None:
            payload = self.sealer.open_value(page, version, payload)
            if payload is None:
                raise FarCorrupt(f"page {page}: far value fails its authentication tag")
        return ALGORITHMS[alg], payload

    # ---- per-node pipelines -----------------------------------------------------------------

    def _per_node(self, keys: list[str], add, tail=None) -> list:
        """Send one pipeline per node holding `keys`: add(pipe, i) queues key i's command,
        tail(pipe) (if given) ends each pipeline. Returns one result per key (an exception
        where its node failed), and per node the tail's result (dict node name -> result)."""
        errors = _client_errors()
        groups: dict[str, tuple] = {}
        results: list = [None] * len(keys)
        for i, k in enumerate(keys):
            try:
                node = self._rc.get_node_from_key(k)
            except errors as e:
                results[i] = e
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        for node, idx in groups.values():
            try:
                client = self._rc.get_redis_connection(node)
                if len(idx) == 1 and tail is None:
                    # one command goes as it is: a pipeline's bookkeeping cost a one-page read
                    # 40% of its time (413 against 250 us); an error is its result, as below
                    out = [add(client, idx[0])]
                else:
                    pipe = client.pipeline(transaction=False)
                    for i in idx:
                        add(pipe, i)
                    if tail is not None:
                        tail(pipe)
                    out = pipe.execute(raise_on_error=False)
            except errors as e:
                out = [e] * (len(idx) + (tail is not None))
            if tail is not None:
                ack = out[-1]
                out = [r if isinstance(r, Exception) else ack for r in out[:-1]]
            for i, r in zip(idx, out):
                results[i] = r
        return results

    def _refresh(self) -> None:
        """Ask the cluster for its slot map again (after a failover or a MOVED)."""
        try:
            with self._lock:
                self._rc.nodes_manager.initialize()
        except _client_errors() as e:
            log.debug("far tier: slot map refresh failed: %s", e)

    # ---- put, get, delete ---------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return time.monotonic() < self.down_until

    def put(self, keys: list[str], values: list[bytes]) -> list[bool]:
        """Store values; True where the master and `replicas` replicas acknowledged. Keys not
        acknowledged may still be in the cluster: they are queued for deletion."""
        wait_ms = max(int(self.timeout * 500), 1)
        res = self._per_node(keys, lambda p, i: p.set(keys[i], values[i]),
                             lambda p: p.execute_command("WAIT", self.replicas, wait_ms))
        ok = [type(r) is int and r >= self.replicas for r in res]
        failed = [k for k, good in zip(keys, ok) if not good]
        if failed:
            self.forget(failed)
            errs = {type(r).__name__ for r in res if isinstance(r, Exception)}
            log.info("far tier: %d of %d page(s) not acknowledged (%s)", len(failed), len(keys),
                     ", ".join(sorted(errs)) or "replicas behind")
            self._went_down()
            self._refresh()
        else:
            self._down_for = DOWN_MIN
        return ok

    def _went_down(self) -> None:
        with self._lock:
            self.down_until = time.monotonic() + self._down_for
            self._down_for = min(self._down_for * 2, DOWN_MAX)

    def get(self, keys: list[str]) -> list:
        """Values of `keys` (None where the key does not exist), retrying failed nodes with
        backoff until the deadline. A key still unanswered then is a FarError in its slot."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        out: list = [None] * len(keys)
        todo = list(range(len(keys)))
        backoff = BACKOFF_MIN
        while True:
            res = self._per_node([keys[i] for i in todo], lambda p, j: p.get(keys[todo[j]]))
            again = []
            for i, r in zip(todo, res):
                out[i] = r
                if isinstance(r, Exception):
                    again.append(i)
            if not again:
                break
            if time.monotonic() + backoff > deadline:
                for i in again:
                    out[i] = FarError(f"far tier: no answer for {keys[i]} within "
                                      f"{self.timeout:g} s ({out[i]})")
                break
            time.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            self._refresh()
            todo = again
        self._latency.append((time.monotonic() - t0) * 1e6 / max(len(keys), 1))
        return out

    def forget(self, keys) -> None:
        """Queue keys for deletion (done by flush_deletes, outside every lock)."""
        self._deletes.extend(keys)

    def flush_deletes(self, limit: int = 65536) -> int:
        """Delete queued keys (at most `limit`); those whose node failed stay queued."""
        keys = []
        while self._deletes and len(keys) < limit:
            keys.append(self._deletes.popleft())
        if not keys:
            return 0
        res = self._per_node(keys, lambda p, i: p.unlink(keys[i]))
        failed = [k for k, r in zip(keys, res) if isinstance(r, Exception)]
        self._deletes.extend(failed)
        return len(keys) - len(failed)

    @property
    def pending_deletes(self) -> int:
        return len(self._deletes)

    def purge(self) -> int:
        """Delete every key of this instance (at unmount, and at mount, before the first put:
        what an earlier mount of the same file left)."""
        pattern = f"zb{{{self.instance}:*"
        n = 0
        for node in self._rc.get_primaries():
            client = self._rc.get_redis_connection(node)
            try:
                batch = []
                for key in client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        n += self._unlink_on(client, batch)
                        batch = []
                n += self._unlink_on(client, batch)
            except _client_errors() as e:
                raise FarError(f"far tier: cannot delete this instance's keys on {node.name}: {e}") \
                    from None
        return n

    @staticmethod
    def _unlink_on(client, keys) -> int:
        if not keys:
            return 0
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.unlink(k)          # one key a command: keys of several slots may share a node
        return sum(pipe.execute())

    # ---- stats and close ----------------------------------------------------------------------

    def latency_us(self) -> dict:
        """Percentiles of the per-page latency of recent reads."""
        samples = sorted(self._latency)
        if not samples:
            return {}
        pick = lambda q: round(samples[min(int(q * len(samples)), len(samples) - 1)], 1)
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}

    def nodes(self) -> list[str]:
        return sorted(n.name for n in self._rc.get_primaries())

    def close(self) -> None:
        self._rc.close()
