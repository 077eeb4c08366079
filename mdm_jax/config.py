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
# How the noise levels t of a batch are drawn: i.i.d.; stratified with one shared offset,
# t_i = (u + i/B) mod 1; antithetic as Eso-LM/MDLM draw them, t_i = (u_i + i)/B, one u_i per
# stratum (mdm_jax.objectives.sample_t).
T_SAMPLING = ("uniform", "stratified", "antithetic")
TRACKERS = ("jsonl", "tensorboard", "wandb")  # config.trackers (mdm_jax/trackers.py)
EVAL_MASKING = ("count", "bernoulli")  # data.eval_masking: objectives.count_masking or p(t)
CE_NORMS = ("masked", "tokens")  # objective.ce_norm: what the unweighted loss is divided by
# Learning-rate schedules after the warmup: cosine to min_lr (SMDM), or constant and then a
# linear decay to min_lr over the last optim.decay_fraction of the steps (LLaDA's SFT).
SCHEDULES = ("cosine", "constant")


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


# Every field of the run config: (dotted name, default, one line of help). `base_config()` is
# built from this table and `train --help` prints it, so a field and its help cannot drift apart.
FIELDS = (
    ("workdir", "runs/default", "checkpoints, metrics, config.json (gs:// ok)"),
    ("seed", 3407, "initialisation, data order and noise"),
    ("steps", 1000, "optimizer steps"),
    ("global_batch", 256, "sequences per optimizer step"),
    ("micro_batch", 0, "per forward/backward (0: global_batch; auto: fit)"),
    ("micro_batch_per_device", 0, "if micro_batch is 0: at most this many a device"),
    ("seq_len", 2048, "tokens per sequence"),
    ("compile_cache_dir", "", "XLA cache for restarts ('': WORKDIR/xla_cache; none)"),
    ("model.preset", "170M", "SMDM model size by name (mdm_jax/presets.py)"),
    ("model.vocab_size", 0, "0: the preset's (32000 for SMDM presets)"),
    ("model.dtype", "bfloat16", "compute: float32 | bfloat16 (params float32)"),
    ("model.remat", "none", "none | full | dots | dots_no_batch | auto"),
    ("model.scan_layers", True, "scan over layers (one compiled block)"),
    ("model.attention", "xla", "xla | jax | cudnn (GPU) | splash (TPU)"),
    ("objective.kind", "mdm", "the family: " + " | ".join(families.FAMILIES)),
    ("objective.eps", 1e-3, "smallest noise level t"),
    ("objective.variable_length_prob", 0.01, "share cut to a random length"),
    ("objective.weighting", "elbo", "elbo (1/t) | unweighted"),
    ("objective.ce_norm", "masked", "unweighted loss / masked | tokens (B*L)"),
    ("objective.t_sampling", "uniform", "uniform | stratified | antithetic (README)"),
    ("objective.loss_chunk", 256, "tokens per chunk of the fused head + loss"),
    ("eso.alpha0", 1.0, "eso: share of tokens made by diffusion (0: AR)"),
    ("eso.batch_split", -1.0, "eso: rows on the diffusion term (-1: by alpha0)"),
    ("eso.shuffle", True, "eso: random order in clean/masked (variant B)"),
    ("sft.enabled", False, "fine-tune on prompt/response pairs (data.sft)"),
    ("sft.norm", "llada", "llada (per row 1/answer) | smdm (per batch)"),
    ("sft.prompt_drop", 0.0, "chance a batch's prompts are masked (CFG)"),
    ("sft.mask_prompt", True, "False: whole-row pre-training loss (SMDM)"),
    ("sft.pad", "batch", "batch (cut to longest pair) | canvas"),
    ("init.source", "", "start from this run's workdir or an export"),
    ("init.step", -1, "its checkpoint step (-1: the latest)"),
    ("optim.lr", 2e-4, "peak learning rate (AdamW, cosine decay)"),
    ("optim.min_lr", 2e-5, "learning rate at the end of the decay"),
    ("optim.b1", 0.9, "Adam beta1"),
    ("optim.b2", 0.95, "Adam beta2"),
    ("optim.weight_decay", 0.1, "AdamW weight decay"),
    ("optim.grad_clip", 1.0, "global gradient-norm clip (0: off)"),
    ("optim.warmup_steps", -1, "-1: fraction * steps, or max(100, steps / 100)"),
    ("optim.warmup_fraction", 0.0, "e.g. 0.1 for short runs"),
    ("optim.schedule", "cosine", "cosine | constant (LLaDA SFT: then linear)"),
    ("optim.decay_fraction", 0.1, "constant: share of steps decaying to min_lr"),
    ("mesh.data", -1, "data-parallel axis (-1: devices left)"),
    ("mesh.fsdp", 1, "fully sharded data-parallel axis"),
    ("mesh.tensor", 1, "tensor-parallel axis"),
    ("data.train_dir", "", "shards written by python -m mdm_jax.data.prepare"),
    ("data.eval_dir", "", "validation shards ('': no validation)"),
    ("data.tokenizer", "", "SentencePiece model (samples, vocab check)"),
    ("data.worker_count", 0, "Grain worker processes (0: in the main process)"),
    ("data.eval_batches", 4, "batches per validation"),
    ("data.eval_draws", 2, "draws of t and masks per batch (>= 2: a std error)"),
    ("data.eval_masking", "count", "count (l ~ U{1..L}, LLaDA) | bernoulli"),
    ("data.eval_t_sampling", "antithetic", "t over a batch's rows: antithetic | ..."),
    ("data.eval_seed", 0, "seed of the validation draws (fixed across a study)"),
    ("data.restart_data_order", False, "resume on other data (restarts its order)"),
    ("data.verify_shards", True, "check shards' sha256 (cached)"),
    ("data.eval_tasks", "", "comma list of task files scored at eval"),
    ("data.eval_tasks_limit", 50, "questions per task and evaluation (0: all)"),
    ("nonfinite", "skip", "NaN/Inf loss or grads: skip the update (counted) | stop"),
    ("preemption_exit_code", 0, "after a preemption save (pods: 42)"),
    ("distributed.coordinator", "", "host:port of process 0 ('': from env)"),
    ("distributed.num_processes", 0, "0: from the environment"),
    ("distributed.process_id", -1, "-1: from the environment"),
    ("trackers", "tensorboard", "tensorboard,wandb (jsonl is always on)"),
    ("wandb.project", "mdm_jax", "W&B project (trackers=wandb)"),
    ("wandb.entity", "", "W&B team or user ('': your default)"),
    ("wandb.name", "", "W&B run name ('': the workdir's name)"),
    ("wandb.group", "", "W&B group, e.g. a sweep's name"),
    ("log_every", 10, "steps between metric lines"),
    ("eval_every", 200, "steps between evaluations"),
    ("eval_at_start", True, "also evaluate the untrained model (a fresh run)"),
    ("checkpoint_every", 500, "steps between checkpoints (0: only the last)"),
    ("checkpoint_keep", 3, "the last K checkpoints are kept..."),
    ("checkpoint_keep_period", 0, "...plus every M-th step for good (0: none)"),
    ("checkpoint_minutes", 0.0, "also save when this many minutes passed (0: off)"),
    ("profile.steps", "", "'N,M': trace steps N..M into the workdir"),
    ("samples.count", 0, "samples printed at the end of training"),
    ("samples.steps", 64, "sampler steps"),
    ("samples.length", 0, "0: seq_len"),
    ("samples.temperature", 0.0, "0: greedy; > 0: Gumbel-max sampling"),
    ("samples.remasking", "low_confidence", "low_confidence | random (MDM samplers)"),
)
# Fields that also take the string "auto" (answered by the memory fit, mdm_jax/autofit.py).
_AUTO_FIELDS = ("micro_batch",)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for dotted, default, _ in FIELDS:
        *parents, leaf = dotted.split(".")
        node = c
        for name in parents:
            if name not in node:
                node[name] = ml_collections.ConfigDict()
            node = node[name]
        node[leaf] = (ml_collections.FieldReference(default, field_type=object)
                      if dotted in _AUTO_FIELDS else default)
    return c


