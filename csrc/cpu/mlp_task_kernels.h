// The per-task kernels of the MLP meta-step (mlp_meta_step.cpp): the forward/backward/tangent
// pass of one task on its samples, and the task's whole meta-step built from such passes, on the
// small products of small_gemm.h.
//
// Compiled once per instruction set (for_each_isa.h, from mlp_meta_step.cpp): no include guard,
// no includes but small_gemm.h. It uses the types mlp_meta_step.cpp declares before it (Mlp,
// Problem, Workspace, TapeUse) and kernels/loss_math.h.

#include "small_gemm.h"

// θ with every Linear weight [out, in] replaced by its transpose [in, out] (biases untouched:
// the passes read them from θ).
template <typename T>
void transpose_weights(const Mlp& mlp, const T* theta, T* theta_t) {
  for (const auto& layer : mlp.layers) {
    if (layer.linear) {
      transpose(theta + layer.weight_offset, theta_t + layer.weight_offset, layer.out, layer.in);
    }
  }
}

// out[e] = values[e] where the ReLU's input x[e] > 0, else 0: its derivative applied to values
// (a tangent forward, a gradient or its tangent backward). values is read unconditionally, so the
// loop is a vector blend, not a branch per element.
template <typename T>
void relu_masked(const T* x, const T* values, T* out, int64_t size) {
  for (int64_t e = 0; e < size; ++e) {
    const T value = values[e];
    out[e] = x[e] > T(0) ? value : T(0);
  }
}

// One task's samples: inputs x [n, F] with class labels [n] (cross-entropy) or targets [n, D]
// (mean-squared error; the other pointer null).
template <typename T>
struct Samples {
  const T* x;
  int64_t n;
  const int64_t* labels;
  const T* targets;
};

// What one pass computes, and where (pass()). Null pointers: not computed.
template <typename T>
struct PassArgs {
  const T* theta;              // [P] the weights θ the pass runs at
  const T* theta_t;            // θ's weights transposed (transpose_weights), or null: done here
  const T* tangent = nullptr;  // [P] v, for pass<true>: the pass adds H v to hv
  Samples<T> samples;
  T* grad = nullptr;      // [P] written: the gradient of the mean loss at θ
  T* hv = nullptr;        // [P] incremented by H v (with tangent)
  T* accuracy = nullptr;  // written: the fraction of rows classified right (cross-entropy)
  TapeUse<T> tape = {};   // layer outputs and gradients: kept nowhere, recorded, or replayed
};

