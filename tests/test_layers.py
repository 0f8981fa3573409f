"""Layers point down: the import graph has no cycle, the core imports nothing above it, and the
commands that need no engine load none.

The graph comes from the source (tests/importgraph.py, ast), with imports inside functions
counted like the others: a lazy import is still a dependency. The core is every module not
named in UPPER, so a module added to the engine is checked without editing this file.
"""

from __future__ import annotations

import json
import subprocess
import sys

import importgraph
import mountutil

# The layers above the core: the CLI and its commands, the daemon and its leaf modules, the FUSE
# adapter. Everything else in the package is the core (store, cache, pools, acomp, engine,
# compressors, backing, disk, staging, readahead, and what they share: config, errors, libc).
UPPER = {"zblock.__main__", "zblock.cli", "zblock.bench", "zblock.demo", "zblock.daemon",
         "zblock.hardening", "zblock.memory", "zblock.sdnotify", "zblock.runtime",
         "zblock.swapctl", "zblock.controls", "zblock.fuse_ops", "zblock.threadstate", "zblock.fuse",
         "zblock.fuse.native", "zblock.fuse.protocol", "zblock.fuse.libfuse", "zblock.fuse.uring",
         "zblock.fuse.readers", "zblock.fuse._devread"}
ENGINE = {"zblock.compressors", "zblock.acomp", "zblock.accel", "zblock.cache", "numpy"}


def run_python(code: str, **env: str) -> str:
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=60, env={**mountutil.env(), **env}, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_graph_is_read_and_has_no_cycle():
    g = importgraph.graph()
    assert {"zblock.store", "zblock.cli", "zblock.daemon", "zblock.swapctl"} <= set(g)
    assert UPPER <= set(g), f"UPPER names modules that no longer exist: {UPPER - set(g)}"
    assert "zblock.store" in g["zblock.daemon"]          # lazy imports are edges too
    assert importgraph.cycles(g) == []


def test_the_core_imports_nothing_above_it():
    g = importgraph.graph()
    bad = {m: sorted(set(edges) & UPPER) for m, edges in g.items()
           if m not in UPPER and set(edges) & UPPER}
    assert not bad, f"core modules importing upper layers: {bad}"


def test_the_leaf_modules_import_only_downwards():
    """daemon -> leaf modules + store; the leaves import no daemon, CLI or each other's callers."""
    g = importgraph.graph()
    above_leaves = {"zblock.__main__", "zblock.cli", "zblock.bench", "zblock.demo", "zblock.daemon"}
    for leaf in ("zblock.hardening", "zblock.memory", "zblock.sdnotify", "zblock.runtime",
                 "zblock.swapctl"):
        assert not set(g[leaf]) & above_leaves, (leaf, g[leaf])
    assert not set(g["zblock.daemon"]) & {"zblock.cli", "zblock.bench", "zblock.swapctl"}


def test_the_core_imports_without_the_upper_layers():
    core = sorted(m for m in importgraph.graph() if m not in UPPER and m != "zblock._lz4pages")
    loaded = json.loads(run_python(
        "import importlib, json, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('zblock'))))"))
    assert set(core) <= set(loaded)
    assert not set(loaded) & UPPER, sorted(set(loaded) & UPPER)


def _imported_by(*argv: str) -> set[str]:
    """Modules `python -X importtime -m zblock ARGV` imports (its stderr names each one)."""
    res = subprocess.run([sys.executable, "-P", "-X", "importtime", "-m", "zblock", *argv],
                         capture_output=True, text=True, timeout=60, env=mountutil.env(), cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    names = {ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines()
             if ln.startswith("import time:") and ln.count("|") == 2}
    assert "zblock.cli" in names, res.stderr[-2000:]
    return names


def test_swapoff_and_list_load_no_compression_code():
    for argv in (["swapoff", "--help"], ["swapon", "--help"], ["list", "--help"]):
        names = _imported_by(*argv)
        assert "zblock.swapctl" in names
        assert not names & ENGINE, (argv, sorted(names & ENGINE))
    # what swapoff runs, imported on its own
    loaded = set(json.loads(run_python(
        "import json, sys, zblock.swapctl\nprint(json.dumps(sorted(sys.modules)))")))
    assert not loaded & ENGINE, sorted(loaded & ENGINE)


def test_the_printer_runs():
    res = subprocess.run([sys.executable, importgraph.__file__], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("zblock.cli -> ") for ln in lines)
    assert not any(ln.startswith("cycle:") for ln in lines)


def test_no_class_is_over_400_lines():
    """One class per concept: a class past 400 lines has taken on a second one (the core
    redesign's bar; Cache had reached about 1,030)."""
    import ast
    import pathlib
    big = []
    for path in (pathlib.Path(importgraph.__file__).resolve().parents[1] / "zblock").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 400:
                big.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not big, big


def test_a_server_that_encrypts_nothing_loads_no_openssl():
    """What a mount imports (the CLI, the daemon, the native front end, the whole core) and an
    open Store without --encrypt or --far: no cryptography package, no OpenSSL through hashlib
    or zblock._sealpages (about 13 MiB of an idle server's RSS), and no importlib.metadata with
    its email and zipfile packages (1.3 MiB; crc32c 2.8 imports it; docs/performance.md)."""
    loaded = set(json.loads(run_python(
        "import json, os, sys, tempfile\n"
        "import zblock.cli, zblock.daemon, zblock.fuse.native\n"
        "from zblock.config import Config\n"
        "from zblock.store import Store\n"
        "d = tempfile.mkdtemp()\n"
        "s = Store.open(os.path.join(d, 'b.img'), 1 << 24, Config())\n"
        "s.write(0, b'x' * 8192); s.read(0, 8192); s.stats(); s.fsync(); s.close()\n"
        "print(json.dumps(sorted(sys.modules)))")))
    assert "zblock.store" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("cryptography", "_hashlib", "hashlib")
             or m in ("zblock._sealpages", "importlib.metadata", "email", "zipfile")}
    assert not heavy, sorted(heavy)


def test_no_module_of_the_package_loads_numpy():
    """numpy cost an idle server 14.9 MiB of its 35 (docs/performance.md): every module of the
    package, and a store written, read, flushed and discarded with and without the optional C
    extensions, load none of it."""
    modules = sorted(m for m in importgraph.graph() if not m.startswith("zblock._"))
    for no_extension in ("0", "1"):
        loaded = set(json.loads(run_python(
            "import importlib, json, os, sys, tempfile\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "from zblock.config import Config\n"
            "from zblock.store import Store\n"
            "d = tempfile.mkdtemp()\n"
            "s = Store.open(os.path.join(d, 'b.img'), 1 << 24, Config())\n"
            "s.write(0, os.urandom(4096) + bytes(8192) + b'ab' * 40960)\n"
            "assert s.read(4096, 8192) == bytes(8192)\n"
            "s.fsync(); s.discard(0, 1 << 24); s.stats(); s.close()\n"
            "print(json.dumps(sorted(sys.modules)))", ZBLOCK_NO_EXTENSION=no_extension)))
        assert "zblock.store" in loaded
        assert not {m for m in loaded if m.split(".")[0] == "numpy"}, no_extension
