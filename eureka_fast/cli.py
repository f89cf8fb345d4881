"""The `eureka-audio` command line. Each subcommand lives next to the code it drives and registers itself here.

Errors: `main` is the one place that turns an exception into what the user sees: one line on stderr,
`eureka-audio <command>: error: <what went wrong>`, and a non-zero exit status (2: the command line or its inputs
are wrong and nothing was done; 1: the work itself failed). The traceback is shown only with `--debug` (anywhere
on the command line) or `EUREKA_AUDIO_DEBUG=1`. Ctrl-C and SIGTERM print one line and exit with 130 / 143, after the
command has saved what it finished (subcommands catch KeyboardInterrupt where they have something to save).
Subcommands call `require(...)` before doing anything, so a missing optional package is named once, with the
pip command that installs it, instead of failing halfway through a run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import threading

# subcommand -> the module that defines add_subcommand(subparsers), which adds its parser and sets `func`.
_SUBCOMMAND_MODULES = {
    "bench": "eureka_fast.benchmarks",
    "infer": "eureka_fast.inference",
    "train": "eureka_fast.train.cli",
    "eval": "eureka_fast.train.cli",
    "dataflux": "eureka_fast.dataflux.cli",
    "serve": "eureka_fast.serve.cli",
    "doctor": "eureka_fast.doctor",
    "recipe": "eureka_fast.recipe.cli",
}
DEBUG_ENV = "EUREKA_AUDIO_DEBUG"
# Exit statuses of a command stopped by a signal, as a shell reports them (128 + signal number).
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class CommandError(Exception):
    """A problem the user can fix (a wrong argument, a missing input, a failed run); printed as one line.

    exit_code 2: the command line or its inputs are wrong and nothing was done; 1: the work failed."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class MissingDependency(CommandError):
    """Optional packages a command needs are not installed."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, re-raised by a command after it saved its work; the message says what was kept.
    signum: the signal, when the command's own handler caught it."""

    def __init__(self, message: str = "", signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def require(needs, command: str | None = None) -> None:
    """Check that optional packages are importable before a command starts any work.

    needs: (module, pip package, what it is for) triples. Raises MissingDependency naming every missing package
    and the pip command that installs them."""
    missing = []
    for module, package, purpose in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module with no spec
            found = False
        if not found and package not in [m[0] for m in missing]:
            missing.append((package, purpose))
    if not missing:
        return
    what = "; ".join(f"{package} ({purpose})" for package, purpose in missing)
    packages = " ".join(package for package, _ in missing)
    raise MissingDependency(f"missing optional package(s): {what}. Install with: pip install {packages} "
                            f"(or install eureka_fast with its [all] extra)")


# -------------------------------------------------------------------------------------------------- the parser
def build_parser(command=None) -> argparse.ArgumentParser:
    """The full parser, or only `command`'s part of it (so `eureka-audio dataflux ...` never imports torch)."""
    parser = argparse.ArgumentParser(prog="eureka-audio", description="Eureka-Audio: fast kernels, model, training, "
                                                                      "DataFlux")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (may be given anywhere; same as {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [_SUBCOMMAND_MODULES[command]] if command in _SUBCOMMAND_MODULES else _SUBCOMMAND_MODULES.values()
    for name in dict.fromkeys(names):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the package is not installed in this build
            raise
        module.add_subcommand(sub)
    return parser


def _command_name(args, argv) -> str:
    parts = [getattr(args, "command", None) or (argv[0] if argv else "")]
    for attr in ("dataflux_command",):
        if getattr(args, attr, None):
            parts.append(getattr(args, attr))
    return " ".join(["eureka-audio"] + [p for p in parts if p])


# -------------------------------------------------------------------------------------------------- errors
_USER_ERRORS = (CommandError, OSError, ValueError, ImportError, LookupError)


def describe_error(exc: BaseException) -> str:
    """One line for an exception: its message, with the type where the message alone would not say what failed."""
    if isinstance(exc, CommandError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, (ValueError, OSError)) and str(exc):
        text = str(exc)
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        text = f"missing package providing the module {exc.name!r} ({exc}); install it with pip, or install " \
               f"eureka_fast with its [all] extra"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())  # one line, whatever the message held


_received_signal: list[int] = []


def _on_sigterm(signum, frame):
    _received_signal.append(signum)
    raise KeyboardInterrupt  # the same path as Ctrl-C: commands save their finished work and stop


def _install_signal_handlers():
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not allowed here (embedded interpreters)
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if "--debug" in argv:  # accepted anywhere, so it can be added at the end of a failing command line
        debug = True
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = _command_name(args, argv)
    previous = _install_signal_handlers()
    _received_signal.clear()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None) or (_received_signal[-1] if _received_signal else signal.SIGINT)
        if debug:
            raise
        detail = " ".join(str(exc).split())
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        print(f"\n{name}: {what}" + (f"; {detail}" if detail else ""), file=sys.stderr)
        return EXIT_INTERRUPTED.get(signum, 130)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into a message
        if debug:
            raise
        line = f"{name}: error: {describe_error(exc)}"
        if not isinstance(exc, _USER_ERRORS):
            line += f" (an internal error; rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(line, file=sys.stderr)
        return exc.exit_code if isinstance(exc, CommandError) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    # run the imported module's main, so that the error classes subcommands raise are the ones main catches
    from eureka_fast.cli import main as _main

    sys.exit(_main())
