// bfloat16: the top 16 bits of an fp32 (docs/semantics.md §2.6). The one float32 -> bf16
// rounding of the engine: round to nearest, ties to even; NaN stays a (quiet) NaN with its
// sign; values beyond bf16's largest finite round to infinity.
#pragma once
#include <cstdint>
#include <cstring>

namespace dsv3 {

inline uint16_t bf16_encode(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_decode(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace dsv3
