"""Metric sinks: `{workdir}/metrics.jsonl` (always: resume and the sweeps read it) and the
trackers of config.trackers (`mdm_jax.trackers`), process 0 only."""

from __future__ import annotations

import json
import time

import jax

from mdm_jax import storage
from mdm_jax import trackers as trackers_lib


class MetricWriter:
    """On a local disk metrics.jsonl is appended line by line; object storage (gs://) has no
    append, so there the file is rewritten whole at each `flush()` (the trainer flushes when it
    saves a checkpoint) and at most every `remote_flush_s` seconds."""

    def __init__(self, workdir: str, enabled: bool | None = None, remote_flush_s: float = 60.0,
                 resume_step: int | None = None, trackers: tuple[str, ...] = ("tensorboard",),
                 config: dict | None = None):
        """`resume_step`: rows logged after it (by a run killed before its next checkpoint)
        are dropped, so the file keeps one row per step when that run is resumed; the
        trackers drop them too. `config`: the resolved config, the trackers' hyper-parameters."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._workdir = workdir
        self._jsonl = None
        self._trackers = []
        self._remote_path = None
        self._remote_lines: list[str] = []
        self._remote_flush_s = remote_flush_s
        self._last_flush = time.monotonic()
        if self.enabled:
            root = storage.as_path(workdir)
            path = root / "metrics.jsonl"

            def read() -> list[str]:
                root.mkdir(parents=True, exist_ok=True)
                return path.read_text().splitlines(keepends=True) if path.exists() else []

            lines = storage.retrying(str(path), "reading", read)
            kept = [line for line in lines if _logged_at_or_before(line, resume_step)]
            if storage.is_remote(workdir):
                self._remote_path = path
                self._remote_lines = kept
            else:
                if kept != lines:  # rewrite whole, then append
                    tmp = root / "metrics.jsonl.tmp"
                    tmp.write_text("".join(kept))
                    tmp.replace(path)
                self._jsonl = open(path, "a", buffering=1)
            with storage.waiting(workdir, "starting the trackers"):
                self._trackers = trackers_lib.start(trackers_lib.parse(",".join(trackers)),
                                                    workdir, config or {}, resume_step)

    def _append(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
        else:
            self._remote_lines.append(line)
            if time.monotonic() - self._last_flush >= self._remote_flush_s:
                self.flush()

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": _py(v) for k, v in metrics.items()}
        self._append({"step": step, **clean})
        grouped = trackers_lib.numeric(clean)
        for tracker in self._trackers:
            tracker.scalars(step, grouped)

    def text(self, step: int, name: str, texts: list[str]) -> None:
        """Texts (the end-of-run samples): a JSONL row {"step", name: [...]} and each
        tracker's text panel."""
        if not self.enabled:
            return
        self._append({"step": step, name: list(texts)})
        for tracker in self._trackers:
            tracker.text(step, name, list(texts))

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._remote_path is not None:
            storage.write_text(self._remote_path, "".join(self._remote_lines))
            self._last_flush = time.monotonic()
        with storage.waiting(self._workdir, "writing the trackers' files"):
            for tracker in self._trackers:
                tracker.flush()

    def close(self) -> None:
        if self._remote_path is not None:
            self.flush()
        if self._jsonl:
            self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()


def _logged_at_or_before(line: str, step: int | None) -> bool:
    """Keep a complete JSON row whose step is at most `step` (all complete rows if None)."""
    if not line.endswith("\n"):
        return False  # cut short by a kill
    try:
        row_step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return False
    return step is None or (isinstance(row_step, int) and row_step <= step)


def _py(value):
    """Device scalars -> plain Python numbers for JSON."""
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


def format_metrics(step: int, metrics: dict) -> str:
    parts = [f"step {step:>6}"]
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
