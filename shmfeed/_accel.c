/*
 * shmfeed._accel: the optional C hot path of one channel ring.
 *
 * It does exactly what ChannelCore.offer_fast and ChannelCore.poll_fast do in Python (see
 * shmfeed/_ring.py, which stays the reference and the fallback), in one call instead of a
 * dozen interpreted steps: take the side lock, check, copy one inline record, commit,
 * release. Everything unusual (a full or wrapping ring, a spill record, a closed channel,
 * a corrupt position, a lock someone else holds) is left to the Python path: these
 * functions then change nothing and say "not here".
 *
 * The layout (word indices, header size) is passed in by Python from shmfeed/_layout.py,
 * so that stays the one place that defines it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

#define KIND_DATA 1u

/* Word indices into the channel header, in the order Python passes them. */
enum {
    W_WRITE_POS, W_READ_POS, W_SENT, W_RECEIVED, W_CLOSED, W_CAPACITY,
    W_LOCK_OWNER, W_RECV_LOCK_OWNER, W_RECV_WAITING, W_SEND_WAITING, W_WAIT_LOCK_OWNER,
    W_LAST_RECV_PID, W_LAST_RECV_TIME, W_READERS_FIRST, W_READERS_LAST, W_COUNT
};

#define WAKER_CACHE 8
#define WAKER_PREFIX_MAX 200

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* the segment's mapping; held until release() */
    int has_view;
    sem_t *send_lock;
    sem_t *recv_lock;
    sem_t *wait_lock;
    unsigned char *ring;   /* first byte of the ring (after the header) */
    uint64_t *words;       /* the header as u64 words */
    uint64_t ring_bytes;
    Py_ssize_t header_words;
    Py_ssize_t waitlist_slots;
    Py_ssize_t index[W_COUNT];
    char waker_prefix[WAKER_PREFIX_MAX];  /* a waker's semaphore name, less its hex id */
    uint64_t waker_ids[WAKER_CACHE];      /* wakers posted lately, and their handles */
    sem_t *wakers[WAKER_CACHE];
    int next_victim;
    Py_ssize_t reader_hint;               /* our entry in the readers table, -1: none */
} Ring;

static inline uint64_t load(const Ring *self, int which) {
    return __atomic_load_n(&self->words[self->index[which]], __ATOMIC_ACQUIRE);
}

static inline void store(Ring *self, int which, uint64_t value) {
    __atomic_store_n(&self->words[self->index[which]], value, __ATOMIC_RELEASE);
}

/* Tries of a lock before giving up on it, a pause apart: about a microsecond or two,
 * enough for a holder on another core to finish its few hundred nanoseconds. */
#define LOCK_SPINS 64

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Take a lock if it is free or freed within a short spin: 0 taken, 1 busy. A C call never
 * sleeps on a lock. Another process may hold one for as long as it likes (a sender copying
 * a large value, a process stopped in a debugger); the caller's deadline must bound that
 * wait, so a busy lock sends the caller to the Python path, which waits with it (see
 * ChannelCore in _ring.py). The GIL is kept: nothing here waits long. */
static int try_lock(sem_t *semaphore) {
    if (sem_trywait(semaphore) == 0)
        return 0;
    for (int i = 0; i < LOCK_SPINS; i++) {
        cpu_relax();
        if (sem_trywait(semaphore) == 0)
            return 0;
    }
    return 1;
}

static int check_open(Ring *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "shmfeed: the channel was released");
        return -1;
    }
    return 0;
}

/* Append one inline record if it fits now: 0 written, 1 written and receivers wait (the
 * caller wakes them), 2 not written (full, odd, or the lock busy: the Python path
 * decides), -1 error (exception set). With a ``mark`` word (a durable bridge's delivery
 * mark in the feed's segment, see _marks.py), ``bit`` is set in it by the store right
 * after the commit, still under the lock: a SIGKILL lands between the two only within
 * one instruction, where a Python statement would leave a window of a microsecond. */
