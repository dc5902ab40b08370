"""`afd-bench kernels`, attention part: MFA paged decode attention (Triton) against SDPA over
a contiguous copy of the same KV, as fractions of the measured copy bandwidth.
`python -m afd.bench.kernels_attention --sweep [--page N] --out PATH` times tile configs
side by side at the shapes that decide the defaults."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from afd.bench.kernel_timing import ceilings, cycle, ms_of, rel_err, rotate
from afd.quantization import quantize_fp8
from attn_worker.attention import attend
from attn_worker.kernels.decode_attention import paged_decode_attention_ref as attn_ref
from attn_worker.kernels.decode_attention import paged_decode_attention_triton as attn_triton
from attn_worker.kernels.decode_splits import DEFAULT_BLOCK_N, choose_num_splits

HQ, HEAD_DIM, PAGE = 64, 256, 64
# sweep: tile configs timed side by side at the shapes that decide the defaults, each at the
# split count the model picks for its tiles; "default" runs first and last (the spread). The
# 2026-11-22 H100 sweep also timed head blocks of 32 (grid heads/32 x splits x B; 1.1-2x
# slower: mma.sync instead of wgmma, and each KV tile read twice from L2) and 2 programs/SM.
VARIANTS: dict[str, dict] = {
    "default": {},  # BLOCK_N 32, 4 warps, 4 stages, 1 program/SM
    "n64s2": dict(block_n=64, num_stages=2),  # the committed default before it
    "n32s3": dict(num_stages=3),
    "n64s3w8": dict(block_n=64, num_stages=3, num_warps=8),
}
FP8_SHAPES = [(32, 4096), (64, 8192), (128, 32768)]
SWEEP_SHAPES = [(32, 4096), (64, 4096), (32, 8192), (64, 8192), (128, 4096), (32, 32768)]


def _sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def _attn_inputs(batch: int, seq_len: int, page: int = PAGE) -> dict[str, torch.Tensor]:
    num_blocks = batch * seq_len // page
    kv = dict(device="cuda", dtype=torch.bfloat16)
    return {
        "q": torch.randn(batch, HQ, HEAD_DIM, **kv),
        "k": torch.randn(num_blocks, page, HEAD_DIM, **kv),
        "v": torch.randn(num_blocks, page, HEAD_DIM, **kv),
        # a shuffled block table, as a long-running cache's would be
        "bt": torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1),
        "lens": torch.full((batch,), seq_len, device="cuda", dtype=torch.int32),
    }


def _attn_triton(t: dict, seq_len: int, **knobs) -> Callable:
    scale = HEAD_DIM**-0.5
    return lambda out=None: attn_triton(
        t["q"], t["k"], t["v"], t["bt"], t["lens"], scale, seq_len, out=out, **knobs
    )


def _attn_check(t: dict[str, torch.Tensor], run: Callable) -> float:
    out = torch.full_like(t["q"], float("nan"))  # poisoned: unwritten elements show
    run(out)
    n = 4  # the fp32 reference loops over sequences: a few are enough
    ref = attn_ref(t["q"][:n], t["k"], t["v"], t["bt"][:n], t["lens"][:n], HEAD_DIM**-0.5)
    return rel_err(out[:n], ref) if not out.isnan().any() else float("nan")


def _sdpa(t: dict[str, torch.Tensor], batch: int, seq_len: int) -> Callable:
    k = t["k"][t["bt"].long()].view(batch, 1, seq_len, HEAD_DIM)  # contiguous copy
    v = t["v"][t["bt"].long()].view(batch, 1, seq_len, HEAD_DIM)
    q4 = t["q"].view(batch, HQ, 1, HEAD_DIM)
    return lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True).view(batch, HQ, -1)


def attention(copy_bw: float, results: dict) -> None:
    """The kernel as serving calls it (its default split count and tile config) beside SDPA."""
    rows = results.setdefault("attention", [])
    for batch in (32, 64, 128):
        for seq_len in (4096, 8192, 32768):
            torch.cuda.empty_cache()
            kv_bytes = 2 * batch * seq_len * HEAD_DIM * 2
            sets = rotate(lambda b=batch, n=seq_len: _attn_inputs(b, n), kv_bytes)
            runs = [_attn_triton(t, seq_len) for t in sets]
            row = {"B": batch, "L": seq_len, "kv_bytes": kv_bytes, "input_sets": len(sets)}
            row["num_splits"] = choose_num_splits(batch, seq_len, DEFAULT_BLOCK_N, _sms())
            row["err"] = _attn_check(sets[0], runs[0])
            row["err_again"] = _attn_check(sets[-1], runs[-1])  # counters reused
            sdpas = [_sdpa(t, batch, seq_len) for t in sets]
            row["sdpa_err"] = rel_err(sdpas[0]().float(), runs[0]().float())
            for name, fns in (("sdpa", sdpas), ("triton", runs)):
                row[f"{name}_ms"] = ms_of(cycle(fns))
                row[f"{name}_frac_copy"] = kv_bytes / (row[f"{name}_ms"] * 1e-3) / copy_bw
            del sets, runs, sdpas
            rows.append(row)
            print("attn", row, flush=True)


def _fp8_inputs(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same cache as the KV cache stores it with --kv-cache-dtype fp8."""
    (k8, ks), (v8, vs) = quantize_fp8(t["k"]), quantize_fp8(t["v"])
    return {**t, "k": k8, "v": v8, "k_scale": ks, "v_scale": vs}


