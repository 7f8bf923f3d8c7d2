"""`probloss recipe` as a script file (`python scripts/run_recipe.py --help` shows its usage; probloss/cli.py).

Kept so that launchers that take a file, such as `fabric run scripts/train.py loss=gaussian_var`, work.
"""

import sys

from probloss.cli import main

if __name__ == "__main__":
    main(["recipe", *sys.argv[1:]])
