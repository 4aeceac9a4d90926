"""FiFA (diffalign.fifa): the three terms, the selection, the report, the text-quality scorers, the CLI."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.special import digamma, gammaln
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from diffalign import fifa, preferences, rewards
from diffalign.fifa import FiFAConfig, FiFAError
from diffalign.outputs import OutputError
from diffalign.preferences import PreferencePair, ReadStats
from diffalign.text_quality import LanguageModelQuality, TextQualityError, from_spec

# --- a toy preference set -------------------------------------------------------------------------


class ListPreferences:
    """The ``PreferenceData`` contract over a list of pairs (until the readers land)."""

    format = "jsonl"

    def __init__(self, pairs: list[PreferencePair], ties: int = 0):
        self._pairs = pairs
        self.location = Path("toy.jsonl")
        self.stats = ReadStats(rows=len(pairs) + ties, ties=ties, kept=len(pairs))

    def __len__(self) -> int:
        return len(self._pairs)

    def prompts(self) -> list[str]:
        return [pair.prompt for pair in self._pairs]

    def pairs(self, indices):
        return [self._pairs[i] for i in indices]


class BrightnessReward:
    """A tiny real two-tower reward: the image's mean brightness; prompts embedded by their words.

    Prompts with the same words (case, spaces and a full stop aside) get nearly the same embedding,
    others unrelated random directions — a text tower in which near-duplicates are near.
    """

    name = "toy-brightness"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))

    def embed_texts(self, prompts) -> torch.Tensor:
        def direction(text: str) -> np.ndarray:
            return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(32)

        vectors = [
            direction(" ".join(p.lower().strip().rstrip(".").split())) + 0.02 * direction(p) for p in prompts
        ]
        return torch.tensor(np.stack(vectors), dtype=torch.float32)


def pair(prompt: str, chosen: float, rejected: float, kind: str, flipped: bool = False) -> PreferencePair:
    def grey(value: float) -> Image.Image:
        return Image.new("RGB", (8, 8), (round(255 * value),) * 3)

    return PreferencePair(
        prompt,
        grey(chosen),
        grey(rejected),
        f"toy {prompt!r}",
        {"prompt_kind": kind, "label_flipped": flipped},
    )


GOOD = [
    "a red circle left of a blue square",
    "two green triangles",
    "a yellow square above a red triangle",
    "three blue circles",
    "a green circle below a yellow square",
    "two red squares",
    "a blue triangle right of a green square",
    "three yellow triangles",
]
BROKEN = ["zxq vbn mlk", "lorem ipsum dolor sit", "qwerty asdf", "the of and with"]
TIED = ["a blue square", "two yellow circles", "a red square above a green circle", "three red triangles"]
DUPLICATES = [
    "a red circle",
    "A red circle",
    "a red circle.",
    "a  red circle",
    "A red circle.",
    " a red circle",
]
FLIPPED = ["a green square", "two blue triangles"]


def toy() -> ListPreferences:
    """24 pairs; a count of 8 should keep exactly the ``GOOD`` ones: the broken prompts have good
    margins, the near-duplicate cluster the best margins, the tied pairs well-formed distinct prompts."""
    pairs = [pair(p, 0.8, 0.2, "train") for p in GOOD]
    pairs += [pair(p, 0.8, 0.2, "off-grammar") for p in BROKEN]
    pairs += [pair(p, 0.5, 0.5, "train") for p in TIED]
    pairs += [pair(p, 0.85, 0.15, "near-duplicate") for p in DUPLICATES]
    pairs += [pair(p, 0.2, 0.8, "train", flipped=True) for p in FLIPPED]
    return ListPreferences(pairs, ties=3)


def run(**options) -> tuple[list[str], fifa.Selection]:
    config = FiFAConfig(**{"count": 8, "text_quality": "shapes-grammar", **options})
    selection = fifa.select(toy(), config, reward=BrightnessReward(), progress=False)
    return [selection.prompts[i] for i in selection.indices], selection


def test_fifa_keeps_the_informative_well_formed_diverse_pairs():
    kept, selection = run()
    assert sorted(kept) == sorted(GOOD)
    np.testing.assert_allclose(selection.scores.margin[:8], 0.6, atol=1e-6)  # from the images, by batches
    assert selection.scores.quality[8:12].max() < selection.scores.quality[:8].min()


def test_each_term_left_out_lets_its_bad_pairs_in():
    without_quality, _ = run(alpha=0)
    assert set(without_quality) & set(BROKEN)
    without_diversity, _ = run(gamma=0)
    assert set(DUPLICATES) <= set(without_diversity)  # the best margins, only diversity removes them
    without_margin, _ = run(margin_weight=0)
    assert set(without_margin) & set(TIED + FLIPPED)


def test_left_out_terms_are_not_computed():
    _, selection = run(alpha=0, gamma=0)
    assert np.isnan(selection.scores.quality).all() and np.isnan(selection.scores.log_knn).all()


def test_importance_is_the_weighted_sum_of_standardised_terms():
    _, selection = run(alpha=0.5, gamma=2.0)
    s = selection.scores

    def z(x):
        return (x - x.mean()) / x.std()

    np.testing.assert_allclose(s.importance, z(s.margin) + 0.5 * z(s.quality) + 2.0 * z(s.log_knn), atol=1e-9)
    assert s.importance[selection.indices].min() >= np.delete(s.importance, selection.indices).max()


# --- the kNN entropy term -------------------------------------------------------------------------


def test_knn_distances_match_brute_force_with_and_without_repeats():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((30, 5))
    brute = np.sort(cdist(points, points), axis=1)  # column 0 is the point itself
    for k in (1, 3, 7):
        np.testing.assert_allclose(fifa.knn_distances(points, k), brute[:, k], rtol=1e-10)
    counts = rng.integers(1, 4, size=len(points))
    expanded = np.repeat(points, counts, axis=0)
    brute = np.sort(cdist(expanded, expanded), axis=1)
    first = np.cumsum(counts) - counts  # one row of each distinct point in the expanded set
    for k in (1, 2, 5):
        np.testing.assert_allclose(fifa.knn_distances(points, k, counts), brute[first, k], rtol=1e-10)


def test_knn_entropy_is_the_kozachenko_leonenko_estimate():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((200, 3))
    k, (n, d) = 4, points.shape
    eps = np.sort(cdist(points, points), axis=1)[:, k]
    expected = (
        digamma(n) - digamma(k) + d / 2 * math.log(math.pi) - gammaln(d / 2 + 1) + d * np.log(eps).mean()
    )
    assert fifa.knn_entropy(points, k) == pytest.approx(expected, rel=1e-10)
    # and it estimates: a standard normal in 3-d has entropy 1.5 * log(2 pi e) = 4.26 nats
    assert fifa.knn_entropy(points, k) == pytest.approx(1.5 * math.log(2 * math.pi * math.e), abs=0.3)


def test_repeated_prompts_get_the_lowest_diversity_term():
    terms = fifa.diversity_terms(["a", "a", "a", "b", "c", "d"], BrightnessReward().embed_texts, k=2)
    assert terms[0] == terms[1] == terms[2] == pytest.approx(math.log(fifa.DISTANCE_FLOOR))
    assert terms[3:].min() > math.log(0.5)


def test_too_few_prompts_for_k_is_a_clear_error():
    with pytest.raises(FiFAError, match="more than k=5"):
        fifa.diversity_terms(["a", "b", "c"], BrightnessReward().embed_texts, k=5)


# --- sizes and settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kept"), [({"count": 8}, 8), ({"fraction": 0.25}, 6), ({"fraction": 1.0}, 24)]
)
def test_fraction_and_count_set_the_size(options, kept):
    selection = fifa.select(toy(), FiFAConfig(**options, alpha=0), reward=BrightnessReward(), progress=False)
    assert len(selection.indices) == kept == len(set(selection.indices))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of fraction"),
        ({"fraction": 0.5, "count": 3}, "exactly one of fraction"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"count": 0}, "count must be a whole number"),
        ({"count": 2, "alpha": -1}, "alpha must be a finite number >= 0"),
        ({"count": 2, "gamma": float("nan")}, "gamma must be"),
        ({"count": 2, "k": 0}, "k and batch_size must be at least 1"),
    ],
)
def test_bad_settings_are_rejected_naming_the_key(options, message):
    with pytest.raises(FiFAError, match=message):
        FiFAConfig(**options)


def test_a_count_above_the_data_and_missing_pieces_say_what_to_do():
    with pytest.raises(FiFAError, match="count 25 is more than the 24 pairs"):
        fifa.select(toy(), FiFAConfig(count=25, alpha=0), reward=BrightnessReward(), progress=False)
    with pytest.raises(FiFAError, match="--text-quality"):
        fifa.resolve(FiFAConfig(count=2), "my-data.jsonl")
    assert fifa.resolve(FiFAConfig(count=2, alpha=0), "my-data.jsonl").reward == "pickscore"
    resolved = fifa.resolve(FiFAConfig(count=2), "shapes-prefs")  # the world's registered defaults
    assert (resolved.reward, resolved.text_quality) == ("shapes-clip", "shapes-grammar")
    blind = rewards.build("jpeg-compressibility")
    with pytest.raises(FiFAError, match="cannot embed prompts"):
        fifa.select(toy(), FiFAConfig(count=2, alpha=0), reward=blind, progress=False)


def test_clip_family_rewards_embed_texts_for_the_diversity_term():
    clip = rewards.build("clip-score", checkpoint="tiny-random")
    assert isinstance(clip, rewards.TextEmbeddingReward)
    embeds = clip.embed_texts(["a red circle", "two blue squares"])
    assert embeds.shape[0] == 2 and torch.allclose(embeds.norm(dim=-1), torch.ones(2), atol=1e-5)


# --- report ---------------------------------------------------------------------------------------


def test_report_counts_what_was_removed_and_never_overwrites(tmp_path):
    _, selection = run()
    summary = fifa.write_report(selection, tmp_path / "report", ties=3)
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == summary
    assert (summary["pairs"], summary["kept"], summary["kept_fraction"]) == (24, 8, pytest.approx(1 / 3))
    removed = summary["removed"]
    assert removed["broken_prompts"] == {"pairs": 4, "removed": 4, "share_removed": 1.0}
    assert removed["label_flipped"]["share_removed"] == 1.0
    assert removed["negative_margin"] == {"pairs": 2, "removed": 2, "share_removed": 1.0}
    assert removed["prompt_kind"]["near-duplicate"]["removed"] == 6 and removed["ties"]["removed"] == 3
    assert summary["terms"]["margin"]["kept"]["mean"] > summary["terms"]["margin"]["dropped"]["mean"]
    assert "Kept 8 of 24 pairs" in (tmp_path / "report" / "report.md").read_text()
    png = tmp_path / "report" / "fifa.png"
    assert Image.open(png).size[0] > 100
    before = png.stat().st_mtime_ns
    with pytest.raises(OutputError, match="already exists"):
        fifa.write_report(selection, tmp_path / "report")
    assert png.stat().st_mtime_ns == before


def test_report_without_ground_truth_gives_the_proxy_only():
    data = ListPreferences([pair(p, 0.8, 0.2, "x") for p in GOOD[:4]] + [pair("a red circle", 0.2, 0.8, "x")])
    for item in data._pairs:
        item.extra.clear()
    selection = fifa.select(
        data, FiFAConfig(count=2, alpha=0, k=2), reward=BrightnessReward(), progress=False
    )
    removed = fifa.report(selection)["removed"]
    assert "broken_prompts" not in removed and "label_flipped" not in removed
    assert removed["negative_margin"]["removed"] == 1


# --- text quality ---------------------------------------------------------------------------------


def test_shapes_grammar_scores_parsed_prompts_above_every_broken_one():
    score = from_spec("shapes-grammar")
    values = score(["a red circle left of a blue square", "a red circle left of", "circle zzz", "qwerty", ""])
    np.testing.assert_allclose(values, [1.0, 0.5, 0.25, 0.0, 0.0])
    with pytest.raises(TextQualityError, match="Did you mean 'shapes-grammar'"):
        from_spec("shapes-gramar")


def tiny_language_model(folder: Path) -> None:
    """A tiny random GPT-2 and a byte-level BPE tokenizer trained here (no download)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["a red circle left of a blue square", "two green triangles"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_language_model_quality_is_the_mean_token_log_likelihood(tmp_path):
    tiny_language_model(tmp_path / "lm")
    prompts = ["a red circle left of a blue square", "two green triangles", "zq", "two green triangles"]
    scorer = from_spec(f"lm:{tmp_path / 'lm'}", batch_size=2)  # padding inside a batch, and repeats
    assert isinstance(scorer, LanguageModelQuality)
    values = scorer(prompts)

    model = GPT2LMHeadModel.from_pretrained(tmp_path / "lm").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "lm")
    for prompt, value in zip(prompts, values):
        ids = [tokenizer.eos_token_id, *tokenizer(prompt).input_ids, tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        expected = np.mean([log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1)])
        assert value == pytest.approx(expected, abs=1e-5)


