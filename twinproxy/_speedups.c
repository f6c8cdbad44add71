/*
 * twinproxy._speedups: the RESP scanners of twinproxy/protocols/resp.py,
 * the memcached reply scanners of twinproxy/protocols/memcache_text.py and the
 * key hashes of twinproxy/hashing.py, for CPython, where they are most of
 * the proxy's CPU under pipelined load.
 *
 * Both only take the common case: a request or reply that is whole, well
 * formed and written the usual way.  Anything else (bytes still to come
 * where that needs resume state, a malformed length, an inline command, a
 * nesting too deep) returns "not mine", and the pure-Python code, which
 * stays the reference, handles it with its exact errors and resume rules.
 * So the C code never decides an error text and never keeps state.  The
 * hashes are the Python ones' exact twins (tests compare them on random
 * keys, and the placement tables run on both).
 *
 * The build treats this module as optional: without a compiler, or on
 * PyPy (which runs the Python scanners faster than it calls C), twinproxy
 * runs the same code in pure Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Lengths longer than this many digits go to the Python code (it raises). */
#define MAX_DIGITS 18
/* Aggregates nested deeper than this go to the Python code. */
#define MAX_DEPTH 64
/* A reply line this long with no CRLF is garbage: the Python code says so. */
#define MAX_REPLY_LINE (1024 * 1024)

/* The buffer as (pointer, size): bytes or bytearray, the two the parsers keep. */
static int
view(PyObject *buf, const char **data, Py_ssize_t *size)
{
    if (PyBytes_CheckExact(buf)) {
        *data = PyBytes_AS_STRING(buf);
        *size = PyBytes_GET_SIZE(buf);
        return 0;
    }
    if (PyByteArray_CheckExact(buf)) {
        *data = PyByteArray_AS_STRING(buf);
        *size = PyByteArray_GET_SIZE(buf);
        return 0;
    }
    PyErr_SetString(PyExc_TypeError, "expected bytes or bytearray");
    return -1;
}

/* The (buf, pos, end) arguments of the reply scanners, with ``end`` kept
 * within the buffer; -1 (an exception set) if they are not that. */
static int
scan_args(PyObject *args, const char **data, Py_ssize_t *pos, Py_ssize_t *end)
{
    PyObject *buf;
    Py_ssize_t size;

    if (!PyArg_ParseTuple(args, "Onn", &buf, pos, end))
        return -1;
    if (view(buf, data, &size) < 0)
        return -1;
    if (*end > size)
        *end = size;
    return 0;
}

/* Digits from *pos up to CRLF: the value, and *pos moved past the CRLF.
 * -1: no CRLF before end (incomplete); -2: not a plain unsigned decimal. */
static long long
unsigned_line(const char *data, Py_ssize_t *pos, Py_ssize_t end)
{
    Py_ssize_t i = *pos;
    long long value = 0;
    int digits = 0;
    while (i < end && data[i] >= '0' && data[i] <= '9') {
        if (++digits > MAX_DIGITS)
            return -2;
        value = value * 10 + (data[i] - '0');
        i++;
    }
    if (i + 1 >= end)
        return -1;
    if (digits == 0 || data[i] != '\r' || data[i + 1] != '\n')
        return -2;
    *pos = i + 2;
    return value;
}

/* scan_request(buf, pos, max_bulk, max_args, limit) -> (args, raw, end) or None
 *
 * A multibulk request that starts at ``pos`` and ends whole before
 * ``len(buf)`` and ``limit``: its arguments as a list of bytes, its bytes,
 * and the offset past it.  None when it is not whole yet, or not the usual
 * form. */
