import re

import pytest

from mountutil import wait_for
from zblock import PAGE_SIZE
from zblock.config import (MAX_SIZE, PARAMS, Config, parse_disk_size, parse_pool_limit, parse_size,
                           total_ram)
from zblock.errors import ConfigError, UnknownCompressor
from zblock.store import Store


def test_sizes():
    assert parse_size("4096") == 4096
    assert parse_size("4K") == 4096 and parse_size("2M") == 2 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("1T") == 1 << 40 and parse_size("3g") == 3 << 30 and parse_size("8KiB") == 8192
    assert parse_disk_size("4G") == 4 << 30
    for bad in ("", "x", "-4K", "1.5G", "4Q", "1e3", "4iB", "٤K"):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)
    for bad in ("4095", "0", "6000", "1MB", "100MB"):
        with pytest.raises(ConfigError, match="multiple of 4096"):
            parse_disk_size(bad)


def test_sizes_si_suffixes_are_powers_of_1000():
    # util-linux's rule: KB, MB, GB, TB count in 1000s; K/KiB, M/MiB ... in 1024s (any case)
    assert parse_size("1KB") == 1000 and parse_size("64MB") == 64_000_000 and parse_size("2gb") == 2 * 10**9
    assert parse_size("1TB") == 10**12 and parse_size("4096B") == 4096
    assert parse_size("64M") == parse_size("64MiB") == parse_size("64mib") == 64 << 20
    assert parse_disk_size("64MB") == 64_000_000          # 15625 pages: a multiple of 4096
    with pytest.raises(ConfigError) as e:
        parse_disk_size("1MB")
    assert "1000000 bytes" in str(e.value) and "M or MiB" in str(e.value)


@pytest.mark.parametrize("text", ["1P", "1PB", "2PiB", "1E", "17T", "16385G", "99999999999999999999",
                                  "9" * 5000])
def test_sizes_too_large_name_the_maximum(text):
    with pytest.raises(ConfigError, match=r"too large \(the maximum is 16T = 17592186044416 bytes\)"):
        parse_disk_size(text)
    assert parse_disk_size("16T") == parse_size("16TiB") == MAX_SIZE


def test_pool_limit_percent_reads_back_in_bytes():
    assert parse_pool_limit("20%") == int(total_ram() * 0.2)
    assert parse_pool_limit("64M") == 64 << 20
    cfg = Config()
    cfg.set("pool_limit", "1M")
    assert cfg.get("pool_limit") == str(1 << 20)
    for bad, why in [("101%", "between 0% and 100%"), ("-1%", "between 0% and 100%"),
                     ("abc%", "not a percentage"), ("100", "smaller than one page"), ("-5", "not a size")]:
        with pytest.raises(ConfigError, match=why):
            parse_pool_limit(bad)


@pytest.mark.parametrize("policy", ["evict", "zswap"])
def test_pool_limit_zero_sends_every_page_to_disk(tmp_path, policy):
    """0% is what the message "between 0% and 100%" promises: no pool; pages reach the disk at
    once (zswap's max_pool_percent=0), and every byte still reads back."""
    assert parse_pool_limit("0%") == parse_pool_limit("0") == 0
    cfg = Config.from_strings({"pool_limit": "0%", "limit_policy": policy, "shrinker_enabled": "N"})
    data = b"".join((f"page {i:05} ".encode() * 400)[:PAGE_SIZE] for i in range(512))
    store = Store.open(str(tmp_path / "disk.img"), 4 << 20, cfg)
    try:
        store.write(0, data)
        wait_for(lambda: store.stats()["pool_total_size"] == 0, what="an empty pool")
        st = store.stats()
        assert st["bd_writes"] >= len(data) // PAGE_SIZE and st["pool_limit_hit"] > 0
        assert store.read(0, len(data)) == data
    finally:
        store.close()


@pytest.mark.parametrize("name,bad", [
    ("compressor", "brotli"), ("zstd_level", "0"), ("zstd_level", "20"), ("accept_threshold", "101"),
    ("limit_policy", "drop"), ("incompressible_policy", "x"), ("same_filled_pages_enabled", "maybe"),
    ("accelerator", "gpu"), ("hw_queues", "0"), ("hw_mode", "poll"), ("hw_batch", "257"),
    ("hw_fault_rate", "1.5"), ("hw_fault_rate", "nan"), ("hw_throughput_mbps", "0"), ("hw_seed", "-1"),
    ("hw_seed", "99999999999999999999"), ("hw_seed", "4294967296"), ("hw_seed", "1e3"), ("hw_seed", "+5"),
    ("hw_depth", "1_000"), ("contexts", "٤"), ("zstd_level", "3.0"), ("hw_queues", "9" * 5000),
])
def test_invalid_values_change_nothing(name, bad):
    cfg = Config()
    before = cfg.get(name)
    with pytest.raises(ConfigError) as e:
        cfg.set(name, bad)
    assert name in str(e.value)
    assert cfg.get(name) == before


SIZE_PARAMS = ("pool_limit", "far_limit", "far_dirty_limit", "writeback_limit",   # sizes
               "sequential_cutoff")
INT_PARAMS = [name for name in PARAMS if type(getattr(Config(), name)) is int
              and name not in SIZE_PARAMS]


def test_every_int_param_takes_plain_decimal_in_its_stated_range():
    """One parser for all integer params: digits only (no 1e3, 1_000, +5), range in the help."""
    assert set(INT_PARAMS) >= {"zstd_level", "accept_threshold", "hw_queues", "hw_depth", "hw_batch",
                               "hw_seed", "contexts"}
    for name in INT_PARAMS:
        lo, hi = map(int, re.search(r"\((-?\d+)\.\.(\d+)\)$", PARAMS[name].help).groups())
        cfg = Config()
        cfg.set(name, f" {hi}\n")           # a param file's newline is fine
        assert getattr(cfg, name) == hi
        cfg.set(name, str(lo))
        assert getattr(cfg, name) == lo
        for bad, why in [(str(hi + 1), "out of range"), (str(lo - 1), "out of range"),
                         ("1e3", "not a decimal integer"), ("1_0", "not a decimal integer"),
                         ("+1", "not a decimal integer"), ("0x10", "not a decimal integer")]:
            with pytest.raises(ConfigError, match=f"^{name}: .*{why} \\({lo}\\.\\.{hi}\\)$"):
                cfg.set(name, bad)
    assert PARAMS["hw_seed"].help.endswith("(0..4294967295)")


def test_formats_and_table():
    cfg = Config.from_strings({"compressor": "zstd\n", "zstd_level": "3", "shrinker_enabled": "n",
                               "hw_latency_us": "2.5"})
    assert (cfg.get("compressor"), cfg.get("zstd_level"), cfg.get("shrinker_enabled")) == ("zstd", "3", "N")
    assert cfg.get("hw_latency_us") == "2.5"
    assert set(PARAMS) >= {"compressor", "pool_limit", "accept_threshold", "limit_policy",
                           "incompressible_policy", "same_filled_pages_enabled", "shrinker_enabled"}
    with pytest.raises(UnknownCompressor):
        Config.from_strings({"compressor": "lz77"})
    with pytest.raises(ConfigError, match="kernel-cache"):
        Config.from_strings({"swap": "Y", "kernel_cache": "Y"})
