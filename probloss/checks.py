"""One-line value checks of a configuration, each raising :class:`probloss.errors.ConfigError` (exit 2) with the
key, what it must be and what it got; every layer's settings use them (docs/design.md)."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Sequence

from probloss.errors import ConfigError


def fail(message: str):
    raise ConfigError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(key: str, value: Any, minimum: int, optional: bool = False, why: str = "") -> None:
    """``key`` must be an integer >= ``minimum`` (or None where ``optional``)."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        fail(f"{key} must be {what}{' or null' if optional else ''}{why}, got {value!r}")


def finite(key: str, value: Any, low: float | None = None, high: float | None = None, *, positive: bool = False,
            optional: bool = False, why: str = "") -> None:
    """``key`` must be a finite number (> 0 where ``positive``; within [low, high] where given)."""
    if optional and value is None:
        return
    ok = is_number(value) and math.isfinite(float(value))
    ok = ok and not (positive and value <= 0) and not (low is not None and value < low) \
        and not (high is not None and value > high)
    if not ok:
        if positive:
            what = "a finite number > 0"
        elif low is not None and high is not None:
            what = f"a finite number in [{low:g}, {high:g}]"
        elif low is not None:
            what = f"a finite number >= {low:g}"
        else:
            what = "a finite number"
        fail(f"{key} must be {what}{' or null' if optional else ''}{why}, got {value!r}")


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(f"{key}={value!r} is not one of {'|'.join(choices)}")


def check_path_component(key: str, value: Any) -> None:
    """``run_name`` and ``experiment`` name one folder inside the run folder's parent: a single path component
    (not empty, no ``/`` or ``\\``, not ``.`` or ``..``, not absolute), so a run never writes outside
    ``out_dir``."""
    text = "" if value is None else str(value)
    bad = (not text or text.strip() != text or text in (".", "..") or "/" in text or "\\" in text
           or os.sep in text or (os.altsep and os.altsep in text) or "\0" in text or os.path.isabs(text))
    if bad:
        fail(f"{key}={value!r} must be one folder name (not empty, no '/', no '..', not absolute, no leading or "
              f"trailing spaces): the run folder is <out_dir>/<experiment>/<loss>/<run_name>; e.g. {key}=my_run")


def unknown(what: str, name: str, existing: Sequence[str], where: str, candidate: str | None = None) -> str:
    """``unknown <what> <name>. Did you mean ...? Available in <where>: ...`` (the close matches of ``candidate``
    or ``name``)."""
    close = difflib.get_close_matches(candidate or name, list(existing), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    listing = ", ".join(existing) if existing else "(none)"
    return f"unknown {what} {name!r}.{hint} Available in {where}: {listing}"
