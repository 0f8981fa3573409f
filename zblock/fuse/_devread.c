/* zblock.fuse._devread: a /dev/fuse worker's wait for its next request, spinning before it sleeps.
 *
 * Why: a worker asleep in read(2) on an idle CPU takes about 20 us to wake on this VM class (the
 * vCPU halts; the request's wake-up is an IPI and a VM entry), and a swap-in waits for that on
 * every read: the server's own work on a 32 KiB read is 14 us. A worker that polls the device
 * for a short while after answering is there when the next request comes. The poll runs
 * without the GIL, so the spinning costs the other threads a CPU, not the interpreter.
 *
 * Optional accelerator: zblock.fuse.native falls back to a plain blocking readv without it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

static long long
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

PyDoc_STRVAR(read_request_doc,
"read_request(fd, buffer, spin_ns) -> int\n\n"
"One request from the FUSE device `fd` into the writable `buffer`: polls the device without\n"
"sleeping for up to `spin_ns`, then reads, blocking if no request came (another worker may\n"
"also have taken the one that did). Returns what read(2) returns; OSError as os.readv raises.");

static PyObject *
read_request(PyObject *self, PyObject *args)
{
    int fd;
    Py_buffer buf;
    long long spin_ns;
    ssize_t n;
    int err = 0;

    if (!PyArg_ParseTuple(args, "iw*L", &fd, &buf, &spin_ns))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    long long deadline = now_ns() + spin_ns;
    /* readable, an error the read reports, or an interrupted poll: read either way */
    while (spin_ns > 0 && poll(&pfd, 1, 0) == 0 && now_ns() < deadline)
        ;
    n = read(fd, buf.buf, (size_t)buf.len);
    if (n < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (n < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"read_request", read_request, METH_VARARGS, read_request_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zblock.fuse._devread",
    "A FUSE worker's wait for its next request, spinning before it sleeps.", -1, methods,
};

PyMODINIT_FUNC
PyInit__devread(void)
{
    return PyModule_Create(&module);
}
