"""Encryption of every page that leaves RAM (`--encrypt`): AES-256-GCM over the pages written to
the backing file and the values sent to the far tier.

Keys. In swap mode the key is 32 random bytes made at mount and never written anywhere (like an
ephemeral dm-crypt swap). Otherwise it comes from `--key-file`: 32 raw bytes or 64 hex digits,
refused if group or others may read the file. Pages are sealed under a key of the image's own,
BLAKE2b keyed with that key over the image's random salt, so one key file can serve many images
without two of them ever sharing a (key, nonce) pair.

Nonces (96 bits) are a write counter (64 bits) and the page number (its low 32 bits). The counter
is one per image and a value is used once: values are handed out only below a lease that is
already durable in the seal file's header, and the lease moves on (header written and fsynced)
before a value past it is used. A mount starts counting at the lease the file holds, so a crash
skips at most LEASE_STEP values and never repeats one. A copy of the image (its data file is
another file than the one the header names) would go on from the same lease as the original:
its first mount moves the lease on by a random FORK_JUMP to 2 * FORK_JUMP, far past anything
either copy will use. Swap mode keeps the counter in memory: its key dies with the mount. Far
values take their counters from the same allocator.
Associated data: the image's salt, the page number, what the bytes are (a disk page or a far
value) and a far value's version, so a ciphertext moved to another page, image, tier or version
fails its tag.

The seal file `PATH.zbseal` (none in swap mode, where the table lives in memory only):
    block 0     header: magic, version, size, salt, key check, lease; crc32c
    block 1...  64 bytes a page, 64 pages a block: two slots of (counter, CRC32C of the
                ciphertext, tag), 8 bytes free. Counter 0 marks an empty slot.
The sidecar's pair says which bytes a page may hold; the slot whose CRC is the one the read just
verified holds their counter and tag. A write keeps the slot of what the disk holds now and fills
the other (zblock.backing's rule for the pair), and its blocks are written before the data, as
the sidecar's are. So whatever a crash leaves on disk that the sidecar accepts can be decrypted,
and neither a sync nor the settling at open has anything to do here.

A tag that does not verify is EIO plus checksum_errors, never bytes: DataError from the caller.

The cipher work runs in batches, on zblock._sealpages (OpenSSL, the GIL released once a batch)
where it was built, else on the cryptography package page by page (ZBLOCK_NO_EXTENSION=1 forces
that; the tests run both ways). Both give the same bytes.

What this module does not do: decide which pages go to disk, or the sidecar's protocol
(zblock.backing); the far tier's keys and header (zblock.far).
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import threading

import crc32c

from . import PAGE_SIZE, pagemem
from .errors import BackingError, ConfigError
from .extensions import optional

KEY_BYTES = 32
TAG_BYTES = 16
COUNTER = struct.Struct("<Q")
SEAL_SUFFIX = ".zbseal"
SEAL_MAGIC = b"ZBLKSEAL"
SEAL_VERSION = 1
HEADER_SIZE = 4096
# magic, version, page size, size, salt, key check, lease, the data file's st_dev and st_ino;
# then crc32c
HEADER = struct.Struct("<8sIIQ16s16sQQQ")
ROW_BYTES = 64
ROWS_PER_BLOCK = PAGE_SIZE // ROW_BYTES
# A lease moves the counter's durable bound this far at a time: one header fsync per million writes.
LEASE_STEP = 1 << 20
# A copy's first mount moves its counter on by FORK_JUMP to 2 * FORK_JUMP (random): 2^52 page
# writes are 16 EiB, and the 64-bit counter has room for 2^11 generations of copies.
FORK_JUMP = 1 << 52
COUNTER_END = 1 << 64
# A far value is its counter, its ciphertext and its tag.
VALUE_OVERHEAD = COUNTER.size + TAG_BYTES
_DISK, _FAR = 0, 1          # what a ciphertext is, in its associated data
_NONCE = struct.Struct("<QI")
_AAD = struct.Struct("<BQQ")        # kind, page, far version (0 for a disk page)
_PAGE_MASK = 0xFFFFFFFF
ZERO_PAGE = bytes(PAGE_SIZE)


@functools.cache
def _c_module():
    """zblock._sealpages, or None. Loaded on first use: it maps OpenSSL's libcrypto (about
    3 MiB resident), which a mount that encrypts nothing never needs."""
    return optional("_sealpages")


def backend() -> str:
    """Which code seals pages in this process (the stats' seal_backend): the C extension, or
    the cryptography package."""
    return "c" if _c_module() is not None else "cryptography"


class _CBatch:
    """Batches of AES-256-GCM on zblock._sealpages (see its source for the interface)."""

    def __init__(self, key: bytes):
        self._key = key
        self._c = _c_module()

    def seal_many(self, nonces: bytes, aads: bytes, srcs: list) -> tuple[bytes, bytes]:
        return self._c.seal_many(self._key, nonces, aads, srcs)

    def open_many(self, nonces: bytes, aads: bytes, data, tags: bytes) -> tuple[bytes, list[int]]:
        return self._c.open_many(self._key, nonces, aads, data, tags)


class _PyBatch:
    """The same batches on the cryptography package, one call a page."""

    def __init__(self, key: bytes):
        # imported here: the package holds about 10 MiB resident, and only this fallback uses it
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self._aead = AESGCM(key)
        self._invalid_tag = InvalidTag

    def seal_many(self, nonces: bytes, aads: bytes, srcs: list) -> tuple[bytes, bytes]:
        a = len(aads) // len(srcs)
        out = [self._aead.encrypt(nonces[12 * i:12 * i + 12], bytes(src), aads[a * i:a * i + a])
               for i, src in enumerate(srcs)]
        return b"".join(o[:-TAG_BYTES] for o in out), b"".join(o[-TAG_BYTES:] for o in out)

    def open_many(self, nonces: bytes, aads: bytes, data, tags: bytes) -> tuple[bytes, list[int]]:
        n = len(tags) // TAG_BYTES
        a, size, mv = len(aads) // n, len(data) // n, memoryview(data)
        out, bad = [], []
        for i in range(n):
            try:
                out.append(self._aead.decrypt(
                    nonces[12 * i:12 * i + 12],
                    bytes(mv[i * size:(i + 1) * size]) + tags[TAG_BYTES * i:TAG_BYTES * (i + 1)],
                    aads[a * i:a * i + a]))
            except self._invalid_tag:
                out.append(bytes(size))
                bad.append(i)
        return b"".join(out), bad


def _ints(values) -> list[int]:
    """Python ints from a list, a tuple, or an array with tolist() (which converts them all
    in C: an array's elements are slow to take one at a time)."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)


def seal_path(path: str) -> str:
    return path + SEAL_SUFFIX


def read_key_file(path: str) -> bytes:
    """The 32-byte key in `path` (32 raw bytes, or 64 hex digits and maybe a newline).
    ConfigError if it cannot be read, is not a key, or others may read it."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(KEY_BYTES * 2 + 2)
    except OSError as e:
        raise ConfigError(f"--key-file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--key-file {path}: readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"--key-file {path}: want 32 bytes or 64 hex digits "
                          f"(make one with: head -c 32 /dev/urandom > {path})")
    return key


def _key_check(key: bytes, salt: bytes) -> bytes:
    """What the header keeps to tell a wrong key at mount, before any page is read."""
    import hashlib      # here: its OpenSSL half costs a mount that encrypts nothing ~3 MiB
    return hashlib.blake2b(b"zblock key check" + salt, key=key, digest_size=16).digest()


def _image_key(key: bytes, salt: bytes) -> bytes:
    """The AES key of one image: a key file shared by images never shares nonces."""
    import hashlib      # as in _key_check
    return hashlib.blake2b(b"", key=key, salt=salt, person=b"zblock-aes-key",
                           digest_size=KEY_BYTES).digest()


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _pack_header(size: int, salt: bytes, check: bytes, lease: int,
                 identity: tuple[int, int]) -> bytes:
    head = HEADER.pack(SEAL_MAGIC, SEAL_VERSION, PAGE_SIZE, size, salt, check, lease, *identity)
    head += struct.pack("<I", crc32c.crc32c(head))
    return head + bytes(HEADER_SIZE - len(head))


class Sealer:
    """The key, the counter and the slots of one image. Make one with `create`, `open` or
    `ephemeral`. Thread-safe; the caller serialises work on one page, as zblock.backing's
    does."""

    def __init__(self, npages: int, key: bytes, salt: bytes, disk, lease: int,
                 identity: tuple[int, int] | None = None):
        """`identity`: the data file's (st_dev, st_ino) the header records; None in swap mode
        (no seal file) and read-only (nothing is sealed)."""
        self.npages = npages
        image_key = _image_key(key, salt)
        self.backend = backend()
        self._cipher = _CBatch(image_key) if self.backend == "c" else _PyBatch(image_key)
        self._identity = identity
        self._salt = salt
        self._check = _key_check(key, salt)
        self._lock = threading.Lock()       # the slots (never held across I/O)
        self._disk = disk                   # the seal file (zblock.disk), None in swap mode
        # The rows, flat: page p's row is words 8p .. 8p+8, counter 0 and 1, the two CRCs
        # (slot 0 low), then tag 0 and tag 1; whole blocks of them, as the seal file holds.
        self.rows = pagemem.array(_table_bytes(npages) // 8, "Q")
        self._bytes = self.rows.cast("B")
        self._counter_lock = threading.Lock()
        self._next = lease                  # nothing below a durable lease is used twice
        self._lease = lease
        self._stripes = [threading.Lock() for _ in range(16)]

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def ephemeral(cls, npages: int) -> "Sealer":
        """Swap mode: a random key that exists only in this process."""
        sealer = cls(npages, os.urandom(KEY_BYTES), os.urandom(16), None, 1)
        sealer._lease = COUNTER_END         # nothing to make durable
        return sealer

    @classmethod
    def create(cls, path: str, size: int, key: bytes, factory) -> "Sealer":
        """A new image's seal file (replacing any old one); `factory(path, "seal")` opens the
        disk its blocks are written through."""
        salt = os.urandom(16)
        spath = seal_path(path)
        try:
            identity = _identity(path)
            fd = os.open(spath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, HEADER_SIZE + _table_bytes(size // PAGE_SIZE))   # sparse
                os.pwrite(fd, _pack_header(size, salt, _key_check(key, salt), LEASE_STEP,
                                           identity), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            disk = factory(spath, "seal")
        except OSError as e:
            raise BackingError(f"{spath}: cannot create: {e.strerror}") from None
        sealer = cls(size // PAGE_SIZE, key, salt, disk, 1, identity)
        sealer._lease = LEASE_STEP
        return sealer

    @classmethod
    def open(cls, path: str, size: int, key: bytes, factory=None) -> "Sealer":
        """The seal file of an existing encrypted image, written through `factory(path, "seal")`
        (None: read only). BackingError, before any page is read, if it is missing, damaged,
        for another size, or `key` is not the image's key."""
        spath = seal_path(path)
        try:
            fd = os.open(spath, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BackingError(f"{path} is encrypted but its seal file {spath} cannot be "
                               f"opened ({e.strerror}): its pages cannot be decrypted") from None
        try:
            salt, check, lease, identity = _parse_header(os.pread(fd, HEADER_SIZE, 0), spath, size)
            if _key_check(key, salt) != check:
                raise BackingError(f"{path}: wrong key (--key-file is not this image's key)")
            here = _identity(path)
            if factory is not None and here != identity:
                # a copy (or the original moved): it must not go on from the original's lease
                lease += FORK_JUMP + int.from_bytes(os.urandom(8), "little") % FORK_JUMP
                if lease + FORK_JUMP > COUNTER_END:
                    raise BackingError(f"{path}: copied too many times to seal more pages "
                                       f"safely: make a new image")
            sealer = cls(size // PAGE_SIZE, key, salt, None, lease,
                         here if factory is not None else None)
            pagemem.fill_from_file(fd, sealer.rows, HEADER_SIZE, f"{spath}: seal file", ROW_BYTES)
            if factory is not None:
                sealer._disk = factory(spath, "seal")
                sealer._write_header()      # the identity and lease this mount goes on from
            return sealer
        except OSError as e:
            raise BackingError(f"{spath}: {e.strerror}") from None
        finally:
            os.close(fd)

    @property
    def disk(self):
        return self._disk

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + _table_bytes(self.npages)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    # -- the counter -------------------------------------------------------------------------

    def _take(self, count: int) -> int:
        """`count` fresh counter values, the first returned. OSError if the lease cannot be
        made durable (nothing is then encrypted)."""
        with self._counter_lock:
            first = self._next
            if first + count > self._lease:
                if self._disk is None:
                    raise BackingError("seal: a read-only image seals nothing")
                self._lease = first + count + LEASE_STEP
                self._write_header()
            self._next = first + count
            return first

    def _write_header(self) -> None:
        self._disk.pwrite(0, _pack_header(self.npages * PAGE_SIZE, self._salt, self._check,
                                          self._lease, self._identity))
        self._disk.fsync()

    @staticmethod
    def _nonce(counter: int, page: int) -> bytes:
        return _NONCE.pack(counter, page & _PAGE_MASK)

    def _aad(self, kind: int, page: int, version: int = 0) -> bytes:
        return self._salt + _AAD.pack(kind, page, version)

    # -- disk pages --------------------------------------------------------------------------

    def seal(self, pages: list[int], data: list) -> tuple[list[memoryview], list[int], list[bytes]]:
        """Ciphertexts of whole pages `data` for `pages`, with their counters and tags (for
        place, once the caller knows what the disk holds)."""
        n = len(pages)
        first = self._take(n)
        nonce, aad = self._nonce, self._aad
        cts, tags = self._cipher.seal_many(
            b"".join([nonce(c, p) for c, p in zip(range(first, first + n), pages)]),
            b"".join([aad(_DISK, p) for p in pages]), data)
        mv = memoryview(cts)
        return ([mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(n)],
                list(range(first, first + n)),
                [tags[i * TAG_BYTES:(i + 1) * TAG_BYTES] for i in range(n)])

    def place(self, pages, on_disk, crcs, ctrs, tags) -> None:
        """Record the seals of pages about to be written: the slot of what each disk page holds
        now (CRC `on_disk`) stays, the other takes the new seal."""
        w, b = self.rows, self._bytes
        with self._lock:
            for p, old, c, n, t in zip(_ints(pages), _ints(on_disk), _ints(crcs), ctrs, tags):
                at = p * 8
                crc2 = w[at + 2]
                if w[at] and crc2 & 0xFFFFFFFF == old:     # slot 0 holds what the disk holds
                    w[at + 1] = n
                    w[at + 2] = (crc2 & 0xFFFFFFFF) | c << 32
                    b[at * 8 + 40:at * 8 + 56] = t
                else:
                    w[at] = n
                    w[at + 2] = (crc2 & ~0xFFFFFFFF) | c
                    b[at * 8 + 24:at * 8 + 40] = t

    def put_blocks(self, pages) -> None:
        """Write the seal blocks of `pages` (before their data: see the module docstring), each
        snapshot taken and written under its stripe lock so versions land in order."""
        if self._disk is None:
            return
        for b in sorted({p // ROWS_PER_BLOCK for p in _ints(pages)}):
            with self._stripes[b % len(self._stripes)]:
                with self._lock:
                    buf = self._bytes[b * PAGE_SIZE:(b + 1) * PAGE_SIZE].tobytes()
                self._disk.pwrite(HEADER_SIZE + b * PAGE_SIZE, buf)

    def fsync(self) -> None:
        if self._disk is not None:
            self._disk.fsync()

    def unseal(self, first: int, data, crcs, maybe_zero) -> tuple[bytes, list[int]]:
        """The plaintext of `data`, the bytes of pages `first`... that the sidecar accepted,
        whose checksums are `crcs`; `maybe_zero` (bool per page) where the sidecar also allows
        the zero page (a discard), which reads as zeros. Returns (plaintext, bad pages): a bad
        page's tag did not verify, and its bytes in the result are zeros."""
        count = len(crcs)
        with self._lock:
            words = self.rows[first * 8:(first + count) * 8].tolist()
            rows = self._bytes[first * ROW_BYTES:(first + count) * ROW_BYTES].tobytes()
        nonce, aad = self._nonce, self._aad
        nonces, aads, tags = [], [], []
        other: dict[int, tuple[bytes, bytes]] = {}     # pages both slots match (a CRC collision)
        for i, c in enumerate(_ints(crcs)):
            p, at = first + i, i * 8
            match = [s for s in (1, 0)
                     if words[at + s] and (words[at + 2] >> 32 * s) & _PAGE_MASK == c]
            s = match[0] if match else 0    # no slot: its tag fails (a discard's zeros, or bad)
            nonces.append(nonce(words[at + s], p))
            aads.append(aad(_DISK, p))
            tags.append(rows[i * ROW_BYTES + 24 + 16 * s:i * ROW_BYTES + 40 + 16 * s])
            if len(match) == 2:
                t = rows[i * ROW_BYTES + 24:i * ROW_BYTES + 40]
                other[i] = (nonce(words[at], p), t)
        plain, failed = self._cipher.open_many(b"".join(nonces), b"".join(aads), data,
                                               b"".join(tags))
        bad = []
        if failed:
            mv, again = memoryview(data), {}
            for i in failed:
                ct = mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                if i in other:
                    page, no = self._cipher.open_many(other[i][0], aads[i], ct, other[i][1])
                    if not no:
                        again[i] = page
                        continue
                if not (maybe_zero[i] and ct == ZERO_PAGE):
                    bad.append(first + i)
            if again:
                whole = bytearray(plain)
                for i, page in again.items():
                    whole[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = page
                plain = bytes(whole)
        return plain, bad

    # -- far values --------------------------------------------------------------------------

    def seal_value(self, page: int, version: int, payload) -> bytes:
        n = self._take(1)
        ct, tag = self._cipher.seal_many(self._nonce(n, page), self._aad(_FAR, page, version),
                                         [payload])
        return COUNTER.pack(n) + ct + tag

    def open_value(self, page: int, version: int, sealed) -> bytes | None:
        """The payload of a far value sealed for `page` at `version`; None if its tag does not
        verify (another value, or an older one of the same page)."""
        if len(sealed) < VALUE_OVERHEAD:
            return None
        n = COUNTER.unpack_from(sealed)[0]
        mv = memoryview(sealed)
        plain, bad = self._cipher.open_many(self._nonce(n, page), self._aad(_FAR, page, version),
                                            mv[COUNTER.size:-TAG_BYTES], bytes(mv[-TAG_BYTES:]))
        return None if bad else plain


def _table_bytes(npages: int) -> int:
    return -(-npages // ROWS_PER_BLOCK) * PAGE_SIZE


def _parse_header(raw: bytes, where: str, size: int) -> tuple[bytes, bytes, int, tuple[int, int]]:
    n = HEADER.size
    if len(raw) < n + 4:
        raise BackingError(f"{where}: seal file too short for a header")
    magic, version, page_size, hsize, salt, check, lease, dev, ino = HEADER.unpack_from(raw)
    if magic != SEAL_MAGIC:
        raise BackingError(f"{where}: not a zblock seal file (bad magic)")
    if struct.unpack_from("<I", raw, n)[0] != crc32c.crc32c(raw[:n]):
        raise BackingError(f"{where}: seal file header checksum mismatch")
    if version != SEAL_VERSION or page_size != PAGE_SIZE:
        raise BackingError(f"{where}: seal file version {version} / page size {page_size} "
                           f"not supported")
    if hsize != size:
        raise BackingError(f"{where}: seal file is for a {hsize}-byte image, not {size}")
    return salt, check, lease, (dev, ino)
