/* LZ4 blocks for many pages in one call, with the GIL released for the whole list; and the
 * entry-table install that goes with a write request's scan (install).
 *
 * Why this exists: python-lz4 releases and re-takes the GIL around every page. A 4 KiB page
 * costs 1-3 us to (de)compress, so with a second thread working the GIL changes hands twice per
 * page and two threads run slower than one (measured: splitting a 256-page lz4 read in two fell
 * from 1335 to 675 MB/s). Here the Python objects are collected with the GIL held, the LZ4 loop
 * runs without it, and the results become bytes objects afterwards: one hand-off per list.
 *
 * The streams are plain LZ4 blocks without a size header, the same bytes python-lz4's
 * lz4.block.compress(store_size=False) writes (LZ4_compress_default), so either can read the
 * other's (tests/test_compressors.py checks both ways).
 *
 *   compress(src) -> bytes
 *   compress_many(srcs) -> list[bytes]
 *   decompress(src, out_len) -> bytes                       ValueError unless exactly out_len
 *   decompress_many(srcs, out_len) -> list[bytes]           ValueError naming the first bad one
 *   join(items, out_len) -> bytes    items shorter than out_len are LZ4 blocks, decompressed in
 *                                    place; items of exactly out_len are copied (a read request:
 *                                    no bytes object per page and no second copy to join them)
 *   scan_pages(buf, page_size, detect_same, raw_poor) -> (objs, states, lengths, fills)
 *                                    zswap_store()'s per-page work for a whole write request;
 *                                    see lz4pages_scan_pages
 *   scan_page(page, detect_same, raw_poor) -> (state, obj, length, fill)
 *                                    the same for one page (a 4 KiB write)
 *   install(table, where, scan, pool_id, seq, charge_extra) -> accounting
 *                                    scan_pages' result into the cache's entry table; see
 *                                    lz4pages_install
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#include <stdint.h>
#include <string.h>

/* Buffers of every item of a sequence (GIL held). On failure the ones taken are released. */
static Py_buffer *
get_buffers(PyObject *seq, Py_ssize_t n)
{
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &views[i], PyBUF_SIMPLE) < 0) {
            for (Py_ssize_t k = 0; k < i; k++)
                PyBuffer_Release(&views[k]);
            PyMem_Free(views);
            return NULL;
        }
        if (views[i].len > LZ4_MAX_INPUT_SIZE) {
            for (Py_ssize_t k = 0; k <= i; k++)
                PyBuffer_Release(&views[k]);
            PyMem_Free(views);
            PyErr_Format(PyExc_OverflowError, "item %zd is too large for LZ4", i);
            return NULL;
        }
    }
    return views;
}

static void
release_buffers(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
}

/* The (sequence of buffers, out_len) arguments of decompress_many and join: a new reference to
 * the sequence as a fast sequence, or NULL with the error set. */
static PyObject *
list_and_length(PyObject *args, const char *format, Py_ssize_t *out_len)
{
    PyObject *arg;
    if (!PyArg_ParseTuple(args, format, &arg, out_len))
        return NULL;
    if (*out_len <= 0 || *out_len > LZ4_MAX_INPUT_SIZE)
        return PyErr_Format(PyExc_ValueError, "bad out_len %zd", *out_len);
    return PySequence_Fast(arg, "a sequence of buffers is needed");
}

/* ValueError for item `bad` of a list, which LZ4_decompress_safe answered with `got` */
static void
item_error(Py_ssize_t bad, int got, Py_ssize_t out_len)
{
    if (got < 0)
        PyErr_Format(PyExc_ValueError, "item %zd: corrupt LZ4 block", bad);
    else
        PyErr_Format(PyExc_ValueError, "item %zd: got %d bytes, expected %zd", bad, got, out_len);
}

