// CTest for the FPSR scheduler (csrc/scheduler/fpsr_scheduler.h): scripted event sequences, and a
// randomised executor that completes work in random order (late and duplicate events included) and must
// commit exactly what sequential speculative reasoning commits. No test framework: CHECK counts
// failures and main() returns non-zero if any.
//
//   g++ -std=c++17 -O2 -Wall -Wextra -Werror -Icsrc/scheduler csrc/scheduler/fpsr_scheduler.cpp
//       csrc/tests/test_scheduler.cpp -o /tmp/test_scheduler && /tmp/test_scheduler
#include "../scheduler/fpsr_scheduler.h"  // relative: builds without include-path settings

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace dreamr;

namespace {

int g_failures = 0;
int g_checks = 0;
const char* g_test = "";

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    ++g_checks;                                                                          \
    if (!(cond)) {                                                                       \
      ++g_failures;                                                                      \
      std::fprintf(stderr, "FAIL [%s] %s:%d: %s\n", g_test, __FILE__, __LINE__, #cond); \
    }                                                                                    \
  } while (0)

#define CHECK_EQ(a, b)                                                                                     \
  do {                                                                                                     \
    ++g_checks;                                                                                            \
    const auto va_ = (a);                                                                                  \
    const auto vb_ = (b);                                                                                  \
    if (!(va_ == vb_)) {                                                                                   \
      ++g_failures;                                                                                        \
      std::fprintf(stderr, "FAIL [%s] %s:%d: %s == %s (%lld vs %lld)\n", g_test, __FILE__, __LINE__, #a, #b, \
                   static_cast<long long>(va_), static_cast<long long>(vb_));                              \
    }                                                                                                      \
  } while (0)

// Expects std::invalid_argument whose message contains every one of `needles`.
void check_throws(const char* line_desc, const std::function<void()>& fn, const std::vector<std::string>& needles) {
  ++g_checks;
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      if (msg.find(n) == std::string::npos) {
        ++g_failures;
        std::fprintf(stderr, "FAIL [%s] %s: message \"%s\" lacks \"%s\"\n", g_test, line_desc, msg.c_str(), n.c_str());
      }
    }
    return;
  } catch (const std::exception& e) {
    ++g_failures;
    std::fprintf(stderr, "FAIL [%s] %s: wrong exception type: %s\n", g_test, line_desc, e.what());
    return;
  }
  ++g_failures;
  std::fprintf(stderr, "FAIL [%s] %s: no exception\n", g_test, line_desc);
}

std::string dump(const std::vector<Action>& actions) {
  std::string s;
  for (const auto& a : actions) s += "  " + to_string(a) + "\n";
  return s;
}

// The single action of `kind` for (request, slot) in `actions`; fails the test if not exactly one.
Action one(const std::vector<Action>& actions, ActionKind kind, RequestId r, int64_t slot) {
  const Action* found = nullptr;
  int n = 0;
  for (const auto& a : actions)
    if (a.kind == kind && a.request == r && a.slot == slot) {
      found = &a;
      ++n;
    }
  ++g_checks;
  if (n != 1) {
    ++g_failures;
    std::fprintf(stderr, "FAIL [%s] expected one %s r=%lld slot=%lld, found %d in:\n%s", g_test, to_string(kind),
                 static_cast<long long>(r), static_cast<long long>(slot), n, dump(actions).c_str());
    return Action{kind, r, slot, -1, -1, -1, -1};
  }
  return *found;
}

int count(const std::vector<Action>& actions, ActionKind kind) {
  int n = 0;
  for (const auto& a : actions) n += a.kind == kind;
  return n;
}

std::vector<Action> only(const std::vector<Action>& actions, std::initializer_list<ActionKind> kinds) {
  std::vector<Action> out;
  for (const auto& a : actions)
    for (auto k : kinds)
      if (a.kind == k) out.push_back(a);
  return out;
}

Config cfg(int64_t window = 4, double alpha = 0.5, TargetLaunch policy = TargetLaunch::kEager) {
  Config c;
  c.window = window;
  c.alpha = alpha;
  c.target_launch = policy;
  return c;
}

const double kAccept = 0.9;
const double kReject = 0.1;

// Fills the window of request r (W slots, starting from a fresh head at slot `first`): completes the
// draft of each slot in turn with `tokens` tokens. Returns every action polled on the way (including the
// launches that were pending before). epochs[i] receives the epoch of the i-th opened slot.
std::vector<Action> fill_window(FpsrScheduler& s, RequestId r, int64_t first, int64_t n, int64_t tokens,
                                std::vector<int64_t>* epochs) {
  std::vector<Action> all = s.poll();
  const int64_t W = s.config().window;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = (first + i) % W;
    const int64_t e = s.slot_epoch(r, slot);
    if (epochs) epochs->push_back(e);
    s.on_draft_step(r, slot, e, tokens, StepEnd::kNone);
    auto got = s.poll();
    all.insert(all.end(), got.begin(), got.end());
  }
  return all;
}

// ---------------------------------------------------------------------------------------------------
// Scripted tests

void test_first_actions() {
  g_test = "first_actions";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(100);
  CHECK_EQ(r, 0);
  auto a = s.poll();
  CHECK_EQ(a.size(), 2u);
  CHECK(a[0] == (Action{ActionKind::kLaunchDraft, 0, 0, 0, 0, 100, -1}));
  CHECK(a[1] == (Action{ActionKind::kLaunchTarget, 0, 0, 0, 0, 100, -1}));
  CHECK(s.poll().empty());
  // The draft chain is sequential: finishing d_0 opens slot 1 and launches the verification of d_0.
  s.on_draft_step(0, 0, 0, 7, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(a.size(), 3u);
  CHECK(a[0] == (Action{ActionKind::kLaunchVerify, 0, 0, 0, 0, 7, -1}));
  CHECK(a[1] == (Action{ActionKind::kLaunchDraft, 0, 1, 1, 1, 93, -1}));
  CHECK(a[2] == (Action{ActionKind::kLaunchTarget, 0, 1, 1, 1, 93, -1}));
}

void test_all_accepted() {
  g_test = "all_accepted";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  auto a = fill_window(s, r, 0, 4, 10, &ep);
  CHECK_EQ(count(a, ActionKind::kLaunchDraft), 4);  // the window holds W = 4 open steps, no more
  CHECK_EQ(count(a, ActionKind::kLaunchVerify), 4);
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 4);  // eager: every slot's fallback runs
  CHECK_EQ(s.info(r).open_slots, 4);
  for (int64_t i = 0; i < 4; ++i) {
    s.on_verification(r, i, ep[i], kAccept);
    auto got = s.poll();
    Action c = one(got, ActionKind::kCommitDraft, r, i);
    CHECK_EQ(c.epoch, ep[i]);
    CHECK_EQ(c.step, i);
    CHECK_EQ(c.tokens, 10);
    Action x = one(got, ActionKind::kCancel, r, i);  // its fallback is not needed any more
    CHECK_EQ(x.aux, kWorkTarget);
    CHECK_EQ(x.epoch, ep[i]);
    // Committing step 0 frees a place: d_3 is done, so step 4 opens at once (in slot 0). Later commits
    // open nothing: d_4 has not reported.
    CHECK_EQ(count(got, ActionKind::kLaunchDraft), i == 0 ? 1 : 0);
  }
  // d_3 was done, so the slid window opened step 4 (slot 0) as soon as step 0 committed; the window
  // slides by one per commit.
  CHECK_EQ(s.info(r).committed_steps, 4);
  CHECK_EQ(s.info(r).committed_tokens, 40);
  CHECK_EQ(s.info(r).open_slots, 1);
  CHECK_EQ(s.stats().steps_committed_draft, 4);
  CHECK_EQ(s.stats().steps_committed_target, 0);
  CHECK_EQ(s.stats().targets_cancelled, 4);
  CHECK_EQ(s.stats().accepted, 4);
  CHECK_EQ(s.stats().stale_events, 0);
  CHECK(!s.done(r));
}