// One forward + backward at weights a.theta on a.samples: writes the gradient (a.grad) and, with
// kTangent, carries the tangent v = a.tangent and adds H v to a.hv. Returns the mean loss.
// kTangent is a template flag so that the gradient-only passes compile without the tangent's code.
template <bool kTangent, typename T>
T pass(const Problem<T>& pb, Workspace<T>& ws, const PassArgs<T>& a) {
  const T* theta = a.theta;
  const T* v = kTangent ? a.tangent : nullptr;
  const T* x = a.samples.x;
  const int64_t n = a.samples.n;
  T* grad = a.grad;
  T* hv = a.hv;
  const TapeUse<T> tape = a.tape;
  const auto& layers = pb.mlp->layers;
  const size_t depth = layers.size();
  // Inputs of each layer and their tangents (null: zero tangent), kept for the backward pass.
  const T* inputs[64];
  const T* input_tangents[64];
  const T* wt = a.theta_t;
  if (!wt) {
    transpose_weights(*pb.mlp, theta, ws.wt);
    wt = ws.wt;
  }
  if (v) transpose_weights(*pb.mlp, v, ws.vt);
  const bool replay = tape.replay;
  const T* h = x;
  const T* rh = nullptr;
  T* act = tape.outputs ? tape.outputs : ws.acts;
  T* tan = ws.tangents;
  int64_t offsets[64];  // of each layer's output within act (and within tape.grads)
  for (size_t l = 0; l < depth; ++l) {
    const auto& L = layers[l];
    inputs[l] = h;
    input_tangents[l] = rh;
    offsets[l] = act - (tape.outputs ? tape.outputs : ws.acts);
    const int64_t size = n * L.out;
    if (L.linear) {
      if (!replay) {
        times_transposed<T>({h, wt + L.weight_offset}, L.bias ? theta + L.bias_offset : nullptr,
                            act, n, L.in, L.out);
      }
      if (v) {
        // R{y} = x Vᵀ + v_b + R{x} Wᵀ
        Operands<T> terms{h, ws.vt + L.weight_offset};
        if (rh) terms.a2 = rh, terms.b2 = wt + L.weight_offset;
        times_transposed(terms, L.bias ? v + L.bias_offset : nullptr, tan, n, L.in, L.out);
        rh = tan;
      }
    } else {
      if (!replay) {
        for (int64_t e = 0; e < size; ++e) act[e] = h[e] > T(0) ? h[e] : T(0);
      }
      if (rh) {
        relu_masked(h, rh, tan, size);
        rh = tan;
      }
    }
    h = act;
    act += size;
    tan += size;
  }

  // The loss at the outputs z = h [n, D]: gradient gz and, with a tangent, R{gz}.
  const int64_t D = pb.mlp->output_width;
  T* gy = tape.grads ? tape.grads + offsets[depth - 1] : ws.g[0];
  T* rgy = ws.rg[0];
  if (v && !rh) std::fill(rgy, rgy + n * D, T(0));  // outputs independent of θ: zero tangent
  T total;
  if (pb.loss == LossKind::kCrossEntropy) {
    total = kernels::mean_cross_entropy<T>(h, rh, a.samples.labels, n, D, gy, rh ? rgy : nullptr,
                                           a.accuracy);
  } else if (pb.loss == LossKind::kGaussianNll) {
    total = kernels::mean_gaussian_nll<T>(h, rh, a.samples.targets, n, D, gy, rh ? rgy : nullptr);
  } else {
    total = kernels::mean_squared_error<T>(h, rh, a.samples.targets, n * D, gy, rh ? rgy : nullptr);
  }

  int which = 0;
  for (size_t l = depth; l-- > 0;) {
    const auto& L = layers[l];
    const bool need_input_grad = l > 0;
    T* gx = tape.grads && l > 0 ? tape.grads + offsets[l - 1] : ws.g[1 - which];
    T* rgx = ws.rg[1 - which];
    const T* xin = inputs[l];
    const T* rxin = input_tangents[l];
    if (L.linear) {
      const T* w = theta + L.weight_offset;
      if (grad) {
        weight_gradient<T>({gy, xin}, grad + L.weight_offset,
                           L.bias ? grad + L.bias_offset : nullptr, n, L.in, L.out, false);
      }
      if (v) {
        // R{gW} = R{gy}ᵀ x + gyᵀ R{x};  R{gb} = Σ R{gy}
        Operands<T> terms{rgy, xin};
        if (rxin) terms.a2 = gy, terms.b2 = rxin;
        weight_gradient(terms, hv + L.weight_offset, L.bias ? hv + L.bias_offset : nullptr, n, L.in,
                        L.out, true);
      }
      if (need_input_grad) {
        if (!replay) times_weight<T>({gy, w}, gx, n, L.in, L.out);
        if (v) {
          // R{gx} = R{gy} W + gy V
          times_weight<T>({rgy, w, gy, v + L.weight_offset}, rgx, n, L.in, L.out);
        }
      }
    } else if (need_input_grad) {
      const int64_t size = n * L.out;
      if (!replay) relu_masked(xin, gy, gx, size);
      if (v) relu_masked(xin, rgy, rgx, size);
    }
    gy = gx;
    rgy = rgx;
    which = 1 - which;
  }
  return total;
}

