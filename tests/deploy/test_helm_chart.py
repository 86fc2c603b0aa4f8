"""The Helm chart helm/hybridserve: lint, render, validate offline, and check that what it renders is what
the server reads.

Every test renders with the real `helm` (tests/deploy/helm_bin.py finds or extracts one); they skip,
saying why, only when no helm binary can be had at all.
"""
from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.chart_helpers import (CHART, NAMESPACE, RELEASE, VALUES_FILES, app_args, head_spec, one, render,
                                        render_error, run_helm, serve_config, validate_object, worker_groups)
from tests.deploy.helm_bin import HelmUnavailable, helm_path

ALL_FEATURES = ("serviceMonitor.enabled=true", "podDisruptionBudget.enabled=true", "apiKey.value=s3cret")
VALUES = [(), *[(f,) for f in VALUES_FILES]]
IDS = ["defaults", *VALUES_FILES]


@pytest.fixture(scope="module", autouse=True)
def helm():
    try:
        return helm_path()
    except HelmUnavailable as e:
        pytest.skip(f"no helm binary: {e}")


def values_yaml(name: str = "values.yaml") -> dict:
    return yaml.safe_load((CHART / name).read_text())


# ---- lint and render -------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)]
    for f in values:
        args += ["-f", str(CHART / f)]
    p = run_helm(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 chart(s) failed" in p.stdout


@pytest.mark.parametrize("values", VALUES, ids=IDS)
@pytest.mark.parametrize("features", [(), ALL_FEATURES], ids=["plain", "servicemonitor-pdb-apikey"])
def test_render_is_valid_kubernetes(values, features):
    """Built-in kinds against Kubernetes' strict schemas, the RayService against KubeRay's CRD (and its pod
    templates against the Pod schema), the ServiceMonitor against prometheus-operator's CRD."""
    docs = render(values, features)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["RayService", "Service"] + (["PodDisruptionBudget", "Secret", "ServiceMonitor"] if features else [])
    if not features and values and "super" in values[0]:
        expected.append("PodDisruptionBudget")            # the super values turn it on
    assert kinds == sorted(expected)
    for doc in docs:
        validate_object(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"]["labels"]["helm.sh/chart"].startswith("hybridserve-")


def test_render_variants_are_valid():
    """Options the shipped values files do not use: every model source, the gRPC probe, the incremental
    upgrade, an existing Secret, several worker groups, extra env."""
    variants = [
        ("model.source.type=hostPath", "model.source.hostPath.path=/mnt/models"),
        ("model.source.type=image", "model.source.image.reference=registry.example/models:super",
         "model.source.image.sizeLimit=300Gi"),
        ("model.source.type=image", "model.source.image.reference=registry.example/models:super",
         "model.source.image.method=volume", "model.mountOnHead=false"),
        ("model.source.type=pvc", "model.source.pvc.claimName=weights", "model.source.pvc.subPath=super"),
        ("probes.grpc.enabled=true", "probes.ready.enabled=false", "apiKey.existingSecret=keys"),
        ("upgradeStrategy.type=NewClusterWithIncrementalUpgrade",
         "upgradeStrategy.clusterUpgradeOptions.gatewayClassName=istio",
         "upgradeStrategy.clusterUpgradeOptions.stepSizePercent=20",
         "upgradeStrategy.clusterUpgradeOptions.intervalSeconds=60"),
        ("upgradeStrategy.type=None", "ports.grpc=0", "workerPreStopSleepSeconds=0"),
        ("workerGroups.small.gpusPerWorker=2", "workerGroups.small.minWorkers=0", "workerGroups.small.maxWorkers=4",
         "workerGroups.cpu.gpusPerWorker=0", "workerGroups.cpu.minWorkers=1", "workerGroups.cpu.maxWorkers=1",
         "serve.pipelineParallelSize=2", "head.rayStartParams.num-gpus=0",
         "extraEnv[0].name=HYBRIDSERVE_LOG_LEVEL", "extraEnv[0].value=DEBUG"),
    ]
    for sets in variants:
        for doc in render((), sets):
            validate_object(doc)


# ---- the Serve application -------------------------------------------------------------------------------
def parsed(args: dict):
    """What app_builder does with the application's args (router/serve_app.py: app_builder)."""
    from router.cli import serve_args_from_dict, serve_config_from_args

    return serve_config_from_args(serve_args_from_dict(args))


def test_serve_config_is_a_valid_ray_serve_config():
    from ray.serve.schema import ServeDeploySchema

    for values in VALUES:
        cfg = serve_config(render(values))
        schema = ServeDeploySchema.model_validate(cfg)
        app = schema.applications[0]
        assert app.import_path == "router.serve_app:app_builder" and app.route_prefix == "/"
        assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_serve_args_carry_the_values(values):
    """The rendered application args, parsed by the CLI's parser, give the ServeConfig the values ask for."""
    v = values_yaml()
    for f in values:                  # the files only override leaves of values.yaml's serve/replicas
        over = values_yaml(f)
        v["serve"].update(over.get("serve", {}))
        v["replicas"].update(over.get("replicas", {}))
        if "autoscaling" in over:
            v["autoscaling"] = {**v["autoscaling"], **over["autoscaling"]}
        v["workerGroups"] = {k: g for k, g in {**v["workerGroups"], **over.get("workerGroups", {})}.items() if g}
    cfg = parsed(app_args(render(values)))
    s, e = v["serve"], cfg.engine
    assert e.model == s["model"]
    assert cfg.served_model_name == (s["servedModelName"] or None)
    assert (e.pipeline_parallel_size, e.expert_parallel_size) == (s["pipelineParallelSize"], s["expertParallelSize"])
    assert e.use_ray == (s["pipelineParallelSize"] * s["expertParallelSize"] > 1)
    assert e.num_speculative_tokens == s["numSpeculativeTokens"]
    assert (e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens, e.max_queued_requests) == (
        s["maxModelLen"], s["maxNumSeqs"], s["maxNumBatchedTokens"], s["maxQueuedRequests"])
    assert e.gpu_memory_utilization == pytest.approx(s["gpuMemoryUtilization"])
    assert (cfg.min_replicas, cfg.max_replicas) == (v["replicas"]["min"], v["replicas"]["max"])
    assert cfg.target_ongoing_requests == v["replicas"]["targetOngoingRequests"]
    assert cfg.app_name == s["appName"] == serve_config(render(values))["applications"][0]["name"]
    # the chart's own choices: Serve's proxy on every pod's port 8000, gRPC on all interfaces of the head
    assert (cfg.http_server, cfg.host, cfg.port, cfg.grpc_port) == ("proxy", "0.0.0.0", 8000, 50051)
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): val for k, val in v["autoscaling"].items()}
    auto = cfg.autoscaling_config()
    assert {k: auto[k] for k in snake} == snake
    assert auto["min_replicas"] == cfg.min_replicas and auto["max_replicas"] == cfg.max_replicas
    assert "api_key" not in app_args(render(values))      # the key comes from env HYBRIDSERVE_API_KEY only
    gpu_groups = [g for g in (v.get("workerGroups") or {}).values() if g and g.get("gpusPerWorker", 0) > 0]
    alone = s["pipelineParallelSize"] * s["expertParallelSize"] == 1
    assert cfg.replica_num_gpus == (1.0 if gpu_groups and alone else 0.0)   # at pp x ep = 1 a replica takes a GPU


