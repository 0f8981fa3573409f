"""Command line: option parsing, output formats, exit codes. No engine logic.

    zblock mount MOUNTPOINT --backing PATH [--size SIZE] [--foreground] [-o k=v,...] [options]
    zblock umount MOUNTPOINT [--force]
    zblock stats MOUNTPOINT [--json | --prometheus]
    zblock set MOUNTPOINT NAME=VALUE...
    zblock fsck BACKING [--key-file FILE] [--json]
    zblock list [--json]

Every mistake is one line on stderr ("zblock: ...") and a non-zero exit: ZblockError.exit_code
(2 for usage and config errors, as argparse), never a traceback. Mount options become a
zblock.config.Config through Config.from_strings, so each value is validated once, by the same
parser that validates writes to params/.

swapctl.py (swapon/swapoff) and bench.py (bench) add their commands with `register_cli(subparsers)`,
so each command's options live beside its code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from . import PAGE_SIZE, __version__, bench, controls, swapctl
from .config import PARAMS, SIZE_SUFFIXES, Config, default_text, parse_disk_size
from .errors import ConfigError, MountError, NotAZblockMount, UsageError, WritebackFailed, ZblockError
from .runtime import (ANSWER_TIMEOUT, FSTYPE, find_zblock_mount, mounts, pid_file_backing,
                      read_mount_file, read_stats, run_with_deadline)

# zblock.daemon and zblock.hardening (they load the compressors) and zblock.backing are imported
# inside the commands that use them, so that stats, set, list, swapon and swapoff load no engine
# code.


# --option -> param name. Flags (store_true) are marked by None in _FLAGS.
_OPTION_PARAMS = {
    "compressor": "compressor",
    "zstd-level": "zstd_level",
    "pool-limit": "pool_limit",
    "accept-threshold": "accept_threshold",
    "limit-policy": "limit_policy",
    "incompressible": "incompressible_policy",
    "fuse-impl": "fuse_impl",
    "fuse-uring": "fuse_uring",
    "same-filled": "same_filled_pages_enabled",
    "shrinker": "shrinker_enabled",
    "write-through": "write_through",
    "sequential-cutoff": "sequential_cutoff",
    "writeback-limit": "writeback_limit",
    "recomp-algorithm": "recomp_algorithm",
    "promote-after": "promote_after",
    "far": "far",
    "far-limit": "far_limit",
    "far-dirty-limit": "far_dirty_limit",
    "far-replicas": "far_replicas",
    "far-timeout": "far_timeout",
    "far-auth-file": "far_auth_file",
    "far-tls-ca": "far_tls_ca",
    "far-tls-cert": "far_tls_cert",
    "far-tls-key": "far_tls_key",
    "key-file": "key_file",
    "accelerator": "accelerator",
    "hw-queues": "hw_queues",
    "hw-depth": "hw_depth",
    "hw-latency-us": "hw_latency_us",
    "hw-throughput-mbps": "hw_throughput_mbps",
    "hw-mode": "hw_mode",
    "hw-batch": "hw_batch",
    "hw-fault-rate": "hw_fault_rate",
    "hw-seed": "hw_seed",
    "contexts": "contexts",
}
_FLAGS = {"kernel-cache": "kernel_cache", "swap": "swap", "sparse": "sparse",
          "read-only": "read_only", "dedup": "dedup", "encrypt": "encrypt"}
# -o names mount(8) uses for a zblock option
_O_ALIASES = {"ro": "read_only"}

# -o options mount(8) passes that mean nothing to zblock.
_IGNORED_O = {"rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
              "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "atime", "noatime",
              "relatime", "norelatime", "strictatime"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not usage text plus the error."""

    def error(self, message):
        # main() puts "zblock: " before every error, so name only the command ("set", from the
        # prog "zblock set"): the prog itself would print "zblock: zblock set: ...".
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command}: {message}" if command else message)

    def format_help(self):
        # An epilog may be a function, run only when help is shown: fsck's imports the backing
        # module (engine code), which no other command should pay for.
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


# Width of the hand-laid parts of help texts (argparse wraps the rest to the terminal).
_HELP_WIDTH = 79


