"""TIA2: how well a reward ranks a prompt's images the way human annotators judge them.

Kim et al., "Confidence-aware reward optimization for fine-tuning text-to-image models",
ICLR 2024 (https://github.com/kykim0/TextNorm). Every image of a prompt carries human labels
in {1, 0, -1} (aligned, unsure, misaligned). For each prompt the benchmark asks whether the
reward puts the aligned images first (AUROC, AUPRC, precision among the top 5/10/25) and
whether it follows the labels (Spearman, Kendall), then averages over the prompts of each
subset (``comprehensive``, ``counting``, ``composition``).

The algorithm, as ``run`` does it:

1. ``load``: read the labelled images; ground truth per image = the label most annotators
   gave (majority); with no single most common label (TIA2's 1, 0, -1) the median, rounded
   toward 0 (unsure) when it falls between two labels.
2. ``score``: score every image against its caption with the reward, in batches, through
   ``rewards.checked_call``; scores are cached per (reward name + options, dataset
   fingerprint, image), so a table with one more reward scores only that reward.
3. ``metrics``: per prompt (images grouped by caption within a subset), positive class =
   ground truth 1:

   - AUROC, AUPRC (``sklearn``'s average precision), P@k, the share of aligned images
     among the k best scored, and AP@k, the TextNorm authors' ranking metric: the mean, over
     the aligned images among the k best scored, of the precision at each one's rank (0 when
     none is there), k = 5, 10, 25, or all the prompt's images when it has fewer. AP@k groups
     tied scores as ``sklearn``'s average precision does (a tie is one step), which is what
     the released values show (docs/tia2.md, "AP@k"). P@k and AP@k count a tie at the k-th
     place by expectation (each tied image equally likely to be in), as AUROC counts ties as
     half. A prompt with no aligned image has none of these.
   - Spearman's ρ and Kendall's τ-b between the score and the ground-truth label (ties in
     the three-level labels are the norm, which τ-b accounts for). A reward that gives all
     of a prompt's images the same score has no association with the labels: 0.
   - A prompt whose images all share one ground-truth label ranks nothing: it is skipped
     and counted (``prompts_skipped``).

   The subset's value of each metric is its mean over the prompts that have it.

4. ``compare`` (optional): beside the authors' released per-prompt metrics
   (``alignment_scores_<subset>.json``, read by ``load_reference``), the means of ours and
   theirs over exactly the prompts both scored, and a check that our ground truth gives their
   ``human`` share for every prompt and skips exactly the prompts absent from their files.

Data layout (the TextNorm repository's ``human_annotations/human_labels_<subset>.json``,
and shapes-TIA, see ``shapes_tia.py``): a JSON object keyed by image name; each value has
``caption``, ``human_labels`` (one or more of 1, 0, -1; TIA2 has three) and optionally
``image``, the file name when it differs from the key. ``load`` takes a folder of such files
(one subset per ``*.json``, named by the file's stem without a ``human_labels_`` prefix) or
one file (one subset). Each image is looked for in ``<folder>/<subset>/``, then
``<folder>/images/``, then ``<folder>/`` beside the JSON; the first hit wins (TIA2's
subsets reuse file names, so per-subset folders come first).

Bad input: a labelled image that is found nowhere is skipped and reported (a warning when
loading, ``images_missing`` in the results, the names in the JSON output), because partial
downloads of TIA2's image folders are common. A malformed entry, a label outside {1, 0, -1},
an unreadable image file, or a reward that fails on a batch stop the run with an error
naming the entry, the file, or the reward and the batch's images: those would silently
change the numbers if skipped.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import re
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffalign.benchmarks import shapes_tia
from diffalign.rewards import Reward
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm.auto import tqdm

from diffalign import images, outputs, rewards
from diffalign.errors import DiffalignError

SHAPES_TIA = shapes_tia.NAME  # the built-in dataset, generated on first use
TIA2_SUBSETS: tuple[str, ...] = ("comprehensive", "counting", "composition")  # listed first, in this order
TOP_K: tuple[int, ...] = (5, 10, 25)
RANKING_METRICS: tuple[str, ...] = (  # need an aligned image
    "auroc",
    "auprc",
    *(f"p@{k}" for k in TOP_K),
    *(f"ap@{k}" for k in TOP_K),
)
METRICS: tuple[str, ...] = (*RANKING_METRICS, "spearman", "kendall")
COUNTS: tuple[str, ...] = (
    "prompts_used",
    "prompts_skipped",
    "prompts_no_aligned",
    "images_scored",
    "images_missing",
)
LABELS: frozenset[int] = frozenset({1, 0, -1})
RESULTS = Path("results") / "tia2"  # the default output, under the current folder
SCORE_CACHE = ".diffalign-scores"  # folder beside the data that holds cached scores
_LABEL_FILE_PREFIX = "human_labels_"  # how the TextNorm repository names its files


class TIA2Error(DiffalignError, ValueError):
    """The data or a reward cannot be evaluated; the message names the file, entry or batch."""


@dataclass(frozen=True)
class Entry:
    """One labelled image. ``path`` is None when the image file was not found."""

    key: str
    caption: str
    labels: tuple[int, ...]
    path: Path | None

    @property
    def label(self) -> int:
        """The ground truth (see ``ground_truth``)."""
        return ground_truth(self.labels)


@dataclass(frozen=True)
class Subset:
    """The labelled images of one subset, in file order."""

    name: str
    source: Path
    entries: tuple[Entry, ...]

    @property
    def present(self) -> tuple[Entry, ...]:
        return tuple(entry for entry in self.entries if entry.path is not None)

    @property
    def missing(self) -> tuple[str, ...]:
        """Keys of the labelled images whose file was not found."""
        return tuple(entry.key for entry in self.entries if entry.path is None)


@dataclass(frozen=True)
class Dataset:
    """A loaded TIA2-format dataset. ``fingerprint`` hashes what scores depend on (captions
    and image bytes, not labels); ``root`` is where the score cache goes by default."""

    root: Path
    subsets: dict[str, Subset] = field(repr=False)
    fingerprint: str


def ground_truth(labels: Sequence[int]) -> int:
    """The label most annotators gave; with no single most common one, the median, rounded
    toward 0 (unsure) when it falls between two labels: (1, 0, -1) → 0, (1, 0) → 0."""
    ranked = Counter(labels).most_common()
    if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
        return ranked[0][0]
    return int(np.median(labels))  # int() rounds toward 0


def load(data: str | Path, *, progress: bool = True) -> Dataset:
    """Read a TIA2-format folder or JSON file (see the module doc), or ``"shapes-tia"``, the
    built-in set, generated on first use (``progress``: its progress bar)."""
    if str(data) == SHAPES_TIA:
        data = shapes_tia.ensure(progress=progress)
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
        if not files:
            raise TIA2Error(
                f"no TIA2 label files (*.json) in {path}; expected files like comprehensive.json, "
                "each mapping image names to a caption and human_labels"
            )
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise TIA2Error(
            f"TIA2 data {str(data)!r} does not exist; give a folder of <subset>.json files, one such "
            f"file, or {SHAPES_TIA!r} for the built-in set"
        )
    subsets = [_read_subset(file) for file in files]
    names = [subset.name for subset in subsets]
    if len(set(names)) != len(names):
        raise TIA2Error(f"{root} holds two label files for one subset: {[f.name for f in files]}")
    order = sorted(
        subsets, key=lambda s: (TIA2_SUBSETS.index(s.name) if s.name in TIA2_SUBSETS else 99, s.name)
    )
    for subset in order:
        if subset.missing:
            warnings.warn(
                f"TIA2 subset {subset.name!r}: {len(subset.missing)} of {len(subset.entries)} labelled "
                f"images not found (e.g. {', '.join(subset.missing[:3])}); they are skipped",
                stacklevel=2,
            )
    return Dataset(root=root, subsets={s.name: s for s in order}, fingerprint=_fingerprint(order))


def _read_subset(file: Path) -> Subset:
    name = file.stem.removeprefix(_LABEL_FILE_PREFIX)
    try:
        raw = json.loads(file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TIA2Error(f"cannot read TIA2 label file {file}: {error}") from error
    if not isinstance(raw, dict) or not raw:
        raise TIA2Error(
            f"{file}: expected a non-empty JSON object mapping image names to "
            "{'caption': ..., 'human_labels': [...]}"
        )
    folders = (file.parent / name, file.parent / "images", file.parent)
    entries = []
    for key, value in raw.items():
        where = f"{file}, entry {key!r}"
        if not isinstance(value, dict):
            raise TIA2Error(f"{where}: expected an object with caption and human_labels, got {value!r}")
        caption, labels, image = value.get("caption"), value.get("human_labels"), value.get("image", key)
        if not isinstance(caption, str) or not caption.strip():
            raise TIA2Error(f"{where}: 'caption' must be a non-empty string, got {caption!r}")
        if (
            not isinstance(labels, list)
            or not labels
            or any(
                isinstance(label, bool) or not isinstance(label, (int, float)) or label not in LABELS
                for label in labels
            )
        ):
            raise TIA2Error(
                f"{where}: 'human_labels' must be a list of one or more of 1 (aligned), 0 (unsure), "
                f"-1 (misaligned), got {labels!r}"
            )
        if not isinstance(image, str) or not image:
            raise TIA2Error(f"{where}: 'image' must be a file name, got {image!r}")
        path = next((folder / image for folder in folders if (folder / image).is_file()), None)
        entries.append(Entry(key, caption, tuple(int(label) for label in labels), path))
    return Subset(name, file, tuple(entries))


def _fingerprint(subsets: Sequence[Subset]) -> str:
    digest = hashlib.sha256()
    for subset in subsets:
        for entry in subset.entries:
            content = hashlib.sha256(entry.path.read_bytes()).hexdigest() if entry.path else "missing"
            digest.update(json.dumps([subset.name, entry.key, entry.caption, content]).encode())
    return digest.hexdigest()


def _select(dataset: Dataset, subsets: Sequence[str] | None) -> list[str]:
    if subsets is None:
        return list(dataset.subsets)
    for name in subsets:
        if name not in dataset.subsets:
            close = difflib.get_close_matches(name, list(dataset.subsets), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TIA2Error(
                f"unknown TIA2 subset {name!r}.{hint} {dataset.root} has subsets: "
                f"{', '.join(dataset.subsets)}"
            )
    return list(dict.fromkeys(subsets))


def score(
    reward: Reward | str,
    data: Dataset | str | Path,
    *,
    options: Mapping | None = None,
    subsets: Sequence[str] | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """The reward's score of every found image: ``{subset: {image key: score}}``.

    ``reward`` is a registered name, built with ``options`` only if some score is not cached
    yet, or a Reward object. Scores are cached in ``cache_dir`` (default
    ``<data>/.diffalign-scores/``) under the reward's identity, its name plus ``options``;
    an object is cached only when ``options`` (the options it was built with, ``{}`` for
    none) are given, because two objects of one name may differ in ways nothing here can
    see. The cache is rewritten atomically after every batch, so an interrupted run resumes.
    """
    dataset = data if isinstance(data, Dataset) else load(data, progress=progress)
    names = _select(dataset, subsets)
    if batch_size < 1:
        raise TIA2Error(f"batch_size must be at least 1, got {batch_size}")
    reward_name = reward if isinstance(reward, str) else getattr(reward, "name", type(reward).__name__)
    cache_file = None
    if cache and (isinstance(reward, str) or options is not None):
        folder = Path(cache_dir) if cache_dir is not None else dataset.root / SCORE_CACHE
        cache_file = _cache_file(folder, reward_name, dict(options or {}), dataset.fingerprint)
    stored = _read_cache(cache_file)
    scores = {name: dict(stored.get(name, {})) for name in names}
    pending = [
        (name, entry)
        for name in names
        for entry in dataset.subsets[name].present
        if entry.key not in scores[name]
    ]
    if not pending:
        return scores
    model = rewards.build(reward, **dict(options or {})) if isinstance(reward, str) else reward
    with tqdm(total=len(pending), desc=f"TIA2: {reward_name}", unit="image", disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for (name, entry), value in zip(batch, _score_batch(model, reward_name, batch)):
                scores[name][entry.key] = value
            if cache_file is not None:
                everything = {**stored, **scores}
                _write_cache(cache_file, reward_name, dict(options or {}), dataset.fingerprint, everything)
            bar.update(len(batch))
    return scores


@torch.no_grad()
def _score_batch(reward: Reward, reward_name: str, batch: Sequence[tuple[str, Entry]]) -> list[float]:
    """Scores of one batch in its order. Images of different sizes cannot share a tensor, so
    each size is one reward call."""
    pixels = [images.load_image(entry.path) for _, entry in batch]  # [3, H, W] each; names a corrupt file
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(pixels):
        by_size[tuple(image.shape)].append(index)
    values = [0.0] * len(batch)
    for indices in by_size.values():
        stacked = torch.stack([pixels[i] for i in indices])  # [b, 3, H, W]
        try:
            result = rewards.checked_call(reward, stacked, [batch[i][1].caption for i in indices])
        except Exception as error:  # any failure is reported with the batch that caused it
            keys = [f"{batch[i][0]}/{batch[i][1].key}" for i in indices]
            shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
            raise TIA2Error(
                f"reward {reward_name!r} failed on a batch of {len(keys)} images ({shown}): "
                f"{type(error).__name__}: {error}"
            ) from error
        for i, value in zip(indices, result.tolist()):
            values[i] = value
    return values


def _cache_file(folder: Path, reward_name: str, options: dict, fingerprint: str) -> Path:
    identity = json.dumps([reward_name, options, fingerprint], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", reward_name).strip("_") or "reward"
    return folder / f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path | None) -> dict[str, dict[str, float]]:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8"))["scores"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(
            f"ignoring unreadable TIA2 score cache {path} ({error}); scores are recomputed", stacklevel=3
        )
        return {}


def _write_cache(path: Path, reward_name: str, options: dict, fingerprint: str, scores: dict) -> None:
    record = {"reward": reward_name, "options": options, "fingerprint": fingerprint, "scores": scores}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_text(path, json.dumps(record, default=str))
    except OSError as error:
        raise TIA2Error(
            f"cannot write the TIA2 score cache {path} ({error}); choose another folder with "
            "--cache-dir (cache_dir=...) or turn the cache off with --no-cache (cache=False)"
        ) from error


def precision_at_k(scores: np.ndarray, aligned: np.ndarray, k: int) -> float:
    """Share of aligned images among the ``k`` best scored (all of them if fewer); a tie at
    the k-th place counts each tied image as in with equal probability."""
    k = min(k, len(scores))
    threshold = np.sort(scores)[::-1][k - 1]
    above, tied = scores > threshold, scores == threshold
    return float((aligned[above].sum() + (k - above.sum()) * aligned[tied].mean()) / k)


def average_precision_at_k(scores: np.ndarray, aligned: np.ndarray, k: int) -> float:
    """AP@k as the TextNorm authors compute it: the mean, over the aligned images among the ``k``
    best scored (all of them if fewer), of the precision at each one's rank; 0 when none of the
    k is aligned. Dividing by the aligned images *in the top k* (not by k, nor by all aligned
    images) is the one normalisation that fits the released values (docs/tia2.md, "AP@k").

    Tied scores form one step, as in ``sklearn``'s average precision: each aligned image of a
    tie gets the precision at the tie's last rank. A tie at the k-th place is counted by
    expectation over which of its images are in (each equally likely): ``j`` of its aligned
    images are in with hypergeometric probability, and they close the top k as one step.
    """
    aligned = np.asarray(aligned, dtype=bool)
    k = min(k, len(scores))
    threshold = np.sort(scores)[::-1][k - 1]
    precision_sum, seen, hits = 0.0, 0, 0  # over the tie groups strictly above the threshold
    for value in np.unique(scores[scores > threshold])[::-1]:
        group = scores == value
        seen += int(group.sum())
        group_hits = int(aligned[group].sum())
        hits += group_hits
        precision_sum += group_hits * hits / seen
    tied = scores == threshold
    tied_total, tied_aligned, taken = int(tied.sum()), int(aligned[tied].sum()), k - seen
    expected = 0.0
    for j in range(max(0, taken - (tied_total - tied_aligned)), min(taken, tied_aligned) + 1):
        chance = math.comb(tied_aligned, j) * math.comb(tied_total - tied_aligned, taken - j)
        if hits + j:
            expected += chance * (precision_sum + j * (hits + j) / k) / (hits + j)
    return float(expected / math.comb(tied_total, taken))


def prompt_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """TIA2's metrics for one prompt: ``scores  # [N]`` from the reward, ``labels  # [N]``
    ground truth with at least two distinct values. NaN where a metric is undefined (no
    aligned image)."""
    aligned = labels == 1
    result: dict[str, float] = {}
    if aligned.any() and not aligned.all():
        result["auroc"] = float(roc_auc_score(aligned, scores))
        result["auprc"] = float(average_precision_score(aligned, scores))
        result.update({f"p@{k}": precision_at_k(scores, aligned, k) for k in TOP_K})
        result.update({f"ap@{k}": average_precision_at_k(scores, aligned, k) for k in TOP_K})
    else:
        result.update({metric: math.nan for metric in RANKING_METRICS})
    if np.ptp(scores) == 0:  # scipy would warn and return NaN
        result["spearman"] = result["kendall"] = 0.0
    else:
        result["spearman"] = float(spearmanr(scores, labels).statistic)
        result["kendall"] = float(kendalltau(scores, labels).statistic)
    return result


def metrics(
    subset: Subset, scores: Mapping[str, float]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(summary, per prompt)`` of one subset: the mean of each metric over the prompts that
    have it, with the counts ``COUNTS``; and ``{caption: metrics}`` for the prompts used."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in subset.entries:
        if entry.key in scores:
            groups[entry.caption].append(entry)
    per_prompt = {}
    for caption, entries in groups.items():
        labels = np.array([entry.label for entry in entries])
        if len(set(labels.tolist())) > 1:
            per_prompt[caption] = prompt_metrics(np.array([scores[entry.key] for entry in entries]), labels)
    summary = {metric: _mean([values[metric] for values in per_prompt.values()]) for metric in METRICS}
    summary.update(
        prompts_used=len(per_prompt),
        prompts_skipped=len(groups) - len(per_prompt),
        prompts_no_aligned=sum(math.isnan(values["auroc"]) for values in per_prompt.values()),
        images_scored=sum(len(entries) for entries in groups.values()),
        images_missing=len(subset.missing),
    )
    return summary, per_prompt


def _mean(values: Sequence[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


def evaluate(
    reward: Reward | str,
    data: Dataset | str | Path = SHAPES_TIA,
    *,
    options: Mapping | None = None,
    subsets: Sequence[str] | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """TIA2 for one reward: ``{subset: {metric or count: value}}`` (``METRICS``, ``COUNTS``).

    ``data``: a loaded ``Dataset``, a path, or ``"shapes-tia"``. Arguments as in ``score``.
    """
    dataset = data if isinstance(data, Dataset) else load(data, progress=progress)
    scores = score(
        reward,
        dataset,
        options=options,
        subsets=subsets,
        batch_size=batch_size,
        cache=cache,
        cache_dir=cache_dir,
        progress=progress,
    )
    return {name: metrics(dataset.subsets[name], values)[0] for name, values in scores.items()}


def run(
    reward_names: Sequence[str] = ("shapes-clip", "shapes-oracle"),
    data: Dataset | str | Path = SHAPES_TIA,
    *,
    options: Mapping[str, Mapping] | None = None,
    subsets: Sequence[str] | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    output: str | Path | None = RESULTS,
    progress: bool = True,
    reference: Reference | str | Path | None = None,
    reference_models: Mapping[str, str] | None = None,
) -> dict:
    """The TIA2 table of several registered rewards (``options``: ``{reward name: options}``),
    written to ``output`` as ``tia2.json`` (with per-prompt metrics and the missing images),
    ``tia2.csv`` and ``tia2.png`` when ``output`` is given. Returns what the JSON holds.

    ``reference``: the authors' released ``alignment_scores`` (a folder or ``Reference``); the
    result then holds ``compare``'s side-by-side under ``"reference"`` (``reference_models``:
    ``{reward name: released model}`` beyond ``REFERENCE_MODELS``)."""
    if len(set(reward_names)) != len(reward_names) or not reward_names:
        raise TIA2Error(f"give one or more distinct reward names, got {list(reward_names)}")
    options = dict(options or {})
    stray = sorted(set(options) - set(reward_names))
    if stray:
        raise TIA2Error(
            f"options given for {stray}, which are not among the rewards {list(reward_names)}; "
            "reward options look like REWARD.KEY=VALUE, e.g. shapes-clip.checkpoint=/path"
        )
    dataset = data if isinstance(data, Dataset) else load(data, progress=progress)
    names = _select(dataset, subsets)
    result: dict = {
        "data": str(dataset.root),
        "data_name": SHAPES_TIA if str(data) == SHAPES_TIA else dataset.root.name,
        "fingerprint": dataset.fingerprint,
        "subsets": names,
        "options": options,
        "results": {},
        "per_prompt": {},
        "missing_images": {name: list(dataset.subsets[name].missing) for name in names},
    }
    for reward_name in reward_names:
        scores = score(
            reward_name,
            dataset,
            options=options.get(reward_name, {}),
            subsets=names,
            batch_size=batch_size,
            cache=cache,
            cache_dir=cache_dir,
            progress=progress,
        )
        result["results"][reward_name], result["per_prompt"][reward_name] = {}, {}
        for name in names:
            summary, per_prompt = metrics(dataset.subsets[name], scores[name])
            result["results"][reward_name][name] = summary
            result["per_prompt"][reward_name][name] = per_prompt
    if reference is not None:
        result["reference"] = compare(result, reference, dataset=dataset, models=reference_models)
    if output is not None:
        write_outputs(result, Path(output))
    return result


def write_outputs(result: dict, folder: Path) -> list[Path]:
    """``tia2.json``, ``tia2.csv`` (one row per reward × subset) and ``tia2.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "tia2.json", folder / "tia2.csv", folder / "tia2.png"]
    paths[0].write_text(json.dumps(_json_safe(result), indent=2, default=str), "utf-8")
    with open(paths[1], "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["reward", "subset", *METRICS, *COUNTS])
        for reward_name, by_subset in result["results"].items():
            for subset, summary in by_subset.items():
                writer.writerow([reward_name, subset, *(summary[key] for key in (*METRICS, *COUNTS))])
    save_chart(result, paths[2])
    return paths


def _json_safe(value):
    """NaN (an undefined metric) as JSON null, which every JSON reader accepts."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def save_chart(result: dict, path: Path) -> Path:
    """Bars of mean AUROC and AUPRC per subset, one colour per reward (chance AUROC dashed)."""
    import matplotlib.pyplot as plt

    from diffalign import plots  # noqa: F401 - selects matplotlib's file-only backend (Agg)

    subsets, reward_names = result["subsets"], list(result["results"])
    width = 0.8 / len(reward_names)
    positions = np.arange(len(subsets))
    figure, axes = plt.subplots(1, 2, figsize=(2.0 + 2.2 * len(subsets), 3.6), sharey=True)
    for axis, metric in zip(axes, ("auroc", "auprc")):
        for index, reward_name in enumerate(reward_names):
            values = [result["results"][reward_name][subset][metric] for subset in subsets]
            axis.bar(
                positions + (index - (len(reward_names) - 1) / 2) * width, values, width, label=reward_name
            )
        if metric == "auroc":
            axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xticks(positions, subsets, fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title(f"mean {metric.upper()} over prompts", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=min(len(reward_names), 4), fontsize=7, frameon=False
    )
    figure.suptitle(f"TIA2: {result['data_name']}", fontsize=9)
    figure.tight_layout(rect=(0, 0.07 * math.ceil(len(reward_names) / 4), 1, 1))  # room for the legend below
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_table(result: dict) -> str:
    """One row per reward × subset: the metrics, then prompts used/skipped and images
    scored/missing."""
    header = (
        f"{'reward':<22} {'subset':<14}"
        + "".join(f"{m:>9}" for m in METRICS)
        + f"{'prompts':>11}{'images':>11}"
    )
    lines = [header, "-" * len(header)]
    for reward_name, by_subset in result["results"].items():
        for subset, s in by_subset.items():
            values = "".join(f"{s[m]:9.3f}" for m in METRICS)
            prompt_counts = f"{s['prompts_used']:>6}/{s['prompts_skipped']:<4}"
            image_counts = f"{s['images_scored']:>6}/{s['images_missing']:<4}"
            lines.append(f"{reward_name:<22} {subset:<14}{values}{prompt_counts}{image_counts}")
    lines.append(
        "prompts: used/skipped (all images one label); images: scored/missing (labelled but not found)"
    )
    if any(
        summary["prompts_no_aligned"]
        for by_subset in result["results"].values()
        for summary in by_subset.values()
    ):
        lines.append("prompts with no aligned image count for spearman/kendall only (see prompts_no_aligned)")
    return "\n".join(lines)


# --- the authors' released figures ------------------------------------------------------------------

REFERENCE_METRICS: dict[str, str] = {  # our metric -> its key in the released files
    "auroc": "auroc",
    "auprc": "auprc",
    "ap@5": "ap5",
    "ap@10": "ap10",
    "ap@25": "ap25",
    "spearman": "spearman",
    "kendall": "kendall",
}
REFERENCE_MODELS: dict[str, str] = {  # our reward -> the released model it stands for
    "clip-score": "clip",
    "blip2": "blip2",
    "imagereward": "imagereward",
    "pickscore": "pickscore",
}
_REFERENCE_FILE_PREFIX = "alignment_scores_"  # how the TextNorm repository names its files
_HUMAN_TOLERANCE = 1e-9  # the released shares are k/50 written as floats


@dataclass(frozen=True)
class Reference:
    """The authors' released per-prompt figures: ``subsets[subset][prompt]`` holds ``human`` (the
    share of the prompt's images whose majority label is 1) and, per model, its metrics."""

    root: Path
    subsets: dict[str, dict[str, dict]] = field(repr=False)

    def models(self, subset: str) -> list[str]:
        """The models released for ``subset``, in file order."""
        names: dict[str, None] = {}
        for record in self.subsets[subset].values():
            names.update((key, None) for key, value in record.items() if isinstance(value, dict))
        return list(names)


def load_reference(path: str | Path) -> Reference:
    """Read the TextNorm authors' ``alignment_scores_<subset>.json`` files: a folder of them, the
    repository folder that holds ``alignment_scores/``, or one such file."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "alignment_scores").is_dir():
        path = path / "alignment_scores"
    files = sorted(path.glob(f"{_REFERENCE_FILE_PREFIX}*.json")) if path.is_dir() else []
    if path.is_file():
        files = [path]
    if not files:
        raise TIA2Error(
            f"no released TIA2 scores at {str(path)!r}: expected alignment_scores_<subset>.json files "
            "(the alignment_scores/ folder of the TextNorm repository, or the repository folder itself)"
        )
    subsets = {}
    for file in files:
        try:
            raw = json.loads(file.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TIA2Error(f"cannot read released TIA2 scores {file}: {error}") from error
        subsets[file.stem.removeprefix(_REFERENCE_FILE_PREFIX)] = _check_reference(file, raw)
    order = sorted(subsets, key=lambda s: (TIA2_SUBSETS.index(s) if s in TIA2_SUBSETS else 99, s))
    return Reference(root=path, subsets={name: subsets[name] for name in order})


def _check_reference(file: Path, raw) -> dict[str, dict]:
    if not isinstance(raw, dict) or not raw:
        raise TIA2Error(f"{file}: expected a JSON object mapping prompts to {{'human': ..., model: {{...}}}}")
    for prompt, record in raw.items():
        human = record.get("human") if isinstance(record, dict) else None
        if not isinstance(human, (int, float)) or not 0 <= human <= 1:
            raise TIA2Error(f"{file}, prompt {prompt!r}: 'human' must be a share in [0, 1], got {human!r}")
        for model, values in record.items():
            if not isinstance(values, dict):
                continue
            missing = [
                key for key in REFERENCE_METRICS.values() if not isinstance(values.get(key), (int, float))
            ]
            if missing:
                raise TIA2Error(f"{file}, prompt {prompt!r}, model {model!r}: no numeric {missing}")
    return raw


def check_labels(subset: Subset, released: Mapping[str, dict]) -> dict:
    """Whether our ground truth agrees with one released subset: for every released prompt, the
    share of its images whose ground truth is 1 equals the released ``human``; and the prompts
    absent from the release are exactly those we skip (all images one ground-truth label).
    Uses the labels only, so it holds whether or not the images are at hand."""
    groups: dict[str, list[int]] = defaultdict(list)
    for entry in subset.entries:
        groups[entry.caption].append(entry.label)
    single = [caption for caption, labels in groups.items() if len(set(labels)) == 1]
    mismatches = [
        {"prompt": caption, "ours": share, "released": released[caption]["human"]}
        for caption, labels in groups.items()
        if caption in released
        and abs((share := sum(label == 1 for label in labels) / len(labels)) - released[caption]["human"])
        > _HUMAN_TOLERANCE
    ]
    report = {
        "prompts": len(groups),
        "released": len(released),
        "skipped": len(single),
        "human_mismatches": mismatches,
        "skipped_but_released": [caption for caption in single if caption in released],
        "ranked_but_absent": [c for c in groups if c not in released and c not in single],
        "released_but_unlabelled": [caption for caption in released if caption not in groups],
    }
    report["agrees"] = not any(report[key] for key in list(report)[3:])
    return report


def reference_model(reward_name: str, models: Sequence[str], explicit: Mapping[str, str] | None = None):
    """The released model that ``reward_name`` stands for among ``models``, or None: ``explicit``
    first, then ``REFERENCE_MODELS``, then the one ``textnorm_*`` model for a TextNorm reward,
    then a model of the same name."""
    if explicit and reward_name in explicit:
        name = explicit[reward_name]
    elif reward_name in REFERENCE_MODELS:
        name = REFERENCE_MODELS[reward_name]
    elif reward_name.startswith("textnorm"):
        variants = [model for model in models if model.startswith("textnorm")]
        name = variants[0] if len(variants) == 1 else None
    else:
        name = reward_name
    return name if name in models else None


def compare(
    result: dict,
    reference: Reference | str | Path,
    *,
    dataset: Dataset | None = None,
    models: Mapping[str, str] | None = None,
) -> dict:
    """``run``'s result beside the released figures: for each reward, subset and the released
    model it stands for (``reference_model``), the mean of each of ``REFERENCE_METRICS``, ours
    and theirs, over exactly the prompts both scored; and ``check_labels`` per subset.
    ``dataset``: the loaded data of ``result`` (read again from ``result["data"]`` if None)."""
    reference = reference if isinstance(reference, Reference) else load_reference(reference)
    for reward_name, model in (models or {}).items():
        known = sorted({m for subset in reference.subsets for m in reference.models(subset)})
        if model not in known:
            raise TIA2Error(
                f"reference model {model!r} (for {reward_name!r}) is not in {reference.root}; "
                f"the released models are {', '.join(known)}"
            )
    if dataset is None:
        dataset = load(result["data"], progress=False)
    shared = [subset for subset in result["subsets"] if subset in reference.subsets]
    comparison: dict = {
        "reference": str(reference.root),
        "labels": {
            subset: check_labels(dataset.subsets[subset], reference.subsets[subset]) for subset in shared
        },
        "rows": [],
        "unmatched": [],
    }
    for reward_name, by_subset in result["per_prompt"].items():
        matched = False
        for subset in shared:
            model = reference_model(reward_name, reference.models(subset), models)
            if model is None:
                continue
            matched = True
            ours, released = by_subset[subset], reference.subsets[subset]
            both = [prompt for prompt in ours if model in released.get(prompt, {})]
            comparison["rows"].append(
                {
                    "reward": reward_name,
                    "model": model,
                    "subset": subset,
                    "prompts": len(both),
                    "ours_only": len(ours) - len(both),
                    "released_only": sum(model in record for record in released.values()) - len(both),
                    "ours": {m: _mean([ours[p][m] for p in both]) for m in REFERENCE_METRICS},
                    "released": {
                        m: _mean([released[p][model][key] for p in both])
                        for m, key in REFERENCE_METRICS.items()
                    },
                }
            )
        if not matched:
            comparison["unmatched"].append(reward_name)
    return comparison


def reference_means(reference: Reference | str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """The released files' own means: ``{subset: {model: {metric: mean over its prompts}}}``, with
    ``prompts`` the number of prompts each mean is over."""
    reference = reference if isinstance(reference, Reference) else load_reference(reference)
    means: dict[str, dict[str, dict[str, float]]] = {}
    for subset, records in reference.subsets.items():
        means[subset] = {}
        for model in reference.models(subset):
            rows = [record[model] for record in records.values() if model in record]
            means[subset][model] = {
                m: float(np.mean([row[k] for row in rows])) for m, k in REFERENCE_METRICS.items()
            }
            means[subset][model]["prompts"] = len(rows)
    return means


def format_comparison(comparison: dict) -> str:
    """One row per reward × subset: each metric as ``ours/released`` over the prompts both scored,
    then how our labels agree with the release."""
    metrics = list(REFERENCE_METRICS)
    header = f"{'reward':<22} {'released':<14} {'subset':<14}{'prompts':>8}" + "".join(
        f"{m:>14}" for m in metrics
    )
    lines = [f"TIA2 beside the released figures in {comparison['reference']} (ours/released):", header]
    lines.append("-" * len(header))
    for row in comparison["rows"]:
        cells = "".join(f"{row['ours'][m]:>7.3f}/{row['released'][m]:<6.3f}" for m in metrics)
        lines.append(f"{row['reward']:<22} {row['model']:<14} {row['subset']:<14}{row['prompts']:>8}{cells}")
    if comparison["unmatched"]:
        lines.append(
            f"no released model for {', '.join(comparison['unmatched'])}: map one with --reference-model "
            "REWARD=MODEL (models=... in Python)"
        )
    lines.extend(format_label_check(subset, check) for subset, check in comparison["labels"].items())
    lines.append(
        "spearman/kendall: the released files correlate scores with a finer per-image label than our "
        "majority label, so those two columns differ by definition (docs/tia2.md)"
    )
    return "\n".join(lines)


def format_label_check(subset: str, check: dict) -> str:
    """One line: whether ``check_labels`` found our labels to agree with the release."""
    if check["agrees"]:
        return (
            f"labels, {subset}: our majority-label share equals the released 'human' on all "
            f"{check['released']} released prompts; the {check['skipped']} we skip (one label) are "
            "exactly the ones absent from the release"
        )
    problems = {key: check[key][:3] for key in list(check)[3:-1] if check[key]}
    return f"labels, {subset}: DISAGREE with the release (first cases): {problems}"


def format_reference_means(means: dict) -> str:
    """The released files' means, one row per subset × model."""
    metrics = list(REFERENCE_METRICS)
    header = f"{'subset':<14} {'model':<14}{'prompts':>8}" + "".join(f"{m:>9}" for m in metrics)
    lines = [header, "-" * len(header)]
    for subset, by_model in means.items():
        for model, values in by_model.items():
            cells = "".join(f"{values[m]:9.3f}" for m in metrics)
            lines.append(f"{subset:<14} {model:<14}{values['prompts']:>8}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffalign.benchmarks.tia2``: the benchmark with ``--reference``. With
    ``--reference`` and no ``--rewards`` it scores nothing: it prints the released means and,
    given ``--data``, checks our labels against the release."""
    import argparse

    from diffalign import config

    parser = argparse.ArgumentParser(prog="python -m diffalign.benchmarks.tia2", description=main.__doc__)
    parser.add_argument("--rewards", nargs="+", metavar="NAME", help="registered reward names")
    parser.add_argument("--data", help=f"TIA2 folder or file, or {SHAPES_TIA} (default with --rewards)")
    parser.add_argument("--subsets", nargs="+", metavar="SUBSET", help="subsets to evaluate (default: all)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="REWARD.KEY=VALUE", help="reward option"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per reward call")
    parser.add_argument(
        "--output", "-o", default="results/tia2", help="folder for tia2.json/.csv/.png when scoring"
    )
    parser.add_argument("--cache-dir", help="score cache folder (default: <data>/.diffalign-scores/)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached scores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--reference", metavar="DIR", help="the authors' alignment_scores folder (or its parent)"
    )
    parser.add_argument(
        "--reference-model",
        action="append",
        default=[],
        metavar="REWARD=MODEL",
        help=f"which released model a reward stands for, beyond the defaults {REFERENCE_MODELS}",
    )
    args = parser.parse_args(argv)
    models = dict(pair.split("=", 1) for pair in args.reference_model if "=" in pair)
    if len(models) != len(args.reference_model):
        parser.error("--reference-model takes REWARD=MODEL, e.g. clip-score=clip")
    try:
        if not args.rewards:
            if not args.reference:
                parser.error("give --rewards to score, or --reference to read the released figures")
            reference = load_reference(args.reference)
            print(format_reference_means(reference_means(reference)))
            if args.data:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the check reads labels only: images may be absent
                    dataset = load(args.data, progress=not args.no_progress)
                for subset in _select(dataset, args.subsets):
                    if subset in reference.subsets:
                        check = check_labels(dataset.subsets[subset], reference.subsets[subset])
                        print(format_label_check(subset, check))
            return 0
        options: dict = {}
        for text in args.option:
            options = _merged(options, config.parse_override(text))
        result = run(
            args.rewards,
            args.data or SHAPES_TIA,
            options=options,
            subsets=args.subsets,
            batch_size=args.batch_size,
            cache=not args.no_cache,
            cache_dir=args.cache_dir,
            output=args.output,
            progress=not args.no_progress,
            reference=args.reference,
            reference_models=models,
        )
    except DiffalignError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if "reference" in result:
        print(format_comparison(result["reference"]))
    if args.output:
        print(f"wrote tia2.json, tia2.csv and tia2.png to {args.output}")
    return 0


def _merged(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


if __name__ == "__main__":
    sys.exit(main())
