// The FPSR scheduler's state machine; the rules are documented in fpsr_scheduler.h.
#include "fpsr_scheduler.h"

#include "dreamr/common.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace dreamr {

namespace {

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "FpsrScheduler: ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

bool valid_end(StepEnd end) {
  return end == StepEnd::kNone || end == StepEnd::kEos || end == StepEnd::kAnswerMarker;
}

}  // namespace

const char* to_string(ActionKind k) {
  switch (k) {
    case ActionKind::kLaunchDraft: return "LaunchDraft";
    case ActionKind::kLaunchVerify: return "LaunchVerify";
    case ActionKind::kLaunchTarget: return "LaunchTarget";
    case ActionKind::kCancel: return "Cancel";
    case ActionKind::kCommitDraft: return "CommitDraft";
    case ActionKind::kCommitTarget: return "CommitTarget";
    case ActionKind::kFinish: return "Finish";
  }
  return "?";
}

const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kEos: return "eos";
    case FinishReason::kAnswerMarker: return "answer_marker";
    case FinishReason::kBudget: return "budget";
    case FinishReason::kAborted: return "aborted";
  }
  return "?";
}

std::string to_string(const Action& a) {
  std::ostringstream os;
  os << to_string(a.kind) << " r=" << a.request << " slot=" << a.slot << " epoch=" << a.epoch << " step=" << a.step
     << " tokens=" << a.tokens << " aux=" << a.aux;
  return os.str();
}

FpsrScheduler::FpsrScheduler(const Config& config) : config_(config) {
  if (config.window < 1) fail("window must be >= 1, got ", config.window);
  if (std::isnan(config.alpha) || config.alpha < 0.0 || config.alpha > 1.0)
    fail("alpha must be a number in [0, 1], got ", config.alpha);
  if (config.target_launch != TargetLaunch::kEager && config.target_launch != TargetLaunch::kOnReject)
    fail("target_launch must be 0 (eager) or 1 (on_reject), got ", static_cast<int>(config.target_launch));
  if (config.max_active_requests < 0)
    fail("max_active_requests must be >= 0 (0 = no limit), got ", config.max_active_requests);
  if (config.max_step_tokens < 0) fail("max_step_tokens must be >= 0 (0 = no cap), got ", config.max_step_tokens);
}

bool FpsrScheduler::accepts(double cpn) const {
  // The one acceptance rule, dreamr::accepts: cpn and alpha narrowed to float32 as the kernels compare
  // them (a float32 cpn equal to alpha rejects), alpha >= 1 rejects everything, NaN never accepts.
  return dreamr::accepts(static_cast<float>(cpn), static_cast<float>(config_.alpha));
}

// ---------------------------------------------------------------------------------------------------
// Requests

RequestId FpsrScheduler::add_request(int64_t budget_tokens, int64_t budget_steps, bool drafting) {
  if (budget_tokens < 1) fail("budget_tokens must be >= 1 (a budget below one token holds no step), got ", budget_tokens);
  if (budget_steps < 0) fail("budget_steps must be >= 0 (0 = no step limit), got ", budget_steps);
  const RequestId id = static_cast<RequestId>(requests_.size());
  requests_.emplace_back();
  requests_.back().budget_tokens = budget_tokens;
  requests_.back().budget_steps = budget_steps;
  requests_.back().drafting = drafting;
  ++stats_.requests_added;
  if (config_.max_active_requests == 0 || active_ < config_.max_active_requests) {
    start(id);
  } else {
    waiting_.push_back(id);
  }
  return id;
}

void FpsrScheduler::start(RequestId id) {
  Request& r = requests_[id];
  r.started = true;
  r.slots.assign(static_cast<size_t>(config_.window), Slot());
  ++active_;
  advance(id);
}

std::vector<Action> FpsrScheduler::poll() {
  std::vector<Action> out;
  out.swap(queue_);
  return out;
}

