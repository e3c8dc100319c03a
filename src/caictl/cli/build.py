"""One Typer command from one stage module: the fields of its config dataclass become the command's flags.

Each field says what its flag needs through caictl.options.option() metadata (help, panel, flag, short, argument,
invert, settings, metavar, split, repeat, required, cli), so no option is written twice. Typer reads a command's
parameters from its function's signature; the function here takes **values and carries a generated
inspect.Signature of typer.Option / typer.Argument defaults, so Typer parses, converts and documents each flag
as if it had been written by hand, and the one function below turns the parsed values into the config.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand

from caictl import settings, ui
from caictl.options import PANELS, declaration

# The value's form in --help where a field names none: short, so names and help share 80 columns.
METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


@dataclass
class Flag:
    """One config field on the command line."""

    name: str
    meta: dict
    kind: type  # what Typer parses: str, int, float, bool, Path, list[str] or a tuple
    default: object  # the dataclass's; MISSING when it has none
    required: bool

    @property
    def decls(self) -> list[str]:
        declared = declaration(self.name, self.meta, self.kind is bool)
        return [declared, *([self.meta["short"]] if "short" in self.meta else [])]


def add_command(group: typer.Typer, name: str, module, show=None) -> None:
    """Add `name` (its last word) to `group`: module's config class becomes the flags, module.run() the action;
    `show` turns run()'s result into what the command prints on stdout."""
    config_class = config_class_of(module)
    flags = flags_of(config_class)

    def command(**values) -> None:
        config = to_config(config_class, flags, values)
        announce(name, config, flags)
        result = module.run(config)
        if show is not None:
            typer.echo(show(result))

    command.__signature__ = inspect.Signature([_parameter(flag) for flag in flags])
    group.command(name.split()[-1], cls=StageCommand, help=help_of(module, name))(command)


def config_class_of(module) -> type:
    """The one `...Config` dataclass a stage module defines."""
    (config_class,) = [value for value in vars(module).values() if isinstance(value, type) and is_dataclass(value)
                       and value.__module__ == module.__name__ and value.__name__.endswith("Config")]
    return config_class


def flags_of(config_class) -> list[Flag]:
    hints = typing.get_type_hints(config_class)
    flags = []
    for field in fields(config_class):
        if not field.init or field.metadata.get("cli", True) is False:
            continue
        meta, hint = dict(field.metadata), hints[field.name]
        union = typing.get_origin(hint) in (UnionType, typing.Union)
        parts = [part for part in typing.get_args(hint) if part is not NoneType] if union else [hint]
        optional = union and NoneType in typing.get_args(hint)
        kind = parts[0]
        if meta.get("repeat") or len(parts) > 1 or typing.get_origin(kind) is list:
            kind = str if meta.get("split") else list[str]  # base_url's str | list[str] is a repeated option
        default = field.default_factory() if field.default_factory is not MISSING else field.default
        # A field with no default whose type admits None is optional (None); one whose type does not, required.
        required = bool(meta.get("required")) or (default is MISSING and not optional)
        flags.append(Flag(field.name, meta, kind, default, required))
    return flags


def to_config(config_class, flags: list[Flag], values: dict):
    """The config from the parsed flags: every shared and stage option resolved here, in one place (flag, then
    CAICTL_<NAME> for shared ones, then caictl.yaml, then the dataclass's default)."""
    given = {}
    for flag in flags:
        value = values[flag.name]
        if flag.meta.get("invert") and value is not None:
            value = not value
        if flag.meta.get("split") and value is not None:
            value = [part.strip() for part in value.split(flag.meta["split"]) if part.strip()]
        default = None if flag.default is MISSING else flag.default
        if flag.meta.get("settings") == "shared":
            value = settings.resolve(flag.name, value, default)
        elif flag.meta.get("settings") == "stage":
            value = settings.stage_option(flag.name, value, default)
        if isinstance(value, (list, tuple)) and typing.get_origin(flag.kind) is list:
            value = list(value)
        if (value is None and flag.default is not MISSING) or (value == [] and flag.default == []):
            continue  # absent: the dataclass's default, so a config built here equals one built in code
        given[flag.name] = value
    return config_class(**given)


