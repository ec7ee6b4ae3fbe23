"""The `fedge` command: one CLI, one subcommand per role.

Each role keeps its own `cli.py` exposing `register(subparsers)`; those modules
import nothing heavy at module level, so `fedge --version` stays instant and a
role's dependencies load only when that role runs.
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
