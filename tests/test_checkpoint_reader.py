"""One reader of a run's checkpoints behind resume, inference and export (mdm_jax.checkpoint):
the same step choice, the same messages, the same fallback past (or refusal of) a damaged step."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import pytest
from conftest import nano_config

from mdm_jax.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings, read_step
from mdm_jax.errors import UserError
from mdm_jax.export.source import CheckpointParams
from mdm_jax.export.tensor_io import ExportError
from mdm_jax.export.writer import export
from mdm_jax.inference import LoadError, load
from mdm_jax.trainer import Trainer, resolved_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, abstract train state): checkpoints 2 and 4 of a nano model, no data position."""
    c = nano_config(workdir=str(tmp_path_factory.mktemp("reader") / "run"))
    trainer = Trainer(c)
    ckpt = Checkpointer(c.workdir)
    for step in (2, 4):
        ckpt.save(step, trainer.create_state(seed=step), None, resolved_config(c, trainer),
                  force=True)
    ckpt.close()
    return c.workdir, abstract_with_shardings(trainer.abstract_state, trainer.state_sharding)


def _copy(run, tmp_path, damage: str | None = None) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    if damage == "layout":  # step 4's array layout is gone: found when the step is opened
        os.remove(f"{workdir}/checkpoints/4/state/_METADATA")
    elif damage == "bytes":  # every byte of step 4's arrays changed: found when they are read
        for path in glob.glob(f"{workdir}/checkpoints/4/state/ocdbt.process_*/d/*"):
            data = open(path, "rb").read()
            open(path, "wb").write(bytes(b ^ 0xFF for b in data))
    return workdir


def _resume(workdir: str, target) -> int | None:
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.restore_latest(target)[1]
    finally:
        ckpt.close()


def _message(call, kind) -> str:
    with pytest.raises(kind) as e:
        call()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return re.sub(r" \(.*\);", " (...);", str(e.value))  # the cause differs from path to path


def test_an_unknown_step_gets_one_message_on_every_path(run, tmp_path):
    workdir = run[0]
    expected = (f"no checkpoint for step 7 under {workdir}/checkpoints; available: 2, 4: pass "
                f"one of them as --step")
    assert _message(lambda: read_step(workdir, 7), CheckpointError) == expected
    assert _message(lambda: load(workdir, step=7), LoadError) == expected
    assert _message(lambda: export(workdir, "litgpt", str(tmp_path / "x"), step=7),
                    ExportError) == expected
    assert not os.path.exists(tmp_path / "x")
    nowhere = str(tmp_path / "nowhere")
    missing = {_message(lambda: read_step(nowhere), CheckpointError),
               _message(lambda: load(nowhere), LoadError),
               _message(lambda: CheckpointParams(nowhere), ExportError)}
    assert len(missing) == 1 and "no checkpoint under" in missing.pop()
    assert not os.path.exists(nowhere)


@pytest.mark.parametrize("damage", ["layout", "bytes"])
def test_each_path_falls_back_past_a_damaged_step_or_refuses_it_when_named(run, tmp_path,
                                                                           caplog, damage):
    workdir = _copy(run, tmp_path, damage)
    refusal = (f"checkpoint 4 under {workdir}/checkpoints is damaged (...); the other "
               f"checkpoints are 2: pass --step 2")
    # Named: refused, the same words on every path, nothing falls back.
    assert _message(lambda: read_step(workdir, 4, lambda r: r.params()),
                    CheckpointError) == refusal
    assert _message(lambda: load(workdir, step=4), LoadError) == refusal
    assert _message(lambda: export(workdir, "litgpt", str(tmp_path / "x"), step=4),
                    ExportError) == refusal
    assert not os.path.exists(tmp_path / "x")
    # Not named: the newest step that reads, after the same warning on every path.
    warning = (f"checkpoint 4 under {workdir}/checkpoints is damaged and was skipped (...); "
               f"trying the previous one")

    def warned(call):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mdm_jax"):
            out = call()
        damaged = [re.sub(r" \(.*\);", " (...);", r.getMessage()) for r in caplog.records
                   if "is damaged" in r.getMessage()]
        assert damaged == [warning]
        return out

    assert warned(lambda: load(workdir)).step == 2
    if damage == "layout":  # export chooses its step once, on opening
        assert warned(lambda: CheckpointParams(workdir)).step == 2
    else:  # found after tensors were written from step 4: refused, never mixed with step 2
        assert _message(lambda: export(workdir, "litgpt", str(tmp_path / "x")),
                        ExportError) == refusal
        assert not os.path.exists(tmp_path / "x")
    assert warned(lambda: _resume(workdir, run[1])) == 2
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("4-")
    assert _resume(workdir, run[1]) == 2  # set aside: no warning the second time


def _snapshot(root: str) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (
                st.st_mtime_ns, st.st_size, st.st_mode)
    return out


def test_export_reads_a_read_only_copy_and_writes_nothing_there(run, tmp_path, monkeypatch,
                                                               caplog):
    pytest.importorskip("torch")
    workdir = _copy(run, tmp_path, "layout")  # and falls back past the damaged step there
    opened = []
    original = Checkpointer.__init__

    def spy(self, *args, **kwargs):
        opened.append(kwargs.get("read_only", False))
        original(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "__init__", spy)
    for folder, dirs, files in os.walk(workdir):
        for name in [*dirs, *files, "."]:
            os.chmod(os.path.join(folder, name), 0o555 if name in [*dirs, "."] else 0o444)
    before = _snapshot(workdir)  # root may write despite the modes: compare instead
    try:
        with caplog.at_level("WARNING", logger="mdm_jax"):
            export(workdir, "litgpt", str(tmp_path / "lit"))
        after = _snapshot(workdir)
    finally:
        for folder, _, _ in os.walk(workdir):
            os.chmod(folder, 0o755)
    assert opened == [True]  # the checkpoints were opened read-only...
    assert after == before  # ...and nothing in them was written, made or removed
    assert json.loads((tmp_path / "lit" / "mdm_jax.json").read_text())["step"] == 2
    assert "checkpoint 4 under" in caplog.text
