// Error handling for the whole engine.
//
// DSV3_CHECK(cond, msg...)  validates user input at the top of a public function and throws
//                           std::invalid_argument (-> Python ValueError). Messages start with
//                           "[op] " and name the argument and the expected value.
// DSV3_INDEX_CHECK(...)     out-of-range ids -> std::out_of_range (-> Python IndexError).
// DSV3_ASSERT(cond, msg...) internal invariants -> std::runtime_error (-> RuntimeError).
// Never exit, abort or print from the library, and never throw inside an OpenMP region
// (parallel loops record failures in a flag and the caller throws after the region).
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

}  // namespace dsv3

#define DSV3_CHECK(cond, ...)                                         \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(::dsv3::str_cat(__VA_ARGS__)); \
  } while (0)

#define DSV3_INDEX_CHECK(cond, ...)                                   \
  do {                                                                \
    if (!(cond)) throw std::out_of_range(::dsv3::str_cat(__VA_ARGS__)); \
  } while (0)

#define DSV3_ASSERT(cond, ...)                                        \
  do {                                                                \
    if (!(cond))                                                      \
      throw std::runtime_error(::dsv3::str_cat("internal error: ", __VA_ARGS__, " (", \
                                               __FILE__, ":", __LINE__, ")"));        \
  } while (0)