static PyObject *
lz4pages_compress(PyObject *self, PyObject *src)
{
    Py_buffer in;
    if (PyObject_GetBuffer(src, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (in.len > LZ4_MAX_INPUT_SIZE) {
        PyBuffer_Release(&in);
        return PyErr_Format(PyExc_OverflowError, "input is too large for LZ4");
    }
    int in_len = (int)in.len;
    int bound = LZ4_compressBound(in_len);
    /* a page fits the stack: no allocation for the common case */
    char stackbuf[8192];
    char *dst = bound <= (int)sizeof(stackbuf) ? stackbuf : PyMem_Malloc(bound);
    if (dst == NULL) {
        PyBuffer_Release(&in);
        return PyErr_NoMemory();
    }
    int len;
    Py_BEGIN_ALLOW_THREADS
    len = LZ4_compress_default(in.buf, dst, in_len, bound);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    PyObject *out = len > 0 || in_len == 0 ? PyBytes_FromStringAndSize(dst, len)
                                           : PyErr_Format(PyExc_ValueError, "LZ4 compression failed");
    if (dst != stackbuf)
        PyMem_Free(dst);
    return out;
}

static PyObject *
lz4pages_compress_many(PyObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "compress_many: a sequence of buffers is needed");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    char *scratch = NULL;
    size_t *offs = NULL;
    int *lens = NULL;
    Py_buffer *views = get_buffers(seq, n);
    if (views == NULL)
        goto done;
    offs = PyMem_Malloc((n + 1) * sizeof(size_t));
    lens = PyMem_Malloc((n ? n : 1) * sizeof(int));
    if (offs == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    offs[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        offs[i + 1] = offs[i] + (size_t)LZ4_compressBound((int)views[i].len);
    scratch = PyMem_Malloc(offs[n] ? offs[n] : 1);
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        lens[i] = LZ4_compress_default(views[i].buf, scratch + offs[i], (int)views[i].len,
                                       (int)(offs[i + 1] - offs[i]));
        if (lens[i] <= 0 && views[i].len > 0) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "LZ4 compression of item %zd failed", bad);
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize(scratch + offs[i], lens[i]);
        if (b == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, b);
    }
done:
    if (views != NULL)
        release_buffers(views, n);
    PyMem_Free(scratch);
    PyMem_Free(offs);
    PyMem_Free(lens);
    Py_DECREF(seq);
    return result;
}

static PyObject *
lz4pages_decompress(PyObject *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t out_len;
    if (!PyArg_ParseTuple(args, "y*n:decompress", &in, &out_len))
        return NULL;
    if (out_len < 0 || out_len > LZ4_MAX_INPUT_SIZE || in.len > INT_MAX) {
        PyBuffer_Release(&in);
        return PyErr_Format(PyExc_ValueError, "decompress: bad sizes");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, out_len);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    int got;
    Py_BEGIN_ALLOW_THREADS
    got = LZ4_decompress_safe(in.buf, PyBytes_AS_STRING(out), (int)in.len, (int)out_len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    if (got != out_len) {
        Py_DECREF(out);
        if (got < 0)
            return PyErr_Format(PyExc_ValueError, "corrupt LZ4 block");
        return PyErr_Format(PyExc_ValueError, "got %d bytes, expected %zd", got, out_len);
    }
    return out;
}

static PyObject *
lz4pages_decompress_many(PyObject *self, PyObject *args)
{
    Py_ssize_t out_len;
    PyObject *seq = list_and_length(args, "On:decompress_many", &out_len);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    Py_buffer *views = get_buffers(seq, n);
    if (views == NULL)
        goto done;
    /* the outputs are new bytes objects nobody else sees yet: safe to fill without the GIL */
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, out_len);
        if (b == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, b);
    }
    char **dsts = PyMem_Malloc((n ? n : 1) * sizeof(char *));
    if (dsts == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        dsts[i] = PyBytes_AS_STRING(PyList_GET_ITEM(result, i));
    Py_ssize_t bad = -1;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        got = LZ4_decompress_safe(views[i].buf, dsts[i], (int)views[i].len, (int)out_len);
        if (got != out_len) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(dsts);
    if (bad >= 0) {
        Py_CLEAR(result);
        item_error(bad, got, out_len);
    }
done:
    if (views != NULL)
        release_buffers(views, n);
    Py_DECREF(seq);
    return result;
}

static PyObject *
lz4pages_join(PyObject *self, PyObject *args)
{
    Py_ssize_t out_len;
    PyObject *seq = list_and_length(args, "On:join", &out_len);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    Py_buffer *views = get_buffers(seq, n);
    if (views == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (views[i].len > out_len) {
            PyErr_Format(PyExc_ValueError, "item %zd: %zd bytes, more than %zd", i, views[i].len,
                         out_len);
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, n * out_len);
    if (result == NULL)
        goto done;
    char *dst = PyBytes_AS_STRING(result);
    Py_ssize_t bad = -1;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, dst += out_len) {
        if (views[i].len == out_len) {
            memcpy(dst, views[i].buf, out_len);
            continue;
        }
        got = LZ4_decompress_safe(views[i].buf, dst, (int)views[i].len, (int)out_len);
        if (got != out_len) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        Py_CLEAR(result);
        item_error(bad, got, out_len);
    }
done:
    if (views != NULL)
        release_buffers(views, n);
    Py_DECREF(seq);
    return result;
}

/* Entry states, as zblock/cache.py numbers them (tests/test_compressors.py checks they agree). */
enum { ST_NONE = 0, ST_SAME = 1, ST_COMP = 2, ST_RAW = 3 };

/* A page that is one 8-byte word repeated (zswap's same-filled check): first word == last word
 * rules out nearly every other page before the full compare. */
static int
same_filled(const char *page, Py_ssize_t page_size, uint64_t *fill)
{
    uint64_t first, last;
    memcpy(&first, page, 8);
    memcpy(&last, page + page_size - 8, 8);
    if (first != last || memcmp(page, page + 8, page_size - 8) != 0)
        return 0;
    *fill = first;
    return 1;
}

/* One page of scan_pages: its state, and its length (LZ4 block in `out`, capacity page_size - 1:
 * LZ4 gives up, returning 0, once the block would not fit). No Python objects: runs without the
 * GIL. */
static uint8_t
scan_one(const char *page, Py_ssize_t page_size, int detect_same, int raw_poor, char *out,
         uint16_t *len_out)
{
    uint64_t fill;
    if (detect_same && same_filled(page, page_size, &fill)) {
        *len_out = 0;
        return ST_SAME;
    }
    int len = LZ4_compress_default(page, out, (int)page_size, (int)page_size - 1);
    if (len > 0) {
        *len_out = (uint16_t)len;
        return ST_COMP;
    }
    *len_out = raw_poor ? (uint16_t)page_size : 0;
    return raw_poor ? ST_RAW : ST_NONE;
}

/* scan_page(page, detect_same, raw_poor) -> (state, obj, length, fill)
 *
 * scan_pages for exactly one page (its length is the page size), without the lists and buffers:
 * a 4 KiB write's path. obj is the LZ4 block (COMP), the page itself when it is a bytes object
 * or else a copy (RAW), or None (SAME, NONE); fill is the page's first word. The GIL is released
 * for the compression: with two requests in flight the other one's Python runs meanwhile
 * (measured through a mount: keeping it made 4 KiB reads slower). */
static PyObject *
lz4pages_scan_page(PyObject *self, PyObject *args)
{
    PyObject *src;
    int detect_same, raw_poor;
    if (!PyArg_ParseTuple(args, "Opp:scan_page", &src, &detect_same, &raw_poor))
        return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(src, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t page_size = in.len;
    char stackbuf[8192];
    if (page_size < 16 || page_size > (Py_ssize_t)sizeof(stackbuf)) {
        PyBuffer_Release(&in);
        return PyErr_Format(PyExc_ValueError, "scan_page: a page of %zd bytes", page_size);
    }
    uint64_t fill;
    memcpy(&fill, in.buf, 8);
    uint16_t len;
    uint8_t state;
    Py_BEGIN_ALLOW_THREADS
    state = scan_one(in.buf, page_size, detect_same, raw_poor, stackbuf, &len);
    Py_END_ALLOW_THREADS
    PyObject *obj;
    if (state == ST_COMP)
        obj = PyBytes_FromStringAndSize(stackbuf, len);
    else if (state == ST_RAW)
        obj = PyBytes_CheckExact(src) ? Py_NewRef(src) : PyBytes_FromStringAndSize(in.buf, page_size);
    else
        obj = Py_NewRef(Py_None);
    PyBuffer_Release(&in);
    if (obj == NULL)
        return NULL;
    return Py_BuildValue("(iNiK)", (int)state, obj, (int)len, (unsigned long long)fill);
}

/* scan_pages(buf, page_size, detect_same, raw_poor) -> (objs, states, lengths, fills)
 *
 * For each whole page of buf, in one pass with the GIL released:
 *   same-filled (detect_same)  state SAME, fills[i] its word, objs[i] None
 *   compresses below a page    state COMP, lengths[i] its length, objs[i] the LZ4 block
 *   does not (zswap: dlen >= PAGE_SIZE)
 *                 raw_poor     state RAW, lengths[i] = page_size, objs[i] a copy of the page
 *                 otherwise    state NONE, objs[i] None (the caller sends it to disk)
 * states is uint8, lengths uint16 and fills uint64 per page, native order, as bytes (numpy reads
 * them with frombuffer). fills[i] is the page's first word for every page, as the cache keeps it.
 * This replaces the cache's numpy same-filled check, compress_pages and a Python pass over its
 * results. */
static PyObject *
lz4pages_scan_pages(PyObject *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t page_size;
    int detect_same, raw_poor;
    if (!PyArg_ParseTuple(args, "y*npp:scan_pages", &in, &page_size, &detect_same, &raw_poor))
        return NULL;
    PyObject *objs = NULL, *states = NULL, *lengths = NULL, *fills = NULL, *result = NULL;
    char *scratch = NULL;
    if (page_size < 16 || page_size > 65535 || in.len % page_size != 0) {
        PyErr_Format(PyExc_ValueError, "scan_pages: %zd bytes are not whole pages of %zd",
                     in.len, page_size);
        goto done;
    }
    Py_ssize_t n = in.len / page_size;
    /* per call, as compress_many: between requests it is free heap that the trimmer can give
     * back (a scratch kept per thread stayed resident: +1 MiB in the memory benchmark) */
    scratch = PyMem_Malloc((size_t)(n ? n : 1) * (size_t)page_size);
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    states = PyBytes_FromStringAndSize(NULL, n);
    lengths = PyBytes_FromStringAndSize(NULL, n * sizeof(uint16_t));
    fills = PyBytes_FromStringAndSize(NULL, n * sizeof(uint64_t));
    objs = PyList_New(n);
    if (states == NULL || lengths == NULL || fills == NULL || objs == NULL)
        goto done;
    /* new objects nobody else sees yet: safe to fill without the GIL */
    uint8_t *st = (uint8_t *)PyBytes_AS_STRING(states);
    uint16_t *ln = (uint16_t *)PyBytes_AS_STRING(lengths);
    uint64_t *fl = (uint64_t *)PyBytes_AS_STRING(fills);
    const char *src = in.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(&fl[i], src + i * page_size, 8);
        st[i] = scan_one(src + i * page_size, page_size, detect_same, raw_poor,
                         scratch + i * page_size, &ln[i]);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o;
        if (st[i] == ST_COMP)
            o = PyBytes_FromStringAndSize(scratch + i * page_size, ln[i]);
        else if (st[i] == ST_RAW)
            o = PyBytes_FromStringAndSize(src + i * page_size, page_size);
        else
            o = Py_NewRef(Py_None);
        if (o == NULL)
            goto done;
        PyList_SET_ITEM(objs, i, o);
    }
    result = PyTuple_Pack(4, objs, states, lengths, fills);
done:
    PyMem_Free(scratch);
    Py_XDECREF(objs);
    Py_XDECREF(states);
    Py_XDECREF(lengths);
    Py_XDECREF(fills);
    PyBuffer_Release(&in);
    return result;
}

/* The cache's entry table (zblock/cache.py Cache.__init__), one numpy array per field. */
enum { T_STATE, T_LENGTH, T_POOL_ID, T_FILL, T_DIRTY, T_REFERENCED, T_UNDER_WB, T_STAMP, T_GEN,
       T_FIELDS };
static const Py_ssize_t table_itemsize[T_FIELDS] = {1, 2, 1, 8, 1, 1, 1, 8, 4};
#define MAX_POOLS 256

/* Buffers of items 1 .. count of `tup` into `views`, each checked to hold `rows` items of
 * itemsize[k] bytes. 0 on success; -1 with the error set. Either way *taken says how many
 * buffers the caller must release. */
static int
get_fields(PyObject *tup, int count, const Py_ssize_t *itemsize, Py_ssize_t rows, int flags,
           const char *what, Py_buffer *views, int *taken)
{
    for (*taken = 0; *taken < count; ++*taken) {
        int k = *taken;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(tup, k + 1), &views[k], flags) < 0)
            return -1;
        if (views[k].len != rows * itemsize[k]) {
            ++*taken;
            PyErr_Format(PyExc_ValueError, "install: %s field %d has %zd bytes, not %zd", what,
                         k, views[k].len, rows * itemsize[k]);
            return -1;
        }
    }
    return 0;
}

