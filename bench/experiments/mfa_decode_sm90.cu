// An experiment, not used by serving (bench/experiments/README.md): paged MFA decode attention
// for Hopper (sm_90) in CUDA C++, 64 query heads sharing one KV head of dim 256.
//
// One CTA per (split, sequence); the S splits of a sequence form one thread-block cluster. A
// producer warp streams K/V tiles into shared memory with TMA tensor copies (4 slabs of TILE
// rows x 64 columns each for K and V, 128-byte swizzle, so ldmatrix reads them without bank
// conflicts), STAGES deep, completing on mbarriers. Four consumer warps own 16 heads each and
// run QK^T and PV on mma.sync (bf16/fp16 in, fp32 accumulate) with an online softmax. The
// splits then merge on chip: every CTA pushes its rows (unnormalised O, m, l) into the owner
// CTA's inbox by remote shared-memory stores; after one cluster barrier each owner combines
// its 64/S heads locally. No partials go to device memory and no second launch follows (the
// Triton kernel's reduce). With DYNAMIC the cluster's CTAs take tiles from a counter in rank
// 0's shared memory instead of fixed ranges.
//
// Build and check: bench/experiments/mfa_decode_sm90_probe.py (torch's JIT extension builder).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cg = cooperative_groups;

namespace {

constexpr int D = 256;               // head dim
constexpr int HQ = 64;               // query heads
constexpr int CONSUMERS = 4;         // warps of 16 heads
constexpr int THREADS = (CONSUMERS + 1) * 32;
constexpr int HEADER = 256;          // barriers, per-stage tile starts and the tile counter

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

struct Params {
  const void* q;
  const int* block_tables;
  const int* seq_lens;
  void* out;
  float qk_scale;  // softmax scale * log2(e)
  int64_t q_sb, q_sh, o_sb, o_sh;
  int bt_stride, page;
  int debug;  // 1: consumers skip the math (a streaming probe)
};

// Shared memory: a header (barriers, per-stage tile starts, the tile counter), the merge inbox
// (each split's unnormalised O rows and (m, l) for the heads this CTA owns), then the stages,
// 1024-byte aligned for the 128-byte swizzle. A stage holds K then V, each as 4 slabs of
// TILE rows x 64 columns (128 bytes a row), as the tensor copies write them: 16-byte chunk c
// of row r sits at chunk c ^ (r % 8), so ldmatrix's 8 rows hit 8 different banks.
template <int TILE, int STAGES>
struct SmemLayout {
  static constexpr int SLAB = TILE * 128;                 // bytes
  static constexpr int STAGE = 2 * 4 * SLAB;              // K and V
  static constexpr int INBOX = HQ * D * 4 + HQ * 2 * 4;   // splits x heads/split = HQ rows
  static constexpr int TILES_AT = (HEADER + INBOX + 1023) / 1024 * 1024;
  static constexpr size_t BYTES = size_t(TILES_AT) + size_t(STAGES) * STAGE + 1024;  // + align
};

__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int col, int row,
                                         int blk, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(blk), "r"(smem_addr(bar))
      : "memory");
}

