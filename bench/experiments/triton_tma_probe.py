"""Does TMA help the Triton MFA decode kernel? The serving kernel's loop with K/V tiles loaded
through host tensor descriptors (TMA), timed at several split counts and tile configs beside
the serving kernel, after a check against the fp32 reference.

    python bench/experiments/triton_tma_probe.py --out $OUT/triton_tma_probe.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from afd.bench.kernel_timing import ceilings, cycle, ms_of, rel_err, rotate  # noqa: E402
from attn_worker.kernels import decode_attention as serving  # noqa: E402
from attn_worker.kernels.decode_attention_ref import paged_decode_attention_ref  # noqa: E402

SCALE = 256**-0.5
CONFIGS = ((32, 4, 4), (64, 4, 3), (32, 8, 4), (64, 8, 3), (32, 4, 6))  # BLOCK_N, warps, stages
SHAPES = ((32, 4096), (64, 4096), (32, 8192), (128, 4096), (64, 8192))


@triton.jit
def _tma_kernel(
    q_ptr, k_desc, v_desc, bt_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr, out_ptr, qk_scale,
    stride_qb, stride_qh, stride_btb, num_splits, stride_ob, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    SPLIT: tl.constexpr, GDC: tl.constexpr, MASK_V: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    offs_h = tl.arange(0, HQ)
    offs_d = tl.arange(0, D)
    seq_len = tl.load(lens_ptr + b)
    split_tokens = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :])
    m_i = tl.full([HQ], float("-inf"), tl.float32)
    l_i = tl.zeros([HQ], tl.float32)
    acc = tl.zeros([HQ, D], tl.float32)
    offs_t = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        row = tl.load(bt_ptr + b * stride_btb + n0 // PAGE) * PAGE + n0 % PAGE
        k = k_desc.load([row, 0])
        v = v_desc.load([row, 0])
        mask_n = n0 + offs_t < end
        if MASK_V:  # stale rows past the end: P is 0 there, 0 x NaN is not
            v = tl.where(mask_n[:, None], v, 0.0)
        s = tl.where(mask_n[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    live = tl.cdiv(seq_len, split_tokens)
    if not SPLIT or live == 1:
        if pid_s == 0:
            tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty))
    elif start < seq_len:
        r = (b * num_splits + pid_s) * HQ + offs_h
        tl.store(pm_ptr + r, m_i)
        tl.store(pl_ptr + r, l_i)
        tl.store(po_ptr + r[:, None] * D + offs_d[None, :], acc / l_i[:, None])


def run(x: dict, out: torch.Tensor, splits: int, block_n=32, warps=4, stages=4, mask_v=True):
    batch, page = x["q"].shape[0], x["k"].shape[1]
    descs = [TensorDescriptor.from_tensor(x[n].view(-1, 256), [block_n, 256]) for n in "kv"]
    po, pml = serving._workspace(x["q"].device, 1 if splits == 1 else batch * splits * 64, 256)
    gdc = serving._has_gdc(x["q"].device)
    _tma_kernel[(splits, batch)](
        x["q"], *descs, x["bt"], x["lens"], po, pml[0], pml[1], out, SCALE * 1.4426950408889634,
        x["q"].stride(0), x["q"].stride(1), x["bt"].stride(0), splits, out.stride(0),
        out.stride(1), HQ=64, D=256, BLOCK_N=block_n, PAGE=page, SPLIT=splits > 1, GDC=gdc,
        MASK_V=mask_v, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:  # the serving kernel's reduce
        block_s = triton.next_power_of_2(splits)
        block_hr = min(16, max(1, 8192 // (block_s * 256)))
        serving._reduce_kernel[(batch, triton.cdiv(64, block_hr))](
            po, pml[0], pml[1], out, x["lens"], splits, out.stride(0), out.stride(1), HQ=64,
            D=256, BLOCK_D=256, BLOCK_S=block_s, BLOCK_HR=block_hr, BLOCK_N=block_n, GDC=gdc,
            num_warps=4, **({"launch_pdl": True} if gdc else {}),
        )  # fmt: skip
    return out


def inputs(lens: list[int], page: int = 64) -> dict[str, torch.Tensor]:
    batch, per_seq = len(lens), -(-max(lens) // page)
    blocks = batch * per_seq + 3
    kv = dict(device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32)[: batch * per_seq]
    return {
        "q": torch.randn(batch, 64, 256, **kv),
        "k": torch.randn(blocks, page, 256, **kv),
        "v": torch.randn(blocks, page, 256, **kv),
        "bt": table.view(batch, per_seq).contiguous(),
        "lens": torch.tensor(lens, device="cuda", dtype=torch.int32),
    }


def _serving(x: dict, out: torch.Tensor, seq_len: int) -> None:
    serving.paged_decode_attention_triton(
        x["q"], x["k"], x["v"], x["bt"], x["lens"], SCALE, seq_len, out=out
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("triton_tma_probe.json"))
    args = parser.parse_args()
    result = {"checks": [], "timing": []}
    for lens in ([5, 64, 65, 100], [31, 2049, 4096, 7, 1000], [4096] * 3):
        x = inputs(lens)
        ref = paged_decode_attention_ref(x["q"], x["k"], x["v"], x["bt"], x["lens"], SCALE)
        for splits in (1, 2, 4):
            out = run(x, torch.full_like(x["q"], float("nan")), splits)
            result["checks"].append([lens, splits, rel_err(out.float(), ref.float())])
    if not all(c[2] < 1e-2 for c in result["checks"]):
        print("check failed", result["checks"])
        return 1
    copy_bw = ceilings()["copy_bytes_per_s"]
    for batch, seq_len in SHAPES:
        kv_bytes = 2 * batch * seq_len * 512
        pairs = [(s, torch.empty_like(s["q"])) for s in rotate(
            lambda b=batch, n=seq_len: inputs([n] * b), kv_bytes)]  # fmt: skip

        def frac(call, *config, nbytes=kv_bytes, pairs=pairs) -> float:
            fns = [functools.partial(call, s, o, *config) for s, o in pairs]
            return nbytes / (ms_of(cycle(fns)) * 1e-3) / copy_bw

        row = {"B": batch, "L": seq_len, "triton": frac(_serving, seq_len)}
        for splits in (1, 2, 3, 4):
            for block_n, warps, stages in CONFIGS:
                for mask_v in (True, False) if (block_n, warps, stages) == (32, 4, 4) else (True,):
                    key = f"s{splits}_n{block_n}_w{warps}_st{stages}_mv{int(mask_v)}"
                    row[key] = frac(run, splits, block_n, warps, stages, mask_v)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        result["timing"].append(row)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
