"""Tests for seg_pipeline.tracking on a real MLflow SQLite store, one per module (creating one costs ~5 s)."""

from __future__ import annotations

import http.server
import json
import os
import platform
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from seg_pipeline import tracking
from seg_pipeline.tracking import (
    TrackingSettings,
    TrackingUnavailableError,
    build_run_tags,
    check_tracking_uri,
    flatten_params,
    get_alias_version,
    load_model,
    log_environment,
    register_model,
    run_url,
    set_alias,
    start_run,
)
from seg_pipeline_tests.conftest import scratch_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TrackingSettings:
    """One SQLite store + artefact root shared by the module, with its experiment already created."""
    data_root = scratch_dir(request, tmp_path_factory, "tracking_data")
    settings = TrackingSettings(
        tracking_uri=f"sqlite:///{data_root}/mlflow/mlflow.db",
        experiment_name="tracking-tests",
        artifact_root=data_root / "mlflow" / "artifacts",
    )
    check_tracking_uri(settings)
    tracking.ensure_experiment(settings)  # pays the table creation once
    return settings


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run every test in an empty cwd and fail it if MLflow wrote its defaults (./mlruns, ./mlflow.db)."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    yield workdir
    assert not (workdir / "mlruns").exists()
    assert not (workdir / "mlflow.db").exists()


def _client(settings: TrackingSettings) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=settings.tracking_uri)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Settings and URIs
# --------------------------------------------------------------------------------------------------


