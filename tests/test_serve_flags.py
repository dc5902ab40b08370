"""afd-serve's start: flags that would start a server which then hangs or crashes on every
request are usage errors naming the flag; a chat template that does not compile fails at start
(it was every chat request's 400); a prompt id past a model vocabulary smaller than its
tokenizer's is a 400 (it crashed the rank that embedded it)."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine, running_server

from afd.launch.serve import main
from afd.server.api_server import ServerSettings, build_app


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs: expected a positive integer"),
        (["--max-num-batched-tokens", "-3"], "--max-num-batched-tokens: expected a positive"),
        (["--block-size", "0"], "--block-size: expected a positive integer"),
        (["--num-kv-blocks", "-1"], "--num-kv-blocks: expected a positive integer"),
        (["--max-model-len", "0"], "--max-model-len: expected a positive integer"),
        (["--port", "70000"], "--port: expected a port in [1, 65535]"),
        (["--tpot-slo-ms", "nan"], "--tpot-slo-ms: expected a positive number"),
        (["--max-logprobs", "-1"], "--max-logprobs: expected an integer >= 0"),
    ],
)
def test_sizes_that_would_hang_every_request_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_broken_chat_template_fails_at_start(
    tiny_ckpt, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% if %}")
    assert main(["--model", str(tiny_ckpt), "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "--chat-template: chat template syntax error (line 1)" in err


def test_prompt_ids_past_a_smaller_model_vocabulary_are_400s() -> None:
    engine = FakeEngine()
    engine.vocab_size = 300  # config.json's, below the tokenizer's
    text = "Count the parameters of the assistant"
    high = max(engine.tokenizer.encode(text))
    assert high >= 300
    with running_server(build_app(engine, ServerSettings())) as url:
        for prompt in (text, [5, high]):
            body = {"model": "tiny-step3", "prompt": prompt, "max_tokens": 2}
            r = httpx.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 400, r.text
            assert f"token id {high} is out of range [0, 300)" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={**body, "prompt": [5, 6], "max_tokens": 2})
        assert ok.status_code == 200
