"""FiFA: automated filtering of human-feedback data (Yang, Kim, Jung, Bae, Kim, Yun, Lee; ICLR 2025,
arXiv 2410.10166).

Preference sets such as Pick-a-Pic are large and noisy: many pairs are near ties, some labels are
wrong, some prompts are garbled or harmful, and popular prompts repeat. FiFA keeps a small subset
S of K pairs that maximises

    sum_{i in S} margin_i  +  alpha * sum_{i in S} quality_i  +  gamma * H(S)

- ``margin_i = r(chosen_i, c_i) - r(rejected_i, c_i)``: how clearly a proxy reward model (PickScore
  for real data) agrees with the label; near-zero margins are uninformative, negative ones are
  likely label noise;
- ``quality_i``: the text quality of the prompt (``diffalign.text_quality``);
- ``H(S)``: the entropy of the selected prompts' text embeddings, estimated with the
  Kozachenko-Leonenko k-nearest-neighbour estimator, ``H = psi(N) - psi(k) + log V_d +
  (d/N) sum_i log eps_k(x_i)`` where ``eps_k(x_i)`` is the distance from ``x_i`` to its k-th
  nearest neighbour.

The paper approximates the subset problem by giving each pair an importance score — its margin,
plus alpha times its quality, plus gamma times its own term of the entropy sum, ``log eps_k(x_i)``
computed on the full set — and keeping the top K. ``select`` does exactly that.

Our choices where the paper's constants were not available to us offline (all are config keys,
``FiFAConfig``):

- **normalisation**: each of the three per-pair terms is standardised over the full set (minus
  its mean, divided by its standard deviation; a constant term becomes 0) before weighting. The
  terms live on unrelated scales (PickScore logits, log-likelihoods, log-distances), so raw
  coefficients would mean nothing across rewards and scorers; standardised, ``alpha = gamma = 1``
  weighs the three equally, and the constant ``d/N`` of the estimator drops out.
- **alpha = gamma = 1**: equal weight, for the reason above; ``margin_weight = 1`` is the paper's
  (implicit) coefficient, a key only so that the margin term can be ablated like the others.
- **k = 5**: small enough that a cluster of a handful of near-duplicate prompts gets a small
  ``eps_k`` (the paper's point: repeated prompts add no diversity), large enough that one exact
  repeat does not zero a prompt's term.
- **distances** are measured between unit-normalised embeddings of the reward's own text tower
  (``TextEmbeddingReward.embed_texts``), and floored at ``DISTANCE_FLOOR`` before the log: exact
  repeats (distance 0) would otherwise give ``-inf``. The floor is far below any distance between
  different prompts, so repeats still rank lowest.
- **text quality** is a scorer by name; for real data ``lm:PATH`` (mean token log-likelihood under
  a local causal LM; see ``diffalign.text_quality`` for why, and what it misses).
- ties between equal importance scores are broken at random with ``seed``, so that the order of
  the input file does not decide.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffalign import outputs, registry
from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import torch

    from diffalign.preferences import PreferenceData
    from diffalign.rewards.base import Reward

PAPER = "FiFA (Yang et al., ICLR 2025, arXiv 2410.10166)"
DISTANCE_FLOOR = 1e-4  # unit-norm embeddings: distinct prompts are ~0.05-1.4 apart
GENERIC_REWARD = "pickscore"  # the paper's proxy reward, for data no world registered defaults for
# Ground-truth columns some generated sets carry (``shapes-prefs``): kinds of prompt that are broken.
BROKEN_KINDS = ("truncated", "ungrammatical", "off-grammar")
REPORT_FILES = ("report.json", "report.md", "fifa.png")


class FiFAError(DiffalignError, ValueError):
    """A FiFA setting or input that cannot work; the message names the key and how to fix it."""


@dataclass
class FiFAConfig:
    """How FiFA scores and selects pairs (``diffalign data filter`` flags of the same names)."""

    fraction: float | None = None
    """Keep this share of the pairs, in (0, 1]; give exactly one of ``fraction`` and ``count``."""
    count: int | None = None
    """Keep this many pairs (the paper's K)."""
    reward: str | None = None
    """Registered reward whose margin scores each pair (None: the preference set's registered default,
    else ``pickscore``, the paper's); its text tower also embeds prompts for the diversity term."""
    reward_options: dict = field(default_factory=dict)
    """Keyword options for the reward, e.g. ``{"checkpoint": "/models/PickScore_v1"}`` (a local folder)."""
    text_quality: str | None = None
    """Registered text-quality scorer (``lm:PATH``, ``shapes-grammar``; None: the preference set's
    registered default). Needed unless ``alpha`` is 0."""
    alpha: float = 1.0
    """Weight of the standardised text-quality term (0 leaves it out and runs no scorer)."""
    gamma: float = 1.0
    """Weight of the standardised diversity term ``log eps_k`` (0 leaves it out: no embeddings)."""
    margin_weight: float = 1.0
    """Weight of the standardised reward margin (1 in the paper; 0 only to ablate it)."""
    k: int = 5
    """Neighbour rank of the kNN entropy estimator (see the module docstring for why 5)."""
    batch_size: int = 16
    """Pairs whose images are decoded and scored at once."""
    seed: int = 0
    """Breaks ties between equal importance scores."""
    device: str = "cpu"
    """Where the reward runs."""

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise FiFAError(
                "give exactly one of fraction (a share of the pairs, e.g. 0.1) and count (a number of pairs, "
                f"e.g. 1000); got fraction={self.fraction}, count={self.count}"
            )
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise FiFAError(
                f"fraction must be in (0, 1], got {self.fraction} (for a number of pairs use count)"
            )
        if self.count is not None and (
            isinstance(self.count, bool) or int(self.count) != self.count or self.count < 1
        ):
            raise FiFAError(f"count must be a whole number of pairs >= 1, got {self.count}")
        for key in ("alpha", "gamma", "margin_weight"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise FiFAError(f"{key} must be a finite number >= 0 (0 leaves its term out), got {value!r}")
        if self.k < 1 or self.batch_size < 1:
            raise FiFAError(
                f"k and batch_size must be at least 1, got k={self.k}, batch_size={self.batch_size}"
            )

    def kept(self, total: int) -> int:
        """How many of ``total`` pairs to keep (a fraction rounds, but keeps at least one)."""
        if self.count is not None:
            if self.count > total:
                raise FiFAError(
                    f"count {self.count} is more than the {total} pairs in the data; use a count <= {total} "
                    "or a fraction"
                )
            return int(self.count)
        return max(1, round(self.fraction * total))


@dataclass
class Scores:
    """Per-pair terms, all ``[N]`` in the data's index order (NaN: a term left out, not computed)."""

    margin: np.ndarray  # r(chosen) - r(rejected)
    quality: np.ndarray  # text quality of the prompt
    log_knn: np.ndarray  # log eps_k of the prompt's embedding among all prompts
    importance: np.ndarray  # the weighted sum of the standardised terms


@dataclass
class Selection:
    """What ``select`` kept and why: ``indices`` (ascending) into the data, and every pair's scores."""

    indices: list[int]
    scores: Scores
    config: FiFAConfig
    prompts: list[str]
    extras: list[dict[str, Any]] = field(default_factory=list)  # each pair's extra columns, no images

    @property
    def kept(self) -> np.ndarray:
        mask = np.zeros(len(self.prompts), dtype=bool)
        mask[self.indices] = True
        return mask


# --- the three terms ------------------------------------------------------------------------------


def reward_margins(
    data: PreferenceData, reward: Reward, *, batch_size: int = 16, progress: bool = True
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``r(chosen) - r(rejected)`` for every pair ``[N]``, and the pairs' ``extra`` columns.

    Images are decoded ``batch_size`` pairs at a time, so memory does not grow with the data.
    """
    import torch
    from tqdm.auto import tqdm

    from diffalign.images import to_tensor
    from diffalign.rewards.base import checked_call

    margins = np.empty(len(data), dtype=np.float64)
    extras: list[dict[str, Any]] = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="FiFA: reward margins", unit="batch", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(data))))
        pairs = data.pairs(indices)
        prompts = [pair.prompt for pair in pairs]
        with torch.no_grad():
            chosen = checked_call(reward, _stack([pair.chosen for pair in pairs], to_tensor), prompts)
            rejected = checked_call(reward, _stack([pair.rejected for pair in pairs], to_tensor), prompts)
        margins[indices] = (chosen - rejected).double().cpu().numpy()
        extras.extend(dict(pair.extra) for pair in pairs)
    return margins, extras


def _stack(images: list, to_tensor: Callable) -> torch.Tensor:
    """PIL images → ``[B, 3, H, W]`` in [0, 1]; a batch of mixed sizes is resized to the first's size
    (rewards resize to their own input size anyway)."""
    import torch
    import torch.nn.functional as F

    tensors = [to_tensor(image) for image in images]
    size = tensors[0].shape[-2:]
    return torch.stack(
        [
            t
            if t.shape[-2:] == size
            else F.interpolate(t[None], size=tuple(size), mode="bilinear", antialias=True)[0]
            for t in tensors
        ]
    )


def knn_distances(embeddings: np.ndarray, k: int, counts: np.ndarray | None = None) -> np.ndarray:
    """Distance from each point of ``embeddings  # [M, D]`` to its k-th nearest *other* point ``[M]``.

    ``counts[m]`` says how many times point m occurs in the set (default 1 each): its own repeats are
    neighbours at distance 0. Computing on distinct prompts with counts is exact and keeps the cost
    at M^2 for M distinct prompts (Pick-a-Pic repeats prompts many times).
    """
    import torch

    points = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    counts_t = (
        torch.ones(len(points), dtype=torch.float64) if counts is None else torch.as_tensor(counts).double()
    )
    total = int(counts_t.sum())
    if total <= k:
        raise FiFAError(
            f"the k-nearest-neighbour entropy needs more than k={k} prompts, got {total}; lower k or gamma=0"
        )
    nearest = min(k, len(points) - 1)  # at most k other distinct points are needed
    result = np.empty(len(points), dtype=np.float64)
    for start in range(0, len(points), 1024):  # [chunk, M] distances at a time: memory stays bounded
        block = torch.cdist(points[start : start + 1024], points)  # [C, M]
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = math.inf  # a point is not its own neighbour
        own = counts_t[start : start + block.shape[0]] - 1  # repeats of itself, at distance 0
        if nearest > 0:
            distance, index = block.topk(nearest, dim=1, largest=False)  # [C, nearest], ascending
            reached = own[:, None] + counts_t[index].cumsum(dim=1)  # neighbours within each distance
            position = (reached < k).sum(dim=1).clamp(max=nearest - 1)
            kth = distance.gather(1, position[:, None])[:, 0]
        else:
            kth = torch.zeros(block.shape[0], dtype=torch.float64)
        result[start : start + block.shape[0]] = torch.where(own >= k, 0.0, kth).numpy()
    return result


def knn_entropy(embeddings: np.ndarray, k: int) -> float:
    """Kozachenko-Leonenko entropy estimate (nats) of the points ``[N, D]``:
    ``psi(N) - psi(k) + log V_d + (d/N) sum log eps_k``, distances floored at ``DISTANCE_FLOOR``."""
    from scipy.special import digamma, gammaln

    points = np.asarray(embeddings, dtype=np.float64)
    n, d = points.shape
    eps = np.maximum(knn_distances(points, k), DISTANCE_FLOOR)
    log_unit_ball = d / 2 * math.log(math.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_unit_ball + d * np.log(eps).mean())


def diversity_terms(prompts: Sequence[str], embed: Callable[[list[str]], Any], k: int) -> np.ndarray:
    """Each pair's term of the entropy sum, ``log eps_k`` of its prompt among all pairs' prompts ``[N]``."""
    distinct = list(dict.fromkeys(prompts))
    counts = Counter(prompts)
    vectors = embed(distinct)
    vectors = np.asarray(
        vectors.detach().float().cpu() if hasattr(vectors, "detach") else vectors, np.float64
    )
    if vectors.ndim != 2 or len(vectors) != len(distinct):
        raise FiFAError(
            f"the text embedder returned {vectors.shape} for {len(distinct)} prompts; expected [N, D]"
        )
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    eps = knn_distances(vectors, k, np.array([counts[p] for p in distinct]))
    by_prompt = dict(zip(distinct, np.log(np.maximum(eps, DISTANCE_FLOOR))))
    return np.array([by_prompt[p] for p in prompts], dtype=np.float64)


def standardise(values: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the set; a constant or left-out (NaN) term becomes 0 everywhere."""
    if np.isnan(values).all():
        return np.zeros_like(values)
    spread = values.std()
    return (
        (values - values.mean()) / spread
        if spread > 1e-12 * max(1.0, abs(values.mean()))
        else np.zeros_like(values)
    )


def importance_scores(scores: Scores, config: FiFAConfig) -> np.ndarray:
    """The paper's per-pair importance: weighted standardised margin, text quality and diversity."""
    return (
        config.margin_weight * standardise(scores.margin)
        + config.alpha * standardise(scores.quality)
        + config.gamma * standardise(scores.log_knn)
    )


def top(importance: np.ndarray, count: int, seed: int) -> list[int]:
    """Indices of the ``count`` highest scores (ties broken at random with ``seed``), ascending."""
    shuffle = np.random.default_rng(seed).permutation(len(importance))
    order = shuffle[np.argsort(-importance[shuffle], kind="stable")]
    return sorted(order[:count].tolist())


# --- selection ------------------------------------------------------------------------------------


def resolve(config: FiFAConfig, data_spec: str | Path | None = None) -> FiFAConfig:
    """``config`` with ``reward`` and ``text_quality`` filled in: from the defaults a world registered
    for the preference set ``data_spec`` (``registry.register_filter_defaults``), else the generic
    reward; a missing text-quality scorer with ``alpha > 0`` is an error that says what to pass."""
    defaults = registry.FILTER_DEFAULTS.get(str(data_spec)) if data_spec is not None else None
    reward = config.reward or (defaults.reward if defaults else GENERIC_REWARD)
    quality = config.text_quality or (defaults.text_quality if defaults else None)
    if quality is None and config.alpha > 0:
        from diffalign.text_quality import spec_names

        raise FiFAError(
            "FiFA's text-quality term needs a scorer: pass text_quality (--text-quality), e.g. lm:PATH with a "
            f"local causal language model folder (available: {', '.join(spec_names())}), or alpha 0 to leave "
            "the term out"
        )
    return replace(config, reward=reward, text_quality=quality)


def select(
    data: PreferenceData,
    config: FiFAConfig,
    *,
    reward: Reward | None = None,
    text_quality: Callable[[list[str]], Any] | None = None,
    embed: Callable[[list[str]], Any] | None = None,
    progress: bool = True,
) -> Selection:
    """Score every pair of ``data`` and keep the top ``config.count`` (or ``fraction``) by importance.

    ``reward``, ``text_quality`` and ``embed`` default to the ones ``config`` names (see ``resolve``;
    ``embed`` is the reward's ``embed_texts``). Terms with weight 0 are not computed.
    """
    total = len(data)
    if total == 0:
        raise FiFAError("the preference data holds no pairs; nothing to select")
    count = config.kept(total)
    if reward is None:
        from diffalign import rewards

        if config.reward is None:
            raise FiFAError(
                "config.reward is not set: pass a reward, or call fifa.resolve(config, spec) first"
            )
        # Only a non-default device is passed on: rewards without models (jpeg-*) take no options.
        options = {"device": config.device} if config.device != "cpu" else {}
        reward = rewards.build(config.reward, **options, **config.reward_options)
    prompts = data.prompts()
    margins, extras = reward_margins(data, reward, batch_size=config.batch_size, progress=progress)
    quality = np.full(total, np.nan)
    if config.alpha > 0:
        from diffalign.text_quality import from_spec, scores_of

        if text_quality is None and config.text_quality is None:
            raise FiFAError("alpha > 0 needs a text-quality scorer: set text_quality, or alpha 0")
        quality = scores_of(text_quality or from_spec(config.text_quality), prompts)
    log_knn = np.full(total, np.nan)
    if config.gamma > 0:
        if embed is None:
            embed = getattr(reward, "embed_texts", None)
        if embed is None:
            raise FiFAError(
                f"reward {getattr(reward, 'name', reward)!r} cannot embed prompts, which the diversity term needs: "
                "choose a two-tower (CLIP-family) reward with embed_texts, such as pickscore or clip-score, or "
                "gamma 0 to leave the term out"
            )
        log_knn = diversity_terms(prompts, embed, config.k)
    scores = Scores(margins, quality, log_knn, np.zeros(total))
    scores.importance = importance_scores(scores, config)
    return Selection(top(scores.importance, count, config.seed), scores, config, prompts, extras)


# --- report ---------------------------------------------------------------------------------------


def _summary(values: np.ndarray) -> dict[str, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    quantiles = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    return {
        "mean": float(values.mean()),
        **dict(zip(("min", "p25", "median", "p75", "max"), map(float, quantiles))),
    }


def _removed(mask: np.ndarray, kept: np.ndarray) -> dict[str, float | int | None]:
    """Of the pairs in ``mask``: how many, how many were removed, and that share."""
    total, removed = int(mask.sum()), int((mask & ~kept).sum())
    return {"pairs": total, "removed": removed, "share_removed": removed / total if total else None}


def report(selection: Selection, *, ties: int = 0) -> dict[str, Any]:
    """What was kept and removed, as a JSON-ready dict.

    Ground truth is used when the pairs carry it (``extra`` columns ``prompt_kind``, ``label_flipped``,
    as generated sets such as ``shapes-prefs`` do); the proxy for label noise is always given: pairs
    whose reward margin is negative (the reward disagrees with the label). ``ties`` (dropped when the
    data was read, ``data.stats.ties``) are all removed.
    """
    kept, scores, config = selection.kept, selection.scores, selection.config
    terms = {
        "margin": scores.margin,
        "text_quality": scores.quality,
        "log_knn_distance": scores.log_knn,
        "importance": scores.importance,
    }
    removed: dict[str, Any] = {
        "ties": {
            "pairs": ties,
            "removed": ties,
            "share_removed": 1.0 if ties else None,
            "note": "dropped when read",
        },
        "negative_margin": _removed(scores.margin < 0, kept),
    }
    kinds = [extra.get("prompt_kind") for extra in selection.extras]
    if selection.extras and all(kind is not None for kind in kinds):
        kinds_array = np.array(kinds, dtype=object)
        removed["prompt_kind"] = {
            str(kind): _removed(kinds_array == kind, kept) for kind in sorted(set(kinds))
        }
        removed["broken_prompts"] = _removed(np.isin(kinds_array, BROKEN_KINDS), kept)
    flipped = [extra.get("label_flipped") for extra in selection.extras]
    if selection.extras and all(flag is not None for flag in flipped):
        removed["label_flipped"] = _removed(np.array(flipped, dtype=bool), kept)
    return {
        "method": PAPER,
        "config": asdict(config),
        "pairs": len(selection.prompts),
        "kept": len(selection.indices),
        "kept_fraction": len(selection.indices) / len(selection.prompts),
        "cut": float(scores.importance[selection.indices].min()),
        "terms": {
            name: {
                "all": _summary(values),
                "kept": _summary(values[kept]),
                "dropped": _summary(values[~kept]),
            }
            for name, values in terms.items()
        },
        "distinct_prompts": {
            "all": len(set(selection.prompts)),
            "kept": len({selection.prompts[i] for i in selection.indices}),
        },
        "removed": removed,
    }


def report_markdown(summary: dict[str, Any]) -> str:
    """A short human-readable version of ``report``."""
    lines = [
        f"# {summary['method']}",
        "",
        (
            f"Kept {summary['kept']} of {summary['pairs']} pairs ({summary['kept_fraction']:.1%}); "
            f"importance cut {summary['cut']:.3g}; distinct prompts {summary['distinct_prompts']['kept']} of "
            f"{summary['distinct_prompts']['all']}."
        ),
        "",
        "| term | mean (all) | mean (kept) | mean (dropped) |",
        "|---|---|---|---|",
    ]
    for name, parts in summary["terms"].items():
        cells = [f"{parts[part]['mean']:.3g}" if parts[part] else "–" for part in ("all", "kept", "dropped")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| removed | pairs | removed | share |", "|---|---|---|---|"]
    flat = {key: value for key, value in summary["removed"].items() if key != "prompt_kind"}
    flat.update({f"prompt kind {k}": v for k, v in summary["removed"].get("prompt_kind", {}).items()})
    for name, part in flat.items():
        share = f"{part['share_removed']:.0%}" if part["share_removed"] is not None else "–"
        lines.append(f"| {name.replace('_', ' ')} | {part['pairs']} | {part['removed']} | {share} |")
    return "\n".join(lines) + "\n"


def plot(selection: Selection, path: str | Path) -> Path:
    """``fifa.png``: the importance histogram with the cut, and each computed term for kept vs dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, kept = selection.scores, selection.kept
    panels = [("importance", scores.importance), ("reward margin", scores.margin)]
    panels += [
        (name, v)
        for name, v in (("text quality", scores.quality), ("log kNN distance", scores.log_knn))
        if np.isfinite(v).any()
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for axis, (name, values) in zip(axes[0], panels):
        bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 5)))
        axis.hist(values[~kept], bins=bins, alpha=0.6, label="dropped", color="tab:gray")
        axis.hist(values[kept], bins=bins, alpha=0.7, label="kept", color="tab:blue")
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    axes[0][0].axvline(
        scores.importance[selection.indices].min(), color="tab:red", linestyle="--", label="cut"
    )
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"FiFA: kept {kept.sum()} of {len(kept)} pairs", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with outputs.replacing(path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)
    return path


def check_report_folder(folder: str | Path, *, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """The report files ``folder`` will get, refused (nothing written) if any exists already."""
    return outputs.check_output_files(
        [Path(folder) / name for name in REPORT_FILES], inputs=inputs, what="report"
    )


def write_report(selection: Selection, folder: str | Path, *, ties: int = 0) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``fifa.png`` into ``folder`` (new files only, each atomic)."""
    json_path, markdown_path, plot_path = check_report_folder(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    summary = report(selection, ties=ties)
    outputs.write_text(json_path, json.dumps(summary, indent=2) + "\n")
    outputs.write_text(markdown_path, report_markdown(summary))
    plot(selection, plot_path)
    return summary


def filter_preferences(
    data: str | Path,
    output: str | Path,
    config: FiFAConfig,
    *,
    report_dir: str | Path | None = None,
    model: str | None = None,
    progress: bool = True,
) -> tuple[Selection, dict[str, Any]]:
    """``diffalign data filter`` as one call: open ``data`` (a registered preference set, a JSONL file,
    parquet), select with FiFA, write the kept pairs to ``output`` in the same format and the report
    to ``report_dir`` (default: beside ``output``, in ``<output stem>-fifa/``). Every output is
    checked before any scoring, and none is overwritten."""
    from diffalign.preferences import open_preferences, write_subset

    config = resolve(config, data)
    preferences = open_preferences(data, model=model)
    output = outputs.check_output_file(output, inputs=[preferences.location])
    if report_dir is None:
        report_dir = output.parent / f"{output.stem}-fifa"
    check_report_folder(report_dir, inputs=[preferences.location])
    selection = select(preferences, config, progress=progress)
    write_subset(preferences, selection.indices, output)
    summary = write_report(selection, report_dir, ties=preferences.stats.ties)
    return selection, summary
