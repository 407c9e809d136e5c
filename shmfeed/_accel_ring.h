/* One channel ring: offer, poll, wake of a wait list, the Ring type.
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

/* Append one inline record if it fits now: 0 written, 1 written and receivers wait (the
 * caller wakes them), 2 not written (full, odd, or the lock busy: the Python path
 * decides), 3 not written because the ring is full and drops the newest (``may_drop``, a
 * drop_newest ring: counted in DROPPED as the Python offer does), -1 error (exception
 * set). With a ``mark`` word (a durable bridge's delivery mark in the feed's segment, see
 * _marks.py), ``bit`` is set in it by the store right after the commit (or the drop), still
 * under the lock: a SIGKILL lands between the two only within one instruction, where a
 * Python statement would leave a window of a microsecond. */
static int ring_offer_kind(Ring *self, const void *payload, uint64_t size, uint64_t pid, uint64_t *mark,
                           uint64_t bit, int may_drop, uint32_t kind) {
    if (check_open(self) < 0)
        return -1;
    if (try_lock(self->send_lock))
        return 2;
    store(self, W_LOCK_OWNER, pid);
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
        && !(write_pos & 7)
        && record <= ring - offset
        && write_pos - read_pos + record <= ring
        && received <= sent
        && sent - received < load(self, W_CAPACITY)
        && sent != UINT64_MAX
        && write_pos <= UINT64_MAX - record;
    int dropped = 0;
    if (fits) {
        uint32_t header[2] = {(uint32_t)size, kind};  /* little-endian only (see _ring) */
        unsigned char *at = self->ring + offset;
        memcpy(at, header, 8);
        memcpy(at + 8, payload, (size_t)size);
        if (kind == KIND_SPILL)
            store(self, W_SPILLED, load(self, W_SPILLED) + 1);
        store(self, W_SENT, sent + 1);
        store(self, W_WRITE_POS, write_pos + record);  /* the commit: after the bytes */
        if (mark != NULL)
            __atomic_fetch_or(mark, bit, __ATOMIC_RELEASE);
    } else if (may_drop && self->drop_newest && !load(self, W_CLOSED) && size <= 0xFFFFFFF0u
               && read_pos <= write_pos && !(write_pos & 7) && received <= sent
               && write_pos - read_pos <= ring) {
        /* Full exactly as _ring's _write_locked finds it (a wrap needs the rest of the ring
         * too); anything else (a wrap that fits, odd words) is left to the Python offer. */
        uint64_t need = record <= ring - offset ? record : (ring - offset) + record;
        uint64_t drops = load(self, W_DROPPED);
        if ((sent - received >= load(self, W_CAPACITY) || write_pos - read_pos + need > ring)
                && drops != UINT64_MAX) {
            store(self, W_DROPPED, drops + 1);
            if (mark != NULL)
                __atomic_fetch_or(mark, bit, __ATOMIC_RELEASE);
            dropped = 1;
        }
    }
    store(self, W_LOCK_OWNER, 0);
    sem_post(self->send_lock);  /* a full barrier: the commit is visible before we look */
    if (dropped)
        return 3;
    if (!fits)
        return 2;
    return load(self, W_RECV_WAITING) ? 1 : 0;
}

static inline int ring_offer_marked(Ring *self, const void *payload, uint64_t size, uint64_t pid, uint64_t *mark,
                                    uint64_t bit, int may_drop) {
    return ring_offer_kind(self, payload, size, pid, mark, bit, may_drop, KIND_DATA);
}

static inline int ring_offer(Ring *self, const void *payload, uint64_t size, uint64_t pid) {
    return ring_offer_marked(self, payload, size, pid, NULL, 0, 0);
}

