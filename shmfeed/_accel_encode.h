/* A msgpack encoder for the common values: what a send encodes most (Feed.send,
 * Channel.send, send_many). Part of shmfeed/_accel.c (included there).
 *
 * It encodes None, bool, int, float, str, bytes, and lists and dicts of those (exact types
 * only) to the very bytes shmfeed's msgpack Packer makes (strict_types, use_bin_type: the
 * smallest form of each int and length, float as 64 bits); anything else (a tuple, a
 * bytearray, a subclass, a registered type, an int past 64 bits, a str that is not valid
 * UTF-8, nesting deeper than ENCODE_DEPTH_MAX) makes it answer None, and the caller encodes
 * with msgpack and shmfeed's rules. No Python code runs while it walks the value. */

#define ENCODE_DEPTH_MAX 32
#define ENCODE_STACK_BYTES 512

typedef struct {
    unsigned char *data;
    size_t length, capacity;
    unsigned char stack[ENCODE_STACK_BYTES];
} Out;

/* out_reserve's growth, out of line: the common case (room enough) stays a compare. */
static int out_grow(Out *out, size_t more) {
    size_t capacity = out->capacity * 2;
    while (capacity - out->length < more) {
        if (capacity > ((size_t)PY_SSIZE_T_MAX) / 2)
            return -1;
        capacity *= 2;
    }
    unsigned char *data = PyMem_Malloc(capacity);
    if (data == NULL)
        return -1;
    memcpy(data, out->data, out->length);
    if (out->data != out->stack)
        PyMem_Free(out->data);
    out->data = data;
    out->capacity = capacity;
    return 0;
}

static inline int out_reserve(Out *out, size_t more) {
    if (out->capacity - out->length >= more)
        return 0;
    return out_grow(out, more);
}

/* A type byte followed by ``bytes`` bytes of ``value``, big-endian. */
static inline int out_head(Out *out, unsigned char type, uint64_t value, int bytes) {
    if (out_reserve(out, 1 + (size_t)bytes) < 0)
        return -1;
    out->data[out->length++] = type;
    for (int i = bytes - 1; i >= 0; i--)
        out->data[out->length++] = (unsigned char)(value >> (8 * i));
    return 0;
}

static inline int out_bytes(Out *out, const void *data, size_t length) {
    if (out_reserve(out, length) < 0)
        return -1;
    memcpy(out->data + out->length, data, length);
    out->length += length;
    return 0;
}

/* A length header: fix form below ``fix_limit`` (0: none), then 8/16/32-bit forms from
 * ``type8`` (0: no 8-bit form) or ``type16``. */
static int out_length(Out *out, uint64_t n, unsigned char fix, uint64_t fix_limit, unsigned char type8,
                      unsigned char type16) {
    if (n < fix_limit)
        return out_head(out, (unsigned char)(fix | n), 0, 0);
    if (type8 && n < 0x100)
        return out_head(out, type8, n, 1);
    if (n < 0x10000)
        return out_head(out, type16, n, 2);
    if (n <= 0xFFFFFFFFu)
        return out_head(out, (unsigned char)(type16 + 1), n, 4);
    return -1;
}

