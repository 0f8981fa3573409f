"""The command line: every bad input of the issue gives one line on stderr and a non-zero exit
(2 for usage errors), never a traceback; stats formats; set; umount of what is not zblock.

Cases that need no mount run everywhere; the others use real mounts (marker `mount`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib

import pytest

import mountutil
from mountutil import Mount, zblock
from zblock import cli, runtime
from zblock.config import PARAMS, default_text


def one_line_error(res, code=None):
    """The contract: non-zero exit, exactly one line on stderr, no traceback."""
    assert res.returncode != 0, res
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("zblock: "), lines
    return lines[0]


@pytest.fixture
def work():
    d = mountutil.new_workdir()
    os.makedirs(os.path.join(d, "mnt"))
    yield d
    mountutil.cleanup_dir(d)


def mount_args(work, *extra, size="16M", backing=None):
    a = ["mount", os.path.join(work, "mnt"), "--backing", backing or os.path.join(work, "b.img")]
    if size:
        a += ["--size", size]
    return a + list(extra)


# ---------------------------------------------------------------------------------------------
# usage errors: no mount needed (they fail before any server starts)


@pytest.mark.parametrize("size,what", [("12X", "not a size"), ("1000", "multiple of 4096"),
                                       ("0", "multiple of 4096"), ("-4096", "not a size"),
                                       ("1P", "too large (the maximum is 16T"),
                                       ("100MB", "100000000 bytes, not a positive multiple of 4096")])
def test_bad_or_unaligned_size(work, size, what):
    line = one_line_error(zblock(*mount_args(work, size=size)), 2)
    assert what in line


def test_new_backing_without_size(work):
    line = one_line_error(zblock(*mount_args(work, size=None)), 2)
    assert "--size" in line
    assert not os.path.exists(os.path.join(work, "b.img"))


def test_backing_shows_as_required():
    usage = zblock("mount", "--help").stdout.split("\n\n")[0]
    assert " --backing PATH " in usage and "[--backing" not in usage, usage
    line = one_line_error(zblock("mount", "/mnt", "--size", "16M"), 2)
    assert line == "zblock: mount: the following arguments are required: --backing"


def test_missing_mountpoint(work):
    res = zblock("mount", os.path.join(work, "nope"), "--backing", os.path.join(work, "b.img"), "--size", "16M")
    assert "does not exist" in one_line_error(res)


def test_mountpoint_not_empty(work):
    open(os.path.join(work, "mnt", "x"), "w").close()
    assert "not empty" in one_line_error(zblock(*mount_args(work)))


def test_backing_is_directory(work):
    os.makedirs(os.path.join(work, "dir"))
    res = zblock(*mount_args(work, backing=os.path.join(work, "dir")))
    assert "directory" in one_line_error(res)


def test_backing_not_writable(work):
    # root reads and writes anything; an immutable file is refused even to root.
    path = os.path.join(work, "b.img")
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not supported here")
    try:
        res = zblock(*mount_args(work, backing=path))
        assert "not readable and writable" in one_line_error(res)
    finally:
        subprocess.run(["chattr", "-i", path], capture_output=True)


@pytest.mark.parametrize("opt", [["--compressor", "brotli"], ["-o", "compressor=brotli"]])
def test_unknown_compressor(work, opt):
    line = one_line_error(zblock(*mount_args(work, *opt)), 2)
    assert "unknown compressor 'brotli'" in line


def test_uninstalled_compressor(work, tmp_path):
    # A module named lzo that fails to import stands for python-lzo not installed.
    (tmp_path / "lzo.py").write_text("raise ImportError('python-lzo is not installed', name='lzo')\n")
    env = mountutil.env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    res = subprocess.run([sys.executable, "-m", "zblock", *mount_args(work, "--compressor", "lzo")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert "not installed" in one_line_error(res, 2)


@pytest.mark.parametrize("args,what", [
    (["--pool-limit", "12%%"], "pool_limit"), (["--accept-threshold", "101"], "accept_threshold"),
    (["--hw-batch", "0"], "hw_batch"), (["-o", "nonsense=1"], "unknown option"),
    (["--swap", "--kernel-cache"], "kernel-cache"), (["--limit-policy", "lru"], "limit_policy"),
    (["--hw-seed", "99999999999999999999"], "hw_seed: '99999999999999999999' is out of range (0..4294967295)"),
    (["-o", "hw_seed=1e3"], "hw_seed: '1e3' is not a decimal integer"),
    (["--read-only", "--swap"], "--read-only"), (["-o", "ro,swap"], "--read-only"),
    (["-o", "sparse,swap"], "--sparse"),      # a bare flag, as `swap` is
    (["--swap", "--sequential-cutoff", "4M"], "sequential_cutoff: persistent mode only"),
    (["--sequential-cutoff", "4X"], "sequential_cutoff: '4X' is not a size"),
])
def test_bad_options(work, args, what):
    assert what in one_line_error(zblock(*mount_args(work, *args)), 2)


def test_usage_errors_are_one_line():
    assert "required" in one_line_error(zblock("mount"), 2)
    one_line_error(zblock(), 2)
    one_line_error(zblock("frobnicate"), 2)
    one_line_error(zblock("stats"), 2)
    one_line_error(zblock("set", "/tmp"), 2)


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["mount", "/mnt"], ["mount", "/mnt", "--backing", "/b.img", "--size", "12X"],
    ["umount"], ["stats"], ["stats", "/mnt", "--json", "--prometheus"], ["set", "/mnt"],
    ["umount", "/mnt", "--timeout", "x"], ["fsck"], ["swapon"], ["swapoff"],
    ["bench", "--pages", "x"], ["bench", "--zstd-level", "30"], ["list", "--timeout", "x"],
], ids=lambda a: " ".join(a) or "no-command")
def test_one_prefix_per_error(args):
    """Every command's error starts with exactly one "zblock: " (was "zblock: zblock set: ...")."""
    line = one_line_error(zblock(*args))
    assert line.count("zblock") == 1, line


