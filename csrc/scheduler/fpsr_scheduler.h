// The FPSR scheduler: a deterministic state machine for Fully Parallel Speculative Reasoning
// (docs/method.md, FPSR; docs/architecture.md, layer 3).
//
// Plain C++17 and the STL only: no torch, no Python, no models. An executor (the Python FPSR engine)
// drives it: it calls poll() for the work to launch and the commits to make, runs that work on the
// models, and reports what finished through the on_*() events. The scheduler never blocks and never
// calls out. It is not thread-safe: drive one instance from one thread.
//
// Model of one request
//   The committed text is P (prompt + committed steps). A lookahead window holds up to W open steps
//   beyond P, at positions 0..W-1; absolute step k lives in slot k % W (a ring), so a slot index is
//   always in [0, W). For the step at position i (prefix P + d_<i) the scheduler asks for three pieces
//   of work:
//     d_i  the draft's step on P + d_<i                   (kLaunchDraft)   -> on_draft_step()
//     c_i  the target's verdict (cpn) on that step         (kLaunchVerify)  -> on_verification()/on_verdict()
//     t_i  the target's own step on P + d_<i (fallback)    (kLaunchTarget)  -> on_target_step()
//   Each time a slot is given a step it gets a fresh epoch, unique across the whole scheduler (an
//   executor can key its branches by epoch alone). Every action names (request, slot, epoch); every
//   event must carry them back. An event whose epoch is not the slot's current one, or for work that
//   was cancelled, already reported, or belongs to a finished request, is stale: it is ignored and
//   counted in Stats::stale_events, never an error.
//
// Rules
//   * The draft chain is sequential: d_{i+1} is launched when d_i has finished (its prefix exists), as
//     long as fewer than W steps are open, d_i did not end the answer (EOS / answer marker), d_i is not
//     known to be rejected, and the budget left on that prefix is at least one token.
//   * c_i is launched as soon as d_i finishes; verdicts may return in any order.
//   * accept iff cpn > alpha, decided by dreamr::accepts (csrc/include/dreamr/common.h): both narrowed to
//     float32, alpha <= 0 accepts every non-NaN cpn (even 0), alpha >= 1 rejects every step, NaN rejects.
//   * Early stopping: as soon as c_i rejects, every position after i is cancelled (its draft, verify
//     and target work), whether or not earlier positions are resolved: nothing past a rejection can
//     ever be committed.
//   * Resolution runs in step order at the head of the window: an accepted head commits its draft step
//     (kCommitDraft) and cancels its no longer needed target branch; a rejected head commits the
//     target's step t_i (kCommitTarget), waiting for it if it is still running. The window then slides:
//     new positions open from the new prefix (a sliding window: the draft never waits for a round of W
//     verdicts; it gives exactly the commits of the paper's round-by-round loop).
//   * A request finishes (kFinish) when a committed step ends with EOS (reason kEos) or the answer
//     marker (kAnswerMarker), when its committed tokens reach the token budget or its committed steps
//     reach the step budget (kBudget), or when abort() is called (kAborted). Everything still open is
//     cancelled first.
//   * Target launch policy (Config::target_launch):
//       kEager     t_i is launched together with d_i, "as soon as its prefix exists" (the paper): a
//                  rejection costs no extra latency and the W fallback branches decode as one batch;
//                  the price is target work that is thrown away for every accepted step. Default.
//       kOnReject  t_i is launched only once c_i rejects (even before earlier positions resolve):
//                  no wasted target decoding, one step of target latency per rejection.
//     Both policies commit exactly the same steps.
//   * Drafting on and off (set_drafting; adaptive drafting, docs/method.md): while a request's drafting
//     is off, a new position opens only as the head of an empty window, with no draft and no verdict:
//     its kLaunchTarget comes alone (whatever the target launch policy) and its target step is committed
//     once it finishes (kCommitTarget). Nothing opens after such a position: the next prefix is that
//     step. Positions already open when drafting goes off run on; drafting coming back on applies from
//     the next position opened. The flag is read when a position opens, so an executor sets it before
//     reporting the event whose commit opens the next one.
//   * Target continuation: a kCommitTarget that does not finish the request is followed (in the same poll
//     batch) by the kLaunchTarget of the new head position with aux = the committed epoch, in kEager mode
//     and wherever the new head has no draft: that branch's cache already holds the new prefix, so the
//     executor may continue decoding it instead of prefilling a new branch. In every other case aux = -1
//     and the executor frees a committed target branch once it has applied the commit.
//
// Executor recipe (what the Python engine keeps per request): the committed text; the open chain, a map
// step -> epoch filled by kLaunchDraft (a kLaunchDraft for step k drops entries >= k: they belonged to a
// cancelled chain); per epoch the drafted text and the live draft / verify / target work.
//   kLaunchDraft   prefix = committed text + drafted text of the open chain's steps before `step`
//                  (the draft cache must first catch up with committed target steps).
//   kLaunchVerify  verify the epoch's drafted step on its prefix.
//   kLaunchTarget  decode the target's own step on the epoch's prefix (continue branch `aux` if >= 0); an
//                  epoch with no kLaunchDraft before it is a step without a draft, at the committed text.
//   kCancel        stop / release the named pieces; roll the draft cache back to before this step if the
//                  draft bit is set; free the target branch's rows if the target bit is set. Events from
//                  cancelled work may still be reported: the scheduler ignores them.
//   kCommit*       append the epoch's drafted / target text to the committed text, in step order.
//   kFinish        the request's last action.
// Then report each finished piece with on_draft_step / on_verification (or on_verdict) / on_target_step,
// poll() again, and repeat until all_done().
//
// Budget: a launch action's `tokens` is the most tokens the step may take: the request's token budget
// minus the prefix length (committed tokens + the draft tokens of earlier open positions), capped by
// Config::max_step_tokens when that is set. The scheduler does not enforce it: a step that reports more
// is committed as reported and the request then finishes with reason kBudget.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace dreamr {