static PyObject *
scan_request(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t pos, max_bulk, max_args, limit;
    const char *data;
    Py_ssize_t size;

    if (!PyArg_ParseTuple(args, "Onnnn", &buf, &pos, &max_bulk, &max_args, &limit))
        return NULL;
    if (view(buf, &data, &size) < 0)
        return NULL;
    if (limit < size)
        size = limit;  /* a request past the limit is the Python code's error */
    if (pos < 0 || pos >= size || data[pos] != '*')
        Py_RETURN_NONE;
    Py_ssize_t cursor = pos + 1;
    long long count = unsigned_line(data, &cursor, size);
    if (count <= 0 || count > max_args)
        Py_RETURN_NONE;
    /* Each argument takes at least 6 bytes ("$0\r\n\r\n"). */
    if (count > (size - cursor) / 6 + 1)
        Py_RETURN_NONE;
    PyObject *list = PyList_New((Py_ssize_t)count);
    if (list == NULL)
        return NULL;
    /* Making the list may have run the garbage collector, and so any code:
     * take the buffer's address again (a bytearray can move). */
    if (view(buf, &data, &size) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    if (limit < size)
        size = limit;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)count; i++) {
        if (cursor >= size || data[cursor] != '$')
            goto not_mine;
        cursor++;
        long long length = unsigned_line(data, &cursor, size);
        if (length < 0 || length > max_bulk)
            goto not_mine;
        Py_ssize_t stop = cursor + (Py_ssize_t)length;
        if (stop + 2 > size || data[stop] != '\r' || data[stop + 1] != '\n')
            goto not_mine;
        PyObject *item = PyBytes_FromStringAndSize(data + cursor, (Py_ssize_t)length);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
        cursor = stop + 2;
    }
    PyObject *raw;
    if (pos == 0 && PyBytes_CheckExact(buf) && cursor == PyBytes_GET_SIZE(buf)) {
        raw = buf;  /* the whole read is the request: no copy */
        Py_INCREF(raw);
    } else {
        raw = PyBytes_FromStringAndSize(data + pos, cursor - pos);
        if (raw == NULL) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return Py_BuildValue("(NNn)", list, raw, cursor);

not_mine:
    Py_DECREF(list);
    Py_RETURN_NONE;
}

/* The first CRLF at or after pos, before end; -1 if none. */
static Py_ssize_t
find_crlf(const char *data, Py_ssize_t pos, Py_ssize_t end)
{
    while (pos < end) {
        const char *cr = memchr(data + pos, '\r', (size_t)(end - pos));
        if (cr == NULL)
            return -1;
        Py_ssize_t at = cr - data;
        if (at + 1 >= end)
            return -1;
        if (data[at + 1] == '\n')
            return at;
        pos = at + 1;
    }
    return -1;
}

/* A length in a reply, which may be -1; -2 when it is anything else odd.
 * *incomplete is set when the line is not whole yet. */
static long long
signed_line(const char *data, Py_ssize_t *pos, Py_ssize_t end, int *incomplete)
{
    Py_ssize_t i = *pos;
    *incomplete = 0;
    if (i < end && data[i] == '-') {
        if (i + 4 > end) {
            *incomplete = 1;
            return -2;
        }
        if (memcmp(data + i, "-1\r\n", 4) == 0) {
            *pos = i + 4;
            return -1;
        }
        return -2;
    }
    long long value = unsigned_line(data, pos, end);
    if (value == -1) {
        *incomplete = 1;
        return -2;
    }
    return value;
}

/* scan_reply(buf, pos, end) -> int
 *
 * The offset just past the whole RESP2/RESP3 value at ``pos`` (an
 * attribute and the value it annotates count as one); -1 when the bytes
 * end first; -2 when the Python scanner must look (an error, or a form
 * this code does not take). */
