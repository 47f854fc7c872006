// GLQ CUDA kernels: fused decode + matmul straight from stage codes, and the block-diagonal fast
// Walsh-Hadamard transform. Torch-free on purpose (raw pointers, cudaStream_t): see glq_kernels.h.
//
// Matmul design (one kernel for every batch 1..64, every rate 2..8):
// * Each warp owns 16*R rows of W and walks its K range in chunks of 32 code groups (256 inputs).
//   Lane (g = lane/4, t = lane%4) loads one 16-byte vector per 16-bit stage for rows g and g+8:
//   8 consecutive codes, groups 8t..8t+7 of the chunk (4 lanes cover 64 contiguous bytes of a row).
// * Codes are decoded in registers through tables in shared memory and fed to mma.m16n8k16 as
//   the A operand. The MMA's k order is free as long as A and B agree, so lane t's group 8t+i
//   supplies logical k {2t,2t+1,2t+8,2t+9} of two MMAs (elements 0..3 and 4..7). The batch is the
//   MMA's n (8 columns per n-tile), so batch 1..8 costs one MMA per 16x16 weights and fp32
//   accumulation comes from the tensor cores instead of 8 FFMA + 8 converts per code.
// * Table lookups are 16-byte random reads, the hot spot: 2 bytes of shared-memory traffic per
//   weight against 0.25 from DRAM at 2 bpw. Shared memory serves a 16-byte load in quarter-warp
//   phases of 8 lanes over 8 bank quads; random entries collide (about 2.5 wavefronts instead of 1
//   for 8 random picks). With REP = 8 copies, lane l reads copy l%8, laid out so that copy c
//   lives only in bank quad c: every phase is conflict-free. Fewer copies trade conflicts for
//   shared memory (rates >= 5 do not fit 8 copies).
// * Split-K for small M: the K splits of a row block form a thread-block cluster and add their
//   partial sums through distributed shared memory in split order (finish_split_cluster; compute
//   capability >= 9, where clusters keep the CTAs resident), else partial sums go to a workspace and
//   the last CTA of each row block (integer counter) adds them in split order. Either way results
//   are bit-identical run to run, and to each other. No float atomics anywhere.
// * Persistent CTAs: tables are copied into shared memory once per CTA, not once per tile.

#include "glq_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

namespace glq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkGroups = 32;  // 8-input groups per warp iteration
// Groups per slice of the slice kernels (4 lanes t x 4 groups), and per tile column of the tiled code layout.
constexpr int kSliceGroups = 16;

// ---------------------------------------------------------------------------------------------
// small device helpers

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
  static __device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1,
                                             uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};

template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a);
    __nv_bfloat162 y = *reinterpret_cast<__nv_bfloat162*>(&b);
    __nv_bfloat162 r = __hadd2(x, y);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1,
                                             uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Programmatic dependent launch (compute capability >= 9, see launch_kernel): such a kernel may start
// while the previous kernel of the stream still runs, once that one called pdl_launch_next (or ended).
// Until pdl_wait() returns it may read only weights (codes, tables, scales, signs), never memory
// another kernel writes (x, y, workspaces, counters); pdl_wait() returns once the previous grid has
// completed and its writes are visible. Every kernel here launched that way follows that rule.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the stream start its weight-only prologue now (it still waits for this grid
// to complete before touching what this grid writes).
__device__ __forceinline__ void pdl_launch_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Split-K inside a thread-block cluster (compute capability >= 9, see split_clusters): the ksplit CTAs
// of one row block form a cluster (rank = split) and add their partial sums through distributed shared
// memory instead of a global workspace and an arrival counter. cluster_sync() is a full barrier of the
// cluster's threads with release/acquire order on shared memory.
// The release half compiles to MEMBAR.ALL.GPU, which waits for every memory operation of the thread still
// in flight, global loads and stores included: callers arrive with none outstanding (finish_split_cluster).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#else
  __trap();  // never planned below compute capability 9
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// The float at `local` (this CTA's shared memory) in the shared memory of cluster rank `rank`.
__device__ __forceinline__ float load_cluster(const float* local, int rank) {
  float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
#endif
  return v;
}

#ifdef GLQ_TRACE
// Per-CTA timeline of the small-batch kernel (v4), built only with GLQ_KERNELS_TRACE=1 (developer
// tool: scripts/trace_probe.py). CTA slot words: 0 smid | block << 32, 1 grid | items << 32, then
// (globaltimer ns, clock64) pairs of the points below, then each warp's first-item loop end (clock64).
enum TracePoint : int {
  kTrEntry, kTrFilled, kTrWaited, kTrItem0Done, kTrItem0End, kTrItem1Done, kTrItem1End, kTrPoints
};
constexpr int kTraceWarpBase = 2 + 2 * kTrPoints;
constexpr int kTraceWords = kTraceWarpBase + 16;
__device__ unsigned long long* g_trace = nullptr;
__device__ unsigned int g_trace_slots = 0;
__device__ unsigned int g_trace_next = 0;

__device__ __forceinline__ unsigned long long trace_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// thread 0 takes the CTA's slot (nullptr once the buffer is full)
__device__ __forceinline__ unsigned long long* trace_open() {
  if (g_trace == nullptr) return nullptr;
  const unsigned int s = atomicAdd(&g_trace_next, 1u);
  if (s >= g_trace_slots) return nullptr;
  unsigned long long* w = g_trace + static_cast<unsigned long long>(s) * kTraceWords;
  unsigned int smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  w[0] = smid | (static_cast<unsigned long long>(blockIdx.x) << 32);
  return w;
}

__device__ __forceinline__ void trace_point(unsigned long long* w, int k) {
  if (w != nullptr) {
    w[2 + 2 * k] = trace_ns();
    w[3 + 2 * k] = clock64();
  }
}
#endif

// Codes are read exactly once: keep them out of L1 so the x fragments stay there.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}

// Sign mask of code c's coordinates 2k, 2k+1 as the sign bits (15, 31) of a half2 word:
// s = (c & 127) | parity(c & 127) << 7 holds all 8 sign bits (the table already carries
// parity[pattern] in coordinate 7). s * (2^(15-2k) + 2^(30-2k)) puts bit 2k at 15 and bit 2k+1
// at 31; the two shifted copies of s (10 bits wide) never overlap, so the product has no carries
// into those positions.
__device__ __forceinline__ uint4 apply_signs(uint4 v, uint32_t c) {
  const uint32_t lo = c & 127u;
  const uint32_t s = lo | (static_cast<uint32_t>(__popc(lo)) << 7);
  v.x ^= (s * 0x40008000u) & 0x80008000u;
  v.y ^= (s * 0x10002000u) & 0x80008000u;
  v.z ^= (s * 0x04000800u) & 0x80008000u;
  v.w ^= (s * 0x01000200u) & 0x80008000u;
  return v;
}

// ---------------------------------------------------------------------------------------------
// matmul kernel

template <int N16, bool HAS8, int R>
struct ChunkCodes {
  uint4 c16[N16][R][2];  // [stage][row tile][rows g / g+8]: 8 codes each
  uint2 c8[HAS8 ? R : 1][2];
};

// Out of line: edge tiles (rows past M, K not a multiple of 64) are rare, and inlining their
// scalar loads would bloat the hot loop's code.
template <int N16, bool HAS8, int R>
__device__ __noinline__ ChunkCodes<N16, HAS8, R> load_chunk_slow(const MatmulParams p, int row0,
                                                                  int j0, int G) {
  ChunkCodes<N16, HAS8, R> cc;
  const bool vec = (G % 8) == 0;
#pragma unroll
  for (int rt = 0; rt < R; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + rt * 16 + h * 8;
      const bool row_ok = r < p.M;
      const bool full = row_ok && vec && j0 + 8 <= G;
      const long long off = static_cast<long long>(r) * G + j0;
#pragma unroll
      for (int s = 0; s < N16; ++s) {
        const uint16_t* src = static_cast<const uint16_t*>(p.codes[s]) + off;
        if (full) {
          cc.c16[s][rt][h] = load_stream16(src);
        } else {
          uint32_t w[4] = {0, 0, 0, 0};
          if (row_ok) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              if (j0 + e < G) w[e / 2] |= static_cast<uint32_t>(src[e]) << (16 * (e & 1));
            }
          }
          cc.c16[s][rt][h] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      if constexpr (HAS8) {
        const uint8_t* src = static_cast<const uint8_t*>(p.codes[N16]) + off;
        if (full) {
          cc.c8[rt][h] = load_stream8(src);
        } else {
          uint32_t w[2] = {0, 0};
          if (row_ok) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              if (j0 + e < G) w[e / 4] |= static_cast<uint32_t>(src[e]) << (8 * (e & 3));
            }
          }
          cc.c8[rt][h] = make_uint2(w[0], w[1]);
        }
      }
    }
  }
  return cc;
}


// The MMA kernel on tiled codes (kTiledCodes): lane (g, t)'s rows g and g + 8 of a row tile, groups j0 .. j0 + 7
// (j0 % 8 == 0), are 16 contiguous codes there: [t'][h][i] with t' = j0 % 16 / 4 (0 or 2) and t' + 1, so two
// 16-byte loads per stage (one for the 8-bit stage) and a register shuffle replace the row-major chunk's loads.
// Tiles past M and groups past G read as code 0, as load_chunk_slow's.
template <int N16, bool HAS8, int R>
__device__ __forceinline__ void load_chunk_tiled(ChunkCodes<N16, HAS8, R>& cc, const MatmulParams& p, int tile0,
                                                 int j0, int G) {
  const int g = threadIdx.x % 32 / 4;
#pragma unroll
  for (int rt = 0; rt < R; ++rt) {
    const bool ok = (tile0 + rt) * 16 < p.M && j0 < G;
    const long long unit = ((static_cast<long long>(tile0 + rt) * (G / kSliceGroups) + j0 / kSliceGroups) * 8 + g) * 4 +
                           j0 % kSliceGroups / 4;
#pragma unroll
    for (int s = 0; s < N16; ++s) {
      const uint16_t* src = static_cast<const uint16_t*>(p.codes[s]) + unit * 8;
      const uint4 a = ok ? load_stream16(src) : make_uint4(0, 0, 0, 0);
      const uint4 b = ok ? load_stream16(src + 8) : make_uint4(0, 0, 0, 0);
      cc.c16[s][rt][0] = make_uint4(a.x, a.y, b.x, b.y);
      cc.c16[s][rt][1] = make_uint4(a.z, a.w, b.z, b.w);
    }
    if constexpr (HAS8) {
      const uint4 v = ok ? load_stream16(static_cast<const uint8_t*>(p.codes[N16]) + unit * 8) : make_uint4(0, 0, 0, 0);
      cc.c8[rt][0] = make_uint2(v.x, v.z);
      cc.c8[rt][1] = make_uint2(v.y, v.w);
    }
  }
}

template <int N16, bool HAS8, int R>
__device__ __forceinline__ void load_chunk(ChunkCodes<N16, HAS8, R>& cc, const MatmulParams& p,
                                           int row0, int j0, int G, bool vec) {
  if (!(vec && j0 + 8 <= G && row0 + (R - 1) * 16 + 8 < p.M)) {
    cc = load_chunk_slow<N16, HAS8, R>(p, row0, j0, G);
    return;
  }
#pragma unroll
  for (int rt = 0; rt < R; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long off = static_cast<long long>(row0 + rt * 16 + h * 8) * G + j0;
#pragma unroll
      for (int s = 0; s < N16; ++s)
        cc.c16[s][rt][h] = load_stream16(static_cast<const uint16_t*>(p.codes[s]) + off);
      if constexpr (HAS8) cc.c8[rt][h] = load_stream8(static_cast<const uint8_t*>(p.codes[N16]) + off);
    }
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Decoded weights (4 words of 2 fp16/bf16) of code i (0..7) of one row's chunk vector.
template <typename T, int N16, bool HAS8, int R>
__device__ __forceinline__ uint4 decode(const ChunkCodes<N16, HAS8, R>& cc, int rt, int h, int i,
                                        const uint4* __restrict__ tab, int shift, int stage_slots) {
  uint4 acc = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s = 0; s < N16; ++s) {
    const uint32_t w = word_of(cc.c16[s][rt][h], i >> 1);
    const uint32_t c = (i & 1) ? (w >> 16) : (w & 0xFFFFu);
    // (c >> 7) is the pattern; entries are REP*16 bytes apart, i.e. (c & 0xFF80) >> (3 - log2 REP)
    const uint4* e = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(tab + s * stage_slots) +
                                                    ((c & 0xFF80u) >> shift));
    uint4 v = apply_signs(*e, c);
    if (s == 0) {
      acc = v;
    } else {
      acc.x = TypeOps<T>::add2(acc.x, v.x);
      acc.y = TypeOps<T>::add2(acc.y, v.y);
      acc.z = TypeOps<T>::add2(acc.z, v.z);
      acc.w = TypeOps<T>::add2(acc.w, v.w);
    }
  }
  if constexpr (HAS8) {
    const uint32_t w = (i < 4) ? cc.c8[rt][h].x : cc.c8[rt][h].y;
    const uint32_t c = (w >> (8 * (i & 3))) & 0xFFu;
    const uint4* e = reinterpret_cast<const uint4*>(
        reinterpret_cast<const char*>(tab + N16 * stage_slots) + ((c << 7) >> shift));
    const uint4 v = *e;
    acc.x = TypeOps<T>::add2(acc.x, v.x);
    acc.y = TypeOps<T>::add2(acc.y, v.y);
    acc.z = TypeOps<T>::add2(acc.z, v.z);
    acc.w = TypeOps<T>::add2(acc.w, v.w);
  }
  return acc;
}

// Tables into shared memory: entry e (stage-major) goes to its slots_of(e) = {first slot, log2 of its
// copies} (contiguous slots; every stage starts at a multiple of 8 slots). All of a thread's global loads
// are issued before its stores, so the fill costs one L2 round trip.
// Store order: at step r lane l writes copy (r + (l >> (3 - log2 copies))) % copies of its entry, so the
// 8 lanes of a quarter-warp write 8 different bank quads. Writing copy r at step r put every lane of a
// warp in bank quad r (entries are 8 x 16 bytes apart with 8 copies): an 8-way conflict on every store,
// 4096 wavefronts (~2.3 us on an H100) to fill one 2-bpw table with 8 copies.
template <int N16, bool HAS8, int NTHREADS, typename SlotsOf>
__device__ __forceinline__ void fill_tables_as(uint4* smem, const uint4* __restrict__ tg, SlotsOf slots_of) {
  constexpr int entries = N16 * 512 + (HAS8 ? 256 : 0);
  constexpr int per_thread = (entries + NTHREADS - 1) / NTHREADS;
  static_assert(NTHREADS % 32 == 0, "lane = entry % 32 in the store order");
  const int lane = threadIdx.x % 32;
  uint4 v[per_thread];
#pragma unroll
  for (int k = 0; k < per_thread; ++k) {
    const int e = threadIdx.x + k * NTHREADS;
    if (e < entries) v[k] = tg[e];
  }
#pragma unroll
  for (int k = 0; k < per_thread; ++k) {
    const int e = threadIdx.x + k * NTHREADS;
    if (e < entries) {
      const int2 sl = slots_of(e);
      const int copies = 1 << sl.y;
      const int rot = lane >> (3 - sl.y);
      for (int r = 0; r < copies; ++r) smem[sl.x + ((r + rot) & (copies - 1))] = v[k];
    }
  }
}

// Every entry with 2^rep_log2 copies: entry e at slots e*REP .. e*REP+REP-1.
template <int N16, bool HAS8, int NTHREADS = kThreads>
__device__ __forceinline__ void fill_tables(uint4* smem, const uint4* __restrict__ tg, int rep_log2) {
  fill_tables_as<N16, HAS8, NTHREADS>(smem, tg, [rep_log2](int e) { return make_int2(e << rep_log2, rep_log2); });
}

// Template: storage dtype T, N16 16-bit stages, HAS8 trailing 8-bit stage, NT n-tiles of 8 batch
// rows, R row tiles (16 rows) per warp, PF chunks of codes prefetched ahead in registers.
// Split-K arrival, called by every thread once this CTA's partial sums of row block rb are in the
// workspace: the last of the ksplit CTAs to arrive sums every split's slice in split order (so the
// result is bit-identical run to run, with no float atomics), writes y for rows [rbase, rbase +
// rows) and re-arms the block's counter for the next launch.
// U > 1: each thread sums U outputs at once, so their workspace loads are in flight together. With
// U = 1 a thread's outputs are a chain of L2 round trips: 32 at batch 64 (rows x B = 8192 outputs over
// 256 threads), several microseconds per item.
template <typename T, int NTHREADS, int U = 1>
__device__ __forceinline__ void finish_split_k(const MatmulParams& p, T* __restrict__ y, int rb, int rbase,
                                               int rows, int ksplit, int& s_last) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&p.counters[rb], 1) == ksplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if constexpr (U == 1) {
    for (int idx = threadIdx.x; idx < rows * p.B; idx += NTHREADS) {
      const int r = rbase + idx % rows;
      const int b = idx / rows;
      if (r >= p.M) continue;
      float sum = 0.f;
#pragma unroll 4
      for (int s = 0; s < ksplit; ++s)  // fixed order: bit-identical run to run
        sum += __ldcg(&p.workspace[(static_cast<long long>(s) * p.B + b) * p.M + r]);
      y[b * p.y_stride + r] = TypeOps<T>::from_float(sum * p.row_scale[r] * p.gain);
    }
  } else {
    const int n = rows * p.B;
    for (int base = threadIdx.x; base < n; base += NTHREADS * U) {
      int r[U], b[U];  // b = -1: no output
      float sum[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + u * NTHREADS;
        r[u] = rbase + idx % rows;
        b[u] = idx < n && r[u] < p.M ? idx / rows : -1;
        sum[u] = 0.f;
      }
#pragma unroll 4
      for (int s = 0; s < ksplit; ++s) {  // fixed order per output, as above
        float v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          v[u] = b[u] >= 0 ? __ldcg(&p.workspace[(static_cast<long long>(s) * p.B + b[u]) * p.M + r[u]]) : 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) sum[u] += v[u];
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (b[u] >= 0) y[b[u] * p.y_stride + r[u]] = TypeOps<T>::from_float(sum[u] * p.row_scale[r[u]] * p.gain);
    }
  }
  if (threadIdx.x == 0) p.counters[rb] = 0;
}