void test_window_slides() {
  g_test = "window_slides";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  fill_window(s, r, 0, 4, 10, &ep);
  s.on_verification(r, 0, ep[0], kAccept);
  auto a = s.poll();
  Action d = one(a, ActionKind::kLaunchDraft, r, 0);  // step 4 reuses slot 0 with a new epoch
  CHECK_EQ(d.step, 4);
  CHECK(d.epoch > ep[3]);
  CHECK_EQ(d.tokens, 1000 - 40);
  // A late event with slot 0's old epoch is stale.
  s.on_target_step(r, 0, ep[0], 5, StepEnd::kNone);
  s.on_verification(r, 0, ep[0], kReject);
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, 2);
}

void test_reject_middle(bool target_first) {
  g_test = target_first ? "reject_middle(target first)" : "reject_middle(target last)";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  fill_window(s, r, 0, 4, 10, &ep);
  s.on_verification(r, 0, ep[0], kAccept);
  s.on_verification(r, 1, ep[1], kAccept);
  auto a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitDraft), 2);
  if (target_first) s.on_target_step(r, 2, ep[2], 6, StepEnd::kNone);
  CHECK(s.poll().empty());  // a finished fallback waits for its verdict
  s.on_verification(r, 2, ep[2], kReject);
  a = s.poll();
  // Early stopping: step 3 (slot 3) is cancelled with all its work, and so is step 4 (slot 0), opened
  // when step 0 committed (its draft still running); the rejected draft is dropped.
  Action x3 = one(a, ActionKind::kCancel, r, 3);
  CHECK_EQ(x3.aux, kWorkDraft | kWorkVerify | kWorkTarget);
  CHECK_EQ(x3.epoch, ep[3]);
  Action x4 = one(a, ActionKind::kCancel, r, 0);
  CHECK_EQ(x4.aux, kWorkDraft | kWorkTarget);
  CHECK_EQ(x4.step, 4);
  // Slot 2: first the rejected draft is dropped; later (CommitTarget) the new head reuses nothing of it.
  int cancels2 = 0;
  for (const auto& x : a)
    if (x.kind == ActionKind::kCancel && x.slot == 2) {
      ++cancels2;
      CHECK_EQ(x.aux, kWorkDraft);
    }
  CHECK_EQ(cancels2, 1);
  CHECK_EQ(count(a, ActionKind::kCommitDraft), 0);
  if (!target_first) {
    CHECK_EQ(count(a, ActionKind::kCommitTarget), 0);  // waiting for the fallback
    s.on_target_step(r, 2, ep[2], 6, StepEnd::kNone);
    a = s.poll();
  }
  Action ct = one(a, ActionKind::kCommitTarget, r, 2);
  CHECK_EQ(ct.epoch, ep[2]);
  CHECK_EQ(ct.step, 2);
  CHECK_EQ(ct.tokens, 6);
  // Refill from the new prefix: step 3 in slot 3 with a new epoch, its target continuing slot 2's branch.
  Action d = one(a, ActionKind::kLaunchDraft, r, 3);
  Action t = one(a, ActionKind::kLaunchTarget, r, 3);
  CHECK_EQ(d.step, 3);
  CHECK(d.epoch != ep[3]);
  CHECK_EQ(d.tokens, 1000 - 26);
  CHECK_EQ(t.aux, ep[2]);
  CHECK_EQ(s.stats().targets_continued, 1);
  // Late events for the cancelled slot 3 (old epoch) are ignored and counted.
  s.on_verification(r, 3, ep[3], kAccept);
  s.on_target_step(r, 3, ep[3], 4, StepEnd::kNone);
  s.on_draft_step(r, 3, ep[3], 4, StepEnd::kNone);
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, 3);
  RequestInfo i = s.info(r);
  CHECK_EQ(i.committed_steps, 3);
  CHECK_EQ(i.committed_tokens, 26);
  CHECK_EQ(i.steps_from_draft, 2);
  CHECK_EQ(i.steps_from_target, 1);
  CHECK_EQ(s.stats().slots_cancelled, 2);
  CHECK_EQ(s.stats().rejected, 1);
}

void test_reject_slot0() {
  g_test = "reject_slot0";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  fill_window(s, r, 0, 4, 10, &ep);
  s.on_verification(r, 1, ep[1], kAccept);  // verdicts past the rejection do not matter
  s.on_verification(r, 0, ep[0], kReject);
  auto a = s.poll();
  for (int64_t slot = 1; slot < 4; ++slot) {
    Action x = one(a, ActionKind::kCancel, r, slot);
    // slot 1's verification had returned, so only its draft and target are held; slots 2, 3 still verify.
    CHECK_EQ(x.aux, slot == 1 ? (kWorkDraft | kWorkTarget) : (kWorkDraft | kWorkVerify | kWorkTarget));
  }
  CHECK_EQ(count(a, ActionKind::kCommitDraft), 0);
  CHECK_EQ(s.info(r).open_slots, 1);
  s.on_target_step(r, 0, ep[0], 12, StepEnd::kNone);
  a = s.poll();
  Action ct = one(a, ActionKind::kCommitTarget, r, 0);
  CHECK_EQ(ct.tokens, 12);
  Action d = one(a, ActionKind::kLaunchDraft, r, 1);
  CHECK_EQ(d.step, 1);
  CHECK_EQ(one(a, ActionKind::kLaunchTarget, r, 1).aux, ep[0]);
  CHECK_EQ(s.stats().slots_cancelled, 3);
  CHECK_EQ(s.info(r).committed_steps, 1);
}

// Verdicts {acc, acc, rej, acc} delivered in a given order, targets of every slot finishing at the end:
// the commits must not depend on the order.
std::vector<Action> run_order(const std::vector<int>& order, TargetLaunch policy) {
  FpsrScheduler s(cfg(4, 0.5, policy));
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  std::vector<Action> all = fill_window(s, r, 0, 4, 10, &ep);
  const double verdict[4] = {kAccept, kAccept, kReject, kAccept};
  for (int i : order) {
    s.on_verification(r, i, ep[i], verdict[i]);
    auto got = s.poll();
    all.insert(all.end(), got.begin(), got.end());
  }
  for (int i = 3; i >= 0; --i) {
    s.on_target_step(r, i, ep[i], 3, StepEnd::kNone);
    auto got = s.poll();
    all.insert(all.end(), got.begin(), got.end());
  }
  return only(all, {ActionKind::kCommitDraft, ActionKind::kCommitTarget, ActionKind::kFinish});
}

