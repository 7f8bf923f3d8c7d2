"""Shard URLs that run a command are taken only from this invocation's command line.

webdataset opens a shard URL with a scheme through a program: ``pipe:<cmd>`` runs ``<cmd>`` in a shell,
``http(s)://``, ``sftp://``, ``ftps://``, ``scp://`` run curl, ``gs://`` gsutil, and so on (``webdataset.gopen``);
only plain paths and ``file:`` are opened as files. A config saved in a checkpoint or a run folder is data, and
``evaluate`` (and recipes' cached evaluations, and resume) rebuild the data from it, so a saved
``data.val_shards='pipe:touch X; cat shard'`` would run ``touch X``. Hence the rule::

    a shard pattern that runs a command is opened only if this invocation's command line gave it

:func:`trust_command_line` records the command-running values of the command line (probloss/cli.py calls it for
every command, before anything is composed); :func:`check_shard_urls` (called by probloss/data/prepare.py before
any shard is listed or opened) refuses any other one with a one-line config error that says how to pass it. The
record lives in the environment variable ``PROBLOSS_COMMAND_URLS``, so the processes a command starts (``fabric
run`` ranks, sweep and recipe workers) inherit what their parent's command line gave, and nothing else can add to
it: a checkpoint cannot set a variable of the process that reads it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping
from urllib.parse import urlparse

import braceexpand
from hydra.core.override_parser.overrides_parser import OverridesParser

from probloss.errors import ConfigError

ENV = "PROBLOSS_COMMAND_URLS"


def _schemes(pattern: str) -> set[str]:
    """The URL schemes of a shard pattern's parts (``::``-joined, brace alternatives expanded) that webdataset
    would open through a program (every scheme but ``file``)."""
    found = set()
    for part in str(pattern).split("::"):
        try:
            urls = [part, *braceexpand.braceexpand(part)]
        except Exception:  # an unbalanced pattern: its own data error comes when it is listed
            urls = [part]
        for url in urls:
            scheme = urlparse(url.strip()).scheme
            if scheme and scheme != "file":
                found.add(scheme)
    return found


def runs_command(pattern: str | None) -> bool:
    """Whether opening ``pattern`` would run a program (``pipe:``, ``http://``, ``s3://`` ...)."""
    return pattern is not None and bool(_schemes(str(pattern)))


def trusted() -> set[str]:
    """The command-running shard patterns this invocation's command line (or its parent command's) gave."""
    try:
        return set(json.loads(os.environ.get(ENV, "[]")))
    except ValueError:
        return set()


def trust_command_line(arguments: Iterable[str]) -> None:
    """Record the command-running values among ``key=value`` command-line arguments (Hydra's grammar, so
    ``"data.val_shards='pipe:cat x.tar'"`` gives ``pipe:cat x.tar``)."""
    values = set()
    for argument in arguments:
        if "=" not in argument:
            continue
        try:
            value = OverridesParser.create().parse_overrides([argument])[0].value()
        except Exception:  # a malformed override: composing the config reports it
            value = argument.split("=", 1)[1]
        if isinstance(value, str) and runs_command(value):
            values.add(value)
    if values:
        os.environ[ENV] = json.dumps(sorted(trusted() | values))


def check_shard_urls(patterns: Mapping[str, str | None]) -> None:
    """Raise ConfigError for a pattern (``{"data.val_shards": pattern, ...}``) that would run a command and was
    not given on this invocation's command line."""
    allowed = trusted()
    for key, pattern in patterns.items():
        if pattern is None or not runs_command(pattern) or str(pattern) in allowed:
            continue
        schemes = ", ".join(f"{s}:" for s in sorted(_schemes(str(pattern))))
        raise ConfigError(
            f"{key}={str(pattern)!r} would run a command ({schemes} URLs are opened through a program) and was not "
            f"given on this command line (it comes from a config file, a saved config or a checkpoint, which are "
            f"data); if you trust it, give it on the command line: \"{key}='{pattern}'\"")
