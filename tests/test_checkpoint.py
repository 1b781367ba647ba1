"""placer.distributed.checkpoint alone: shares written atomically, merged into the
unplaced model's state_dict, and one-line CheckpointErrors (no processes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from graphs.errors import CheckpointError
from placer.distributed.checkpoint import merge_checkpoints, save_checkpoint


@dataclass
class Share:
    rank: int
    tensors: dict

    def state_dict(self) -> dict:
        return self.tensors


def test_shares_merge_into_the_whole_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = model.state_dict()
    keys = sorted(state)
    save_checkpoint(Share(0, {k: state[k] for k in keys[:2]}), tmp_path)
    path = save_checkpoint(Share(1, {k: state[k] for k in keys[2:]}), tmp_path)
    assert path == tmp_path / "rank1.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt"]  # no temporary files left
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh.load_state_dict(merge_checkpoints(tmp_path))  # strict: every key
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], state[k])


def test_missing_damaged_and_unwritable_shares_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no rank.*shares"):
        merge_checkpoints(tmp_path)
    (tmp_path / "rank0.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="rank0.pt is not a readable checkpoint share"):
        merge_checkpoints(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot write the checkpoint share") as info:
        save_checkpoint(Share(0, {}), blocker / "sub")  # a folder under a file
    assert "\n" not in str(info.value)