def test_a_missing_language_model_says_how_to_provide_one(tmp_path):
    with pytest.raises(TextQualityError, match="hf download"):
        from_spec(f"lm:{tmp_path / 'nothing'}")


# --- the command ----------------------------------------------------------------------------------


def readers_exist() -> bool:
    try:
        preferences.open_preferences("no-such-file.jsonl")
    except NotImplementedError:
        return False
    except (OSError, ValueError):  # a reader that looked for the file
        return True
    return True


@pytest.mark.skipif(
    not readers_exist(), reason="diffalign.preferences readers have not landed on this branch"
)
def test_cli_filters_a_jsonl_file_end_to_end(tmp_path, capsys):
    """ShapesWorld pairs (chosen: a scene of the prompt; rejected: a blank canvas) scored by the shipped
    shapes-clip; the two broken prompts go, the subset is a JSONL file the readers open again."""
    from diffalign.cli import main
    from diffalign.shapes import Scene, render, scene_for

    rng = np.random.default_rng(0)
    blank = Image.fromarray(render(Scene(objects=())))
    lines = []
    for index, prompt in enumerate([*GOOD, *BROKEN[:2]]):
        Image.fromarray(render(scene_for(prompt if prompt in GOOD else GOOD[0], rng))).save(
            tmp_path / f"{index}w.png"
        )
        blank.save(tmp_path / f"{index}l.png")
        lines.append(json.dumps({"prompt": prompt, "chosen": f"{index}w.png", "rejected": f"{index}l.png"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    argv = [
        "data",
        "filter",
        str(tmp_path / "data.jsonl"),
        "--output",
        str(tmp_path / "kept.jsonl"),
        "--count",
        "6",
    ]
    argv += [
        "--reward",
        "shapes-clip",
        "--text-quality",
        "shapes-grammar",
        "--k",
        "2",
        "--report",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 0
    assert "Kept 6 of 10 pairs" in capsys.readouterr().out
    kept = preferences.open_preferences(tmp_path / "kept.jsonl")
    assert len(kept) == 6 and not set(kept.prompts()) & set(BROKEN)
    assert {p.name for p in (tmp_path / "r").iterdir()} == set(fifa.REPORT_FILES)
    assert main(argv) == 2  # the output exists: refused, nothing rewritten


def test_cli_passes_reward_options_to_the_reward(tmp_path, capsys):
    """``--reward-option`` reaches ``rewards.build``: PickScore from a given checkpoint (the tiny
    random one), and a wrong option is one clear error line."""
    from diffalign.cli import main

    rng = np.random.default_rng(0)
    lines = []
    for index, prompt in enumerate(GOOD[:4]):
        Image.fromarray(render_scene(prompt, rng)).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"prompt": prompt, "chosen": f"{index}.png", "rejected": "0.png"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["data", "filter", str(tmp_path / "data.jsonl"), "--count", "2", "--alpha", "0", "--k", "1"]
    argv += ["--reward", "pickscore", "--reward-option", "checkpoint=tiny-random"]
    assert main([*argv, "--output", str(tmp_path / "kept.jsonl")]) == 0
    assert len(preferences.open_preferences(tmp_path / "kept.jsonl")) == 2
    assert main([*argv, "--reward-option", "nonsense=1", "--output", str(tmp_path / "other.jsonl")]) == 2
    assert not (tmp_path / "other.jsonl").exists()


def render_scene(prompt, rng):
    from diffalign.shapes import render, scene_for

    return render(scene_for(prompt, rng))
