"""The lab's "internet": backends standing in for the apps' servers, and their DNS names.

Everything here runs inside the lab's internet namespace (``ftl-<id>-inet``), where the
addresses of :data:`SERVICES` live on a dummy interface, so they exist nowhere else:

- TLS on 443 (Signal chat and CDN, WhatsApp media, Google, Wikipedia) and 5228 (Google
  push), with a certificate from a lab CA made at ``lab up`` (:func:`make_certificates`);
- plain TCP on 443/80/5222 for Telegram's MTProto-style transport (addresses
  149.154.167.0/24 and 91.108.56.0/24) and WhatsApp's Noise-style chat (``g.whatsapp.net``);
- UDP relays for calls on 3478 and 596: STUN binding requests get a binding success
  with XOR-MAPPED-ADDRESS, every other datagram is reflected (an RTP-like relay);
- a DNS server (dnsmasq on 8.8.8.8, started by the topology) answering :data:`SERVICES`.

The framing inside every TCP connection (TLS or not) is the lab's own: the client sends
``u32 length, u32 reply_length, payload`` and the server answers with ``u32 length`` and
``reply_length`` random bytes, so the client decides the shape of the whole exchange.
Telegram clients first send a 64-byte obfuscation header, which the server skips.

``python -m controller.lab.servers --cert C --key K`` serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import os
import signal
import socket
import ssl
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

DNS_SERVER = "8.8.8.8"
"""The public resolver the AP's dnsmasq forwards to (lives in the internet namespace)."""

TCP_PORTS = (80, 443, 5222, 5228)
UDP_PORTS = (596, 3478)
FRAME = struct.Struct("!II")
MAX_FRAME = 4 * 1024 * 1024
TELEGRAM_NETS = (
    ipaddress.ip_network("149.154.160.0/20"),
    ipaddress.ip_network("91.108.0.0/16"),
    ipaddress.ip_network("2001:67c:4e8::/48"),
)
TELEGRAM_DC2_V6 = "2001:67c:4e8:f004::a"
"""Telegram's DC 2 over IPv6: the one lab service reached without NAT, as IPv6 is routed."""
PLAIN_TCP_HOSTS = {"157.240.0.53"}  # g.whatsapp.net: WhatsApp's chat is Noise over TCP, not TLS
STUN_MAGIC = 0x2112A442


@dataclass(frozen=True, slots=True)
class Service:
    """One backend name and the address it resolves to in the lab."""

    name: str
    ip: str
    app: str
    role: str


SERVICES: tuple[Service, ...] = (
    Service("chat.signal.org", "76.223.92.165", "org.thoughtcrime.securesms", "chat"),
    Service("cdn2.signal.org", "104.18.28.35", "org.thoughtcrime.securesms", "media"),
    Service("turn3.voip.signal.org", "3.121.83.105", "org.thoughtcrime.securesms", "relay"),
    Service("g.whatsapp.net", "157.240.0.53", "com.whatsapp", "chat"),
    Service("mmg.whatsapp.net", "157.240.0.60", "com.whatsapp", "media"),
    Service("relay.whatsapp.net", "157.240.0.62", "com.whatsapp", "relay"),
    Service("venus.web.telegram.org", "149.154.167.50", "org.telegram.messenger", "chat"),
    Service("pluto.web.telegram.org", "149.154.167.51", "org.telegram.messenger", "media"),
    Service("reflector.telegram.org", "91.108.56.130", "org.telegram.messenger", "relay"),
    Service("mtalk.google.com", "142.250.27.188", "com.google.android.gms", "push"),
    Service("www.google.com", "142.250.180.4", "com.android.chrome", "web"),
    Service("www.wikipedia.org", "185.15.59.224", "com.android.chrome", "web"),
)


def service(app: str, role: str) -> Service:
    """The first service of ``app`` with ``role``."""
    for s in SERVICES:
        if s.app == app and s.role == role:
            return s
    raise KeyError(f"{app}/{role}")


def server_addresses() -> list[str]:
    """Every IPv4 address the internet namespace must hold: the services and the DNS server."""
    return sorted({s.ip for s in SERVICES} | {DNS_SERVER})


def server_addresses_v6() -> list[str]:
    """The IPv6 addresses the internet namespace holds."""
    return [TELEGRAM_DC2_V6]


def dnsmasq_lines() -> list[str]:
    """``address=/name/ip`` lines for the internet's DNS server."""
    return [f"address=/{s.name}/{s.ip}" for s in SERVICES]


def make_certificates(out_dir: Path) -> tuple[Path, Path, Path]:
    """Write a lab CA and a server certificate for every service name; (ca, cert, key).

    Uses the ``cryptography`` package when installed, else the ``openssl`` command.
    """
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _make_certificates_openssl(out_dir)
    return _make_certificates_cryptography(out_dir)


