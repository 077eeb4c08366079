"""The run configuration: ConfigDict schema with defaults, and validation before anything compiles.

Experiment files (`experiments/*.py`) start from `base_config()` and override fields; every entry
point takes `--config=path.py[:arg]` plus `--config.key=value` overrides. `validate()` turns a
config into clear errors that name the field and the fix.
"""

from __future__ import annotations

import math

import ml_collections

from mdm_jax import families
from mdm_jax.errors import UserError
from mdm_jax.presets import get_preset

# Names only (the model maps them to jax): kept here so that this module imports no jax.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "jax", "cudnn", "splash")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 3407
    c.steps = 1000
    c.global_batch = 256  # sequences per optimizer step
    # sequences per forward/backward; 0 = global_batch (no accumulation); "auto" = the largest
    # that fits the accelerator's memory, found by compiling (mdm_jax/autofit.py)
    c.micro_batch = ml_collections.FieldReference(0, field_type=object)
    c.seq_len = 2048

    c.model = ml_collections.ConfigDict()
    c.model.preset = "170M"
    c.model.vocab_size = 0  # 0 = the preset's (32000 for SMDM presets)
    c.model.dtype = "bfloat16"  # compute dtype; parameters are float32
    c.model.remat = "none"  # none | full | dots | dots_no_batch | auto (cheapest that fits)
    c.model.scan_layers = True
    c.model.attention = "xla"  # xla | jax | cudnn (GPU) | splash (TPU Pallas kernel)

    c.objective = ml_collections.ConfigDict()
    # mdm (SMDM ELBO) | mdm-ce (plain masked CE) | uniform (uniform-state diffusion) | arm
    c.objective.kind = "mdm"
    c.objective.eps = 1e-3
    c.objective.variable_length_prob = 0.01
    c.objective.weighting = "elbo"
    c.objective.t_sampling = "uniform"
    c.objective.loss_chunk = 256

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.min_lr = 2e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = -1  # -1: warmup_fraction * steps if set, else max(100, steps / 100)
    c.optim.warmup_fraction = 0.0  # e.g. 0.1 for runs too short for SMDM's 100-step minimum

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices left after fsdp and tensor
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.data = ml_collections.ConfigDict()
    c.data.train_dir = ""  # a directory written by `python -m mdm_jax.data.prepare`
    c.data.eval_dir = ""  # validation split; "" = no validation
    c.data.tokenizer = ""  # SentencePiece model, for samples and the vocabulary check
    c.data.worker_count = 0  # Grain worker processes (0 = in the main process)
    c.data.eval_batches = 4
    # Resuming on other training data (another train_dir or mixture) is refused; True allows it
    # on purpose and restarts the data order (the saved position means nothing there).
    c.data.restart_data_order = False
    c.data.verify_shards = True  # each shard's sha256 against its manifest (cached per file)
    # Multiple-choice task files (comma list of demo_cloze-style JSONL, see mdm_jax.eval.tasks)
    # whose accuracy is logged at every evaluation as eval_acc_<file name>; "" = none.
    c.data.eval_tasks = ""
    c.data.eval_tasks_limit = 50  # questions per task and evaluation (0 = all)

    c.nonfinite = "skip"  # NaN/Inf loss or grads: "skip" the update (counted) or "stop"
    # Exit code after a preemption save (SIGTERM): 0 here; the pod launchers pass 42 so that xpk
    # restarts the workload and launch/slurm.sbatch requeues the job.
    c.preemption_exit_code = 0

    c.distributed = ml_collections.ConfigDict()  # multi-host; empty = from the environment
    c.distributed.coordinator = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 500
    c.checkpoint_keep = 3  # the last K checkpoints...
    c.checkpoint_keep_period = 0  # ...plus every M-th step kept for good (0 = none)
    c.checkpoint_minutes = 0.0  # also save when this many minutes passed (0 = off)
    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ""  # "N,M": jax.profiler trace of steps N..M into the workdir

    c.samples = ml_collections.ConfigDict()
    c.samples.count = 0  # samples printed at the end of training
    c.samples.steps = 64
    c.samples.length = 0  # 0 = seq_len
    c.samples.temperature = 0.0  # 0 = greedy; > 0 = Gumbel-max sampling
    c.samples.remasking = "low_confidence"  # low_confidence | random (MDM samplers)
    return c


AUTO = "auto"


def micro_batch(c: ml_collections.ConfigDict) -> int:
    return c.micro_batch or c.global_batch