static int parse_payload_and_pid(PyObject *payload_object, PyObject *pid_object, Py_buffer *payload,
                                 uint64_t *pid) {
    *pid = PyLong_AsUnsignedLongLong(pid_object);
    if (*pid == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return PyObject_GetBuffer(payload_object, payload, PyBUF_SIMPLE);
}

/* Ring.offer(payload, pid[, mark, bit]) -> 0 written, 1 written and receivers wait, 2 not
 * written. ``mark``: a writable 8-byte aligned buffer (one word of a feed's segment) in which
 * ``bit`` is set when the record is committed (see ring_offer_marked). */
static PyObject *Ring_offer(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer payload, mark;
    uint64_t pid, bit = 0;
    if (nargs != 2 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "offer(payload, pid[, mark, bit])");
        return NULL;
    }
    if (nargs == 4) {
        bit = PyLong_AsUnsignedLongLong(args[3]);
        if (bit == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        if (PyObject_GetBuffer(args[2], &mark, PyBUF_WRITABLE) < 0)
            return NULL;
        if (mark.len < 8 || ((uintptr_t)mark.buf & 7) != 0) {
            PyBuffer_Release(&mark);
            PyErr_SetString(PyExc_ValueError, "shmfeed: a mark is one aligned 8-byte word; pass one word of a feed's segment");
            return NULL;
        }
    }
    if (parse_payload_and_pid(args[0], args[1], &payload, &pid) < 0) {
        if (nargs == 4)
            PyBuffer_Release(&mark);
        return NULL;
    }
    int outcome = ring_offer_marked(self, payload.buf, (uint64_t)payload.len, pid,
                                    nargs == 4 ? (uint64_t *)mark.buf : NULL, bit, 0);
    PyBuffer_Release(&payload);
    if (nargs == 4)
        PyBuffer_Release(&mark);
    return outcome < 0 ? NULL : PyLong_FromLong(outcome);
}

/* Ring.offer_spill(record, pid) -> as offer, for a large value's reference record (a
 * KIND_SPILL record of SPILL_RECORD_BYTES, counted in SPILLED as the Python offer does);
 * its file is linked into the channel before. */
static PyObject *Ring_offer_spill(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer record;
    uint64_t pid;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "offer_spill(record, pid)");
        return NULL;
    }
    if (parse_payload_and_pid(args[0], args[1], &record, &pid) < 0)
        return NULL;
    int outcome = record.len == SPILL_RECORD_BYTES
        ? ring_offer_kind(self, record.buf, SPILL_RECORD_BYTES, pid, NULL, 0, 0, KIND_SPILL) : 2;
    PyBuffer_Release(&record);
    return outcome < 0 ? NULL : PyLong_FromLong(outcome);
}

static PyTypeObject RingType;

/* Who received last, and when (CLOCK_MONOTONIC ns, coarse: a few ns to read), and this
 * process's entry in the readers table, for the monitor's "readers" and "no reader"; as
 * ChannelCore._note_receiver and _layout.note_reader (receive lock held). */
static inline void note_receiver(Ring *self, uint64_t pid) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
    uint64_t stamp = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    store(self, W_LAST_RECV_PID, pid);
    store(self, W_LAST_RECV_TIME, stamp);
    uint64_t *table = &self->words[self->index[W_READERS_FIRST]];
    Py_ssize_t entries = (self->index[W_READERS_LAST] - self->index[W_READERS_FIRST] + 1) / 2;
    Py_ssize_t hint = self->reader_hint;
    if (hint >= 0 && hint < entries && __atomic_load_n(&table[2 * hint], __ATOMIC_RELAXED) == pid) {
        __atomic_store_n(&table[2 * hint + 1], stamp, __ATOMIC_RELEASE);
        return;
    }
    /* Our own entry, else the first free one, else the one read longest ago. */
    Py_ssize_t choice = 0;
    int free_found = 0;
    uint64_t oldest = UINT64_MAX;
    for (Py_ssize_t i = 0; i < entries; i++) {
        uint64_t owner = __atomic_load_n(&table[2 * i], __ATOMIC_RELAXED);
        if (owner == pid) {
            choice = i;
            break;
        }
        if (free_found)
            continue;
        if (owner == 0) {
            choice = i;
            free_found = 1;
            continue;
        }
        uint64_t read_at = __atomic_load_n(&table[2 * i + 1], __ATOMIC_RELAXED);
        if (read_at < oldest) {
            choice = i;
            oldest = read_at;
        }
    }
    __atomic_store_n(&table[2 * choice + 1], stamp, __ATOMIC_RELEASE);  /* time before pid */
    __atomic_store_n(&table[2 * choice], pid, __ATOMIC_RELEASE);
    self->reader_hint = choice;
}

