"""`zblock bench` (zblock/bench.py) end to end, small: every page read back is checked by the
command itself (exit 1 on a mismatch), so a pass means the replay and the table both work."""

import json
import struct

import pytest


@pytest.mark.timeout(300)
def test_zblock_bench_runs(tmp_path, capsys):
    bench = pytest.importorskip("zblock.bench")
    trace = tmp_path / "t.trace"
    trace.write_text("# op offset length\nW 0 1048576\nW 8192 100\nR 0 1048576\nD 0 4096\nR 0 8192\n")
    assert bench.main(["--pages", "512", "--accelerator", "none,sim", "--trace", str(trace),
                       "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {(r["accelerator"], r["submit"]) for r in rows} == {
        ("none", "page"), ("none", "batch"), ("sim", "page"), ("sim", "batch")}
    assert all(r["ratio"] and r["ratio"] > 1.0 for r in rows)   # the mixed set compresses
    assert bench.main(["--compressor", "nope"]) == 2


def test_plot_is_a_readable_grid(tmp_path):
    """--plot draws 1600x1000 pixels, whatever the number of settings (the old strip grew
    1200 pixels wide per row)."""
    pytest.importorskip("matplotlib")
    bench = pytest.importorskip("zblock.bench")
    png = tmp_path / "bench.png"
    assert bench.main(["--pages", "64", "--compressor", "lz4,zstd", "--accelerator", "none,sim",
                       "--hw-mode", "sync,async", "--plot", str(png)]) == 0
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1600, 1000)
