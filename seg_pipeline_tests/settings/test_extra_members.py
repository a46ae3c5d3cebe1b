"""``extra_members``: more KD students of stage 1 as ensemble members, each with its own seed or model."""

from __future__ import annotations

import pytest

from seg_pipeline.settings import ExtraMembersSettings, KDStageSettings, SettingsError


def test_no_member_is_the_default_so_nothing_extra_trains() -> None:
    assert ExtraMembersSettings().members == []


def test_each_member_gets_the_recipe_with_its_own_seed_and_model() -> None:
    settings = ExtraMembersSettings.parse(
        {
            "loop": {"epochs": 3, "seed": 10},
            "optimizer": {"lr": 2e-4},
            "members": [
                {"name": "seed_b"},
                {"name": "r34", "seed": 7, "student_model": {"architecture": "fpn", "encoder": "resnet34"}},
            ],
        }
    )
    first, second = settings.for_member(0), settings.for_member(1)
    assert type(first) is KDStageSettings  # what stage 2's distill takes, without the member list
    # No seed given: the recipe's seed + position + 1, never the KD student's own seed (10 here).
    assert first.loop.seed == 11 and first.student_model is None
    assert second.loop.seed == 7 and second.student_model is not None
    assert (second.student_model.architecture, second.student_model.encoder) == ("fpn", "resnet34")
    for member in (first, second):  # everything else is the recipe
        assert member.loop.epochs == 3 and member.optimizer.lr == 2e-4


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([{"name": "kd_student"}], "taken by the pipeline's own models"),
        ([{"name": "a"}, {"name": "a"}], "must be distinct"),
        ([{"name": "extra_0"}], "predict.extra_checkpoints"),
        ([{"name": "Seed B"}], "members.0.name"),
    ],
)
def test_member_names_that_would_collide_or_not_name_a_folder_are_refused(
    members: list[dict[str, str]], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        ExtraMembersSettings.parse({"members": members}, "extra_members")
