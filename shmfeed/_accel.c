/*
 * shmfeed._accel: the optional C hot path of one channel ring.
 *
 * It does exactly what ChannelCore.offer_fast and ChannelCore.poll_fast do in Python (see
 * shmfeed/_ring.py, which stays the reference and the fallback), in one call instead of a
 * dozen interpreted steps: take the side lock, check, copy one inline record, commit,
 * release; the receives may also decode what they took (the C msgpack subset, else the
 * decode function they are given). Everything unusual (a full or wrapping ring, a spill record, a closed channel,
 * a corrupt position, a lock someone else holds) is left to the Python path: these
 * functions then change nothing and say "not here".
 *
 * The layout (word indices, header size) is passed in by Python from shmfeed/_layout.py,
 * so that stays the one place that defines it.
 */

/* The parts, by job (each a header included once, in this order): */
#include "_accel_common.h"
#include "_accel_decode.h"
#include "_accel_encode.h"
#include "_accel_ring.h"
#include "_accel_feed.h"
#include "_accel_copy.h"
#include "_accel_sigterm.h"

static PyMethodDef module_methods[] = {
    {"encode", (PyCFunction)accel_encode, METH_O,
     "encode(value) -> the msgpack bytes of a common value, or None for what only msgpack encodes"},
    {"encode_many", (PyCFunction)(void (*)(void))accel_encode_many, METH_FASTCALL,
     "encode_many(values, start, out) -> where it stopped: encode's bytes of values[start:] appended to out"},
    {"decode", (PyCFunction)(void (*)(void))accel_decode, METH_FASTCALL,
     "decode(data, otherwise) -> the value of msgpack bytes; otherwise(data) for what only msgpack decodes"},
    {"mark_sender", (PyCFunction)(void (*)(void))mark_sender, METH_FASTCALL,
     "mark_sender(mapping, offset, flag) -> handle: SIGTERM clears that flag first"},
    {"unmark_sender", (PyCFunction)unmark_sender, METH_O, "unmark_sender(handle)"},
    {"forget_marks", (PyCFunction)forget_marks, METH_NOARGS, "forget_marks(): after fork, in the child"},
    {"catch_sigterm", (PyCFunction)catch_sigterm, METH_NOARGS,
     "catch_sigterm() -> bool: install the SIGTERM handler over the default action"},
    {"has_buffers", (PyCFunction)(void (*)(void))has_buffers, METH_FASTCALL,
     "has_buffers(value, budget) -> bool, or None if value is too big to tell (see _codec)"},
    {"copy_into", (PyCFunction)(void (*)(void))copy_into, METH_FASTCALL,
     "copy_into(destination, source): copy around the cache (for large values)"},
    {"link_count", (PyCFunction)link_count, METH_O,
     "link_count(descriptor) -> the file's number of links (fstat's st_nlink)"},
    {"offer_all", (PyCFunction)(void (*)(void))offer_all, METH_FASTCALL,
     "offer_all(rings, payload, pid, start) -> -1 all done, else 2*i (+1: taken, wake its receivers)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "shmfeed._accel", "The optional C hot path of shmfeed's rings.", -1, module_methods,
};

#include "_accel_pin.h"

PyMODINIT_FUNC PyInit__accel(void) {
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&FeedType) < 0 || PyType_Ready(&PinType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&RingType);
    Py_INCREF(&FeedType);
    Py_INCREF(&PinType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0
            || PyModule_AddObject(module, "Feed", (PyObject *)&FeedType) < 0
            || PyModule_AddObject(module, "Pin", (PyObject *)&PinType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