static int ring_offer_marked(Ring *self, const void *payload, uint64_t size, uint64_t pid, uint64_t *mark,
                             uint64_t bit) {
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
        && record <= ring - offset
        && write_pos - read_pos + record <= ring
        && received <= sent
        && sent - received < load(self, W_CAPACITY)
        && sent != UINT64_MAX
        && write_pos <= UINT64_MAX - record;
    if (fits) {
        uint32_t header[2] = {(uint32_t)size, KIND_DATA};  /* little-endian only (see _ring) */
        unsigned char *at = self->ring + offset;
        memcpy(at, header, 8);
        memcpy(at + 8, payload, (size_t)size);
        store(self, W_SENT, sent + 1);
        store(self, W_WRITE_POS, write_pos + record);  /* the commit: after the bytes */
        if (mark != NULL)
            __atomic_fetch_or(mark, bit, __ATOMIC_RELEASE);
    }
    store(self, W_LOCK_OWNER, 0);
    sem_post(self->send_lock);  /* a full barrier: the commit is visible before we look */
    if (!fits)
        return 2;
    return load(self, W_RECV_WAITING) ? 1 : 0;
}

static inline int ring_offer(Ring *self, const void *payload, uint64_t size, uint64_t pid) {
    return ring_offer_marked(self, payload, size, pid, NULL, 0);
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
                                    nargs == 4 ? (uint64_t *)mark.buf : NULL, bit);
    PyBuffer_Release(&payload);
    if (nargs == 4)
        PyBuffer_Release(&mark);
    return outcome < 0 ? NULL : PyLong_FromLong(outcome);
}

static PyTypeObject RingType;

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

/* Ring.poll(pid) -> the payload of the oldest inline record, or None (take the Python
 * path: empty, wrapped, a spill record, the lock busy, or anything odd). */
static PyObject *Ring_poll(Ring *self, PyObject *pid_object) {
    if (check_open(self) < 0)
        return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(pid_object);
    if (pid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (try_lock(self->recv_lock))
        Py_RETURN_NONE;
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
                note_receiver(self, pid);
            }
        }
    }
    /* Empty and open: nothing for the Python path to decide, which then skips its own poll. */
    int empty = read_pos == write_pos && !load(self, W_CLOSED);
    store(self, W_RECV_LOCK_OWNER, 0);
    sem_post(self->recv_lock);
    if (failed)
        return NULL;
    if (data == NULL) {
        if (empty)
            Py_RETURN_FALSE;
        Py_RETURN_NONE;
    }
    return data;
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
    Ring_release(self, NULL);
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

static PyMethodDef Ring_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))Ring_offer, METH_FASTCALL,
     "offer(payload, pid[, mark, bit]) -> 0 written, 1 written and receivers wait, 2 not written"},
    {"poll", (PyCFunction)Ring_poll, METH_O,
     "poll(pid) -> the oldest inline record's payload, False if the ring is empty (and open), "
     "or None for the Python path"},
    {"wake", (PyCFunction)(void (*)(void))Ring_wake, METH_FASTCALL,
     "wake(first_word, count_word, pid) -> True: posted every waker of a wait list and emptied it; False: lock busy"},
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
 *   -2  every ring took the payload, nobody waits, the counters are updated, lock released;
 *   i >= 0, as offer_all: ring i needs the Python path (2*i) or a wake-up (2*i + 1), the
 *       rings before it took the payload, and THE FEED'S SEND LOCK IS STILL HELD by this
 *       thread: the caller goes on from there and then calls unlock_if_held(), in a
 *       ``finally`` around this very call (so an exception raised as this returns, such as
 *       a KeyboardInterrupt, cannot leave the lock taken). */
static PyObject *Feed_send(Feed *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer payload;
    uint64_t pid, version;
    if (nargs != 4 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "send(rings: tuple, payload, pid, version)");
        return NULL;
    }
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
            ? ring_offer((Ring *)item, payload.buf, (uint64_t)payload.len, pid) : -1;
        if (outcome < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Feed.send: rings must hold Ring objects");
            feed_unlock(self);
            answer = -3;
            goto done;
        }
        if (outcome) {
            answer = 2 * (long)i + (outcome == 1);  /* the lock stays held: see above */
            self->holder = PyThread_get_thread_ident();
            goto done;
        }
    }
    feed_store(self, F_SENDS, feed_load(self, F_SENDS) + 1);
    feed_store(self, F_DELIVERED, feed_load(self, F_DELIVERED) + (uint64_t)count);
    feed_store(self, F_LAST_SENDER_PID, pid);
    feed_unlock(self);
