"""AES-256-GCM on 4 MiB blocks: a ctypes binding to the system libcrypto against ``cryptography``.

    python -m bench.aead [--seconds 1.0] [--reps 3] [--json]

Decides issue 10's question for ``transport/blocks/aead.py``: keep the ctypes
binding (written because ``AESGCM`` was measured to hold the GIL) or use
``cryptography``. For each back end it measures, interleaved over ``--reps``
repetitions so machine noise spreads evenly (medians reported):

* encrypt and decrypt throughput in MB/s (10^6 bytes/s of plaintext) with 1
  and 2 threads, each thread looping over its own 4 MiB block;
* whether the back end releases the GIL: a pure-Python busy loop on the main
  thread runs while 2 threads encrypt. Reported: the share of the loop's wall
  time it spent blocked (neither on a CPU nor queued for one, from Linux
  ``/proc/self/task/TID/schedstat``), which for a busy loop can only be
  waiting for the GIL, so it does not depend on how loaded the machine is;
  also its iteration rate as a share of its rate alone and its longest stall.
  A control that holds the GIL (``bytes.count`` over 4 MiB, a C loop that
  never releases it) shows what starvation looks like in the same run.

Back ends: ``ctypes`` (EVP_* from libcrypto.so.3 via ctypes, the binding this
replaces), ``AESGCM.encrypt`` (allocates its output), ``AESGCM.encrypt_into``
(writes into a caller's buffer, cryptography >= 46). Only CPU work, no files,
no network. Last, the envelope's per-block encode (BLAKE3 nonce + AES-GCM, what
the client runs per block) with each AES-GCM, 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from cryptography.hazmat.backends.openssl.backend import backend as _backend
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 4 << 20
TAG = 16
AAD = bytes(45)  # the envelope's AAD length (header digest, index, length, last flag)


class CtypesGcm:
    """The measured alternative: AES-256-GCM through EVP_* calls on the system libcrypto."""

    def __init__(self, key: bytes) -> None:
        lib = ctypes.CDLL("libcrypto.so.3")
        vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)
        lib.EVP_aes_256_gcm.restype = vp
        lib.EVP_CIPHER_CTX_new.restype = vp
        lib.EVP_CIPHER_CTX_free.argtypes = [vp]
        lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp]
        for d in ("Encrypt", "Decrypt"):
            getattr(lib, f"EVP_{d}Init_ex").argtypes = [vp, vp, vp, cp, cp]
            getattr(lib, f"EVP_{d}Update").argtypes = [vp, vp, ip, vp, ctypes.c_int]
            getattr(lib, f"EVP_{d}Final_ex").argtypes = [vp, vp, ip]
        lib.OpenSSL_version.restype = ctypes.c_char_p
        self.version = lib.OpenSSL_version(0).decode()
        self.lib, self.key = lib, key

    def _run(self, enc: bool, nonce: bytes, src: bytes, aad: bytes, dst: bytearray) -> None:
        lib, d = self.lib, "Encrypt" if enc else "Decrypt"
        n = len(src) - (0 if enc else TAG)
        ctx = lib.EVP_CIPHER_CTX_new()
        try:
            outl = ctypes.c_int(0)
            ok = getattr(lib, f"EVP_{d}Init_ex")(ctx, lib.EVP_aes_256_gcm(), None, None, None)
            ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, 0x9, 12, None)
            ok &= getattr(lib, f"EVP_{d}Init_ex")(ctx, None, None, self.key, nonce)
            ok &= getattr(lib, f"EVP_{d}Update")(ctx, None, ctypes.byref(outl), aad, len(aad))
            out = (ctypes.c_char * len(dst)).from_buffer(dst)
            ok &= getattr(lib, f"EVP_{d}Update")(ctx, out, ctypes.byref(outl), src, n)
            if enc:
                ok &= lib.EVP_EncryptFinal_ex(ctx, None, ctypes.byref(outl))
                ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, 0x10, TAG, ctypes.addressof(out) + n)
            else:
                tag = ctypes.create_string_buffer(src[n:], TAG)
                ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, 0x11, TAG, tag)
                ok &= lib.EVP_DecryptFinal_ex(ctx, None, ctypes.byref(outl))
            if ok != 1:
                raise RuntimeError("OpenSSL AES-GCM failed")
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)

    def encrypt_into(self, nonce: bytes, data: bytes, aad: bytes, buf: bytearray) -> None:
        self._run(True, nonce, data, aad, buf)

    def decrypt_into(self, nonce: bytes, data: bytes, aad: bytes, buf: bytearray) -> None:
        self._run(False, nonce, data, aad, buf)


Op = Callable[[], object]


BACKENDS = ("ctypes", "AESGCM.encrypt", "AESGCM.encrypt_into")


def make_ops(key: bytes) -> Callable[[str], tuple[Op, Op]]:
    """``pair(backend)``: (encrypt, decrypt) closures over one 4 MiB block, with their own
    output buffers (one pair per thread). Checks first that all back ends agree."""
    nonce, plain = os.urandom(12), os.urandom(BLOCK)
    g, c = AESGCM(key), CtypesGcm(key)
    sealed = g.encrypt(nonce, plain, AAD)

    def pair(name: str) -> tuple[Op, Op]:
        enc_buf, dec_buf = bytearray(BLOCK + TAG), bytearray(BLOCK)
        if name == "ctypes":
            return (lambda: c.encrypt_into(nonce, plain, AAD, enc_buf),
                    lambda: c.decrypt_into(nonce, sealed, AAD, dec_buf))
        if name == "AESGCM.encrypt":
            return (lambda: g.encrypt(nonce, plain, AAD), lambda: g.decrypt(nonce, sealed, AAD))
        return (lambda: g.encrypt_into(nonce, plain, AAD, enc_buf),
                lambda: g.decrypt_into(nonce, sealed, AAD, dec_buf))

    check, opened = bytearray(BLOCK + TAG), bytearray(BLOCK)
    c.encrypt_into(nonce, plain, AAD, check)
    c.decrypt_into(nonce, sealed, AAD, opened)
    assert bytes(check) == sealed and opened == plain, "ctypes and cryptography disagree"
    return pair


class _CtypesAead:
    """``transport.blocks.aead.AesGcm``'s interface over ``CtypesGcm`` (encrypt only)."""

    def __init__(self, key: bytes) -> None:
        self.gcm = CtypesGcm(key)

    def encrypt_into(self, out: bytearray, offset: int, nonce: bytes, plain: Any,
                     aad: bytes) -> None:
        window = bytearray(len(plain) + TAG)
        self.gcm.encrypt_into(nonce, bytes(plain), aad, window)
        out[offset:offset + len(window)] = window