def fields_help() -> str:
    """One line per config field, for `--help`."""
    return "\n".join(f"{dotted} = {default!r}: {text}" for dotted, default, text in FIELDS)


AUTO = "auto"


def micro_batch(c: ml_collections.ConfigDict, batch_shards: int):
    """Sequences per forward/backward over all devices ("auto" until the fit replaces it):
    config.micro_batch where set; else, under config.micro_batch_per_device (SMDM's launchers
    give the micro-batch per device), the largest divisor of the global batch that gives each
    of the batch_shards (data * fsdp devices) at most that many; else the global batch."""
    if c.micro_batch:
        return c.micro_batch
    per_device = c.get("micro_batch_per_device", 0)
    if per_device and batch_shards and per_device * batch_shards < c.global_batch:
        for share in range(per_device, 0, -1):
            if c.global_batch % (share * batch_shards) == 0:
                return share * batch_shards
    return c.global_batch  # (shards that do not divide the global batch: validate says so)


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
    ("checkpoint_minutes", 0, _INF), ("micro_batch", 0, _INF),
    ("micro_batch_per_device", 0, _INF), ("seq_len", 1, _INF),
    ("data.eval_batches", 0, _INF), ("data.eval_draws", 1, _INF),
    ("data.eval_seed", 0, _INF), ("data.worker_count", 0, 1024),
    ("samples.count", 0, _INF), ("data.eval_tasks_limit", 0, _INF),
    ("samples.steps", 1, _INF), ("samples.length", 0, _INF),
    ("samples.temperature", 0, _INF), ("objective.variable_length_prob", 0, 1),
    ("optim.min_lr", 0, _INF), ("optim.b1", 0, 1), ("optim.b2", 0, 1),
    ("optim.weight_decay", 0, _INF), ("optim.grad_clip", 0, _INF),
    ("optim.warmup_steps", -1, _INF), ("optim.warmup_fraction", 0, 1),
    ("optim.decay_fraction", 0, 1), ("sft.prompt_drop", 0, 1), ("init.step", -1, _INF),
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
    _require(c.objective.get("ce_norm", "masked") in CE_NORMS,
             f"config.objective.ce_norm={c.objective.get('ce_norm')!r}; valid: "
             f"{', '.join(CE_NORMS)}.")
    _require(c.objective.t_sampling in T_SAMPLING,
             f"config.objective.t_sampling={c.objective.t_sampling!r}; valid: "
             f"{', '.join(T_SAMPLING)}.")
    _require(c.data.eval_t_sampling in T_SAMPLING,
             f"config.data.eval_t_sampling={c.data.eval_t_sampling!r}; valid: "
             f"{', '.join(T_SAMPLING)}.")
    _require(c.data.eval_masking in EVAL_MASKING,
             f"config.data.eval_masking={c.data.eval_masking!r}; valid: "
             f"{', '.join(EVAL_MASKING)}.")
    names = [n.strip() for n in str(c.get("trackers", "")).split(",") if n.strip()]
    _require(all(n in TRACKERS for n in names),
             f"config.trackers={c.get('trackers')!r}; give a comma-separated list of: "
             f"{', '.join(TRACKERS)} (jsonl is always on).")
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
    _require(isinstance(c.compile_cache_dir, str),
             f"config.compile_cache_dir={c.compile_cache_dir!r}: give a folder, '' for "
             f"WORKDIR/xla_cache or 'none' for no cache.")
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
    _require(c.global_batch >= 1, f"config.global_batch={c.global_batch} must be >= 1.")
    mb = micro_batch(c, batch_shards)
    _require(c.global_batch % mb == 0,
             f"config.global_batch={c.global_batch} is not divisible by config.micro_batch={mb}; "
             f"set config.micro_batch to a divisor of the global batch.")
    _require(mb % batch_shards == 0,
             f"config.micro_batch={mb} (global_batch when 0) is not divisible by the batch "
             f"shards data*fsdp={data}*{fsdp}={batch_shards}; use a multiple of {batch_shards} "
             f"or change config.mesh.")
    if c.objective.kind == "eso":
        _validate_eso(c, mb)
    _require(c.optim.schedule in SCHEDULES,
             f"config.optim.schedule={c.optim.schedule!r}; valid: {', '.join(SCHEDULES)}.")
    if c.sft.enabled:
        _validate_sft(c)
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


