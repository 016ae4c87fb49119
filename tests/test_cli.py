"""The fastdiff command line, end to end on a tiny config, and its one-line errors."""

import functools
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fastdiff.cli import main

TINY = [
    "--preset",
    "tiny",
    "--steps",
    "3",
    "--T",
    "20",
    "--batch-size",
    "4",
    "--n-samples",
    "4",
    "--device",
    "cpu",
    "--no-progress",
    "--log-every",
    "1",
]


def test_train_then_sample(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--out", str(out), *TINY]) == 0
    assert (out / "samples.png").is_file() and (out / "metrics.jsonl").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    more = [a if a != "3" else "5" for a in TINY]  # --steps 5
    assert main(["train", "--data", str(npz), "--out", str(out), "--resume", *more]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    png = tmp_path / "grid.png"
    assert main(["sample", str(out), "-n", "6", "--out", str(png), "--no-progress"]) == 0
    assert Image.open(png).size[0] > 8
    arr = tmp_path / "x.npz"
    ddim = ["--sampler", "ddim", "--steps", "5", "--no-progress"]
    assert main(["sample", str(out), "-n", "3", "--out", str(arr), *ddim]) == 0
    images = np.load(arr)["images"]
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.uint8
    assert main(["eval", str(out), "--data", str(npz), "-n", "4", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and result["bits_per_dim"] > 0


def test_python_dash_m_and_help(capsys):
    """``python -m fastdiff`` is the command (one child process); every subcommand's help."""
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0 and "usage: fastdiff" in proc.stdout
    for args in (["train", "--help"], ["sample", "--help"], ["eval", "--help"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0 and "usage: fastdiff" in capsys.readouterr().out


def run_cli(*args):
    """``python -m fastdiff ARGS`` in a child process (exit status and stderr as a user sees
    them: no traceback)."""
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True)


def main_in_process(capsys, *args):
    """main(ARGS) in this process, as a CompletedProcess-like (returncode, stderr): the same
    error path as the command, without a child's torch import."""
    capsys.readouterr()
    code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(run_cli("sample", str(tmp_path / "missing")), "does not exist")
    run = functools.partial(main_in_process, capsys)
    assert_one_line_error(run("train", "--data", str(tmp_path / "nope"), *TINY), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("train", "--data", str(empty), *TINY), "no images")
    nan = tmp_path / "nan.npz"
    np.savez(nan, images=np.full((4, 1, 8, 8), np.nan, dtype=np.float32))
    assert_one_line_error(run("train", "--data", str(nan), *TINY), "NaN")
    assert_one_line_error(run("train", "--steps", "-5", "--no-progress"), "steps")


def test_wrong_channel_count_on_resume(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--out", str(out), *TINY]) == 0
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((8, 3, 8, 8), dtype=np.uint8))
    proc = main_in_process(
        capsys, "train", "--data", str(rgb), "--out", str(out), "--resume", *TINY
    )
    assert_one_line_error(proc, "checkpoint")


def test_sample_with_dpm_solver(tmp_path, capsys):
    """fastdiff sample --sampler dpm++2m --steps N writes what fastdiff.sample draws."""
    import torch

    import fastdiff
    from fastdiff.images import to_uint8
    from fastdiff.training import model_for_data

    torch.manual_seed(0)
    model = model_for_data((1, 8, 8), "tiny")
    ckpt = fastdiff.Diffusion(model, fastdiff.NoiseSchedule.linear(20), (1, 8, 8)).save(
        tmp_path / "ckpt"
    )
    arr = tmp_path / "x.npz"
    dpm = ["--sampler", "dpm++2m", "--steps", "5", "--device", "cpu", "--no-progress"]
    assert main(["sample", str(ckpt), "-n", "2", "--out", str(arr), *dpm]) == 0
    want = fastdiff.sample(ckpt, 2, seed=0, sampler="dpm++2m", steps=5, device="cpu")
    assert np.array_equal(np.load(arr)["images"], to_uint8(want).numpy())
    bad = main_in_process(
        capsys, "sample", str(ckpt), "--sampler", "dpm++2m", "--steps", "20", "--device", "cpu"
    )
    assert_one_line_error(bad, "steps: dpm++2m takes at most T-1=19")
