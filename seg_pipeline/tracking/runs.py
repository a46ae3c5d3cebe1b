"""One MLflow run as a context manager: params, metrics, tags, artefacts and models in batched calls."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from seg_pipeline.provenance import package_version
from seg_pipeline.tracking._mlflow import mlflow
from seg_pipeline.tracking.params import _chunks, _metric_value, flatten_params, truncate_value
from seg_pipeline.tracking.probes import check_tracking_uri, ensure_experiment
from seg_pipeline.tracking.settings import TrackingSettings, _using_uris

# What a pickled model needs at load time; written into the logged model's requirements.txt.
MODEL_REQUIREMENT_PACKAGES: tuple[str, ...] = ("torch", "segmentation-models-pytorch", "timm")


@dataclasses.dataclass(frozen=True)
class LoggedModelInfo:
    """What :meth:`TrackedRun.log_model` produced.

    Attributes:
        model_uri: URI that loads the model (MLflow 3: ``models:/m-<id>``).
        model_id: MLflow 3 logged-model id.
        registered_model_name: Registry name, if the model was registered.
        registered_version: Registry version, if the model was registered.
    """

    model_uri: str
    model_id: str | None
    registered_model_name: str | None = None
    registered_version: str | None = None

    @classmethod
    def of(cls, info: Any, registered_model_name: str | None) -> LoggedModelInfo:
        """From MLflow's ``ModelInfo`` of a ``log_model`` call (the name kept only if registered)."""
        version = info.registered_model_version
        return cls(
            model_uri=info.model_uri,
            model_id=getattr(info, "model_id", None),
            registered_model_name=registered_model_name if version is not None else None,
            registered_version=None if version is None else str(version),
        )


def default_pip_requirements() -> list[str]:
    """Return ``name==version`` for the installed model packages (local ``+cu130`` suffixes dropped).

    Passing these explicitly skips MLflow's 7-10 s requirement inference and keeps the list installable
    from PyPI.
    """
    requirements = []
    for package in MODEL_REQUIREMENT_PACKAGES:
        version = package_version(package)
        if version is not None:
            requirements.append(f"{package}=={version.split('+', 1)[0]}")
    return requirements