/* Let go of the mapping: every call checks ``has_view`` first (check_open). */
static void release_view(Ring *self) {
    self->release_pending = 0;
    if (self->has_view) {
        self->has_view = 0;
        self->ring = NULL;
        self->words = NULL;
        PyBuffer_Release(&self->view);
    }
}

/* Whether the record at position ``at`` (below ``write_pos``) is a whole one of ``kind``
 * that a C receive may take: aligned, within what was written and within the ring. Its
 * payload's size and the record's length go to ``size`` and ``record``. Anything else (a
 * wrap marker, odd bytes) is the Python poll's. */
static inline int record_at(Ring *self, uint64_t at, uint64_t write_pos, uint32_t kind, uint64_t *size,
                            uint64_t *record) {
    uint64_t ring = self->ring_bytes;
    uint64_t offset = at % ring;
    if (at >= write_pos || write_pos - at > ring || (offset & 7) || offset + 8 > ring)
        return 0;
    uint32_t header[2];
    memcpy(header, self->ring + offset, 8);
    *size = header[0];
    *record = 8 + ((*size + 7) & ~(uint64_t)7);
    return header[1] == kind && *record <= write_pos - at && offset + *record <= ring;
}

static inline int inline_record_at(Ring *self, uint64_t at, uint64_t write_pos, uint64_t *size, uint64_t *record) {
    return record_at(self, at, write_pos, KIND_DATA, size, record);
}

/* The payload of the oldest record if it is of ``kind`` (a spill record: of its one
 * size), taken under the receive lock. NULL and no exception: nothing taken (the lock
 * busy, another kind, anything odd), and ``*empty`` says whether the ring was empty and
 * open; NULL and an exception: an error. */
