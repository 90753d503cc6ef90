// Python binding of the assignment solver: numpy buffers in, int64 column indices out. The GIL is released
// while solving; solve_many spreads matrices over native threads. Input checking beyond layout and dtype
// (NaN, the wrong infinity) happens when `check` is set (tsc_fast.assign sets it for the native backend and
// calls find_invalid for the others).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "jv.hpp"

namespace py = pybind11;
using tsc_fast::CostView;

namespace {

// A float32 or float64 matrix, as the solver sees it. Does not own the buffer.
struct AnyCostView {
    bool single = false;
    CostView<float> f32{};
    CostView<double> f64{};
    std::ptrdiff_t rows() const { return single ? f32.rows : f64.rows; }
};

template <typename T>
CostView<T> view_as(const py::array& a) {
    const auto item = static_cast<py::ssize_t>(sizeof(T));
    if (a.strides(0) % item != 0 || a.strides(1) % item != 0) {
        throw py::value_error("cost matrix strides must be multiples of its item size; "
                              "pass numpy.ascontiguousarray(cost)");
    }
    return CostView<T>{static_cast<const T*>(a.data()), a.shape(0), a.shape(1), a.strides(0) / item,
                       a.strides(1) / item};
}

AnyCostView view_of(const py::array& a) {
    if (a.ndim() != 2) {
        throw py::value_error("cost must be a 2-D matrix, got " + std::to_string(a.ndim()) + " dimension(s)");
    }
    AnyCostView view;
    if (a.dtype().equal(py::dtype::of<float>())) {
        view.single = true;
        view.f32 = view_as<float>(a);
    } else if (a.dtype().equal(py::dtype::of<double>())) {
        view.f64 = view_as<double>(a);
    } else {
        throw py::type_error("cost must be float32 or float64 in native byte order, got " +
                             std::string(py::str(a.dtype())));
    }
    return view;
}

void solve_view(const AnyCostView& view, bool maximize, std::int64_t* out, const tsc_fast::SolveOptions& options) {
    if (view.single) {
        tsc_fast::solve_assignment(view.f32, maximize, out, options);
    } else {
        tsc_fast::solve_assignment(view.f64, maximize, out, options);
    }
}

tsc_fast::SolveOptions options_of(std::int64_t sparse_min_cols, std::int32_t candidates, bool check) {
    if (candidates < 0 || candidates > 256) throw py::value_error("candidates must be in [0, 256]");
    tsc_fast::SolveOptions options;
    options.sparse_min_cols = sparse_min_cols;
    options.candidates = candidates;
    options.check_entries = check;
    return options;
}

py::array_t<std::int64_t> solve(const py::array& cost, bool maximize, std::int64_t sparse_min_cols,
                                std::int32_t candidates, bool check) {
    const tsc_fast::SolveOptions options = options_of(sparse_min_cols, candidates, check);
    const AnyCostView view = view_of(cost);
    py::array_t<std::int64_t> result(view.rows());
    std::int64_t* out = result.mutable_data();
    {
        py::gil_scoped_release release;
        solve_view(view, maximize, out, options);
    }
    return result;
}

std::optional<std::pair<std::ptrdiff_t, std::ptrdiff_t>> find_invalid(const py::array& cost, bool maximize) {
    const AnyCostView view = view_of(cost);
    std::ptrdiff_t row = 0;
    std::ptrdiff_t col = 0;
    bool found = false;
    {
        py::gil_scoped_release release;
        found = view.single ? tsc_fast::find_invalid_entry(view.f32, maximize, row, col)
                            : tsc_fast::find_invalid_entry(view.f64, maximize, row, col);
    }
    if (!found) return std::nullopt;
    return std::make_pair(row, col);
}

// Runs job(k) for k in [0, count) on up to `threads` threads (the calling one included) and returns the
// exception of each job, if any. Threads that cannot be started leave their share to the others.
template <class Job>
std::vector<std::exception_ptr> run_parallel(std::size_t count, std::size_t threads, const Job& job) {
    std::vector<std::exception_ptr> errors(count);
    std::atomic<std::size_t> next{0};
    auto worker = [&]() {
        for (std::size_t k = next++; k < count; k = next++) {
            try {
                job(k);
            } catch (...) {
                errors[k] = std::current_exception();
            }
        }
    };
    std::vector<std::thread> pool;
    const std::size_t extra = std::min(threads, count) - (count > 0 && threads > 0 ? 1 : 0);
    for (std::size_t t = 0; t < extra; ++t) {
        try {
            pool.emplace_back(worker);
        } catch (const std::system_error&) {
            break;
        }
    }
    worker();
    for (auto& thread : pool) thread.join();
    return errors;
}

py::list solve_many(const py::list& costs, bool maximize, std::size_t threads, std::int64_t sparse_min_cols,
                    std::int32_t candidates, bool check) {
    if (threads == 0) throw py::value_error("threads must be at least 1");
    const tsc_fast::SolveOptions options = options_of(sparse_min_cols, candidates, check);
    std::vector<py::array> arrays;   // keeps every buffer alive while the GIL is released
    std::vector<AnyCostView> views;
    std::vector<py::array_t<std::int64_t>> results;
    std::vector<std::int64_t*> outs;
    for (std::size_t k = 0; k < costs.size(); ++k) {
        arrays.push_back(costs[k].cast<py::array>());
        views.push_back(view_of(arrays.back()));
        results.emplace_back(views.back().rows());
        outs.push_back(results.back().mutable_data());
    }
    std::vector<std::exception_ptr> errors;
    {
        py::gil_scoped_release release;
        errors = run_parallel(views.size(), threads,
                              [&](std::size_t k) { solve_view(views[k], maximize, outs[k], options); });
    }
    for (std::size_t k = 0; k < errors.size(); ++k) {
        if (!errors[k]) continue;
        try {
            std::rethrow_exception(errors[k]);
        } catch (const std::invalid_argument& e) {
            throw py::value_error("costs[" + std::to_string(k) + "]: " + e.what());
        }
    }
    py::list out;
    for (auto& r : results) out.append(r);
    return out;
}

}  // namespace

PYBIND11_MODULE(_jv, m) {
    m.doc() = "Native Jonker-Volgenant linear assignment solver (see tsc_fast.assign for the public API).";
    const tsc_fast::SolveOptions defaults;
    m.def("solve", &solve, py::arg("cost"), py::arg("maximize") = false,
          py::arg("sparse_min_cols") = defaults.sparse_min_cols, py::arg("candidates") = defaults.candidates,
          py::arg("check") = false,
          "Optimal assignment of a float32/float64 2-D array (any strides); int64 column per row, -1 if none. "
          "Entries must have passed find_invalid, or check be true (ValueError naming the first NaN or "
          "disallowed infinity; free on square matrices). Raises ValueError when infeasible. sparse_min_cols and "
          "candidates tune the candidate-edge phase (tests lower them to exercise it on small inputs).");
    m.def("find_invalid", &find_invalid, py::arg("cost"), py::arg("maximize") = false,
          "(row, col) of the first NaN or disallowed infinity (-inf when minimising, +inf when maximising), "
          "or None.");
    m.def("solve_many", &solve_many, py::arg("costs"), py::arg("maximize") = false, py::arg("threads") = 1,
          py::arg("sparse_min_cols") = defaults.sparse_min_cols, py::arg("candidates") = defaults.candidates,
          py::arg("check") = false,
          "solve() for each matrix of a list, on up to `threads` native threads.");
}
