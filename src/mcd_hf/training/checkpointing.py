"""Atomic checkpoints: a crash while saving never leaves a checkpoint that resuming would pick.

A checkpoint is first written to ``{output_dir}/.tmp-checkpoint-{step}``; its completeness marker
(``trainer_state.json``) is written last; every file is fsynced; then the folder is renamed to
``checkpoint-{step}`` (``os.rename`` is atomic within one filesystem) and the parent folder is fsynced. Resuming
only considers folders named exactly ``checkpoint-{int}`` that hold the marker, so neither a half-written temporary
folder nor a folder without marker is ever picked. Same layout as diffusers' training examples.
"""

from __future__ import annotations

import json
import os
import re
import shutil

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
COMPLETE_MARKER = "trainer_state.json"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def temporary_checkpoint_path(output_dir: str, step: int) -> str:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    return os.path.join(output_dir, f"{TEMPORARY_PREFIX}{step}")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` is a finished checkpoint (right name and completeness marker)."""
    return bool(_CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))) and os.path.isfile(
        os.path.join(path, COMPLETE_MARKER)
    )


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and is_complete_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_path(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """Turns ``--resume_from_checkpoint`` (``latest``, a path, or None) into a checkpoint folder or None.

    ``latest`` with no checkpoint yet returns None (a fresh start, so the same command can always be re-run); an
    explicit path must be a complete checkpoint.
    """
    if resume_from_checkpoint in (None, ""):
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint!r} is not a folder (or use 'latest')")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"resume_from_checkpoint: {path!r} is not a complete checkpoint (expected a folder named "
            f"checkpoint-<step> holding {COMPLETE_MARKER})"
        )
    return path


def write_json(path: str, payload: dict) -> None:
    """Writes JSON and fsyncs it."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """fsyncs every file and folder below ``path`` (so the rename publishes data that is on disk)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(root)


def publish_checkpoint(temporary: str, final: str) -> None:
    """fsyncs ``temporary`` and renames it to ``final`` atomically (an old ``final`` is replaced)."""
    if not os.path.isfile(os.path.join(temporary, COMPLETE_MARKER)):
        raise RuntimeError(f"refusing to publish {temporary!r}: it lacks {COMPLETE_MARKER}")
    fsync_tree(temporary)
    if os.path.exists(final):
        # Re-saving a step (e.g. after a resume): retire the old folder under a name resume never picks.
        retired = final.rstrip(os.sep) + ".old"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
        shutil.rmtree(retired, ignore_errors=True)
    os.rename(temporary, final)
    _fsync_directory(os.path.dirname(os.path.abspath(final)))


def remove_stale_temporaries(output_dir: str) -> None:
    """Deletes temporary checkpoint folders left by a crash."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(TEMPORARY_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Deletes the oldest complete checkpoints beyond ``total_limit``; returns the removed paths."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_path",
    "temporary_checkpoint_path",
    "is_complete_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume_path",
    "publish_checkpoint",
    "remove_stale_temporaries",
    "rotate_checkpoints",
    "write_json",
    "fsync_tree",
]
