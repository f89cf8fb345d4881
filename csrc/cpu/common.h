// Helpers shared by the CPU kernels: argument checks, a dynamic task scheduler on top of at::parallel_for, and a
// row-major wrapper around the BLAS GEMM that ATen itself uses (MKL / oneDNN in the official wheels).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace eureka_fast {
namespace cpu {

// Kernels compute in float32, or float64 when the input is float64.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// A top-k k (the columns of `name`) must lie in [1, E]; `range` says what E is, e.g. "num_experts".
inline void check_top_k(int64_t k, int64_t E, const char* name, const char* range) {
  TORCH_CHECK(k >= 1 && k <= E, name, " must have between 1 and ", E, " columns (top-k k in [1, ", range, "]), got k = ",
              k);
}

// The usual checks on a floating-point operand, in the order users hit them: device, rank, dtype.
inline void check_float_tensor(const at::Tensor& t, int64_t dim, const char* name) {
  check_cpu(t, name);
  check_dim(t, dim, name);
  check_floating(t, name);
}

// Rows contiguous (stride(-1) == 1) in the compute dtype; copies only when needed.
inline at::Tensor rows_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  if (r.dim() >= 1 && r.size(-1) > 1 && r.stride(-1) != 1) r = r.contiguous();
  if (r.dim() == 2 && r.size(0) > 1 && r.stride(0) < r.size(1)) r = r.contiguous();
  return r;
}

}  // namespace cpu
}  // namespace eureka_fast
// MKL's per-thread thread-count override, exported by libtorch_cpu in the MKL builds (weak: absent elsewhere).
// The C entry point: the lower-case mkl_set_num_threads_local export is the Fortran one (argument by pointer).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
namespace eureka_fast {
namespace cpu {

// While alive, BLAS calls made on this thread run on this thread only (MKL would otherwise be free to start its
// own team inside our parallel region when MKL_DYNAMIC is off); restores the previous setting on exit.
struct SingleThreadedBlas {
  int previous = 0;
  bool active = false;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      previous = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~SingleThreadedBlas() {
    if (active) MKL_Set_Num_Threads_Local(previous);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

// Runs task(i) for i in [0, n) on at::get_num_threads() workers that pull the next index from a shared counter,
// so tasks of uneven cost (experts with skewed row counts) balance. Order the tasks from most to least expensive.
template <typename F>
void run_tasks(int64_t n, const F& task) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SingleThreadedBlas blas_on_this_thread_only;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(i);
  });
}

// ---- BLAS ----------------------------------------------------------------------------------------------------
// The GEMM ATen uses on x86-64 (MKL, linked into libtorch_cpu) exports the Fortran sgemm_/dgemm_ entry points; we
// call them directly so a tile costs one BLAS call and no tensor bookkeeping. Inside a parallel region MKL runs
// on the calling thread only. The symbols are weak so builds against a libtorch without them (other BLAS, other
// platforms) still load and fall back to at::addmm_out on views of the same memory.
}  // namespace cpu
}  // namespace eureka_fast
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
namespace eureka_fast {
namespace cpu {

inline int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= static_cast<int64_t>(std::numeric_limits<int>::max()), "GEMM ", what, " = ", v,
              " exceeds the 32-bit BLAS interface");
  return static_cast<int>(v);
}

// Column-major BLAS call C[m, n] = op(A) op(B) + beta C. Returns false when no BLAS symbol is available.
inline bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                         const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ == nullptr) return false;
  const int M = blas_int(m, "m"), N = blas_int(n, "n"), K = blas_int(k, "k"), LDA = blas_int(lda, "lda"),
            LDB = blas_int(ldb, "ldb"), LDC = blas_int(ldc, "ldc");
  const float one = 1.0f;
  sgemm_(&ta, &tb, &M, &N, &K, &one, a, &LDA, b, &LDB, &beta, c, &LDC);
  return true;
}
inline bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                         const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ == nullptr) return false;
  const int M = blas_int(m, "m"), N = blas_int(n, "n"), K = blas_int(k, "k"), LDA = blas_int(lda, "lda"),
            LDB = blas_int(ldb, "ldb"), LDC = blas_int(ldc, "ldc");
  const double one = 1.0;
  dgemm_(&ta, &tb, &M, &N, &K, &one, a, &LDA, b, &LDB, &beta, c, &LDC);
  return true;
}

