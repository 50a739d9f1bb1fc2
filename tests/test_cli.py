"""``sedac generate`` end to end, as a user runs it."""

import json

from tests.conftest import hf_greedy


def test_generate_json_prints_hf_greedy_continuation(cli, smollm2):
    done = cli("generate", "--prompt", "What is the capital of France?", "--chat", "--no-exit", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    keys = {"model", "num_layers", "prompt_token_ids", "token_ids", "text", "exit_layers", "mean_layers"}
    assert keys | {"finish_reason"} <= set(out)
    assert out["token_ids"] == hf_greedy(smollm2.model, out["prompt_token_ids"], 64)
    assert out["text"] == "The capital of France is Paris."
    assert out["exit_layers"] == [30] * len(out["token_ids"]) and out["mean_layers"] == 30
    assert "loaded smollm2-135m" in done.stderr  # load progress is visible


def test_generate_reports_bad_flags_without_a_traceback(cli):
    done = cli("generate", "--prompt", "hi", "--tau", "1.5")
    assert done.returncode == 2
    assert "tau must be in (0, 1]" in done.stderr and "Traceback" not in done.stderr
