"""Does the shipped ShapesWorld generator tell a relation from its converse?

Two measurements on relation prompts of the train set:

* **text conditioning** — the relative distance ``‖E(a) − E(b)‖ / ‖E(a)‖`` between the token
  sequences ``E`` the UNet cross-attends to, for a prompt ``a`` and an edit ``b`` of it: the
  converse relation ("left of" ↔ "right of"), another colour for the first object, the two
  objects exchanged. Measured for the generator's text encoder (the shipped CLIP's text tower,
  frozen while the UNet was trained) and, for comparison, for the NegCLIP text tower that
  ``shapes-negclip`` reads with.
* **behaviour** — the same initial noise sampled with the prompt and with its converse (DDIM
  η = 0): how often the exact detector finds the two objects on the *same* side of each other in
  both images (a generator that reads the relation word would put them on opposite sides), and
  the mean absolute pixel difference between the two images, beside that between two different
  initial noises with the same prompt. The same with the relation turned to the other axis
  ("left of" → "above"): how often the pair's dominant axis follows the prompt.
* **ceiling** — the highest mean oracle score the evaluator's 64 train prompts (per seed) allow a
  generator that draws every requested object, nothing else, and each relation on the right
  axis but in a direction it cannot read: half of the relations hold. The bar of +0.05 is
  compared with this ceiling minus the base model's score.

It explains why reward fine-tuning of the UNet alone does not teach relations in minutes
(docs/studies/default-job.md).

    python -m diffalign.benchmarks.text_conditioning --output results/text_conditioning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffalign.benchmarks.layout_steps import conversed

from diffalign import prompts as prompt_sets
from diffalign.evaluation import evaluation_generator
from diffalign.sampling import decode_latents, encode_prompts, guided_noise, initial_latents
from diffalign.shapes import assets, detector
from diffalign.shapes.grammar import parse, text
from diffalign.shapes.world import COLOURS


def recoloured(prompt: str) -> str:
    """The prompt with its first object in the next colour of the palette."""
    facts = parse(prompt)
    first = facts.entities[0]
    palette = list(COLOURS)
    colour = palette[(palette.index(first.colour) + 1) % len(palette)]
    return text(
        dataclasses.replace(facts, entities=(dataclasses.replace(first, colour=colour), *facts.entities[1:]))
    )


def exchanged(prompt: str) -> str:
    """The prompt with its two objects exchanged ("A left of B" → "B left of A")."""
    facts = parse(prompt)
    return text(dataclasses.replace(facts, entities=tuple(reversed(facts.entities))))


_TURNED = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}


def turned(prompt: str) -> str:
    """The prompt with its first relation on the other axis ("left of" → "above")."""
    facts = parse(prompt)
    first = facts.relations[0]
    swapped = dataclasses.replace(first, relation=_TURNED[first.relation])
    return text(dataclasses.replace(facts, relations=(swapped, *facts.relations[1:])))


def direction_blind_ceiling(prompts: list[str]) -> float:
    """Mean oracle score of ``prompts`` if every object is drawn, nothing else is, and half of the
    relations hold (each on its axis, in a direction chosen without reading the relation word)."""
    values = []
    for prompt in prompts:
        facts = parse(prompt)
        objects = sum(entity.count for entity in facts.entities)
        values.append((objects + 0.5 * len(facts.relations)) / (objects + len(facts.relations)))
    return float(np.mean(values))


def evaluation_prompts(seed: int, size: int = 64) -> list[str]:
    """The train prompts ``diffalign train``'s evaluator scores for ``seed`` (its first prompt set)."""
    return prompt_sets.draw(prompt_sets.load_prompts("shapes-train"), size, evaluation_generator(seed))


EDITS = {"converse relation": conversed, "other colour": recoloured, "objects exchanged": exchanged}


def relative_distances(encode, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Mean, min and max of ‖E(a) − E(edit(a))‖ / ‖E(a)‖ over ``prompts``, per edit."""
    base = encode(prompts)
    result = {}
    for name, edit in EDITS.items():
        edited = encode([edit(p) for p in prompts])
        distance = ((base - edited).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)).numpy()
        result[name] = {
            "mean": float(distance.mean()),
            "min": float(distance.min()),
            "max": float(distance.max()),
        }
    return result


def sides(image: torch.Tensor, prompt: str) -> tuple[float, float] | None:
    """Subject minus object centre (x, y) of the prompt's first relation, or None if one is missing."""
    facts = parse(prompt)
    relation = facts.relations[0]
    ranked = sorted(detector.detect(image), key=lambda d: -d.confidence)
    centres = []
    for index in (relation.subject, relation.object):
        entity = facts.entities[index]
        found = [d for d in ranked if (d.colour, d.shape) == (entity.colour, entity.shape)]
        if not found:
            return None
        centres.append(np.array(found[0].centre))
    return tuple(centres[0] - centres[1])


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
    cond, uncond = encode_prompts(pipe, prompts)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    latents = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(seed))
    for timestep in scheduler.timesteps:
        noise = guided_noise(
            pipe.unet, latents, timestep, cond, uncond, torch.full((len(prompts),), guidance)
        )
        latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    return decode_latents(pipe, latents)