// The producer warp: claims tiles (a fixed range, or the cluster's counter), waits for a free
// stage, arms its barrier with the stage's bytes and copies 4 K and 4 V slabs (lane 0).
template <int TILE, int STAGES, bool DYNAMIC>
__device__ void produce(const Params& p, const CUtensorMap* kmap, const CUtensorMap* vmap,
                        int b, int start, int end, int seq_len, uint64_t* full, uint64_t* empty,
                        int* tile_start, uint32_t tiles, int* counter) {
  using L = SmemLayout<TILE, STAGES>;
  const int lane = threadIdx.x & 31;
  const int* bt = p.block_tables + int64_t(b) * p.bt_stride;
  const int num_pages = (seq_len + p.page - 1) / p.page;
  int cached_base = -64, cached_page = 0;  // lane j holds block_tables[b][cached_base + j]
  int t0 = start;
  for (int i = 0;; ++i) {
    if (DYNAMIC) {
      int claim = 0;
      if (lane == 0) claim = atomicAdd(counter, 1);
      t0 = __shfl_sync(0xffffffffu, claim, 0) * TILE;
    }
    const bool done = t0 >= (DYNAMIC ? seq_len : end);
    const int stage = i % STAGES;
    if (i >= STAGES) mbar_wait(&empty[stage], ((i / STAGES) - 1) & 1);
    if (done) {  // tell the consumers, then stop
      if (lane == 0) {
        tile_start[stage] = -1;
        mbar_arrive(&full[stage]);
      }
      return;
    }
    const int pg = t0 / p.page;
    if (pg >= cached_base + 32 || pg < cached_base) {  // the next 32 pages' ids in one load
      cached_base = pg;
      cached_page = pg + lane < num_pages ? bt[pg + lane] : 0;
    }
    const int blk = __shfl_sync(0xffffffffu, cached_page, pg - cached_base);
    if (lane == 0) {
      tile_start[stage] = t0;
      mbar_arrive_tx(&full[stage], L::STAGE);
      const uint32_t ks = tiles + stage * L::STAGE, vs = ks + 4 * L::SLAB;
      const int row = t0 % p.page;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        tma_load(ks + j * L::SLAB, kmap, 64 * j, row, blk, &full[stage]);
        tma_load(vs + j * L::SLAB, vmap, 64 * j, row, blk, &full[stage]);
      }
    }
    if (!DYNAMIC) t0 += TILE;
  }
}

template <int TILE, int STAGES, bool DYNAMIC, typename T>
__global__ void __launch_bounds__(THREADS, 1)
    mfa_decode_kernel(const Params p, const __grid_constant__ CUtensorMap kmap,
                      const __grid_constant__ CUtensorMap vmap) {
  using M = Mma<T>;
  using L = SmemLayout<TILE, STAGES>;
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + STAGES;
  int* tile_start = reinterpret_cast<int*>(empty + STAGES);
  int* counter = tile_start + STAGES;
  float* inbox = reinterpret_cast<float*>(smem + HEADER);  // [HQ rows][D], then (m, l) [HQ][2]
  float* inbox_ml = inbox + HQ * D;
  const uint32_t tiles = (smem_addr(smem) + L::TILES_AT + 1023) & ~1023u;

  const int splits = gridDim.x, rank = blockIdx.x, b = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int seq_len = p.seq_lens[b];
  // fixed ranges: whole tiles, so that tiles never straddle a page (TILE divides the page)
  const int split_tokens = ((seq_len + splits - 1) / splits + TILE - 1) / TILE * TILE;
  const int start = rank * split_tokens, end = min(start + split_tokens, seq_len);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMERS);
    }
    *counter = 0;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cg::cluster_group cluster = cg::this_cluster();
  int* rank0_counter = counter;
  if (DYNAMIC && splits > 1) {
    cluster.sync();  // rank 0's counter is zero before anyone claims
    rank0_counter = cluster.map_shared_rank(counter, 0);
  } else {
    __syncthreads();
  }

  float acc[D / 8][4];  // O rows g and g+8 of this warp's 16 heads, 8 columns per block
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const int g = lane >> 2, t = lane & 3, h0 = warp * 16;
  if (warp == CONSUMERS) {
    produce<TILE, STAGES, DYNAMIC>(p, &kmap, &vmap, b, start, end, seq_len, full, empty,
                                   tile_start, tiles, rank0_counter);
  } else {
    uint32_t qf[D / 16][4];  // A fragments of q: rows g/g+8, columns 16kk + 2t (+8)
    const T* q = static_cast<const T*>(p.q) + int64_t(b) * p.q_sb;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const T* r0 = q + (h0 + g) * p.q_sh + kk * 16 + 2 * t;
      const T* r1 = r0 + 8 * p.q_sh;
      qf[kk][0] = *reinterpret_cast<const uint32_t*>(r0);
      qf[kk][1] = *reinterpret_cast<const uint32_t*>(r1);
      qf[kk][2] = *reinterpret_cast<const uint32_t*>(r0 + 8);
      qf[kk][3] = *reinterpret_cast<const uint32_t*>(r1 + 8);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    // ldmatrix: lane l reads row (l & 7) + 8 x (one bit of l) of its 8x8 matrix, at a 16-byte
    // chunk that the swizzle moves by row % 8 = l & 7. K (QK^T's B, not transposed): matrices
    // are (tokens +0/+8) x (dims +0/+8); V (PV's B, transposed): (tokens +0/+8) x (dims +0/+8).
    const int x = lane & 7;
    const int k_row = x + ((lane >> 4) & 1) * 8, k_hi = (lane >> 3) & 1;
    const int v_row = x + ((lane >> 3) & 1) * 8, v_hi = (lane >> 4) & 1;
    uint32_t k_chunk[4], v_chunk[4];  // byte offsets of chunk 2c + hi within a 128-byte row
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      k_chunk[c] = ((2 * c + k_hi) ^ x) * 16;
      v_chunk[c] = ((2 * c + v_hi) ^ x) * 16;
    }
    for (int i = 0;; ++i) {
      const int stage = i % STAGES;
      mbar_wait(&full[stage], (i / STAGES) & 1);
      const int t0 = tile_start[stage];
      if (t0 < 0) break;
      const int valid = (DYNAMIC ? seq_len : end) - t0;
      const uint32_t ks = tiles + stage * L::STAGE, vs = ks + 4 * L::SLAB;
      if (p.debug & 1) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[stage]);
        continue;
      }
      if (valid < TILE) {  // rows past the end hold stale cache: P is 0 there, 0 x NaN is not
        for (int idx = threadIdx.x; idx < (TILE - valid) * 32; idx += CONSUMERS * 32) {
          const int r = valid + idx / 32, c = idx % 32;  // 16-byte chunk c of V row r
          const uint32_t a = vs + (c / 8) * L::SLAB + r * 128 + (c % 8) * 16;
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(a), "r"(0) : "memory");
        }
        asm volatile("fence.proxy.async.shared::cta;\n bar.sync 1, %0;" ::"n"(CONSUMERS * 32)
                     : "memory");
      }
      float s[TILE / 8][4];
