"""Checkpoints on disk: safetensors weights, a JSON config, the resumable training state.

A checkpoint is a directory::

    model.safetensors   the trained weights
    ema.safetensors     their exponential moving average (what sampling uses by default)
    config.json         model class + constructor config, schedule, training config, step,
                        and the size and SHA-256 of every other file (truncation is detected)
    state.pt            optional: optimizer, grad scaler, RNG states, data order (resume)

Runs keep them under ``<out>/checkpoints/step_XXXXXXXX`` with a ``latest.json`` pointer.
Writes are atomic: files go to a temporary sibling directory, are fsynced, and the directory
is renamed into place (and the parent directory fsynced); then ``latest.json`` is replaced
(temp file + os.replace).  A run killed at any moment leaves the previous checkpoint intact and
pointed to; a write that fails (no space, permission denied, read-only file system) raises
:class:`~fastdiff.errors.OutputError` naming the checkpoint and the cause, and leaves
``latest.json`` pointing to the previous checkpoint.

Reading back, :func:`find_intact_checkpoint` takes the newest checkpoint that verifies
(latest.json's first, then the other ``step_*`` folders, newest first): a truncated, altered
or missing file, an unreadable config.json or a latest.json naming nothing usable makes it fall
back to the previous checkpoint, reporting what it skipped and why; only when none is intact
does it raise, naming each.  Resume and ``fastdiff.load`` of a run directory use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic import atomic_write_bytes, default_mode, fsync_directory
from .errors import CheckpointError, OutputError

FORMAT_VERSION = 1
CONFIG, MODEL, EMA, STATE = "config.json", "model.safetensors", "ema.safetensors", "state.pt"
LATEST = "latest.json"
CHECKPOINTS_DIR = "checkpoints"

logger = logging.getLogger("fastdiff")


class NoCheckpointError(CheckpointError):
    """The path holds no checkpoint at all (no config.json, latest.json or step_* folder)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> dict:
    """Write and fsync ``data``; return the size and SHA-256 that config.json records."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _weights(module_state: dict) -> dict:
    """A state_dict as contiguous CPU tensors that safetensors accepts (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module_state.items()}


