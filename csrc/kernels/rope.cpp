#include "kernels/rope.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/parallel.h"

namespace dsv3 {

double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

RopeTable rope_table(const RopeParams& p) {
  DSV3_CHECK(p.dim > 0 && p.dim % 2 == 0, "[rope] rotary dim must be even and > 0, got ", p.dim);
  DSV3_CHECK(p.theta > 1.0 && std::isfinite(p.theta), "[rope] theta must be finite and > 1, got ",
             p.theta);
  RopeTable t;
  const int64_t P = p.dim / 2;
  t.inv_freq.resize(P);
  for (int64_t i = 0; i < P; ++i) t.inv_freq[i] = std::pow(p.theta, -2.0 * (double)i / p.dim);
  if (!p.yarn) return t;
  for (double v : {p.factor, p.original_max_position_embeddings, p.beta_fast, p.beta_slow,
                   p.mscale, p.mscale_all_dim})
    DSV3_CHECK(std::isfinite(v), "[rope] rope_scaling factors must be finite (factor, "
               "original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim), got ",
               v);
  DSV3_CHECK(p.factor > 0, "[rope] rope_scaling.factor must be > 0, got ", p.factor);
  DSV3_CHECK(p.original_max_position_embeddings > 0,
             "[rope] rope_scaling.original_max_position_embeddings must be > 0, got ",
             p.original_max_position_embeddings);
  DSV3_CHECK(p.beta_fast > 0 && p.beta_slow > 0,
             "[rope] rope_scaling.beta_fast and beta_slow must be > 0, got ", p.beta_fast, ", ",
             p.beta_slow);
  const double pi = 3.14159265358979323846;
  auto corr = [&](double r) {
    return p.dim * std::log(p.original_max_position_embeddings / (r * 2 * pi)) /
           (2 * std::log(p.theta));
  };
  double low = std::floor(corr(p.beta_fast)), high = std::ceil(corr(p.beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, (double)(p.dim - 1));
  if (low == high) high += 0.001;
  t.low = low;
  t.high = high;
  for (int64_t i = 0; i < P; ++i) {
    const double ramp = std::clamp(((double)i - low) / (high - low), 0.0, 1.0);
    t.inv_freq[i] = t.inv_freq[i] / p.factor * ramp + t.inv_freq[i] * (1.0 - ramp);
  }
  t.attn_factor = yarn_mscale(p.factor, p.mscale) / yarn_mscale(p.factor, p.mscale_all_dim);
  return t;
}

namespace {

// cos/sin (times attn_factor, sin times sign) of the rows' angles, [n, P] each, and the
// table row of input row r. Rows share positions (every sequence of a batch has the same
// ones), so when the positions span no more values than there are rows the table has one row
// per position in [lo, hi]; otherwise one per input row.
struct RopeAngles {
  std::vector<float> c, s;
  int64_t lo = 0;
  bool by_position = false;
  int64_t row(const int64_t* pos, int64_t r) const { return by_position ? pos[r] - lo : r; }
};

RopeAngles rope_angles(const int64_t* pos, int64_t R, const RopeTable& t, double sign) {
  const int64_t P = (int64_t)t.inv_freq.size();
  const auto [lo, hi] = std::minmax_element(pos, pos + R);
  RopeAngles a;
  a.lo = *lo;
  a.by_position = *hi - *lo < R;
  const int64_t n = a.by_position ? *hi - *lo + 1 : R;
  a.c.resize((size_t)(n * P));
  a.s.resize((size_t)(n * P));
  parallel_for(n, std::max<int64_t>(1, 256 / P), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double p = a.by_position ? (double)(a.lo + r) : (double)pos[r];
      for (int64_t i = 0; i < P; ++i) {
        const double ang = p * t.inv_freq[i];
        a.c[r * P + i] = (float)(std::cos(ang) * t.attn_factor);
        a.s[r * P + i] = (float)(sign * std::sin(ang) * t.attn_factor);
      }
    }
  });
  return a;
}

void rope_apply(float* y, int64_t y_row, int64_t y_head, const float* x, int64_t x_row,
                int64_t x_head, const int64_t* pos, int64_t R, int64_t H, const RopeTable& t,
                double sign, bool accumulate) {
  if (R <= 0) return;
  const int64_t P = (int64_t)t.inv_freq.size();
  const RopeAngles ang = rope_angles(pos, R, t, sign);
  parallel_for(R, std::max<int64_t>(1, 4096 / (H * P + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t tr = ang.row(pos, r);
      const float *c = ang.c.data() + tr * P, *s = ang.s.data() + tr * P;
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = x + r * x_row + h * x_head;
        float* yr = y + r * y_row + h * y_head;
        for (int64_t i = 0; i < P; ++i) {
          const float x0 = xr[2 * i], x1 = xr[2 * i + 1];
          const float y0 = x0 * c[i] - x1 * s[i], y1 = x0 * s[i] + x1 * c[i];
          if (accumulate) {
            yr[2 * i] += y0;
            yr[2 * i + 1] += y1;
          } else {
            yr[2 * i] = y0;
            yr[2 * i + 1] = y1;
          }
        }
      }
    }
  });
}

void check_positions(const int64_t* pos, int64_t R, const char* op) {
  for (int64_t r = 0; r < R; ++r)
    DSV3_CHECK(pos[r] >= 0, "[", op, "] positions must be >= 0, got ", pos[r], " at row ", r);
}

}  // namespace

void rope_forward(float* y, int64_t y_row, int64_t y_head, const float* x, int64_t x_row,
                  int64_t x_head, const int64_t* pos, int64_t R, int64_t H, const RopeTable& t) {
  check_positions(pos, R, "rope");
  rope_apply(y, y_row, y_head, x, x_row, x_head, pos, R, H, t, 1.0, false);
}

void rope_backward(float* dx, int64_t dx_row, int64_t dx_head, const float* dy, int64_t dy_row,
                   int64_t dy_head, const int64_t* pos, int64_t R, int64_t H, const RopeTable& t) {
  check_positions(pos, R, "rope_backward");
  rope_apply(dx, dx_row, dx_head, dy, dy_row, dy_head, pos, R, H, t, -1.0, true);
}

std::vector<int64_t> row_positions(int64_t B, int64_t T, int64_t start_pos) {
  std::vector<int64_t> pos((size_t)(B * T));
  for (int64_t r = 0; r < B * T; ++r) pos[r] = start_pos + r % T;
  return pos;
}

void rope_heads_backward(float* d, int64_t heads, int64_t Dn, int64_t Dr, const int64_t* pos,
                         int64_t R, const RopeTable& t) {
  check_positions(pos, R, "rope_backward");
  const int64_t Dh = Dn + Dr;
  rope_apply(d + Dn, heads * Dh, Dh, d + Dn, heads * Dh, Dh, pos, R, heads, t, -1.0, false);
}

}  // namespace dsv3
