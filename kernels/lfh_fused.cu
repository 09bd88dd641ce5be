// Fused LFH update: the gradients of one backward (a list of (B, ...) tensors, fp32/fp16/bf16/fp64, any
// shapes) -> per-sample sums of squares -> each interest tensor's Welford (count, mean, M2) and converged flag,
// in one launch and with no host sync. The PyTorch reference with the same contract, and the oracle of the
// tests, is kernels/lfh_reduce.py: fused_update_reference_.
//
// Layout: the host packs one descriptor per gradient (pointer, elements per sample, dtype, stats row, first
// block). Block i finds its gradient by binary search over the first blocks and reduces one chunk of one
// sample into partial[i]. The block that finishes a gradient last (threadfence + done counter) sums each
// sample's chunks in a fixed order (so results do not depend on block scheduling) and merges the B values
// into the stats row (Chan et al.), in float64.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: a fraction of the headers, compiles in seconds

#include <climits>
#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;                       // elements per thread per chunk
constexpr int64_t kChunk = kThreads * kItems;   // elements of one sample reduced by one block

enum DTypeCode : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct Desc {
  int64_t ptr;          // data of the contiguous gradient
  int64_t per_sample;   // elements per sample (0: a tensor the backward never reached, its values are 0)
  int64_t first_block;  // prefix sum of the blocks of the gradients before this one
  int64_t chunks;       // blocks per sample (>= 1)
  int32_t dtype;        // DTypeCode
  int32_t row;          // stats row
};

// Squares accumulate in fp32 per thread (as sumsq_per_sample does) and in fp64 across threads and chunks.
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename T>
__device__ double chunk_sumsq(const T* __restrict__ p, int64_t n) {
  decltype(widen(T())) acc = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = static_cast<int64_t>(k) * kThreads + threadIdx.x;
    if (i < n) {
      const auto v = widen(p[i]);
      acc += v * v;
    }
  }
  return static_cast<double>(acc);
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0. Every thread must call it (it syncs twice).
__device__ double block_sum(double v, double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? smem[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ int find_tensor(const Desc* __restrict__ desc, int n_tensors, int64_t block) {
  int lo = 0, hi = n_tensors - 1;  // the last tensor whose first block is <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (desc[mid].first_block <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ double sumsq_of_block(const Desc& d, int64_t local) {
  const int64_t sample = local / d.chunks, chunk = local % d.chunks;
  const int64_t begin = chunk * kChunk;
  const int64_t n = d.per_sample - begin < kChunk ? d.per_sample - begin : kChunk;  // <= 0: nothing to read
  const int64_t off = sample * d.per_sample + begin;
  switch (d.dtype) {
    case kF16: return chunk_sumsq(reinterpret_cast<const __half*>(d.ptr) + off, n);
    case kBF16: return chunk_sumsq(reinterpret_cast<const __nv_bfloat16*>(d.ptr) + off, n);
    case kF64: return chunk_sumsq(reinterpret_cast<const double*>(d.ptr) + off, n);
    default: return chunk_sumsq(reinterpret_cast<const float*>(d.ptr) + off, n);
  }
}

struct Stats {
  double* count;
  double* mean;
  double* m2;
  double* moved;
  bool* converged;
  double min_count;
  double rel_tol;
};

// Run by the last block of a gradient: part holds its batch * chunks partial sums, sample-major.
__device__ void welford_merge(const Desc& d, int64_t batch, double* part, const Stats& s, double* smem) {
  __shared__ double batch_mean;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t b = warp; b < batch; b += kWarps) {  // one warp per sample, chunks in a fixed order
    double v = 0.0;
    for (int64_t c = lane; c < d.chunks; c += 32) v += __ldcg(part + b * d.chunks + c);
    v = warp_sum(v);
    if (lane == 0) part[b * d.chunks] = static_cast<double>(static_cast<float>(v));  // fp32 values, as the reference
  }
  __syncthreads();
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) acc += __ldcg(part + b * d.chunks);
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) batch_mean = acc / static_cast<double>(batch);
  __syncthreads();
  const double bm = batch_mean;
  acc = 0.0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const double x = __ldcg(part + b * d.chunks) - bm;
    acc += x * x;
  }
  acc = block_sum(acc, smem);
  if (threadIdx.x != 0) return;
  const int r = d.row;  // same operation order as welford_update_
  const double k = static_cast<double>(batch), c0 = s.count[r], old = s.mean[r];
  const double n = c0 + k, delta = bm - old;
  const double mean = old + delta * k / n;
  s.mean[r] = mean;
  s.m2[r] = s.m2[r] + (acc + delta * delta * c0 * k / n);
  s.count[r] = n;
  const double moved = fabs(mean - old) / fmax(fabs(mean), 1e-30);
  s.moved[r] = moved;
  s.converged[r] = n >= s.min_count && moved < s.rel_tol;
}

__global__ void __launch_bounds__(kThreads) fused_update_kernel(const Desc* __restrict__ desc, int n_tensors,
                                                                int64_t batch, double* __restrict__ partial,
                                                                unsigned int* __restrict__ done, Stats s) {
  __shared__ double smem[kWarps];
  __shared__ bool last;
  const int64_t block = blockIdx.x;
  const int t = find_tensor(desc, n_tensors, block);
  const Desc d = desc[t];
  const double v = block_sum(sumsq_of_block(d, block - d.first_block), smem);
  if (threadIdx.x == 0) {
    partial[block] = v;
    __threadfence();  // publish the partial before counting this block as done
    last = atomicAdd(done + t, 1u) == static_cast<unsigned int>(batch * d.chunks - 1);
    if (last) __threadfence();  // and see every other block's partial
  }
  __syncthreads();
  if (last) welford_merge(d, batch, partial + d.first_block, s, smem);
}

