"""Write the report page and PNG plots of a finished sweep or experiment folder (no training).

    python scripts/report.py runs/compare_losses [--storage postgresql://...]   # sweep -> report.md
    python scripts/report.py runs/batch_size            # recipe -> recipe.md + comparisons.json
    python scripts/report.py --findings runs            # every recipe under runs/ -> a Findings page on stdout

A folder with results.json is a recipe (probloss/recipe.py); any other is a sweep, read from its
Optuna storage (probloss/report.py). --findings reads only results.json + recipe.json of each recipe folder.
"""

import argparse
import sys
from pathlib import Path

from probloss.config import ConfigError
from probloss.recipe import findings, render_recipe
from probloss.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="<out_dir>/<recipe or sweep name>, or with --findings <out_dir>")
    parser.add_argument("--storage", default=None, help="a sweep's storage (default: <out_dir>/sweeps/<name>.journal)")
    parser.add_argument("--findings", action="store_true",
                        help="print a markdown Findings page of every recipe folder under the folder")
    args = parser.parse_args()
    try:
        if args.findings:
            if not Path(args.folder).is_dir():
                raise FileNotFoundError(f"{args.folder} is not a folder")
            print(findings(args.folder))
            sys.exit(0)
        if (Path(args.folder) / "results.json").is_file():
            path = render_recipe(args.folder)
        else:
            path = write_report(args.folder, storage=args.storage)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")
