"""`--config FILE.yaml` for any trtc command: a YAML mapping of the command's flags, by their
names without the dashes (`max_batch_size: 64`, `fp8: true`, `calib_dataset: [a.txt, b.txt]`).
Flags given on the command line win over the file, the file over the defaults (the file fills
click's `default_map`, so every value is checked and converted like the flag's). Paths in the file
are taken as on the command line: relative to the working directory.

    @main.command()
    @config_file_option
    @click.option(...)
    def build(config_file, ...): ...
        resolved_flags(click.get_current_context())  # what ran, for the output's record

A key that is not a flag of the command, or a file that is not a YAML mapping, is one line naming
it and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml


def config_file_option(fn):
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), is_eager=True, callback=_apply_config_file,
        help="A YAML file of this command's flags (name: value); flags on the command line override it.",
    )(fn)


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """The YAML file's top-level mapping; click.ClickException (one line) otherwise."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise click.ClickException(f"cannot read --config {path} ({e.strerror or e}); pass an existing YAML file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise click.ClickException(f"--config {path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                                   "fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.ClickException(f"--config {path} holds a {type(data).__name__}, not a mapping of flags; "
                                   "write `flag_name: value` lines")
    return data


def _keys(command: click.Command) -> dict[str, click.Parameter]:
    """Accepted YAML keys (every option name without dashes, and the parameter name) -> parameter."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "config_file":
            continue
        keys[param.name] = param
        for opt in param.opts:
            keys[opt.lstrip("-")] = param
    return keys


def _apply_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    keys = _keys(ctx.command)
    defaults: dict[str, Any] = dict(ctx.default_map or {})
    for key, v in load_yaml_mapping(path).items():
        param = keys.get(str(key).replace("-", "_")) or keys.get(str(key))
        if param is None:
            known = ", ".join(sorted(k for k, p in keys.items() if k == p.name))
            raise click.ClickException(f"--config {path}: {key!r} is not a flag of `trtc {ctx.command.name}`; "
                                       f"use one of: {known}")
        if isinstance(param, click.Option) and param.is_flag and not param.is_bool_flag:  # --fp8 -> qformats
            if not isinstance(v, bool):
                raise click.ClickException(f"--config {path}: {key} is a switch; write `{key}: true` or `{key}: false`")
            if v:
                chosen = defaults.setdefault(param.name, [])
                chosen.append(param.flag_value)
            continue
        defaults[param.name] = v
    ctx.default_map = defaults
    return value


def resolved_flags(ctx: click.Context) -> dict[str, Any]:
    """Every flag of the command with the value it ran with (command line, config file or default),
    and where it came from when not the default: for the record in the output."""
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in ctx.params.items():
        out[name] = list(value) if isinstance(value, tuple) else value
        source = ctx.get_parameter_source(name)
        if source == click.core.ParameterSource.COMMANDLINE:
            sources[name] = "command line"
        elif source == click.core.ParameterSource.DEFAULT_MAP:
            sources[name] = "config file"
    out["sources"] = sources
    return out
