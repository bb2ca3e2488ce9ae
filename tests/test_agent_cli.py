"""`prunepilot agent` end to end on stories260K: outputs, resume, clear errors."""
import argparse
import json

import pytest

from prunepilot.agent.cli import add_agent_parser, run_agent_command
from prunepilot.errors import PrunepilotError
from conftest import shared_path


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def parse(argv):
    parser = argparse.ArgumentParser(prog="prunepilot")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


QUICK = ["--calib", "tinystories", "--n-samples", "4", "--seqlen", "128", "--eval-tokens", "1024",
         "--eval-seqlen", "256", "--grad-samples", "1", "--device", "cpu"]


def test_agent_command_writes_model_report_plot_and_resumes(tmp_path, capsys):
    model = str(shared_path("models", "stories260K"))
    out = tmp_path / "run"
    args = parse(["agent", model, "--target", "0.2", "--out", str(out), *QUICK])
    assert run_agent_command(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stop_reason"] == "target_reached" and summary["global_sparsity"] == pytest.approx(0.2, abs=0.003)
    rep = json.loads((out / "report.json").read_text())
    assert rep["iterations"] >= 2 and len(rep["layers"]) == 35 and rep["trajectory"][0]["label"] == "baseline"
    assert (out / "trajectory.png").stat().st_size > 0 and (out / "agent.yaml").exists()
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.model").exists()

    from prunepilot.agent import AgentConfig
    from prunepilot.modeling import load_model

    reloaded = load_model(out / "model")
    w = reloaded.model.layers[2].mlp.down_proj.weight
    assert rep["layers"]["model.layers.2.mlp.down_proj"]["zeros"] == int((w == 0).sum())
    assert AgentConfig.from_yaml(out / "agent.yaml").target_sparsity == 0.2

    with pytest.raises(PrunepilotError, match="--resume"):
        run_agent_command(args)
    # resuming a finished run replays it and ends where it was (its own agent.yaml supplies --target 0.2)
    assert run_agent_command(parse(["agent", model, "--out", str(out), "--resume", *QUICK])) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["global_sparsity"] == summary["global_sparsity"] and again["iterations"] == summary["iterations"]
    # a changed calibration setting cannot resume that journal
    with pytest.raises(PrunepilotError, match="settings changed"):
        run_agent_command(parse(["agent", model, "--out", str(out), "--resume", *QUICK, "--seed", "7"]))
    assert AgentConfig.from_yaml(out / "agent.yaml").seed == 0  # a refused resume leaves the settings alone
    with pytest.raises(PrunepilotError, match="not a folder"):
        run_agent_command(parse(["agent", model, "--out", str(out / "report.json"), *QUICK]))


def test_unreachable_endpoint_is_one_clear_line_with_strict_controller(tmp_path, capsys):
    import socket

    from prunepilot.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    model = str(shared_path("models", "stories260K"))
    code = main(["agent", model, "--target", "0.2", "--out", str(tmp_path / "o"), "--controller", "openai",
                 "--base-url", url, "--model-name", "m", "--retries", "0", "--strict-controller", *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("prunepilot: error: agent controller 'openai' unavailable")
    assert "unreachable after 1 attempt(s)" in err[-1]
    assert main(["agent", model, "--out", str(tmp_path / "p"), "--controller", "openai"]) == 2
    assert "needs a base URL" in capsys.readouterr().err


def test_controller_and_rollback_flags_reach_the_config(tmp_path):
    from prunepilot.agent.cli import config_from_args

    cfg = config_from_args(parse(["agent", "m", "--out", str(tmp_path / "o"), "--controller", "openai",
                                  "--base-url", "http://u:p@127.0.0.1:9/v1", "--model-name", "x",
                                  "--timeout", "3", "--retries", "0", "--max-tokens", "160", "--table-rows", "4",
                                  "--history-chars", "500", "--max-layers-per-reply", "2", "--reasoning-chars", "80",
                                  "--max-total-ppl-rise", "0.5"]))
    c = cfg.controller
    assert (c.timeout_s, c.retries, c.max_tokens, c.table_rows, c.history_chars, c.max_layers_per_reply,
            c.reasoning_chars) == (3, 0, 160, 4, 500, 2, 80)
    assert cfg.max_total_ppl_rise == 0.5 and c.base_url == "http://127.0.0.1:9/v1" and c.base_url_auth == ("u", "p")
    assert config_from_args(parse(["agent", "m", "--out", str(tmp_path / "o")])).max_total_ppl_rise is None
