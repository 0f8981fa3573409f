"""System integration: mount(8)/fstab through mount/mount.fuse.zblock, the umount helper, the
systemd units (systemd-analyze verify), install.sh, and the sd_notify readiness of the server.

The helpers must sit in /sbin for mount(8) to find them: the test installs them there with
install.sh and removes them on every path (an existing installation is put back as it was).
They run the code of this tree through a small wrapper (ZBLOCK points at it), not whatever
`zblock` happens to be installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import mountutil
from conftest import require
from mountutil import is_mounted, wait_pid
from zblock.runtime import run_with_deadline

REPO = mountutil.REPO
INSTALL = os.path.join(REPO, "mount", "install.sh")
HELPERS = ("mount.fuse.zblock", "umount.fuse.zblock")


@pytest.fixture
def workdir():
    d = mountutil.new_workdir()
    try:
        yield d
    finally:
        mountutil.cleanup_dir(d)


def make_wrapper(workdir: str) -> str:
    """An executable `zblock` that runs this tree's code (absolute path, as units need)."""
    path = os.path.join(workdir, "bin", "zblock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"PYTHONPATH='{REPO}:{mountutil.TESTS}' exec '{sys.executable}' -m zblock \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def install(action: str, *parts: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env)
    return subprocess.run(["sh", INSTALL, action, *parts], capture_output=True, text=True, env=e, timeout=60)


# ---------------------------------------------------------------------------------------------
# install.sh and the units (no root needed: a staging DESTDIR)


def test_install_script_stages_and_removes_everything(workdir):
    dest = os.path.join(workdir, "root")
    zb = make_wrapper(workdir)
    res = install("install", DESTDIR=dest, ZBLOCK=zb)
    assert res.returncode == 0, res.stderr
    files = {
        "sbin/mount.fuse.zblock": 0o755, "sbin/umount.fuse.zblock": 0o755,
        "etc/systemd/system/zblock@.service": 0o644, "etc/systemd/system/zblock-swap@.service": 0o644,
        "etc/zblock/zblock.conf.example": 0o644,
    }
    for rel, mode in files.items():
        p = os.path.join(dest, rel)
        assert os.path.isfile(p), rel
        assert os.stat(p).st_mode & 0o777 == mode, rel
        text = open(p).read()
        assert "@ZBLOCK@" not in text and "@CONFDIR@" not in text, rel
    unit = open(os.path.join(dest, "etc/systemd/system/zblock@.service")).read()
    assert f"ExecStart={zb} mount" in unit and "Type=notify" in unit
    # an instance config the user wrote survives uninstall
    own = os.path.join(dest, "etc/zblock/mine.conf")
    open(own, "w").write("MOUNTPOINT=/x\n")
    res = install("uninstall", DESTDIR=dest)
    assert res.returncode == 0, res.stderr
    for rel in files:
        assert not os.path.exists(os.path.join(dest, rel)), rel
    assert os.path.exists(own)
    assert install("frobnicate").returncode == 2
    assert install("install", "bogus", DESTDIR=dest, ZBLOCK=zb).returncode == 2
    assert install("install", DESTDIR=dest, ZBLOCK="relative/zblock").returncode == 2


def _verify(unit_dir: str, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *[os.path.join(unit_dir, n) for n in names]],
                          capture_output=True, text=True, timeout=120, cwd=unit_dir)


def test_systemd_units_verify(workdir):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    dest = os.path.join(workdir, "root")
    res = install("install", "units", DESTDIR=dest, ZBLOCK=make_wrapper(workdir))
    assert res.returncode == 0, res.stderr
    unit_dir = os.path.join(dest, "etc/systemd/system")
    # verify the templates and an instance of each (instances resolve %i and the BindsTo= pair)
    for t in ("zblock@.service", "zblock-swap@.service"):
        shutil.copy(os.path.join(unit_dir, t), os.path.join(unit_dir, t.replace("@.", "@t1.")))
    res = _verify(unit_dir, "zblock@.service", "zblock-swap@.service", "zblock@t1.service",
                  "zblock-swap@t1.service")
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and not out, out
    swap_unit = open(os.path.join(unit_dir, "zblock-swap@.service")).read()
    assert "BindsTo=zblock@%i.service" in swap_unit and "After=zblock@%i.service" in swap_unit
    # control: the same check does see a broken unit (a test that cannot fail proves nothing)
    broken = os.path.join(unit_dir, "zblock@t2.service")
    text = open(os.path.join(unit_dir, "zblock@t1.service")).read()
    open(broken, "w").write(text.replace("Type=notify", "Type=notifyy"))
    res = _verify(unit_dir, "zblock@t2.service")
    assert "notifyy" in res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# mount(8), fstab and umount(8) through the helpers


