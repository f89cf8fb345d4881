// The one registration file: op schemas for the eureka_fast namespace and the Python module entry point.
// Kernels register their implementations per dispatch key (CPU in csrc/cpu/, CUDA in csrc/cuda/) next to their
// code with TORCH_LIBRARY_IMPL(eureka_fast, <Key>, m). Autograd formulas and fake (meta) implementations live in
// Python (eureka_fast/ops/) so they are shared by every backend.
//
// Conventions shared by all kernels:
//   * a routed "row" is token * top_k + slot; every index tensor produced here is int64, ids are int32;
//   * activation strings: "none" | "silu_mul" | "gelu_mul" for grouped_mm, "silu" | "gelu" for fused_experts,
//     "none" | "silu" | "gelu" | "swiglu" for stack_norm_project; norm: "none" | "layer" | "rms";
//   * compute in float32 (float64 stays float64), outputs in the input dtype, routing weights float32.
#include <torch/library.h>

#include "gemm_regimes.h"

#ifndef EUREKA_FAST_NO_PYTHON
#include <string>

#include <torch/extension.h>

#include "cpu/moe_cpu.h"
#ifdef EUREKA_FAST_WITH_CUDA
#include "cuda/build_info.h"
#endif
#endif

TORCH_LIBRARY(eureka_fast, m) {
  // ---- routing ----
  // (weights f32 [T,k] (f64 for f64 logits), ids int32 [T,k]); ties go to the lower expert id.
  m.def(
      "route_topk(Tensor logits, int k, str scoring, bool renormalize, Tensor? correction_bias, int n_group, "
      "int topk_group, float routed_scaling) -> (Tensor, Tensor)");
  // E * sum_e mean_t(router_probs[t,e]) * fraction of rows routed to e; a 0-dim tensor.
  m.def("moe_aux_loss(Tensor router_probs, Tensor ids) -> Tensor");

  // ---- plan / permute / combine ----
  // (counts [E], offsets [E+1], padded_offsets [E+1], sorted_rows [T*k], inverse_rows [T*k]), all int64.
  m.def("moe_plan(Tensor ids, int num_experts, int block) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x_sorted[i] = x[sorted_rows[i] // top_k]
  m.def("permute(Tensor x, Tensor sorted_rows, int top_k) -> Tensor");
  // out[t] = sum_j weights[t,j] * y_sorted[inverse_rows[t*k+j]], summed in slot order (deterministic).
  m.def("combine(Tensor y_sorted, Tensor inverse_rows, Tensor weights) -> Tensor");
  // (grad_y_sorted [S,H] (rows past T*k are zero), grad_weights f32 [T,k])
  m.def(
      "combine_backward(Tensor grad_out, Tensor y_sorted, Tensor inverse_rows, Tensor weights) -> (Tensor, Tensor)");

  // ---- grouped GEMM ----
  // rows offsets[e]:offsets[e+1] of a [S,K] times w[e]^T (w [E,N,K], any strides), gated activation fused;
  // rows not covered by offsets are zero.
  m.def("grouped_mm(Tensor a, Tensor w, Tensor offsets, str activation) -> Tensor");
  // (grad_a [S,K], grad_w [E,N,K]); recomputes the pre-activation when activation != "none".
  m.def("grouped_mm_backward(Tensor grad_out, Tensor a, Tensor w, Tensor offsets, str activation) -> (Tensor, Tensor)");

  // ---- the whole routed-expert layer (transformers 5 layouts) ----
  m.def(
      "fused_experts(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor weights, Tensor ids, str activation) "
      "-> Tensor");

  // ---- audio downsampling: stack k frames -> norm -> Linear -> activation -> Linear ----
  m.def(
      "stack_norm_project(Tensor x, int k, Tensor? lengths, str norm, Tensor? norm_weight, Tensor? norm_bias, "
      "Tensor? w1, Tensor? b1, str activation, Tensor? w2, Tensor? b2, float eps, str pool) -> Tensor");

  // ---- audio front end and Whisper encoder (CPU kernels, forward only; autograd goes through PyTorch) ----
  // Non-causal attention: q [B,H,Tq,dh], k/v [B,H,Tk,dh], key_lengths [B] in [1,Tk] or None -> out [B,Tq,H,dh] =
  // softmax(scale * q k^T, keys >= key_lengths[b] masked) v, with q_bias / v_bias [H*dh] (when given) added to q and v
  // first.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale, Tensor? q_bias=None, "
        "Tensor? v_bias=None) -> Tensor");
  // x [rows, cols] = gelu(x + bias[cols]) in place, exact-erf GELU (the encoder's fc1 after a bias-free GEMM).
  m.def("bias_gelu_(Tensor(a!) x, Tensor bias) -> Tensor(a!)");
  // x [..., d] += bias (in place, when given), returns layer_norm(x) * weight + ln_bias: the encoder's residual bias
  // add and the next LayerNorm in one pass.
  m.def("add_layer_norm_(Tensor(a!) x, Tensor? bias, Tensor weight, Tensor ln_bias, float eps) -> Tensor");
  // The same two with the result written to the caller's buffer (the encoder's per-thread scratch: fresh 2.3 MB
  // outputs per layer were re-faulted page by page whenever glibc had handed the freed ones back to the kernel).
  m.def("attention_out(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale, Tensor? q_bias, "
        "Tensor? v_bias, Tensor(a!) out) -> Tensor(a!)");
  m.def("add_layer_norm_out(Tensor(a!) x, Tensor? bias, Tensor weight, Tensor ln_bias, float eps, Tensor(b!) out) "
        "-> Tensor(b!)");
  // weight [N, K] float32 -> packed for packed_linear_ (csrc/cpu/linear_avx512.cpp), or an empty tensor where that
  // kernel cannot run (other dtypes, no AVX-512) or would lose to BLAS (K > 1536): keep the BLAS path then.
  m.def("linear_pack(Tensor weight) -> Tensor");
  // out [M, N] = gelu?((accumulate ? out : 0) + x [M, K] W^T + bias) in place, W given by linear_pack (the
  // encoder's Linear layers and conv stem with their bias / GELU / residual add in the GEMM's epilogue).
  m.def("packed_linear_(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias, bool accumulate, bool gelu) -> "
        "Tensor(a!)");
  // out [M, N] += x W^T + bias (a residual add), then normed [M, N] = LayerNorm(out) * ln_weight + ln_bias,
  // returned: the encoder's out-proj and the next LayerNorm, normalised in the GEMM's epilogue where the whole
  // weight fits one column block.
  m.def("packed_linear_norm_(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias, Tensor ln_weight, "
        "Tensor ln_bias, float eps, Tensor(b!) normed) -> Tensor(b!)");
  // spectrum [F, bins, 2] float32 (re, im; torch.view_as_real of an rfft), filters [n_mels, bins] -> [n_mels, F]
  // = max(floor, filters @ (re^2 + im^2)^T): the log-mel front end's power -> mel -> floor in one pass
  // (csrc/cpu/mel.cpp).
  m.def("mel_power(Tensor spectrum, Tensor filters, float floor) -> Tensor");
}

