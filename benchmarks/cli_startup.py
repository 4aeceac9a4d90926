"""How long the ``diffalign`` command takes to answer when it does no work: ``diffalign --help``
and ``diffalign rewards``, each run as a fresh process several times (median, min and max of the
wall time). What it measures is import cost: every module a command imports before it answers.

    python -m diffalign.benchmarks.cli_startup                     # -> ./results/cli_startup/
    python -m diffalign.benchmarks.cli_startup --repeats 9 --output /tmp/startup

The command is run as ``python -m diffalign.cli`` with the interpreter running this script
(``--executable`` to time another one, e.g. an installed ``diffalign`` script), so the figures
do not depend on where the console script lies on PATH. Writes ``<output>/cli_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, list[str]] = {"--help": ["--help"], "rewards": ["rewards"]}


def time_command(prefix: list[str], arguments: list[str], repeats: int) -> dict:
    """Wall seconds of ``prefix + arguments`` over ``repeats`` fresh processes (each must succeed)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([*prefix, *arguments], capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(prefix + arguments)} failed ({result.returncode}):\n{result.stderr}"
            )
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "runs": seconds,
    }


def run(prefix: list[str], repeats: int, warmup: int = 1) -> dict:
    """Time every command of ``COMMANDS`` after ``warmup`` untimed runs (which fill the OS file cache)."""
    for _ in range(warmup):
        subprocess.run([*prefix, "--help"], capture_output=True, check=False)
    return {
        "command": prefix,
        "repeats": repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": {name: time_command(prefix, arguments, repeats) for name, arguments in COMMANDS.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per command (default 7)")
    parser.add_argument(
        "--executable",
        nargs="+",
        default=[sys.executable, "-m", "diffalign.cli"],
        help="the command to time (default: this Python with -m diffalign.cli)",
    )
    parser.add_argument(
        "--output", default="results/cli_startup", help="folder for cli_startup.json (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    result = run(args.executable, args.repeats)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "cli_startup.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    for name, figures in result["seconds"].items():
        print(
            f"diffalign {name:<8} median {figures['median']:.2f} s (min {figures['min']:.2f}, "
            f"max {figures['max']:.2f}, {args.repeats} runs)"
        )
    print(f"wrote {output / 'cli_startup.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
