"""Wire codec speed: encode/decode of a tiny call frame and of 1 MiB / 16 MiB array frames.

The yardstick is ``pickle.dumps``/``pickle.loads`` of the same (header, body) measured in
the same run (pickle appears only here, as a baseline; actorgrad never uses it).

Encode is ``encode_frame`` (chunks, no join: the transport writes them with
``writelines``); "+join" adds ``join_chunks`` (one copy of the whole frame, what an
in-process transport or a socket write costs at least), the fair comparison with
pickle, which copies the data into its output. Decode is ``decode_frame(frame).body()`` over a ``bytearray`` frame, as a
transport receives it. Times are the best of several repeats.

Run: ``python -m benchmarks bench_wire`` or ``python -m benchmarks.bench_wire``.
"""

from __future__ import annotations

import pickle
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from actorgrad.wire import decode_frame, encode_frame, join_chunks


def best_us(fn: Callable[[], Any], min_time: float = 0.2, repeat: int = 5) -> float:
    """Best time per call in microseconds."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, int(number * min_time / 0.2))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def bench_case(name: str, header: list, body: Any) -> dict[str, float]:
    frame = join_chunks(encode_frame(header, body))
    enc = best_us(lambda: encode_frame(header, body))
    enc_join = best_us(lambda: join_chunks(encode_frame(header, body)))
    dec = best_us(lambda: decode_frame(frame).body())
    pickled = pickle.dumps((header, body), protocol=pickle.HIGHEST_PROTOCOL)
    p_enc = best_us(lambda: pickle.dumps((header, body), protocol=pickle.HIGHEST_PROTOCOL))
    p_dec = best_us(lambda: pickle.loads(pickled))
    print(
        f"{name:<22} {len(frame):>9} B | encode {enc:8.2f} us (+join {enc_join:8.2f})"
        f"  decode {dec:8.2f} us | pickle dumps {p_enc:8.2f} loads {p_dec:8.2f} us"
        f" | vs pickle {(p_enc + p_dec) / (enc + dec):7.2f}x"
        f" (with join {(p_enc + p_dec) / (enc_join + dec):7.2f}x)"
    )
    return {
        "encode_us": enc,
        "encode_join_us": enc_join,
        "decode_us": dec,
        "pickle_dumps_us": p_enc,
        "pickle_loads_us": p_dec,
    }


def main() -> dict[str, dict[str, float]]:
    header = [0, 17, "mod:fn", None]
    mib = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)  # 1 MiB
    mib16 = np.random.default_rng(1).standard_normal(1 << 22).astype(np.float32)  # 16 MiB
    print("vs pickle = pickle's dumps + loads time / ours (encode + decode): > 1, ours is faster")
    results = {
        "tiny": bench_case("tiny call ((1,2),{})", header, ((1, 2), {})),
        "1MiB": bench_case("1 MiB float32 array", header, ((mib,), {})),
        "16MiB": bench_case("16 MiB float32 array", header, ((mib16,), {})),
    }
    return results


if __name__ == "__main__":
    main()
