"""`make bench`: run every benchmark module (bench/bench_*.py) and print its table."""

from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
          f"{__import__('os').cpu_count()} cores")
    only = set(sys.argv[1:])
    failed = 0
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
        if not mod.startswith("bench_") or (only and mod not in only):
            continue
        print(f"\n== {mod} ==")
        t0 = time.perf_counter()
        argv, sys.argv = sys.argv, [mod]  # each benchmark parses its own (empty) command line
        try:
            importlib.import_module(f"bench.{mod}").main()
        except Exception as e:  # one broken benchmark must not hide the others
            failed += 1
            print(f"FAILED: {type(e).__name__}: {e}")
        finally:
            sys.argv = argv
        print(f"({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
