/* A feed's send: offer_all over its rings, and the Feed type (the whole common send in C).
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

/* offer_all(rings, payload, pid, start) -> -1 when rings[start:] all took the payload and
 * nobody waits on them; else 2*i + 1 if rings[i] took it and its receivers wait, or 2*i
 * if it did not take it. The caller deals with ring i and calls again from i + 1.
 * (The Python side names these: _native.OFFER_ALL_DONE, _native.stopped_at.) */
static PyObject *offer_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer payload;
    uint64_t pid;
    if (nargs != 4 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "offer_all(rings: tuple, payload, pid, start)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (parse_payload_and_pid(args[1], args[2], &payload, &pid) < 0)
        return NULL;
    PyObject *rings = args[0];
    Py_INCREF(rings);
    long answer = -1;
    for (Py_ssize_t i = start < 0 ? 0 : start; i < PyTuple_GET_SIZE(rings); i++) {
        PyObject *item = PyTuple_GET_ITEM(rings, i);
        if (!PyObject_TypeCheck(item, &RingType)) {
            PyErr_SetString(PyExc_TypeError, "offer_all: rings must hold Ring objects");
            answer = -2;
            break;
        }
        int outcome = ring_offer((Ring *)item, payload.buf, (uint64_t)payload.len, pid);
        if (outcome < 0) {
            answer = -2;
            break;
        }
        if (outcome) {
            answer = 2 * (long)i + (outcome == 1);
            break;
        }
    }
    Py_DECREF(rings);
    PyBuffer_Release(&payload);
    return answer == -2 ? NULL : PyLong_FromLong(answer);
}

/* --- a feed's send ----------------------------------------------------------------------- */

/* Word indices into the feed header, in the order Python passes them. */
enum { F_SEND_LOCK_OWNER, F_CLOSED, F_SUB_VERSION, F_SENDS, F_DELIVERED, F_LAST_SENDER_PID, F_COUNT };

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    sem_t *send_lock;
    uint64_t *words;
    Py_ssize_t index[F_COUNT];
    unsigned long holder;  /* the thread a send returned to with the lock held, or 0 */
    long dropped;          /* rings that dropped the value in the last send that stopped at a ring */
} Feed;

static inline uint64_t feed_load(const Feed *self, int which) {
    return __atomic_load_n(&self->words[self->index[which]], __ATOMIC_ACQUIRE);
}

static inline void feed_store(Feed *self, int which, uint64_t value) {
    __atomic_store_n(&self->words[self->index[which]], value, __ATOMIC_RELEASE);
}

static void feed_unlock(Feed *self) {
    if (self->has_view)
        feed_store(self, F_SEND_LOCK_OWNER, 0);
    sem_post(self->send_lock);
}

/* Feed.send(rings, payload, pid, version) -> the common case of FeedCore.send in one call.
 * (The Python side names the answers and the plan: _native.FeedSendAnswer, SendPlan.)
 *   -1  nothing done, lock not held: the feed is closed, its subscriptions changed since
 *       ``version`` (the Python path re-reads them), or its send lock is busy (the Python
 *       path waits for it with the caller's deadline);
 *   -2 - d  every ring settled the payload: all took it but ``d`` full drop_newest rings,
 *       which dropped it (counted there); nobody waits, the counters are updated, lock
 *       released;
 *   i >= 0, as offer_all: ring i needs the Python path (2*i) or a wake-up (2*i + 1), the
 *       rings before it took the payload, but ``dropped()`` of them that dropped it (full,
 *       drop_newest), and THE FEED'S SEND LOCK IS STILL HELD by this
 *       thread: the caller goes on from there and then calls unlock_if_held(), in a
 *       ``finally`` around this very call (so an exception raised as this returns, such as
 *       a KeyboardInterrupt, cannot leave the lock taken). */
