"""The encoder names ``model.encoder`` is checked against: smp's own table, cached per smp version."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
from pydantic import ValidationError

from seg_pipeline.settings import ModelSettings
from seg_pipeline.settings.encoders import CACHE_ENV, smp_encoder_names


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


def test_names_are_smps_and_the_first_call_writes_them_per_smp_version(cache: Path) -> None:
    assert smp_encoder_names() == frozenset(smp.encoders.get_encoder_names())
    (written,) = cache.glob("smp-*-encoders.json")
    assert written.name == f"smp-{smp.__version__}-encoders.json"


def test_a_later_call_reads_the_cache_file(cache: Path) -> None:
    smp_encoder_names()
    (written,) = cache.glob("smp-*-encoders.json")
    written.write_text('["resnet18", "an_encoder_only_the_cache_knows"]')
    assert (
        ModelSettings(encoder="an_encoder_only_the_cache_knows").encoder == "an_encoder_only_the_cache_knows"
    )


def test_a_damaged_cache_file_is_rebuilt_from_smp(cache: Path) -> None:
    smp_encoder_names()
    (written,) = cache.glob("smp-*-encoders.json")
    written.write_text('{"half": ')
    assert "resnet34" in smp_encoder_names()
    assert "resnet34" in written.read_text()


def test_an_unknown_encoder_is_refused_with_the_known_names(cache: Path) -> None:
    with pytest.raises(ValidationError, match=r"unknown to segmentation_models_pytorch .*resnet18"):
        ModelSettings(encoder="resnet19")


def test_an_unwritable_cache_only_costs_the_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # a folder under a file cannot be made
    assert "resnet18" in smp_encoder_names()
