"""IsoFLOP scaling studies: SMDM's grid for every family, and micro studies that run on a CPU.

    python -m mdm_jax.scaling.plan  --config=experiments/isoflop.py            # price the grid
    python -m mdm_jax.scaling.plan  --config=experiments/isoflop.py --config.families=mdm,arm
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend slurm --dry-run
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py:micro --backend local
    python -m mdm_jax.scaling.fit   --results runs/isoflop_micro/results.csv --plot fig.png

Config argument: "smdm" (default; SMDM's grid), "micro" (the first MDM + ARM micro study),
"micro_families" (five families, budgets that bracket every minimum), "micro_v2" (the second
micro study: 4x the batch, 3 budgets over 0.86 decades, per-family lr, the low-variance bound;
"micro_v2,K": its first K budgets, to run it budget by budget into the same folder)
or "micro_v2_lr,LR" (its lr sweep at one LR; experiments/micro_v2_lr.py runs them all).
Fields:
  families      comma-separated objective kinds: mdm (SMDM's ELBO), mdm-ce (masked CE), uniform
                (uniform-state diffusion), eso (interpolating diffusion, Eso-LM at alpha0 = 1
                with the low-variance loss, as the scaling study trains it), arm. All share the
                grid, so their curves meet budget by budget; SMDM's own study is
                --config.families=mdm,arm
  grid          "BUDGET: PRESET,..." entries; the presets bracket each budget's optimum;
                "BUDGET [FAMILY,...]: PRESET,..." is an entry for those families only (each
                family's sizes near its own minimum)
  batch/seq_len the global batch of every run (SMDM: 256 x 2048)
  convention    "6n" (SMDM's C = 6 N D), "3fwd" (the Duo study's 3 x F_fwd per token) or
                "3fwd-matmul" (3 x F_fwd without attention scores: the uniform/interpolating
                scaling study's count)
  base          the run config each run starts from, given "PRESET,FAMILY" as its argument
  overrides     extra "key=value" config overrides for every run (data paths, mesh, ...)
  sweep_dir     each run's workdir is sweep_dir/RUN_ID; results.csv lands here by default;
                local paths are made absolute; the tpu backend needs gs://BUCKET/PATH
  accelerator / assumed_mfu   what `plan` prices the runs on
  slurm.* / tpu.*             what the slurm and tpu sweep backends submit with
"""

import ml_collections

# SMDM's budgets. Each row spans about x0.25 to x2.3 of a Chinchilla-style centre sqrt(C/120)
# (C = 6 N D at ~20 tokens per parameter), so that both the MDM optimum and the ARM's (SMDM:
# about twice the MDM's) fall inside the bracket with points on either side.
SMDM_GRID = (
    "6e18: 48M,66M,85M,113M,170M,231M,336M,472M",
    "1e19: 66M,85M,113M,170M,231M,336M,472M,629M",
    "3e19: 113M,170M,231M,336M,472M,629M,831M,1028M",
    "6e19: 170M,231M,336M,472M,629M,831M,1028M,1476M",
    "1e20: 231M,336M,472M,629M,831M,1028M,1476M,2121M",
)

# Micro budgets sized for a 2-core CPU: 30 runs (3 budgets x 5 sizes x 2 families) in about
# 30 minutes at batch 16 x 128 with --parallel 2, under the 3 x F_fwd convention: at this
# scale the head and the attention are 25-180% on top of 6N, so 6N would hand the smallest
# models 1.2-2.8x more real compute than the largest. Pilots at 1e11-3e11 found the loss still
# falling towards 13K, hence the 1-layer 4K and 13K presets at the bottom of the grid.
MICRO_GRID = (
    "2e11: 4K,13K,27K,56K,107K",
    "5e11: 4K,13K,27K,56K,107K",
    "1.2e12: 13K,27K,56K,107K,214K",
)


# Four families, about 6x the compute of MICRO_GRID per run: the MDM's minimum sat at the
# small edge of MICRO_GRID (4K-13K), so these budgets keep 4K at the bottom (the uniform
# family needs it) and reach 214K (443K at 7.5e12) for the ARM, whose optimum was 38K at 1.2e12.
MICRO_FAMILIES_GRID = (
    "1.2e12: 4K,13K,27K,56K,107K,214K",
    "3e12: 4K,13K,27K,56K,107K,214K",
    "7.5e12: 4K,13K,27K,56K,107K,214K,443K",
)

