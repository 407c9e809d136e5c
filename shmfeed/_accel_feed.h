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
    unsigned long long run_values;  /* values this object sent in runs (feed_offer_run): for tests */
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

/* Offer one payload to every ring, the send lock held. 0: every ring settled it (took it,
 * or dropped it if full and drop_newest, counted in *dropped) and the feed's counters are
 * updated; 1: ring i needs the Python path or a wake-up, *stop = 2*i (+1 for a wake-up);
 * -1: error (exception set). The lock stays held whatever the outcome.
 * ``deferred`` (a batch's send): a ring that took it and whose receivers wait is not a stop:
 * its index goes in the list (once per call, ``seen`` marks those listed), and the caller
 * wakes it once for the batch. */
static int feed_offer_all(Feed *self, PyObject *rings, const void *buf, uint64_t len, uint64_t pid,
                          PyObject *deferred, unsigned char *seen, long *dropped, long *stop) {
    Py_ssize_t count = PyTuple_GET_SIZE(rings);
    *dropped = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(rings, i);
        int outcome = PyObject_TypeCheck(item, &RingType)
            ? ring_offer_marked((Ring *)item, buf, len, pid, NULL, 0, 1) : -1;
        if (outcome < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Feed.send: rings must hold Ring objects");
            return -1;
        }
        if (outcome == 3) {
            (*dropped)++;
            continue;
        }
        if (outcome == 1 && deferred != NULL) {
            if (seen != NULL && seen[i])
                continue;
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(deferred, index) < 0) {
                Py_XDECREF(index);
                return -1;
            }
            Py_DECREF(index);
            if (seen != NULL)
                seen[i] = 1;
            continue;
        }
        if (outcome) {
            *stop = 2 * (long)i + (outcome == 1);
            return 1;
        }
    }
    feed_store(self, F_SENDS, feed_load(self, F_SENDS) + 1);
    feed_store(self, F_DELIVERED, feed_load(self, F_DELIVERED) + (uint64_t)(count - *dropped));
    feed_store(self, F_LAST_SENDER_PID, pid);
    return 0;
}

/* Take the send lock without waiting, for a send planned at ``version``: 0 taken (the
 * owner word written), 1 not (busy, closed, or the subscriptions changed: the Python path
 * re-reads them, waiting with the caller's deadline). */
static int feed_lock_for(Feed *self, uint64_t pid, uint64_t version) {
    if (try_lock(self->send_lock))
        return 1;
    feed_store(self, F_SEND_LOCK_OWNER, pid);
    if (feed_load(self, F_CLOSED) || feed_load(self, F_SUB_VERSION) != version) {
        feed_unlock(self);
        return 1;
    }
    return 0;
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
    PyObject *deferred = nargs == 5 ? args[4] : NULL;  /* see feed_offer_all */
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
    long answer = -1, dropped = 0, stop = 0;
    int failed = 0;
    if (!feed_lock_for(self, pid, version)) {
        int outcome = feed_offer_all(self, rings, payload.buf, (uint64_t)payload.len, pid, deferred, NULL,
                                     &dropped, &stop);
        if (outcome == 1) {
            answer = stop;  /* the lock stays held: see above */
            self->holder = PyThread_get_thread_ident();
            self->dropped = dropped;
        } else {
            feed_unlock(self);
            failed = outcome < 0;
            answer = -2 - dropped;
        }
    }
    Py_DECREF(rings);
    PyBuffer_Release(&payload);
    return failed ? NULL : PyLong_FromLong(answer);
}

/* Feed.send_value(value, plan, pid, large) -> Feed.send's short path for a value of the
 * common types, encoded here (_accel_encode.h) and sent as Feed.send does, in one call.
 * ``plan`` is the feed's SendPlan (version, targets, rings, inline_limit), read whole; a value
 * that encodes to more than ``large`` bytes is left to Python (_codec.LARGE_OUTPUT: the next
 * send takes the path for large values). Answers:
 *   None            the value is not of the common types: nothing done (encode decides);
 *   int n           every ring settled it: n took it (full drop_newest rings dropped it);
 *   bytes           its encoding, not sent (too big to go inline or large, the lock busy, the feed
 *                   closed or its subscriptions changed): the Python send sends these bytes;
 *   (bytes, stop)   stopped at a ring as Feed.send's answer ``stop`` (dropped() says how
 *                   many rings before it dropped it), THE FEED'S SEND LOCK STILL HELD: the
 *                   caller goes on from there, then unlock_if_held(), as after Feed.send. */