def announce(name: str, config, flags: list[Flag]) -> None:
    """With -v, every resolved option on stderr at start (caictl.json keeps them beside the outputs either way).
    Quiet by default: a stage's stderr is its progress, warnings and summary, which scripts read."""
    if ui.verbose():
        values = "\n".join(f"  {flag.name} = {_text(getattr(config, flag.name))}" for flag in flags)
        ui.log(escape(f"caictl {name}\n{values}"))


def help_of(module, name: str) -> str:
    """A command's help: its stage module's docstring, first paragraph (without the leading "name: "), then the
    runnable examples that follow it, kept line by line (\\b tells Click not to rewrap them)."""
    paragraphs = inspect.cleandoc(module.__doc__).split("\n\n")
    summary = paragraphs[0].removeprefix(f"{name}: ")
    text = summary[:1].upper() + summary[1:]
    if len(paragraphs) > 1 and paragraphs[1].lstrip().startswith("caictl "):
        text += "\n\n\b\n" + paragraphs[1]
    return text


class StageCommand(TyperCommand):
    """A stage's command: options grouped by panel in --help, and two mistakes Click lets through refused."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        _check_tokens(self.params, args)
        return super().parse_args(ctx, args)

    def format_options(self, ctx, formatter) -> None:
        # Click's plain layout, not Typer's rich tables: at 80 columns those cut option names, and rich markup
        # would eat the brackets of `pip install 'caictl[encoders]'`. A long name puts its help on the next line.
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            if (record := param.get_help_record(ctx)) and param.param_type_name == "argument":
                # Typer would show the Python type (<list[str]>) beside an argument's name
                record = (param.metavar + ("..." if param.nargs != 1 else ""), record[1])
            if record:
                panel = "Arguments" if param.param_type_name == "argument" else param.rich_help_panel or "Other"
                sections.setdefault(panel, []).append(record)
        for panel in ("Arguments", *PANELS, "Other"):
            if panel in sections:
                with formatter.section(panel):
                    formatter.write_dl(sections[panel])


def _check_tokens(params, args: list[str]) -> None:
    """Refuse a single-value option given twice (Click keeps the last silently) and a multi-value option not
    given its numbers apart (`--clamp 0.4,0.6`, where Click's own message would not say the form). A switch
    given twice stays allowed: `--no-few-shot ... --few-shot` is how a script overrides an earlier choice."""
    options = {name: param for param in params if param.param_type_name == "option" and param.name != "help"
               for name in (*param.opts, *param.secondary_opts)}
    seen: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            break
        name, inline, _ = token.partition("=")
        if (param := options.get(name)) is None:
            continue
        values = [] if param.is_flag or inline else [next(tokens, "") for _ in range(param.nargs)]
        if param.nargs > 1 and not all(_is_number(value) for value in values):
            given = " ".join(value for value in values if value and not value.startswith("-"))
            raise typer.BadParameter(f"write {name} {param.metavar}: {param.nargs} numbers separated by spaces, "
                                     f"not {given!r}", param_hint=f"'{name}'")
        if param.is_flag:
            continue
        given = " ".join([token, *values])
        if param.name in seen and not param.multiple:
            raise typer.BadParameter(f"given twice ({seen[param.name]}, then {given}): give it once",
                                     param_hint=f"'{name}'")
        seen[param.name] = given


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parameter(flag: Flag) -> inspect.Parameter:
    meta = flag.meta
    help = meta.get("help", "")
    if meta.get("settings") == "shared":
        help += f" Env CAICTL_{flag.name.upper()}, or `{flag.name}:` in caictl.yaml."
    elif meta.get("settings") == "stage":
        help += f" Or `{flag.name}:` in caictl.yaml."
    if meta.get("settings") and flag.default not in (None, MISSING):
        # The flag's own default is None (unset, so the settings can fill it): the dataclass's is shown instead.
        help += f"  [default: {flag.default}]"
    absent = None if meta.get("settings") or flag.default in (MISSING, []) else flag.default
    if meta.get("invert"):
        absent = not absent
    default = ... if flag.required else absent
    if meta.get("argument"):
        info = typer.Argument(default, help=help, metavar=flag.name.upper(), show_default=default not in (None, ...))
    else:
        metavar = meta.get("metavar", METAVARS.get(flag.kind, "TEXT"))
        info = typer.Option(default, *flag.decls, help=help, rich_help_panel=meta["panel"], metavar=metavar,
                            show_default=default not in (None, ...))
    kind = flag.kind if default is not None else Optional[flag.kind]
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