def attention_fp8(copy_bw: float, results: dict) -> None:
    """fp8 KV (e4m3, a scale per token vector) at a few shapes: bytes = 2·B·L·(256 + 4)."""
    rows = results.setdefault("attention_fp8", [])
    for batch, seq_len in FP8_SHAPES:
        torch.cuda.empty_cache()
        kv_bytes = 2 * batch * seq_len * (HEAD_DIM + 4)
        sets = rotate(lambda b=batch, n=seq_len: _fp8_inputs(_attn_inputs(b, n)), kv_bytes)
        runs = [_attn_triton(t, seq_len, k_scale=t["k_scale"], v_scale=t["v_scale"]) for t in sets]
        t, n = sets[0], 4
        ref = attn_ref(
            t["q"][:n], t["k"], t["v"], t["bt"][:n], t["lens"][:n], HEAD_DIM**-0.5,
            t["k_scale"], t["v_scale"],
        )  # fmt: skip
        row = {"B": batch, "L": seq_len, "kv_bytes": kv_bytes, "input_sets": len(sets)}
        row["err"] = rel_err(runs[0]()[:n], ref)
        row["triton_ms"] = ms_of(cycle(runs))
        row["triton_frac_copy"] = kv_bytes / (row["triton_ms"] * 1e-3) / copy_bw
        del sets, runs
        rows.append(row)
        print("attn fp8", row, flush=True)


PREFILL_SHAPES = [(2048, 2048), (512, 8192), (2048, 8192), (8192, 8192)]  # (n, L)


def _masked_sdpa(q, k, v, scale):
    """The prefill path before version 12: an explicit [n, L] mask over K/V expanded to every
    head, which sends SDPA to its math kernel."""
    n, heads, _ = q.shape
    pos_q = torch.arange(n, device=q.device)[:, None] + k.shape[0] - n
    mask = torch.arange(k.shape[0], device=q.device)[None, :] <= pos_q  # [n, L]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.expand(heads, -1, -1), v.expand(heads, -1, -1),
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    return o.transpose(0, 1)


def prefill(peaks: dict, results: dict) -> None:
    """Causal prefill attention of n new tokens over L (the last n positions), one sequence,
    as `attend` runs it, beside the masked path it replaced; FLOP/s against the matmul peak."""
    rows = results.setdefault("prefill", [])
    for n, length in PREFILL_SHAPES:
        kv = dict(device="cuda", dtype=torch.bfloat16)
        q = torch.randn(n, HQ, HEAD_DIM, **kv)
        k, v = torch.randn(length, HEAD_DIM, **kv), torch.randn(length, HEAD_DIM, **kv)
        flops = 4 * HQ * HEAD_DIM * (n * length - n * n / 2)  # QK^T and PV, causal
        row = {"n": n, "L": length, "flops": flops}
        fast = attend(q, k, v, HEAD_DIM**-0.5)
        row["err_vs_masked"] = rel_err(fast, _masked_sdpa(q, k, v, HEAD_DIM**-0.5))
        for name, fn in (("masked", _masked_sdpa), ("attend", attend)):
            run = partial(fn, q, k, v, HEAD_DIM**-0.5)
            row[f"{name}_ms"] = ms = ms_of(run, graph=False)
            row[f"{name}_frac_matmul"] = flops / (ms * 1e-3) / peaks["matmul_flop_per_s"]
        rows.append(row)
        print("prefill", row, flush=True)


