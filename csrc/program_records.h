// The layer program's record format, defined once. maml_ext/program.py writes a model as an int
// list (one record per layer: its kind's code, then its int fields in order) and a float list (the
// float fields of all records, in record order); the C++ side reads both into the named records
// below. Every reader (the Program builder, the parameter slices, the CPU MLP path) uses these
// structs, and the table program_format() exports to Python (which checks its own copy against it
// at import) is generated from the same lists.
//
// Adding a layer kind: one line in MAML_EXT_LAYER_RECORDS (with a field list if it has fields), one
// Layer class defining make_layer for the new record (csrc/layers/), and the Python compiler
// (maml_ext/program.py). docs/adding_a_layer.md walks through it with Tanh.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

// ---- field lists -----------------------------------------------------------------------------
// Each list names a record's fields in the order program.py writes them:
//   INT(type, name)    an int field (int64_t, or bool written as 0/1);
//   FLOAT(name)        a float field, read from the float list;
//   PARAM(name, offset_field, numel, present)
//                      a parameter tensor of the layer: the slice [offset, offset + numel) of θ,
//                      which exists when `present`; numel and present are expressions in the
//                      record `r`. The slices of all records must tile θ.

#define MAML_EXT_LINEAR_FIELDS(INT, FLOAT, PARAM)                   \
  INT(int64_t, in_features)                                         \
  INT(int64_t, out_features)                                        \
  INT(bool, has_bias)                                               \
  INT(int64_t, weight_offset)                                       \
  INT(int64_t, bias_offset)                                         \
  PARAM(weight, weight_offset, r.in_features* r.out_features, true) \
  PARAM(bias, bias_offset, r.out_features, r.has_bias)

#define MAML_EXT_CONV2D_FIELDS(INT, FLOAT, PARAM)                                           \
  INT(int64_t, in_channels)                                                                 \
  INT(int64_t, out_channels)                                                                \
  INT(int64_t, kernel_h)                                                                    \
  INT(int64_t, kernel_w)                                                                    \
  INT(int64_t, stride_h)                                                                    \
  INT(int64_t, stride_w)                                                                    \
  INT(int64_t, padding_h)                                                                   \
  INT(int64_t, padding_w)                                                                   \
  INT(bool, has_bias)                                                                       \
  INT(int64_t, weight_offset)                                                               \
  INT(int64_t, bias_offset)                                                                 \
  PARAM(weight, weight_offset, r.out_channels* r.in_channels* r.kernel_h* r.kernel_w, true) \
  PARAM(bias, bias_offset, r.out_channels, r.has_bias)

// spatial: BatchNorm2d (images) rather than BatchNorm1d (features).
#define MAML_EXT_BATCH_NORM_FIELDS(INT, FLOAT, PARAM) \
  INT(int64_t, channels)                              \
  INT(bool, spatial)                                  \
  INT(bool, affine)                                   \
  INT(int64_t, weight_offset)                         \
  INT(int64_t, bias_offset)                           \
  FLOAT(eps)                                          \
  PARAM(weight, weight_offset, r.channels, r.affine)  \
  PARAM(bias, bias_offset, r.channels, r.affine)

#define MAML_EXT_MAX_POOL2D_FIELDS(INT, FLOAT, PARAM) \
  INT(int64_t, kernel_h)                              \
  INT(int64_t, kernel_w)                              \
  INT(int64_t, stride_h)                              \
  INT(int64_t, stride_w)                              \
  INT(int64_t, padding_h)                             \
  INT(int64_t, padding_w)                             \
  INT(bool, ceil_mode)

// y = x where x > 0, negative_slope · x elsewhere.
#define MAML_EXT_LEAKY_RELU_FIELDS(INT, FLOAT, PARAM) FLOAT(negative_slope)

#define MAML_EXT_NO_FIELDS(INT, FLOAT, PARAM)

// y = [x | log_std] on features [T, N, features]: a state-independent log-std parameter appended
// to a Gaussian policy's means (the outputs gaussian_nll reads).
#define MAML_EXT_APPEND_LOG_STD_FIELDS(INT, FLOAT, PARAM) \
  INT(int64_t, features)                                  \
  INT(int64_t, log_std_offset)                            \
  PARAM(log_std, log_std_offset, r.features, true)

