// Linear assignment problem (LAP) on a dense matrix: Jonker & Volgenant, "A shortest augmenting path
// algorithm for dense and sparse linear assignment problems", Computing 38 (1987) 325-340, written from the
// paper, with the paper's own sparse idea used as an accelerator for large matrices.
//
// Problem: rows <= cols (the caller transposes otherwise); find the column x[i] of every row minimising
// sum_i c(i, x[i]) with distinct columns. Dual variables: v[j] per column; a row's dual is implicit,
// u[i] = c(i, x[i]) - v[x[i]]. An assigned row is "tight" when its reduced cost c(i, j) - v[j] is smallest at
// its own column; when every row is assigned and tight, (u, v) is dual feasible and the assignment optimal.
// Rectangular problems also need v[j] <= 0 and v[j] == 0 on unassigned columns; starting from v = 0 keeps
// that, since only columns that are (and stay) assigned ever get their v lowered.
//
// Phases (as in the paper):
//   1. column reduction: v[j] = min_i c(i, j); each column goes to its cheapest row if that row is still free;
//   2. reduction transfer: a row holding exactly one column hands its slack to that column;
//   3. augmenting row reduction (ARR): a cheap auction in which a free row takes its best column, lowering
//      the column's v, and the row it evicts looks again;
//   4. augmentation: for each row still free, Dijkstra's shortest path in reduced costs to a free column,
//      then flip the path and update the duals of the columns it settled.
// Phases 1-2 need a square matrix (they may raise v[j] above 0); rectangular problems start at phase 3.
//
// Large matrices (cols >= SolveOptions::sparse_min_cols, 1024 by default) run phases 2-4 on candidate edges
// first: the k (16 or 32) smallest reduced costs of each row after phase 1. Almost every optimal pair is
// among them, and a step then costs O(k) instead of O(cols). "Tight" then only holds on candidate edges, so a
// check on the whole matrix follows: rows that some other column would serve better are freed, get more
// candidates, and are augmented again. A round without such rows proves the assignment optimal for the dense
// problem. After kMaxRounds rounds the rows still free go to the dense search, which the check has made safe
// (every row it left assigned is tight on the whole matrix). See augment_on_candidates_until_verified. The
// dense phases run instead when phase 1 leaves few rows free or when the candidates are mostly exact ties.
//
// Termination: phase 3 is bounded by its budget (see reduce_rows); every search settles each column at most
// once; the candidate phase runs at most kMaxRounds rounds. No loop depends on a floating-point comparison
// making progress.
//
// Cancellation: every step that reads a matrix row (or a row's candidate edges) counts what it read, and
// after each kStopCheckWork entries, and at each phase boundary, SolveOptions::should_stop is asked whether
// to stop (see StopCheck). The count is one subtraction per row read; matrices under kStoppableEntries
// entries, which finish in milliseconds even in the worst case, are solved by an instance without it
// (StopCheck<false>), so that small solves pay nothing.
//
// Precision: costs are read in their own type (float32 stays float32 in memory) and every dual and path
// length is a double. `maximize` is handled by reading -c, never by a negated copy. Memory beyond the
// matrix: O(rows + cols), plus about k edges per row (16 bytes each) on large matrices.
// Speed: dense steps walk one matrix row contiguously (jv_simd.cpp vectorises them). The dense Dijkstra masks
// settled columns with v = -inf (their candidate distance becomes +inf) instead of keeping an index list, so
// its loop is branch-free; it records the smallest distance per block of kBlock columns, so finding the next
// column to settle costs O(cols / kBlock + kBlock) rather than a second pass.
#include "jv.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "jv_simd.hpp"

