#include "program_records.h"

#include <algorithm>
#include <sstream>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace maml_ext {
namespace {

// Reads the int and float lists one field at a time, with a clear error where they run short.
class RecordReader {
 public:
  RecordReader(c10::ArrayRef<int64_t> ints, c10::ArrayRef<double> floats)
      : ints_(ints), floats_(floats) {}

  bool done() const { return int_position_ >= ints_.size(); }
  void start_record(const char* kind) {
    ++record_;
    kind_ = kind;
  }

  int64_t next_int(const char* field) {
    MAML_CHECK_ARG(int_position_ < ints_.size(), "program", "the description ends before field '",
                   field, "' of record ", record_, " (", kind_, ")");
    return ints_[int_position_++];
  }

  template <typename T>
  T read(const char* field) {
    const int64_t value = next_int(field);
    if constexpr (std::is_same_v<T, bool>) {
      MAML_CHECK_ARG(value == 0 || value == 1, "program", "field '", field, "' of record ", record_,
                     " (", kind_, ") is a flag: expected 0 or 1, got ", value);
      return value != 0;
    } else {
      return value;
    }
  }

  double read_float(const char* field) {
    MAML_CHECK_ARG(float_position_ < floats_.size(), "program_floats", "expected a value for '",
                   field, "' of record ", record_, " (", kind_, "), got only ", floats_.size(),
                   " values");
    return floats_[float_position_++];
  }

  // Every float read: a longer float list belongs to another program.
  void finish() const {
    MAML_CHECK_ARG(float_position_ == floats_.size(), "program_floats", "the program's records ",
                   "read ", float_position_, " values, got ", floats_.size());
  }

  int64_t record() const { return record_; }

 private:
  c10::ArrayRef<int64_t> ints_;
  c10::ArrayRef<double> floats_;
  size_t int_position_ = 0, float_position_ = 0;
  int64_t record_ = -1;
  const char* kind_ = "";
};

#define MAML_EXT_READ_INT(type, name) r.name = reader.read<type>(#name);
#define MAML_EXT_READ_FLOAT(name) r.name = reader.read_float(#name);
#define MAML_EXT_NOTHING(...)
#define MAML_EXT_APPEND_SLICE(name, offset_field, numel, present) \
  if (present) slices.push_back({r.offset_field, numel});

#define MAML_EXT_READ_RECORD(Name, kind_code, kind_name, FIELDS)      \
  case kind_code: {                                                   \
    reader.start_record(kind_name);                                   \
    Name##Record r;                                                   \
    FIELDS(MAML_EXT_READ_INT, MAML_EXT_READ_FLOAT, MAML_EXT_NOTHING)  \
    FIELDS(MAML_EXT_NOTHING, MAML_EXT_NOTHING, MAML_EXT_APPEND_SLICE) \
    return r;                                                         \
  }

// "1 (linear), 2 (conv2d), ...": the layer kinds, for error messages.
std::string known_layer_kinds() {
  std::ostringstream kinds;
  const char* separator = "";
#define MAML_EXT_DESCRIBE_KIND(Name, kind_code, kind_name, ...) \
  kinds << separator << kind_code << " (" << kind_name << ")";  \
  separator = ", ";
  MAML_EXT_LAYER_RECORDS(MAML_EXT_DESCRIBE_KIND)
#undef MAML_EXT_DESCRIBE_KIND
  return kinds.str();
}

// One record, its kind code already read; appends its parameter slices.
LayerRecord read_record(int64_t code, RecordReader& reader, std::vector<ParameterSlice>& slices) {
  switch (code) {
    MAML_EXT_LAYER_RECORDS(MAML_EXT_READ_RECORD)
    default:
      break;
  }
  MAML_CHECK_ARG(false, "program", "record ", reader.record() + 1, " has unknown layer kind ", code,
                 "; the kinds are ", known_layer_kinds());
  return {};
}

#undef MAML_EXT_READ_RECORD
#undef MAML_EXT_APPEND_SLICE
#undef MAML_EXT_READ_INT
#undef MAML_EXT_READ_FLOAT

// Every residual_begin is followed, at its own nesting depth, by exactly one residual_shortcut and
// then one residual_end.
void check_residual_nesting(const std::vector<LayerRecord>& layers) {
  // Per open block: has its residual_shortcut been seen?
  std::vector<bool> in_shortcut;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& record = layers[i];
    if (std::holds_alternative<ResidualBeginRecord>(record)) {
      in_shortcut.push_back(false);
    } else if (std::holds_alternative<ResidualShortcutRecord>(record)) {
      MAML_CHECK_ARG(!in_shortcut.empty() && !in_shortcut.back(), "program", "record ", i,
                     " (residual_shortcut) is not inside a residual block's main branch");
      in_shortcut.back() = true;
    } else if (std::holds_alternative<ResidualEndRecord>(record)) {
      MAML_CHECK_ARG(!in_shortcut.empty() && in_shortcut.back(), "program", "record ", i,
                     " (residual_end) does not close a residual block after its residual_shortcut");
      in_shortcut.pop_back();
    }
  }
  MAML_CHECK_ARG(in_shortcut.empty(), "program", in_shortcut.size(),
                 " residual block(s) are not closed by residual_end");
}

}  // namespace

