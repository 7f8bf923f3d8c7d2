"""A small name -> class registry with plugin discovery (after timm's, but duplicates are errors).

Built-in plugins are found by importing every module of a package (``probloss.losses``); third-party
packages add theirs through an entry-point group (``probloss.losses``), loaded only when first built::

    # in a third-party pyproject.toml
    [project.entry-points."probloss.losses"]
    my_loss = "my_package.my_loss:MyLoss"
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from importlib import metadata
from typing import Any, Callable


class RegistryError(KeyError):
    """An unknown or duplicate name. Subclasses KeyError so `except KeyError` still catches it."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class Registry:
    """Maps names to classes (or factories) of one kind, e.g. losses or encoders.

    Args:
        kind: what the entries are, for messages ("loss", "encoder").
        builtin_package: dotted package whose modules register the built-in entries when imported.
        entry_point_group: entry-point group that third-party packages register under.
    """

    def __init__(self, kind: str, builtin_package: str | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self.builtin_package = builtin_package
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Callable[..., Any]] = {}
        self._lazy: dict[str, metadata.EntryPoint] = {}  # entry points not imported yet
        self._discovered = False
        self._loading: str | None = None  # the entry point being imported, allowed to register itself

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@LOSSES.register("my_loss")`` (default name: the class name in lower case)."""

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or obj.__name__.lower(), obj)
            return obj

        return decorator

    def add(self, name: str, obj: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries or (name in self._lazy and self._loading != name):
            existing = self._entries.get(name) or self._lazy[name].value
            raise RegistryError(
                f"duplicate {self.kind} name {name!r}: already registered by {_where(existing)}; "
                f"choose another name for {_where(obj)}"
            )
        self._entries[name] = obj
        self._lazy.pop(name, None)
        if isinstance(obj, type) and "registered_name" not in vars(obj):
            try:
                obj.registered_name = name  # lets an instance say which name built it
            except TypeError:  # built-in types are immutable
                pass

    def remove(self, name: str) -> None:
        """Forget a name (for tests and interactive sessions that re-register a plugin)."""
        self._entries.pop(name, None)
        self._lazy.pop(name, None)

    def snapshot(self) -> dict[str, Any]:
        """The registered names and their entries, for :meth:`restore`.

        Plugins are discovered first: restoring an undiscovered state would make the next lookup discover
        again, and the built-in modules, already imported, would not register themselves a second time.
        """
        self._discover()
        return {"entries": dict(self._entries), "lazy": dict(self._lazy)}

    def restore(self, state: dict[str, Any]) -> None:
        """Return to a :meth:`snapshot`: names registered since are forgotten, removed ones come back (tests)."""
        self._entries, self._lazy = dict(state["entries"]), dict(state["lazy"])
        self._discovered, self._loading = True, None

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching an fnmatch pattern, e.g. ``list("*sig*")``."""
        self._discover()
        names = set(self._entries) | set(self._lazy)
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def get(self, name: str) -> Callable[..., Any]:
        """The registered class or factory; an unknown name is an error listing the choices."""
        self._discover()
        if name in self._lazy:
            self._load_entry_point(name)
        if name not in self._entries:
            choices = self.list()
            close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(choices)}")
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Instantiate ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self.list()

    def rediscover(self) -> None:
        """Look for plugins again (after installing a package or changing sys.path)."""
        self._discovered = False
        self._discover()

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self.builtin_package:
            package = importlib.import_module(self.builtin_package)
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{self.builtin_package}.{module.name}")
        if self.entry_point_group:
            for ep in metadata.entry_points(group=self.entry_point_group):
                if ep.name in self._lazy and self._lazy[ep.name].value == ep.value:
                    continue  # the same distribution seen twice on sys.path
                if ep.name in self._entries or ep.name in self._lazy:
                    self._discovered = False  # stay broken until the clash is fixed
                    self.add(ep.name, ep)  # raises the duplicate-name error
                self._lazy[ep.name] = ep

    def _load_entry_point(self, name: str) -> None:
        ep = self._lazy[name]
        self._loading = name
        try:
            obj = ep.load()
            if name not in self._entries:  # the module did not register itself under this name
                self.add(name, obj)
        except RegistryError:
            raise
        except Exception as err:
            raise ImportError(f"{self.kind} plugin {name!r} (entry point {ep.value!r}) failed to import: {err}") from err
        finally:
            self._loading = None


def _where(obj: Any) -> str:
    if isinstance(obj, metadata.EntryPoint):
        return f"entry point {obj.value!r}"
    if isinstance(obj, str):
        return f"entry point {obj!r}"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# The registries of probloss. Built-in losses live in losses/ (imported as probloss.losses).
LOSSES = Registry("loss", builtin_package="probloss.losses", entry_point_group="probloss.losses")
ENCODERS = Registry("encoder", builtin_package="probloss.models", entry_point_group="probloss.encoders")
