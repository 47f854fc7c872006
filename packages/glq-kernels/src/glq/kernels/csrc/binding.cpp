// Torch binding of the GLQ CUDA kernels: validates, allocates, launches. Uses torch/library.h
// (TORCH_LIBRARY) rather than torch/extension.h so the build stays small; the kernels themselves
// live in the torch-free glq_kernels.cu.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <unordered_map>

#include "glq_kernels.h"

namespace {

int dtype_code(at::ScalarType t) {
  if (t == at::kHalf) return glq::kFloat16;
  if (t == at::kBFloat16) return glq::kBFloat16;
  if (t == at::kFloat) return 2;
  return -1;
}

int dtype_code(const at::Tensor& t) { return dtype_code(t.scalar_type()); }

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "glq_cuda: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Split-K arrival counters: zeroed once per (device, stream), and every launch leaves them zero
// again. Launches on one stream run in order, so they can share a buffer; two streams running
// split-K launches at the same time (or a CUDA graph captured on one stream and replayed beside
// eager calls on another) must not, so each stream gets its own.
int* counters_for(const at::Tensor& like, int64_t n, const c10::cuda::CUDAStream& stream) {
  static std::mutex mu;
  static std::map<std::pair<int, c10::StreamId>, at::Tensor> bufs;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(static_cast<int>(like.get_device()), stream.id());
  auto it = bufs.find(key);
  if (it == bufs.end() || it->second.numel() < n) {
    const int64_t size = std::max<int64_t>(n, 4096);
    bufs[key] = at::zeros({size}, like.options().dtype(at::kInt));
    it = bufs.find(key);
  }
  return it->second.data_ptr<int>();
}

at::Tensor matmul(const at::Tensor& x, at::TensorList codes, const at::Tensor& tables,
                  const at::Tensor& row_scale, int64_t rate, double gain, int64_t rep,
                  int64_t ksplit, int64_t variant) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "glq_cuda.matmul: expected a 2-D CUDA x");
  const int dt = dtype_code(x);
  TORCH_CHECK(dt == glq::kFloat16 || dt == glq::kBFloat16,
              "glq_cuda.matmul: expected x float16 or bfloat16 rather than ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0, "glq_cuda.matmul: x rows must be contiguous and 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "glq_cuda.matmul: x must be 16-byte aligned");
  TORCH_CHECK(tables.scalar_type() == x.scalar_type() && tables.is_contiguous(),
              "glq_cuda.matmul: tables must be contiguous in x's dtype");
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous(),
              "glq_cuda.matmul: row_scale must be contiguous float32");
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t M = codes[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(codes.size()) <= glq::kMaxStages, "glq_cuda.matmul: too many stages");
  const int nst = static_cast<int>(codes.size());
  for (int s = 0; s < nst; ++s) {
    const bool last8 = (rate % 2 == 1) && s == nst - 1;
    TORCH_CHECK(codes[s].is_contiguous() && codes[s].size(0) == M && codes[s].size(1) * 8 == K,
                "glq_cuda.matmul: codes[", s, "] must be contiguous (", M, ", ", K / 8, ")");
    TORCH_CHECK(codes[s].scalar_type() == (last8 ? at::kByte : at::kShort),
                "glq_cuda.matmul: codes[", s, "] has the wrong dtype");
  }
  TORCH_CHECK(!(variant & glq::kTiledCodes) || (M % 16 == 0 && K % 128 == 0),
              "glq_cuda.matmul: tiled codes need out_features % 16 == 0 and in_features % 128 == 0, not (", M, ", ",
              K, ")");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({B, M}, x.options());
  if (B == 0 || M == 0) return y;
  glq::MatmulPlan plan;
  check_cuda(glq::matmul_plan(static_cast<int>(B), static_cast<int>(M), static_cast<int>(K),
                              static_cast<int>(rate), dt, static_cast<int>(rep),
                              static_cast<int>(ksplit), x.get_device(), static_cast<int>(variant),
                              &plan),
             "matmul_plan");
  glq::MatmulParams p{};
  p.x = x.data_ptr();
  for (int s = 0; s < nst; ++s) p.codes[s] = codes[s].data_ptr();
  p.tables = tables.data_ptr();
  p.row_scale = row_scale.data_ptr<float>();
  p.y = y.data_ptr();
  at::Tensor ws;
  if (plan.ksplit > 1 && !plan.cluster) {
    ws = at::empty({plan.ksplit, B, M}, x.options().dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
    p.counters = counters_for(x, plan.row_blocks, c10::cuda::getCurrentCUDAStream(x.get_device()));
  }
  p.B = static_cast<int>(B);
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.rate = static_cast<int>(rate);
  p.dtype = dt;
  p.x_stride = x.stride(0);
  p.y_stride = y.stride(0);
  p.gain = static_cast<float>(gain);
  check_cuda(glq::matmul_run(p, plan, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
             "matmul launch");
  return y;
}

std::vector<int64_t> matmul_plan_info(int64_t B, int64_t M, int64_t K, int64_t rate,
                                      int64_t dtype, int64_t rep, int64_t ksplit, int64_t device,
                                      int64_t variant) {
  glq::MatmulPlan plan;
  check_cuda(glq::matmul_plan(B, M, K, rate, dtype, rep, ksplit, device, variant, &plan), "matmul_plan");
  return {plan.rows_per_cta, plan.row_blocks, plan.ksplit, plan.grid, plan.rep, plan.smem_bytes, plan.kernel,
          plan.cluster, plan.warps};
}

at::Tensor hadamard(const at::Tensor& x, at::IntArrayRef seg_log2,
                    const c10::optional<at::Tensor>& signs,
                    const c10::optional<at::Tensor>& out_signs) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1,
              "glq_cuda.hadamard: expected a 2-D CUDA x with contiguous rows");
  const int dt = dtype_code(x);
  TORCH_CHECK(dt >= 0, "glq_cuda.hadamard: expected float16, bfloat16 or float32 rather than ",
              x.scalar_type());
  TORCH_CHECK(static_cast<int>(seg_log2.size()) <= glq::kMaxHadamardSegments,
              "glq_cuda.hadamard: at most ", glq::kMaxHadamardSegments, " blocks");
  c10::cuda::CUDAGuard guard(x.device());
  auto z = at::empty(x.sizes(), x.options());
  glq::HadamardParams p{};
  p.x = x.data_ptr();
  p.z = z.data_ptr();
  for (const auto* sg : {&signs, &out_signs}) {
    if (sg->has_value()) {
      TORCH_CHECK((*sg)->scalar_type() == at::kFloat && (*sg)->is_contiguous() &&
                      (*sg)->numel() == x.size(1) && (*sg)->is_cuda(),
                  "glq_cuda.hadamard: signs must be contiguous float32 (N,) on x's device");
    }
  }
  p.signs = signs.has_value() ? signs->data_ptr<float>() : nullptr;
  p.out_signs = out_signs.has_value() ? out_signs->data_ptr<float>() : nullptr;
  p.rows = static_cast<int>(x.size(0));
  p.N = static_cast<int>(x.size(1));
  p.dtype = dt;
  p.x_stride = x.stride(0);
  p.z_stride = z.stride(0);
  p.nseg = static_cast<int>(seg_log2.size());
  int start = 0;
  for (int s = 0; s < p.nseg; ++s) {
    p.seg_start[s] = start;
    p.seg_log2[s] = static_cast<int>(seg_log2[s]);
    start += 1 << seg_log2[s];
  }
  TORCH_CHECK(start == p.N, "glq_cuda.hadamard: blocks cover ", start, " of ", p.N, " columns");
  if (p.rows == 0) return z;
  check_cuda(glq::hadamard_run(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
             "hadamard launch");
  return z;
}

