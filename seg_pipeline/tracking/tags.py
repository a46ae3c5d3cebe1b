"""The standard tags every seg_pipeline MLflow run carries, to trace a run back to its code and data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from seg_pipeline.provenance import git_info

# Tag keys. ``mlflow.source.git.commit`` is MLflow's own key, so the UI shows the commit natively.
TAG_PIPELINE_RUN_ID = "dagster.run_id"
TAG_PIPELINE_RUN_URL = "dagster.run_url"
TAG_ASSET_KEY = "dagster.asset_key"
TAG_STAGE = "seg_pipeline.stage"
#: The ensemble member an extra KD run trains (``extra_members``).
TAG_MEMBER = "seg_pipeline.member"
TAG_CODE_VERSION = "seg_pipeline.code_version"
TAG_DATA_VERSION = "seg_pipeline.data_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "seg_pipeline.git_dirty"
#: Registered-version tag of a deployable bundle (single or ensemble) the champion gate logged.
TAG_KIND = "seg_pipeline.kind"


@dataclasses.dataclass(frozen=True)
class RunTags:
    """The standard tags every seg_pipeline MLflow run carries, so runs can be traced back.

    Attributes:
        stage: Pipeline stage, e.g. ``"pretrain"``, ``"kd"``, ``"evaluation"``.
        pipeline_run_id: Orchestrator (Dagster) run id, passed in as a plain string.
        pipeline_run_url: The orchestrator's page of that run (the Dagster UI's ``/runs/<id>``).
        asset_key: Asset key as a ``/``-joined string or a sequence of path parts.
        code_version: Code version of the asset that produced the run.
        data_version: Version of the input data.
        git_commit: Commit hash; see :meth:`with_git`.
        git_dirty: Whether tracked files had uncommitted changes.
    """

    stage: str
    pipeline_run_id: str | None = None
    pipeline_run_url: str | None = None
    asset_key: str | Sequence[str] | None = None
    code_version: str | None = None
    data_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage.strip():
            raise ValueError(f"stage={self.stage!r} must be a non-empty string such as 'pretrain' or 'kd'")

    def with_git(self, repo_dir: Path) -> RunTags:
        """Return a copy with the git commit and dirty flag of ``repo_dir`` filled in (None outside git)."""
        info = git_info(repo_dir)
        if info is None:
            return self
        return dataclasses.replace(self, git_commit=info.commit, git_dirty=info.dirty)

    def to_dict(self) -> dict[str, str]:
        """Return the tags as MLflow tag keys and string values, leaving out the unknown ones."""
        asset_key = self.asset_key
        if asset_key is not None and not isinstance(asset_key, str):
            asset_key = "/".join(str(part) for part in asset_key)
        pairs = {
            TAG_STAGE: self.stage,
            TAG_PIPELINE_RUN_ID: self.pipeline_run_id,
            TAG_PIPELINE_RUN_URL: self.pipeline_run_url,
            TAG_ASSET_KEY: asset_key,
            TAG_CODE_VERSION: self.code_version,
            TAG_DATA_VERSION: self.data_version,
            TAG_GIT_COMMIT: self.git_commit,
            TAG_GIT_DIRTY: None if self.git_dirty is None else str(self.git_dirty).lower(),
        }
        return {key: str(value) for key, value in pairs.items() if value is not None}


def build_run_tags(
    stage: str,
    *,
    pipeline_run_id: str | None = None,
    pipeline_run_url: str | None = None,
    asset_key: str | Sequence[str] | None = None,
    code_version: str | None = None,
    data_version: str | None = None,
    repo_dir: Path | None = None,
) -> dict[str, str]:
    """Return the standard tag dict for a run; git commit and dirty flag come from ``repo_dir``."""
    tags = RunTags(
        stage=stage,
        pipeline_run_id=pipeline_run_id,
        pipeline_run_url=pipeline_run_url,
        asset_key=asset_key,
        code_version=code_version,
        data_version=data_version,
    )
    if repo_dir is not None:
        tags = tags.with_git(repo_dir)
    return tags.to_dict()