void test_out_of_order() {
  g_test = "out_of_order";
  for (TargetLaunch policy : {TargetLaunch::kEager, TargetLaunch::kOnReject}) {
    const auto in_order = run_order({0, 1, 2, 3}, policy);
    CHECK_EQ(in_order.size(), 3u);
    if (in_order.size() == 3u) {
      CHECK(in_order[0].kind == ActionKind::kCommitDraft && in_order[0].step == 0);
      CHECK(in_order[1].kind == ActionKind::kCommitDraft && in_order[1].step == 1);
      CHECK(in_order[2].kind == ActionKind::kCommitTarget && in_order[2].step == 2);
    }
    std::vector<int> order = {0, 1, 2, 3};
    int permutations = 0;
    do {
      ++permutations;
      const auto got = run_order(order, policy);
      ++g_checks;
      if (got != in_order) {
        ++g_failures;
        std::fprintf(stderr, "FAIL [%s] order %d%d%d%d: commits\n%s differ from in order:\n%s", g_test, order[0],
                     order[1], order[2], order[3], dump(got).c_str(), dump(in_order).c_str());
      }
    } while (std::next_permutation(order.begin(), order.end()));
    CHECK_EQ(permutations, 24);
  }
  // Verification of slot 2 before slot 1, all accepted: same commits as in order.
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  fill_window(s, r, 0, 3, 10, &ep);
  s.on_verification(r, 2, ep[2], kAccept);
  CHECK_EQ(count(s.poll(), ActionKind::kCommitDraft), 0);  // slot 2 waits for slots 0 and 1
  s.on_verification(r, 1, ep[1], kAccept);
  CHECK_EQ(count(s.poll(), ActionKind::kCommitDraft), 0);
  s.on_verification(r, 0, ep[0], kAccept);
  auto a = only(s.poll(), {ActionKind::kCommitDraft});
  CHECK_EQ(a.size(), 3u);
  for (size_t i = 0; i < a.size(); ++i) CHECK_EQ(a[i].step, static_cast<int64_t>(i));
}

void test_late_events_ignored() {
  g_test = "late_events_ignored";
  FpsrScheduler s(cfg());
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  s.poll();
  ep.push_back(s.slot_epoch(r, 0));
  s.on_draft_step(r, 0, ep[0], 10, StepEnd::kNone);
  ep.push_back(s.slot_epoch(r, 1));  // d_1 still running
  s.on_verification(r, 0, ep[0], kReject);
  auto a = s.poll();
  CHECK_EQ(one(a, ActionKind::kCancel, r, 1).aux, kWorkDraft | kWorkTarget);
  const Stats before = s.stats();
  // The cancelled draft of slot 1 finishes anyway; so does its target; duplicates of a used event too.
  s.on_draft_step(r, 1, ep[1], 10, StepEnd::kNone);
  s.on_target_step(r, 1, ep[1], 10, StepEnd::kEos);
  s.on_verification(r, 0, ep[0], kAccept);  // duplicate verdict for slot 0
  s.on_verdict(r, 1, ep[1], true);          // never launched
  s.on_draft_step(r, 0, ep[0], 10, StepEnd::kNone);  // duplicate draft
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, before.stale_events + 5);
  CHECK_EQ(s.stats().steps_committed_draft, 0);
  CHECK_EQ(s.info(r).open_slots, 1);
  // The fallback still commits normally afterwards.
  s.on_target_step(r, 0, ep[0], 8, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 0).tokens, 8);
  // Events for a finished request are stale too.
  s.abort(r);
  a = s.poll();
  CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kAborted));
  CHECK(a.back().kind == ActionKind::kFinish);
  const int64_t e1 = one(a, ActionKind::kCancel, r, 1).epoch;  // the refilled slot's work was cancelled
  s.on_draft_step(r, 1, e1, 3, StepEnd::kNone);
  s.on_target_step(r, 1, e1, 3, StepEnd::kNone);
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, before.stale_events + 7);
  s.abort(r);  // no-op
  CHECK(s.poll().empty());
  CHECK(s.done(r));
  CHECK(s.all_done());
}

void test_eos_inside_window() {
  g_test = "eos_inside_window";
  for (StepEnd end : {StepEnd::kEos, StepEnd::kAnswerMarker}) {
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(1000);
    s.poll();
    const int64_t e0 = s.slot_epoch(r, 0);
    s.on_draft_step(r, 0, e0, 10, StepEnd::kNone);
    const int64_t e1 = s.slot_epoch(r, 1);
    s.on_draft_step(r, 1, e1, 4, end);
    auto a = s.poll();
    CHECK_EQ(count(a, ActionKind::kLaunchDraft), 1);  // d_1 ended the answer: no d_2
    CHECK_EQ(s.slot_epoch(r, 2), -1);
    s.on_verification(r, 1, e1, kAccept);
    s.on_verification(r, 0, e0, kAccept);
    a = s.poll();
    CHECK_EQ(count(a, ActionKind::kCommitDraft), 2);
    CHECK_EQ(one(a, ActionKind::kCommitDraft, r, 1).aux, static_cast<int64_t>(end));
    Action f = one(a, ActionKind::kFinish, r, -1);
    CHECK_EQ(f.aux, static_cast<int64_t>(end == StepEnd::kEos ? FinishReason::kEos : FinishReason::kAnswerMarker));
    CHECK_EQ(f.step, 2);
    CHECK_EQ(f.tokens, 14);
    CHECK(a.back().kind == ActionKind::kFinish);
    CHECK_EQ(count(a, ActionKind::kCancel), 2);  // both targets
    CHECK(s.done(r));
    CHECK(s.finish_reason(r) == (end == StepEnd::kEos ? FinishReason::kEos : FinishReason::kAnswerMarker));
  }
  // EOS drafted but rejected: the fallback commits and the answer goes on.
  {
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(1000);
    s.poll();
    const int64_t e0 = s.slot_epoch(r, 0);
    s.on_draft_step(r, 0, e0, 0, StepEnd::kEos);  // an empty EOS step is allowed
    CHECK_EQ(count(s.poll(), ActionKind::kLaunchDraft), 0);
    s.on_verification(r, 0, e0, kReject);
    s.on_target_step(r, 0, e0, 9, StepEnd::kNone);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 0).tokens, 9);
    CHECK_EQ(one(a, ActionKind::kLaunchDraft, r, 1).step, 1);
    CHECK(!s.done(r));
    // ... and an EOS from the fallback ends it.
    const int64_t e1 = s.slot_epoch(r, 1);
    s.on_draft_step(r, 1, e1, 5, StepEnd::kNone);
    s.on_verification(r, 1, e1, std::nan(""));  // NaN rejects
    s.on_target_step(r, 1, e1, 3, StepEnd::kEos);
    a = s.poll();
    CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 1).aux, static_cast<int64_t>(StepEnd::kEos));
    CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kEos));
    CHECK_EQ(one(a, ActionKind::kCancel, r, 2).aux, kWorkDraft | kWorkTarget);  // d_2 was under way
    CHECK_EQ(s.info(r).committed_tokens, 12);
  }
}