static PyObject *
scan_reply(PyObject *self, PyObject *args)
{
    Py_ssize_t pos, end;
    const char *data;
    Py_ssize_t stack[MAX_DEPTH];
    int depth = 0;

    if (scan_args(args, &data, &pos, &end) < 0)
        return NULL;
    if (pos < 0)
        return PyLong_FromLong(-2);

    for (;;) {
        if (pos >= end)
            return PyLong_FromLong(-1);
        char kind = data[pos];
        Py_ssize_t next;
        int incomplete;
        switch (kind) {
        case '+': case '-': case ':': case '_': case ',': case '#': case '(': {
            /* The first CRLF ends the line, as bytes.find(CRLF) finds it. */
            Py_ssize_t eol = find_crlf(data, pos + 1, end);
            if (eol < 0)
                return PyLong_FromLong(end - pos > MAX_REPLY_LINE ? -2 : -1);
            next = eol + 2;
            break;
        }
        case '$': case '!': case '=': {
            Py_ssize_t cursor = pos + 1;
            long long length = signed_line(data, &cursor, end, &incomplete);
            if (incomplete)
                return PyLong_FromLong(-1);
            if (length == -1 && kind == '$') {
                next = cursor;
                break;
            }
            if (length < 0)
                return PyLong_FromLong(-2);
            Py_ssize_t stop = cursor + (Py_ssize_t)length;
            if (stop + 2 > end)
                return PyLong_FromLong(-1);
            if (data[stop] != '\r' || data[stop + 1] != '\n')
                return PyLong_FromLong(-2);
            next = stop + 2;
            break;
        }
        case '*': case '~': case '>': case '%': case '|': {
            Py_ssize_t cursor = pos + 1;
            long long count = signed_line(data, &cursor, end, &incomplete);
            if (incomplete)
                return PyLong_FromLong(-1);
            if (count == -1 && kind == '*') {
                next = cursor;
                break;
            }
            if (count < 0)
                return PyLong_FromLong(-2);
            long long children = (kind == '%' || kind == '|') ? 2 * count : count;
            if (kind == '|')
                children += 1;  /* the annotated value that follows */
            pos = cursor;
            if (children) {
                if (depth == MAX_DEPTH)
                    return PyLong_FromLong(-2);
                stack[depth++] = (Py_ssize_t)children;
                continue;
            }
            next = pos;
            break;
        }
        default:
            return PyLong_FromLong(-2);
        }
        pos = next;
        /* One whole value ends at ``pos``: close every aggregate it completes. */
        for (;;) {
            if (depth == 0)
                return PyLong_FromSsize_t(pos);
            if (--stack[depth - 1])
                break;
            depth--;
        }
    }
}