def test_a_replica_without_stage_actors_takes_a_gpu_on_gpu_workers():
    from router.serve_app import replica_gpus

    alone = parsed(app_args(render(("values-super-1node.yaml",), ("serve.expertParallelSize=1",))))
    assert alone.replica_num_gpus == 1.0 and replica_gpus(alone) == {"num_gpus": 1.0}
    split = parsed(app_args(render(("values-super-1node.yaml",))))
    assert split.engine.use_ray and replica_gpus(split) == {}              # its stage/expert actors take them
    cpu = parsed(app_args(render(("values-cpu.yaml",))))
    assert replica_gpus(cpu) == {}


def test_serve_args_follow_set_overrides():
    sets = ("serve.model=/models/x", "serve.servedModelName=x-chat", "serve.pipelineParallelSize=2",
            "serve.expertParallelSize=4", "serve.numSpeculativeTokens=3", "serve.maxModelLen=8192",
            "serve.maxNumSeqs=64", "serve.maxNumBatchedTokens=2048", "serve.maxQueuedRequests=7",
            "serve.gpuMemoryUtilization=0.85", "serve.appName=chat", "replicas.min=1", "replicas.max=2",
            "replicas.targetOngoingRequests=12.5", "workerGroups.gpu.maxWorkers=2",
            "autoscaling.lookBackPeriodS=15", "autoscaling.downscale_delay_s=90", "autoscaling.policy=ongoing",
            "autoscaling.targetKvCacheUsage=0.7",
            "serve.extraArgs.model_process=false", "serve.extraArgs.num_gpu_blocks_override=4096",
            "serve.extraArgs.draft-dtype=bfloat16", "serve.extraArgs.log_level=DEBUG", "ports.grpc=50052")
    docs = render((), sets)
    args = app_args(docs)
    assert args["model_process"] is False and args["draft_dtype"] == "bfloat16"
    cfg = parsed(args)
    e = cfg.engine
    assert (e.model, cfg.served_model_name, e.pipeline_parallel_size, e.expert_parallel_size) == ("/models/x", "x-chat", 2, 4)
    assert (e.num_speculative_tokens, e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens) == (3, 8192, 64, 2048)
    assert (e.max_queued_requests, e.num_kv_blocks, e.draft_dtype, e.model_process) == (7, 4096, "bfloat16", False)
    assert e.gpu_memory_utilization == pytest.approx(0.85) and e.use_ray
    assert (cfg.app_name, cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == ("chat", 1, 2, 12.5)
    assert cfg.log_level == "DEBUG" and cfg.grpc_port == 50052
    auto = cfg.autoscaling_config()
    assert (auto["look_back_period_s"], auto["downscale_delay_s"], auto["upscale_delay_s"]) == (15, 90, 30)
    assert (cfg.autoscaling_policy, cfg.target_kv_cache_usage) == ("ongoing", 0.7) and "policy" not in auto
    engine = parsed(app_args(render((), ("serve.autoscalingPolicy=engine", "serve.targetKvCacheUsage=0.6",
                                         "replicas.max=2", "workerGroups.gpu.maxWorkers=2"))))
    assert (engine.autoscaling_policy, engine.target_kv_cache_usage) == ("engine", 0.6)
    assert engine.autoscaling_config()["policy"]["policy_kwargs"]["target_kv_usage"] == 0.6
    assert serve_config(docs)["applications"][0]["name"] == "chat"
    head = head_spec(docs)["containers"][0]
    assert head["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["--app-name", "chat"]
    assert {"name": "grpc", "containerPort": 50052} in head["ports"]


def test_every_serve_value_is_a_cli_option():
    """values.schema.json lists the `serve` keys it accepts; each must be a `hybridserve serve` option."""
    import json

    from router.cli import serve_args_from_dict

    def sample(prop: dict):
        if prop.get("oneOf"):
            return sample(prop["oneOf"][0])
        if prop.get("enum"):
            return next(v for v in prop["enum"] if v is not None)
        types = [t for s in [prop, *prop.get("anyOf", [])] for t in ([s["type"]] if isinstance(s.get("type"), str)
                                                                  else s.get("type", []))]
        for t, v in (("boolean", True), ("integer", 1), ("number", 0.5), ("string", "default")):
            if t in types:
                return v
        raise AssertionError(f"no sample for {prop}")

    props = json.loads((CHART / "values.schema.json").read_text())["properties"]["serve"]["properties"]
    for key, prop in props.items():
        if key == "extraArgs":
            continue
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        serve_args_from_dict({name: sample(prop)})          # raises for an unknown option or a bad value


# ---- values that must be refused -------------------------------------------------------------------------
@pytest.mark.parametrize("sets, message", [
    (("replicas.min=abc",), "at '/replicas/min': got string, want integer"),
    (("serve.pipelineParallelSize=1.5",), "/serve/pipelineParallelSize"),
    (("serve.expertParallelSize=0",), "/serve/expertParallelSize"),
    (("workerGroups.gpu.gpusPerWorker=two",), "/workerGroups/gpu/gpusPerWorker"),
    (("upgradeStrategy.type=RollingUpdate",), "'NewCluster', 'NewClusterWithIncrementalUpgrade', 'None'"),
    (("model.source.type=s3",), "'pvc', 'hostPath', 'image', 'none'"),
    (("serve.maxModelLenght=4096",), "maxModelLenght"),
    (("workerGroups.GPU_big.gpusPerWorker=8",), "GPU_big"),
])
def test_schema_refuses_bad_values(sets, message):
    assert message in render_error((), sets)


@pytest.mark.parametrize("sets, message", [
    (("serve.expertParallelSize=3",),
     "serve.pipelineParallelSize x serve.expertParallelSize = 1 x 3 = 3 GPUs per replica must divide "
     "workerGroups.gpu.gpusPerWorker (8) or be a multiple of it"),
    (("serve.pipelineParallelSize=3", "serve.expertParallelSize=4", "workerGroups.gpu.maxWorkers=2",
      "workerGroups.gpu.minWorkers=2"), "= 3 x 4 = 12 GPUs per replica must divide workerGroups.gpu.gpusPerWorker (8)"),
    (("replicas.min=2",), "replicas.min (2) must not exceed replicas.max (1)"),
    (("workerGroups.gpu.minWorkers=3",), "workerGroups.gpu.minWorkers (3) must not exceed workerGroups.gpu.maxWorkers (1)"),
    (("serve.pipelineParallelSize=2", "serve.expertParallelSize=8"),
     "replicas.max (1) x 16 GPUs per replica (serve.pipelineParallelSize x serve.expertParallelSize) = 16 GPUs, "
     "but the GPU worker groups (gpu) have at most 8"),
    (("serve.pipelineParallelSize=2", "serve.expertParallelSize=8", "workerGroups.gpu.maxWorkers=2"),
     "replicas.min (1) x 16 GPUs per replica"),
    (("terminationGracePeriodSeconds=30",),
     "terminationGracePeriodSeconds (30) must be larger than drainTimeoutSeconds (30)"),
    (("workerPreStopSleepSeconds=90",), "terminationGracePeriodSeconds (60) must be larger than workerPreStopSleepSeconds (90)"),
    (("serve.extraArgs.port=9000",), "serve.extraArgs.port: set by the chart"),
    (("serve.extraArgs.api_key=x",), "serve.extraArgs.api_key: set by the chart"),
    (("model.source.type=pvc",), "model.source.type is pvc: set model.source.pvc.claimName"),
    (("model.source.type=image",), "model.source.type is image: set model.source.image.reference"),
    (("upgradeStrategy.type=NewClusterWithIncrementalUpgrade",),
     "needs upgradeStrategy.clusterUpgradeOptions.gatewayClassName, stepSizePercent and intervalSeconds"),
    (("probes.grpc.enabled=true", "ports.grpc=0"), "probes.grpc.enabled needs a gRPC server"),
    (("autoscaling.policy=ongoing", "serve.autoscalingPolicy=engine"),
     "autoscaling.policy (ongoing) and serve.autoscalingPolicy (engine) disagree"),
])
def test_templates_refuse_inconsistent_values(sets, message):
    assert message in render_error((), sets)


def test_release_names_are_checked_and_truncated():
    assert "must be a DNS-1035 label" in render_error((), (), release="9lives")
    assert "must be a DNS-1035 label" in render_error((), (), release="my.release")
    long = "a" * 53                                    # the longest release name helm accepts
    docs = render((), ALL_FEATURES, release=long)
    assert one(docs, "Service")["metadata"]["name"] == ("a" * 53 + "-hybridserve")[:55].rstrip("-") + "-ingress"
    rs = one(docs, "RayService")["metadata"]["name"]
    assert len(rs) == 47 and len(rs + "-serve-svc") <= 63          # KubeRay's limit, and its Service's
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        for k, v in d["metadata"]["labels"].items():
            assert len(str(v)) <= 63, (k, v)
    override = one(render((), ("fullnameOverride=" + "b" * 70,)), "RayService")["metadata"]["name"]
    assert override == "b" * 47


# ---- what KubeRay gets -----------------------------------------------------------------------------------
def test_probes_are_where_kuberay_needs_them():
    """KubeRay submits serveConfigV2 once the head pod is Ready: the head has no readiness probe of ours
    (KubeRay injects GCS/raylet checks); /ready gates the workers; /health is the head's liveness."""
    docs = render()
    head = head_spec(docs)["containers"][0]
    assert "readinessProbe" not in head
    assert head["livenessProbe"]["httpGet"] == {"path": "/health", "port": "serve"}
    budget = head["livenessProbe"]["initialDelaySeconds"] + \
        head["livenessProbe"]["periodSeconds"] * head["livenessProbe"]["failureThreshold"]
    assert budget >= 180
    for group in worker_groups(docs).values():
        worker = group["template"]["spec"]["containers"][0]
        assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "serve"}
        assert "livenessProbe" not in worker                      # KubeRay's raylet check
        assert {"name": "serve", "containerPort": 8000} in worker["ports"]
    grpc = head_spec(render((), ("probes.grpc.enabled=true",)))["containers"][0]
    assert grpc["livenessProbe"]["grpc"] == {"port": 50051} and "readinessProbe" not in grpc
    off = render((), ("probes.liveness.enabled=false", "probes.ready.enabled=false"))
    assert "livenessProbe" not in head_spec(off)["containers"][0]
    assert all("readinessProbe" not in g["template"]["spec"]["containers"][0] for g in worker_groups(off).values())


def test_head_and_workers_as_kuberay_expects():
    docs = render()
    rs = one(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rs["apiVersion"] == "ray.io/v1" and rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["version"] == "v2"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = head_spec(docs)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000,
                     "grpc": 50051}
    # only `serve` (and `serve-*`) ports go into KubeRay's serve Service, which also selects workers
    assert [n for n in ports if n == "serve" or n.startswith("serve-")] == ["serve"]
    assert "nvidia.com/gpu" not in str(head.get("resources"))
    gpu = worker_groups(docs)["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1, 1)
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 8
    for spec in [head_spec(docs)] + [g["template"]["spec"] for g in worker_groups(docs).values()]:
        # KubeRay's <name>-head-svc selects app.kubernetes.io/name=kuberay: pods must keep that label
        assert "app.kubernetes.io/name" not in spec.get("metadata", {}).get("labels", {})
    for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        assert "app.kubernetes.io/name" not in g["template"]["metadata"]["labels"]
        assert g["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_env_of_every_ray_container():
    for sets, secret in [((), None), (("apiKey.value=s3cret",), f"{RELEASE}-hybridserve-api-key"),
                         (("apiKey.existingSecret=keys", "apiKey.secretKey=token"), "keys")]:
        docs = render((), sets)
        specs = [head_spec(docs)] + [g["template"]["spec"] for g in worker_groups(docs).values()]
        for spec in specs:
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"]["value"] == "0"
            assert env["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"]["value"] == "0"
            if secret is None:
                assert "HYBRIDSERVE_API_KEY" not in env
            else:
                ref = env["HYBRIDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret and ref["key"] == ("token" if secret == "keys" else "api-key")
        assert "s3cret" not in one(docs, "RayService")["spec"]["serveConfigV2"]
        secrets = [d for d in docs if d["kind"] == "Secret"]
        assert len(secrets) == (1 if "apiKey.value=s3cret" in sets else 0)


def test_the_env_names_match_the_cli(monkeypatch):
    from router.cli import SERVE_ONE_LOOP_ENV
    from router.serve_options import serve_args_from_dict, serve_config_from_args

    env = {e["name"]: e.get("value") for e in head_spec(render())["containers"][0]["env"]}
    assert SERVE_ONE_LOOP_ENV.items() <= env.items()
    # The chart hands the API key to the app builder through this variable, never in args.
    monkeypatch.setenv("HYBRIDSERVE_API_KEY", "k-from-secret")
    assert serve_config_from_args(serve_args_from_dict(app_args(render()))).api_key == "k-from-secret"


def test_graceful_drain():
    docs = render((), ("drainTimeoutSeconds=45", "terminationGracePeriodSeconds=75"))
    head = head_spec(docs)
    assert head["terminationGracePeriodSeconds"] == 75
    assert head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "hybridserve", "drain", "--timeout", "45", "--app-name", "hybridserve"]
    for g in worker_groups(docs).values():
        spec = g["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 75
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "45"]
    no_sleep = worker_groups(render((), ("workerPreStopSleepSeconds=0",)))["gpu"]
    assert "lifecycle" not in no_sleep["template"]["spec"]["containers"][0]


def test_the_drain_command_exists():
    """The head's preStop runs `hybridserve drain --timeout N --app-name NAME`: the CLI must accept it."""
    from router.cli import build_parser

    head = head_spec(render())["containers"][0]
    argv = head["lifecycle"]["preStop"]["exec"]["command"][1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`hybridserve {' '.join(argv)}` is not accepted by router/cli.py")
    assert args.command == "drain" and float(args.timeout) == 30 and args.app_name == "hybridserve"


@pytest.mark.parametrize("strategy", ["NewCluster", "None"])
def test_upgrade_strategy(strategy):
    spec = one(render((), (f"upgradeStrategy.type={strategy}", "rayClusterDeletionDelaySeconds=120")),
               "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": strategy} and spec["rayClusterDeletionDelaySeconds"] == 120
    incr = one(render((), ("upgradeStrategy.type=NewClusterWithIncrementalUpgrade",
                           "upgradeStrategy.clusterUpgradeOptions.gatewayClassName=istio",
                           "upgradeStrategy.clusterUpgradeOptions.stepSizePercent=20",
                           "upgradeStrategy.clusterUpgradeOptions.intervalSeconds=60")), "RayService")
    assert incr["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"] == "istio"


def _mounts(spec: dict) -> list[dict]:
    return [m for m in spec["containers"][0].get("volumeMounts", []) if m["name"] == "model"]


def _volume(spec: dict) -> dict | None:
    return next((v for v in spec.get("volumes", []) if v["name"] == "model"), None)


def test_model_sources():
    base = ("model.mountPath=/weights",)
    none = render((), base)
    assert not _mounts(head_spec(none)) and _volume(head_spec(none)) is None
    pvc = render((), base + ("model.source.type=pvc", "model.source.pvc.claimName=w", "model.source.pvc.subPath=s"))
    for spec in [head_spec(pvc), worker_groups(pvc)["gpu"]["template"]["spec"]]:
        assert _volume(spec)["persistentVolumeClaim"] == {"claimName": "w", "readOnly": True}
        assert _mounts(spec) == [{"name": "model", "mountPath": "/weights", "readOnly": True, "subPath": "s"}]
    host = render((), base + ("model.source.type=hostPath", "model.source.hostPath.path=/data/m"))
    assert _volume(head_spec(host))["hostPath"] == {"path": "/data/m", "type": "Directory"}
    copy = render((), base + ("model.source.type=image", "model.source.image.reference=reg/m:1",
                              "model.source.image.path=/ckpt", "model.source.image.sizeLimit=300Gi",
                              "model.mountOnHead=false"))
    head, worker = head_spec(copy), worker_groups(copy)["gpu"]["template"]["spec"]
    assert "initContainers" not in head and not _mounts(head) and _volume(head) is None
    assert _volume(worker)["emptyDir"] == {"sizeLimit": "300Gi"}
    init = worker["initContainers"][0]
    assert init["image"] == "reg/m:1" and init["command"] == ["cp", "-a", "/ckpt/.", "/hybridserve-model/"]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/hybridserve-model"}]
    assert _mounts(worker) == [{"name": "model", "mountPath": "/weights", "readOnly": True}]
    vol = render((), base + ("model.source.type=image", "model.source.image.reference=reg/m:1",
                             "model.source.image.method=volume", "model.source.image.path=/ckpt"))
    spec = worker_groups(vol)["gpu"]["template"]["spec"]
    assert _volume(spec)["image"] == {"reference": "reg/m:1", "pullPolicy": "IfNotPresent"}
    assert _mounts(spec)[0]["subPath"] == "ckpt" and "initContainers" not in spec


def test_services_monitor_and_pdb():
    docs = render((), ALL_FEATURES)
    svc = one(docs, "Service")
    assert svc["metadata"]["name"] == f"{RELEASE}-hybridserve-ingress"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "hybridserve",
                                       "ray.io/node-type": "head", "ray.io/serve": "true"}
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("http", 8000, "serve"), ("grpc", 50051, "grpc")}
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    head_labels = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    # pods get ray.io/is-ray-node=yes from KubeRay; the rest of the selector comes from the chart
    assert {k: v for k, v in pdb["spec"]["selector"]["matchLabels"].items() if k != "ray.io/is-ray-node"}.items() \
        <= head_labels.items()
    assert {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("ray.io/")}.items() \
        <= head_labels.items()


def test_notes_say_how_to_reach_the_service():
    p = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert p.returncode == 0, p.stderr
    notes = p.stdout[p.stdout.index("NOTES:"):]
    assert f"port-forward svc/{RELEASE}-hybridserve-serve-svc 8000:8000" in notes
    assert "curl -s localhost:8000/v1/models" in notes
    assert f"port-forward svc/{RELEASE}-hybridserve-ingress 50051:50051" in notes


# ---- documentation ---------------------------------------------------------------------------------------
def undocumented_values(text: str) -> list[str]:
    """helm-docs style: the leaves of a values file without a `# --` comment on themselves or a parent."""
    lines = text.splitlines()
    stack: list[tuple[int, str, bool]] = []          # (indent, key, documented)
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        inherited = documented or any(d for _, _, d in stack)
        if rest and not rest.startswith("#") and not inherited:
            undocumented.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, inherited))
    return undocumented