// Split-K in a cluster (split_clusters): each of the ksplit CTAs of the cluster has its partial sums of the
// item's rows in its own shared memory, part[row * ld + b]. Rank q finishes the outputs of strips q, q +
// ksplit, ... (NTHREADS * U outputs each): it reads the ksplit partials through distributed shared memory
// and adds them in rank (= split) order, the order finish_split_k adds the workspace slices in, so both
// give bit-identical y. Costs two cluster barriers and one distributed shared-memory round trip per strip
// instead of a workspace store, a fence, an atomic and a workspace load through L2: 0.3-0.9 us less per
// launch on an H100 (notes/kernels.md, stop 19).
// Both barriers are arrived at with no global access in flight (the release fence would wait for it: ncu
// put ~10% of v4's stall samples on the two fences and waits at 4096x14336, 2 bpw): the row scales load
// after the first (overlapping the partials' reads), and the second is arrived at once the last strip's
// sums are scaled, before its y stores.
// DEFER: the second barrier's wait is left to the caller (cluster_wait before this CTA next writes `part`
// or exits), so no CTA idles there; else it waits here.
template <typename T, int NTHREADS, int U, bool DEFER = false>
__device__ __forceinline__ void finish_split_cluster(const MatmulParams& p, T* __restrict__ y, const float* part,
                                                     int ld, int rbase, int rows, int ksplit, int rank) {
  const int n = rows * p.B;
  const int stride = ksplit * NTHREADS * U;
  cluster_sync();  // every split's partials are in place
  if (rank * NTHREADS * U >= n) cluster_arrive();  // no strip here (the loop below is uniform per CTA)
  for (int s0 = rank * NTHREADS * U; s0 < n; s0 += stride) {
    int r[U], b[U];  // b = -1: no output
    float scale[U], sum[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = s0 + static_cast<int>(threadIdx.x) + u * NTHREADS;
      r[u] = rbase + idx % rows;
      b[u] = idx < n && r[u] < p.M ? idx / rows : -1;
      scale[u] = b[u] >= 0 ? p.row_scale[r[u]] : 0.f;  // in flight with the partials' loads
      sum[u] = 0.f;
    }
#pragma unroll 4
    for (int s = 0; s < ksplit; ++s) {  // fixed order per output
      float v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = b[u] >= 0 ? load_cluster(part + (r[u] - rbase) * ld + b[u], s) : 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) sum[u] += v[u];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) sum[u] = sum[u] * scale[u] * p.gain;  // as finish_split_k; consumes every load
    if (s0 + stride >= n) cluster_arrive();  // last strip: every read of the other ranks' partials is done
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (b[u] >= 0) y[b[u] * p.y_stride + r[u]] = TypeOps<T>::from_float(sum[u]);
  }
  if constexpr (!DEFER) cluster_wait();  // no CTA reuses or leaves its partials while another one reads them
}

// The small-batch and batched kernels' item epilogue: red holds PARTS partial sums per (row, batch
// column) of the item's ROWS rows (red[(part * ROWS + row) * ld + b], ld >= B); they are added in part
// order, then written to y (one split) or to this split's workspace slice, and the last split finishes.
// U > 1: U outputs per thread at once (their row_scale loads in flight together; see finish_split_k).
// cluster: the split CTAs form a cluster (split_clusters); this CTA's sums then go to red's first part
// (each thread overwrites only the outputs it alone has read), and finish_split_cluster adds them up.
// DEFER: finish_split_cluster<DEFER>, so the caller must cluster_wait() before it next writes red or exits.
template <typename T, int ROWS, int PARTS, int NTHREADS, int U = 1, bool DEFER = false>
__device__ __forceinline__ void store_item(const MatmulParams& p, T* __restrict__ y, float* red, int ld, int rb,
                                           int row_base, int ks, int ksplit, bool cluster, int& s_last) {
  __syncthreads();
  if constexpr (U == 1) {
    for (int idx = threadIdx.x; idx < ROWS * p.B; idx += NTHREADS) {
      const int rl = idx % ROWS;
      const int b = idx / ROWS;
      const int r = row_base + rl;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < PARTS; ++w) sum += red[(w * ROWS + rl) * ld + b];  // fixed order
      if (r < p.M) {
        if (ksplit == 1)
          y[b * p.y_stride + r] = TypeOps<T>::from_float(sum * p.row_scale[r] * p.gain);
        else if (cluster)
          red[rl * ld + b] = sum;
        else
          p.workspace[(static_cast<long long>(ks) * p.B + b) * p.M + r] = sum;
      }
    }
  } else {
    const int n = ROWS * p.B;
    for (int base = threadIdx.x; base < n; base += NTHREADS * U) {
      int r[U], b[U];  // b = -1: no output
      float sum[U], scale[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + u * NTHREADS;
        const int rl = idx % ROWS;
        r[u] = row_base + rl;
        b[u] = idx < n && r[u] < p.M ? idx / ROWS : -1;
        sum[u] = 0.f;
        if (idx < n) {
#pragma unroll
          for (int w = 0; w < PARTS; ++w) sum[u] += red[(w * ROWS + rl) * ld + idx / ROWS];  // fixed order
        }
        scale[u] = ksplit == 1 && b[u] >= 0 ? p.row_scale[r[u]] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (b[u] < 0) continue;
        if (ksplit == 1)
          y[b[u] * p.y_stride + r[u]] = TypeOps<T>::from_float(sum[u] * scale[u] * p.gain);
        else if (cluster)
          red[(r[u] - row_base) * ld + b[u]] = sum[u];
        else
          p.workspace[(static_cast<long long>(ks) * p.B + b[u]) * p.M + r[u]] = sum[u];
      }
    }
  }
  if (ksplit > 1 && cluster)
    finish_split_cluster<T, NTHREADS, U, DEFER>(p, y, red, ld, row_base, ROWS, ksplit, ks);
  else if (ksplit > 1)
    finish_split_k<T, NTHREADS, U>(p, y, rb, row_base, ROWS, ksplit, s_last);
  __syncthreads();  // red and s_last are reused by the next item
}

template <typename T, int N16, bool HAS8, int NT, int R, int PF, bool TILED = false>
__global__ void __launch_bounds__(kThreads, 2)
    glq_matmul_kernel(const MatmulParams p, const int row_blocks, const int ksplit,
                      const int rep_log2, const bool cluster) {
  // tables: stage-major, entry-major, REP copies per entry; with cluster (split_clusters) this CTA's
  // partial sums of an item, part[local row * B + b], after them
  extern __shared__ uint4 smem[];
  __shared__ int s_last;
  const int G = p.K / 8;
  const int rep = 1 << rep_log2;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  // lane's table copy, at 16-byte slot offset (lane % REP); entry stride is REP slots, so with
  // REP = 8 every entry of copy c sits in bank quad c.
  const uint4* tab = smem + (lane & (rep - 1));
  const int shift = 3 - rep_log2;
  const int stage_slots = 512 << rep_log2;
  bool tables_ready = false;
  const int rows_per_cta = kWarps * 16 * R;
  const int n_chunks = (G + kChunkGroups - 1) / kChunkGroups;
  const int chunks_per_split = (n_chunks + ksplit - 1) / ksplit;
  const bool vec = (G % 8) == 0;
  const int n_tiles = (p.B + 7) / 8;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int n_items = row_blocks * ksplit;
  pdl_launch_next();

  for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int rb = item / ksplit;  // as slice_item
    const int ks = item % ksplit;
    const int warp_row0 = rb * rows_per_cta + warp * 16 * R;
    const int row0 = warp_row0 + g;  // row of (rt 0, h 0) for this lane
    const int c_begin = ks * chunks_per_split;
    const int c_end = min(n_chunks, c_begin + chunks_per_split);

    float acc[R][NT][4];
#pragma unroll
    for (int rt = 0; rt < R; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[rt][nt][q] = 0.f;

    ChunkCodes<N16, HAS8, R> buf[PF + 1];
    auto load = [&](ChunkCodes<N16, HAS8, R>& dst, int c) {
      if constexpr (TILED)
        load_chunk_tiled(dst, p, warp_row0 / 16, c * kChunkGroups + 8 * t, G);
      else
        load_chunk(dst, p, row0, c * kChunkGroups + 8 * t, G, vec);
    };
#pragma unroll
    for (int b = 0; b < PF; ++b) {
      if (c_begin + b < c_end) load(buf[b], c_begin + b);
    }

    if (!tables_ready) {
      fill_tables<N16, HAS8>(smem, static_cast<const uint4*>(p.tables), rep_log2);
      pdl_wait();  // codes and tables above; x, y and the workspace below
      __syncthreads();
      tables_ready = true;
    }

    // One chunk of prefetch, rotated by register copies: the copy at the end of a chunk waits
    // for the load issued at its start, so one chunk of decode work covers the latency.
    // (Measured, H100: unrolling a 3-deep ring to avoid those waits tripled the loop's code
    // and ran 25-30% slower; see notes/kernels.md.)
    {
      for (int c = c_begin; c < c_end; ++c) {
        {
          if (c + PF < c_end) load(buf[PF], c + PF);
          const ChunkCodes<N16, HAS8, R>& cur = buf[0];
          const int j0 = c * kChunkGroups + 8 * t;
          // x fragments: lane (g, t) needs batch row nt*8+g, group j0+i. Loads are unconditional
          // (clamped addresses) so the compiler can issue them all before the first MMA; rows
          // past B only feed output columns that are never stored, groups past G must be zero
          // because their (padding) codes still decode to table entries.
          constexpr int XI = NT == 1 ? 8 : 1;  // fragments held at once: the chunk's, or one i's
          uint4 xall[XI][NT];
          auto load_x = [&](int i, uint4 (&dst)[NT]) {
            const int j = j0 + i;
            const int jc = min(j, G - 1);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const int bc = min(nt * 8 + g, p.B - 1);
              uint4 v = __ldg(reinterpret_cast<const uint4*>(x + bc * p.x_stride + 8LL * jc));
              if (j >= G) v = make_uint4(0, 0, 0, 0);
              dst[nt] = v;
            }
          };
          if constexpr (NT == 1) {
#pragma unroll
            for (int i = 0; i < 8; ++i) load_x(i, xall[i]);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            uint4 xf[NT];
            if constexpr (NT == 1) {
              xf[0] = xall[i][0];
            } else {
              load_x(i, xf);
            }
#pragma unroll
            for (int rt = 0; rt < R; ++rt) {
              const uint4 wa = decode<T>(cur, rt, 0, i, tab, shift, stage_slots);  // row g
              const uint4 wb = decode<T>(cur, rt, 1, i, tab, shift, stage_slots);  // row g + 8
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) {
                if (nt < n_tiles) {
                  TypeOps<T>::mma(acc[rt][nt], wa.x, wb.x, wa.y, wb.y, xf[nt].x, xf[nt].y);
                  TypeOps<T>::mma(acc[rt][nt], wa.z, wb.z, wa.w, wb.w, xf[nt].z, xf[nt].w);
                }
              }
            }
          }
        }
#pragma unroll
        for (int b = 0; b < PF; ++b) buf[b] = buf[b + 1];
      }
    }

    // Epilogue. acc[rt][nt]: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, 2t+1).
    // One split: y. Clustered split: this CTA's partials, part[local row * B + b], after the tables (the
    // first cluster_sync of finish_split_cluster orders these stores before every rank's reads). Else the
    // split's workspace slice.
    float* part = reinterpret_cast<float*>(smem + ((N16 * 512 + (HAS8 ? 256 : 0)) << rep_log2));
#pragma unroll
    for (int rt = 0; rt < R; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int rl = warp * 16 * R + rt * 16 + (q >> 1) * 8 + g;  // row0 + rt * 16 + (q >> 1) * 8 - rbase
          const int r = row0 + rt * 16 + (q >> 1) * 8;
          const int b = nt * 8 + 2 * t + (q & 1);
          if (r < p.M && b < p.B) {
            if (ksplit == 1)
              y[b * p.y_stride + r] = TypeOps<T>::from_float(acc[rt][nt][q] * p.row_scale[r] * p.gain);
            else if (cluster)
              part[rl * p.B + b] = acc[rt][nt][q];
            else
              p.workspace[(static_cast<long long>(ks) * p.B + b) * p.M + r] = acc[rt][nt][q];
          }
        }
    if (ksplit > 1 && cluster)
      finish_split_cluster<T, kThreads, 1>(p, y, part, p.B, rb * rows_per_cta, rows_per_cta, ksplit, ks);
    else if (ksplit > 1)
      finish_split_k<T, kThreads>(p, y, rb, rb * rows_per_cta, rows_per_cta, ksplit, s_last);
  }
}

// ---------------------------------------------------------------------------------------------
// small-batch kernel ("gemv", batch 1..8): x held in registers, warps split K inside the CTA
//
// Why (ncu, H200, v3 at 4096x14336 b1): L1/shared pipe 72-90% busy, DRAM 10-14%, 16 warps/SM
// (124 registers), 62% of cycles with no eligible warp. v3 reloads 8 x fragments (LDG.128 through
// L1) per 32 codes and recomputes its table address math per code; 813 SASS per 32 codes/lane.
// This kernel keeps the MMA decode (1 HMMA per code, the cheapest dot product) and changes the
// loop order so x leaves the hot loop:
// * A slice is 16 consecutive 8-input groups (128 inputs). Lane (g = lane/4, t = lane%4) owns the
//   4 groups j = 16*sl + 4t + i (i = 0..3) of every slice sl it visits.
// * Each warp walks slices sl = s_begin + warp, + kGemvWarps, ... (outer loop) and, inside, the
//   kGemvT row tiles (16 rows each) of its item (inner loop, unrolled). x fragments of a slice
//   (4 uint4 = 16 registers) are loaded once and reused by kGemvT row tiles = 32 codes per lane
//   per stage; the loop body only loads codes (one 8-byte load per row and stage, prefetched one
//   step ahead) and reads tables.
// * acc[rt] (16 rows x 8 batch columns per row tile) accumulates over the warp's slices. At the
//   end of a work item every warp writes its partials to shared memory red[warp][row][b] and the
//   CTA adds the kGemvWarps partials in warp order (fixed: bit-identical), then either stores y
//   (ksplit == 1) or a split-K partial that the last CTA of the row block adds in split order
//   (the same integer-counter protocol as glq_matmul_kernel). No float atomics.
// * MMA fragment mapping (identical to glq_matmul_kernel, 8 codes there, 4 here): for code i of
//   rows g (wa) and g+8 (wb): A = {wa.x, wb.x, wa.y, wb.y}, B = {x.x, x.y} feeds k-slots 2t, 2t+1
//   (code elements 0,1) and 2t+8, 2t+9 (elements 2,3); the second MMA takes elements 4..7. A and
//   B agree on which (group, element) each k-slot is, and the 4 lanes t hold 4 different groups,
//   so each MMA adds 4 groups x 4 elements of every row. Batch column n = g of B is x row
//   min(g, B-1); columns >= B are computed and never stored.
// * Table address of a 16-bit code c with REP = 2^RL2 copies: entry c>>7 at byte
//   (c>>7) * 16 * REP = (c & 0xFF80) >> (3 - RL2), plus the lane's copy (lane % REP) * 16; an
//   8-bit code c at (c << 7) >> (3 - RL2) in its stage. RL2 is a template constant here.
// * Signs, lo = c & 127, p = popc(lo) & 1 (coordinate 7 also carries parity[pattern], folded into
//   the table): word k (coordinates 2k, 2k+1) is XORed with bits 15 and 31 of lo * (2^(15-2k) +
//   2^(30-2k)) for k = 0, 1, 2 (the two shifted copies of the 7-bit lo never overlap, so there
//   are no carries), and word 3 with bits 15, 31 of (lo << 9) + (p << 31) (bit 6 of lo at 15,
//   parity at 31; lo << 9 < 2^16 so the sum has no carry into bit 31). One POPC, 4 IMAD/SHL,
//   4 LOP3 per code; a CPU model of this math is checked in tests/kernels/test_gemv_model.py.
// Edge slices (groups past G, or G % 4 != 0) and row tiles past M use an out-of-line scalar
// loader with zero codes and zero x, like glq_matmul_kernel.

constexpr int kGemvWarps = 16;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvT = 4;              // row tiles (16 rows) per warp and work item
constexpr int kGemvRows = 16 * kGemvT;  // rows per work item
constexpr int kGemvMaxB = 8;

template <int N16, bool HAS8>
struct SliceCodes {
  uint2 c16[N16][2];             // [stage][row g / g+8]: codes of groups j0..j0+3 (16 bits each)
  uint32_t c8[HAS8 ? 2 : 1];     // [row g / g+8]: 8-bit codes of groups j0..j0+3 (one byte each)
};

