"""``shapes-prefs``: a built-in ShapesWorld preference data set in Pick-a-Pic v2's format.

Offline preference methods (Diffusion-DPO, FiFA's filtering) need labelled pairs, and a study of
them needs to know which labels are right. Real data (Pick-a-Pic) cannot say; here the exact
detector can. The set is generated once, into the cache (``cached_path``), by the recipe below,
which imitates what makes real preference data hard to learn from: repeated and reworded prompts,
broken prompts, pairs without a real difference, ties, a noisy crowd.

Recipe (parameters in ``Recipe``; each build writes them and its measured figures to ``recipe.json``):

1. **Prompts.** Source prompts are drawn without replacement from the train split (``shapes-train``),
   by kind (``Recipe.kind_shares``: mostly relations, which is most of the split and where the
   shipped model errs most). Each source prompt gets a heavy-tailed number of pairs (log-normal
   weights, mean ``pairs_per_prompt``, as Pick-a-Pic has ~14 pairs per unique prompt). Each pair's
   caption is the source prompt itself (``prompt_kind`` "train"), a **near-duplicate** rewording the
   grammar still parses to the same facts ("A red circle.", "a blue square right of a red circle",
   "2 red circles", "a red circle to the left of ...") or a **broken** prompt that ``grammar.parse``
   rejects: "truncated" mid-phrase ("a red circle left of a blu"), "ungrammatical" (shuffled,
   dropped or repeated words) or "off-grammar" (outside the language: "a red circle next to a blue
   square", "a photo of two red circles, trending on artstation"). Variants are drawn from a small
   pool per source prompt, so they repeat as real users' prompts do.
2. **Images.** Both images of a pair are generated from the caption itself (broken text included:
   the text encoder reads anything) by the shipped ``shapes`` pipeline, each with its own seed and
   its own sampler settings (guidance from ``guidance_scales``, ``num_steps`` DDIM steps, η = 0), as
   Pick-a-Pic's two images come from different settings. Images are generated in batches, but every
   image's starting noise comes from its own seed, so an image does not depend on its batch.
3. **Truth.** ``oracle_i``: the exact detector's score of image i against the caption (NaN when the
   caption does not parse); ``source_oracle_i``: against the source prompt (what the user meant).
   ``quality_i`` in [0, 1], the visual-quality term: how cleanly recognisable shapes explain the
   image's coloured pixels (their fitted area over the coloured area, relative to a clean render's
   0.9) times the detector's mean confidence in them; 0 when no shape is recognisable. Blobs,
   streaks, smears and washed-out colour lower it, whatever the prompt.
4. **Annotators.** A crowd of ``annotators`` simulated people; each pair is labelled by one. Each
   person has a weight on looks ``w``, a Bradley–Terry temperature, a tie band and a click-noise
   rate, drawn once. Utility = oracle + w · quality for a well-formed caption, and quality alone for
   a broken one (the annotator cannot tell what was asked, and labels on look alone). A pair is a
   tie (0.5/0.5) when the utilities are within the person's band; otherwise image 0 wins with
   probability sigmoid((u0 − u1) / temperature), and then a random click flips the label with the
   person's noise rate (``label_flipped``). Careless people (``careless_share``) click randomly
   more often.

Figures of the default build (2400 pairs, seed 0; ``recipe.json`` holds them all), measured:

- 2400 pairs of 190 source prompts (12.6 pairs each, heavy-tailed), 636 distinct captions;
  train 70.3 %, near-duplicate 16.9 %, broken 12.8 % (truncated 3.8, ungrammatical 4.7, off-grammar 4.3).
- Ties 13.6 % (14.6 % of well-formed pairs); label noise (flipped clicks) 9.4 % of non-ties.
- No real difference (equal oracle scores) in 46.1 % of well-formed pairs.
- Non-tie well-formed pairs (1788): the winner is truly better by the oracle in 56.7 %, worse in
  6.2 %, equal in 37.1 %, so 90 % of the pairs with a real difference point the right way.
- Images: mean oracle 0.76, 47 % perfect; mean quality 0.46.
- Build: 18.5 min on 2 threads with the other core busy (another process); about 6–7 min
  uncontended (~10 images/s at 20 steps, ~20 at 10, on 2 threads).

Columns: Pick-a-Pic's ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes; lossless at 32 × 32),
``label_0``, ``label_1`` (1/0, 0/1 or 0.5/0.5), and the ground truth: ``prompt_kind``,
``prompt_source``, ``oracle_0/1``, ``source_oracle_0/1``, ``quality_0/1``, ``utility_0/1``,
``seed_0/1``, ``guidance_0/1``, ``steps_0/1``, ``annotator``, ``label_flipped``, ``pair_id``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffalign import outputs
from diffalign.preferences import PreferenceDataError, encode_png, write_pickapic
from diffalign.shapes.grammar import Entity, Facts, PromptOutsideGrammar, Relation, converse, parse, text

VERSION = 1  # bump when the recipe changes what is generated: the cache folder is named after it
NAME = f"shapes-prefs-v{VERSION}"
DEFAULT_PAIRS = 2400  # a fresh build: ~6–7 min on 2 free CPU threads (see the figures above)
PROMPT_KINDS = ("train", "near-duplicate", "truncated", "ungrammatical", "off-grammar")
BROKEN_KINDS = ("truncated", "ungrammatical", "off-grammar")
CLEAN_EXPLAINED = 0.9  # fitted shape area / coloured area of a clean render (median 0.89, 5 % 0.84)


@dataclass(frozen=True)
class Recipe:
    """The parameters of one build; written to ``recipe.json`` beside the shards."""

    pairs: int = DEFAULT_PAIRS
    seed: int = 0
    model: str = "shapes"  # the pipeline that draws the images (what the set is for)
    pairs_per_prompt: float = 12.0  # mean pairs per source prompt (Pick-a-Pic: ~14 per unique prompt)
    # Source prompts by kind. Relations are 95 % of the train split and the model's weakest skill;
    # singles and counts keep a share so that every kind of prompt is trained on.
    kind_shares: dict[str, float] = field(
        default_factory=lambda: {"single": 0.07, "count": 0.13, "relation": 0.8}
    )
    near_duplicate_share: float = 0.18  # of pairs: a rewording of the source prompt
    broken_share: float = 0.12  # of pairs: a broken prompt (the issue asks for ~10–15 %)
    variants_per_prompt: int = 3  # pool of rewordings (and of broken prompts) per source prompt
    guidance_scales: tuple[float, ...] = (1.5, 3.0, 5.0, 7.5)  # per image; oracle mean 0.67–0.74
    num_steps: tuple[int, ...] = (10, 20)  # per image; 10 steps are visibly rougher
    annotators: int = 16
    quality_weight: tuple[float, float] = (0.2, 0.5)  # w, uniform per annotator: looks matter, less
    temperature: tuple[float, float] = (0.03, 0.08)  # Bradley–Terry, per annotator (oracle steps ≥ 0.1)
    tie_band: tuple[float, float] = (0.005, 0.02)  # |u0 − u1| below which a person says "tie"
    noise: float = 0.05  # random-click (flip) rate of an attentive annotator
    careless_share: float = 0.2  # of annotators, who flip at ``careless_noise``
    careless_noise: float = 0.3
    shard_rows: int = 512
    batch_size: int = 64  # images per pipeline call


@dataclass(frozen=True)
class _Annotator:
    quality_weight: float
    temperature: float
    tie_band: float
    noise: float


# --- the public API -------------------------------------------------------------------------------


def cache_root() -> Path:
    """diffalign's cache folder (``diffalign.outputs.cache_root``)."""
    return outputs.cache_root()


