"""UDP datagram codec, keys, sealing and the replay window (no sockets, fast)."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.exceptions import InvalidTag

from transport.errors import ProtocolError
from transport.udp import codec
from transport.udp.crypto import (
    Opener,
    ReplayWindow,
    Sealer,
    X25519Exchange,
    derive_path_keys,
    new_path_secret,
)


def test_header_layout_is_20_bytes_big_endian() -> None:
    raw = codec.encode_header(codec.DATA, 0x0102030405060708, 0x1122334455667788 >> 2)
    assert raw[:4] == bytes([0xFB, 1, codec.DATA, 0])
    assert raw[4:12] == bytes.fromhex("0102030405060708")
    assert len(raw) == codec.HEADER_SIZE == 20
    h = codec.parse_header(raw + bytes(16))
    assert h == codec.Header(codec.DATA, 0x0102030405060708, 0x1122334455667788 >> 2)


@pytest.mark.parametrize("raw", [
    b"", bytes(35), bytes([0xFB, 3, 3, 0]) + bytes(32), bytes([0xFA, 1, 3, 0]) + bytes(32),
    bytes([0xFB, 1, 9, 0]) + bytes(32), bytes([0xFB, 1, 3, 1]) + bytes(32),
    bytes([0xFB, 1, 3, 0]) + bytes(8) + b"\xff" * 8 + bytes(16),
])
def test_header_refuses(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.parse_header(raw)


def test_default_datagram_fits_ipv6_mtu_and_piece_payload() -> None:
    assert codec.DEFAULT_DATAGRAM + 40 + 8 == 1500
    assert codec.max_piece_payload(codec.DEFAULT_DATAGRAM) == 1394
    assert codec.max_piece_payload(65000) == 65000 - 58
    for bad in (295, 65508):
        with pytest.raises(ValueError):
            codec.check_datagram_size(bad)


def test_data_roundtrip_and_padding() -> None:
    body = codec.encode_data(123, 7, [(1, 2, 3, b"abc"), (4, 5, 6, b"x" * 100)])
    frame = codec.parse_data(body)
    assert frame.ts_us == 123 and frame.floor_delta == 7
    assert [(p.file, p.block, p.offset, p.data) for p in frame.pieces] == [
        (1, 2, 3, b"abc"), (4, 5, 6, b"x" * 100)]
    assert codec.parse_data(body + bytes(13)).pieces == frame.pieces  # zero padding
    for bad in (body + b"\x01" + bytes(12), body + bytes(14), body[:-1], body[:8]):
        with pytest.raises(ProtocolError):
            codec.parse_data(bad)
    with pytest.raises(ValueError):
        codec.encode_data(0, 0, [])


@pytest.mark.parametrize("value", [0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1])
def test_varint_roundtrip(value: int) -> None:
    out = bytearray()
    codec.push_varint(out, value)
    assert len(out) == codec.varint_size(value)
    assert codec.pull_varint(bytes(out), 0) == (value, len(out))
    with pytest.raises(ProtocolError):
        codec.pull_varint(bytes(out[:-1]), 0)


def _feedback(ranges: tuple[tuple[int, int], ...], low: int = 10) -> codec.Feedback:
    largest = ranges[-1][1] - 1 if ranges else low
    return codec.Feedback(largest, 250, 1 << 40, 12345, 987654321, 64, -5, 900, low, ranges)


def test_feedback_roundtrip() -> None:
    fb = _feedback(((10, 20), (22, 23), (100, 5000)))
    assert codec.parse_feedback(codec.encode_feedback(fb, 1400)) == fb


def test_feedback_truncates_newest_ranges_to_fit() -> None:
    ranges = tuple((10 + 3 * i, 11 + 3 * i) for i in range(1000))
    fb = _feedback(ranges)
    body = codec.encode_feedback(fb, 200)
    assert len(body) <= 200
    got = codec.parse_feedback(body)
    assert got.largest == fb.largest  # the largest is still reported
    assert got.ranges == ranges[:len(got.ranges)] and 0 < len(got.ranges) < 1000


@pytest.mark.parametrize("mutate", ["beyond_largest", "empty_range", "trailing", "low_high"])
def test_feedback_refuses(mutate: str) -> None:
    fb = _feedback(((10, 20), (25, 30)))
    body = bytearray(codec.encode_feedback(fb, 1400))
    if mutate == "beyond_largest":
        body[0:8] = (25).to_bytes(8, "big")
    elif mutate == "empty_range":
        body[-1] = 0  # last length 0
    elif mutate == "trailing":
        body += b"\x00"
    else:
        body[-10 - 8:-10] = (10**6).to_bytes(8, "big")  # low far above largest
    with pytest.raises(ProtocolError):
        codec.parse_feedback(bytes(body))


def test_control_bodies_roundtrip() -> None:
    assert codec.parse_keepalive(codec.encode_keepalive(5, 6)) == codec.Keepalive(5, 6)
    probe = codec.encode_probe(77, 123456, pad_to=1452)
    assert len(probe) + codec.HEADER_SIZE + codec.TAG_SIZE == 1452
    assert codec.parse_probe(probe) == codec.Probe(77, 123456, 1452)
    assert codec.parse_probe_ack(codec.encode_probe_ack(1, 2, 3)) == codec.ProbeAck(1, 2, 3)
    close = codec.encode_close(4, "d\u00e9j\u00e0" * 200)
    got = codec.parse_close(close, error=True)
    assert got.code == 4 and got.error and len(got.reason.encode()) <= codec.MAX_REASON
    with pytest.raises(ProtocolError):
        codec.parse_close(close[:-1], error=False)
    with pytest.raises(ProtocolError):
        codec.parse_probe(probe[:-1] + b"\x01")


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_bodies_raise_only_protocol_error(seed: int) -> None:
    rng = random.Random(seed)
    samples = [codec.encode_data(1, 2, [(1, 2, 3, b"abc" * 30)]),
               codec.encode_feedback(_feedback(((10, 20), (25, 30))), 1400),
               codec.encode_keepalive(1, 2), codec.encode_probe(1, 2, 200),
               codec.encode_probe_ack(1, 2, 3), codec.encode_close(1, "bye")]
    for _ in range(3000):
        type_ = rng.choice(list(codec.TYPE_NAMES))
        base = bytearray(rng.choice(samples))
        op = rng.random()
        if op < 0.3:
            base = base[:rng.randrange(len(base) + 1)]
        elif op < 0.7:
            for _ in range(rng.randrange(1, 4)):
                if base:
                    base[rng.randrange(len(base))] = rng.randrange(256)
        else:
            base = bytearray(rng.randbytes(rng.randrange(0, 120)))
        try:
            codec.parse_body(type_, bytes(base))
        except ProtocolError:
            pass


# -- keys and sealing ------------------------------------------------------------------

def test_path_keys_pair_up_and_differ_per_direction() -> None:
    secret = new_path_secret()
    client = derive_path_keys(secret, initiator=True)
    daemon = derive_path_keys(secret, initiator=False)
    assert client.send == daemon.receive and client.receive == daemon.send
    assert client.send.key != client.receive.key and client.send.iv != client.receive.iv
    assert derive_path_keys(new_path_secret(), initiator=True).send != client.send
    with pytest.raises(ValueError):
        derive_path_keys(b"short", initiator=True)


def test_x25519_both_sides_agree_and_bind_session() -> None:
    a, b = X25519Exchange(), X25519Exchange()
    s1 = a.path_secret(b.public_bytes, "sess-1", initiator=True)
    s2 = b.path_secret(a.public_bytes, "sess-1", initiator=False)
    assert s1 == s2 and len(s1) == 32
    assert a.path_secret(b.public_bytes, "sess-2", initiator=True) != s1
    # A third party holding both public keys but neither private key gets another secret.
    eve = X25519Exchange()
    assert eve.path_secret(b.public_bytes, "sess-1", initiator=True) != s1
    with pytest.raises(ValueError):
        a.path_secret(bytes(32), "sess-1", initiator=True)  # low-order point
    with pytest.raises(ValueError):
        a.path_secret(b"x" * 31, "sess-1", initiator=True)


def test_seal_open_and_tamper() -> None:
    keys = derive_path_keys(new_path_secret(), initiator=True)
    sealer, opener = Sealer(keys.send), Opener(keys.send)
    header = codec.encode_header(codec.DATA, 9, 41)
    sealed = sealer.seal(41, header, b"hello")
    assert opener.open(41, header, sealed) == b"hello"
    out = bytearray(len(b"hello") + 16)
    sealer.seal_into(41, header, b"hello", memoryview(out))
    assert bytes(out) == sealed
    assert sealer.nonce(41) != sealer.nonce(42)
    for bad in (lambda: opener.open(42, header, sealed),            # other packet number
                lambda: opener.open(41, header[:-1] + b"\x00", sealed),  # header changed
                lambda: opener.open(41, header, sealed[:-1] + bytes([sealed[-1] ^ 1])),
                lambda: opener.open(41, header, sealed[:10]),
                lambda: Opener(keys.receive).open(41, header, sealed)):
        with pytest.raises(InvalidTag):
            bad()


def test_replay_window_matches_a_set_model() -> None:
    rng = random.Random(4)
    win = ReplayWindow(64)
    seen: set[int] = set()
    highest = -1
    for _ in range(20000):
        pn = max(0, highest + rng.randrange(-80, 40))
        expect = pn not in seen and pn > highest - 64
        assert win.check(pn) == expect, pn
        if expect:
            win.mark(pn)
            seen.add(pn)
            highest = max(highest, pn)
    with pytest.raises(ValueError):
        ReplayWindow(100)


def test_nonce_never_repeats_across_directions() -> None:
    keys = derive_path_keys(os.urandom(32), initiator=True)
    s1, s2 = Sealer(keys.send), Sealer(keys.receive)
    assert {s1.nonce(i) for i in range(1000)}.isdisjoint({s2.nonce(i) for i in range(1000)})
