"""Edge cases found in review: sequences that outgrow the KV pool, a choice stopped by a stop
string while its siblings run on, and a dead rank among many chatty ones."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from afd import LLM, SamplingParams, envs
from afd.engine.executor import ExecutorError
from afd.engine.messages import Heartbeat
from afd.engine.output_processor import OutputProcessor
from afd.engine.sequence import SeqStatus, Sequence
from afd.launch.local import DisaggregatedExecutor
from afd.tokenizer import Tokenizer
from attn_worker.messages import StepPlan
from transport.codec import encode


def test_model_length_is_capped_by_the_kv_pool(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", block_size=4, num_kv_blocks=4)
    assert llm.max_model_len == 16
    with pytest.raises(ValueError, match="maximum context length is 16 tokens"):
        llm.generate({"prompt_token_ids": list(range(10, 30))})
    # a generation that would outgrow the pool ends with "length" instead of hanging
    out = llm.generate(
        {"prompt_token_ids": list(range(10, 20))},
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    )
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].outputs[0].token_ids) == 6


def test_stopped_choice_keeps_its_tokens_while_siblings_run(tiny_ckpt):
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    a, b, c = (tok.encode(w)[0] for w in (" apple", " stop", " cat"))
    params = SamplingParams(n=2, max_tokens=10, stop=[tok.decode([b])], temperature=0.0)
    seqs = [Sequence(i, "r", i, [a], params) for i in range(2)]
    processor = OutputProcessor(tok)
    processor.add("r", None, [a], params, seqs)
    for seq in seqs:
        seq.status = SeqStatus.RUNNING
    seqs[0].output_token_ids.append(b)
    seqs[1].output_token_ids.append(c)
    outs, to_abort = processor.process(seqs)
    assert to_abort == [0] and outs[0].outputs[0].finish_reason == "stop"
    seqs[0].output_token_ids.append(c)  # a step already in flight when the abort went out
    seqs[1].output_token_ids.append(c)
    outs, _ = processor.process(seqs)
    assert outs[0].outputs[0].token_ids == [b]
    assert outs[0].outputs[1].token_ids == [c, c]


def test_include_stop_str_in_output_keeps_a_stop_token_text(tiny_ckpt):
    """As vLLM: a stop token id's text ends the output only with include_stop_str_in_output
    (it was dropped either way)."""
    llm = LLM(str(tiny_ckpt), dtype="float32")
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    apple = tok.encode(" apple")[0]
    for keep, text in ((True, tok.decode([apple])), (False, "")):
        params = SamplingParams(
            max_tokens=4, logit_bias={apple: 100.0}, stop_token_ids=[apple],
            include_stop_str_in_output=keep,
        )  # fmt: skip
        (choice,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs
        assert (choice.text, choice.token_ids, choice.stop_reason) == (text, [apple], apple)


class _Exited:
    where = "test"

    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout_s: float) -> bool:
        return True

    def kill(self) -> None:
        self.code = -9


def test_dead_rank_is_found_among_many_heartbeating_ranks(monkeypatch):
    names = [f"a{i}" for i in range(10)]
    executor = DisaggregatedExecutor(["a0"], [])
    executor.procs = {n: _Exited(1 if n == "a0" else None) for n in names}
    monkeypatch.setattr(envs, "STEP_TIMEOUT_S", 30.0)
    stop = threading.Event()

    def beat(name: str, phase: float) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{name}.hb".encode())
        sock.connect(executor.address)
        time.sleep(phase)
        while not stop.is_set():  # together the ranks beat far more often than every 0.1 s
            sock.send(encode(Heartbeat(name, time.time())))
            time.sleep(0.05)
        sock.close(0)

    for i, name in enumerate(names[1:]):
        threading.Thread(target=beat, args=(name, i * 0.005), daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(ExecutorError, match="rank a0"):
            executor.execute([StepPlan(1, 1)])
    finally:
        stop.set()
    assert time.monotonic() - start < 5