// ---- the layer kinds: X(Name, code, "python name", field list) ---------------------------------
// Codes are the program's; never reuse one.
//
// A residual block out = main(x) + shortcut(x) is written as
//   residual_begin, <main's records>, residual_shortcut, <shortcut's records>, residual_end
// (an empty shortcut is the identity; blocks nest). These three records are structure, not layers:
// Program builds one block layer from them (layers/residual.cpp); parse_program checks that they
// nest.
#define MAML_EXT_LAYER_RECORDS(X)                                  \
  X(Linear, 1, "linear", MAML_EXT_LINEAR_FIELDS)                   \
  X(Conv2d, 2, "conv2d", MAML_EXT_CONV2D_FIELDS)                   \
  X(BatchNorm, 3, "batch_norm", MAML_EXT_BATCH_NORM_FIELDS)        \
  X(ReLU, 4, "relu", MAML_EXT_NO_FIELDS)                           \
  X(MaxPool2d, 5, "max_pool2d", MAML_EXT_MAX_POOL2D_FIELDS)        \
  X(Flatten, 6, "flatten", MAML_EXT_NO_FIELDS)                     \
  X(Tanh, 7, "tanh", MAML_EXT_NO_FIELDS)                           \
  X(LeakyReLU, 8, "leaky_relu", MAML_EXT_LEAKY_RELU_FIELDS)        \
  X(ResidualBegin, 9, "residual_begin", MAML_EXT_NO_FIELDS)        \
  X(ResidualShortcut, 10, "residual_shortcut", MAML_EXT_NO_FIELDS) \
  X(ResidualEnd, 11, "residual_end", MAML_EXT_NO_FIELDS)           \
  X(AppendLogStd, 12, "append_log_std", MAML_EXT_APPEND_LOG_STD_FIELDS)

// ---- the loss kinds: X(Name, code, "python name", targets are class indices) -------------------
// The ops take the code (their `int loss` argument); loss_kind() is the one place that checks it.
#define MAML_EXT_LOSS_KINDS(X)              \
  X(CrossEntropy, 1, "cross_entropy", true) \
  X(MeanSquaredError, 2, "mse", false)      \
  X(GaussianNll, 3, "gaussian_nll", false)

namespace maml_ext {

// ---- generated: one struct per layer kind ----------------------------------------------------

#define MAML_EXT_RECORD_INT_MEMBER(type, name) type name{};
#define MAML_EXT_RECORD_FLOAT_MEMBER(name) double name{};
#define MAML_EXT_RECORD_NO_MEMBER(...)
#define MAML_EXT_DEFINE_RECORD(Name, kind_code, kind_name, FIELDS)                              \
  struct Name##Record {                                                                         \
    static constexpr int64_t code = kind_code;                                                  \
    static constexpr const char* name = kind_name;                                              \
    FIELDS(MAML_EXT_RECORD_INT_MEMBER, MAML_EXT_RECORD_FLOAT_MEMBER, MAML_EXT_RECORD_NO_MEMBER) \
  };
MAML_EXT_LAYER_RECORDS(MAML_EXT_DEFINE_RECORD)
#undef MAML_EXT_DEFINE_RECORD

namespace detail {
template <typename Unused, typename... Records>
struct RecordVariant {
  using type = std::variant<Records...>;
};
}  // namespace detail

// One layer record of any kind.
#define MAML_EXT_RECORD_TYPE(Name, ...) , Name##Record
using LayerRecord = detail::RecordVariant<void MAML_EXT_LAYER_RECORDS(MAML_EXT_RECORD_TYPE)>::type;
#undef MAML_EXT_RECORD_TYPE

// ---- generated: the loss kinds ---------------------------------------------------------------

#define MAML_EXT_LOSS_ENUMERATOR(Name, code, ...) k##Name = code,
enum class LossKind : int64_t { MAML_EXT_LOSS_KINDS(MAML_EXT_LOSS_ENUMERATOR) };
#undef MAML_EXT_LOSS_ENUMERATOR

// The loss kind of an op's `loss` argument; raises, naming the argument and the valid codes, for
// any other value.
LossKind loss_kind(int64_t code);

// The loss's name in Python ("cross_entropy", "mse").
const char* loss_name(LossKind kind);

// True when the loss's targets are class indices [T, N] (int64), not values shaped like the
// outputs.
bool has_class_targets(LossKind kind);

// ---- parsed programs ---------------------------------------------------------------------------

// One parameter tensor's slice [offset, offset + numel) of the flat θ.
struct ParameterSlice {
  int64_t offset;
  int64_t numel;
};

// A program description read into records.
struct ProgramRecords {
  std::vector<LayerRecord> layers;
  // Every parameter tensor of the layers, in record order (a layer's weight before its bias): the
  // order of program.py's slots and of meta_gradient's parameter list.
  std::vector<ParameterSlice> parameters;
};

// Reads a program description (ints and floats as program.py writes them); raises, naming the
// argument ('program' or 'program_floats') and the record, where it is malformed.
ProgramRecords parse_program(c10::ArrayRef<int64_t> ints, c10::ArrayRef<double> floats);

// Checks that the program has at least one layer and that its parameter slices tile
// [0, num_params) without gaps or overlaps.
void check_parameters_tile(const ProgramRecords& program, int64_t num_params);

// The record format as JSON: {"layers": [{"name", "code", "int_fields", "float_fields",
// "parameters"}, ...], "losses": [{"name", "code"}, ...]}. maml_ext/program.py checks its own
// table against it at import (op maml_ext::program_format).
std::string program_format();

}  // namespace maml_ext
