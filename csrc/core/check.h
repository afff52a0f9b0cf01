// Error handling for the whole engine.
//
// DSV3_CHECK(cond, msg...)  validates user input at the top of a public function and throws
//                           std::invalid_argument (-> Python ValueError). Messages start with
//                           "[op] " and name the argument and the expected value.
// DSV3_INDEX_CHECK(...)     out-of-range ids -> std::out_of_range (-> Python IndexError).
// DSV3_FINITE_CHECK(...)    NaN/Inf in an input that must be finite -> NonFiniteError (a
//                           std::invalid_argument; -> dsv3._core.NonFiniteError, a ValueError
//                           the trainer turns into FloatingPointError).
// DSV3_ASSERT(cond, msg...) internal invariants -> std::runtime_error (-> RuntimeError).
// Never exit, abort or print from the library. Exceptions never leave an OpenMP region:
// parallel_for (parallel.h) catches what its chunks throw and rethrows the first one after
// the region.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

struct NonFiniteError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace dsv3

#define DSV3_CHECK(cond, ...)                                         \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(::dsv3::str_cat(__VA_ARGS__)); \
  } while (0)

#define DSV3_INDEX_CHECK(cond, ...)                                   \
  do {                                                                \
    if (!(cond)) throw std::out_of_range(::dsv3::str_cat(__VA_ARGS__)); \
  } while (0)

#define DSV3_FINITE_CHECK(cond, ...)                                  \
  do {                                                                \
    if (!(cond)) throw ::dsv3::NonFiniteError(::dsv3::str_cat(__VA_ARGS__)); \
  } while (0)

#define DSV3_ASSERT(cond, ...)                                        \
  do {                                                                \
    if (!(cond))                                                      \
      throw std::runtime_error(::dsv3::str_cat("internal error: ", __VA_ARGS__, " (", \
                                               __FILE__, ":", __LINE__, ")"));        \
  } while (0)