/* Digits of ``value`` (>= 0) written backwards end at ``end``; returns their start. */
static char *
write_decimal(char *end, Py_ssize_t value)
{
    do {
        *--end = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    return end;
}

static Py_ssize_t
decimal_width(Py_ssize_t value)
{
    Py_ssize_t width = 1;
    while (value >= 10) {
        value /= 10;
        width++;
    }
    return width;
}

/* "$<len>\r\n<arg>\r\n" at out; returns the end. */
static char *
put_bulk(char *out, const char *arg, Py_ssize_t length)
{
    char digits[24];
    char *start = write_decimal(digits + sizeof digits, length);
    Py_ssize_t width = (digits + sizeof digits) - start;
    *out++ = '$';
    memcpy(out, start, (size_t)width);
    out += width;
    *out++ = '\r';
    *out++ = '\n';
    memcpy(out, arg, (size_t)length);
    out += length;
    *out++ = '\r';
    *out++ = '\n';
    return out;
}

/* encode_fragment(args, positions, width) -> bytes
 *
 * The multibulk of ``args[0]`` followed by, for each index in
 * ``positions``, the ``width`` arguments from it: a split command's part
 * for one server.  Every argument is bytes. */
static PyObject *
encode_fragment(PyObject *self, PyObject *call_args)
{
    PyObject *args, *positions;
    Py_ssize_t width;

    if (!PyArg_ParseTuple(call_args, "O!O!n", &PyList_Type, &args, &PyList_Type, &positions, &width))
        return NULL;
    Py_ssize_t nargs = PyList_GET_SIZE(args);
    Py_ssize_t npos = PyList_GET_SIZE(positions);
    if (nargs == 0 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "no command, or a width under 1");
        return NULL;
    }
    /* First pass: check every index and argument, and add up the size. */
    Py_ssize_t count = 1 + npos * width;
    Py_ssize_t total = 1 + decimal_width(count) + 2;
    for (Py_ssize_t i = -1; i < npos; i++) {
        Py_ssize_t first = 0, take = 1;
        if (i >= 0) {
            PyObject *index = PyList_GET_ITEM(positions, i);
            if (!PyLong_CheckExact(index)) {
                PyErr_SetString(PyExc_TypeError, "positions must be ints");
                return NULL;
            }
            first = PyLong_AsSsize_t(index);
            if (first == -1 && PyErr_Occurred())
                return NULL;
            take = width;
            if (first < 1 || first + width > nargs) {
                PyErr_SetString(PyExc_IndexError, "argument position out of range");
                return NULL;
            }
        }
        for (Py_ssize_t j = first; j < first + take; j++) {
            PyObject *arg = PyList_GET_ITEM(args, j);
            if (!PyBytes_CheckExact(arg)) {
                PyErr_SetString(PyExc_TypeError, "arguments must be bytes");
                return NULL;
            }
            Py_ssize_t length = PyBytes_GET_SIZE(arg);
            total += 1 + decimal_width(length) + 2 + length + 2;
        }
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(result);
    char digits[24];
    char *start = write_decimal(digits + sizeof digits, count);
    *out++ = '*';
    memcpy(out, start, (size_t)((digits + sizeof digits) - start));
    out += (digits + sizeof digits) - start;
    *out++ = '\r';
    *out++ = '\n';
    for (Py_ssize_t i = -1; i < npos; i++) {
        Py_ssize_t first = 0, take = 1;
        if (i >= 0) {
            first = PyLong_AsSsize_t(PyList_GET_ITEM(positions, i));
            take = width;
        }
        for (Py_ssize_t j = first; j < first + take; j++) {
            PyObject *arg = PyList_GET_ITEM(args, j);
            out = put_bulk(out, PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
        }
    }
    return result;
}

/* split_bulk_array(reply) -> list of bytes, or None
 *
 * The elements of an array reply made only of bulk strings and nulls
 * ($-1 or RESP3 _), each as its raw bytes; None for any other reply. */
static PyObject *
split_bulk_array(PyObject *self, PyObject *reply)
{
    const char *data;
    Py_ssize_t size;

    if (!PyBytes_CheckExact(reply)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return NULL;
    }
    data = PyBytes_AS_STRING(reply);
    size = PyBytes_GET_SIZE(reply);
    if (size < 1 || data[0] != '*')
        Py_RETURN_NONE;
    Py_ssize_t pos = 1;
    long long count = unsigned_line(data, &pos, size);
    if (count < 0 || count > (size - pos) / 3)
        Py_RETURN_NONE;
    PyObject *list = PyList_New((Py_ssize_t)count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)count; i++) {
        Py_ssize_t start = pos;
        if (pos + 3 <= size && data[pos] == '_' && data[pos + 1] == '\r' && data[pos + 2] == '\n') {
            pos += 3;
        } else if (pos < size && data[pos] == '$') {
            int incomplete;
            pos++;
            long long length = signed_line(data, &pos, size, &incomplete);
            if (incomplete || length < -1)
                goto not_mine;
            if (length >= 0) {
                if (pos + length + 2 > size || data[pos + length] != '\r' || data[pos + length + 1] != '\n')
                    goto not_mine;
                pos += (Py_ssize_t)length + 2;
            }
        } else {
            goto not_mine;
        }
        PyObject *item = PyBytes_FromStringAndSize(data + start, pos - start);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    if (pos != size)
        goto not_mine;
    return list;

not_mine:
    Py_DECREF(list);
    Py_RETURN_NONE;
}

/* memcached text replies ------------------------------------------------ */

/* The data length of "VALUE <key> <flags> <bytes>[ <cas>]" in [pos, eol)
 * (split on single spaces, as bytes.split(b" ") does); -1 if malformed. */
static long long
value_length(const char *data, Py_ssize_t pos, Py_ssize_t eol, Py_ssize_t *key_start, Py_ssize_t *key_stop)
{
    Py_ssize_t starts[6], stops[6];
    int count = 0;
    Py_ssize_t start = pos;
    for (Py_ssize_t i = pos; i <= eol; i++) {
        if (i == eol || data[i] == ' ') {
            if (count == 6)
                return -1;
            starts[count] = start;
            stops[count] = i;
            count++;
            start = i + 1;
        }
    }
    if (count != 4 && count != 5)
        return -1;
    Py_ssize_t digits = stops[3] - starts[3];
    if (digits < 1 || digits > MAX_DIGITS)
        return -1;
    long long length = 0;
    for (Py_ssize_t i = starts[3]; i < stops[3]; i++) {
        if (data[i] < '0' || data[i] > '9')
            return -1;
        length = length * 10 + (data[i] - '0');
    }
    *key_start = starts[1];
    *key_stop = stops[1];
    return length;
}

/* scan_memcache_reply(buf, pos, end) -> int
 *
 * The offset past the whole reply at ``pos``: one line, VALUE (or STAT)
 * items up to the line that ends them, or a meta VA with its data; -1
 * when the bytes end first or the Python framer must look. */
static PyObject *
scan_memcache_reply(PyObject *self, PyObject *args)
{
    Py_ssize_t pos, end;
    const char *data;

    if (scan_args(args, &data, &pos, &end) < 0)
        return NULL;
    if (pos < 0)
        return PyLong_FromLong(-1);
    for (;;) {
        Py_ssize_t eol = find_crlf(data, pos, end);
        if (eol < 0)
            return PyLong_FromLong(-1);
        Py_ssize_t line = eol - pos;
        if (line >= 6 && memcmp(data + pos, "VALUE ", 6) == 0) {
            Py_ssize_t key_start, key_stop;
            long long length = value_length(data, pos, eol, &key_start, &key_stop);
            if (length < 0)
                return PyLong_FromLong(-1);
            Py_ssize_t stop = eol + 2 + (Py_ssize_t)length + 2;
            if (stop > end || data[stop - 2] != '\r' || data[stop - 1] != '\n')
                return PyLong_FromLong(-1);
            pos = stop;
            continue;
        }
        if (line >= 5 && memcmp(data + pos, "STAT ", 5) == 0) {
            pos = eol + 2;
            continue;
        }
        if (line >= 3 && memcmp(data + pos, "VA ", 3) == 0)
            return PyLong_FromLong(-1);  /* meta replies: rare, the Python framer's */
        return PyLong_FromSsize_t(eol + 2);
    }
}

/* split_values(reply) -> list of (key, item) or None
 *
 * A retrieval reply's VALUE items, each as its key and its bytes (line,
 * data and CRLF), up to what follows them (END); None if one is malformed. */
static PyObject *
split_values(PyObject *self, PyObject *reply)
{
    if (!PyBytes_CheckExact(reply)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(reply);
    Py_ssize_t size = PyBytes_GET_SIZE(reply);
    Py_ssize_t pos = 0;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    while (pos + 6 <= size && memcmp(data + pos, "VALUE ", 6) == 0) {
        Py_ssize_t eol = find_crlf(data, pos, size);
        Py_ssize_t key_start, key_stop;
        long long length = eol < 0 ? -1 : value_length(data, pos, eol, &key_start, &key_stop);
        if (length < 0 || eol + 4 + length > size)
            goto not_mine;
        Py_ssize_t stop = eol + 4 + (Py_ssize_t)length;
        PyObject *item = Py_BuildValue("(y#y#)", data + key_start, key_stop - key_start,
                                       data + pos, stop - pos);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
        pos = stop;
    }
    return list;

not_mine:
    Py_DECREF(list);
    Py_RETURN_NONE;
}

/* key hashes ------------------------------------------------------------ */

/* A key byte as nutcracker's C code reads it: a signed char, sign-extended. */
#define SX32(byte) ((uint32_t)(int32_t)(signed char)(byte))
#define SX64(byte) ((uint64_t)(int64_t)(signed char)(byte))

static uint32_t
h_one_at_a_time(const unsigned char *key, Py_ssize_t length)
{
    uint32_t h = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        h += SX32(key[i]);
        h += h << 10;
        h ^= h >> 6;
    }
    h += h << 3;
    h ^= h >> 11;
    h += h << 15;
    return h;
}

static uint32_t crc16_table[256];

static void
init_crc16(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t crc = i << 8;
        for (int j = 0; j < 8; j++)
            crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) : (crc << 1);
        crc16_table[i] = crc & 0xFFFF;
    }
}

