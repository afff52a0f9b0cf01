// Reference bodies of wlinear.h: one weight row dequantized to fp32 at a time, then dotted with
// every activation row (correct for every format and size; the fast kernels replace these).
#include "kernels/wlinear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/parallel.h"
#include "kernels/fp8.h"

namespace dsv3 {

namespace {
constexpr int64_t kBk = 128;

void check_view(const WeightView& w, const char* op) {
  if (!w.data || w.O < 1 || w.K < 1 || (w.fmt == WeightFormat::fp8_e4m3 && !w.scale_inv))
    throw std::invalid_argument(std::string("[") + op + "] weight view is empty or lacks its "
                                "scales (fp8 needs scale_inv)");
}

// row o of W as fp32 into out[K]
void dequant_row(float* out, const WeightView& w, int64_t o) {
  const int64_t K = w.K;
  switch (w.fmt) {
    case WeightFormat::fp32:
      std::memcpy(out, (const float*)w.data + o * K, sizeof(float) * K);
      break;
    case WeightFormat::bf16: {
      const uint16_t* b = (const uint16_t*)w.data + o * K;
      for (int64_t k = 0; k < K; ++k) out[k] = bf16_decode(b[k]);
      break;
    }
    case WeightFormat::fp8_e4m3: {
      fp8_decode(out, (const uint8_t*)w.data + o * K, K, Fp8Format::e4m3);
      break;
    }
  }
}
}  // namespace

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::fp32: return "fp32";
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::fp8_e4m3: return "fp8";
  }
  return "?";
}

WeightFormat parse_weight_format(const char* s) {
  const std::string v = s ? s : "";
  if (v == "fp32") return WeightFormat::fp32;
  if (v == "bf16") return WeightFormat::bf16;
  if (v == "fp8") return WeightFormat::fp8_e4m3;
  throw std::invalid_argument("weight format must be 'fp32', 'bf16' or 'fp8', got '" + v + "'");
}

int64_t weight_format_bytes(WeightFormat f, int64_t O, int64_t K) {
  switch (f) {
    case WeightFormat::fp32: return 4 * O * K;
    case WeightFormat::bf16: return 2 * O * K;
    case WeightFormat::fp8_e4m3:
      return O * K + 4 * ((O + kBk - 1) / kBk) * ((K + kBk - 1) / kBk);
  }
  return 0;
}

void wlinear_forward(float* y, const float* x, const WeightView& w, int64_t R) {
  check_view(w, "wlinear_forward");
  const int64_t K = w.K, O = w.O, KB = (K + kBk - 1) / kBk;
  parallel_for(O, 8, [&](int64_t o0, int64_t o1) {
    std::vector<float> row(K);
    for (int64_t o = o0; o < o1; ++o) {
      dequant_row(row.data(), w, o);
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * K;
        float acc = 0;
        if (w.fmt == WeightFormat::fp8_e4m3) {
          for (int64_t kb = 0; kb < KB; ++kb) {
            float part = 0;
            for (int64_t k = kb * kBk; k < std::min(K, (kb + 1) * kBk); ++k) part += xr[k] * row[k];
            acc += part * w.scale_inv[(o / kBk) * KB + kb];
          }
        } else {
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * row[k];
        }
        y[r * O + o] = acc;
      }
    }
  });
}

void wlinear_rows(float* out, const int64_t* ids, const WeightView& w, int64_t R) {
  check_view(w, "wlinear_rows");
  const int64_t K = w.K, KB = (K + kBk - 1) / kBk;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = ids[r];
    if (o < 0 || o >= w.O) throw std::out_of_range("[wlinear_rows] id out of range");
    float* dst = out + r * K;
    dequant_row(dst, w, o);
    if (w.fmt == WeightFormat::fp8_e4m3)
      for (int64_t k = 0; k < K; ++k) dst[k] *= w.scale_inv[(o / kBk) * KB + k / kBk];
  }
}

}  // namespace dsv3
