/* LZ4 blocks for many pages in one call, with the GIL released for the whole list: zblock's
 * optional accelerator for software lz4 (without it, python-lz4 and zblock.scan do the same work).
 *
 * Why this exists: python-lz4 releases and re-takes the GIL around every page. A 4 KiB page
 * costs 1-3 us to (de)compress, so with a second thread working the GIL changes hands twice per
 * page and two threads run slower than one (measured: splitting a 256-page lz4 read in two fell
 * from 1335 to 675 MB/s). Here the Python objects are collected with the GIL held, the LZ4 loop
 * runs without it, and the results become bytes objects afterwards: one hand-off per list.
 * One page keeps the GIL (see gil_release).
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
 *                                    zswap_store()'s per-page work for a whole write request,
 *                                    as zblock/scan.py does it in Python; see
 *                                    lz4pages_scan_pages
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#include "_gil.h"
#include <stdint.h>
#include <string.h>

/* Work on less than this many bytes keeps the GIL: with another thread waiting, releasing it
 * wakes that thread and taking it back waits for it, which costs more than a page's LZ4 (one
 * page through a mount: fio random 4 KiB reads). */
#define GIL_RELEASE_MIN (2 * 4096)

static PyThreadState *
gil_release(Py_ssize_t nbytes)
{
    return gil_release_from(nbytes, GIL_RELEASE_MIN);
}

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
    PyThreadState *ts = gil_release(in_len);
    len = LZ4_compress_default(in.buf, dst, in_len, bound);
    gil_retake(ts);
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
    PyThreadState *ts = gil_release((Py_ssize_t)offs[n]);
    for (Py_ssize_t i = 0; i < n; i++) {
        lens[i] = LZ4_compress_default(views[i].buf, scratch + offs[i], (int)views[i].len,
                                       (int)(offs[i + 1] - offs[i]));
        if (lens[i] <= 0 && views[i].len > 0) {
            bad = i;
            break;
        }
    }
    gil_retake(ts);
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
    PyThreadState *ts = gil_release(out_len);
    got = LZ4_decompress_safe(in.buf, PyBytes_AS_STRING(out), (int)in.len, (int)out_len);
    gil_retake(ts);
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
    PyThreadState *ts = gil_release(n * out_len);
    for (Py_ssize_t i = 0; i < n; i++) {
        got = LZ4_decompress_safe(views[i].buf, dsts[i], (int)views[i].len, (int)out_len);
        if (got != out_len) {
            bad = i;
            break;
        }
    }
    gil_retake(ts);
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
    PyThreadState *ts = gil_release(n * out_len);
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
    gil_retake(ts);
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

/* Page states, as zblock/scan.py numbers them (tests/test_compressors.py checks they agree). */
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

/* scan_pages(buf, page_size, detect_same, raw_poor) -> (objs, states, lengths, fills)
 *
 * For each whole page of buf, in one pass with the GIL released:
 *   same-filled (detect_same)  state SAME, fills[i] its word, objs[i] None
 *   compresses below a page    state COMP, lengths[i] its length, objs[i] the LZ4 block
 *   does not (zswap: dlen >= PAGE_SIZE)
 *                 raw_poor     state RAW, lengths[i] = page_size, objs[i] a copy of the page
 *                 otherwise    state NONE, objs[i] None (the caller sends it to disk)
 * states is uint8, lengths uint16 and fills uint64 per page, native order, as bytes (zblock.scan
 * casts them to typed memoryviews). fills[i] is the page's first word for every page, as the cache
 * keeps it. This replaces zblock.scan's same-filled check, compress_pages and a Python pass over
 * its results. */
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
    PyThreadState *ts = gil_release(n * page_size);
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(&fl[i], src + i * page_size, 8);
        st[i] = scan_one(src + i * page_size, page_size, detect_same, raw_poor,
                         scratch + i * page_size, &ln[i]);
    }
    gil_retake(ts);
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
