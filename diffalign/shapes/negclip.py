"""A ShapesWorld reward model that reads word order: the shipped CLIP fine-tuned with hard negatives.

The shipped CLIP (``shapes-clip``) is a bag of words, as contrastively trained CLIPs are
(Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words, and
what to do about it", ICLR): on rendered train-split scenes it scores "a red circle left of a
blue square" and "a red circle right of a blue square" equally (pairwise accuracy 0.50), so no
fine-tuning on it can teach a generator spatial relations. Their remedy, NegCLIP, is used here
unchanged in kind: fine-tune CLIP with the usual contrastive loss, but add to every batch's
texts a *hard negative* of each caption — the same words made false by a swap — so that the
image-to-text softmax has to tell them apart (their Sec. 4, Eq. for the image-to-text loss with
the negative captions appended to the text set; text-to-image is unchanged).

Hard negatives here are made from the grammar, exactly, rather than by the paper's spaCy word
swaps (that is the deviation; it leaves no chance of a "negative" that is true):

- relation caption "A rel B": the converse relation ("A right of B" for "A left of B"), the
  colours of A and B exchanged, or their shapes exchanged — a swap is used only when the result
  is a different, well-formed prompt whose compositions are all in the train split, so held-out
  compositions never reach the reward model either;
- count caption: the other count ("two" <-> "three");
- single caption: none (in-batch negatives already differ in colour or shape).

A negative that equals another image's caption in the batch is treated as that image's
positive, as repeated captions are in ``training.train_clip``.

Second deviation: a two-way cross-entropy of each image's caption against its own negative is
added (``pair_weight``, 1 by default). With NegCLIP's loss alone the negative is one text among
~190 in the softmax and the signal is faint: 600 steps at lr 3e-4 moved relation accuracy
only from 0.62 to 0.64. With the pair term, 3000 steps at lr 5e-4 (about 20 minutes on one CPU
thread) give relation and count accuracy 1.00 on fresh scenes and keep in-batch retrieval
(0.963 -> 0.996); the pair term alone, without the contrastive loss, destroys retrieval
(top-1 of 64 fell to 0.03). The shipped model is ``diffalign shapes train-negclip`` with the
defaults below; its ``training_report.json`` figures are in docs/studies/default-job.md.

``finetune`` trains; ``word_order_accuracy`` measures what the issue needs (how often the true
caption outscores its converse, its colour swap, its other count, on fresh scenes); the CLI is
``diffalign shapes train-negclip``; the reward ``shapes-negclip`` loads the shipped result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm
from transformers import CLIPModel

from diffalign.shapes import assets
from diffalign.shapes.grammar import Entity, Facts, Relation, converse, parse, text
from diffalign.shapes.splits import HELDOUT_PAIRS
from diffalign.shapes.training import Dataset, clip_pixels, clipped_step, render_dataset, tokenize


@dataclass
class NegClipConfig:
    """Hyperparameters of the fine-tune (defaults: the shipped ``shapes-negclip``)."""

    seed: int = 0
    dataset_size: int = 20_000  # fresh train-split scenes (another seed than the base recipe's)
    steps: int = 3_000  # 600 steps moved relation accuracy only from 0.62 to 0.64; it rises late
    batch_size: int = 128
    learning_rate: float = 5e-4  # half the from-scratch rate: the model is already trained
    pair_weight: float = 1.0  # weight of the caption-vs-its-negative term (0: NegCLIP's loss alone)
    warmup_steps: int = 50
    eval_scenes: int = 1_000  # fresh scenes for word_order_accuracy before and after


def hard_negatives(caption: str, rng: np.random.Generator) -> str | None:
    """One false caption made from ``caption``'s own words (see the module doc), or None."""
    facts = parse(caption)
    if facts.kind == "count":
        (entity,) = facts.entities
        return text(Facts((Entity(entity.colour, entity.shape, 5 - entity.count),)))
    if facts.kind != "relation":
        return None
    (rel,) = facts.relations
    a, b = facts.entities
    candidates = [Facts(facts.entities, (Relation(0, converse(rel.relation), 1),))]
    for swapped in (
        (Entity(b.colour, a.shape), Entity(a.colour, b.shape)),
        (Entity(a.colour, b.shape), Entity(b.colour, a.shape)),
    ):
        if (
            swapped[0] != swapped[1]
            and {(e.colour, e.shape) for e in swapped}.isdisjoint(HELDOUT_PAIRS)
            and set(swapped) != set(facts.entities)
        ):
            candidates.append(Facts(swapped, facts.relations))
    return text(candidates[rng.integers(len(candidates))])


def _negatives_for(captions: list[str], seed: int) -> list[str | None]:
    rng = np.random.default_rng(seed)
    return [hard_negatives(caption, rng) for caption in captions]


def negclip_loss(
    model: CLIPModel,
    token_ids: torch.Tensor,
    pixels: torch.Tensor,
    texts: list[str],
    captions: list[str],
    pairs: list[tuple[int, int]] = (),
    pair_weight: float = 0.0,
) -> torch.Tensor:
    """NegCLIP's loss for one batch: images against ``texts`` (the captions, then the hard
    negatives; ``token_ids`` in the same order), targets spread over every text equal to the
    image's caption; texts to images over the batch's captions only.

    ``pairs`` (image row, its negative's text column) with ``pair_weight`` > 0 add a two-way
    cross-entropy of each image's caption against its own negative (see the module doc)."""
    output = model(input_ids=token_ids, pixel_values=pixels)
    logits = output.logits_per_image  # [B, T]
    batch = len(captions)
    same = torch.tensor([[caption == other for other in texts] for caption in captions], dtype=torch.float32)
    image_to_text = F.cross_entropy(logits, same / same.sum(dim=1, keepdim=True))
    positives = same[:, :batch]
    text_to_image = F.cross_entropy(logits[:, :batch].T, positives.T / positives.T.sum(dim=1, keepdim=True))
    loss = (image_to_text + text_to_image) / 2
    if pairs and pair_weight > 0:
        rows, columns = (torch.tensor(index) for index in zip(*pairs))
        two_way = torch.stack([logits[rows, rows], logits[rows, columns]], dim=1)
        loss = loss + pair_weight * F.cross_entropy(two_way, torch.zeros(len(pairs), dtype=torch.long))
    return loss


