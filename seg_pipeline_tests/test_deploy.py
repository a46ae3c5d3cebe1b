"""Deployment configs (F30, F16) checked with Dagster's own validation, offline and in seconds.

Every ``dagster.yaml`` goes through ``InstanceRef.from_dir`` (what Dagster does with DAGSTER_HOME at
start-up: top-level schema, storage selector, run queue) and then each configurable class it names
is imported and its config processed against ``cls.config_type()`` with the ``{env: ...}`` values
resolved from variables set here (what ``ConfigurableClassData.rehydrate`` does just before it would
connect to Postgres or Kubernetes). The k8s run config is validated against ``full_pipeline_job``
from the k8s code location, and the pod a training step would get is built with dagster-k8s's own
manifest builder. Needs dagster-postgres and dagster-k8s 0.29.27 (the pairing of dagster 1.13.27).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.autodiscovery import loadable_targets_from_loaded_module
from dagster._core.workspace.config_schema import process_workspace_config
from dagster._serdes import ConfigurableClassData
from dagster._utils.merger import deep_merge_dicts
from dagster._utils.tags import TagConcurrencyLimitsCounter

pytest.importorskip("dagster_postgres", reason="pip install -c constraints.txt dagster-postgres==0.29.27")
pytest.importorskip("dagster_k8s", reason="pip install -c constraints.txt dagster-k8s==0.29.27")

import kubernetes
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
)
from dagster_postgres.utils import pg_url_from_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
INSTANCE_CONFIGS = {
    "laptop": REPO_ROOT / "dagster.yaml",
    "postgres": DEPLOY / "postgres" / "dagster.yaml",
    "k8s": DEPLOY / "k8s" / "dagster.yaml",
}
PG_ENV = {
    "DAGSTER_PG_HOST": "pg.example.test",
    "DAGSTER_PG_PORT": "6543",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "s3cret",
    "DAGSTER_PG_DB": "dagster_test",
}
GPU_TAG = ("seg_pipeline/gpu", "true")
GPU_STEPS = {"pretrained_model", "kd_student_model", "extra_members"}  # assets tagged seg_pipeline/gpu


@pytest.fixture(autouse=True)
def pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_file_module(path: Path) -> ModuleType:
    """Import a .py file that is not inside a package (deploy/ is not one)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instance_ref(config_path: Path, tmp_path: Path) -> InstanceRef:
    """Parse and validate an instance config the way ``DagsterInstance.get()`` does."""
    return InstanceRef.from_dir(
        str(tmp_path), config_dir=str(config_path.parent), config_filename=config_path.name
    )


def processed_class_config(data: ConfigurableClassData) -> tuple[type, Mapping[str, Any]]:
    """``ConfigurableClassData.rehydrate`` up to (not including) instantiation, which would connect."""
    module = importlib.import_module(data.module_name)
    klass = getattr(module, data.class_name)
    result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
    if not result.success:
        raise dg.DagsterInvalidConfigError(
            f"bad config for {data.class_name}", result.errors, data.config_dict
        )
    assert result.value is not None
    return klass, result.value


def class_configs(ref: InstanceRef) -> dict[str, Mapping[str, Any]]:
    """Processed config of every configurable class of the instance, keyed by class name."""
    parts = [
        ref.storage_data,
        ref.run_coordinator_data,
        ref.run_launcher_data,
        ref.local_artifact_storage_data,
        ref.compute_logs_data,
        ref.scheduler_data,
    ]
    configs: dict[str, Mapping[str, Any]] = {}
    for data in parts:
        assert data is not None
        klass, value = processed_class_config(data)
        configs[klass.__name__] = value
    return configs


def run_with_tags(job_name: str, tags: Mapping[str, str]) -> DagsterRun:
    return DagsterRun(job_name=job_name, run_id=make_new_run_id(), tags=dict(tags))


@pytest.fixture(scope="module")
def package_defs() -> dg.Definitions:
    from seg_pipeline.defs.definitions import defs

    return defs


@pytest.fixture(scope="module")
def k8s_defs() -> dg.Definitions:
    return load_file_module(DEPLOY / "k8s" / "definitions_k8s.py").defs


@pytest.fixture(scope="module")
def gpu_run_config() -> dict[str, Any]:
    return load_yaml(DEPLOY / "k8s" / "run_config_gpu.yaml")


