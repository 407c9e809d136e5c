/* Pin: a view of a spill file's mapping that keeps it (Channel.recv_view, Feed.loan).
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

/* Pin(exporter, offset, length, on_release): a read-only buffer of ``length`` bytes at
 * ``offset`` in ``exporter``'s buffer (a spill file's mapping), for a value received as a
 * view (Channel.recv_view). It holds an export of the mapping while it lives, and every
 * memoryview or NumPy array made from it (and every slice of those) holds the Pin: when
 * the last of them is gone, ``on_release()`` runs (it removes the receiver's link to the
 * file, so the sender may reuse it). Nothing the user keeps can outlive the bytes.
 *
 * With ``writable`` true (Feed.loan: a value written in place) the buffer is writable, and
 * ``exports`` counts the buffers made from the Pin that are still alive: a loan is sent
 * only once nothing the user made from it can write into the file any more. */
typedef struct {
    PyObject_HEAD
    Py_buffer base;
    int has_base;
    int writable;
    Py_ssize_t exports;
    Py_ssize_t offset;
    Py_ssize_t length;
    PyObject *on_release;
} Pin;

static int Pin_init(Pin *self, PyObject *args, PyObject *kwargs) {
    PyObject *exporter, *on_release;
    Py_ssize_t offset, length;
    int writable = 0;
    if (self->has_base) {
        PyErr_SetString(PyExc_TypeError, "Pin is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OnnO|p:Pin", &exporter, &offset, &length, &on_release, &writable))
        return -1;
    if (!PyCallable_Check(on_release)) {
        PyErr_SetString(PyExc_TypeError, "Pin: on_release must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(exporter, &self->base, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (offset < 0 || length < 0 || offset > self->base.len || length > self->base.len - offset) {
        PyBuffer_Release(&self->base);
        PyErr_SetString(PyExc_ValueError, "Pin: offset and length lie outside the buffer");
        return -1;
    }
    self->has_base = 1;
    self->writable = writable;
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
    if (PyBuffer_FillInfo(view, (PyObject *)self, (char *)self->base.buf + self->offset, self->length,
                          !self->writable, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Pin_releasebuffer(Pin *self, Py_buffer *view) {
    (void)view;
    self->exports--;
}

static PyMemberDef Pin_members[] = {
    {"exports", T_PYSSIZET, offsetof(Pin, exports), READONLY, "buffers made from the Pin still alive"},
    {NULL},
};

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

static PyBufferProcs Pin_as_buffer = {(getbufferproc)Pin_getbuffer, (releasebufferproc)Pin_releasebuffer};

static PyTypeObject PinType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmfeed._accel.Pin",
    .tp_basicsize = sizeof(Pin),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pin(exporter, offset, length, on_release, writable=False): a view that keeps a mapping",
    .tp_members = Pin_members,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pin_init,
    .tp_dealloc = (destructor)Pin_dealloc,
    .tp_as_buffer = &Pin_as_buffer,
};
