"""At which denoising step does ShapesWorld decide a relation, and can a reward read it there?

For relation prompts of the train set the shipped pipeline samples with DDIM η = 0; at every
step the UNet's one-step prediction x̂_0 is decoded and compared with the finished image:

* ``agree`` — of the x̂_0 in which the exact detector finds both related objects (and the final
  image too), how many put them on the same side of each other as the final image does;
* ``oracle`` — the mean oracle score of x̂_0 against the prompt;
* ``auroc`` — how well a reward's gap between the prompt and its converse ("left of" ↔ "right
  of") on x̂_0 ranks the images whose *final* relation holds above those where it does not.

It answers where a gradient (ReFL, AlignProp's truncation) or a policy-gradient window
(``sample.stochastic_steps``) has to act to change relations (docs/studies/default-job.md).

    python -m diffalign.benchmarks.layout_steps --output results/layout_steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from diffalign import prompts as prompt_sets
from diffalign import rewards
from diffalign.sampling import (
    alpha_cumprod_at,
    decode_latents,
    encode_prompts,
    guided_noise,
    initial_latents,
    predict_original,
)
from diffalign.shapes import assets, detector
from diffalign.shapes.grammar import converse, holds, parse, text


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    return float(greater / (len(positive) * len(negative)))


def conversed(prompt: str) -> str:
    """The prompt with its first relation turned into its converse."""
    facts = parse(prompt)
    first = facts.relations[0]
    swapped = dataclasses.replace(first, relation=converse(first.relation))
    return text(dataclasses.replace(facts, relations=(swapped, *facts.relations[1:])))


def relation_holds(image: torch.Tensor, prompt: str) -> bool | None:
    """Whether the prompt's first relation holds between the detected objects; None if one is missing."""
    facts = parse(prompt)
    relation = facts.relations[0]
    ranked = sorted(detector.detect(image), key=lambda d: -d.confidence)
    found = []
    for index in (relation.subject, relation.object):
        entity = facts.entities[index]
        found.append([d for d in ranked if (d.colour, d.shape) == (entity.colour, entity.shape)])
    if not found[0] or not found[1]:
        return None
    return holds(relation.relation, found[0][0].centre, found[1][0].centre)


@torch.no_grad()
def probe(count: int, steps: int, guidance: float, seed: int, reward_names: list[str]) -> dict:
    pipe = assets.load_pipeline()
    relation_prompts = [p for p in prompt_sets.load_prompts("shapes-train") if parse(p).relations]
    order = torch.randperm(len(relation_prompts), generator=torch.Generator().manual_seed(seed))[:count]
    prompts = [relation_prompts[i] for i in order.tolist()]
    converses = [conversed(p) for p in prompts]
    cond, uncond = encode_prompts(pipe, prompts)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    latents = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(seed + 1))
    predictions = []
    for timestep in scheduler.timesteps:
        noise = guided_noise(
            pipe.unet, latents, timestep, cond, uncond, torch.full((len(prompts),), guidance)
        )
        clean, _ = predict_original(scheduler, noise, alpha_cumprod_at(scheduler, timestep, latents), latents)
        predictions.append(decode_latents(pipe, clean))
        latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    final = [relation_holds(image, p) for image, p in zip(decode_latents(pipe, latents), prompts)]
    scorers = {name: rewards.build(name) for name in reward_names}
    rows = []
    for step, images in enumerate(predictions):
        early = [relation_holds(image, p) for image, p in zip(images, prompts)]
        both = [(a, b) for a, b in zip(early, final) if a is not None and b is not None]
        labelled = np.array([b is not None for b in final])
        labels = np.array([bool(b) for b in final])[labelled]
        row = {
            "step": step,
            "timestep": int(scheduler.timesteps[step]),
            "detectable": len(both),
            "agree": sum(a == b for a, b in both),
            "oracle": float(detector.score_batch(images, prompts).mean()),
        }
        for name, scorer in scorers.items():
            gap = (scorer(images, prompts) - scorer(images, converses)).float().numpy()
            row[f"auroc {name}"] = auroc(gap[labelled], labels)
        rows.append(row)
    holding = sum(bool(b) for b in final)
    return {
        "prompts": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "final_relation_holds": holding,
        "final_detectable": sum(b is not None for b in final),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="relation prompts drawn from shapes-train")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rewards", nargs="+", default=["shapes-negclip", "shapes-clip"])
    parser.add_argument("--output", default="results/layout_steps", help="folder for layout_steps.json")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 6 steps, shapes-clip only")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.steps, args.rewards = 8, 6, ["shapes-clip"]
    result = probe(args.prompts, args.steps, args.guidance, args.seed, args.rewards)
    print(
        f"final images: relation holds in {result['final_relation_holds']} of {result['final_detectable']} "
        f"where both objects are found ({result['prompts']} prompts)"
    )
    names = [key for key in result["rows"][0] if key.startswith("auroc")]
    print(
        f"{'step':>4} {'t':>5} {'agree with final':>17} {'oracle(x0)':>11}"
        + "".join(f"{n:>24}" for n in names)
    )
    for row in result["rows"]:
        print(
            f"{row['step']:>4} {row['timestep']:>5} {row['agree']:>9}/{row['detectable']:<7} {row['oracle']:>11.3f}"
            + "".join(f"{row[n]:>24.2f}" for n in names)
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "layout_steps.json").write_text(json.dumps(result, indent=1), "utf-8")
    print(f"wrote {output / 'layout_steps.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