namespace tsc_fast {
namespace {

using Index = std::int32_t;
constexpr Index kNone = -1;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr Index kBlock = simd::kBlock;   // columns per block of recorded minima (dense Dijkstra)
constexpr int kReductionPasses = 2;      // ARR passes, as in the paper
constexpr Index kMaxCandidates = 256;    // most candidates added to a row at once
// Candidate edges per row to start with (SolveOptions::candidates == 0): more pay off on larger matrices,
// whose rows have more near-optimal columns (measured with bench/bench_assign.py).
constexpr Index kFewCandidates = 16;
constexpr Index kManyCandidates = 32;
constexpr std::int64_t kManyCols = 4096;
constexpr int kMaxRounds = 4;            // candidate rounds before the dense search takes the rest
constexpr Index kTieSampleRows = 64;     // rows sampled to spot a tie-heavy matrix before building candidates
// ARR budgets, in row scans per row of the matrix: a dense scan costs O(cols), a candidate scan O(k).
constexpr double kDenseReductionBudget = 2.0;
constexpr double kSparseReductionBudget = 32.0;
// The check of the candidate phase counts a row as violated only when a column beats its own by more than
// this many ulps of the magnitudes involved: below that the comparison is rounding noise, not a better
// column. Accepting such a row costs at most that much, far below the 1e-12 relative accuracy promised.
constexpr double kRoundingUlps = 16.0;

struct InvalidEntryFound {};   // thrown by phase 1, turned into InvalidEntryError by solve_assignment

const char* const kInfeasible = kInfeasibleMessage;

// Solves of fewer entries never ask should_stop: JV's worst case, about rows^2 * cols steps, is then under
// 2**24 steps, a few milliseconds.
constexpr std::int64_t kStoppableEntries = std::int64_t{1} << 16;

// Asks SolveOptions::should_stop at phase boundaries (boundary) and once per kStopCheckWork units of work
// (spend: one unit per matrix entry or candidate edge read); throws SolveStopped when it says so.
// StopCheck<false> does nothing.
template <bool Enabled = true>
class StopCheck {
  public:
    explicit StopCheck(const SolveOptions& options)
        : should_stop_(options.should_stop), context_(options.stop_context) {}
    void boundary() {
        if (should_stop_ != nullptr) ask();
    }
    void spend(std::int64_t work) {
        budget_ -= work;
        if (__builtin_expect(budget_ < 0, 0)) refill();
    }

  private:
    // Out of line and cold, so that the hot loops only carry a subtraction and a branch.
    __attribute__((noinline, cold)) void ask() {
        if (should_stop_(context_)) throw SolveStopped{};
    }
    __attribute__((noinline, cold)) void refill() {
        budget_ = kStopCheckWork;
        boundary();
    }

    bool (*const should_stop_)(void*);
    void* const context_;
    std::int64_t budget_ = kStopCheckWork;
};

template <>
class StopCheck<false> {
  public:
    explicit StopCheck(const SolveOptions&) {}
    void boundary() {}
    void spend(std::int64_t) {}
};

template <typename T, bool Stoppable>
class JonkerVolgenant {
  public:
    // `cost` is the oriented problem (rows <= cols); sign = -1 reads -c, to maximise.
    JonkerVolgenant(const CostView<T>& cost, double sign, const SolveOptions& options)
        : cost_(cost),
          sign_(sign),
          options_(options),
          candidates_per_row_(options.candidates > 0      ? options.candidates
                              : cost.cols < kManyCols ? kFewCandidates
                                                      : kManyCandidates),
          rows_(static_cast<Index>(cost.rows)),
          cols_(static_cast<Index>(cost.cols)),
          stop_(options),
          v_(cols_, 0.0),
          col_of_row_(rows_, kNone),
          row_of_col_(cols_, kNone) {
        if (cost_.col_stride != 1) gathered_row_.resize(cols_);
    }

    // Returns the column of every row (all assigned, since rows <= cols).
    const std::vector<Index>& solve() {
        if (rows_ == cols_) {
            reduce_columns();
            stop_.boundary();
        } else {
            free_rows_.resize(rows_);
            for (Index i = 0; i < rows_; ++i) free_rows_[i] = i;
        }
        // Candidate edges only pay off when they separate the columns: when most rows have more tied
        // smallest reduced costs than candidates (small integer costs, the float32 rounding grid of an
        // additive matrix), the dense phases, which prefer free columns among ties, do better.
        // Likewise when column reduction leaves few rows free (strongly matched costs): the dense searches
        // for them cost less than the passes that candidate edges need.
        const bool many_free = 16 * free_rows_.size() > static_cast<std::size_t>(rows_);
        const bool sparse = cols_ >= options_.sparse_min_cols && many_free && build_candidates_if_distinct();
        const Scope scope = sparse ? Scope::Candidates : Scope::Dense;
        // Transfer pays when ARR has many rows to place; otherwise it is a pass over the matrix for little.
        if (rows_ == cols_ && many_free) transfer_reductions(scope);
        stop_.boundary();
        std::size_t budget = static_cast<std::size_t>(
            (sparse ? kSparseReductionBudget : kDenseReductionBudget) * static_cast<double>(rows_));
        for (int pass = 0; pass < kReductionPasses && !free_rows_.empty(); ++pass) {
            reduce_rows(budget, scope);
            stop_.boundary();
        }
        if (sparse) augment_on_candidates_until_verified();   // also when ARR left no free row: it checks
        if (!free_rows_.empty()) {
            prepare_dense_search();
            for (Index row : std::vector<Index>(free_rows_)) augment_dense(row);   // relax() counts the work
        }
        return col_of_row_;
    }