__device__ __forceinline__ uint32_t load_stream4(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Rows r0 (h = 0) and r0 + 8 (h = 1), groups j0..j0+3; anything past M or G reads as code 0.
template <int N16, bool HAS8>
__device__ __noinline__ SliceCodes<N16, HAS8> load_slice_slow(const MatmulParams p, int r0, int j0,
                                                              int G) {
  SliceCodes<N16, HAS8> cc;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + 8 * h;
    const bool row_ok = r < p.M;
    const long long off = static_cast<long long>(r) * G + j0;
#pragma unroll
    for (int s = 0; s < N16; ++s) {
      const uint16_t* src = static_cast<const uint16_t*>(p.codes[s]) + off;
      uint32_t w[2] = {0, 0};
      if (row_ok) {
        for (int e = 0; e < 4; ++e)
          if (j0 + e < G) w[e / 2] |= static_cast<uint32_t>(src[e]) << (16 * (e & 1));
      }
      cc.c16[s][h] = make_uint2(w[0], w[1]);
    }
    if constexpr (HAS8) {
      const uint8_t* src = static_cast<const uint8_t*>(p.codes[N16]) + off;
      uint32_t w = 0;
      if (row_ok) {
        for (int e = 0; e < 4; ++e)
          if (j0 + e < G) w |= static_cast<uint32_t>(src[e]) << (8 * e);
      }
      cc.c8[h] = w;
    }
  }
  return cc;
}

// fast: the slice lies inside G, G % 4 == 0 (8-byte aligned rows) and both rows are inside M.
template <int N16, bool HAS8>
__device__ __forceinline__ void load_slice(SliceCodes<N16, HAS8>& cc, const MatmulParams& p, int r0,
                                           int j0, int G, bool fast) {
  if (!fast) {
    cc = load_slice_slow<N16, HAS8>(p, r0, j0, G);
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long off = static_cast<long long>(r0 + 8 * h) * G + j0;
#pragma unroll
    for (int s = 0; s < N16; ++s) cc.c16[s][h] = load_stream8(static_cast<const uint16_t*>(p.codes[s]) + off);
    if constexpr (HAS8) cc.c8[h] = load_stream4(static_cast<const uint8_t*>(p.codes[N16]) + off);
  }
}

// Tiled codes (kTiledCodes, glq.kernels.layout.tile_codes): each stage's codes permuted to [row tile][slice][lane]
// [h][i], so the 16 rows x 16 groups of one (row tile, slice) are 512 contiguous bytes (256 for the 8-bit stage)
// and lane (g, t) finds its 8 codes (rows g, g + 8 x groups 4t .. 4t + 3) in one aligned 16-byte unit: one
// coalesced load per stage instead of two 8-byte loads on 16 different lines, no edge cases (M % 16 == 0 and
// G % 16 == 0 are required).
template <int N16, bool HAS8>
__device__ __forceinline__ void load_slice_tiled(SliceCodes<N16, HAS8>& cc, const MatmulParams& p, int tile, int sl,
                                                 int slices) {
  const long long unit = (static_cast<long long>(tile) * slices + sl) * 32 + threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < N16; ++s) {
    const uint4 v = load_stream16(static_cast<const uint16_t*>(p.codes[s]) + unit * 8);
    cc.c16[s][0] = make_uint2(v.x, v.y);
    cc.c16[s][1] = make_uint2(v.z, v.w);
  }
  if constexpr (HAS8) {
    const uint2 v = load_stream8(static_cast<const uint8_t*>(p.codes[N16]) + unit * 8);
    cc.c8[0] = v.x;
    cc.c8[1] = v.y;
  }
}

// x fragments of a lane's groups j0..j0+3 (8 inputs each) of one x row; whole: all four lie inside G
// (one branch-free path), else groups past G read as zeros (their codes read as 0 and still decode to
// finite table entries).
template <typename T>
__device__ __forceinline__ void load_x_fragments(uint4 (&xf)[4], const T* xrow, int j0, int G, bool whole) {
  if (whole) {
#pragma unroll
    for (int i = 0; i < 4; ++i) xf[i] = __ldg(reinterpret_cast<const uint4*>(xrow + 8LL * (j0 + i)));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      xf[i] = (j0 + i < G) ? __ldg(reinterpret_cast<const uint4*>(xrow + 8LL * (j0 + i))) : make_uint4(0, 0, 0, 0);
  }
}

// Shared-memory layout of a slice kernel's tables: 16-bit stage s holds its 512 entries with
// 2^rl2(s) copies each (8 for the first WIDE stages, 2^RL2 for the others), then the 8-bit stage
// holds 256 entries with 2^RL2 copies. WIDE = 0: every stage has 2^RL2 copies.
template <int N16, bool HAS8, int RL2, int WIDE>
struct SliceTables {
  static __host__ __device__ constexpr int rl2(int s) { return s < WIDE ? 3 : RL2; }
  // byte offset of 16-bit stage s; s = N16: of the 8-bit stage
  static __host__ __device__ constexpr int offset(int s) {
    return s < WIDE ? s * (512 * 16 << 3) : WIDE * (512 * 16 << 3) + (s - WIDE) * (512 * 16 << RL2);
  }
  static __host__ __device__ constexpr int bytes() { return offset(N16) + (HAS8 ? 256 * 16 << RL2 : 0); }
};

// Decoded weights (4 words of 2 fp16/bf16, coordinates 0..7) of code i (0..3) of row h.
// tab: this lane's table copy (shared memory base + (lane % 2^RL2) * 16 bytes); tab8: its copy in
// the stages with 8 copies (base + (lane % 8) * 16; only read when WIDE > 0).
template <typename T, int N16, bool HAS8, int RL2, int WIDE = 0>
__device__ __forceinline__ uint4 gemv_decode(const SliceCodes<N16, HAS8>& cc, int h, int i,
                                             const char* tab, const char* tab8 = nullptr) {
  using L = SliceTables<N16, HAS8, RL2, WIDE>;
  uint4 acc = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s = 0; s < N16; ++s) {
    const uint32_t w = (i < 2) ? cc.c16[s][h].x : cc.c16[s][h].y;
    const uint32_t c = (i & 1) ? (w >> 16) : (w & 0xFFFFu);
    const char* base = (s < WIDE ? tab8 : tab) + L::offset(s);
    uint4 v = *reinterpret_cast<const uint4*>(base + ((c & 0xFF80u) >> (3 - L::rl2(s))));
    const uint32_t lo = c & 127u;
    const uint32_t par = static_cast<uint32_t>(__popc(lo)) << 31;
    v.x ^= (lo * 0x40008000u) & 0x80008000u;
    v.y ^= (lo * 0x10002000u) & 0x80008000u;
    v.z ^= (lo * 0x04000800u) & 0x80008000u;
    // v.w ^ bit 6 of lo at 15 ^ par, written so that ptxas emits SHL + LOP3 + IMAD (adding 2^31 flips bit 31):
    // the XOR form took 4 instructions. v4's loop per 32 codes: 674 -> 659 SASS at 2 bpw, 1374 -> 1339 at 4,
    // 2676 -> 2611 at 8; same bits by construction (stop 24, H200: 4096x14336 at 4 bpw 20.85 -> 20.3 us).
    v.w = (v.w ^ ((lo << 9) & 0x8000u)) + par;
    if (s == 0) {
      acc = v;
    } else {
      acc.x = TypeOps<T>::add2(acc.x, v.x);
      acc.y = TypeOps<T>::add2(acc.y, v.y);
      acc.z = TypeOps<T>::add2(acc.z, v.z);
      acc.w = TypeOps<T>::add2(acc.w, v.w);
    }
  }
  if constexpr (HAS8) {
    const uint32_t c = (cc.c8[h] >> (8 * i)) & 0xFFu;
    const uint4 v = *reinterpret_cast<const uint4*>(tab + L::offset(N16) + ((c << 7) >> (3 - RL2)));
    acc.x = TypeOps<T>::add2(acc.x, v.x);
    acc.y = TypeOps<T>::add2(acc.y, v.y);
    acc.z = TypeOps<T>::add2(acc.z, v.z);
    acc.w = TypeOps<T>::add2(acc.w, v.w);
  }
  return acc;
}

// Prologue of the slice kernels (v4, its row-tile variant, v5) under programmatic launch: let the next
// kernel start, copy the tables (weights only), then wait for the previous kernel before anything
// touches x, y or the workspace. filled() runs between the two (trace builds time the fill there).
template <int N16, bool HAS8, int NTHREADS, int RL2, int WIDE, typename Filled>
__device__ __forceinline__ void slice_kernel_prologue(uint4* smem, const MatmulParams& p, Filled filled) {
  pdl_launch_next();
  if constexpr (WIDE == 0) {
    fill_tables<N16, HAS8, NTHREADS>(smem, static_cast<const uint4*>(p.tables), RL2);
  } else {  // SliceTables' per-stage copies
    using L = SliceTables<N16, HAS8, RL2, WIDE>;
    fill_tables_as<N16, HAS8, NTHREADS>(smem, static_cast<const uint4*>(p.tables), [](int e) {
      const int s = min(e / 512, N16);  // stage; N16: the 8-bit stage
      const int r = s < N16 ? L::rl2(s) : RL2;
      return make_int2(L::offset(s) / 16 + ((e - 512 * s) << r), r);
    });
  }
  filled();
  pdl_wait();
  __syncthreads();
}

template <int N16, bool HAS8, int NTHREADS, int RL2, int WIDE = 0>
__device__ __forceinline__ void slice_kernel_prologue(uint4* smem, const MatmulParams& p) {
  slice_kernel_prologue<N16, HAS8, NTHREADS, RL2, WIDE>(smem, p, [] {});
}

// Work item `item` of a slice kernel: row block rb (rows row_base.., `rows` per block) and K split ks
// (slices s_first..s_stop-1). Item i is split i % ksplit of row block i / ksplit, the order a clustered
// split needs (split_clusters: the grid is then a multiple of ksplit and CTA i is rank i % ksplit of its
// cluster, so the items a CTA visits, i, i + grid, ..., keep its split and the CTAs of a cluster take the
// same row blocks in step). The workspace split uses the same order: one mapping for both keeps the
// cluster flag out of the item loop, where it cost v4 44 more SASS per slice (ptxas allocated 90
// registers instead of 106 and recomputed lane addresses inside the loop).
struct SliceItem {
  int rb, ks, row_base, s_first, s_stop;
};

__device__ __forceinline__ SliceItem slice_item(int item, int rows, int slices_per_split, int n_slices,
                                                int ksplit) {
  SliceItem it;
  it.rb = item / ksplit;
  it.ks = item % ksplit;
  it.row_base = it.rb * rows;
  it.s_first = it.ks * slices_per_split;
  it.s_stop = min(n_slices, it.s_first + slices_per_split);
  return it;
}

// Template: storage dtype T, N16 16-bit stages, HAS8 trailing 8-bit stage, RL2 = log2 of the
// table copies, MINB CTAs per SM for the register budget (65536 / (MINB x W x 32) registers: 128 for
// 16 warps x 1 and for 8 warps x 2), NB code buffers
// (prefetch depth NB - 1 steps; NB divides kGemvT).
// WIDE: the first WIDE 16-bit stages hold 8 table copies (SliceTables).
// Dynamic shared memory: tables (stage-major, REP copies per entry) then red[W][64][B].
// W: warps per CTA (16, one CTA per SM; 8 with MINB = 2 at rates 2-3, two CTAs per SM: see gemv_plan).
template <typename T, int N16, bool HAS8, int RL2, int MINB, int NB, int WIDE = 0, bool TILED = false,
          int W = kGemvWarps>
__global__ void __launch_bounds__(W * 32, MINB)
    glq_gemv_kernel(const MatmulParams p, const int row_blocks, const int ksplit, const bool cluster) {
  extern __shared__ uint4 smem[];
  __shared__ int s_last;
  constexpr int REP = 1 << RL2;
  constexpr int kTabBytes = SliceTables<N16, HAS8, RL2, WIDE>::bytes();
  float* red = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + kTabBytes);
  const int G = p.K / 8;
  const int B = p.B;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const char* tab = reinterpret_cast<const char*>(smem) + (lane & (REP - 1)) * 16;
  const char* tab8 = reinterpret_cast<const char*>(smem) + (lane & 7) * 16;
  const int n_slices = (G + kSliceGroups - 1) / kSliceGroups;
  const int slices_per_split = (n_slices + ksplit - 1) / ksplit;
  const bool vec = (G % 4) == 0;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* xrow = x + static_cast<long long>(min(g, B - 1)) * p.x_stride;  // batch column n = g
  static_assert(kGemvT % NB == 0 && NB >= 2, "ring slots must be compile-time indices");
  const int n_items = row_blocks * ksplit;

  // Steps: step q of this warp is (slice sl = s_first + warp + (q / kGemvT) * W,
  // row tile q % kGemvT). Codes of step q live in ring slot q % NB; NB divides kGemvT, so the
  // slot of (slice k, row tile rt) is rt % NB, a compile-time index in the unrolled rt loop (no
  // register copies at the loop edge), and step q + NB - 1 is loaded while step q is decoded.
  using Ring = SliceCodes<N16, HAS8>[NB];
  auto load_step = [&](SliceCodes<N16, HAS8>& dst, int row_base, bool rows_ok, int sl_, int rt_) {
    if constexpr (TILED) {  // whole tiles only (M % 16 == 0): a row tile past M is never stored
      if (row_base + 16 * rt_ < p.M) load_slice_tiled(dst, p, row_base / 16 + rt_, sl_, G / kSliceGroups);
    } else {
      const bool fast = vec && rows_ok && sl_ * kSliceGroups + kSliceGroups <= G;
      load_slice(dst, p, row_base + 16 * rt_ + g, sl_ * kSliceGroups + 4 * t, G, fast);
    }
  };
  auto load_first_steps = [&](Ring& ring, int item) {  // steps 0 .. NB - 2 of an item
    const SliceItem it = slice_item(item, kGemvRows, slices_per_split, n_slices, ksplit);
    const bool rows_ok = it.row_base + kGemvRows <= p.M;
    if (it.s_first + warp < it.s_stop) {
#pragma unroll
      for (int d = 0; d < NB - 1; ++d) load_step(ring[d], it.row_base, rows_ok, it.s_first + warp, d);
    }
  };
  // The first item's first steps load before the table fill and the programmatic-launch wait (codes are
  // weights), so that DRAM round trip overlaps them. The first item is peeled off the item loop, so its
  // ring is dead once the item's loop has used it, and every later item has a ring of its own.
  Ring ring0;
  if (blockIdx.x < n_items) load_first_steps(ring0, blockIdx.x);
#ifdef GLQ_TRACE
  __shared__ unsigned long long* s_trace;
  if (threadIdx.x == 0) {
    s_trace = trace_open();
    trace_point(s_trace, kTrEntry);
    if (s_trace != nullptr) s_trace[1] = gridDim.x | (static_cast<unsigned long long>(n_items) << 32);
  }
  slice_kernel_prologue<N16, HAS8, W * 32, RL2, WIDE>(smem, p, [&] {
    __syncthreads();
    if (threadIdx.x == 0) trace_point(s_trace, kTrFilled);
  });
  if (threadIdx.x == 0) trace_point(s_trace, kTrWaited);
  int trace_k = 0;
#else
  slice_kernel_prologue<N16, HAS8, W * 32, RL2, WIDE>(smem, p);
#endif

  auto run_item = [&](const int item, Ring& ring) {
    const SliceItem it = slice_item(item, kGemvRows, slices_per_split, n_slices, ksplit);
    const int rb = it.rb, ks = it.ks, row_base = it.row_base, s_first = it.s_first, s_stop = it.s_stop;
    // rows of (rt, h = 0) for this lane are row_base + 16 rt + g; the whole item is inside M?
    const bool rows_ok = row_base + kGemvRows <= p.M;

    float acc[kGemvT][4];
#pragma unroll
    for (int rt = 0; rt < kGemvT; ++rt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[rt][q] = 0.f;

    for (int sl = s_first + warp; sl < s_stop; sl += W) {
      const int j0 = sl * kSliceGroups + 4 * t;  // this lane's first group of the slice
      uint4 xf[4];
      load_x_fragments(xf, xrow, j0, G, vec && sl * kSliceGroups + kSliceGroups <= G);
      const int sl_next = sl + W;
#pragma unroll
      for (int rt = 0; rt < kGemvT; ++rt) {
        // prefetch step + NB - 1: row tile rt + NB - 1 of this slice, or of the next slice
        constexpr int kAhead = NB - 1;
        if (rt + kAhead < kGemvT) {
          load_step(ring[(rt + kAhead) % NB], row_base, rows_ok, sl, rt + kAhead);
        } else if (sl_next < s_stop) {
          load_step(ring[(rt + kAhead) % NB], row_base, rows_ok, sl_next, rt + kAhead - kGemvT);
        }
        const SliceCodes<N16, HAS8>& cur = ring[rt % NB];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 wa = gemv_decode<T, N16, HAS8, RL2, WIDE>(cur, 0, i, tab, tab8);  // row g
          const uint4 wb = gemv_decode<T, N16, HAS8, RL2, WIDE>(cur, 1, i, tab, tab8);  // row g + 8
          TypeOps<T>::mma(acc[rt], wa.x, wb.x, wa.y, wb.y, xf[i].x, xf[i].y);
          TypeOps<T>::mma(acc[rt], wa.z, wb.z, wa.w, wb.w, xf[i].z, xf[i].w);
        }
      }
    }

    // Cross-warp reduction. acc[rt]: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t),
    // (row g+8, col 2t+1) of row tile rt; red[(warp * 64 + local row) * B + b].
    if (ksplit > 1 && cluster && item != blockIdx.x) cluster_wait();  // the last item's (store_item<DEFER>)
#pragma unroll
    for (int rt = 0; rt < kGemvT; ++rt)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int rl = 16 * rt + g + 8 * (q >> 1);
        const int b = 2 * t + (q & 1);
        if (b < B) red[(warp * kGemvRows + rl) * B + b] = acc[rt][q];
      }
