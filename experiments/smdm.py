"""SMDM base runs (shared/REFERENCE.md sections 1-3): preset and family as the config argument.

    python -m mdm_jax.train --config=experiments/smdm.py:170M          # MDM, 170M preset
    python -m mdm_jax.train --config=experiments/smdm.py:1028M,arm     # ARM baseline
    python -m mdm_jax.train --config=experiments/smdm.py:170M --config.steps=18710 \
        --config.data.train_dir=/data/slimpajama/train --config.mesh.fsdp=8

Defaults: sequence 2048, global batch 256 (524,288 tokens/step), AdamW lr 2e-4 betas (0.9, 0.95)
wd 0.1, clip 1.0, warmup max(100, steps/100) then cosine to 2e-5, bf16 compute, seed 3407.
`steps` defaults to the number a 1e19-FLOP budget buys under C = 6 N D.

Layout and micro-batches as SMDM's launchers set them (pretrain/train_mdm.py, train_ar.py):
parameters, gradients and optimizer state sharded over every device (FSDP; SMDM runs Lightning's
FSDPStrategy), and at most `micro_batch_per_device` sequences per device in one
forward/backward (by model size, `SMDM_MICRO_BATCH`), the rest of the global batch by gradient
accumulation. The global micro-batch is that times the devices (8 x H100: 1028M MDM at 4 per
device = 32 sequences, 8 accumulation steps). Override with `--config.micro_batch=N` (N
sequences over all devices), `--config.micro_batch=auto` (the largest that fits the
accelerator's memory, found by compiling) or `--config.micro_batch_per_device=N`; data
parallelism over FSDP groups of N devices is `--config.mesh.data=-1 --config.mesh.fsdp=N`
(`--config.mesh.fsdp=N` alone uses N devices).
"""

from mdm_jax import families, flops
from mdm_jax.config import base_config
from mdm_jax.presets import get_preset

# SMDM's micro-batch per device by model size: (largest size in millions of non-embedding
# parameters, sequences per device), first match. From pretrain/train_mdm.py (MDM) and
# pretrain/train_ar.py (ARM) of github.com/ML-GSAI/SMDM, which split the global batch of 256 over
# 8 GPUs per node and accumulate gradients over micro-batches of this size. Every family without
# causal attention (mdm, mdm-ce, uniform, ...) takes the MDM's row.
SMDM_MICRO_BATCH = {
    "mdm": ((20, 32), (50, 16), (1000, 8), (float("inf"), 4)),
    "arm": ((20, 32), (50, 16), (1028, 8), (2000, 4), (float("inf"), 2)),
}


def smdm_micro_batch_per_device(preset: str, kind: str = "mdm") -> int:
    """Sequences per device per forward/backward in SMDM's launchers for this preset and family
    (SMDM compares its --model argument, the preset's size in millions: N / 1e6 here)."""
    millions = get_preset(preset).non_embedding_params / 1e6
    table = SMDM_MICRO_BATCH["arm" if families.get(kind).causal else "mdm"]
    return next(per_device for largest, per_device in table if millions <= largest)


def get_config(arg: str = "170M"):
    preset, _, kind = arg.partition(",")
    kind = kind or "mdm"
    c = base_config()
    c.model.preset = preset
    c.objective.kind = kind
    c.workdir = f"runs/smdm_{kind}_{preset}"
    c.steps = flops.steps_for_budget(get_preset(preset), 1e19)
    c.micro_batch_per_device = smdm_micro_batch_per_device(preset, kind)
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device, as SMDM
    c.model.remat = "dots"
    if kind == "eso":  # as the scaling study trains it (s-sahoo/scaling-dllms, esolm.yaml):
        c.objective.weighting = "unweighted"  # alpha0 = 1, low-variance loss
    c.data.train_dir = "data/slimpajama_2048/train"
    c.data.eval_dir = "data/slimpajama_2048/validation"
    c.data.tokenizer = "data/tokenizer.model"  # Llama-2's SentencePiece model (vocab 32000)
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
