"""The files every layer writes: JSON atomically (a failed write leaves no partial file), PNG figures, names safe
as one path component (:func:`slug`), and the one number format of every printed table and console line
(:func:`fmt_number`).

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


def slug(text: Any) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced by ``_``: one path component (a run
    name, a PNG file name), also safe inside a Hydra override."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def fmt_number(value: Any, places: int = 3, nonfinite: str | None = "-", general_from: float = math.inf) -> str:
    """One value as printed in a table cell or a console line: a float with ``places`` decimals, or ``places``
    significant digits from ``general_from`` in magnitude up (a long run's wall time stays short); a non-finite
    float as ``nonfinite`` (None: as Python spells it, nan / inf); anything else (bool, int, str) as ``str``.

    Study tables use the defaults (3 decimals, "-" where a seed gave no number); a run's console summary
    (probloss.training.run_folder) asks for 4 places, nan as nan and significant digits from 1e5.
    """
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return f"{value:.{places}g}" if nonfinite is None else nonfinite
    return f"{value:.{places}g}" if abs(value) >= general_from else f"{value:.{places}f}"
