"""The Triton kernels of the MoE grouped GEMMs (launched by moe_gemm.py): gate+up with SwiGLU
fused, and down with the router weight and the scatter-add fused, over row tiles of the
(token, slot) pairs sorted by expert; bf16 or e4m3 weights (scales per block), 16-bit or
e4m3 activations."""

import triton
import triton.language as tl


@triton.jit
def _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M: tl.constexpr):
    # Programs run expert by expert with the expert's row tiles fastest, so all tiles of one
    # expert use a weight tile at about the same time: HBM serves it once, L2 the others.
    pid = tl.program_id(0)
    meta = tile_meta_ptr + (pid // num_pid_n) * 4
    expert = tl.load(meta)
    first_tile = tl.load(meta + 1)
    first_row = tl.load(meta + 2)
    num_rows = tl.load(meta + 3)
    num_tiles = tl.maximum(tl.cdiv(num_rows, BLOCK_M), 1)
    local = pid - first_tile * num_pid_n
    m = local % num_tiles
    rows = tl.minimum(num_rows - m * BLOCK_M, BLOCK_M)
    return expert, first_row + m * BLOCK_M, rows, local // num_tiles


@triton.jit
def _gate_up_tile(
    x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows, pid_n,
    N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr, K_BLOCKS: tl.constexpr,
    A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < rows
    pair = tl.load(sorted_ids_ptr + row0 + offs_m, mask=valid, other=0)  # [BM]
    token = pair // TOPK  # rows past the tile's end read token 0 and are never stored
    n0 = pid_n * BLOCK_N
    offs_n = (n0 + tl.arange(0, BLOCK_N)) % N  # wrap: loads need no mask
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]  # [BM, BK]
    if not TMA:
        w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    if W8:  # fp8 weights: a scale per block of SCALE_N x SCALE_K, [E, N / SCALE_N, K / SCALE_K]
        s_off = expert.to(tl.int64) * stride_se + (offs_n // SCALE_N) * stride_sn  # [BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if TMA:  # [BN, BK] boxes of the [E*N, K] view; out-of-range columns read 0
            g = wg.load([expert * N + n0, k * BLOCK_K]).T
            u = wu.load([expert * N + n0, k * BLOCK_K]).T
        elif EVEN_K:
            g = tl.load(wg + w_off)
            u = tl.load(wu + w_off)
        else:
            g = tl.load(wg + w_off, mask=offs_k[:, None] < k_left, other=0.0)
            u = tl.load(wu + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        if W8 and not A8:  # e4m3 values are exact in 16 bits; the scales come after the sum
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        if K_BLOCKS:  # scales change along K: each tile's sum scaled (BLOCK_K divides SCALE_K)
            k_block = (k * BLOCK_K) // SCALE_K
            scale_g = tl.load(sg_ptr + s_off + k_block)[None, :]
            scale_u = tl.load(su_ptr + s_off + k_block)[None, :]
            acc_g += tl.dot(a, g, input_precision=PRECISION) * scale_g
            acc_u += tl.dot(a, u, input_precision=PRECISION) * scale_u
        elif A8 and PROMOTE_K > 0:  # fp32 sums every PROMOTE_K products (fp8 MMAs sum short)
            acc_g = tl.dot(a, g, acc_g, max_num_imprecise_acc=PROMOTE_K)
            acc_u = tl.dot(a, u, acc_u, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        if not TMA:
            w_off += BLOCK_K
    if W8 and not K_BLOCKS:  # one scale per output channel (or per row block): after the sum
        acc_g *= tl.load(sg_ptr + s_off)[None, :]
        acc_u *= tl.load(su_ptr + s_off)[None, :]
    if A8:  # and one per token row of x
        x_scale = tl.load(xs_ptr + token, mask=valid, other=0.0)[:, None]
        acc_g *= x_scale
        acc_u *= x_scale
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    offs_n = n0 + tl.arange(0, BLOCK_N)
    act_ptrs = act_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_act + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N))


@triton.jit
def gate_up_kernel(
    x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, tile_meta_ptr, num_experts,
    num_pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn, SCALE_N,
    SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert, row0, rows, pid_n = _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M)
    if expert >= num_experts:  # past the last tile of the upper-bound grid
        return
    # An expert's last tile with at most SMALL_M rows runs at that size: less padding.
    if SMALL_M == 0:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    elif rows <= SMALL_M:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, SMALL_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    else:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip


@triton.jit
def _down_tile(
    act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows, pid_n,
    N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr, K_BLOCKS: tl.constexpr,
    A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < rows
    pair = tl.load(sorted_ids_ptr + row0 + offs_m, mask=valid, other=0)  # [BM]
    n0 = pid_n * BLOCK_N
    offs_n = (n0 + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    # act rows are in sorted order; rows past the tile's end are masked (they may be past P)
    a_ptrs = act_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_act + offs_k[None, :]
    if not TMA:
        w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    if W8:
        s_off = expert.to(tl.int64) * stride_se + (offs_n // SCALE_N) * stride_sn  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if TMA:
            w = wd.load([expert * N + n0, k * BLOCK_K]).T
        elif EVEN_K:
            w = tl.load(wd + w_off)
        else:
            w = tl.load(wd + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        if W8 and not A8:
            w = w.to(a.dtype)
        if K_BLOCKS:
            scale = tl.load(sd_ptr + s_off + (k * BLOCK_K) // SCALE_K)[None, :]
            acc += tl.dot(a, w, input_precision=PRECISION) * scale
        elif A8 and PROMOTE_K > 0:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        if not TMA:
            w_off += BLOCK_K
    router_w = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * router_w[:, None]
    if W8 and not K_BLOCKS:
        acc *= tl.load(sd_ptr + s_off)[None, :]
    if A8:  # act rows' scales, in sorted order
        acc *= tl.load(as_ptr + row0 + offs_m, mask=valid, other=0.0)[:, None]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + (pair // TOPK)[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    # A token's k experts land in different programs: fp32 atomics sum them.
    tl.atomic_add(out_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < N), sem="relaxed")


@triton.jit
def down_kernel(
    act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, tile_meta_ptr, topk_w_ptr,
    num_experts, num_pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se,
    stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert, row0, rows, pid_n = _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M)
    if expert >= num_experts:
        return
    if SMALL_M == 0:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    elif rows <= SMALL_M:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, SMALL_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    else:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
