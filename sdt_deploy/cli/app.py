"""The `sdt-deploy` command line (click): the group, its commands (one module each, over the library),
and the error handling that turns every expected failure into one line on stderr and an exit status.

Set SDT_DEPLOY_DEBUG=1 to see the traceback of an unexpected failure.
"""
from __future__ import annotations

import gc
import os
import sys

import click

from sdt_deploy import __version__
from sdt_deploy.cli.demo import demo
from sdt_deploy.cli.export import export
from sdt_deploy.cli.inspect import inspect
from sdt_deploy.cli.quantize import quantize
from sdt_deploy.cli.report import report
from sdt_deploy.cli.run import run
from sdt_deploy.cli.verify import verify
from sdt_deploy.errors import DeployError, without_unsafe_advice


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdt-deploy")
def cli():
    """Deploy Spike-Driven Transformer checkpoints: inspect, run, quantize, export (NIR, ONNX),
    verify spike-exactness, and report operations and energy.

    CKPT defaults to the shipped demo checkpoint (an SDT trained on scikit-learn's digits)."""


for _command in (inspect, run, quantize, export, verify, report, demo):
    cli.add_command(_command)


def main(argv=None) -> int:
    """Entry point: one line on stderr and a non-zero exit for every expected failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="sdt-deploy", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("sdt-deploy: error: aborted", err=True)
        return 130
    except click.UsageError as exc:
        click.echo(f"sdt-deploy: error: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"sdt-deploy: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except DeployError as exc:
        click.echo(f"sdt-deploy: error: {_one_line(str(exc))}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sdt-deploy: error: interrupted; no partial output was left", err=True)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        # the system refused a file the library did not wrap (a folder it could not create, a file it
        # could not open): the user can act on the path and the reason, so it is no internal error
        if os.environ.get("SDT_DEPLOY_DEBUG"):
            raise
        click.echo(f"sdt-deploy: error: {_os_error(exc)}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("SDT_DEPLOY_DEBUG"):
            raise
        msg = _one_line(str(exc))
        click.echo(f"sdt-deploy: internal error: {type(exc).__name__}: {msg} "
                   "(set SDT_DEPLOY_DEBUG=1 for the traceback)", err=True)
        return 3


def _one_line(text: str) -> str:
    """The first line of a message, never with torch's advice to load with weights_only=False."""
    lines = text.strip().splitlines()
    return without_unsafe_advice(lines[0]) if lines else ""


def _os_error(exc: OSError) -> str:
    """'PATH': reason, in the operating system's words."""
    reason = os.strerror(exc.errno) if exc.errno else (_one_line(str(exc)) or type(exc).__name__)
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if isinstance(f, (str, bytes))]
    return f"{' -> '.join(repr(n) for n in names)}: {reason}" if names else reason


def entry() -> None:
    code = main()
    # Everything is written and closed by now. The interpreter's final garbage collections would walk
    # every object that torch and brevitas (its torch._dynamo) created, ~0.5 s of a user's wait on
    # each command; frozen, they are left to the OS.
    gc.freeze()
    sys.exit(code)
