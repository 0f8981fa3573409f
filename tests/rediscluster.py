"""A local Redis Cluster for the far tier's tests and for README's try-it commands: six
`redis-server` processes on loopback ports (3 masters, 3 replicas), in one directory, made into a
cluster with `redis-cli --cluster create`. Every process is ended by its pid.

    python3 -m tests.rediscluster start DIR [--port 7000]   prints the --far URL
    python3 -m tests.rediscluster stop DIR

Nodes fail over fast (cluster-node-timeout 1000 ms) so tests can kill a master and see its
replica take over within seconds. Persistence is off: the far tier is a cache. With `tls`
(make_certificates() makes them) every connection, the cluster bus and replication included,
is TLS, and clients must show a certificate of the same CA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
NODES = 6
START_TIMEOUT = 30.0


def free_port_base(count: int = NODES) -> int:
    """A first port with `count` free loopback ports after it (and their cluster bus ports,
    port + 10000), all below the kernel's ephemeral port range: a port from that range can be
    taken between this check and the server's bind by any outgoing connection, our own clients'
    to the nodes started before it included."""
    top = _ephemeral_low() - 10000 - count      # the bus ports stay below the range too
    rng = random.Random()
    for _ in range(200):
        if top > 10000:
            base = rng.randrange(10000, top)
        else:                       # no room below the range: any free port, as a last resort
            with socket.socket() as s:
                s.bind((HOST, 0))
                base = s.getsockname()[1]
            if base + count + 10000 > 65535:
                continue
        if all(_port_free(p) and _port_free(p + 10000) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free block of loopback ports for a Redis Cluster")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768                # the kernel's default


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


class RedisCluster:
    """Six nodes under `directory`; start() then stop() (also on every failure path)."""

    def __init__(self, directory, base_port: int | None = None, *, maxmemory: str | None = None,
                 policy: str = "noeviction", replicas: int = 1, tls: dict | None = None):
        self.dir = Path(directory)
        self.base = base_port or free_port_base()
        self.ports = list(range(self.base, self.base + NODES))
        self.maxmemory = maxmemory
        self.policy = policy
        self.replicas = replicas
        self.tls = tls                  # make_certificates()'s paths, or None
        self.pids: dict[int, int] = {}

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def start(self) -> "RedisCluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for port in self.ports:
                # a new cluster: no node may remember an old one (`--cluster create` refuses)
                (self.dir / str(port) / "nodes.conf").unlink(missing_ok=True)
                self.start_node(port)
            subprocess.run(["redis-cli", *self._cli_tls(), "--cluster", "create",
                            *(f"{HOST}:{p}" for p in self.ports),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        self._save()
        return self

    def start_node(self, port: int) -> None:
        """Start (or restart, after kill_node) the node on `port`, with its old cluster config."""
        ndir = self.dir / str(port)
        ndir.mkdir(exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", HOST, "--protected-mode", "yes",
                "--dir", str(ndir), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                "--appendonly", "no", "--save", "", "--daemonize", "no",
                "--logfile", str(ndir / "redis.log"), "--maxmemory-policy", self.policy]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(port)]     # TLS only
            args += ["--tls-cert-file", self.tls["server_cert"], "--tls-key-file",
                     self.tls["server_key"], "--tls-ca-cert-file", self.tls["ca"],
                     "--tls-cluster", "yes", "--tls-replication", "yes",
                     "--tls-auth-clients", "yes"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.pids[port] = proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while not self.cli(port, "PING", check=False) == "PONG":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start "
                                   f"(see {ndir / 'redis.log'})")
            time.sleep(0.05)

    def cli(self, port: int, *args: str, check: bool = True) -> str:
        r = subprocess.run(["redis-cli", *self._cli_tls(), "-h", HOST, "-p", str(port), *args],
                           capture_output=True, text=True, timeout=10)
        if check and r.returncode:
            raise RuntimeError(f"redis-cli {' '.join(args)} on {port}: {r.stderr.strip()}")
        return r.stdout.strip()

    def _cli_tls(self) -> list[str]:
        if not self.tls:
            return []
        return ["--tls", "--cacert", self.tls["ca"], "--cert", self.tls["client_cert"],
                "--key", self.tls["client_key"]]

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Until every live node says cluster_state:ok and every live replica's link to its
        master is up (after create, a restart or a failover): before that, WAIT counts no
        replica and the far tier would send every page to disk."""
        deadline = time.monotonic() + timeout
        while True:
            live = [p for p in self.ports if p in self.pids]
            ok = all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO", check=False) for p in live)
            if ok:
                for p in live:
                    info = self.cli(p, "INFO", "replication", check=False)
                    if "role:slave" in info and "master_link_status:up" not in info:
                        ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def masters(self) -> list[int]:
        """Ports of the nodes that are masters now."""
        out = self.cli(next(p for p in self.ports if p in self.pids), "CLUSTER", "NODES")
        ports = []
        for line in out.splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def kill_node(self, port: int, sig: int = signal.SIGKILL) -> None:
        pid = self.pids.pop(port)
        _end(pid, sig)

    def used_memory(self) -> int:
        """INFO memory used_memory summed over the masters."""
        total = 0
        for port in self.masters():
            for line in self.cli(port, "INFO", "memory").splitlines():
                if line.startswith("used_memory:"):
                    total += int(line.split(":")[1])
        return total

    def dbsize(self) -> int:
        """Keys over the masters."""
        return sum(int(self.cli(p, "DBSIZE")) for p in self.masters())

    def stop(self) -> None:
        for port in list(self.pids):
            self.kill_node(port, signal.SIGTERM)
        state = self.dir / "cluster.json"
        if state.exists():
            state.unlink()

    def _save(self) -> None:
        (self.dir / "cluster.json").write_text(json.dumps(
            {"ports": self.ports, "pids": {str(k): v for k, v in self.pids.items()}}))

    @classmethod
    def load(cls, directory) -> "RedisCluster":
        state = json.loads((Path(directory) / "cluster.json").read_text())
        cluster = cls(directory, state["ports"][0])
        cluster.pids = {int(k): v for k, v in state["pids"].items()}
        return cluster


