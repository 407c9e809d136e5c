/* A msgpack decoder for the common values: what a receive decodes most (Channel.recv,
 * recv_many's C batch). Part of shmfeed/_accel.c (included there).
 *
 * It decodes nil, booleans, integers, floats, str, bin, arrays (as lists) and maps with str
 * or int keys (as dicts), exactly as msgpack.unpackb(raw=False, strict_map_key=False,
 * use_list=True) would, and nothing else: any other byte (ext types, which shmfeed's own
 * types use), a map key of another kind, nesting deeper than DECODE_DEPTH_MAX, bytes that
 * end early or go on after the value, or str that is not UTF-8, make it answer "not mine"
 * (NULL, no exception set), and the caller decodes with msgpack, whose result or error is
 * then the answer. So its results are msgpack's by construction where it answers at all.
 *
 * The bytes may be shared memory another process can write: every length is read once
 * and checked against the bytes left before anything is read or allocated. */

#define DECODE_DEPTH_MAX 32
#define STR_CACHE_SLOTS 512
#define STR_CACHE_MAX_LEN 24

/* Short str seen before, so a repeated one costs no UTF-8 decode and no allocation: map
 * keys, and values such as a symbol or a side that most events repeat. A str is
 * immutable, so handing out the same object again is invisible but to ``is``. Keys are
 * interned, as msgpack interns map keys; values are not (a value seen once would only fill
 * the interpreter's table). The GIL guards the caches. */
typedef struct {
    Py_ssize_t length;
    uint64_t words[3];  /* the bytes, as str_words reads them: they tell equal bytes exactly */
    PyObject *str;
} StrCacheSlot;

static StrCacheSlot key_cache[STR_CACHE_SLOTS];
static StrCacheSlot value_cache[STR_CACHE_SLOTS];

/* ``n`` (at most STR_CACHE_MAX_LEN) bytes at ``p`` as three words that cover every byte,
 * by loads that may overlap: two byte strings of one length are equal exactly when their
 * words are, so a cache hit costs three compares and no memcmp. Each byte is read from
 * ``p`` once into the words (the bytes may be shared memory another process writes), and
 * a miss decodes the bytes spelled back out of the words (``words_bytes``), so what the
 * cache keeps is exactly what those words say. */
static inline void str_words(const unsigned char *p, Py_ssize_t n, uint64_t words[3]) {
    uint32_t lo, hi;
    words[0] = words[1] = words[2] = 0;
    if (n >= 8) {
        memcpy(&words[0], p, 8);
        memcpy(&words[1], p + n - 8, 8);
        if (n > 16)
            memcpy(&words[2], p + 8, 8);
    } else if (n >= 4) {
        memcpy(&lo, p, 4);
        memcpy(&hi, p + n - 4, 4);
        words[0] = ((uint64_t)hi << 32) | lo;
    } else if (n > 0) {
        words[0] = (uint64_t)p[0] | ((uint64_t)p[n / 2] << 8) | ((uint64_t)p[n - 1] << 16);
    }
}

/* The ``n`` bytes that ``words`` (from str_words) stand for, written to ``out``: the
 * inverse of str_words, the later word winning where two overlap. */
static void words_bytes(const uint64_t words[3], Py_ssize_t n, unsigned char *out) {
    if (n >= 8) {
        memcpy(out, &words[0], 8);
        if (n > 16)
            memcpy(out + 8, &words[2], 8);
        memcpy(out + n - 8, &words[1], 8);
    } else if (n >= 4) {
        uint32_t lo = (uint32_t)words[0], hi = (uint32_t)(words[0] >> 32);
        memcpy(out, &lo, 4);
        memcpy(out + n - 4, &hi, 4);
    } else if (n > 0) {
        out[0] = (unsigned char)words[0];
        out[n / 2] = (unsigned char)(words[0] >> 8);
        out[n - 1] = (unsigned char)(words[0] >> 16);
    }
}