void test_budget() {
  g_test = "budget";
  {
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(25);
    std::vector<int64_t> ep;
    auto a = fill_window(s, r, 0, 3, 10, &ep);
    // Budget left on each prefix: 25, 15, 5; step 3 would start past the budget, so it never opens.
    auto drafts = only(a, {ActionKind::kLaunchDraft});
    CHECK_EQ(drafts.size(), 3u);
    if (drafts.size() == 3u) {
      CHECK_EQ(drafts[0].tokens, 25);
      CHECK_EQ(drafts[1].tokens, 15);
      CHECK_EQ(drafts[2].tokens, 5);
    }
    CHECK_EQ(one(a, ActionKind::kLaunchTarget, r, 2).tokens, 5);
    CHECK_EQ(s.slot_epoch(r, 3), -1);
    for (int i = 0; i < 3; ++i) s.on_verification(r, i, ep[i], kAccept);
    a = s.poll();
    CHECK_EQ(count(a, ActionKind::kCommitDraft), 3);  // the last step reported 10 > 5 tokens: committed as is
    Action f = one(a, ActionKind::kFinish, r, -1);
    CHECK_EQ(f.aux, static_cast<int64_t>(FinishReason::kBudget));
    CHECK_EQ(f.tokens, 30);
    CHECK_EQ(s.stats().finished_budget, 1);
  }
  {  // exactly at the budget, through a fallback step
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(20);
    std::vector<int64_t> ep;
    fill_window(s, r, 0, 1, 10, &ep);
    s.on_verification(r, 0, ep[0], kReject);
    s.on_target_step(r, 0, ep[0], 20, StepEnd::kNone);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kBudget));
    CHECK_EQ(one(a, ActionKind::kCancel, r, 1).aux, kWorkDraft | kWorkTarget);  // d_1 on the old prefix
  }
  {  // step budget
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(1000, 2);
    std::vector<int64_t> ep;
    auto a = fill_window(s, r, 0, 2, 10, &ep);
    CHECK_EQ(count(a, ActionKind::kLaunchDraft), 2);  // two steps allowed: no third opens
    s.on_verification(r, 0, ep[0], kAccept);
    s.on_verification(r, 1, ep[1], kAccept);
    a = s.poll();
    CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kBudget));
    CHECK_EQ(s.info(r).committed_steps, 2);
  }
  {  // the budget event: lowering it below the committed tokens finishes the request
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(1000);
    std::vector<int64_t> ep;
    fill_window(s, r, 0, 2, 10, &ep);
    s.on_verification(r, 0, ep[0], kAccept);
    s.poll();
    s.set_budget(r, 15);  // 10 committed: not yet
    CHECK(!s.done(r));
    s.set_budget(r, 10);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kBudget));
    CHECK_EQ(one(a, ActionKind::kCancel, r, 1).aux, kWorkDraft | kWorkVerify | kWorkTarget);
    s.set_budget(r, 5);  // finished: ignored
    CHECK(s.poll().empty());
  }
  {  // raising the budget lets a draft chain that stopped at the budget go on
    FpsrScheduler s(cfg());
    RequestId r = s.add_request(10);
    std::vector<int64_t> ep;
    auto a = fill_window(s, r, 0, 1, 10, &ep);
    CHECK_EQ(count(a, ActionKind::kLaunchDraft), 1);
    s.set_budget(r, 30);
    a = s.poll();
    Action d = one(a, ActionKind::kLaunchDraft, r, 1);
    CHECK_EQ(d.tokens, 20);
    CHECK_EQ(d.step, 1);
  }
  {  // max_step_tokens caps the launch actions' budget
    Config c = cfg();
    c.max_step_tokens = 16;
    FpsrScheduler s(c);
    RequestId r = s.add_request(20);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kLaunchDraft, r, 0).tokens, 16);
    s.on_draft_step(r, 0, s.slot_epoch(r, 0), 16, StepEnd::kNone);
    CHECK_EQ(one(s.poll(), ActionKind::kLaunchDraft, r, 1).tokens, 4);
  }
}

void test_concurrent_requests() {
  g_test = "concurrent_requests";
  FpsrScheduler s(cfg(2));
  RequestId a = s.add_request(100), b = s.add_request(100), c = s.add_request(100);
  CHECK_EQ(s.poll().size(), 6u);
  const int64_t a0 = s.slot_epoch(a, 0), b0 = s.slot_epoch(b, 0), c0 = s.slot_epoch(c, 0);
  CHECK(a0 != b0 && b0 != c0 && a0 != c0);  // epochs are unique across requests
  // Interleave: b's draft, a's draft, c's draft+reject, a's verdict, b's reject, ...
  s.on_draft_step(b, 0, b0, 5, StepEnd::kNone);
  s.on_draft_step(a, 0, a0, 6, StepEnd::kNone);
  s.on_draft_step(c, 0, c0, 7, StepEnd::kNone);
  s.on_verification(c, 0, c0, kReject);
  // An event with another request's epoch is stale for this one.
  s.on_verification(a, 0, b0, kAccept);
  CHECK_EQ(s.stats().stale_events, 1);
  s.on_verification(a, 0, a0, kAccept);
  s.on_target_step(c, 0, c0, 9, StepEnd::kAnswerMarker);
  s.on_verification(b, 0, b0, kReject);
  auto acts = s.poll();
  CHECK_EQ(one(acts, ActionKind::kCommitDraft, a, 0).tokens, 6);
  CHECK_EQ(one(acts, ActionKind::kCommitTarget, c, 0).tokens, 9);
  CHECK_EQ(one(acts, ActionKind::kFinish, c, -1).aux, static_cast<int64_t>(FinishReason::kAnswerMarker));
  CHECK_EQ(count(acts, ActionKind::kCommitTarget), 1);  // b waits for its fallback
  CHECK(s.done(c) && !s.done(a) && !s.done(b));
  CHECK_EQ(s.num_active(), 2);
  s.on_target_step(b, 0, b0, 4, StepEnd::kEos);
  acts = s.poll();
  CHECK_EQ(one(acts, ActionKind::kFinish, b, -1).aux, static_cast<int64_t>(FinishReason::kEos));
  s.abort(a);
  acts = s.poll();
  CHECK(s.all_done());
  CHECK_EQ(s.info(a).committed_tokens, 6);
  CHECK_EQ(s.info(b).committed_tokens, 4);
  CHECK_EQ(s.info(c).committed_tokens, 9);
  CHECK_EQ(s.stats().requests_finished, 3);
}

void test_max_active() {
  g_test = "max_active";
  Config c = cfg(2);
  c.max_active_requests = 1;
  FpsrScheduler s(c);
  RequestId a = s.add_request(10), b = s.add_request(10), d = s.add_request(10);
  auto acts = s.poll();
  CHECK_EQ(acts.size(), 2u);  // only a runs
  CHECK(!s.info(b).started);
  CHECK_EQ(s.num_waiting(), 2);
  s.abort(b);  // a waiting request can be aborted
  acts = s.poll();
  CHECK_EQ(one(acts, ActionKind::kFinish, b, -1).aux, static_cast<int64_t>(FinishReason::kAborted));
  CHECK_EQ(s.num_waiting(), 1);
  const int64_t e = s.slot_epoch(a, 0);
  s.on_draft_step(a, 0, e, 10, StepEnd::kNone);
  s.on_verification(a, 0, e, kAccept);
  acts = s.poll();
  CHECK_EQ(one(acts, ActionKind::kFinish, a, -1).aux, static_cast<int64_t>(FinishReason::kBudget));
  CHECK_EQ(one(acts, ActionKind::kLaunchDraft, d, 0).step, 0);  // d starts when a finishes
  CHECK(s.info(d).started);
  CHECK_EQ(s.num_active(), 1);
}