def _make_certificates_openssl(out_dir: Path) -> tuple[Path, Path, Path]:
    import shutil
    import subprocess

    from controller.errors import LabError

    openssl = shutil.which("openssl")
    if openssl is None:
        raise LabError(
            "the lab's TLS certificates need the openssl command or the cryptography package",
            hint="apt-get install openssl",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca = out_dir / "ca.key", out_dir / "ca.pem"
    key, csr, cert = out_dir / "server.key", out_dir / "server.csr", out_dir / "server.pem"
    ext = out_dir / "server.ext"
    sans = [f"DNS:{s.name}" for s in SERVICES]
    sans += [f"IP:{ip}" for ip in sorted({s.ip for s in SERVICES}) + server_addresses_v6()]
    ext.write_text("subjectAltName=" + ",".join(sans) + "\n")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca), "-days",
         "30", "-subj", "/CN=flowtruth lab CA", "-addext",
         "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
         "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *curve, "-keyout", str(key), "-out", str(csr), "-subj",
         "/CN=flowtruth lab"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "30", "-extfile", str(ext)],
    ]  # fmt: skip
    for argv in steps:
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise LabError(f"openssl {argv[1]} failed: {res.stderr.strip()[-300:]}")
    os.chmod(key, 0o600)
    os.chmod(ca_key, 0o600)
    os.chmod(ca, 0o644)
    return ca, cert, key


def _make_certificates_cryptography(out_dir: Path) -> tuple[Path, Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowtruth lab CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(s.name) for s in SERVICES]
    sans += [x509.IPAddress(ipaddress.ip_address(s.ip)) for s in SERVICES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_addresses_v6()]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowtruth lab")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        out_dir / "ca.pem",
        out_dir / "server.pem",
        out_dir / "server.key",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    os.chmod(ca_path, 0o644)
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------- server side


def _is_plain(local_ip: str, port: int) -> bool:
    if port in (80, 5222) or local_ip in PLAIN_TCP_HOSTS:
        return True
    addr = ipaddress.ip_address(local_ip)
    return any(addr in net for net in TELEGRAM_NETS)


def _is_telegram(local_ip: str) -> bool:
    addr = ipaddress.ip_address(local_ip)
    return any(addr in net for net in TELEGRAM_NETS)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, skip: int) -> None:
    if skip:
        await reader.readexactly(skip)
    while True:
        head = await reader.readexactly(FRAME.size)
        length, reply = FRAME.unpack(head)
        if length > MAX_FRAME or reply > MAX_FRAME:
            return
        if length:
            await reader.readexactly(length)
        if reply:
            writer.write(FRAME.pack(reply, 0) + os.urandom(reply))
            await writer.drain()


async def _serve_tcp(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext, port: int
) -> None:
    sock = writer.get_extra_info("socket")
    local_ip = sock.getsockname()[0]
    try:
        if not _is_plain(local_ip, port):
            await writer.start_tls(ctx)
        await _exchange(reader, writer, 64 if _is_telegram(local_ip) else 0)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError, OSError):
            pass


def stun_response(request: bytes, addr: tuple[str, int]) -> bytes | None:
    """A STUN binding success for a binding request (RFC 5389), None for anything else."""
    if len(request) < 20 or request[0:2] != b"\x00\x01":
        return None
    if struct.unpack("!I", request[4:8])[0] != STUN_MAGIC:
        return None
    txid = request[8:20]
    ip = int(ipaddress.IPv4Address(addr[0])) ^ STUN_MAGIC
    port = addr[1] ^ (STUN_MAGIC >> 16)
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, port, ip)
    return struct.pack("!HHI", 0x0101, len(attr), STUN_MAGIC) + txid + attr


class _Relay(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = stun_response(data, addr)
        self.transport.sendto(reply if reply is not None else data, addr)  # type: ignore[attr-defined]


async def serve(cert: Path, key: Path, stop: asyncio.Event) -> None:
    """Listen on every lab port of every address until ``stop`` is set."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    loop = asyncio.get_running_loop()
    servers = []
    for port in TCP_PORTS:
        servers.append(
            await asyncio.start_server(
                functools.partial(_serve_tcp, ctx=ctx, port=port),
                None,  # every address, IPv4 and IPv6 (asyncio sets IPV6_V6ONLY)
                port,
                reuse_address=True,
            )
        )
    transports = []
    # One UDP socket per address: a wildcard socket would answer from the uplink's
    # address, which the AP's NAT does not map back to the phone.
    for ip in sorted({s.ip for s in SERVICES}) + server_addresses_v6():
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        for port in UDP_PORTS:
            t, _ = await loop.create_datagram_endpoint(_Relay, local_addr=(ip, port), family=family)
            transports.append(t)
    print("serving", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    for t in transports:
        t.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.lab.servers``: serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m controller.lab.servers")
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signo, stop.set)
        await serve(args.cert, args.key, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"servers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
