"""Write report.md and PNG plots for an experiment's sweeps (probloss/report.py has the details).

    python scripts/report.py runs/compare_losses [--storage postgresql://...]
"""

import argparse

from probloss.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", help="<out_dir>/<experiment>")
    parser.add_argument("--storage", default=None, help="the sweep's storage (default: <out_dir>/sweeps/<experiment>.journal)")
    args = parser.parse_args()
    print(f"wrote {write_report(args.experiment_dir, storage=args.storage)}")
