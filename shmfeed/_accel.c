/*
 * shmfeed._accel: the optional C hot path of one channel ring.
 *
 * It does exactly what ChannelCore.offer_fast and ChannelCore.poll_fast do in Python (see
 * shmfeed/_ring.py, which stays the reference and the fallback), in one call instead of a
 * dozen interpreted steps: take the side lock, check, copy one inline record, commit,
 * release. Everything unusual (a full or wrapping ring, a spill record, a closed channel,
 * a corrupt position) is left to the Python path: these functions then change nothing
 * and say "not here".
 *
 * The layout (word indices, header size) is passed in by Python from shmfeed/_layout.py,
 * so that stays the one place that defines it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>

#define KIND_DATA 1u

/* Word indices into the channel header, in the order Python passes them. */
enum {
    W_WRITE_POS, W_READ_POS, W_SENT, W_RECEIVED, W_CLOSED, W_CAPACITY,
    W_LOCK_OWNER, W_RECV_LOCK_OWNER, W_RECV_WAITING, W_SEND_WAITING, W_COUNT
};

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* the segment's mapping; held until release() */
    int has_view;
    sem_t *send_lock;
    sem_t *recv_lock;
    unsigned char *ring;   /* first byte of the ring (after the header) */
    uint64_t *words;       /* the header as u64 words */
    uint64_t ring_bytes;
    Py_ssize_t index[W_COUNT];
} Ring;

static inline uint64_t load(const Ring *self, int which) {
    return __atomic_load_n(&self->words[self->index[which]], __ATOMIC_ACQUIRE);
}

static inline void store(Ring *self, int which, uint64_t value) {
    __atomic_store_n(&self->words[self->index[which]], value, __ATOMIC_RELEASE);
}

/* Take a side lock; the GIL is let go only if we must wait for it. -1 with an exception
 * set if a signal handler raised meanwhile or the ring was released while we waited. */
static int lock(Ring *self, sem_t *semaphore) {
    if (sem_trywait(semaphore) == 0)
        return 0;
    for (;;) {
        int result, error;
        Py_BEGIN_ALLOW_THREADS
        result = sem_wait(semaphore);
        error = errno;
        Py_END_ALLOW_THREADS
        if (result == 0)
            break;
        if (error != EINTR) {
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    if (!self->has_view) {  /* released by another thread while we waited */
        sem_post(semaphore);
        PyErr_SetString(PyExc_ValueError, "shmfeed: the channel was released");
        return -1;
    }
    return 0;
}

static int check_open(Ring *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "shmfeed: the channel was released");
        return -1;
    }
    return 0;
}

/* Ring.offer(payload, pid) -> 0 delivered, 1 delivered and receivers wait (wake them),
 * 2 not written (take the Python path). */
