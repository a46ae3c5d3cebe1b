"""The saved TorchScript file, reloaded, matches eager at a batch and size it was not traced at."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seg_pipeline.data.synthetic import TARGET_CLASSES
from seg_pipeline.export import ExportResult
from seg_pipeline_tests.export.helpers import eager_logits


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_file_reproduces_eager_at_a_new_batch_and_size(exported: ExportResult, eager) -> None:
    scripted = torch.jit.load(str(exported.files["torchscript"]), map_location="cpu")
    x = torch.randn(3, 3, 50, 41, generator=torch.Generator().manual_seed(7))  # pads 14 rows, 23 cols
    with torch.no_grad():
        logits = scripted(x).numpy()
    expected = eager_logits(eager, x)
    assert logits.shape == (3, len(TARGET_CLASSES), 50, 41)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).all()
