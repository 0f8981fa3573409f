/* AES-256-GCM for many pages in one call, with the GIL released for the whole batch: zblock's
 * optional accelerator for --encrypt (without it, the `cryptography` package does the same work,
 * page by page; zblock/seal.py).
 *
 * Why this exists: `cryptography` releases the GIL around every call. A 4 KiB page takes about
 * 1 us to seal, and a thread that gives the GIL up for that long must then wait for it while
 * other threads run Python: with one busy thread beside it, sealing a page took 340 us instead of
 * 1.2 us, and the swap hog ran 1.25-1.4x as long with --encrypt. Here a batch's buffers are
 * taken with the GIL held, OpenSSL runs without it, and one bytes object holds the results: one
 * hand-off per batch. A batch of less than 64 pages keeps the GIL (see GIL_RELEASE_MIN).
 *
 * Output is byte for byte what cryptography's AESGCM gives for the same key, nonce and
 * associated data (tests/test_encrypt.py checks both ways).
 *
 *   seal_many(key, nonces, aads, srcs) -> (ciphertexts, tags)
 *       key 32 bytes; nonces 12 bytes an item, joined; aads one length for every item, joined;
 *       srcs a sequence of buffers. ciphertexts: the items' ciphertexts joined (each as long as
 *       its item); tags: 16 bytes an item, joined.
 *   open_many(key, nonces, aads, data, tags) -> (plaintexts, bad)
 *       data: the items' ciphertexts joined, all of one length (len(data) / items); tags 16
 *       bytes an item. plaintexts joined; bad: the indices whose tag did not verify (their
 *       bytes in plaintexts are zeros).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include "_gil.h"
#include <string.h>

#define KEY_LEN 32
#define NONCE_LEN 12
#define TAG_LEN 16
/* Less work than this keeps the GIL: AES-GCM takes about 1 us a page here, far less than the
 * wait to take the GIL back from a busy thread (up to its 5 ms switch interval), so only a batch
 * of 64 pages or more (writeback's) is worth the hand-off; a swap-in's few pages are not. */
#define GIL_RELEASE_MIN (64 * 4096)

static PyThreadState *
gil_release(Py_ssize_t nbytes)
{
    return gil_release_from(nbytes, GIL_RELEASE_MIN);
}

/* A context with the key schedule made once for the batch; NULL with the error set. */
static EVP_CIPHER_CTX *
new_ctx(const unsigned char *key, int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx != NULL && EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL, enc) == 1)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL: cannot set up AES-256-GCM");
    return NULL;
}

/* One item under the batch's key: 1 on success (decryption: the tag verified), else 0. */
static int
crypt_one(EVP_CIPHER_CTX *ctx, int enc, const unsigned char *nonce, const unsigned char *aad,
          int aad_len, const unsigned char *in, int len, unsigned char *out, unsigned char *tag)
{
    unsigned char final[16];
    int n;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) != 1)
        return 0;
    if (aad_len > 0 && EVP_CipherUpdate(ctx, NULL, &n, aad, aad_len) != 1)
        return 0;
    if (len > 0 && EVP_CipherUpdate(ctx, out, &n, in, len) != 1)
        return 0;
    if (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) != 1)
        return 0;
    if (EVP_CipherFinal_ex(ctx, final, &n) != 1)
        return 0;
    return !enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) == 1;
}

/* The key, nonces and aads of `n` items checked; the aad length of one item in *aad_len. */
static int
check_common(Py_buffer *key, Py_buffer *nonces, Py_buffer *aads, Py_ssize_t n, int *aad_len)
{
    if (key->len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "the key must be 32 bytes");
        return 0;
    }
    if (n <= 0 || nonces->len != n * NONCE_LEN || aads->len % n || aads->len / n > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "want 12 bytes of nonce and one aad length an item");
        return 0;
    }
    *aad_len = (int)(aads->len / n);
    return 1;
}

