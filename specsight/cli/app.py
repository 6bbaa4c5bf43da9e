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
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from ..errors import SpecError, SpecsightError, printable

__all__ = ["main", "guard", "json_option", "strict_json", "verbosity_options", "check_verbosity"]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specsight")
def main() -> None:
    """Run declarative intervention experiments on PyTorch / Hugging Face models."""
