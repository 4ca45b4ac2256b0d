"""cluster/: the launcher YAMLs pass Ray's own cluster-config validation (what `ray up` checks before any cloud
call), the KubeRay manifests parse as the expected resources, and every job script, config, Serve import path
and file they name exists in the repository and loads. Nothing is launched."""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rayblora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ("aws-gpu.yaml", "gcp-gpu.yaml")
NODE_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAYBLORA_CACHE",
            "RAY_AUTH_MODE")
SHARED = "/mnt/shared"


def documents(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), name
    return docs


def kube_resource(name: str, kind: str) -> dict:
    [resource] = [d for d in documents(name) if d.get("kind") == kind]
    return resource


def serve_applications(serve_config: dict) -> list[dict]:
    apps = serve_config.get("applications")
    assert apps, "a Serve config needs applications"
    return apps


def check_import_path(import_path: str) -> None:
    """`module:attribute` names a module file of this repository defining `attribute` at top level."""
    module, _, attribute = import_path.partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), import_path
    tree = ast.parse(source.read_text())
    assert attribute in {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}, import_path


def check_serve_application(app: dict) -> None:
    check_import_path(app["import_path"])
    args = app.get("args", {})
    assert args.get("posteriors"), "the application must name the posteriors it serves"
    load_config(args.get("config"), args.get("overrides", []))  # a bad override would fail the deployment


def test_every_yaml_under_cluster_parses():
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == ["aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"]
    for name in names:
        documents(name)
    assert len(documents("kuberay-rayjob.yaml")) == 2  # the shared PVC and the RayJob


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = documents(name)[0]
    validate_config(prepare_config(copy.deepcopy(raw)))
    workers = [t for k, t in raw["available_node_types"].items() if k != raw["head_node_type"]]
    assert workers and all(t.get("max_workers", 0) >= 1 for t in workers)
    assert raw["file_mounts"]["~/rayblora"] == "."  # the checkout, installed by the setup commands
    setup = " ".join(raw["setup_commands"])
    assert '"torch==2.13.0"' in setup and "-e ~/rayblora" in setup
    options = " ".join(raw["docker"]["run_options"])
    assert all(f"--env {var}=" in options for var in NODE_ENV)
    assert f"--volume {SHARED}:{SHARED}" in options
    assert any(SHARED in c for c in raw["initialization_commands"])  # the host mounts the shared filesystem


def test_rayjob_trains_the_gpu_config_on_the_shared_volume():
    job = kube_resource("kuberay-rayjob.yaml", "RayJob")
    pvc = kube_resource("kuberay-rayjob.yaml", "PersistentVolumeClaim")
    assert job["apiVersion"] == "ray.io/v1" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    argv = shlex.split(job["spec"]["entrypoint"].split("&&")[-1])
    assert argv[:2] == ["python", "jobs/train_ensemble.py"] and (ROOT / argv[1]).is_file()
    config_path = argv[argv.index("--config") + 1]
    cfg = load_config(ROOT / config_path, argv[argv.index("--config") + 2:])
    assert cfg.cluster.use_gpu and cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 2
    cluster = job["spec"]["rayClusterSpec"]
    gpus = sum(int(g["replicas"]) * int(container["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"] for container in g["template"]["spec"]["containers"])
    assert gpus >= cfg.posterior.members * cfg.cluster.workers_per_member  # all members fit at once
    assert cfg.cluster.storage_path.startswith(SHARED) and cfg.output.dir.startswith(SHARED)
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        spec = pod["template"]["spec"]
        assert {"claimName": pvc["metadata"]["name"]} in [v.get("persistentVolumeClaim") for v in spec["volumes"]]
        assert all(SHARED in [m["mountPath"] for m in c["volumeMounts"]] for c in spec["containers"])


def test_rayservice_serves_what_the_rayjob_wrote_with_the_serve_config_app():
    service = kube_resource("kuberay-rayservice.yaml", "RayService")
    apps = serve_applications(yaml.safe_load(service["spec"]["serveConfigV2"]))
    job_argv = shlex.split(kube_resource("kuberay-rayjob.yaml", "RayJob")["spec"]["entrypoint"].split("&&")[-1])
    trained = load_config(ROOT / job_argv[job_argv.index("--config") + 1], [])
    for app in apps:
        check_serve_application(app)
        assert f"{trained.output.dir}/posterior" in app["args"]["posteriors"].values()
    local_apps = serve_applications(yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text()))
    for app in local_apps:
        check_serve_application(app)
    assert {a["import_path"] for a in apps} == {a["import_path"] for a in local_apps}


def test_every_repository_file_the_cluster_files_name_exists():
    texts = {p.name: p.read_text() for p in CLUSTER.iterdir() if p.is_file()}
    pattern = re.compile(r"\b(?:jobs|cluster)/[\w./-]+\.(?:py|yaml|md)\b")
    named = {m for text in texts.values() for m in pattern.findall(text)}
    assert "jobs/train_ensemble.py" in named and "jobs/configs/gpu.yaml" in named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"named but missing: {missing}"
    for line in texts["Dockerfile"].splitlines():  # what the image copies in
        if line.startswith("COPY"):
            for source in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / source).exists(), source


def test_gpu_config_starts_with_its_launch_command():
    text = (ROOT / "jobs" / "configs" / "gpu.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.startswith("#") and "python jobs/train_ensemble.py --config jobs/configs/gpu.yaml" in header
    assert "kubectl apply -f cluster/kuberay-rayjob.yaml" in header
