"""The paged KV cache, and `kv_cache_dtype="fp8"`: e4m3 values with one fp32 scale per token
vector, through the cache's own API, decode and prefill attention, and whole generations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import ConfigError, ModelConfig
from afd.engine.builder import blocks_in_memory
from afd.outputs import Logprob
from attn_worker.attention import BatchAttention, SeqView
from attn_worker.kv_cache import KVCache, kv_bytes_per_block
from tests.conftest import PROMPTS

E4M3_REL = 2**-4  # 3 mantissa bits: round to nearest is within 1/16 of the value
E4M3_SUBNORMAL_STEP = 2**-9  # of the scale: the absolute floor near zero


def _cache(kv: str, dim: int = 32, blocks: int = 6, page: int = 4) -> KVCache:
    return KVCache(2, blocks, page, dim, torch.float32, "cpu", kv)


def test_fp8_round_trip_is_within_e4m3_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    cache = _cache("fp8")
    k = torch.randn(9, 32, generator=g) * torch.logspace(-3, 3, 9)[:, None]  # 6 decades
    v = torch.randn(9, 32, generator=g)
    v[4] = 0.0  # an all-zero vector stays zero
    slots = torch.tensor([0, 1, 2, 3, 5, 6, 12, 13, 23])
    cache.write(1, slots, k, v)
    got_k, got_v = cache.gather(1, torch.arange(6), 24)
    for want, got, scale in ((k, got_k[slots], cache.k_scale), (v, got_v[slots], cache.v_scale)):
        per_token = scale[1].view(-1)[slots]
        torch.testing.assert_close(per_token, want.abs().amax(-1) / 448)
        bound = E4M3_REL * want.abs() + E4M3_SUBNORMAL_STEP / 2 * per_token[:, None]
        assert ((got - want).abs() <= bound + 1e-12).all()
    assert (got_v[slots][4] == 0).all() and not got_v.isnan().any()
    assert (cache.k[0].view(torch.uint8) == 0).all()  # other layers untouched


def test_fp8_later_tokens_never_rescale_earlier_ones() -> None:
    cache = _cache("fp8")
    small = torch.full((1, 32), 0.01)
    cache.write(0, torch.tensor([0]), small, small)
    before = cache.gather(0, torch.tensor([0]), 1)[0].clone()
    big = torch.full((1, 32), 1000.0)
    cache.write(0, torch.tensor([1]), big, big)  # same block, 5 decades larger
    k, _ = cache.gather(0, torch.tensor([0]), 2)
    assert torch.equal(k[:1], before)
    torch.testing.assert_close(k[1], big[0], rtol=E4M3_REL, atol=0)


def test_fp8_bytes_and_blocks_in_memory(tiny_ckpt) -> None:
    # bf16: 2 bytes an element; fp8: 1 byte plus a 4-byte scale per 256-element vector
    bf16 = kv_bytes_per_block(61, 64, 256, torch.bfloat16, "auto")
    fp8 = kv_bytes_per_block(61, 64, 256, torch.bfloat16, "fp8")
    assert bf16 == 2 * 61 * 64 * 256 * 2 and fp8 == 2 * 61 * 64 * (256 + 4)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    cpu = torch.device("cpu")
    auto = blocks_in_memory(cfg, 16, torch.bfloat16, cpu)
    fp8_blocks = blocks_in_memory(cfg, 16, torch.bfloat16, cpu, "fp8")
    dim = cfg.head_dim  # per vector: 2 x dim bytes against dim + 4
    assert fp8_blocks / auto == pytest.approx(2 * dim / (dim + 4), rel=1e-4)


def _attention(cache: KVCache, seqs: list[SeqView], slots: torch.Tensor, q, k, v):
    return BatchAttention(cache, seqs, slots, 0.125).at(0)(q, k, v)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_fp8_attention_is_close_to_exact(decode: bool) -> None:
    """The same history through an fp8 and an fp32 cache: decode (the paged kernel's CPU
    path, which reads the scales) and prefill (gathered, dequantized) agree within fp8's
    error, and a poisoned scale shows that the scales are read at all."""
    g = torch.Generator().manual_seed(1)
    heads, dim, page, length = 8, 32, 4, 22
    table = torch.tensor([5, 0, 3, 1, 4, 2])  # shuffled blocks
    hist = torch.randn(length, 2, dim, generator=g)  # K and V of the whole history
    slots = table[torch.arange(length) // page] * page + torch.arange(length) % page
    outs = {}
    for kv in ("auto", "fp8"):
        cache = _cache(kv, dim)
        new = 1 if decode else 6  # tokens computed this step
        cache.write(0, slots[:-new], hist[:-new, 0], hist[:-new, 1])
        seq = SeqView(0, new, length, table)
        q = torch.randn(new, heads, dim, generator=torch.Generator().manual_seed(2))
        k, v = hist[-new:, :1], hist[-new:, 1:]
        outs[kv] = _attention(cache, [seq], slots[-new:], q, k, v)
        if kv == "fp8":
            cache.v_scale[0, table[0], 1] *= 4.0  # one token's V scale
            outs["poisoned"] = _attention(cache, [seq], slots[-new:], q, k, v)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(outs["fp8"], outs["auto"]) < 5e-2  # e4m3: ~3 % an element
    assert rel(outs["poisoned"], outs["fp8"]) > 1e-3


def _greedy(llm: LLM) -> list[tuple[list[int], list[dict[int, Logprob]]]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture(scope="module")
def fp8_colocated(tiny_ckpt):
    return _greedy(LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=64, kv_cache_dtype="fp8"))


def test_fp8_generation_tracks_full_precision(tiny_ckpt, fp8_colocated) -> None:
    """As vLLM compares quantized runs: same tokens until a near-tie, where each run's pick
    is in the other's top 5. The tiny random model is touchy: 3 % random noise on K and V
    moved its logprobs by up to 0.9 (fp8: up to 0.73), hence the loose logprob bound; the
    tight checks are the ones above."""
    full = _greedy(LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=64))
    _track(fp8_colocated, full, 1.0)


def _track(a, b, tol: float) -> None:
    """Per sequence: logprobs within `tol` while the tokens agree; at the first token that
    differs, each run's pick is in the other's top 5, and the comparison ends there."""
    for (ids_a, lps_a), (ids_b, lps_b) in zip(a, b, strict=True):
        for ta, tb, la, lb in zip(ids_a, ids_b, lps_a, lps_b, strict=True):
            if ta != tb:
                assert ta in lb and tb in la
                break
            assert abs(la[ta].logprob - lb[tb].logprob) < tol


@pytest.mark.slow
def test_fp8_disaggregated_equals_colocated(tiny_ckpt, fp8_colocated) -> None:
    with LLM(
        str(tiny_ckpt),
        dtype="float32",
        num_kv_blocks=64,
        kv_cache_dtype="fp8",
        colocated=False,
        micro_batches=2,
    ) as llm:
        got = _greedy(llm)
    for (want_ids, want_lps), (ids, lps) in zip(fp8_colocated, got, strict=True):
        assert ids == want_ids
        for want, have in zip(want_lps, lps, strict=True):
            assert want.keys() == have.keys()
            assert max(abs(want[t].logprob - have[t].logprob) for t in want) < 1e-4


def test_bad_kv_cache_dtype_names_the_flag(tiny_ckpt) -> None:
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'int4'"):
        LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=8, kv_cache_dtype="int4")


def test_serve_flag_fails_at_start_naming_itself(tiny_ckpt) -> None:
    cmd = [sys.executable, "-m", "afd.launch.serve", "--model", str(tiny_ckpt), "--dry-run"]
    bad = subprocess.run([*cmd, "--kv-cache-dtype", "int4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--kv-cache-dtype 'int4'" in bad.stderr
    ok = subprocess.run([*cmd, "--kv-cache-dtype", "fp8_e4m3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel and graphs need a GPU")
def test_fp8_on_gpu_graphs_match_eager_and_track_bf16(tiny_ckpt) -> None:
    """On a GPU: the Triton kernel reads the scales, and CUDA graphs (which capture the
    quantizing writes) give what eager gives."""
    runs = {}
    for name, kw in (
        ("graphs", dict(kv_cache_dtype="fp8")),
        ("eager", dict(kv_cache_dtype="fp8", cuda_graph_max_batch=0)),
        ("bf16", dict()),
    ):
        llm = LLM(str(tiny_ckpt), device="cuda", dtype="bfloat16", num_kv_blocks=64, **kw)
        runs[name] = _greedy(llm)
    _track(runs["graphs"], runs["eager"], 0.1)
    _track(runs["graphs"], runs["bf16"], 1.0)
