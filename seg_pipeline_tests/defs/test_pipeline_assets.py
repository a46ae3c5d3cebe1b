"""The whole asset graph materialized in-process with a real MLflow store and the JSON IO manager."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest

from seg_pipeline.contracts import (
    ChampionDecision,
    DeployableModel,
    EvaluationReport,
    MemberModels,
    PredictionSet,
    ShardSet,
    TrainedModel,
)
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.defs.definitions import defs
from seg_pipeline.defs.io_manager import ContractIOManager
from seg_pipeline.defs.metadata import INLINE_MARKDOWN_CHARS
from seg_pipeline.defs.resources import MlflowResource, StorageResource
from seg_pipeline.settings import ChampionSettings
from seg_pipeline_tests.conftest import scratch_dir, tiny_stage
from seg_pipeline_tests.defs.cli_helpers import instance_for

pytestmark = pytest.mark.slow  # every test reads the one materialized pipeline (its module fixture)

DEMO_REMAP = {
    "unknown": "",
    "bareland": "bare_soil",
    "rangeland": "vegetation",
    "developed_space": "building",
    "tree": "vegetation",
    "agriculture_land": "cropland",
}


@pytest.fixture(scope="module")
def materialized(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dg.ExecuteInProcessResult]:
    root = scratch_dir(request, tmp_path_factory, "pipeline")
    # 64 px tiles: the encoder's deepest BatchNorm then sees 2x2 maps, so a rank's trailing batch of
    # one tile still trains (at 32 px it would be 1x1, one value per channel, which BatchNorm refuses).
    spec = SyntheticSpec(grid_rows=4, grid_cols=4, tile_size=64, labeled_fraction=0.8)
    write_synthetic_dataset(root / "raw" / "demo", spec, seed=5)
    aux = SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=64, class_scheme="aux", item_prefix="oem")
    write_synthetic_dataset(root / "raw" / "demo_aux", aux, seed=6)
    tiny = tiny_stage(loop={"log_every_n_steps": 1})
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        partition_key="demo",  # the dataset: each asset's demo partition
        instance=instance_for("demo"),
        resources={
            "storage": StorageResource(data_root=str(root)),
            "mlflow": MlflowResource(),
            "io_manager": ContractIOManager(base_dir=str(root / "dagster_storage")),
        },
        run_config=dg.RunConfig(
            ops={
                "dataset_splits": {
                    "config": {"train_fraction": 0.6, "val_fraction": 0.4, "test_fraction": 0.0}
                },
                "auxiliary_sources": {"config": {"datasets": [{"dataset_id": "demo_aux"}]}},
                # Stage 1 on two torchrun ranks (gloo on CPU) from the same asset code; KD in-process.
                "pretrained_model": {
                    "config": {**tiny, "nproc_per_node": 2, "aux_class_remaps": {"demo_aux": DEMO_REMAP}}
                },
                "kd_student_model": {
                    "config": tiny_stage(
                        loop={"epochs": 2}, kd={"warmup_epochs": 1, "transfer_split": "unlabeled"}
                    )
                },
                # One more ensemble member: another KD student of stage 1, with its own seed.
                "extra_members": {
                    "config": tiny_stage(kd={"warmup_epochs": 0}, members=[{"name": "seed_b"}])
                },
                "ensemble_predictions": {
                    "config": {
                        "split": "val",
                        "tta": {"scales": [1.0, 1.25]},
                        "windows": {"window": 32, "overlap": 8},
                    }
                },
                "evaluation_report": {
                    "config": {"miou_floor": 0.0, "ensemble_tolerance": 1.0, "overlays": 1}
                },
            }
        ),
    )
    return root, result


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")


def test_pipeline_materializes_typed_values_that_point_at_exact_checkpoints(materialized) -> None:
    _root, result = materialized
    assert result.success
    pre, kd = result.output_for_node("pretrained_model"), result.output_for_node("kd_student_model")
    assert isinstance(pre, TrainedModel) and isinstance(kd, TrainedModel)
    assert Path(pre.checkpoint).is_file() and Path(kd.checkpoint).is_file()
    assert Path(pre.checkpoint).parent != Path(kd.checkpoint).parent
    assert kd.epochs_run == 2 and pre.epochs_run == 1
    assert (pre.world_size, kd.world_size) == (2, 1)
    assert result.asset_materializations_for_node("pretrained_model")[0].metadata["ddp_ranks"].value == 2
    meta = result.asset_materializations_for_node("kd_student_model")[0].metadata
    assert meta["teacher_best_val_miou"].value == round(pre.best_score, 4)
    for key in ("best_val_miou", "per_class_iou", "epochs_run", "wall_time_s", "images_per_s", "device",
                "training_curves", "mlflow_run", "ignored_fraction_last_epoch"):  # fmt: skip
        assert key in meta, key


def test_asset_pages_link_to_the_mlflow_run_and_the_registered_version(materialized) -> None:
    _root, result = materialized
    kd = result.output_for_node("kd_student_model")
    assert kd.tracking is not None
    meta = result.asset_materializations_for_node("kd_student_model")[0].metadata
    assert isinstance(meta["mlflow_run"], dg.UrlMetadataValue)
    assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
    assert meta["mlflow_run"].value.endswith(f"/runs/{kd.tracking.run_id}")
    # MLflow 3's logged model (metrics, params, artefacts of the model itself) has its own page
    assert kd.tracking.model_id is not None and kd.tracking.model_id.startswith("m-")
    assert kd.tracking.model_uri == f"models:/{kd.tracking.model_id}"
    logged = meta["mlflow_logged_model"]
    assert isinstance(logged, dg.UrlMetadataValue) and logged.value.endswith(
        f"/models/{kd.tracking.model_id}"
    )
    page = meta["registered_version_page"]
    assert isinstance(page, dg.UrlMetadataValue)
    assert (
        page.value == f"http://127.0.0.1:5000/#/models/demo_student/versions/{kd.tracking.registered_version}"
    )
    champion = result.asset_materializations_for_node("champion_model")[0].metadata
    decision = result.output_for_node("champion_model")
    holder = decision.candidate_version if decision.promoted else decision.previous_version
    assert champion["champion_version_page"].value.endswith(
        f"/models/{decision.model_name}/versions/{holder}"
    )


def test_the_io_manager_stores_every_value_as_readable_json(materialized) -> None:
    root, result = materialized
    # one file per asset and dataset partition: <storage>/<asset>/<dataset>.json
    stored = json.loads((root / "dagster_storage" / "tile_shards" / "demo.json").read_text())
    assert stored["type"] == "ShardSet"
    assert ShardSet.model_validate(stored["value"]) == result.output_for_node("tile_shards")
    for name in ("pretrained_model", "ensemble_predictions", "evaluation_report", "champion_model"):
        assert (root / "dagster_storage" / name / "demo.json").is_file(), name
    assert not list((root / "dagster_storage").rglob("*.pkl"))


def test_ingest_settings_reach_every_later_stage_through_the_contracts(materialized) -> None:
    _root, result = materialized
    shards = result.output_for_node("tile_shards")
    for model in (result.output_for_node("pretrained_model"), result.output_for_node("kd_student_model")):
        assert model.ignore_index == shards.catalog.ignore_index
        assert model.class_names == shards.catalog.class_names
        assert model.normalization == shards.catalog.normalization
        assert model.spec.in_channels == shards.catalog.bands
    assert result.output_for_node("ensemble_predictions").ignore_index == shards.catalog.ignore_index


def test_mlflow_runs_hold_params_metrics_tags_and_registered_models(materialized) -> None:
    root, result = materialized
    client = _client(root)
    run_id = result.dagster_run.run_id
    for node, stage, name in (
        ("pretrained_model", "pretrain", "demo_pretrained"),
        ("kd_student_model", "kd", "demo_student"),
    ):
        value = result.output_for_node(node)
        assert value.tracking is not None
        run = client.get_run(value.tracking.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["dagster.run_id"] == run_id
        assert run.data.tags["dagster.run_url"] == f"http://127.0.0.1:3000/runs/{run_id}"
        assert run.data.tags["seg_pipeline.stage"] == stage
        assert (
            run.data.tags["seg_pipeline.data_version"] == result.output_for_node("tile_shards").data_version
        )
        assert run.data.params["config.optimizer.lr"] in ("0.0003", "0.0001")
        # the precision the machine chose (bf16 on AMX CPUs, fp32 elsewhere) and why, on the run
        assert run.data.params["precision"] == value.precision and value.precision.startswith("cpu ")
        assert "val/miou" in run.data.metrics and "train/loss" in run.data.metrics
        history = client.get_metric_history(value.tracking.run_id, "train/loss")
        assert [m.step for m in history] == list(range(1, value.epochs_run + 1))
        version = client.get_model_version(name, value.tracking.registered_version)
        assert version.run_id == value.tracking.run_id
        # the registered version says what it is, and links back to its run and data
        assert version.description.startswith(f"{stage} stage: unet-mobilenet_v2 on demo (data ")
        assert version.tags["data_version"] == result.output_for_node("tile_shards").data_version
        assert version.tags["dagster.run_id"] == run_id and version.tags["mlflow_run_id"] == run.info.run_id
        assert version.tags["val/miou"] == f"{value.best_score:.4f}"
        assert run.info.run_name == f"{stage} demo {run_id[:8]}"
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert inputs["demo"].dataset.digest == result.output_for_node("tile_shards").data_version[:36]
        assert {t.key: t.value for t in inputs["demo"].tags}["mlflow.data.context"] == "training"
        if stage == "pretrain":
            assert "demo_aux" in inputs  # the auxiliary source is a training input too
        artifacts = {a.path for a in client.list_artifacts(value.tracking.run_id)}
        assert {"checkpoints", "resolved_config.json"} <= artifacts
        # MLflow power users' model page: a signature, an input example, and the evaluation's scores
        from seg_pipeline.tracking import TrackingSettings
        from seg_pipeline.tracking.settings import _using_uris

        with _using_uris(TrackingSettings.from_data_root(root)):
            info = mlflow.models.get_model_info(f"models:/{name}/{version.version}")
        assert str(info.signature.inputs) == "['image': Tensor('float32', (-1, 3, -1, -1))]"
        assert str(info.signature.outputs) == "['logits': Tensor('float32', (-1, 6, -1, -1))]"
        assert info.saved_input_example_info["type"] == "ndarray"
        report: EvaluationReport = result.output_for_node("evaluation_report")
        member = {"pretrain": "pretrained", "kd": "kd_student"}[stage]
        assert version.tags["evaluation/val/miou"] == f"{report.score(member).miou:.4f}"
        assert version.tags["evaluation_run_id"] == report.run_id
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        linked = {m.key: m.value for m in logged.metrics or []}
        assert linked["evaluation/val/miou"] == pytest.approx(report.score(member).miou)
        assert {f"evaluation/val/iou/{cls}" for cls in report.score(member).iou} >= {
            k for k in linked if k.startswith("evaluation/val/iou/")
        } and any(k.startswith("evaluation/val/iou/") for k in linked)
    kd_run = client.get_run(result.output_for_node("kd_student_model").tracking.run_id)
    assert "train/kd" in kd_run.data.metrics and "train/ignored_fraction" in kd_run.data.metrics
    assert kd_run.data.params["config.kd.alpha"] == "0.7"


def test_an_extra_member_is_one_more_kd_student_with_its_own_run_seed_and_checkpoints(materialized) -> None:
    root, result = materialized
    members = result.output_for_node("extra_members")
    assert isinstance(members, MemberModels) and [m.name for m in members.members] == ["seed_b"]
    member, kd = members.members[0].model, result.output_for_node("kd_student_model")
    assert member.stage == "kd" and Path(member.checkpoint).is_file()
    assert Path(member.checkpoint_dir) != Path(kd.checkpoint_dir)  # never the student's own files
    assert member.tracking is not None and member.tracking.registered_model is None  # a member, not a release
    run = _client(root).get_run(member.tracking.run_id)
    run_id = result.dagster_run.run_id
    assert run.info.run_name == f"kd seed_b demo {run_id[:8]}"
    assert run.data.tags["seg_pipeline.member"] == "seed_b"
    # no seed given: the recipe's loop.seed + 1, so it is not the KD student's seed
    assert run.data.params["config.loop.seed"] == "43"
    assert _client(root).get_run(kd.tracking.run_id).data.params["config.loop.seed"] == "42"
    meta = result.asset_materializations_for_node("extra_members")[0].metadata
    assert meta["members"].value == 1
    assert [row.data["member"] for row in meta["trained"].value.records] == ["seed_b"]


def test_registered_student_loads_and_predicts(materialized) -> None:
    import torch

    from seg_pipeline.tracking import TrackingSettings, load_model

    root, result = materialized
    kd = result.output_for_node("kd_student_model")
    model = load_model(
        f"models:/demo_student/{kd.tracking.registered_version}",
        settings=TrackingSettings.from_data_root(root),
    )
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6, 32, 32)


def test_predictions_are_georeferenced_class_maps_per_model_and_ensemble(materialized) -> None:
    import rasterio

    _root, result = materialized
    value = result.output_for_node("ensemble_predictions")
    assert isinstance(value, PredictionSet)
    assert set(value.sets) == {"pretrained", "kd_student", "seed_b", "ensemble"}
    assert value.views_per_input == 3 * 2 * 3  # models x scales x flips
    assert value.candidate == "kd_student" and value.member("kd_student").registered_version
    # the forward passes' precision follows the CPU (inference bf16: null) and says why
    from seg_pipeline.hardware import cpu_bf16_is_fast

    expected = "bf16-autocast" if cpu_bf16_is_fast() else "fp32"
    assert value.precision.startswith(f"cpu {expected} ") and "chosen" in value.precision
    meta = result.asset_materializations_for_node("ensemble_predictions")[0].metadata
    assert meta["precision"].value == value.precision
    item = value.items[0]
    with (
        rasterio.open(item.input) as src,
        rasterio.open(value.folder("ensemble") / f"{item.item_id}.tif") as pred,
    ):
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        data = pred.read(1)
        assert data[data != pred.nodata].max() < 6


def test_evaluation_report_and_checks(materialized) -> None:
    _root, result = materialized
    report = result.output_for_node("evaluation_report")
    assert isinstance(report, EvaluationReport)
    assert Path(report.markdown).read_text().startswith("# Evaluation report")
    assert {s.name for s in report.scores} == {"pretrained", "kd_student", "seed_b", "ensemble"}
    assert 0.0 <= report.score("ensemble").miou <= 1.0
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["metrics_above_floor"] and checks["ensemble_not_worse_than_best_single"]
    assert checks["predictions_overlay_their_inputs"]  # each class map has its input's CRS, transform, size
    assert checks["pretrained_score_above_floor"] and checks["student_score_above_floor"]
    meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    for score in report.scores:  # floats, so the Plots tab shows each model's trend across retrains
        assert isinstance(meta[f"miou_{score.name}"], dg.FloatMetadataValue)
        assert meta[f"miou_{score.name}"].value == round(score.miou, 4)
    for name in ("confusion_ensemble.png", "confusion_ensemble.csv", "metrics.json"):
        assert (Path(report.report_dir) / name).exists(), name


def _served_artifact(root: Path, url: str) -> Path:
    """The file behind an MLflow UI ``get-artifact`` URL, found in the local store the way the server
    finds it (run id and artefact path from the query)."""
    query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    run = _client(root).get_run(query["run_uuid"][0])
    return Path(urllib.parse.urlparse(run.info.artifact_uri).path) / query["path"][0]


def test_pictures_show_inline_on_the_asset_pages_from_their_mlflow_runs(materialized) -> None:
    root, result = materialized
    report: EvaluationReport = result.output_for_node("evaluation_report")
    assert set(report.figures) == {"per_class_iou", "gallery"}
    meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    for name in ("per_class_iou", "gallery", "confusion_matrix"):
        markdown = meta[name].value
        # short markdown that points at the MLflow UI: Dagster shows it inline (long markdown, such
        # as an embedded PNG, hides behind "[Show Markdown]")
        assert markdown.startswith("![") and len(markdown) < INLINE_MARKDOWN_CHARS, (name, markdown[:80])
        url = report.figure_urls[name]
        assert f"]({url})" in markdown and url.startswith("http://127.0.0.1:5000/get-artifact?")
        assert _served_artifact(root, url).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kd: TrainedModel = result.output_for_node("kd_student_model")
    assert kd.tracking is not None and kd.tracking.curves_url is not None
    curves = result.asset_materializations_for_node("kd_student_model")[0].metadata["training_curves"]
    assert curves.value.endswith(f"({kd.tracking.curves_url})")
    assert _served_artifact(root, kd.tracking.curves_url).stat().st_size > 5_000
    # the split's own pictures have no MLflow run: embedded, a click away
    splits = result.asset_materializations_for_node("dataset_splits")[0].metadata
    assert splits["footprints"].value.startswith("![split footprints](data:image/png;base64,")
    assert splits["class_shares"].value.startswith("![split class shares](data:image/png;base64,")


def _with_scores(report: EvaluationReport, scores: dict[str, float], best_single: str) -> EvaluationReport:
    changed = [
        s.model_copy(update={"miou": scores[s.name]}) if s.name in scores else s for s in report.scores
    ]
    return report.model_copy(update={"scores": changed, "best_single": best_single})


def test_the_gate_registers_what_the_report_measured_and_moves_the_alias_past_the_margin(
    materialized, tmp_path: Path
) -> None:
    from seg_pipeline import tracking as trk
    from seg_pipeline.workflows.champion import champion_gate

    root, result = materialized
    first = result.output_for_node("champion_model")
    assert isinstance(first, ChampionDecision) and first.promoted and first.previous_version is None
    assert first.model_name == "demo_segmenter" and first.deployed is not None
    predictions: PredictionSet = result.output_for_node("ensemble_predictions")
    report: EvaluationReport = result.output_for_node("evaluation_report")
    # the candidate is the ensemble exactly when it scored above the best single model
    ensemble, best = report.score("ensemble").miou, report.score(report.best_single).miou
    expected = ("ensemble", ensemble) if ensemble > best else (report.best_single, best)
    assert first.deployed.score == expected[1]
    if expected[0] != "ensemble":
        assert [m.name for m in first.deployed.members] == [report.best_single]
    settings = trk.TrackingSettings.from_data_root(root)
    champion = trk.get_alias_version("demo_segmenter", "champion", settings=settings)
    assert champion is not None and champion.version == first.candidate_version

    # A worse candidate (one model the champion is not, its ensemble scored lower) gets a version but
    # not the alias; the champion is re-scored with its own bundle on the same split.
    other = next(m.name for m in predictions.members if [m.name] != [d.name for d in first.deployed.members])
    worse = _with_scores(report, {other: -1.0, "ensemble": -2.0}, other)
    kept = champion_gate(
        ChampionSettings(margin=0.0), predictions, worse, tmp_path / "a", settings, "demo_segmenter"
    )
    assert not kept.promoted and kept.deployed is not None and kept.deployed.kind == "single"
    assert [m.name for m in kept.deployed.members] == [other]
    assert kept.champion_score is not None
    assert kept.champion_score == pytest.approx(first.deployed.score, abs=2e-3)  # its maps, re-predicted
    assert trk.get_alias_version("demo_segmenter", "champion", settings=settings).version == champion.version
    # Better than the champion by more than the margin: promoted.
    better = _with_scores(report, {other: kept.champion_score + 0.6, "ensemble": -2.0}, other)
    promoted = champion_gate(
        ChampionSettings(margin=0.5), predictions, better, tmp_path / "b", settings, "demo_segmenter"
    )
    assert promoted.promoted and promoted.previous_version == champion.version
    holder = trk.get_alias_version("demo_segmenter", "champion", settings=settings)
    assert holder is not None and holder.version == promoted.candidate_version
    trk.set_alias("demo_segmenter", "champion", champion.version, settings=settings)  # for later tests


def test_the_champion_loads_with_one_call_and_predicts_what_the_report_scored(materialized) -> None:
    import rasterio

    from seg_pipeline.tracking import TrackingSettings, load_pyfunc

    root, result = materialized
    deployed = result.output_for_node("champion_model").deployed
    predictions: PredictionSet = result.output_for_node("ensemble_predictions")
    # the set the report scored for it: the ensemble's maps, or the single model's own
    scored = "ensemble" if deployed.kind == "ensemble" or deployed.class_bias else deployed.members[0].name
    # one call (mlflow.pyfunc.load_model under the store's URIs, restored afterwards)
    model = load_pyfunc("models:/demo_segmenter@champion", settings=TrackingSettings.from_data_root(root))
    item = predictions.items[0]
    with rasterio.open(item.input) as src:
        image = src.read()
    classes = model.predict(image[np.newaxis].astype(np.float32))
    with rasterio.open(predictions.folder(scored) / f"{item.item_id}.tif") as src:
        written = src.read(1)
    assert classes.shape == (1, *written.shape)
    assert (classes[0] == written).mean() > 0.999  # the same members, weights, offsets and views


def test_registered_model_uris_resolve_to_the_exact_stage_checkpoint(materialized) -> None:
    from seg_pipeline.tracking import TrackingSettings
    from seg_pipeline.workflows.resolve import (
        ModelReferenceError,
        resolve_model_checkpoint,
        resolve_model_reference,
    )

    root, result = materialized
    pre = result.output_for_node("pretrained_model")
    settings = TrackingSettings.from_data_root(root)
    uri = f"models:/demo_pretrained/{pre.tracking.registered_version}"
    assert resolve_model_checkpoint(uri, settings) == Path(pre.checkpoint)
    with pytest.raises(ModelReferenceError, match="no such registered model or alias"):
        resolve_model_checkpoint("models:/demo_pretrained@nope", settings)
    # the champion is a bundle: an ensemble resolves as a whole, a single model to its checkpoint
    deployed = result.output_for_node("champion_model").deployed
    resolved = resolve_model_reference("models:/demo_segmenter@champion", settings)
    assert not isinstance(resolved, Path)
    bundle = resolved.bundle
    assert isinstance(bundle, DeployableModel) and bundle.kind == deployed.kind
    assert [m.name for m in resolved.members] == [m.name for m in bundle.members]  # loaded with it
    assert [m.weight for m in bundle.members] == [m.weight for m in deployed.members]
    assert bundle.predict.tta == deployed.predict.tta and bundle.class_bias == deployed.class_bias
    if len(bundle.members) > 1:
        with pytest.raises(ModelReferenceError, match=r"is an ensemble of \d+ models"):
            resolve_model_checkpoint("models:/demo_segmenter@champion", settings)
    else:
        member = resolve_model_checkpoint("models:/demo_segmenter@champion", settings)
        assert member.read_bytes() == Path(deployed.members[0].checkpoint).read_bytes()


def test_the_student_is_exported_with_a_card_that_names_its_run_and_the_gate(materialized) -> None:
    """Seed 000's export as an asset: runtime files beside a card that traces them to training."""
    import numpy as np
    import torch

    root, result = materialized
    exported = result.output_for_node("exported_model")
    kd: TrainedModel = result.output_for_node("kd_student_model")
    decision: ChampionDecision = result.output_for_node("champion_model")
    assert exported.checkpoint == kd.checkpoint and exported.champion == decision.promoted
    assert Path(exported.out_dir).parent == root / "exports"
    card = json.loads(Path(exported.files["card"]).read_text())
    assert card["lineage"]["mlflow_run_id"] == kd.tracking.run_id
    assert card["lineage"]["champion_gate"] == decision.reason
    assert card["lineage"]["registered_model"] == f"demo_student v{kd.tracking.registered_version}"
    scripted = torch.jit.load(exported.files["torchscript"])
    logits = scripted(torch.zeros(1, kd.spec.in_channels, 64, 64))
    assert logits.shape == (1, kd.spec.num_classes, 64, 64) and np.isfinite(logits.numpy()).all()
    meta = result.asset_materializations_for_node("exported_model")[0].metadata
    assert meta["formats"].value == "torchscript, onnx"
    assert meta["max_abs_diff/torchscript"].value < 1e-3
