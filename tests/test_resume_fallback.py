"""Resume takes the newest intact checkpoint: a truncated, altered or missing file in the newest
checkpoint, an unreadable config.json, or a latest.json naming nothing usable makes resume
(train(resume=True), fastdiff train --resume) and fastdiff.load of a run directory fall back
to the previous checkpoint with one warning line naming what was skipped and why; the resumed
run still ends on the weights of a straight run.  Only when none is intact do they stop, with
an error naming every checkpoint tried (CLI: one line, status 2)."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff.cli import main
from fastdiff.errors import CheckpointError

TINY = dict(
    preset="tiny",
    T=20,
    device="cpu",
    progress=False,
    warmup_steps=2,
    precision="fp32",
    n_samples=2,
    batch_size=8,
    log_every=2,
    checkpoint_every=2,
    lr=1e-3,
    ema_decay=0.99,
)
CLI_TINY = [
    *("--preset", "tiny", "--T", "20", "--batch-size", "8", "--n-samples", "2"),
    *("--device", "cpu", "--no-progress", "--log-every", "2", "--precision", "fp32"),
    *("--warmup-steps", "2", "--checkpoint-every", "2", "--lr-schedule", "constant"),
    *("--lr", "1e-3", "--ema-decay", "0.99"),  # the CLI's defaults differ from train()'s
]
END = 6  # resumed runs and the straight run end here


def images(n=32):
    """The training data, as a uint8 array (the same values through the API and an .npz)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread throughout: the module's reference runs were trained with one (bitwise
    comparisons need the same thread count), and tiny models run faster so."""
    threads = one_thread()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained to step 4 (checkpoints step 2 and step 4) and a straight run to END."""
    root = tmp_path_factory.mktemp("runs")
    threads = one_thread()
    try:
        fastdiff.train(images(), steps=4, out_dir=root / "base", **TINY)
        fastdiff.train(images(), steps=END, out_dir=root / "straight", **TINY)
    finally:
        torch.set_num_threads(threads)
    names = sorted(p.name for p in (root / "base" / "checkpoints").iterdir())
    assert names == [ckpt.LATEST, "step_00000002", "step_00000004"]
    return root


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """A fresh copy of the 4-step run, to damage."""
    return Path(shutil.copytree(runs / "base", tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def same_weights(a: Path, b: Path) -> bool:
    """Bitwise equality of two checkpoints' model and EMA weights."""
    for name in (ckpt.MODEL, ckpt.EMA):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


# -- ways to damage a checkpoint ---------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage(run: Path, how: str) -> None:
    newest = step_dir(run, 4)
    if how == "truncated model":
        truncate(newest / ckpt.MODEL)
    elif how == "flipped byte in ema":
        flip_byte(newest / ckpt.EMA)
    elif how == "deleted state":
        (newest / ckpt.STATE).unlink()
    elif how == "garbled config":
        truncate(newest / ckpt.CONFIG)
    elif how == "pointer to nothing":
        (run / "checkpoints" / ckpt.LATEST).write_text('{"step": 9, "path": "step_00000009"}')
    elif how == "garbled pointer":
        (run / "checkpoints" / ckpt.LATEST).write_text('{"step": 4, "pa')
    else:
        raise AssertionError(how)


# how -> (the checkpoint resume must take, [(path skipped, words of its reason)])
CASES = {
    "truncated model": (2, [("step_00000004", "model.safetensors' is truncated or altered")]),
    "flipped byte in ema": (2, [("step_00000004", "ema.safetensors' is corrupted (SHA-256")]),
    "deleted state": (2, [("step_00000004", "state.pt' is missing")]),
    "garbled config": (2, [("step_00000004", "config.json' is unreadable")]),
    "pointer to nothing": (4, [("step_00000009", "named by latest.json, does not exist")]),
    "garbled pointer": (4, [(ckpt.LATEST, "unreadable")]),
}


def fastdiff_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastdiff"]


def assert_skipped_line(line: str, run: Path, taken: int, skipped) -> None:
    """The one warning: names the checkpoint taken, and each skipped path with its reason."""
    assert line.startswith("fastdiff: resuming from "), line
    assert f"resuming from {str(step_dir(run, taken))!r}, the newest intact" in line, line
    for name, reason in skipped:
        assert f"skipped {str(run / 'checkpoints' / name)!r} (" in line or (
            f"; {str(run / 'checkpoints' / name)!r} (" in line
        ), line
        assert reason in line, line


@pytest.mark.parametrize("how", list(CASES))
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, runs, how, caplog):
    taken, skipped = CASES[how]
    damage(run, how)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.train(images(), steps=END, out_dir=run, resume=True, **TINY)
    lines = fastdiff_warnings(caplog)
    assert len(lines) == 1, lines
    assert_skipped_line(lines[0], run, taken, skipped)
    # Exact resume from the checkpoint taken: the weights of END straight steps, bitwise.
    final = ckpt.find_checkpoint(run)
    assert final == step_dir(run, END)
    assert same_weights(final, ckpt.find_checkpoint(runs / "straight"))
    # The run continued from the step taken: the redone steps were logged again, once each.
    logged = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert logged == [2, 4, 6]
    # The damaged checkpoint was replaced by an intact one when the run passed its step.
    assert ckpt.find_intact_checkpoint(run) == (final, [])
    ckpt.verify_checkpoint(step_dir(run, 4))


def test_several_skipped_are_one_line(run, runs, caplog):
    """latest.json names a missing folder and step 4 is truncated: step 2, one line naming
    both."""
    damage(run, "pointer to nothing")
    damage(run, "truncated model")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.train(images(), steps=END, out_dir=run, resume=True, **TINY)
    lines = fastdiff_warnings(caplog)
    assert len(lines) == 1, lines
    skipped = CASES["pointer to nothing"][1] + CASES["truncated model"][1]
    assert_skipped_line(lines[0], run, 2, skipped)
    assert same_weights(ckpt.find_checkpoint(run), ckpt.find_checkpoint(runs / "straight"))


def damage_both(run: Path) -> None:
    truncate(step_dir(run, 4) / ckpt.MODEL)
    flip_byte(step_dir(run, 2) / ckpt.STATE)


def listing(run: Path) -> dict:
    return {p.relative_to(run): p.stat().st_mtime_ns for p in sorted(run.rglob("*"))}


def test_no_intact_checkpoint_is_a_clear_error_naming_each(run):
    damage_both(run)
    before = listing(run)
    with pytest.raises(CheckpointError) as info:
        fastdiff.train(images(), steps=END, out_dir=run, resume=True, **TINY)
    message = str(info.value)
    assert message.startswith(f"checkpoint: no intact checkpoint in {str(run)!r}: "), message
    for step, reason in [(4, "model.safetensors' is truncated"), (2, "state.pt' is corrupted")]:
        assert f"{str(step_dir(run, step))!r} (" in message and reason in message, message
    assert listing(run) == before  # nothing trained, nothing written


def test_cli_no_intact_checkpoint_is_one_line_status_2(run, tmp_path, capsys):
    npz = tmp_path / "data.npz"
    np.savez(npz, images=images())
    damage_both(run)
    argv = ["train", "--data", str(npz), "--out", str(run), "--steps", str(END), "--resume"]
    assert main(argv + CLI_TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff: error: checkpoint: no intact"), err
    assert str(step_dir(run, 4)) in err[0] and str(step_dir(run, 2)) in err[0], err


@pytest.mark.slow
def test_cli_fallback_is_one_stderr_line_and_resumes_bitwise(run, runs, tmp_path):
    """`fastdiff train --resume` in a fresh process: exit 0, stderr is the one warning line
    (the logger's default output), and the run ends on the straight run's weights."""
    npz = tmp_path / "data.npz"
    np.savez(npz, images=images())
    damage(run, "truncated model")
    cmd = [sys.executable, "-m", "fastdiff", "train", "--data", str(npz), "--out", str(run)]
    cmd += ["--steps", str(END), "--resume", *CLI_TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert_skipped_line(lines[0], run, 2, CASES["truncated model"][1])
    assert same_weights(ckpt.find_checkpoint(run), ckpt.find_checkpoint(runs / "straight"))


def test_load_of_a_run_falls_back_but_a_checkpoint_is_loaded_strictly(run, caplog):
    newest = step_dir(run, 4)
    (newest / ckpt.STATE).unlink()  # not needed to load: the newest is still taken, silently
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert fastdiff.load(run).config["step"] == 4
    assert fastdiff_warnings(caplog) == []
    truncate(newest / ckpt.EMA)
    for path in (run, run / "checkpoints"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastdiff"):
            assert fastdiff.load(path).config["step"] == 2
        (line,) = fastdiff_warnings(caplog)
        assert line.startswith(f"fastdiff: loading {str(step_dir(run, 2))!r}"), line
        assert f"skipped {str(newest)!r} (" in line and "ema.safetensors' is truncated" in line
    with pytest.raises(CheckpointError, match="ema.safetensors' is truncated"):
        fastdiff.load(newest)  # a checkpoint named explicitly: no fallback
    truncate(step_dir(run, 2) / ckpt.MODEL)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        fastdiff.load(run)
    assert str(newest) in str(info.value) and str(step_dir(run, 2)) in str(info.value)


def test_find_intact_checkpoint_without_any_checkpoint(tmp_path):
    with pytest.raises(ckpt.NoCheckpointError, match="no checkpoint found"):
        ckpt.find_intact_checkpoint(tmp_path)
    with pytest.raises(ckpt.NoCheckpointError, match="does not exist"):
        ckpt.find_intact_checkpoint(tmp_path / "missing")