def with_fit(c: ml_collections.ConfigDict, micro_batch, remat: str) -> ml_collections.ConfigDict:
    """A copy of c with these micro_batch and model.remat (which may change type: "auto" is a
    string, its answer a number)."""
    d = c.to_dict()
    d["micro_batch"], d["model"]["remat"] = micro_batch, remat
    return ml_collections.ConfigDict(d)


def wants_fit(c: ml_collections.ConfigDict) -> bool:
    """micro_batch or model.remat left to the memory fit (mdm_jax/autofit.py)."""
    return c.micro_batch == AUTO or c.model.remat == AUTO


# Numeric fields and their valid ranges, checked before anything compiles (a 0 here would
# otherwise divide by zero or loop forever only after the step compiled).
_INF = float("inf")
RANGES = (
    ("log_every", 1, _INF), ("eval_every", 1, _INF), ("checkpoint_every", 0, _INF),
    ("checkpoint_keep", 0, _INF), ("checkpoint_keep_period", 0, _INF),
    ("checkpoint_minutes", 0, _INF), ("micro_batch", 0, _INF), ("seq_len", 1, _INF),
    ("data.eval_batches", 0, _INF), ("data.worker_count", 0, 1024),
    ("samples.count", 0, _INF), ("data.eval_tasks_limit", 0, _INF),
    ("samples.steps", 1, _INF), ("samples.length", 0, _INF),
    ("samples.temperature", 0, _INF), ("objective.variable_length_prob", 0, 1),
    ("optim.min_lr", 0, _INF), ("optim.b1", 0, 1), ("optim.b2", 0, 1),
    ("optim.weight_decay", 0, _INF), ("optim.grad_clip", 0, _INF),
    ("optim.warmup_steps", -1, _INF), ("optim.warmup_fraction", 0, 1),
    ("distributed.num_processes", 0, _INF), ("distributed.process_id", -1, _INF),
)