// Task t's whole meta-step: the inner loop, the query pass, the reverse sweep.
template <typename T>
void run_task(const Problem<T>& pb, Workspace<T>& ws, int64_t t) {
  const int64_t S = pb.param_stride;
  const int64_t P = pb.params, K = pb.steps, F = pb.input_width;
  const int64_t D = pb.mlp->output_width;
  const Samples<T> support{
      pb.support_x + t * pb.support_n * F, pb.support_n,
      pb.support_labels ? pb.support_labels + t * pb.support_n : nullptr,
      pb.support_targets ? pb.support_targets + t * pb.support_n * D : nullptr};
  const Samples<T> query{pb.query_x + t * pb.query_n * F, pb.query_n,
                         pb.query_labels ? pb.query_labels + t * pb.query_n : nullptr,
                         pb.query_targets ? pb.query_targets + t * pb.query_n * D : nullptr};
  auto theta_at = [&](int64_t k) { return k == 0 ? pb.theta : ws.adapted + (k - 1) * S; };
  // θ₀'s transposed weights are shared by all tasks; the adapted ones are transposed per pass.
  auto transposed_at = [&](int64_t k) { return k == 0 ? pb.theta_transposed : nullptr; };

  for (int64_t k = 0; k < K; ++k) {
    T* g = ws.grads + k * S;
    const TapeUse<T> record{ws.tape_outputs + k * ws.tape_stride,
                            ws.tape_grads + k * ws.tape_stride, false};
    const T loss = pass</*kTangent=*/false>(pb, ws,
                                            {.theta = theta_at(k),
                                             .theta_t = transposed_at(k),
                                             .samples = support,
                                             .grad = g,
                                             .tape = pb.first_order ? TapeUse<T>{} : record});
    if (k == 0) pb.support_loss[t] = loss;
    // θ_{k+1} = θ_k − α_k ⊙ g_k
    const T* theta = theta_at(k);
    const T* alpha = pb.alpha + k * P;
    T* next = ws.adapted + k * S;
    for (int64_t j = 0; j < P; ++j) next[j] = theta[j] - alpha[j] * g[j];
  }

  T* lambda = pb.lambda + t * S;
  pb.query_loss[t] =
      pass</*kTangent=*/false>(pb, ws,
                               {.theta = theta_at(K),
                                .theta_t = transposed_at(K),
                                .samples = query,
                                .grad = lambda,
                                .accuracy = pb.query_accuracy ? pb.query_accuracy + t : nullptr});

  for (int64_t k = K - 1; k >= 0; --k) {
    const T* g = ws.grads + k * S;
    if (pb.rate_products) {
      T* product = pb.rate_products + (t * K + k) * P;
      for (int64_t j = 0; j < P; ++j) product[j] = lambda[j] * g[j];
    }
    if (!pb.first_order) {
      // λ_k = λ_{k+1} − H_S(θ_k)(α_k ⊙ λ_{k+1}) = λ_{k+1} + H_S(θ_k)(−α_k ⊙ λ_{k+1}): the
      // pass adds H v into λ as it goes (negating v is exact), with no H v buffer and no
      // subtraction pass. The primal pass at θ_k is on the tape.
      const T* alpha = pb.alpha + k * P;
      for (int64_t j = 0; j < P; ++j) ws.direction[j] = -alpha[j] * lambda[j];
      const TapeUse<T> replay{ws.tape_outputs + k * ws.tape_stride,
                              ws.tape_grads + k * ws.tape_stride, true};
      pass</*kTangent=*/true>(pb, ws,
                              {.theta = theta_at(k),
                               .theta_t = transposed_at(k),
                               .tangent = ws.direction,
                               .samples = support,
                               .hv = lambda,
                               .tape = replay});
    }
  }
}

template <typename T>
MAML_NOINLINE void run_tasks(const Problem<T>& pb, Workspace<T>& ws, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(pb, ws, t);
}
