"""The ``diffalign`` command: ``demo``, ``evidence offline|flow|llm|online|soar|sail|flux|nft``, ``toy pretrain``,
``toy pairs``, ``train``. ``--debug`` (anywhere) shows the traceback of an error; without it an error is one
``error:`` line."""

from __future__ import annotations

import argparse
import json
import sys

from diffalign.errors import DiffalignError
from diffalign.utils.cli_errors import print_error, run_cli

# = diffalign.toy.pairs.PAIR_KINDS (tests/test_cli_errors.py checks): importing it would import torch for --help
PAIR_KINDS: tuple[str, ...] = ("colour", "independent", "on_policy")
# = the keys of diffalign.toy.evidence_commands.COMMANDS (same check, same reason)
EVIDENCE_FAMILIES: tuple[str, ...] = ("offline", "flow", "llm", "online", "soar", "sail", "flux", "nft")


def main(argv: list[str] | None = None) -> int:
    """``diffalign``: ``argv`` (default ``sys.argv[1:]``) -> exit status (docs/cli.md)."""
    return run_cli(_run, argv)


def _run(argv: list[str]) -> int:
    if argv[:1] == ["train"]:  # everything after `train` is scripts/train.py's (its --help lists the config keys)
        return _train(argv[1:])
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="toy world: base -> Diffusion-DPO -> adherence before/after, grid, report")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--n-per-prompt", type=int, default=16)
    demo.add_argument("overrides", nargs="*", help="config overrides for configs/toy/dpo.yaml (key=value)")

    evidence = sub.add_parser("evidence", help="train every method of a family on the toy world and report")
    evidence.add_argument("family", choices=EVIDENCE_FAMILIES)
    evidence.add_argument("--output-dir", default=None)
    evidence.add_argument("--methods", default=None, help="comma-separated subset")
    evidence.add_argument("--n-per-prompt", type=int, default=16)
    evidence.add_argument("--segments", type=int, default=None,
                          help="online, soar: evaluations along each run (default 5 online, 8 soar)")  # fmt: skip
    evidence.add_argument("--pairs", choices=PAIR_KINDS, default=None,
                          help="offline, flow: toy pair kind (on_policy: judged base samples)")  # fmt: skip
    evidence.add_argument("--seeds", type=int, default=1,
                          help="training seeds 0..N-1, a run each; the report is their mean, min, max")  # fmt: skip
    evidence.add_argument("--merge", default=None, metavar="DIR,DIR,...",
                          help="no training: the mean report of finished runs, one training seed each")  # fmt: skip
    evidence.add_argument("overrides", nargs="*",
                          help="config overrides: key=value for every method, METHOD:key=value for one")  # fmt: skip

    toy = sub.add_parser("toy", help="toy-world tools")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pre = toy_sub.add_parser("pretrain", help="pretrain the toy base model (see diffalign.toy.pretrain)")
    pre.add_argument("args", nargs=argparse.REMAINDER)
    pairs = toy_sub.add_parser("pairs", help="write toy preference pairs as a Pick-a-Pic parquet")
    pairs.add_argument("path")
    pairs.add_argument("--n-pairs", type=int, default=2000)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument(
        "--kind",
        choices=PAIR_KINDS,
        default="colour",
        help="loser: recoloured copy, independent, or a base sample of the wrong colour (on_policy)",
    )
    pairs.add_argument("--label-noise", type=float, default=0.0, help="fraction of labels flipped (human-like)")

    sub.add_parser("train", help="same as scripts/train.py: --config FILE [key=value ...] (see train --help)")

    # Overrides may come before or after options (argparse alone binds the positional list before them).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("demo", "evidence") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "evidence" and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1 training seed")
    if args.command in ("demo", "evidence", "toy"):
        _quiet_toy_loading()
    if args.command == "demo":
        _demo(args)
    elif args.command == "evidence":
        _evidence(args)
    elif args.command == "toy":
        return _toy(args)
    return 0


def _quiet_toy_loading() -> None:
    """The toy commands load tiny models dozens of times: transformers' per-load "Loading weights" bars would bury
    the run's own progress bars and its summary."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


# The toy front-end commands (demo, evidence, toy) are the only product code that imports diffalign.toy, lazily
# (tests/test_toy_plugin_boundary.py checks).
def _demo(args: argparse.Namespace) -> None:
    from diffalign.toy.demo import run_demo

    run_demo(args.output_dir, n_per_prompt=args.n_per_prompt, overrides=args.overrides)


def _toy(args: argparse.Namespace) -> int:
    if args.toy_command == "pretrain":
        from diffalign.toy.pretrain import main as pretrain_main

        pretrain_main(args.args)
        return 0
    from diffalign.toy.pairs import make_preference_pairs

    try:
        noise = args.label_noise
        path = make_preference_pairs(args.path, args.n_pairs, args.seed, kind=args.kind, label_noise=noise)
    except ValueError as err:  # --n-pairs < 1, --label-noise outside [0, 0.5)
        print_error(err)
        return 2
    print(path)
    return 0


def _train(argv: list[str]) -> int:
    from diffalign.config import build_arg_parser, parse_cli

    config = parse_cli(argv, parser=build_arg_parser(prog="diffalign train"))
    from diffalign.trainers.run import train as run_train

    result = run_train(config)
    print(json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step}))
    return 0


def _evidence(args: argparse.Namespace) -> None:
    import functools

    from diffalign.toy.configs import check_override_scopes
    from diffalign.toy.evidence_commands import COMMANDS

    family = COMMANDS[args.family]
    output_dir = args.output_dir or f"outputs/evidence/{args.family}"
    if args.merge is not None:  # no training: the mean report of finished one-seed runs
        from diffalign.toy.seeds import format_seed_ranges, merge_seed_reports

        _check_merge_flags(args)
        format_report = family.load(family.format_report)
        dirs = [d for d in args.merge.split(",") if d]
        report = merge_seed_reports(dirs, output_dir, format_report=format_report, checks=family.load(family.checks))
        print(format_report(report) + format_seed_ranges(report))
        return
    kwargs = {"methods": args.methods.split(",") if args.methods else None, "n_per_prompt": args.n_per_prompt}
    if family.segmented and args.segments is not None:
        kwargs["segments"] = args.segments
    if args.pairs is not None:
        if not family.paired:
            raise DiffalignError(f"--pairs: `evidence {args.family}` trains on no toy preference pairs; drop it")
        kwargs["pairs"] = args.pairs
    check_override_scopes(args.overrides)  # before the base is judged: a typo fails in a second, not minutes
    run, format_report = family.load(family.run), family.load(family.format_report)
    if args.seeds == 1:
        print(format_report(run(output_dir, overrides=args.overrides, **kwargs)))
        return
    from diffalign.toy.seeds import format_seed_ranges, run_over_seeds

    report = run_over_seeds(
        functools.partial(run, **kwargs),
        output_dir,
        range(args.seeds),
        format_report=format_report,
        checks=family.load(family.checks),
        overrides=args.overrides,
    )
    print(format_report(report) + format_seed_ranges(report))


def _check_merge_flags(args: argparse.Namespace) -> None:
    if args.overrides or args.seeds != 1 or args.methods or args.pairs or args.segments is not None:
        raise DiffalignError("--merge trains nothing: drop the overrides, --seeds, --methods, --pairs and --segments")


if __name__ == "__main__":
    sys.exit(main())