using RequestId = int64_t;

// How a reported step ended.
enum class StepEnd : int { kNone = 0, kEos = 1, kAnswerMarker = 2 };

// Why a request finished. kNone: not finished yet.
enum class FinishReason : int { kNone = 0, kEos = 1, kAnswerMarker = 2, kBudget = 3, kAborted = 4 };

// When the target's fallback step t_i is launched (see the header comment).
enum class TargetLaunch : int { kEager = 0, kOnReject = 1 };

// What an action asks of the executor. The numbers are part of the Python API: do not renumber.
enum class ActionKind : int {
  kLaunchDraft = 0,   // run the draft's step on the slot's prefix;        tokens = max tokens
  kLaunchVerify = 1,  // verify the slot's drafted step (CPN);              tokens = the draft step's tokens
  kLaunchTarget = 2,  // run the target's own step on the slot's prefix;   tokens = max tokens,
                      //   aux = epoch of the committed target branch to continue, or -1 (fresh branch)
  kCancel = 3,        // drop the slot's work named in aux (bit mask of kWork*): stop it if running and
                      //   free what it holds (roll the draft / target cache back to the prefix)
  kCommitDraft = 4,   // append the slot's draft step to the request's text; tokens, aux = StepEnd
  kCommitTarget = 5,  // append the slot's target step (clean fallback);    tokens, aux = StepEnd
  kFinish = 6,        // the request is done: slot = epoch = -1, step = committed steps,
                      //   tokens = committed tokens, aux = FinishReason
};

// Bits of a kCancel action's aux.
constexpr int64_t kWorkDraft = 1;
constexpr int64_t kWorkVerify = 2;
constexpr int64_t kWorkTarget = 4;

struct Action {
  ActionKind kind;
  RequestId request;
  int64_t slot;    // in [0, W); -1 for kFinish
  int64_t epoch;   // the slot's epoch; -1 for kFinish
  int64_t step;    // absolute index of the step in the request (0 = first step after the prompt)
  int64_t tokens;  // see ActionKind
  int64_t aux;     // see ActionKind

  bool operator==(const Action& o) const {
    return kind == o.kind && request == o.request && slot == o.slot && epoch == o.epoch && step == o.step &&
           tokens == o.tokens && aux == o.aux;
  }
  bool operator!=(const Action& o) const { return !(*this == o); }
};

