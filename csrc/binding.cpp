// Python binding of the assignment solver: numpy buffers in, int64 column indices out. The GIL is released
// while solving; solve_many spreads matrices over native threads. Input checking beyond layout and dtype
// (NaN, the wrong infinity) happens when `check` is set (tsc_fast.assign sets it for the native backend and
// calls check_entries for the others). A pending Ctrl-C stops a long solve (see SignalWatch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "jv.hpp"

namespace py = pybind11;
using tsc_fast::CostView;

namespace {

// Lets solves that run without the GIL notice signals. The solve that runs on the calling thread polls
// (SolveOptions::should_stop = poll_signals): at most once per kSignalPollInterval it takes the GIL and runs
// PyErr_CheckSignals(), so Python's handlers run; when one raises (KeyboardInterrupt on Ctrl-C), its
// exception stays set on the calling thread and `stop_` tells every solve of the call to give up. Solves on
// worker threads only read `stop_` (poll_flag): Python runs signal handlers on the main thread only. A call
// from another Python thread gives up polling after its first look, since its checks could never see one.
// Solves shorter than the interval never touch the GIL.
class SignalWatch {
  public:
    using Clock = std::chrono::steady_clock;
    static constexpr std::chrono::milliseconds kSignalPollInterval{50};

    SignalWatch() : last_poll_(Clock::now()) {}

    static bool poll_signals(void* self) { return static_cast<SignalWatch*>(self)->poll(); }
    static bool poll_flag(void* self) { return static_cast<SignalWatch*>(self)->stopped(); }

    bool stopped() const { return stop_.load(std::memory_order_relaxed); }

    // Called without the GIL, from the calling thread only.
    bool poll() {
        if (stopped()) return true;
        if (!on_main_thread_) return false;
        const Clock::time_point now = Clock::now();
        if (now - last_poll_ < kSignalPollInterval) return false;
        last_poll_ = now;
        py::gil_scoped_acquire gil;
        if (!checked_thread_) {
            checked_thread_ = true;
            on_main_thread_ = is_main_thread();
            if (!on_main_thread_) return false;
        }
        if (PyErr_CheckSignals() != 0) stop_.store(true, std::memory_order_relaxed);
        return stopped();
    }

    // With the GIL held, after the solves returned: raises the exception of the handler that stopped them.
    [[noreturn]] void raise() const {
        if (PyErr_Occurred() != nullptr) throw py::error_already_set();
        throw std::runtime_error("assignment solve stopped");   // not reached: stop_ is set with an error
    }

  private:
    static bool is_main_thread() {
        try {
            const auto main_ident = py::module_::import("threading").attr("main_thread")().attr("ident");
            return main_ident.cast<unsigned long>() == PyThread_get_thread_ident();
        } catch (const std::exception&) {
            PyErr_Clear();
            return true;   // cannot tell: keep polling, which is merely useless elsewhere
        }
    }

