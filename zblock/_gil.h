/* The GIL around a C loop over many pages, for zblock's optional accelerators
 * (zblock/_lz4pages.c, zblock/_sealpages.c): released only when the work is at least `min_bytes`,
 * since with another thread waiting, releasing it wakes that thread and taking it back waits for
 * it; each caller says why its threshold. */
#ifndef ZBLOCK_GIL_H
#define ZBLOCK_GIL_H

#include <Python.h>

static PyThreadState *
gil_release_from(Py_ssize_t nbytes, Py_ssize_t min_bytes)
{
    return nbytes >= min_bytes ? PyEval_SaveThread() : NULL;
}

static void
gil_retake(PyThreadState *ts)
{
    if (ts != NULL)
        PyEval_RestoreThread(ts);
}

#endif