def envelope_op(backend: str) -> Op:
    """Encode one 4 MiB block of an envelope (BLAKE3 synthetic nonce, then AES-GCM), as the
    client does per block, with the AES-GCM of ``backend``."""
    from transport.blocks.envelope import EnvelopeTransform
    from transport.blocks.kdf import KdfParams

    t = EnvelopeTransform.for_upload("bench", BLOCK, BLOCK, KdfParams(64, 1, 1))
    if backend == "ctypes":
        t._aead = _CtypesAead(t._key.enc_key)  # type: ignore[assignment]
    plain = os.urandom(BLOCK)
    return lambda: t.encode(0, plain)


def throughput(factory: Callable[[], Op], threads: int, seconds: float) -> float:
    """MB/s of plaintext for ``threads`` threads each looping ``factory()`` for ``seconds``."""
    stop = threading.Event()
    counts = [0] * threads

    def worker(i: int) -> None:
        op = factory()
        while not stop.is_set():
            op()
            counts[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) * BLOCK / (time.perf_counter() - t0) / 1e6


def _schedstat() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread, from
    Linux's /proc/.../schedstat (fields 1 and 2, ns); None where it does not exist."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def busy_loop(seconds: float) -> dict[str, float]:
    """A pure-Python loop for ``seconds``: its iteration rate, the longest gap between two
    iterations, and the share of the wall time it spent blocked, i.e. neither running nor
    waiting for a CPU: waiting for the GIL, the only thing this loop can block on."""
    now = time.perf_counter
    before = _schedstat()
    start = last = now()
    end = start + seconds
    n, longest = 0, 0.0
    while last < end:
        t = now()
        longest = max(longest, t - last)
        last = t
        n += 1
    after = _schedstat()
    wall = last - start
    r = {"rate": n / wall, "gap_max_ms": longest * 1e3, "gil_wait_share": float("nan")}
    if before and after:
        r["gil_wait_share"] = max(0.0, wall - (after[0] - before[0]) - (after[1] - before[1])) / wall
    return r


