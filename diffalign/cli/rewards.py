"""``diffalign rewards``: the registered rewards (``diffalign.rewards.available()``)."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="as JSON (name, differentiable, description, ...)"
    )
    parser.set_defaults(handler=cmd_rewards)


def reward_table() -> str:
    from diffalign import rewards

    return "\n".join(
        f"  {item.name:<24} {'differentiable' if item.differentiable else '              '}  {item.description}"
        for item in rewards.available()
    )


def cmd_rewards(args: argparse.Namespace) -> int:
    from diffalign import rewards

    if args.json:
        entries = [
            {
                "name": r.name,
                "differentiable": r.differentiable,
                "description": r.description,
                "needs_checkpoint": r.needs_checkpoint,
            }
            for r in rewards.available()
        ]
        print(json.dumps(entries, indent=2))
    else:
        print(reward_table())
    return 0