    std::atomic<bool> stop_{false};
    Clock::time_point last_poll_;
    bool checked_thread_ = false;
    bool on_main_thread_ = true;
};

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

tsc_fast::SolveOptions options_of(std::int64_t sparse_min_cols, std::int32_t candidates, bool check,
                                  SignalWatch* watch = nullptr, bool (*poll)(void*) = nullptr) {
    if (candidates < 0 || candidates > 256) throw py::value_error("candidates must be in [0, 256]");
    tsc_fast::SolveOptions options;
    options.sparse_min_cols = sparse_min_cols;
    options.candidates = candidates;
    options.check_entries = check;
    options.should_stop = poll;
    options.stop_context = watch;
    return options;
}

py::array_t<std::int64_t> solve(const py::array& cost, bool maximize, std::int64_t sparse_min_cols,
                                std::int32_t candidates, bool check) {
    SignalWatch watch;
    const tsc_fast::SolveOptions options =
        options_of(sparse_min_cols, candidates, check, &watch, &SignalWatch::poll_signals);
    const AnyCostView view = view_of(cost);
    py::array_t<std::int64_t> result(view.rows());
    std::int64_t* out = result.mutable_data();
    try {
        py::gil_scoped_release release;
        solve_view(view, maximize, out, options);
    } catch (const tsc_fast::SolveStopped&) {
        watch.raise();   // the GIL is back: release's destructor ran before this handler
    }
    return result;
}

// Raises ValueError naming the first NaN or disallowed infinity, in the words the solver itself uses.
void check_entries(const py::array& cost, bool maximize) {
    const AnyCostView view = view_of(cost);
    py::gil_scoped_release release;
    if (view.single) {
        tsc_fast::check_entries(view.f32, maximize);
    } else {
        tsc_fast::check_entries(view.f64, maximize);
    }
}

// Runs job(k, on_caller) for k in [0, count) on up to `threads` threads (the calling one included; on_caller
// tells which) and returns the exception of each job, if any. Threads that cannot be started leave their
// share to the others. Once `watch` is stopped no job starts; the calling thread, done with its share, keeps
// polling for signals while it waits for the others.
template <class Job>
std::vector<std::exception_ptr> run_parallel(std::size_t count, std::size_t threads, SignalWatch& watch,
                                             const Job& job) {
    std::vector<std::exception_ptr> errors(count);
    std::atomic<std::size_t> next{0};
    auto work = [&](bool on_caller) {
        for (std::size_t k = next++; k < count && !watch.stopped(); k = next++) {
            try {
                job(k, on_caller);
            } catch (...) {
                errors[k] = std::current_exception();
            }
        }
    };
    std::mutex mutex;
    std::condition_variable finished;
    std::size_t running = 0;   // pool threads still working, guarded by mutex
    std::vector<std::thread> pool;
    const std::size_t extra = std::min(threads, count) - (count > 0 && threads > 0 ? 1 : 0);
    for (std::size_t t = 0; t < extra; ++t) {
        try {
            std::lock_guard<std::mutex> lock(mutex);
            pool.emplace_back([&]() {
                work(false);
                std::lock_guard<std::mutex> done(mutex);
                --running;
                finished.notify_one();
            });
            ++running;
        } catch (const std::system_error&) {
            break;
        }
    }
    work(true);
    {
        std::unique_lock<std::mutex> lock(mutex);
        while (running > 0) {
            if (finished.wait_for(lock, SignalWatch::kSignalPollInterval, [&] { return running == 0; })) break;
            lock.unlock();
            watch.poll();
            lock.lock();
        }
    }
    for (auto& thread : pool) thread.join();
    return errors;
}

py::list solve_many(const py::list& costs, bool maximize, std::size_t threads, std::int64_t sparse_min_cols,
                    std::int32_t candidates, bool check) {
    if (threads == 0) throw py::value_error("threads must be at least 1");
    SignalWatch watch;
    const tsc_fast::SolveOptions on_caller =
        options_of(sparse_min_cols, candidates, check, &watch, &SignalWatch::poll_signals);
    const tsc_fast::SolveOptions on_worker =
        options_of(sparse_min_cols, candidates, check, &watch, &SignalWatch::poll_flag);
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
        errors = run_parallel(views.size(), threads, watch, [&](std::size_t k, bool caller) {
            solve_view(views[k], maximize, outs[k], caller ? on_caller : on_worker);
        });
    }
    if (watch.stopped()) watch.raise();   // before any other error: the user asked to stop
    for (std::size_t k = 0; k < errors.size(); ++k) {
        if (!errors[k]) continue;
        try {
            std::rethrow_exception(errors[k]);
        } catch (const std::logic_error& e) {   // InfeasibleError, InvalidEntryError, length_error
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
    m.attr("INFEASIBLE_MESSAGE") = tsc_fast::kInfeasibleMessage;
    m.def("solve", &solve, py::arg("cost"), py::arg("maximize").noconvert() = false,
          py::arg("sparse_min_cols") = defaults.sparse_min_cols, py::arg("candidates") = defaults.candidates,
          py::arg("check") = false,
          "Optimal assignment of a float32/float64 2-D array (any strides); int64 column per row, -1 if none. "
          "Entries must have passed check_entries, or check be true (ValueError naming the first NaN or "
          "disallowed infinity; free on square matrices). Raises ValueError when infeasible. sparse_min_cols and "
          "candidates tune the candidate-edge phase (tests lower them to exercise it on small inputs). A "
          "Python signal handler that raises (KeyboardInterrupt on Ctrl-C) stops the solve within about "
          "50 ms and its exception propagates; nothing is returned.");
    m.def("check_entries", &check_entries, py::arg("cost"), py::arg("maximize").noconvert() = false,
          "Raises ValueError naming the first NaN or disallowed infinity (-inf when minimising, +inf when "
          "maximising) in row-major order; returns None when there is none.");
    m.def("solve_many", &solve_many, py::arg("costs"), py::arg("maximize").noconvert() = false,
          py::arg("threads") = 1,
          py::arg("sparse_min_cols") = defaults.sparse_min_cols, py::arg("candidates") = defaults.candidates,
          py::arg("check") = false,
          "solve() for each matrix of a list, on up to `threads` native threads. A signal that stops one "
          "solve stops them all.");
}