def cached_path(rebuild: bool = False) -> Path:
    """The folder of the default ``shapes-prefs`` shards in the cache, generated first if missing
    (or if ``rebuild``). What the registry's ``shapes-prefs`` resolves to."""
    folder = cache_root() / NAME
    if not rebuild and (folder / "recipe.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    outputs.remove_debris(folder.parent, of=NAME)
    print(f"generating the ShapesWorld preference set {NAME} into {folder} (once; a few minutes)", flush=True)
    start = time.perf_counter()
    try:
        build(folder, pairs=DEFAULT_PAIRS, replace=rebuild)
    except FileExistsError:
        if not (folder / "recipe.json").is_file():
            raise
        return folder  # another process built it meanwhile
    print(f"generated {NAME} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return folder


def build(
    folder: str | Path,
    *,
    pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
    model: str = "shapes",
    progress: bool = True,
    replace: bool = False,
) -> Path:
    """Generate ``pairs`` labelled pairs into ``folder`` (parquet shards and ``recipe.json``),
    atomically: the shards are written to a staging folder beside it, renamed when complete. The same
    ``seed`` gives the same bytes (on the same torch build and thread count). ``model`` draws the
    images: a ShapesWorld model (``shapes``, ``shapes-flow``), so that the pairs are the samples of the
    model DPO will train (on-policy). An existing non-empty ``folder`` is kept
    (``FileExistsError``) unless ``replace``."""
    folder = Path(folder)
    if pairs < 1:
        raise PreferenceDataError(f"pairs must be at least 1, got {pairs}")
    from diffalign.shapes import MODELS

    if model not in MODELS:
        raise PreferenceDataError(
            f"model {model!r} does not draw ShapesWorld: the pairs' oracle labels need one of {', '.join(MODELS)}"
        )
    if not replace and folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} already holds files; choose a new folder or rebuild (replace=True)")
    recipe = Recipe(pairs=pairs, seed=seed, model=model)
    rows = generate(recipe, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with outputs.staging_folder(folder, replace=replace) as staging:
        for index, start in enumerate(range(0, len(rows), recipe.shard_rows)):
            write_pickapic(rows[start : start + recipe.shard_rows], staging / f"shard-{index:05d}.parquet")
        report = {"name": NAME, "recipe": asdict(recipe), "figures": figures(rows)}
        (staging / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    return folder


def read_recipe(folder: str | Path) -> dict:
    """The ``recipe.json`` of a built set: ``{"name", "recipe", "figures"}``."""
    return json.loads((Path(folder) / "recipe.json").read_text())


def generate(recipe: Recipe, *, progress: bool = False) -> list[dict]:
    """The rows of a build, in Pick-a-Pic's columns plus the ground truth (see the module doc)."""
    plan_rng, image_rng, crowd_rng, label_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(recipe.seed).spawn(4)
    )
    plans = _plan_captions(recipe, plan_rng)  # [(caption, kind, source)] per pair
    settings = [
        (int(image_rng.integers(2**31)), float(image_rng.choice(recipe.guidance_scales)), int(s))
        for s in image_rng.choice(recipe.num_steps, size=2 * len(plans))
    ]  # (seed, guidance, steps) of images 2i and 2i + 1
    images = _generate_images(recipe, [p[0] for p in plans for _ in range(2)], settings, progress)
    crowd = _crowd(recipe, crowd_rng)
    rows = []
    for i, (caption, kind, source) in enumerate(plans):
        pair = [_truth(images[2 * i + k], caption, source) for k in range(2)]
        who = int(label_rng.integers(len(crowd)))
        label_0, flipped, utilities = _annotate(crowd[who], pair, kind in BROKEN_KINDS, label_rng)
        row = {
            "caption": caption,
            "jpg_0": encode_png(Image.fromarray(images[2 * i])),
            "jpg_1": encode_png(Image.fromarray(images[2 * i + 1])),
        }
        row.update(label_0=label_0, label_1=1.0 - label_0, prompt_kind=kind, prompt_source=source)
        for k in range(2):
            seed_k, guidance_k, steps_k = settings[2 * i + k]
            row.update(
                {
                    f"oracle_{k}": pair[k]["oracle"],
                    f"source_oracle_{k}": pair[k]["source_oracle"],
                    f"quality_{k}": pair[k]["quality"],
                    f"utility_{k}": utilities[k],
                    f"seed_{k}": seed_k,
                    f"guidance_{k}": guidance_k,
                    f"steps_{k}": steps_k,
                }
            )
        row.update(annotator=who, label_flipped=flipped, pair_id=i)
        rows.append(row)
    return rows


def figures(rows: list[dict]) -> dict:
    """The set's measured figures, from its ground-truth columns (so anyone can recompute them)."""
    n = len(rows)
    kinds = [r["prompt_kind"] for r in rows]
    tie = np.array([r["label_0"] == 0.5 for r in rows])
    broken = np.array([k in BROKEN_KINDS for k in kinds])
    flipped = np.array([r["label_flipped"] for r in rows])
    well = ~broken
    oracle = np.array([[r["oracle_0"], r["oracle_1"]] for r in rows], dtype=float)  # [N, 2]
    source = np.array([[r["source_oracle_0"], r["source_oracle_1"]] for r in rows], dtype=float)
    quality = np.array([[r["quality_0"], r["quality_1"]] for r in rows], dtype=float)
    sources = [r["prompt_source"] for r in rows]

    def winner_vs(truth: np.ndarray, mask: np.ndarray) -> dict:
        """Among non-tie pairs in ``mask``: is the labelled winner better, worse or equal by ``truth``?"""
        chosen = mask & ~tie
        if not chosen.any():
            return {"pairs": 0, "better": None, "worse": None, "equal": None}
        won = np.array([0 if r["label_0"] == 1.0 else 1 for r in rows])
        margin = truth[np.arange(n), won] - truth[np.arange(n), 1 - won]
        margin = margin[chosen]
        return {
            "pairs": int(chosen.sum()),
            "better": _share(margin > 1e-9),
            "worse": _share(margin < -1e-9),
            "equal": _share(np.abs(margin) <= 1e-9),
        }

    return {
        "pairs": n,
        "unique_captions": len({r["caption"] for r in rows}),
        "unique_source_prompts": len(set(sources)),
        "pairs_per_source_prompt": round(n / len(set(sources)), 2),
        "prompt_kinds": {k: _share(np.array(kinds) == k) for k in PROMPT_KINDS},
        "broken_share": _share(broken),
        "tie_rate": _share(tie),
        "tie_rate_well_formed": _share(tie[well]) if well.any() else None,
        "label_noise_rate": _share(flipped[~tie]) if (~tie).any() else None,
        "no_difference_share": _share(np.abs(oracle[well, 0] - oracle[well, 1]) <= 1e-9)
        if well.any()
        else None,
        "winner_by_oracle_well_formed": winner_vs(oracle, well),
        "winner_by_source_oracle_broken": winner_vs(source, broken),
        "winner_by_quality": winner_vs(quality, np.ones(n, dtype=bool)),
        "oracle_mean": round(float(np.nanmean(oracle[well])), 4) if well.any() else None,
        "oracle_perfect_share": _share(oracle[well] == 1.0) if well.any() else None,
        "quality_mean": round(float(quality.mean()), 4),
    }


def describe(figures: dict) -> str:
    """The figures of ``recipe.json`` as a few lines of text (what ``diffalign shapes prefs`` prints)."""
    winner = figures["winner_by_oracle_well_formed"]
    kinds = ", ".join(f"{kind} {share:.1%}" for kind, share in figures["prompt_kinds"].items())

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    sizes = (
        f"  pairs {figures['pairs']}, source prompts {figures['unique_source_prompts']} "
        f"({figures['pairs_per_source_prompt']} pairs each), distinct captions {figures['unique_captions']}"
    )
    labels = (
        f"  ties {pct(figures['tie_rate'])}, label noise {pct(figures['label_noise_rate'])} of non-ties, "
        f"no real difference (equal oracle) {pct(figures['no_difference_share'])} of well-formed pairs"
    )
    truth = (
        f"  winner by the oracle, non-tie well-formed pairs ({winner['pairs']}): "
        f"better {pct(winner['better'])}, worse {pct(winner['worse'])}, equal {pct(winner['equal'])}"
    )
    return "\n".join([sizes, f"  prompt kinds: {kinds}", labels, truth])


def quality(image: np.ndarray) -> float:
    """The visual-quality term in [0, 1] of ``image  # [H, W, 3] uint8``: see the module doc."""
    from diffalign.shapes.detector import detect

    return _quality(image, detect(image))


# --- the recipe's steps ---------------------------------------------------------------------------


def _plan_captions(recipe: Recipe, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(caption, prompt_kind, prompt_source)`` of every pair, in a shuffled (Pick-a-Pic-like,
    interleaved) order."""
    from diffalign.shapes.splits import prompts

    n_sources = max(1, round(recipe.pairs / recipe.pairs_per_prompt))
    shares = np.array(list(recipe.kind_shares.values()))
    per_kind = rng.multinomial(n_sources, shares / shares.sum())
    sources: list[str] = []
    for kind, count in zip(recipe.kind_shares, per_kind, strict=True):
        pool = prompts("train", kind)
        sources += [pool[i] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)]
    weights = rng.lognormal(0.0, 0.8, size=len(sources))  # heavy tail: a few prompts get many pairs
    counts = rng.multinomial(recipe.pairs, weights / weights.sum())
    plans = []
    for source, count in zip(sources, counts, strict=True):
        if count == 0:
            continue
        near = _rewordings(source, rng)[: recipe.variants_per_prompt]
        broken = [_broken(source, rng) for _ in range(recipe.variants_per_prompt)]
        for _ in range(count):
            draw = rng.random()
            if draw < recipe.broken_share:
                caption, kind = broken[rng.integers(len(broken))]
            elif draw < recipe.broken_share + recipe.near_duplicate_share and near:
                caption, kind = near[rng.integers(len(near))], "near-duplicate"
            else:
                caption, kind = source, "train"
            plans.append((caption, kind, source))
    return [plans[i] for i in rng.permutation(len(plans))]


def _rewordings(prompt: str, rng: np.random.Generator) -> list[str]:
    """Distinct rewordings of ``prompt`` that ``parse`` reads as the same facts, shuffled: what a
    person typing the same request again writes."""
    facts = parse(prompt)
    forms = {prompt + ".", prompt[0].upper() + prompt[1:], prompt.replace(" ", "  ", 1)}
    if facts.kind == "relation":
        (rel,) = facts.relations
        a, b = facts.entities
        forms.add(text(Facts((b, a), (Relation(0, converse(rel.relation), 1),))))
        forms.add(prompt.replace("a ", "one ", 1))
        if rel.relation in ("left of", "right of"):
            forms.add(prompt.replace(rel.relation, f"to the {rel.relation}"))
            forms.add(prompt.replace(rel.relation, f"on the {rel.relation}"))
    elif facts.kind == "count":
        number, rest = prompt.split(" ", 1)
        digits = {"two": "2", "three": "3"}
        forms.add(f"{digits[number]} {rest}")
        forms.add(prompt.removesuffix("s"))  # "two red circle": sloppy, still read right
    else:
        forms.add(prompt.replace("a ", "one ", 1))
        forms.add(prompt.replace("a ", "A ", 1) + ".")
    kept = sorted(f for f in forms if f != prompt and parse(f).canonical() == facts.canonical())
    return [kept[i] for i in rng.permutation(len(kept))]


_OFF_GRAMMAR = (
    "{A} and {B}",
    "{A} next to {B}",
    "{A} on top of {B}",
    "{A} inside {B}",
    "a photo of {A}",
    "{A}, digital art, trending on artstation, 4k",
    "a big {colour} {shape}",
    "a tiny {colour} {shape} in the corner",
    "four {colour} {shape}s",
    "many {colour} {shape}s on a white background",
    "a {shape} that is {colour}",
    "{A} with no background",
)


def _broken(prompt: str, rng: np.random.Generator) -> tuple[str, str]:
    """A broken version of ``prompt`` that ``parse`` rejects, and its kind (one of ``BROKEN_KINDS``)."""
    words = prompt.split()
    kind = BROKEN_KINDS[rng.integers(len(BROKEN_KINDS))]
    for _ in range(100):
        if kind == "truncated":
            cut = words[: rng.integers(1, len(words))]
            if rng.random() < 0.5:  # cut inside the next word, as a sent-too-early prompt is
                following = words[len(cut)]
                cut = [*cut, following[: rng.integers(1, len(following))]] if len(following) > 1 else cut
            candidate = " ".join(cut)
        elif kind == "ungrammatical":
            edit = rng.integers(4)
            changed = list(words)
            if edit == 0:
                changed = [changed[i] for i in rng.permutation(len(changed))]
            elif edit == 1:
                del changed[rng.integers(len(changed))]
            elif edit == 2:
                i = int(rng.integers(len(changed)))
                changed.insert(i, changed[i])
            else:
                i = int(rng.integers(len(changed) - 1))
                changed[i], changed[i + 1] = changed[i + 1], changed[i]
            candidate = " ".join(changed)
        else:
            candidate = _off_grammar(parse(prompt), rng)
        if candidate and not _parses(candidate):
            return candidate, kind
    raise AssertionError(f"no broken version of {prompt!r} found")  # never: truncation always breaks


def _off_grammar(facts: Facts, rng: np.random.Generator) -> str:
    from diffalign.shapes.world import COLOURS, SHAPES

    first = facts.entities[0]
    if len(facts.entities) > 1:
        second = facts.entities[1]
    else:
        choices = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (first.colour, first.shape)]
        second = Entity(*choices[rng.integers(len(choices))])
    template = _OFF_GRAMMAR[rng.integers(len(_OFF_GRAMMAR))]
    phrase = text(Facts((first,)))
    return template.format(A=phrase, B=text(Facts((second,))), colour=first.colour, shape=first.shape)


def _parses(caption: str) -> bool:
    try:
        parse(caption)
    except PromptOutsideGrammar:
        return False
    return True


def _generate_images(
    recipe: Recipe, captions: list[str], settings: list[tuple[int, float, int]], progress: bool
) -> list[np.ndarray]:
    """Every image ``[32, 32, 3] uint8``, batched by step count (one pipeline call per batch, guidance
    per image), each from its own seed's noise."""
    import torch
    from tqdm.auto import tqdm

    from diffalign import families, pipeline, sampling

    pipe = pipeline.load(recipe.model)
    family = families.of(pipe)
    pipe.set_progress_bar_config(disable=True)
    images: list[np.ndarray | None] = [None] * len(captions)
    batches = []
    for steps in sorted({s for _, _, s in settings}):
        members = [i for i, (_, _, s) in enumerate(settings) if s == steps]
        batches += [
            (steps, members[j : j + recipe.batch_size]) for j in range(0, len(members), recipe.batch_size)
        ]
    bar = tqdm(total=len(captions), desc="shapes-prefs images", unit="img", disable=not progress)
    for steps, members in batches:
        latents = torch.cat(
            [family.initial_latents(pipe, 1, torch.Generator().manual_seed(settings[i][0])) for i in members]
        )  # [B, 4, 8, 8]
        guidance = torch.tensor([settings[i][1] for i in members]).unsqueeze(1).expand(-1, steps)  # [B, T]
        trajectory = sampling.sample(
            pipe,
            [captions[i] for i in members],
            num_steps=steps,
            guidance_scale=guidance,
            eta=0.0,
            latents=latents,
        )
        pixels = (trajectory.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        for i, image in zip(members, pixels, strict=True):
            images[i] = image
        bar.update(len(members))
    bar.close()
    return images  # type: ignore[return-value]


def _truth(image: np.ndarray, caption: str, source: str) -> dict:
    """Oracle (caption and source prompt) and quality of one stored image, from one detection."""
    from diffalign.shapes.detector import detect, score_detections

    detections = detect(image)
    facts = parse(caption) if _parses(caption) else None
    return {
        "oracle": score_detections(detections, facts) if facts is not None else math.nan,
        "source_oracle": score_detections(detections, parse(source)),
        "quality": _quality(image, detections),
    }


def _quality(image: np.ndarray, detections: list) -> float:
    from diffalign.shapes.detector import MIN_CHROMA, UNKNOWN, as_rgb

    known = [d for d in detections if d.shape != UNKNOWN]
    if not known:
        return 0.0
    rgb = as_rgb(image)
    coloured = float(((rgb.max(-1) - rgb.min(-1)) >= MIN_CHROMA).mean())
    explained = min(1.0, sum(d.area for d in known) / max(coloured, 1e-9) / CLEAN_EXPLAINED)
    return round(explained * float(np.mean([d.confidence for d in known])), 6)


def _crowd(recipe: Recipe, rng: np.random.Generator) -> list[_Annotator]:
    careless = set(
        rng.choice(recipe.annotators, size=round(recipe.careless_share * recipe.annotators), replace=False)
    )
    return [
        _Annotator(
            quality_weight=float(rng.uniform(*recipe.quality_weight)),
            temperature=float(rng.uniform(*recipe.temperature)),
            tie_band=float(rng.uniform(*recipe.tie_band)),
            noise=recipe.careless_noise if i in careless else recipe.noise,
        )
        for i in range(recipe.annotators)
    ]


def _annotate(
    person: _Annotator, pair: list[dict], broken: bool, rng: np.random.Generator
) -> tuple[float, bool, tuple[float, float]]:
    """``(label_0, flipped, utilities)`` of one person's judgement of a pair."""
    if broken:  # the request cannot be read: judged on look alone
        utilities = (pair[0]["quality"], pair[1]["quality"])
    else:
        utilities = tuple(p["oracle"] + person.quality_weight * p["quality"] for p in pair)
    difference = utilities[0] - utilities[1]
    # Draw both numbers for every pair so that one pair's outcome never shifts the next pair's draws.
    choice, click = rng.random(), rng.random()
    if abs(difference) < person.tie_band:
        return 0.5, False, (round(utilities[0], 6), round(utilities[1], 6))
    first_wins = choice < 1.0 / (1.0 + math.exp(-difference / person.temperature))
    flipped = bool(click < person.noise)
    label_0 = float(first_wins != flipped)
    return label_0, flipped, (round(utilities[0], 6), round(utilities[1], 6))


def _share(mask: np.ndarray) -> float | None:
    """The share of True in ``mask``, rounded for the report; None (JSON null) for no pairs."""
    return round(float(np.mean(mask)), 4) if mask.size else None
