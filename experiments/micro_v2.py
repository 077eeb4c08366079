"""One run of the second micro study (experiments/isoflop.py:micro_v2): experiments/micro.py's
run at 4x its batch (the study sets 64 x 128), each family at the learning rate its own short
sweep chose, and the low-variance validation bound.

    python -m mdm_jax.train --config=experiments/micro_v2.py:27K,mdm --config.steps=300

The learning rates come from experiments/results/micro_v2/lr/chosen.json, written by
`python experiments/micro_v2_lr.py` (the sweep at the smallest budget; `MICRO_STUDY=micro_v2
bash launch/micro_study.sh` runs it first). Until it exists, every family gets micro.py's 1e-2.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path
import micro  # noqa: E402

CHOSEN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "results", "micro_v2", "lr", "chosen.json")


def chosen_lr(kind: str) -> float | None:
    """The family's lr from the committed sweep, or None before it has run."""
    if not os.path.exists(CHOSEN):
        return None
    with open(CHOSEN) as f:
        return json.load(f)["lr"].get(kind)


def get_config(arg: str = "27K,mdm"):
    c = micro.get_config(arg)
    # Trained as the uniform-state/interpolating scaling study (s-sahoo/scaling-dllms) trains:
    # t per stratum (`_sample_t`) for every diffusion family, so that they differ only in their
    # loss (SMDM draws t i.i.d.: the same expectation, noisier), and mdm-ce's low_var loss over
    # all B*L tokens (`TrainerBase._loss`).
    c.objective.t_sampling = "antithetic"
    c.objective.ce_norm = "tokens"  # read by the unweighted losses only (mdm-ce)
    lr = chosen_lr(c.objective.kind)
    if lr is not None:
        c.optim.lr = lr
        c.optim.min_lr = lr / 10  # as micro.py: decay by 10x
    # The bound: 4 fixed batches of 64 rows (32,768 tokens), 4 draws each, t stratified per
    # row and a fixed count of masks (LLaDA's estimator; mdm_jax/validation.py), the same
    # draws for every run. No evaluation of the untrained model: a study reads the last one.
    c.data.eval_batches = 4
    c.data.eval_draws = 4
    c.data.eval_masking = "count"
    c.data.eval_t_sampling = "antithetic"
    c.data.eval_seed = 0
    c.eval_at_start = False
    c.workdir = f"runs/micro_v2_{c.objective.kind}_{c.model.preset}"
    return c
