// Vectorised row kernels (see jv_simd.hpp). Written with GCC/Clang vector extensions: four doubles per
// vector, which the compiler maps onto two SSE2 registers or one AVX2 register.
#include "jv_simd.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

// The vector helpers below are always inlined, so the AVX ABI note about passing 32-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && !defined(__AVX2__)
// One clone per ISA, chosen once at load time through an ifunc.
#define TSC_FAST_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define TSC_FAST_KERNEL
#endif
#define TSC_FAST_INLINE inline __attribute__((always_inline))

namespace tsc_fast::simd {
namespace {

typedef double d4 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef std::int64_t l4 __attribute__((vector_size(32)));   // lane mask / index of a d4
typedef std::int32_t i4 __attribute__((vector_size(16)));

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int32_t kLanes = 4;
constexpr std::int32_t kMaxK = 256;   // most entries smallest_k selects

TSC_FAST_INLINE d4 splat(double x) { return d4{x, x, x, x}; }
TSC_FAST_INLINE d4 load(const double* p) {
    d4 x;
    std::memcpy(&x, p, sizeof x);
    return x;
}
TSC_FAST_INLINE d4 load(const float* p) {
    f4 x;
    std::memcpy(&x, p, sizeof x);
    return __builtin_convertvector(x, d4);
}
TSC_FAST_INLINE i4 load(const std::int32_t* p) {
    i4 x;
    std::memcpy(&x, p, sizeof x);
    return x;
}
TSC_FAST_INLINE void store(double* p, d4 x) { std::memcpy(p, &x, sizeof x); }
TSC_FAST_INLINE void store(std::int32_t* p, i4 x) { std::memcpy(p, &x, sizeof x); }
TSC_FAST_INLINE double lane_min(d4 x) {
    const double a = x[0] < x[1] ? x[0] : x[1];
    const double b = x[2] < x[3] ? x[2] : x[3];
    return a < b ? a : b;
}

template <typename T>
TSC_FAST_INLINE TwoSmallest two_smallest_impl(const T* c, double sign, const double* v, std::int32_t n) {
    // Each lane keeps its own two smallest; the overall two smallest are among them.
    d4 first = splat(kInf), second = splat(kInf);
    l4 first_col = {-1, -1, -1, -1}, second_col = {-1, -1, -1, -1};
    l4 col = {0, 1, 2, 3};
    const d4 vsign = splat(sign);
    std::int32_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        const d4 x = load(c + j) * vsign - load(v + j);
        const l4 below_first = x < first;
        const l4 below_second = x < second;
        second = below_first ? first : (below_second ? x : second);
        second_col = below_first ? first_col : (below_second ? col : second_col);
        first = below_first ? x : first;
        first_col = below_first ? col : first_col;
        col += kLanes;
    }
    TwoSmallest m{kInf, kInf, -1, -1};
    for (int lane = 0; lane < kLanes; ++lane) {
        if (first_col[lane] >= 0) keep_two_smallest(m, first[lane], static_cast<std::int32_t>(first_col[lane]));
        if (second_col[lane] >= 0) keep_two_smallest(m, second[lane], static_cast<std::int32_t>(second_col[lane]));
    }
    for (; j < n; ++j) keep_two_smallest(m, sign * static_cast<double>(c[j]) - v[j], j);
    return m;
}

template <typename T>
TSC_FAST_INLINE bool lower_column_minima_impl(const T* c, double sign, double* col_min, std::int32_t* argmin,
                                              std::int32_t row, std::int32_t n) {
    const d4 vsign = splat(sign);
    const d4 lowest = splat(-kInf);
    const i4 vrow = {row, row, row, row};
    l4 valid = {-1, -1, -1, -1};
    std::int32_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
        const d4 x = load(c + j) * vsign;
        const d4 current = load(col_min + j);
        const l4 lower = x < current;
        valid &= x > lowest;   // false for NaN and -inf
        store(col_min + j, lower ? x : current);
        store(argmin + j, __builtin_convertvector(lower, i4) ? vrow : load(argmin + j));
    }
    bool invalid = !(valid[0] & valid[1] & valid[2] & valid[3]);
    for (; j < n; ++j) {
        const double x = sign * static_cast<double>(c[j]);
        invalid |= !(x > -kInf);
        if (x < col_min[j]) {
            col_min[j] = x;
            argmin[j] = row;
        }
    }
    return invalid;
}