done:
    Py_DECREF(rings);
    PyBuffer_Release(&payload);
    return answer == -3 ? NULL : PyLong_FromLong(answer);
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
     "send(rings, payload, pid, version) -> -1 Python path, -2 done, else 2*i (+1) with the lock held"},
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

/* copy_into(destination, source): destination[:len(source)] = source, by stores that go
 * around the cache on x86-64. For large values written into a spill file that a receiver
 * on another core has just read: ordinary stores would first pull each line back from
 * that core's cache. */
static PyObject *copy_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer destination, source;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_into(destination, source)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &destination, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &source, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&destination);
        return NULL;
    }
    if (source.len > destination.len) {
        PyBuffer_Release(&source);
        PyBuffer_Release(&destination);
        PyErr_SetString(PyExc_ValueError, "copy_into: the source is larger than the destination");
        return NULL;
    }
    unsigned char *to = destination.buf;
    const unsigned char *from = source.buf;
    size_t left = (size_t)source.len;
    Py_BEGIN_ALLOW_THREADS
#if defined(__x86_64__) && defined(__SSE2__)
    while (left && ((uintptr_t)to & 15)) {
        *to++ = *from++;
        left--;
    }
    for (; left >= 64; left -= 64, to += 64, from += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)from);
        __m128i b = _mm_loadu_si128((const __m128i *)(from + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(from + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(from + 48));
        _mm_stream_si128((__m128i *)to, a);
        _mm_stream_si128((__m128i *)(to + 16), b);
        _mm_stream_si128((__m128i *)(to + 32), c);
        _mm_stream_si128((__m128i *)(to + 48), d);
    }
    _mm_sfence();  /* the streamed stores are ordered before anything that follows */
#endif
    memcpy(to, from, left);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&source);
    PyBuffer_Release(&destination);
    Py_RETURN_NONE;
}

/* has_buffers(value, budget) -> True, False or None: whether msgpack would meet a
 * bytearray or memoryview (which it packs as bin, decoding as bytes) in value's dicts and
 * lists; None once more than budget items were looked at. The twin of _codec._has_buffers.
 * No Python code runs during the walk (exact type checks only), so borrowed references
 * stay valid. */
#define HAS_BUFFERS_STACK 256

static inline int is_buffer_type(PyObject *item) {
    return PyByteArray_CheckExact(item) || PyMemoryView_Check(item);
}

static PyObject *has_buffers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "has_buffers(value, budget)");
        return NULL;
    }
    Py_ssize_t budget = PyLong_AsSsize_t(args[1]);
    if (budget == -1 && PyErr_Occurred())
        return NULL;
    PyObject *value = args[0];
    if (is_buffer_type(value))
        Py_RETURN_TRUE;
    PyObject *stack[HAS_BUFFERS_STACK];
    Py_ssize_t depth = 0;
    stack[depth++] = value;
    while (depth) {
        PyObject *item = stack[--depth];
        if (PyDict_CheckExact(item)) {
            budget -= PyDict_GET_SIZE(item);
            if (budget < 0)
                Py_RETURN_NONE;
            Py_ssize_t position = 0;
            PyObject *key, *member;
            while (PyDict_Next(item, &position, &key, &member)) {
                if (is_buffer_type(member) || PyMemoryView_Check(key))
                    Py_RETURN_TRUE;
                if (PyDict_CheckExact(member) || PyList_CheckExact(member)) {
                    if (depth == HAS_BUFFERS_STACK)
                        Py_RETURN_NONE;
                    stack[depth++] = member;
                }
            }
        } else if (PyList_CheckExact(item)) {
            Py_ssize_t size = PyList_GET_SIZE(item);
            budget -= size;
            if (budget < 0)
                Py_RETURN_NONE;
            for (Py_ssize_t i = 0; i < size; i++) {
                PyObject *member = PyList_GET_ITEM(item, i);
                if (is_buffer_type(member))
                    Py_RETURN_TRUE;
                if (PyDict_CheckExact(member) || PyList_CheckExact(member)) {
                    if (depth == HAS_BUFFERS_STACK)
                        Py_RETURN_NONE;
                    stack[depth++] = member;
                }
            }
        }
    }
    Py_RETURN_FALSE;
}