#ifdef GLQ_TRACE
    if (trace_k == 0 && lane == 0 && s_trace != nullptr) s_trace[kTraceWarpBase + warp] = clock64();
    __syncthreads();
    if (threadIdx.x == 0 && trace_k < 2) trace_point(s_trace, kTrItem0Done + 2 * trace_k);
#endif
    store_item<T, kGemvRows, W, W * 32, 1, true>(p, y, red, B, rb, row_base, ks, ksplit, cluster,
                                                              s_last);
#ifdef GLQ_TRACE
    if (threadIdx.x == 0 && trace_k < 2) trace_point(s_trace, kTrItem0End + 2 * trace_k);
    ++trace_k;
#endif
  };
  if (blockIdx.x < n_items) run_item(blockIdx.x, ring0);
  for (int item = blockIdx.x + gridDim.x; item < n_items; item += gridDim.x) {
    Ring ring;
    load_first_steps(ring, item);
    run_item(item, ring);
  }
  if (ksplit > 1 && cluster && blockIdx.x < n_items) cluster_wait();  // nobody reads red any more
}

// ---------------------------------------------------------------------------------------------
// v4 with (slice, row tile) steps (variant 4, rates 2-4; ops.py asks for it on small layers at 3-4 bpw)
//
// Why: ncu on v4 (4096x14336, batch 1) put a sixth of the stall cycles at barriers. An item's
// slices are dealt to 16 warps, each taking all 4 row tiles of a slice: 56 slices leave half the
// warps with 4 and half with 3, and 12 slices (576x1536) leave 4 warps idle. Here warp w owns row
// tile w % 4 and takes every 4th slice from w / 4, so all 16 warps get the same number of steps
// whenever an item's slices divide by 4 (every shape above). Costs: x fragments are loaded every
// step instead of every 4th (the 4 warps of a slice column read the same lines, mostly L1 hits);
// the accumulators shrink from 16 floats to 4. Same decode, MMA and fixed-order reduction (over 4
// warps per row instead of 16): deterministic, not bit-identical to v4. Measured (H200, notes/kernels.md):
// up to 1.4x faster than v4 on layers of <= 1 M weights at 3-4 bpw, 4-27% slower on large ones.
constexpr int kRtStride = kGemvWarps / kGemvT;  // warps per row tile, slices between a warp's steps

template <typename T, int N16, bool HAS8, int RL2, int NB, bool TILED = false>
__global__ void __launch_bounds__(kGemvThreads, 1)
    glq_gemv_rt_kernel(const MatmulParams p, const int row_blocks, const int ksplit, const bool cluster) {
  extern __shared__ uint4 smem[];
  __shared__ int s_last;
  constexpr int REP = 1 << RL2;
  constexpr int kTabBytes = SliceTables<N16, HAS8, RL2, 0>::bytes();
  float* red = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + kTabBytes);
  const int G = p.K / 8;
  const int B = p.B;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int rt = warp % kGemvT;     // this warp's row tile
  const int col = warp / kGemvT;    // its first slice within the item's range
  const char* tab = reinterpret_cast<const char*>(smem) + (lane & (REP - 1)) * 16;
  const int n_slices = (G + kSliceGroups - 1) / kSliceGroups;
  const int slices_per_split = (n_slices + ksplit - 1) / ksplit;
  const bool vec = (G % 4) == 0;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* xrow = x + static_cast<long long>(min(g, B - 1)) * p.x_stride;  // batch column n = g
  const int n_items = row_blocks * ksplit;

  // Step k of this warp is slice sl0 + k * kRtStride, its codes in ring slot k % NB: the step
  // loop is unrolled by NB so the slots are compile-time names; step k + NB - 1 is loaded while
  // step k is decoded.
  using Ring = SliceCodes<N16, HAS8>[NB];
  auto load_step = [&](SliceCodes<N16, HAS8>& dst, int row0, bool rows_ok, int sl_) {
    if constexpr (TILED) {  // row0 = 16 * tile + g; tiles past M are never stored
      if (row0 - g < p.M) load_slice_tiled(dst, p, (row0 - g) / 16, sl_, G / kSliceGroups);
    } else {
      const bool fast = vec && rows_ok && sl_ * kSliceGroups + kSliceGroups <= G;
      load_slice(dst, p, row0, sl_ * kSliceGroups + 4 * t, G, fast);
    }
  };
  auto load_first_steps = [&](Ring& ring, int item) {  // steps 0 .. NB - 2 of an item
    const SliceItem it = slice_item(item, kGemvRows, slices_per_split, n_slices, ksplit);
    const bool rows_ok = it.row_base + kGemvRows <= p.M;
    const int sl0 = it.s_first + col;
#pragma unroll
    for (int d = 0; d < NB - 1; ++d)
      if (sl0 + d * kRtStride < it.s_stop) load_step(ring[d], it.row_base + 16 * rt + g, rows_ok, sl0 + d * kRtStride);
  };
  // The first item's first steps load before the table fill and the launch wait, its item peeled off the
  // loop (as in v4).
  Ring ring0;
  if (blockIdx.x < n_items) load_first_steps(ring0, blockIdx.x);

  slice_kernel_prologue<N16, HAS8, kGemvThreads, RL2>(smem, p);

  auto run_item = [&](const int item, Ring& ring) {
    const SliceItem it = slice_item(item, kGemvRows, slices_per_split, n_slices, ksplit);
    const int rb = it.rb, ks = it.ks, row_base = it.row_base, s_first = it.s_first, s_stop = it.s_stop;
    const bool rows_ok = row_base + kGemvRows <= p.M;
    const int row0 = row_base + 16 * rt + g;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int sl0 = s_first + col;
    for (int base = sl0; base < s_stop; base += NB * kRtStride) {
#pragma unroll
      for (int u = 0; u < NB; ++u) {
        const int sl = base + u * kRtStride;
        if (sl < s_stop) {
          const int ahead = sl + (NB - 1) * kRtStride;
          if (ahead < s_stop) load_step(ring[(u + NB - 1) % NB], row0, rows_ok, ahead);
          const int j0 = sl * kSliceGroups + 4 * t;  // this lane's first group of the slice
          uint4 xf[4];
          load_x_fragments(xf, xrow, j0, G, vec && sl * kSliceGroups + kSliceGroups <= G);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 wa = gemv_decode<T, N16, HAS8, RL2>(ring[u], 0, i, tab);  // row g
            const uint4 wb = gemv_decode<T, N16, HAS8, RL2>(ring[u], 1, i, tab);  // row g + 8
            TypeOps<T>::mma(acc, wa.x, wb.x, wa.y, wb.y, xf[i].x, xf[i].y);
            TypeOps<T>::mma(acc, wa.z, wb.z, wa.w, wb.w, xf[i].z, xf[i].w);
          }
        }
      }
    }

    // red[(col * 64 + local row) * B + b]: each (col, row) written by exactly one warp, then summed
    // over the kRtStride columns in order by store_item.
    if (ksplit > 1 && cluster && item != blockIdx.x) cluster_wait();  // the last item's (store_item<DEFER>)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int rl = 16 * rt + g + 8 * (q >> 1);
      const int b = 2 * t + (q & 1);
      if (b < B) red[(col * kGemvRows + rl) * B + b] = acc[q];
    }
    store_item<T, kGemvRows, kRtStride, kGemvThreads, 1, true>(p, y, red, B, rb, row_base, ks, ksplit, cluster,
                                                             s_last);
  };
  if (blockIdx.x < n_items) run_item(blockIdx.x, ring0);
  for (int item = blockIdx.x + gridDim.x; item < n_items; item += gridDim.x) {
    Ring ring;
    load_first_steps(ring, item);
    run_item(item, ring);
  }
  if (ksplit > 1 && cluster && blockIdx.x < n_items) cluster_wait();  // nobody reads red any more
}

// ---------------------------------------------------------------------------------------------
// register-tiled batched kernel (v5, batch 9..64 at rates 2..4 through ops.py; GPU-tested)
//
// Why: the MMA kernel (v3) at batch 16/64 is 0.84x/0.25x bf16 (H100). With one row tile per warp
// at NT = 8 it reloads every x fragment (LDG.128 + clamp/select address math) for every 16 rows:
// ~64 bytes of x per decoded code through L1 and ~90 SASS per code, against ~20 for the decode.
// v5 keeps v4's decode and fragment mapping and changes the tiling:
// * Register tile per warp: kBT = 2 row tiles (32 rows) x NT n-tiles (8 batch columns each,
//   NT = 2/4/8 for B <= 16/32/64). For each group i of its slice a lane loads the NT x fragments
//   (x rows nt*8+g, group j) once and feeds them to both row tiles; each decoded A fragment (rows
//   g, g+8 of one row tile) feeds all NT n-tiles: 2*NT MMAs per decode, 2*kBT per x fragment.
// * x at NT >= 4 (XS): from shared memory. A lane's x fragments (8 rows g x 4 lanes t, 64 bytes
//   apart) touch 16 cache lines per global load, so at NT = 8 the L1 path carried more wavefronts
//   than the table lookups. Instead the 4 warps of a K column copy each slice's x (8*NT rows x 256
//   bytes) into one of two swizzled buffers with cp.async one slice ahead, and meet at a named
//   barrier per slice (column_sync). At NT = 2 the __ldg path stays (faster there; see XS).
// * Warps in a 2-D grid: wm = warp % kBWM picks the warp's 32 rows of the item's kBRows = 128,
//   wk = warp / kBWM its K slices (sl = s_first + wk, + kBWK, ...; slices of 16 groups, lane t
//   owning groups 16*sl + 4t + i, i = 0..3, as in v4). The kBWM warps sharing wk read the same x
//   fragments at about the same time, so x comes from L2 once per 128 rows (v4's K-only split
//   would re-stream x from L2 for every item of 64 rows: 2x more, 117 MB at B = 64 on 4096x14336).
// * Codes of a slice for both row tiles (one 8-byte load per row and 16-bit stage, as v4) sit in
//   two register sets; the slice loop is unrolled by two so the set being filled for the next
//   slice and the one being decoded are compile-time names (no register copies, the v1/v2 lesson).
// * Reduction, fixed order: red[wk][local row][b] in shared memory (row stride batched_red_ld),
//   summed over wk = 0..kBWK-1 in order, then y or a split-K partial added by the last CTA of the
//   row block in split order (integer counter, as v3/v4), kBEpilogueU outputs per thread at a time.
//   No float atomics: bit-identical run to run.
// * n-tiles past ceil(B/8) are skipped (warp-uniform branch); batch columns >= B read x row B-1
//   (zeros with XS) and are never stored.
// Registers (ptxas -v, sm_90, see notes/kernels.md): one CTA of 8 warps per SM; acc is
// 4*kBT*NT = 64 floats at NT = 8.

constexpr int kBWM = 4;                  // warps along rows
constexpr int kBWK = 2;                  // warps along K
constexpr int kBWarps = kBWM * kBWK;
constexpr int kBThreads = kBWarps * 32;
constexpr int kBT = 2;                   // row tiles (16 rows) per warp and item
constexpr int kBRows = kBWM * kBT * 16;  // rows per work item
constexpr int kBMaxB = 64;
constexpr int kBEpilogueU = 8;  // outputs per thread at once in the epilogue (store_item)

// n-tiles of 8 batch columns the batched kernel is instantiated with for a batch of B (<= kBMaxB)
__host__ __device__ constexpr int batched_nt_of(int B) { return B <= 16 ? 2 : B <= 32 ? 4 : 8; }

// Row stride (floats) of the batched kernel's reduction buffer red[(wk * kBRows + row) * ld + b]: odd,
// so the epilogue's reads (32 consecutive rows of one column) hit 32 different banks. With ld = B
// (64: every row in one bank) they were 32-way conflicts, a third of the kernel's shared-memory
// wavefronts at batch 64 (ncu).
__host__ __device__ constexpr int batched_red_ld(int B) { return B | 1; }
__host__ __device__ constexpr int batched_red_bytes(int B) { return kBWK * kBRows * batched_red_ld(B) * 4; }

// Whether the batched kernel stages x in shared memory at NT n-tiles (XS, see the kernel).
__host__ __device__ constexpr bool batched_stages_x(int nt) { return nt >= 4; }

// Its staging buffers: per K column of warps (wk), two buffers of one slice each, x rows 0..8*NT-1 x
// the slice's 16 groups (16-byte units); 0 without staging. red reuses that space once every warp has
// left the slice loop.
__host__ __device__ constexpr int batched_x_bytes(int nt) {
  return batched_stages_x(nt) ? kBWK * 2 * nt * 8 * kSliceGroups * 16 : 0;
}

// Where x row b's group q (0..15 within the slice) sits in a staging buffer, in 16-byte units.
// Fragment reads (lane g, t: row 8 nt + g, group 4t + i) must hit 8 different bank quads per
// quarter-warp (g in {2k, 2k+1}, t = 0..3): the unit's low 3 bits are
// (i ^ 2 (t >> 1) ^ (g & 1)) | (t & 1) << 2, distinct over those 8 lanes. The staging stores (8
// consecutive q of one row per quarter-warp) keep a permutation of the low 3 bits too.
__device__ __forceinline__ int x_unit(int b, int q) { return b * kSliceGroups + (q ^ ((q >> 3) << 1) ^ (b & 1)); }

