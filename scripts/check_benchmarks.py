"""Export a checkpoint's test split into every benchmark format and compare each reader with the built-in
evaluator on the same split (probloss/studies/benchmark_check.py; docs/benchmarks.md has a measured table).

    python scripts/check_benchmarks.py checkpoint=runs/default/infonce/<run>/checkpoints/step-00000020.ckpt \
        [out=/tmp/exported] [json=agreement.json]

Exit 0 when every row that measures the same thing agrees exactly, 1 when one differs, 2 for bad arguments.
"""

import sys

from probloss.errors import ConfigError, DataError
from probloss.studies.benchmark_check import check_main

if __name__ == "__main__":
    try:
        check_main(sys.argv[1:])
    except (ConfigError, FileNotFoundError, DataError) as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