def _timed(sets: list[dict], seq_len: int, kv_bytes: int, copy_bw: float, **knobs) -> dict:
    entry = {k: str(v) for k, v in knobs.items()}
    try:
        runs = [_attn_triton(t, seq_len, **knobs) for t in sets]
        entry["err"] = max(_attn_check(sets[0], runs[0]), _attn_check(sets[-1], runs[-1]))
        ok = entry["err"] < 1e-2  # NaN (unwritten output) fails too
        entry["ms"] = ms_of(cycle(runs), rep=50) if ok else float("inf")
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
        entry.update(error=repr(exc)[:200], ms=float("inf"))
    entry["frac_copy"] = kv_bytes / (entry["ms"] * 1e-3) / copy_bw
    return entry


def warm(name: str, page: int, out_path: Path) -> None:
    """One variant at every sweep shape, once (a child process per variant): compiles in
    parallel into Triton's disk cache, and a variant that faults takes only its child down."""
    errs = {}
    for batch, seq_len in SWEEP_SHAPES:
        t = _attn_inputs(batch, seq_len, page)
        errs[f"B{batch}_L{seq_len}"] = _attn_check(t, _attn_triton(t, seq_len, **VARIANTS[name]))
        torch.cuda.synchronize()
        del t
    out_path.write_text(json.dumps(errs))


def sweep(copy_bw: float, page: int, results: dict, out_path: Path) -> None:
    warm_dir = Path(tempfile.mkdtemp(prefix="attn_warm_"))
    cmd = [sys.executable, "-m", "afd.bench.kernels_attention", "--page", str(page), "--out"]
    procs = {
        name: subprocess.Popen([*cmd, str(warm_dir / f"{name}.json"), "--warm", name])
        for name in VARIANTS
    }
    ok = set()
    for name, proc in procs.items():
        proc.wait()
        path = warm_dir / f"{name}.json"
        errs = json.loads(path.read_text()) if path.exists() else {}
        results.setdefault("warm", {})[name] = errs or f"exit {proc.returncode}"
        if errs and all(e < 1e-2 for e in errs.values()):
            ok.add(name)
    print("warm", results["warm"], flush=True)
    for batch, seq_len in SWEEP_SHAPES:
        torch.cuda.empty_cache()
        kv_bytes = 2 * batch * seq_len * HEAD_DIM * 2
        sets = rotate(lambda b=batch, n=seq_len: _attn_inputs(b, n, page), kv_bytes)
        log = results.setdefault(f"B{batch}_L{seq_len}", [])
        for name in [*VARIANTS, "default"]:
            if name not in ok:
                continue
            knobs = VARIANTS[name]
            log.append({"variant": name, **_timed(sets, seq_len, kv_bytes, copy_bw, **knobs)})
            print(batch, seq_len, name, f"{log[-1]['ms'] * 1e3:.1f} us", flush=True)
            out_path.write_text(json.dumps(results, indent=1, default=str))
        del sets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m afd.bench.kernels_attention")
    parser.add_argument("--sweep", action="store_true", help="split/config/variant sweep")
    parser.add_argument("--page", type=int, default=PAGE, help="KV block size (sweep)")
    parser.add_argument("--warm", help="(sweep child) compile and check one variant")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    args = parser.parse_args(argv)
    if args.warm:
        warm(args.warm, args.page, args.out)
        return 0
    results: dict = {"command": " ".join(["kernels_attention", *argv])}
    results["device"] = torch.cuda.get_device_name()
    results["ceilings"] = ceilings()
    copy_bw = results["ceilings"]["copy_bytes_per_s"]
    print("ceilings", results["ceilings"], flush=True)
    if args.sweep:
        results["page"] = args.page
        sweep(copy_bw, args.page, results, args.out)
    else:
        attention(copy_bw, results)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    for key, log in results.items():  # a table per shape, last: the reply's tail
        if key.startswith("B") and log:
            row = " ".join(f"{e['variant']}={e['ms'] * 1e3:.1f}" for e in log)
            print(key, row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