  private:
    enum class Scope { Dense, Candidates };
    struct Edge {
        Index col;
        double cost;
    };
    // Per-column state of the candidate searches, kept together so that an edge touches one cache line.
    struct alignas(32) ColumnState {
        double v = 0.0;             // the column's dual, copied from v_ during the searches
        std::uint32_t reached = 0;  // stamp of the last search that reached the column
        std::uint32_t settled = 0;  // stamp of the last search that settled it
        Index heap_pos = kNone;
        Index pred = kNone;         // row it was reached from
    };
    struct HeapEntry {
        double dist;
        Index col;
        bool free;
    };

    // Row i as a contiguous array (gathered into a scratch row when the matrix is strided).
    const T* row(Index i) {
        const T* r = cost_.data + static_cast<std::ptrdiff_t>(i) * cost_.row_stride;
        if (cost_.col_stride == 1) return r;
        for (Index j = 0; j < cols_; ++j) gathered_row_[j] = r[static_cast<std::ptrdiff_t>(j) * cost_.col_stride];
        return gathered_row_.data();
    }
    double cost(Index i, Index j) const {
        return sign_ * static_cast<double>(cost_.data[static_cast<std::ptrdiff_t>(i) * cost_.row_stride +
                                                      static_cast<std::ptrdiff_t>(j) * cost_.col_stride]);
    }
    void assign(Index i, Index j) {
        col_of_row_[i] = j;
        row_of_col_[j] = i;
    }

    // The two smallest reduced costs of row i over all columns, or over its candidate edges.
    simd::TwoSmallest row_minima(Index i, Scope scope) {
        if (scope == Scope::Dense) {
            stop_.spend(cols_);
            return simd::two_smallest(row(i), sign_, v_.data(), cols_);
        }
        stop_.spend(static_cast<std::int64_t>(candidates_[i].size()));
        simd::TwoSmallest m{kInf, kInf, kNone, kNone};
        for (const Edge& e : candidates_[i]) simd::keep_two_smallest(m, e.cost - v_[e.col], e.col);
        return m;
    }

    // Phase 1. Rows without a column go to free_rows_; rows holding exactly one to single_rows_.
    void reduce_columns() {
        std::vector<Index> cheapest_row(cols_, kNone);
        std::fill(v_.begin(), v_.end(), kInf);
        bool invalid = false;
        for (Index i = 0; i < rows_; ++i) {   // row by row, so the matrix is read contiguously
            stop_.spend(cols_);
            invalid |= simd::lower_column_minima(row(i), sign_, v_.data(), cheapest_row.data(), i, cols_);
        }
        if (invalid && options_.check_entries) throw InvalidEntryFound{};
        std::vector<Index> columns_won(rows_, 0);
        for (Index j = cols_ - 1; j >= 0; --j) {
            if (v_[j] == kInf) throw InfeasibleError(kInfeasible);   // no row may take this column
            const Index i = cheapest_row[j];
            if (columns_won[i]++ == 0) assign(i, j);
        }
        for (Index i = 0; i < rows_; ++i) {
            if (columns_won[i] == 0) free_rows_.push_back(i);
            if (columns_won[i] == 1) single_rows_.push_back(i);
        }
    }

    // Phase 2. A row holding one column has reduced cost 0 there and `slack` >= 0 at its next best column;
    // lowering v of its column by `slack` keeps it tight, raises the column's reduced cost for every other
    // row (keeping it >= 0) and so steers ARR away from columns already taken.
    void transfer_reductions(Scope scope) {
        for (Index i : single_rows_) {
            const Index own = col_of_row_[i];
            const simd::TwoSmallest m = row_minima(i, scope);
            const double slack = m.first_col == own ? m.second : m.first;
            if (slack < kInf) v_[own] -= slack;
        }
    }

