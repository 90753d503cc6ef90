// Vectorised row kernels of the assignment solver (jv.cpp), for rows stored contiguously.
//
// Each kernel walks one cost row c[0, n) once, reading it in its own type and working in double. `sign` is
// +1, or -1 when maximising (so no negated copy of the matrix exists). On x86-64 with GCC or Clang every
// kernel is compiled twice, for AVX2 and for the baseline ISA, and the loader picks the one the CPU runs
// (target_clones); elsewhere the portable vector code is compiled for the target's own vector unit.
#pragma once

#include <cstdint>

namespace tsc_fast::simd {

constexpr std::int32_t kBlock = 64;   // columns per block of recorded minima (relax)

struct TwoSmallest {
    double first;          // smallest of sign * c[j] - v[j]
    double second;         // second smallest (equal to `first` on a tie)
    std::int32_t first_col;
    std::int32_t second_col;
};

// Keeps (first, second) the two smallest values seen, a value equal to `first` counting as second.
inline void keep_two_smallest(TwoSmallest& m, double value, std::int32_t col) {
    if (!(value < m.second)) return;
    if (value < m.first) {
        m.second = m.first;
        m.second_col = m.first_col;
        m.first = value;
        m.first_col = col;
    } else {
        m.second = value;
        m.second_col = col;
    }
}

// The two smallest reduced costs sign * c[j] - v[j] of the row, with their columns (-1 when n < 2).
TwoSmallest two_smallest(const float* c, double sign, const double* v, std::int32_t n);
TwoSmallest two_smallest(const double* c, double sign, const double* v, std::int32_t n);

// The smallest reduced cost sign * c[j] - v[j] of the row (+inf when n == 0).
double smallest(const float* c, double sign, const double* v, std::int32_t n);
double smallest(const double* c, double sign, const double* v, std::int32_t n);

// Column reduction step: where sign * c[j] < col_min[j], set col_min[j] to it and argmin[j] = row. Returns
// whether the row holds an entry no solve accepts (sign * c[j] NaN or -inf), checked on the way for free.
bool lower_column_minima(const float* c, double sign, double* col_min, std::int32_t* argmin, std::int32_t row,
                         std::int32_t n);
bool lower_column_minima(const double* c, double sign, double* col_min, std::int32_t* argmin,
                         std::int32_t row, std::int32_t n);

// Dijkstra relaxation through one row: candidate = sign * c[j] - open_v[j] - offset; where it is smaller
// than dist[j] (always, when `first`), store it and pred[j] = row. Writes the smallest dist of each block of
// kBlock columns to block_min and returns the smallest dist overall.
double relax(const float* c, double sign, const double* open_v, double offset, double* dist,
             std::int32_t* pred, std::int32_t row, std::int32_t n, double* block_min, bool first);
double relax(const double* c, double sign, const double* open_v, double offset, double* dist,
             std::int32_t* pred, std::int32_t row, std::int32_t n, double* block_min, bool first);

// A reduced cost and its column.
struct Scored {
    double value;
    std::int32_t col;
};

// The k smallest finite reduced costs sign * c[j] - v[j] of the row (fewer when the row has fewer finite
// ones). Exact ties are broken by a pseudo-random order of the columns drawn from `tie_seed`, so that rows
// of a tie-heavy matrix spread over different columns instead of all picking the same few. Writes their
// columns to `cols` (unordered) and returns how many it wrote. Scratch: block_min holds n / kSpan + 1 doubles, pool holds n entries.
constexpr std::int32_t kSpan = 16;
std::int32_t smallest_k(const float* c, double sign, const double* v, std::int32_t n, std::uint32_t tie_seed,
                        std::int32_t k, double* block_min, Scored* pool, std::int32_t* cols);
std::int32_t smallest_k(const double* c, double sign, const double* v, std::int32_t n, std::uint32_t tie_seed,
                        std::int32_t k, double* block_min, Scored* pool, std::int32_t* cols);

}  // namespace tsc_fast::simd
