"""Reading the stage checkpoint: only a training-stage checkpoint (spec, classes, statistics) exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg_pipeline.export import export_model
from seg_pipeline.models.checkpoint import CheckpointError


def test_bare_state_dict_is_refused_naming_the_file(eager, tmp_path: Path) -> None:
    bare = tmp_path / "weights_only.pt"
    torch.save(eager.state_dict(), bare)
    with pytest.raises(
        CheckpointError, match=r"weights_only\.pt is not a training-stage checkpoint.*model_spec"
    ):
        export_model(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
