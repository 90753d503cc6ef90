// Dense linear assignment (Jonker & Volgenant 1987), float32 and float64, read in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

namespace tsc_fast {

// A read-only view of a dense cost matrix: entry (i, j) lives at data[i * row_stride + j * col_stride].
// Strides count elements and may be zero or negative, so C-ordered, Fortran-ordered, transposed, sliced and
// broadcast arrays are all read where they lie.
template <typename T>
struct CostView {
    const T* data;
    std::ptrdiff_t rows;
    std::ptrdiff_t cols;
    std::ptrdiff_t row_stride;
    std::ptrdiff_t col_stride;
};

// The solver's error messages, defined once here; the binding exports them to tsc_fast.assign, which raises
// the same words for its other backends.
inline constexpr const char kInfeasibleMessage[] =
    "cost matrix is infeasible: every complete assignment uses a forbidden (infinite) entry";

// No complete assignment avoids the forbidden (infinite) entries. Derives from invalid_argument so that
// pybind11 raises it as ValueError.
struct InfeasibleError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// An entry is NaN or the disallowed infinity (only when SolveOptions::check_entries is set). The message
// names the first such entry in row-major order, e.g. "cost[2, 3] is nan: NaN and -inf are not allowed
// when minimising (+inf marks a forbidden pair)".
struct InvalidEntryError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// The solve was stopped because SolveOptions::should_stop returned true. The output holds no result (only
// the -1s it is cleared to first) and everything the solve allocated is freed.
struct SolveStopped : std::exception {
    const char* what() const noexcept override { return "assignment solve stopped on request"; }
};

// Tuning of the solver; the defaults are what the benchmarks chose. Tests lower them to exercise the
// candidate phase (see jv.cpp) on small matrices.
struct SolveOptions {
    std::int64_t sparse_min_cols = 1024;  // use candidate edges from this many columns on
    std::int32_t candidates = 0;          // candidate edges per row to start with (1 to 256; 0: by size)
    bool check_entries = false;           // raise InvalidEntryError on NaN or the disallowed infinity; on
                                          // square matrices this rides along the first pass, for free
    // Cancellation (the binding uses it to notice Ctrl-C; the core knows nothing of Python). When set,
    // should_stop(stop_context) is called at phase boundaries and whenever another kStopCheckWork matrix
    // entries (or candidate edges) have been read, i.e. every few milliseconds of a long phase; returning
    // true makes the solve throw SolveStopped. It is called on the thread that runs the solve, so it should
    // be cheap (the binding's reads a clock and takes the GIL at most every 50 ms).
    bool (*should_stop)(void* context) = nullptr;
    void* stop_context = nullptr;
};

// Matrix entries (or candidate edges) read between two calls of SolveOptions::should_stop.
inline constexpr std::int64_t kStopCheckWork = std::int64_t{1} << 22;

// Finds the first entry, in row-major order, that no solve accepts: NaN, or the infinity that would be a
// prize rather than a ban (-inf when minimising, +inf when maximising). Returns false when there is none.
template <typename T>
bool find_invalid_entry(const CostView<T>& cost, bool maximize, std::ptrdiff_t& row, std::ptrdiff_t& col);

// Throws InvalidEntryError naming the first entry that find_invalid_entry finds, if there is one.
template <typename T>
void check_entries(const CostView<T>& cost, bool maximize);

// Optimal assignment: minimises (or maximises) the summed cost over assigned pairs, assigning
// min(rows, cols) pairs. Writes col_for_row[i] for every row; -1 marks a row left unassigned (only when rows
// outnumber columns). Forbidden pairs are +inf (minimise) or -inf (maximise). Entries must have passed
// find_invalid_entry (or options.check_entries be set). Throws InfeasibleError when every complete
// assignment uses a forbidden pair, SolveStopped when options.should_stop asked it to stop.
// Extra memory: O(rows + cols); the matrix is never copied.
template <typename T>
void solve_assignment(const CostView<T>& cost, bool maximize, std::int64_t* col_for_row,
                      const SolveOptions& options = SolveOptions{});

extern template bool find_invalid_entry<float>(const CostView<float>&, bool, std::ptrdiff_t&, std::ptrdiff_t&);
extern template bool find_invalid_entry<double>(const CostView<double>&, bool, std::ptrdiff_t&, std::ptrdiff_t&);
extern template void check_entries<float>(const CostView<float>&, bool);
extern template void check_entries<double>(const CostView<double>&, bool);
extern template void solve_assignment<float>(const CostView<float>&, bool, std::int64_t*,
                                             const SolveOptions&);
extern template void solve_assignment<double>(const CostView<double>&, bool, std::int64_t*,
                                              const SolveOptions&);

}  // namespace tsc_fast
