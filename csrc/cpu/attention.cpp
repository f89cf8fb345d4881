// Non-causal multi-head attention on the CPU, forward only (inference): out = softmax(scale * q k^T) v with an
// optional per-batch key length (keys at or past key_lengths[b] are masked out).
//
// Per (batch, head, block of query rows): one sgemm S = Q_blk K^T into a buffer that stays in L2, then per row the
// max and one pass of exp(scale * (s - max)) that also sums the row (a vectorised polynomial exp: the T^2
// exponentials must cost a small fraction of the two GEMMs), one sgemm O = P V written straight into the
// [B, Tq, H, dh] output, and a rescale of O's rows by 1 / sum. q, k, v are read in place through their strides
// (the [B, T, 3, H, dh] output of a fused QKV projection needs no copy).
// head_dim 64 in float32 on AVX-512 CPUs (Whisper tiny / base) takes attention_avx512.cpp instead: our own
// register-blocked microkernels with a transposed (column-wise) softmax, ~20% faster than this MKL path.
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/attention_avx512.h"
#include "cpu/common.h"
#include "cpu/moe_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EUREKA_FAST_X86 1
#endif

namespace eureka_fast {
namespace cpu {
namespace {

// exp(scale * (s[i] - row_max)) written back into s, returns the row sum. Scalar version, any CPU.
template <typename scalar_t>
scalar_t exp_shift_sum_scalar(scalar_t* s, int64_t n, scalar_t row_max, scalar_t scale) {
  scalar_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t x = scale * (s[i] - row_max);
    const scalar_t e = x < scalar_t(-80) ? scalar_t(0) : std::exp(x);
    s[i] = e;
    sum += e;
  }
  return sum;
}

template <typename scalar_t>
scalar_t row_max_scalar(const scalar_t* s, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

#ifdef EUREKA_FAST_X86
// exp(x) for x <= 0 (arguments here are scale * (s - max)): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial (Horner, relative error ~2e-7, about 1 ulp), times 2^n by vscalefps (no exponent-field arithmetic).
// Arguments below -80 give exactly 0 (exp(-80) = 1.8e-35 is invisible next to the row sum >= 1): the results
// would otherwise approach the denormal range, and denormal operands make the P V GEMM many times slower.
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-80.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-80.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(kept, p, n);
}

__attribute__((target("avx512f"))) float row_max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + i));
  }
  return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx512f"))) float exp_shift_sum_avx512(float* s, int64_t n, float row_max, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 shift = _mm512_set1_ps(-scale * row_max);
  // two accumulators: the adds do not serialise on one register
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(s + i), vscale, shift));
    const __m512 e1 = exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(s + i + 16), vscale, shift));
    _mm512_storeu_ps(s + i, e0);
    _mm512_storeu_ps(s + i + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 e = exp_avx512(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, s + i), vscale, shift));
    _mm512_mask_storeu_ps(s + i, mask, e);
    sum0 = _mm512_add_ps(sum0, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

// The shared ISA choice (moe_cpu.h): also honours the EUREKA_FAST_CPU_ISA cap the tests use.
bool cpu_has_avx512f() { return cpu_isa() == CpuIsa::Avx512; }
// EUREKA_FAST_ATTENTION_GENERIC=1 keeps head_dim 64 on the MKL path (A/B benchmarks; read on every call, which
// costs nothing next to an attention).
bool attention_generic_forced() {
  const char* env = std::getenv("EUREKA_FAST_ATTENTION_GENERIC");
  return env != nullptr && env[0] == '1';
}
#endif

inline float row_max(const float* s, int64_t n) {
#ifdef EUREKA_FAST_X86
  if (cpu_has_avx512f()) return row_max_avx512(s, n);
#endif
  return row_max_scalar(s, n);
}
inline double row_max(const double* s, int64_t n) { return row_max_scalar(s, n); }

inline float exp_shift_sum(float* s, int64_t n, float m, float scale) {
#ifdef EUREKA_FAST_X86
  if (cpu_has_avx512f()) return exp_shift_sum_avx512(s, n, m, scale);
#endif
  return exp_shift_sum_scalar(s, n, m, scale);
}
inline double exp_shift_sum(double* s, int64_t n, double m, double scale) {
  return exp_shift_sum_scalar(s, n, m, scale);
}

// Query rows per block: the score block [rows, Tk] should stay in L2 (~1 MB of the 2 MB) next to K and V.
int64_t query_block_rows(int64_t tk, int64_t elem_size) {
  const int64_t budget = (1 << 20) / elem_size;
  return std::max<int64_t>(16, std::min<int64_t>(256, budget / std::max<int64_t>(tk, 1) / 16 * 16));
}

template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* key_len,
                      double scale_d, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), dh = q.size(3), Tk = k.size(2);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t rows_per_block = query_block_rows(Tk, sizeof(scalar_t));
  const int64_t out_row_stride = H * dh;  // out is [B, Tq, H, dh] contiguous
  // One task per (batch, head): its K and V are copied once into contiguous [keys, dh] buffers (the strided rows of
  // a fused QKV output cost the GEMMs ~20%) and reused by every query block.
  run_tasks(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t keys = key_len ? key_len[b] : Tk;
    thread_local std::vector<scalar_t> buffer;
    const int64_t need = rows_per_block * keys + 2 * keys * dh + rows_per_block * dh + rows_per_block;
    if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
    scalar_t* scores = buffer.data();
    scalar_t* k_head = scores + rows_per_block * keys;
    scalar_t* v_head = k_head + keys * dh;
    scalar_t* q_block = v_head + keys * dh;
    scalar_t* inv_sum = q_block + rows_per_block * dh;
    const scalar_t* kb = kp + b * k.stride(0) + h * k.stride(1);
    const scalar_t* vb = vp + b * v.stride(0) + h * v.stride(1);
    for (int64_t t = 0; t < keys; ++t) {
      std::memcpy(k_head + t * dh, kb + t * k.stride(2), dh * sizeof(scalar_t));
      std::memcpy(v_head + t * dh, vb + t * v.stride(2), dh * sizeof(scalar_t));
    }
    for (int64_t r0 = 0; r0 < Tq; r0 += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, Tq - r0);
      const scalar_t* qb = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(q_block + r * dh, qb + r * q.stride(2), dh * sizeof(scalar_t));
      scalar_t* ob = op + (b * Tq + r0) * out_row_stride + h * dh;
      // S[rows, keys] = Q_blk K^T (unscaled: the scale is folded into the exp's argument)
      gemm_abt<scalar_t>(rows, keys, dh, q_block, dh, k_head, dh, 1, scores, keys);
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* s = scores + r * keys;
        const scalar_t m = row_max(s, keys);
        inv_sum[r] = scalar_t(1) / exp_shift_sum(s, keys, m, scale);
      }
      // O[rows, dh] = P V, written into this head's columns of the output rows
      gemm_ab<scalar_t>(rows, dh, keys, scores, keys, v_head, dh, ob, out_row_stride);
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = ob + r * out_row_stride;
        const scalar_t f = inv_sum[r];
        for (int64_t c = 0; c < dh; ++c) o[c] *= f;
      }
    }
  });
}