// Keeps a decoded fragment in registers: without it ptxas sank the sign arithmetic into every n-tile's
// (conditional) MMA block and recomputed it there, 24 IMAD/LOP3 per n-tile. No measurable time on its
// own (batch 64: 57.5 -> 57.2 us), kept for the shorter loop.
__device__ __forceinline__ void pin(uint4& v) { asm volatile("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}

// Barrier of the kBWM warps sharing K column wk (named barrier 1 + wk; 0 is __syncthreads), after this
// thread's staging copies have landed: then every copy of the column is visible to all its warps.
__device__ __forceinline__ void column_sync(int wk) {
  asm volatile("cp.async.wait_all;" ::: "memory");
  asm volatile("bar.sync %0, %1;" ::"r"(1 + wk), "r"(kBWM * 32) : "memory");
}

// XS = NT >= 4: x fragments from the staging buffers. At NT = 2 each x fragment feeds 4 MMAs and the
// __ldg path (L1 hits) was faster (H100, batch 16, 4096x14336: 25.7 against 27.7 us at 2 bpw, 38.2
// against 46.9 at 4 bpw); at NT = 4-8 the scattered __ldg of 8 rows x 4 lanes touched 16 cache lines
// per load and staging won (batch 64 with the odd reduction stride: 83.1 -> 57.5 us at 2 bpw).
template <typename T, int N16, bool HAS8, int RL2, int NT, bool TILED = false, bool XS = batched_stages_x(NT)>
__global__ void __launch_bounds__(kBThreads, 1)
    glq_batched_kernel(const MatmulParams p, const int row_blocks, const int ksplit, const bool cluster) {
  extern __shared__ uint4 smem[];
  __shared__ int s_last;
  constexpr int REP = 1 << RL2;
  constexpr int kTabBytes = SliceTables<N16, HAS8, RL2, 0>::bytes();
  constexpr int kXBuf = batched_x_bytes(NT) / (2 * kBWK);  // XS: one slice of x
  char* xs = reinterpret_cast<char*>(smem) + kTabBytes;
  float* red = reinterpret_cast<float*>(xs);
  const int G = p.K / 8;
  const int B = p.B;
  const int ld = batched_red_ld(B);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp % kBWM;
  const int wk = warp / kBWM;
  const int g = lane / 4;
  const int t = lane % 4;
  const char* tab = reinterpret_cast<const char*>(smem) + (lane & (REP - 1)) * 16;
  const int n_slices = (G + kSliceGroups - 1) / kSliceGroups;
  const int slices_per_split = (n_slices + ksplit - 1) / ksplit;
  const int n_tiles = (B + 7) / 8;
  const bool vec = (G % 4) == 0;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  char* xcol = xs + wk * 2 * kXBuf;  // XS: this warp's column's buffers, xcol and xcol + kXBuf
  const int n_items = row_blocks * ksplit;
  // XS: the lane's fragment offsets (bytes) in a staging buffer for its groups i = 0..3 (n-tile nt adds
  // nt * 8 rows: the same parity of b, so the same swizzle). Else: x row of batch column nt * 8 + g,
  // min(nt * 8 + g, B - 1) (32-bit offsets: matmul_run checks B * x_stride < 2^31).
  int xoff[XS ? 4 : NT];
  if constexpr (XS) {
#pragma unroll
    for (int i = 0; i < 4; ++i) xoff[i] = x_unit(g, 4 * t + i) * 16;
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xoff[nt] = min(nt * 8 + g, B - 1) * static_cast<int>(p.x_stride);
  }

  slice_kernel_prologue<N16, HAS8, kBThreads, RL2>(smem, p);

  // XS: the column's 128 threads copy slice sl's x (rows below 8 * n_tiles, the only ones read) into
  // buf; rows >= B and groups >= G are zero-filled (codes past G read as 0 but still decode to table
  // entries, so their x must be 0).
  auto stage_x = [&](char* buf, int sl) {
    const int ct = wm * 32 + lane;
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int u = ct + k * kBWM * 32;
      const int b = u / kSliceGroups, q = u % kSliceGroups;
      if (b < 8 * n_tiles) {
        const int j = sl * kSliceGroups + q;
        const bool valid = b < B && j < G;
        cp_async16(buf + x_unit(b, q) * 16, valid ? x + b * p.x_stride + 8LL * j : x, valid);
      }
    }
  };

  for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
    const SliceItem it = slice_item(item, kBRows, slices_per_split, n_slices, ksplit);
    const int rb = it.rb, ks = it.ks, row_base = it.row_base, s_first = it.s_first, s_stop = it.s_stop;
    const int warp_row0 = row_base + wm * kBT * 16;  // row tile rt: warp_row0 + 16 rt + g (+ 8)
    const bool rows_ok = warp_row0 + kBT * 16 <= p.M;

    float acc[kBT][NT][4];
#pragma unroll
    for (int rt = 0; rt < kBT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[rt][nt][q] = 0.f;

    auto load = [&](SliceCodes<N16, HAS8> (&dst)[kBT], int sl_) {
      const bool fast = vec && rows_ok && sl_ * kSliceGroups + kSliceGroups <= G;
#pragma unroll
      for (int rt = 0; rt < kBT; ++rt) {
        if constexpr (TILED) {  // tiles past M are never stored
          if (warp_row0 + 16 * rt < p.M) load_slice_tiled(dst[rt], p, warp_row0 / 16 + rt, sl_, G / kSliceGroups);
        } else {
          load_slice(dst[rt], p, warp_row0 + 16 * rt + g, sl_ * kSliceGroups + 4 * t, G, fast);
        }
      }
    };
    // One slice, for each of the lane's 4 groups i: XS: both row tiles' decodes, then per n-tile one x
    // fragment from the staging buffer `buf` feeding 2 * kBT MMAs. Else: the NT x fragments from global
    // memory, then per row tile a decode feeding 2 * NT MMAs.
    auto compute = [&](const SliceCodes<N16, HAS8> (&cur)[kBT], int sl_, const char* buf) {
      const int j0 = sl_ * kSliceGroups + 4 * t;
      const bool inside = vec && sl_ * kSliceGroups + kSliceGroups <= G;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (XS) {
          uint4 wa[kBT], wb[kBT];
#pragma unroll
          for (int rt = 0; rt < kBT; ++rt) {
            wa[rt] = gemv_decode<T, N16, HAS8, RL2>(cur[rt], 0, i, tab);  // row g
            wb[rt] = gemv_decode<T, N16, HAS8, RL2>(cur[rt], 1, i, tab);  // row g + 8
            pin(wa[rt]);
            pin(wb[rt]);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (nt < n_tiles) {
              const uint4 xf = *reinterpret_cast<const uint4*>(buf + xoff[i] + nt * 8 * kSliceGroups * 16);
#pragma unroll
              for (int rt = 0; rt < kBT; ++rt) {
                TypeOps<T>::mma(acc[rt][nt], wa[rt].x, wb[rt].x, wa[rt].y, wb[rt].y, xf.x, xf.y);
                TypeOps<T>::mma(acc[rt][nt], wa[rt].z, wb[rt].z, wa[rt].w, wb[rt].w, xf.z, xf.w);
              }
            }
          }
        } else {
          const int j = j0 + i;
          uint4 xf[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            // groups past G must be zero: their codes read as 0 but still decode to table entries
            xf[nt] = (inside || j < G) ? __ldg(reinterpret_cast<const uint4*>(x + xoff[nt] + 8 * j))
                                       : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int rt = 0; rt < kBT; ++rt) {
            uint4 wa = gemv_decode<T, N16, HAS8, RL2>(cur[rt], 0, i, tab);  // row g
            uint4 wb = gemv_decode<T, N16, HAS8, RL2>(cur[rt], 1, i, tab);  // row g + 8
            pin(wa);
            pin(wb);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              if (nt < n_tiles) {
                TypeOps<T>::mma(acc[rt][nt], wa.x, wb.x, wa.y, wb.y, xf[nt].x, xf[nt].y);
                TypeOps<T>::mma(acc[rt][nt], wa.z, wb.z, wa.w, wb.w, xf[nt].z, xf[nt].w);
              }
            }
          }
        }
      }
    };

    // Codes in two register sets (c0, c1), alternating by slice; with XS x too, in two staging buffers.
    // column_sync before slice k's compute: its x has landed, and every warp of the column has
    // finished slice k - 1, whose buffer the copies of slice k + 1 then overwrite. All warps of a
    // column take the same slices, so they meet the same barriers.
    SliceCodes<N16, HAS8> c0[kBT], c1[kBT];
    int sl = s_first + wk;
    if (sl < s_stop) {
      load(c0, sl);
      if constexpr (XS) stage_x(xcol, sl);
    }
    for (; sl < s_stop; sl += 2 * kBWK) {
      const int sl1 = sl + kBWK;
      if (sl1 < s_stop) load(c1, sl1);
      if constexpr (XS) {
        column_sync(wk);
        if (sl1 < s_stop) stage_x(xcol + kXBuf, sl1);
      }
      compute(c0, sl, xcol);
      if (sl1 >= s_stop) break;
      const int sl2 = sl1 + kBWK;
      if (sl2 < s_stop) load(c0, sl2);
      if constexpr (XS) {
        column_sync(wk);
        if (sl2 < s_stop) stage_x(xcol, sl2);
      }
      compute(c1, sl1, xcol + kXBuf);
    }
    if constexpr (XS) __syncthreads();  // red overlays the staging buffers

    // Cross-warp reduction. acc[rt][nt]: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t),
    // (row g+8, col 2t+1); red[(wk * kBRows + local row) * ld + b].
#pragma unroll
    for (int rt = 0; rt < kBT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int rl = wm * kBT * 16 + 16 * rt + g + 8 * (q >> 1);
          const int b = nt * 8 + 2 * t + (q & 1);
          if (b < B) red[(wk * kBRows + rl) * ld + b] = acc[rt][nt][q];
        }
    store_item<T, kBRows, kBWK, kBThreads, kBEpilogueU>(p, y, red, ld, rb, row_base, ks, ksplit, cluster, s_last);
  }
}

// ---------------------------------------------------------------------------------------------
// kernel selection

struct KernelInfo {
  const void* fn;
  int R;
};

template <typename T, int N16, bool HAS8, int NT, bool TILED>
KernelInfo pick_r() {
  // Two row tiles per warp halve the x-fragment loads per code, but only fit the register budget
  // with one stage and one n-tile.
  constexpr bool two = (N16 == 1 && !HAS8 && NT <= 2);
  constexpr int R = two ? 2 : 1;
  constexpr int regs_per_chunk = R * 2 * (N16 * 4 + (HAS8 ? 2 : 0));
  constexpr int PF = 1;
  static_assert(regs_per_chunk <= 64, "codes of one chunk must fit in registers");
  return {reinterpret_cast<const void*>(&glq_matmul_kernel<T, N16, HAS8, NT, R, PF, TILED>), R};
}

template <typename T, bool TILED, int N16, bool HAS8>
KernelInfo pick_nt(int B) {
  if (B <= 8) return pick_r<T, N16, HAS8, 1, TILED>();
  if (B <= 16) return pick_r<T, N16, HAS8, 2, TILED>();
  return pick_r<T, N16, HAS8, 8, TILED>();
}

template <typename T, bool TILED>
KernelInfo pick_rate(int rate, int B) {
  switch (rate) {
    case 2: return pick_nt<T, TILED, 1, false>(B);
    case 3: return pick_nt<T, TILED, 1, true>(B);
    case 4: return pick_nt<T, TILED, 2, false>(B);
    case 5: return pick_nt<T, TILED, 2, true>(B);
    case 6: return pick_nt<T, TILED, 3, false>(B);
    case 7: return pick_nt<T, TILED, 3, true>(B);
    case 8: return pick_nt<T, TILED, 4, false>(B);
    default: return {nullptr, 0};
  }
}

KernelInfo pick_kernel(int rate, int dtype, int B, bool tiled = false) {
  if (B < 1 || B > 64) return {nullptr, 0};
  if (tiled)
    return dtype == kFloat16 ? pick_rate<__half, true>(rate, B) : pick_rate<__nv_bfloat16, true>(rate, B);
  return dtype == kFloat16 ? pick_rate<__half, false>(rate, B) : pick_rate<__nv_bfloat16, false>(rate, B);
}

int table_entries(int rate) { return (rate / 2) * 512 + (rate % 2) * 256; }

struct GemvInfo {
  const void* fn;
  int rl2;
  int copies;       // table copies a caller asks for to get this kernel (plan.rep)
  int table_bytes;  // shared memory of its tables (SliceTables)
  int warps = kGemvWarps;  // per CTA
};

// A slice kernel (v4, its row-tile variant, v5) with SliceTables<N16, HAS8, RL2, WIDE>'s layout.
template <int N16, bool HAS8, int RL2, int WIDE = 0>
GemvInfo slice_info(const void* fn) {
  return {fn, RL2, WIDE > 0 || RL2 == 3 ? 8 : 1 << RL2, SliceTables<N16, HAS8, RL2, WIDE>::bytes()};
}

// 8 table copies for one 16-bit stage, 4 otherwise (and 8 for the first one or two on v4's layers, below).
// 128 registers (one CTA of 16 warps per SM): at 64 (two CTAs) ptxas spilled 90-170 bytes for every
// rate (tried; see notes). Code ring 4 deep (prefetch 3 steps) for one 16-bit stage, 2 deep for more.
// One 16-bit stage (rates 2-3) also runs as 8 warps per CTA, two CTAs per SM (the same 128 registers, no spill;
// gemv_plan picks).
template <typename T, int N16, bool HAS8, int RL2 = (N16 == 1 ? 3 : 2), int WIDE = 0, bool TILED = false,
          int W = kGemvWarps>
GemvInfo gemv_info() {
  static_assert(W == kGemvWarps || (W == kGemvWarps / 2 && N16 == 1), "8 warps only with one 16-bit stage");
  constexpr int MINB = kGemvWarps / W;
  constexpr int NB = N16 == 1 ? 4 : 2;
  GemvInfo k = slice_info<N16, HAS8, RL2, WIDE>(
      reinterpret_cast<const void*>(&glq_gemv_kernel<T, N16, HAS8, RL2, MINB, NB, WIDE, TILED, W>));
  k.warps = W;
  return k;
}

// Rates 4-8 on layers of at least kWideTableWeights weights hold 8 copies of their first 16-bit stage tables
// instead of 4: the first two at rates 4-7 (rates 4-5: RL2 = 3, every table; 6-7: SliceTables' WIDE = 2), the
// first at rate 8 (WIDE = 1: 64 + 3 x 32 KiB). Those lookups become conflict-free, and the kernel is bound by its
// shared-memory lookups there. Measured (H200, batch 1 and 8, v4, notes/kernels.md stop 17): 4096x14336 and
// 14336x4096 7-13% faster at 4 bpw, 18-20% at 5, 8-11% at 6, 6-10% at 7 (batch 1), the 70B shapes 12-30%.
// Stop 17 also found 4096x4096 4-11% slower and set the threshold at 32 M weights, but its fill then stored
// every copy with an 8-way bank conflict (fixed in stop 18, fill_tables_as); re-measured (stop 23, H200, batches
// 1 and 8) 8 copies win from 8 M weights: 4096x4096 7-18% faster at 4-6 bpw, 2-7% at 7, 2048x4096 3-11%; rate
// 8 4096x14336, 14336x4096 and 8192x8192 5-7%, 4096x4096 3%. Smaller layers do not run v4 (ops.py).
// Only while the CTA's dynamic shared memory stays within kWideMaxSmem: beyond it (two 8-copy stages at rate 8,
// rate 7 at batch 8) the driver's 228 KiB carve-out leaves 28 KiB of L1 for x and every such case measured
// 4-19% slower.
constexpr long long kWideTableWeights = 1LL << 23;
constexpr int kWideMaxSmem = 192 * 1024;

// v4 for `rate` with `rep` table copies where the rate offers a choice (rep 8 at rates 4-7: 8 copies
// of the first two 16-bit stages, at rate 8 of the first; anything else, and every rep at rates 2 and 3,
// gives the rate's fixed copies), and `warps` per CTA where it does (8 at rates 2-3; anything else: 16).
template <typename T, bool TILED = false>
GemvInfo pick_gemv_rate(int rate, int rep, int warps) {
  constexpr int W8 = kGemvWarps / 2;
  switch (rate) {
    case 2: return warps == W8 ? gemv_info<T, 1, false, 3, 0, TILED, W8>() : gemv_info<T, 1, false, 3, 0, TILED>();
    case 3: return warps == W8 ? gemv_info<T, 1, true, 3, 0, TILED, W8>() : gemv_info<T, 1, true, 3, 0, TILED>();
    case 4: return rep == 8 ? gemv_info<T, 2, false, 3, 0, TILED>() : gemv_info<T, 2, false, 2, 0, TILED>();
    case 5: return rep == 8 ? gemv_info<T, 2, true, 3, 0, TILED>() : gemv_info<T, 2, true, 2, 0, TILED>();
    case 6: return rep == 8 ? gemv_info<T, 3, false, 2, 2, TILED>() : gemv_info<T, 3, false, 2, 0, TILED>();
    case 7: return rep == 8 ? gemv_info<T, 3, true, 2, 2, TILED>() : gemv_info<T, 3, true, 2, 0, TILED>();
    case 8: return rep == 8 ? gemv_info<T, 4, false, 2, 1, TILED>() : gemv_info<T, 4, false, 2, 0, TILED>();
    default: return {nullptr, 0};
  }
}

GemvInfo pick_gemv(int rate, int dtype, int rep, bool tiled = false, int warps = kGemvWarps) {
  if (tiled)
    return dtype == kFloat16 ? pick_gemv_rate<__half, true>(rate, rep, warps)
                             : pick_gemv_rate<__nv_bfloat16, true>(rate, rep, warps);
  return dtype == kFloat16 ? pick_gemv_rate<__half>(rate, rep, warps) : pick_gemv_rate<__nv_bfloat16>(rate, rep, warps);
}

// Variant 4 (row-tile steps): v4's table copies at rates 2-3, 4 copies from rate 4 (8 measured 0-9% faster at
// rate 4, less than the deeper ring), and a code ring 4 deep at rates 2-6: its 4 accumulators leave the registers
// for it (127 at rate 4, no spill; rate 5 4 bytes of spill outside the loop), and on the small layers it runs on,
// the first codes' DRAM round trip is the chain (stop 23, H200, rate 4, ring 2 -> 4: 576x576 4.2 -> 3.65 us,
// 1536x576 4.4 -> 3.7, 2560x960 5.65 -> 4.95, 192x576 4.15 -> 3.6; batch 4 alike). Rates 7-8 keep a 2-deep ring
// (rate 7: 12 bytes of spill outside the loop with it). Where ops.py routes rates 5-8 to it: ops.small_batch_variant.
template <typename T, bool TI>
GemvInfo pick_gemv_rt_rate(int rate) {
  switch (rate) {
    case 2: return slice_info<1, false, 3>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 1, false, 3, 4, TI>));
    case 3: return slice_info<1, true, 3>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 1, true, 3, 4, TI>));
    case 4: return slice_info<2, false, 2>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 2, false, 2, 4, TI>));
    case 5: return slice_info<2, true, 2>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 2, true, 2, 4, TI>));
    case 6: return slice_info<3, false, 2>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 3, false, 2, 4, TI>));
    case 7: return slice_info<3, true, 2>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 3, true, 2, 2, TI>));
    case 8: return slice_info<4, false, 2>(reinterpret_cast<const void*>(&glq_gemv_rt_kernel<T, 4, false, 2, 2, TI>));
    default: return {nullptr, 0};
  }
}

GemvInfo pick_gemv_rt(int rate, int dtype, bool tiled = false) {
  if (tiled)
    return dtype == kFloat16 ? pick_gemv_rt_rate<__half, true>(rate) : pick_gemv_rt_rate<__nv_bfloat16, true>(rate);
  return dtype == kFloat16 ? pick_gemv_rt_rate<__half, false>(rate) : pick_gemv_rt_rate<__nv_bfloat16, false>(rate);
}

// v5: instantiated for rates 2..4 only (the rates it is meant for; 3 n-tile counts x 2 dtypes each).
// Same table copies as v4; rep 8 at rate 4: 8 copies of both stages (RL2 = 3).
template <typename T, bool TI, int N16, bool HAS8, int RL2 = (N16 == 1 ? 3 : 2)>
GemvInfo batched_nt(int B) {
  const int nt = batched_nt_of(B);
  const void* fn = nt == 2   ? reinterpret_cast<const void*>(&glq_batched_kernel<T, N16, HAS8, RL2, 2, TI>)
                   : nt == 4 ? reinterpret_cast<const void*>(&glq_batched_kernel<T, N16, HAS8, RL2, 4, TI>)
                             : reinterpret_cast<const void*>(&glq_batched_kernel<T, N16, HAS8, RL2, 8, TI>);
  return slice_info<N16, HAS8, RL2>(fn);
}

template <typename T, bool TI>
GemvInfo batched_rate(int rate, int B, int rep) {
  switch (rate) {
    case 2: return batched_nt<T, TI, 1, false>(B);
    case 3: return batched_nt<T, TI, 1, true>(B);
    case 4: return rep == 8 ? batched_nt<T, TI, 2, false, 3>(B) : batched_nt<T, TI, 2, false>(B);
    default: return {nullptr, 0};
  }
}

GemvInfo pick_batched(int rate, int dtype, int B, int rep, bool tiled = false) {
  if (B < 1 || B > kBMaxB) return {nullptr, 0};
  if (tiled)
    return dtype == kFloat16 ? batched_rate<__half, true>(rate, B, rep) : batched_rate<__nv_bfloat16, true>(rate, B, rep);
  return dtype == kFloat16 ? batched_rate<__half, false>(rate, B, rep) : batched_rate<__nv_bfloat16, false>(rate, B, rep);
}

// Every matmul and FWHT call plans its launch, and the driver queries behind a plan cost a few
// microseconds of host time per call (eager decoding makes hundreds of calls per token). Their
// answers depend only on the kernel, its shared memory and the device, so they are asked once.
std::mutex g_launch_mu;
std::map<std::tuple<const void*, int, int, int>, std::pair<int, int>> g_occupancy;  // -> (per_sm, sms)
std::map<std::pair<const void*, int>, int> g_smem_allowed;  // (kernel, device) -> bytes allowed so far