    // Phase 3, one pass over free_rows_; rows still free afterwards are kept there for the next pass.
    //
    // A free row takes its cheapest column j1 and lowers v[j1] by (second - first), which keeps it tight and
    // makes j1 dearer for the evicted row; the evicted row is looked at again at once. Classic codes loop
    // forever here on rounding ties: when (second - first) is below the resolution of v[j1], v[j1] does not
    // move, and two rows can evict each other indefinitely. Two guards make termination certain:
    //   - an evicted row is re-examined at once only when v[j1] strictly decreased as a stored double;
    //     otherwise (a tie, or a decrease lost to rounding) it is deferred to the next pass;
    //   - every row scan spends one unit of `budget`; at zero the pass stops and leaves the remaining rows to
    //     phase 4, whose searches always finish.
    // So each pass performs at most budget + 1 loop iterations, and there are kReductionPasses passes.
    void reduce_rows(std::size_t& budget, Scope scope) {
        std::vector<Index>& pending = free_rows_;
        std::size_t cursor = 0;     // next row to examine
        std::size_t deferred = 0;   // rows for the next pass are compacted into pending[0, deferred)
        while (cursor < pending.size()) {
            if (budget == 0) {
                while (cursor < pending.size()) pending[deferred++] = pending[cursor++];
                break;
            }
            --budget;
            const Index i = pending[cursor++];
            const simd::TwoSmallest m = row_minima(i, scope);
            if (m.first == kInf) throw InfeasibleError(kInfeasible);   // the row has no allowed column
            Index col = m.first_col;
            Index evicted = row_of_col_[col];
            const double lowered = v_[col] - (m.second - m.first);
            if (m.second < kInf && lowered < v_[col]) {
                v_[col] = lowered;
                if (evicted != kNone) pending[--cursor] = evicted;   // reuses the slot of row i
            } else {
                // Tie: take the second column instead when the first is taken (it costs the row the same), or
                // better, any free column at the same reduced cost: tie-heavy matrices (integer costs, the
                // float32 rounding grid of an additive matrix) then fill up instead of evicting in circles.
                if (evicted != kNone && m.second < kInf) {
                    col = m.second_col;
                    evicted = row_of_col_[col];
                    if (evicted != kNone && m.second == m.first) {
                        const Index free_col = free_column_at(i, m.first, scope);
                        if (free_col != kNone) {
                            col = free_col;
                            evicted = kNone;
                        }
                    }
                }
                if (evicted != kNone) pending[deferred++] = evicted;   // deferred <= cursor - 1 here
            }
            if (evicted != kNone) col_of_row_[evicted] = kNone;
            assign(i, col);
        }
        pending.resize(deferred);
    }

    // A free column where row i's reduced cost equals `value`, or kNone.
    Index free_column_at(Index i, double value, Scope scope) {
        if (scope == Scope::Candidates) {
            for (const Edge& e : candidates_[i]) {
                if (row_of_col_[e.col] == kNone && e.cost - v_[e.col] == value) return e.col;
            }
            return kNone;
        }
        stop_.spend(cols_);
        const T* r = row(i);
        for (Index j = 0; j < cols_; ++j) {
            if (row_of_col_[j] == kNone && sign_ * static_cast<double>(r[j]) - v_[j] == value) return j;
        }
        return kNone;
    }

    // ---- Phase 4 on candidate edges ----

    // Gives every row its candidates_per_row_ smallest reduced costs as candidate edges. Returns false (and
    // gives none) when more than a quarter of the rows have only tied values among them, judged first on a
    // sample of kTieSampleRows rows so that a tie-heavy matrix costs no full pass, then on all rows.
    bool build_candidates_if_distinct() {
        candidates_.assign(rows_, {});
        pool_.resize(cols_);
        span_min_.resize(cols_ / simd::kSpan + 2);
        picked_.resize(kMaxCandidates);
        const Index sample = std::min<Index>(rows_, kTieSampleRows);
        Index tied_in_sample = 0;
        for (Index t = 0; t < sample; ++t) {
            const Index i = static_cast<Index>(static_cast<std::int64_t>(t) * rows_ / sample);
            add_candidates(i, candidates_per_row_);
            tied_in_sample += only_ties(i);
        }
        Index tied_rows = 0;
        if (4 * tied_in_sample <= sample) {
            for (Index i = 0; i < rows_; ++i) {
                if (candidates_[i].empty()) add_candidates(i, candidates_per_row_);
                tied_rows += only_ties(i);
            }
            if (4 * static_cast<std::int64_t>(tied_rows) <= rows_) return true;
        }
        candidates_.clear();
        candidates_.shrink_to_fit();
        return false;
    }

    // Whether all of row i's candidate edges (two or more) have the same reduced cost.
    bool only_ties(Index i) const {
        const std::vector<Edge>& edges = candidates_[i];
        if (edges.size() < 2) return false;
        const double first = edges[0].cost - v_[edges[0].col];
        return std::all_of(edges.begin(), edges.end(), [&](const Edge& e) { return e.cost - v_[e.col] == first; });
    }

    // Adds the row's `count` smallest reduced costs (with the current duals) to its candidate edges. A row
    // with no finite entry gets none; it is infeasible, which the phases report when they meet it.
    void add_candidates(Index i, Index count) {
        count = std::min<Index>({count, cols_, kMaxCandidates});
        stop_.spend(cols_);
        const auto tie_seed = static_cast<std::uint32_t>(i) * 0x27D4EB2Fu + 0x165667B1u;
        const Index found = simd::smallest_k(row(i), sign_, v_.data(), cols_, tie_seed, count, span_min_.data(),
                                             pool_.data(), picked_.data());
        std::vector<Edge>& edges = candidates_[i];
        const std::size_t known = edges.size();
        edges.reserve(known + static_cast<std::size_t>(found));
        for (Index t = 0; t < found; ++t) {
            const Index j = picked_[t];
            const auto known_end = edges.begin() + static_cast<std::ptrdiff_t>(known);
            if (std::none_of(edges.begin(), known_end, [j](const Edge& e) { return e.col == j; })) {
                edges.push_back(Edge{j, cost(i, j)});
            }
        }
    }