static PyObject *Ring_offer(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "offer(payload, pid)");
        return NULL;
    }
    if (check_open(self) < 0)
        return NULL;
    Py_buffer payload;
    if (PyObject_GetBuffer(args[0], &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(args[1]);
    if (pid == (uint64_t)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    if (lock(self, self->send_lock) < 0) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    store(self, W_LOCK_OWNER, pid);
    uint64_t size = (uint64_t)payload.len;
    uint64_t record = 8 + ((size + 7) & ~(uint64_t)7);
    uint64_t ring = self->ring_bytes;
    uint64_t write_pos = load(self, W_WRITE_POS);
    uint64_t read_pos = load(self, W_READ_POS);
    uint64_t sent = load(self, W_SENT);
    uint64_t received = load(self, W_RECEIVED);
    uint64_t offset = write_pos % ring;
    int fits = !load(self, W_CLOSED)
        && size <= 0xFFFFFFF0u
        && read_pos <= write_pos                    /* anything else is corrupt: Python says so */
        && record <= ring - offset
        && write_pos - read_pos + record <= ring
        && received <= sent
        && sent - received < load(self, W_CAPACITY)
        && sent != UINT64_MAX
        && write_pos <= UINT64_MAX - record;
    if (fits) {
        uint32_t header[2] = {(uint32_t)size, KIND_DATA};  /* little-endian: x86-64 and arm64 */
        unsigned char *at = self->ring + offset;
        memcpy(at, header, 8);
        memcpy(at + 8, payload.buf, (size_t)size);
        store(self, W_SENT, sent + 1);
        store(self, W_WRITE_POS, write_pos + record);  /* the commit: after the bytes */
    }
    store(self, W_LOCK_OWNER, 0);
    sem_post(self->send_lock);  /* a full barrier: the commit is visible before we look */
    PyBuffer_Release(&payload);
    if (!fits)
        return PyLong_FromLong(2);
    return PyLong_FromLong(load(self, W_RECV_WAITING) ? 1 : 0);
}

/* Ring.poll(pid) -> the payload of the oldest inline record, or None (take the Python
 * path: empty, wrapped, a spill record, or anything odd). */
static PyObject *Ring_poll(Ring *self, PyObject *pid_object) {
    if (check_open(self) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(pid_object);
    if (pid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (lock(self, self->recv_lock) < 0)
        return NULL;
    store(self, W_RECV_LOCK_OWNER, pid);
    PyObject *data = NULL;
    int failed = 0;
    uint64_t ring = self->ring_bytes;
    uint64_t read_pos = load(self, W_READ_POS);
    uint64_t write_pos = load(self, W_WRITE_POS);
    uint64_t available = write_pos - read_pos;
    uint64_t offset = read_pos % ring;
    uint64_t received = load(self, W_RECEIVED);
    if (read_pos < write_pos && available <= ring && !(offset & 7) && offset + 8 <= ring
            && received != UINT64_MAX) {
        uint32_t header[2];
        memcpy(header, self->ring + offset, 8);
        uint64_t size = header[0];
        uint64_t record = 8 + ((size + 7) & ~(uint64_t)7);
        if (header[1] == KIND_DATA && record <= available && offset + record <= ring) {
            data = PyBytes_FromStringAndSize((const char *)self->ring + offset + 8, (Py_ssize_t)size);
            if (data == NULL) {
                failed = 1;
            } else {
                store(self, W_RECEIVED, received + 1);
                store(self, W_READ_POS, read_pos + record);
            }
        }
    }
    store(self, W_RECV_LOCK_OWNER, 0);
    sem_post(self->recv_lock);
    if (failed)
        return NULL;
    if (data == NULL)
        Py_RETURN_NONE;
    return data;
}

static PyObject *Ring_release(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view) {
        self->has_view = 0;
        self->ring = NULL;
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static sem_t *open_semaphore(PyObject *name) {
    const char *text = PyUnicode_AsUTF8(name);
    if (text == NULL)
        return NULL;
    sem_t *semaphore = sem_open(text, 0);
    if (semaphore == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return NULL;
    }
    return semaphore;
}

/* Ring(mapping, send_lock_name, recv_lock_name, header_bytes, ring_bytes, indices) */
static int Ring_init(Ring *self, PyObject *args, PyObject *kwargs) {
    PyObject *mapping, *send_name, *recv_name, *indices;
    Py_ssize_t header_bytes;
    unsigned long long ring_bytes;
    if (self->has_view || self->send_lock || self->recv_lock) {
        PyErr_SetString(PyExc_TypeError, "Ring is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OUUnKO!:Ring", &mapping, &send_name, &recv_name, &header_bytes,
                          &ring_bytes, &PyTuple_Type, &indices))
        return -1;
    if (PyTuple_GET_SIZE(indices) != W_COUNT) {
        PyErr_Format(PyExc_ValueError, "Ring needs %d word indices", W_COUNT);
        return -1;
    }
    for (Py_ssize_t i = 0; i < W_COUNT; i++) {
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(indices, i));
        if (index == -1 && PyErr_Occurred())
            return -1;
        if (index < 0 || (index + 1) * 8 > header_bytes) {
            PyErr_SetString(PyExc_ValueError, "Ring: a word index lies outside the header");
            return -1;
        }
        self->index[i] = index;
    }
    if (header_bytes < 8 || header_bytes % 8 || ring_bytes < 8 || ring_bytes % 8) {
        PyErr_SetString(PyExc_ValueError, "Ring: header and ring sizes must be positive multiples of 8");
        return -1;
    }
    if (PyObject_GetBuffer(mapping, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    if ((uint64_t)self->view.len < (uint64_t)header_bytes + ring_bytes || ((uintptr_t)self->view.buf & 7)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "Ring: the mapping is smaller than header plus ring");
        return -1;
    }
    self->send_lock = open_semaphore(send_name);
    if (self->send_lock != NULL)
        self->recv_lock = open_semaphore(recv_name);
    if (self->recv_lock == NULL) {
        if (self->send_lock != NULL) {
            sem_close(self->send_lock);
            self->send_lock = NULL;
        }
        PyBuffer_Release(&self->view);
        return -1;
    }
    self->has_view = 1;
    self->words = (uint64_t *)self->view.buf;
    self->ring = (unsigned char *)self->view.buf + header_bytes;
    self->ring_bytes = ring_bytes;
    return 0;
}

static void Ring_dealloc(Ring *self) {
    Ring_release(self, NULL);
    /* Closed only here: no call can be using them (a call holds a reference). glibc counts
     * opens per process, so the Python side's own handles stay valid. */
    if (self->send_lock)
        sem_close(self->send_lock);
    if (self->recv_lock)
        sem_close(self->recv_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Ring_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))Ring_offer, METH_FASTCALL,
     "offer(payload, pid) -> 0 written, 1 written and receivers wait, 2 not written"},
    {"poll", (PyCFunction)Ring_poll, METH_O,
     "poll(pid) -> the oldest inline record's payload, or None for the Python path"},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, "let go of the mapping (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmfeed._accel.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C hot path of one channel ring (see shmfeed/_ring.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "shmfeed._accel", "The optional C hot path of shmfeed's rings.", -1, NULL,
};

PyMODINIT_FUNC PyInit__accel(void) {
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