/* --- SIGTERM: a terminated multiprocessing child stops being a sender first ------------
 *
 * Pool.terminate() (and so the end of a ``with Pool(...)`` block) ends its workers with
 * SIGTERM. A worker that sent on a feed would then count as a sender that died. A Python
 * signal handler cannot help: it runs only when the main thread next checks for signals,
 * and a signal that lands just before a blocking call leaves it waiting for good (the pool
 * then waits for that worker for ever). This C handler runs at once: it clears the sender
 * flag of each slot this process registered (one atomic store each, async-signal-safe),
 * then dies of the signal as before. Each registration keeps its mapping exported, so the
 * words it points into stay mapped until it is taken back. */
#define SENDER_MARKS 64
static uint64_t *volatile mark_words[SENDER_MARKS];
static uint64_t mark_flags[SENDER_MARKS];
static Py_buffer mark_views[SENDER_MARKS];

static void on_sigterm(int signum) {
    for (int i = 0; i < SENDER_MARKS; i++) {
        uint64_t *word = mark_words[i];
        if (word)
            __atomic_and_fetch(word, ~mark_flags[i], __ATOMIC_SEQ_CST);
    }
    signal(signum, SIG_DFL);
    raise(signum);
}

/* mark_sender(mapping, offset, flag) -> handle (-1 if every mark is taken). */
static PyObject *mark_sender(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "mark_sender(mapping, offset, flag)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    uint64_t flag = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    for (int i = 0; i < SENDER_MARKS; i++) {
        if (mark_words[i] == NULL && mark_views[i].obj == NULL) {
            if (PyObject_GetBuffer(args[0], &mark_views[i], PyBUF_WRITABLE) < 0)
                return NULL;
            if (offset < 0 || offset % 8 || offset + 8 > mark_views[i].len) {
                PyBuffer_Release(&mark_views[i]);
                PyErr_SetString(PyExc_ValueError, "mark_sender: offset outside the mapping");
                return NULL;
            }
            mark_flags[i] = flag;
            mark_words[i] = (uint64_t *)((char *)mark_views[i].buf + offset);
            return PyLong_FromLong(i);
        }
    }
    return PyLong_FromLong(-1);
}

/* unmark_sender(handle): the handler no longer touches that word; the mapping is let go. */
static PyObject *unmark_sender(PyObject *module, PyObject *handle_object) {
    long i = PyLong_AsLong(handle_object);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i >= 0 && i < SENDER_MARKS && mark_views[i].obj != NULL) {
        mark_words[i] = NULL;  /* first: the handler must not see a word being let go */
        PyBuffer_Release(&mark_views[i]);
    }
    Py_RETURN_NONE;
}

/* forget_marks(): in a forked child, the parent's marks name the parent's slots. */
static PyObject *forget_marks(PyObject *module, PyObject *Py_UNUSED(ignored)) {
    for (int i = 0; i < SENDER_MARKS; i++) {
        mark_words[i] = NULL;
        if (mark_views[i].obj != NULL)
            PyBuffer_Release(&mark_views[i]);
    }
    Py_RETURN_NONE;
}

/* catch_sigterm() -> True if the handler is now installed (only over the default action). */
static PyObject *catch_sigterm(PyObject *module, PyObject *Py_UNUSED(ignored)) {
    struct sigaction current, mine;
    if (sigaction(SIGTERM, NULL, &current) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (current.sa_handler == on_sigterm)
        Py_RETURN_TRUE;
    if (current.sa_handler != SIG_DFL || (current.sa_flags & SA_SIGINFO))
        Py_RETURN_FALSE;
    memset(&mine, 0, sizeof mine);
    mine.sa_handler = on_sigterm;
    sigemptyset(&mine.sa_mask);
    mine.sa_flags = SA_RESTART;
    if (sigaction(SIGTERM, &mine, NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
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
    {"offer_all", (PyCFunction)(void (*)(void))offer_all, METH_FASTCALL,
     "offer_all(rings, payload, pid, start) -> -1 all done, else 2*i (+1: taken, wake its receivers)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "shmfeed._accel", "The optional C hot path of shmfeed's rings.", -1, module_methods,
};


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
