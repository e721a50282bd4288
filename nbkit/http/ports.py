"""Local TCP ports: is one free to listen on? (Used before starting a replica or an endpoint.)"""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """True if a TCP server could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
