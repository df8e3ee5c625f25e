"""Property tests of the wire codec: random values round trip; garbage only ever raises
ProtocolError."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actorgrad import wire
from actorgrad.errors import ProtocolError
from actorgrad.wire import decode_frame, encode_frame, join_chunks

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Hooks:
    """Sloppy hooks, like a runtime's: they unpack what they expect and may raise."""

    def tensor_in(self, array, requires_grad, link):
        ctx, edge = link if link is not None else (0, 0)  # ValueError/TypeError on junk
        return ("tensor", array, requires_grad, ctx + edge)

    def ref_in(self, payload):
        owner, rid = payload
        return ("ref", owner + "", rid + 0)


def decode_all(frame: bytes | bytearray, hooks: Any = None) -> None:
    """Decode header and body; anything but success or ProtocolError fails the test."""
    try:
        decode_frame(frame).body(hooks)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- values

DTYPES = [
    "|b1",
    "|i1",
    "<i2",
    "<i4",
    "<i8",
    "|u1",
    "<u2",
    "<u4",
    "<u8",
    "<f2",
    "<f4",
    "<f8",
    "<c8",
    "<c16",
    ">i8",
    ">f4",
]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    big = draw(st.booleans()) and dtype.itemsize >= 4
    if big:  # make one large enough to travel out of band
        shape = [wire.OOB_THRESHOLD // dtype.itemsize + draw(st.integers(0, 3))]
    n = math.prod(shape)
    nbytes = n * dtype.itemsize
    if big:
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(nbytes)
    else:
        raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if draw(st.booleans()) and arr.ndim >= 1:
        arr = arr[::-1] if arr.ndim == 1 else arr.T
    return arr


def _scalar(draw_dtype: str, data: bytes) -> np.generic:
    dt = np.dtype(draw_dtype)
    return np.frombuffer(data[: dt.itemsize], dtype=dt)[0]


numpy_scalars = st.builds(
    _scalar,
    st.sampled_from([d for d in DTYPES if d[0] != ">"]),
    st.binary(min_size=16, max_size=16),
)

hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.tuples(inner) | st.tuples(inner, inner),
    max_leaves=6,
)

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | numpy_scalars
)

values = st.recursive(
    leaves | arrays(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype.str == b.dtype.str and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype.str == b.dtype.str and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    return a == b


@FUZZ
@given(values, st.booleans())
def test_random_nested_values_round_trip(value, writable):
    chunks = encode_frame([0, 1, "m:f", None], value)
    frame = join_chunks(chunks) if writable else b"".join(chunks)
    out = decode_frame(frame).body()
    assert same(out, value)


# --------------------------------------------------------------------------- garbage


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_protocol_error(data):
    decode_all(data, Hooks())
    decode_all(data)


@FUZZ
@given(
    st.binary(max_size=64),
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=3),
    st.binary(max_size=300),
)
def test_random_sections_behind_a_valid_prefix_only_raise_protocol_error(
    header, body, lengths, tail
):
    frame = (
        wire._FIXED.pack(wire._TAG, len(header), len(lengths), len(body))
        + header
        + b"".join(n.to_bytes(8, "big") for n in lengths)
        + body
        + tail
    )
    decode_all(frame, Hooks())
    decode_all(frame)


def _sample_frames() -> list[bytes]:
    class RefHooks:
        def ref_out(self, ref):
            return ["w1", 7]

        def tensor_out(self, t):
            return [3, 4]

    class Ref(wire.WireRef):
        pass

    bodies: list[Any] = [
        ((1, 2), {}),
        ((1, "two", [3.0, None], {"k": (b"x",)}), {"kw": np.float32(2)}),
        {"a": np.arange(12, dtype=np.int16).reshape(3, 4), "e": ValueError("boom")},
        [np.arange(wire.OOB_THRESHOLD // 8 + 1, dtype=np.float64)[:40], Ref()],
    ]
    try:
        from actorgrad.tensor import Tensor

        bodies.append((Tensor(np.ones((2, 2), np.float32), requires_grad=True),))
    except ImportError:  # pragma: no cover
        pass
    return [b"".join(encode_frame([0, 17, "mod:fn", {"m": 1}], b, RefHooks())) for b in bodies]


SAMPLES = _sample_frames()


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDD, 0xC7, 0xD7]))
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del frame[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del frame[pos:]
    return bytes(frame)


@FUZZ
@given(mutated_frames())
def test_mutated_valid_frames_only_raise_protocol_error(frame):
    decode_all(frame, Hooks())
    decode_all(bytearray(frame))


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """Valid layout, mutated body: exercises the ext decoders more than whole-frame noise."""
    frame = draw(st.sampled_from(SAMPLES))
    f = decode_frame(frame)
    body = bytearray(f._body)
    for _ in range(draw(st.integers(1, 4))):
        if not body:
            break
        pos = draw(st.integers(0, len(body) - 1))
        body[pos] = draw(st.integers(0, 255))
    buffers = [bytes(b) for b in f._buffers]
    header = msgpack.packb(f.header)
    out = bytearray(wire._FIXED.pack(wire._TAG, len(header), len(buffers), len(body)))
    out += header + b"".join(len(b).to_bytes(8, "big") for b in buffers) + body
    for b in buffers:
        out += bytes(-len(out) % wire.ALIGN) + b
    return bytes(out)


@FUZZ
@given(mutated_bodies())
def test_mutated_bodies_with_a_valid_layout_only_raise_protocol_error(frame):
    decode_all(frame, Hooks())
    decode_all(frame)
