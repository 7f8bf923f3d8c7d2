"""The one command-line grammar of train, sweep, recipe, make_data and evaluate.

Every script is ``python scripts/<command>.py [key=value ...]``: Hydra overrides composed with
``configs/<command>.yaml`` (probloss.config), the same unknown-key and unknown-choice errors with suggestions,
the same ``--help`` (the script's docstring, the groups with their choices, the primary config), and the same
exit status: 0 on success, 2 for a bad config or missing data (one line, no traceback), 1 when training stops
on a non-finite loss.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence


def run_script(main: Callable[[list[str]], Any], config_name: str, doc: str | None,
               argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` as a script: ``--help``, one-line errors and exit codes (see the module docstring)."""
    from probloss.config import ConfigError, describe
    from probloss.train import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print((doc or "").strip() + "\n\n" + describe(config_name))
        sys.exit(0)
    try:
        main(argv)
    except (ConfigError, FileNotFoundError) as err:  # bad config or missing data: one line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        sys.exit(1)