#ifndef EUREKA_FAST_NO_PYTHON
namespace {

// What this build holds and what it picked at run time, for `eureka-audio doctor` and ops.backend_report().
pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu_isa"] = eureka_fast::cpu::cpu_isa_name();
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef __OPTIMIZE__
  info["optimized"] = true;
#else
  info["optimized"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = 0L;
#endif
#if defined(__SANITIZE_ADDRESS__)
  info["asan"] = true;
#else
  info["asan"] = false;
#endif
#ifdef EUREKA_FAST_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_compiled_version"] = eureka_fast::cuda::compiled_cuda_version();
  info["nvcc_version"] = eureka_fast::cuda::compiled_nvcc_version();
#else
  info["with_cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eureka_fast compiled kernels";
  m.def("build_info", &build_info, "What this build holds: CPU ISA picked at run time, compiler, CUDA.");
  m.def(
      "set_cuda_gemm_regimes",
      [](int mask) { return eureka_fast::allowed_gemm_regimes().exchange(mask & eureka_fast::kGemmAllRegimes); },
      "Sets the mask of CUDA grouped-GEMM regimes allowed to run (1 stream, 2 tiled, 4 wgmma, 8 simt); returns the "
      "previous mask.");
  m.def("cuda_gemm_regimes", [] { return eureka_fast::allowed_gemm_regimes().load(); });
}
#endif
