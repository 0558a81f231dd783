"""The deployment files in cluster/ agree with the code: they parse, name the Serve app and the batch
entry point the code provides, give every container the settings the code reads, and point at
Secrets, volumes and services that the manifests define."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from storymem.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent
REQUIRED_ENV = {"STORYMEM_S3_ENDPOINT", "STORYMEM_S3_BUCKET", "STORYMEM_S3_ACCESS_KEY", "STORYMEM_S3_SECRET_KEY"}


def _docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    assert docs, name
    return docs


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["kind"] for d in docs])
    return found[0]


def _pod_specs(cluster_spec: dict) -> dict[str, dict]:
    specs = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def _env_read_by_code() -> set[str]:
    names = set()
    for path in [REPO / "serve_app.py", *(REPO / "storymem").glob("*.py"), *(REPO / "cluster").glob("*.py")]:
        names |= set(re.findall(r"\"(STORYMEM_[A-Z0-9_]+)\"", path.read_text()))
    return names


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return {name: _docs(name) for name in ("rayservice.yaml", "rayjob-batch.yaml", "minio.yaml")}


def test_every_manifest_parses_with_kinds_and_names(manifests):
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
    assert {d["kind"] for d in manifests["minio.yaml"]} == {"Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    assert _one(manifests["rayservice.yaml"], "RayService")["apiVersion"] == "ray.io/v1"
    assert _one(manifests["rayjob-batch.yaml"], "RayJob")["apiVersion"] == "ray.io/v1"


def test_code_reads_the_storage_and_token_variables():
    # The manifests set these; the code must be what reads them (grep, not a copy of a list).
    config_text = (REPO / "storymem" / "config.py").read_text()
    for var in REQUIRED_ENV | {"STORYMEM_API_TOKEN"}:
        assert f'"{var}"' in config_text, var


@pytest.mark.parametrize("source", ["rayservice.yaml", "serve.yaml"])
def test_serve_configs_run_the_app_builder(manifests, source):
    import serve_app
    from ray.serve.schema import ServeDeploySchema

    if source == "serve.yaml":
        serve_cfg = yaml.safe_load((CLUSTER / source).read_text())
    else:
        serve_cfg = yaml.safe_load(_one(manifests[source], "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # what `serve deploy` and KubeRay accept
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "serve_app:build_app"
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(__import__(module), attr)) and attr == serve_app.build_app.__name__
    assert app["name"] == serve_app.APP_NAME and app["route_prefix"] == "/"
    # build_app accepts exactly these options; an unknown one would fail the deployment.
    assert set(app.get("args", {})) <= {"config", "allow_no_auth", "replicas", "start_engine"}
    assert "allow_no_auth" not in app.get("args", {})  # the cluster runs with a token
    assert serve_cfg["http_options"]["port"] == 8000


def _config_map(docs) -> tuple[dict, str]:
    cm = _one(docs, "ConfigMap", "storymem-config")
    (key,) = cm["data"]
    return cm, key


def test_config_map_is_a_valid_config_with_paths_on_the_model_volume(manifests, tmp_path):
    docs = manifests["rayservice.yaml"]
    cm, key = _config_map(docs)
    path = tmp_path / key
    path.write_text(cm["data"][key])
    cfg = load_config(path)  # unknown keys or bad values raise
    assert "storage" not in yaml.safe_load(cm["data"][key])  # S3 settings come from the environment
    mount = _mount_path(docs, "models")
    for field in ("t2v_path", "i2v_path", "lora_release"):
        value = getattr(cfg.model, field)
        assert value is not None and str(value).startswith(mount + "/"), field
    for value in (cfg.scoring.clip_weights, cfg.scoring.aesthetic_weights):
        assert str(value).startswith(mount + "/")
    assert cfg.engine.gpus_per_generator >= 1 and cfg.engine.detached
    gpu_group = next(g for g in _one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                     if g["groupName"] == "gpu")  # fmt: skip
    gpus = gpu_group["replicas"] * int(gpu_group["rayStartParams"]["num-gpus"])
    assert cfg.engine.num_generators * cfg.engine.gpus_per_generator <= gpus


def _mount_path(docs, volume: str) -> str:
    spec = _one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume]
    return mount


@pytest.mark.parametrize("name,kind,key", [("rayservice.yaml", "RayService", "rayClusterConfig"),
                                           ("rayjob-batch.yaml", "RayJob", "rayClusterSpec")])  # fmt: skip
def test_every_ray_pod_gets_settings_volumes_and_one_image(manifests, name, kind, key):
    service_docs = manifests["rayservice.yaml"]
    secrets = {d["metadata"]["name"]: d for d in manifests["minio.yaml"] + service_docs if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for d in manifests["minio.yaml"] + service_docs
              if d["kind"] == "PersistentVolumeClaim"}  # fmt: skip
    config_maps = {d["metadata"]["name"]: d for d in service_docs if d["kind"] == "ConfigMap"}
    read = _env_read_by_code()
    resource = _one(manifests[name], kind)
    cluster = resource["spec"][key]
    pods = _pod_specs(cluster)
    assert {"head", "gpu", "cpu"} <= set(pods)
    images = set()
    for group, pod in pods.items():
        (container,) = pod["containers"]
        images.add(container["image"])
        env = {e["name"]: e for e in container["env"]}
        assert REQUIRED_ENV <= set(env), (group, REQUIRED_ENV - set(env))
        for var in env:
            if var.startswith("STORYMEM_"):
                assert var in read, f"{group}: {var} is read by no code"
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"], (group, ref)
        config_path = env["STORYMEM_CONFIG"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts) == set(volumes)
        cm_name = volumes["config"]["configMap"]["name"]
        assert config_path == f"{mounts['config']}/{next(iter(config_maps[cm_name]['data']))}"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] in claims
    assert len(images) == 1  # one image for every pod
    gpu = pods["gpu"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in str(pods["cpu"]) and "nvidia.com/gpu" not in str(pods["head"])
    assert cluster["rayVersion"] == __import__("ray").__version__


def test_service_pods_get_the_api_token_and_the_s3_endpoint_is_the_minio_service(manifests):
    service = _one(manifests["rayservice.yaml"], "RayService")
    minio_service = _one(manifests["minio.yaml"], "Service", "minio")
    minio = _one(manifests["minio.yaml"], "Deployment", "minio")["spec"]["template"]["spec"]["containers"][0]
    minio_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    ports = {p["port"] for p in minio_service["spec"]["ports"]}
    for pod in _pod_specs(service["spec"]["rayClusterConfig"]).values():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["STORYMEM_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "storymem-api"
        host, _, port = env["STORYMEM_S3_ENDPOINT"]["value"].partition(":")
        assert host == minio_service["metadata"]["name"] and int(port) in ports
        # The service signs with the credentials MinIO was started with.
        assert env["STORYMEM_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == minio_env["MINIO_ROOT_USER"]
        assert env["STORYMEM_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == minio_env["MINIO_ROOT_PASSWORD"]


def test_rayjob_entrypoint_is_a_valid_batch_command(manifests):
    from storymem import batch

    job = _one(manifests["rayjob-batch.yaml"], "RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "actors.batch"]
    import actors.batch

    assert callable(actors.batch.main)  # the in-cluster entry over storymem.batch's options
    args = batch.build_parser().parse_args(argv[3:])
    assert args.scripts.startswith("s3://") and args.out.startswith("s3://") and args.out.endswith(".parquet")
    bucket = args.out[len("s3://") :].split("/")[0]
    pod = _pod_specs(job["spec"]["rayClusterSpec"])["head"]["containers"][0]
    env = {e["name"]: e.get("value") for e in pod["env"]}
    assert bucket == env["STORYMEM_S3_BUCKET"] == args.scripts[len("s3://") :].split("/")[0]
    assert args.config == env["STORYMEM_CONFIG"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_dockerfile_installs_the_package_and_its_entry_points():
    text = (CLUSTER / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M) and 'requires-python = ">=3.11"' in pyproject
    for path in ("storymem", "actors", "serve_app.py", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert (REPO / path).exists()
    assert re.search(r"pip install .*torch==2\.14\.1 torchvision==0\.29\.1", text)
    assert "torch==2.14.1" in pyproject and "torchvision==0.29.1" in pyproject
    assert re.search(r"pip install --no-cache-dir \.", text)
    assert "import serve_app, storymem.batch, actors.batch" in text


def test_readme_names_the_files_and_the_values_to_set():
    readme = (CLUSTER / "README.md").read_text()
    for word in ("minio.yaml", "rayservice.yaml", "rayjob-batch.yaml", "Dockerfile", "storymem-models",
                 "i2v_path", "t2v_path", "lora_release", "Wan2.2-MI2V-A14B", "Wan2.2-MM2V-A14B", "STORYMEM_API_TOKEN",
                 "make serve", "make stop", "ray job submit"):  # fmt: skip
        assert word in readme, word


# ---------------------------------------------------------------------------------------- not open


def _containers(cluster_spec: dict):
    for name, spec in _pod_specs(cluster_spec).items():
        for container in spec["containers"]:
            yield name, container


def _pod_labels(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"].get("metadata", {}).get("labels", {}) for g in groups]


@pytest.mark.parametrize("source,kind,spec_key", [("rayservice.yaml", "RayService", "rayClusterConfig"),
                                                  ("rayjob-batch.yaml", "RayJob", "rayClusterSpec")])  # fmt: skip
def test_ray_pods_use_token_auth_from_a_secret_and_sit_behind_the_network_policy(manifests, source, kind, spec_key):
    cluster_spec = _one(manifests[source], kind)["spec"][spec_key]
    for name, container in _containers(cluster_spec):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", (source, name)
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "storymem-ray", (source, name)
        for e in container["env"]:  # every secret comes from a Secret, never a literal value
            if any(word in e["name"] for word in ("TOKEN", "KEY", "PASSWORD")) and e["name"] != "RAY_AUTH_MODE":
                assert "valueFrom" in e and "value" not in e, (source, name, e["name"])
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert 10001 not in ports  # no Ray Client port
    policy = _one(manifests["rayservice.yaml"], "NetworkPolicy", "storymem-ray")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    for labels in _pod_labels(cluster_spec):
        assert selector.items() <= labels.items(), (source, labels)
    # Ray's ports only from StoryMem pods or the operator; from anywhere only the API port.
    open_rules = [r for r in policy["ingress"] if "from" not in r]
    assert [p["port"] for r in open_rules for p in r["ports"]] == [8000]
    assert all("ports" not in r for r in policy["ingress"] if "from" in r)


def test_gcs_fault_tolerance_uses_the_redis_the_manifests_define(manifests):
    redis = _docs("redis.yaml")
    spec = _one(manifests["rayservice.yaml"], "RayService")["spec"]["rayClusterConfig"]
    ft = spec["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].partition(":")
    service = _one(redis, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _one(redis, "Secret", ref["name"])["stringData"]
    deployment = _one(redis, "Deployment", "redis")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_service_refuses_every_sample_secret_of_the_manifests(manifests):
    from storymem.config import ServiceConfig, StorageConfig, StoryMemConfig
    from storymem.service.facade import check_deployment, check_security

    secrets = [d for docs in [*manifests.values(), _docs("redis.yaml")] for d in docs if d["kind"] == "Secret"]
    values = [v for d in secrets for v in d.get("stringData", {}).values() if len(v) >= 16]
    assert len(values) >= 4  # api token, ray token, minio key, redis password
    for value in values:
        with pytest.raises(ValueError, match="sample"):
            check_security(ServiceConfig(api_token=value))
    minio = _one(manifests["minio.yaml"], "Secret")["stringData"]
    cfg = StoryMemConfig(storage=StorageConfig(access_key=minio["access-key"], secret_key=minio["secret-key"]),
                         service=ServiceConfig(api_token="x" * 32))  # fmt: skip
    with pytest.raises(ValueError, match="storage.secret_key"):
        check_deployment(cfg)


K8S_VERSION = "1.30.0"  # KubeRay 1.x supports it; validated offline against its published OpenAPI schemas


def _with_pod_templates(doc: dict) -> list[dict]:
    """A resource, or for a KubeRay RayService / RayJob (CRDs the schemas lack) its pod templates,
    each checked as the core PodTemplate kind they are."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [doc]
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    groups = [("head", cluster["headGroupSpec"])] if "headGroupSpec" in cluster else []  # a patch may omit it
    groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        groups.append(("submitter", {"template": spec["submitterPodTemplate"]}))
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
             "template": group["template"]} for name, group in groups]  # fmt: skip


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob-batch.yaml", "minio.yaml", "redis.yaml", "gang8.yaml"])
def test_manifests_validate_against_the_kubernetes_schemas(name):
    """Strict validation (unknown fields are errors) of every Kubernetes resource and of every Ray pod
    template, as `kubectl apply --validate=strict` would, without a cluster."""
    import kubernetes_validate

    docs = _docs(name)
    if name == "gang8.yaml":  # its second document is a merge patch of the RayService's spec
        docs = [docs[0], {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "storymem"}, **docs[1]}]
    checked = 0
    for doc in docs:
        for resource in _with_pod_templates(doc):
            try:
                kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {resource['kind']}/{resource['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked >= len(docs)