// Dense W (M, K) in `dtype` (float16, bfloat16 or float32) decoded from float32 packed tables:
// dequantize_reference(...) rounded once to dtype (see glq_dequantize_kernel).
at::Tensor dequantize(at::TensorList codes, const at::Tensor& tables, const at::Tensor& row_scale,
                      int64_t rate, double gain, at::ScalarType dtype, bool tiled) {
  TORCH_CHECK(!codes.empty() && static_cast<int64_t>(codes.size()) <= glq::kMaxStages,
              "glq_cuda.dequantize: expected 1..", glq::kMaxStages, " code tensors");
  const int nst = static_cast<int>(codes.size());
  TORCH_CHECK(rate >= 2 && rate <= 8 && nst == (rate + 1) / 2,
              "glq_cuda.dequantize: ", nst, " code tensors do not form rate ", rate);
  TORCH_CHECK(codes[0].is_cuda() && codes[0].dim() == 2, "glq_cuda.dequantize: expected 2-D CUDA codes");
  const int64_t M = codes[0].size(0), G = codes[0].size(1);
  for (int s = 0; s < nst; ++s) {
    const bool last8 = (rate % 2 == 1) && s == nst - 1;
    TORCH_CHECK(codes[s].is_contiguous() && codes[s].device() == codes[0].device() && codes[s].dim() == 2 &&
                    codes[s].size(0) == M && codes[s].size(1) == G,
                "glq_cuda.dequantize: codes[", s, "] must be contiguous (", M, ", ", G, ") on ", codes[0].device());
    TORCH_CHECK(codes[s].scalar_type() == (last8 ? at::kByte : at::kShort),
                "glq_cuda.dequantize: codes[", s, "] has the wrong dtype");
  }
  TORCH_CHECK(tables.scalar_type() == at::kFloat && tables.is_contiguous() && tables.dim() == 3 &&
                  tables.size(0) == nst && tables.size(1) == 512 && tables.size(2) == 8 &&
                  tables.device() == codes[0].device(),
              "glq_cuda.dequantize: tables must be contiguous float32 (", nst, ", 512, 8) on the codes' device");
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous() && row_scale.numel() == M &&
                  row_scale.device() == codes[0].device(),
              "glq_cuda.dequantize: row_scale must be contiguous float32 (", M, ",) on the codes' device");
  const int dt = dtype_code(dtype);
  TORCH_CHECK(dt >= 0, "glq_cuda.dequantize: expected dtype float16, bfloat16 or float32 rather than ", dtype);
  TORCH_CHECK(M * G < (int64_t{1} << 31), "glq_cuda.dequantize: more than 2^31 code groups");
  TORCH_CHECK(!tiled || (M % 16 == 0 && G % 16 == 0),
              "glq_cuda.dequantize: tiled codes need out_features % 16 == 0 and in_features % 128 == 0, not (", M,
              ", ", G * 8, ")");
  c10::cuda::CUDAGuard guard(codes[0].device());
  auto out = at::empty({M, G * 8}, codes[0].options().dtype(dtype));
  if (M == 0 || G == 0) return out;
  glq::DequantParams p{};
  for (int s = 0; s < nst; ++s) p.codes[s] = codes[s].data_ptr();
  p.tables = tables.data_ptr<float>();
  p.row_scale = row_scale.data_ptr<float>();
  p.out = out.data_ptr();
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(G * 8);
  p.rate = static_cast<int>(rate);
  p.dtype = dt;
  p.gain = static_cast<float>(gain);  // torch rounds a Python-float factor to float32 the same way
  p.tiled = tiled ? 1 : 0;
  check_cuda(glq::dequantize_run(p, codes[0].get_device(),
                                 c10::cuda::getCurrentCUDAStream(codes[0].get_device()).stream()),
             "dequantize launch");
  return out;
}

