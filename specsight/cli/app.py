"""The ``specsight`` command group and what every command shares: mapping errors to messages
and exit codes, the ``--json`` option, and strict JSON output.

Exit codes: 0 ok, 1 run failure, 2 bad spec or usage. ``-q``/``-v`` say less or more.
``--json`` prints results or errors as data on stdout (strict JSON: a NaN or infinite value is
written as null). A user mistake never
shows a traceback; an internal error does, labelled as one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from ..errors import SpecError, SpecsightError, printable

__all__ = [
    "main",
    "guard",
    "json_option",
    "strict_json",
    "terminal_console",
    "verbosity_options",
    "check_verbosity",
]

#: the width tables are laid out for off a terminal when COLUMNS does not say
PLAIN_WIDTH = 120


def terminal_console() -> Any:
    """A rich Console for stdout: on a terminal, its width (or ``COLUMNS``); off one (a CI
    log, a pipe, a file) tables are laid out for ``COLUMNS`` (else 120) columns and lines are
    never wrapped, so a claim's ``file:line:col`` stays on the line of its message."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False)
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) >= 20 else PLAIN_WIDTH
    return Console(highlight=False, width=width, soft_wrap=True, no_color=True)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def _emit_error(exc: SpecsightError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, **exc.to_dict()}, indent=2))
    elif isinstance(exc, SpecError):
        click.echo(printable(exc.render()), err=True)
    else:
        click.echo(printable(f"error: {exc}"), err=True)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn specsight errors into messages and exit codes; label anything else internal."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except SpecsightError as exc:
            _emit_error(exc, as_json)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a bug in specsight, not a user mistake
            if as_json:
                click.echo(
                    json.dumps({"ok": False, "error": "InternalError", "message": repr(exc)})
                )
            else:
                traceback.print_exc()
                click.echo(
                    printable(
                        f"internal error: {exc!r} (this is a bug in specsight; please report it)"
                    ),
                    err=True,
                )
            sys.exit(1)

    return wrapper


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print results or errors as JSON."
)


def verbosity_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-q/--quiet`` (errors and failures only) and ``-v/--verbose`` (more detail), passed to
    the command as ``quiet`` and ``verbose``; see :func:`check_verbosity`."""
    fn = click.option("-v", "--verbose", is_flag=True, help="Say more (see the command).")(fn)
    return click.option("-q", "--quiet", is_flag=True, help="Errors and failures only.")(fn)


def check_verbosity(quiet: bool, verbose: bool) -> None:
    """Both at once is a usage error (exit 2)."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other")


class _Group(click.Group):
    """The command group; with ``--json`` anywhere on the line, a usage error (an unknown
    option, a missing argument, a bad value) is printed as JSON on stdout too (exit 2)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or kwargs.get("standalone_mode") is False:
            return super().main(argv, *rest, **kwargs)
        try:
            code = super().main(argv, *rest, **{**kwargs, "standalone_mode": False})
        except click.UsageError as exc:
            hint = exc.ctx.command_path + " --help" if exc.ctx is not None else "specsight --help"
            body = {"ok": False, "error": "UsageError", "message": exc.format_message()}
            click.echo(json.dumps({**body, "hint": f"see {hint}"}, indent=2))
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(json.dumps({"ok": False, "error": type(exc).__name__, "message": exc.format_message()}, indent=2))  # fmt: skip
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(json.dumps({"ok": False, "error": "Aborted", "message": "aborted"}))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specsight")
def main() -> None:
    """Run declarative intervention experiments on PyTorch / Hugging Face models."""