// One line of text, e.g. "CommitDraft r=0 slot=1 epoch=3 step=1 tokens=12 aux=0" (tests, logs).
std::string to_string(const Action& a);
const char* to_string(ActionKind k);
const char* to_string(FinishReason r);

struct Config {
  int64_t window = 4;                          // W, lookahead steps per request, >= 1
  double alpha = 0.7;                          // acceptance threshold in [0, 1]
  TargetLaunch target_launch = TargetLaunch::kEager;
  int64_t max_active_requests = 0;             // requests scheduled at once (others wait, FIFO); 0 = no limit
  int64_t max_step_tokens = 0;                 // cap on a step's tokens in launch actions; 0 = none
};

struct Stats {
  int64_t requests_added = 0;
  int64_t requests_finished = 0;
  int64_t finished_eos = 0, finished_answer_marker = 0, finished_budget = 0, finished_aborted = 0;

  int64_t drafts_launched = 0, verifications_launched = 0, targets_launched = 0;
  int64_t targets_continued = 0;               // target launches with a branch to continue (aux >= 0)
  int64_t undrafted_steps = 0;                 // positions opened without a draft (drafting off)

  int64_t drafts_completed = 0, verifications = 0, targets_completed = 0;  // non-stale events
  int64_t accepted = 0, rejected = 0;          // verdicts (a verdict for a slot cancelled later counts too)

  int64_t steps_committed_draft = 0, steps_committed_target = 0;
  int64_t tokens_committed_draft = 0, tokens_committed_target = 0;

  int64_t cancel_actions = 0;                  // kCancel actions emitted
  int64_t slots_cancelled = 0;                 // open positions dropped (early stopping, finish, abort)
  int64_t drafts_cancelled = 0, verifications_cancelled = 0, targets_cancelled = 0;  // pieces in kCancel
                                               //   (a rejected draft, an accepted step's target included)
  int64_t stale_events = 0;                    // events ignored as stale
};

// The state of one request, for queries.
struct RequestInfo {
  RequestId id = -1;
  int64_t budget_tokens = 0;
  int64_t budget_steps = 0;                    // 0 = no step limit
  bool started = false;                        // false while waiting for a free place (max_active_requests)
  FinishReason finish_reason = FinishReason::kNone;
  int64_t committed_tokens = 0;
  int64_t committed_steps = 0;
  int64_t steps_from_draft = 0;
  int64_t steps_from_target = 0;
  int64_t open_slots = 0;                      // positions currently open in the window
  bool drafting = true;                        // set_drafting: new positions draft (else the target alone)
};

class FpsrScheduler {
 public:
  // Throws std::invalid_argument for window < 1, alpha NaN or outside [0, 1], max_active_requests < 0,
  // max_step_tokens < 0, or an unknown target_launch.
  explicit FpsrScheduler(const Config& config = Config());

  // Adds a request; its first actions are queued at once (or when a place frees up). Ids count from 0.
  // budget_tokens >= 1 (a budget below one token cannot hold a step); budget_steps >= 0, 0 = no limit;
  // drafting: the request's first positions draft (see set_drafting).
  RequestId add_request(int64_t budget_tokens, int64_t budget_steps = 0, bool drafting = true);

  // All actions queued since the last poll, in the order they arose. A slot's kLaunchDraft comes before
  // any other action on that epoch; commits come in step order; a request's kFinish is its last action.
  std::vector<Action> poll();

  // Events. request must be a known id, slot in [0, W), epoch one that was issued (else
  // std::invalid_argument); anything else that does not match current work is a counted stale event.
  // tokens >= 0, and >= 1 unless the step ends the answer (a step of no tokens would make no progress).
  void on_draft_step(RequestId request, int64_t slot, int64_t epoch, int64_t tokens, StepEnd end);
  // cpn must be NaN (rejects) or in [0, 1].
  void on_verification(RequestId request, int64_t slot, int64_t epoch, double cpn);
  // A verdict already decided by the executor (e.g. the accept mask of dreamr's cpn ops, which compare
  // in the cpn's own precision): use it to stay bit-identical with those ops.
  void on_verdict(RequestId request, int64_t slot, int64_t epoch, bool accepted);
  void on_target_step(RequestId request, int64_t slot, int64_t epoch, int64_t tokens, StepEnd end);