int32_t dtype_code(const at::Tensor& g) {
  switch (g.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: break;
  }
  TORCH_CHECK(false, "fused_update_: gradients must be float32, float16, bfloat16 or float64, got ", g.scalar_type());
  return -1;
}

void check_stat(const at::Tensor& x, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), "fused_update_: ", name, " must be on ", like.device());
  TORCH_CHECK(x.scalar_type() == dtype, "fused_update_: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.numel() == like.numel() && x.is_contiguous(), "fused_update_: ", name,
              " must be contiguous of shape (", like.numel(), ",)");
}

// rows[t] is the stats row of grads[t]; rows must be distinct within one call (one launch per row update).
std::vector<int64_t> checked_rows(const at::Tensor& rows, int64_t n_tensors, int64_t n_rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
                  rows.numel() == n_tensors,
              "fused_update_: rows must be a CPU int64 tensor with one entry per gradient");
  const auto rc = rows.contiguous();
  const int64_t* r = rc.data_ptr<int64_t>();
  std::vector<int64_t> out(r, r + n_tensors);
  std::vector<char> seen(n_rows, 0);
  for (int64_t row : out) {
    TORCH_CHECK(row >= 0 && row < n_rows, "fused_update_: row ", row, " out of range [0, ", n_rows, ")");
    TORCH_CHECK(!seen[row], "fused_update_: row ", row, " appears twice in one call");
    seen[row] = 1;
  }
  return out;
}

}  // namespace

void fused_update_(std::vector<at::Tensor> grads, at::Tensor rows, at::Tensor count, at::Tensor mean, at::Tensor m2,
                   at::Tensor moved, at::Tensor converged, int64_t min_count, double rel_tol) {
  const int64_t n_tensors = static_cast<int64_t>(grads.size());
  TORCH_CHECK(count.is_cuda(), "fused_update_: the stats must be CUDA tensors");
  TORCH_CHECK(count.numel() < INT_MAX, "fused_update_: too many stats rows");
  check_stat(count, count, at::kDouble, "count");
  check_stat(mean, count, at::kDouble, "mean");
  check_stat(m2, count, at::kDouble, "m2");
  check_stat(moved, count, at::kDouble, "moved");
  check_stat(converged, count, at::kBool, "converged");
  const std::vector<int64_t> row = checked_rows(rows, n_tensors, count.numel());
  if (n_tensors == 0) return;
  TORCH_CHECK(n_tensors < INT_MAX, "fused_update_: too many gradients");
  const c10::cuda::CUDAGuard guard(count.device());
  const int64_t batch = grads[0].dim() > 0 ? grads[0].size(0) : 0;
  TORCH_CHECK(batch > 0, "fused_update_: gradients must have a non-empty batch dimension");

  std::vector<at::Tensor> keep;  // contiguous gradients, alive until the launch is queued
  keep.reserve(n_tensors);
  at::Tensor host = at::empty({n_tensors * static_cast<int64_t>(sizeof(Desc))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  Desc* desc = reinterpret_cast<Desc*>(host.data_ptr());
  int64_t blocks = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK(g.is_cuda() && g.device() == count.device(), "fused_update_: gradient ", t, " must be on ",
                count.device());
    TORCH_CHECK(g.dim() > 0 && g.size(0) == batch, "fused_update_: gradient ", t, " has shape ", g.sizes(),
                ", expected a batch dimension of ", batch);
    keep.push_back(g.contiguous());
    const int64_t per_sample = keep.back().numel() / batch;
    const int64_t chunks = per_sample > kChunk ? (per_sample + kChunk - 1) / kChunk : 1;
    TORCH_CHECK(batch * chunks < static_cast<int64_t>(UINT_MAX), "fused_update_: gradient ", t, " is too large");
    desc[t] = Desc{reinterpret_cast<int64_t>(keep.back().data_ptr()), per_sample, blocks, chunks, dtype_code(g),
                   static_cast<int32_t>(row[t])};
    blocks += batch * chunks;
  }
  TORCH_CHECK(blocks < INT_MAX, "fused_update_: too many blocks (", blocks, ")");

  const auto dev = at::TensorOptions().device(count.device()).dtype(at::kByte);
  const at::Tensor desc_dev = host.to(dev, /*non_blocking=*/true);  // from pinned memory: no host sync
  const int64_t done_offset = blocks * static_cast<int64_t>(sizeof(double));
  at::Tensor work = at::empty({done_offset + n_tensors * static_cast<int64_t>(sizeof(unsigned int))}, dev);
  uint8_t* base = work.data_ptr<uint8_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(base + done_offset, 0, n_tensors * sizeof(unsigned int), stream));
  const Stats s{count.data_ptr<double>(),  mean.data_ptr<double>(),     m2.data_ptr<double>(),
                moved.data_ptr<double>(),  converged.data_ptr<bool>(), static_cast<double>(min_count), rel_tol};
  fused_update_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const Desc*>(desc_dev.data_ptr()), static_cast<int>(n_tensors), batch,
      reinterpret_cast<double*>(base), reinterpret_cast<unsigned int*>(base + done_offset), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_update_", &fused_update_,
        "Per-sample sums of squares of each gradient folded into its stats row (Welford), in one launch",
        pybind11::arg("grads"), pybind11::arg("rows"), pybind11::arg("count"), pybind11::arg("mean"),
        pybind11::arg("m2"), pybind11::arg("moved"), pybind11::arg("converged"), pybind11::arg("min_count"),
        pybind11::arg("rel_tol"));
}
