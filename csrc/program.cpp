#include "program.h"

#include <variant>

#include "checks.h"
#include "loss_head.h"

namespace maml_ext {
namespace {

// Images travel sample-major inside the program ([N, T, C, H, W] stored as N, H, W, T, C; see
// layers/layer.h); the program's inputs and outputs are task-major ([T, N, ...]).
at::Tensor to_sample_major(const at::Tensor& x) {
  if (x.dim() != 5) return x;
  return x.permute({1, 3, 4, 0, 2}).contiguous().permute({0, 3, 4, 1, 2});
}

at::Tensor to_task_major(const at::Tensor& x) {
  return x.dim() == 5 ? x.transpose(0, 1).contiguous() : x;
}

// The layers of one branch, from records[position] up to the residual_shortcut or residual_end
// that closes it (or the program's end); `position` is left on that record. The peephole pass:
// each record is first offered to the layer before it (Layer::absorb), which may run it in its own
// epilogue (a batch norm takes the ReLU after it, and a 2×2 max-pool after that); a record not
// absorbed gets its own layer, which is linked to the one before (Layer::link: a convolution hands
// the statistics of its output to a batch norm after it). A residual block's records become one
// layer holding both branches (parse_program has checked that they nest); no fusion crosses its
// edges.
std::vector<std::unique_ptr<Layer>> build_branch(const std::vector<LayerRecord>& records,
                                                 size_t& position) {
  std::vector<std::unique_ptr<Layer>> layers;
  while (position < records.size()) {
    const auto& record = records[position];
    if (std::holds_alternative<ResidualShortcutRecord>(record) ||
        std::holds_alternative<ResidualEndRecord>(record)) {
      break;
    }
    ++position;
    if (std::holds_alternative<ResidualBeginRecord>(record)) {
      auto main = build_branch(records, position);
      ++position;  // residual_shortcut
      auto shortcut = build_branch(records, position);
      ++position;  // residual_end
      layers.push_back(make_residual_block(std::move(main), std::move(shortcut)));
      continue;
    }
    if (!layers.empty() && layers.back()->absorb(record)) continue;
    auto layer = std::visit([](const auto& r) { return make_layer(r); }, record);
    if (!layers.empty()) layers.back()->link(*layer);
    layers.push_back(std::move(layer));
  }
  return layers;
}

}  // namespace

Program::Program(const ProgramRecords& records, std::optional<LossKind> loss) : loss_(loss) {
  MAML_CHECK_ARG(!records.layers.empty(), "program", "expected at least one layer");
  size_t position = 0;
  layers_ = build_branch(records.layers, position);
  TORCH_INTERNAL_ASSERT(position == records.layers.size(), "maml_ext: unbalanced residual records");
}

at::Tensor Program::forward(const at::Tensor& theta, const at::Tensor& x) {
  PassParams p{theta, at::Tensor(), at::Tensor(), at::Tensor()};
  at::Tensor h = to_sample_major(x), rh;
  for (auto& layer : layers_) layer->forward(p, h, rh);
  return to_task_major(h);
}

LossValue Program::gradient(const PassParams& p, const at::Tensor& x, const at::Tensor& y) {
  TORCH_INTERNAL_ASSERT(loss_.has_value(), "maml_ext: Program::gradient needs a loss kind");
  at::Tensor z = to_sample_major(x), rz;
  for (auto& layer : layers_) layer->forward(p, z, rz);
  const bool image_output = z.dim() == 5;
  z = to_task_major(z);
  if (rz.defined()) rz = to_task_major(rz);
  if (p.carries_tangent() && !rz.defined()) rz = at::zeros_like(z);

  auto head = loss_head(*loss_, z, rz, y);
  at::Tensor gz = std::move(head.grad), rgz = std::move(head.grad_tangent);
  if (image_output) {
    gz = to_sample_major(gz);
    if (rgz.defined()) rgz = to_sample_major(rgz);
  }
  for (size_t i = layers_.size(); i-- > 0;) layers_[i]->backward(p, gz, rgz, i > 0);
  return {head.loss, head.accuracy};
}

void Program::backward(const PassParams& p, const at::Tensor& grad_output) {
  at::Tensor g = to_sample_major(grad_output), rg;
  for (size_t i = layers_.size(); i-- > 0;) layers_[i]->backward(p, g, rg, i > 0);
}

LossValue Program::gradient_with_input_grad(const PassParams& p, const at::Tensor& x,
                                            const at::Tensor& y, at::Tensor& input_grad,
                                            at::Tensor& input_grad_tangent) {
  TORCH_INTERNAL_ASSERT(loss_.has_value(), "maml_ext: Program::gradient needs a loss kind");
  at::Tensor z = to_sample_major(x), rz;
  for (auto& layer : layers_) layer->forward(p, z, rz);
  const bool image_output = z.dim() == 5;
  z = to_task_major(z);
  if (rz.defined()) rz = to_task_major(rz);
  if (p.carries_tangent() && !rz.defined()) rz = at::zeros_like(z);

  auto head = loss_head(*loss_, z, rz, y);
  at::Tensor gz = std::move(head.grad), rgz = std::move(head.grad_tangent);
  if (image_output) {
    gz = to_sample_major(gz);
    if (rgz.defined()) rgz = to_sample_major(rgz);
  }
  for (size_t i = layers_.size(); i-- > 0;) layers_[i]->backward(p, gz, rgz, true);
  input_grad = to_task_major(gz);
  input_grad_tangent = rgz.defined() ? to_task_major(rgz) : at::Tensor();
  return {head.loss, head.accuracy};
}

}  // namespace maml_ext
