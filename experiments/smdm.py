"""SMDM base runs (shared/REFERENCE.md sections 1-3): preset and family as the config argument.

    python -m mdm_jax.train --config=experiments/smdm.py:170M          # MDM, 170M preset
    python -m mdm_jax.train --config=experiments/smdm.py:1028M,arm     # ARM baseline
    python -m mdm_jax.train --config=experiments/smdm.py:170M --config.steps=18710 \
        --config.data.train_dir=/data/slimpajama/train --config.mesh.fsdp=8

Defaults: sequence 2048, global batch 256 (524,288 tokens/step), AdamW lr 2e-4 betas (0.9, 0.95)
wd 0.1, clip 1.0, warmup max(100, steps/100) then cosine to 2e-5, bf16 compute, seed 3407.
`steps` defaults to the number a 1e19-FLOP budget buys under C = 6 N D.
"""

from mdm_jax import flops
from mdm_jax.config import base_config
from mdm_jax.presets import get_preset


def get_config(arg: str = "170M"):
    preset, _, kind = arg.partition(",")
    kind = kind or "mdm"
    c = base_config()
    c.model.preset = preset
    c.objective.kind = kind
    c.workdir = f"runs/smdm_{kind}_{preset}"
    c.steps = flops.steps_for_budget(get_preset(preset), 1e19)
    c.micro_batch = 0  # set e.g. --config.micro_batch=32 for gradient accumulation
    c.model.remat = "dots"
    c.data.train_dir = "data/slimpajama_2048/train"
    c.data.eval_dir = "data/slimpajama_2048/validation"
    c.data.tokenizer = "data/tokenizer.model"  # Llama-2's SentencePiece model (vocab 32000)
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