static PyObject *Feed_send_value(Feed *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != 4
            || !PyTuple_Check(PyTuple_GET_ITEM(args[1], 2))) {
        PyErr_SetString(PyExc_TypeError, "send_value(value, plan: SendPlan, pid, large)");
        return NULL;
    }
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "shmfeed: the feed was released");
        return NULL;
    }
    PyObject *plan = args[1], *rings = PyTuple_GET_ITEM(plan, 2);
    uint64_t version = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(plan, 0));
    Py_ssize_t inline_limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(plan, 3));
    uint64_t pid = PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t large = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *payload = encode_common(args[0]);
    if (payload == NULL)
        Py_RETURN_NONE;
    if (PyBytes_GET_SIZE(payload) > inline_limit || PyBytes_GET_SIZE(payload) > large
            || feed_lock_for(self, pid, version))
        return payload;
    Py_INCREF(rings);
    long dropped = 0, stop = 0;
    int outcome = feed_offer_all(self, rings, PyBytes_AS_STRING(payload), (uint64_t)PyBytes_GET_SIZE(payload), pid,
                                 NULL, NULL, &dropped, &stop);
    Py_ssize_t count = PyTuple_GET_SIZE(rings);
    Py_DECREF(rings);
    if (outcome == 1) {
        self->holder = PyThread_get_thread_ident();  /* the lock stays held: see above */
        self->dropped = dropped;
        PyObject *answer = Py_BuildValue("(Nl)", payload, stop);
        if (answer == NULL) {
            self->holder = 0;
            feed_unlock(self);
        }
        return answer;
    }
    feed_unlock(self);
    Py_DECREF(payload);
    return outcome < 0 ? NULL : PyLong_FromSsize_t(count - dropped);
}

/* Feed.send_batch(rings, payloads, start, pid, version, inline_limit, deferred, delivered)
 * -> (the index of the first payload not sent, why, dropped): Feed.send of payloads[start:] in order,
 * under one hold of the send lock. Each payload sent gets its count of rings that took it
 * appended to ``delivered``; receivers to wake go in ``deferred`` (once each). It stops
 * after FEED_BATCH_RUN payloads (why: -1), or at the first payload it cannot
 * send whole, and says why: -1, nothing done for
 * it and the lock not held (not a ``bytes`` of at most ``inline_limit`` bytes, the lock
 * busy, the feed closed or its subscriptions changed: the Python path sends it); else the
 * answer Feed.send gives for a stop at a ring, THE LOCK STILL HELD (see Feed.send: the
 * caller goes on from there, then unlock_if_held() in a ``finally``), and ``dropped`` is
 * as Feed.dropped() then. */
/* Values sent per hold of the send lock: other processes' sends wait no longer than that
 * (about 50 us of small values); the caller calls again for the rest. */
#define FEED_BATCH_RUN 256

/* A run: several values of a batch to every ring at once, the feed's send lock held. Each
 * ring's send lock is taken once, its records copied one after another and committed with
 * one store of WRITE_POS (and SENT): per value, what one value's offer pays for the locks
 * and the header words, paid once per run, and the receivers find the run at once.
 *
 * The run is the longest k values that every ring takes whole now: in the ring's capacity,
 * in its free bytes, and before its end (a wrap, like a full ring, is the per-value path's:
 * it is never part of a run). So it sends exactly what k per-value sends in a row would,
 * the same bytes into each ring, and what a ring could not take stays for them. All
 * the rings' locks are held together: none takes a value of the run before all can.
 * The rings are distinct (Feed_send_batch sends a plan with a channel subscribed twice
 * value by value). Returns k, or 0 when no run of RUN_MIN or more is possible now (a lock
 * busy, anything odd): nothing done. ``*failed`` is set (an exception) if a ring to wake could not be
 * listed in ``deferred``: the run was sent all the same. */
#define RUN_MIN 2
#define RUN_RETRY 8

