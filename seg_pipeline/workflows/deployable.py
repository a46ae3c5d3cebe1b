"""What is worth deploying from one set of scored predictions: the ensemble, or one model.

The evaluation report states the choice and the champion gate registers it, so both read this
one rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from seg_pipeline.contracts import ENSEMBLE, DeployableModel, DeployedMember, PredictionSet


def deployable_candidate(
    predictions: PredictionSet, miou: Mapping[str, float], best_single: str
) -> DeployableModel:
    """The ensemble when it beats the best single model on the evaluation split, else that model.

    The ensemble keeps the members tuning left a weight (its class offsets with them); a single
    model is deployed with the same TTA views and no offsets, as the report scored it.

    Args:
        predictions: The prediction sets that were scored (members, tuning, views).
        miou: MIoU of every prediction set on ``predictions.split`` (``ensemble`` included).
        best_single: The single model with the highest mIoU.
    """
    best, ensemble = miou[best_single], miou[ENSEMBLE]
    split = predictions.split
    only_one = best_single == ENSEMBLE  # one member: its "ensemble" is that model with its views
    if only_one or np.nan_to_num(ensemble, nan=-1.0) > np.nan_to_num(best, nan=-1.0):
        weights = predictions.tuning.weights if predictions.tuning else {}
        members = [
            DeployedMember(name=m.name, checkpoint=m.checkpoint, weight=weights.get(m.name, 1.0))
            for m in predictions.members
            if weights.get(m.name, 1.0) > 0
        ]
        names = ", ".join(m.name for m in members)
        views = predictions.views_per_input // max(1, len(predictions.members)) * len(members)
        details = [f"{views} forward views per tile"]
        if predictions.tuning and any(predictions.tuning.class_bias):
            details.insert(0, "with tuned class offsets")
        what = f"the ensemble ({names}; " if len(members) > 1 else f"{names} ("
        what += "; ".join(details) + ")"
        return DeployableModel(
            kind="ensemble" if len(members) > 1 else "single",
            members=members,
            class_bias=predictions.tuning.class_bias if predictions.tuning else None,
            predict=predictions.settings,
            score=ensemble,
            split=split,
            reason=(
                f"{what} is the only model: {ensemble:.4f} mIoU on {split}"
                if only_one
                else f"{what} scored {ensemble:.4f} mIoU on {split} against {best:.4f} for the best "
                f"single model, {best_single}, as trained"
            ),
        )
    member = predictions.member(best_single)
    return DeployableModel(
        kind="single",
        members=[DeployedMember(name=member.name, checkpoint=member.checkpoint)],
        predict=predictions.settings,
        score=best,
        split=split,
        reason=f"{best_single} alone scored {best:.4f} mIoU on {split}, the ensemble "
        f"{ensemble:.4f}: one model does as well for a fraction of the inference cost",
    )
