"""Which AP@k the TextNorm authors' released TIA2 files hold, derived from their numbers alone.

Kim et al., ICLR 2024 (https://github.com/kykim0/TextNorm) released, per prompt and reward
model, ``ap5``, ``ap10`` and ``ap25`` — but not the scores behind them, nor the images. Without
ties, an AP@k value depends only on which of the k best scored images are aligned (a 0/1
pattern of length k) and on how the sum of precisions is normalised. This study enumerates
every pattern a prompt's labels allow (at most R aligned and N - R other images among the k,
from the released labels and our majority ground truth) and asks, per candidate normalisation,
whether some pattern gives the released value (to 1e-8). With s the sum of precision@i over
the aligned ranks i <= k and h the aligned images in the top k, the candidates are:

- ``hits``: s / h (0 when h = 0) — the mean precision over the aligned images in the top k;
- ``min(k,R)``: s / min(k, R) — the common recommender-systems AP@k;
- ``k``: s / k;
- ``R``: s / R — average precision truncated at k;
- ``mean P@i``: the mean of precision@1..k over every rank.

A value no pattern explains can still come from tied scores: ``explained_by_ties`` enumerates
tie groups as ``sklearn``'s average precision forms them (k <= 10 only: the space grows as
3^k). ``python -m diffalign.benchmarks.tia2_ap_definition DIR`` runs it on a folder laid out as
the release (``human_annotations/`` and ``alignment_scores/``); docs/tia2.md has the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from diffalign.benchmarks import tia2

from diffalign import outputs

NORMALISATIONS: tuple[str, ...] = ("hits", "min(k,R)", "k", "R", "mean P@i")
TOLERANCE = 1e-8
_CHUNK_BITS = 20  # patterns are enumerated 2^20 at a time (k = 25 has 2^25 of them)


@cache
def achievable(k: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per number of aligned images h in the top k: the sorted distinct sums s of precision at
    the aligned ranks, and the sorted distinct means of precision@1..k, over all 2^k patterns."""
    sums: dict[int, list[np.ndarray]] = defaultdict(list)
    means: dict[int, list[np.ndarray]] = defaultdict(list)
    ranks = np.arange(1, k + 1)
    step = 2 ** min(k, _CHUNK_BITS)
    for start in range(0, 2**k, step):
        codes = np.arange(start, start + step, dtype=np.int64)
        aligned = ((codes[:, None] >> np.arange(k)) & 1).astype(np.float64)  # [patterns, k]
        hits = np.cumsum(aligned, axis=1)
        precision = hits / ranks
        s = np.round((precision * aligned).sum(axis=1), 10)
        mean = np.round(precision.mean(axis=1), 10)
        h = hits[:, -1].astype(int)
        for count in np.unique(h):
            chosen = h == count
            sums[int(count)].append(np.unique(s[chosen]))
            means[int(count)].append(np.unique(mean[chosen]))
    return (
        {h: np.unique(np.concatenate(parts)) for h, parts in sums.items()},
        {h: np.unique(np.concatenate(parts)) for h, parts in means.items()},
    )


def _contains(values: np.ndarray, target: float) -> bool:
    index = np.searchsorted(values, target)
    return any(0 <= i < len(values) and abs(values[i] - target) < TOLERANCE for i in (index - 1, index))


def fits(value: float, k: int, n: int, r: int) -> dict[str, bool]:
    """For each normalisation, whether some top-k pattern allowed by ``n`` images of which ``r``
    are aligned gives ``value``."""
    sums, means = achievable(k)
    counts = [h for h in range(k + 1) if h <= r and k - h <= n - r]
    empty = np.empty(0)
    return {
        "hits": any(_contains(sums.get(h, empty), value * h) if h else value == 0 for h in counts),
        "min(k,R)": any(_contains(sums.get(h, empty), value * min(k, r)) for h in counts),
        "k": any(_contains(sums.get(h, empty), value * k) for h in counts),
        "R": any(_contains(sums.get(h, empty), value * r) for h in counts),
        "mean P@i": any(_contains(means.get(h, empty), value) for h in counts),
    }


