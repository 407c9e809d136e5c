/* What every part of the accelerator shares: headers, the Ring object, atomic word access,
 * the short lock spin.
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

#define KIND_DATA 1u
#define KIND_SPILL 3u  /* a large value's reference: SPILL_RECORD_BYTES naming its file (see _ring) */
#define SPILL_RECORD_BYTES 16u

/* Word indices into the channel header, in the order Python passes them. */
enum {
    W_WRITE_POS, W_READ_POS, W_SENT, W_RECEIVED, W_CLOSED, W_CAPACITY,
    W_LOCK_OWNER, W_RECV_LOCK_OWNER, W_RECV_WAITING, W_SEND_WAITING, W_WAIT_LOCK_OWNER,
    W_LAST_RECV_PID, W_LAST_RECV_TIME, W_READERS_FIRST, W_READERS_LAST, W_DROPPED, W_SPILLED, W_COUNT
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
    int drop_newest;                      /* overflow="drop_newest": a feed send drops here when full */
    int busy;             /* calls that may run Python code while they use the mapping (take_decoded) */
    int release_pending;  /* release() came while busy: the last such call lets go of the mapping */
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
