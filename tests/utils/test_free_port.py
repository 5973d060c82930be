"""`unimm.testing.free_port`: launcher master ports chosen by the OS, so concurrent test runs never collide."""

from __future__ import annotations

import socket

from unimm.testing import free_port


def test_free_port_can_be_bound_with_its_neighbours():
    port = free_port(consecutive=2)
    for candidate in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", candidate))  # raises if the port were taken


def test_free_port_skips_a_port_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert all(free_port() != taken for _ in range(20))
