"""``_sockets.open_in_parent``: a socket the parent still holds reads True in a child; one
the process made itself never does (real sockets, a real fork)."""

from __future__ import annotations

import os
import socket

from forksafe import _sockets
from tests.forking import run_in_child


def test_a_socket_of_this_process_is_not_its_parents() -> None:
    with socket.socket() as own:
        assert _sockets.open_in_parent(own.fileno()) is False


def test_in_a_child_the_parents_socket_reads_as_inherited_and_a_new_one_does_not() -> None:
    inherited_a, inherited_b = socket.socketpair()
    read_end, write_end = os.pipe()

    def child() -> dict[str, bool]:
        with socket.socket() as own:
            return {
                "inherited": _sockets.open_in_parent(inherited_a.fileno()),
                "own": _sockets.open_in_parent(own.fileno()),
                "not_a_socket": _sockets.open_in_parent(read_end),
            }

    try:
        found = run_in_child(child)
    finally:
        for end in (read_end, write_end):
            os.close(end)
        inherited_a.close()
        inherited_b.close()
    assert found == {"inherited": True, "own": False, "not_a_socket": False}
