"""One run of the micro scaling study: a micro preset (27K-853K non-embedding parameters, see
mdm_jax/presets.py) on the bundled Shakespeare/Milton corpus with a 512-piece tokenizer, on CPU.

    python -m mdm_jax.train --config=experiments/micro.py:107K,mdm --config.steps=300

The sweep (`experiments/isoflop.py:micro`) sets steps, batch and workdir per run;
`bash launch/micro_study.sh` prepares the data and runs the whole study.
"""

from mdm_jax.config import base_config

DATA = "data_cache"


def get_config(arg: str = "107K,mdm"):
    preset, _, kind = arg.partition(",")
    c = base_config()
    c.model.preset = preset
    c.objective.kind = kind or "mdm"
    c.workdir = f"runs/micro_{c.objective.kind}_{preset}"
    c.steps = 300
    c.global_batch = 16
    c.seq_len = 128
    c.model.dtype = "float32"  # bf16 matmuls are emulated (slow) on most CPUs
    c.objective.loss_chunk = 128
    # Runs of 50-2000 steps: SMDM's 100-step warmup would swallow them, and micro models want a
    # much larger step than SMDM's 2e-4 (a pilot: 13K at 3e11 reached 4.79 at lr 1e-2 against
    # 4.94 at 2e-3). One lr for every size keeps the comparison simple, as in SMDM.
    c.optim.lr = 1e-2
    c.optim.min_lr = 1e-3
    c.optim.warmup_fraction = 0.1
    if kind == "eso":  # as the scaling study trains it (s-sahoo/scaling-dllms, esolm.yaml):
        c.objective.weighting = "unweighted"  # alpha0 = 1, low-variance loss
    c.data.train_dir = f"{DATA}/micro_prepared_128/train"
    c.data.eval_dir = f"{DATA}/micro_prepared_128/validation"
    c.data.tokenizer = f"{DATA}/micro_tokenizer.model"
    c.data.eval_batches = 16  # the same 32,768 validation tokens and masks for every run
    c.log_every = 50
    c.eval_every = 10**9  # evaluate at the start and the end only
    c.checkpoint_every = 100
    c.checkpoint_keep = 1
    return c