def _exit_status(*codes: tuple[int, str]) -> str:
    """The "exit status" part of a command's help: (code, meaning) pairs."""
    lines = ["exit status:"]
    for code, meaning in codes:
        lines += textwrap.wrap(meaning, _HELP_WIDTH, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
    return "\n".join(lines)


def _help_parser(sub, name: str, summary: str, description: str, epilog) -> argparse.ArgumentParser:
    """A subcommand whose description and epilog keep their line breaks."""
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------------------------------------
# mount


def _parse_o(text_list: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for text in text_list:
        for item in text.split(","):
            item = item.strip()
            if not item or item in _IGNORED_O or item.startswith("x-"):
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            name = key.replace("-", "_")
            if key in _OPTION_PARAMS:
                name = _OPTION_PARAMS[key]
            elif key in _FLAGS:
                name = _FLAGS[key]
            elif key in _O_ALIASES:
                name = _O_ALIASES[key]
            if name != "size" and name not in PARAMS:
                raise UsageError(f"-o {key}: unknown option")
            if not eq:
                if name in (*_FLAGS.values(), "same_filled_pages_enabled", "shrinker_enabled",
                            "write_through"):
                    value = "Y"
                else:
                    raise UsageError(f"-o {key}: needs a value ({key}=VALUE)")
            values[name] = value
    return values


def _mount_config(args) -> tuple[Config, int | None, str]:
    values = _parse_o(args.o or [])
    for opt, name in _OPTION_PARAMS.items():
        v = getattr(args, opt.replace("-", "_"))
        if v is not None:
            values[name] = v
    for opt, name in _FLAGS.items():
        if getattr(args, opt.replace("-", "_")):
            values[name] = "Y"
    size_text = values.pop("size", None)
    if args.size is not None:
        size_text = args.size
    size = parse_disk_size(size_text) if size_text is not None else None
    config = Config.from_strings(values)
    return config, size, args.backing


def cmd_mount(args, argv, *, store_factory=None, program=None) -> int:
    from . import daemon, hardening
    config, size, backing = _mount_config(args)
    fuse_version = int(args.fuse_version)
    daemon.check_fuse(fuse_version, daemon.fuse_front_end(config), config.fuse_uring)
    daemon.check_mountpoint(args.mountpoint)
    daemon.check_backing(backing, size, read_only=config.read_only)
    if config.swap and not args.foreground:
        for warning in hardening.preflight_warnings(config):
            print(f"zblock: warning: {warning}", file=sys.stderr)
    if args.foreground:
        daemon.setup_logging(args.debug)
        return daemon.serve(args.mountpoint, backing, size, config, fuse_version=fuse_version,
                            ready_fd=args.ready_fd, store_factory=store_factory, debug=args.debug)
    daemon.start_background(argv, args.mountpoint, program=program)
    return 0


def _add_mount(sub) -> None:
    p = sub.add_parser("mount", help="mount a store", description="Mount a zblock store.")
    p.add_argument("mountpoint")
    p.add_argument("--backing", required=True, metavar="PATH", help="backing file (a raw disk image)")
    p.add_argument("--size", help=f"disk size in bytes, a multiple of {PAGE_SIZE} (needed for a new backing "
                                  f"file); suffixes: {SIZE_SUFFIXES}")
    p.add_argument("--foreground", "-f", action="store_true", help="run the server in this process")
    p.add_argument("-o", action="append", metavar="OPT[=VAL],...", help="options as for mount -t fuse.zblock")
    for opt, name in _OPTION_PARAMS.items():
        p.add_argument(f"--{opt}", metavar=name.upper(),
                       help=f"{PARAMS[name].help}; default {default_text(name)}".replace("%", "%%"))
    p.add_argument("--kernel-cache", action="store_true", help="let the kernel cache the disk's pages")
    p.add_argument("--swap", action="store_true", help="serve swap (hardening on, backing ephemeral)")
    p.add_argument("--sparse", action="store_true",
                   help="do not reserve the backing file's space up front (writes fail once its "
                        "filesystem is full)")
    p.add_argument("--read-only", action="store_true",
                   help="mount read-only (-o ro): writes fail with EROFS, the backing file is not written")
    p.add_argument("--dedup", action="store_true",
                   help="pages of identical content share one pool object (copy-on-write)")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt every page that leaves RAM (AES-256-GCM): the key from "
                        "--key-file, or in swap mode a random one made for this mount")
    p.add_argument("--fuse-version", choices=("2", "3"), default="3", help="libfuse major version (default 3)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# umount, stats, set, fsck


def cmd_umount(args, argv) -> int:
    from . import daemon
    note = daemon.umount(args.mountpoint, force=args.force, timeout=args.timeout)
    if note:
        print(f"zblock: {note}", file=sys.stderr)
    return 0


def _add_umount(sub) -> None:
    p = _help_parser(
        sub, "umount", "write back, unmount and wait for the server",
        "Write every page back to the backing file (an fsync through the mount), unmount, and\n"
        "return only when the server has exited: then the backing file is complete. A dead\n"
        "mount (its server gone) is cleared, with a note that pages may be missing.",
        _exit_status(
            (0, "unmounted; the server wrote everything back and exited"),
            (MountError.exit_code, "not a zblock mount, the unmount failed, or the server did not exit "
                                   "cleanly within --timeout"),
            (UsageError.exit_code, "usage error"),
            (WritebackFailed.exit_code, "writing back failed: the mount stays up and keeps the data")))
    p.add_argument("mountpoint")
    p.add_argument("--force", action="store_true",
                   help="abort the FUSE connection first and unmount lazily: for a server that no "
                        "longer answers; pages not yet written back are lost")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for the server to exit (default: %(default).0f)")


# Classification for the Prometheus names and the table (DESIGN.md "Stats").
COUNTERS = {"pool_limit_hit", "written_back_pages", "flushed_pages", "written_through_pages",
            "reject_compress_poor", "reject_compress_fail", "reject_alloc_fail",
            "reject_reclaim_fail", "reject_pool_limit", "bypassed_pages", "decompress_fail",
            "bd_reads", "bd_writes", "bd_readahead_pages", "bd_readahead_hits",
            "bd_read_ios", "bd_write_ios", "bd_read_us", "bd_write_us", "zswpout", "zswpin",
            "zswpwb", "discarded_pages", "far_writes", "far_reads", "far_demoted_pages",
            "far_errors", "far_checksum_errors",
            "checksum_errors", "hw_submitted", "hw_completed", "hw_backlogged", "hw_rejected_full",
            "hw_errors", "hw_fallbacks"}
BYTE_GAUGES = {"pool_total_size", "orig_data_size", "compr_data_size", "mem_used_max", "pool_limit",
               "size", "disk_size"}


def _prom_name(key: str) -> str:
    name = "zblock_" + key
    if key in COUNTERS:
        return name + "_total"
    if key in BYTE_GAUGES and not key.endswith("_bytes"):
        return name + "_bytes"
    return name


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_prometheus(stats: dict) -> str:
    out: dict[str, list[str]] = {}

    def emit(key: str, value, labels: dict | None = None) -> None:
        name = _prom_name(key)
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"
        out.setdefault(name, []).append(f"{name}{lab} {value}")

    for key, value in stats.items():
        if key == "schema":
            continue
        if _num(value):
            emit(key, value)
        elif isinstance(value, bool):
            emit(key, int(value))
        elif key == "pools" and isinstance(value, list):
            for i, pool in enumerate(value):
                labels = {"pool": str(i), "compressor": pool.get("compressor", "")}
                for k, v in pool.items():
                    if _num(v):
                        emit(f"pool_{k}", v, labels)
        elif key == "request_sizes" and isinstance(value, dict):
            for op, hist in value.items():
                if isinstance(hist, dict):
                    for size, n in hist.items():
                        if _num(n):
                            out.setdefault("zblock_requests_total", []).append(
                                f'zblock_requests_total{{op="{_esc(op)}",size="{_esc(size)}"}} {n}')
        elif isinstance(value, dict):
            for k, v in value.items():
                if _num(v):
                    emit(f"{key}_{k}", v)
                elif isinstance(v, dict):      # hw.latency_us {p50, ...}
                    for q, qv in v.items():
                        if _num(qv):
                            emit(f"{key}_{k}", qv, {"quantile": q})
    lines = []
    for name, samples in out.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"


def _human_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(stats: dict) -> str:
    rows: list[tuple[str, str]] = []
    if stats.get("pool_over_limit") and stats.get("io_errors"):
        rows.append(("WARNING", f"the pool is {_human_bytes(stats['pool_over_limit'])} over its "
                                f"limit: the backing disk refuses writes (io_errors)"))
    if stats.get("sparse"):
        rows.append(("WARNING", "sparse backing file: its space is not reserved (--sparse)"))
    orig, compr = stats.get("orig_data_size"), stats.get("compr_data_size")
    if _num(orig) and _num(compr) and compr:
        rows.append(("compression ratio", f"{orig / compr:.2f}"))
    for op in ("read", "write"):
        rows.extend(_disk_row(stats, op))
    for key, value in stats.items():
        if key in ("schema",):
            continue
        if _num(value):
            shown = f"{value}"
            if key in BYTE_GAUGES or key.endswith("_bytes"):
                shown = f"{value}  ({_human_bytes(value)})"
            rows.append((key, shown))
        elif isinstance(value, str):
            rows.append((key, value))
        elif isinstance(value, bool):
            rows.append((key, "yes" if value else "no"))
        elif key == "far_nodes" and isinstance(value, list):
            rows.append((key, ", ".join(map(str, value)) or "-"))
        elif key == "pools" and isinstance(value, list):
            for i, pool in enumerate(value):
                rows.append((f"pool {i}", ", ".join(f"{k}={v}" for k, v in pool.items())))
        elif key == "request_sizes" and isinstance(value, dict):
            for op, hist in value.items():
                if isinstance(hist, dict) and hist:
                    rows.append((f"{op} request sizes", ", ".join(f"{s}: {n}" for s, n in hist.items())))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, dict):
                    v = ", ".join(f"{q}={qv}" for q, qv in v.items())
                rows.append((f"{key}.{k}", str(v)))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def _disk_row(stats: dict, op: str) -> list[tuple[str, str]]:
    """The backing disk's reads or writes in figures: pages per I/O call, the mean wait of a
    call, and MB/s while waiting (bytes over the time spent in the calls)."""
    pages, ios, us = (stats.get(f"bd_{op}s"), stats.get(f"bd_{op}_ios"),
                      stats.get(f"bd_{op}_us"))
    if not (_num(pages) and _num(ios) and _num(us)) or not ios:
        return []
    rate = f", {pages * PAGE_SIZE / us:.0f} MB/s while waiting" if us else ""
    return [(f"disk {op}s", f"{pages / ios:.1f} pages an I/O, {us / ios:.0f} us an I/O{rate}")]


def _add_stats(sub) -> None:
    p = _help_parser(
        sub, "stats", "show the stats of a mount",
        "Print the counters and gauges of a mount, read from MOUNTPOINT/stats: a table (with\n"
        "the compression ratio first), the JSON itself (\"schema\": 1), or the Prometheus text\n"
        "format. README.md \"How it maps to zswap and zram\" explains the names.",
        _exit_status(
            (0, "printed"),
            (MountError.exit_code, f"not a zblock mount, or no answer within {ANSWER_TIMEOUT:.0f} s"),
            (UsageError.exit_code, "usage error")))
    p.add_argument("mountpoint")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="the stats file as it is (sorted, indented)")
    g.add_argument("--prometheus", action="store_true", help="Prometheus text format (zblock_* metrics)")


