"""Argument parsing and dispatch of the dataset-building subcommands (``caption``, ``perturb``, ``perturb-prompt``,
``hybrid``, ``convert``); the work is in :mod:`data_tools.jobs`, :mod:`data_tools.resumable` and
:mod:`data_tools.convert`.

Resume: rerun the same command line; ``--batch-size`` and ``--device`` may change between runs, every other option
must match the unfinished run's (recorded in ``OUTPUT.partial.jsonl``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from data_tools.caption import DEFAULT_TEMPLATE
from data_tools.perturb import LEVELS

_JOBS = ("caption", "perturb", "perturb-prompt", "hybrid")


def _io(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("input", help="one Pick-a-Pic-layout .parquet file")
    cmd.add_argument("output", help="output .parquet file (progress kept in OUTPUT.partial.jsonl until done)")
    cmd.add_argument("--batch-size", type=int, default=8, help="rows per model call (default 8)")
    cmd.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")


def _captioner_args(cmd: argparse.ArgumentParser, flag: str) -> None:
    cmd.add_argument(flag, required=True, dest="captioner",
                     help="VLM: local folder or hub id, or a registered captioner (toy: the toy detector)")  # fmt: skip
    cmd.add_argument("--task", choices=["image-text-to-text", "image-to-text"], default=None,
                     help="pipeline task (default: the one this transformers has)")  # fmt: skip
    cmd.add_argument("--template", default=DEFAULT_TEMPLATE,
                     help="captioning prompt; {prompt} is replaced by the pair's caption column")  # fmt: skip
    cmd.add_argument("--max-new-tokens", type=int, default=60)
    cmd.add_argument("--prompt-column", default="caption", help="column substituted for {prompt}")


def _perturber_args(cmd: argparse.ArgumentParser, model_flag: str) -> None:
    cmd.add_argument("--level", required=True, choices=LEVELS)
    cmd.add_argument(model_flag, dest="perturber", default=None,
                     help="perturbation model folder or hub id, or 'lexicon' (default: lexicon, no model)")  # fmt: skip
    cmd.add_argument("--mode", choices=["lexicon", "dipper", "instruct"], default=None,
                     help="lexicon (offline word swaps), dipper (seq2seq DIPPER) or instruct (causal LM); "
                     "default: lexicon without a model, dipper with one")  # fmt: skip
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--vocabulary", action="append", default=[], metavar="CATEGORY=WORD,WORD,...",
                     help="lexicon mode: replace words of CATEGORY (colour, count, object, relation) only with these "
                     "words, e.g. the ones the model knows (repeatable)")  # fmt: skip
    cmd.add_argument("--perturb-max-new-tokens", type=int, default=None)


def add_build_commands(sub: Any) -> None:
    """Add the dataset-building subparsers to ``sub`` (the ``diffalign-data`` subparsers)."""
    cmd = sub.add_parser("caption", help="caption jpg_0 / jpg_1 into caption_0 / caption_1 with a VLM (DCPO-c)")
    _io(cmd)
    _captioner_args(cmd, "--model")
    cmd = sub.add_parser("perturb", help="perturb captions (the loser's by default) at a level")
    _io(cmd)
    _perturber_args(cmd, "--model")
    cmd.add_argument("--column", default="loser",
                     help="column to perturb in place; 'loser' (default) = caption_1 when label_0 == 1, caption_0 "
                     "when label_0 == 0, ties skipped")  # fmt: skip
    cmd = sub.add_parser("perturb-prompt", help="DCPO-p: winner caption = prompt, loser = perturbed prompt")
    _io(cmd)
    _perturber_args(cmd, "--model")
    cmd.add_argument("--prompt-column", default="caption")
    cmd = sub.add_parser("hybrid", help="DCPO-h: caption both images, perturb the loser's caption")
    _io(cmd)
    _captioner_args(cmd, "--captioner")
    _perturber_args(cmd, "--perturber")
    cmd = sub.add_parser("convert", help="Pick-a-Pic parquet <-> image files + pairs.jsonl")
    cmd.add_argument("direction", choices=["to-folder", "to-parquet"])
    cmd.add_argument("source", help="to-folder: a parquet file; to-parquet: a JSONL file or a folder with pairs.jsonl")
    cmd.add_argument("destination", help="to-folder: a new folder; to-parquet: the parquet file to write")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"input", "output", "batch_size", "device", "command"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _perturber(args: argparse.Namespace):
    from data_tools.perturb import make_perturber

    model = None if args.perturber in (None, "lexicon") else args.perturber
    mode = args.mode or ("dipper" if model else "lexicon")
    return make_perturber(mode, args.level, model=model, seed=args.seed, device=args.device,
                          max_new_tokens=args.perturb_max_new_tokens, vocabulary=args.vocabulary)  # fmt: skip


def _captioner(args: argparse.Namespace):
    from data_tools.caption import build_captioner

    return build_captioner(args.captioner, task=args.task, template=args.template,
                           max_new_tokens=args.max_new_tokens, device=args.device,
                           batch_size=2 * args.batch_size)  # fmt: skip


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`~data_tools.resumable.run_row_job` keyword arguments of a parsed job command (models loaded)."""
    from data_tools import jobs

    prompt = getattr(args, "prompt_column", None)
    if args.command in ("caption", "hybrid") and "{prompt}" not in args.template:
        prompt = None
    if args.command == "caption":
        process = jobs.caption_process(_captioner(args), prompt_column=prompt)
        read, new = ["jpg_0", "jpg_1", *([prompt] if prompt else [])], ["caption_0", "caption_1"]
    elif args.command == "perturb":
        process = jobs.perturb_process(_perturber(args), args.column)
        read = ["label_0", "caption_0", "caption_1"] if args.column == "loser" else [args.column]
        new = ["caption_0", "caption_1"] if args.column == "loser" else [args.column]
    elif args.command == "perturb-prompt":
        process = jobs.perturb_prompt_process(_perturber(args), prompt)
        read, new = ["label_0", prompt], ["caption_0", "caption_1"]
    else:
        process = jobs.hybrid_process(_captioner(args), _perturber(args), prompt_column=prompt)
        read, new = ["jpg_0", "jpg_1", "label_0", *([prompt] if prompt else [])], ["caption_0", "caption_1"]
    return {"job": args.command, "options": _options(args), "read_columns": read, "new_columns": new,
            "process": process, "batch_size": args.batch_size, "producer": jobs.PRODUCER}  # fmt: skip


