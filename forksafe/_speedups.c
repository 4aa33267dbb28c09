/*
 * forksafe._speedups: the two methods a tracked SQLAlchemy pool runs at every checkout, and
 * the flag its dialect is asked at every statement, in C. Optional: forksafe/sqlalchemy.py
 * has the same code in Python and uses it when this module is not built (or
 * FORKSAFE_NO_SPEEDUPS=1 is set).
 *
 * Each method does exactly what its Python twin does (see _make_classes there), minus the
 * interpreter's frame, and the liveness poll without releasing the GIL (its timeout is 0,
 * it never blocks):
 *
 *   connect(pool)  the fork check: the wipe-on-fork mark reads 1 and the pool was made for
 *                  OWN.pid, then the checkout; anything else takes the Python path that asks
 *                  os.getpid() (_connect_checked).
 *   _do_get(pool)  the base class's _do_get, then the liveness check of the record it
 *                  returned: idle time under the state's threshold and a socket with nothing
 *                  to read. Anything else, and any error, goes to the Python full path
 *                  (_finish_checkout), which reports what went wrong; only an exception that
 *                  is not an Exception (KeyboardInterrupt) propagates, after the record was
 *                  given back to the pool.
 *
 *   dialect_has_events(dialect)
 *                  a tracked dialect's _has_events, which SQLAlchemy reads at every
 *                  statement: true when the application listens for dialect events, or
 *                  while an exception is being handled (forksafe's handle_error listener).
 *
 * Concurrency: both run with the GIL held from start to end (no Python code runs between
 * reading the state and writing state.last except the base _do_get, which runs before), so
 * they see and change the same things the Python methods would at the same points.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <poll.h>
#include <stddef.h>
#include <time.h>

/* References a hook keeps. connect: checkout, checked, base, own, holds, hold_late, mark.
 * _do_get: base, finish, give_back, key, globals, state class. */
#define NREFS 7

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *name;
    PyObject *refs[NREFS];
    Py_buffer mark;      /* connect: the wipe-on-fork byte */
    int has_mark;
    short events;        /* _do_get: what the poll asks for */
    /* _do_get: where the state class (refs[5], exactly; a subclass takes the full path)
     * keeps its slots, read and written as its slot descriptors would */
    Py_ssize_t off_last, off_threshold, off_fd;
} Hook;

static PyObject *s_pid, *s_forksafe_pid, *s_poll_after;
static PyObject *s_user_events, *s_forksafe_base, *s_has_events;

/* -- connect --------------------------------------------------------------------------- */
static PyObject *
connect_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Hook *h = (Hook *)callable;
    PyObject *checkout = h->refs[0], *checked = h->refs[1], *base = h->refs[2];
    PyObject *own = h->refs[3], *holds = h->refs[4], *hold_late = h->refs[5];
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "connect() takes no arguments");
        return NULL;
    }
    PyObject *pool = args[0];
    if (((volatile const char *)h->mark.buf)[0]) {
        PyObject *made_for = PyObject_GetAttr(pool, s_forksafe_pid);
        if (made_for == NULL)
            return NULL;
        PyObject *pid = PyObject_GetAttr(own, s_pid);
        if (pid == NULL) {
            Py_DECREF(made_for);
            return NULL;
        }
        int same = PyObject_RichCompareBool(made_for, pid, Py_EQ);
        Py_DECREF(made_for);
        Py_DECREF(pid);
        if (same < 0)
            return NULL;
        if (same) {
            PyObject *fairy = PyObject_CallOneArg(checkout, pool);
            if (fairy != NULL && PyDict_GET_SIZE(holds) != 0) {
                /* another thread's fork is under way and listed its holds already */
                PyObject *r = PyObject_CallOneArg(hold_late, fairy);
                if (r == NULL) {
                    Py_DECREF(fairy);
                    return NULL;
                }
                Py_DECREF(r);
            }
            return fairy;
        }
    }
    PyObject *pair[2] = {pool, base};
    return PyObject_Vectorcall(checked, pair, 2, NULL);
}

/* -- _do_get --------------------------------------------------------------------------- */
#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* A slot's number (a float, or an int: recycle=3600); -1 with no error set: anything else
 * (the full path decides). */
static int
slot_double(PyObject *state, Py_ssize_t off, double *out)
{
    PyObject *v = SLOT(state, off);
    if (v != NULL && PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return 0;
    }
    if (v != NULL && PyLong_CheckExact(v)) {
        *out = PyLong_AsDouble(v);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();  /* too large for a double: the full path handles it */
            return -1;
        }
        return 0;
    }
    return -1;
}

/* 1: the record may be handed out as it is (state.last written); 0: the full path decides;
 * -1: an error is set. */
