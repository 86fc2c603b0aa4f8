"""`--transport`: from the command line and Serve config files to EngineConfig, and refused by name when
the value is unknown or the machines cannot run it (before any replica starts)."""
from __future__ import annotations

import pytest
import torch

from router.engine_config import EngineConfig
from router.serve_options import serve_args_from_dict, serve_config_from_args


@pytest.mark.parametrize("kind", ["auto", "ray", "gloo", "nccl", "nccl4py"])
def test_every_transport_reaches_the_engine_config_from_the_cli_and_from_a_config_file(kind):
    cfg = serve_config_from_args(serve_args_from_dict({"pipeline_parallel_size": 2, "transport": kind}))
    assert cfg.engine.transport == kind and cfg.engine.use_ray


def test_the_default_is_auto():
    assert serve_config_from_args(serve_args_from_dict({})).engine.transport == "auto" == EngineConfig().transport


def test_an_unknown_transport_is_refused_by_name(capsys):
    from router.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--transport", "pigeon"])
    assert exit_.value.code == 2
    assert "--transport: invalid choice: 'pigeon'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="transport: must be one of auto, ray, gloo, nccl, nccl4py, got 'pigeon'"):
        EngineConfig(transport="pigeon").validate()
    with pytest.raises(ValueError, match="invalid serve options: .*--transport"):
        serve_args_from_dict({"transport": "pigeon"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("kind", ["nccl", "nccl4py"])
def test_serve_refuses_an_nccl_transport_without_gpus_before_deploying(monkeypatch, capsys, kind):
    import router.cli as cli

    monkeypatch.setattr(cli, "start_ray", lambda cfg, num_cpus: False)           # no cluster: torch decides

    def deploy(cfg):
        raise AssertionError("deployed although the transport cannot run here")
    monkeypatch.setattr(cli, "deploy", deploy)
    assert cli.main(["serve", "-pp", "2", "-ep", "2", "--transport", kind]) == 2
    assert f"error: --transport {kind}: needs GPUs" in capsys.readouterr().err
