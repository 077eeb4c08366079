"""Fine-tuning (SFT) of a pretrained tiny model on prompt/response pairs, LLaDA's recipe.

    python -m mdm_jax.train --config=experiments/sft.py:mdm \
        --config.init.source=runs/tiny_mdm --config.workdir=runs/sft_mdm \
        --config.data.train_dir=data_cache/sft_reverse \
        --config.data.tokenizer=data_cache/chat_tokenizer.model

Config argument: the family ("mdm" default, "mdm-ce" or "arm"). The pairs come from
`python -m mdm_jax.data.sft` (README "Fine-tuning and chat"); the loss covers the response
only, normalised per row by its length (sft.norm=llada; smdm: per micro-batch); the rate warms
up, holds, and decays linearly over the last 10% of steps (LLaDA's SFT schedule).
"""

from mdm_jax.config import base_config

DATA = "data_cache"


def get_config(kind: str = "mdm"):
    c = base_config()
    c.workdir = f"runs/sft_{kind}"
    c.seed = 0
    c.steps = 600
    c.global_batch = 32
    c.seq_len = 64
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.vocab_size = 2051  # the demo tokenizer's 2048 pieces + the 3 chat pieces
    c.objective.kind = kind
    c.objective.loss_chunk = 64
    c.objective.variable_length_prob = 0.0
    c.sft.enabled = True
    c.sft.norm = "llada"
    c.init.source = f"runs/tiny_{kind}"
    c.optim.schedule = "constant"
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 30
    c.optim.decay_fraction = 0.1
    c.mesh.data = -1
    c.data.train_dir = f"{DATA}/sft_reverse"
    c.data.eval_dir = ""
    c.data.tokenizer = f"{DATA}/chat_tokenizer.model"
    c.log_every = 50
    c.eval_every = 10_000
    c.checkpoint_every = 300
    c.samples.count = 0
    return c