static int
liveness_fast(Hook *h, PyObject *rec)
{
    PyObject *key = h->refs[3], *globals = h->refs[4], *cls = h->refs[5];
    /* the record's attribute (not a key in record.info: that is the application's) */
    PyObject *state;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyObject_GetOptionalAttr(rec, key, &state) < 0)
        return -1;
#else
    state = PyObject_GetAttr(rec, key);
    if (state == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();  /* a record forksafe has not seen: the full path */
    }
#endif
    if (state == NULL)
        return 0;

    int result = 0;
    double last, threshold, poll_after;
    long fd;
    struct timespec ts;
    if ((PyObject *)Py_TYPE(state) != cls)
        goto done;
    if (slot_double(state, h->off_last, &last) < 0
        || slot_double(state, h->off_threshold, &threshold) < 0)
        goto done;
    PyObject *fd_obj = SLOT(state, h->off_fd);
    if (fd_obj == NULL || !PyLong_CheckExact(fd_obj))
        goto done;
    fd = PyLong_AsLong(fd_obj);
    if (fd == -1 && PyErr_Occurred()) {
        result = -1;
        goto done;
    }
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)  /* time.monotonic()'s clock */
        goto done;
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    double idle = now - last;
    if (!(idle < threshold))
        goto done;
    if (fd >= 0) {
        PyObject *pa = PyDict_GetItemWithError(globals, s_poll_after);
        if (pa == NULL) {
            result = PyErr_Occurred() ? -1 : 0;
            goto done;
        }
        poll_after = PyFloat_AsDouble(pa);
        if (poll_after == -1.0 && PyErr_Occurred()) {
            result = -1;
            goto done;
        }
        if (!(idle < poll_after)) {
            struct pollfd p = {(int)fd, h->events, 0};
            /* readable, closed, or the poll itself failed (EINTR): the full path looks */
            if (poll(&p, 1, 0) != 0)
                goto done;
        }
    }
    PyObject *stamp = PyFloat_FromDouble(now);
    if (stamp == NULL) {
        result = -1;
        goto done;
    }
    PyObject *old = SLOT(state, h->off_last);
    SLOT(state, h->off_last) = stamp;
    Py_XDECREF(old);
    result = 1;
done:
    Py_DECREF(state);
    return result;
}

static PyObject *
do_get_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Hook *h = (Hook *)callable;
    PyObject *base = h->refs[0], *finish = h->refs[1], *give_back = h->refs[2];
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "_do_get() takes no arguments");
        return NULL;
    }
    PyObject *pool = args[0];
    PyObject *rec = PyObject_CallOneArg(base, pool);
    if (rec == NULL)
        return NULL;
    /* From here nothing may raise: the record is out of the queue (or holds an overflow
     * slot) and only the caller's checkout would return it. */
    int fast = liveness_fast(h, rec);
    if (fast == 1)
        return rec;
    if (fast < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (!PyErr_GivenExceptionMatches(type, PyExc_Exception)) {
            /* KeyboardInterrupt and the like: give the record back, then raise it */
            PyErr_NormalizeException(&type, &value, &tb);
            PyObject *pair[2] = {rec, value};
            PyObject *r = PyObject_Vectorcall(give_back, pair, 2, NULL);
            if (r == NULL)
                PyErr_Clear();
            Py_XDECREF(r);
            Py_DECREF(rec);
            PyErr_Restore(type, value, tb);
            return NULL;
        }
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    PyObject *pair[2] = {pool, rec};
    PyObject *res = PyObject_Vectorcall(finish, pair, 2, NULL);
    Py_DECREF(rec);
    return res;
}

/* -- the type: a method (binds like a function, called without a bound method) --------- */
static PyObject *
hook_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int
hook_traverse(Hook *h, visitproc visit, void *arg)
{
    for (int i = 0; i < NREFS; i++)
        Py_VISIT(h->refs[i]);
    return 0;
}

static int
hook_clear(Hook *h)
{
    for (int i = 0; i < NREFS; i++)
        Py_CLEAR(h->refs[i]);
    return 0;
}

static void
hook_dealloc(Hook *h)
{
    PyObject_GC_UnTrack(h);
    if (h->has_mark)
        PyBuffer_Release(&h->mark);
    hook_clear(h);
    Py_XDECREF(h->name);
    PyObject_GC_Del(h);
}

static PyObject *
hook_repr(Hook *h)
{
    return PyUnicode_FromFormat("<forksafe checkout method %U (C)>", h->name);
}

static PyObject *
hook_name(Hook *h, void *closure)
{
    return Py_NewRef(h->name);
}

