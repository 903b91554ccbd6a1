"""The ``lorafit`` console script (also ``python -m lorafit`` and ``torchrun -m lorafit``).

Subcommands are a registry: ``COMMANDS`` maps a name to ``("module:attribute", one-line help)``.
The attribute is a :class:`lorafit.jobs.commands.Command` (``description``, ``epilog``,
``add_arguments(parser)``, ``run(args) -> int``). Only the invoked command's module is imported,
so ``lorafit info`` does not pay for transformers and a command needing an optional extra
fails alone. Adding a subcommand is one line here.

Errors: anything raised as :class:`lorafit.common.errors.LorafitError` (bad input, bad flag
value) prints ``lorafit: error: <one line>`` and exits with its ``exit_code`` (2 for usage and
input errors), never a traceback. Argparse's own errors are turned into the same single line,
with the one prefix (``lorafit: error: unrecognized arguments: --warp (see lorafit train --help)``).

``lorafit`` alone prints this help and exits 0, as other multi-command tools do; the embedded
demo is ``lorafit train`` with no arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap
import time

from lorafit._version import __version__
from lorafit.common.errors import LorafitError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lorafit.jobs.commands:TRAIN", "fine-tune a LoRA adapter (no arguments: the embedded demo)"),
    "eval": ("lorafit.jobs.commands:EVAL", "evaluate an adapter or a merged model on a data file"),
    "merge": ("lorafit.jobs.commands:MERGE", "merge an adapter into its base model and save it"),
    "info": ("lorafit.jobs.commands:INFO", "describe an adapter directory"),
    "export": ("lorafit.export.cli:EXPORT", "merge an adapter into a copy of its base: ONNX, TorchScript, GGUF"),
    "demo": ("lorafit.demo:DEMO", "offline end-to-end demos (`lorafit demo detect`: YOLO + LoRA + export)"),
    "serve": ("lorafit.serve.cli:SERVE", "serve a base model and a directory of adapters over HTTP (OpenAI API)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        # the prefix is _say_error's alone: "lorafit: error: lorafit train: ..." said it twice
        raise LorafitError(f"{message} (see {self.prog} --help)")


def _load_command(name: str):
    target, _ = COMMANDS[name]
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise LorafitError(f"`lorafit {name}` needs a package that is not installed ({exc})") from None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The top-level parser; only the subcommand named in ``argv`` gets its arguments."""
    parser = _Parser(
        prog="lorafit",
        description="LoRA fine-tuning: train, evaluate, merge and inspect adapters.",
        epilog="Run `lorafit COMMAND --help` for the options of a command. "
        "Start with `lorafit train` (no arguments: the embedded demo).",
    )
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        if name == chosen:
            cmd = _load_command(name)
            p = sub.add_parser(
                name,
                help=help_text,
                description=textwrap.fill(cmd.description, 100),
                epilog=cmd.epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _say_error(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for everyone
        sys.stdout.flush()
        print(f"lorafit: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 training diverged, 2 bad input, 128+N signal).

    A process started by torchrun does not return: it ends here with ``os._exit`` (see
    :func:`_leave_torchrun_worker`).
    """
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        _leave_torchrun_worker(code)
    return code


def _leave_torchrun_worker(code: int) -> None:
    """Flush and ``os._exit(code)``: skip interpreter shutdown in a torchrun worker.

    Gloo's worker threads release finished collectives asynchronously; when the last one held
    tensors created in Python (``all_gather_object`` does), the release needs the GIL. If the main
    thread is already finalizing the interpreter, that thread is torn down mid-destructor and the
    C++ runtime aborts ("terminate called without an active exception", SIGABRT) after every file
    was written: 3 runs in about 70 under CPU contention, seen with gdb on a core dump. Every output
    is written atomically and closed before this point, so nothing is lost by not finalizing.

    Rank 0 alone prints an error, and torchrun kills the other workers as soon as one fails, so a
    failing rank other than 0 waits a moment first: rank 0's one-line message must get out.
    """
    if code != 0 and os.environ.get("RANK", "0") != "0":
        time.sleep(3.0)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        if not argv:  # bare `lorafit`: what the commands are, not a training run
            parser.print_help()
            return 0
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would point at the top-level help; the command's help lists its flags
            where = f"lorafit {args.command}" if getattr(args, "command", None) else "lorafit"
            raise LorafitError(f"unrecognized arguments: {' '.join(unknown)} (see {where} --help)")
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        run = args._run
        del args._run, args.command
        return int(run(args) or 0)
    except LorafitError as exc:
        _say_error(" ".join(str(exc).split("\n")))
        return exc.exit_code
    except KeyboardInterrupt:
        _say_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
