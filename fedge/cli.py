"""The `fedge` command: one CLI, one subcommand per role.

Each role keeps its own `cli.py` exposing `register(subparsers)`; those modules
import nothing heavy at module level, so `fedge --version` stays instant and a
role's dependencies load only when that role runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fedge import __version__

# (module, what it adds). Order is the order of `fedge --help`.
_ROLE_MODULES: tuple[str, ...] = (
    "fedge.coordinator.cli",
    "fedge.agent.cli",
    "fedge.console.cli",
    "fedge.serve.cli",
    "fedge.demo_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge",
        description="Federated learning for hospitals: coordinator, appliance agent, "
        "console, ONNX serving.",
    )
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    parser.add_argument(
        "--log-level", metavar="LEVEL", type=_log_level_option, default=None,
        help="log level of the daemons (agent run, coordinator run, serve): DEBUG, INFO, "
        "WARNING or ERROR; overrides $FEDGE_LOG_LEVEL; default INFO. DEBUG writes detail "
        "the journal otherwise lacks, a data cell's value among it",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _ROLE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


SIGINT_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what `cmd | head` gives for a Unix tool


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `fedge` command; its exit status.

    Whatever the command: Ctrl-C, even while its modules are still importing, exits
    130 without a traceback; a reader that stops reading (`| head`) ends it quietly
    (141, as SIGPIPE ends other Unix tools); and what it printed is flushed before it
    exits, so that buffered output it could not write (a full disk) is an error, not
    rc 0.
    Refused with 2 when standard output is closed (`>&-`): the command's result (a
    job id) would be lost, and the next file opened would take descriptor 1."""
    try:
        if sys.stdout is None or not _open(1):
            print("fedge: standard output (file descriptor 1) is closed, so what this "
                  "command prints would be lost; give it one (>/dev/null to discard it)",
                  file=sys.stderr)
            return 2
        try:
            status = _command(argv)
        except SystemExit as exc:  # argparse: --help and --version print, then exit
            if not isinstance(exc.code, int | None):
                raise
            status = exc.code or 0
        failed = _stdout_fails()
        return status if failed is None else _unwritten(failed)
    except KeyboardInterrupt:
        return SIGINT_STATUS
    except BrokenPipeError:
        _stdout_to_devnull()
        return SIGPIPE_STATUS


def _log_level_option(value: str) -> str:
    from fedge.systemd import log_level

    try:
        log_level(value, what="--log-level")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value.strip().upper()


# Options whose value is a Z85 CURVE key: 40 characters from an alphabet holding '-',
# so about one key in 85 begins with '-', and argparse takes such a value for an option
# ("--curve-public: expected one argument"). A 40-character value after one of these
# is joined to it (`--curve-public=KEY`), which argparse reads whatever it begins with;
# the parsers that take one do not accept abbreviations (`--curve KEY` would not be
# joined).
_Z85_KEY_OPTIONS = frozenset({"--curve-public"})
Z85_KEY_CHARS = 40


def join_key_values(argv: Sequence[str]) -> list[str]:
    """`argv` with each Z85-key option joined to its 40-character value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg in _Z85_KEY_OPTIONS and i + 1 < len(argv)
                and len(argv[i + 1].strip()) == Z85_KEY_CHARS):  # pasted with a space
            out.append(f"{arg}={argv[i + 1].strip()}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_key_values(sys.argv[1:] if argv is None else argv))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from fedge.systemd import LOG_LEVEL_ENV, log_level

    if args.log_level is not None:
        # the daemons' setup_logging reads it, as it reads the unit's Environment=
        os.environ[LOG_LEVEL_ENV] = args.log_level
    elif os.environ.get(LOG_LEVEL_ENV, "").strip():
        # refused here, by name, rather than as a traceback from a daemon's start
        try:
            log_level(os.environ[LOG_LEVEL_ENV], what=f"${LOG_LEVEL_ENV}")
        except ValueError as exc:
            print(f"fedge: {exc}", file=sys.stderr)
            return 2
    return int(func(args) or 0)


def _stdout_fails() -> OSError | None:
    """Flush stdout: the error if what is buffered cannot be written (a broken pipe is
    raised)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        return exc
    return None


def _unwritten(exc: OSError) -> int:
    _stdout_to_devnull()  # so that the exit does not fail on it again
    print(f"fedge: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
    return 1


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _stdout_to_devnull() -> None:
    """Point descriptor 1 at /dev/null, so that the interpreter's own flush at exit
    does not fail again on the closed pipe and print "Exception ignored"."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (in-process callers)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