#pragma unroll
      for (int n = 0; n < TILE / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int np = 0; np < TILE / 16; ++np) {
        const uint32_t row = ks + (np * 16 + k_row) * 128;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {  // dims 16kk..: slab kk / 4, chunks 2 (kk % 4) +
          uint32_t bf[4];
          ldsm_x4(row + (kk / 4) * L::SLAB + k_chunk[kk % 4], bf);
          M::run(s[2 * np], qf[kk], bf[0], bf[1]);
          M::run(s[2 * np + 1], qf[kk], bf[2], bf[3]);
        }
      }
      float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
      for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + 2 * t + (e & 1);
          s[n][e] = col < valid ? s[n][e] * p.qk_scale : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        alpha[r] = exp2f(m_i[r] - mx[r]);
        m_i[r] = mx[r];
        l_i[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - m_i[e >> 1]);
          l_i[e >> 1] += s[n][e];  // this lane's share; the quad sums at the end
        }
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[n][0] *= alpha[0];
        acc[n][1] *= alpha[0];
        acc[n][2] *= alpha[1];
        acc[n][3] *= alpha[1];
      }
#pragma unroll
      for (int j = 0; j < TILE / 16; ++j) {
        const uint32_t a[4] = {M::pack(s[2 * j][0], s[2 * j][1]), M::pack(s[2 * j][2], s[2 * j][3]),
                               M::pack(s[2 * j + 1][0], s[2 * j + 1][1]),
                               M::pack(s[2 * j + 1][2], s[2 * j + 1][3])};
        const uint32_t row = vs + (j * 16 + v_row) * 128;
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {  // dims 16np..: slab np / 4, chunks 2 (np % 4) +
          uint32_t bf[4];
          ldsm_x4_t(row + (np / 4) * L::SLAB + v_chunk[np % 4], bf);
          M::run(acc[2 * np], a, bf[0], bf[1]);
          M::run(acc[2 * np + 1], a, bf[2], bf[3]);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[stage]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
      l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
    }
  }

  T* out = static_cast<T*>(p.out) + int64_t(b) * p.o_sb;
  if (splits == 1) {  // the only split: normalise and store
    if (warp < CONSUMERS) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float inv = 1.f / l_i[r];
          *reinterpret_cast<uint32_t*>(out + (h0 + g + 8 * r) * p.o_sh + n * 8 + 2 * t) =
              M::pack(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        }
      }
    }
    return;
  }
  // Merge on chip: each head has an owner CTA (rank h / heads); every split pushes its rows
  // (unnormalised O, m, l) into the owner's inbox by remote shared-memory stores, which do not
  // wait; after one cluster barrier each owner combines its heads from local memory.
  const int heads = HQ / splits;
  if (warp < CONSUMERS) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int h = h0 + g + 8 * r, owner = h / heads;
      const int slot = rank * heads + h % heads;  // [split][head within the owner's share]
      float* row = cluster.map_shared_rank(inbox, owner) + slot * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(row + n * 8 + 2 * t) = make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
      if (t == 0)
        *reinterpret_cast<float2*>(cluster.map_shared_rank(inbox_ml, owner) + 2 * slot) =
            make_float2(m_i[r], l_i[r]);
    }
  }
  cluster.sync();
  for (int idx = threadIdx.x; idx < heads * (D / 4); idx += THREADS) {
    const int hl = idx / (D / 4), c = (idx % (D / 4)) * 4;
    float mmax = -INFINITY;
    for (int s = 0; s < splits; ++s) mmax = fmaxf(mmax, inbox_ml[2 * (s * heads + hl)]);
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
    float den = 0.f;
    for (int s = 0; s < splits; ++s) {
      const int slot = s * heads + hl;
      const float w = exp2f(inbox_ml[2 * slot] - mmax);  // an empty split (m = -inf) weighs 0
      const float4 o = *reinterpret_cast<const float4*>(inbox + slot * D + c);
      num.x += w * o.x;
      num.y += w * o.y;
      num.z += w * o.z;
      num.w += w * o.w;
      den += w * inbox_ml[2 * slot + 1];
    }
    const float inv = 1.f / den;
    const int h = rank * heads + hl;
    *reinterpret_cast<uint2*>(out + h * p.o_sh + c) =
        make_uint2(M::pack(num.x * inv, num.y * inv), M::pack(num.z * inv, num.w * inv));
  }
}