FpsrScheduler::Request& FpsrScheduler::checked_request(const char* what, RequestId request) {
  if (request < 0 || request >= num_requests())
    fail(what, ": unknown request ", request, " (ids issued: 0..", num_requests() - 1, ")");
  return requests_[static_cast<size_t>(request)];
}

const FpsrScheduler::Request& FpsrScheduler::checked_request(const char* what, RequestId request) const {
  if (request < 0 || request >= num_requests())
    fail(what, ": unknown request ", request, " (ids issued: 0..", num_requests() - 1, ")");
  return requests_[static_cast<size_t>(request)];
}

void FpsrScheduler::check_event(const char* what, RequestId request, int64_t slot, int64_t epoch) {
  checked_request(what, request);
  if (slot < 0 || slot >= config_.window)
    fail(what, ": slot must be in [0, ", config_.window, "), got ", slot);
  if (epoch < 0 || epoch >= next_epoch_)
    fail(what, ": epoch ", epoch, " was never issued (epochs issued: 0..", next_epoch_ - 1, ")");
}

FpsrScheduler::Slot* FpsrScheduler::live_slot(Request& r, int64_t slot, int64_t epoch) {
  if (!r.started || r.reason != FinishReason::kNone) return nullptr;
  Slot& s = r.slots[static_cast<size_t>(slot)];
  if (!s.open || s.epoch != epoch) return nullptr;
  return &s;
}

FpsrScheduler::Slot& FpsrScheduler::at(Request& r, int64_t position) {
  return r.slots[static_cast<size_t>((r.committed_steps + position) % config_.window)];
}

int64_t FpsrScheduler::position_of(const Request& r, const Slot& s) const { return s.step - r.committed_steps; }

int64_t FpsrScheduler::remaining_tokens(Request& r, int64_t position) {
  int64_t rem = r.budget_tokens - r.committed_tokens;
  for (int64_t q = 0; q < position; ++q) rem -= at(r, q).draft_tokens;
  return rem;
}

int64_t FpsrScheduler::step_cap(int64_t remaining) const {
  return config_.max_step_tokens > 0 ? std::min(remaining, config_.max_step_tokens) : remaining;
}

// ---------------------------------------------------------------------------------------------------
// Events

namespace {
void check_step(const char* what, int64_t tokens, StepEnd end) {
  if (!valid_end(end))
    fail(what, ": end must be 0 (none), 1 (eos) or 2 (answer marker), got ", static_cast<int>(end));
  if (tokens < 0) fail(what, ": tokens must be >= 0, got ", tokens);
  if (tokens == 0 && end == StepEnd::kNone)
    fail(what, ": tokens must be >= 1 for a step that does not end the answer (no progress), got 0");
}
}  // namespace

void FpsrScheduler::on_draft_step(RequestId request, int64_t slot, int64_t epoch, int64_t tokens, StepEnd end) {
  check_event("on_draft_step", request, slot, epoch);
  check_step("on_draft_step", tokens, end);
  Request& r = requests_[static_cast<size_t>(request)];
  Slot* s = live_slot(r, slot, epoch);
  if (s == nullptr || s->draft != Work::kRunning) {
    ++stats_.stale_events;
    return;
  }
  s->draft = Work::kDone;
  s->draft_tokens = tokens;
  s->draft_end = end;
  ++stats_.drafts_completed;
  s->verify = Work::kRunning;
  ++stats_.verifications_launched;
  emit(ActionKind::kLaunchVerify, request, slot, epoch, s->step, tokens, -1);
  advance(request);
}

void FpsrScheduler::on_verification(RequestId request, int64_t slot, int64_t epoch, double cpn) {
  check_event("on_verification", request, slot, epoch);
  if (!std::isnan(cpn) && !(cpn >= 0.0 && cpn <= 1.0))
    fail("on_verification: cpn must be in [0, 1] (or NaN, which rejects), got ", cpn);
  on_verdict(request, slot, epoch, accepts(cpn));
}

