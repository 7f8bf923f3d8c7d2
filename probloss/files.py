"""The files every layer writes: JSON atomically (a failed write leaves no partial file) and PNG figures.

matplotlib is imported on the first figure (:func:`pyplot`), so commands that draw nothing do not load it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from probloss.errors import WriteError


def write_json(path: Path, values: Mapping[str, Any]) -> Path:
    """Atomic json write; NaN/Inf become null (json has no NaN). A failed write leaves no temporary file and
    raises :class:`probloss.errors.WriteError` naming ``path``."""
    tmp = path.with_suffix(".json.tmp")
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
    try:
        tmp.write_text(json.dumps(clean, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, err) from None
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
