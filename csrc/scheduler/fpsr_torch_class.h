// The FPSR scheduler as a TorchScript custom class, torch.classes.dreamr.FpsrScheduler.
//
// Included by csrc/bindings.cpp (the only translation unit that should: torch/custom_class.h is heavy),
// which calls dreamr::register_fpsr_scheduler_class(m) inside its TORCH_LIBRARY(dreamr, m) block.
//
// Python view (all plain ints, floats and bools; the numbers are those of fpsr_scheduler.h):
//   s = torch.classes.dreamr.FpsrScheduler(window=4, alpha=0.7, target_launch=0,
//                                          max_active_requests=0, max_step_tokens=0)
//   s.add_request(budget_tokens, budget_steps=0, drafting=True) -> int request id
//   s.poll() -> List[Tuple[int, int, int, int, int, int, int]]
//       (kind, request, slot, epoch, step, tokens, aux), kinds:
//       0 LAUNCH_DRAFT   tokens = max tokens of the step
//       1 LAUNCH_VERIFY  tokens = the drafted step's tokens
//       2 LAUNCH_TARGET  tokens = max tokens; aux = epoch of the committed target branch to continue, or -1
//       3 CANCEL         aux = mask: 1 draft, 2 verify, 4 target
//       4 COMMIT_DRAFT   tokens, aux = end (0 none, 1 eos, 2 answer marker)
//       5 COMMIT_TARGET  tokens, aux = end
//       6 FINISH         slot = epoch = -1, step = committed steps, tokens = committed tokens,
//                        aux = reason (1 eos, 2 answer marker, 3 budget, 4 aborted)
//   s.on_draft_step(request, slot, epoch, tokens, end)
//   s.on_verification(request, slot, epoch, cpn)       # the scheduler applies cpn > alpha
//   s.on_verdict(request, slot, epoch, accepted)       # a verdict decided by the cpn ops
//   s.on_target_step(request, slot, epoch, tokens, end)
//   s.set_budget(request, budget_tokens); s.abort(request); s.set_drafting(request, drafting)
//   s.accepts(cpn) -> bool; s.done(request) -> bool; s.all_done() -> bool; s.finish_reason(request) -> int
//   s.slot_epoch(request, slot) -> int; s.info(request) -> Dict[str, int]; s.stats() -> Dict[str, int]
//   s.num_requests() / s.num_active() / s.num_waiting() -> int; s.window() -> int; s.alpha() -> float
//   FpsrScheduler.enum_values(name) -> Dict[str, int]   (static; added in csrc/bindings.cpp): the names and
//       numbers of ActionKind, StepEnd, FinishReason, TargetLaunch and Work (the cancel bits)
// Bad arguments raise ValueError with the scheduler's message (which names the argument and value).
#pragma once

#include <torch/custom_class.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fpsr_scheduler.h"

namespace dreamr {

struct FpsrSchedulerHolder : torch::CustomClassHolder {
  using ActionTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

  FpsrScheduler scheduler;

  static Config make_config(int64_t window, double alpha, int64_t target_launch, int64_t max_active_requests,
                            int64_t max_step_tokens) {
    Config c;
    c.window = window;
    c.alpha = alpha;
    c.target_launch = static_cast<TargetLaunch>(target_launch);
    c.max_active_requests = max_active_requests;
    c.max_step_tokens = max_step_tokens;
    return c;
  }

  FpsrSchedulerHolder(int64_t window, double alpha, int64_t target_launch, int64_t max_active_requests,
                      int64_t max_step_tokens)
      : scheduler(guard([&] {
          return FpsrScheduler(make_config(window, alpha, target_launch, max_active_requests, max_step_tokens));
        })) {}

  // Runs fn, turning the scheduler's std::invalid_argument into a c10::ValueError (Python ValueError).
  template <typename Fn>
  static auto guard(Fn&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const std::invalid_argument& e) {
      C10_THROW_ERROR(ValueError, e.what());
    }
  }

  std::vector<ActionTuple> poll() {
    std::vector<ActionTuple> out;
    for (const Action& a : scheduler.poll())
      out.emplace_back(static_cast<int64_t>(a.kind), a.request, a.slot, a.epoch, a.step, a.tokens, a.aux);
    return out;
  }

  static c10::Dict<std::string, int64_t> stats_dict(const Stats& s) {
    c10::Dict<std::string, int64_t> d;
    d.insert("requests_added", s.requests_added);
    d.insert("requests_finished", s.requests_finished);
    d.insert("finished_eos", s.finished_eos);
    d.insert("finished_answer_marker", s.finished_answer_marker);
    d.insert("finished_budget", s.finished_budget);
    d.insert("finished_aborted", s.finished_aborted);
    d.insert("drafts_launched", s.drafts_launched);
    d.insert("verifications_launched", s.verifications_launched);
    d.insert("targets_launched", s.targets_launched);
    d.insert("targets_continued", s.targets_continued);
    d.insert("undrafted_steps", s.undrafted_steps);
    d.insert("drafts_completed", s.drafts_completed);
    d.insert("verifications", s.verifications);
    d.insert("targets_completed", s.targets_completed);
    d.insert("accepted", s.accepted);
    d.insert("rejected", s.rejected);
    d.insert("steps_committed_draft", s.steps_committed_draft);
    d.insert("steps_committed_target", s.steps_committed_target);
    d.insert("tokens_committed_draft", s.tokens_committed_draft);
    d.insert("tokens_committed_target", s.tokens_committed_target);
    d.insert("cancel_actions", s.cancel_actions);
    d.insert("slots_cancelled", s.slots_cancelled);
    d.insert("drafts_cancelled", s.drafts_cancelled);
    d.insert("verifications_cancelled", s.verifications_cancelled);
    d.insert("targets_cancelled", s.targets_cancelled);
    d.insert("stale_events", s.stale_events);
    return d;
  }

