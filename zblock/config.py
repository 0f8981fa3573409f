"""Tunables: one table for mount options, `-o` options and the files under params/.

Every value is parsed and validated here, once, naming the parameter (ConfigError).
`Config` holds the parsed values; `PARAMS` says how each is parsed, shown and whether it can
change at run time. Reading a param gives `format(value)`; writing one goes through `parse`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from . import PAGE_SIZE
from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# value parsers

# Size suffixes as util-linux reads them (strtosize): K, M, G, T and KiB .. TiB are powers of
# 1024, KB .. TB powers of 1000; the case of the letters does not matter. P and E are known units
# too, but beyond MAX_SIZE: refused as too large, not as "not a size".
_BINARY_UNITS = {p + s: 1024 ** i for i, p in enumerate("KMGTPE", 1) for s in ("", "IB")}
_DECIMAL_UNITS = {p + "B": 1000 ** i for i, p in enumerate("KMGTPE", 1)}
_UNITS = {"": 1, "B": 1, **_BINARY_UNITS, **_DECIMAL_UNITS}
SIZE_SUFFIXES = "K/KiB, M/MiB, G/GiB, T/TiB = powers of 1024; KB, MB, GB, TB = powers of 1000"

# The largest size taken: 16 TiB = 2**32 pages. Every page costs 43 bytes of RAM in the entry
# table (cache.py: 35) and the checksum table (backing.py: 8), so a disk this big already needs
# 185 GB of RAM; the cap catches typos such as 1P rather than marking what a machine can hold.
MAX_SIZE = 16 << 40


def _parse_size_unit(text: str, name: str) -> tuple[int, str]:
    """(bytes, the suffix as written, upper case) of a size; ConfigError naming `name`."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if unit not in _UNITS:
        raise ConfigError(f"{name}: {text!r} is not a size (a number with an optional suffix: {SIZE_SUFFIXES})")
    digits = m.group(1).lstrip("0") or "0"
    # more digits than MAX_SIZE is too large whatever the unit (and int() refuses 4300 digits)
    if len(digits) > len(str(MAX_SIZE)) or int(digits) * _UNITS[unit] > MAX_SIZE:
        raise ConfigError(f"{name}: {text!r} is too large (the maximum is {MAX_SIZE >> 40}T = {MAX_SIZE} bytes)")
    return int(digits) * _UNITS[unit], unit


def parse_size(text: str, name: str = "size") -> int:
    """Bytes, with an optional suffix (SIZE_SUFFIXES), at most MAX_SIZE."""
    return _parse_size_unit(text, name)[0]


def parse_disk_size(text: str) -> int:
    size, unit = _parse_size_unit(text, "--size")
    if size <= 0 or size % PAGE_SIZE:
        hint = f" ({unit} is a power of 1000; {unit[0]} or {unit[0]}iB is a power of 1024)" \
            if unit in _DECIMAL_UNITS else ""
        raise ConfigError(f"--size: {text!r} is {size} bytes, not a positive multiple of {PAGE_SIZE}{hint}")
    return size


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_pool_limit(text: str) -> int:
    """`N%` of RAM, 0..100 (zswap's max_pool_percent), or bytes with a suffix: 0 or at least a page.

    0 (or 0%) is a pool of no bytes, as zswap's max_pool_percent=0 is: the pool is always full,
    so each compressed page goes on to disk right away (written back at once, or rejected under
    the zswap policy). tests/test_config.py checks the data and the counters."""
    t = str(text).strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ConfigError(f"pool_limit: {text!r} is not a percentage") from None
        if not 0 <= pct <= 100:
            raise ConfigError(f"pool_limit: {text!r} must be between 0% and 100%")
        return int(total_ram() * pct / 100)
    limit = parse_size(t, "pool_limit")
    if 0 < limit < PAGE_SIZE:
        raise ConfigError(f"pool_limit: {text!r} is smaller than one page ({PAGE_SIZE} bytes; 0 means no pool)")
    return limit


def _int_range(name: str, lo: int, hi: int) -> Callable[[str], int]:
    """Plain decimal digits (and a minus) in lo..hi. Not int()'s other spellings: 1_000, +5, digits
    of other scripts; 1e3 is refused too, not read as 1000."""
    def parse(text: str) -> int:
        m = re.fullmatch(r"\s*(-?)([0-9]+)\s*", str(text))
        if not m:
            raise ConfigError(f"{name}: {text!r} is not a decimal integer ({lo}..{hi})")
        sign, digits = m.group(1), m.group(2).lstrip("0") or "0"
        # lengths first: int() refuses 4300 digits, and anything that long is out of range
        if len(digits) > len(str(max(-lo, hi))) or not lo <= int(sign + digits) <= hi:
            raise ConfigError(f"{name}: {str(text).strip()!r} is out of range ({lo}..{hi})")
        return int(sign + digits)
    return parse


