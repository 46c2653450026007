"""``--config FILE.toml``: a command's options from a TOML file; the command line wins.

One key per option, named as the option without its dashes (``batch-size`` or ``batch_size``;
``glob``, ``lambda``, ``set``, ``quiet``...), plus ``head`` for ``train-head``'s NAME. The file
fills click's ``default_map``, so a flag given on the command line overrides the file, every
value goes through the option's own type check, and the command builds its config dataclass
exactly as from flags (so the settings it records, in the cache or the run folder, are the
resolved ones). Relative paths in the file are taken relative to the file's folder. An
unknown key is an error that names it and lists the valid keys.

Read with :mod:`tomllib` (Python 3.11+; ``tomli``, its backport, on 3.10).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

__all__ = ["config_option", "option_keys", "read_toml"]

HELP = ("TOML file of options: one key per option, named as the option (batch-size or "
        "batch_size); options given here override it. Relative paths in it are relative to "
        "the file.")


def read_toml(path: Path) -> dict:
    """The TOML file at ``path`` as a dict.

    Raises:
        click.BadParameter: no such file, or not valid TOML.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML ({e}); write one `key = value` "
                                 f"per option, e.g. batch-size = 32") from e


def option_keys(command: click.Command, aliases: dict[str, str] | None = None
                ) -> dict[str, click.Parameter]:
    """Config key (underscores) -> parameter, for every option of ``command`` but ``--config``
    and ``--help``; ``aliases`` maps extra keys to parameter names (``{"head": "name"}``)."""
    keys: dict[str, click.Parameter] = {}
    by_name = {p.name: p for p in command.params}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name == "config" or p.name == "help":
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = p
    for key, name in (aliases or {}).items():
        keys[key.replace("-", "_")] = by_name[name]
    return keys


def _coerce(param: click.Parameter, value, folder: Path):
    """A TOML value as the option takes it: a ``[set]`` table as KEY=VALUE strings, a single
    value of a repeatable option as a list, relative paths joined to ``folder``."""
    if param.name == "sets" and isinstance(value, dict):
        value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
    if getattr(param, "multiple", False) and not isinstance(value, list):
        value = [value]
    if isinstance(param.type, click.Path):
        def join(v):
            if not isinstance(v, str) or v == "-":
                return v
            return os.path.normpath(folder / Path(v).expanduser())
        value = [join(v) for v in value] if isinstance(value, list) else join(value)
    return value


def config_option(aliases: dict[str, str] | None = None) -> Callable:
    """Decorator: add ``--config FILE.toml`` to a click command (see the module docstring).

    Args:
        aliases: extra keys for parameters, e.g. ``{"head": "name"}`` for an argument.
    """
    def load(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
        if value is None:
            return
        table = read_toml(value)
        keys = option_keys(ctx.command, aliases)
        defaults = {}
        for key, item in table.items():
            target = keys.get(key.replace("-", "_"))
            if target is None:
                valid = ", ".join(sorted(k.replace("_", "-") for k in keys))
                raise click.BadParameter(f"unknown key {key!r} in {value}; valid keys for "
                                         f"vtx {ctx.command.name}: {valid}", ctx=ctx,
                                         param=param)
            if target.name in defaults:
                raise click.BadParameter(f"{value} gives {key!r} twice (as dashes and as "
                                         f"underscores); keep one", ctx=ctx, param=param)
            defaults[target.name] = _coerce(target, item, Path(value).parent)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}

    return click.option("--config", type=click.Path(path_type=Path, dir_okay=False),
                        is_eager=True, expose_value=False, callback=load, help=HELP)