# --- instance configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INSTANCE_CONFIGS))
def test_instance_config_and_every_class_config_validate(name: str, tmp_path: Path) -> None:
    configs = class_configs(instance_ref(INSTANCE_CONFIGS[name], tmp_path))
    expected_storage = "DagsterSqliteStorage" if name == "laptop" else "DagsterPostgresStorage"
    expected_launcher = "K8sRunLauncher" if name == "k8s" else "DefaultRunLauncher"
    assert {expected_storage, expected_launcher, "QueuedRunCoordinator"} <= set(configs)


@pytest.mark.parametrize("name", sorted(INSTANCE_CONFIGS))
def test_telemetry_and_nux_are_off(name: str) -> None:
    raw = load_yaml(INSTANCE_CONFIGS[name])
    assert raw["telemetry"] == {"enabled": False}
    assert raw["nux"] == {"enabled": False}


@pytest.mark.parametrize("name", ["postgres", "k8s"])
def test_postgres_url_is_built_from_the_environment(name: str, tmp_path: Path) -> None:
    storage = class_configs(instance_ref(INSTANCE_CONFIGS[name], tmp_path))["DagsterPostgresStorage"]
    assert pg_url_from_config(storage) == "postgresql://dagster:s3cret@pg.example.test:6543/dagster_test"