def cmd_stats(args, argv) -> int:
    stats = read_stats(args.mountpoint)
    if args.json:
        sys.stdout.write(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    elif args.prometheus:
        sys.stdout.write(format_prometheus(stats))
    else:
        sys.stdout.write(format_table(stats))
    return 0


def _set_epilog() -> str:
    """The run-time params, from PARAMS: their values and defaults cannot go out of date here."""
    lines = ["run-time params (values; default):"]
    for name, param in PARAMS.items():
        if param.runtime:
            lines += textwrap.wrap(f"{param.help}; default {default_text(name)}", _HELP_WIDTH,
                                   initial_indent=f"  {name:<26}", subsequent_indent=" " * 28)
    fixed = [name for name, param in PARAMS.items() if not param.runtime]
    lines += [f"fixed at mount: {', '.join(fixed)}", "",
              _exit_status(
                  (0, "every value written"),
                  (MountError.exit_code, f"not a zblock mount, or no answer within {ANSWER_TIMEOUT:.0f} s"),
                  (UsageError.exit_code, "usage error, or an unknown, fixed or invalid param "
                                         "(all are checked before the first is written)"))]
    return "\n".join(lines)


def _add_set(sub) -> None:
    p = _help_parser(
        sub, "set", "change params of a mount",
        "Change run-time params of a mounted store by writing MOUNTPOINT/params/NAME, as one\n"
        "would /sys/module/zswap/parameters/NAME. Each NAME=VALUE is checked before the first\n"
        "is written; an invalid value changes nothing. Reading params/NAME shows the value.",
        _set_epilog)
    p.add_argument("mountpoint")
    p.add_argument("assignments", nargs="+", metavar="NAME=VALUE")


def cmd_set(args, argv) -> int:
    find_zblock_mount(args.mountpoint)
    pairs = []
    for item in args.assignments:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError(f"set: {item!r} is not NAME=VALUE")
        param = PARAMS.get(name)
        if param is None:
            raise UsageError(f"set: unknown parameter {name!r}")
        if not param.runtime:
            raise UsageError(f"set: {name} cannot change on a mounted store")
        Config().set(name, value)          # the server validates again; this gives the message
        pairs.append((name, value))
    for name, value in pairs:
        path = os.path.join(args.mountpoint, "params", name)

        def write(path=path, value=value):
            with open(path, "w") as f:
                f.write(value + "\n")
        try:
            run_with_deadline(write, ANSWER_TIMEOUT, f"set {name}")
        except FileNotFoundError:
            raise UsageError(f"set: this mount has no parameter {name!r}") from None
        except OSError as e:
            raise ConfigError(f"set {name}={value}: {e.strerror}") from None
    return 0


def cmd_fsck(args, argv) -> int:
    from . import backing
    from .seal import read_key_file
    try:
        key = read_key_file(args.key_file) if args.key_file else None
        report = backing.fsck(args.backing, key)
    except ZblockError as e:
        print(f"zblock: fsck: {e}", file=sys.stderr)
        return backing.FSCK_USAGE
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(report.summary())
    return report.exit_code


def _fsck_epilog() -> str:
    # The codes are backing.py's (e2fsck's convention), which cmd_fsck returns; what each means
    # to a user is said here, once.
    from . import backing
    return _exit_status(
        (backing.FSCK_CLEAN, "clean: closed cleanly, every page matches its checksum"),
        (backing.FSCK_PROBLEMS, "problems found: not closed cleanly, or pages written since the last "
                                "sync (either version may be on disk)"),
        (backing.FSCK_DAMAGE, "damage that needs action: bad or lost pages (they read as EIO until "
                              "rewritten), or a sidecar that cannot be used"),
        (backing.FSCK_USAGE, "usage or operational error, nothing checked: file missing, not a file, "
                             "or in use by a mount"))


def _add_fsck(sub) -> None:
    p = _help_parser(
        sub, "fsck", "check an unmounted backing file",
        "Check an unmounted backing file against its sidecar BACKING.zbmeta (a CRC32C per page):\n"
        "the header, the size, and every page. It only reads; nothing is repaired.",
        _fsck_epilog)
    p.add_argument("backing")
    p.add_argument("--key-file", help="an encrypted image's key: check every page's "
                                      "authentication tag too")
    p.add_argument("--json", action="store_true", help="the report as JSON")


# ---------------------------------------------------------------------------------------------
# list


# Per mount: list reads every zblock mount in turn, and a hung one must not hold up the rest long.
LIST_TIMEOUT = 5.0
LIST_COLUMNS = ("MOUNTPOINT", "BACKING", "SIZE", "COMPRESSOR", "POOL", "LIMIT", "RATIO", "SWAP")
DEAD = "dead (zblock umount --force)"


def list_row(mountpoint: str, timeout: float = LIST_TIMEOUT) -> dict | None:
    """One zblock mount as `list` shows it; a mount that does not answer is a "dead" row, not an
    error. None if it was unmounted meanwhile."""
    row: dict = {"mountpoint": mountpoint, "backing": None, "state": "ok"}
    try:
        # the pid file's name resolves the mount point, which waits on a hung server: a deadline
        row["backing"] = run_with_deadline(lambda: pid_file_backing(mountpoint), timeout, "pid file")
        stats = read_stats(mountpoint, timeout)
        compressor = read_mount_file(mountpoint, "params/compressor", timeout).strip()
    except NotAZblockMount:
        return None
    except (ZblockError, OSError) as e:     # no answer in time, ENOTCONN (server gone), ECONNABORTED
        return {**row, "state": "dead", "error": str(e)}
    orig, compr = stats.get("orig_data_size"), stats.get("compr_data_size")
    swap_devices = [dev for dev in swapctl.loops_over(os.path.join(mountpoint, "disk"))
                    if swapctl.swap_entry(dev)]
    return {**row, "backing": stats.get("backing") or row["backing"], "size": stats.get("disk_size"),
            "compressor": compressor, "pool_total_size": stats.get("pool_total_size"),
            "pool_limit": stats.get("pool_limit"),
            "ratio": orig / compr if _num(orig) and _num(compr) and compr else None,
            "swap": bool(stats.get("swap")), "swap_devices": swap_devices}


def format_list(rows: list[dict]) -> str:
    """zramctl-like columns; a dead mount's row ends with DEAD after its backing file."""
    def size(v) -> str:
        return _human_bytes(v) if _num(v) else "-"
    table = [LIST_COLUMNS]
    for r in rows:
        cells = (r["mountpoint"], r["backing"] or "-")
        if r["state"] != "ok":
            table.append(cells + (DEAD,))
            continue
        # SWAP: the loop device swapped on, "off" for a --swap mount not in use, "-" for others
        swap_cell = ",".join(r["swap_devices"]) or ("off" if r["swap"] else "-")
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        table.append(cells + (size(r["size"]), r["compressor"], size(r["pool_total_size"]),
                              size(r["pool_limit"]), ratio, swap_cell))
    # widths from full rows: a dead row's last cell runs on unpadded
    widths = [max(len(t[i]) for t in table if len(t) == len(LIST_COLUMNS)) for i in range(len(LIST_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(t, widths)).rstrip() for t in table]
    return "\n".join(lines) + "\n"


def cmd_list(args, argv) -> int:
    mountpoints = dict.fromkeys(m.mountpoint for m in mounts() if m.fstype == FSTYPE)
    rows = [r for r in (list_row(mp, args.timeout) for mp in mountpoints) if r is not None]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        sys.stdout.write(format_list(rows))
    return 0


def _add_list(sub) -> None:
    p = _help_parser(
        sub, "list", "list the zblock mounts on this machine",
        "One line per zblock mount (from /proc/self/mountinfo), like zramctl: mount point,\n"
        "backing file, disk size, compressor, pool bytes, pool limit, compression ratio and\n"
        "swap (the loop device swapped on; \"off\" for a --swap mount not in use). A mount\n"
        f"that does not answer within --timeout is listed as \"{DEAD}\".",
        _exit_status((0, "listed (dead mounts are rows, not errors)"),
                     (UsageError.exit_code, "usage error")))
    p.add_argument("--json", action="store_true", help="a JSON list, sizes in bytes")
    p.add_argument("--timeout", type=float, default=LIST_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for each mount to answer (default: %(default).0f)")


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zblock", description="A compressed, swap-like block store in user space.")
    parser.add_argument("--version", action="version", version=f"zblock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_mount(sub)
    _add_umount(sub)
    _add_stats(sub)
    _add_set(sub)
    _add_fsck(sub)
    _add_list(sub)
    swapctl.register_cli(sub)       # their commands live beside their code
    bench.register_cli(sub)
    controls.register_cli(sub)
    return parser


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "stats": cmd_stats, "set": cmd_set,
            "fsck": cmd_fsck, "list": cmd_list}


def main(argv: list[str] | None = None, *, store_factory=None, program: list[str] | None = None) -> int:
    """Run one command; returns its exit code.

    For test entry points (tests/faultserver.py), not options: a mount's server opens its Store
    with `store_factory` (see daemon.serve), and a background mount starts `program` (the entry
    point again) in place of `python -m zblock`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "mount":
            return cmd_mount(args, argv, store_factory=store_factory, program=program)
        func = COMMANDS.get(args.command) or getattr(args, "func", None)
        if func is None:
            raise UsageError(f"unknown command {args.command}")
        return func(args, argv) or 0
    except ZblockError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"zblock: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("zblock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