    bool is_candidate(Index i, Index j) const {
        const std::vector<Edge>& edges = candidates_[i];
        return std::any_of(edges.begin(), edges.end(), [j](const Edge& e) { return e.col == j; });
    }

    // Rounds of candidate searches, each followed by a check on the whole matrix; see the file comment.
    // Termination: kMaxRounds rounds at most, and each search below ends (it settles each column once).
    void augment_on_candidates_until_verified() {
        state_.assign(cols_, ColumnState{});
        heap_.clear();
        // The first check covers every row; later ones only rows that a search touched since (a row's
        // reduced costs only grow while its own column keeps its dual, so an untouched tight row stays tight).
        touched_.assign(rows_, 1);
        for (int round = 0;; ++round) {
            for (Index j = 0; j < cols_; ++j) state_[j].v = v_[j];
            std::vector<Index> unresolved;
            for (Index row : free_rows_) {
                if (!augment_on_candidates(row)) unresolved.push_back(row);
            }
            for (Index j = 0; j < cols_; ++j) v_[j] = state_[j].v;
            free_violated_rows(unresolved);
            free_rows_.swap(unresolved);
            stop_.boundary();
            if (free_rows_.empty() || round + 1 >= kMaxRounds) return;
            for (Index row : free_rows_) {
                add_candidates(row, 2 * static_cast<Index>(candidates_[row].size()) + candidates_per_row_);
            }
        }
    }

    // Frees every touched, assigned row that some column outside its candidates would serve better than its
    // own (reduced cost smaller by more than rounding noise) and appends it to `freed`. Afterwards every
    // assigned row is tight on the whole matrix: a smaller reduced cost on a candidate edge can only be
    // rounding, since the searches keep candidate edges non-negative, and the row's minimum bounds every other
    // miss.
    void free_violated_rows(std::vector<Index>& freed) {
        std::vector<Index> released;   // columns of the freed rows
        for (Index i = 0; i < rows_; ++i) {
            const Index own = col_of_row_[i];
            if (own == kNone || !touched_[i]) continue;
            touched_[i] = 0;
            stop_.spend(cols_);
            const T* r = row(i);
            const double least = simd::smallest(r, sign_, v_.data(), cols_);
            const double own_cost = cost(i, own);
            if (!(least < own_cost - v_[own])) continue;
            const simd::TwoSmallest m = simd::two_smallest(r, sign_, v_.data(), cols_);
            const Index best = m.first_col;
            if (beaten(own_cost, own, m.first + v_[best], best) && !is_candidate(i, best)) {
                unassign(i, freed, released);
            }
        }
        if (rows_ < cols_) reset_released_columns(freed, released);
    }

    void unassign(Index i, std::vector<Index>& freed, std::vector<Index>& released) {
        released.push_back(col_of_row_[i]);
        row_of_col_[col_of_row_[i]] = kNone;
        col_of_row_[i] = kNone;
        freed.push_back(i);
    }

    // Whether column `other` at cost `other_cost` beats column `own` at `own_cost` for one row by more than
    // rounding noise: each reduced cost carries an error of a few ulps of the numbers it comes from.
    bool beaten(double own_cost, Index own, double other_cost, Index other) const {
        const double magnitude =
            std::fabs(own_cost) + std::fabs(v_[own]) + std::fabs(other_cost) + std::fabs(v_[other]);
        const double noise = kRoundingUlps * std::numeric_limits<double>::epsilon() * magnitude;
        return other_cost - v_[other] < own_cost - v_[own] - noise;
    }

    // Rectangular problems only: a column left unassigned must have v == 0 (the dual of the missing row).
    // A released column may have v < 0; raising it back to 0 lowers its reduced cost for every row, so each
    // assigned row is checked against it once more and freed when it now prefers that column, which releases
    // the row's own column in turn. Each step frees a row, so the cascade ends.
    void reset_released_columns(std::vector<Index>& freed, std::vector<Index>& released) {
        for (std::size_t t = 0; t < released.size(); ++t) {
            const Index col = released[t];
            if (v_[col] == 0.0) continue;
            stop_.spend(rows_);
            v_[col] = 0.0;
            for (Index k = 0; k < rows_; ++k) {
                const Index own = col_of_row_[k];
                if (own != kNone && beaten(cost(k, own), own, cost(k, col), col)) unassign(k, freed, released);
            }
        }
    }