def axis(offset: tuple[float, float]) -> int:
    """0 if the pair is further apart horizontally than vertically, else 1."""
    return 0 if abs(offset[0]) > abs(offset[1]) else 1


def measure(count: int, steps: int, guidance: float, seed: int, base_scores: dict[int, float]) -> dict:
    pipe = assets.load_pipeline()
    relation_prompts = [p for p in prompt_sets.load_prompts("shapes-train") if parse(p).relations]
    order = torch.randperm(len(relation_prompts), generator=torch.Generator().manual_seed(seed))[:count]
    prompts = [relation_prompts[i] for i in order.tolist()]

    @torch.no_grad()
    def generator_tokens(batch: list[str]) -> torch.Tensor:
        return encode_prompts(pipe, batch)[0]

    negclip, tokenizer = assets.load_clip(assets.NEGCLIP_DIR)

    @torch.no_grad()
    def negclip_tokens(batch: list[str]) -> torch.Tensor:
        ids = tokenizer(
            batch,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return negclip.text_model(ids).last_hidden_state

    encoders = {
        "generator (shipped CLIP text tower)": relative_distances(generator_tokens, prompts),
        "NegCLIP text tower": relative_distances(negclip_tokens, prompts),
    }

    converses = [conversed(p) for p in prompts]
    images = sample(pipe, prompts, seed + 1, steps, guidance)
    flipped = sample(pipe, converses, seed + 1, steps, guidance)
    other_noise = sample(pipe, prompts, seed + 2, steps, guidance)
    same_side = detectable = 0
    for image, flip, prompt in zip(images, flipped, prompts):
        a, b = sides(image, prompt), sides(flip, prompt)
        if a is None or b is None:
            continue
        detectable += 1
        along = 0 if parse(prompt).relations[0].relation in ("left of", "right of") else 1
        same_side += bool(np.sign(a[along]) == np.sign(b[along]))
    rotated = sample(pipe, [turned(p) for p in prompts], seed + 1, steps, guidance)
    follows = axis_detectable = 0
    for image, rot, prompt in zip(images, rotated, prompts):
        a, b = sides(image, prompt), sides(rot, prompt)
        if a is None or b is None:
            continue
        axis_detectable += 1
        along = 0 if parse(prompt).relations[0].relation in ("left of", "right of") else 1
        follows += (axis(a) == along) and (axis(b) == 1 - along)
    ceilings = {}
    for eval_seed, base in base_scores.items():
        ceiling = direction_blind_ceiling(evaluation_prompts(eval_seed))
        ceilings[str(eval_seed)] = {"base": base, "ceiling": ceiling, "headroom": ceiling - base}
    return {
        "prompts": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "relative_distance": encoders,
        "converse_same_noise": {"detectable": detectable, "same_side": same_side},
        "other_axis_same_noise": {"detectable": axis_detectable, "axis_follows_prompt_in_both": follows},
        "direction_blind_ceiling": ceilings,
        "pixel_difference": {
            "prompt vs converse, same noise": float((images - flipped).abs().mean()),
            "same prompt, other noise": float((images - other_noise).abs().mean()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="relation prompts drawn from shapes-train")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default="results/text_conditioning", help="folder for text_conditioning.json"
    )
    parser.add_argument(
        "--base",
        nargs="+",
        default=["0=0.730", "1=0.720", "2=0.801"],
        help="SEED=SCORE: the base model's eval/shapes-train/shapes-oracle per seed (from the "
        "default-job study) to compare with the ceiling",
    )
    parser.add_argument("--quick", action="store_true", help="8 prompts, 6 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.steps = 8, 6
    base_scores = {int(item.split("=")[0]): float(item.split("=")[1]) for item in args.base}
    result = measure(args.prompts, args.steps, args.guidance, args.seed, base_scores)
    print(
        f"relative distance ‖E(a) - E(b)‖ / ‖E(a)‖ over {result['prompts']} relation prompts (mean, min..max):"
    )
    for encoder, rows in result["relative_distance"].items():
        print(f"  {encoder}")
        for edit, row in rows.items():
            print(f"    {edit:<20} {row['mean']:.3f}  ({row['min']:.3f}..{row['max']:.3f})")
    same = result["converse_same_noise"]
    print(
        f"prompt and converse from the same noise: objects on the same side in {same['same_side']} of "
        f"{same['detectable']} pairs where both are found in both images"
    )
    turned_rows = result["other_axis_same_noise"]
    print(
        f"relation turned to the other axis, same noise: the pair's dominant axis follows the prompt in both "
        f"images in {turned_rows['axis_follows_prompt_in_both']} of {turned_rows['detectable']} pairs"
    )
    for eval_seed, row in result["direction_blind_ceiling"].items():
        print(
            f"seed {eval_seed}: base {row['base']:.3f}, direction-blind ceiling {row['ceiling']:.3f}, "
            f"headroom {row['headroom']:+.3f}"
        )
    for name, value in result["pixel_difference"].items():
        print(f"mean |pixel difference|, {name}: {value:.4f}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "text_conditioning.json").write_text(json.dumps(result, indent=1), "utf-8")
    print(f"wrote {output / 'text_conditioning.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
