"""Data-parallel training with 2 processes on CPU (gloo), as torchrun would launch it."""

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff
from fastdiff import checkpoint as ckpt
from fastdiff import distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1


def worker(rank, world, port, out_dir, steps, resume, result_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    d = fastdiff.train(
        data(),
        steps=steps,
        batch_size=4,
        out_dir=out_dir,
        resume=resume,
        preset="tiny",
        T=20,
        device="cpu",
        progress=False,
        log_every=2,
        checkpoint_every=2,
        n_samples=2,
        warmup_steps=2,
        precision="fp32",
    )
    torch.save(d.model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # As the fastdiff command ends: past the exit-time destructors that can abort a gloo
    # process (fastdiff.distributed.exit_process).
    distributed.exit_process(0)


def launch(out_dir, steps, result_dir, resume=False, world=2):
    mp.spawn(
        worker,
        args=(world, free_port(), str(out_dir), steps, resume, str(result_dir)),
        nprocs=world,
        join=True,
    )
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(world)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_train_one_model_and_resume_exactly(tmp_path):
    straight = launch(tmp_path / "a", 4, tmp_path)
    assert same(straight[0], straight[1]), "DDP replicas diverged"
    # Only rank 0 wrote: one metrics line per log (steps 2 and 4), one checkpoint series.
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    state = ckpt.load_train_state(ckpt.find_checkpoint(tmp_path / "a"))
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["t_generator"], state["ranks"][1]["t_generator"])
    # the default generator (dropout) too: seeded alike for the init, then per rank
    assert not torch.equal(state["ranks"][0]["torch_rng"], state["ranks"][1]["torch_rng"])

    launch(tmp_path / "b", 2, tmp_path)
    resumed = launch(tmp_path / "b", 4, tmp_path, resume=True)
    assert same(resumed[0], straight[0]), "2 steps + resume to 4 differs from 4 steps"


def test_resume_with_another_world_size_is_refused(tmp_path):
    launch(tmp_path / "run", 2, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="process"):
        fastdiff.train(
            data(),
            steps=4,
            batch_size=4,
            out_dir=tmp_path / "run",
            resume=True,
            preset="tiny",
            T=20,
            device="cpu",
            progress=False,
            precision="fp32",
        )


def test_exit_after_a_process_group_flushes_and_keeps_the_status():
    """The command's exit after multi-process training (os._exit past the exit-time C++
    destructors) still delivers buffered output and the status."""
    import subprocess
    import sys

    code = (
        "import sys; from fastdiff import distributed; distributed._joined = True;"
        " print('kept', end=''); sys.stderr.write('err'); distributed.exit_process(7)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "kept", "err")


def run_two_ranks(worker, tmp_path) -> list[str]:
    """Run ``worker(rank, 2, port, tmp_path)`` on two spawned ranks and return what each wrote
    to ``rank<r>.txt``; fail if a rank is still running after 240 s (a rank left waiting)."""
    context = mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("a rank is still waiting after rank 0 failed")
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def train_and_report(rank, world, port, result_dir, images, **kwargs):
    """This rank's train() on ``images``; writes what it raised (or "trained") to
    ``rank<r>.txt`` and exits as the fastdiff command does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        fastdiff.train(images, batch_size=4, preset="tiny", T=20, device="cpu", progress=False,
                       precision="fp32", **kwargs)  # fmt: skip
        said = "trained"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        said = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(said)
    distributed.exit_process(0)


def failing_setup_worker(rank, world, port, result_dir):
    """Rank 0's FID monitor refuses a Dataset (fid_every needs images)."""
    train_and_report(rank, world, port, result_dir, torch.utils.data.TensorDataset(data()),
                     steps=2, fid_every=1)  # fmt: skip


def failing_grid_worker(rank, world, port, result_dir):
    """Rank 0's sample grid of step 2 cannot be written (a full disk)."""
    import errno

    from fastdiff import training

    def no_space(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    training._Run._save_grid = no_space
    train_and_report(rank, world, port, result_dir, data(), steps=4, sample_every=2,
                     checkpoint_every=2, out_dir=os.path.join(result_dir, "run"))  # fmt: skip


def test_a_failed_grid_on_rank_0_stops_every_rank_before_that_steps_save(tmp_path):
    """The ranks agree on rank 0's grid (and FID) outcome right after it, on the host group:
    every rank raises at step 2 and no checkpoint of step 2 is written.  (Agreed only at the
    next step, step 2 would be saved first; and on GPUs the other ranks would wait for a long
    grid or FID in the next step's NCCL all-reduce, whose watchdog aborts after 10 minutes.)"""
    said = run_two_ranks(failing_grid_worker, tmp_path)
    for text in said:
        assert text.startswith("OutputError:") and "No space left" in text, text
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()


def test_a_set_up_failure_on_rank_0_alone_stops_every_rank(tmp_path):
    """Without the agreement, rank 1 would wait in DDP's first broadcast for a rank 0 that
    has already failed (until the NCCL timeout on GPUs)."""
    rank0, rank1 = run_two_ranks(failing_setup_worker, tmp_path)
    assert rank0.startswith("DataError: fid_every"), rank0
    assert rank1.startswith("FastDiffError: rank 0 failed while setting up the run (DataError"), (
        rank1
    )