    // Dijkstra from a free row over candidate edges only. Returns false, changing nothing, when no free
    // column is reachable that way.
    bool augment_on_candidates(Index start_row) {
        ++stamp_;
        settled_.clear();
        settled_dist_.clear();
        const auto reach = [this](Index j, double d, Index from) {
            ColumnState& s = state_[j];
            if (s.reached != stamp_) {
                s.reached = stamp_;
                s.pred = from;
                heap_push(j, d);
            } else if (d < heap_[s.heap_pos].dist) {
                s.pred = from;
                heap_[s.heap_pos].dist = d;
                heap_sift_up(s.heap_pos);
            }
        };
        for (const Edge& e : candidates_[start_row]) reach(e.col, e.cost - state_[e.col].v, start_row);
        Index sink = kNone;
        double sink_dist = kInf;
        while (!heap_.empty()) {
            const HeapEntry top = heap_pop();
            const Index col = top.col;
            const Index row = row_of_col_[col];
            if (row == kNone) {
                sink = col;
                sink_dist = top.dist;
                break;
            }
            state_[col].settled = stamp_;
            settled_.push_back(col);
            settled_dist_.push_back(top.dist);
            // The row is tight at `col`, so reaching it costs exactly `dist`.
            stop_.spend(static_cast<std::int64_t>(candidates_[row].size()));
            const double offset = cost(row, col) - state_[col].v - top.dist;
            for (const Edge& e : candidates_[row]) {
                const ColumnState& s = state_[e.col];
                if (s.settled != stamp_) reach(e.col, e.cost - s.v - offset, row);
            }
        }
        heap_.clear();
        if (sink == kNone) return false;
        for (std::size_t t = 0; t < settled_.size(); ++t) {
            const Index j = settled_[t];
            state_[j].v -= sink_dist - settled_dist_[t];
            touched_[row_of_col_[j]] = 1;
        }
        for (Index col = sink;;) {   // flip the path back to the start row
            const Index row = state_[col].pred;
            const Index previous = col_of_row_[row];
            assign(row, col);
            if (row == start_row) break;
            col = previous;
        }
        touched_[start_row] = 1;
        return true;
    }

    // Indexed 4-ary min-heap of reached columns by distance, free columns first on ties (they end the
    // search); state_[col].heap_pos is the slot of col while it is in the heap.
    bool heap_before(const HeapEntry& a, const HeapEntry& b) const {
        return a.dist < b.dist || (a.dist == b.dist && a.free && !b.free);
    }
    void heap_place(Index slot, const HeapEntry& entry) {
        heap_[slot] = entry;
        state_[entry.col].heap_pos = slot;
    }
    void heap_sift_up(Index slot) {
        const HeapEntry entry = heap_[slot];
        while (slot > 0) {
            const Index parent = (slot - 1) / 4;
            if (!heap_before(entry, heap_[parent])) break;
            heap_place(slot, heap_[parent]);
            slot = parent;
        }
        heap_place(slot, entry);
    }
    void heap_push(Index col, double dist) {
        heap_.push_back(HeapEntry{dist, col, row_of_col_[col] == kNone});
        heap_sift_up(static_cast<Index>(heap_.size()) - 1);
    }
    HeapEntry heap_pop() {
        const HeapEntry top = heap_[0];
        const HeapEntry last = heap_.back();
        heap_.pop_back();
        const Index size = static_cast<Index>(heap_.size());
        if (size == 0) return top;
        Index slot = 0;
        for (;;) {
            const Index first_child = 4 * slot + 1;
            if (first_child >= size) break;
            Index best = first_child;
            const Index end = std::min<Index>(size, first_child + 4);
            for (Index child = first_child + 1; child < end; ++child) {
                if (heap_before(heap_[child], heap_[best])) best = child;
            }
            if (!heap_before(heap_[best], last)) break;
            heap_place(slot, heap_[best]);
            slot = best;
        }
        heap_place(slot, last);
        return top;
    }

    // ---- Phase 4 on the whole matrix ----

    void prepare_dense_search() {
        dist_.assign(cols_, kInf);
        open_v_ = v_;
        pred_.assign(cols_, kNone);
        block_min_.assign((cols_ + kBlock - 1) / kBlock, kInf);
        free_cols_.clear();
        for (Index j = 0; j < cols_; ++j) {
            if (row_of_col_[j] == kNone) free_cols_.push_back(j);
        }
    }

    // Relaxes every open column through row i, reached with reduced-cost offset `offset`:
    // dist[j] = min(dist[j], c(i, j) - v[j] - offset). Settled columns have open_v_ = -inf, so their
    // candidate is +inf and never wins. Returns the smallest open distance; records it per block.
    double relax(Index i, double offset, bool first) {
        stop_.spend(cols_);
        return simd::relax(row(i), sign_, open_v_.data(), offset, dist_.data(), pred_.data(), i, cols_,
                           block_min_.data(), first);
    }

