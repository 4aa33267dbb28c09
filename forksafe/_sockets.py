"""Neutralising an inherited socket so that no byte can reach the parent's session.

After ``fork()`` the child holds a copy of every file descriptor of the parent. A driver
object in the child that still points at such a descriptor will, sooner or later, write to
it: ``close()`` sends COM_QUIT (MySQL) or Terminate (PostgreSQL), mysqlclient's destructor
calls ``mysql_close()`` with no pid check, a half-finished query is rolled back. Each of
those bytes lands in the *parent's* server session.

The fix is to make the descriptor number point at something else, atomically, in the child
only: ``os.dup2()`` of a fresh, never-connected socket of the same family and type onto the
inherited number. From then on:

* every write by the driver fails at once (``ENOTCONN`` / ``EPIPE``), so the driver reports
  a disconnect (mysqlclient 2006, PyMySQL ``InterfaceError``, psycopg "not connected");
* the driver's own ``close()`` closes *our* dummy socket, so no descriptor leaks;
* the parent's socket is untouched: its kernel object is still open in the parent.

``os.close(fd)`` alone is not enough: the number could be reused by another file opened in
the child, which the driver would then write into or close.
"""

from __future__ import annotations

import _socket
import os
import stat

__all__ = ["neutralise_fd", "open_in_parent", "socket_identity"]

# (pid, ppid) -> identities of the sockets the parent held when this process first asked
_PARENT_SOCKETS: dict[tuple[int, int], frozenset[tuple[int, int]]] = {}
#: Parents with more descriptors than this are not listed (the check is skipped).
_MAX_PARENT_FDS = 65536


def socket_identity(fd: int) -> tuple[int, int] | None:
    """The identity (``st_dev``, ``st_ino``) of the socket behind ``fd``; None if ``fd`` is
    not an open socket.

    A descriptor *number* can be reused: once the driver's socket is closed (a server that
    went away, say) the next ``socket()``/``pipe()``/``open()`` gets the same number. The
    identity tells the connection's own socket from whatever took its number since.
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return (st.st_dev, st.st_ino)


def open_in_parent(fd: int) -> bool:
    """Whether the socket behind ``fd`` is also open in this process's parent: a socket
    inherited across ``fork()`` that the parent still uses (a connection forksafe did not
    know of at the fork, tracked only now, in the child).

    Reads ``/proc/<ppid>/fd`` once per process (the sockets a child inherited were in the
    parent before the fork; any it opened later cannot be in the child). False wherever
    that cannot be read (not Linux, another user's parent, an exited parent), which is what
    forksafe assumed before it asked: never a false True, so a socket of this process's own
    is never taken for its parent's.
    """
    identity = socket_identity(fd)
    if identity is None:
        return False
    key = (os.getpid(), os.getppid())
    held = _PARENT_SOCKETS.get(key)
    if held is None:
        held = _PARENT_SOCKETS[key] = _sockets_of(key[1])
    return identity in held


def _sockets_of(pid: int) -> frozenset[tuple[int, int]]:
    """Identities of the sockets process ``pid`` has open (empty if that cannot be read)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return frozenset()
    if len(names) > _MAX_PARENT_FDS:
        return frozenset()
    found = set()
    for name in names:
        try:
            st = os.stat(f"{base}/{name}")
        except OSError:  # closed meanwhile
            continue
        if stat.S_ISSOCK(st.st_mode):
            found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def neutralise_fd(fd: int) -> bool:
    """Replace the socket behind ``fd`` with a fresh, unconnected one of the same kind.

    Args:
        fd: a descriptor number inherited from the parent process.

    Returns:
        True if the descriptor was a socket and now points at a dummy; False if ``fd`` is not
        an open socket (already closed, or reused for something that is not ours).

    Raises:
        OSError: only for unexpected failures of ``dup2`` itself; callers at fork time catch it.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if not stat.S_ISSOCK(mode):
        return False
    # The C socket type, not socket.socket: this runs in every forked worker, and the
    # Python layer's enum conversions would touch (copy) pages of the parent's memory for
    # nothing (about 130 KiB per worker of the preloaded Flask example).
    probe = _socket.socket(fileno=fd)  # reads family and type from the kernel
    try:
        family, kind = probe.family, probe.type
    finally:
        probe.detach()  # never close the inherited descriptor through the probe
    dummy = _socket.socket(family, kind)
    try:
        os.dup2(dummy.fileno(), fd, inheritable=False)
    finally:
        dummy.close()
    return True