template <int TILE, int STAGES, bool DYNAMIC, typename T>
cudaError_t launch(const Params& p, const CUtensorMap& kmap, const CUtensorMap& vmap, int batch,
                   int splits, cudaStream_t stream) {
  auto kernel = mfa_decode_kernel<TILE, STAGES, DYNAMIC, T>;
  constexpr size_t bytes = SmemLayout<TILE, STAGES>::BYTES;
  static_assert(bytes <= 232448, "shared memory");
  static bool configured = false;
  if (!configured) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
    configured = true;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(splits, batch, 1);
  config.blockDim = dim3(THREADS, 1, 1);
  config.dynamicSmemBytes = bytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = splits;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p, kmap, vmap);
}

// Stages fill the shared memory beside the 65 KB inbox: one CTA an SM. tile is 32 or 64
// (checked by the caller).
template <typename T>
cudaError_t dispatch(const Params& p, const CUtensorMap& kmap, const CUtensorMap& vmap,
                     int batch, int splits, int tile, bool dynamic, cudaStream_t s) {
  if (tile == 32)
    return dynamic ? launch<32, 5, true, T>(p, kmap, vmap, batch, splits, s)
                   : launch<32, 5, false, T>(p, kmap, vmap, batch, splits, s);
  return dynamic ? launch<64, 2, true, T>(p, kmap, vmap, batch, splits, s)
                 : launch<64, 2, false, T>(p, kmap, vmap, batch, splits, s);
}

