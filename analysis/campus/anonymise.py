"""Keyed prefix-preserving address anonymisation (Crypto-PAn) for campus captures.

The construction of Xu, Fan, Ammar and Moon (ICNP 2002), as in the reference
implementation: a 32-byte key is a 16-byte AES-128 key and 16 bytes whose AES
encryption is the *pad*. For bit position ``i`` the first ``i`` bits of the address,
followed by the pad's remaining bits, are encrypted; the first bit of the ciphertext
is XORed onto bit ``i`` of the address. Two addresses sharing a k-bit prefix map to
two addresses sharing a k-bit prefix, and the mapping depends on nothing but the key,
so every file, process and machine holding the same key agrees. IPv6 works the same
over 128 bits (as the common Go/Python extensions do).

Speed: all distinct addresses of a chunk go through AES together, one ECB call per bit
position, and results are cached per process (campus traffic repeats addresses).

MAC addresses never reach this module: the flow core keeps no link-layer addresses,
and payload bytes are kept only when asked for, which campus ingest never does.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import numpy as np

from analysis.errors import BadInputError, OutputError

KEY_BYTES = 32
_CACHE_LIMIT = 1 << 20  # distinct addresses remembered per process


def generate_key(path: str | os.PathLike[str]) -> Path:
    """Write a new random 32-byte key as hex to ``path`` with mode 0600 (never overwrites)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadInputError(f"{path} exists", "keys are never overwritten; remove it first") from None
    except OSError as err:
        raise OutputError(f"cannot create {path}: {err.strerror or err}") from err
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(path, 0o600)
    return path


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte key of a key file (raw bytes or hex); the key itself is never printed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"no such key file: {path}",
                            "create one with: flowtruth campus keygen FILE") from None
    except OSError as err:
        raise BadInputError(f"cannot read key file {path}: {err.strerror or err}") from err
    if len(raw) == KEY_BYTES:
        key = raw
    else:
        text = raw.strip()
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise BadInputError(f"{path}: not a Crypto-PAn key",
                                "a key file holds 32 raw bytes or 64 hex digits")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # a readable key undoes the anonymisation; say so without refusing
        import warnings

        warnings.warn(f"key file {path} is readable by group or others (chmod 600 it)",
                      stacklevel=2)
    return key