// q [B, H, Tq, dh], k and v [B, H, Tk, dh] (any strides with a unit last stride; copied otherwise), key_lengths
// [B] integer in [1, Tk] or None, scale > 0 -> out [B, Tq, H, dh] contiguous.
// `given_out`: the caller's [B, Tq, H, dh] contiguous buffer of q's dtype (float32 / float64) to write, or undefined
// for a fresh one (a fresh 2.3 MB output per encoder layer was re-faulted page by page on many calls).
at::Tensor attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& key_lengths, double scale,
                          const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& v_bias,
                          const at::Tensor& given_out) {
  check_float_tensor(q, 4, "q");
  check_float_tensor(k, 4, "k");
  check_float_tensor(v, 4, "v");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), dh = q.size(3), Tk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == dh, "k must have shape [", B, ", ", H, ", Tk, ", dh,
              "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be a finite number > 0, got ", scale);
  TORCH_CHECK(Tk >= 1 || Tq == 0 || B * H == 0, "attention needs at least one key, got Tk = 0");
  std::vector<int64_t> lens;
  if (key_lengths.has_value()) lens = checked_lengths(*key_lengths, B, 1, Tk, "key_lengths", "Tk");
  const at::ScalarType cd = compute_dtype(q.scalar_type());
  // the GEMMs need a unit stride along dh and row strides the BLAS accepts (>= dh)
  auto operand = [&](const at::Tensor& t) {
    at::Tensor r = t.scalar_type() == cd ? t : t.to(cd);
    if (r.stride(3) != 1 || r.stride(2) < dh) r = r.contiguous();
    return r;
  };
  // optional biases [H * dh] (or any shape of H * dh elements) of a projection the caller ran without them
  auto bias = [&](const c10::optional<at::Tensor>& b, const char* name) {
    if (!b.has_value()) return at::Tensor();
    check_cpu(*b, name);
    check_floating(*b, name);
    TORCH_CHECK(b->numel() == H * dh, name, " must have heads * head_dim = ", H * dh, " elements, got shape ",
                b->sizes());
    return b->to(cd).contiguous().view({H * dh});
  };
  const at::Tensor qb = bias(q_bias, "q_bias"), vb = bias(v_bias, "v_bias");
  at::Tensor qc = operand(q), kc = operand(k), vc = operand(v);
  at::Tensor out;
  if (given_out.defined()) {
    check_cpu(given_out, "out");
    TORCH_CHECK(q.scalar_type() == cd && given_out.scalar_type() == cd, "attention_out needs float32 / float64 q and "
                "an out of q's dtype, got q ", q.scalar_type(), ", out ", given_out.scalar_type());
    TORCH_CHECK(given_out.sizes() == at::IntArrayRef({B, Tq, H, dh}) && given_out.is_contiguous(),
                "out must be a contiguous [", B, ", ", Tq, ", ", H, ", ", dh, "], got ", given_out.sizes());
    out = given_out;
  } else {
    out = at::empty({B, Tq, H, dh}, qc.options());
  }
  if (out.numel() > 0) {
    if (dh == 0) {
      out.zero_();
    } else {
      const int64_t* key_len = lens.empty() ? nullptr : lens.data();
#ifdef EUREKA_FAST_X86
      // head_dim 64 in float32 (Whisper tiny / base / ...): our own AVX-512 microkernels
      if (cd == at::kFloat && dh == 64 && cpu_has_avx512f() && !attention_generic_forced() &&
          attention_dh64_avx512(qc.data_ptr<float>(), qc.strides().data(), kc.data_ptr<float>(), kc.strides().data(),
                                vc.data_ptr<float>(), vc.strides().data(), B, H, Tq, key_len, Tk,
                                static_cast<float>(scale), qb.defined() ? qb.data_ptr<float>() : nullptr,
                                vb.defined() ? vb.data_ptr<float>() : nullptr, out.data_ptr<float>())) {
        return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
      }
#endif
      // the generic path adds the biases to copies (softmax weights sum to 1, so v's bias could be added to the
      // output instead; this path is not the fast one)
      if (qb.defined()) qc = qc + qb.view({1, H, 1, dh});
      if (vb.defined()) vc = vc + vb.view({1, H, 1, dh});
      AT_DISPATCH_FLOATING_TYPES(cd, "attention", [&] {
        attention_kernel<scalar_t>(qc, kc, vc, key_len, scale, out);
      });
    }
  }
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& key_lengths, double scale,
                         const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& v_bias) {
  return attention_impl(q, k, v, key_lengths, scale, q_bias, v_bias, at::Tensor());
}

at::Tensor& attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& key_lengths, double scale,
                              const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& v_bias,
                              at::Tensor& out) {
  TORCH_CHECK(out.defined(), "out must be a tensor");
  attention_impl(q, k, v, key_lengths, scale, q_bias, v_bias, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eureka_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_out", &attention_out_cpu);
}

}  // namespace cpu
}  // namespace eureka_fast