template <typename T, bool First>
TSC_FAST_INLINE double relax_impl(const T* c, double sign, const double* open_v, double offset, double* dist,
                                  std::int32_t* pred, std::int32_t row, std::int32_t n, double* block_min) {
    const d4 vsign = splat(sign);
    const d4 voffset = splat(offset);
    const i4 vrow = {row, row, row, row};
    double best = kInf;
    for (std::int32_t j0 = 0, block = 0; j0 < n; j0 += kBlock, ++block) {
        const std::int32_t j1 = j0 + kBlock < n ? j0 + kBlock : n;
        d4 vmin = splat(kInf);
        std::int32_t j = j0;
        for (; j + kLanes <= j1; j += kLanes) {
            const d4 candidate = load(c + j) * vsign - load(open_v + j) - voffset;
            d4 d = candidate;
            if (First) {
                store(pred + j, vrow);
            } else {
                const d4 old = load(dist + j);
                const l4 closer = candidate < old;
                d = closer ? candidate : old;
                store(pred + j, __builtin_convertvector(closer, i4) ? vrow : load(pred + j));
            }
            store(dist + j, d);
            vmin = d < vmin ? d : vmin;
        }
        double block_best = lane_min(vmin);
        for (; j < j1; ++j) {
            const double candidate = sign * static_cast<double>(c[j]) - open_v[j] - offset;
            if (First || candidate < dist[j]) {
                dist[j] = candidate;
                pred[j] = row;
            }
            block_best = dist[j] < block_best ? dist[j] : block_best;
        }
        block_min[block] = block_best;
        best = block_best < best ? block_best : best;
    }
    return best;
}

// Minimum reduced cost of every block of kSpan columns (the last block may be shorter).
template <typename T>
TSC_FAST_INLINE void block_minima(const T* c, double sign, const double* v, std::int32_t n, double* block_min) {
    const d4 vsign = splat(sign);
    std::int32_t j = 0, block = 0;
    for (; j + kSpan <= n; j += kSpan, ++block) {
        const d4 x0 = load(c + j) * vsign - load(v + j);
        const d4 x1 = load(c + j + kLanes) * vsign - load(v + j + kLanes);
        const d4 x2 = load(c + j + 2 * kLanes) * vsign - load(v + j + 2 * kLanes);
        const d4 x3 = load(c + j + 3 * kLanes) * vsign - load(v + j + 3 * kLanes);
        const d4 m01 = x0 < x1 ? x0 : x1;
        const d4 m23 = x2 < x3 ? x2 : x3;
        block_min[block] = lane_min(m01 < m23 ? m01 : m23);
    }
    if (j < n) {
        double m = kInf;
        for (; j < n; ++j) {
            const double x = sign * static_cast<double>(c[j]) - v[j];
            m = x < m ? x : m;
        }
        block_min[block] = m;
    }
}

template <typename T>
TSC_FAST_INLINE double smallest_impl(const T* c, double sign, const double* v, std::int32_t n) {
    const d4 vsign = splat(sign);
    d4 m0 = splat(kInf), m1 = splat(kInf);
    std::int32_t j = 0;
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) {   // two chains, to hide the latency of min
        const d4 x0 = load(c + j) * vsign - load(v + j);
        const d4 x1 = load(c + j + kLanes) * vsign - load(v + j + kLanes);
        m0 = x0 < m0 ? x0 : m0;
        m1 = x1 < m1 ? x1 : m1;
    }
    double m = lane_min(m0 < m1 ? m0 : m1);
    for (; j < n; ++j) {
        const double x = sign * static_cast<double>(c[j]) - v[j];
        m = x < m ? x : m;
    }
    return m;
}

// The k-th smallest of values(0) ... values(n - 1), k <= n, using heap[0, k) as scratch: a max-heap of the
// k smallest so far. Values arrive in no particular order, so only about k log(n / k) of them enter it.
template <class Values>
TSC_FAST_INLINE double kth_smallest(const Values& values, std::int32_t n, std::int32_t k, double* heap) {
    std::int32_t size = 0;
    for (std::int32_t t = 0; t < n; ++t) {
        const double x = values(t);
        std::int32_t hole;
        if (size < k) {   // sift up from a new leaf
            hole = size++;
            while (hole > 0 && heap[(hole - 1) / 2] < x) {
                heap[hole] = heap[(hole - 1) / 2];
                hole = (hole - 1) / 2;
            }
        } else if (x < heap[0]) {   // replace the largest kept, sift down
            hole = 0;
            for (;;) {
                std::int32_t child = 2 * hole + 1;
                if (child >= size) break;
                if (child + 1 < size && heap[child + 1] > heap[child]) ++child;
                if (!(heap[child] > x)) break;
                heap[hole] = heap[child];
                hole = child;
            }
        } else {
            continue;
        }
        heap[hole] = x;
    }
    return heap[0];
}

// A pseudo-random order of the columns, different for each seed (a multiply-xorshift hash).
TSC_FAST_INLINE std::uint32_t tie_rank(std::int32_t col, std::uint32_t seed) {
    std::uint32_t h = static_cast<std::uint32_t>(col) * 0x9E3779B1u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return h;
}