  // Budget event: changes the request's token budget (>= 1). If the committed tokens already reach it,
  // the request finishes with reason kBudget. Ignored (not counted) for a finished request.
  void set_budget(RequestId request, int64_t budget_tokens);
  // Finishes the request with reason kAborted, cancelling all its work. No-op if already finished.
  void abort(RequestId request);
  // Whether positions the request opens from now on are drafted (the default) or written by the target
  // alone (see the rules). Emits nothing itself: the flag is read at the next position opened.
  void set_drafting(RequestId request, bool drafting);

  bool accepts(double cpn) const;  // the acceptance rule with this scheduler's alpha

  bool done(RequestId request) const;
  bool all_done() const;  // every request added so far has finished
  FinishReason finish_reason(RequestId request) const;
  RequestInfo info(RequestId request) const;
  int64_t slot_epoch(RequestId request, int64_t slot) const;  // the slot's current epoch, -1 if closed
  int64_t num_requests() const { return static_cast<int64_t>(requests_.size()); }
  int64_t num_active() const { return active_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  const Config& config() const { return config_; }
  const Stats& stats() const { return stats_; }

 private:
  enum class Work : uint8_t { kIdle, kRunning, kDone };  // kDone: result held, not yet consumed

  struct Slot {
    bool open = false;
    int64_t epoch = -1;
    int64_t step = -1;
    int64_t max_tokens = 0;
    Work draft = Work::kIdle, verify = Work::kIdle, target = Work::kIdle;
    int64_t draft_tokens = 0, target_tokens = 0;
    StepEnd draft_end = StepEnd::kNone, target_end = StepEnd::kNone;
    int verdict = -1;  // -1 unknown, 0 rejected (or no draft: the target's step is committed), 1 accepted
  };

  struct Request {
    int64_t budget_tokens = 0;
    int64_t budget_steps = 0;
    bool started = false;
    FinishReason reason = FinishReason::kNone;
    int64_t committed_tokens = 0;
    int64_t committed_steps = 0;
    int64_t steps_from_draft = 0, steps_from_target = 0;
    int64_t open = 0;               // open positions 0..open-1; position p is step committed_steps + p
    bool drafting = true;           // new positions draft (set_drafting)
    int64_t continue_epoch = -1;    // committed target branch the next head target may continue
    std::vector<Slot> slots;        // W slots while running; released when finished
  };

  Request& checked_request(const char* what, RequestId request);
  const Request& checked_request(const char* what, RequestId request) const;
  void check_event(const char* what, RequestId request, int64_t slot, int64_t epoch);
  Slot* live_slot(Request& r, int64_t slot, int64_t epoch);
  Slot& at(Request& r, int64_t position);
  int64_t position_of(const Request& r, const Slot& s) const;
  int64_t remaining_tokens(Request& r, int64_t position);
  int64_t step_cap(int64_t remaining) const;

  void apply_verdict(RequestId id, Request& r, Slot& s, bool accepted);
  void start(RequestId id);
  void advance(RequestId id);
  bool resolve_head(RequestId id, Request& r);
  void extend(RequestId id, Request& r);
  void launch_target(RequestId id, Request& r, Slot& s, int64_t continue_epoch);
  void cancel_work(RequestId id, Slot& s, int64_t mask);
  void drop_after(RequestId id, Request& r, int64_t position);
  void close_head(Request& r);
  bool check_finished_after_commit(RequestId id, Request& r, StepEnd end);
  void finish(RequestId id, Request& r, FinishReason reason);
  void emit(ActionKind kind, RequestId id, int64_t slot, int64_t epoch, int64_t step, int64_t tokens, int64_t aux);

  Config config_;
  Stats stats_;
  std::vector<Request> requests_;
  std::deque<RequestId> waiting_;
  std::vector<Action> queue_;
  int64_t active_ = 0;
  int64_t finished_ = 0;
  int64_t next_epoch_ = 0;
};

}  // namespace dreamr
