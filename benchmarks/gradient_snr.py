"""How much signal is in a policy-gradient estimate? Cosines between independent gradient estimates.

For a fixed LoRA policy on a pipeline, this computes DDPO's score-function gradient
E[A · Σ_t ∇ log p(x_{t-1} | x_t)] from several independent batches and reports the mean cosine
over all pairs of estimates (1 = every estimate points the same way, 0 = pure noise), with

* ``independent`` noise: every image starts from its own x_T (plain DDPO batches), and
* ``shared`` noise: every image of the batch starts from one x_T (``sample.shared_initial_noise``),

next to AlignProp's pathwise gradient ∇ E[r] through the whole chain (two independent batches as
well). It measures how many samples a policy-gradient method needs before its updates point
somewhere, which is what decides whether DDPO or DPOK can move a model in a CPU-sized budget.

    python -m diffalign.benchmarks.gradient_snr                     # shapes, brightness + shapes-clip, ~2 min
    python -m diffalign.benchmarks.gradient_snr --quick             # tiny-random smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffalign import pipeline, rewards
from diffalign.sampling import (
    ddim_step_with_logprob,
    decode_latents,
    encode_prompts,
    guided_noise,
    initial_latents,
    sample,
)


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: a reward every policy can follow."""
    return images.mean(dim=(1, 2, 3))


def _flat_grad(pipe) -> torch.Tensor:
    grad = torch.cat([p.grad.flatten() for p in pipe.unet.parameters() if p.requires_grad])
    pipe.unet.zero_grad(set_to_none=True)
    return grad


def policy_gradient(pipe, reward, prompts: list[str], *, steps: int, shared: bool, seed: int) -> torch.Tensor:
    """One score-function estimate with the batch-mean baseline."""
    generator = torch.Generator().manual_seed(seed)
    count = len(prompts)
    latents = initial_latents(pipe, 1 if shared else count, generator).expand(count, -1, -1, -1).clone()
    trajectory = sample(pipe, prompts, num_steps=steps, eta=1.0, generator=generator, latents=latents)
    scores = reward(trajectory.images, prompts).detach()
    advantages = scores - scores.mean()
    for step in range(steps):
        noise = guided_noise(
            pipe.unet,
            trajectory.latents[:, step],
            trajectory.timesteps[step],
            trajectory.prompt_embeds,
            trajectory.negative_prompt_embeds,
            trajectory.guidance_scales[:, step],
        )
        _, log_prob = ddim_step_with_logprob(
            pipe.scheduler,
            noise,
            trajectory.timesteps[step],
            trajectory.latents[:, step],
            eta=1.0,
            prev_sample=trajectory.latents[:, step + 1],
        )
        (advantages * log_prob).sum().div(count).backward()
    return _flat_grad(pipe)


def pathwise_gradient(pipe, reward, prompts: list[str], *, steps: int, seed: int) -> torch.Tensor:
    """One reparameterised estimate of ∇ E[r] through every step (AlignProp with K = T)."""
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = encode_prompts(pipe, prompts)
    pipe.scheduler.set_timesteps(steps)
    latents = initial_latents(pipe, len(prompts), generator)
    scale = torch.full((len(prompts),), 5.0)
    for timestep in pipe.scheduler.timesteps:
        noise = guided_noise(pipe.unet, latents, timestep, cond, uncond, scale)
        latents, _ = ddim_step_with_logprob(
            pipe.scheduler, noise, timestep, latents, eta=1.0, generator=generator
        )
    reward(decode_latents(pipe, latents), prompts).mean().backward()
    return _flat_grad(pipe)


def mean_pairwise_cosine(estimates: list[torch.Tensor]) -> dict:
    """Mean and standard deviation of the cosine over every pair of independent estimates."""
    values = torch.tensor(
        [
            torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            for i, a in enumerate(estimates)
            for b in estimates[i + 1 :]
        ]
    )
    return {
        "mean": values.mean().item(),
        "std": values.std().item() if len(values) > 1 else 0.0,
        "pairs": len(values),
    }


def run(model: str, prompt: str, batch: int, steps: int, reward_names: list[str], estimates: int) -> dict:
    torch.manual_seed(0)
    pipe = pipeline.load(model)
    pipeline.add_lora(pipe)
    with torch.no_grad():  # a policy away from the adapter's zero init, so every LoRA matrix has gradient
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    prompts = [prompt] * batch
    result = {
        "model": model,
        "prompt": prompt,
        "batch": batch,
        "steps": steps,
        "estimates": estimates,
        "rewards": {},
    }
    seeds = range(1, estimates + 1)
    for name in reward_names:
        reward = brightness if name == "brightness" else rewards.build(name)
        entry = {}
        for label, shared in (("independent", False), ("shared", True)):
            grads = [
                policy_gradient(pipe, reward, prompts, steps=steps, shared=shared, seed=s) for s in seeds
            ]
            entry[f"policy_gradient_{label}_noise"] = mean_pairwise_cosine(grads)
        grads = [pathwise_gradient(pipe, reward, prompts, steps=steps, seed=100 + s) for s in seeds]
        entry["pathwise"] = mean_pairwise_cosine(grads)
        result["rewards"][name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--prompt", default="two red circles")
    parser.add_argument("--batch", type=int, default=64, help="images per gradient estimate")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--estimates", type=int, default=4, help="independent estimates per kind (all pairs compared)"
    )
    parser.add_argument("--rewards", nargs="+", default=["brightness", "shapes-clip"])
    parser.add_argument(
        "--output",
        default="results/gradient_snr",
        help="folder for gradient_snr.json (default: %(default)s, under the current folder)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny-random, 8 images, 3 steps, brightness only"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.steps, args.rewards, args.estimates = (
            "tiny-random",
            8,
            3,
            ["brightness"],
            3,
        )
    result = run(args.model, args.prompt, args.batch, args.steps, args.rewards, args.estimates)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "gradient_snr.json").write_text(json.dumps(result, indent=1), "utf-8")
    print(
        f"cosine between independent gradient estimates ({args.batch} images each, {args.model}; "
        f"mean ± std over {result['rewards'][args.rewards[0]]['pathwise']['pairs']} pairs):"
    )
    print(f"{'reward':<14} {'PG, own x_T':>16} {'PG, shared x_T':>16} {'pathwise':>16}")
    for name, entry in result["rewards"].items():
        cells = [
            entry[k]
            for k in ("policy_gradient_independent_noise", "policy_gradient_shared_noise", "pathwise")
        ]
        print(f"{name:<14}" + "".join(f"{c['mean']:>10.3f} ± {c['std']:.2f}" for c in cells))
    print(f"wrote {output / 'gradient_snr.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