static Py_ssize_t feed_offer_run(Feed *self, PyObject *rings, PyObject *payloads, Py_ssize_t next,
                                 Py_ssize_t end, Py_ssize_t inline_limit, uint64_t pid, PyObject *deferred,
                                 unsigned char *seen, uint64_t *positions, int *failed) {
    Py_ssize_t count = PyTuple_GET_SIZE(rings);
    uint64_t cumulative[FEED_BATCH_RUN + 1];  /* ring bytes of the first j values */
    Py_ssize_t k = 0;
    cumulative[0] = 0;
    while (next + k < end && k < FEED_BATCH_RUN) {
        PyObject *item = PyList_GET_ITEM(payloads, next + k);
        if (!PyBytes_CheckExact(item) || PyBytes_GET_SIZE(item) > inline_limit)
            break;
        cumulative[k + 1] = cumulative[k] + 8 + (((uint64_t)PyBytes_GET_SIZE(item) + 7) & ~(uint64_t)7);
        k++;
    }
    if (k < RUN_MIN || count == 0)
        return 0;
    Py_ssize_t locked = 0;
    for (; locked < count && k >= RUN_MIN; locked++) {
        PyObject *item = PyTuple_GET_ITEM(rings, locked);
        if (!PyObject_TypeCheck(item, &RingType) || !((Ring *)item)->has_view)
            break;  /* the per-value path says what is wrong */
        Ring *ring = (Ring *)item;
        if (try_lock(ring->send_lock))
            break;
        store(ring, W_LOCK_OWNER, pid);
        uint64_t bytes = ring->ring_bytes;
        uint64_t write_pos = load(ring, W_WRITE_POS), read_pos = load(ring, W_READ_POS);
        uint64_t sent = load(ring, W_SENT), received = load(ring, W_RECEIVED);
        positions[locked] = write_pos;  /* the run is written where it was checked, read once */
        uint64_t capacity = load(ring, W_CAPACITY);
        if (load(ring, W_CLOSED) || read_pos > write_pos || (write_pos & 7) || write_pos - read_pos > bytes
                || received > sent || sent - received >= capacity || sent > UINT64_MAX - (uint64_t)k
                || write_pos > UINT64_MAX - cumulative[k]) {
            k = 0;  /* the per-value path decides (and says what is odd) */
        } else {
            uint64_t room = bytes - write_pos % bytes;  /* to the ring's end: no wrap in a run */
            uint64_t free_bytes = bytes - (write_pos - read_pos);
            if (free_bytes < room)
                room = free_bytes;
            if ((uint64_t)k > capacity - (sent - received))
                k = (Py_ssize_t)(capacity - (sent - received));
            while (k > 0 && cumulative[k] > room)
                k--;
        }
    }
    Py_ssize_t run = locked == count && k >= RUN_MIN ? k : 0;
    for (Py_ssize_t i = 0; i < locked; i++) {
        Ring *ring = (Ring *)PyTuple_GET_ITEM(rings, i);
        if (run) {
            uint64_t write_pos = positions[i];
            unsigned char *at = ring->ring + write_pos % ring->ring_bytes;
            for (Py_ssize_t j = 0; j < run; j++) {
                PyObject *item = PyList_GET_ITEM(payloads, next + j);
                uint32_t header[2] = {(uint32_t)PyBytes_GET_SIZE(item), KIND_DATA};  /* as ring_offer_kind */
                memcpy(at + cumulative[j], header, 8);
                memcpy(at + cumulative[j] + 8, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
            }
            store(ring, W_SENT, load(ring, W_SENT) + (uint64_t)run);
            store(ring, W_WRITE_POS, write_pos + cumulative[run]);  /* the commit: after the bytes */
        }
        store(ring, W_LOCK_OWNER, 0);
        sem_post(ring->send_lock);  /* a full barrier: the commit is visible before we look */
        if (run && !seen[i] && load(ring, W_RECV_WAITING)) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(deferred, index) < 0)
                *failed = 1;  /* out of memory: raised, though the run is sent (as in feed_offer_all) */
            else
                seen[i] = 1;
            Py_XDECREF(index);
        }
    }
    if (run) {
        self->run_values += (unsigned long long)run;
        feed_store(self, F_SENDS, feed_load(self, F_SENDS) + (uint64_t)run);
        feed_store(self, F_DELIVERED, feed_load(self, F_DELIVERED) + (uint64_t)run * (uint64_t)count);
        feed_store(self, F_LAST_SENDER_PID, pid);
    }
    return run;
}

