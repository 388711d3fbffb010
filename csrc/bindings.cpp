// The one binding file: the schemas of dreamr's ops (implementations are registered per device in
// cpu/ops_cpu.cpp and cuda/ops_cuda.cpp), the FPSR scheduler class with its enum tables, and the Python
// module `dreamr._C` that loads them.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops_checks.h"
#include "scheduler/fpsr_torch_class.h"

// The build passes -DDREAMR_TORCH_VERSION=2.14.1+cu130 unquoted (quotes do not survive every build
// tool); stringify it here.
#define DREAMR_STRINGIFY_(x) #x
#define DREAMR_STRINGIFY(x) DREAMR_STRINGIFY_(x)
#ifdef DREAMR_TORCH_VERSION
#define DREAMR_TORCH_VERSION_STRING DREAMR_STRINGIFY(DREAMR_TORCH_VERSION)
#else
#define DREAMR_TORCH_VERSION_STRING "unknown"
#endif

namespace dreamr {
namespace {

bool built_with_cuda() {
#ifdef DREAMR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Host-side value checks for kv_rollback, for callers holding Python ints (no device read needed).
void kv_rollback_check(std::vector<int64_t> lengths, std::vector<int64_t> src_row, std::vector<int64_t> src_start,
                       std::vector<int64_t> copy_length, int64_t time) {
  const int64_t batch = static_cast<int64_t>(lengths.size());
  const bool copies = !src_row.empty() || !src_start.empty() || !copy_length.empty();
  if (copies) {
    for (const auto* v : {&src_row, &src_start, &copy_length}) {
      DREAMR_CHECK(static_cast<int64_t>(v->size()) == batch, "kv_rollback: copy_src_row, copy_src_start and "
                   "copy_length must each have one entry per row (B = ", batch, "), got ", v->size());
    }
  }
  check_rollback_values(lengths.data(), copies ? src_row.data() : nullptr, src_start.data(), copy_length.data(), batch,
                        time);
}

// Host-side value checks for kv_compact, for callers holding the plan on the host (CPU tensors) next to
// a device cache: the same shape and value checks the CPU kernel runs, with no device read.
void kv_compact_check(const at::Tensor& src_rows, const at::Tensor& columns, const at::Tensor& counts, int64_t batch,
                      int64_t time) {
  check_compact_values(check_compact_plan(src_rows, columns, counts, at::Device(at::kCPU), batch, time), batch, time);
}

// The numbers of the scheduler's enums (csrc/scheduler/fpsr_scheduler.h), by name: dreamr/scheduler.py
// builds its Python enums from these tables, so no number is copied by hand. Names are Python's
// (UPPER_SNAKE); "Work" holds the bits of a kCancel action's aux.
c10::Dict<std::string, int64_t> scheduler_enum_values(const std::string& name) {
  c10::Dict<std::string, int64_t> d;
  auto add = [&d](const char* key, auto value) { d.insert(key, static_cast<int64_t>(value)); };
  if (name == "ActionKind") {
    add("LAUNCH_DRAFT", ActionKind::kLaunchDraft);
    add("LAUNCH_VERIFY", ActionKind::kLaunchVerify);
    add("LAUNCH_TARGET", ActionKind::kLaunchTarget);
    add("CANCEL", ActionKind::kCancel);
    add("COMMIT_DRAFT", ActionKind::kCommitDraft);
    add("COMMIT_TARGET", ActionKind::kCommitTarget);
    add("FINISH", ActionKind::kFinish);
  } else if (name == "StepEnd") {
    add("NONE", StepEnd::kNone);
    add("EOS", StepEnd::kEos);
    add("ANSWER_MARKER", StepEnd::kAnswerMarker);
  } else if (name == "FinishReason") {
    add("NONE", FinishReason::kNone);
    add("EOS", FinishReason::kEos);
    add("ANSWER_MARKER", FinishReason::kAnswerMarker);
    add("BUDGET", FinishReason::kBudget);
    add("ABORTED", FinishReason::kAborted);
  } else if (name == "TargetLaunch") {
    add("EAGER", TargetLaunch::kEager);
    add("ON_REJECT", TargetLaunch::kOnReject);
  } else if (name == "Work") {
    add("WORK_DRAFT", kWorkDraft);
    add("WORK_VERIFY", kWorkVerify);
    add("WORK_TARGET", kWorkTarget);
  } else {
    C10_THROW_ERROR(ValueError, "enum_values: name must be one of ActionKind, StepEnd, FinishReason, "
                                "TargetLaunch, Work; got '" + name + "'");
  }
  return d;
}

}  // namespace

TORCH_LIBRARY(dreamr, m) {
  m.def(
      "cpn_verify(Tensor hidden, Tensor lm_head_weight, Tensor? lm_head_bias, int[] positive_ids, "
      "int[] negative_ids, float alpha, float logit_softcap=0.0) -> (Tensor cpn, Tensor accept)");
  m.def("cpn_window_accept(Tensor cpn, Tensor valid, float alpha) -> (Tensor num_accepted, Tensor accept)");
  m.def(
      "kv_rollback_(Tensor(a!)[] cache, Tensor lengths, Tensor? copy_src_row, Tensor? copy_src_start, "
      "Tensor? copy_length) -> Tensor new_lengths");
  m.def("kv_compact_(Tensor(a!)[] cache, Tensor src_rows, Tensor columns, Tensor counts) -> ()");
  m.def(
      "speculative_sample(Tensor draft_probs, Tensor draft_ids, Tensor target_probs, Tensor uniforms) "
      "-> (Tensor tokens, Tensor num_accepted)");
  m.def("greedy_verify(Tensor draft_ids, Tensor target_logits) -> (Tensor tokens, Tensor num_accepted)");
  m.def("kv_rollback_check(int[] lengths, int[] copy_src_row, int[] copy_src_start, int[] copy_length, int time) -> ()",
        &kv_rollback_check);
  m.def("kv_compact_check(Tensor src_rows, Tensor columns, Tensor counts, int batch, int time) -> ()",
        &kv_compact_check);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // torch.classes.dreamr.FpsrScheduler, with its enum tables as a static method
  register_fpsr_scheduler_class(m).def_static("enum_values", &scheduler_enum_values);
}

}  // namespace dreamr

// `import dreamr._C` loads this library, which registers the ops above with the dispatcher; the module
// itself only carries the torch version it was built against (checked by dreamr/_extension.py).
static PyModuleDef dreamr_module = {PyModuleDef_HEAD_INIT, "_C", "dreamr's compiled core", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dreamr_module);
  if (module != nullptr && PyModule_AddStringConstant(module, "__torch_version__", DREAMR_TORCH_VERSION_STRING) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