@cache
def _tied_values(k: int, n: int, r: int) -> np.ndarray:
    values = set()
    for cuts in itertools.product((False, True), repeat=k - 1):  # where one tie group ends
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        sizes.append(size)
        for aligned in itertools.product(*(range(size + 1) for size in sizes)):
            h = sum(aligned)
            if h > r or k - h > n - r:
                continue
            seen = found = 0
            total = 0.0
            for size, group_aligned in zip(sizes, aligned):
                seen, found = seen + size, found + group_aligned
                total += group_aligned * found / seen
            values.add(round(total / h, 10) if h else 0.0)
    return np.array(sorted(values))


def explained_by_ties(value: float, k: int, n: int, r: int) -> bool:
    """Whether ``value`` is the ``hits`` AP@k of some top k with tied scores grouped as
    ``sklearn``'s average precision groups them (each tie one step). k <= 10."""
    if k > 10:
        raise ValueError(f"tie patterns are enumerated for k <= 10 only, got {k}")
    return _contains(_tied_values(k, n, r), value)


def derive(folder: str | Path, ks: Sequence[int] = tia2.TOP_K) -> dict:
    """Count, per k, released model and normalisation, the released AP@k values it fits; and per
    k and model, how many values ``hits`` misses and how many of those tied scores explain."""
    folder = Path(folder)
    reference = tia2.load_reference(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the images are not part of the release
        dataset = tia2.load(folder / "human_annotations", progress=False)
    counts: dict = {"fit": Counter(), "values": Counter(), "misses": Counter(), "tied": Counter()}
    for subset, records in reference.subsets.items():
        labels: dict[str, list[int]] = defaultdict(list)
        for entry in dataset.subsets[subset].entries:
            labels[entry.caption].append(entry.label)
        for prompt, record in records.items():
            n, r = len(labels[prompt]), sum(label == 1 for label in labels[prompt])
            for model in (key for key, value in record.items() if isinstance(value, dict)):
                for k in ks:
                    value = record[model][f"ap{k}"]
                    counts["values"][k, model] += 1
                    fitted = fits(value, k, n, r)
                    for name, ok in fitted.items():
                        counts["fit"][k, model, name] += ok
                    if not fitted["hits"]:
                        counts["misses"][k, model] += 1
                        if k <= 10:
                            counts["tied"][k, model] += explained_by_ties(value, k, n, r)
    return counts


def format_counts(counts: dict) -> str:
    """A table: released values of each k and model fitted by each normalisation."""
    header = f"{'k':>3} {'model':<14}{'values':>7}" + "".join(f"{name:>10}" for name in NORMALISATIONS)
    lines = [header + f"{'ties explain':>14}", "-" * (len(header) + 14)]
    for k, model in counts["values"]:
        fitted = "".join(f"{counts['fit'][k, model, name]:>10}" for name in NORMALISATIONS)
        misses = counts["misses"][k, model]
        tied = (
            f"{counts['tied'][k, model]}/{misses}" if misses and k <= 10 else ("-" if not misses else "n/a")
        )
        lines.append(f"{k:>3} {model:<14}{counts['values'][k, model]:>7}{fitted}{tied:>14}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffalign.benchmarks.tia2_ap_definition",
        description="Which AP@k normalisation fits the TextNorm authors' released TIA2 values.",
    )
    parser.add_argument("folder", help="a folder with human_annotations/ and alignment_scores/ as released")
    parser.add_argument(
        "--k", type=int, nargs="+", default=list(tia2.TOP_K), help="k values (default 5 10 25)"
    )
    parser.add_argument(
        "--output", default="results/tia2_ap_definition", help="folder for ap_definition.json"
    )
    args = parser.parse_args(argv)
    counts = derive(args.folder, args.k)
    print(format_counts(counts))
    rows = [
        {
            "k": k,
            "model": model,
            "values": counts["values"][k, model],
            "fit": {name: counts["fit"][k, model, name] for name in NORMALISATIONS},
            "misses": counts["misses"][k, model],
            "misses_explained_by_ties": counts["tied"][k, model] if k <= 10 else None,
        }
        for k, model in counts["values"]
    ]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    outputs.write_text(output / "ap_definition.json", json.dumps(rows, indent=1))
    print(f"wrote {output / 'ap_definition.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