void test_alpha_ends() {
  g_test = "alpha_ends";
  const double nan = std::numeric_limits<double>::quiet_NaN();
  {
    FpsrScheduler s(cfg(4, 0.0));
    CHECK(s.accepts(0.0));  // alpha = 0 accepts every non-NaN verdict, even an underflowed cpn of 0
    CHECK(s.accepts(1e-300));
    CHECK(s.accepts(1.0));
    CHECK(!s.accepts(nan));
    RequestId r = s.add_request(1000);
    std::vector<int64_t> ep;
    fill_window(s, r, 0, 2, 10, &ep);
    s.on_verification(r, 0, ep[0], 0.0);
    s.on_verification(r, 1, ep[1], nan);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kCommitDraft, r, 0).step, 0);
    CHECK_EQ(count(a, ActionKind::kCommitDraft), 1);
    CHECK_EQ(s.stats().rejected, 1);
  }
  {
    FpsrScheduler s(cfg(4, 1.0));
    CHECK(!s.accepts(1.0));  // alpha = 1 rejects everything
    CHECK(!s.accepts(0.999999));
    CHECK(!s.accepts(1.5));  // explicit, not through cpn <= 1
    CHECK(!s.accepts(nan));
    RequestId r = s.add_request(1000);
    std::vector<int64_t> ep;
    fill_window(s, r, 0, 1, 10, &ep);
    s.on_verification(r, 0, ep[0], 1.0);
    s.on_target_step(r, 0, ep[0], 7, StepEnd::kNone);
    auto a = s.poll();
    CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 0).tokens, 7);
    CHECK_EQ(s.stats().accepted, 0);
  }
  {
    FpsrScheduler s(cfg(4, 0.7));
    CHECK(!s.accepts(0.7));  // strict: cpn == alpha rejects
    CHECK(s.accepts(std::nextafter(0.7f, 1.0f)));  // the next float32 above alpha
    CHECK(!s.accepts(std::nextafter(0.7, 1.0)));  // the next double rounds to 0.7f: float32, as the kernels
  }
}

void test_on_reject_policy() {
  g_test = "on_reject_policy";
  FpsrScheduler s(cfg(4, 0.5, TargetLaunch::kOnReject));
  RequestId r = s.add_request(1000);
  std::vector<int64_t> ep;
  auto a = fill_window(s, r, 0, 3, 10, &ep);
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 0);
  s.on_verification(r, 2, ep[2], kReject);  // launched at once, before slots 0 and 1 resolve
  a = s.poll();
  Action t = one(a, ActionKind::kLaunchTarget, r, 2);
  CHECK_EQ(t.aux, -1);
  CHECK_EQ(t.tokens, 1000 - 20);
  s.on_target_step(r, 2, ep[2], 5, StepEnd::kNone);
  CHECK_EQ(count(s.poll(), ActionKind::kCommitTarget), 0);  // slots 0, 1 unresolved
  s.on_verification(r, 0, ep[0], kAccept);
  s.on_verification(r, 1, ep[1], kAccept);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitDraft), 2);
  CHECK_EQ(count(a, ActionKind::kCancel), 0);  // no target work to throw away
  CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 2).tokens, 5);
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 0);
  CHECK_EQ(one(a, ActionKind::kLaunchDraft, r, 3).step, 3);
}

void test_drafting_off() {
  g_test = "drafting_off";
  FpsrScheduler s(cfg(4, 0.5, TargetLaunch::kOnReject));
  RequestId r = s.add_request(1000, 0, /*drafting=*/false);
  CHECK(!s.info(r).drafting);
  auto a = s.poll();
  CHECK_EQ(count(a, ActionKind::kLaunchDraft), 0);
  Action t0 = one(a, ActionKind::kLaunchTarget, r, 0);  // alone, whatever the launch policy
  CHECK_EQ(t0.aux, -1);
  CHECK_EQ(t0.tokens, 1000);
  CHECK_EQ(s.stats().undrafted_steps, 1);
  s.on_draft_step(r, 0, t0.epoch, 3, StepEnd::kNone);  // no draft was asked for: stale
  CHECK_EQ(s.stats().stale_events, 1);
  s.on_target_step(r, 0, t0.epoch, 7, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 0).tokens, 7);
  Action t1 = one(a, ActionKind::kLaunchTarget, r, 1);  // the next step alone, continuing the branch
  CHECK_EQ(t1.aux, t0.epoch);
  CHECK_EQ(t1.tokens, 993);
  CHECK_EQ(count(a, ActionKind::kLaunchDraft), 0);
  CHECK_EQ(s.stats().accepted + s.stats().rejected, 0);  // nothing was verified

  s.set_drafting(r, true);  // applies from the next position opened
  CHECK(s.poll().empty());
  s.on_target_step(r, 1, t1.epoch, 5, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitTarget), 1);
  CHECK_EQ(one(a, ActionKind::kLaunchDraft, r, 2).step, 2);
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 0);  // on-reject: the drafted step's target waits

  std::vector<int64_t> ep;
  fill_window(s, r, 2, 1, 10, &ep);  // step 2 drafted: step 3 opens
  const int64_t e3 = s.slot_epoch(r, 3);
  CHECK(e3 >= 0);
  s.set_drafting(r, false);  // open positions run on; nothing opens after them
  s.on_draft_step(r, 3, e3, 10, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kLaunchDraft), 0);
  CHECK_EQ(one(a, ActionKind::kLaunchVerify, r, 3).epoch, e3);
  s.on_verification(r, 2, ep[0], kAccept);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitDraft), 1);
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 0);  // step 3 is still open
  s.on_verification(r, 3, e3, kReject);
  Action t3 = one(s.poll(), ActionKind::kLaunchTarget, r, 3);
  CHECK_EQ(t3.aux, -1);
  s.on_target_step(r, 3, e3, 4, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(one(a, ActionKind::kCommitTarget, r, 3).tokens, 4);
  Action t4 = one(a, ActionKind::kLaunchTarget, r, 0);  // step 4, alone, continuing step 3's branch
  CHECK_EQ(t4.step, 4);
  CHECK_EQ(t4.aux, e3);
  CHECK_EQ(s.stats().undrafted_steps, 3);
  s.on_target_step(r, 0, t4.epoch, 2, StepEnd::kEos);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitTarget), 1);
  CHECK_EQ(one(a, ActionKind::kFinish, r, -1).aux, static_cast<int64_t>(FinishReason::kEos));
  CHECK_EQ(s.info(r).committed_tokens, 7 + 5 + 10 + 4 + 2);
  CHECK_EQ(s.info(r).steps_from_draft, 1);
  CHECK_EQ(s.info(r).steps_from_target, 4);

  // a budget of 3 tokens: one step alone, then the budget ends it
  RequestId b = s.add_request(3, 0, false);
  Action tb = one(s.poll(), ActionKind::kLaunchTarget, b, 0);
  CHECK_EQ(tb.tokens, 3);
  s.on_target_step(b, 0, tb.epoch, 3, StepEnd::kNone);
  a = s.poll();
  CHECK_EQ(count(a, ActionKind::kCommitTarget), 1);
  CHECK_EQ(one(a, ActionKind::kFinish, b, -1).aux, static_cast<int64_t>(FinishReason::kBudget));
  CHECK_EQ(count(a, ActionKind::kLaunchTarget), 0);
  check_throws("set_drafting", [&] { s.set_drafting(7, true); }, {"set_drafting", "request", "7"});
}