def test_read_only_mount_of_a_missing_backing_file(work):
    line = one_line_error(zblock(*mount_args(work, "-o", "ro")))
    assert "does not exist (nothing to mount read-only)" in line
    assert not os.path.exists(os.path.join(work, "b.img"))


def test_missing_dev_fuse(work):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    # A private mount namespace where /dev is an empty tmpfs: no /dev/fuse.
    cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev && exec "$@"', "sh",
           sys.executable, "-m", "zblock", *mount_args(work)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=mountutil.env(), cwd=mountutil.REPO)
    assert "/dev/fuse" in one_line_error(res)


@pytest.mark.parametrize("fuse_version", [2, 3])
def test_missing_fuse_library(work, fuse_version, tmp_path):
    """libfuse hidden from ctypes.util.find_library (zblock's check and mfusepy's lookup alike),
    on any machine: an empty ld.so.cache hides it from ldconfig -p, and a PATH without gcc, cc
    or ld turns off find_library's fallbacks (which find it through the libfuse3.so of a -dev
    package)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    script = f'{shutil.which("mount")} --bind /dev/null /etc/ld.so.cache && exec "$@"'
    cmd = [shutil.which("unshare"), "-m", "/bin/sh", "-c", script, "sh",
           sys.executable, "-m", "zblock", *mount_args(work, "--fuse-impl", "mfusepy",
                                                       "--fuse-version", str(fuse_version))]
    env = {**mountutil.env(), "PATH": str(tmp_path)}       # an empty directory: no tools
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=mountutil.REPO)
    assert f"libfuse {fuse_version} is not installed" in one_line_error(res)


@pytest.mark.parametrize("command", [["stats"], ["umount"], ["set", "compressor=zstd"]])
def test_not_a_zblock_mount(command):
    assert "not a zblock mount" in one_line_error(zblock(command[0], "/proc", *command[1:]))
    assert "not a zblock mount" in one_line_error(zblock(command[0], "/nonexistent", *command[1:]))


def test_fsck_missing_file(work):
    # e2fsck's "operational error": nothing was checked
    one_line_error(zblock("fsck", os.path.join(work, "nope")), 8)
    one_line_error(zblock("fsck", work), 8)


def test_bench_plot_without_matplotlib_fails_before_any_work(monkeypatch, capsys, tmp_path):
    """`bench --plot` checks for matplotlib first: one line naming the install command, exit 2,
    and no data read, no configuration run."""
    from zblock import bench
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` fails

    def no_work(*args, **kwargs):
        raise AssertionError("bench started working before it checked for matplotlib")
    for name in ("builtin_pages", "file_pages", "run_config"):
        monkeypatch.setattr(bench, name, no_work)
    assert cli.main(["bench", "--plot", str(tmp_path / "bench.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs matplotlib" in lines[0], lines
    assert "-m pip install 'zblock[bench]'" in lines[0]


# ---------------------------------------------------------------------------------------------
# output formats (pure functions)


SAMPLE = {"schema": 1, "stored_pages": 10, "same_filled_pages": 2, "pool_total_size": 8192,
          "written_back_pages": 3, "orig_data_size": 40960, "compr_data_size": 8192,
          "table_bytes": 3 << 20,
          "pools": [{"compressor": "lz4", "stored_pages": 8, "refs": 8}],
          "hw": {"submitted": 5, "latency_us": {"p50": 3.0, "p99": 9.5}},
          "request_sizes": {"write": {"1048576": 4}, "read": {}}}


def test_prometheus_names():
    text = cli.format_prometheus(SAMPLE)
    assert "zblock_written_back_pages_total 3" in text
    assert "zblock_pool_total_size_bytes 8192" in text
    assert "zblock_stored_pages 10" in text
    assert "zblock_table_bytes 3145728" in text
    assert 'zblock_pool_stored_pages{pool="0",compressor="lz4"} 8' in text
    assert 'zblock_hw_submitted_total 5' in text
    assert 'zblock_hw_latency_us{quantile="p99"} 9.5' in text
    assert 'zblock_requests_total{op="write",size="1048576"} 4' in text
    assert "# TYPE zblock_written_back_pages_total counter" in text
    assert "# TYPE zblock_stored_pages gauge" in text
    for line in text.splitlines():
        assert line.startswith("# TYPE zblock_") or line.startswith("zblock_")


def test_table_has_ratio():
    text = cli.format_table(SAMPLE)
    assert "compression ratio" in text and "5.00" in text
    assert "stored_pages" in text and "(8.0 KiB)" in text
    assert "table_bytes" in text and "(3.0 MiB)" in text
    assert "WARNING" not in text


def test_table_shows_disk_io_in_figures():
    text = cli.format_table({**SAMPLE, "bd_reads": 800, "bd_read_ios": 100, "bd_read_us": 20000,
                             "bd_writes": 0, "bd_write_ios": 0, "bd_write_us": 0})
    rows = [ln.split(None, 2)[2] for ln in text.splitlines() if ln.startswith("disk ")]
    # 800 pages in 100 calls; 3.3 MB in 20 ms of waiting; no writes: no row
    assert rows == ["8.0 pages an I/O, 200 us an I/O, 164 MB/s while waiting"], text
    assert "zblock_bd_read_ios_total 100" in cli.format_prometheus({**SAMPLE, "bd_read_ios": 100})


def test_table_warns_of_a_pool_held_over_its_limit_and_sparse_files():
    text = cli.format_table({**SAMPLE, "pool_over_limit": 81 << 20, "io_errors": 12, "sparse": True})
    warnings = [ln for ln in text.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 2 and "81.0 MiB over its limit" in warnings[0], text


# ---------------------------------------------------------------------------------------------
# cases that need a real mount


@pytest.mark.mount
def test_already_mounted_and_locked(work):
    with Mount(size="16M") as m:
        # the same mount point again
        res = zblock(*["mount", m.mountpoint, "--backing", os.path.join(work, "other.img"), "--size", "16M"])
        assert "already a zblock mount" in one_line_error(res)
        # the same backing file on another mount point: refused by the lock
        res = zblock(*mount_args(work, size=None, backing=m.backing))
        line = one_line_error(res)
        assert "in use" in line or "locked" in line, line
        assert not mountutil.is_mounted(os.path.join(work, "mnt"))


@pytest.mark.mount
def test_size_differs_from_backing(work):
    with Mount(size="16M") as m:
        backing = m.backing
        m.umount()
        res = zblock(*mount_args(work, size="32M", backing=backing))
        line = one_line_error(res)
        assert str(32 << 20) in line or "32M" in line or "size" in line, line
        # without --size the existing size is used
        res = zblock(*mount_args(work, size=None, backing=backing), check=True)
        try:
            assert os.path.getsize(os.path.join(work, "mnt", "disk")) == 16 << 20
        finally:
            zblock("umount", os.path.join(work, "mnt"), check=True)


@pytest.mark.mount
def test_stats_set_and_formats():
    with Mount(size="16M") as m:
        res = zblock("stats", m.mountpoint, "--json", check=True)
        assert json.loads(res.stdout)["schema"] == 1
        res = zblock("stats", m.mountpoint, "--prometheus", check=True)
        assert "zblock_" in res.stdout and "schema" not in res.stdout
        res = zblock("stats", m.mountpoint, check=True)
        assert "stored_pages" in res.stdout
        zblock("set", m.mountpoint, "compressor=zstd", "zstd_level=5", check=True)
        assert m.param("compressor") == "zstd" and m.param("zstd_level") == "5"
        line = one_line_error(zblock("set", m.mountpoint, "zstd_level=99"), 2)
        assert "zstd_level" in line and m.param("zstd_level") == "5"
        one_line_error(zblock("set", m.mountpoint, "swap=Y"), 2)
        one_line_error(zblock("set", m.mountpoint, "bogus=1"), 2)
        one_line_error(zblock("set", m.mountpoint, "novalue"), 2)


@pytest.mark.mount
def test_o_options_and_foreground_flag_mapping():
    with Mount(size="16M", extra=["-o", "compressor=zstd,zstd_level=3,rw,nosuid,shrinker=N"]) as m:
        assert m.param("compressor") == "zstd"
        assert m.param("zstd_level") == "3"
        assert m.param("shrinker_enabled") == "N"


@pytest.mark.mount
def test_umount_force_on_a_hung_server(work):
    with Mount(size="16M") as m:
        with open(m.disk, "r+b") as f:
            f.write(b"x" * 4096)
        os.kill(m.pid, 19)          # SIGSTOP: the server stops answering
        try:
            res = zblock("umount", m.mountpoint, "--force", "--timeout", "5", timeout=90)
            assert res.returncode == 0 or "did not exit" in res.stderr, res.stderr
            assert not mountutil.is_mounted(m.mountpoint, None)
        finally:
            os.kill(m.pid, 18)      # SIGCONT: let it see the aborted connection and exit
        assert mountutil.wait_pid(m.pid, 60)


@pytest.mark.mount
def test_list_live_hung_and_dead_mounts():
    def row_of(m, *args):
        res = zblock("list", *args, timeout=90)
        assert res.returncode == 0 and not res.stderr, res.stderr
        if "--json" in args:
            return next(r for r in json.loads(res.stdout) if r["mountpoint"] == m.mountpoint)
        lines = res.stdout.splitlines()
        assert lines[0].split() == list(cli.LIST_COLUMNS)
        return next(line for line in lines if line.split()[0] == m.mountpoint)

    with Mount(size="16M", compressor="zstd") as m:
        with open(m.disk, "r+b") as f:
            f.write(b"zblock list " * 50000)             # 600 KB that compress well
        row = row_of(m, "--json")
        stats = m.stats()
        assert (row["state"], row["backing"], row["size"], row["compressor"]) == ("ok", m.backing, 16 << 20, "zstd")
        assert row["pool_limit"] == stats["pool_limit"] and row["pool_total_size"] > 0
        assert row["ratio"] > 2 and (row["swap"], row["swap_devices"]) == (False, [])
        line = row_of(m).split()
        assert line[1] == m.backing and line[2:4] == ["16.0", "MiB"] and line[4] == "zstd" and line[-1] == "-"

        assert m.pid
        os.kill(m.pid, signal.SIGSTOP)                 # hung: the deadline makes it a row
        try:
            assert row_of(m, "--timeout", "2").endswith(cli.DEAD)
            assert row_of(m, "--json", "--timeout", "2")["state"] == "dead"
        finally:
            os.kill(m.pid, signal.SIGCONT)
        os.kill(m.pid, signal.SIGKILL)                 # gone (ENOTCONN): backing from the pid file
        assert mountutil.wait_pid(m.pid, 30)
        line = row_of(m)
        assert line.split()[:2] == [m.mountpoint, m.backing] and line.endswith(cli.DEAD), line
        zblock("umount", "--force", m.mountpoint, check=True)
        assert not mountutil.is_mounted(m.mountpoint)
        os.unlink(runtime.pid_file(m.mountpoint))        # a killed server leaves it behind


@pytest.mark.parametrize("command", ["", "mount", "umount", "stats", "set", "fsck", "swapon",
                                     "swapoff", "bench", "list"])
def test_help_of_every_command(command):
    res = zblock(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: zblock" in res.stdout and "Traceback" not in res.stderr


def _help(command) -> str:
    res = zblock(command, "--help")
    assert res.returncode == 0, res.stderr
    return " ".join(res.stdout.split())         # argparse and textwrap wrap lines: compare words


def test_set_help_lists_every_runtime_param_with_its_default():
    text = _help("set")
    for name, param in PARAMS.items():
        if param.runtime:
            assert f"{name} {param.help}; default {default_text(name)}" in text, name
    fixed = [name for name, p in PARAMS.items() if not p.runtime]
    assert "kernel_cache" in fixed and "far" in fixed
    assert "fixed at mount: " + ", ".join(fixed) in text
    assert "default 20% of RAM" in text and "hw_seed seed of the engine's faults (0..4294967295)" in text
    assert "exit status: 0 every value written 1 not a zblock mount" in text


def test_fsck_help_states_the_exit_codes_it_returns():
    from zblock import backing
    text = _help("fsck")
    for code, words in [(backing.FSCK_CLEAN, "clean"), (backing.FSCK_PROBLEMS, "problems found"),
                        (backing.FSCK_DAMAGE, "damage that needs action"),
                        (backing.FSCK_USAGE, "usage or operational error")]:
        assert f" {code} {words}" in text, (code, text)
    assert (backing.FSCK_CLEAN, backing.FSCK_PROBLEMS, backing.FSCK_DAMAGE, backing.FSCK_USAGE) == (0, 1, 4, 8)


@pytest.mark.parametrize("command,words", [
    ("umount", ["return only when the server has exited", "default: 600", "exit status: 0 unmounted",
                "3 writing back failed"]),
    ("stats", ["MOUNTPOINT/stats", "Prometheus", "exit status: 0 printed 1 not a zblock mount, or no answer within 30 s"]),
    ("mount", ["--size SIZE disk size in bytes, a multiple of 4096", "KB, MB, GB, TB = powers of 1000",
               "0..100% of RAM; 0 or 0%: no pool", "default 20% of RAM", "default one per CPU"]),
])
def test_command_help_texts(command, words):
    text = _help(command)
    for w in words:
        assert w in text, (w, text)


def test_version():
    with open(os.path.join(mountutil.REPO, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    res = zblock("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"zblock {version}\n"