    // The open column to settle next: one at distance `best`, a free one if any (it ends the search).
    Index closest_column(double best) const {
        const bool few_free = free_cols_.size() <= block_min_.size();
        if (few_free) {
            for (Index j : free_cols_) {
                if (dist_[j] == best) return j;
            }
        }
        Index first_tie = kNone;
        for (std::size_t block = 0; block < block_min_.size(); ++block) {
            if (block_min_[block] != best) continue;
            const Index j0 = static_cast<Index>(block) * kBlock;
            const Index j1 = std::min<Index>(cols_, j0 + kBlock);
            for (Index j = j0; j < j1; ++j) {
                if (dist_[j] != best) continue;
                if (few_free || row_of_col_[j] == kNone) return j;
                if (first_tie == kNone) first_tie = j;
            }
        }
        return first_tie;
    }

    // Dijkstra in reduced costs over the whole matrix, from a free row until a free column is settled.
    void augment_dense(Index start_row) {
        settled_.clear();
        settled_dist_.clear();
        double best = relax(start_row, 0.0, true);
        Index sink = kNone;
        for (;;) {
            // +inf: every open column is forbidden from every reached row. The loop ends in any case, since
            // each round settles one column and there are finitely many.
            if (!(best < kInf)) throw InfeasibleError(kInfeasible);
            const Index col = closest_column(best);
            const Index row = row_of_col_[col];
            if (row == kNone) {
                sink = col;
                break;
            }
            settled_.push_back(col);
            settled_dist_.push_back(best);
            dist_[col] = kInf;
            open_v_[col] = -kInf;
            // The row is tight at `col`, so reaching it costs exactly `best`.
            best = relax(row, cost(row, col) - v_[col] - best, false);
        }
        update_duals(best);
        for (Index j : settled_) open_v_[j] = v_[j];
        flip_path(start_row, sink, pred_);
        free_cols_.erase(std::find(free_cols_.begin(), free_cols_.end(), sink));
    }

    // Settled columns move closer by how much sooner than the sink (at `sink_dist`) they were reached; this
    // keeps every row on the search tree tight and every reduced cost it looked at non-negative.
    void update_duals(double sink_dist) {
        for (std::size_t s = 0; s < settled_.size(); ++s) v_[settled_[s]] -= sink_dist - settled_dist_[s];
    }

    // Re-assigns along the shortest path that ends at `sink`, back to `start_row`.
    void flip_path(Index start_row, Index sink, const std::vector<Index>& pred) {
        for (Index col = sink;;) {
            const Index row = pred[col];
            const Index previous = col_of_row_[row];
            assign(row, col);
            if (row == start_row) break;
            col = previous;
        }
    }