void FpsrScheduler::on_verdict(RequestId request, int64_t slot, int64_t epoch, bool accepted) {
  check_event("on_verdict", request, slot, epoch);
  Request& r = requests_[static_cast<size_t>(request)];
  Slot* s = live_slot(r, slot, epoch);
  if (s == nullptr || s->verify != Work::kRunning) {
    ++stats_.stale_events;
    return;
  }
  apply_verdict(request, r, *s, accepted);
}

void FpsrScheduler::on_target_step(RequestId request, int64_t slot, int64_t epoch, int64_t tokens, StepEnd end) {
  check_event("on_target_step", request, slot, epoch);
  check_step("on_target_step", tokens, end);
  Request& r = requests_[static_cast<size_t>(request)];
  Slot* s = live_slot(r, slot, epoch);
  if (s == nullptr || s->target != Work::kRunning) {
    ++stats_.stale_events;
    return;
  }
  s->target = Work::kDone;
  s->target_tokens = tokens;
  s->target_end = end;
  ++stats_.targets_completed;
  advance(request);
}

void FpsrScheduler::set_budget(RequestId request, int64_t budget_tokens) {
  Request& r = checked_request("set_budget", request);
  if (budget_tokens < 1) fail("set_budget: budget_tokens must be >= 1, got ", budget_tokens);
  if (r.reason != FinishReason::kNone) return;
  r.budget_tokens = budget_tokens;
  if (!r.started) return;
  if (r.committed_tokens >= r.budget_tokens) {
    finish(request, r, FinishReason::kBudget);
  } else {
    advance(request);  // a larger budget may let the draft chain go on
  }
}

void FpsrScheduler::abort(RequestId request) {
  Request& r = checked_request("abort", request);
  if (r.reason != FinishReason::kNone) return;
  if (!r.started) waiting_.erase(std::find(waiting_.begin(), waiting_.end(), request));
  finish(request, r, FinishReason::kAborted);
}

void FpsrScheduler::set_drafting(RequestId request, bool drafting) {
  checked_request("set_drafting", request).drafting = drafting;
}

// ---------------------------------------------------------------------------------------------------
// Transitions

void FpsrScheduler::apply_verdict(RequestId id, Request& r, Slot& s, bool accepted) {
  s.verify = Work::kDone;
  s.verdict = accepted ? 1 : 0;
  ++stats_.verifications;
  if (accepted) {
    ++stats_.accepted;
  } else {
    ++stats_.rejected;
    drop_after(id, r, position_of(r, s));  // early stopping: nothing past a rejection can be committed
    cancel_work(id, s, kWorkDraft);        // the rejected draft step itself
    if (s.target == Work::kIdle) launch_target(id, r, s, -1);  // kOnReject
  }
  advance(id);
}

void FpsrScheduler::advance(RequestId id) {
  Request& r = requests_[static_cast<size_t>(id)];
  if (!r.started) return;
  while (r.reason == FinishReason::kNone && resolve_head(id, r)) {
  }
  if (r.reason != FinishReason::kNone) return;
  extend(id, r);
}