// A tensor map over one KV cache [blocks, page, 256]: boxes of TILE rows x 64 columns, 128-byte
// swizzle. The driver's encoder is reached through the runtime (no libcuda link).
cudaError_t encode_kv_map(CUtensorMap* map, const void* base, bool bf16, int64_t blocks,
                          int64_t page, int64_t block_stride_elems, int tile) {
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static Encode encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                       cudaEnableDefault, &found);
    if (err != cudaSuccess) return err;
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<Encode>(fn);
  }
  const cuuint64_t dims[3] = {cuuint64_t(D), cuuint64_t(page), cuuint64_t(blocks)};
  const cuuint64_t strides[2] = {cuuint64_t(D) * 2, cuuint64_t(block_stride_elems) * 2};
  const cuuint32_t box[3] = {64, cuuint32_t(tile), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult res = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        3, const_cast<void*>(base), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

#ifdef AFD_KERNEL_ONLY  // a compile check without torch's headers
cudaError_t mfa_decode_check(const Params& p, const CUtensorMap& m, int splits, bool dynamic) {
  cudaError_t err = dispatch<__nv_bfloat16>(p, m, m, 1, splits, 32, dynamic, nullptr);
  return err != cudaSuccess ? err : dispatch<__half>(p, m, m, 1, splits, 32, dynamic, nullptr);
}
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

void mfa_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor block_tables,
                torch::Tensor seq_lens, torch::Tensor out, double scale, int64_t splits,
                int64_t tile, bool dynamic, int64_t debug) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.size(1) == HQ && q.size(2) == D && q.stride(2) == 1,
              "mfa_decode: q must be CUDA [B, 64, 256] with unit last stride");
  TORCH_CHECK(k.dim() == 3 && k.size(2) == D && k.stride(2) == 1 && k.stride(1) == D &&
                  k.strides() == v.strides() && k.sizes() == v.sizes(),
              "mfa_decode: k/v caches must be [blocks, page, 256] with rows contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "mfa_decode: q, k, v and out must share one dtype");
  TORCH_CHECK(k.size(1) % tile == 0, "mfa_decode: the KV block size must be a multiple of ", tile);
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.stride(1) == 1 &&
                  seq_lens.scalar_type() == torch::kInt32 && seq_lens.is_contiguous(),
              "mfa_decode: block_tables and seq_lens must be int32");
  TORCH_CHECK(tile == 32 || tile == 64, "mfa_decode: tile must be 32 or 64");
  TORCH_CHECK(splits >= 1 && splits <= 8 && (splits & (splits - 1)) == 0,
              "mfa_decode: splits must be 1, 2, 4 or 8");
  TORCH_CHECK(out.stride(2) == 1, "mfa_decode: out needs a unit last stride");
  const at::cuda::CUDAGuard guard(q.device());
  Params p;
  p.q = q.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.qk_scale = float(scale * 1.4426950408889634);
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.o_sb = out.stride(0);
  p.o_sh = out.stride(1);
  p.bt_stride = int(block_tables.stride(0));
  p.page = int(k.size(1));
  p.debug = int(debug);
  const int batch = int(q.size(0));
  if (batch == 0) return;
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
              "mfa_decode: bf16 or fp16 only");
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  CUtensorMap kmap, vmap;
  C10_CUDA_CHECK(encode_kv_map(&kmap, k.data_ptr(), bf16, k.size(0), k.size(1), k.stride(0), int(tile)));
  C10_CUDA_CHECK(encode_kv_map(&vmap, v.data_ptr(), bf16, v.size(0), v.size(1), v.stride(0), int(tile)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(bf16 ? dispatch<__nv_bfloat16>(p, kmap, vmap, batch, int(splits), int(tile), dynamic, stream)
                      : dispatch<__half>(p, kmap, vmap, batch, int(splits), int(tile), dynamic, stream));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mfa_decode", &mfa_decode, "Paged MFA decode attention (Hopper)");
}
#endif
