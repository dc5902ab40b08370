"""The router's fused softmax + top-k kernel (run by Triton's CPU interpreter at small shapes, in
a child process) against the torch path of afd.models.step3.Router, which it replaces on CUDA;
and on a GPU the Router itself, fused against torch, at Step3's 48 experts."""

from __future__ import annotations

import json

import pytest
import torch

from afd.config import ModelConfig
from afd.models import layers
from afd.models.step3 import Router
from afd.models.tiny import TINY_TEXT_CONFIG
from attn_worker.kernels.router_topk import router_topk
from tests.conftest import run_interpreted

# (rows, experts, top-k, renormalise): Step3's 48 top-3, more rows than one program takes,
# a ragged expert count, top-1, top-k of all
CASES = [(37, 48, 3, False), (5, 13, 3, True), (3, 6, 1, False), (2, 4, 4, True)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # bf16: the GPU test (interpreter)


def _router(experts: int, top_k: int, renormalise: bool, hidden: int = 64) -> Router:
    raw = {**TINY_TEXT_CONFIG, "hidden_size": hidden, "vocab_size": 64}
    raw |= {"moe_num_experts": experts, "moe_top_k": top_k, "norm_expert_weight": renormalise}
    router = Router(ModelConfig.from_dict({"text_config": raw}))
    with torch.no_grad():  # a peaked router, as trained ones are
        router.gate.weight.mul_(8.0)
    return router


def cases() -> dict:
    found: dict = {}
    torch.manual_seed(0)
    for name, dtype in DTYPES.items():
        for rows, experts, top_k, renormalise in CASES:
            router = _router(experts, top_k, renormalise).to(dtype)
            x = torch.randn(rows, router.gate.in_features).to(dtype)
            with torch.no_grad():
                ref_ids, ref_w = router(x)  # the torch path: tensors on the CPU
                ids, w = router_topk(router.gate(x), top_k, renormalise, dtype)
            tag = f"{name}_{rows}x{experts}_top{top_k}{'_renorm' if renormalise else ''}"
            found[tag] = {
                "ids_equal": torch.equal(ids, ref_ids),
                "dtypes": [str(ids.dtype), str(w.dtype)],
                "max_diff": float((w.double() - ref_w.double()).abs().max()),
                "descending": bool((w[:, :-1] >= w[:, 1:]).all()),
            }
    ids, w = router_topk(torch.empty(0, 48), 3, False, torch.float16)
    found["zero_rows"] = [list(ids.shape), list(w.shape)]
    return found


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(DTYPES))
def test_router_topk_matches_torch_router(interpreted: dict, name: str) -> None:
    found = {k: v for k, v in interpreted.items() if k.startswith(name)}
    assert len(found) == len(CASES)
    tolerance = 1e-6 if name == "fp32" else 1e-3  # exp's last bits; fp16 weights below 1
    for tag, case in found.items():
        assert case["ids_equal"] and case["descending"], (tag, case)
        assert case["dtypes"] == ["torch.int32", str(DTYPES[name])], (tag, case)
        assert case["max_diff"] <= tolerance, (tag, case)


def test_zero_rows(interpreted: dict) -> None:
    assert interpreted["zero_rows"] == [[0, 3], [0, 3]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("renormalise", [False, True])
def test_gpu_router_fused_matches_torch(monkeypatch: pytest.MonkeyPatch, renormalise) -> None:
    """bf16 at Step3's 48 experts top-3 over 7168 features: the Router's fused CUDA path
    against its torch path, on the same logits."""
    torch.manual_seed(0)
    router = _router(48, 3, renormalise, hidden=7168).cuda().bfloat16()
    x = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ids, w = router(x)
        monkeypatch.setattr(layers, "FUSED_KERNELS", False)
        ref_ids, ref_w = router(x)
        logits = router.gate(x).float()  # bf16 values: equal logits happen
    assert ids.dtype == ref_ids.dtype == torch.int32 and w.dtype == torch.bfloat16
    assert float((w.float() - ref_w.float()).abs().max()) <= 2**-8  # one bf16 ulp below 1
    # the same experts, except where equal logits make either choice right (torch's top-k
    # orders equals its own way; the kernel takes the lower id)
    top = logits.topk(4, dim=-1).values  # [T, k + 1]
    tied = (top[:, 1:] == top[:, :-1]).any(-1)
    assert int(tied.sum()) < 30, "the check would be empty"
    assert torch.equal(ids[~tied], ref_ids[~tied])
    chosen = logits.gather(1, ids.long())  # a tied row's picks still hold the top-3 logits
    assert torch.equal(chosen.sort(-1).values, top[:, :3].sort(-1).values)


if __name__ == "__main__":  # the interpreted child (see tests/conftest.py: run_interpreted)
    print(json.dumps(cases()))