    const CostView<T> cost_;
    const double sign_;
    const SolveOptions options_;
    const Index candidates_per_row_;
    const Index rows_;
    const Index cols_;
    StopCheck<Stoppable> stop_;
    std::vector<double> v_;
    std::vector<Index> col_of_row_;
    std::vector<Index> row_of_col_;
    std::vector<Index> free_rows_;
    std::vector<Index> single_rows_;
    std::vector<T> gathered_row_;   // scratch row for strided matrices
    std::vector<Index> settled_;    // columns settled by the current search, and their distances
    std::vector<double> settled_dist_;
    // Dense search workspace.
    std::vector<double> dist_;
    std::vector<double> open_v_;
    std::vector<Index> pred_;
    std::vector<double> block_min_;
    std::vector<Index> free_cols_;
    // Candidate phase: edges, search workspace (O(cols)), scratch of add_candidates.
    std::vector<std::vector<Edge>> candidates_;
    std::vector<ColumnState> state_;
    std::vector<HeapEntry> heap_;
    std::vector<char> touched_;   // rows whose tightness the next check must confirm
    std::uint32_t stamp_ = 0;
    std::vector<simd::Scored> pool_;
    std::vector<double> span_min_;
    std::vector<Index> picked_;
};

template <typename T>
std::vector<Index> solve_oriented(const CostView<T>& cost, bool maximize, const SolveOptions& options) {
    const double sign = maximize ? -1.0 : 1.0;
    if (options.should_stop != nullptr && cost.rows * cost.cols >= kStoppableEntries) {
        JonkerVolgenant<T, true> solver(cost, sign, options);
        return solver.solve();
    }
    JonkerVolgenant<T, false> solver(cost, sign, options);
    return solver.solve();
}

template <bool Maximize, typename T>
bool is_invalid(T c) {
    // NaN fails both comparisons; the "prize" infinity fails the one for its direction.
    return Maximize ? !(c < std::numeric_limits<T>::infinity()) : !(c > -std::numeric_limits<T>::infinity());
}

template <bool Maximize, typename T>
bool find_invalid_entry(const CostView<T>& cost, std::ptrdiff_t& row, std::ptrdiff_t& col,
                        StopCheck<>* stop = nullptr) {
    for (std::ptrdiff_t i = 0; i < cost.rows; ++i) {
        if (stop != nullptr) stop->spend(cost.cols);
        const T* r = cost.data + i * cost.row_stride;
        bool any = false;
        if (cost.col_stride == 1) {
            for (std::ptrdiff_t j = 0; j < cost.cols; ++j) any |= is_invalid<Maximize>(r[j]);
        } else {
            for (std::ptrdiff_t j = 0; j < cost.cols; ++j) any |= is_invalid<Maximize>(r[j * cost.col_stride]);
        }
        if (!any) continue;
        for (std::ptrdiff_t j = 0; j < cost.cols; ++j) {
            if (is_invalid<Maximize>(r[j * cost.col_stride])) {
                row = i;
                col = j;
                return true;
            }
        }
    }
    return false;
}

// Throws InvalidEntryError naming the first invalid entry in row-major order, if there is one.
template <typename T>
void throw_if_invalid(const CostView<T>& cost, bool maximize, StopCheck<>* stop = nullptr) {
    std::ptrdiff_t row = 0, col = 0;
    if (!(maximize ? find_invalid_entry<true>(cost, row, col, stop) : find_invalid_entry<false>(cost, row, col, stop))) {
        return;
    }
    const double value = cost.data[row * cost.row_stride + col * cost.col_stride];
    const char* const shown = std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
    throw InvalidEntryError("cost[" + std::to_string(row) + ", " + std::to_string(col) + "] is " + shown + ": " +
                            (maximize ? "NaN and +inf are not allowed when maximising (-inf marks a forbidden pair)"
                                      : "NaN and -inf are not allowed when minimising (+inf marks a forbidden pair)"));
}

}  // namespace

template <typename T>
bool find_invalid_entry(const CostView<T>& cost, bool maximize, std::ptrdiff_t& row, std::ptrdiff_t& col) {
    return maximize ? find_invalid_entry<true>(cost, row, col) : find_invalid_entry<false>(cost, row, col);
}

template <typename T>
void check_entries(const CostView<T>& cost, bool maximize) {
    throw_if_invalid(cost, maximize);
}

template <typename T>
void solve_assignment(const CostView<T>& cost, bool maximize, std::int64_t* col_for_row,
                      const SolveOptions& options) {
    std::fill(col_for_row, col_for_row + cost.rows, std::int64_t{-1});
    if (cost.rows == 0 || cost.cols == 0) return;
    if (cost.rows > std::numeric_limits<Index>::max() || cost.cols > std::numeric_limits<Index>::max()) {
        throw std::length_error("cost matrix has more than 2**31 - 1 rows or columns");
    }
    // The solver needs rows <= cols, and its hot loop walks a row: for a square Fortran-ordered (or
    // transposed) matrix, solving the transpose reads memory contiguously.
    const bool transpose = cost.rows > cost.cols ||
                           (cost.rows == cost.cols && cost.col_stride != 1 && cost.row_stride == 1);
    const CostView<T> oriented =
        transpose ? CostView<T>{cost.data, cost.cols, cost.rows, cost.col_stride, cost.row_stride} : cost;
    // Square matrices are checked during column reduction; rectangular ones need a pass of their own.
    if (options.check_entries && cost.rows != cost.cols) {
        StopCheck<> stop(options);
        throw_if_invalid(cost, maximize, &stop);
    }
    std::vector<Index> col_of_row;
    try {
        col_of_row = solve_oriented(oriented, maximize, options);
    } catch (const InvalidEntryFound&) {
        throw_if_invalid(cost, maximize);   // names the first invalid entry in the caller's row-major order
        throw InvalidEntryError("cost matrix holds NaN or a disallowed infinity");   // not reached
    }
    for (std::size_t k = 0; k < col_of_row.size(); ++k) {
        if (transpose) {
            col_for_row[col_of_row[k]] = static_cast<std::int64_t>(k);
        } else {
            col_for_row[k] = col_of_row[k];
        }
    }
}

template bool find_invalid_entry<float>(const CostView<float>&, bool, std::ptrdiff_t&, std::ptrdiff_t&);
template bool find_invalid_entry<double>(const CostView<double>&, bool, std::ptrdiff_t&, std::ptrdiff_t&);
template void check_entries<float>(const CostView<float>&, bool);
template void check_entries<double>(const CostView<double>&, bool);
template void solve_assignment<float>(const CostView<float>&, bool, std::int64_t*, const SolveOptions&);
template void solve_assignment<double>(const CostView<double>&, bool, std::int64_t*, const SolveOptions&);

}  // namespace tsc_fast
