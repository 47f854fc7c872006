// Torch-free interface of the GLQ CUDA kernels (raw pointers and a cudaStream_t), shared by
// glq_kernels.cu and the torch binding. Keeping torch out of the .cu makes it compile in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace glq {

constexpr int kMaxStages = 4;
constexpr int kMaxHadamardSegments = 16;
constexpr int kMaxHadamardLog2 = 15;  // 32768 floats = 128 KiB of shared memory

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Matmul kernels: kKernelAuto picks the small-batch kernel for B <= 8 (falling back to the MMA
// kernel if it cannot be planned), the MMA kernel otherwise. kKernelBatched (register-tiled,
// batch 1..64, rates 2..4) and kKernelGemvRt (the small-batch kernel with (slice, row tile) steps,
// rates 2..4) run only when asked for (ops.py asks for them at batches 9..64 and on small layers).
enum MatmulKernel : int { kKernelAuto = 0, kKernelMma = 1, kKernelGemv = 2, kKernelBatched = 3, kKernelGemvRt = 4 };
// variant | kKernelPrefer: that kernel where it can be planned (shared memory, occupancy), else what
// kKernelAuto plans, without an error. Callers rely on this rather than on catching a C++ exception,
// which some environments cannot unwind (see notes/kernels.md).
constexpr int kKernelPrefer = 16;
// variant | kTiledCodes: the codes are in the tiled layout (glq.kernels.layout.tile_codes; needs M % 16 == 0 and
// K % 128 == 0): every stage permuted to [16-row tile][16-group slice][lane][h][i], so a slice kernel's lane reads
// its 8 codes of a step with one 16-byte load and a warp's loads are 512 contiguous bytes. Every matmul kernel
// reads it (the slice kernels natively, the MMA kernel with a register shuffle), and so does dequantize_run
// (DequantParams::tiled).
constexpr int kTiledCodes = 32;

// How one matmul launch is split; computed by matmul_plan, used by the binding to size buffers.
struct MatmulPlan {
  int rows_per_cta;  // rows of W one CTA handles per work item
  int row_blocks;    // ceil(M / rows_per_cta)
  int ksplit;        // K-splits (1: no workspace)
  int grid;          // persistent CTAs
  int rep;           // table copies in shared memory (1, 2, 4 or 8)
  int smem_bytes;    // dynamic shared memory per CTA
  int kernel;        // MatmulKernel actually planned (not kKernelAuto)
  int cluster = 0;   // 1: the ksplit CTAs of a row block form a thread-block cluster and add their
                     // partial sums through distributed shared memory (no workspace, no counters)
  int tiled = 0;     // 1: codes in the tiled layout (kTiledCodes)
  int warps = 0;     // warps per CTA of the small-batch kernel (16, or 8 at rates 2-3); 0 for the others
};

struct MatmulParams {
  // pointers
  const void* x;                    // (B, K) fp16/bf16, row stride x_stride elements
  const void* codes[kMaxStages];    // stage s: (M, K/8) int16 (16-bit) or uint8 (8-bit), contiguous
  const void* tables;               // (S, 512, 8) in x's dtype, packed (see glq.kernels._tables)
  const float* row_scale;           // (M,)
  void* y;                          // (B, M) in x's dtype, row stride y_stride elements
  float* workspace;                 // (ksplit, B, M) fp32 partial sums, if ksplit > 1
  int* counters;                    // (row_blocks,) zero on entry, left zero on exit
  // sizes
  int B, M, K;
  int rate;                         // bits per weight, 2..8
  int dtype;                        // DType
  // strides (elements)
  long long x_stride, y_stride;
  float gain;
};

struct HadamardParams {
  const void* x;       // (rows, N) fp16/bf16/fp32 per dtype, row stride x_stride
  void* z;             // (rows, N), row stride z_stride
  const float* signs;      // (N,) or null: applied before the transform
  const float* out_signs;  // (N,) or null: applied after the transform
  int rows, N, dtype;  // dtype: DType, or 2 for float32
  long long x_stride, z_stride;
  int nseg;
  int seg_start[kMaxHadamardSegments];
  int seg_log2[kMaxHadamardSegments];
  int seg_top[kMaxHadamardSegments];  // set by hadamard_run: blocks split over 2^seg_top CTAs
};

// Dense decode for large batches (the caller then runs cuBLAS on the result): out (M, K) =
// dequantize_reference(codes, tables, row_scale) rounded once to `dtype`.
struct DequantParams {
  const void* codes[kMaxStages];  // as MatmulParams::codes
  const float* tables;            // (S, 512, 8) float32, packed (not rounded to the output dtype)
  const float* row_scale;         // (M,)
  void* out;                      // (M, K) contiguous, `dtype`
  int M, K;
  int rate;   // 2..8
  int dtype;  // DType, or 2 for float32
  float gain;
  int tiled;  // 1: codes in the tiled layout (kTiledCodes)
};

// All return a cudaError_t (cudaSuccess == 0).
// variant: MatmulKernel. rep > 0 (table copies of the MMA kernel) implies the MMA kernel in auto; with
// variant kKernelGemv at rates 4-8 or kKernelBatched at rate 4, rep 4 or 8 picks that kernel's table
// copies (else its own rule).
int matmul_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device,
                int variant, MatmulPlan* plan);
int matmul_run(const MatmulParams& p, const MatmulPlan& plan, cudaStream_t stream);
int hadamard_run(const HadamardParams& p, cudaStream_t stream);
int dequantize_run(const DequantParams& p, int device, cudaStream_t stream);
#ifdef GLQ_TRACE
// Developer build only (GLQ_KERNELS_TRACE=1): v4 CTAs record their timeline into buf (slots x
// kTraceWords uint64; see glq_kernels.cu); buf = nullptr stops it.
int trace_set(void* buf, int slots);
#endif

}  // namespace glq