static int encode_item(Out *out, PyObject *value, int depth) {
    if (depth > ENCODE_DEPTH_MAX)
        return -1;
    if (value == Py_None)
        return out_head(out, 0xc0, 0, 0);
    if (value == Py_True)
        return out_head(out, 0xc3, 0, 0);
    if (value == Py_False)
        return out_head(out, 0xc2, 0, 0);
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyLong_Type) {
        int overflow;
        long long signed_value = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow == 0 && signed_value == -1 && PyErr_Occurred())
            return -1;
        if (overflow < 0)
            return -1;
        if (overflow == 0 && signed_value < 0) {
            if (signed_value >= -32)
                return out_head(out, (unsigned char)(signed char)signed_value, 0, 0);
            if (signed_value >= -128)
                return out_head(out, 0xd0, (uint64_t)signed_value, 1);
            if (signed_value >= -32768)
                return out_head(out, 0xd1, (uint64_t)signed_value, 2);
            if (signed_value >= -2147483648LL)
                return out_head(out, 0xd2, (uint64_t)signed_value, 4);
            return out_head(out, 0xd3, (uint64_t)signed_value, 8);
        }
        uint64_t n = overflow == 0 ? (uint64_t)signed_value : PyLong_AsUnsignedLongLong(value);
        if (n == (uint64_t)-1 && PyErr_Occurred())
            return -1;  /* past 64 bits: msgpack's */
        if (n < 0x80)
            return out_head(out, (unsigned char)n, 0, 0);
        if (n < 0x100)
            return out_head(out, 0xcc, n, 1);
        if (n < 0x10000)
            return out_head(out, 0xcd, n, 2);
        if (n <= 0xFFFFFFFFu)
            return out_head(out, 0xce, n, 4);
        return out_head(out, 0xcf, n, 8);
    }
    if (type == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return out_head(out, 0xcb, bits, 8);
    }
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(value, &n);
        if (utf8 == NULL)
            return -1;  /* surrogates: msgpack's to refuse */
        if (out_length(out, (uint64_t)n, 0xa0, 32, 0xd9, 0xda) < 0)
            return -1;
        return out_bytes(out, utf8, (size_t)n);
    }
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        if (out_length(out, (uint64_t)n, 0, 0, 0xc4, 0xc5) < 0)
            return -1;
        return out_bytes(out, PyBytes_AS_STRING(value), (size_t)n);
    }
    if (type == &PyList_Type) {
        Py_ssize_t n = PyList_GET_SIZE(value);
        if (out_length(out, (uint64_t)n, 0x90, 16, 0, 0xdc) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++)
            if (encode_item(out, PyList_GET_ITEM(value, i), depth + 1) < 0)
                return -1;
        return PyList_GET_SIZE(value) == n ? 0 : -1;
    }
    if (type == &PyDict_Type) {
        Py_ssize_t n = PyDict_GET_SIZE(value);
        if (out_length(out, (uint64_t)n, 0x80, 16, 0, 0xde) < 0)
            return -1;
        Py_ssize_t position = 0, count = 0;
        PyObject *key, *item;
        while (PyDict_Next(value, &position, &key, &item)) {
            if (encode_item(out, key, depth + 1) < 0 || encode_item(out, item, depth + 1) < 0)
                return -1;
            count++;
        }
        return count == n ? 0 : -1;
    }
    return -1;  /* any other type: msgpack's, with shmfeed's rules */
}

/* The msgpack bytes of ``value``, or NULL with no exception set: msgpack decides. */
static PyObject *encode_common(PyObject *value) {
    Out out;
    out.data = out.stack;
    out.length = 0;
    out.capacity = ENCODE_STACK_BYTES;
    int failed = encode_item(&out, value, 0);
    PyObject *result = NULL;
    if (!failed)
        result = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.length);
    if (out.data != out.stack)
        PyMem_Free(out.data);
    if (result == NULL)
        PyErr_Clear();  /* msgpack meets whatever it was again, and says it properly */
    return result;
}

/* encode(value) -> the msgpack bytes of ``value``, or None: msgpack decides (see the top). */
static PyObject *accel_encode(PyObject *module, PyObject *value) {
    (void)module;
    PyObject *result = encode_common(value);
    if (result == NULL)
        Py_RETURN_NONE;
    return result;
}

/* encode_many(values, start, out) -> where it stopped: the bytes of values[start], ... (a
 * list) appended to the list ``out`` up to the first value that msgpack must encode (or
 * the end). A batch's values in one call, not one call each. */
static PyObject *accel_encode_many(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_many(values: list, start: int, out: list)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    PyObject *values = args[0], *out = args[2];
    for (; i >= 0 && i < PyList_GET_SIZE(values); i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        Py_INCREF(value);
        PyObject *encoded = encode_common(value);
        Py_DECREF(value);
        if (encoded == NULL)
            break;
        int failed = PyList_Append(out, encoded);
        Py_DECREF(encoded);
        if (failed < 0)
            return NULL;
    }
    return PyLong_FromSsize_t(i);
}