template <typename T>
TSC_FAST_INLINE std::int32_t smallest_k_impl(const T* c, double sign, const double* v, std::int32_t n,
                                             std::uint32_t tie_seed, std::int32_t k, double* block_min,
                                             Scored* pool, std::int32_t* cols) {
    if (k <= 0 || n <= 0) return 0;
    if (k > kMaxK) k = kMaxK;
    const std::int32_t blocks = (n + kSpan - 1) / kSpan;
    block_minima(c, sign, v, n, block_min);
    // The k-th smallest block minimum bounds the k-th smallest entry: the k smallest block minima are k
    // distinct entries no larger than it. Only blocks whose minimum is within the bound need a look.
    // The bound: the k-th smallest minimum of blocks of kSpan columns (the k smallest block minima are k
    // distinct entries no larger than it), or of blocks of 4 when there are too few blocks of kSpan.
    double bound = kInf;
    double heap[kMaxK];
    if (blocks >= 4 * k) {
        bound = kth_smallest([block_min](std::int32_t b) { return block_min[b]; }, blocks, k, heap);
    } else if (n > 4 * k) {   // minima of 4 columns: still k distinct entries below the bound
        const auto quad_min = [c, sign, v](std::int32_t q) {
            double m = kInf;
            for (std::int32_t j = 4 * q; j < 4 * q + 4; ++j) {
                const double x = sign * static_cast<double>(c[j]) - v[j];
                m = x < m ? x : m;
            }
            return m;
        };
        bound = kth_smallest(quad_min, n / 4, k, heap);
    }
    std::int32_t found = 0;
    const d4 vsign = splat(sign);
    const d4 vbound = splat(bound);
    for (std::int32_t b = 0; b < blocks; ++b) {
        if (!(block_min[b] <= bound) || !(block_min[b] < kInf)) continue;
        std::int32_t j = b * kSpan;
        const std::int32_t end = j + kSpan < n ? j + kSpan : n;
        for (; j + kLanes <= end; j += kLanes) {
            const d4 x = load(c + j) * vsign - load(v + j);
            const l4 within = x <= vbound;
            if (!(within[0] | within[1] | within[2] | within[3])) continue;
            for (int lane = 0; lane < kLanes; ++lane) {
                if (within[lane] && x[lane] < kInf) pool[found++] = Scored{x[lane], j + lane};
            }
        }
        for (; j < end; ++j) {
            const double x = sign * static_cast<double>(c[j]) - v[j];
            if (x <= bound && x < kInf) pool[found++] = Scored{x, j};
        }
    }
    const auto before = [tie_seed](const Scored& a, const Scored& b) {
        if (a.value != b.value) return a.value < b.value;
        return tie_rank(a.col, tie_seed) < tie_rank(b.col, tie_seed);
    };
    if (found > k) {
        std::nth_element(pool, pool + (k - 1), pool + found, before);
        found = k;
    }
    for (std::int32_t t = 0; t < found; ++t) cols[t] = pool[t].col;
    return found;
}

}  // namespace

TSC_FAST_KERNEL std::int32_t smallest_k(const float* c, double sign, const double* v, std::int32_t n,
                                        std::uint32_t tie_seed, std::int32_t k, double* block_min, Scored* pool,
                                        std::int32_t* cols) {
    return smallest_k_impl(c, sign, v, n, tie_seed, k, block_min, pool, cols);
}
TSC_FAST_KERNEL std::int32_t smallest_k(const double* c, double sign, const double* v, std::int32_t n,
                                        std::uint32_t tie_seed, std::int32_t k, double* block_min, Scored* pool,
                                        std::int32_t* cols) {
    return smallest_k_impl(c, sign, v, n, tie_seed, k, block_min, pool, cols);
}

TSC_FAST_KERNEL double smallest(const float* c, double sign, const double* v, std::int32_t n) {
    return smallest_impl(c, sign, v, n);
}
TSC_FAST_KERNEL double smallest(const double* c, double sign, const double* v, std::int32_t n) {
    return smallest_impl(c, sign, v, n);
}

TSC_FAST_KERNEL TwoSmallest two_smallest(const float* c, double sign, const double* v, std::int32_t n) {
    return two_smallest_impl(c, sign, v, n);
}
TSC_FAST_KERNEL TwoSmallest two_smallest(const double* c, double sign, const double* v, std::int32_t n) {
    return two_smallest_impl(c, sign, v, n);
}

TSC_FAST_KERNEL bool lower_column_minima(const float* c, double sign, double* col_min, std::int32_t* argmin,
                                         std::int32_t row, std::int32_t n) {
    return lower_column_minima_impl(c, sign, col_min, argmin, row, n);
}
TSC_FAST_KERNEL bool lower_column_minima(const double* c, double sign, double* col_min, std::int32_t* argmin,
                                         std::int32_t row, std::int32_t n) {
    return lower_column_minima_impl(c, sign, col_min, argmin, row, n);
}

TSC_FAST_KERNEL double relax(const float* c, double sign, const double* open_v, double offset, double* dist,
                             std::int32_t* pred, std::int32_t row, std::int32_t n, double* block_min, bool first) {
    return first ? relax_impl<float, true>(c, sign, open_v, offset, dist, pred, row, n, block_min)
                 : relax_impl<float, false>(c, sign, open_v, offset, dist, pred, row, n, block_min);
}
TSC_FAST_KERNEL double relax(const double* c, double sign, const double* open_v, double offset, double* dist,
                             std::int32_t* pred, std::int32_t row, std::int32_t n, double* block_min, bool first) {
    return first ? relax_impl<double, true>(c, sign, open_v, offset, dist, pred, row, n, block_min)
                 : relax_impl<double, false>(c, sign, open_v, offset, dist, pred, row, n, block_min);
}

}  // namespace tsc_fast::simd
