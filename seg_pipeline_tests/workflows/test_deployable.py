"""Which model the champion gate registers: the ensemble only where it scored higher."""

from __future__ import annotations

from seg_pipeline.contracts import ENSEMBLE, EnsembleMember, EnsembleTuning, PredictionSet
from seg_pipeline.settings import PredictSettings
from seg_pipeline.workflows.deployable import deployable_candidate


def _predictions(names: list[str], tuning: EnsembleTuning | None = None) -> PredictionSet:
    sets = [*names, ENSEMBLE] if len(names) > 1 else [ENSEMBLE]
    return PredictionSet(
        split="test",
        out_root="/p",
        sets={name: f"/p/{name}" for name in sets},
        items=[],
        members=[EnsembleMember(name=name, checkpoint=f"/ckpt/{name}.pt") for name in names],
        candidate=names[0],
        class_names=["background", "building"],
        ignore_index=255,
        views_per_input=9 * len(names),
        settings=PredictSettings(),
        tuning=tuning,
    )


def test_a_better_ensemble_is_deployed_with_the_members_and_offsets_tuning_kept() -> None:
    tuning = EnsembleTuning(
        split="val", pixels=10, weights={"a": 1.0, "b": 0.0, "c": 1.0}, class_bias=[0.0, 0.5], scores={}
    )
    predictions = _predictions(["a", "b", "c"], tuning)
    chosen = deployable_candidate(predictions, {"a": 0.70, "b": 0.71, "c": 0.69, ENSEMBLE: 0.73}, "b")
    assert chosen.kind == "ensemble"
    assert [m.name for m in chosen.members] == ["a", "c"]  # b got weight 0 on val: not shipped
    assert chosen.class_bias == [0.0, 0.5] and chosen.score == 0.73
    assert chosen.predict == predictions.settings  # the views and windows that were scored
    assert chosen.reason == (
        "the ensemble (a, c; with tuned class offsets; 18 forward views per tile) scored 0.7300 mIoU "
        "on test against 0.7100 for the best single model, b, as trained"
    )


def test_one_member_left_by_tuning_is_deployed_alone_with_its_offsets() -> None:
    tuning = EnsembleTuning(
        split="val", pixels=10, weights={"a": 0.0, "b": 1.0}, class_bias=[0, 1], scores={}
    )
    chosen = deployable_candidate(_predictions(["a", "b"], tuning), {"a": 0.6, "b": 0.7, ENSEMBLE: 0.75}, "b")
    assert chosen.kind == "single" and [m.name for m in chosen.members] == ["b"]
    assert chosen.class_bias == [0, 1]
    assert chosen.reason.startswith("b (with tuned class offsets; 9 forward views per tile) scored 0.7500")


def test_an_ensemble_that_does_not_beat_the_best_single_model_loses_to_it() -> None:
    chosen = deployable_candidate(_predictions(["a", "b"]), {"a": 0.70, "b": 0.72, ENSEMBLE: 0.72}, "b")
    assert chosen.kind == "single" and [m.name for m in chosen.members] == ["b"]
    assert chosen.members[0].checkpoint == "/ckpt/b.pt" and chosen.class_bias is None
    assert chosen.score == 0.72 and "b alone scored 0.7200" in chosen.reason


def test_one_member_is_deployed_as_itself_with_its_views() -> None:
    chosen = deployable_candidate(_predictions(["m"]), {ENSEMBLE: 0.6}, ENSEMBLE)
    assert chosen.kind == "single" and [m.name for m in chosen.members] == ["m"]
    assert chosen.reason == "m (9 forward views per tile) is the only model: 0.6000 mIoU on test"