# The second micro study: 4x the batch (64 x 128 = 8,192 tokens a step) and four budgets over
# 1.30 decades, 2.2e12-4.4e13, each row's sizes (about 1.5x apart) around each kind of family's
# minimum: the diffusion families' below the ARM's. A first row at 8e11 (the lr sweep's
# budget) was dropped: at this batch the masked families' best size there was the smallest
# preset. The two top budgets hold the MDM and the ARM alone (all five families there were
# about 20 hours of this 2-core machine; BUILD_NOTES "Study v2"): at 1.6e13 seven and six sizes
# around the minima the lower budgets point to (107K and 160K added once the MDM's loss still
# fell at 56K); at 4.4e13 five each around the fits' extrapolated optima (the MDM's held below
# its fit's 180K: at 1.6e13 every size above 83K was step-limited).
DIFFUSION = "mdm,mdm-ce,uniform,eso"
MICRO_V2_GRID = (
    "2.2e12: 4K,13K,19K,27K,40K,56K,83K,107K,160K,214K",
    f"5.9e12 [{DIFFUSION}]: 4K,13K,19K,27K,40K,56K,83K,107K,160K",
    "5.9e12 [arm]: 13K,19K,27K,40K,56K,83K,107K,160K,214K",
    "1.6e13 [mdm]: 19K,27K,40K,56K,83K,107K,160K",
    "1.6e13 [arm]: 56K,83K,107K,160K,214K,333K",
    "4.4e13 [mdm]: 56K,83K,107K,160K,214K",
    "4.4e13 [arm]: 214K,333K,443K,600K,853K",
)
# Its learning-rate sweep (experiments/micro_v2_lr.py): the smallest budget, one size near
# each kind of family's minimum there, every lr a factor of 2 apart.
MICRO_V2_LR_GRID = ("8e11: 13K,40K",)
MICRO_V2_LRS = (3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2, 9.6e-2, 1.92e-1)

ALL_FAMILIES = "mdm,mdm-ce,uniform,eso,arm"


def get_config(arg: str = "smdm"):
    c = ml_collections.ConfigDict()
    c.families = ALL_FAMILIES
    c.convention = "6n"
    c.overrides = ()
    c.slurm = ml_collections.ConfigDict()
    c.slurm.nodes = 1
    c.slurm.gpus_per_node = 8
    c.slurm.partition = ""
    c.slurm.time = "48:00:00"
    c.slurm.extra = ""  # more sbatch options, e.g. "--account=lm --qos=high"
    c.tpu = ml_collections.ConfigDict()
    c.tpu.cluster = "mdm-cluster"  # the GKE cluster xpk submits to
    c.tpu.type = "v5p-64"
    c.tpu.num_slices = 1
    c.tpu.image = "us-docker.pkg.dev/PROJECT/mdm-jax/trainer:latest"  # built from this repo
    c.tpu.storage = ""  # xpk storage names to mount (`xpk storage attach`), comma-separated
    c.tpu.max_restarts = 10  # xpk restarts a preempted workload (exit 42) this many times
    c.tpu.grace_seconds = 300  # SIGTERM to SIGKILL: room to finish a step and save
    c.tpu.extra = ""  # more xpk options, e.g. "--priority=high"
    if arg == "smdm":
        c.name = "smdm_isoflop"
        c.grid = SMDM_GRID
        c.batch = 256
        c.seq_len = 2048
        c.base = "experiments/smdm.py"
        c.sweep_dir = "runs/isoflop_smdm"
        c.accelerator = "h100"
        c.assumed_mfu = 0.4
    elif arg == "micro":
        c.name = "micro_isoflop"
        c.families = "mdm,arm"
        c.grid = MICRO_GRID
        c.batch = 16
        c.seq_len = 128
        c.convention = "3fwd"
        c.base = "experiments/micro.py"
        c.sweep_dir = "runs/isoflop_micro"
        c.accelerator = "h100"  # the plan still prices it; the study itself runs on CPU
        c.assumed_mfu = 0.4
    elif arg == "micro_families":
        c.name = "micro_families"
        c.grid = MICRO_FAMILIES_GRID
        c.batch = 16
        c.seq_len = 128
        c.convention = "3fwd"
        c.base = "experiments/micro.py"
        c.sweep_dir = "runs/isoflop_micro_families"
        c.overrides = ("checkpoint_every=1000",)  # runs of up to 43K steps of a few ms each
        c.accelerator = "h100"
        c.assumed_mfu = 0.4
    elif arg.partition(",")[0] == "micro_v2":  # "micro_v2,K": its first K budgets only
        c.name = "micro_v2"
        budgets = sorted({float(row.split(":")[0].split("[")[0]) for row in MICRO_V2_GRID})
        k = int(arg.partition(",")[2] or len(budgets))
        c.grid = tuple(row for row in MICRO_V2_GRID
                       if float(row.split(":")[0].split("[")[0]) in budgets[:k])
        c.batch = 64
        c.seq_len = 128
        c.convention = "3fwd"
        c.base = "experiments/micro_v2.py"
        c.sweep_dir = "runs/isoflop_micro_v2"
        c.overrides = ("checkpoint_every=500",)
        c.accelerator = "h100"
        c.assumed_mfu = 0.4
    elif arg.startswith("micro_v2_lr,"):
        lr = float(arg.partition(",")[2])
        c.name = f"micro_v2_lr_{lr:g}"
        c.grid = MICRO_V2_LR_GRID
        c.batch = 64
        c.seq_len = 128
        c.convention = "3fwd"
        c.base = "experiments/micro_v2.py"
        c.sweep_dir = f"runs/isoflop_micro_v2_lr/lr_{lr:g}"
        c.overrides = (f"optim.lr={lr:g}", f"optim.min_lr={lr / 10:g}", "checkpoint_every=500")
        c.accelerator = "h100"
        c.assumed_mfu = 0.4
    else:
        raise ValueError(f"experiments/isoflop.py takes 'smdm', 'micro', 'micro_families', "
                         f"'micro_v2[,K]' or 'micro_v2_lr,LR', not {arg!r}")
    return c
