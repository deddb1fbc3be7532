"""The TLS pump (fallback.tlspump.move) hands the loop the client's end of stream even
when the last read brought data and the end together: it once shut the plaintext side
only after a read that found nothing, so a client killed with data in flight left its
stream open on the daemon for ever (a re-run then got 'another transfer is writing')."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from fallback.tls import ensure_self_signed, server_ssl_context
from fallback.tlspump import move


def test_data_then_eof_in_one_read_reaches_the_loop(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, hostnames=("localhost",), ips=("127.0.0.1",))
    server_ctx = server_ssl_context(cert, key)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ours, theirs = socket.socketpair()
    done = threading.Event()

    def pump() -> None:
        raw, _ = listener.accept()
        tls = server_ctx.wrap_socket(raw, server_side=True)
        # let the client's data and its close arrive before the pump reads at all, so one
        # read returns the bytes and the next, in the same pass, the end
        threading.Event().wait(0.3)
        tls.setblocking(False)
        ours.setblocking(False)
        try:
            move(tls, ours)
        finally:
            done.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        tc = client_ctx.wrap_socket(c, server_hostname="localhost")
        tc.sendall(b"x" * 5000)
        tc.close()  # no close_notify wait: the peer goes away with its data in flight
    theirs.settimeout(10)
    got = b""
    while chunk := theirs.recv(65536):  # b"" only once the pump passed the end on
        got += chunk
    assert got == b"x" * 5000
    theirs.close()  # the loop closes its end: the pump returns
    assert done.wait(10)
    listener.close()