void test_bad_arguments() {
  g_test = "bad_arguments";
  auto make = [](int64_t w, double alpha) {
    return [w, alpha] { FpsrScheduler s(cfg(w, alpha)); };
  };
  check_throws("window 0", make(0, 0.5), {"window", "0"});
  check_throws("window -3", make(-3, 0.5), {"window", "-3"});
  check_throws("alpha -0.1", make(4, -0.1), {"alpha", "-0.1"});
  check_throws("alpha 1.5", make(4, 1.5), {"alpha", "1.5"});
  check_throws("alpha nan", make(4, std::nan("")), {"alpha", "nan"});
  check_throws("max_active", [] { Config c; c.max_active_requests = -1; FpsrScheduler s(c); },
               {"max_active_requests", "-1"});
  check_throws("max_step_tokens", [] { Config c; c.max_step_tokens = -2; FpsrScheduler s(c); },
               {"max_step_tokens", "-2"});
  check_throws("target_launch", [] { Config c; c.target_launch = static_cast<TargetLaunch>(7); FpsrScheduler s(c); },
               {"target_launch", "7"});

  FpsrScheduler s(cfg());
  check_throws("budget 0", [&] { s.add_request(0); }, {"budget_tokens", "0"});
  check_throws("budget -5", [&] { s.add_request(-5); }, {"budget_tokens", "-5"});
  check_throws("budget_steps", [&] { s.add_request(10, -1); }, {"budget_steps", "-1"});
  RequestId r = s.add_request(100);
  s.poll();
  const int64_t e = s.slot_epoch(r, 0);
  check_throws("unknown request", [&] { s.on_draft_step(5, 0, e, 1, StepEnd::kNone); }, {"request", "5"});
  check_throws("negative request", [&] { s.on_verification(-1, 0, e, 0.5); }, {"request", "-1"});
  check_throws("slot 4", [&] { s.on_target_step(r, 4, e, 1, StepEnd::kNone); }, {"slot", "4"});
  check_throws("slot -1", [&] { s.on_verification(r, -1, e, 0.5); }, {"slot", "-1"});
  check_throws("epoch", [&] { s.on_verification(r, 0, 99, 0.5); }, {"epoch", "99"});
  check_throws("tokens -1", [&] { s.on_draft_step(r, 0, e, -1, StepEnd::kNone); }, {"tokens", "-1"});
  check_throws("tokens 0", [&] { s.on_draft_step(r, 0, e, 0, StepEnd::kNone); }, {"tokens", "0"});
  check_throws("end", [&] { s.on_draft_step(r, 0, e, 3, static_cast<StepEnd>(5)); }, {"end", "5"});
  check_throws("cpn 1.5", [&] { s.on_verification(r, 0, e, 1.5); }, {"cpn", "1.5"});
  check_throws("cpn -inf", [&] { s.on_verification(r, 0, e, -INFINITY); }, {"cpn", "inf"});
  check_throws("set_budget", [&] { s.set_budget(r, 0); }, {"budget_tokens", "0"});
  check_throws("done", [&] { (void)s.done(3); }, {"request", "3"});
  check_throws("abort", [&] { s.abort(3); }, {"request", "3"});
  // None of the bad calls changed anything.
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, 0);
  CHECK_EQ(s.num_requests(), 1);
}

void test_window_one() {
  g_test = "window_one";
  FpsrScheduler s(cfg(1));
  RequestId r = s.add_request(1000);
  s.poll();
  for (int step = 0; step < 5; ++step) {
    const int64_t e = s.slot_epoch(r, 0);
    s.on_draft_step(r, 0, e, 2, step == 4 ? StepEnd::kEos : StepEnd::kNone);
    auto a = s.poll();
    CHECK_EQ(count(a, ActionKind::kLaunchDraft), 0);  // W = 1: the draft waits for the verdict
    s.on_verification(r, 0, e, step % 2 ? kAccept : kReject);
    if (step % 2 == 0) s.on_target_step(r, 0, e, 3, step == 4 ? StepEnd::kEos : StepEnd::kNone);
    s.poll();
  }
  CHECK(s.done(r));
  CHECK_EQ(s.info(r).steps_from_draft, 2);
  CHECK_EQ(s.info(r).steps_from_target, 3);
  CHECK_EQ(s.info(r).committed_tokens, 13);
}

// ---------------------------------------------------------------------------------------------------
// Randomised executor vs sequential speculative reasoning

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
uint64_t mix2(uint64_t a, uint64_t b) { return mix(a ^ mix(b + 0x1234567ULL)); }

struct Prefix {
  uint64_t h = 0;
  int64_t len = 0;  // tokens after the prompt
  bool operator==(const Prefix& o) const { return h == o.h && len == o.len; }
};

struct Step {
  uint64_t label = 0;
  int64_t tokens = 0;
  StepEnd end = StepEnd::kNone;
};

// Deterministic "models": the draft's and the target's step on a prefix, and the verdict on a draft step.
// A step is a hash of its prefix; salt, token_mod and end_mod make the two models differ.
Step model_step(const Prefix& p, int64_t cap, uint64_t salt, uint64_t token_mod, uint64_t end_mod) {
  Step s;
  s.label = mix2(p.h, salt);
  s.tokens = std::min<int64_t>(1 + static_cast<int64_t>(s.label % token_mod), cap);
  const uint64_t e = (s.label >> 20) % end_mod;
  s.end = e == 0 ? StepEnd::kEos : e == 1 ? StepEnd::kAnswerMarker : StepEnd::kNone;
  return s;
}
Step draft_step(const Prefix& p, int64_t cap) { return model_step(p, cap, 1, 15, 23); }
Step target_step(const Prefix& p, int64_t cap) { return model_step(p, cap, 2, 11, 19); }
double verdict_cpn(const Step& d) {
  const uint64_t v = mix2(d.label, 3);
  if (v % 41 == 0) return std::numeric_limits<double>::quiet_NaN();
  return static_cast<double>((v >> 8) % 1001) / 1000.0;  // includes 0, 1 and alpha itself
}
Prefix extend_prefix(const Prefix& p, const Step& s) { return Prefix{mix2(p.h, s.label), p.len + s.tokens}; }

struct Commit {
  bool from_draft;
  uint64_t label;
  int64_t tokens;
  bool operator==(const Commit& o) const {
    return from_draft == o.from_draft && label == o.label && tokens == o.tokens;
  }
};

struct Outcome {
  std::vector<Commit> commits;
  FinishReason reason = FinishReason::kNone;
};

int64_t cap_for(const Prefix& p, int64_t budget, int64_t max_step_tokens) {
  const int64_t rem = budget - p.len;
  return max_step_tokens > 0 ? std::min(rem, max_step_tokens) : rem;
}

// Sequential speculative reasoning: draft a step, verify it, on rejection let the target write it; the
// steps in `undrafted` (indices) the target writes alone.
Outcome sequential(uint64_t seed, int64_t budget, int64_t budget_steps, double alpha, int64_t max_step_tokens,
                   const std::set<int64_t>& undrafted = {}) {
  FpsrScheduler rule(cfg(1, alpha));
  Outcome out;
  Prefix p{seed, 0};
  while (true) {
    const int64_t cap = cap_for(p, budget, max_step_tokens);
    Step step;
    bool acc = false;
    if (undrafted.count(static_cast<int64_t>(out.commits.size()))) {
      step = target_step(p, cap);
    } else {
      const Step d = draft_step(p, cap);
      acc = rule.accepts(verdict_cpn(d));
      step = acc ? d : target_step(p, cap);
    }
    out.commits.push_back(Commit{acc, step.label, step.tokens});
    p = extend_prefix(p, step);
    if (step.end == StepEnd::kEos) { out.reason = FinishReason::kEos; break; }
    if (step.end == StepEnd::kAnswerMarker) { out.reason = FinishReason::kAnswerMarker; break; }
    if (p.len >= budget || (budget_steps > 0 && static_cast<int64_t>(out.commits.size()) >= budget_steps)) {
      out.reason = FinishReason::kBudget;
      break;
    }
  }
  return out;
}

struct SimParams {
  int64_t window;
  double alpha;
  TargetLaunch policy;
  int64_t max_active;
  int64_t max_step_tokens;
  int requests;
  uint64_t seed;
  bool toggle_drafting = false;  // the executor turns requests' drafting off and on at random
};