/* install(table, where, scan, pool_id, seq, charge_extra) -> (freed, old_same, old_raw,
 *                                                             new_cached, new_same, new_raw, size)
 *
 * Puts a scan_pages result for pages `where` .. where+n (an int), or for the n page numbers in
 * `where` (an int64 buffer: the write-behind queue's batch of 4 KiB writes; no page twice), into
 * the entry table, as Cache._put_entry does for one page, in one call: the ~25 numpy calls it replaces cost 73-179 us a request
 * in-process, whatever its size. The caller holds the tree lock (this runs with the GIL held: it
 * swaps objects in the `objs` list) and does the pool and gauge accounting with the result.
 *
 *   table   (objs list, state, length, pool_id, fill, dirty, referenced, under_wb, stamp, gen)
 *   scan    (objs, states, lengths, fills) from scan_pages; pages whose state is NONE are left
 *           alone (rejected to disk: their old entry stays until the disk write lands)
 * Every installed page: old entry dropped, generation + 1, dirty, not referenced, not under
 * writeback, LRU stamp `seq`; cached (COMP/RAW) ones get `pool_id`.
 * Returns what the caller accounts: `freed` a list of (pool id, entries, charged bytes) of the old
 * cached entries, the old same-filled and raw counts, and the new cached, same-filled and raw
 * counts and charged bytes. A page's charge is (length + charge_extra + 15) & ~15 (pool.charge;
 * a raw page's length is the page size). */
