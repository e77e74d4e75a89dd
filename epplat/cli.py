"""The ``epplat`` command: serve | plugins | make-model | bench | ranktable | proxy.

Every subcommand reports a bad value as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="epplat", description="Expert-parallel serving for MoE models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    from epplat import plugins_cli, serve
    serve.add_cli(sub)
    plugins_cli.add_cli(sub)
    from epplat.platforms.ascend import ranktable_cli
    ranktable_cli.add_cli(sub)
    from epplat.core.model import make_model
    make_model.add_cli(sub)
    from epplat.connectors import proxy
    proxy.add_cli(sub)
    bench = sub.add_parser("bench", help="benchmarks (bench serve: load generator for a running server)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=Parser)
    try:
        from epplat import bench_serve
        bench_serve.add_cli(bench_sub)
    except ImportError:
        pass
    bench.set_defaults(func=lambda a: bench.print_help() or 2)
    return parser


def _version() -> str:
    from epplat import __version__
    return f"epplat {__version__}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