def test_default_tracking_uri_is_absolute_sqlite_under_data_root(
    in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    expected = "sqlite:///" + str(in_tmp_cwd.resolve()) + "/data/mlflow/mlflow.db"
    assert tracking.default_tracking_uri(Path("data")) == expected
    assert expected.startswith("sqlite:////")  # four slashes: an absolute path

    settings = TrackingSettings.from_data_root(Path("data"))
    assert settings.tracking_uri == expected
    assert settings.artifact_root == in_tmp_cwd.resolve() / "data" / "mlflow" / "artifacts"
    assert settings.experiment_name == "seg_pipeline"
    assert settings.registry_uri is None


def test_env_tracking_uri_overrides_default_and_http_leaves_artifacts_to_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.default_tracking_uri(tmp_path) == "http://mlflow.example:5000"
    settings = TrackingSettings.from_data_root(tmp_path)
    assert settings.tracking_uri == "http://mlflow.example:5000"
    assert settings.artifact_root is None


def test_settings_reject_empty_values() -> None:
    with pytest.raises(ValueError, match="tracking_uri"):
        TrackingSettings(tracking_uri=" ")
    with pytest.raises(ValueError, match="experiment_name"):
        TrackingSettings(tracking_uri="sqlite:///x.db", experiment_name="")


def test_configure_environment_keeps_user_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    tracking.configure_environment()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    tracking.configure_environment()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_import_disables_telemetry_and_does_not_import_torch_or_dagster() -> None:
    code = (
        "import sys, seg_pipeline.tracking\n"
        "import mlflow.telemetry as t\n"
        "print('torch' in sys.modules, 'dagster' in sys.modules, t.get_telemetry_client() is None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=True
    )
    assert result.stdout.split() == ["False", "False", "True"]


def test_run_url_links_http_servers_and_describes_local_stores() -> None:
    assert run_url("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert run_url("sqlite:////d/mlflow.db", "3", "abc") == "sqlite:////d/mlflow.db run abc"


def test_a_local_store_links_to_the_ui_that_serves_it() -> None:
    local = TrackingSettings("sqlite:////d/mlflow.db", ui_url="http://127.0.0.1:5000/")
    assert local.run_link("3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert (
        local.model_version_link("seg student", "7")
        == "http://127.0.0.1:5000/#/models/seg%20student/versions/7"
    )
    server = TrackingSettings("https://mlflow.example.org", ui_url="http://127.0.0.1:5000")
    assert server.run_link("3", "abc").startswith("https://mlflow.example.org/#/")  # the server is its own UI
    assert TrackingSettings("sqlite:////d/mlflow.db").model_version_link("m", "1") is None
    assert local.logged_model_link("3", "m-0af1") == "http://127.0.0.1:5000/#/experiments/3/models/m-0af1"
    assert TrackingSettings("sqlite:////d/mlflow.db").logged_model_link("3", "m-0af1") is None


def test_experiments_are_tagged_as_model_development_so_the_ui_opens_their_runs(
    store: TrackingSettings,
) -> None:
    experiment = store.client().get_experiment(tracking.ensure_experiment(store))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


# --------------------------------------------------------------------------------------------------
# Reachability check
# --------------------------------------------------------------------------------------------------


def test_unreachable_http_uri_fails_fast_with_uri_and_remedy() -> None:
    uri = f"http://127.0.0.1:{_free_loopback_port()}"
    settings = TrackingSettings(tracking_uri=uri)
    with pytest.raises(TrackingUnavailableError) as caught:
        check_tracking_uri(settings, timeout_s=2)
    message = str(caught.value)
    assert uri in message
    assert "unset MLFLOW_TRACKING_URI" in message
    assert "cannot connect" in message
    assert isinstance(caught.value, RuntimeError)


def test_start_run_on_unreachable_server_raises_before_creating_a_run() -> None:
    settings = TrackingSettings(tracking_uri=f"http://127.0.0.1:{_free_loopback_port()}")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.raises(TrackingUnavailableError), start_run(settings, "never"):
        pytest.fail("the block must not run")
    assert os.environ.get("MLFLOW_TRACKING_URI") == previous


class _FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers the experiments-search probe like MLflow (200) or like a non-MLflow server (404)."""

    def do_GET(self) -> None:
        status = 200 if self.path.startswith("/api/2.0/mlflow/experiments/search") else 404
        body = b'{"experiments": []}' if status == 200 else b"not found"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_check_accepts_an_mlflow_answer_and_rejects_other_servers(fake_server: str) -> None:
    check_tracking_uri(TrackingSettings(tracking_uri=fake_server))
    with pytest.raises(TrackingUnavailableError, match="not an MLflow tracking server"):
        check_tracking_uri(TrackingSettings(tracking_uri=fake_server + "/wrong-prefix"))


def test_sqlite_store_under_a_file_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    uri = f"sqlite:///{blocker}/mlflow/mlflow.db"
    with pytest.raises(TrackingUnavailableError, match="cannot create the database folder") as caught:
        check_tracking_uri(TrackingSettings(tracking_uri=uri))
    assert uri in str(caught.value)


def test_corrupt_sqlite_file_is_reported(tmp_path: Path) -> None:
    db_file = tmp_path / "mlflow.db"
    db_file.write_bytes(b"this is not a sqlite database, just text" * 100)
    with pytest.raises(TrackingUnavailableError, match="SQLite database"):
        check_tracking_uri(TrackingSettings(tracking_uri=f"sqlite:///{db_file}"))


def test_check_creates_local_folders(tmp_path: Path) -> None:
    settings = TrackingSettings(
        tracking_uri=f"sqlite:///{tmp_path}/a/b/mlflow.db", artifact_root=tmp_path / "a" / "artifacts"
    )
    check_tracking_uri(settings)
    assert (tmp_path / "a" / "b").is_dir()
    assert (tmp_path / "a" / "artifacts").is_dir()
    assert not (tmp_path / "a" / "b" / "mlflow.db").exists()  # MLflow creates the tables itself


# --------------------------------------------------------------------------------------------------
# Tags and params
# --------------------------------------------------------------------------------------------------


def test_flatten_params_joins_keys_with_dots_and_stringifies() -> None:
    params = {
        "optim": {"lr": 3e-4, "betas": (0.9, 0.999), "schedule": {"warmup": 5}},
        "data_root": Path("data/tiles"),
        "classes": ["bg", "road"],
        "empty": {},
        "seed": 7,
        "ema": None,
    }
    assert flatten_params(params) == {
        "optim.lr": "0.0003",
        "optim.betas": "[0.9, 0.999]",
        "optim.schedule.warmup": "5",
        "data_root": "data/tiles",
        "classes": '["bg", "road"]',
        "empty": "{}",
        "seed": "7",
        "ema": "None",
    }


def test_flatten_params_truncates_to_mlflow_limit() -> None:
    flat = flatten_params({"long": "x" * 7000, "short": "y" * 6000})
    assert len(flat["long"]) == 6000
    assert flat["long"] == "x" * 5997 + "..."
    assert flat["short"] == "y" * 6000  # exactly at the limit: untouched


def test_build_run_tags_reads_git_commit_and_dirty_flag(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run(
        [*git, "log", "-1", "--format=%H"], check=True, capture_output=True, text=True
    ).stdout.strip()

    tags = build_run_tags(
        "pretrain",
        pipeline_run_id="dagster-run-1",
        asset_key=["models", "pretrained"],
        code_version="v3",
        data_version="abc123",
        repo_dir=repo,
    )
    assert tags == {
        "seg_pipeline.stage": "pretrain",
        "dagster.run_id": "dagster-run-1",
        "dagster.asset_key": "models/pretrained",
        "seg_pipeline.code_version": "v3",
        "seg_pipeline.data_version": "abc123",
        "mlflow.source.git.commit": head,
        "seg_pipeline.git_dirty": "false",
    }
    (repo / "a.txt").write_text("2")
    assert tracking.git_info(repo) == tracking.GitInfo(commit=head, dirty=True)


def test_git_commit_is_none_outside_a_repository(tmp_path: Path) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    assert tracking.git_commit(outside) is None
    assert build_run_tags("kd", repo_dir=outside) == {"seg_pipeline.stage": "kd"}


def test_run_tags_need_a_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        build_run_tags("")


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def test_run_records_tags_params_and_metric_history(store: TrackingSettings, in_tmp_cwd: Path) -> None:
    tags = build_run_tags("pretrain", pipeline_run_id="dg-42", asset_key="pretrained_model")
    with start_run(store, "pretrain-test", tags) as run:
        run.log_params({"optim": {"lr": 3e-4, "weight_decay": 0.01}, "note": "z" * 7000})
        for epoch, (loss, miou) in enumerate([(0.9, 0.1), (0.5, 0.3), (0.25, 0.6)]):
            run.log_metrics({"train/loss": loss, "val/miou": torch.tensor(miou)}, step=epoch)
        run_id = run.run_id

    finished = _client(store).get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.info.run_name == "pretrain-test"
    assert finished.data.tags["dagster.run_id"] == "dg-42"
    assert finished.data.tags["dagster.asset_key"] == "pretrained_model"
    assert finished.data.tags["seg_pipeline.stage"] == "pretrain"
    assert finished.data.params["optim.lr"] == "0.0003"
    assert finished.data.params["optim.weight_decay"] == "0.01"
    assert finished.data.params["note"] == "z" * 5997 + "..."
    history = _client(store).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.5), (2, 0.25)]
    miou = _client(store).get_metric_history(run_id, "val/miou")
    assert sorted(m.step for m in miou) == [0, 1, 2]
    assert sorted(m.value for m in miou) == pytest.approx([0.1, 0.3, 0.6])
    assert run.url == f"{store.tracking_uri} run {run_id}"
    assert not (in_tmp_cwd / "mlruns").exists()


def test_log_metrics_sends_one_batch_per_call(
    store: TrackingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with start_run(store, "batching") as run:
        calls: list[int] = []
        real_log_batch = run._client.log_batch

        def counting_log_batch(run_id: str, **kwargs: object) -> object:
            calls.append(len(kwargs.get("metrics", ())))  # type: ignore[arg-type]
            return real_log_batch(run_id, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(run._client, "log_batch", counting_log_batch)
        run.log_metrics({f"m{i}": float(i) for i in range(12)}, step=3)
        run_id = run.run_id
    assert calls == [12]
    assert _client(store).get_run(run_id).data.metrics["m11"] == 11.0


def test_log_metrics_rejects_bad_values_and_steps(store: TrackingSettings) -> None:
    with start_run(store, "bad-metrics") as run:
        with pytest.raises(ValueError, match="'val/miou'"):
            run.log_metrics({"val/miou": "high"}, step=0)
        with pytest.raises(ValueError, match="step=-1"):
            run.log_metrics({"loss": 1.0}, step=-1)


def test_artifacts_land_under_artifact_root_not_mlruns(store: TrackingSettings, in_tmp_cwd: Path) -> None:
    config_file = in_tmp_cwd / "resolved_config.yaml"
    config_file.write_text("lr: 0.0003\n")
    plots = in_tmp_cwd / "plots"
    plots.mkdir()
    (plots / "a.txt").write_text("a")
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])

    with start_run(store, "artefacts") as run:
        run.log_artifact(config_file)
        run.log_artifact(config_file, artifact_path="configs")
        run.log_artifact(plots, artifact_path="plots")
        run.log_dict({"confusion": [[3, 1], [0, 4]]}, "eval/confusion.json")
        run.log_text("hello", "notes/readme.txt")
        run.log_figure(figure, "plots/loss.png")
        with pytest.raises(ValueError, match="does not exist"):
            run.log_artifact(in_tmp_cwd / "missing.pt")
        run_id = run.run_id

    run_root = store.artifact_root / run_id / "artifacts"  # type: ignore[operator]
    assert (run_root / "resolved_config.yaml").read_text() == "lr: 0.0003\n"
    assert (run_root / "configs" / "resolved_config.yaml").is_file()
    assert (run_root / "plots" / "a.txt").read_text() == "a"
    assert json.loads((run_root / "eval" / "confusion.json").read_text()) == {"confusion": [[3, 1], [0, 4]]}
    assert (run_root / "notes" / "readme.txt").read_text() == "hello"
    assert (run_root / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (in_tmp_cwd / "mlruns").exists()


def test_failing_block_marks_run_failed_and_propagates(store: TrackingSettings) -> None:
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    seen: dict[str, str] = {}
    with pytest.raises(ZeroDivisionError), start_run(store, "doomed") as run:
        seen["run_id"] = run.run_id
        _ = 1 / 0
    assert _client(store).get_run(seen["run_id"]).info.status == "FAILED"
    assert mlflow.active_run() is None
    assert os.environ.get("MLFLOW_TRACKING_URI") == previous_uri  # global URI restored


def test_nested_run_is_linked_to_its_parent(store: TrackingSettings) -> None:
    with start_run(store, "parent") as parent, start_run(store, "child", nested=True) as child:
        child_id, parent_id = child.run_id, parent.run_id
    assert _client(store).get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id


def test_log_environment_records_versions_and_json(store: TrackingSettings) -> None:
    with start_run(store, "env") as run:
        info = log_environment(run, repo_dir=REPO_ROOT)
        run_id = run.run_id
    logged = _client(store).get_run(run_id)
    assert logged.data.params["env.python"] == platform.python_version()
    assert logged.data.params["env.mlflow"] == mlflow.__version__
    assert logged.data.params["env.torch"].split("+")[0] == torch.__version__.split("+")[0]
    environment_file = store.artifact_root / run_id / "artifacts" / "environment.json"  # type: ignore[operator]
    assert json.loads(environment_file.read_text())["packages"]["numpy"] == info["packages"]["numpy"]
    assert info["cuda"]["available"] == torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Models and registry
# --------------------------------------------------------------------------------------------------


def test_model_is_logged_registered_aliased_and_loaded_back(store: TrackingSettings) -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, kernel_size=3, padding=1).eval()
    inputs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(inputs)

    with start_run(store, "model") as run:
        logged = run.log_model(model, registered_model_name="tiny-conv")
        run_id = run.run_id
    assert logged.model_uri.startswith("models:/")
    assert logged.registered_version == "1"

    set_alias("tiny-conv", "champion", logged.registered_version, settings=store)
    champion = get_alias_version("tiny-conv", "champion", settings=store)
    assert champion is not None
    assert (champion.name, champion.version, champion.run_id) == ("tiny-conv", "1", run_id)
    assert champion.aliases == ("champion",)
    assert champion.model_uri == "models:/tiny-conv/1"

    for uri in ("models:/tiny-conv@champion", logged.model_uri):
        loaded = load_model(uri, settings=store)
        assert isinstance(loaded, nn.Conv2d)
        with torch.no_grad():
            torch.testing.assert_close(loaded(inputs), expected)

    # A second registration of the same model makes version 2; moving the alias is visible.
    second = register_model(logged.model_uri, "tiny-conv", settings=store)
    assert second == "2"
    set_alias("tiny-conv", "champion", second, settings=store)
    moved = get_alias_version("tiny-conv", "champion", settings=store)
    assert moved is not None and moved.version == "2"


def test_logged_model_requirements_are_the_installed_versions(
    store: TrackingSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with start_run(store, "requirements") as run:
        logged = run.log_model(nn.Linear(2, 1))
    assert logged.registered_version is None
    # download_artifacts resolves models:/ URIs through the global URIs, which the env vars set.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store.tracking_uri)
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=logged.model_uri, dst_path=str(tmp_path))
    lines = (Path(model_dir) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in lines


def test_get_alias_version_returns_none_for_missing_model_or_alias(store: TrackingSettings) -> None:
    assert get_alias_version("no-such-model", "champion", settings=store) is None
    with start_run(store, "alias-less") as run:
        logged = run.log_model(nn.Linear(2, 1), registered_model_name="alias-less-model")
    assert logged.registered_version == "1"
    assert get_alias_version("alias-less-model", "champion", settings=store) is None


def test_registry_helpers_without_settings_use_env_uri_or_refuse(
    store: TrackingSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="settings=None"):
        get_alias_version("tiny-conv", "champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    assert get_alias_version("never-registered", "champion") is None