def finetune(
    model: CLIPModel, tokenizer, data: Dataset, config: NegClipConfig, progress: bool = True
) -> tuple[CLIPModel, list[float]]:
    """Fine-tune ``model`` in place with hard negatives; returns it (eval mode) and the losses."""
    generator = torch.Generator().manual_seed(config.seed)
    negatives = _negatives_for(data.captions, config.seed)
    caption_ids = tokenize(tokenizer, data.captions)
    negative_rows = [i for i, n in enumerate(negatives) if n is not None]
    negative_ids = torch.zeros_like(caption_ids)
    negative_ids[negative_rows] = tokenize(tokenizer, [negatives[i] for i in negative_rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="train NegCLIP", disable=not progress)
    for _ in bar:
        batch = torch.randint(len(data.captions), (config.batch_size,), generator=generator).tolist()
        with_negative = [i for i in batch if negatives[i] is not None]
        texts = [data.captions[i] for i in batch] + [negatives[i] for i in with_negative]
        ids = torch.cat([caption_ids[batch], negative_ids[with_negative]])
        rows = [row for row, i in enumerate(batch) if negatives[i] is not None]
        pairs = [(row, len(batch) + k) for k, row in enumerate(rows)]
        loss = negclip_loss(
            model,
            ids,
            clip_pixels(data.images[batch]),
            texts,
            [data.captions[i] for i in batch],
            pairs,
            config.pair_weight,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"NegCLIP loss is {loss.item()} at step {len(losses)}; lower --learning-rate"
            )
        clipped_step(loss, model, optimizer, schedule)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), losses


def _image_embeddings(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    output = model.vision_model(pixel_values=clip_pixels(images))
    return F.normalize(model.visual_projection(output.pooler_output), dim=-1)


def _text_embeddings(model: CLIPModel, token_ids: torch.Tensor) -> torch.Tensor:
    output = model.text_model(input_ids=token_ids)
    return F.normalize(model.text_projection(output.pooler_output), dim=-1)


@torch.no_grad()
def word_order_accuracy(model: CLIPModel, tokenizer, data: Dataset, seed: int = 1) -> dict[str, float]:
    """How often a scene's true caption scores above its hard negative, per caption kind
    (0.5 = blind to what the swap changes), and the in-batch retrieval accuracy over 64-scene
    groups (does fine-tuning keep the ordinary skill?)."""
    negatives = _negatives_for(data.captions, seed)
    kinds = [parse(caption).kind for caption in data.captions]
    wins: dict[str, list[bool]] = {"relation": [], "count": []}
    retrieval = []
    for start in range(0, len(data.captions), 64):
        rows = list(range(start, min(start + 64, len(data.captions))))
        image_embeds = _image_embeddings(model, data.images[rows])
        captions = [data.captions[i] for i in rows]
        text_embeds = _text_embeddings(model, tokenize(tokenizer, captions))
        similarity = image_embeds @ text_embeds.T
        best = similarity.argmax(dim=1).tolist()
        retrieval += [captions[b] == captions[i] for i, b in enumerate(best)]
        with_negative = [i for i in rows if negatives[i] is not None]
        if with_negative:
            negative_embeds = _text_embeddings(
                model, tokenize(tokenizer, [negatives[i] for i in with_negative])
            )
            for j, i in enumerate(with_negative):
                k = rows.index(i)
                wins[kinds[i]].append(bool(similarity[k, k] > image_embeds[k] @ negative_embeds[j]))
    result = {f"{kind}_pairwise": float(np.mean(v)) for kind, v in wins.items() if v}
    result["retrieval_top1_of_64"] = float(np.mean(retrieval))
    return result


def train_negclip(config: NegClipConfig, output: Path, fp16: bool = True, progress: bool = True) -> dict:
    """Fine-tune the shipped CLIP with hard negatives and save ``output/clip`` (a CLIPModel folder)
    and ``output/training_report.json`` (accuracies before and after, seconds, losses)."""
    torch.manual_seed(config.seed)
    model, tokenizer = assets.load_clip()
    # Scenes for training and for measuring come from seeds the base recipe did not use.
    data = render_dataset(config.dataset_size, 10_000 + config.seed)
    held = render_dataset(config.eval_scenes, 20_000 + config.seed)
    before = word_order_accuracy(model, tokenizer, held)
    started = time.perf_counter()
    model, losses = finetune(model, tokenizer, data, config, progress=progress)
    seconds = time.perf_counter() - started
    after = word_order_accuracy(model, tokenizer, held)
    folder = output / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16 if fp16 else torch.float32).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return assets.write_fine_tune_report(output, asdict(config), before, after, seconds, losses)


def install(clip_folder: Path, destination: Path = assets.NEGCLIP_DIR) -> None:
    """Copy a fine-tuned CLIP's config and weights to where the reward ``shapes-negclip`` reads
    them (its tokenizer is the shipped CLIP's, so it is not copied)."""
    assets.install_weights(clip_folder, destination, ("config.json", "model.safetensors"))
