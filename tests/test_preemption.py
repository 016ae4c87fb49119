"""Preemption and failed writes: SIGTERM/SIGINT finish the step, save it and exit 143/130;
resuming gives the weights of an uninterrupted run; a full disk, a read-only file system or
an --out that is a file is one line and status 2, with the last good checkpoint intact."""

import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import save_fake_inception, write_npz
from safetensors.torch import load_file

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff import training
from fastdiff.cli import main
from fastdiff.errors import CheckpointError, OutputError
from fastdiff.preemption import StopSignals, TrainingInterrupted

# ---------------------------------------------------------------------------------------------
# in-process: the API

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
    checkpoint_every=1000,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Train in-process with one thread, as the subprocesses do (ENV below): the same numerics,
    and tiny models run faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data(n=32):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1


def same_weights(a: Path, b: Path) -> bool:
    """Bitwise equality of two checkpoints' model and EMA weights."""
    for name in (ckpt.MODEL, ckpt.EMA):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def latest(out: Path) -> dict:
    return json.loads((out / "checkpoints" / ckpt.LATEST).read_text())


def kill_self_at(step, signum=signal.SIGTERM):
    """An on_log callback that signals this process once ``step`` has been logged."""
    # Handlers exist only in the main thread; elsewhere the signal would kill the test run.
    assert threading.current_thread() is threading.main_thread()

    def on_log(record):
        if record["step"] == step:
            os.kill(os.getpid(), signum)

    return on_log


def test_stop_signals_records_and_restores_handlers(capfd):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.installed and stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: recorded as waiting, not raised
        assert stop.received == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert "already stopping" in capfd.readouterr().err

    seen = []
    thread = threading.Thread(target=lambda: seen.append(StopSignals().__enter__().installed))
    thread.start()
    thread.join()
    assert seen == [False]  # handlers belong to the main thread; elsewhere nothing changes


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_api_stops_after_the_step_saves_it_and_resumes_exactly(tmp_path, signum):
    a, b = tmp_path / "a", tmp_path / "b"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        fastdiff.train(data(), steps=1000, out_dir=b, on_log=kill_self_at(4, signum), **TINY)
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt)
    assert (stop.signum, stop.step, stop.exit_status) == (signum, 4, 128 + signum)
    assert stop.checkpoint == b / "checkpoints" / "step_00000004" == ckpt.find_checkpoint(b)
    assert latest(b)["step"] == 4 and logged_steps(b)[-1] == 4
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers

    fastdiff.train(data(), steps=7, out_dir=b, resume=True, **TINY)
    fastdiff.train(data(), steps=7, out_dir=a, **TINY)
    assert same_weights(ckpt.find_checkpoint(a), ckpt.find_checkpoint(b))
    assert logged_steps(b) == logged_steps(a) == [2, 4, 6, 7]


def test_stop_between_log_steps_logs_the_saved_step(tmp_path):
    """With log_every=2, a stop after step 3 logs the partial window, so the log ends there."""

    real_step = training._Run.train_step

    def step_and_signal(self):
        real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training._Run, "train_step", step_and_signal)
        with pytest.raises(TrainingInterrupted) as info:
            fastdiff.train(data(), steps=1000, out_dir=tmp_path, **TINY)
    assert info.value.step == 3 and latest(tmp_path)["step"] == 3
    assert logged_steps(tmp_path) == [2, 3]


def test_a_stop_skips_its_steps_grid_and_fid_and_saves_at_once(tmp_path, monkeypatch):
    """A signal during step 3 of a run with a grid and an FID every step: steps 1 and 2 have
    both, step 3 is saved without them (they could outlast the grace before SIGKILL)."""
    from fastdiff import inception

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(inception.ENV_PATH, str(save_fake_inception(tmp_path / "net.pt")))
    real_step = training._Run.train_step

    def step_and_signal(self):
        real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training._Run, "train_step", step_and_signal)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        fastdiff.train(data(), steps=1000, out_dir=out, sample_every=1, fid_every=1,
                       fid_samples=2, **{**TINY, "T": 2})  # fmt: skip
    assert info.value.step == 3 and latest(out)["step"] == 3
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_00000001.png",
        "step_00000002.png",
    ]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "fid" in r] == [1, 2]