@pytest.mark.parametrize("name", ["postgres", "k8s"])
def test_missing_postgres_password_variable_is_rejected(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    ref = instance_ref(INSTANCE_CONFIGS[name], tmp_path)
    with pytest.raises(dg.DagsterInvalidConfigError, match="DAGSTER_PG_PASSWORD"):
        processed_class_config(ref.storage_data)


@pytest.mark.parametrize("name", sorted(INSTANCE_CONFIGS))
def test_run_queue_holds_a_second_gpu_run_but_not_an_ingest_run(
    name: str, tmp_path: Path, package_defs: dg.Definitions
) -> None:
    coordinator = instance_ref(INSTANCE_CONFIGS[name], tmp_path).run_coordinator_data.rehydrate()
    queue = coordinator.get_run_queue_config()
    assert queue.max_concurrent_runs >= 2
    gpu_limits = [
        limit for limit in queue.tag_concurrency_limits if (limit["key"], limit.get("value")) == GPU_TAG
    ]
    assert [limit["limit"] for limit in gpu_limits] == [1]

    def job_run(job_name: str) -> DagsterRun:
        return run_with_tags(job_name, package_defs.resolve_job_def(job_name).tags)

    counter = TagConcurrencyLimitsCounter(queue.tag_concurrency_limits, [job_run("train_job")])
    assert counter.is_blocked(job_run("full_pipeline_job"))
    assert not counter.is_blocked(job_run("ingest_job"))


def test_laptop_instance_starts_on_sqlite_with_the_gpu_queue(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_CONFIGS["laptop"], home / "dagster.yaml")
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None
        assert {"key": "seg_pipeline/gpu", "value": "true", "limit": 1} in queue.tag_concurrency_limits
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
    assert (home / "history" / "runs.db").exists()


def _break(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        # Dagster's top-level schema: misspelt Postgres field.
        ("postgres", ("storage", "postgres", "postgres_db", "hostname"), None),
        ("postgres", ("telemetry", "enabled"), "no"),
        # Class schemas: only caught once the class config is processed.
        ("postgres", ("run_coordinator", "config", "max_concurrent_runs"), "four"),
        ("k8s", ("run_launcher", "config", "instance_config_map"), None),
        ("k8s", ("run_launcher", "config", "volume_mounts"), [{"mount_path": "/data"}]),
        # A class or module that does not exist.
        ("k8s", ("run_launcher", "class"), "K8sRunLaunchr"),
        ("postgres", ("run_coordinator", "module"), "dagster_k8s.run_coordinator"),
        ("laptop", ("run_queue", "tag_concurrency_limits"), [{"key": "seg_pipeline/gpu", "limit": "1"}]),
    ],
)
def test_broken_copy_is_rejected(name: str, path: tuple[str, ...], value: Any, tmp_path: Path) -> None:
    broken = _break(load_yaml(INSTANCE_CONFIGS[name]), path, value)
    config_dir = tmp_path / "broken"
    config_dir.mkdir()
    (config_dir / "dagster.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises((dg.DagsterInvalidConfigError, ModuleNotFoundError, AttributeError)):
        class_configs(instance_ref(config_dir / "dagster.yaml", tmp_path))


def test_helm_values_match_the_instance_config() -> None:
    values = load_yaml(DEPLOY / "k8s" / "values.yaml")
    instance = load_yaml(INSTANCE_CONFIGS["k8s"])
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queued["tagConcurrencyLimits"] == instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert values["telemetry"] == {"enabled": False}
    assert values["additionalInstanceConfig"]["local_artifact_storage"] == instance["local_artifact_storage"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    grpc_args = deployment["dagsterApiGrpcArgs"]
    code_file = grpc_args[grpc_args.index("--python-file") + 1]
    workdir = grpc_args[grpc_args.index("--working-directory") + 1]
    assert (REPO_ROOT / Path(code_file).relative_to(workdir)).is_file()


def test_k8s_workspace_points_at_the_code_server() -> None:
    workspace = load_yaml(DEPLOY / "k8s" / "workspace.yaml")
    result = process_workspace_config(workspace)
    assert result.success, result.errors
    (location,) = workspace["load_from"]
    assert location["grpc_server"]["location_name"] == "seg_pipeline"


def test_broken_workspace_is_rejected() -> None:
    workspace = load_yaml(DEPLOY / "k8s" / "workspace.yaml")
    workspace["load_from"][0]["grpc_server"]["hostname"] = workspace["load_from"][0]["grpc_server"].pop(
        "host"
    )
    assert not process_workspace_config(workspace).success


# --- k8s executor run config ----------------------------------------------------------------------


def test_gpu_run_config_validates_against_the_k8s_code_location(
    k8s_defs: dg.Definitions, gpu_run_config: dict[str, Any]
) -> None:
    job = k8s_defs.resolve_job_def("full_pipeline_job")
    # The documented launch merges the op config of configs/gpu.yaml with the executor config.
    merged = deep_merge_dicts(load_yaml(REPO_ROOT / "configs" / "gpu.yaml"), gpu_run_config)
    resolved = dg.validate_run_config(job, merged)
    assert set(resolved["execution"]) == {"k8s"}
    assert set(resolved["execution"]["k8s"]["per_step_k8s_config"]) == GPU_STEPS
    assert resolved["ops"]["pretrained_model"]["config"]["loop"]["device"] == "cuda"


def test_dagster_loads_the_k8s_code_location_file() -> None:
    """What ``dagster api grpc --python-file`` does: exactly one Definitions at module scope."""
    module = load_file_module(DEPLOY / "k8s" / "definitions_k8s.py")
    targets = loadable_targets_from_loaded_module(module)
    assert [target.attribute for target in targets] == ["defs"]


def test_package_default_executor_rejects_the_k8s_run_config(
    package_defs: dg.Definitions, gpu_run_config: dict[str, Any]
) -> None:
    """Why deploy/k8s/definitions_k8s.py exists: the package pins the in-process executor."""
    job = package_defs.resolve_job_def("full_pipeline_job")
    assert job.executor_def.name == "in_process"
    with pytest.raises(dg.DagsterInvalidConfigError, match="per_step_k8s_config"):
        dg.validate_run_config(job, gpu_run_config)


def test_k8s_code_location_keeps_everything_but_the_executor(
    package_defs: dg.Definitions, k8s_defs: dg.Definitions
) -> None:
    for name in ("ingest_job", "train_job", "full_pipeline_job"):
        package_job = package_defs.resolve_job_def(name)
        k8s_job = k8s_defs.resolve_job_def(name)
        assert k8s_job.executor_def.name == "k8s"
        assert set(k8s_job.graph.node_dict) == set(package_job.graph.node_dict)
        assert k8s_job.tags == package_job.tags
    assert set(k8s_defs.resources or {}) == set(package_defs.resources or {})


def test_per_step_gpu_requests_cover_exactly_the_gpu_tagged_assets(
    k8s_defs: dg.Definitions, gpu_run_config: dict[str, Any]
) -> None:
    job_ops = set(k8s_defs.resolve_job_def("full_pipeline_job").graph.node_dict)
    tagged_ops = {
        assets_def.op.name
        for assets_def in k8s_defs.assets or []
        if isinstance(assets_def, dg.AssetsDefinition)
        and any(tags.get(GPU_TAG[0]) == GPU_TAG[1] for tags in assets_def.tags_by_key.values())
    }
    assert tagged_ops == GPU_STEPS
    assert tagged_ops <= job_ops
    assert set(gpu_run_config["execution"]["config"]["per_step_k8s_config"]) == tagged_ops


def test_misspelt_k8s_config_key_is_rejected(
    k8s_defs: dg.Definitions, gpu_run_config: dict[str, Any]
) -> None:
    broken = deep_merge_dicts(
        gpu_run_config,
        {"execution": {"config": {"per_step_k8s_config": {"pretrained_model": {"container_cfg": {}}}}}},
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="container_cfg"):
        dg.validate_run_config(k8s_defs.resolve_job_def("full_pipeline_job"), broken)


def step_pod_spec(
    op_name: str, executor_config: Mapping[str, Any], launcher_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The pod spec the k8s executor would submit for ``op_name``.

    Mirrors ``K8sStepHandler._get_container_context``: run-launcher context, then the executor's
    ``step_k8s_config``, then the per-op override; then dagster-k8s builds the Job manifest.
    """
    launcher_context = K8sContainerContext(
        service_account_name=launcher_config["service_account_name"],
        env_config_maps=launcher_config["env_config_maps"],
        env_secrets=launcher_config["env_secrets"],
        volumes=launcher_config["volumes"],
        volume_mounts=launcher_config["volume_mounts"],
        namespace=launcher_config["job_namespace"],
    )
    executor_context = K8sContainerContext(
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor_config.get("step_k8s_config", {}))
    )
    per_op = UserDefinedDagsterK8sConfig.from_dict(executor_config["per_step_k8s_config"].get(op_name, {}))
    context = launcher_context.merge(executor_context).merge(K8sContainerContext(run_k8s_config=per_op))
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(
            job_image="registry.example.com/seg-pipeline:test",
            dagster_home=launcher_config["dagster_home"],
            instance_config_map=launcher_config["instance_config_map"],
            postgres_password_secret=launcher_config["postgres_password_secret"],
        ),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{op_name.replace('_', '-')}",
        user_defined_k8s_config=context.run_k8s_config,
    )
    manifest = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    return manifest["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def launcher_config() -> Mapping[str, Any]:
    base = Path(__file__).parent  # any existing folder: the launcher part needs no storage
    ref = InstanceRef.from_dir(
        str(base), config_dir=str(INSTANCE_CONFIGS["k8s"].parent), config_filename="dagster.yaml"
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in PG_ENV.items():
            patch.setenv(name, value)
        klass, value = processed_class_config(ref.run_launcher_data)
    assert klass.__name__ == "K8sRunLauncher"
    return value


@pytest.mark.parametrize("op_name", sorted(GPU_STEPS))
def test_training_step_pod_gets_one_gpu_the_data_volume_and_shared_memory(
    op_name: str,
    k8s_defs: dg.Definitions,
    gpu_run_config: dict[str, Any],
    launcher_config: Mapping[str, Any],
) -> None:
    resolved = dg.validate_run_config(k8s_defs.resolve_job_def("full_pipeline_job"), gpu_run_config)
    spec = step_pod_spec(op_name, resolved["execution"]["k8s"], launcher_config)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"seg-data": "/data", "dshm": "/dev/shm"}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["seg-data"]["persistentVolumeClaim"] == {"claimName": "seg-pipeline-data"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    password = next(env for env in container["env"] if env["name"] == "DAGSTER_PG_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "dagster-postgresql-secret"
    assert {"configMapRef": {"name": "seg-pipeline-env"}} in container["envFrom"]


def test_non_training_step_pod_gets_no_gpu(
    k8s_defs: dg.Definitions, gpu_run_config: dict[str, Any], launcher_config: Mapping[str, Any]
) -> None:
    resolved = dg.validate_run_config(k8s_defs.resolve_job_def("full_pipeline_job"), gpu_run_config)
    spec = step_pod_spec("tile_headers", resolved["execution"]["k8s"], launcher_config)
    (container,) = spec["containers"]
    assert "limits" not in container["resources"]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert [volume["name"] for volume in spec["volumes"]] == ["seg-data"]


# --- torchrun launcher ----------------------------------------------------------------------------


def test_torchrun_script_rejects_a_folder_that_was_not_ingested(tmp_path: Path) -> None:
    script = load_file_module(DEPLOY / "torchrun" / "train_stage.py")
    args = script.parse_args(["--dataset-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ckpt")])
    settings = script.stage_settings(REPO_ROOT / "configs" / "gpu.yaml")  # the same schema as the asset
    assert (settings.loader.batch_size, settings.loop.epochs, settings.loop.device) == (8, 50, "cuda")
    from seg_pipeline.workflows.ingest import load_shard_set

    with pytest.raises(ValueError, match=r"has no headers\.parquet, splits\.parquet, manifest\.json"):
        load_shard_set(args.dataset_dir)