def _float_range(name: str, lo: float, hi: float | None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not a number") from None
        if v != v or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise ConfigError(f"{name}: {text!r} is out of range")
        return v
    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        v = str(text).strip()
        if v not in choices:
            raise ConfigError(f"{name}: {text!r} is not one of {', '.join(choices)}")
        return v
    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(text: str | bool) -> bool:
        if isinstance(text, bool):
            return text
        v = str(text).strip().upper()
        if v in ("Y", "1", "YES", "TRUE", "ON"):
            return True
        if v in ("N", "0", "NO", "FALSE", "OFF"):
            return False
        raise ConfigError(f"{name}: {text!r} is not Y or N")
    return parse


def _parse_compressor(text: str) -> str:
    from .compressors import check_available
    name = str(text).strip()
    check_available(name)
    return name


MAX_RECOMP = 3          # zram's secondary algorithms (ZRAM_MAX_COMPS - 1)


def parse_algorithm(text: str) -> tuple[str, int | None]:
    """NAME or NAME:LEVEL (only zstd takes a level), checked to be installed."""
    name, _, level = text.strip().partition(":")
    _parse_compressor(name)
    if not level:
        return name, None
    if name != "zstd":
        raise ConfigError(f"{text!r}: only zstd takes a level")
    return name, _int_range("zstd_level", 1, 19)(level)


def _parse_recomp(text: str) -> str:
    """recomp_algorithm: up to MAX_RECOMP algorithms, comma-separated, in priority order."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if len(items) > MAX_RECOMP:
        raise ConfigError(f"recomp_algorithm: at most {MAX_RECOMP} algorithms, got {len(items)}")
    for item in items:
        parse_algorithm(item)
    return ",".join(items)


def _parse_budget(text: str) -> int:
    """writeback_limit: `none` (no budget: -1) or bytes."""
    text = str(text).strip()
    if text.lower() in ("none", "-1"):
        return -1
    return parse_size(text, "writeback_limit")


def _fmt_budget(v: int) -> str:
    return "none" if v < 0 else str(v)


def _parse_far(text: str) -> str:
    """A far tier URL, checked (zblock.far.parse_url), or empty for none."""
    from .far import parse_url
    text = text.strip()
    if text:
        parse_url(text)
    return text


def _fmt_bool(v: bool) -> str:
    return "Y" if v else "N"


def _fmt_float(v: float) -> str:
    return repr(float(v)).rstrip("0").rstrip(".") if "." in repr(float(v)) else repr(v)


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Param:
    name: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str
    runtime: bool = True          # has a writable file under params/
    help: str = ""


def _int_param(name: str, lo: int, hi: int, help: str) -> Param:
    """An integer param: one parser (_int_range) for all, and the range stated in its help."""
    return Param(name, _int_range(name, lo, hi), help=f"{help} ({lo}..{hi})")


# random.Random (accel.py) takes any int; 32 bits are plenty to tell runs apart and to note down.
HW_SEED_MAX = 2**32 - 1

PARAMS: dict[str, Param] = {p.name: p for p in [
    Param("compressor", _parse_compressor, help="lz4, lzo, zstd or deflate: algorithm of the current pool"),
    _int_param("zstd_level", 1, 19, "zstd level"),
    Param("pool_limit", parse_pool_limit, help=f"pool limit: bytes ({SIZE_SUFFIXES}) or 0..100% of RAM; 0 or 0%: "
               "no pool, every compressed page goes on to disk at once"),
    _int_param("accept_threshold", 0, 100, "zswap policy: % of the limit to fall below before accepting again"),
    Param("limit_policy", _choice("limit_policy", ("evict", "zswap")),
          help="full pool: evict the coldest (evict) or reject until below the threshold (zswap)"),
    Param("incompressible_policy", _choice("incompressible_policy", ("store_raw", "reject")),
          help="incompressible pages: store raw (6.18) or send to disk"),
    Param("same_filled_pages_enabled", _bool("same_filled_pages_enabled"), _fmt_bool,
          help="keep same-filled pages as a fill value"),
    Param("shrinker_enabled", _bool("shrinker_enabled"), _fmt_bool,
          help="proactive writeback of cold pages below the limit"),
    Param("write_through", _bool("write_through"), _fmt_bool,
          help="persistent mode: write stored pages on to the backing file in the background, "
               "so fsync has little left to write"),
    Param("sequential_cutoff", lambda t: parse_size(t, "sequential_cutoff"),
          help=f"persistent mode: a run of writes to consecutive pages goes on to the backing file "
               f"uncompressed, past the pool, once it passes this many bytes ({SIZE_SUFFIXES}; "
               "bcache's sequential_cutoff); 0: every write goes into the pool"),
    Param("far", _parse_far, runtime=False,
          help="far tier: redis://HOST:PORT[,HOST:PORT...] (or rediss://) of a Redis Cluster that "
               "holds cold compressed pages before they go to the backing file; empty: none"),
    Param("far_limit", lambda t: parse_size(t, "far_limit"),
          help=f"bytes this instance may keep in the far tier ({SIZE_SUFFIXES}); past it the "
               "coldest far pages go to the backing file"),
    Param("far_dirty_limit", lambda t: parse_size(t, "far_dirty_limit"),
          help="persistent mode: far pages the backing file does not hold yet are written to it "
               "past this many bytes"),
    Param("far_replicas", _int_range("far_replicas", 0, 16), runtime=False,
          help="far tier: replicas that must acknowledge a page (Redis WAIT) before it leaves "
               "RAM (0..16)"),
    Param("far_timeout", _float_range("far_timeout", 0.1, 600), _fmt_float, runtime=False,
          help="far tier: seconds a request may retry before it fails (EIO on a read; a write "
               "goes to disk)"),
    Param("far_auth_file", str, runtime=False,
          help="far tier: file (mode 600) with the ACL user and password, `USER PASSWORD`"),
    Param("far_tls_ca", str, runtime=False,
          help="far tier over rediss://: the CA file the cluster's certificates are checked "
               "against (default: the system's)"),
    Param("far_tls_cert", str, runtime=False,
          help="far tier over rediss://: this client's certificate, for a cluster with "
               "tls-auth-clients (with far_tls_key)"),
    Param("far_tls_key", str, runtime=False, help="far tier over rediss://: the key of far_tls_cert"),
    Param("writeback_limit", _parse_budget, _fmt_budget,
          help=f"bytes writeback may still write to the backing file ({SIZE_SUFFIXES}; zram "
               "writeback_limit): spent by background and on-demand writeback, read back as what "
               "is left, refilled by writing it; none: no budget"),
    Param("recomp_algorithm", _parse_recomp,
          help="secondary algorithms for `recompress`, NAME or zstd:LEVEL, comma-separated in "
               f"priority order, at most {MAX_RECOMP} (zram recomp_algorithm); empty: none"),
    _int_param("promote_after", 0, 255, "bring a page read from the backing file or the far tier "
               "more than this many times back into the pool, below the accept threshold; 0: never"),
    Param("accelerator", _choice("accelerator", ("none", "sim")), help="none or sim (simulated engine)"),
    _int_param("hw_queues", 1, 64, "engine work queues"),
    _int_param("hw_depth", 1, 4096, "entries per engine queue"),
    Param("hw_latency_us", _float_range("hw_latency_us", 0, 1e6), _fmt_float, help="per-request latency"),
    Param("hw_throughput_mbps", _float_range("hw_throughput_mbps", 0, 1e6, lo_open=True), _fmt_float,
          help="per-queue throughput, MB/s"),
    Param("hw_mode", _choice("hw_mode", ("sync", "async")), help="sync (submitter polls) or async (callback)"),
    _int_param("hw_batch", 1, 256, "pages submitted together"),
    Param("hw_fault_rate", _float_range("hw_fault_rate", 0, 1), _fmt_float, help="injected engine error rate"),
    _int_param("hw_seed", 0, HW_SEED_MAX, "seed of the engine's faults"),
    _int_param("contexts", 1, 256, "acomp contexts per pool"),
    Param("kernel_cache", _bool("kernel_cache"), _fmt_bool, runtime=False,
          help="let the kernel cache the file's pages"),
    Param("swap", _bool("swap"), _fmt_bool, runtime=False, help="serve swap (hardening, ephemeral backing)"),
    Param("sparse", _bool("sparse"), _fmt_bool, runtime=False,
          help="do not reserve the backing file's space (writes fail once its filesystem is full)"),
    Param("read_only", _bool("read_only"), _fmt_bool, runtime=False,
          help="mount read-only: every write fails with EROFS, params too; nothing is written"),
    Param("dedup", _bool("dedup"), _fmt_bool, runtime=False,
          help="pages of identical content share one pool object (copy-on-write)"),
    Param("encrypt", _bool("encrypt"), _fmt_bool, runtime=False,
          help="encrypt every page that leaves RAM (backing file and far tier) with AES-256-GCM; "
               "the key comes from key_file, or in swap mode is made at random for each mount"),
    Param("key_file", str, runtime=False,
          help="with encrypt: file (mode 600) holding the 32-byte key, raw or as 64 hex digits"),
    Param("fuse_impl", _choice("fuse_impl", ("auto", "native", "mfusepy")), runtime=False,
          help="FUSE front end: native (zblock speaks the protocol; needs root), mfusepy "
               "(libfuse), or auto (native where this process may mount)"),
    Param("fuse_uring", _choice("fuse_uring", ("auto", "on", "off")), runtime=False,
          help="native front end: requests through FUSE over io_uring (Linux 6.14+, with the "
               "fuse module's enable_uring set): on, off, or auto (where the admin has enabled "
               "it); off by default, since random reads measured slower through it"),
]}


DEFAULT_POOL_LIMIT = "20%"       # zswap's max_pool_percent default
# what params/writeback and `zblock writeback --type` take (zram's writeback types)
WRITEBACK_TYPES = ("idle", "huge", "incompressible", "all")
RECOMPRESS_TYPES = ("idle", "huge", "huge_idle")


SWAP_NO_CUTOFF = ("sequential_cutoff: persistent mode only (swap pages are written once and read "
                  "back soon: what the pool is for)")


@dataclass
class Config:
    compressor: str = "lz4"
    zstd_level: int = 1
    pool_limit: int = field(default_factory=lambda: parse_pool_limit(DEFAULT_POOL_LIMIT))
    accept_threshold: int = 90
    limit_policy: str = "evict"
    incompressible_policy: str = "store_raw"
    same_filled_pages_enabled: bool = True
    shrinker_enabled: bool = True
    write_through: bool = False
    sequential_cutoff: int = 0
    writeback_limit: int = -1
    recomp_algorithm: str = ""
    promote_after: int = 0
    far: str = ""
    far_limit: int = 1 << 30
    far_dirty_limit: int = 256 << 20
    far_replicas: int = 1
    far_timeout: float = 5.0
    far_auth_file: str = ""
    far_tls_ca: str = ""
    far_tls_cert: str = ""
    far_tls_key: str = ""
    accelerator: str = "none"
    hw_queues: int = 4
    hw_depth: int = 128
    hw_latency_us: float = 3.0
    hw_throughput_mbps: float = 2000.0
    hw_mode: str = "sync"
    hw_batch: int = 8
    hw_fault_rate: float = 0.0
    hw_seed: int = 0
    contexts: int = field(default_factory=lambda: os.cpu_count() or 1)
    kernel_cache: bool = False
    swap: bool = False
    sparse: bool = False
    read_only: bool = False
    dedup: bool = False
    encrypt: bool = False
    key_file: str = ""
    fuse_impl: str = "auto"
    fuse_uring: str = "off"

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "Config":
        """Build from option strings (CLI or `-o`), validating each by its param's parser."""
        cfg = cls()
        for name, text in values.items():
            cfg.set(name, text)
        cfg.check()
        return cfg

    def set(self, name: str, text: Any) -> None:
        param = PARAMS.get(name)
        if param is None:
            raise ConfigError(f"unknown parameter {name!r}")
        setattr(self, name, param.parse(text))

    def get(self, name: str) -> str:
        return PARAMS[name].format(getattr(self, name))

    def check(self) -> None:
        if self.swap and self.kernel_cache:
            raise ConfigError("--kernel-cache cannot be used with --swap (swap pages would be cached twice)")
        if self.swap and self.sequential_cutoff:
            raise ConfigError(SWAP_NO_CUTOFF)
        if self.swap and self.sparse:
            raise ConfigError("--sparse cannot be used with --swap (swap space is always reserved: "
                              "reclaim must never meet ENOSPC)")
        if bool(self.far_tls_cert) != bool(self.far_tls_key):
            raise ConfigError("--far-tls-cert and --far-tls-key go together")
        if (self.far_tls_ca or self.far_tls_cert) and not self.far.startswith("rediss://"):
            raise ConfigError("--far-tls-* need a rediss:// --far URL")
        if self.far and self.read_only:
            raise ConfigError("--far cannot be used with --read-only (nothing is written back)")
        if self.swap and self.read_only:
            raise ConfigError("--read-only cannot be used with --swap (swap writes)")
        if self.key_file and not self.encrypt:
            raise ConfigError("--key-file is for --encrypt")
        if self.encrypt and self.swap and self.key_file:
            raise ConfigError("--key-file cannot be used with --swap: a swap mount encrypts with "
                              "a random key of its own, never written anywhere")
        if self.encrypt and not self.swap and not self.key_file:
            raise ConfigError("--encrypt needs --key-file FILE (make one with: "
                              "head -c 32 /dev/urandom > FILE; chmod 600 FILE)")


# Defaults that depend on the machine, as a user would say them (Config computes the number).
_MACHINE_DEFAULTS = {"pool_limit": f"{DEFAULT_POOL_LIMIT} of RAM", "contexts": "one per CPU"}


def default_text(name: str) -> str:
    """A param's default for help texts: the rule for machine-dependent ones, else the value as
    its params/ file reads it."""
    return _MACHINE_DEFAULTS.get(name) or Config().get(name)