static uint32_t
h_crc16(const unsigned char *key, Py_ssize_t length)
{
    uint32_t crc = 0;
    for (Py_ssize_t i = 0; i < length; i++)
        crc = (crc << 8) ^ crc16_table[((crc >> 8) ^ SX32(key[i])) & 0xFF];
    return crc;
}

static uint32_t
h_fnv1_64(const unsigned char *key, Py_ssize_t length)
{
    uint64_t h = 0xCBF29CE484222325ULL;
    for (Py_ssize_t i = 0; i < length; i++) {
        h *= 0x100000001B3ULL;
        h ^= SX64(key[i]);
    }
    return (uint32_t)h;
}

static uint32_t
h_fnv1a_64(const unsigned char *key, Py_ssize_t length)
{
    uint32_t h = 0x84222325u;
    for (Py_ssize_t i = 0; i < length; i++)
        h = (h ^ SX32(key[i])) * 0x1B3u;
    return h;
}

static uint32_t
h_fnv1_32(const unsigned char *key, Py_ssize_t length)
{
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < length; i++)
        h = (h * 16777619u) ^ SX32(key[i]);
    return h;
}

static uint32_t
h_fnv1a_32(const unsigned char *key, Py_ssize_t length)
{
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < length; i++)
        h = (h ^ SX32(key[i])) * 16777619u;
    return h;
}