@contextlib.contextmanager
def helpers_installed(zblock_cmd: str):
    """Install the helpers into /sbin; restore whatever was there on every path."""
    saved = {}
    for name in HELPERS:
        p = os.path.join("/sbin", name)
        if os.path.lexists(p):
            with open(p, "rb") as f:
                saved[p] = (f.read(), os.stat(p).st_mode)
    try:
        res = install("install", "helpers", ZBLOCK=zblock_cmd)
        assert res.returncode == 0, res.stderr
        yield
    finally:
        install("uninstall", "helpers")
        for p, (data, mode) in saved.items():
            with open(p, "wb") as f:
                f.write(data)
            os.chmod(p, mode)
        for name in HELPERS:
            p = os.path.join("/sbin", name)
            assert p in saved or not os.path.exists(p), f"{p} left behind"


def _param(mp: str, name: str) -> str:
    with open(os.path.join(mp, "params", name)) as f:
        return f.read().strip()


@pytest.mark.mount
@pytest.mark.timeout(300)
def test_mount_t_fuse_zblock_fstab_and_umount_helper(workdir):
    mountutil.require_mounts()
    require(shutil.which("mount") is not None, "no mount(8)")
    zb = make_wrapper(workdir)
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp)
    backing = os.path.join(workdir, "backing.img")
    data = os.urandom(1 << 20) * 2 + b"zblock" * 300000
    data = data[:4 << 20]
    with helpers_installed(zb):
        # 1. mount -t with -o options
        res = subprocess.run(["mount", "-t", "fuse.zblock", "-o",
                              "size=64M,compressor=zstd,zstd_level=3,pool_limit=32M,limit_policy=zswap,"
                              "accept-threshold=70,noatime", backing, mp],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert is_mounted(mp)
        assert _param(mp, "compressor") == "zstd"
        assert _param(mp, "zstd_level") == "3"
        assert _param(mp, "pool_limit") == str(32 << 20)
        assert _param(mp, "limit_policy") == "zswap"
        assert _param(mp, "accept_threshold") == "70"
        assert os.path.getsize(os.path.join(mp, "disk")) == 64 << 20
        pids = mountutil.server_pids(mp)
        assert len(pids) == 1
        with open(os.path.join(mp, "disk"), "r+b") as f:
            f.write(data)
        # 2. umount(8) -> umount.fuse.zblock -> zblock umount: returns after the write-back,
        #    with the server gone (umount(2) alone returns before FUSE destroy runs). `-c` is how
        #    systemd's mount units call it; it makes libmount read the type from mountinfo
        #    (fuse.zblock). A plain `umount DIR` takes a statfs fast path that only sees "fuse"
        #    and runs no helper (util-linux 2.38), as step 3 shows.
        res = subprocess.run(["umount", "-c", mp], capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mp, None)
        assert wait_pid(pids[0], 0), "umount returned while the server was still running"
        with open(backing, "rb") as f:
            assert f.read(len(data)) == data, "the backing file is not the raw image after umount"

        # 3. an fstab line, through mount -T (existing backing: no size needed)
        fstab = os.path.join(workdir, "fstab")
        with open(fstab, "w") as f:
            f.write(f"# zblock test\n{backing} {mp} fuse.zblock "
                    "compressor=deflate,shrinker_enabled=N,hw-batch=16,noauto,nofail,x-systemd.requires=foo 0 0\n")
        res = subprocess.run(["mount", "-T", fstab, mp], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert _param(mp, "compressor") == "deflate"
        assert _param(mp, "shrinker_enabled") == "N"
        assert _param(mp, "hw_batch") == "16"
        with open(os.path.join(mp, "disk"), "rb") as f:
            assert f.read(len(data)) == data
        pids = mountutil.server_pids(mp)
        res = subprocess.run(["umount", mp], capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mp, None)
        assert all(wait_pid(p, 60) for p in pids), "the server did not exit after umount"

        # 4. a bad option: one line naming it, nothing mounted
        res = subprocess.run(["mount", "-t", "fuse.zblock", "-o", "compressor=bogus", backing, mp],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0
        assert "bogus" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not is_mounted(mp, None)


# ---------------------------------------------------------------------------------------------
# sd_notify: READY=1 only once the mount answers


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_notify_socket_sees_ready_only_when_the_mount_answers(workdir):
    mountutil.require_mounts()
    mp = os.path.join(workdir, "mnt")
    os.makedirs(mp)
    sock_path = os.path.join(workdir, "notify.sock")
    events = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        env = mountutil.env()
        env["NOTIFY_SOCKET"] = sock_path
        proc = subprocess.Popen([sys.executable, "-m", "zblock", "mount", mp, "--backing",
                                 os.path.join(workdir, "b.img"), "--size", "64M", "--foreground"],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            ready = False
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise AssertionError(f"no READY=1 within 60 s (server exit {proc.poll()}; "
                                         f"datagrams {events}); does the daemon call zblock.sdnotify.notify_ready?")
                sock.settimeout(min(left, 1.0))
                try:
                    msg = sock.recv(4096).decode()
                except socket.timeout:
                    continue
                events.append(msg)
                if "READY=1" in msg.split("\n"):
                    ready = True
                    # at READY=1 the mount must already answer: in the table and serving a read
                    assert is_mounted(mp), "READY=1 before the mount is in the mount table"
                    text = run_with_deadline(lambda: open(os.path.join(mp, "stats")).read(), 5,
                                             "reading stats right after READY=1")
                    assert '"schema"' in text
                    assert f"MAINPID={proc.pid}" in msg
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            assert proc.returncode == 0, proc.stdout.read().decode(errors="replace")[-2000:]
            assert not is_mounted(mp, None)
        finally:
            if proc.poll() is None:
                mountutil.force_unmount(mp)
                mountutil.kill_and_wait(proc.pid)
            proc.wait(timeout=30)
            proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# the units' commands, run as systemd would run them (no systemd as PID 1 here)


def _unit_directives(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(value)
    return out


def _env_file(path: str) -> dict[str, str]:
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                env[k] = v
    return env


def _expand(cmdline: str, env: dict[str, str], instance: str) -> list[str]:
    """systemd's rules: ${VAR} alone is one word, $VAR alone is split on whitespace; %i."""
    import re
    import shlex
    words = []
    for tok in shlex.split(cmdline.replace("%i", instance)):
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", tok)
        if m and m.group(1):
            words.append(env.get(m.group(1), ""))
        elif m:
            words.extend(env.get(m.group(2), "").split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda mm: env.get(mm.group(1), ""), tok))
    return words


@pytest.mark.mount
@pytest.mark.timeout(300)
def test_unit_commands_mount_notify_swap_and_stop(workdir):
    """zblock@ then zblock-swap@ with the example config's shape: READY=1, swap on, stop in order."""
    mountutil.require_mounts()
    for tool in ("losetup", "mkswap", "swapon", "swapoff"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    from zblock import runtime, swapctl
    with open(runtime.ZSWAP_ENABLED) as f:
        assert f.read().strip() == "N", "kernel zswap is enabled: refusing to swap"
    inst = "t1"
    confdir = os.path.join(workdir, "etc-zblock")
    os.makedirs(confdir)
    dest = os.path.join(workdir, "root")
    res = install("install", "units", DESTDIR=dest, ZBLOCK=make_wrapper(workdir), CONFDIR=confdir)
    assert res.returncode == 0, res.stderr
    units = os.path.join(dest, "etc/systemd/system")
    mp = os.path.join(workdir, "svc", "mnt")       # ExecStartPre creates it
    example = _env_file(os.path.join(REPO, "systemd", "zblock.conf.example"))
    assert {"MOUNTPOINT", "BACKING", "OPTIONS", "SWAP_OPTIONS"} <= set(example)
    with open(os.path.join(confdir, f"{inst}.conf"), "w") as f:
        f.write(f"MOUNTPOINT={mp}\nBACKING={workdir}/swap0.img\n"
                "OPTIONS=size=64M,swap,compressor=zstd,pool_limit=16M\nSWAP_OPTIONS=--priority 32000\n")
    main = _unit_directives(os.path.join(units, "zblock@.service"))
    swp = _unit_directives(os.path.join(units, "zblock-swap@.service"))
    assert main["Type"] == ["notify"] and swp["BindsTo"] == ["zblock@%i.service"]
    env = _env_file(main["EnvironmentFile"][0].replace("%i", inst))
    senv = _env_file(swp["EnvironmentFile"][0].replace("%i", inst))
    for pre in main.get("ExecStartPre", []):
        assert subprocess.run(_expand(pre, env, inst), timeout=30).returncode == 0
    sock_path = os.path.join(workdir, "notify.sock")
    proc = None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        penv = dict(os.environ, NOTIFY_SOCKET=sock_path)
        try:
            proc = subprocess.Popen(_expand(main["ExecStart"][0], env, inst), env=penv,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            sock.settimeout(60)
            while "READY=1" not in sock.recv(4096).decode().split("\n"):
                pass
            assert is_mounted(mp) and mountutil.server_pids(mp) == [proc.pid]
            res = subprocess.run(_expand(swp["ExecStart"][0], senv, inst), capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stderr
            loop = res.stdout.strip()
            entry = swapctl.swap_entry(loop)
            assert entry is not None and entry["priority"] == 32000
            # stop: the swap unit first (BindsTo/After), then the mount
            res = subprocess.run(_expand(swp["ExecStop"][0], senv, inst), capture_output=True, text=True,
                                 timeout=300)
            assert res.returncode == 0, res.stderr
            assert swapctl.swap_entry(loop) is None and swapctl.loop_backing_file(loop) is None
            res = subprocess.run(_expand(main["ExecStop"][0], env, inst), capture_output=True, text=True,
                                 timeout=300)
            assert res.returncode == 0, res.stderr
            assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
            assert not is_mounted(mp, None)
        finally:
            for loop in swapctl.loops_over(os.path.join(mp, "disk")):
                subprocess.run(["swapoff", loop], capture_output=True, timeout=300)
                subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)
            if proc is not None:
                if proc.poll() is None:
                    mountutil.force_unmount(mp)
                    mountutil.kill_and_wait(proc.pid)
                proc.wait(timeout=30)
                proc.stderr.close()