def test_second_signal_while_saving_waits_for_the_save(tmp_path, monkeypatch, capfd):
    real_write = ckpt._write_file

    def write_then_signal(path, data):
        if path.name == ckpt.EMA:  # half-way through the checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", write_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        fastdiff.train(data(), steps=1000, out_dir=tmp_path, on_log=kill_self_at(2), **TINY)
    assert info.value.signum == signal.SIGTERM and info.value.step == 2  # the first signal
    directory = ckpt.find_checkpoint(tmp_path)
    config = ckpt.read_config(directory)
    ckpt.verify_files(directory, config, list(config["files"]))  # complete, not half-written
    assert fastdiff.load(tmp_path).config["step"] == 2
    assert "already stopping" in capfd.readouterr().err


def test_checkpoint_minutes_saves_by_wall_clock(tmp_path, monkeypatch):
    """A fake clock advancing 1 minute per reading: with checkpoint_minutes=2.5 a checkpoint
    falls due every third reading after the last save (one reading per step, one per save)."""
    minutes = iter(range(10**6))
    monkeypatch.setattr(training, "_clock", lambda: 60.0 * next(minutes))
    saves = []
    real_save = ckpt.save_run_checkpoint

    def record_save(out, step, **kw):
        saves.append(step)
        return real_save(out, step, **kw)

    monkeypatch.setattr(ckpt, "save_run_checkpoint", record_save)
    fastdiff.train(data(), steps=9, out_dir=tmp_path, checkpoint_minutes=2.5, **TINY)
    # clock: 0 at the start; steps 1, 2 read 1, 2; step 3 reads 3 (>= 2.5: save, reset to 4);
    # steps 4, 5 read 5, 6; step 6 reads 7 (save at 8); ... ; step 9 saves as the last step.
    assert saves == [3, 6, 9]
    monkeypatch.setattr(training, "_clock", lambda: 0.0)
    saves.clear()
    fastdiff.train(data(), steps=3, out_dir=tmp_path / "off", checkpoint_minutes=0, **TINY)
    assert saves == [3]
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        fastdiff.train(data(), steps=3, checkpoint_minutes=-1, **TINY)


def test_resume_without_a_checkpoint_starts_fresh_with_a_notice(tmp_path, caplog):
    out = tmp_path / "new"
    with caplog.at_level("WARNING", logger="fastdiff"):
        fastdiff.train(data(), steps=2, out_dir=out, resume=True, **TINY)
    notices = [r.getMessage() for r in caplog.records if r.name == "fastdiff"]
    assert len(notices) == 1 and "no checkpoint" in notices[0] and str(out) in notices[0]
    assert latest(out)["step"] == 2
    # Something checkpoint-like but unusable is refused, not silently restarted.
    damaged = tmp_path / "damaged"
    (damaged / "checkpoints").mkdir(parents=True)
    (damaged / "checkpoints" / ckpt.LATEST).write_text('{"step": 4, "path": "step_00000004"}')
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        fastdiff.train(data(), steps=2, out_dir=damaged, resume=True, **TINY)


def test_resume_drops_metrics_of_steps_redone(tmp_path):
    """A run killed after its last checkpoint logged steps that the resume trains again."""
    fastdiff.train(data(), steps=4, out_dir=tmp_path, **TINY)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 8, "lo')  # torn line
    fastdiff.train(data(), steps=8, out_dir=tmp_path, resume=True, **TINY)
    assert logged_steps(tmp_path) == [2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------
# failed writes: one line, status 2, the last good checkpoint intact

CLI_TINY = [
    *("--preset", "tiny", "--T", "20", "--batch-size", "8", "--n-samples", "2"),
    *("--device", "cpu", "--no-progress", "--log-every", "1", "--precision", "fp32"),
    *("--warmup-steps", "2"),
    # These tests stop a run of --steps 10**6 and resume it to fewer steps, so they compare
    # with a straight run under a constant lr: the cosine schedule depends on --steps
    # (tests/test_lr_schedule.py resumes a cosine run with unchanged --steps).
    *("--lr-schedule", "constant"),
]


@pytest.fixture
def npz(tmp_path):
    return write_npz(tmp_path / "data.npz", 64)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdiff: error: "), err
    return err[0]


def train_cli(npz, out, steps, *extra):
    return main(["train", "--data", str(npz), "--out", str(out), "--steps", str(steps)]
                + CLI_TINY + list(extra))  # fmt: skip


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EACCES, errno.EROFS], ids=["ENOSPC", "EACCES", "EROFS"]
)
def test_failed_checkpoint_write_is_one_line_and_keeps_the_last_good(
    tmp_path, npz, monkeypatch, capsys, code
):
    out = tmp_path / "run"
    assert train_cli(npz, out, 2, "--checkpoint-every", "2") == 0
    capsys.readouterr()
    pointer = (out / "checkpoints" / ckpt.LATEST).read_bytes()
    real_write = ckpt._write_file

    def fail_part_way(path, data):
        if path.name == ckpt.EMA:  # after model.safetensors was written
            raise OSError(code, os.strerror(code), str(path))
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", fail_part_way)
    assert train_cli(npz, out, 4, "--checkpoint-every", "2", "--resume") == 2
    line = one_error_line(capsys)
    assert str(out / "checkpoints" / "step_00000004") in line and os.strerror(code) in line
    assert str(out / "checkpoints" / "step_00000002") in line  # names the checkpoint kept
    monkeypatch.undo()
    assert (out / "checkpoints" / ckpt.LATEST).read_bytes() == pointer
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        ckpt.LATEST,
        "step_00000002",
    ]  # no temporary directory left behind
    assert fastdiff.load(out).config["step"] == 2


