/* Large values: copy_into (cache-bypassing stores), link_count (a pool file's links), and
 * has_buffers (the codec's walk).
 * Part of shmfeed/_accel.c (included there: one translation unit, so every helper stays
 * static and inlinable). */

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

/* link_count(descriptor) -> the file's number of links (fstat's st_nlink): whether any
 * receiver still links a pool file, asked of the descriptor the sender keeps, without the
 * path walk of an lstat or the building of a stat_result. */
static PyObject *link_count(PyObject *module, PyObject *descriptor) {
    (void)module;
    long fd = PyLong_AsLong(descriptor);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        errno = EBADF;  /* not a descriptor: as fstat would say */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct stat info;
    if (fstat((int)fd, &info) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((unsigned long long)info.st_nlink);
}
