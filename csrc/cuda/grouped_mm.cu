// grouped_mm and grouped_mm_backward on CUDA: host-side problem setup and kernel choice (run_group_m is shared with
// fused_experts.cu).
//
// Kernel choice (shapes only, never data), among the regimes the dispatch policy allows (gemm_regimes.h):
// bf16/fp16 with 16-byte friendly shapes take the tensor-core kernel, or the weight-streaming kernel when there are
// few rows per expert (S <= 4 E, or S <= 16); everything else (fp32, fp64, odd sizes, odd strides) takes the SIMT
// kernel. EUREKA_FAST_GEMM=stream|tiled|wgmma|simt forces one allowed path where it applies (tests and benchmarks
// use it to cover every kernel on the same inputs); the Hopper wgmma kernel is opt-in (EUREKA_FAST_WGMMA=1) until a
// GPU run has measured it against the tiled kernel.
#include <atomic>

#include "gemm_kernels.cuh"
#include "gemm_regimes.h"
#include "ops.cuh"

namespace eureka_fast {
namespace cuda {
namespace {

enum class Path { kStream, kTiled, kWgmma, kSimt };

bool is_half_type(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Tensor-core / streaming eligibility of an operand chunked along its contiguous dimension.
bool vec_ok(const at::Tensor& t, std::initializer_list<int64_t> multiples_of_8) {
  if (!aligned16(t.data_ptr())) return false;
  for (int64_t v : multiples_of_8)
    if (v % 8 != 0) return false;
  return true;
}

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// Raises the dynamic shared-memory limit of `kernel` once per device (a host call, no stream work: safe in capture).
template <typename Kernel>
void configure_once(std::atomic<uint64_t>& mask, Kernel kernel, int bytes) {
  const int dev = static_cast<int>(c10::cuda::current_device());
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(mask.load(std::memory_order_acquire) & bit)) {
    set_smem(kernel, bytes);
    mask.fetch_or(bit, std::memory_order_acq_rel);
  }
}

template <typename T, bool A_MC, bool B_NC, bool GROUP_K, bool GATED, bool GATHER>
void launch_tc(const GemmArgs& p, dim3 grid) {
  auto kernel = tc_grouped_kernel<T, A_MC, B_NC, GROUP_K, GATED, GATHER>;
  static std::atomic<uint64_t> configured{0};  // one bit per device: the attribute is per device
  configure_once(configured, kernel, tc::SMEM_BYTES);
  kernel<<<grid, tc::THREADS, tc::SMEM_BYTES, stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BN, bool GATED, bool GATHER>
void launch_wg(const GemmArgs& p, int64_t nout, int64_t tiles_m) {
  auto kernel = wgmma_grouped_kernel<T, BN, GATED, GATHER>;
  constexpr int smem = wg::smem_bytes<BN>();
  static std::atomic<uint64_t> configured{0};
  configure_once(configured, kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(nout, GATED ? BN / 2 : BN)), static_cast<unsigned>(tiles_m));
  kernel<<<grid, wg::THREADS, smem, stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---- GROUP_M problems: forward (optionally gated / gathered) and dA (declared in ops.cuh) ----
void run_group_m(const at::Tensor& a, const int64_t* gather, int64_t gather_div, int64_t S, const at::Tensor& w,
                 int64_t b_es, int64_t b_sn, int64_t b_sk, int64_t N, int64_t Kred, const at::Tensor& offsets, int E,
                 int act, at::Tensor& out, bool allow_stream) {
  const bool gated = act != kActNone;
  const int64_t nout = gated ? N / 2 : N;
  if (S == 0 || nout == 0) return;
  GemmArgs p{};
  p.a = a.data_ptr();
  p.a_sm = a.stride(0);
  p.a_sk = a.stride(1);
  p.gather = gather;
  p.gather_div = gather_div;
  p.b = w.data_ptr();
  p.b_es = b_es;
  p.b_sn = b_sn;
  p.b_sk = b_sk;
  p.offsets = offsets.data_ptr<int64_t>();
  p.E = E;
  p.M = S;
  p.N = N;
  p.Kred = Kred;
  p.out = out.data_ptr();
  p.ldo = out.stride(0);
  p.out_es = 0;
  p.act = act;

  const auto dt = a.scalar_type();
  const bool half = is_half_type(dt) && w.scalar_type() == dt && out.scalar_type() == dt;
  const bool a_ok = half && p.a_sk == 1 && vec_ok(a, {p.a_sm, Kred});
  const bool b_k = b_sk == 1 && vec_ok(w, {b_sn, b_es, Kred});
  const bool b_n = b_sn == 1 && vec_ok(w, {b_sk, b_es, N, gated ? N / 2 : 0});
  const int64_t tiles_m = ceil_div(S, tc::BM) + E;
  const bool tc_ok = a_ok && (b_k || b_n) && tiles_m <= 65535 && gemm_regime_allowed(kGemmTiled);
  const bool stream_ok =
      a_ok && b_k && std::min<int64_t>(E, S) <= 65535 && allow_stream && gemm_regime_allowed(kGemmStream);
  const bool simt_ok = gemm_regime_allowed(kGemmSimt);

  const std::string force = env_choice("EUREKA_FAST_GEMM");
  // wgmma (sm_90a) forward kernel: opt-in until validated on a GPU (EUREKA_FAST_GEMM=wgmma or EUREKA_FAST_WGMMA=1)
  const bool wg_ok = a_ok && b_k && tiles_m <= 65535 && (force == "wgmma" || env_choice("EUREKA_FAST_WGMMA") == "1") &&
                     gemm_regime_allowed(kGemmWgmma) && wgmma_available();
  Path path;
  if (force == "simt" && simt_ok) {
    path = Path::kSimt;
  } else if (force == "stream" && stream_ok) {
    path = Path::kStream;
  } else if (force == "tiled" && tc_ok) {
    path = Path::kTiled;
  } else if (force == "wgmma" && wg_ok) {
    path = Path::kWgmma;
  } else if (stream_ok && (S <= 4 * static_cast<int64_t>(E) || S <= 16)) {
    path = Path::kStream;
  } else if (wg_ok) {
    path = Path::kWgmma;
  } else if (tc_ok) {
    path = Path::kTiled;
  } else {
    TORCH_CHECK(simt_ok, "grouped GEMM: none of the CUDA GEMM regimes allowed by the dispatch policy takes this ",
                "problem (the SIMT fallback is not allowed); see EUREKA_FAST_CUDA_KERNELS");
    path = Path::kSimt;
  }

  if (path == Path::kWgmma) {
    // 128 x 256 tiles (twice the reuse per loaded byte) when the output is wide enough; EUREKA_FAST_WG_BN=128 forces
    // the narrow tile
    // the narrow tile as well when the wide one would leave SMs idle (fewer than 2 real tiles per SM)
    const int64_t wide_tiles = ceil_div(S, wg::BM) * ceil_div(nout, gated ? 128 : 256);
    const bool wide = nout >= (gated ? 128 : 256) && wide_tiles >= 2 * num_sms() &&
                      env_choice("EUREKA_FAST_WG_BN") != "128";
    auto go = [&](auto tag) {
      using T = decltype(tag);
      if (wide) {
        if (gated) {
          if (gather) launch_wg<T, 256, true, true>(p, nout, tiles_m);
          else launch_wg<T, 256, true, false>(p, nout, tiles_m);
        } else {
          if (gather) launch_wg<T, 256, false, true>(p, nout, tiles_m);
          else launch_wg<T, 256, false, false>(p, nout, tiles_m);
        }
      } else {
        if (gated) {
          if (gather) launch_wg<T, 128, true, true>(p, nout, tiles_m);
          else launch_wg<T, 128, true, false>(p, nout, tiles_m);
        } else {
          if (gather) launch_wg<T, 128, false, true>(p, nout, tiles_m);
          else launch_wg<T, 128, false, false>(p, nout, tiles_m);
        }
      }
    };
    if (dt == at::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
    return;
  }

  if (path == Path::kTiled) {
    const dim3 grid(static_cast<unsigned>(ceil_div(nout, gated ? tc::BN / 2 : tc::BN)), static_cast<unsigned>(tiles_m));
    auto go = [&](auto tag) {
      using T = decltype(tag);
      if (gated) {
        if (b_k) {
          if (gather) launch_tc<T, false, false, false, true, true>(p, grid);
          else launch_tc<T, false, false, false, true, false>(p, grid);
        } else {
          if (gather) launch_tc<T, false, true, false, true, true>(p, grid);
          else launch_tc<T, false, true, false, true, false>(p, grid);
        }
      } else {
        if (b_k) {
          if (gather) launch_tc<T, false, false, false, false, true>(p, grid);
          else launch_tc<T, false, false, false, false, false>(p, grid);
        } else {
          if (gather) launch_tc<T, false, true, false, false, true>(p, grid);
          else launch_tc<T, false, true, false, false, false>(p, grid);
        }
      }
    };
    if (dt == at::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
    return;
  }
  if (path == Path::kStream) {
    const int64_t units = gated ? nout : ceil_div(N, 2);
    const dim3 grid(static_cast<unsigned>(ceil_div(units, streamk::UNITS_PER_BLOCK)),
                    static_cast<unsigned>(std::min<int64_t>(E, S)));
    auto go = [&](auto tag) {
      using T = decltype(tag);
      if (gated) {
        if (gather) stream_grouped_kernel<T, true, true><<<grid, streamk::THREADS, 0, stream()>>>(p);
        else stream_grouped_kernel<T, true, false><<<grid, streamk::THREADS, 0, stream()>>>(p);
      } else {
        if (gather) stream_grouped_kernel<T, false, true><<<grid, streamk::THREADS, 0, stream()>>>(p);
        else stream_grouped_kernel<T, false, false><<<grid, streamk::THREADS, 0, stream()>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dt == at::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
    return;
  }
  // SIMT: operands in one dtype (converted by the caller when they differ)
  const int64_t simt_tiles_m = ceil_div(S, simt::BM) + E;
  TORCH_CHECK(simt_tiles_m <= 65535, "grouped_mm: too many rows for the CUDA SIMT path");
  const dim3 grid(static_cast<unsigned>(ceil_div(nout, simt::BN)), static_cast<unsigned>(simt_tiles_m));
  EF_DISPATCH_FLOATING(dt, "grouped_mm", [&] {
    simt_grouped_kernel<scalar_t, false><<<grid, simt::THREADS, 0, stream()>>>(p, gated);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

// ---- GROUP_K problem (dW): out[e] [M, Nn] = sum over rows r of expert e of A(m, r) * B(n, r) ----
void run_group_k(const at::Tensor& a, int64_t a_sm, int64_t a_sk, int64_t a_rows, const at::Tensor& b, int64_t b_sn,
                 int64_t b_sk, int64_t M, int64_t Nn, const at::Tensor& offsets, int E, at::Tensor& out) {
  if (E == 0 || M == 0 || Nn == 0) return;
  GemmArgs p{};
  p.a = a.data_ptr();
  p.a_sm = a_sm;
  p.a_sk = a_sk;
  p.gather = nullptr;
  p.gather_div = 1;
  p.b = b.data_ptr();
  p.b_es = 0;
  p.b_sn = b_sn;
  p.b_sk = b_sk;
  p.offsets = offsets.data_ptr<int64_t>();
  p.E = E;
  p.M = M;
  p.N = Nn;
  p.Kred = a_rows;
  p.out = out.data_ptr();
  p.ldo = out.stride(1);
  p.out_es = out.stride(0);
  p.act = kActNone;
  const auto dt = a.scalar_type();
  const bool half = is_half_type(dt) && b.scalar_type() == dt && out.scalar_type() == dt;
  const bool tc_ok = half && a_sm == 1 && b_sn == 1 && vec_ok(a, {a_sk, M}) && vec_ok(b, {b_sk, Nn}) &&
                     ceil_div(M, tc::BM) <= 65535 && E <= 65535 && gemm_regime_allowed(kGemmTiled) &&
                     !(env_choice("EUREKA_FAST_GEMM") == "simt" && gemm_regime_allowed(kGemmSimt));
  if (tc_ok) {
    const dim3 grid(static_cast<unsigned>(ceil_div(Nn, tc::BN)), static_cast<unsigned>(ceil_div(M, tc::BM)),
                    static_cast<unsigned>(E));
    if (dt == at::kBFloat16) launch_tc<__nv_bfloat16, true, true, true, false, false>(p, grid);
    else launch_tc<__half, true, true, true, false, false>(p, grid);
    return;
  }
  TORCH_CHECK(gemm_regime_allowed(kGemmSimt), "grouped_mm_backward: the weight gradient needs the tiled or the SIMT ",
              "CUDA GEMM regime, and the dispatch policy allows neither for this problem; see EUREKA_FAST_CUDA_KERNELS");
  TORCH_CHECK(ceil_div(M, simt::BM) <= 65535 && E <= 65535, "grouped_mm_backward: problem too large for SIMT path");
  const dim3 grid(static_cast<unsigned>(ceil_div(Nn, simt::BN)), static_cast<unsigned>(ceil_div(M, simt::BM)),
                  static_cast<unsigned>(E));
  EF_DISPATCH_FLOATING(dt, "grouped_mm_backward", [&] {
    simt_grouped_kernel<scalar_t, true><<<grid, simt::THREADS, 0, stream()>>>(p, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void zero_uncovered_rows(at::Tensor& out, const at::Tensor& offsets, int E) {
  const int64_t S = out.size(0), ncols = out.size(1);
  if (S == 0 || ncols == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(S, 4LL * num_sms()));
  EF_DISPATCH_FLOATING(out.scalar_type(), "grouped_mm", [&] {
    zero_uncovered_rows_kernel<scalar_t><<<blocks, 128, 0, stream()>>>(
        reinterpret_cast<scalar_t*>(out.data_ptr()), S, ncols, out.stride(0), offsets.data_ptr<int64_t>(), E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor weight_view(const at::Tensor& w, int64_t& es, int64_t& sn, int64_t& sk) {
  at::Tensor ww = w;
  if (!(ww.stride(2) == 1 || ww.stride(1) == 1)) ww = ww.contiguous();
  es = ww.stride(0);
  sn = ww.stride(1);
  sk = ww.stride(2);
  // size-1 dims can carry any stride: normalise so the layout tests see the real contiguous dim
  if (ww.size(2) == 1) sk = 1;
  if (ww.size(1) == 1 && sk != 1) sn = 1;
  if (ww.size(0) == 1) es = 0;
  return ww;
}

namespace {

void check_common(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && offsets.is_cuda(), op, ": a, w and offsets must be CUDA tensors");
  TORCH_CHECK(a.dim() == 2, op, ": a must be [S, K], got ", a.sizes());
  TORCH_CHECK(w.dim() == 3, op, ": w must be [E, N, K], got ", w.sizes());
  TORCH_CHECK(w.size(2) == a.size(1), op, ": a is [S, ", a.size(1), "] but w is ", w.sizes());
  TORCH_CHECK(offsets.numel() == w.size(0) + 1, op, ": offsets must have E+1 elements");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": a must be floating point");
}

}  // namespace

at::Tensor grouped_mm_cuda(const at::Tensor& a_in, const at::Tensor& w_in, const at::Tensor& offsets_in,
                           c10::string_view activation) {
  check_common(a_in, w_in, offsets_in, "grouped_mm");
  c10::cuda::CUDAGuard guard(a_in.device());
  const int act = parse_gated_activation(std::string(activation), "grouped_mm");
  const int64_t S = a_in.size(0), K = a_in.size(1), E = w_in.size(0), N = w_in.size(1);
  TORCH_CHECK(act == kActNone || N % 2 == 0, "grouped_mm: gated activation needs an even N, got ", N);
  const int64_t nout = act == kActNone ? N : N / 2;
  at::Tensor out = at::empty({S, nout}, a_in.options());
  if (S == 0 || nout == 0) return out;
  if (K == 0 || E == 0) return out.zero_();
  at::Tensor a = a_in.contiguous();
  at::Tensor w = w_in.scalar_type() == a.scalar_type() ? w_in : w_in.to(a.scalar_type());
  at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  int64_t es, sn, sk;
  w = weight_view(w, es, sn, sk);
  run_group_m(a, nullptr, 1, S, w, es, sn, sk, N, K, offsets, static_cast<int>(E), act, out, true);
  zero_uncovered_rows(out, offsets, static_cast<int>(E));
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                            const at::Tensor& w_in, const at::Tensor& offsets_in,
                                                            c10::string_view activation) {
  check_common(a_in, w_in, offsets_in, "grouped_mm_backward");
  c10::cuda::CUDAGuard guard(a_in.device());
  const int act = parse_gated_activation(std::string(activation), "grouped_mm_backward");
  const int64_t S = a_in.size(0), K = a_in.size(1), E = w_in.size(0), N = w_in.size(1);
  TORCH_CHECK(act == kActNone || N % 2 == 0, "grouped_mm_backward: gated activation needs an even N");
  const int64_t nout = act == kActNone ? N : N / 2;
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == S && grad_in.size(1) == nout,
              "grouped_mm_backward: grad_out must be [S, ", nout, "], got ", grad_in.sizes());
  const auto dt = a_in.scalar_type();
  at::Tensor grad_a = at::empty({S, K}, a_in.options());
  at::Tensor grad_w = at::empty({E, N, K}, w_in.options());
  if (E == 0) return {grad_a.zero_(), grad_w};
  if (S == 0 || N == 0 || K == 0) return {grad_a.zero_(), grad_w.zero_()};
  at::Tensor a = a_in.contiguous();
  at::Tensor w = w_in.scalar_type() == dt ? w_in : w_in.to(dt);
  at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  at::Tensor g = grad_in.to(dt).contiguous();
  int64_t es, sn, sk;
  w = weight_view(w, es, sn, sk);
  const int Ei = static_cast<int>(E);

  // dpre [S, N]: gradient w.r.t. the pre-activation (grad_out itself when there is no activation)
  at::Tensor dpre;
  if (act == kActNone) {
    dpre = g;
  } else {
    at::Tensor pre = at::empty({S, N}, a.options());
    run_group_m(a, nullptr, 1, S, w, es, sn, sk, N, K, offsets, Ei, kActNone, pre, true);
    dpre = at::empty({S, N}, a.options());
    const int64_t total = S * (N / 2);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 16LL * num_sms()));
    EF_DISPATCH_FLOATING(dt, "grouped_mm_backward", [&] {
      gated_backward_kernel<scalar_t><<<blocks, 256, 0, stream()>>>(
          reinterpret_cast<const scalar_t*>(pre.data_ptr()), reinterpret_cast<const scalar_t*>(g.data_ptr()), S,
          N / 2, act, reinterpret_cast<scalar_t*>(dpre.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // grad_a [S, K] = dpre[S, N] . W_e[N, K]: B_e(n = k_out, kk = n) = w[e, kk, k_out] -> (es, sk, sn) swapped
  run_group_m(dpre, nullptr, 1, S, w, es, /*b_sn=*/sk, /*b_sk=*/sn, /*N=*/K, /*Kred=*/N, offsets, Ei, kActNone, grad_a,
              false);
  zero_uncovered_rows(grad_a, offsets, Ei);

  // grad_w[e] [N, K] = sum over rows r of e: dpre[r, n] * a[r, k]
  at::Tensor gw = w_in.scalar_type() == dt ? grad_w : at::empty({E, N, K}, a.options());
  run_group_k(dpre, /*a_sm=*/1, /*a_sk=*/dpre.stride(0), /*a_rows=*/S, a, /*b_sn=*/1, /*b_sk=*/a.stride(0), N, K, offsets,
              Ei, gw);
  if (!gw.is_same(grad_w)) grad_w.copy_(gw);
  return {grad_a, grad_w};
}

TORCH_LIBRARY_IMPL(eureka_fast, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
}

}  // namespace cuda
}  // namespace eureka_fast