def make_certificates(directory) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl
    in `directory`; their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {k: str(d / f"{k}.pem") for k in ("ca", "ca_key", "server_cert", "server_key",
                                               "client_cert", "client_key")}
    ssl = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=zblock-test-ca",
        "-keyout", paths["ca_key"], "-out", paths["ca"])
    ext = d / "san.cnf"
    ext.write_text(f"subjectAltName=IP:{HOST}\n")
    for who in ("server", "client"):
        csr = str(d / f"{who}.csr")
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=zblock-test-{who}",
            "-keyout", paths[f"{who}_key"], "-out", csr)
        ssl("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"],
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", paths[f"{who}_cert"])
    return paths


def _is_redis(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip().startswith("redis-server")
    except OSError:
        return False


def _end(pid: int, sig: int) -> None:
    """End one of our redis-server processes by its pid and wait for it to go (a pid that is
    no longer a redis-server is left alone: it was reused)."""
    if not _is_redis(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:       # not our child (stop from another process): poll
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def sweep(directory) -> bool:
    """Stop the cluster a dead test run left under `directory` (its cluster.json), if any."""
    state = Path(directory) / "redis-cluster" / "cluster.json"
    if not state.exists():
        return False
    RedisCluster.load(state.parent).stop()
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.rediscluster",
                                 description="A local 6-node Redis Cluster on loopback")
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("dir")
    ap.add_argument("--port", type=int, default=7000, help="first of six ports (start)")
    args = ap.parse_args(argv)
    if args.action == "start":
        cluster = RedisCluster(args.dir, args.port).start()
        print(f"--far {cluster.url}")
    else:
        RedisCluster.load(args.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
