"""Checkpoints that survive crashes: each is written to a hidden temporary file in the same folder, fsynced, then
renamed onto its final name. A process killed mid-write leaves a `.NAME.tmp-PID` file behind, never a truncated
`.ckpt` (`resume.remove_partial_writes` clears those up). Lightning's own save is atomic too, but pickles the whole
checkpoint into a memory buffer first and never fsyncs: for a large model that is the optimizer state in RAM twice,
and a power cut can leave a renamed file whose bytes never reached the disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

TEMP_MARK = ".tmp-"  # partial writes are named .FINALNAME.tmp-PID: hidden, and not matched by *.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, fsync, then rename: a checkpoint is whole or absent."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage (s3://, gs://): fsspec's transaction is the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)  # and the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