def test_every_value_is_documented():
    assert undocumented_values("# -- doc\na: 1\nb:\n  # -- doc\n  c: 2\n  d: 3\n# -- doc\ne:\n  f: 4\n") == ["b.d"]
    assert not undocumented_values((CHART / "values.yaml").read_text())


def test_values_files_fit_the_planner():
    """The super values files ask for what cluster/planner.py says fits on H200s."""
    from cluster.parallel import ParallelConfig
    from cluster.planner import DeviceSpec, plan_replica
    from model_shards.presets import get_preset

    for name in ("values-super-1node.yaml", "values-super-2nodes.yaml"):
        v = values_yaml(name)
        s, g = v["serve"], v["workerGroups"]["gpu"]
        plan = plan_replica(get_preset("nemotron-3-super-120b-a12b"),
                            ParallelConfig(s["pipelineParallelSize"], s["expertParallelSize"]),
                            DeviceSpec.h200(g["gpusPerWorker"] * g["maxWorkers"]),
                            num_speculative_tokens=s["numSpeculativeTokens"], context_len=s["maxModelLen"],
                            max_num_seqs=s["maxNumSeqs"])
        assert plan.max_num_seqs == s["maxNumSeqs"], name
        devices = s["pipelineParallelSize"] * s["expertParallelSize"]
        assert devices == g["gpusPerWorker"] * g["minWorkers"] * v["replicas"]["min"], name