bool FpsrScheduler::resolve_head(RequestId id, Request& r) {
  if (r.open == 0) return false;
  Slot& s = at(r, 0);
  const int64_t slot = s.step % config_.window;
  if (s.verdict == 1) {
    const int64_t tokens = s.draft_tokens;
    const StepEnd end = s.draft_end;
    emit(ActionKind::kCommitDraft, id, slot, s.epoch, s.step, tokens, static_cast<int64_t>(end));
    s.draft = Work::kIdle;                  // consumed
    cancel_work(id, s, kWorkTarget);        // the fallback is not needed
    ++stats_.steps_committed_draft;
    stats_.tokens_committed_draft += tokens;
    ++r.steps_from_draft;
    r.committed_tokens += tokens;
    r.continue_epoch = -1;
    close_head(r);
    check_finished_after_commit(id, r, end);
    return true;
  }
  if (s.verdict == 0 && s.target == Work::kDone) {
    const int64_t tokens = s.target_tokens;
    const StepEnd end = s.target_end;
    const int64_t epoch = s.epoch;
    emit(ActionKind::kCommitTarget, id, slot, epoch, s.step, tokens, static_cast<int64_t>(end));
    s.target = Work::kIdle;  // consumed
    ++stats_.steps_committed_target;
    stats_.tokens_committed_target += tokens;
    ++r.steps_from_target;
    r.committed_tokens += tokens;
    // the next head's target starts at once where it is eager or has no draft: it may continue this branch
    r.continue_epoch = config_.target_launch == TargetLaunch::kEager || !r.drafting ? epoch : -1;
    close_head(r);
    check_finished_after_commit(id, r, end);
    return true;
  }
  return false;  // waiting for the verdict, or for the fallback step
}

void FpsrScheduler::close_head(Request& r) {
  at(r, 0) = Slot();
  --r.open;
  ++r.committed_steps;  // the window slides: position p becomes p - 1
}

bool FpsrScheduler::check_finished_after_commit(RequestId id, Request& r, StepEnd end) {
  if (end == StepEnd::kEos) {
    finish(id, r, FinishReason::kEos);
  } else if (end == StepEnd::kAnswerMarker) {
    finish(id, r, FinishReason::kAnswerMarker);
  } else if (r.committed_tokens >= r.budget_tokens || (r.budget_steps > 0 && r.committed_steps >= r.budget_steps)) {
    finish(id, r, FinishReason::kBudget);
  }
  return r.reason != FinishReason::kNone;
}

void FpsrScheduler::extend(RequestId id, Request& r) {
  while (r.open < config_.window) {
    if (r.open > 0) {
      const Slot& last = at(r, r.open - 1);
      if (last.draft != Work::kDone || last.draft_end != StepEnd::kNone || last.verdict == 0) break;
    }
    if (r.budget_steps > 0 && r.committed_steps + r.open >= r.budget_steps) break;
    const int64_t rem = remaining_tokens(r, r.open);
    if (rem < 1) break;
    const int64_t position = r.open;
    if (!r.drafting && position > 0) break;  // a step without a draft opens only as the head
    Slot& s = at(r, position);
    s = Slot();
    s.open = true;
    s.epoch = next_epoch_++;
    s.step = r.committed_steps + position;
    s.max_tokens = step_cap(rem);
    ++r.open;
    if (!r.drafting) {  // the target writes this step alone: nothing to verify, its step is committed
      s.verdict = 0;
      ++stats_.undrafted_steps;
      launch_target(id, r, s, r.continue_epoch);
      r.continue_epoch = -1;
      break;  // the next prefix is this step: nothing opens after it
    }
    s.draft = Work::kRunning;
    ++stats_.drafts_launched;
    emit(ActionKind::kLaunchDraft, id, s.step % config_.window, s.epoch, s.step, s.max_tokens, -1);
    if (config_.target_launch == TargetLaunch::kEager) launch_target(id, r, s, position == 0 ? r.continue_epoch : -1);
    r.continue_epoch = -1;
  }
}

void FpsrScheduler::launch_target(RequestId id, Request& r, Slot& s, int64_t continue_epoch) {
  (void)r;
  s.target = Work::kRunning;
  ++stats_.targets_launched;
  if (continue_epoch >= 0) ++stats_.targets_continued;
  emit(ActionKind::kLaunchTarget, id, s.step % config_.window, s.epoch, s.step, s.max_tokens, continue_epoch);
}