static uint32_t
h_hsieh(const unsigned char *key, Py_ssize_t length)
{
    if (length == 0)
        return 0;
    uint32_t h = 0, tmp;
    Py_ssize_t rem = length & 3, pos = 0;
    for (Py_ssize_t n = length >> 2; n > 0; n--) {
        h += (uint32_t)key[pos] | ((uint32_t)key[pos + 1] << 8);
        tmp = (((uint32_t)key[pos + 2] | ((uint32_t)key[pos + 3] << 8)) << 11) ^ h;
        h = (h << 16) ^ tmp;
        h += h >> 11;
        pos += 4;
    }
    if (rem == 3) {
        h += (uint32_t)key[pos] | ((uint32_t)key[pos + 1] << 8);
        h ^= h << 16;
        h ^= SX32(key[pos + 2]) << 18;
        h += h >> 11;
    } else if (rem == 2) {
        h += (uint32_t)key[pos] | ((uint32_t)key[pos + 1] << 8);
        h ^= h << 11;
        h += h >> 17;
    } else if (rem == 1) {
        h += SX32(key[pos]);
        h ^= h << 10;
        h += h >> 1;
    }
    h ^= h << 3;
    h += h >> 5;
    h ^= h << 4;
    h += h >> 17;
    h ^= h << 25;
    h += h >> 6;
    return h;
}

