// The meta-step for small multilayer perceptrons on the CPU: Linear and ReLU layers with softmax
// cross-entropy or mean-squared error, as the paper's sinusoid net (1-40-40-1). Each task's whole
// meta-step (K inner steps, the query pass, the reverse sweep with its Hessian-vector products)
// runs as plain loops over raw memory on one thread, tasks in parallel. At these sizes the general
// path's ~130 ATen calls per meta-step cost more than their arithmetic (a few µs of dispatch and
// allocation each, against ~0.1 µs of multiply-adds); here a meta-step allocates its outputs and
// nothing else. The mathematics is csrc/meta_step.cpp's and docs/tangent_rules.md's, the contract
// meta_step.h's; python_tests/test_mlp_path.py checks both against the reference.
#include "mlp_meta_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <variant>
#include <vector>

#include "../checks.h"
#include "../kernels/loss_math.h"
#include "../program_records.h"
#include "../meta_step.h"
#include "vector_isa.h"

namespace maml_ext {
namespace cpu {
namespace {

// Widths above this go to the general path, whose matrix products (MKL / oneDNN) win once a layer
// is large enough to amortise their call overhead.
constexpr int64_t kMaxWidth = 128;

struct MlpLayer {
  bool linear;  // otherwise ReLU
  int64_t in, out;
  bool bias;
  int64_t weight_offset, bias_offset;
};

struct Mlp {
  std::vector<MlpLayer> layers;
  int64_t max_width = 0;
  int64_t output_width = 0;
  int64_t activation_floats = 0;  // Σ over layers of the output width (per sample)
};

// The program as an MLP, or false if it holds another layer or widths that do not chain.
bool parse_mlp(const ProgramRecords& program, int64_t input_width, Mlp& mlp) {
  int64_t width = input_width;
  mlp.max_width = width;
  bool any_linear = false;
  for (const auto& record : program.layers) {
    if (std::holds_alternative<ReLURecord>(record)) {
      mlp.layers.push_back({false, width, width, false, 0, 0});
    } else if (const auto* linear = std::get_if<LinearRecord>(&record)) {
      if (linear->in_features != width) return false;
      mlp.layers.push_back({true, width, linear->out_features, linear->has_bias,
                            linear->weight_offset, linear->bias_offset});
      width = linear->out_features;
      any_linear = true;
    } else {
      return false;
    }
    mlp.max_width = std::max(mlp.max_width, width);
    mlp.activation_floats += width;
  }
  mlp.output_width = width;
  return any_linear;
}

// ---- one task --------------------------------------------------------------------------------

// Per-task buffers start on cache lines (see Problem::param_stride).
constexpr size_t kLine = 64;

template <typename T>
int64_t whole_lines(int64_t n) {
  constexpr int64_t per_line = kLine / sizeof(T);
  return (n + per_line - 1) / per_line * per_line;
}

template <typename T>
T* line_aligned(T* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((address + kLine - 1) / kLine * kLine);
}

// Everything one task's meta-step reads and writes; pointers into the op's tensors.
template <typename T>
struct Problem {
  const Mlp* mlp;
  LossKind loss;
  int64_t params, steps, input_width, support_n, query_n;
  bool first_order;
  const T* theta;                 // [P] shared θ
  const T* theta_transposed;      // [P]: θ with its weights transposed (transpose_weights)
  const T* alpha;                 // [K, P]
  const T* support_x;             // [T, Ns, F]
  const T* query_x;               // [T, Nq, F]
  const int64_t* support_labels;  // [T, Ns] (cross-entropy) or null
  const int64_t* query_labels;
  const T* support_targets;  // [T, Ns, D] (mean-squared error) or null
  const T* query_targets;
  T* query_loss;      // [T]
  T* query_accuracy;  // [T] or null
  T* support_loss;    // [T]
  T* lambda;          // [T, param_stride]: each task's meta-gradient, averaged by the caller
  // P rounded up to whole 64-byte lines: every per-task vector of P (θ_k, g_k, λ) starts on a
  // line: unpadded, most of the weights' 32-byte loads straddle two lines, which slows the
  // products down markedly (bench/NOTES.md).
  int64_t param_stride;
  T* rate_products;  // [T, K, P]: λ_{k+1} ⊙ g_k, for the rate gradient; or null
};

// Per-thread scratch, reused across tasks and calls (grown, never shrunk).
template <typename T>
struct Workspace {
  std::vector<T> buffer;
  T *adapted, *grads, *direction, *wt, *vt, *acts, *tangents, *g[2], *rg[2];
  // Per inner step k: the support pass's layer outputs and the loss gradient at each of them,
  // which the Hessian-vector pass at θ_k reuses instead of recomputing.
  T *tape_outputs, *tape_grads;
  int64_t tape_stride;

