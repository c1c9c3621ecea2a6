"""Options generated from a config dataclass: one `Flag` line per option.

A command lists the fields of its config that are plain options in a table; each becomes a
keyword of the command with the field's type and default, so adding an option is one line and
the option, its default and what the library checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer


@dataclass(frozen=True)
class Flag:
    """An option for the config field `name`: `--name-with-dashes` unless `decls` says."""

    name: str
    help: str
    decls: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def option_names(self) -> tuple[str, ...]:
        return self.decls or ("--" + self.name.replace("_", "-"),)


def flag(name: str, help: str, *decls: str, **kwargs) -> Flag:
    """`flag("epochs", "Passes over the pairs.", min=1)`: decls and kwargs go to typer.Option."""
    return Flag(name, help, decls, kwargs)


def with_flags(config: type, flags: tuple[Flag, ...]):
    """Decorate a command taking `**options`: its signature gains one typed option per flag,
    with the config field's type and default; the command receives them in `options`."""
    hints = typing.get_type_hints(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for f in flags:
            option = typer.Option(*f.option_names(), help=f.help, **f.kwargs)
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=defaults[f.name],
                    annotation=Annotated[hints[f.name], option],
                )
            )
        fn.__signature__ = sig.replace(parameters=params)
        return fn

    return decorate