def starvation(factory: Callable[[], Op], seconds: float) -> dict[str, float]:
    """How a busy loop on the main thread fares while 2 threads run ``factory()`` ops."""
    alone = busy_loop(seconds / 2)["rate"]
    stop = threading.Event()
    done = [0, 0]

    def worker(i: int) -> None:
        op = factory()
        while not stop.is_set():
            op()
            done[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    loop = busy_loop(seconds)
    stop.set()
    for t in ts:
        t.join()
    mbps = sum(done) * BLOCK / (time.perf_counter() - t0) / 1e6
    return {"gil_wait_share": loop["gil_wait_share"], "loop_share": loop["rate"] / alone,
            "gap_max_ms": loop["gap_max_ms"], "mbps_beside_loop": mbps}


def _side(pair: Callable[[str], tuple[Op, Op]], backend: str, i: int) -> Op:
    return pair(backend)[i]


def run(seconds: float, reps: int) -> dict[str, Any]:
    key = os.urandom(32)
    pair = make_ops(key)
    data = os.urandom(BLOCK)
    control: tuple[str, Callable[[], Op]] = (
        "holds GIL: bytes.count", lambda: partial(data.count, b"\x00\x01\x02\x03"))
    samples: dict[str, list[float]] = {}
    gil: dict[str, list[dict[str, float]]] = {}
    for _ in range(reps):
        for name in BACKENDS:
            for threads in (1, 2):
                for i, op in enumerate(("encrypt", "decrypt")):
                    samples.setdefault(f"{name} {op} x{threads}", []).append(
                        throughput(partial(_side, pair, name, i), threads, seconds))
            gil.setdefault(name, []).append(starvation(partial(_side, pair, name, 0), seconds))
        for name in ("ctypes", "AESGCM"):
            for threads in (1, 2):
                samples.setdefault(f"envelope encode, {name} x{threads}", []).append(
                    throughput(partial(envelope_op, name), threads, seconds))
        gil.setdefault(control[0], []).append(starvation(control[1], seconds))
    return {
        "block_bytes": BLOCK,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "openssl_system": CtypesGcm(key).version,
        "openssl_cryptography": _backend.openssl_version_text(),
        "mbps": {k: round(statistics.median(v)) for k, v in samples.items()},
        "gil": {k: {m: round(statistics.median(s[m] for s in v), 3) for m in v[0]}
                for k, v in gil.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.aead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.seconds <= 0:
        ap.error("--reps must be at least 1 and --seconds positive")
    r = run(a.seconds, a.reps)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['cpus']} CPUs, load {r['load_avg_1m']:.1f}; system {r['openssl_system']}; "
          f"cryptography bundles {r['openssl_cryptography']}; 4 MiB blocks, MB/s (median)")
    for k, v in r["mbps"].items():
        print(f"  {k:34} {v:6d}")
    print("Busy loop on the main thread while 2 threads encrypt (median):")
    print(f"  {'':24} {'GIL wait':>9} {'loop rate':>10} {'gap max ms':>10} {'MB/s':>6}")
    for k, g in r["gil"].items():
        print(f"  {k:24} {g['gil_wait_share']:9.0%} {g['loop_share']:10.0%} "
              f"{g['gap_max_ms']:10.1f} {g['mbps_beside_loop']:6.0f}")
    print("  GIL wait: share of the loop's wall time blocked on the GIL (not running, not queued")
    print("  for a CPU; Linux schedstat). Loop rate: its iteration rate as a share of alone.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