static PyObject *
lz4pages_install(PyObject *self, PyObject *args)
{
    PyObject *table, *scan, *where;
    int new_pid;
    long long seq;
    Py_ssize_t charge_extra;
    if (!PyArg_ParseTuple(args, "O!OO!iLn:install", &PyTuple_Type, &table, &where, &PyTuple_Type,
                          &scan, &new_pid, &seq, &charge_extra))
        return NULL;
    if (PyTuple_GET_SIZE(table) != T_FIELDS + 1 || PyTuple_GET_SIZE(scan) != 4)
        return PyErr_Format(PyExc_ValueError, "install: table needs %d items, scan 4", T_FIELDS + 1);
    if (new_pid < 0 || new_pid >= MAX_POOLS)
        return PyErr_Format(PyExc_ValueError, "install: bad pool id %d", new_pid);
    PyObject *objs = PyTuple_GET_ITEM(table, 0);
    PyObject *new_objs = PyTuple_GET_ITEM(scan, 0);
    if (!PyList_Check(objs) || !PyList_Check(new_objs))
        return PyErr_Format(PyExc_TypeError, "install: objs must be lists");
    Py_ssize_t npages = PyList_GET_SIZE(objs), n = PyList_GET_SIZE(new_objs);
    /* where: the first page (an int) of n contiguous ones, or n page numbers (int64 buffer) */
    Py_ssize_t start = 0;
    const int64_t *idx = NULL;
    Py_buffer wb = {0};
    int have_wb = 0;
    if (PyLong_Check(where)) {
        start = PyLong_AsSsize_t(where);
        if (start == -1 && PyErr_Occurred())
            return NULL;
        if (start < 0 || start > npages - n)
            return PyErr_Format(PyExc_ValueError, "install: pages %zd+%zd out of %zd", start, n,
                                npages);
    } else {
        if (PyObject_GetBuffer(where, &wb, PyBUF_SIMPLE) < 0)
            return NULL;
        have_wb = 1;
        idx = wb.buf;
        if (wb.len != n * (Py_ssize_t)sizeof(int64_t)) {
            PyBuffer_Release(&wb);
            return PyErr_Format(PyExc_ValueError, "install: %zd bytes of page numbers for %zd "
                                "pages", wb.len, n);
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (idx[i] < 0 || idx[i] >= npages) {
                PyBuffer_Release(&wb);
                return PyErr_Format(PyExc_ValueError, "install: page %lld out of %zd",
                                    (long long)idx[i], npages);
            }
    }

    PyObject *result = NULL;
    Py_buffer t[T_FIELDS], sc[3];
    static const Py_ssize_t scan_itemsize[3] = {1, 2, 8};
    int nt = 0, ns = 0;
    if (get_fields(table, T_FIELDS, table_itemsize, npages, PyBUF_WRITABLE, "table", t, &nt) < 0 ||
        get_fields(scan, 3, scan_itemsize, n, PyBUF_SIMPLE, "scan", sc, &ns) < 0)
        goto done;
    uint8_t *state = t[T_STATE].buf, *pool_id = t[T_POOL_ID].buf;
    uint16_t *length = t[T_LENGTH].buf;
    uint64_t *fill = t[T_FILL].buf;
    uint8_t *dirty = t[T_DIRTY].buf, *referenced = t[T_REFERENCED].buf, *under_wb = t[T_UNDER_WB].buf;
    int64_t *stamp = t[T_STAMP].buf;
    uint32_t *gen = t[T_GEN].buf;
    const uint8_t *nst = sc[0].buf;
    const uint16_t *nln = sc[1].buf;
    const uint64_t *nfl = sc[2].buf;

    Py_ssize_t freed_count[MAX_POOLS] = {0}, freed_bytes[MAX_POOLS] = {0};
    Py_ssize_t old_same = 0, old_raw = 0, new_cached = 0, new_same = 0, new_raw = 0, size = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t s = nst[i];
        if (s == ST_NONE)
            continue;
        if (s != ST_SAME && s != ST_COMP && s != ST_RAW) {
            /* checked before the table changes: an error leaves it as it was */
            PyErr_Format(PyExc_ValueError, "install: page %zd has state %d", i, s);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t s = nst[i];
        if (s == ST_NONE)
            continue;
        Py_ssize_t p = idx != NULL ? (Py_ssize_t)idx[i] : start + i;
        uint8_t old = state[p];
        if (old == ST_COMP || old == ST_RAW) {
            freed_count[pool_id[p]]++;
            freed_bytes[pool_id[p]] += (length[p] + charge_extra + 15) & ~(Py_ssize_t)15;
            old_raw += old == ST_RAW;
        } else if (old == ST_SAME) {
            old_same++;
        }
        state[p] = s;
        length[p] = nln[i];
        fill[p] = nfl[i];
        gen[p] += 1;
        dirty[p] = 1;
        referenced[p] = 0;
        under_wb[p] = 0;
        stamp[p] = seq;
        if (s == ST_SAME) {
            new_same++;
            pool_id[p] = 0;
        } else {
            new_cached++;
            new_raw += s == ST_RAW;
            size += (nln[i] + charge_extra + 15) & ~(Py_ssize_t)15;
            pool_id[p] = (uint8_t)new_pid;
        }
        /* last: dropping the old object may run arbitrary code (a bytes object's does not) */
        PyObject *o = PyList_GET_ITEM(new_objs, i);
        Py_INCREF(o);
        PyObject *prev = PyList_GET_ITEM(objs, p);
        PyList_SET_ITEM(objs, p, o);
        Py_XDECREF(prev);
    }
    PyObject *freed = PyList_New(0);
    if (freed == NULL)
        goto done;
    for (int pid = 0; pid < MAX_POOLS; pid++) {
        if (freed_count[pid] == 0)
            continue;
        PyObject *item = Py_BuildValue("(inn)", pid, freed_count[pid], freed_bytes[pid]);
        if (item == NULL || PyList_Append(freed, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(freed);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("(Nnnnnnn)", freed, old_same, old_raw, new_cached, new_same, new_raw,
                           size);
done:
    for (int k = 0; k < nt; k++)
        PyBuffer_Release(&t[k]);
    for (int k = 0; k < ns; k++)
        PyBuffer_Release(&sc[k]);
    if (have_wb)
        PyBuffer_Release(&wb);
    return result;
}

static PyMethodDef lz4pages_methods[] = {
    {"compress", lz4pages_compress, METH_O, "compress(src) -> bytes: one LZ4 block."},
    {"compress_many", lz4pages_compress_many, METH_O,
     "compress_many(srcs) -> list of bytes, the GIL released for the whole list."},
    {"decompress", lz4pages_decompress, METH_VARARGS,
     "decompress(src, out_len) -> bytes; ValueError unless exactly out_len bytes come out."},
    {"decompress_many", lz4pages_decompress_many, METH_VARARGS,
     "decompress_many(srcs, out_len) -> list of bytes, the GIL released for the whole list."},
    {"join", lz4pages_join, METH_VARARGS,
     "join(items, out_len) -> bytes: LZ4 blocks (shorter than out_len) decompressed, whole "
     "items copied, into one bytes object, the GIL released for the whole list."},
    {"scan_pages", lz4pages_scan_pages, METH_VARARGS,
     "scan_pages(buf, page_size, detect_same, raw_poor) -> (objs, states, lengths, fills): "
     "same-filled check and LZ4 of every page of a write request, the GIL released once."},
    {"scan_page", lz4pages_scan_page, METH_VARARGS,
     "scan_page(page, detect_same, raw_poor) -> (state, obj, length, fill): scan_pages for "
     "one page."},
    {"install", lz4pages_install, METH_VARARGS,
     "install(table, start, scan, pool_id, seq, charge_extra) -> accounting: a scan_pages "
     "result into the cache's entry table (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lz4pages_module = {
    PyModuleDef_HEAD_INIT, "zblock._lz4pages",
    "LZ4 blocks for many pages per call with the GIL released for the whole list.", -1,
    lz4pages_methods,
};

PyMODINIT_FUNC
PyInit__lz4pages(void)
{
    return PyModule_Create(&lz4pages_module);
}