#ifdef GLQ_TRACE
// Developer build only (GLQ_KERNELS_TRACE=1, scripts/trace_probe.py): buf (int64, CUDA) receives
// the v4 CTAs' timelines from now on, `slots` of them; slots = 0 stops recording.
void trace_set(const at::Tensor& buf, int64_t slots) {
  TORCH_CHECK(buf.is_cuda() && buf.scalar_type() == at::kLong && buf.is_contiguous(),
              "glq_cuda.trace_set: expected a contiguous int64 CUDA buffer");
  check_cuda(glq::trace_set(slots > 0 ? buf.data_ptr() : nullptr, static_cast<int>(slots)), "trace_set");
}
#endif

}  // namespace

TORCH_LIBRARY(glq_cuda, m) {
  // variant: 0 auto (small-batch kernel for B <= 8, else MMA), 1 MMA kernel, 2 small-batch kernel,
  // 3 register-tiled batched kernel (B <= 64, rates 2..4), 4 small-batch kernel with row-tile steps
  // (B <= 8); auto never picks 3 or 4. Plus 16 (kKernelPrefer): that kernel if it can be
  // planned, else auto's choice (ops.py asks for 3 and 4 that way). Plus 32 (kTiledCodes): the codes are in the
  // tiled layout (glq.kernels.layout.tile_codes); every kernel reads it.
  m.def("matmul(Tensor x, Tensor[] codes, Tensor tables, Tensor row_scale, int rate, float gain, int rep, int ksplit, int variant=0) -> Tensor");
  m.def("hadamard(Tensor x, int[] seg_log2, Tensor? signs, Tensor? out_signs) -> Tensor");
  m.def("matmul_plan(int B, int M, int K, int rate, int dtype, int rep, int ksplit, int device, int variant=0) -> int[]",
        &matmul_plan_info);
  // dense W (out, in) in dtype: the float32 reference decode rounded once (large-batch path)
  m.def("dequantize(Tensor[] codes, Tensor tables, Tensor row_scale, int rate, float gain, ScalarType dtype, bool tiled=False) -> Tensor");
#ifdef GLQ_TRACE
  m.def("trace_set(Tensor buf, int slots) -> ()", &trace_set);
#endif
}

TORCH_LIBRARY_IMPL(glq_cuda, CUDA, m) {
  m.impl("matmul", &matmul);
  m.impl("hadamard", &hadamard);
  m.impl("dequantize", &dequantize);
}
