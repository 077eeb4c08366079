"""Experiment trackers: where a run's config, metrics and samples go besides metrics.jsonl.

`config.trackers` names them, comma-separated: `tensorboard` (event files under
WORKDIR/tensorboard, the default) and `wandb` (Weights & Biases: the `wandb` extra; set
WANDB_MODE=offline for a run that writes only local files, to `wandb sync` later). The JSONL
record (`mdm_jax.metrics`) is always kept: it is what resume and the sweeps read. Every tracker
gets the resolved config as hyper-parameters, the scalars grouped as `train/`, `eval/`
(validation bound, task accuracies), `perf/` (throughput) and `debug/` (internal counters), and
the end-of-run samples as text. Only process 0 tracks.
"""

from __future__ import annotations

import json
import math
import os
import secrets

from mdm_jax import storage
from mdm_jax.config import TRACKERS as NAMES
from mdm_jax.errors import UserError

TRACKERS = tuple(n for n in NAMES if n != "jsonl")  # jsonl: mdm_jax.metrics, always on
PERF = ("tokens_per_s", "flops_per_s", "mfu")
DEBUG = ("halted", "nonfinite", "skipped")
WANDB_RUN_FILE = "wandb_run.json"  # the W&B run id (and last step sent), kept in the workdir


class TrackerError(UserError, ValueError):
    """A tracker that cannot start (not installed, bad name); the message says what to do."""


def parse(value: str) -> tuple[str, ...]:
    """config.trackers -> the tracker names ('jsonl' allowed: it is always on)."""
    names = tuple(n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "jsonl")
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise TrackerError(f"config.trackers={value!r}: unknown {', '.join(map(repr, bad))}; "
                           f"valid: jsonl (always on), {', '.join(TRACKERS)}")
    return names


def tag(key: str) -> str:
    """A flat metrics.jsonl name -> its grouped tracker tag: eval_loss -> eval/loss,
    tokens_per_s -> perf/tokens_per_s, skipped -> debug/skipped, loss -> train/loss."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in PERF:
        return "perf/" + key
    if key in DEBUG:
        return "debug/" + key
    return "train/" + key


def numeric(metrics: dict) -> dict:
    """The finite numbers of `metrics`, under their grouped tags."""
    return {tag(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict, prefix: str = "") -> dict:
    """{'optim.lr': 2e-4, ...}: hyper-parameter tables want one level of scalar values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class TensorBoard:
    """tensorboardX event files; events logged after `resume_step` by a killed run are hidden
    (a SessionLog.START at purge_step), as the JSONL rows are dropped."""

    def __init__(self, workdir: str, config: dict, resume_step: int | None):
        from tensorboardX import SummaryWriter  # heavy import: process 0 only

        root = storage.as_path(workdir)
        self._tb = SummaryWriter(str(root / "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)
        if not resume_step:
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in flat_config(config).items()}
            self._tb.add_hparams(hparams, {}, name="hparams")  # a sub-run folder

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def text(self, step: int, name: str, texts: list[str]) -> None:
        body = "\n\n".join(f"**{i}**\n\n```\n{t.strip()}\n```" for i, t in enumerate(texts))
        self._tb.add_text(name, body, step)

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class WandB:
    """Weights & Biases. The run's id is kept in WORKDIR/wandb_run.json, so a resumed run
    appends to the same W&B run; steps it already sent (a run killed after logging them) are
    not sent again, so no step is logged twice. Offline (WANDB_MODE=offline) each process
    writes its own WORKDIR/wandb/offline-run-* folder under the one id, holding only the steps
    it added: `wandb sync` uploads them into one run. wandb-core writes its file every 15 s,
    so a SIGKILLed process can lose its last seconds there (metrics.jsonl keeps them)."""

    def __init__(self, workdir: str, config: dict, resume_step: int | None):
        try:
            import wandb
        except ImportError:
            raise TrackerError("config.trackers names wandb, which is not installed; run "
                               "`bash launch/setup.sh wandb` (or pip install 'mdm_jax[wandb]'), "
                               "or drop it from config.trackers") from None
        self._wandb = wandb
        self._record = storage.as_path(workdir) / WANDB_RUN_FILE
        saved = json.loads(self._record.read_text()) if self._record.exists() else {}
        run_id = saved.get("id") or secrets.token_hex(4)
        # Steps up to here reached W&B from an earlier process of this run (one killed after
        # logging them): a resume replays them with the same values, and they are not resent.
        self._floor = self._last = saved.get("last_step", -1)
        w = config.get("wandb", {})
        local = None if storage.is_remote(workdir) else str(storage.as_path(workdir))
        # console="off": the run's lines stay where they go (a terminal, train.log), unwrapped
        self._run = wandb.init(project=w.get("project") or "mdm_jax",
                               entity=w.get("entity") or None,
                               name=w.get("name") or os.path.basename(workdir.rstrip("/")),
                               group=w.get("group") or None, id=run_id, resume="allow",
                               dir=local, config=config,
                               settings=wandb.Settings(console="off", disable_git=True))
        self._save()

    def _save(self) -> None:
        self._record.write_text(json.dumps({"id": self._run.id, "last_step": self._last}) + "\n")

    def _send(self, step: int, payload: dict) -> None:
        if step > self._floor:
            self._run.log(payload, step=step)
            self._last = max(self._last, step)

    def scalars(self, step: int, values: dict) -> None:
        self._send(step, values)

    def text(self, step: int, name: str, texts: list[str]) -> None:
        self._send(step, {name: self._wandb.Table(columns=["sample", "text"],
                                                  data=[[i, t] for i, t in enumerate(texts)])})

    def flush(self) -> None:
        self._save()

    def close(self) -> None:
        self._save()
        self._run.finish()


def start(names: tuple[str, ...], workdir: str, config: dict, resume_step: int | None) -> list:
    """The trackers of `names`, started for this run (process 0 only)."""
    kinds = {"tensorboard": TensorBoard, "wandb": WandB}
    return [kinds[n](workdir, config, resume_step) for n in names]