static uint32_t
little32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint32_t
h_murmur(const unsigned char *key, Py_ssize_t length)
{
    const uint32_t m = 0x5BD1E995u;
    uint32_t h = (0xDEADBEEFu * (uint32_t)length) ^ (uint32_t)length;
    Py_ssize_t pos = 0;
    while (length - pos >= 4) {
        uint32_t k = little32(key + pos) * m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
        pos += 4;
    }
    Py_ssize_t rem = length - pos;
    if (rem == 3)
        h ^= (uint32_t)key[pos + 2] << 16;
    if (rem >= 2)
        h ^= (uint32_t)key[pos + 1] << 8;
    if (rem >= 1) {
        h ^= key[pos];
        h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

#define ROT(x, k) (((x) << (k)) | ((x) >> (32 - (k))))

static uint32_t
h_jenkins(const unsigned char *key, Py_ssize_t length)
{
    uint32_t a, b, c;
    a = b = c = 0xDEADBEEFu + (uint32_t)length + 13u;
    Py_ssize_t pos = 0;
    while (length - pos > 12) {
        a += little32(key + pos);
        b += little32(key + pos + 4);
        c += little32(key + pos + 8);
        a -= c; a ^= ROT(c, 4); c += b;
        b -= a; b ^= ROT(a, 6); a += c;
        c -= b; c ^= ROT(b, 8); b += a;
        a -= c; a ^= ROT(c, 16); c += b;
        b -= a; b ^= ROT(a, 19); a += c;
        c -= b; c ^= ROT(b, 4); b += a;
        pos += 12;
    }
    Py_ssize_t rem = length - pos;
    if (rem == 0)
        return c;
    unsigned char tail[12] = {0};
    memcpy(tail, key + pos, (size_t)rem);
    a += little32(tail);
    b += little32(tail + 4);
    c += little32(tail + 8);
    c ^= b; c -= ROT(b, 14);
    a ^= c; a -= ROT(c, 11);
    b ^= a; b -= ROT(a, 25);
    c ^= b; c -= ROT(b, 16);
    a ^= c; a -= ROT(c, 4);
    b ^= a; b -= ROT(a, 14);
    c ^= b; c -= ROT(b, 24);
    return c;
}

#define HASH_WRAPPER(name)                                                   \
    static PyObject *                                                        \
    name(PyObject *self, PyObject *key)                                      \
    {                                                                        \
        if (!PyBytes_Check(key)) {                                           \
            PyErr_SetString(PyExc_TypeError, "a key is bytes");              \
            return NULL;                                                     \
        }                                                                    \
        return PyLong_FromUnsignedLong(h_##name(                             \
            (const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))); \
    }

HASH_WRAPPER(one_at_a_time)
HASH_WRAPPER(crc16)
HASH_WRAPPER(fnv1_64)
HASH_WRAPPER(fnv1a_64)
HASH_WRAPPER(fnv1_32)
HASH_WRAPPER(fnv1a_32)
HASH_WRAPPER(hsieh)
HASH_WRAPPER(murmur)
HASH_WRAPPER(jenkins)

static PyMethodDef methods[] = {
    {"scan_request", scan_request, METH_VARARGS,
     "scan_request(buf, pos, max_bulk, max_args, limit) -> (args, raw, end) or None"},
    {"scan_reply", scan_reply, METH_VARARGS,
     "scan_reply(buf, pos, end) -> end of the value, -1 if incomplete, -2 for the Python scanner"},
    {"encode_fragment", encode_fragment, METH_VARARGS,
     "encode_fragment(args, positions, width) -> the multibulk of args[0] and args[p:p+width] for each p"},
    {"split_bulk_array", split_bulk_array, METH_O,
     "split_bulk_array(reply) -> the raw elements of an array of bulk strings and nulls, or None"},
    {"scan_memcache_reply", scan_memcache_reply, METH_VARARGS,
     "scan_memcache_reply(buf, pos, end) -> end of the whole reply, or -1 for the Python framer"},
    {"split_values", split_values, METH_O,
     "split_values(reply) -> [(key, item bytes)] of a retrieval reply, or None"},
    {"one_at_a_time", one_at_a_time, METH_O, "hashing.one_at_a_time in C"},
    {"crc16", crc16, METH_O, "hashing.crc16 in C"},
    {"fnv1_64", fnv1_64, METH_O, "hashing.fnv1_64 in C"},
    {"fnv1a_64", fnv1a_64, METH_O, "hashing.fnv1a_64 in C"},
    {"fnv1_32", fnv1_32, METH_O, "hashing.fnv1_32 in C"},
    {"fnv1a_32", fnv1a_32, METH_O, "hashing.fnv1a_32 in C"},
    {"hsieh", hsieh, METH_O, "hashing.hsieh in C"},
    {"murmur", murmur, METH_O, "hashing.murmur in C"},
    {"jenkins", jenkins, METH_O, "hashing.jenkins in C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "twinproxy._speedups",
    "C twins of the common cases of twinproxy's scanners and key hashes (see twinproxy/compiled.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_crc16();
    return PyModule_Create(&module);
}