def _lookup(c: ml_collections.ConfigDict, dotted: str):
    node = c
    for part in dotted.split("."):
        node = node[part]
    return node


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raise ConfigError for the first problem found; cheap, runs before any compilation.
    "auto" micro_batch / model.remat are checked as their first candidates (no accumulation,
    no remat); the fit replaces them before a Trainer is built."""
    if wants_fit(c):
        c = with_fit(c, 0 if c.micro_batch == AUTO else c.micro_batch,
                     "none" if c.model.remat == AUTO else c.model.remat)
    try:
        preset = get_preset(c.model.preset)
    except ValueError as e:
        raise ConfigError(f"config.model.preset: {e}") from None
    _require(c.objective.kind in families.FAMILIES,
             f"config.objective.kind={c.objective.kind!r}; valid: {', '.join(families.FAMILIES)}.")
    _require(c.model.dtype in ("float32", "bfloat16"),
             f"config.model.dtype={c.model.dtype!r}; valid: float32, bfloat16.")
    _require(c.model.remat in REMAT_POLICIES,
             f"config.model.remat={c.model.remat!r}; valid: {', '.join(REMAT_POLICIES)}, auto.")
    _require(c.model.attention in ATTENTION_IMPLS,
             f"config.model.attention={c.model.attention!r}; valid: {', '.join(ATTENTION_IMPLS)}.")
    _require(c.objective.weighting in ("elbo", "unweighted"),
             f"config.objective.weighting={c.objective.weighting!r}; valid: elbo, unweighted.")
    _require(c.objective.t_sampling in ("uniform", "stratified"),
             f"config.objective.t_sampling={c.objective.t_sampling!r}; valid: uniform, stratified.")
    _require(c.samples.remasking in ("low_confidence", "random"),
             f"config.samples.remasking={c.samples.remasking!r}; valid: low_confidence, random.")
    _require(0 < c.objective.eps < 1, f"config.objective.eps={c.objective.eps} must be in (0, 1).")
    _require(c.objective.loss_chunk >= 1,
             f"config.objective.loss_chunk={c.objective.loss_chunk} must be >= 1.")
    _require(c.steps >= 1, f"config.steps={c.steps} must be >= 1.")
    for field, low, high in RANGES:
        value = _lookup(c, field)
        hint = " or auto" if field == "micro_batch" else ""
        _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                 and low <= value <= high,
                 f"config.{field}={value!r} must be a number in [{low}, {high}]{hint}.")
    _require(c.nonfinite in ("skip", "stop"),
             f"config.nonfinite={c.nonfinite!r}; valid: skip, stop.")
    _require(0 <= c.preemption_exit_code <= 255,
             f"config.preemption_exit_code={c.preemption_exit_code} must be in 0..255.")
    _require(c.optim.lr > 0, f"config.optim.lr={c.optim.lr} must be > 0.")
    try:
        window = parse_steps(c.profile.steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(window is None or window[0] <= c.steps,
             f"config.profile.steps={c.profile.steps!r} starts after the last step "
             f"({c.steps}); pick steps within the run.")

    _require(c.model.attention != "splash" or c.seq_len % 128 == 0,
             f"config.model.attention=splash tiles the sequence in blocks of 128 (TPU lanes); "
             f"config.seq_len={c.seq_len} is not a multiple of 128: use attention=xla or a "
             f"multiple of 128.")
    max_len = preset.max_seq_len
    _require(1 <= c.seq_len <= max_len,
             f"config.seq_len={c.seq_len} is longer than preset {c.model.preset!r} supports "
             f"({max_len}); lower config.seq_len to at most {max_len}.")

    # The mesh, then everything that must divide it.
    try:
        data, fsdp, tensor = resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor,
                                                num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_shards = data * fsdp
    mb = micro_batch(c)
    _require(c.global_batch >= 1, f"config.global_batch={c.global_batch} must be >= 1.")
    _require(c.global_batch % mb == 0,
             f"config.global_batch={c.global_batch} is not divisible by config.micro_batch={mb}; "
             f"set config.micro_batch to a divisor of the global batch.")
    _require(mb % batch_shards == 0,
             f"config.micro_batch={mb} (global_batch when 0) is not divisible by the batch "
             f"shards data*fsdp={data}*{fsdp}={batch_shards}; use a multiple of {batch_shards} "
             f"or change config.mesh.")
    _require(c.global_batch % process_count == 0,
             f"config.global_batch={c.global_batch} is not divisible by the {process_count} "
             f"processes; use a multiple of {process_count}.")
    _require(preset.n_head % tensor == 0,
             f"preset {c.model.preset!r} has {preset.n_head} heads, not divisible by "
             f"config.mesh.tensor={tensor}; use a tensor axis that divides {preset.n_head}.")
    _require(preset.mlp_dim % tensor == 0,
             f"preset {c.model.preset!r} mlp_dim {preset.mlp_dim} is not divisible by "
             f"config.mesh.tensor={tensor}.")
    vocab = c.model.vocab_size or preset.vocab_size
    _require(vocab % tensor == 0,
             f"vocab_size {vocab} is not divisible by config.mesh.tensor={tensor}; the head is "
             f"split over the tensor axis, so pick a tensor size that divides it.")
    _require(preset.d_model % fsdp == 0,
             f"preset {c.model.preset!r} d_model {preset.d_model} is not divisible by "
             f"config.mesh.fsdp={fsdp}; FSDP splits the embed dimension, so choose fsdp from "
             f"the divisors of {preset.d_model} (e.g. {math.gcd(preset.d_model, fsdp)}).")


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, ...]:
    """Replace at most one -1 by whatever fills the devices; errors name the config field."""
    shape = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {shape}.")
    for k, v in shape.items():
        if v != -1 and v < 1:
            raise ValueError(f"config.mesh.{k}={v} must be >= 1 (or -1 to fill the devices).")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh={shape}: {num_devices} devices are not divisible by the fixed axes "
                f"({fixed}); choose axis sizes whose product divides {num_devices}.")
        shape[free[0]] = num_devices // fixed
    total = math.prod(shape.values())
    if total > num_devices:
        raise ValueError(
            f"config.mesh={shape} needs {total} devices but only {num_devices} are available; "
            f"shrink config.mesh.data/fsdp/tensor so their product is at most {num_devices}.")
    return tuple(shape[k] for k in MESH_AXES)


def parse_steps(spec: str) -> tuple[int, int] | None:
    """config.profile.steps: "N,M" -> (N, M) with 1 <= N <= M; "N" -> (N, N); "" -> None."""
    spec = str(spec).strip()
    if not spec:
        return None
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"config.profile.steps={spec!r}: give 'FIRST,LAST' step numbers, e.g. "
                         f"'10,12', or '' for no trace")
    first, last = int(parts[0]), int(parts[-1])
    if not 1 <= first <= last:
        raise ValueError(f"config.profile.steps={spec!r}: need 1 <= FIRST <= LAST, e.g. '10,12'")
    return first, last