class CryptoPAn:
    """Prefix-preserving anonymisation of IPv4 and IPv6 addresses under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise BadInputError("a Crypto-PAn key has 32 bytes")
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._cipher = Cipher(algorithms.AES(bytes(key[:16])), modes.ECB())
        enc = self._cipher.encryptor()
        pad = enc.update(bytes(key[16:])) + enc.finalize()
        self._pad = int.from_bytes(pad, "big")  # 128-bit pad
        self._pad_bytes = np.frombuffer(pad, dtype=np.uint8)
        self._cache: dict[bytes, bytes] = {}

    def __repr__(self) -> str:  # never show the key
        return "CryptoPAn(<key hidden>)"

    def __getstate__(self):  # picklable for worker processes without exposing the object
        raise TypeError("CryptoPAn objects are not pickled; pass the key file path")

    def _first_bits(self, blocks: np.ndarray) -> np.ndarray:
        """The first ciphertext bit of each 16-byte row of ``blocks``."""
        enc = self._cipher.encryptor()
        out = np.frombuffer(enc.update(blocks.tobytes()), dtype=np.uint8)
        return out[0::16] >> 7

    def anonymise_v4(self, addrs: np.ndarray) -> np.ndarray:
        """Anonymised IPv4 addresses of a uint32 array (host order values)."""
        a = np.asarray(addrs, dtype=np.uint32)
        n = len(a)
        if n == 0:
            return a.copy()
        pad_hi = np.uint32(self._pad >> 96)
        blocks = np.empty((n, 16), dtype=np.uint8)
        blocks[:, 4:] = self._pad_bytes[4:]
        flips = np.zeros(n, dtype=np.uint32)
        for i in range(32):
            mask = np.uint32(0) if i == 0 else np.uint32((0xFFFFFFFF << (32 - i)) & 0xFFFFFFFF)
            word = (a & mask) | (pad_hi & ~mask)
            blocks[:, :4] = word.astype(">u4").view(np.uint8).reshape(n, 4)
            flips |= self._first_bits(blocks).astype(np.uint32) << np.uint32(31 - i)
        return a ^ flips

    def anonymise_v6(self, addrs: np.ndarray) -> np.ndarray:
        """Anonymised IPv6 addresses of an (n, 16) uint8 array (network order)."""
        a = np.asarray(addrs, dtype=np.uint8).reshape(-1, 16)
        n = len(a)
        if n == 0:
            return a.copy()
        bits = np.unpackbits(a, axis=1)  # (n, 128), most significant first
        pad_bits = np.unpackbits(self._pad_bytes)
        work = np.empty_like(bits)
        flips = np.zeros_like(bits)
        for i in range(128):
            work[:, :i] = bits[:, :i]
            work[:, i:] = pad_bits[i:]
            flips[:, i] = self._first_bits(np.packbits(work, axis=1))
        return np.packbits(bits ^ flips, axis=1)

    def anonymise_slots(self, slots: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Anonymise (n, 16) address slots as the flow table holds them (IPv4 in bytes 0-3).

        Each distinct (version, address) is computed once and remembered.
        """
        slots = np.ascontiguousarray(slots, dtype=np.uint8).reshape(-1, 16)
        n = len(slots)
        out = np.zeros_like(slots)
        if n == 0:
            return out
        ver = np.asarray(versions, dtype=np.uint8).reshape(n, 1)
        keyed = np.ascontiguousarray(np.hstack([ver, slots]))
        keys = keyed.view(np.dtype((np.void, 17))).ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        uniq_raw = uniq.view(np.uint8).reshape(-1, 17)
        result = np.zeros((len(uniq), 16), dtype=np.uint8)
        todo = []
        cache = self._cache
        for j, u in enumerate(bytes(x) for x in uniq):
            hit = cache.get(u)
            if hit is None:
                todo.append(j)
            else:
                result[j] = np.frombuffer(hit, dtype=np.uint8)
        if todo:
            idx = np.asarray(todo, dtype=np.int64)
            raw = uniq_raw[idx]
            v4 = raw[:, 0] == 4
            if v4.any():
                words = raw[v4, 1:5].copy().view(">u4").ravel().astype(np.uint32)
                anon = self.anonymise_v4(words).astype(">u4").view(np.uint8).reshape(-1, 4)
                part = np.zeros((len(anon), 16), dtype=np.uint8)
                part[:, :4] = anon
                result[idx[v4]] = part
            if (~v4).any():
                result[idx[~v4]] = self.anonymise_v6(raw[~v4, 1:17])
            if len(cache) + len(idx) > _CACHE_LIMIT:
                cache.clear()
            for j in idx.tolist():
                cache[bytes(uniq[j])] = result[j].tobytes()
        return result[inverse.ravel()]

    def anonymise_text(self, address: str) -> str:
        """One address in text form (for tests and look-ups by an analyst who holds the key)."""
        import ipaddress

        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            return str(ipaddress.IPv4Address(int(self.anonymise_v4(np.array([int(ip)]))[0])))
        arr = np.frombuffer(ip.packed, dtype=np.uint8).reshape(1, 16)
        return str(ipaddress.IPv6Address(self.anonymise_v6(arr)[0].tobytes()))


def anonymise_table(table, cpan: CryptoPAn) -> None:
    """Replace a FlowTable's src/dst addresses by their anonymised forms, in place."""
    n = len(table)
    if n == 0:
        return
    fl = table.flows
    both = np.concatenate([fl["src_addr"], fl["dst_addr"]])
    ver = np.concatenate([fl["ip_version"], fl["ip_version"]])
    anon = cpan.anonymise_slots(both, ver)
    fl["src_addr"] = anon[:n]
    fl["dst_addr"] = anon[n:]