// One piece of work under way in the simulated executor.
struct Flight {
  int kind;  // 0 draft, 1 verify, 2 target
  RequestId r;
  int64_t slot, epoch;
  bool stale;  // cancelled or a duplicate: the scheduler must ignore it
  Step result;
  double cpn;
};

Stats g_sim_totals;  // summed over the simulated runs, to show what they exercised

bool simulate(const SimParams& sp) {
  const int failures_before = g_failures;
  std::mt19937_64 rng(sp.seed);
  Config c = cfg(sp.window, sp.alpha, sp.policy);
  c.max_active_requests = sp.max_active;
  c.max_step_tokens = sp.max_step_tokens;
  FpsrScheduler s(c);

  struct EpochState {
    RequestId request = -1;
    Prefix prefix;
    bool draft_done = false;
    Step draft;
    std::set<int> held;  // 0 draft, 1 verify, 2 target: launched and neither consumed nor cancelled
    Step target;
    bool target_done = false;
    bool undrafted = false;  // launched as a target step alone (drafting off)
  };
  struct Req {
    uint64_t seed;
    int64_t budget, budget_steps;
    Prefix committed;
    int64_t committed_steps = 0;
    std::map<int64_t, int64_t> step_epoch;  // open steps
    Outcome got;
    int64_t last_committed_target_epoch = -1;
    std::set<int64_t> undrafted;  // committed steps the target wrote alone
  };
  std::vector<Req> reqs;
  std::map<int64_t, EpochState> epochs;
  std::vector<Flight> flights;
  int64_t expected_stale = 0;

  for (int i = 0; i < sp.requests; ++i) {
    Req q;
    q.seed = mix2(sp.seed, static_cast<uint64_t>(i));
    q.committed = Prefix{q.seed, 0};
    q.budget = 1 + static_cast<int64_t>(rng() % 120);
    q.budget_steps = rng() % 3 == 0 ? 1 + static_cast<int64_t>(rng() % 12) : 0;
    const bool drafting = !sp.toggle_drafting || rng() % 2 == 0;
    CHECK_EQ(s.add_request(q.budget, q.budget_steps, drafting), static_cast<RequestId>(i));
    reqs.push_back(q);
  }

  auto held_by = [&](RequestId r) {
    int n = 0;
    for (const auto& kv : epochs)
      if (kv.second.request == r) n += static_cast<int>(kv.second.held.size());
    return n;
  };

  auto process = [&](const std::vector<Action>& actions) {
    for (const Action& a : actions) {
      Req& q = reqs[static_cast<size_t>(a.request)];
      switch (a.kind) {
        case ActionKind::kLaunchDraft: {
          CHECK(epochs.find(a.epoch) == epochs.end());
          EpochState st;
          st.request = a.request;
          // the chain (re)starts at this step: later open steps of an older chain were dropped
          q.step_epoch.erase(q.step_epoch.lower_bound(a.step), q.step_epoch.end());
          if (a.step == q.committed_steps) {
            st.prefix = q.committed;
          } else {
            CHECK(q.step_epoch.count(a.step - 1) == 1);
            const EpochState& prev = epochs[q.step_epoch[a.step - 1]];
            CHECK(prev.draft_done);
            st.prefix = extend_prefix(prev.prefix, prev.draft);
          }
          CHECK_EQ(a.tokens, cap_for(st.prefix, q.budget, sp.max_step_tokens));
          CHECK(a.tokens >= 1);
          CHECK_EQ(a.slot, a.step % sp.window);
          CHECK(static_cast<int64_t>(q.step_epoch.size()) < sp.window);
          q.step_epoch[a.step] = a.epoch;
          st.held.insert(0);
          epochs[a.epoch] = st;
          flights.push_back(Flight{0, a.request, a.slot, a.epoch, false, draft_step(st.prefix, a.tokens), 0.0});
          // at most one draft under way per request
          int drafts = 0;
          for (const auto& f : flights) drafts += (f.kind == 0 && f.r == a.request && !f.stale);
          CHECK_EQ(drafts, 1);
          break;
        }
        case ActionKind::kLaunchVerify: {
          EpochState& st = epochs[a.epoch];
          CHECK(st.draft_done);
          CHECK_EQ(a.tokens, st.draft.tokens);
          CHECK(st.held.insert(1).second);
          flights.push_back(Flight{1, a.request, a.slot, a.epoch, false, st.draft, verdict_cpn(st.draft)});
          break;
        }
        case ActionKind::kLaunchTarget: {
          if (epochs.count(a.epoch) == 0) {  // no draft: the head of an empty window, at the committed text
            CHECK(sp.toggle_drafting);
            CHECK_EQ(a.step, q.committed_steps);
            q.step_epoch.erase(q.step_epoch.lower_bound(a.step), q.step_epoch.end());  // cancelled positions
            CHECK(q.step_epoch.empty());
            EpochState fresh;
            fresh.request = a.request;
            fresh.prefix = q.committed;
            fresh.undrafted = true;
            epochs[a.epoch] = fresh;
            q.step_epoch[a.step] = a.epoch;
          }
          EpochState& st = epochs[a.epoch];
          CHECK_EQ(a.tokens, cap_for(st.prefix, q.budget, sp.max_step_tokens));
          CHECK(st.held.insert(2).second);
          if (a.aux >= 0) {  // continues the branch just committed: its prefix is the committed text
            CHECK(sp.policy == TargetLaunch::kEager || st.undrafted);
            CHECK_EQ(a.aux, q.last_committed_target_epoch);
            CHECK(st.prefix == q.committed);
          }
          flights.push_back(Flight{2, a.request, a.slot, a.epoch, false, target_step(st.prefix, a.tokens), 0.0});
          break;
        }
        case ActionKind::kCancel: {
          EpochState& st = epochs[a.epoch];
          CHECK(a.aux != 0);
          for (int piece = 0; piece < 3; ++piece) {
            if (!(a.aux & (int64_t{1} << piece))) continue;
            CHECK(st.held.erase(piece) == 1);  // only held work is cancelled
            for (auto& f : flights)
              if (f.epoch == a.epoch && f.kind == piece && !f.stale) {
                f.stale = true;  // it may still report, late
              }
          }
          break;
        }
        case ActionKind::kCommitDraft:
        case ActionKind::kCommitTarget: {
          const bool from_draft = a.kind == ActionKind::kCommitDraft;
          EpochState& st = epochs[a.epoch];
          CHECK_EQ(a.step, q.committed_steps);
          CHECK(st.prefix == q.committed);  // commits extend the committed text, in order
          const Step& step = from_draft ? st.draft : st.target;
          CHECK(from_draft ? st.draft_done : st.target_done);
          CHECK(st.held.erase(from_draft ? 0 : 2) == 1);
          CHECK_EQ(a.tokens, step.tokens);
          CHECK_EQ(a.aux, static_cast<int64_t>(step.end));
          q.got.commits.push_back(Commit{from_draft, step.label, step.tokens});
          if (st.undrafted) q.undrafted.insert(a.step);
          q.committed = extend_prefix(q.committed, step);
          ++q.committed_steps;
          q.step_epoch.erase(a.step);
          q.last_committed_target_epoch = from_draft ? -1 : a.epoch;
          break;
        }
        case ActionKind::kFinish: {
          CHECK(q.got.reason == FinishReason::kNone);
          q.got.reason = static_cast<FinishReason>(a.aux);
          CHECK_EQ(a.step, q.committed_steps);
          CHECK_EQ(a.tokens, q.committed.len);
          // every piece of work of this request was consumed or cancelled: nothing leaks
          CHECK_EQ(held_by(a.request), 0);
          for (const auto& f : flights) CHECK(f.r != a.request || f.stale);
          break;
        }
      }
    }
  };

  int64_t delivered = 0;
  while (true) {
    process(s.poll());
    if (s.all_done()) break;
    int live = 0;
    for (const auto& f : flights) live += !f.stale;
    if (live == 0) {
      CHECK(false);  // deadlock: the scheduler waits for nothing
      break;
    }
    if (sp.toggle_drafting && rng() % 3 == 0) s.set_drafting(static_cast<RequestId>(rng() % reqs.size()), rng() % 2);
    const size_t pick = static_cast<size_t>(rng() % flights.size());
    Flight f = flights[pick];
    flights.erase(flights.begin() + static_cast<std::ptrdiff_t>(pick));
    if (!f.stale && rng() % 8 == 0) {  // the executor reports this twice
      Flight dup = f;
      dup.stale = true;
      flights.push_back(dup);
    }
    if (f.stale) {
      if (rng() % 3 == 0) continue;  // cancelled work may also never report
      ++expected_stale;
    } else {
      EpochState& st = epochs[f.epoch];
      if (f.kind == 0) {
        st.draft_done = true;
        st.draft = f.result;
      } else if (f.kind == 1) {
        st.held.erase(1);
      } else {
        st.target_done = true;
        st.target = f.result;
      }
    }
    ++delivered;
    if (f.kind == 0) s.on_draft_step(f.r, f.slot, f.epoch, f.result.tokens, f.result.end);
    else if (f.kind == 1) {
      if (rng() % 2) s.on_verification(f.r, f.slot, f.epoch, f.cpn);
      else s.on_verdict(f.r, f.slot, f.epoch, s.accepts(f.cpn));
    } else s.on_target_step(f.r, f.slot, f.epoch, f.result.tokens, f.result.end);
  }
  // Whatever is still in flight reports late.
  for (const auto& f : flights) {
    CHECK(f.stale);
    ++expected_stale;
    if (f.kind == 0) s.on_draft_step(f.r, f.slot, f.epoch, f.result.tokens, f.result.end);
    else if (f.kind == 1) s.on_verification(f.r, f.slot, f.epoch, f.cpn);
    else s.on_target_step(f.r, f.slot, f.epoch, f.result.tokens, f.result.end);
  }
  CHECK(s.poll().empty());
  CHECK_EQ(s.stats().stale_events, expected_stale);

  const Stats& st = s.stats();
  int64_t from_draft = 0, from_target = 0;
  for (int i = 0; i < sp.requests; ++i) {
    const Req& q = reqs[static_cast<size_t>(i)];
    const Outcome ref = sequential(q.seed, q.budget, q.budget_steps, sp.alpha, sp.max_step_tokens, q.undrafted);
    ++g_checks;
    if (!(ref.commits == q.got.commits) || ref.reason != q.got.reason) {
      ++g_failures;
      std::fprintf(stderr, "FAIL [%s] request %d: FPSR committed %zu steps (reason %s), sequential %zu (reason %s)\n",
                   g_test, i, q.got.commits.size(), to_string(q.got.reason), ref.commits.size(),
                   to_string(ref.reason));
    }
    const RequestInfo info = s.info(i);
    CHECK_EQ(info.committed_steps, static_cast<int64_t>(ref.commits.size()));
    CHECK_EQ(info.committed_tokens, q.committed.len);
    CHECK(info.finish_reason == ref.reason);
    for (const auto& cm : ref.commits) (cm.from_draft ? from_draft : from_target) += 1;
  }
  g_sim_totals.steps_committed_draft += st.steps_committed_draft;
  g_sim_totals.steps_committed_target += st.steps_committed_target;
  g_sim_totals.stale_events += st.stale_events;
  g_sim_totals.slots_cancelled += st.slots_cancelled;
  g_sim_totals.targets_continued += st.targets_continued;
  g_sim_totals.undrafted_steps += st.undrafted_steps;
  if (!sp.toggle_drafting) CHECK_EQ(st.undrafted_steps, 0);
  g_sim_totals.finished_eos += st.finished_eos;
  g_sim_totals.finished_answer_marker += st.finished_answer_marker;
  g_sim_totals.finished_budget += st.finished_budget;
  CHECK_EQ(st.steps_committed_draft, from_draft);
  CHECK_EQ(st.steps_committed_target, from_target);
  CHECK_EQ(st.requests_finished, sp.requests);
  CHECK_EQ(st.drafts_completed + st.verifications + st.targets_completed + st.stale_events, delivered +
           static_cast<int64_t>(flights.size()));
  if (sp.alpha >= 1.0) CHECK_EQ(st.accepted, 0);
  if (sp.policy == TargetLaunch::kOnReject) CHECK(st.targets_launched <= st.rejected + st.undrafted_steps);
  return g_failures == failures_before;
}

