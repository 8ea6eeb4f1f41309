"""The one shape of the method registries (`KV_METHODS`, `PRUNE_METHODS`, `SPARSITY_METHODS`): a name -> entry
mapping whose lookups are forgiving about case (and the aliases an entry lists) and whose errors name the valid
choices. An entry has a `name` and says which options it takes (`option_names()`)."""

from __future__ import annotations

from typing import Callable


class Registry(dict):
    """Entries of one family (`family` says which in messages: "KV-cache", "visual-token pruning", ...) by name.
    `normalize` maps what a user typed to a registered name (default: lower case, surrounding spaces dropped)."""

    def __init__(self, family: str, normalize: Callable[[str], str] = lambda name: name.strip().lower()):
        super().__init__()
        self.family, self.normalize = family, normalize
        self.aliases: dict[str, str] = {}

    def register(self, entry):
        """Add `entry` under its `name` (and its `aliases`, if any); returns it, so that it decorates a class."""
        name = entry.name
        if not isinstance(name, str) or not name or self.normalize(name) != name:
            raise ValueError(f"a {self.family} method's name must be a non-empty normalized string, got {name!r}")
        self[name] = entry
        for alias in getattr(entry, "aliases", ()):
            self.aliases[self.normalize(alias)] = name
        return entry

    def lookup(self, name):
        """The entry registered as `name`; a `ValueError` naming the choices otherwise."""
        key = self.normalize(name) if isinstance(name, str) else None
        key = self.aliases.get(key, key)
        if key not in self:
            raise ValueError(f"unknown {self.family} method {name!r}; choose one of {sorted(self)}")
        return self[key]

    def option_names(self, name) -> set[str]:
        """The option names the method `name` takes."""
        return set(self.lookup(name).option_names())
