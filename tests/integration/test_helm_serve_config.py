"""The Helm chart's Serve application, brought up for real: render helm/hybridserve with values-cpu.yaml,
take serveConfigV2's application, build it the way Ray Serve builds a config's application (what KubeRay
submits: `import_attr(import_path)` then the builder called with `args`), run it on a local Ray cluster
on loopback, and get a completion through Serve's HTTP proxy.

Only the addresses change: the chart binds 0.0.0.0:8000 and :50051 inside pods; here they are free
loopback ports.
"""
from __future__ import annotations

import os
import time

import httpx
import pytest
import yaml

from tests.frontdoor_helpers import free_port

pytestmark = pytest.mark.integration


def chart_serve_config() -> dict:
    from tests.deploy.chart_helpers import one, render
    from tests.deploy.helm_bin import HelmUnavailable, helm_path

    try:
        helm_path()
    except HelmUnavailable as e:
        pytest.skip(f"no helm binary: {e}")
    docs = render(("values-cpu.yaml",))
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray on loopback as tests/conftest.py starts it, with the environment the chart gives Ray containers."""
    import ray

    from router.cli import SERVE_ONE_LOOP_ENV

    if not ray.is_initialized():
        for k, v in SERVE_ONE_LOOP_ENV.items():
            os.environ.setdefault(k, v)
        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray


def test_chart_application_serves_a_completion(ray_cluster):
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = chart_serve_config()
    schema = ServeDeploySchema.model_validate(config)          # what Serve's REST API accepts
    app_cfg = config["applications"][0]
    args = dict(app_cfg["args"])
    assert (args["http_server"], args["model"], args["min_replicas"]) == ("proxy", "default", 1)
    http_port, grpc_port = free_port(), free_port()
    args.update(host="127.0.0.1", port=http_port, grpc_port=grpc_port, torch_threads=1)

    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg["import_path"]), args)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})   # the config's http_options, on loopback
    assert schema.http_options.port == 8000                                 # what the pods use instead
    url = f"http://127.0.0.1:{http_port}"
    try:
        serve.run(app, name=app_cfg["name"], route_prefix=app_cfg["route_prefix"], blocking=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"/ready did not turn 200 within 90 s: {serve.status()}")
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["hybrid-mini"]
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "hybrid-mini", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 16
        assert body["model"] == "hybrid-mini"

        from router.grpc_client import Client

        with Client(f"127.0.0.1:{grpc_port}") as c:                       # the Ingress's own gRPC server
            assert c.health() == "SERVING", httpx.get(url + "/ready", timeout=5).text   # the same answer as /ready
    finally:
        serve.shutdown()