def write_checkpoint(
    directory: str | Path,
    *,
    model_state: dict,
    ema_state: dict | None,
    config: dict,
    train_state: dict | None = None,
) -> Path:
    """Atomically create the checkpoint directory ``directory`` (replacing an old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        os.chmod(tmp, default_mode(directory=True))
        files = {MODEL: _write_file(tmp / MODEL, save(_weights(model_state)))}
        if ema_state is not None:
            files[EMA] = _write_file(tmp / EMA, save(_weights(ema_state)))
        if train_state is not None:
            buf = io.BytesIO()
            torch.save(train_state, buf)
            files[STATE] = _write_file(tmp / STATE, buf.getvalue())
        meta = dict(config, format_version=FORMAT_VERSION, files=files)
        _write_file(tmp / CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        fsync_directory(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_run_checkpoint(out_dir: str | Path, step: int, keep: int = 2, **contents) -> Path:
    """Write ``<out>/checkpoints/step_<step>``, point latest.json at it, keep the last ``keep``.

    An OSError while writing becomes an :class:`OutputError` naming the checkpoint, the cause
    and the last good checkpoint, which latest.json still points to (nothing of the failed
    write is left behind).
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    target = root / f"step_{step:08d}"
    try:
        path = write_checkpoint(target, **contents)
    except OSError as exc:
        raise OutputError.wrap("checkpoint", target, exc, _latest_note(root)) from exc
    try:
        atomic_write_bytes(root / LATEST, json.dumps({"step": step, "path": path.name}).encode())
    except OSError as exc:
        if _pointed_to(root) != path.name:  # unreferenced: free its space, keep one truth
            shutil.rmtree(path, ignore_errors=True)
        raise OutputError.wrap(
            "checkpoint pointer", root / LATEST, exc, _latest_note(root)
        ) from exc
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _pointed_to(root: Path) -> str | None:
    try:
        return json.loads((root / LATEST).read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _latest_note(root: Path) -> str:
    """Which checkpoint a run still resumes from, for error messages (verified: this is the
    error path, where hashing the files once costs nothing that matters)."""
    try:
        return f"the last good checkpoint, {str(find_intact_checkpoint(root)[0])!r}, is intact"
    except NoCheckpointError:
        return "no earlier checkpoint exists"
    except CheckpointError:
        return "no earlier checkpoint is intact"


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: a checkpoint itself, a checkpoints folder
    (its latest.json, else its newest step), or a run's output directory containing one.
    Nothing is verified here: :func:`find_intact_checkpoint` also checks the files and falls
    back to an older checkpoint."""
    path = Path(path)
    if not path.exists():
        raise NoCheckpointError(f"checkpoint: {str(path)!r} does not exist")
    if (path / CONFIG).is_file():
        return path
    for root in (path, path / CHECKPOINTS_DIR):
        pointer = root / LATEST
        if pointer.is_file():
            try:
                target = root / json.loads(pointer.read_text())["path"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint: {str(pointer)!r} is unreadable") from exc
            if (target / CONFIG).is_file():
                return target
        steps = sorted(p for p in root.glob("step_*") if (p / CONFIG).is_file())
        if steps:
            return steps[-1]
    # Nothing checkpoint-like at all (resume may start afresh) vs. a damaged run (refuse).
    traces = [p for root in (path, path / CHECKPOINTS_DIR) for p in root.glob("step_*")]
    traces += [root / LATEST for root in (path, path / CHECKPOINTS_DIR) if (root / LATEST).exists()]
    kind = CheckpointError if traces else NoCheckpointError
    raise kind(
        f"checkpoint: no checkpoint found in {str(path)!r} (expected {CONFIG}, {LATEST} or"
        f" {CHECKPOINTS_DIR}/)"
    )


def find_intact_checkpoint(path: str | Path, only=None) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest intact checkpoint that ``path`` names, and those skipped on the way.

    ``path`` is a checkpoint directory (strict: it is verified and returned, or its
    CheckpointError raised), a ``checkpoints/`` folder or a run's output directory.  There the
    candidates are latest.json's target first, then the other ``step_*`` folders, newest
    first; each is verified (:func:`verify_checkpoint`: config.json readable, every file it
    lists -- or those of ``only`` -- with its recorded size and SHA-256) and the first that
    passes is returned with ``skipped``: ``(path, reason)`` for every candidate that failed
    before it, and for a latest.json that is unreadable or names a missing folder.

    Raises NoCheckpointError when ``path`` holds nothing checkpoint-like (no config.json,
    latest.json or ``step_*`` folder), CheckpointError naming every candidate and why it
    failed when none is intact.
    """
    path = Path(path)
    if not path.exists():
        raise NoCheckpointError(f"checkpoint: {str(path)!r} does not exist")
    if (path / CONFIG).is_file():
        verify_checkpoint(path, only)
        return path, []
    roots = [r for r in (path, path / CHECKPOINTS_DIR) if (r / LATEST).exists() or _steps(r)]
    if not roots:
        raise NoCheckpointError(
            f"checkpoint: no checkpoint found in {str(path)!r} (expected {CONFIG}, {LATEST} or"
            f" {CHECKPOINTS_DIR}/)"
        )
    candidates, skipped = _candidates(roots[0])
    for directory in candidates:
        try:
            verify_checkpoint(directory, only)
        except CheckpointError as exc:
            skipped.append((directory, _reason(exc)))
            continue
        return directory, skipped
    failures = "; ".join(f"{str(p)!r} ({why})" for p, why in skipped)
    if not candidates:  # only a latest.json, naming nothing usable
        raise CheckpointError(
            f"checkpoint: no checkpoint found in {str(path)!r} (expected {CONFIG}, {LATEST} or"
            f" {CHECKPOINTS_DIR}/): {failures}"
        )
    raise CheckpointError(f"checkpoint: no intact checkpoint in {str(path)!r}: {failures}")


def log_skipped(action: str, directory: Path, skipped: list[tuple[Path, str]]) -> None:
    """Where ``skipped`` is not empty, one warning (logger "fastdiff"): ``fastdiff: <action>
    <directory>, the newest intact checkpoint; skipped <path> (<reason>); ...``."""
    if skipped:
        what = "; ".join(f"{str(p)!r} ({why})" for p, why in skipped)
        logger.warning(
            f"fastdiff: {action} {str(directory)!r}, the newest intact checkpoint; skipped {what}"
        )


def _steps(root: Path) -> list[Path]:
    """The ``step_*`` folders of ``root``, newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def _candidates(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Checkpoint folders to try in order (latest.json's target first), and pointer faults."""
    order, skipped = [], []
    pointer = root / LATEST
    if pointer.exists():
        try:
            name = json.loads(pointer.read_text())["path"]
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ValueError(name)
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append((pointer, "unreadable"))
        else:
            if (root / name).is_dir():
                order.append(root / name)
            else:
                skipped.append((root / name, f"named by {LATEST}, does not exist"))
    order += [p for p in _steps(root) if p not in order]
    return order, skipped


def _reason(exc: CheckpointError) -> str:
    return str(exc).removeprefix("checkpoint: ")


def verify_checkpoint(directory: Path, only=None) -> dict:
    """Read ``directory``'s config.json and check the files it lists (those named in
    ``only``, if given; model.safetensors must be listed) against their recorded sizes and
    SHA-256; return the config.  Any fault is a CheckpointError naming the file."""
    config = read_config(directory)
    files = config.get("files")
    if not isinstance(files, dict) or MODEL not in files:
        raise CheckpointError(f"checkpoint: {str(directory / CONFIG)!r} does not list {MODEL}")
    names = [name for name in files if only is None or name in only]
    try:
        verify_files(directory, config, names)
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot read {str(directory)!r}: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint: {str(directory / CONFIG)!r} has a malformed file list"
        ) from exc
    return config


def read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {str(directory / CONFIG)!r} is unreadable") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint: {str(directory / CONFIG)!r} is unreadable")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint: {str(directory)!r} has format version {config.get('format_version')},"
            f" this fastdiff reads version {FORMAT_VERSION}"
        )
    return config


def verify_files(directory: Path, config: dict, names) -> None:
    """Check the listed files against the sizes and hashes recorded at write time."""
    for name in names:
        entry = config["files"].get(name)
        path = directory / name
        if entry is None:
            raise CheckpointError(f"checkpoint: {str(directory)!r} has no {name}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint: {str(path)!r} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint: {str(path)!r} is truncated or altered ({size} bytes,"
                f" expected {entry['bytes']})"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint: {str(path)!r} is corrupted (SHA-256 mismatch)")


def load_weights(directory: Path, name: str, device="cpu") -> dict:
    try:
        return load_file(str(directory / name), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {str(directory / name)!r}: {exc}") from exc


def load_train_state(directory: Path) -> dict:
    try:
        return torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged pickle/zip
        raise CheckpointError(f"checkpoint: cannot read {str(directory / STATE)!r}: {exc}") from exc
