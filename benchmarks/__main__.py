"""Run every benchmark module in turn: `python -m benchmarks [name ...]`.

Each benchmark prints ratios against a baseline measured in the same run, because the
machines are shared and noisy.
"""

from __future__ import annotations

import importlib
import sys

MODULES = ["bench_local", "bench_wire", "bench_rpc", "bench_dist"]


def main(argv: list[str]) -> int:
    names = argv or MODULES
    for name in names:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"benchmarks.{name}":
                print(f"[{name}] not present, skipped")
                continue
            raise
        print(f"\n=== {name} ===", flush=True)
        mod.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