def run_build_command(args: argparse.Namespace) -> int:
    """Run a parsed build command; print the summary (stdout) or a one-line error (stderr)."""
    from data_tools.convert import folder_to_parquet, parquet_to_folder
    from data_tools.resumable import open_input, run_row_job
    from diffalign.data.pickapic import PreferenceDataError  # here, not at the top: --help imports no torch

    try:
        if args.command == "convert":
            if args.direction == "to-folder":
                n = parquet_to_folder(args.source, args.destination)
            else:
                n = folder_to_parquet(args.source, args.destination)
            print(f"convert {args.direction}: {n} rows from {args.source} written to {args.destination}.")
            return 0
        assert args.command in _JOBS
        job = build_job_checked(args, open_input)
        summary = run_row_job(args.input, args.output, **job)
        print(summary.text(args.command))
        return 0
    except (PreferenceDataError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def build_job_checked(args: argparse.Namespace, open_input: Any) -> dict[str, Any]:
    """Check the input's columns before loading any model, then :func:`build_job`."""
    from data_tools.jobs import PRODUCER

    if args.command == "perturb":
        needed = ["label_0", "caption_0", "caption_1"] if args.column == "loser" else [args.column]
    elif args.command == "perturb-prompt":
        needed = ["label_0", args.prompt_column]
    else:
        needed = ["jpg_0", "jpg_1"] + (["label_0"] if args.command == "hybrid" else [])
    if args.command in ("caption", "hybrid") and "{prompt}" in args.template:
        needed.append(args.prompt_column)
    open_input(args.input, needed, PRODUCER)
    return build_job(args)
