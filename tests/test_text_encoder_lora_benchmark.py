"""The text-encoder LoRA study: its AlignProp trains the text encoder's adapter, plain AlignProp does not."""

import torch
from diffalign.benchmarks import text_encoder_lora

from diffalign.config import load_config
from diffalign.optim.alignprop import AlignProp
from diffalign.train import Trainer

TINY = [
    "method=alignprop",
    "model=tiny-random",
    "reward=aesthetic",
    "reward_options={checkpoint: tiny-random}",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=3",
    "sample.batch_size=2",
    "train.batch_size=2",
    "sample.num_batches_per_epoch=1",
    "alignprop.truncation_steps=3",
    "tensorboard=false",
    "epochs=1",
]


def _text_encoder_lora_b(trainer):
    return {n: p.detach().clone() for n, p in trainer.pipe.text_encoder.named_parameters() if "lora_B" in n}


def test_text_encoder_adapter_learns_only_with_gradient_through_the_embeddings(tmp_path):
    moved = {}
    for method in ("plain", "text-encoder"):
        trainer = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path / method}"]))
        count = text_encoder_lora.add_text_encoder_lora(trainer, rank=2, learning_rate=1e-2, seed=0)
        assert count > 0
        if method == "text-encoder":
            trainer.method = text_encoder_lora.TextEncoderAlignProp(trainer.context, trainer.config)
        else:
            assert type(trainer.method) is AlignProp
        before = _text_encoder_lora_b(trainer)
        assert before and all(torch.count_nonzero(b) == 0 for b in before.values())  # B starts at zero
        trainer.run_epoch()
        after = _text_encoder_lora_b(trainer)
        moved[method] = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved["plain"] == 0.0  # AlignProp's embeddings carry no gradient
    assert moved["text-encoder"] > 0.0