// Lets `fn` use `smem` bytes of dynamic shared memory on `device` (the current one). The attribute
// only ever grows, so a launch planned earlier with more shared memory stays allowed. Caller holds
// g_launch_mu.
cudaError_t allow_smem(const void* fn, int smem, int device) {
  int& allowed = g_smem_allowed[{fn, device}];
  if (smem <= allowed) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) allowed = smem;
  return err;
}

// cudaLaunchKernel, as a programmatic dependent launch (see pdl_wait) on devices of compute capability
// >= 9: the kernel's CTAs may then start while the previous kernel of the stream finishes, so its
// launch and its weight-only prologue (tables into shared memory) overlap the previous kernel's tail
// (an FWHT before a matmul, a matmul before an FWHT). Stream capture records it as a programmatic edge
// of the CUDA graph. GLQ_KERNELS_PDL=0 turns it off; a comma-separated list of kinds (fwht, small,
// batched, mma) keeps it for those only (for measurements, scripts/pdl_probe.py).
// cluster > 1: CTAs i .. i + cluster - 1 (i a multiple of cluster) form one thread-block cluster
// (split_clusters planned it; compute capability >= 9), with or without the programmatic launch.
cudaError_t launch_kernel(const void* fn, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t stream,
                          const char* kind, bool allowed = true, int cluster = 1) {
  // per device: 0 unknown, 1 compute capability >= 9, 2 older (no lock on the launch path: eager decoding
  // launches hundreds of kernels per token)
  static std::atomic<signed char> capable[64];
  const char* env = std::getenv("GLQ_KERNELS_PDL");
  bool pdl = allowed && (!env || !env[0] || (env[0] == '1' && !env[1]) ||
                         (env[0] != '0' && std::strstr(env, kind) != nullptr));
  if (pdl) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    signed char known = device < 64 ? capable[device].load(std::memory_order_relaxed) : 0;
    if (known == 0) {
      int major = 0;
      err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      if (err != cudaSuccess) return err;
      known = major >= 9 ? 1 : 2;
      if (device < 64) capable[device].store(known, std::memory_order_relaxed);
    }
    pdl = known == 1;
  }
  if (!pdl && cluster <= 1) return cudaLaunchKernel(fn, grid, block, args, smem, stream);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelExC(&cfg, fn, args);
}

// CTAs of `fn` resident per SM with `smem` bytes of dynamic shared memory (which this also
// allows for `fn`), and the SM count: what both planners size their grids from.
cudaError_t occupancy(const void* fn, int threads, int smem, int device, int* per_sm, int* sms) {
  std::lock_guard<std::mutex> lock(g_launch_mu);
  const auto key = std::make_tuple(fn, threads, smem, device);
  const auto hit = g_occupancy.find(key);
  if (hit != g_occupancy.end()) {
    *per_sm = hit->second.first;
    *sms = hit->second.second;
    return cudaSuccess;
  }
  int smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > smem_optin - 1024) return cudaErrorInvalidValue;
  err = allow_smem(fn, smem, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, fn, threads, smem);
  if (err == cudaSuccess) g_occupancy[key] = {*per_sm, *sms};  // failures are asked again next time
  return err;
}

// Split-K in thread-block clusters (finish_split_cluster): [s] = clusters of s CTAs of `fn` (s = 2..8,
// 8 being the portable cluster size) that can be resident at once, 0 where a split of s must go through
// the global workspace instead: compute capability < 9, GLQ_KERNELS_CLUSTER=0 (for measurements), or no
// cluster fits. Every size in one locked lookup: the planners run on every matmul call (eager decoding
// makes hundreds a token). occupancy() must have allowed `smem` for `fn` first.
using ClusterSlots = std::array<int, 9>;

ClusterSlots split_clusters(const void* fn, int threads, int smem, int device) {
  const char* env = std::getenv("GLQ_KERNELS_CLUSTER");
  if (env && env[0] == '0' && !env[1]) return ClusterSlots{};
  static std::map<std::tuple<const void*, int, int, int>, ClusterSlots> known;  // under g_launch_mu
  std::lock_guard<std::mutex> lock(g_launch_mu);
  const auto key = std::make_tuple(fn, threads, smem, device);
  const auto hit = known.find(key);
  if (hit != known.end()) return hit->second;
  ClusterSlots clusters{};
  int major = 0, sms = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return clusters;
  }
  for (int size = 2; major >= 9 && size <= 8; ++size) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(size * std::max(1, sms / size)));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(size);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaOccupancyMaxActiveClusters(&clusters[size], fn, &cfg) != cudaSuccess) {
      cudaGetLastError();  // a driver without cluster support: the workspace path
      clusters[size] = 0;
    }
  }
  known[key] = clusters;
  return clusters;
}

// Clusters of `ksplit` CTAs from split_clusters' table (0 outside 2..8).
int clusters_of(const ClusterSlots& slots, int ksplit) { return ksplit >= 2 && ksplit <= 8 ? slots[ksplit] : 0; }

// The split count actually realised when `n` units are dealt out `ceil(n / s)` per split.
int realised_split(int n, int s) {
  const int per = (n + s - 1) / s;
  return (n + per - 1) / per;
}

// Cost terms of a planner that the kernels' measurements set (SplitCost, plan_slices).
struct SplitCost {
  // An SM's throughput in slices: an item costs at least sm_load * slices / parts steps, whatever its
  // warps' share (0: the busiest warp's steps alone decide).
  double sm_load;
  double split;  // the workspace pass of a split item, in steps
  double cluster_split;  // the same through a thread-block cluster (split_clusters), in steps
  double round = 0.5;  // what each round of items costs beyond its steps (reduction, pipeline start)
};

// Shared planner of the small-batch and batched kernels: work items are row blocks of `rows` rows x
// K splits, `parts` warps of a CTA split an item's slices. The cost in warp steps is rounds of items x
// the item's steps (its busiest warp's slices, or the SM's throughput) plus a fixed cost per round
// (SplitCost::round: the cross-warp reduction, the pipeline's start) and, with splits, the split pass:
// through a cluster where clusters of s CTAs fit (split_clusters; fewer CTAs may then be resident, e.g.
// 120 of 132 on an H100 in clusters of 4), else through the workspace, whichever costs less. In auto
// mode (ksplit <= 0) the smallest split reaching the best cost wins.
int plan_slices(const void* fn, int threads, int smem, int rows, int parts, int rep, int kernel, int B, int M,
                int K, int ksplit, int device, MatmulPlan* plan, SplitCost cost_of = {0.0, 0.3, 0.3},
                double* cost = nullptr) {
  int per_sm = 0, sms = 0;
  const cudaError_t err = occupancy(fn, threads, smem, device, &per_sm, &sms);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int row_blocks = (M + rows - 1) / rows;
  const int G = K / 8;
  const int n_slices = std::max(1, (G + kSliceGroups - 1) / kSliceGroups);
  struct Choice {
    double cost;
    int slots;  // CTAs resident at once
    bool cluster;
  };
  const ClusterSlots cluster_slots = split_clusters(fn, threads, smem, device);
  auto choose = [&](int s) {  // split s (realised) through a cluster or the workspace
    const int sps = (n_slices + s - 1) / s;
    const int items = row_blocks * s;
    const int steps = (sps + parts - 1) / parts;
    const double item = std::max(static_cast<double>(steps), cost_of.sm_load * sps / parts);
    const int slots = per_sm * sms;
    const double finish = s > 1 ? 0.02 * s * B : 0.0;  // the split pass's per-output work
    // Both costs are summed in one order, so equal terms compare equal and the cluster wins a tie (with
    // the terms grouped differently, rounding had sent some ties to the workspace).
    Choice c{((items + slots - 1) / slots) * (item + cost_of.round) + (s > 1 ? cost_of.split : 0.0) + finish, slots,
             false};
    const int clusters = clusters_of(cluster_slots, s);
    if (clusters > 0) {
      const int cslots = clusters * s;
      const double cost = ((items + cslots - 1) / cslots) * (item + cost_of.round) + cost_of.cluster_split + finish;
      if (cost <= c.cost) c = {cost, cslots, true};
    }
    return c;
  };
  if (ksplit <= 0) {
    double best = 1e30;
    ksplit = 1;
    for (int s = 1; s <= std::min(n_slices, 64); ++s) {
      if (realised_split(n_slices, s) != s) continue;
      const double cost = choose(s).cost;
      if (cost < best - 1e-9) {
        best = cost;
        ksplit = s;
      }
    }
  }
  ksplit = realised_split(n_slices, std::max(1, std::min(ksplit, n_slices)));
  const Choice c = choose(ksplit);
  plan->rows_per_cta = rows;
  plan->row_blocks = row_blocks;
  plan->ksplit = ksplit;
  plan->cluster = c.cluster ? 1 : 0;
  plan->grid = std::min(row_blocks * ksplit, c.slots);  // a multiple of ksplit where clustered
  plan->rep = rep;
  plan->smem_bytes = smem;
  plan->kernel = kernel;
  if (cost != nullptr) *cost = c.cost;
  return cudaSuccess;
}

// v4's plan with `warps` per CTA (rep as gemv_plan's after its table-copy choice); *cost: the split planner's
// price of it (plan_slices), in warp steps.
int gemv_plan_warps(int B, int M, int K, int rate, int dtype, int rep, int warps, int ksplit, int device,
                    MatmulPlan* plan, double* cost) {
  const GemvInfo k = pick_gemv(rate, dtype, rep, false, warps);
  if (k.fn == nullptr) return cudaErrorInvalidValue;
  const int smem = k.table_bytes + k.warps * kGemvRows * B * 4;
  // Fitted (stop 20; notes/kernels.md) to v4's forced splits, 1-4 on seven shapes at 2-8 bpw and batches 1
  // and 4, plus 23 held-out cases of a first fit (H200), minimising the summed relative loss against the
  // fastest split. An SM's slices weigh 2 steps per 16 (2048x2048 at 4 bpw: 5.9 us in 4 splits, 8.0
  // unsplit); a split's workspace pass costs ~1.8 steps of rate 2 and the pass through a cluster ~0.8 of
  // that (4096x4096 at 2 bpw: 6.6 us in 2 clustered splits, 7.3 unsplit); each round of items costs a fixed
  // time beyond its slices, ~2 steps of rate 2 (the first code loads of an item wait a DRAM round trip; the
  // epilogue), so fewer steps of the slower rates (28672x8192 at 3 bpw: 76.4 us unsplit in 4 rounds, 83.4
  // in 2 splits and 7 rounds).
  const SplitCost cost_of{2.0, 1.8 * 2.0 / rate, 1.5 * 2.0 / rate, 0.5 + 4.0 / rate};
  const int err = plan_slices(k.fn, k.warps * 32, smem, kGemvRows, k.warps, k.copies, kKernelGemv, B, M, K, ksplit,
                              device, plan, cost_of, cost);
  plan->warps = k.warps;
  return err;
}

// Warps per v4 CTA forced by GLQ_KERNELS_V4_WARPS (8 or 16, for measurements; applies at rates 2-3), else 0.
int forced_gemv_warps() {
  const char* env = std::getenv("GLQ_KERNELS_V4_WARPS");
  if (env == nullptr) return 0;
  const int w = std::atoi(env);
  return w == kGemvWarps || w == kGemvWarps / 2 ? w : 0;
}

// Plan of the small-batch kernel; any error makes matmul_plan (auto) fall back to the MMA kernel.
// A step is one slice x kGemvT row tiles of a warp.
// rep: 8 or 4 picks the table copies at rates 4-8 (anything else: 8 on layers of at least
// kWideTableWeights weights within kWideMaxSmem, else 4).
int gemv_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device, MatmulPlan* plan) {
  if (B < 1 || B > kGemvMaxB) return cudaErrorInvalidValue;
  const int red_bytes = kGemvWarps * kGemvRows * B * 4;
  if (rate >= 4 && rep != 4 && rep != 8) {
    if (static_cast<long long>(M) * K >= kWideTableWeights &&
        pick_gemv(rate, dtype, 8).table_bytes + red_bytes <= kWideMaxSmem) {
      if (gemv_plan(B, M, K, rate, dtype, 8, ksplit, device, plan) == cudaSuccess) return cudaSuccess;
      cudaGetLastError();  // a device with less shared memory: clear the failed attribute call's error
    }
    rep = 4;
  }
  if (rate > 3) return gemv_plan_warps(B, M, K, rate, dtype, rep, kGemvWarps, ksplit, device, plan, nullptr);
  // Rates 2-3: 16 warps in one CTA per SM, or 8 warps in each of two, whichever the split planner prices lower
  // (16 on a tie). Two CTAs per SM halve the rounds where row blocks outnumber the SMs, and the next round's
  // (or launch's) CTA enters, fills its tables and loads its first codes while the previous one still runs
  // (one CTA of 16 warps holds the whole register file). Measured (H200, batch 1, tiled codes, us, 16 -> 8
  // warps; notes/kernels.md stop 25): 14336x4096 12.65 -> 10.7 (2 bpw) and 17.35 -> 15.15 (3 bpw), 28672x4096
  // 23.85 -> 20.1 and 34.4 -> 29.6; one round of split items is mixed: 4096x4096 5.9 -> 5.55 at 2 bpw, 7.0 ->
  // 7.15 at 3; 6144x4096 6.85 -> 6.95 and 8.8 -> 9.45 (unsplit, 96 row blocks: 8 warps must split it).
  const int forced = forced_gemv_warps();
  if (forced != 0) return gemv_plan_warps(B, M, K, rate, dtype, rep, forced, ksplit, device, plan, nullptr);
  double c16 = 0.0, c8 = 0.0;
  MatmulPlan eight;
  const int err = gemv_plan_warps(B, M, K, rate, dtype, rep, kGemvWarps, ksplit, device, plan, &c16);
  if (gemv_plan_warps(B, M, K, rate, dtype, rep, kGemvWarps / 2, ksplit, device, &eight, &c8) != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  if (err != cudaSuccess || c8 < c16 - 1e-9) {
    cudaGetLastError();
    *plan = eight;
  }
  return cudaSuccess;
}

// Plan of variant 4: items as v4's, kRtStride column parts; a step is one slice x one row tile.
int gemv_rt_plan(int B, int M, int K, int rate, int dtype, int ksplit, int device, MatmulPlan* plan) {
  if (B < 1 || B > kGemvMaxB) return cudaErrorInvalidValue;
  const GemvInfo k = pick_gemv_rt(rate, dtype);
  if (k.fn == nullptr) return cudaErrorInvalidValue;
  const int smem = k.table_bytes + kRtStride * kGemvRows * B * 4;
  // Its steps are balanced over all 16 warps already, so no SM term; a split's workspace pass costs
  // ~1.8 steps at every rate. Fitted to its forced splits at 2-4 bpw (H100, batch 1, route_probe.py
  // --small-splits): 576x576, 192x576, 1536x576 and 2560x960 are fastest unsplit (576x576 at 2 bpw
  // 3.5 us against 4.5 for the old plan's two splits), 576x1536 with three splits.
  const SplitCost cost_of{1.0, 1.8, 1.8};
  return plan_slices(k.fn, kGemvThreads, smem, kGemvRows, kRtStride, k.copies, kKernelGemvRt, B, M, K, ksplit,
                     device, plan, cost_of);
}

// Plan of the batched kernel (v5): 128-row items; a step is one slice for the 2 row tiles of a warp.
// rep 8 or 4 picks the table copies at rate 4; else 8 on layers of at least kWideTableWeights weights
// (v4's rule; 4 bpw, H100, against 4 copies: 4096x14336 and 14336x4096 2-10% faster at batches 16-32,
// -3% to +2% at 64; 4096x4096 2-7% slower then, before the fill lost its bank conflicts, 2-6% faster at
// batches 16 and 64 since, H200), 4 otherwise.
int batched_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device, MatmulPlan* plan) {
  if (rate == 4 && rep != 4 && rep != 8) {
    if (static_cast<long long>(M) * K >= kWideTableWeights) {
      if (batched_plan(B, M, K, rate, dtype, 8, ksplit, device, plan) == cudaSuccess) return cudaSuccess;
      cudaGetLastError();  // a device with less shared memory: clear the failed attribute call's error
    }
    rep = 4;
  }
  const GemvInfo k = pick_batched(rate, dtype, B, rep);
  if (k.fn == nullptr) return cudaErrorInvalidValue;
  const int smem = k.table_bytes + std::max(batched_x_bytes(batched_nt_of(B)), batched_red_bytes(B));
  return plan_slices(k.fn, kBThreads, smem, kBRows, kBWK, k.copies, kKernelBatched, B, M, K, ksplit, device, plan);
}

