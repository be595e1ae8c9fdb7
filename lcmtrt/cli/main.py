"""The `lcmtrt` command: the parser of every command group and the dispatch. User mistakes print one line and
exit with code 2."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from lcmtrt.cli.args import Parser
from lcmtrt.cli.bench import add_bench_command, cmd_bench
from lcmtrt.cli.build import add_build_commands, add_bundle_commands, cmd_build, cmd_presets, cmd_verify
from lcmtrt.cli.infer import add_infer_command, cmd_infer
from lcmtrt.cli.serve import add_serve_commands, cmd_bench_serve, cmd_serve
from lcmtrt.errors import UserError

COMMANDS = {"build-engines": cmd_build, "infer": cmd_infer, "bench": cmd_bench, "verify": cmd_verify,
            "presets": cmd_presets, "serve": cmd_serve, "bench-serve": cmd_bench_serve}


def build_parser() -> Parser:
    parser = Parser(prog="lcmtrt", description="TensorRT-compiled Latent Consistency Models")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_build_commands(commands)
    add_infer_command(commands)
    add_bench_command(commands)
    add_bundle_commands(commands)
    add_serve_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lcmtrt")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    root.propagate = False
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"lcmtrt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what the file system refused that no check above foresaw (name too long, disk full, ...)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lcmtrt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcmtrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
