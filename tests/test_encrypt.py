"""Encryption of every page that leaves RAM (`--encrypt`, zblock.seal): engine tier with the
real backing files, one real mount with `strings` and `zblock fsck`. The model test with
encryption on is in test_store (test_store_matches_bytearray_model).
"""

import os
import shutil
import stat
import subprocess

import numpy as np
import pytest

import mountutil
from conftest import require
from mountutil import Mount
from test_crash import abandon
from test_store import write_key

from zblock import PAGE_SIZE
from zblock.backing import FSCK_CLEAN, FSCK_DAMAGE, fsck
from zblock.config import Config
from zblock.errors import BackingError, ConfigError, DataError
from zblock import seal
from zblock.seal import HEADER_SIZE, LEASE_STEP, ROW_BYTES, read_key_file, seal_path
from zblock.sidecar import meta_path
from zblock.store import Store

MiB = 1 << 20
MARKER = b"zblock-plaintext-marker:"


def marked_pages(n: int) -> bytes:
    """`n` pages full of MARKER, each also naming its page (so no two are the same)."""
    return b"".join((MARKER + b"%08d;" % i) * (PAGE_SIZE // (len(MARKER) + 9)) + b"." *
                    (PAGE_SIZE % (len(MARKER) + 9)) for i in range(n))


def encrypted(key_file: str, **kw) -> Config:
    # a pool of 16 pages: almost everything written goes on to the file
    cfg = Config(encrypt=True, key_file=key_file, pool_limit=16 * PAGE_SIZE,
                 write_through=True)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def img(tmp_path):
    return str(tmp_path / "img")


@pytest.fixture
def key(tmp_path):
    return write_key(str(tmp_path))


def test_no_plaintext_reaches_the_file_and_a_remount_reads_it_back(img, key):
    data = marked_pages(512)
    store = Store.open(img, 4 * MiB, encrypted(key))
    try:
        store.write(0, data)
        store.fsync()
        assert store.stats()["bd_writes"] >= 512 - 16
        assert store.read(0, len(data)) == data
    finally:
        store.close()
    for path in (img, meta_path(img), seal_path(img)):
        with open(path, "rb") as f:
            assert MARKER not in f.read(), path
    store = Store.open(img, None, encrypted(key))
    try:
        assert store.read(0, len(data)) == data
        assert store.stats()["checksum_errors"] == 0
    finally:
        store.close()
    assert fsck(img, read_key_file(key)).exit_code == FSCK_CLEAN


def test_a_wrong_key_no_key_or_a_clear_image_is_refused_before_any_read(img, key, tmp_path):
    store = Store.open(img, 1 * MiB, encrypted(key))
    store.write(0, marked_pages(4))
    store.close()
    other = write_key(str(tmp_path), "other")
    with pytest.raises(BackingError, match="wrong key"):
        Store.open(img, None, encrypted(other))
    with pytest.raises(BackingError, match="is encrypted"):
        Store.open(img, None, Config())
    with pytest.raises(BackingError, match="wrong key"):
        fsck(img, read_key_file(other))
    clear = str(tmp_path / "clear")
    Store.open(clear, 1 * MiB, Config()).close()
    with pytest.raises(BackingError, match="in clear"):
        Store.open(clear, None, encrypted(key))
    # what was written still reads with the right key
    store = Store.open(img, None, encrypted(key))
    try:
        assert store.read(0, 4 * PAGE_SIZE) == marked_pages(4)
    finally:
        store.close()


def test_the_c_and_python_ciphers_give_the_same_bytes():
    """zblock._sealpages against the cryptography package: the same ciphertexts and tags, each
    opens what the other sealed, and a bad tag is reported by index with zeros, never bytes."""
    require(seal._c_module() is not None, "zblock._sealpages is not built (libssl-dev)")
    key = os.urandom(32)
    c, py = seal._CBatch(key), seal._PyBatch(key)
    pages = [os.urandom(PAGE_SIZE) for _ in range(5)]
    nonces, aads = os.urandom(12 * 5), os.urandom(25 * 5)
    sealed = c.seal_many(nonces, aads, pages)
    assert sealed == py.seal_many(nonces, aads, pages)
    cts, tags = sealed
    assert py.open_many(nonces, aads, cts, tags) == (b"".join(pages), [])
    forged = tags[:16 * 3] + bytes(b ^ 1 for b in tags[16 * 3:16 * 4]) + tags[16 * 4:]
    for impl in (c, py):
        plain, bad = impl.open_many(nonces, aads, cts, forged)
        assert bad == [3]
        assert plain == b"".join(pages[:3]) + bytes(PAGE_SIZE) + pages[4]
    odd = os.urandom(1234)                  # a far value: any length, one at a time
    one = c.seal_many(nonces[:12], aads[:25], [odd])
    assert one == py.seal_many(nonces[:12], aads[:25], [odd])
    assert c.open_many(nonces[:12], aads[:25], *one) == (odd, [])
    with pytest.raises(ValueError, match="32 bytes"):
        seal._c_module().seal_many(os.urandom(16), nonces, aads, pages)
    with pytest.raises(ValueError, match="nonce"):
        seal._c_module().seal_many(key, nonces[:12], aads, pages)


def test_key_files_and_options_are_checked(tmp_path):
    loose = str(tmp_path / "loose")
    with open(loose, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_key_file(loose)
    short = str(tmp_path / "short")
    with open(short, "w") as f:
        f.write("abcd\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="32 bytes or 64 hex"):
        read_key_file(short)
    hexkey = str(tmp_path / "hex")
    with open(hexkey, "w") as f:
        f.write("ab" * 32 + "\n")
    os.chmod(hexkey, 0o600)
    assert read_key_file(hexkey) == bytes([0xab]) * 32
    with pytest.raises(ConfigError, match="needs --key-file"):
        Config.from_strings({"encrypt": "Y"})
    with pytest.raises(ConfigError, match="random key"):
        Config.from_strings({"encrypt": "Y", "swap": "Y", "key_file": hexkey})
    with pytest.raises(ConfigError, match="is for --encrypt"):
        Config.from_strings({"key_file": hexkey})


def test_a_flipped_ciphertext_byte_and_a_forged_tag_read_eio(img, key):
    data = marked_pages(64)
    store = Store.open(img, 1 * MiB, encrypted(key))
    store.write(0, data)
    store.close()
    with open(img, "r+b") as f:             # page 3's ciphertext: its CRC no longer matches
        f.seek(3 * PAGE_SIZE + 17)
        b = f.read(1)
        f.seek(3 * PAGE_SIZE + 17)
        f.write(bytes([b[0] ^ 0x20]))
    with open(seal_path(img), "r+b") as f:  # page 9's tags: the CRC matches, the tag does not
        f.seek(HEADER_SIZE + 9 * ROW_BYTES + 24)
        tags = f.read(32)
        f.seek(HEADER_SIZE + 9 * ROW_BYTES + 24)
        f.write(bytes(x ^ 1 for x in tags))
    report = fsck(img, read_key_file(key))
    assert report.exit_code == FSCK_DAMAGE and report.bad_pages == [3, 9]
    store = Store.open(img, None, encrypted(key))
    try:
        with pytest.raises(DataError, match="checksum mismatch"):
            store.read(3 * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(DataError, match="authentication tag"):
            store.read(9 * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(DataError, match="page 9"):
            store.read(8 * PAGE_SIZE, 4 * PAGE_SIZE)        # the same page in a run
        assert store.stats()["checksum_errors"] == 3
        for p in set(range(64)) - {3, 9}:
            assert store.read(p * PAGE_SIZE, PAGE_SIZE) == data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
    finally:
        store.close()


def seal_rows(store) -> np.ndarray:
    """The sealer's rows (flat: 8 words a page) as a table, a row a page."""
    return np.asarray(store.backing.sealer.rows).reshape(-1, ROW_BYTES // 8)


def test_nonces_never_repeat_across_remounts_and_crashes(img, key):
    """Every page write takes a fresh counter; after a crash the next mount starts past every
    value the dead one may have used (the durable lease), so no (key, nonce) pair repeats."""
    used: list[np.ndarray] = []

    def counters(store) -> np.ndarray:
        ctr = seal_rows(store)[:256, 0:2]
        return ctr[ctr != 0]

    data = marked_pages(256)
    for round_ in range(3):
        store = Store.open(img, None if round_ else 1 * MiB, encrypted(key))
        before = set(counters(store).tolist())
        store.write(0, data)
        store.fsync()
        new = set(counters(store).tolist()) - before
        assert len(new) >= 256 - 16
        used.append(np.array(sorted(new)))
        if round_ == 1:
            abandon(store)                      # a crash: no clean close
        else:
            store.close()
    allv = np.concatenate(used)
    assert len(np.unique(allv)) == len(allv)
    # the mount after the crash began at the lease, above everything the crashed one handed out
    assert used[2].min() > used[1].max() and used[2].min() >= 2 * LEASE_STEP
    store = Store.open(img, None, encrypted(key))
    try:
        assert store.read(0, len(data)) == data
    finally:
        store.close()


def test_one_key_file_for_two_images_and_a_copied_image_never_share_a_nonce(tmp_path, key):
    """Images under one key file seal with keys of their own (the same nonce, page and bytes
    give other ciphertexts), and a copy of an image goes on far past the original's counter."""
    data = marked_pages(64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for path in (a, b):
        store = Store.open(path, 1 * MiB, encrypted(key))
        store.write(0, data)
        store.close()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ca, cb = fa.read(64 * PAGE_SIZE), fb.read(64 * PAGE_SIZE)
    assert ca != cb and ca[:PAGE_SIZE] != cb[:PAGE_SIZE]
    c = str(tmp_path / "c")                 # cp of all three files: the same salt and lease
    for suffix in ("", ".zbmeta", ".zbseal"):
        shutil.copyfile(a + suffix, c + suffix)
    os.chmod(c, 0o600)
    counters = {}
    for path in (a, c):
        store = Store.open(path, None, encrypted(key))
        try:
            assert store.read(0, len(data)) == data
            store.write(0, data[:PAGE_SIZE])
            store.fsync()
            ctr = seal_rows(store)[0, 0:2]
            counters[path] = int(ctr.max())
        finally:
            store.close()
    assert counters[a] < seal.FORK_JUMP <= counters[c] - counters[a]
    # the copy's header now names the copy: its next mount goes on without another jump
    store = Store.open(c, None, encrypted(key))
    try:
        store.write(0, data[:PAGE_SIZE])
        store.fsync()
        assert int(seal_rows(store)[0, 0:2].max()) < counters[c] + 2 * LEASE_STEP
    finally:
        store.close()


def test_an_encrypted_image_is_never_served_in_clear(img, key):
    """Its sidecar says version 3 (zblock before encryption refuses it), and without the sidecar
    it is refused instead of imported unchecked; a far value of another version fails."""
    store = Store.open(img, 1 * MiB, encrypted(key))
    store.write(0, marked_pages(4))
    store.close()
    with open(meta_path(img), "rb") as f:
        head = f.read(64)
    assert int.from_bytes(head[8:12], "little") == 3
    os.rename(meta_path(img), meta_path(img) + ".away")
    for cfg in (Config(), encrypted(key)):
        with pytest.raises(BackingError, match="sidecar .* is missing"):
            Store.open(img, None, cfg)
    assert not os.path.exists(meta_path(img))
    os.rename(meta_path(img) + ".away", meta_path(img))
    store = Store.open(img, None, encrypted(key))
    try:
        sealer = store.backing.sealer
        value = sealer.seal_value(7, 41, b"compressed bytes")
        assert sealer.open_value(7, 41, value) == b"compressed bytes"
        assert sealer.open_value(7, 40, value) is None      # an older version of the page
        assert sealer.open_value(8, 41, value) is None      # another page
    finally:
        store.close()


def test_swap_mode_encrypts_with_a_key_of_its_own(img):
    data = marked_pages(256)
    store = Store.open(img, 2 * MiB, Config(swap=True, encrypt=True, pool_limit=16 * PAGE_SIZE))
    try:
        store.write(0, data)
        store.fsync()
        assert store.stats()["written_back_pages"] + store.stats()["bd_writes"] > 0
        assert store.read(0, len(data)) == data
        with open(img, "rb") as f:
            assert MARKER not in f.read()
        assert not os.path.exists(seal_path(img)) and not os.path.exists(meta_path(img))
    finally:
        store.close()


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_a_mount_keeps_no_plaintext_and_fsck_checks_the_tags(tmp_path):
    require(shutil.which("strings") is not None, "strings (binutils) is not installed")
    key = write_key(str(tmp_path))
    data = marked_pages(2048)
    with Mount(size="32M", pool_limit="2M", encrypt=True, key_file=key) as m:
        assert m.param("encrypt") == "Y"
        # the server seals on what this process would (the C batch, or without the extension
        # the cryptography package: make test runs this file both ways)
        assert m.stats()["seal_backend"] == seal.backend()
        with open(m.disk, "r+b", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
        backing = m.backing
        m.umount()
        found = subprocess.run(["strings", backing], capture_output=True, timeout=60).stdout
        assert MARKER.decode() not in found.decode(errors="replace")
        res = mountutil.zblock("fsck", backing, "--key-file", key)
        assert res.returncode == FSCK_CLEAN, res.stdout + res.stderr
        with Mount(size=None, backing=backing, workdir=m.workdir, encrypt=True,
                   key_file=key) as again:
            with open(again.disk, "rb") as f:
                assert f.read(len(data)) == data
        wrong = write_key(str(tmp_path), "wrong")
        res = mountutil.zblock("mount", os.path.join(m.workdir, "mnt"), "--backing", backing,
                               "--encrypt", "--key-file", wrong)
        assert res.returncode != 0 and "wrong key" in res.stderr
        assert not mountutil.is_mounted(os.path.join(m.workdir, "mnt"))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
