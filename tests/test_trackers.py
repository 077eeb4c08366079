"""Experiment trackers (mdm_jax/trackers.py) with the real libraries: a run tracked to
TensorBoard and to Weights & Biases offline, read back with tensorboard's EventAccumulator and
from W&B's own run file; a resumed run appends to the same W&B run without repeating a step."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest
from conftest import nano_config

from mdm_jax import trackers


def test_metric_names_are_grouped_and_bad_tracker_names_refused():
    assert [trackers.tag(k) for k in ("loss", "lr", "eval_loss", "eval_demo_cloze",
                                      "tokens_per_s", "mfu", "skipped", "halted")] == [
        "train/loss", "train/lr", "eval/loss", "eval/demo_cloze", "perf/tokens_per_s",
        "perf/mfu", "debug/skipped", "debug/halted"]
    assert trackers.numeric({"loss": 2.0, "mfu": None, "lr": float("nan"), "halted": 1.0}) == {
        "train/loss": 2.0, "debug/halted": 1.0}
    assert trackers.parse("jsonl, tensorboard,wandb") == ("tensorboard", "wandb")
    with pytest.raises(trackers.TrackerError, match="unknown 'mlflow'; valid: jsonl"):
        trackers.parse("tensorboard,mlflow")
    assert trackers.flat_config({"optim": {"lr": 0.1}, "a": [1, 2]}) == {"optim.lr": 0.1,
                                                                          "a": "[1, 2]"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the `wandb` extra (bash launch/setup.sh wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("CACHE", "DATA", "CONFIG"):  # nothing under HOME
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb_{name.lower()}"))
    return tmp_path


def wandb_records(path: str):
    """The protobuf records of a W&B run file (`run-ID.wandb`): a 7-byte header, then a
    LevelDB-style log of 32 KiB blocks, each record [crc32, length, type] + payload, payloads
    split across blocks as FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += room
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb(workdir: str) -> dict:
    """{config, rows (one dict per history row, with _step), run_ids, folders} of every
    offline run folder under WORKDIR/wandb."""
    config, rows, ids = {}, [], set()
    folders = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    for folder in folders:
        [path] = glob.glob(os.path.join(folder, "run-*.wandb"))
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                for item in record.run.config.update:
                    config[item.key or item.nested_key[0]] = json.loads(item.value_json)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    keys = list(item.nested_key) or [item.key]
                    node = row
                    for k in keys[:-1]:
                        node = node.setdefault(k, {})
                    node[keys[-1]] = json.loads(item.value_json) if item.value_json else None
                row["_folder"] = folder
                rows.append(row)
    return {"config": config, "rows": rows, "run_ids": ids, "folders": folders}


def test_a_resumed_wandb_run_keeps_its_id_and_never_repeats_a_step(offline_wandb):
    workdir = str(offline_wandb / "run")
    os.makedirs(workdir)
    first = trackers.WandB(workdir, {"optim": {"lr": 0.1}}, resume_step=None)
    for step in (1, 2, 3, 4):
        first.scalars(step, {"train/loss": 10.0 - step})
    first.close()  # logged up to 4; the checkpoint was at 2: a resume replays 3 and 4
    again = trackers.WandB(workdir, {"optim": {"lr": 0.1}}, resume_step=2)
    for step in (3, 4, 5, 6):
        again.scalars(step, {"train/loss": 10.0 - step})
    again.text(6, "samples", ["one", "two"])
    again.close()
    got = read_wandb(workdir)
    steps = [r["_step"] for r in got["rows"]]
    assert steps == [1, 2, 3, 4, 5, 6] and len(got["folders"]) == 2
    assert len(got["run_ids"]) == 1 == len({json.load(open(
        os.path.join(workdir, trackers.WANDB_RUN_FILE)))["id"]} | got["run_ids"])
    assert got["config"]["optim"] == {"lr": 0.1}
    table = got["rows"][-1]["samples"]
    assert table["_type"] == "table-file"
    saved = json.load(open(os.path.join(got["rows"][-1]["_folder"], "files", table["path"])))
    assert [row[-1] for row in saved["data"]] == ["one", "two"]


@pytest.mark.e2e
def test_a_run_tracked_to_tensorboard_and_wandb_reads_back(tiny_data, offline_wandb):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from mdm_jax.train import train

    workdir = str(offline_wandb / "run")
    c = nano_config(**{"data.train_dir": tiny_data["train"],
                       "data.eval_dir": tiny_data["validation"], "data.eval_batches": 1,
                       "data.tokenizer": tiny_data["tokenizer"], "workdir": workdir,
                       "steps": 20, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
                       "trackers": "tensorboard,wandb", "samples.count": 2,
                       "samples.steps": 4})
    train(c, stop_at=10)  # an interrupted run, then its resume
    result = train(c)
    got = read_wandb(workdir)
    assert len(got["run_ids"]) == 1 and len(got["folders"]) == 2
    steps = [r["_step"] for r in got["rows"]]
    assert steps == sorted(set(steps)) == [0, 5, 10, 15, 20]  # no step twice
    by_step = {r["_step"]: r for r in got["rows"]}
    for h in result.history:  # the resumed process's steps, as the trainer logged them
        assert by_step[h["step"]]["train/loss"] == pytest.approx(h["loss"])
        assert "perf/tokens_per_s" in by_step[h["step"]] and "debug/skipped" in by_step[
            h["step"]]
    assert by_step[20]["eval/loss"] == pytest.approx(result.eval_history[-1]["eval_loss"])
    assert "eval/loss_se" in by_step[20] and "samples" in by_step[20]
    assert got["config"]["optim"]["lr"] == c.optim.lr and got["config"]["steps"] == 20

    events = EventAccumulator(os.path.join(workdir, "tensorboard"),
                              size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "eval/loss", "eval/loss_se", "perf/tokens_per_s",
            "debug/skipped"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    texts = {t: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                 for e in events.Tensors(t)] for t in tags["tensors"]}
    [(step, samples)] = texts["samples/text_summary"]
    assert step == 20 and result.samples[0].strip()[:20] in samples
    assert '"lr"' in texts["config/text_summary"][0][1]
