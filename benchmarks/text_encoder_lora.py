"""Can reward fine-tuning teach the shipped ShapesWorld generator the direction of a relation if
its text encoder learns too?

``text_conditioning.py`` shows the generator's text encoder leaves "left of" and "right of"
6.7 % apart and the UNet ignores the difference. This study adds a LoRA (peft) to the text
encoder beside the UNet's and trains both with AlignProp, the prompt embeddings computed with
gradient; everything else is ``diffalign train`` (same config keys, evaluator and metrics). The
change in train-prompt oracle alignment is printed at every evaluation and written with the
curves to ``<output>/text_encoder_lora.json``. DiffExp is not supported here: its embeddings are
computed without gradient.

    python -m diffalign.benchmarks.text_encoder_lora --variants te-lr1e-3 te-lr1e-4 --seeds 2 \\
        --output results/text_encoder_lora
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from diffalign.config import load_config
from diffalign.families import Conditioning
from diffalign.optim.alignprop import AlignProp
from diffalign.sampling import encode_prompts
from diffalign.shapes import assets
from diffalign.shapes.training import text_encoder_from
from diffalign.train import Trainer

BASE = [
    "method=alignprop",
    "exploration=none",
    "reward=shapes-negclip",
    "alignprop.truncation_steps=20",
    "epochs=40",
    "eval.every=10",
]
# name -> (text-encoder learning rate, overrides on top of BASE)
VARIANTS: dict[str, tuple[float, list[str]]] = {
    "te-lr1e-3": (1e-3, []),
    "te-lr1e-4": (1e-4, []),
    "te-lr1e-3-textnorm": (1e-3, ["reward=textnorm(shapes-negclip)"]),
    # No text-encoder LoRA: the generator's text encoder replaced by the NegCLIP text tower, which
    # separates converse relations; its base evaluation shows whether the UNet can use it as it is.
    "negclip-tower": (0.0, []),
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TRAIN_ORACLE = "eval/shapes-train/shapes-oracle"
HELDOUT_ORACLE = "eval/shapes-heldout/shapes-oracle"


class TextEncoderAlignProp(AlignProp):
    """AlignProp whose prompt embeddings carry gradient into the text encoder's adapter."""

    def prompt_embeddings(self, prompts: list[str]) -> Conditioning:
        cond, uncond = encode_prompts(self.context.pipe, prompts, self.config.sample.negative_prompt)
        return Conditioning(cond, uncond.detach())  # the empty prompt's embedding stays as the base model's


def add_text_encoder_lora(trainer: Trainer, rank: int, learning_rate: float, seed: int) -> int:
    """Attach a Gaussian-initialised LoRA to the pipeline's text encoder, train it with the UNet's
    optimiser at its own learning rate; returns its parameter count."""
    torch.manual_seed(seed + 100)
    encoder = trainer.pipe.text_encoder
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=TEXT_ENCODER_TARGETS, init_lora_weights="gaussian"
    )
    inject_adapter_in_model(config, encoder)
    parameters = [p for name, p in encoder.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    trainer.context.optimizer.optimizer.add_param_group({"params": parameters, "lr": learning_rate})
    trainer.context.trainable_parameters.extend(parameters)
    return sum(p.numel() for p in parameters)


def run(name: str, seed: int, output: Path, rank: int, epochs: int | None = None) -> dict:
    learning_rate, overrides = VARIANTS[name]
    if epochs is not None:
        overrides = [*overrides, f"epochs={epochs}"]
    config = load_config(
        None, [*BASE, *overrides, f"seed={seed}", f"output_dir={output / f'{name}-seed{seed}'}"]
    )
    if config.exploration != "none":
        raise SystemExit(
            "text_encoder_lora: exploration must be none (DiffExp's embeddings carry no gradient)"
        )
    started = time.process_time()
    trainer = Trainer(config)
    if name == "negclip-tower":
        negclip, _ = assets.load_clip(assets.NEGCLIP_DIR)
        trainer.pipe.text_encoder.load_state_dict(text_encoder_from(negclip).state_dict())
        parameters = 0
    else:
        parameters = add_text_encoder_lora(trainer, rank, learning_rate, seed)
        trainer.method = TextEncoderAlignProp(trainer.context, config)
    trainer.evaluate()
    base = trainer.history[0]
    print(
        f"{name} seed {seed}: text-encoder LoRA {parameters} parameters; base train oracle {base[TRAIN_ORACLE]:.3f}",
        flush=True,
    )
    while trainer.epoch < config.epochs:
        record = trainer.run_epoch()
        if TRAIN_ORACLE in record:
            print(
                f"{name} seed {seed} epoch {record['epoch']}: train oracle {record[TRAIN_ORACLE] - base[TRAIN_ORACLE]:+.3f}"
                f", held-out {record[HELDOUT_ORACLE] - base[HELDOUT_ORACLE]:+.3f}, reward {record['reward_mean']:.3f}"
                f", {time.process_time() - started:.0f} CPU s",
                flush=True,
            )
    trainer.finish()
    return {
        "variant": name,
        "seed": seed,
        "text_encoder_learning_rate": learning_rate,
        "rank": rank,
        "overrides": [*BASE, *overrides],
        "cpu_seconds": time.process_time() - started,
        "history": trainer.history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[2])
    parser.add_argument("--rank", type=int, default=4, help="rank of the text encoder's LoRA")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--output", default="results/text_encoder_lora", help="folder for text_encoder_lora.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for name in args.variants:
            for seed in args.seeds:
                results.append(run(name, seed, Path(runs), args.rank, args.epochs))
    (output / "text_encoder_lora.json").write_text(json.dumps(results, indent=1), "utf-8")
    print(f"wrote {output / 'text_encoder_lora.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