def test_failed_pointer_update_keeps_the_last_good(tmp_path, monkeypatch):
    fastdiff.train(data(), steps=2, out_dir=tmp_path, **TINY)
    real_atomic = ckpt.atomic_write_bytes

    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "atomic_write_bytes", no_space)
    with pytest.raises(OutputError, match="No space left") as info:
        fastdiff.train(data(), steps=4, out_dir=tmp_path, resume=True, **TINY)
    assert info.value.errno == errno.ENOSPC and ckpt.LATEST in str(info.value)
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real_atomic)
    assert latest(tmp_path)["step"] == 2
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()  # unreferenced: removed
    assert fastdiff.load(tmp_path).config["step"] == 2


def test_out_that_is_a_file_or_under_one(tmp_path, npz, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert train_cli(npz, a_file, 2) == 2
    line = one_error_line(capsys)
    assert str(a_file) in line and "not a directory" in line
    assert train_cli(npz, a_file / "run", 2) == 2
    line = one_error_line(capsys)
    assert str(a_file / "run") in line and "cannot create output directory" in line
    assert a_file.read_text() == "keep me"


def test_unwritable_metrics_log_is_one_line_before_any_step(tmp_path, npz, capsys):
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)  # a real OS error, even as root
    assert train_cli(npz, out, 2) == 2
    line = one_error_line(capsys)
    assert str(out / "metrics.jsonl") in line and "Is a directory" in line
    assert not (out / "checkpoints").exists()


def test_failed_grid_write_is_one_line(tmp_path, npz, capsys):
    out = tmp_path / "run"
    (out / "samples.png").mkdir(parents=True)
    assert train_cli(npz, out, 2) == 2
    line = one_error_line(capsys)
    assert "sample grid" in line and str(out / "samples.png") in line
    assert latest(out)["step"] == 2  # the final checkpoint was written before the grid


# ---------------------------------------------------------------------------------------------
# subprocesses: `fastdiff train` signalled as a scheduler would

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # 1 thread: fast on a busy 2-core machine
STOP_LINE = re.compile(
    r"fastdiff: training stopped by (SIG\w+) after step (\d+); checkpoint saved to '([^']+)';"
    r" resume with: (.+)$"
)


def start_train(npz, out, steps, *extra, env=None):
    cmd = [sys.executable, "-m", "fastdiff", "train", "--data", str(npz), "--out", str(out)]
    cmd += ["--steps", str(steps), "--checkpoint-every", "1000", *CLI_TINY, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV
    )


