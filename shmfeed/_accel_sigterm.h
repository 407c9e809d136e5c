/* SIGTERM in a multiprocessing child: its sender flags cleared before it dies.
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

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