void test_random_vs_sequential() {
  g_test = "random_vs_sequential";
  int runs = 0, bad = 0;
  uint64_t seed = 1;
  for (int64_t w : {1, 2, 3, 4, 7}) {
    for (double alpha : {0.0, 0.3, 0.7, 1.0}) {
      for (TargetLaunch policy : {TargetLaunch::kEager, TargetLaunch::kOnReject}) {
        for (int64_t max_active : {0, 2}) {
          for (int rep = 0; rep < 6; ++rep) {
            SimParams sp{w, alpha, policy, max_active, rep % 2 ? 8 : 0, 1 + rep, seed++, rep >= 3};
            ++runs;
            if (!simulate(sp)) {
              ++bad;
              if (bad <= 3)
                std::fprintf(stderr, "  (sim failed: W=%lld alpha=%.1f policy=%d max_active=%lld seed=%llu)\n",
                             static_cast<long long>(w), alpha, static_cast<int>(policy),
                             static_cast<long long>(max_active), static_cast<unsigned long long>(sp.seed));
            }
          }
        }
      }
    }
  }
  CHECK_EQ(bad, 0);
  const Stats& t = g_sim_totals;
  std::printf("  random_vs_sequential: %d simulated runs; steps from draft %lld, from target %lld; slots cancelled %lld;"
              " stale events %lld; targets continued %lld; undrafted %lld; finished eos/answer/budget %lld/%lld/%lld\n",
              runs, static_cast<long long>(t.steps_committed_draft), static_cast<long long>(t.steps_committed_target),
              static_cast<long long>(t.slots_cancelled), static_cast<long long>(t.stale_events),
              static_cast<long long>(t.targets_continued), static_cast<long long>(t.undrafted_steps),
              static_cast<long long>(t.finished_eos),
              static_cast<long long>(t.finished_answer_marker), static_cast<long long>(t.finished_budget));
}

}  // namespace

int main() {
  test_first_actions();
  test_all_accepted();
  test_window_slides();
  test_reject_middle(false);
  test_reject_middle(true);
  test_reject_slot0();
  test_out_of_order();
  test_late_events_ignored();
  test_eos_inside_window();
  test_budget();
  test_concurrent_requests();
  test_max_active();
  test_alpha_ends();
  test_on_reject_policy();
  test_drafting_off();
  test_bad_arguments();
  test_window_one();
  test_random_vs_sequential();
  if (g_failures) {
    std::fprintf(stderr, "test_scheduler: %d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  std::printf("test_scheduler: all %d checks passed\n", g_checks);
  return 0;
}
