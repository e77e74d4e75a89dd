"""The ``epplat`` command: serve | plugins | make-model | bench | proxy, and the plugins' commands (ranktable).

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
    from epplat.tools import bench_serve, make_model
    serve.add_cli(sub)
    plugins_cli.add_cli(sub)
    make_model.add_cli(sub)
    from epplat.connectors import proxy
    proxy.add_cli(sub)
    bench = sub.add_parser("bench", help="benchmarks (bench serve: load generator for a running server)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=Parser)
    bench_serve.add_cli(bench_sub)
    bench.set_defaults(func=lambda a: bench.print_help() or 2)
    _plugin_commands(sub)
    return parser


def _plugin_commands(sub) -> None:
    """Subcommands from the plugins' ``epplat_cli_commands`` hook (ascend: ranktable). A plugin whose
    hook fails loses its commands, with one line on stderr; the other commands stay."""
    from epplat.plugins import registry
    for impl in registry().pm.hook.epplat_cli_commands.get_hookimpls():
        try:
            impl.function(subparsers=sub)
        except Exception as e:
            sys.stderr.write(f"epplat: warning: plugin {impl.plugin_name} could not add its commands: "
                             f"{type(e).__name__}: {e}\n")


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
