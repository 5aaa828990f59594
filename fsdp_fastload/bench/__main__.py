"""`python -m fsdp_fastload.bench [options]` (the benchmark), or `--_worker CONFIG` (one rank of one run)."""
import json
import sys

if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
    from .worker import run_rank

    run_rank(json.loads(sys.argv[2]))
else:
    from .cli import main

    sys.exit(main(sys.argv[1:]))