static PyObject *short_str(StrCacheSlot *cache, int intern, const unsigned char *p, Py_ssize_t n) {
    uint64_t words[3];
    str_words(p, n, words);
    uint64_t hash = (words[0] * 0x9E3779B97F4A7C15u) ^ (words[1] * 0xC2B2AE3D27D4EB4Fu) ^ words[2] ^ (uint64_t)n;
    StrCacheSlot *slot = &cache[(hash ^ (hash >> 29)) % STR_CACHE_SLOTS];
    if (slot->str != NULL && slot->length == n && slot->words[0] == words[0] && slot->words[1] == words[1]
            && slot->words[2] == words[2]) {
        Py_INCREF(slot->str);
        return slot->str;
    }
    unsigned char bytes[STR_CACHE_MAX_LEN];
    words_bytes(words, n, bytes);
    PyObject *str = PyUnicode_DecodeUTF8((const char *)bytes, n, NULL);
    if (str == NULL)
        return NULL;
    if (intern)
        PyUnicode_InternInPlace(&str);
    PyObject *old = slot->str;
    Py_INCREF(str);
    slot->str = str;
    slot->length = n;
    memcpy(slot->words, words, sizeof words);
    Py_XDECREF(old);  /* last: its deallocation cannot see a half-written slot */
    return str;
}

static inline uint64_t read_be(const unsigned char *p, int bytes) {
    uint64_t value = 0;
    for (int i = 0; i < bytes; i++)
        value = (value << 8) | p[i];
    return value;
}

static PyObject *decode_one(const unsigned char **cursor, const unsigned char *end, int depth);

/* The length that follows a header of ``bytes`` bytes (0: the length is in the type byte). */
static int read_length(const unsigned char **cursor, const unsigned char *end, int bytes, uint64_t *length) {
    if (end - *cursor < bytes)
        return -1;
    *length = read_be(*cursor, bytes);
    *cursor += bytes;
    return 0;
}

static PyObject *decode_str(const unsigned char **cursor, const unsigned char *end, uint64_t n) {
    if ((uint64_t)(end - *cursor) < n)
        return NULL;
    const unsigned char *p = *cursor;
    *cursor += n;
    if (n <= STR_CACHE_MAX_LEN)
        return short_str(value_cache, 0, p, (Py_ssize_t)n);
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
}

/* A map key: a str (through the cache, interned) or an int; NULL for any other kind. */
static PyObject *decode_key(const unsigned char **cursor, const unsigned char *end, int depth) {
    if (*cursor >= end)
        return NULL;
    unsigned char type = **cursor;
    uint64_t n;
    if ((type >= 0xa0 && type <= 0xbf) || type == 0xd9) {
        (*cursor)++;
        if (type == 0xd9) {
            if (read_length(cursor, end, 1, &n) < 0)
                return NULL;
        } else {
            n = type & 0x1f;
        }
        if ((uint64_t)(end - *cursor) < n)
            return NULL;
        const unsigned char *p = *cursor;
        *cursor += n;
        if (n <= STR_CACHE_MAX_LEN)
            return short_str(key_cache, 1, p, (Py_ssize_t)n);
        PyObject *str = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
        if (str != NULL)
            PyUnicode_InternInPlace(&str);
        return str;
    }
    if (type <= 0x7f || type >= 0xe0 || (type >= 0xcc && type <= 0xd3))
        return decode_one(cursor, end, depth);
    return NULL;  /* another kind of key: msgpack's to judge */
}

