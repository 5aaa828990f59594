#!/usr/bin/env python
"""The side-by-side benchmark, from a checkout: the same as ``python -m fsdp_fastload bench``.

The machinery (methods registry, fresh-process runs, sweep, report) lives in ``fsdp_fastload.bench``;
see ``python benchmarks/bench_materialize.py --help``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package, if not installed

from fsdp_fastload.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
