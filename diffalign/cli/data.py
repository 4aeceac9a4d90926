"""``diffalign data``: preference-data tools. ``filter`` is FiFA (``diffalign.fifa.filter_preferences``)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", required=True)
    sub = commands.add_parser(
        "filter",
        help="FiFA: keep the pairs with the largest reward margin, best prompts and most diverse prompts",
        description="FiFA (Yang et al., ICLR 2025): select a subset of preference pairs by importance score "
        "(standardised reward margin + alpha * text quality + gamma * kNN diversity); writes the subset in the "
        "input's format and a report (report.json, report.md, fifa.png). Python: diffalign.fifa.filter_preferences.",
    )
    sub.add_argument("input", help="a registered preference set (e.g. shapes-prefs), a .jsonl file, parquet")
    sub.add_argument("--output", required=True, help="the subset, in the input's format (must not exist)")
    size = sub.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="keep this share of the pairs, in (0, 1]")
    size.add_argument("--count", type=int, help="keep this many pairs")
    sub.add_argument(
        "--reward", help="reward for the margins (default: the set's registered default, else pickscore)"
    )
    sub.add_argument(
        "--reward-option",
        action="append",
        metavar="KEY=VALUE",
        help="reward option, e.g. checkpoint=/models/PickScore_v1 (repeatable)",
    )
    sub.add_argument(
        "--text-quality", help="text-quality scorer: lm:PATH, or a registered one (shapes-grammar)"
    )
    sub.add_argument("--alpha", type=float, default=1.0, help="weight of text quality (default 1; 0: off)")
    sub.add_argument(
        "--gamma", type=float, default=1.0, help="weight of prompt diversity (default 1; 0: off)"
    )
    sub.add_argument("--k", type=int, default=5, help="neighbour rank of the kNN entropy (default 5)")
    sub.add_argument("--batch-size", type=int, default=16, help="pairs scored at once (default 16)")
    sub.add_argument(
        "--report", help="folder for report.json, report.md, fifa.png (default: OUTPUT-STEM-fifa/)"
    )
    sub.add_argument("--model", help="the model the data is meant for (checked against a registered set)")
    sub.add_argument("--seed", type=int, default=0, help="breaks ties between equal scores (default 0)")
    sub.add_argument("--device", default="cpu", help="where the reward runs (default cpu)")
    sub.set_defaults(handler=cmd_filter)


def cmd_filter(args: argparse.Namespace) -> int:
    from diffalign import fifa
    from diffalign.cli.args import parse_options

    config = fifa.FiFAConfig(
        fraction=args.fraction,
        count=args.count,
        reward=args.reward,
        reward_options=parse_options(args.reward_option),
        text_quality=args.text_quality,
        alpha=args.alpha,
        gamma=args.gamma,
        k=args.k,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    _, summary = fifa.filter_preferences(
        args.input, args.output, config, report_dir=args.report, model=args.model
    )
    print(fifa.report_markdown(summary), end="")
    print(f"wrote {args.output} ({summary['kept']} pairs) and the report")
    return 0