ProgramRecords parse_program(c10::ArrayRef<int64_t> ints, c10::ArrayRef<double> floats) {
  ProgramRecords program;
  RecordReader reader(ints, floats);
  while (!reader.done()) {
    const int64_t code = reader.next_int("the layer kind");
    program.layers.push_back(read_record(code, reader, program.parameters));
  }
  reader.finish();
  check_residual_nesting(program.layers);
  return program;
}

void check_parameters_tile(const ProgramRecords& program, int64_t num_params) {
  MAML_CHECK_ARG(!program.layers.empty(), "program", "expected at least one layer");
  auto slices = program.parameters;
  for (const auto& slice : slices) {
    MAML_CHECK_ARG(
        slice.offset >= 0 && slice.numel >= 0 && slice.offset + slice.numel <= num_params,
        "program", "parameter slice [", slice.offset, ", ", slice.offset + slice.numel,
        ") lies outside the ", num_params, " parameters");
  }
  std::sort(slices.begin(), slices.end(), [](const auto& a, const auto& b) {
    return std::tie(a.offset, a.numel) < std::tie(b.offset, b.numel);
  });
  int64_t covered = 0;
  for (const auto& slice : slices) {
    MAML_CHECK_ARG(slice.offset == covered, "program", "parameter slices must tile [0, ",
                   num_params, ") without gaps or overlaps; found one starting at ", slice.offset,
                   " after ", covered);
    covered = slice.offset + slice.numel;
  }
  MAML_CHECK_ARG(covered == num_params, "program", "parameter slices cover ", covered, " of ",
                 num_params, " parameters");
}

LossKind loss_kind(int64_t code) {
  switch (code) {
#define MAML_EXT_LOSS_CASE(Name, loss_code, ...) \
  case loss_code:                                \
    return LossKind::k##Name;
    MAML_EXT_LOSS_KINDS(MAML_EXT_LOSS_CASE)
#undef MAML_EXT_LOSS_CASE
    default:
      break;
  }
  std::ostringstream valid;
#define MAML_EXT_LOSS_DESCRIPTION(Name, loss_code, python_name, ...) \
  valid << " " << loss_code << " (" << python_name << ")";
  MAML_EXT_LOSS_KINDS(MAML_EXT_LOSS_DESCRIPTION)
#undef MAML_EXT_LOSS_DESCRIPTION
  MAML_CHECK_ARG(false, "loss", "expected one of the loss codes", valid.str(), ", got ", code);
  return LossKind{};
}

const char* loss_name(LossKind kind) {
  switch (kind) {
#define MAML_EXT_LOSS_NAME(Name, loss_code, python_name, ...) \
  case LossKind::k##Name:                                     \
    return python_name;
    MAML_EXT_LOSS_KINDS(MAML_EXT_LOSS_NAME)
#undef MAML_EXT_LOSS_NAME
  }
  return "unknown";
}

bool has_class_targets(LossKind kind) {
  switch (kind) {
#define MAML_EXT_LOSS_TARGETS(Name, loss_code, python_name, class_targets) \
  case LossKind::k##Name:                                                  \
    return class_targets;
    MAML_EXT_LOSS_KINDS(MAML_EXT_LOSS_TARGETS)
#undef MAML_EXT_LOSS_TARGETS
  }
  return false;
}

std::string program_format() {
  std::ostringstream json;
  const char* separator = "";
  // Names are identifiers and python names plain words: nothing to escape.
  auto list_item = [&](const char* name) {
    json << separator << '"' << name << '"';
    separator = ", ";
  };
  json << "{\"layers\": [";
  const char* record_separator = "";
#define MAML_EXT_JSON_INT(type, name) list_item(#name);
#define MAML_EXT_JSON_FLOAT(name) list_item(#name);
#define MAML_EXT_JSON_PARAM(name, ...) list_item(#name);
#define MAML_EXT_JSON_RECORD(Name, kind_code, kind_name, FIELDS)                            \
  json << record_separator << "{\"name\": \"" << kind_name << "\", \"code\": " << kind_code \
       << ", \"int_fields\": [";                                                            \
  separator = "";                                                                           \
  FIELDS(MAML_EXT_JSON_INT, MAML_EXT_NOTHING, MAML_EXT_NOTHING)                             \
  json << "], \"float_fields\": [";                                                         \
  separator = "";                                                                           \
  FIELDS(MAML_EXT_NOTHING, MAML_EXT_JSON_FLOAT, MAML_EXT_NOTHING)                           \
  json << "], \"parameters\": [";                                                           \
  separator = "";                                                                           \
  FIELDS(MAML_EXT_NOTHING, MAML_EXT_NOTHING, MAML_EXT_JSON_PARAM)                           \
  json << "]}";                                                                             \
  record_separator = ", ";
  MAML_EXT_LAYER_RECORDS(MAML_EXT_JSON_RECORD)
#undef MAML_EXT_JSON_RECORD
#undef MAML_EXT_JSON_INT
#undef MAML_EXT_JSON_FLOAT
#undef MAML_EXT_JSON_PARAM
  json << "], \"losses\": [";
  record_separator = "";
#define MAML_EXT_JSON_LOSS(Name, loss_code, python_name, ...)                                 \
  json << record_separator << "{\"name\": \"" << python_name << "\", \"code\": " << loss_code \
       << "}";                                                                                \
  record_separator = ", ";
  MAML_EXT_LOSS_KINDS(MAML_EXT_JSON_LOSS)
#undef MAML_EXT_JSON_LOSS
  json << "]}";
  return json.str();
}

#undef MAML_EXT_NOTHING

}  // namespace maml_ext
