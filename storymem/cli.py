"""The `storymem` command line.

Each subcommand is a pair: `_add_<name>(subparsers)` declares its arguments and a `_cmd_<name>(args)`
returns the exit code; `COMMANDS` maps names to handlers. Exit codes: 0 success, 2 bad input.
Heavy modules are imported inside the handlers so that `storymem validate` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _print_errors(errors: list[tuple[str, str]]) -> None:
    for field, problem in errors:
        print(f"{field}: {problem}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# validate


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a story script (flat or ST-Bench form) without generating anything",
        description="Validate a story script and its settings; print every problem as FIELD: PROBLEM.",
    )
    p.add_argument("script", type=Path, help="story script JSON (optionally with a 'settings' object)")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="JSON file of generation settings; its fields override those given in the script file",
    )


def _load(args: argparse.Namespace):
    """The script file plus an optional --settings file, validated together (raises ScriptError)."""
    from pydantic import ValidationError

    from storymem.script import GenerationSettings, ScriptError, StoryRequest, load_request

    request = load_request(args.script)
    if args.settings is None:
        return request
    overrides = _read_settings(args.settings)
    merged = {**request.settings.model_dump(exclude_unset=True), **overrides}
    try:
        settings = GenerationSettings.model_validate(merged)
    except ValidationError as exc:
        raise ScriptError.from_validation_error(exc, prefix="settings") from None
    return StoryRequest(script=request.script, settings=settings)


def _cmd_validate(args: argparse.Namespace) -> int:
    from storymem.script import ScriptError

    try:
        request = _load(args)
    except ScriptError as exc:
        _print_errors(exc.errors)
        return EXIT_BAD_INPUT
    name = f" ({request.script.story_name})" if request.script.story_name else ""
    print(f"ok: {request.script.num_shots} shots{name}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# run


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="make a whole story in this process (no Ray): shots, keyframes, memory, final video",
        description="Generate a story into a folder. Re-running into a folder that holds finished "
        "shots continues from the first unfinished one.",
    )
    p.add_argument("script", type=Path, help="story script JSON (flat or ST-Bench form)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None, help="StoryMem config (YAML/JSON): models, memory, scoring")
    p.add_argument("--settings", type=Path, default=None, help="JSON file of generation settings overrides")
    p.add_argument("--shots", type=int, default=None, help="make only the first N shots (quick looks)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_run(args: argparse.Namespace) -> int:
    from storymem.config import load_config
    from storymem.local import run_story
    from storymem.script import ScriptError

    try:
        request = _load(args)
        if args.shots is not None:
            if not 1 <= args.shots <= request.script.num_shots:
                raise ScriptError([("--shots", f"must be between 1 and {request.script.num_shots}")])
            request.script.shots = request.script.shots[: args.shots]
        cfg = load_config(args.config)
    except ScriptError as exc:
        _print_errors(exc.errors)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as exc:
        print(f"--config: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        manifest = run_story(
            request, args.out, cfg, progress=not args.quiet, reference_base_dir=args.script.resolve().parent
        )
    except ScriptError as exc:  # e.g. settings.transition without a loaded LoRA set; nothing was written
        _print_errors(exc.errors)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:  # a configured model or LoRA file is missing
        print(f"--config: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if manifest.state != "done":
        print(f"story {manifest.state}: {manifest.error}", file=sys.stderr)
        return 1
    total = sum(sum(r.timings.values()) for r in manifest.shots)
    print(f"done: {manifest.shots_done} shots, {manifest.final_frames} frames -> {args.out / 'final.mp4'} ({total:.1f} s of shot work)")
    print(f"look at it: storymem board {args.out}")
    return EXIT_OK


def _read_settings(path: Path) -> dict:
    from storymem.script import ScriptError

    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ScriptError([("--settings", f"cannot read {path} ({exc.strerror or exc})")]) from None
    except json.JSONDecodeError as exc:
        raise ScriptError([("--settings", f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}")]) from None
    except UnicodeDecodeError as exc:
        raise ScriptError([("--settings", f"{path}: not UTF-8 text ({exc.reason})")]) from None
    if not isinstance(data, dict):
        raise ScriptError([("--settings", f"{path}: must hold a JSON object of settings")])
    return data


# ----------------------------------------------------------------------------------------------
# board


def _add_board(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "board",
        help="write a storyboard page (board.html) for a `storymem run` folder",
        description="Write OUT_DIR/board.html: the shots beside the script, each shot's video, the final "
        "video and the memory timeline (keyframes each shot added, the memory it was conditioned on). The "
        "page links the folder's files by relative paths and opens from disk without a server.",
    )
    p.add_argument("out_dir", type=Path, help="a folder written by `storymem run`")
    p.add_argument(
        "--compare", type=Path, default=None, metavar="DIR",
        help="the same story run with memory removed: shown beside OUT_DIR shot by shot",
    )  # fmt: skip


def _cmd_board(args: argparse.Namespace) -> int:
    from storymem.board import BoardError, write_board

    try:
        path = write_board(args.out_dir, args.compare)
    except BoardError as exc:
        print(f"out_dir: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"storyboard: {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# train and eval live beside their code; imported lazily so `validate` stays light.


def _add_train(sub: argparse._SubParsersAction) -> None:
    from storymem.training import add_train_parser

    add_train_parser(sub)


def _cmd_train(args: argparse.Namespace) -> int:
    from storymem.training import run_train

    return run_train(args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from storymem.evaluate import add_eval_parser

    add_eval_parser(sub)


def _cmd_eval(args: argparse.Namespace) -> int:
    from storymem.evaluate import run_eval

    return run_eval(args)


# ----------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "validate": (_add_validate, _cmd_validate),
    "run": (_add_run, _cmd_run),
    "board": (_add_board, _cmd_board),
    "train": (_add_train, _cmd_train),
    "eval": (_add_eval, _cmd_eval),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `only` declares just that subcommand (train and eval import torch to
    declare theirs, which `validate` should not pay for)."""
    parser = argparse.ArgumentParser(
        prog="storymem", description="StoryMem: multi-shot long video storytelling with memory."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _) in COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    _, handler = COMMANDS[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