static PyObject *take_record(Ring *self, PyObject *pid_object, uint32_t kind, int *empty) {
    *empty = 0;
    if (check_open(self) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(pid_object);
    if (pid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (try_lock(self->recv_lock))
        return NULL;
    store(self, W_RECV_LOCK_OWNER, pid);
    PyObject *data = NULL;
    uint64_t read_pos = load(self, W_READ_POS);
    uint64_t write_pos = load(self, W_WRITE_POS);
    uint64_t received = load(self, W_RECEIVED);
    uint64_t size, record;
    if (received != UINT64_MAX && record_at(self, read_pos, write_pos, kind, &size, &record)
            && (kind != KIND_SPILL || size == SPILL_RECORD_BYTES)) {
        data = PyBytes_FromStringAndSize((const char *)self->ring + read_pos % self->ring_bytes + 8, (Py_ssize_t)size);
        if (data != NULL) {
            store(self, W_RECEIVED, received + 1);
            store(self, W_READ_POS, read_pos + record);
            note_receiver(self, pid);
        }
    }
    *empty = read_pos == write_pos && !load(self, W_CLOSED);
    store(self, W_RECV_LOCK_OWNER, 0);
    sem_post(self->recv_lock);
    return data;
}

/* Ring.poll(pid) -> the payload of the oldest inline record, False if the ring is empty
 * and open (nothing for the Python path to decide, which then skips its own poll), or None
 * (take the Python path: wrapped, a spill record, the lock busy, or anything odd). */
static PyObject *Ring_poll(Ring *self, PyObject *pid_object) {
    int empty;
    PyObject *data = take_record(self, pid_object, KIND_DATA, &empty);
    if (data != NULL || PyErr_Occurred())
        return data;
    if (empty)
        Py_RETURN_FALSE;
    Py_RETURN_NONE;
}

/* Ring.take_spill(pid) -> the oldest record's bytes if it is a large value's reference
 * (KIND_SPILL, SPILL_RECORD_BYTES), taken; None for the Python path (anything else, or the
 * lock busy). The caller reads the file it names, as the Python receive does. */
static PyObject *Ring_take_spill(Ring *self, PyObject *pid_object) {
    int empty;
    PyObject *data = take_record(self, pid_object, KIND_SPILL, &empty);
    if (data != NULL || PyErr_Occurred())
        return data;
    Py_RETURN_NONE;
}

/* Ring.take_one(pid, nothing, decode, core) -> the oldest value, taken and decoded:
 * ``recv`` in one call when the value is an inline record of up to TAKE_ONE_MAX bytes. It
 * is copied and taken under the receive lock, and decoded from the copy once the lock is
 * let go (a decode may run Python code: a collection, msgpack): by the C decoder
 * (_accel_decode.h) or else by ``decode(bytes)``, whose error is then the receive's.
 * Anything else answers ``nothing`` having taken nothing, for the Python receive: empty,
 * the lock busy, a spill record, a larger value. Whatever it answers, senders waiting for
 * room (SEND_WAITING) are woken first, by ``core.wake_senders()``: the Python check
 * after each call cost every receive as much as this whole call's overhead. */
#define TAKE_ONE_MAX (64 * 1024)
#define TAKE_ONE_ON_STACK 1024

static PyObject *Ring_take_one(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "take_one(pid, nothing, decode, core)");
        return NULL;
    }
    if (check_open(self) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(args[0]);
    if (pid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (try_lock(self->recv_lock))
        return Py_NewRef(args[1]);
    store(self, W_RECV_LOCK_OWNER, pid);
    unsigned char on_stack[TAKE_ONE_ON_STACK];
    unsigned char *copy = NULL;
    uint64_t read_pos = load(self, W_READ_POS);
    uint64_t write_pos = load(self, W_WRITE_POS);
    uint64_t received = load(self, W_RECEIVED);
    uint64_t size, record;
    if (received != UINT64_MAX && inline_record_at(self, read_pos, write_pos, &size, &record) && size <= TAKE_ONE_MAX) {
        copy = size <= TAKE_ONE_ON_STACK ? on_stack : PyMem_Malloc((size_t)size);  /* no Python code runs */
        if (copy != NULL) {
            memcpy(copy, self->ring + read_pos % self->ring_bytes + 8, (size_t)size);
            store(self, W_RECEIVED, received + 1);
            store(self, W_READ_POS, read_pos + record);
            note_receiver(self, pid);
        }
    }
    store(self, W_RECV_LOCK_OWNER, 0);
    sem_post(self->recv_lock);
    if (load(self, W_SEND_WAITING)) {  /* read after the release above, a full barrier */
        PyObject *woken = PyObject_CallMethod(args[3], "wake_senders", NULL);
        if (woken == NULL) {  /* (a signal handler's exception: the value goes with it, as a recv's would) */
            if (copy != NULL && copy != on_stack)
                PyMem_Free(copy);
            return NULL;
        }
        Py_DECREF(woken);
    }
    if (copy == NULL)
        return Py_NewRef(args[1]);  /* (no memory for a copy: the Python receive tries) */
    PyObject *value = decode_common(copy, (Py_ssize_t)size);
    if (value == NULL) {
        PyObject *data = PyBytes_FromStringAndSize((const char *)copy, (Py_ssize_t)size);
        if (data != NULL) {
            value = PyObject_CallOneArg(args[2], data);
            Py_DECREF(data);
        }
    }
    if (copy != on_stack)
        PyMem_Free(copy);
    return value;
}

/* Ring.take_decoded(pid, limit, decode, decode_errors[, keywords]) -> a list of up to ``limit`` values:
 * the inline records at the front of the ring, each passed to ``decode``, taken together
 * once decoded (one hold of the receive lock for the batch); or None when the lock is busy.
 * It stops at the first record that is not an ordinary inline one (the Python poll's), and
 * at a value whose decode raises: one of ``decode_errors`` leaves that record in the ring
 * for the next receive to raise (what came before it is taken and returned); anything else
 * (a KeyboardInterrupt) takes nothing and is raised: no value is ever lost in between.
 * ``keywords`` (a dict) go with every call of ``decode`` (``_codec.BATCH_DECODE``). */
#define DECODE_KEYWORDS_MAX 8

static PyObject *take_decoded(Ring *self, PyObject *const *args, PyObject **call_args, PyObject *kwnames);

static PyObject *Ring_take_decoded(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 4 && nargs != 5) || (nargs == 5 && !PyDict_Check(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "take_decoded(pid, limit, decode, decode_errors[, keywords: dict])");
        return NULL;
    }
    /* ``keywords``: passed to every decode call (vectorcall: no dict built per value). */
    PyObject *call_args[1 + DECODE_KEYWORDS_MAX];
    PyObject *kwnames = NULL;
    Py_ssize_t keyword_count = 0;
    if (nargs == 5) {
        keyword_count = PyDict_GET_SIZE(args[4]);
        if (keyword_count > DECODE_KEYWORDS_MAX) {
            PyErr_SetString(PyExc_ValueError, "take_decoded: too many keywords");
            return NULL;
        }
        kwnames = PyTuple_New(keyword_count);
        if (kwnames == NULL)
            return NULL;
        PyObject *key, *item;
        Py_ssize_t position = 0, i = 0;
        while (PyDict_Next(args[4], &position, &key, &item)) {
            Py_INCREF(key);
            PyTuple_SET_ITEM(kwnames, i, key);
            Py_INCREF(item);
            call_args[1 + i] = item;
            i++;
        }
    }
    /* ``decode`` (Python code) runs while this call uses the mapping: a release() meanwhile,
     * from another thread, waits for the call to end (see Ring_release). */
    self->busy++;
    PyObject *result = take_decoded(self, args, call_args, kwnames);
    if (--self->busy == 0 && self->release_pending)
        release_view(self);
    for (Py_ssize_t i = 0; i < keyword_count; i++)
        Py_DECREF(call_args[1 + i]);
    Py_XDECREF(kwnames);
    return result;
}

static PyObject *take_decoded(Ring *self, PyObject *const *args, PyObject **call_args, PyObject *kwnames) {
    if (check_open(self) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(args[0]);
    if (pid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *decode = args[2], *decode_errors = args[3];
    PyObject *values = PyList_New(0);
    if (values == NULL)
        return NULL;
    if (try_lock(self->recv_lock)) {
        Py_DECREF(values);
        Py_RETURN_NONE;
    }
    store(self, W_RECV_LOCK_OWNER, pid);
    uint64_t read_pos = load(self, W_READ_POS);
    uint64_t write_pos = load(self, W_WRITE_POS);
    uint64_t received = load(self, W_RECEIVED);
    uint64_t at = read_pos, size, record;
    int failed = 0;
    while (PyList_GET_SIZE(values) < limit && received + (uint64_t)PyList_GET_SIZE(values) < UINT64_MAX
           && inline_record_at(self, at, write_pos, &size, &record)) {
        const unsigned char *payload = (const unsigned char *)self->ring + at % self->ring_bytes + 8;
        /* The common values decoded here (_accel_decode.h), the rest by ``decode``. */
        PyObject *value = decode_common(payload, (Py_ssize_t)size);
        if (value == NULL) {
            PyObject *data = PyBytes_FromStringAndSize((const char *)payload, (Py_ssize_t)size);
            if (data != NULL) {
                call_args[0] = data;
                value = PyObject_Vectorcall(decode, call_args, 1, kwnames);
            }
            Py_XDECREF(data);
        }
        if (value == NULL) {
            if (PyErr_ExceptionMatches(decode_errors)) {
                PyErr_Clear();  /* left in the ring: the next receive raises it */
            } else {
                failed = 1;  /* nothing taken: every value stays for the next receive */
            }
            break;
        }
        int appended = PyList_Append(values, value);
        Py_DECREF(value);
        if (appended < 0) {
            failed = 1;
            break;
        }
        at += record;
    }
    Py_ssize_t taken = PyList_GET_SIZE(values);
    if (!failed && taken) {
        store(self, W_RECEIVED, received + (uint64_t)taken);
        store(self, W_READ_POS, at);
        note_receiver(self, pid);
    }
    store(self, W_RECV_LOCK_OWNER, 0);
    sem_post(self->recv_lock);
    if (failed) {
        Py_DECREF(values);
        return NULL;
    }
    return values;
}

/* Post the semaphore of waker ``id`` (opened once, then kept in a small cache); a waker
 * whose semaphore is gone (its thread ended) is skipped, as in _waker.post. -1 (errno
 * set) if it cannot be opened for another reason, such as no descriptor left. */
static int post_waker(Ring *self, uint64_t id) {
    for (int i = 0; i < WAKER_CACHE; i++) {
        if (self->wakers[i] && self->waker_ids[i] == id) {
            sem_post(self->wakers[i]);
            return 0;
        }
    }
    char name[WAKER_PREFIX_MAX + 17];
    snprintf(name, sizeof name, "%s%016llx", self->waker_prefix, (unsigned long long)id);
    sem_t *semaphore = sem_open(name, 0);
    if (semaphore == SEM_FAILED)
        return errno == ENOENT ? 0 : -1;
    sem_post(semaphore);
    int victim = self->next_victim;
    self->next_victim = (victim + 1) % WAKER_CACHE;
    if (self->wakers[victim])
        sem_close(self->wakers[victim]);
    self->wakers[victim] = semaphore;
    self->waker_ids[victim] = id;
    return 0;
}

/* Ring.wake(first_word, count_word, pid) -> True: posted every waker of one wait list,
 * then emptied it, under the wait-list lock; the same steps, in the same order, as
 * ChannelCore._wake (posts before the clearing: a process killed half-way leaves the rest
 * for recovery). False: the lock was busy, nothing done (the Python path waits for it). */
static PyObject *Ring_wake(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wake(first_word, count_word, pid)");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[0]);
    Py_ssize_t count_word = PyLong_AsSsize_t(args[1]);
    uint64_t pid = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (first < 0 || first + self->waitlist_slots > self->header_words || count_word < 0
            || count_word >= self->header_words) {
        PyErr_SetString(PyExc_ValueError, "wake: the wait list lies outside the header");
        return NULL;
    }
    if (check_open(self) < 0)
        return NULL;
    if (try_lock(self->wait_lock))
        Py_RETURN_FALSE;
    store(self, W_WAIT_LOCK_OWNER, pid);
    uint64_t *words = self->words;
    uint64_t remaining = __atomic_load_n(&words[count_word], __ATOMIC_ACQUIRE);
    for (Py_ssize_t i = 0; remaining && i < self->waitlist_slots; i++) {
        uint64_t id = __atomic_load_n(&words[first + i], __ATOMIC_RELAXED);
        if (id) {
            if (post_waker(self, id) < 0) {
                /* Leave the list as it is (its wakers are posted again later; a spare post
                 * is only a spurious wake-up) rather than lose this one's wake-up. */
                int error = errno;
                store(self, W_WAIT_LOCK_OWNER, 0);
                sem_post(self->wait_lock);
                errno = error;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            remaining--;
        }
    }
    remaining = __atomic_load_n(&words[count_word], __ATOMIC_RELAXED);
    for (Py_ssize_t i = 0; remaining && i < self->waitlist_slots; i++) {
        if (__atomic_load_n(&words[first + i], __ATOMIC_RELAXED)) {
            __atomic_store_n(&words[first + i], 0, __ATOMIC_RELAXED);
            remaining--;
        }
    }
    __atomic_store_n(&words[count_word], 0, __ATOMIC_RELEASE);
    store(self, W_WAIT_LOCK_OWNER, 0);
    sem_post(self->wait_lock);
    Py_RETURN_TRUE;
}

static PyObject *Ring_release(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (self->busy)
        self->release_pending = 1;  /* a call in this ring runs Python code: it lets go at its end */
    else
        release_view(self);
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

/* Word indices from a Python tuple, each checked to lie inside the header. */
static int parse_indices(PyObject *indices, Py_ssize_t count, Py_ssize_t header_bytes, Py_ssize_t *out) {
    if (PyTuple_GET_SIZE(indices) != count) {
        PyErr_Format(PyExc_ValueError, "%zd word indices are needed", count);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(indices, i));
        if (index == -1 && PyErr_Occurred())
            return -1;
        if (index < 0 || (index + 1) * 8 > header_bytes) {
            PyErr_SetString(PyExc_ValueError, "a word index lies outside the header");
            return -1;
        }
        out[i] = index;
    }
    return 0;
}

/* Ring(mapping, send_lock_name, recv_lock_name, wait_lock_name, waker_prefix, header_bytes,
 *      ring_bytes, waitlist_slots, indices) */
static int Ring_init(Ring *self, PyObject *args, PyObject *kwargs) {
    PyObject *mapping, *send_name, *recv_name, *wait_name, *indices;
    const char *waker_prefix;
    Py_ssize_t header_bytes, waitlist_slots;
    unsigned long long ring_bytes;
    if (self->has_view || self->send_lock || self->recv_lock || self->wait_lock) {
        PyErr_SetString(PyExc_TypeError, "Ring is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OUUUsnKnO!:Ring", &mapping, &send_name, &recv_name, &wait_name,
                          &waker_prefix, &header_bytes, &ring_bytes, &waitlist_slots, &PyTuple_Type,
                          &indices))
        return -1;
    if (strlen(waker_prefix) >= WAKER_PREFIX_MAX || waitlist_slots < 0
            || waitlist_slots > header_bytes / 8) {
        PyErr_SetString(PyExc_ValueError, "Ring: bad waker prefix or wait-list size");
        return -1;
    }
    if (parse_indices(indices, W_COUNT, header_bytes, self->index) < 0)
        return -1;
    if (self->index[W_READERS_LAST] < self->index[W_READERS_FIRST] + 1) {
        PyErr_SetString(PyExc_ValueError, "Ring: bad readers table");
        return -1;
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
    if (self->recv_lock != NULL)
        self->wait_lock = open_semaphore(wait_name);
    if (self->wait_lock == NULL) {
        if (self->send_lock != NULL)
            sem_close(self->send_lock);
        if (self->recv_lock != NULL)
            sem_close(self->recv_lock);
        self->send_lock = self->recv_lock = NULL;
        PyBuffer_Release(&self->view);
        return -1;
    }
    strcpy(self->waker_prefix, waker_prefix);
    self->header_words = header_bytes / 8;
    self->waitlist_slots = waitlist_slots;
    self->has_view = 1;
    self->words = (uint64_t *)self->view.buf;
    self->ring = (unsigned char *)self->view.buf + header_bytes;
    self->ring_bytes = ring_bytes;
    self->reader_hint = -1;
    return 0;
}

static void Ring_dealloc(Ring *self) {
    release_view(self);  /* no call is under way: each holds a reference */
    /* Closed only here: no call can be using them (a call holds a reference). glibc counts
     * opens per process, so the Python side's own handles stay valid. */
    if (self->send_lock)
        sem_close(self->send_lock);
    if (self->recv_lock)
        sem_close(self->recv_lock);
    if (self->wait_lock)
        sem_close(self->wait_lock);
    for (int i = 0; i < WAKER_CACHE; i++)
        if (self->wakers[i])
            sem_close(self->wakers[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_set_drop_newest(Ring *self, PyObject *Py_UNUSED(ignored)) {
    self->drop_newest = 1;
    Py_RETURN_NONE;
}

static PyMethodDef Ring_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))Ring_offer, METH_FASTCALL,
     "offer(payload, pid[, mark, bit]) -> 0 written, 1 written and receivers wait, 2 not written"},
    {"take_decoded", (PyCFunction)(void (*)(void))Ring_take_decoded, METH_FASTCALL,
     "take_decoded(pid, limit, decode, decode_errors[, keywords]) -> the decoded inline values at the front, taken; "
     "None if the receive lock is busy"},
    {"take_one", (PyCFunction)(void (*)(void))Ring_take_one, METH_FASTCALL,
     "take_one(pid, nothing, decode, core) -> the oldest value taken and decoded (by the C decoder, else by "
     "decode), or ``nothing`` (taken nothing) for the Python receive; core.wake_senders() first if senders wait"},
    {"offer_spill", (PyCFunction)(void (*)(void))Ring_offer_spill, METH_FASTCALL,
     "offer_spill(record, pid) -> as offer, for a large value's reference record"},
    {"take_spill", (PyCFunction)Ring_take_spill, METH_O,
     "take_spill(pid) -> the oldest record's bytes if it is a large value's reference, taken; else None"},
    {"poll", (PyCFunction)Ring_poll, METH_O,
     "poll(pid) -> the oldest inline record's payload, False if the ring is empty (and open), "
     "or None for the Python path"},
    {"wake", (PyCFunction)(void (*)(void))Ring_wake, METH_FASTCALL,
     "wake(first_word, count_word, pid) -> True: posted every waker of a wait list and emptied it; False: lock busy"},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, "let go of the mapping (idempotent)"},
    {"set_drop_newest", (PyCFunction)Ring_set_drop_newest, METH_NOARGS,
     "the channel's overflow is drop_newest: a C feed send drops (and counts) here when it is full"},
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