  void prepare(const Problem<T>& pb) {
    const int64_t P = pb.param_stride, K = pb.steps;
    const int64_t rows = std::max(pb.support_n, pb.query_n);
    const int64_t act = whole_lines<T>(rows * pb.mlp->activation_floats);
    const int64_t wide = whole_lines<T>(rows * pb.mlp->max_width);
    tape_stride = whole_lines<T>(pb.support_n * pb.mlp->activation_floats);
    // The layout, run once to count and once more to point into the (grown) buffer.
    T* base = nullptr;
    int64_t used = 0;
    auto take = [&](int64_t n) {
      T* q = base ? base + used : nullptr;
      used += n;
      return q;
    };
    auto lay_out = [&] {
      used = 0;
      adapted = take(K * P);
      grads = take(K * P);
      direction = take(P);
      wt = take(P);
      vt = take(P);
      acts = take(act);
      tangents = take(act);
      for (auto& b : g) b = take(wide);
      for (auto& b : rg) b = take(wide);
      tape_outputs = take(K * tape_stride);
      tape_grads = take(K * tape_stride);
    };
    lay_out();
    const auto need = static_cast<size_t>(used) + kLine / sizeof(T);
    if (buffer.size() < need) buffer.assign(need, T(0));
    base = line_aligned(buffer.data());
    lay_out();
  }
};

// Where a pass keeps its layer outputs and the gradients at them: nowhere beyond the pass
// (record == nullptr), recorded on a tape for a later pass at the same weights and data, or
// replayed from such a tape (the primal forward and input gradients are then not recomputed).
template <typename T>
struct TapeUse {
  T* outputs = nullptr;  // [n, Σ widths]: each layer's output, layer after layer
  T* grads = nullptr;    // the same layout: the loss gradient at each layer's output
  bool replay = false;
};

}  // namespace

// The task kernels, compiled for AVX2 + FMA and for baseline x86-64 (for_each_isa.h): the
// extension is built without -march, and 8-wide vectors run these 40-wide products much faster
// than SSE2's four. The whole task loop is compiled both ways, not only the products: its
// element-wise loops (ReLU masks, transposes, biases) cost as much as the products when left to
// SSE2 and to scalar branches.
#define MAML_EXT_PER_ISA_INCLUDE "mlp_task_kernels.h"
#include "for_each_isa.h"

namespace {

// Scratch of the thread that calls the op (grown, never shrunk).
template <typename T>
std::vector<T>& caller_scratch() {
  thread_local std::vector<T> scratch;
  return scratch;
}

template <typename T>
Workspace<T>& thread_workspace() {
  thread_local Workspace<T> workspace;
  return workspace;
}

void check_labels(const at::Tensor& y, int64_t classes, const char* name) {
  const auto [low, high] = at::aminmax(y);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  MAML_CHECK_ARG(lo >= 0 && hi < classes, name, "expected class indices in [0, ", classes,
                 "), got values in [", lo, ", ", hi, "]");
}

}  // namespace

namespace {

// The program as an MLP the path takes (see try_mlp_meta_step), or false.
bool parse_applicable(const at::Tensor& theta, const at::Tensor& support_x,
                      const at::Tensor& query_x, const ProgramRecords& program, Mlp& mlp) {
  if (!theta.device().is_cpu() || support_x.dim() != 3 || query_x.dim() != 3) return false;
  if (support_x.size(2) != query_x.size(2)) return false;
  if (!parse_mlp(program, support_x.size(2), mlp)) return false;
  return mlp.max_width <= kMaxWidth && mlp.layers.size() <= 64;
}

MetaStepResult run_mlp_meta_step(const Mlp& mlp, const ProgramRecords& program, LossKind kind,
                                 const at::Tensor& theta, const at::Tensor& inner_lr,
                                 const at::Tensor& support_x, const at::Tensor& support_y,
                                 const at::Tensor& query_x, const at::Tensor& query_y,
                                 bool first_order, bool inner_lr_grad) {
  const int64_t tasks =
      check_meta_step_args(program, kind, theta, inner_lr, support_x, support_y, query_x, query_y);
  if (kind == LossKind::kCrossEntropy) {
    check_labels(support_y, mlp.output_width, "support_y");
    check_labels(query_y, mlp.output_width, "query_y");
  } else {
    MAML_CHECK_ARG(kind != LossKind::kGaussianNll || mlp.output_width % 2 == 0, "model",
                   "gaussian_nll needs an even number of outputs (means, then log-stds), got ",
                   mlp.output_width);
    for (const auto& [y, name] : {std::pair{&support_y, "support_y"}, {&query_y, "query_y"}}) {
      MAML_CHECK_ARG(y->dim() == 3 && y->size(2) == mlp.output_width, name,
                     "expected targets shaped like the outputs [T, N, ", mlp.output_width,
                     "], got ", y->sizes());
    }
  }

  const int64_t P = theta.size(0), K = inner_lr.size(0);
  const auto options = theta.options();
  auto query_loss = at::empty({tasks}, options);
  auto accuracy = at::empty({kind == LossKind::kCrossEntropy ? tasks : 0}, options);
  auto support_loss = at::empty({tasks}, options);
  auto meta_grad = at::empty({P}, options);
  auto mean_query_loss = at::empty({}, options);
  auto rate_products = inner_lr_grad ? at::empty({tasks, K, P}, options) : at::Tensor();
  const auto th = theta.contiguous(), alpha = inner_lr.contiguous();
  const auto sx = support_x.contiguous(), qx = query_x.contiguous();
  const auto sy = support_y.contiguous(), qy = query_y.contiguous();

  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "mlp_meta_step", [&] {
    using T = scalar_t;
    Problem<T> pb{};
    pb.mlp = &mlp;
    pb.loss = kind;
    pb.params = P;
    pb.steps = K;
    pb.input_width = sx.size(2);
    pb.support_n = sx.size(1);
    pb.query_n = qx.size(1);
    pb.first_order = first_order;
    pb.theta = th.data_ptr<T>();
    pb.alpha = alpha.data_ptr<T>();
    pb.support_x = sx.data_ptr<T>();
    pb.query_x = qx.data_ptr<T>();
    if (kind == LossKind::kCrossEntropy) {
      pb.support_labels = sy.data_ptr<int64_t>();
      pb.query_labels = qy.data_ptr<int64_t>();
    } else {
      pb.support_targets = sy.data_ptr<T>();
      pb.query_targets = qy.data_ptr<T>();
    }
    pb.query_loss = query_loss.data_ptr<T>();
    pb.query_accuracy = accuracy.numel() ? accuracy.data_ptr<T>() : nullptr;
    pb.support_loss = support_loss.data_ptr<T>();
    // The per-task meta-gradients and θ₀'s transposed weights live in the calling thread's
    // scratch, reused across calls (at the sinusoid's size a fresh [T, P] tensor costs as much as
    // several tasks: allocation and first-touch page faults).
    pb.param_stride = whole_lines<T>(P);
    auto& scratch = caller_scratch<T>();
    const auto scratch_size =
        static_cast<size_t>((tasks + 1) * pb.param_stride + kLine / sizeof(T));
    if (scratch.size() < scratch_size) scratch.resize(scratch_size);
    pb.lambda = line_aligned(scratch.data());
    T* theta_transposed = pb.lambda + tasks * pb.param_stride;
    pb.rate_products = inner_lr_grad ? rate_products.data_ptr<T>() : nullptr;

    // Split tasks across threads only when each share is worth a thread hand-off (~tens of µs):
    // multiply-adds per task, counting a Hessian-vector pass as about three gradient passes.
    int64_t macs_per_sample = 0;
    for (const auto& layer : mlp.layers) macs_per_sample += layer.linear ? layer.in * layer.out : 0;
    const int64_t passes = K * (first_order ? 1 : 4);
    const int64_t task_macs = macs_per_sample * 3 * (pb.support_n * passes + pb.query_n);
    constexpr int64_t kMacsPerThread = 1 << 20;
    const int64_t grain = std::max<int64_t>(1, kMacsPerThread / std::max<int64_t>(task_macs, 1));
    MAML_EXT_ISA_DISPATCH(transpose_weights<T>)(mlp, pb.theta, theta_transposed);
    pb.theta_transposed = theta_transposed;
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      auto& ws = thread_workspace<T>();
      ws.prepare(pb);
      MAML_EXT_ISA_DISPATCH(run_tasks<T>)(pb, ws, begin, end);
    });
    // The mean over tasks, summed in task order (deterministic whatever the thread count).
    T* mean = meta_grad.data_ptr<T>();
    std::copy(pb.lambda, pb.lambda + P, mean);
    for (int64_t t = 1; t < tasks; ++t) {
      const T* task = pb.lambda + t * pb.param_stride;
      for (int64_t j = 0; j < P; ++j) mean[j] += task[j];
    }
    const T scale = T(1) / static_cast<T>(tasks);
    for (int64_t j = 0; j < P; ++j) mean[j] *= scale;
    T loss_sum = 0;
    for (int64_t t = 0; t < tasks; ++t) loss_sum += pb.query_loss[t];
    *mean_query_loss.data_ptr<T>() = loss_sum / static_cast<T>(tasks);
  });