static PyObject *Feed_send(Feed *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer payload;
    uint64_t pid, version;
    if ((nargs != 4 && nargs != 5) || !PyTuple_Check(args[0]) || (nargs == 5 && !PyList_Check(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "send(rings: tuple, payload, pid, version[, deferred: list])");
        return NULL;
    }
    /* deferred (a batch's send): a ring that took the payload and whose receivers wait is
     * not a stop: its index goes in the list, and the caller wakes it once for the batch. */
    PyObject *deferred = nargs == 5 ? args[4] : NULL;
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "shmfeed: the feed was released");
        return NULL;
    }
    version = PyLong_AsUnsignedLongLong(args[3]);
    if (version == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyLong_FromLong(-1);  /* not a version a table can have: the Python path */
    }
    if (parse_payload_and_pid(args[1], args[2], &payload, &pid) < 0)
        return NULL;
    PyObject *rings = args[0];
    Py_INCREF(rings);
    long answer = -2;
    int failed = 0;
    long dropped = 0;
    if (try_lock(self->send_lock)) {
        answer = -1;
        goto done;
    }
    feed_store(self, F_SEND_LOCK_OWNER, pid);
    if (feed_load(self, F_CLOSED) || feed_load(self, F_SUB_VERSION) != version) {
        feed_unlock(self);
        answer = -1;
        goto done;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(rings);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(rings, i);
        int outcome = PyObject_TypeCheck(item, &RingType)
            ? ring_offer_marked((Ring *)item, payload.buf, (uint64_t)payload.len, pid, NULL, 0, 1) : -1;
        if (outcome < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Feed.send: rings must hold Ring objects");
            feed_unlock(self);
            failed = 1;
            goto done;
        }
        if (outcome == 3) {
            dropped++;
            continue;
        }
        if (outcome == 1 && deferred != NULL) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(deferred, index) < 0) {
                Py_XDECREF(index);
                feed_unlock(self);
                failed = 1;
                goto done;
            }
            Py_DECREF(index);
            continue;
        }
        if (outcome) {
            answer = 2 * (long)i + (outcome == 1);  /* the lock stays held: see above */
            self->holder = PyThread_get_thread_ident();
            self->dropped = dropped;
            goto done;
        }
    }
    feed_store(self, F_SENDS, feed_load(self, F_SENDS) + 1);
    feed_store(self, F_DELIVERED, feed_load(self, F_DELIVERED) + (uint64_t)(count - dropped));
    feed_store(self, F_LAST_SENDER_PID, pid);
    feed_unlock(self);
    answer = -2 - dropped;
done:
    Py_DECREF(rings);
    PyBuffer_Release(&payload);
    return failed ? NULL : PyLong_FromLong(answer);
}

/* Feed.unlock_if_held(): release the send lock if a send returned to this thread holding
 * it (see Feed.send); otherwise nothing. */
static PyObject *Feed_unlock_if_held(Feed *self, PyObject *Py_UNUSED(ignored)) {
    if (self->holder && self->holder == PyThread_get_thread_ident()) {
        self->holder = 0;
        feed_unlock(self);
    }
    Py_RETURN_NONE;
}

static PyObject *Feed_dropped(Feed *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->dropped);
}

static PyObject *Feed_release(Feed *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view) {
        self->has_view = 0;
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

/* Feed(mapping, send_lock_name, header_bytes, indices) */
static int Feed_init(Feed *self, PyObject *args, PyObject *kwargs) {
    PyObject *mapping, *send_name, *indices;
    Py_ssize_t header_bytes;
    if (self->has_view || self->send_lock) {
        PyErr_SetString(PyExc_TypeError, "Feed is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OUnO!:Feed", &mapping, &send_name, &header_bytes, &PyTuple_Type, &indices))
        return -1;
    if (parse_indices(indices, F_COUNT, header_bytes, self->index) < 0)
        return -1;
    if (PyObject_GetBuffer(mapping, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    if (self->view.len < header_bytes || ((uintptr_t)self->view.buf & 7)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "Feed: the mapping is smaller than its header");
        return -1;
    }
    self->send_lock = open_semaphore(send_name);
    if (self->send_lock == NULL) {
        PyBuffer_Release(&self->view);
        return -1;
    }
    self->has_view = 1;
    self->words = (uint64_t *)self->view.buf;
    return 0;
}

static void Feed_dealloc(Feed *self) {
    Feed_release(self, NULL);
    if (self->send_lock)
        sem_close(self->send_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Feed_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Feed_send, METH_FASTCALL,
     "send(rings, payload, pid, version[, deferred]) -> -1 Python path, -2 - dropped done, else 2*i (+1) "
     "with the lock held; deferred: a list that gets the rings to wake instead of stopping at them"},
    {"dropped", (PyCFunction)Feed_dropped, METH_NOARGS,
     "rings before the one the last stopped send stopped at that dropped its value (full, drop_newest)"},
    {"unlock_if_held", (PyCFunction)Feed_unlock_if_held, METH_NOARGS,
     "release the send lock if a send returned to this thread holding it"},
    {"release", (PyCFunction)Feed_release, METH_NOARGS, "let go of the mapping (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FeedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmfeed._accel.Feed",
    .tp_basicsize = sizeof(Feed),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C hot path of one feed's send (see FeedCore.send in shmfeed/_feed.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Feed_init,
    .tp_dealloc = (destructor)Feed_dealloc,
    .tp_methods = Feed_methods,
};