def wait_for_logged_step(proc, out: Path, step: int) -> None:
    """Block until metrics.jsonl reaches ``step`` (the run must still be going).  The deadline
    only keeps a hung child from hanging the suite; it is no measure of speed."""
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (path.is_file() and len(path.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.communicate()[1]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} logged in 10 minutes: {proc.communicate()[1]}")
        time.sleep(0.01)


def finish(proc, timeout=600):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


def resume_args(line_command: str, steps: int) -> list[str]:
    """The arguments of the printed resume command, with --steps replaced."""
    args = shlex.split(line_command)
    assert args[0] == "fastdiff" and args[-1] == "--resume"
    args[args.index("--steps") + 1] = str(steps)
    return args[1:]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_saves_the_step_and_resume_is_bitwise(tmp_path, npz, signum):
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = start_train(npz, run, 10**6)
    wait_for_logged_step(proc, run, 3)
    proc.send_signal(signum)
    status, stderr = finish(proc)
    assert status == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    match = STOP_LINE.match(lines[0])
    assert match and match[1] == signal.Signals(signum).name, lines[0]
    step = int(match[2])
    assert step >= 3 and logged_steps(run)[-1] == step == latest(run)["step"]
    assert Path(match[3]) == run / "checkpoints" / f"step_{step:08d}"
    assert fastdiff.load(run).config["step"] == step

    end = step + 3  # resumed and straight in-process (saves two interpreter starts)
    assert main(resume_args(match[4], end)) == 0
    assert train_cli(npz, straight, end, "--checkpoint-every", "1000") == 0
    assert logged_steps(run) == list(range(1, end + 1))
    assert same_weights(ckpt.find_checkpoint(run), ckpt.find_checkpoint(straight))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(npz, out, steps, *extra, world=2):
    """`world` processes as torchrun would start them (RANK, WORLD_SIZE, MASTER_* set)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(start_train(npz, out, steps, *extra, env=env))
    return procs


def stop_ranks(npz, run, signalled) -> int:
    """Start 2 ranks, SIGTERM the ``signalled`` ones after step 2; check that both exit 143
    and rank 0 alone prints the line; return the step saved."""
    procs = start_ranks(npz, run, 10**6)
    wait_for_logged_step(procs[0], run, 2)
    for rank in signalled:
        procs[rank].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    assert [status for status, _ in results] == [143, 143], results
    lines = [line for line in results[0][1].splitlines() if line.startswith("fastdiff")]
    assert len(lines) == 1 and "Traceback" not in results[0][1], results[0][1]
    assert "fastdiff" not in results[1][1] and "Traceback" not in results[1][1], results[1][1]
    match = STOP_LINE.match(lines[0])
    assert match and "2 processes" in match[4], lines[0]
    step = int(match[2])
    assert logged_steps(run)[-1] == step == latest(run)["step"]
    state = ckpt.load_train_state(ckpt.find_checkpoint(run))
    assert state["step"] == step and len(state["ranks"]) == 2
    return step


@pytest.mark.slow
def test_two_gloo_ranks_signalled_by_a_scheduler_stop_together_and_resume_bitwise(tmp_path, npz):
    """A scheduler signals every rank (at slightly different moments): all ranks stop after
    the same step, rank 0 saves it, and 2 ranks resume it to the weights of a straight run."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    step = stop_ranks(npz, run, signalled=(0, 1))
    end = step + 2
    both = start_ranks(npz, run, end, "--resume") + start_ranks(npz, straight, end)
    assert [finish(p)[0] for p in both] == [0, 0, 0, 0]
    assert same_weights(ckpt.find_checkpoint(run), ckpt.find_checkpoint(straight))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank(tmp_path, npz):
    """Rank 0 never sees the signal; the per-step agreement stops it at rank 1's step."""
    step = stop_ranks(npz, tmp_path / "run", signalled=(1,))
    assert fastdiff.load(tmp_path / "run").config["step"] == step


def test_resume_after_a_stop_whose_checkpoint_was_damaged_takes_the_one_before(tmp_path, caplog):
    """A run stopped by SIGTERM at step 4 (checkpoints 2 and 4); the stop's checkpoint is then
    truncated (the disk, a copy): resume warns once, takes step 2 and still ends on the weights
    of a straight run."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(TINY, checkpoint_every=2)
    with pytest.raises(TrainingInterrupted) as info:
        fastdiff.train(data(), steps=1000, out_dir=b, on_log=kill_self_at(4), **kw)
    stop = info.value.checkpoint
    assert stop == b / "checkpoints" / "step_00000004"
    state = stop / ckpt.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="fastdiff"):
        fastdiff.train(data(), steps=7, out_dir=b, resume=True, **kw)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fastdiff"]
    assert f"resuming from {str(b / 'checkpoints' / 'step_00000002')!r}" in line, line
    assert f"skipped {str(stop)!r}" in line and "state.pt' is truncated" in line, line
    fastdiff.train(data(), steps=7, out_dir=a, **kw)
    assert same_weights(ckpt.find_checkpoint(a), ckpt.find_checkpoint(b))
    assert logged_steps(b) == logged_steps(a) == [2, 4, 6, 7]