def test_planner_values_render(tmp_path):
    """`hybridserve plan --output values` writes values this chart takes, and they reach the server."""
    from router.cli import main

    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "nemotron-3-super-120b-a12b", "--gpus", "8", "--gpu-memory-gb", "141",
                 "--max-model-len", "8192", "--output", "values", "--output-file", str(out)]) == 0
    plan = yaml.safe_load(out.read_text())
    docs = render(("values-super-1node.yaml", str(out)))
    for doc in docs:
        validate_object(doc)
    cfg = parsed(app_args(docs))
    s = plan["serve"]
    assert (cfg.engine.pipeline_parallel_size, cfg.engine.expert_parallel_size, cfg.engine.max_num_seqs) == (
        s["pipelineParallelSize"], s["expertParallelSize"], s["maxNumSeqs"])
    assert (cfg.min_replicas, cfg.max_replicas) == (plan["replicas"]["min"], plan["replicas"]["max"])
    group = worker_groups(docs)["gpu"]
    assert group["maxReplicas"] == plan["workerGroups"]["gpu"]["maxWorkers"]


def test_cpu_planner_values_render_with_only_a_cpu_worker_group(tmp_path):
    """A CPU plan's values drop the chart's default GPU group: nothing in the render asks for a GPU."""
    from router.cli import main

    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "tiny", "--output", "values", "--output-file", str(out)]) == 0
    docs = render((str(out),))
    for doc in docs:
        validate_object(doc)
    assert set(worker_groups(docs)) == {"cpu"}
    assert "nvidia.com/gpu" not in yaml.safe_dump(docs)
    assert parsed(app_args(docs)).replica_num_gpus == 0.0