void FpsrScheduler::cancel_work(RequestId id, Slot& s, int64_t mask) {
  int64_t held = 0;
  if ((mask & kWorkDraft) && s.draft != Work::kIdle) held |= kWorkDraft;
  if ((mask & kWorkVerify) && s.verify == Work::kRunning) held |= kWorkVerify;
  if ((mask & kWorkTarget) && s.target != Work::kIdle) held |= kWorkTarget;
  if (held == 0) return;
  if (held & kWorkDraft) {
    s.draft = Work::kIdle;
    ++stats_.drafts_cancelled;
  }
  if (held & kWorkVerify) {
    s.verify = Work::kIdle;
    ++stats_.verifications_cancelled;
  }
  if (held & kWorkTarget) {
    s.target = Work::kIdle;
    ++stats_.targets_cancelled;
  }
  ++stats_.cancel_actions;
  emit(ActionKind::kCancel, id, s.step % config_.window, s.epoch, s.step, 0, held);
}

void FpsrScheduler::drop_after(RequestId id, Request& r, int64_t position) {
  for (int64_t q = position + 1; q < r.open; ++q) {
    Slot& s = at(r, q);
    cancel_work(id, s, kWorkDraft | kWorkVerify | kWorkTarget);
    s = Slot();
    ++stats_.slots_cancelled;
  }
  r.open = std::min(r.open, position + 1);
}

void FpsrScheduler::finish(RequestId id, Request& r, FinishReason reason) {
  if (r.started) {
    drop_after(id, r, -1);
    r.slots.clear();
    r.slots.shrink_to_fit();
  }
  r.reason = reason;
  r.continue_epoch = -1;
  ++finished_;
  ++stats_.requests_finished;
  switch (reason) {
    case FinishReason::kEos: ++stats_.finished_eos; break;
    case FinishReason::kAnswerMarker: ++stats_.finished_answer_marker; break;
    case FinishReason::kBudget: ++stats_.finished_budget; break;
    case FinishReason::kAborted: ++stats_.finished_aborted; break;
    case FinishReason::kNone: break;
  }
  emit(ActionKind::kFinish, id, -1, -1, r.committed_steps, r.committed_tokens, static_cast<int64_t>(reason));
  if (!r.started) return;
  --active_;
  while (!waiting_.empty() && (config_.max_active_requests == 0 || active_ < config_.max_active_requests)) {
    const RequestId next = waiting_.front();
    waiting_.pop_front();
    start(next);
  }
}

void FpsrScheduler::emit(ActionKind kind, RequestId id, int64_t slot, int64_t epoch, int64_t step, int64_t tokens,
                         int64_t aux) {
  queue_.push_back(Action{kind, id, slot, epoch, step, tokens, aux});
}

// ---------------------------------------------------------------------------------------------------
// Queries

bool FpsrScheduler::done(RequestId request) const {
  return checked_request("done", request).reason != FinishReason::kNone;
}

bool FpsrScheduler::all_done() const { return finished_ == num_requests(); }

FinishReason FpsrScheduler::finish_reason(RequestId request) const {
  return checked_request("finish_reason", request).reason;
}

RequestInfo FpsrScheduler::info(RequestId request) const {
  const Request& r = checked_request("info", request);
  RequestInfo i;
  i.id = request;
  i.budget_tokens = r.budget_tokens;
  i.budget_steps = r.budget_steps;
  i.started = r.started;
  i.finish_reason = r.reason;
  i.committed_tokens = r.committed_tokens;
  i.committed_steps = r.committed_steps;
  i.steps_from_draft = r.steps_from_draft;
  i.steps_from_target = r.steps_from_target;
  i.open_slots = r.open;
  i.drafting = r.drafting;
  return i;
}

int64_t FpsrScheduler::slot_epoch(RequestId request, int64_t slot) const {
  const Request& r = checked_request("slot_epoch", request);
  if (slot < 0 || slot >= config_.window) fail("slot_epoch: slot must be in [0, ", config_.window, "), got ", slot);
  if (!r.started || r.reason != FinishReason::kNone) return -1;
  const Slot& s = r.slots[static_cast<size_t>(slot)];
  return s.open ? s.epoch : -1;
}

}  // namespace dreamr
