"""Write the report page and PNG plots of a finished sweep or experiment folder (no training).

    python scripts/report.py runs/compare_losses [--storage postgresql://...]   # sweep -> report.md
    python scripts/report.py runs/batch_size                                      # recipe -> recipe.md

A folder with results.json is a recipe (probloss/recipe.py); any other is a sweep, read from its
Optuna storage (probloss/report.py).
"""

import argparse
import sys
from pathlib import Path

from probloss.recipe import render_recipe
from probloss.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="<out_dir>/<recipe or sweep name>")
    parser.add_argument("--storage", default=None, help="a sweep's storage (default: <out_dir>/sweeps/<name>.journal)")
    args = parser.parse_args()
    try:
        if (Path(args.folder) / "results.json").is_file():
            path = render_recipe(args.folder)
        else:
            path = write_report(args.folder, storage=args.storage)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")