int mma_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device,
             MatmulPlan* plan) {
  const KernelInfo k = pick_kernel(rate, dtype, B);
  if (k.fn == nullptr) return cudaErrorInvalidValue;
  const int entries = table_entries(rate);
  if (rep <= 0) {
    // 8 copies make lookups conflict-free, but two CTAs (16 warps) per SM matter more for
    // hiding latency: keep the tables under 100 KiB.
    rep = 8;
    while (rep > 1 && entries * 16 * rep > 100 * 1024) rep /= 2;
  }
  if (rep != 1 && rep != 2 && rep != 4 && rep != 8) return cudaErrorInvalidValue;
  const int smem = entries * 16 * rep;
  int per_sm = 0, sms = 0;
  const cudaError_t err = occupancy(k.fn, kThreads, smem, device, &per_sm, &sms);
  if (err != cudaSuccess) return err;
  per_sm = std::max(per_sm, 1);
  const int slots = per_sm * sms;
  const int rows_per_cta = kWarps * 16 * k.R;
  const int row_blocks = (M + rows_per_cta - 1) / rows_per_cta;
  const int G = K / 8;
  const int n_chunks = std::max(1, (G + kChunkGroups - 1) / kChunkGroups);
  if (ksplit <= 0) {
    // Fewest rounds of chunks per CTA; each extra split costs a workspace pass, so prefer the
    // smallest split that reaches the best round count.
    double best = 1e30;
    ksplit = 1;
    for (int s = 1; s <= std::min(n_chunks, 64); ++s) {
      if (realised_split(n_chunks, s) != s) continue;
      const int cps = (n_chunks + s - 1) / s;
      const int items = row_blocks * s;
      const int waves = (items + slots - 1) / slots;
      const double cost = waves * (cps + 1.0) + (s > 1 ? 0.25 + 0.02 * s * B : 0.0);
      if (cost < best - 1e-9) {
        best = cost;
        ksplit = s;
      }
    }
  }
  ksplit = realised_split(n_chunks, std::min(ksplit, n_chunks));
  plan->rows_per_cta = rows_per_cta;
  plan->row_blocks = row_blocks;
  plan->ksplit = ksplit;
  plan->grid = std::min(row_blocks * ksplit, slots);
  plan->rep = rep;
  plan->smem_bytes = smem;
  plan->kernel = kKernelMma;
  plan->cluster = 0;
  if (ksplit > 1 && B <= 8) {
    // Split through a cluster where the partial-sum buffer after the tables keeps the CTAs per SM. Not
    // above batch 8: 4096x4096 at batch 32 and 5 bpw took 93 us against 82.6 through the workspace (H100).
    const int smem_c = smem + rows_per_cta * B * 4;
    int per_sm_c = 0;
    if (occupancy(k.fn, kThreads, smem_c, device, &per_sm_c, &sms) == cudaSuccess && per_sm_c >= per_sm) {
      const int clusters = clusters_of(split_clusters(k.fn, kThreads, smem_c, device), ksplit);
      const int items = row_blocks * ksplit;
      // only where it keeps the rounds of items (clusters may leave SMs of a GPC idle)
      if (clusters > 0 && (items + clusters * ksplit - 1) / (clusters * ksplit) == (items + slots - 1) / slots) {
        plan->cluster = 1;
        plan->smem_bytes = smem_c;
        plan->grid = std::min(row_blocks * ksplit, clusters * ksplit);
      }
    } else {
      cudaGetLastError();
    }
  }
  return cudaSuccess;
}

// The kernel a plan launches and its block size: matmul_run launches it, matmul_plan checks a tiled plan's.
struct PlannedKernel {
  const void* fn;
  int threads;
};

PlannedKernel planned_kernel(const MatmulPlan& plan, int rate, int dtype, int B) {
  const bool tiled = plan.tiled != 0;
  switch (plan.kernel) {
    case kKernelGemv: {
      const GemvInfo k = pick_gemv(rate, dtype, plan.rep, tiled, plan.warps);
      return {k.fn, k.warps * 32};
    }
    case kKernelGemvRt: return {pick_gemv_rt(rate, dtype, tiled).fn, kGemvThreads};
    case kKernelBatched: return {pick_batched(rate, dtype, B, plan.rep, tiled).fn, kBThreads};
    default: return {pick_kernel(rate, dtype, B, tiled).fn, kThreads};
  }
}

}  // namespace

int matmul_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device,
                int variant, MatmulPlan* plan) {
  if (variant & kTiledCodes) {  // the untiled kernel's plan (same tables, shared memory and launch), codes tiled
    if (M % 16 != 0 || K % (8 * kSliceGroups) != 0) return cudaErrorInvalidValue;
    const int err = matmul_plan(B, M, K, rate, dtype, rep, ksplit, device, variant & ~kTiledCodes, plan);
    if (err != cudaSuccess) return err;
    plan->tiled = 1;
    const PlannedKernel k = planned_kernel(*plan, rate, dtype, B);
    if (k.fn == nullptr) return cudaErrorInvalidValue;
    int per_sm = 0, sms = 0;  // also lets the tiled kernel use the plan's shared memory
    const cudaError_t e = occupancy(k.fn, k.threads, plan->smem_bytes, device, &per_sm, &sms);
    if (e != cudaSuccess) return e;
    return per_sm < 1 ? cudaErrorInvalidConfiguration : cudaSuccess;
  }
  if (variant & kKernelPrefer) {
    if (matmul_plan(B, M, K, rate, dtype, rep, ksplit, device, variant & ~kKernelPrefer, plan) == cudaSuccess)
      return cudaSuccess;
    cudaGetLastError();  // clear an error left by a failed attribute call
    variant = kKernelAuto;
  }
  if (variant == kKernelGemv) return gemv_plan(B, M, K, rate, dtype, rep, ksplit, device, plan);
  if (variant == kKernelBatched) return batched_plan(B, M, K, rate, dtype, rep, ksplit, device, plan);
  if (variant == kKernelGemvRt) return gemv_rt_plan(B, M, K, rate, dtype, ksplit, device, plan);
  if (variant == kKernelAuto && B <= kGemvMaxB && rep <= 0) {
    // the small-batch kernel when it plans; otherwise (shared memory, occupancy) the MMA kernel
    if (gemv_plan(B, M, K, rate, dtype, 0, ksplit, device, plan) == cudaSuccess) return cudaSuccess;
    cudaGetLastError();  // clear a sticky-free error left by a failed attribute call
  }
  if (variant != kKernelAuto && variant != kKernelMma) return cudaErrorInvalidValue;
  return mma_plan(B, M, K, rate, dtype, rep, ksplit, device, plan);
}

#ifdef GLQ_TRACE
int trace_set(void* buf, int slots) {
  const unsigned int zero = 0, n = static_cast<unsigned int>(slots);
  cudaError_t err = cudaMemcpyToSymbol(g_trace, &buf, sizeof(buf));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(g_trace_slots, &n, sizeof(n));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(g_trace_next, &zero, sizeof(zero));
  return err;
}
#endif

int matmul_run(const MatmulParams& p, const MatmulPlan& plan, cudaStream_t stream) {
  const PlannedKernel k = planned_kernel(plan, p.rate, p.dtype, p.B);
  if (k.fn == nullptr) return cudaErrorInvalidValue;
  if (plan.kernel == kKernelGemv || plan.kernel == kKernelGemvRt) {
    if (p.B > kGemvMaxB) return cudaErrorInvalidValue;
    bool cluster = plan.cluster != 0;
    void* args[] = {const_cast<MatmulParams*>(&p), const_cast<int*>(&plan.row_blocks),
                    const_cast<int*>(&plan.ksplit), &cluster};
    cudaError_t err = launch_kernel(k.fn, dim3(plan.grid), dim3(k.threads), args,
                                    static_cast<size_t>(plan.smem_bytes), stream, "small", true,
                                    cluster ? plan.ksplit : 1);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  }
  if (plan.kernel == kKernelBatched) {
    if (p.x_stride * p.B >= (1LL << 31)) return cudaErrorInvalidValue;
    bool cluster = plan.cluster != 0;
    void* args[] = {const_cast<MatmulParams*>(&p), const_cast<int*>(&plan.row_blocks),
                    const_cast<int*>(&plan.ksplit), &cluster};
    cudaError_t err = launch_kernel(k.fn, dim3(plan.grid), dim3(k.threads), args,
                                    static_cast<size_t>(plan.smem_bytes), stream, "batched", true,
                                    cluster ? plan.ksplit : 1);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  }
  int rep_log2 = 0;
  while ((1 << rep_log2) < plan.rep) ++rep_log2;
  bool cluster = plan.cluster != 0;
  void* args[] = {const_cast<MatmulParams*>(&p), const_cast<int*>(&plan.row_blocks),
                  const_cast<int*>(&plan.ksplit), &rep_log2, &cluster};
  cudaError_t err = launch_kernel(k.fn, dim3(plan.grid), dim3(k.threads), args,
                                  static_cast<size_t>(plan.smem_bytes), stream, "mma", true,
                                  cluster ? plan.ksplit : 1);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// dense decode for large batches (prefill): W̃ once into a transient (M, K) tensor, then cuBLAS
//
// Why: above ~64 batch rows the fused kernels decode W again for every 64 rows and their x
// traffic grows with the batch (notes/kernels.md: 190 us at batch 64 on 4096x14336 where bf16
// cuBLAS takes 48 us), while one decode pass costs about one write of M*K output values (~47 us
// for 4096x14336 in bf16 at the H100's copy rate) and is then shared by every row of the batch.
//
// Numerics: dequantize_reference's float32 arithmetic exactly, then one rounding.
// * Tables are read in float32 (the packed values, not the fp16/bf16 copies the fused kernels use).
// * A 16-bit code's signs flip the entry's sign bit (exact, as the reference's -v).
// * Stages are added in stage order to an accumulator starting at +0.0 (the reference's
//   zeros() += decode_s; +0 + -0 = +0 in both), each an IEEE float32 add (__fadd_rn: no FMA
//   contraction can change it).
// * scale = row_scale[r] * gain in float32 (torch multiplies a float32 tensor by a Python float
//   in float32 with the scalar rounded to float32 first; the binding rounds gain the same way),
//   then acc * scale (__fmul_rn).
// * The float32 product is rounded once to the output dtype with round-to-nearest-even
//   (__floats2half2_rn / __floats2bfloat162_rn, as torch's .to(dtype)), or stored as is for float32.
// So out == dequantize_reference(...).to(dtype) bit for bit (tests/kernels/test_cuda.py).
// Layout: one thread per (row, group) and iteration, grid-stride over the M*G groups in memory
// order: codes are (M, G) contiguous and out is (M, K) = (M*G, 8) contiguous, so a warp reads 32
// consecutive codes per stage and writes 32 consecutive 16-byte (32 for float32) vectors. Each
// thread keeps kDequantUnroll groups in flight so their code loads overlap. Tables sit in shared
// memory (16 KiB per 16-bit stage, 8 KiB for an 8-bit one), copied once per CTA; the kernel should
// be bound by its writes (8 output values per 2 bytes of code at 2 bpw).

namespace {

constexpr int kDequantThreads = 512;
constexpr int kDequantUnroll = 2;

template <typename OutT>
__device__ __forceinline__ void store8(OutT* dst, const float (&v)[8]);

template <>
__device__ __forceinline__ void store8<float>(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <>
__device__ __forceinline__ void store8<__half>(__half* dst, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);  // .x (low half, lower address) = v[2k]
    w[k] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* dst, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    w[k] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Row-major group index (row * G + group) of the code at position idx of a tiled stage (kTiledCodes):
// idx = (((tile * G / 16 + sl) * 8 + g) * 4 + t) * 8 + h * 4 + i holds row 16 tile + 8 h + g, group 16 sl + 4 t + i.
__device__ __forceinline__ unsigned untiled_group(unsigned idx, unsigned G) {
  const unsigned i = idx & 3u, h = (idx >> 2) & 1u, t = (idx >> 3) & 3u, g = (idx >> 5) & 7u, unit = idx >> 8;
  const unsigned slices = G / kSliceGroups;
  return ((unit / slices) * 16u + h * 8u + g) * G + (unit % slices) * kSliceGroups + t * 4u + i;
}

template <typename OutT, int N16, bool HAS8>
__global__ void __launch_bounds__(kDequantThreads) glq_dequantize_kernel(const DequantParams p) {
  extern __shared__ float4 dq_tab[];  // entry e's 8 floats: dq_tab[2e], dq_tab[2e + 1]
  // The 8-bit stage, if any, is the last: the used entries are the first kEntries rows of the
  // (S, 512, 8) table, stage-major, so the fill is one contiguous copy.
  constexpr int kEntries = N16 * 512 + (HAS8 ? 256 : 0);
  const float4* __restrict__ tg = reinterpret_cast<const float4*>(p.tables);
  for (int i = threadIdx.x; i < 2 * kEntries; i += kDequantThreads) dq_tab[i] = __ldg(tg + i);
  __syncthreads();

  const unsigned G = static_cast<unsigned>(p.K) / 8u;
  const unsigned n = static_cast<unsigned>(p.M) * G;  // < 2^31 (dequantize_run checks)
  const unsigned stride = gridDim.x * kDequantThreads;
  OutT* __restrict__ out = static_cast<OutT*>(p.out);
  for (unsigned base = blockIdx.x * kDequantThreads + threadIdx.x; base < n; base += stride * kDequantUnroll) {
    uint32_t c16[kDequantUnroll][N16];
    uint32_t c8[kDequantUnroll];
    float rs[kDequantUnroll];
    unsigned e[kDequantUnroll];  // row-major group index: where the code's 8 outputs go
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const unsigned idx = base + u * stride;
      const bool ok = idx < n;
#pragma unroll
      for (int s = 0; s < N16; ++s)
        c16[u][s] = ok ? __ldg(static_cast<const unsigned short*>(p.codes[s]) + idx) : 0u;
      c8[u] = (HAS8 && ok) ? __ldg(static_cast<const unsigned char*>(p.codes[N16]) + idx) : 0u;
      e[u] = p.tiled ? untiled_group(idx, G) : idx;
      rs[u] = ok ? __ldg(p.row_scale + e[u] / G) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const unsigned idx = base + u * stride;
      if (idx >= n) continue;
      float acc[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = 0.f;
#pragma unroll
      for (int s = 0; s < N16; ++s) {
        const uint32_t c = c16[u][s];
        const float4* e = dq_tab + 2 * (s * 512 + static_cast<int>(c >> 7));
        const float4 a = e[0], b = e[1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        // sign bits of coordinates 0..7: c & 127, and the parity of that for coordinate 7 (the
        // table already carries parity[pattern] there)
        const uint32_t lo = c & 127u;
        const uint32_t sg = lo | ((static_cast<uint32_t>(__popc(lo)) & 1u) << 7);
#pragma unroll
        for (int k = 0; k < 8; ++k)
          acc[k] = __fadd_rn(acc[k], __uint_as_float(__float_as_uint(v[k]) ^ (((sg >> k) & 1u) << 31)));
      }
      if constexpr (HAS8) {
        const float4* e = dq_tab + 2 * (N16 * 512 + static_cast<int>(c8[u]));
        const float4 a = e[0], b = e[1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = __fadd_rn(acc[k], v[k]);
      }
      const float scale = __fmul_rn(rs[u], p.gain);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = __fmul_rn(acc[k], scale);
      store8<OutT>(out + 8ull * e[u], acc);
    }
  }
}

template <typename OutT>
const void* dequant_fn(int rate) {
  switch (rate) {
    case 2: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 1, false>);
    case 3: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 1, true>);
    case 4: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 2, false>);
    case 5: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 2, true>);
    case 6: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 3, false>);
    case 7: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 3, true>);
    case 8: return reinterpret_cast<const void*>(&glq_dequantize_kernel<OutT, 4, false>);
    default: return nullptr;
  }
}

}  // namespace