static PyObject *Feed_send_batch(Feed *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t pid, version;
    if (nargs != 8 || !PyTuple_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[6])
            || !PyList_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "send_batch(rings: tuple, payloads: list, start, pid, version, "
                        "inline_limit, deferred: list, delivered: list)");
        return NULL;
    }
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "shmfeed: the feed was released");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t inline_limit = PyLong_AsSsize_t(args[5]);
    pid = PyLong_AsUnsignedLongLong(args[3]);
    if ((start == -1 || inline_limit == -1 || pid == (uint64_t)-1) && PyErr_Occurred())
        return NULL;
    version = PyLong_AsUnsignedLongLong(args[4]);
    if (version == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return Py_BuildValue("(nll)", start < 0 ? (Py_ssize_t)0 : start, -1L, 0L);  /* not a table's version */
    }
    PyObject *rings = args[0], *payloads = args[1], *deferred = args[6], *delivered = args[7];
    Py_INCREF(rings);
    Py_INCREF(payloads);
    Py_ssize_t count = PyTuple_GET_SIZE(rings);
    unsigned char *seen = PyMem_Calloc(count ? (size_t)count : 1, 1);
    uint64_t *positions = PyMem_Calloc(count ? (size_t)count : 1, sizeof(uint64_t));
    if (start < 0)
        start = 0;
    Py_ssize_t next = start;
    int failed = seen == NULL || positions == NULL, locked = 0;
    /* After a run that could not be sent, the next RUN_RETRY values go one by one before
     * another try (each try locks rings); a plan with a channel subscribed twice never
     * runs (its copies of a value must go in turn). */
    Py_ssize_t no_run_until = next;
    for (Py_ssize_t i = 0; i < count && no_run_until < PY_SSIZE_T_MAX; i++)
        for (Py_ssize_t j = 0; j < i; j++)
            if (PyTuple_GET_ITEM(rings, i) == PyTuple_GET_ITEM(rings, j))
                no_run_until = PY_SSIZE_T_MAX;
    long stopped = -1;  /* answered with the index, not kept in the object another thread's call resets */
    if (failed)
        PyErr_NoMemory();
    while (!failed && next < PyList_GET_SIZE(payloads) && next - start < FEED_BATCH_RUN) {
        PyObject *item = PyList_GET_ITEM(payloads, next);
        if (!PyBytes_CheckExact(item) || PyBytes_GET_SIZE(item) > inline_limit)
            break;
        if (!locked) {
            if (feed_lock_for(self, pid, version))
                break;
            locked = 1;
        } else if (feed_load(self, F_CLOSED) || feed_load(self, F_SUB_VERSION) != version) {
            break;
        }
        Py_ssize_t end = PyList_GET_SIZE(payloads) < start + FEED_BATCH_RUN
            ? PyList_GET_SIZE(payloads) : start + FEED_BATCH_RUN;
        Py_ssize_t run = next >= no_run_until
            ? feed_offer_run(self, rings, payloads, next, end, inline_limit, pid, deferred, seen, positions, &failed)
            : 0;
        if (run == 0 && next >= no_run_until)
            no_run_until = next + RUN_RETRY;
        if (run > 0) {
            for (Py_ssize_t j = 0; j < run && !failed; j++) {  /* each went to every ring */
                PyObject *took = PyLong_FromSsize_t(count);
                if (took == NULL || PyList_Append(delivered, took) < 0)
                    failed = 1;
                Py_XDECREF(took);
            }
            next += run;
            continue;
        }
        long dropped = 0, stop = 0;
        int outcome = feed_offer_all(self, rings, PyBytes_AS_STRING(item), (uint64_t)PyBytes_GET_SIZE(item), pid,
                                     deferred, seen, &dropped, &stop);
        if (outcome < 0) {
            failed = 1;
            break;
        }
        if (outcome == 1) {
            stopped = stop;  /* the lock stays held: see above */
            self->holder = PyThread_get_thread_ident();
            self->dropped = dropped;
            locked = 0;
            break;
        }
        PyObject *took = PyLong_FromSsize_t(count - dropped);
        if (took == NULL || PyList_Append(delivered, took) < 0) {
            Py_XDECREF(took);
            failed = 1;
            break;
        }
        Py_DECREF(took);
        next++;
    }
    if (locked)
        feed_unlock(self);
    PyMem_Free(seen);
    PyMem_Free(positions);
    Py_DECREF(payloads);
    Py_DECREF(rings);
    if (failed)
        return NULL;
    PyObject *answer = Py_BuildValue("(nll)", next, stopped, stopped >= 0 ? self->dropped : 0L);
    if (answer == NULL && stopped >= 0) {  /* out of memory: the lock is not left held */
        self->holder = 0;
        feed_unlock(self);
    }
    return answer;
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

static PyObject *Feed_run_values(Feed *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromUnsignedLongLong(self->run_values);
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
    {"send_value", (PyCFunction)(void (*)(void))Feed_send_value, METH_FASTCALL,
     "send_value(value, plan, pid, large) -> None, delivered count, bytes to send, or (bytes, stop), lock held"},
    {"send_batch", (PyCFunction)(void (*)(void))Feed_send_batch, METH_FASTCALL,
     "send_batch(rings, payloads, start, pid, version, inline_limit, deferred, delivered) -> (the first "
     "payload not sent, why, dropped) (why: -1 Python path, lock free; else as send's stop, lock held)"},
    {"run_values", (PyCFunction)Feed_run_values, METH_NOARGS, "values this object sent in runs (for tests)"},
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