static PyGetSetDef hook_getset[] = {
    {"__name__", (getter)hook_name, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "forksafe._speedups.CheckoutMethod",
    .tp_basicsize = sizeof(Hook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A tracked pool's checkout method, in C (see forksafe/_speedups.c).",
    .tp_vectorcall_offset = offsetof(Hook, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = hook_get,
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_repr = (reprfunc)hook_repr,
    .tp_getset = hook_getset,
};

static Hook *
hook_new(const char *name, vectorcallfunc call, PyObject *const *refs, int n)
{
    Hook *h = PyObject_GC_New(Hook, &HookType);
    if (h == NULL)
        return NULL;
    h->vectorcall = call;
    h->has_mark = 0;
    h->events = 0;
    for (int i = 0; i < NREFS; i++)
        h->refs[i] = i < n ? Py_NewRef(refs[i]) : NULL;
    h->name = PyUnicode_FromString(name);
    PyObject_GC_Track(h);
    if (h->name == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

static PyObject *
make_connect(PyObject *module, PyObject *args)
{
    PyObject *refs[7];
    if (!PyArg_ParseTuple(args, "OOOOO!OO:connect", &refs[0], &refs[1], &refs[2], &refs[3],
                          &PyDict_Type, &refs[4], &refs[5], &refs[6]))
        return NULL;
    Hook *h = hook_new("connect", connect_call, refs, 7);
    if (h == NULL)
        return NULL;
    if (PyObject_GetBuffer(refs[6], &h->mark, PyBUF_SIMPLE) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    h->has_mark = 1;
    if (h->mark.len < 1) {
        Py_DECREF(h);
        PyErr_SetString(PyExc_ValueError, "the fork mark must hold a byte");
        return NULL;
    }
    return (PyObject *)h;
}

/* Where instances of cls keep the slot `name` (an object slot of cls itself). */
static int
slot_offset(PyObject *cls, const char *name, Py_ssize_t *out)
{
    PyObject *descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, name);
    if (descr == NULL || !PyObject_TypeCheck(descr, &PyMemberDescr_Type)
        || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%R has no object slot %s", cls, name);
        return -1;
    }
    *out = ((PyMemberDescrObject *)descr)->d_member->offset;
    return 0;
}

static PyObject *
make_do_get(PyObject *module, PyObject *args)
{
    PyObject *refs[6];
    int events;
    if (!PyArg_ParseTuple(args, "OOOOO!O!i:do_get", &refs[0], &refs[1], &refs[2], &refs[3],
                          &PyDict_Type, &refs[4], &PyType_Type, &refs[5], &events))
        return NULL;
    Hook *h = hook_new("_do_get", do_get_call, refs, 6);
    if (h == NULL)
        return NULL;
    h->events = (short)events;
    if (slot_offset(refs[5], "last", &h->off_last) < 0
        || slot_offset(refs[5], "threshold", &h->off_threshold) < 0
        || slot_offset(refs[5], "fd", &h->off_fd) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return (PyObject *)h;
}

/* -- a tracked dialect's _has_events ---------------------------------------------------- */
/* 1 if an exception is being handled in this thread (sys.exception() is not None), else 0 */
static int
handling_exception(void)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *exc = PyErr_GetHandledException();
    int handling = exc != NULL && exc != Py_None;
    Py_XDECREF(exc);
#else
    PyObject *type, *exc, *tb;
    PyErr_GetExcInfo(&type, &exc, &tb);
    int handling = exc != NULL && exc != Py_None;
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
#endif
    return handling;
}

/* 1/0 for a true/false attribute, -1 with an error set */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static PyObject *
dialect_has_events(PyObject *module, PyObject *dialect)
{
    int r = attr_true(dialect, s_user_events);  /* the application's own listeners */
    if (r == 0) {
        PyObject *base = PyObject_GetAttr((PyObject *)Py_TYPE(dialect), s_forksafe_base);
        if (base == NULL)
            return NULL;
        r = attr_true(base, s_has_events);  /* listeners on the dialect's class */
        Py_DECREF(base);
    }
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r || handling_exception());
}

static PyMethodDef methods[] = {
    {"dialect_has_events", dialect_has_events, METH_O,
     "dialect_has_events(dialect): a tracked dialect's _has_events (see _dialect_has_events "
     "in forksafe/sqlalchemy.py)."},
    {"connect", make_connect, METH_VARARGS,
     "connect(checkout, checked, base_connect, own, holds, hold_late, mark): a pool's "
     "connect() with the fork check."},
    {"do_get", make_do_get, METH_VARARGS,
     "do_get(base_do_get, finish, give_back, key, globals, state_class, events): a pool's "
     "_do_get() with the liveness check."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "forksafe._speedups",
    "A tracked engine's per-checkout and per-statement code in C (optional; see "
    "forksafe/_speedups.c).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&HookType) < 0)
        return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_pid, "pid");
    INTERN(s_forksafe_pid, "_forksafe_pid");
    INTERN(s_poll_after, "POLL_AFTER");
    INTERN(s_user_events, "_forksafe_user_events");
    INTERN(s_forksafe_base, "_forksafe_base");
    INTERN(s_has_events, "_has_events");
#undef INTERN
    return PyModule_Create(&module_def);
}