static PyObject *decode_array(const unsigned char **cursor, const unsigned char *end, uint64_t n, int depth) {
    if (n > (uint64_t)(end - *cursor))  /* each item takes a byte at least */
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *item = decode_one(cursor, end, depth + 1);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static PyObject *decode_map(const unsigned char **cursor, const unsigned char *end, uint64_t n, int depth) {
    if (n > (uint64_t)(end - *cursor) / 2)  /* a key and a value take two bytes at least */
        return NULL;
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *key = decode_key(cursor, end, depth + 1);
        if (key == NULL) {
            Py_DECREF(dict);
            return NULL;
        }
        PyObject *value = decode_one(cursor, end, depth + 1);
        int failed = value == NULL || PyDict_SetItem(dict, key, value) < 0;
        Py_DECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

static PyObject *decode_one(const unsigned char **cursor, const unsigned char *end, int depth) {
    if (*cursor >= end || depth > DECODE_DEPTH_MAX)
        return NULL;
    unsigned char type = *(*cursor)++;
    uint64_t n;
    if (type <= 0x7f)
        return PyLong_FromLong(type);
    if (type >= 0xe0)
        return PyLong_FromLong((long)(signed char)type);
    if (type >= 0xa0 && type <= 0xbf)
        return decode_str(cursor, end, type & 0x1f);
    if (type >= 0x90 && type <= 0x9f)
        return decode_array(cursor, end, type & 0x0f, depth);
    if (type >= 0x80 && type <= 0x8f)
        return decode_map(cursor, end, type & 0x0f, depth);
    switch (type) {
    case 0xc0:
        Py_RETURN_NONE;
    case 0xc2:
        Py_RETURN_FALSE;
    case 0xc3:
        Py_RETURN_TRUE;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int bytes = 1 << (type - 0xcc);
        if (read_length(cursor, end, bytes, &n) < 0)
            return NULL;
        return PyLong_FromUnsignedLongLong(n);
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int bytes = 1 << (type - 0xd0);
        if (read_length(cursor, end, bytes, &n) < 0)
            return NULL;
        int shift = 64 - 8 * bytes;  /* sign-extend from the top bit of the stored width */
        return PyLong_FromLongLong(shift ? (long long)(int64_t)(n << shift) >> shift : (long long)(int64_t)n);
    }
    case 0xca: {
        if (read_length(cursor, end, 4, &n) < 0)
            return NULL;
        uint32_t bits = (uint32_t)n;
        float value;
        memcpy(&value, &bits, 4);
        return PyFloat_FromDouble((double)value);
    }
    case 0xcb: {
        if (read_length(cursor, end, 8, &n) < 0)
            return NULL;
        double value;
        memcpy(&value, &n, 8);
        return PyFloat_FromDouble(value);
    }
    case 0xd9: case 0xda: case 0xdb:
        if (read_length(cursor, end, 1 << (type - 0xd9), &n) < 0)
            return NULL;
        return decode_str(cursor, end, n);
    case 0xc4: case 0xc5: case 0xc6: {
        if (read_length(cursor, end, 1 << (type - 0xc4), &n) < 0 || (uint64_t)(end - *cursor) < n)
            return NULL;
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)*cursor, (Py_ssize_t)n);
        *cursor += n;
        return bytes;
    }
    case 0xdc: case 0xdd:
        if (read_length(cursor, end, type == 0xdc ? 2 : 4, &n) < 0)
            return NULL;
        return decode_array(cursor, end, n, depth);
    case 0xde: case 0xdf:
        if (read_length(cursor, end, type == 0xde ? 2 : 4, &n) < 0)
            return NULL;
        return decode_map(cursor, end, n, depth);
    default:
        return NULL;  /* ext types, 0xc1: msgpack's */
    }
}

/* The value encoded in ``data[0:length]``, or NULL with no exception set: msgpack decides
 * (see the top). An exception of the decoding itself (MemoryError) is cleared too: msgpack
 * meets it again, or not. */
static PyObject *decode_common(const unsigned char *data, Py_ssize_t length) {
    const unsigned char *cursor = data, *end = data + length;
    PyObject *value = decode_one(&cursor, end, 0);
    if (value != NULL && cursor != end) {
        Py_DECREF(value);  /* bytes after the value: msgpack's ExtraData */
        value = NULL;
    }
    if (value == NULL)
        PyErr_Clear();
    return value;
}

/* decode(data, otherwise) -> the value of the msgpack bytes ``data`` (a buffer), or
 * ``otherwise(data)`` where decode_common leaves it to msgpack. */
static PyObject *accel_decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(data, otherwise)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();  /* not bytes: ``otherwise`` says what is wrong */
        return PyObject_CallOneArg(args[1], args[0]);
    }
    PyObject *value = decode_common((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    if (value != NULL)
        return value;
    return PyObject_CallOneArg(args[1], args[0]);
}