template <typename scalar_t>
inline at::Tensor blob(const scalar_t* p, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// Row-major C[m, n] (leading dimension ldc) = A[m, K] (lda) * B^T + beta * C, where B is the [n, K] matrix whose
// element (j, kk) sits at b[j * b_row_stride + kk * b_col_stride]; one of the two strides must be 1.
template <typename scalar_t>
inline void gemm_abt(int64_t m, int64_t n, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b,
                     int64_t b_row_stride, int64_t b_col_stride, scalar_t* c, int64_t ldc, scalar_t beta = 0) {
  if (m == 0 || n == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == scalar_t(0) ? scalar_t(0) : beta * c[i * ldc + j];
    return;
  }
  // Column-major view: C^T[n, m] = op(B)[n, K] * A^T[K, m].
  bool done;
  if (b_col_stride == 1) {
    done = fortran_gemm('T', 'N', n, m, K, b, std::max<int64_t>(b_row_stride, K), a, std::max<int64_t>(lda, K), beta,
                        c, std::max<int64_t>(ldc, n));
  } else {
    TORCH_INTERNAL_ASSERT(b_row_stride == 1, "gemm_abt: B needs a unit stride");
    done = fortran_gemm('N', 'N', n, m, K, b, std::max<int64_t>(b_col_stride, n), a, std::max<int64_t>(lda, K), beta,
                        c, std::max<int64_t>(ldc, n));
  }
  if (!done) {
    at::Tensor out = blob(c, m, n, ldc, 1);
    at::addmm_out(out, out, blob(a, m, K, lda, 1), blob(b, n, K, b_row_stride, b_col_stride).t(), beta, 1);
  }
}

// Row-major C[m, n] = A[m, K] * B[K, n] (+ beta C), all with unit column strides.
template <typename scalar_t>
inline void gemm_ab(int64_t m, int64_t n, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
                    scalar_t* c, int64_t ldc, scalar_t beta = 0) {
  if (m == 0 || n == 0 || K == 0) return;  // callers zero-initialise C
  if (!fortran_gemm('N', 'N', n, m, K, b, std::max<int64_t>(ldb, n), a, std::max<int64_t>(lda, K), beta, c,
                    std::max<int64_t>(ldc, n))) {
    at::Tensor out = blob(c, m, n, ldc, 1);
    at::addmm_out(out, out, blob(a, m, K, lda, 1), blob(b, K, n, ldb, 1), beta, 1);
  }
}

// Row-major C[m, n] = A[K, m]^T * B[K, n] (+ beta C): the weight-gradient shape (grad^T * input).
template <typename scalar_t>
inline void gemm_atb(int64_t m, int64_t n, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
                     scalar_t* c, int64_t ldc, scalar_t beta = 0) {
  if (m == 0 || n == 0 || K == 0) return;  // callers zero-initialise C
  if (!fortran_gemm('N', 'T', n, m, K, b, std::max<int64_t>(ldb, n), a, std::max<int64_t>(lda, m), beta, c,
                    std::max<int64_t>(ldc, n))) {
    at::Tensor out = blob(c, m, n, ldc, 1);
    at::addmm_out(out, out, blob(a, K, m, lda, 1).t(), blob(b, K, n, ldb, 1), beta, 1);
  }
}

// Offsets [E+1] int64 on the CPU: starts at >= 0, non-decreasing, last <= rows.
inline std::vector<int64_t> checked_offsets(const at::Tensor& offsets, int64_t num_experts, int64_t rows,
                                            const char* name) {
  check_cpu(offsets, name);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == num_experts + 1, name, " must have shape [", num_experts + 1,
              "], got ", offsets.sizes());
  TORCH_CHECK(!at::isFloatingType(offsets.scalar_type()) && offsets.scalar_type() != at::kBool, name,
              " must be an integer tensor, got ", offsets.scalar_type());
  at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + num_experts + 1);
  TORCH_CHECK(v[0] >= 0, name, "[0] must be >= 0, got ", v[0]);
  for (int64_t e = 0; e < num_experts; ++e)
    TORCH_CHECK(v[e + 1] >= v[e], name, " must be non-decreasing, but ", name, "[", e + 1, "] = ", v[e + 1], " < ",
                name, "[", e, "] = ", v[e]);
  TORCH_CHECK(v[num_experts] <= rows, name, "[-1] = ", v[num_experts], " exceeds the ", rows, " rows of the input");
  return v;
}

// Per-batch lengths [B] of an integer type, every entry in [lo, hi], as int64 (ragged batches: frames, keys).
inline std::vector<int64_t> checked_lengths(const at::Tensor& lengths, int64_t batch, int64_t lo, int64_t hi,
                                            const char* name, const char* hi_name) {
  check_cpu(lengths, name);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, name, " must have shape [", batch, "], got ",
              lengths.sizes());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && lengths.scalar_type() != at::kBool, name,
              " must be an integer tensor, got ", lengths.scalar_type());
  at::Tensor l = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> v(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + batch);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(v[b] >= lo && v[b] <= hi, name, " must lie in [", lo, ", ", hi_name, "=", hi, "], found ", v[b],
                " at position ", b);
  return v;
}

// ids [T, k] of an integer type, every entry in [0, num_experts), as int64.
inline at::Tensor checked_ids(const at::Tensor& ids, int64_t num_experts, const char* name) {
  check_cpu(ids, name);
  check_dim(ids, 2, name);
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool, name,
              " must be an integer tensor, got ", ids.scalar_type());
  at::Tensor l = ids.to(at::kLong).contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  const int64_t n = l.numel();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num_experts, name, " must lie in [0, ", num_experts, "), found ", p[i],
                " at flat position ", i);
  return l;
}

// at::empty for a large output that the kernel writes right away (every element): asks Linux for transparent huge
// pages on it first, so the first touch costs one page fault per 2 MB instead of per 4 KB (a fresh 128 MB output
// otherwise spends more time in page faults than in the copy that fills it). Only from 32 MB, glibc's largest
// mmap threshold: smaller blocks are usually recycled heap memory that is already mapped. Only the 2 MB-aligned
// interior is advised; where THP is off or unsupported the call is a no-op.
inline at::Tensor empty_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes >= 16 * kHuge) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace eureka_fast