  auto rate_grad = inner_lr_grad ? rate_products.sum(0).mul_(-1.0 / static_cast<double>(tasks))
                                 : at::empty({0}, options);
  return {query_loss, accuracy, support_loss, meta_grad, rate_grad, mean_query_loss};
}

}  // namespace

std::optional<MetaStepResult> try_mlp_meta_step(
    const ProgramRecords& program, LossKind loss, const at::Tensor& theta,
    const at::Tensor& inner_lr, const at::Tensor& support_x, const at::Tensor& support_y,
    const at::Tensor& query_x, const at::Tensor& query_y, bool first_order, bool inner_lr_grad) {
  Mlp mlp;
  if (!parse_applicable(theta, support_x, query_x, program, mlp)) return std::nullopt;
  return run_mlp_meta_step(mlp, program, loss, theta, inner_lr, support_x, support_y, query_x,
                           query_y, first_order, inner_lr_grad);
}

MetaStepResult mlp_meta_step(const at::Tensor& theta, const at::Tensor& inner_lr,
                             const at::Tensor& support_x, const at::Tensor& support_y,
                             const at::Tensor& query_x, const at::Tensor& query_y,
                             at::IntArrayRef program, at::ArrayRef<double> program_floats,
                             int64_t loss, bool first_order, bool inner_lr_grad) {
  const auto records = parse_program(program, program_floats);
  const LossKind kind = loss_kind(loss);
  check_meta_step_args(records, kind, theta, inner_lr, support_x, support_y, query_x, query_y);
  auto result = try_mlp_meta_step(records, kind, theta, inner_lr, support_x, support_y, query_x,
                                  query_y, first_order, inner_lr_grad);
  MAML_CHECK_ARG(result.has_value(), "program",
                 "the MLP path takes CPU tensors, inputs [T, N, features] and Linear/ReLU layers "
                 "at most ",
                 kMaxWidth, " wide");
  return *std::move(result);
}

}  // namespace cpu
}  // namespace maml_ext
