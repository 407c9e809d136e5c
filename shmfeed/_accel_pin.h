/* Pin: a read-only view of a spill file's mapping that keeps it (Channel.recv_view).
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

/* Pin(exporter, offset, length, on_release): a read-only buffer of ``length`` bytes at
 * ``offset`` in ``exporter``'s buffer (a spill file's mapping), for a value received as a
 * view (Channel.recv_view). It holds an export of the mapping while it lives, and every
 * memoryview or NumPy array made from it (and every slice of those) holds the Pin: when
 * the last of them is gone, ``on_release()`` runs (it removes the receiver's link to the
 * file, so the sender may reuse it). Nothing the user keeps can outlive the bytes. */
typedef struct {
    PyObject_HEAD
    Py_buffer base;
    int has_base;
    Py_ssize_t offset;
    Py_ssize_t length;
    PyObject *on_release;
} Pin;

static int Pin_init(Pin *self, PyObject *args, PyObject *kwargs) {
    PyObject *exporter, *on_release;
    Py_ssize_t offset, length;
    if (self->has_base) {
        PyErr_SetString(PyExc_TypeError, "Pin is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OnnO:Pin", &exporter, &offset, &length, &on_release))
        return -1;
    if (!PyCallable_Check(on_release)) {
        PyErr_SetString(PyExc_TypeError, "Pin: on_release must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(exporter, &self->base, PyBUF_SIMPLE) < 0)
        return -1;
    if (offset < 0 || length < 0 || offset > self->base.len || length > self->base.len - offset) {
        PyBuffer_Release(&self->base);
        PyErr_SetString(PyExc_ValueError, "Pin: offset and length lie outside the buffer");
        return -1;
    }
    self->has_base = 1;
    self->offset = offset;
    self->length = length;
    Py_INCREF(on_release);
    self->on_release = on_release;
    return 0;
}

static int Pin_getbuffer(Pin *self, Py_buffer *view, int flags) {
    if (!self->has_base) {
        PyErr_SetString(PyExc_BufferError, "Pin: not initialised");
        view->obj = NULL;
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)self, (char *)self->base.buf + self->offset, self->length, 1, flags);
}

static void Pin_dealloc(Pin *self) {
    if (self->has_base) {
        PyBuffer_Release(&self->base);
        self->has_base = 0;
    }
    PyObject *on_release = self->on_release;
    self->on_release = NULL;
    if (on_release != NULL) {
        PyObject *saved_type, *saved_value, *saved_traceback;
        PyErr_Fetch(&saved_type, &saved_value, &saved_traceback);
        PyObject *result = PyObject_CallNoArgs(on_release);
        if (result == NULL)
            PyErr_WriteUnraisable(on_release);
        Py_XDECREF(result);
        Py_DECREF(on_release);
        PyErr_Restore(saved_type, saved_value, saved_traceback);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Pin_as_buffer = {(getbufferproc)Pin_getbuffer, NULL};

static PyTypeObject PinType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmfeed._accel.Pin",
    .tp_basicsize = sizeof(Pin),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pin(exporter, offset, length, on_release): a read-only view that keeps a mapping",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pin_init,
    .tp_dealloc = (destructor)Pin_dealloc,
    .tp_as_buffer = &Pin_as_buffer,
};
