"""The lab's backends without namespaces: certificates, STUN answers, the framing, screens."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest

from controller.lab import apps, servers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_certificates_verify_for_every_service(tmp_path: Path) -> None:
    ca, cert, key = servers._make_certificates_openssl(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    client_ctx = ssl.create_default_context(cafile=str(ca))
    for name in ("chat.signal.org", "mmg.whatsapp.net", "mtalk.google.com"):
        a, b = socket.socketpair()
        t = threading.Thread(target=lambda a=a: server_ctx.wrap_socket(a, server_side=True).recv(1))
        t.start()
        with client_ctx.wrap_socket(b, server_hostname=name) as c:
            c.send(b"x")
        t.join(5)
        a.close()
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_stun_binding_success_carries_the_mapped_address() -> None:
    txid = os.urandom(12)
    req = struct.pack("!HHI", 0x0001, 0, servers.STUN_MAGIC) + txid
    resp = servers.stun_response(req, ("100.64.0.2", 40000))
    assert resp is not None and resp[:2] == b"\x01\x01" and resp[8:20] == txid
    _t, _l, _z, fam, xport, xip = struct.unpack("!HHBBHI", resp[20:32])
    assert fam == 1 and xport ^ (servers.STUN_MAGIC >> 16) == 40000
    assert socket.inet_ntoa(struct.pack("!I", xip ^ servers.STUN_MAGIC)) == "100.64.0.2"
    assert servers.stun_response(b"\x80" + os.urandom(40), ("1.2.3.4", 1)) is None


def test_dns_query_and_answer_parsing() -> None:
    q = apps.dns_query("chat.signal.org", 0x1234)
    answer = (
        q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:]
        + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("76.223.92.165")
    )  # fmt: skip
    assert apps.parse_a_records(answer, 0x1234) == ["76.223.92.165"]
    assert apps.parse_a_records(answer, 0x9999) == []