def _validate_eso(c: ml_collections.ConfigDict, rows: int) -> None:
    """The interpolating family's options: alpha0, and a batch split that leaves rows for each
    term it trains (of `rows` per forward pass)."""
    alpha0, split = c.eso.alpha0, c.eso.batch_split
    _require(0 <= alpha0 <= 1, f"config.eso.alpha0={alpha0} must be in [0, 1] (1: masked "
                               f"diffusion in a random order, 0: left to right).")
    _require(split == -1 or 0 <= split <= 1,
             f"config.eso.batch_split={split} must be in [0, 1], or -1 (chosen by alpha0).")
    split = families.eso_batch_split(alpha0, split)
    diffusion_rows = int(split * rows)
    _require(alpha0 == 0 or diffusion_rows >= 1,
             f"config.eso.batch_split={split} leaves none of the {rows} rows of a forward pass "
             f"to the diffusion term (alpha0={alpha0} > 0); raise it (or -1).")
    _require(alpha0 == 1 or diffusion_rows < rows,
             f"config.eso.batch_split={split} leaves none of the {rows} rows of a forward pass "
             f"to the left-to-right term (alpha0={alpha0} < 1); lower it (or -1).")
    _require(alpha0 == 1 or c.model.attention == "xla",
             f"config.model.attention={c.model.attention}: the left-to-right term of eso "
             f"(alpha0={alpha0} < 1) needs an explicit 2L attention mask, which only the xla "
             f"attention takes; use model.attention=xla (or eso.alpha0=1).")


def _validate_sft(c: ml_collections.ConfigDict) -> None:
    family = families.get(c.objective.kind)
    try:
        family.check_finetuning()
    except families.FamilyError as e:
        raise ConfigError(f"config.sft.enabled: {e}") from None
    _require(c.sft.norm in ("llada", "smdm"),
             f"config.sft.norm={c.sft.norm!r}; valid: llada, smdm.")
    _require(c.sft.pad in ("batch", "canvas"),
             f"config.sft.pad={c.sft.pad!r}; valid: batch, canvas.")
    _require(c.sft.prompt_drop == 0 or family.mask_token,
             f"config.sft.prompt_drop={c.sft.prompt_drop}: prompts are dropped by masking "
             f"them, and the {family.name} family has no mask token; set it to 0.")


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