int dequantize_run(const DequantParams& p, int device, cudaStream_t stream) {
  if (p.M < 0 || p.K < 0 || p.K % 8 != 0) return cudaErrorInvalidValue;
  if (p.tiled && (p.M % 16 != 0 || p.K % (8 * kSliceGroups) != 0)) return cudaErrorInvalidValue;
  const long long n = static_cast<long long>(p.M) * (p.K / 8);
  if (n >= (1LL << 31)) return cudaErrorInvalidValue;  // 32-bit group indices in the kernel
  if (n == 0) return cudaSuccess;
  const void* fn = p.dtype == kFloat16    ? dequant_fn<__half>(p.rate)
                   : p.dtype == kBFloat16 ? dequant_fn<__nv_bfloat16>(p.rate)
                   : p.dtype == 2         ? dequant_fn<float>(p.rate)
                                          : nullptr;
  if (fn == nullptr) return cudaErrorInvalidValue;
  const int smem = table_entries(p.rate) * 32;
  int per_sm = 0, sms = 0;
  cudaError_t err = occupancy(fn, kDequantThreads, smem, device, &per_sm, &sms);
  if (err != cudaSuccess) return err;
  const long long per_cta = static_cast<long long>(kDequantThreads) * kDequantUnroll;
  const int grid = static_cast<int>(std::max(1LL, std::min<long long>(std::max(per_sm, 1) * sms, (n + per_cta - 1) / per_cta)));
  void* args[] = {const_cast<DequantParams*>(&p)};
  err = cudaLaunchKernel(fn, dim3(grid), dim3(kDequantThreads), args, static_cast<size_t>(smem), stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// block-diagonal fast Walsh-Hadamard transform: one CTA per (row, power-of-two segment).
// The first three butterfly levels run in registers on 8 contiguous values per thread, the rest
// in shared memory (fp32 throughout).

namespace {

template <typename T>
__device__ __forceinline__ float load_as_float(const T* p) {
  return static_cast<float>(*p);
}
template <>
__device__ __forceinline__ float load_as_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_as_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T>
__device__ __forceinline__ T store_from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterflies over registers v[a*g .. a*g+g-1] for every group a (g = 2^m points each), levels
// ascending: the group's index bits are its points' bits at the current phase.
template <int P>
__device__ __forceinline__ void group_levels(float (&v)[P], int m) {
#pragma unroll
  for (int h = 1; h < P; h *= 2) {
    if (h < (1 << m)) {
#pragma unroll
      for (int e = 0; e < P; ++e)
        if ((e & h) == 0) {
          const float a = v[e], b = v[e + h];
          v[e] = a + b;
          v[e + h] = a - b;
        }
    }
  }
}

// Level order, and blocks split over several CTAs. A block of 2^lg points with top = seg_top > 0
// (hadamard_run: blocks larger than 2^cta_log2 points) is S = 2^top chunks of n = 2^(lg - top) points,
// and H_{S n} = H_S (x) H_n: output chunk c is H_n applied to u_c = sum_m H_S[c, m] x_m. Both kernels
// apply the block's top levels first (ascending), then its low levels (ascending). fwht_fast_kernel
// gives each output chunk its own CTA, which loads every input chunk (S-fold reads of x, from L2) and
// forms u_c with exactly the butterflies a full network applies on c's path (lower + upper where c's
// bit is 0, lower - upper where it is 1); fwht_kernel does the whole network in one CTA. So the two
// stay bit for bit equal.
// Why split: at batch 1 a block's transform is one CTA's latency chain, and it lengthens with the CTA's
// threads (H200, one CTA per block: 4096 points on 512 threads 3.7 us, 8192 on 1024 5.8, 16384 on 1024
// at 16 points each 11.1).
constexpr int kMaxTopLevels = 3;

// v = u_c's 8 points at one offset, for a block of 2^TOP chunks; load(m, w) fills w with input chunk
// m's 8 points there, signed. Every load is issued before the first butterfly (TOP is a constant).
template <int TOP, typename Load>
__device__ __forceinline__ void top_levels(float (&v)[8], int c, Load load) {
  float w[1 << TOP][8];
#pragma unroll
  for (int m = 0; m < (1 << TOP); ++m) load(m, w[m]);
#pragma unroll
  for (int k = 0; k < TOP; ++k) {
    const bool upper = (c >> k) & 1;
#pragma unroll
    for (int m = 0; m < (1 << TOP); m += 2 << k) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a = w[m][e], b = w[m + (1 << k)][e];
        w[m][e] = upper ? a - b : a + b;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = w[0][e];
}

// top_levels for a runtime top <= TOP_MAX (uniform per CTA). TOP_MAX is the launch's largest top: the
// kernel's registers are those of its largest case (8 chunks of 8 points at TOP_MAX = 3).
template <int TOP_MAX, typename Load>
__device__ __forceinline__ void top_levels_upto(float (&v)[8], int top, int c, Load load) {
  if (top == 0) top_levels<0>(v, c, load);
  if constexpr (TOP_MAX >= 1) if (top == 1) top_levels<1>(v, c, load);
  if constexpr (TOP_MAX >= 2) if (top == 2) top_levels<2>(v, c, load);
  if constexpr (TOP_MAX >= 3) if (top == 3) top_levels<3>(v, c, load);
}

// One CTA per (row, block) applies every level of its block. Large blocks get more threads (H200, 256
// threads: 5.9 us for 4096 points, 9.7 for 14336 = 8192 + 4096 + 2048, against 9.4 us for a whole
// 4096x4096 2-bpw matmul). Which thread applies a butterfly does not change its inputs or its order, so
// every thread count gives bit-identical results. Used where fwht_fast_kernel does not apply (blocks of
// fewer than 8 points, data not 16-byte aligned).
template <typename T, int NT>
__global__ void __launch_bounds__(NT) fwht_kernel(const HadamardParams p) {
  extern __shared__ float buf[];
  pdl_launch_next();
  pdl_wait();  // x may be the previous kernel's output
  const int row = blockIdx.x;
  const int seg = blockIdx.y;
  const int start = p.seg_start[seg];
  const int lg = p.seg_log2[seg];
  const int n = 1 << lg;
  const int top = p.seg_top[seg];
  const int nl = n >> top;  // a chunk: the low levels stay inside one
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride + start;
  T* z = static_cast<T*>(p.z) + row * p.z_stride + start;
  const float* sg = p.signs ? p.signs + start : nullptr;
  const float* so = p.out_signs ? p.out_signs + start : nullptr;

  auto level = [&](int h, int lh) {  // pairs (i, i + h), one pass through shared memory
    for (int q = threadIdx.x; q < n / 2; q += NT) {
      const int i = ((q >> lh) << (lh + 1)) | (q & (h - 1));
      const float a = buf[i], b = buf[i + h];
      buf[i] = a + b;
      buf[i + h] = a - b;
    }
    __syncthreads();
  };
  int h0 = 1;
  if (n >= 8 && top == 0) {  // levels 0..2 in registers as the points load
    for (int q = threadIdx.x; q < n / 8; q += NT) {
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = load_as_float(x + 8 * q + e);
        if (sg) v[e] *= sg[8 * q + e];
      }
      group_levels<8>(v, 3);
#pragma unroll
      for (int e = 0; e < 8; ++e) buf[8 * q + e] = v[e];
    }
    h0 = 8;
    __syncthreads();
  } else {
    for (int i = threadIdx.x; i < n; i += NT)
      buf[i] = load_as_float(x + i) * (sg ? sg[i] : 1.f);
    __syncthreads();
    if (top > 0) {  // the top levels first (blocks of more than 256 points: nl >= 8), then 0..2 in registers
      for (int lh = lg - top; lh < lg; ++lh) level(1 << lh, lh);
      for (int q = threadIdx.x; q < n / 8; q += NT) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = buf[8 * q + e];
        group_levels<8>(v, 3);
#pragma unroll
        for (int e = 0; e < 8; ++e) buf[8 * q + e] = v[e];
      }
      h0 = 8;
      __syncthreads();
    }
  }
  for (int h = h0, lh = (h0 == 8 ? 3 : 0); h < nl; h *= 2, ++lh) level(h, lh);
  const float scale = rsqrtf(static_cast<float>(n));
  for (int i = threadIdx.x; i < n; i += NT) {
    float v = buf[i] * scale;
    if (so) v *= so[i];
    z[i] = store_from_float<T>(v);
  }
}

// The FWHT kernel instantiation for dtype (DType, or 2 for float32).
const void* by_dtype(int dtype, const void* f16, const void* bf16, const void* f32) {
  return dtype == kFloat16 ? f16 : dtype == kBFloat16 ? bf16 : f32;
}

template <int NT>
const void* fwht_kernel_of(int dtype) {
  return by_dtype(dtype, reinterpret_cast<const void*>(&fwht_kernel<__half, NT>),
                  reinterpret_cast<const void*>(&fwht_kernel<__nv_bfloat16, NT>),
                  reinterpret_cast<const void*>(&fwht_kernel<float, NT>));
}

const void* fwht_kernel_for(int dtype, int threads) {
  return threads == 1024  ? fwht_kernel_of<1024>(dtype)
         : threads == 512 ? fwht_kernel_of<512>(dtype)
                          : fwht_kernel_of<256>(dtype);
}

// ---------------------------------------------------------------------------------------------
// FWHT with registers, shuffles and up to two shared-memory exchanges (fwht_fast_kernel): every aligned
// block of 8..32768 points.
//
// Why: fwht_kernel spends a barrier and a shared-memory round trip per level (9 for 4096 points), and
// at batch 1 its one CTA per block is pure latency (H200: 5.6 us for 4096 points, 8.5 for 14336).
// Here a CTA of n/8 threads per (row, chunk of at most 2^12 points: blocks above 2^cta_log2 points are
// split, see top_levels) keeps the levels in registers and shuffles: index bits [0, 3) of a point are a
// thread's registers (phase A), the next 5 its lane (5 levels by warp shuffles), the next 3 registers
// again after one exchange through shared memory (phase B: a thread takes 8/g columns of g points 256
// apart), the last one after a second (phase C, chunks of 4096 points).
// A layout tried earlier with 32 points per lane and one CTA per *row* was slower than fwht_kernel
// (4096 points: 8.5 against 5.6 us): too many dependent instructions per warp; here a chunk of 4096
// points still gets 512 threads. 16 points per thread for unsplit 16384-point blocks was 11.1 us.
// Numerics are fwht_kernel's exactly (same butterflies in the same order; a shuffle partner computes
// a - b as partner - own), so results are bit for bit the same.
constexpr int kFastMaxChunkLog2 = 12;  // 512 threads
constexpr int kFwhtCtaLog2 = 11;       // default: blocks above 2048 points are split

template <typename T>
__device__ __forceinline__ void load8f(const T* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = load_as_float(h + e);
}

template <>
__device__ __forceinline__ void load8f<float>(const float* p, float* v) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <typename T, int TOP_MAX>
__global__ void __launch_bounds__(1 << (kFastMaxChunkLog2 - 3)) fwht_fast_kernel(const HadamardParams p) {
  extern __shared__ float buf[];
  constexpr int P = 8;    // points per thread
  constexpr int LB = 8;   // first bit of phase B
  constexpr int LC = 11;  // first bit of phase C
  pdl_launch_next();
  pdl_wait();  // x may be the previous kernel's output
  // blockIdx.y: the launch's chunks, block after block. (A table of chunks in the parameters instead of
  // this search, ~1 KB more of them, timed slower on the small-layer linears: H100, separate calls, the
  // full 576x1536 2-bpw linear 8.5 -> 8.9 us.)
  int seg = blockIdx.y, c = 0;
  if constexpr (TOP_MAX > 0) {  // else no block is split: CTA y is block y
    seg = 0;
    c = blockIdx.y;
    while (c >= (1 << p.seg_top[seg])) c -= 1 << p.seg_top[seg++];
  }
  const int start = p.seg_start[seg];
  const int top = p.seg_top[seg];
  const int lg = p.seg_log2[seg] - top;  // this CTA's chunk
  const int n = 1 << lg;
  const int tpts = n / P;  // threads holding points
  const int t = threadIdx.x;
  const int lane = t % 32;
  const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.x_stride + start;  // every chunk of the block
  T* z = static_cast<T*>(p.z) + blockIdx.x * p.z_stride + start + c * n;
  const float* sg = p.signs ? p.signs + start : nullptr;
  const float* so = p.out_signs ? p.out_signs + start + c * n : nullptr;
  const float scale = rsqrtf(static_cast<float>(n << top));
  auto finish = [&](float v, int i) {  // fwht_kernel's epilogue for point i of the chunk
    v *= scale;
    if (so) v *= so[i];
    z[i] = store_from_float<T>(v);
  };

  // phase A: 8 consecutive points per thread (bits 0..2), then lanes (the next 5 bits)
  float v[P];
  const bool active = t < tpts;
  if (active) {
    top_levels_upto<TOP_MAX>(v, top, c, [&](int m, float (&w)[8]) {
      load8f<T>(x + m * n + P * t, w);
      if (sg) {
        float s8[8];
        load8f<float>(sg + m * n + P * t, s8);
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] *= s8[e];
      }
    });
  } else {
#pragma unroll
    for (int e = 0; e < P; ++e) v[e] = 0.f;
  }
  group_levels<P>(v, 3);
  if (t < ((tpts + 31) & ~31)) {  // warps holding points (all lanes shuffle; idle lanes hold zeros)
#pragma unroll
    for (int k = 1; k < 32; k *= 2) {
      if (k < tpts) {
#pragma unroll
        for (int e = 0; e < P; ++e) {
          const float other = __shfl_xor_sync(0xffffffffu, v[e], k);
          v[e] = (lane & k) ? other - v[e] : v[e] + other;
        }
      }
    }
  }
  if (lg <= LB) {  // done: no exchange needed (uniform per CTA)
    if (active) {
#pragma unroll
      for (int e = 0; e < P; ++e) finish(v[e], P * t + e);
    }
    return;
  }
  if (active) {
#pragma unroll
    for (int e = 0; e < P; e += 4)
      *reinterpret_cast<float4*>(buf + P * t + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  }
  __syncthreads();
  // phase B: bits LB..LB+2; group a of this thread is column (a * tpts + t) % 2^LB, part / 2^LB
  const int mb = min(lg - LB, 3);
  const int gb = 1 << mb;
  auto idx_b = [&](int e) {
    const int grp = (e / gb) * tpts + t;
    return (grp & ((1 << LB) - 1)) + (1 << LB) * ((e % gb) + gb * (grp >> LB));
  };
  if (active) {
#pragma unroll
    for (int e = 0; e < P; ++e) v[e] = buf[idx_b(e)];
    group_levels<P>(v, mb);
  }
  if (lg <= LC) {
    if (active) {
#pragma unroll
      for (int e = 0; e < P; ++e) finish(v[e], idx_b(e));
    }
    return;
  }
  if (active) {  // back to the points this thread read (no other thread touches them)
#pragma unroll
    for (int e = 0; e < P; ++e) buf[idx_b(e)] = v[e];
  }
  __syncthreads();
  // phase C: bits LC..lg-1; group a of this thread is column a * tpts + t of 2^LC, g points
  const int mc = lg - LC;
  const int gc = 1 << mc;
  auto idx_c = [&](int e) { return (e / gc) * tpts + t + (1 << LC) * (e % gc); };
  if (active) {
#pragma unroll
    for (int e = 0; e < P; ++e) v[e] = buf[idx_c(e)];
    group_levels<P>(v, mc);
#pragma unroll
    for (int e = 0; e < P; ++e) finish(v[e], idx_c(e));
  }
}

// The largest block that stays in one CTA: GLQ_KERNELS_FWHT_CTA_LOG2 (8..12, for measurements and
// tests; anything else is ignored), else kFwhtCtaLog2, at every row count (H100, us, 2^11 against 2^12 for
// 4096 / 14336 / 28672 points: batch 1 3.0 / 3.4 / 3.7 against 4.0 / 4.2 / 4.6, batch 64 3.8 / 6.9 / 12.8
// against 4.6 / 7.2 / 13.1; 16384 at batch 64 9.2 against 8.3). Read on every call, so a test can change it.
int fwht_cta_log2() {
  const char* env = std::getenv("GLQ_KERNELS_FWHT_CTA_LOG2");
  if (env && env[0]) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end == 0 && v >= 8 && v <= kFastMaxChunkLog2) return static_cast<int>(v);
  }
  return kFwhtCtaLog2;
}

// Threads of fwht_fast_kernel for these blocks (p.seg_top set), or 0 where it does not apply (a block
// of fewer than 8 points, or data not 16-byte aligned).
int fwht_fast_threads(const HadamardParams& p) {
  const int esize = p.dtype == 2 ? 4 : 2;
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  if (!aligned(p.x) || !aligned(p.z) || !aligned(p.signs) || !aligned(p.out_signs)) return 0;
  if ((p.x_stride * esize) % 16 != 0 || (p.z_stride * esize) % 16 != 0) return 0;
  int max_log = 0;
  for (int s = 0; s < p.nseg; ++s) {
    if (p.seg_log2[s] < 3 || p.seg_start[s] % 8 != 0) return 0;
    max_log = std::max(max_log, p.seg_log2[s] - p.seg_top[s]);
  }
  return std::max(32, (1 << max_log) / 8);
}

}  // namespace

template <int TOP_MAX>
const void* fwht_fast_kernel_of(int dtype) {
  return by_dtype(dtype, reinterpret_cast<const void*>(&fwht_fast_kernel<__half, TOP_MAX>),
                  reinterpret_cast<const void*>(&fwht_fast_kernel<__nv_bfloat16, TOP_MAX>),
                  reinterpret_cast<const void*>(&fwht_fast_kernel<float, TOP_MAX>));
}

const void* fwht_fast_kernel_for(int dtype, int top_max) {
  return top_max == 0   ? fwht_fast_kernel_of<0>(dtype)
         : top_max == 1 ? fwht_fast_kernel_of<1>(dtype)
         : top_max == 2 ? fwht_fast_kernel_of<2>(dtype)
                        : fwht_fast_kernel_of<3>(dtype);
}

// FWHTs are programmatic launches only on grids of at most 4 CTAs: H200, full 4096x14336 linear, FWHT
// launched that way or not: batch 1 22.8 / 23.4 us, batch 8 32.0 / 26.1, batch 16 43.9 / 36.8
// (scripts/pdl_probe.py; why larger grids lose was not found). Counted in CTAs since blocks split: H100,
// 14336x4096 at batch 1, whose output transform is 7 CTAs, 24.2 us with it programmatic, 21.0 without.
static bool fwht_pdl(int ctas) { return ctas <= 4; }

int hadamard_run(const HadamardParams& params, cudaStream_t stream) {
  HadamardParams p = params;
  if (p.nseg < 1 || p.nseg > kMaxHadamardSegments || p.rows < 1) return cudaErrorInvalidValue;
  const int cta_log2 = fwht_cta_log2();
  int max_log = 0, chunks = 0, top_max = 0;
  for (int s = 0; s < p.nseg; ++s) {
    if (p.seg_log2[s] < 0 || p.seg_log2[s] > kMaxHadamardLog2) return cudaErrorInvalidValue;
    max_log = std::max(max_log, p.seg_log2[s]);
    p.seg_top[s] = std::min(kMaxTopLevels, std::max(0, p.seg_log2[s] - cta_log2));
    top_max = std::max(top_max, p.seg_top[s]);
    chunks += 1 << p.seg_top[s];
  }
  const int n = 1 << max_log;
  // fwht_fast_kernel where it applies (a CTA per chunk), else fwht_kernel (a CTA per block) with about 4
  // points per thread for the largest block (2 butterflies per level), 256..1024 threads
  const int fast_threads = fwht_fast_threads(p);
  const void* fn;
  int threads, smem;
  dim3 grid(p.rows, p.nseg);
  if (fast_threads > 0) {
    fn = fwht_fast_kernel_for(p.dtype, top_max);
    threads = fast_threads;
    grid.y = chunks;
    // the largest chunk's points; chunks of <= 256 points (32 threads) never leave registers
    smem = fast_threads > 32 ? static_cast<int>(sizeof(float)) * 8 * fast_threads : 0;
  } else {
    threads = n >= 4096 ? 1024 : n >= 2048 ? 512 : 256;
    fn = fwht_kernel_for(p.dtype, threads);
    smem = static_cast<int>(sizeof(float)) * n;
  }
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  {
    std::lock_guard<std::mutex> lock(g_launch_mu);
    err = allow_smem(fn, smem, device);
  }
  if (err != cudaSuccess) return err;
  void* args[] = {&p};
  err = launch_kernel(fn, grid, dim3(threads), args, static_cast<size_t>(smem), stream, "fwht",
                      fwht_pdl(static_cast<int>(grid.x * grid.y)));
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace glq
