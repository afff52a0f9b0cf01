// Counter-based random numbers: value i of stream s under seed k is a pure function of
// (k, s, i), so initialisation and sampling are identical for any thread count and order.
#pragma once
#include <cmath>
#include <cstdint>

namespace dsv3 {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1) with 53 random bits.
inline double uniform01(uint64_t seed, uint64_t stream, uint64_t i) {
  const uint64_t h = splitmix64(splitmix64(seed ^ splitmix64(stream)) + i);
  return ((h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal (Box-Muller on two uniforms of the same counter).
inline double normal01(uint64_t seed, uint64_t stream, uint64_t i) {
  const double u1 = uniform01(seed, stream, 2 * i), u2 = uniform01(seed, stream, 2 * i + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace dsv3