static PyObject *
sealpages_seal_many(PyObject *self, PyObject *args)
{
    Py_buffer key, nonces, aads;
    PyObject *arg, *seq = NULL, *cts = NULL, *tags = NULL, *result = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t n = 0, taken = 0, total = 0;
    int aad_len, ok = 1;
    if (!PyArg_ParseTuple(args, "y*y*y*O", &key, &nonces, &aads, &arg))
        return NULL;
    seq = PySequence_Fast(arg, "srcs must be a sequence of buffers");
    if (seq == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(seq);
    if (!check_common(&key, &nonces, &aads, n, &aad_len))
        goto done;
    views = PyMem_Calloc(n, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; taken < n; taken++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, taken);
        if (PyObject_GetBuffer(item, &views[taken], PyBUF_SIMPLE) < 0)
            goto done;
        if (views[taken].len > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "an item is too large");
            taken++;
            goto done;
        }
        total += views[taken].len;
    }
    cts = PyBytes_FromStringAndSize(NULL, total);
    tags = PyBytes_FromStringAndSize(NULL, n * TAG_LEN);
    if (cts == NULL || tags == NULL)
        goto done;
    EVP_CIPHER_CTX *ctx = new_ctx(key.buf, 1);
    if (ctx == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(cts);
    unsigned char *tag = (unsigned char *)PyBytes_AS_STRING(tags);
    PyThreadState *ts = gil_release(total);
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        ok = crypt_one(ctx, 1, (unsigned char *)nonces.buf + i * NONCE_LEN,
                       (unsigned char *)aads.buf + i * aad_len, aad_len, views[i].buf,
                       (int)views[i].len, out, tag + i * TAG_LEN);
        out += views[i].len;
    }
    gil_retake(ts);
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL: AES-256-GCM encryption failed");
        goto done;
    }
    result = PyTuple_Pack(2, cts, tags);
done:
    for (Py_ssize_t i = 0; i < taken; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_XDECREF(cts);
    Py_XDECREF(tags);
    Py_XDECREF(seq);
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonces);
    PyBuffer_Release(&aads);
    return result;
}

static PyObject *
sealpages_open_many(PyObject *self, PyObject *args)
{
    Py_buffer key, nonces, aads, data, tags;
    PyObject *plain = NULL, *bad = NULL, *result = NULL;
    unsigned char *failed = NULL;
    int aad_len;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*", &key, &nonces, &aads, &data, &tags))
        return NULL;
    Py_ssize_t n = tags.len / TAG_LEN;
    if (!check_common(&key, &nonces, &aads, n, &aad_len))
        goto done;
    if (tags.len % TAG_LEN || data.len % n || data.len / n > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "want 16 bytes of tag and one length an item");
        goto done;
    }
    Py_ssize_t len = data.len / n;
    plain = PyBytes_FromStringAndSize(NULL, data.len);
    failed = PyMem_Calloc(n, 1);
    if (plain == NULL || failed == NULL) {
        if (failed == NULL)
            PyErr_NoMemory();
        goto done;
    }
    EVP_CIPHER_CTX *ctx = new_ctx(key.buf, 0);
    if (ctx == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(plain);
    PyThreadState *ts = gil_release(data.len);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!crypt_one(ctx, 0, (unsigned char *)nonces.buf + i * NONCE_LEN,
                       (unsigned char *)aads.buf + i * aad_len, aad_len,
                       (unsigned char *)data.buf + i * len, (int)len, out + i * len,
                       (unsigned char *)tags.buf + i * TAG_LEN)) {
            failed[i] = 1;
            memset(out + i * len, 0, len);     /* never bytes that did not authenticate */
        }
    }
    gil_retake(ts);
    EVP_CIPHER_CTX_free(ctx);
    bad = PyList_New(0);
    if (bad == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (failed[i]) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(bad, index) < 0) {
                Py_XDECREF(index);
                goto done;
            }
            Py_DECREF(index);
        }
    }
    result = PyTuple_Pack(2, plain, bad);
done:
    PyMem_Free(failed);
    Py_XDECREF(plain);
    Py_XDECREF(bad);
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonces);
    PyBuffer_Release(&aads);
    PyBuffer_Release(&data);
    PyBuffer_Release(&tags);
    return result;
}

static PyMethodDef sealpages_methods[] = {
    {"seal_many", sealpages_seal_many, METH_VARARGS,
     "seal_many(key, nonces, aads, srcs) -> (ciphertexts, tags), the GIL released for the batch."},
    {"open_many", sealpages_open_many, METH_VARARGS,
     "open_many(key, nonces, aads, data, tags) -> (plaintexts, bad), the GIL released for the "
     "batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sealpages_module = {
    PyModuleDef_HEAD_INIT, "zblock._sealpages",
    "AES-256-GCM for many pages per call with the GIL released for the whole batch.", -1,
    sealpages_methods,
};

PyMODINIT_FUNC
PyInit__sealpages(void)
{
    return PyModule_Create(&sealpages_module);
}
