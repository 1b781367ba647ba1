"""Checkpoints of a model placed over ranks: each rank writes its own share of the
state_dict, and the shares merge into one state_dict that loads into the unplaced
model. Works for every backend whose model has `rank` and `state_dict()` (the share
this rank owns): DistributedModel and PipelinedModel alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from graphs.errors import CheckpointError
from graphs.files import write_atomically

__all__ = ["save_checkpoint", "merge_checkpoints"]


class RankModel(Protocol):
    rank: int

    def state_dict(self) -> dict[str, torch.Tensor]: ...


def save_checkpoint(model: RankModel, directory: str | Path) -> Path:
    """Write this rank's share of the state_dict to DIRECTORY/rank{R}.pt (call on every
    rank). The file is written atomically: a reader never sees half a share.

    Raises
    ------
    CheckpointError
        When the directory cannot be made or the file cannot be written (the path and
        the cause in one line).
    """
    path = Path(directory) / f"rank{model.rank}.pt"
    try:
        return write_atomically(path, lambda f: torch.save(model.state_dict(), f))
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        cause = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise CheckpointError(f"cannot write the checkpoint share {path}: {cause}") from exc


def merge_checkpoints(directory: str | Path) -> dict[str, torch.Tensor]:
    """The ranks' shares in DIRECTORY merged into one state_dict that loads into the
    unplaced model (`model.load_state_dict(merge_checkpoints(d))`).

    Raises
    ------
    CheckpointError
        When DIRECTORY holds no rank*.pt share, or a share is not a readable torch file.
    """
    shares = sorted(Path(directory).glob("rank*.pt"))
    if not shares:
        raise CheckpointError(f"{directory}: no rank*.pt checkpoint shares; write them with save_checkpoint on every rank")
    merged: dict[str, torch.Tensor] = {}
    for path in shares:
        try:
            merged.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors for a damaged file
            raise CheckpointError(f"{path} is not a readable checkpoint share ({type(exc).__name__}); "
                                  f"write it again with save_checkpoint") from exc
    return merged
