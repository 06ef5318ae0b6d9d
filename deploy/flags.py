"""Command-line flags derived from the config tree: one walk over the frozen dataclasses.

A leaf field whose metadata has "help" is a flag. Its metadata may also give
    cli            the flag's name (default: "--" + the field name with dashes); "{pool}" etc. in it and
                   in "help" are filled from the enclosing fields' metadata
    choices        the allowed values (a registry's names)
    scale          field units per flag unit (MiB flag, bytes field: 2**20)
    zero_is_none   the flag's 0 is the field's None
    min / above    the smallest value allowed / the bound a value must be above (check_bounds; None = unset
                   always passes)
A bool flag flips its field's default. The flag's default is the tree's value, shown by --help.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Iterator, Mapping

from pdcluster.engine.config import KINDS, in_bounds, of_kind

_TYPES = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]        # field names from the root, e.g. ("kv", "transport")
    name: str                    # "--kv-transport"
    value: Any                   # the tree's value, in the field's units
    type: type
    meta: Mapping[str, Any]
    help: str

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def default(self) -> Any:
        """The tree's value in the flag's units."""
        if self.type is bool:
            return False
        if self.value is None:
            return 0 if self.meta.get("zero_is_none") else None
        return self.value // self.meta["scale"] if "scale" in self.meta else self.value

    def to_field(self, v: Any) -> Any:
        if self.type is bool:
            return (not self.value) if v else self.value
        if v is None or (v == 0 and self.meta.get("zero_is_none")):
            return None
        return v * self.meta["scale"] if "scale" in self.meta else v


def tree_flags(tree: Any, path: tuple[str, ...] = (), ctx: Mapping[str, str] | None = None) -> Iterator[Flag]:
    """Every flag of `tree` (a dataclass instance), depth first in field order."""
    ctx = ctx or {}
    for f in fields(tree):
        v = getattr(tree, f.name)
        if is_dataclass(v):
            yield from tree_flags(v, path + (f.name,), {**ctx, **f.metadata})
        elif "help" in f.metadata:
            m = f.metadata
            t = _TYPES.get(str(f.type).split("|")[0].strip()) or type(v)     # the field's type, not its value's
            name = m.get("cli", "--" + f.name.replace("_", "-")).format(**ctx)
            yield Flag(path + (f.name,), name, v, t, m, m["help"].format(**ctx))


def check_bounds(tree: Any) -> None:
    """ValueError naming the first flag of `tree` whose value is not a finite number (an integer for an
    int flag) within its field's "min" / "above" bound; the value is shown in the flag's units."""
    for fl in tree_flags(tree):
        _check_bound(fl, fl.value)


def _check_bound(fl: Flag, v: Any) -> None:
    """check_bounds for one flag whose field would take `v` (field units)."""
    lo, above = fl.meta.get("min"), fl.meta.get("above")
    if v is None or (lo is None and above is None):
        return
    kind = "int" if fl.type is int else "float"
    if not (of_kind(v, kind) and in_bounds(v, lo, above)):
        bound = f">= {lo:g}" if lo is not None else f"> {above:g}"
        if fl.meta.get("zero_is_none") and above == 0:
            bound = ">= 0 (0: off)"             # the flag's 0 is the field's None
        kind = KINDS[kind]
        shown = v // fl.meta["scale"] if "scale" in fl.meta and isinstance(v, int) else v
        raise ValueError(f"{fl.name} must be {kind} {bound}, got {shown!r}")


def add_flags(parser: argparse.ArgumentParser, tree: Any) -> list[Flag]:
    """Add one option per flag of `tree` to `parser`; the flags, for apply_flags."""
    out = list(tree_flags(tree))
    for fl in out:
        if fl.type is bool:
            parser.add_argument(fl.name, dest=fl.dest, action="store_true", help=fl.help)
        else:
            parser.add_argument(fl.name, dest=fl.dest, type=fl.type, default=fl.default,
                                choices=fl.meta.get("choices"), help=fl.help)
    return out


def apply_flags(tree: Any, args: argparse.Namespace, flags: list[Flag]) -> Any:
    """`tree` with every flag's parsed value (in field units). A value out of its flag's bounds is a ValueError
    naming the flag, before the tree's own checks (__post_init__) could name the field instead."""
    values = {fl.path: fl.to_field(getattr(args, fl.dest)) for fl in flags}
    for fl in flags:
        _check_bound(fl, values[fl.path])
    return override(tree, values)


def override(tree: Any, values: Mapping[tuple[str, ...], Any]) -> Any:
    """`tree` with the leaves at `values`' paths replaced (nodes rebuilt, so __post_init__ checks run)."""
    names = {f.name for f in fields(tree)}
    unknown = sorted(".".join(p) for p in values if p[0] not in names)
    if unknown:
        raise TypeError(f"{type(tree).__name__} has no field {', '.join(unknown)}")
    kw = {p[0]: v for p, v in values.items() if len(p) == 1}
    for name in {p[0] for p in values if len(p) > 1}:
        kw[name] = override(getattr(tree, name), {p[1:]: v for p, v in values.items() if len(p) > 1 and p[0] == name})
    return replace(tree, **kw)


def dotted(**values: Any) -> dict[tuple[str, ...], Any]:
    """override()'s paths from keywords with "__" between names: dotted(kv__transport="grpc")."""
    return {tuple(k.split("__")): v for k, v in values.items()}
