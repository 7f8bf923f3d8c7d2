"""Frozen settings dataclasses as the config's schema: a field's default is the config default (one place), the
comment above a field says what it means, and Hydra composes plain-data nodes made from them
(probloss/training/config.py registers them; the YAML files only choose groups and override).

- :func:`setting`: a field with its default and, where it differs, the value a saved config that lacks the key
  means (``absent``: a run saved before the key existed keeps what it ran with, e.g. ``trainer.cpu_matmul``);
- :func:`defaults`: the plain-data node of a class's defaults (fields without one, or marked ``node=False``, are
  left to the YAML files);
- :func:`build`: an instance from a config section (missing keys take their ``absent`` value; a key without a
  field is a KeyError: a YAML key the schema lacks is a bug, caught by the tests);
- :func:`comments`: ``{field: comment}`` read from the class's source, for ``--help``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Mapping

REQUIRED = "???"  # a default the config must replace (Hydra's missing value): composing without it is an error
ABSENT = "absent"  # field metadata: the value of a key a saved config lacks (default: None)
NODE = "node"  # field metadata: False keeps the field out of the composed defaults (a per-source key)


def setting(default: Any = dataclasses.MISSING, *, absent: Any = None, node: bool = True, factory=None):
    """A settings field: ``default`` (or ``factory()``) when a config is composed; ``absent`` when a saved config
    (an older run's config.yaml) lacks the key; ``node=False``: not in the composed defaults (a key only some
    config files have, e.g. the shapes generator's sizes)."""
    metadata = {ABSENT: absent, NODE: node}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return defaults(type(value))
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def defaults(cls) -> dict[str, Any]:
    """``{key: default}`` of the fields that have a default and belong to the composed node, as plain data."""
    node = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get(NODE, True) or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            node[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            node[f.name] = _plain(f.default_factory())
    return node


def build(cls, section: Mapping[str, Any], where: str):
    """``cls`` from a config section: a key without a field is a KeyError (a schema bug); a missing key takes its
    field's ``absent`` value (None unless :func:`setting` says otherwise), not its default: a saved config
    without the key is a run that never had it. Lists become tuples (frozen)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    extra = sorted(set(section.keys()) - set(names))
    if extra:
        raise KeyError(f"{where}: keys {extra} have no field in {cls.__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = section[f.name] if f.name in section else f.metadata.get(ABSENT)
        values[f.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**values)


_FIELD = re.compile(r"^    (\w+)\s*:")
_COMMENT = re.compile(r"^    #\s?(.*)$")


def comments(cls) -> dict[str, str]:
    """``{field: the comment lines right above it, joined}``, read from the class's source."""
    found, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment, match = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            pending.append(comment.group(1).strip())
        elif match and pending:
            found[match.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return found
