"""The ``forksafe`` command: ``forksafe repro`` and ``forksafe doctor``.

Each subcommand lives in its own module, imported only when it runs, so that a missing
optional dependency of one command never breaks another. A command module provides
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "repro": (
        "forksafe.testing.repro",
        "run real workers under real servers and show fork corruption with and without forksafe",
    ),
    "doctor": (
        "forksafe.doctor",
        "check a deployment for causes of 'server has gone away' and fork corruption",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forksafe`` console script and of ``python -m forksafe``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="forksafe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                print(f"forksafe {name}: {exc}", file=sys.stderr)
                return 2
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(run=module.run)
    args = parser.parse_args(args_list)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