def run_url(tracking_uri: str, experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    """Return the MLflow UI link of a run (http servers, or a local store served at ``ui_url``).

    Without a UI address the text is ``<tracking_uri> run <run_id>`` (``make mlflow-ui`` serves a
    local store at ``http://127.0.0.1:5000``).
    """
    return TrackingSettings(tracking_uri, ui_url=ui_url).run_link(experiment_id, run_id)


class TrackedRun:
    """One MLflow run, used as a context manager; see :func:`start_run`.

    Inside the ``with`` block MLflow's fluent API points at this run's store. Leaving the block ends
    the run as FINISHED, or as FAILED when an exception escapes (the exception propagates), and
    restores the previous tracking URI.
    """

    def __init__(
        self,
        settings: TrackingSettings,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> None:
        self.settings = settings
        self.run_name = run_name
        self.tags = {key: str(value) for key, value in (tags or {}).items()}
        self.nested = nested
        self._client = settings.client()
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._uri_scope: Any = None
        self._active_run: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> TrackedRun:
        check_tracking_uri(self.settings)
        self._uri_scope = _using_uris(self.settings)
        self._uri_scope.__enter__()
        try:
            self._experiment_id = ensure_experiment(self.settings)
            self._active_run = mlflow.start_run(
                experiment_id=self._experiment_id,
                run_name=self.run_name,
                nested=self.nested,
                tags={key: truncate_value(value, MAX_TAG_VAL_LENGTH) for key, value in self.tags.items()},
            )
        except BaseException:
            self._uri_scope.__exit__(*sys.exc_info())
            raise
        self._run_id = self._active_run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            # MLflow's ActiveRun ends the run FINISHED, or FAILED when exc_type is set.
            self._active_run.__exit__(exc_type, exc_value, traceback)
        finally:
            self._uri_scope.__exit__(exc_type, exc_value, traceback)

    @property
    def run_id(self) -> str:
        """The MLflow run id (available inside the ``with`` block and after it)."""
        if self._run_id is None:
            raise RuntimeError("the run has not started: use `with start_run(...) as run:`")
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id the run belongs to."""
        if self._experiment_id is None:
            raise RuntimeError("the run has not started: use `with start_run(...) as run:`")
        return self._experiment_id

    @property
    def url(self) -> str:
        """A browser link for http tracking servers, else a readable ``<uri> run <id>`` reference."""
        return self.settings.run_link(self.experiment_id, self.run_id)

    @property
    def artifact_uri(self) -> str:
        """Root URI of this run's artefacts."""
        return self._client.get_run(self.run_id).info.artifact_uri

    # -- params, metrics, tags -----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log (nested) params flattened with dots, as few ``log_batch`` calls as MLflow allows.

        Returns the flattened params that were logged. MLflow rejects changing an already-logged param.
        """
        flat = flatten_params(params)
        entries = [Param(key, value) for key, value in flat.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk, synchronous=True)
        return flat

    def log_metrics(self, metrics: Mapping[str, Any], step: int, model_id: str | None = None) -> None:
        """Log all ``metrics`` at ``step`` in one ``log_batch`` call (one row per metric per step).

        With ``model_id`` (an MLflow 3 logged model) the metrics are that model's: the model's page
        in the MLflow UI lists them, whichever run logged them.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative int (epoch or global step)")
        timestamp_ms = int(time.time() * 1000)
        entries = [
            Metric(key, _metric_value(key, value), timestamp_ms, step, model_id=model_id)
            for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags in one ``log_batch`` call."""
        entries = [RunTag(key, truncate_value(str(value), MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    # -- artefacts ---------------------------------------------------------------------------------

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artefacts (under ``artifact_path``)."""
        local = Path(path)
        if not local.exists():
            raise ValueError(f"path={str(local)!r} does not exist: pass an existing file or folder to log")
        if local.is_dir():
            self._client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(local), artifact_path)

    def log_dict(self, obj: Mapping[str, Any] | list[Any], name: str) -> None:
        """Write ``obj`` as JSON or YAML (chosen by ``name``'s suffix) into the run's artefacts."""
        # cast: MLflow annotates dict[str, Any]; it serialises any JSON/YAML value (lists too)
        self._client.log_dict(self.run_id, cast(dict[str, Any], obj), name)

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` to the artefact file ``name``."""
        self._client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib (or plotly) figure as the artefact file ``name`` (e.g. ``plots/loss.png``)."""
        self._client.log_figure(self.run_id, figure, name)

    # -- datasets ----------------------------------------------------------------------------------

    def log_dataset(self, name: str, path: Path | str, digest: str, context: str = "training") -> None:
        """Record a dataset this run read (``mlflow.log_input``): its folder, and its data version as digest.

        A metadata-only dataset: nothing is copied, the run's "Datasets used" list shows which data
        (by the same version Dagster tracks) trained or was scored.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with _using_uris(self.settings):
            source = resolve_dataset_source(str(Path(path).resolve()))
            # MLflow leaves "profile" abstract in the base class; MetaDataset works without one
            dataset = MetaDataset(source, name=name, digest=digest[:36])._to_mlflow_entity()  # type: ignore[abstract]
            entry = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            self._client.log_inputs(self.run_id, datasets=[entry])

    # -- models ------------------------------------------------------------------------------------

    def describe_model_version(
        self, name: str, version: str, description: str, tags: Mapping[str, Any]
    ) -> None:
        """Give a registered version its description and tags (scores, data version, producing run)."""
        client = self.settings.client()
        client.update_model_version(name, version, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, truncate_value(str(value), MAX_TAG_VAL_LENGTH))

    def score_model_version(
        self, name: str, version: str, metrics: Mapping[str, float], summary_keys: Sequence[str] = ()
    ) -> None:
        """Record this run's scores of a registered version: linked to its logged model, and as tags.

        The metrics (shared key names such as ``evaluation/test/miou``) are logged against
        the version's MLflow 3 logged model, so its model page shows how it scored; the version gets
        ``summary_keys`` as tags and ``evaluation_run_id`` pointing at this run.
        """
        client = self.settings.client()
        entry = client.get_model_version(name, version)
        model_id = getattr(entry, "model_id", None)
        if not model_id and str(entry.source).startswith("models:/m-"):  # MLflow 3 leaves model_id unset
            model_id = str(entry.source).removeprefix("models:/").split("/")[0]
        self.log_metrics(metrics, step=0, model_id=model_id)
        for key in summary_keys:
            if key in metrics:
                client.set_model_version_tag(name, version, key, f"{metrics[key]:.4f}")
        client.set_model_version_tag(name, version, "evaluation_run_id", self.run_id)

    def log_model(
        self,
        model: Any,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        pip_requirements: Sequence[str] | None = None,
        step: int = 0,
        bands: int | None = None,
        classes: int | None = None,
        example_side: int = 64,
    ) -> LoggedModelInfo:
        """Log a torch module with ``mlflow.pytorch.log_model`` (pickle format), optionally registering it.

        Pickle is used because MLflow 3's default ``pt2`` export needs an input example; the model's
        classes must be importable where it is loaded. ``pip_requirements`` defaults to the installed
        torch/SMP/timm versions, which also skips MLflow's slow requirement inference. With ``bands``
        and ``classes`` the model gets a signature (float32 ``(batch, bands, H, W)`` normalised pixels
        in, ``(batch, classes, H, W)`` logits out) and a zero input example of ``example_side`` px.
        """
        import mlflow.pytorch  # imports torch

        signature, example = None, None
        if bands is not None and classes is not None:
            signature, example = tensor_signature(bands, classes, example_side)
        requirements = list(pip_requirements) if pip_requirements is not None else default_pip_requirements()
        with _using_uris(self.settings):
            info = mlflow.pytorch.log_model(
                model,
                name=artifact_path,
                serialization_format="pickle",
                pip_requirements=requirements,
                registered_model_name=registered_model_name,
                step=step,
                run_id=self.run_id,
                signature=signature,
                input_example=example,
            )
        return LoggedModelInfo.of(info, registered_model_name)

    def log_bundle(
        self,
        bundle_dir: Path,
        bands: int,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
    ) -> LoggedModelInfo:
        """Log a deployable bundle (:mod:`seg_pipeline.inference.bundle`) as a ``pyfunc`` model that
        predicts class maps from raw images, optionally registering it.
        """
        import mlflow.pyfunc
        import numpy as np
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        from seg_pipeline.tracking import segmenter_model
        from seg_pipeline.tracking.pyfunc import BUNDLE_ARTIFACT

        signature = ModelSignature(
            # unnamed tensors: MLflow then hands predict() the array itself, not a dict of arrays
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, bands, -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1))]),
        )
        with _using_uris(self.settings):
            info = mlflow.pyfunc.log_model(
                name=artifact_path,
                python_model=segmenter_model.__file__,  # models from code: nothing is pickled
                artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                pip_requirements=default_pip_requirements(),
                registered_model_name=registered_model_name,
                signature=signature,  # logged to this run: the active one inside its ``with`` block
                # no input example: MLflow would run every member over all TTA views on it to check
                # it (4 s for the demo's pair); the signature says what goes in and out
            )
        return LoggedModelInfo.of(info, registered_model_name)


def tensor_signature(bands: int, classes: int, example_side: int) -> tuple[Any, Any]:
    """The MLflow signature of a segmentation model and a matching input example (zeros)."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, bands, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, classes, -1, -1), "logits")]),
    )
    return signature, np.zeros((1, bands, example_side, example_side), dtype=np.float32)


def start_run(
    settings: TrackingSettings,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> TrackedRun:
    """Return a :class:`TrackedRun`; entering it checks the store, ensures the experiment and starts the run.

    Example:
        >>> with start_run(settings, "pretrain", build_run_tags("pretrain")) as run:  # doctest: +SKIP
        ...     run.log_metrics({"train/loss": 0.4}, step=0)
    """
    return TrackedRun(settings, run_name=run_name, tags=tags, nested=nested)