  static c10::Dict<std::string, int64_t> info_dict(const RequestInfo& i) {
    c10::Dict<std::string, int64_t> d;
    d.insert("id", i.id);
    d.insert("budget_tokens", i.budget_tokens);
    d.insert("budget_steps", i.budget_steps);
    d.insert("started", i.started ? 1 : 0);
    d.insert("finish_reason", static_cast<int64_t>(i.finish_reason));
    d.insert("committed_tokens", i.committed_tokens);
    d.insert("committed_steps", i.committed_steps);
    d.insert("steps_from_draft", i.steps_from_draft);
    d.insert("steps_from_target", i.steps_from_target);
    d.insert("open_slots", i.open_slots);
    d.insert("drafting", i.drafting ? 1 : 0);
    return d;
  }
};

// Returns the class builder, so that csrc/bindings.cpp can add its static methods (the enum tables).
inline torch::class_<FpsrSchedulerHolder> register_fpsr_scheduler_class(torch::Library& m) {
  using H = FpsrSchedulerHolder;
  using Self = c10::intrusive_ptr<H>;
  return m.class_<H>("FpsrScheduler")
      .def(torch::init<int64_t, double, int64_t, int64_t, int64_t>(),
           "FPSR scheduler: window (W >= 1), alpha in [0, 1], target_launch (0 eager, 1 on reject), "
           "max_active_requests (0 = no limit), max_step_tokens (0 = no cap)",
           {torch::arg("window") = 4, torch::arg("alpha") = 0.7, torch::arg("target_launch") = 0,
            torch::arg("max_active_requests") = 0, torch::arg("max_step_tokens") = 0})
      .def(
          "add_request",
          [](const Self& self, int64_t budget_tokens, int64_t budget_steps, bool drafting) {
            return H::guard([&] { return self->scheduler.add_request(budget_tokens, budget_steps, drafting); });
          },
          "Adds a request; returns its id",
          {torch::arg("budget_tokens"), torch::arg("budget_steps") = 0, torch::arg("drafting") = true})
      .def("poll", [](const Self& self) { return self->poll(); })
      .def("on_draft_step",
           [](const Self& self, int64_t request, int64_t slot, int64_t epoch, int64_t tokens, int64_t end) {
             H::guard([&] { self->scheduler.on_draft_step(request, slot, epoch, tokens, static_cast<StepEnd>(end)); });
           },
           "", {torch::arg("request"), torch::arg("slot"), torch::arg("epoch"), torch::arg("tokens"), torch::arg("end")})
      .def("on_verification",
           [](const Self& self, int64_t request, int64_t slot, int64_t epoch, double cpn) {
             H::guard([&] { self->scheduler.on_verification(request, slot, epoch, cpn); });
           },
           "", {torch::arg("request"), torch::arg("slot"), torch::arg("epoch"), torch::arg("cpn")})
      .def("on_verdict",
           [](const Self& self, int64_t request, int64_t slot, int64_t epoch, bool accepted) {
             H::guard([&] { self->scheduler.on_verdict(request, slot, epoch, accepted); });
           },
           "", {torch::arg("request"), torch::arg("slot"), torch::arg("epoch"), torch::arg("accepted")})
      .def("on_target_step",
           [](const Self& self, int64_t request, int64_t slot, int64_t epoch, int64_t tokens, int64_t end) {
             H::guard([&] { self->scheduler.on_target_step(request, slot, epoch, tokens, static_cast<StepEnd>(end)); });
           },
           "", {torch::arg("request"), torch::arg("slot"), torch::arg("epoch"), torch::arg("tokens"), torch::arg("end")})
      .def("set_budget",
           [](const Self& self, int64_t request, int64_t budget_tokens) {
             H::guard([&] { self->scheduler.set_budget(request, budget_tokens); });
           },
           "", {torch::arg("request"), torch::arg("budget_tokens")})
      .def("abort", [](const Self& self, int64_t request) { H::guard([&] { self->scheduler.abort(request); }); })
      .def("set_drafting",
           [](const Self& self, int64_t request, bool drafting) {
             H::guard([&] { self->scheduler.set_drafting(request, drafting); });
           },
           "", {torch::arg("request"), torch::arg("drafting")})
      .def("accepts", [](const Self& self, double cpn) { return self->scheduler.accepts(cpn); })
      .def("done", [](const Self& self, int64_t request) { return H::guard([&] { return self->scheduler.done(request); }); })
      .def("all_done", [](const Self& self) { return self->scheduler.all_done(); })
      .def("finish_reason",
           [](const Self& self, int64_t request) {
             return H::guard([&] { return static_cast<int64_t>(self->scheduler.finish_reason(request)); });
           })
      .def("slot_epoch",
           [](const Self& self, int64_t request, int64_t slot) {
             return H::guard([&] { return self->scheduler.slot_epoch(request, slot); });
           })
      .def("info",
           [](const Self& self, int64_t request) {
             return H::guard([&] { return H::info_dict(self->scheduler.info(request)); });
           })
      .def("stats", [](const Self& self) { return H::stats_dict(self->scheduler.stats()); })
      .def("num_requests", [](const Self& self) { return self->scheduler.num_requests(); })
      .def("num_active", [](const Self& self) { return self->scheduler.num_active(); })
      .def("num_waiting", [](const Self& self) { return self->scheduler.num_waiting(); })
      .def("window", [](const Self& self) { return self->scheduler.config().window; })
      .def("alpha", [](const Self& self) { return self->scheduler.config().alpha; });
}

}  // namespace dreamr
