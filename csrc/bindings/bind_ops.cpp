// dsv3._core ops: the kernels of csrc/kernels/{nn,rope,attention}.h on numpy arrays.
#include <pybind11/stl.h>

#include <cmath>

#include "bindings/arrays.h"
#include "bindings/convert.h"
#include "core/bf16.h"
#include "core/blas.h"
#include "core/small_gemm.h"
#include "kernels/attention.h"
#include "kernels/nn.h"
#include "kernels/rope.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

int64_t last_dim(const py::array& a, const char* op, const char* name) {
  DSV3_CHECK(a.ndim() >= 1, "[", op, "] ", name, " must have at least 1 dimension");
  return a.shape(a.ndim() - 1);
}

void check_last(const py::array& a, int64_t want, const char* op, const char* name,
                const char* what) {
  DSV3_CHECK(last_dim(a, op, name) == want, "[", op, "] ", name, " must have last dimension ",
             what, " = ", want, ", got shape ", shape_str(shape_of(a)));
}

void check_weight_2d(const py::array& w, const char* op, const char* name) {
  DSV3_CHECK(w.ndim() == 2, "[", op, "] ", name, " must be 2-D, got shape ",
             shape_str(shape_of(w)));
}

Shape with_last(const py::array& a, py::ssize_t d) {
  Shape s = shape_of(a);
  s.back() = d;
  return s;
}

// ---- embedding ------------------------------------------------------------------------------
F32 embedding(py::handle ids_h, py::handle w_h) {
  auto ids = i64(ids_h, "embedding", "ids");
  auto w = f32(w_h, "embedding", "weight");
  check_weight_2d(w, "embedding", "weight");
  const int64_t V = w.shape(0), D = w.shape(1), R = ids.size();
  Shape s = shape_of(ids);
  s.push_back(D);
  F32 out = empty(s);
  float* po = out.mutable_data();
  const int64_t* pi = ids.data();
  const float* pw = w.data();
  py::gil_scoped_release nogil;
  embedding_forward(po, pi, pw, R, V, D);
  return out;
}

F32 embedding_bwd(py::handle dout_h, py::handle ids_h, int64_t V) {
  auto d_out = f32(dout_h, "embedding_backward", "d_out");
  auto ids = i64(ids_h, "embedding_backward", "ids");
  DSV3_CHECK(V >= 1, "[embedding_backward] num_embeddings must be >= 1, got ", V);
  const int64_t R = ids.size();
  DSV3_CHECK(d_out.ndim() == ids.ndim() + 1 && rows(d_out) == R, "[embedding_backward] d_out ",
             "must have shape ids.shape + (D,) = ", shape_str(shape_of(ids)), " + (D,), got ",
             shape_str(shape_of(d_out)));
  const int64_t D = last_dim(d_out, "embedding_backward", "d_out");
  F32 dw = zeros({(py::ssize_t)V, (py::ssize_t)D});
  float* pdw = dw.mutable_data();
  const float* pdo = d_out.data();
  const int64_t* pi = ids.data();
  py::gil_scoped_release nogil;
  embedding_backward(pdw, pdo, pi, R, V, D);
  return dw;
}

// ---- linear ---------------------------------------------------------------------------------
F32 linear(py::handle x_h, py::handle w_h) {
  auto x = f32(x_h, "linear", "x");
  auto w = f32(w_h, "linear", "weight");
  check_weight_2d(w, "linear", "weight");
  check_last(x, w.shape(1), "linear", "x", "in_features (weight.shape[1])");
  const int64_t R = rows(x), K = w.shape(1), O = w.shape(0);
  F32 y = empty(with_last(x, O));
  float* py_ = y.mutable_data();
  const float *px = x.data(), *pw = w.data();
  py::gil_scoped_release nogil;
  linear_forward(py_, px, pw, R, K, O, GemmPrecision::fp32);
  return y;
}

py::tuple linear_bwd(py::handle dy_h, py::handle x_h, py::handle w_h) {
  auto dy = f32(dy_h, "linear_backward", "dy");
  auto x = f32(x_h, "linear_backward", "x");
  auto w = f32(w_h, "linear_backward", "weight");
  check_weight_2d(w, "linear_backward", "weight");
  check_last(x, w.shape(1), "linear_backward", "x", "in_features (weight.shape[1])");
  DSV3_CHECK(with_last(x, w.shape(0)) == shape_of(dy), "[linear_backward] dy must have shape ",
             shape_str(with_last(x, w.shape(0))), ", got ", shape_str(shape_of(dy)));
  const int64_t R = rows(x), K = w.shape(1), O = w.shape(0);
  F32 dx = empty(shape_of(x)), dw = zeros(shape_of(w));
  float *pdx = dx.mutable_data(), *pdw = dw.mutable_data();
  const float *pdy = dy.data(), *px = x.data(), *pw = w.data();
  {
    py::gil_scoped_release nogil;
    linear_backward(pdx, pdw, pdy, px, pw, R, K, O, GemmPrecision::fp32, /*set_dx=*/true);
  }
  return py::make_tuple(dx, dw);
}

// ---- rmsnorm (the kernel checks eps) --------------------------------------------------------
void check_rmsnorm(const F32& x, const F32& w, const char* op) {
  DSV3_CHECK(w.ndim() == 1, "[", op, "] weight must be 1-D, got shape ", shape_str(shape_of(w)));
  DSV3_CHECK(w.shape(0) >= 1, "[", op, "] weight must not be empty");
  check_last(x, w.shape(0), op, "x", "weight.shape[0]");
}

F32 rmsnorm(py::handle x_h, py::handle w_h, float eps) {
  auto x = f32(x_h, "rmsnorm", "x");
  auto w = f32(w_h, "rmsnorm", "weight");
  check_rmsnorm(x, w, "rmsnorm");
  const int64_t R = rows(x), D = w.shape(0);
  F32 y = empty(shape_of(x));
  float* py_ = y.mutable_data();
  const float *px = x.data(), *pw = w.data();
  py::gil_scoped_release nogil;
  rmsnorm_forward(py_, nullptr, px, pw, R, D, eps);
  return y;
}

py::tuple rmsnorm_bwd(py::handle dy_h, py::handle x_h, py::handle w_h, float eps) {
  auto dy = f32(dy_h, "rmsnorm_backward", "dy");
  auto x = f32(x_h, "rmsnorm_backward", "x");
  auto w = f32(w_h, "rmsnorm_backward", "weight");
  check_rmsnorm(x, w, "rmsnorm_backward");
  check_same_shape(x, dy, "rmsnorm_backward", "x", "dy");
  const int64_t R = rows(x), D = w.shape(0);
  F32 dx = empty(shape_of(x)), dw = zeros(shape_of(w));
  float *pdx = dx.mutable_data(), *pdw = dw.mutable_data();
  const float *pdy = dy.data(), *px = x.data(), *pw = w.data();
  {
    py::gil_scoped_release nogil;
    std::vector<float> rstd((size_t)R);  // recompute the saved rstd (no y)
    rmsnorm_forward(nullptr, rstd.data(), px, pw, R, D, eps);
    rmsnorm_backward(pdx, pdw, pdy, rstd.data(), px, pw, R, D, /*set_dx=*/true);
  }
  return py::make_tuple(dx, dw);
}

// ---- swiglu ---------------------------------------------------------------------------------
F32 swiglu(py::handle g_h, py::handle u_h) {
  auto g = f32(g_h, "swiglu", "gate");
  auto u = f32(u_h, "swiglu", "up");
  check_same_shape(g, u, "swiglu", "gate", "up");
  F32 h = empty(shape_of(g));
  float* ph = h.mutable_data();
  const float *pg = g.data(), *pu = u.data();
  const int64_t F = g.size();
  py::gil_scoped_release nogil;
  swiglu_forward(ph, pg, pu, F);
  return h;
}

F32 exp_py(py::handle x_h) {  // _exp_f32: the engine's expf, for tests/test_mathfn.py
  auto x = f32(x_h, "_exp_f32", "x");
  F32 y = empty(shape_of(x));
  float* py_ = y.mutable_data();
  const float* px = x.data();
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  exp_elementwise(py_, px, n);
  return y;
}

// _small_gemm: the attention core's product (core/small_gemm.h), for tests/test_small_gemm.py.
// a [M,K] (or [K,M] with trans_a), b [K,N]; c [M,N] is accumulated into when given.
// naive: the same product by core/blas.h's sgemm_naive, the reference kept beside it.
F32 small_gemm_py(py::handle a_h, py::handle b_h, bool trans_a, float alpha, py::object c_h,
                  bool naive) {
  const char* op = "_small_gemm";
  auto a = f32(a_h, op, "a");
  auto b = f32(b_h, op, "b");
  check_ndim(a, 2, 2, op, "a");
  check_ndim(b, 2, 2, op, "b");
  const int64_t M = a.shape(trans_a ? 1 : 0), K = a.shape(trans_a ? 0 : 1), N = b.shape(1);
  DSV3_CHECK(b.shape(0) == K, "[", op, "] b must have ", K, " rows, got ", b.shape(0));
  const bool acc = !c_h.is_none();
  F32 c = empty(Shape{M, N});  // a private copy of c to accumulate into
  if (acc) {
    auto c0 = f32(c_h, op, "c");
    DSV3_CHECK(shape_of(c0) == (Shape{M, N}), "[", op, "] c must have shape ",
               shape_str(Shape{M, N}), ", got ", shape_str(shape_of(c0)));
    std::copy_n(c0.data(), M * N, c.mutable_data());
  }
  const float *pa = a.data(), *pb = b.data();
  float* pc = c.mutable_data();
  py::gil_scoped_release nogil;
  if (naive)
    sgemm_naive(trans_a, false, M, N, K, alpha, pa, a.shape(1), pb, N, acc ? 1.f : 0.f, pc, N);
  else
    small_gemm(trans_a, M, N, K, alpha, pa, a.shape(1), pb, N, acc, pc, N);
  return c;
}

// _transpose_rows: out[k, j] = src[j, k] for k < K (core/small_gemm.h), for tests.
F32 transpose_rows_py(py::handle src_h, int64_t K) {
  auto src = f32(src_h, "_transpose_rows", "src");
  check_ndim(src, 2, 2, "_transpose_rows", "src");
  const int64_t n = src.shape(0), lds = src.shape(1);
  DSV3_CHECK(K >= 0 && K <= lds, "[_transpose_rows] K must be in [0, ", lds, "], got ", K);
  F32 out = empty(Shape{K, n});
  float* po = out.mutable_data();
  const float* ps = src.data();
  py::gil_scoped_release nogil;
  transpose_rows(po, n, ps, lds, n, K);
  return out;
}

py::tuple swiglu_bwd(py::handle dh_h, py::handle g_h, py::handle u_h) {
  auto dh = f32(dh_h, "swiglu_backward", "dh");
  auto g = f32(g_h, "swiglu_backward", "gate");
  auto u = f32(u_h, "swiglu_backward", "up");
  check_same_shape(g, u, "swiglu_backward", "gate", "up");
  check_same_shape(g, dh, "swiglu_backward", "gate", "dh");
  F32 dg = empty(shape_of(g)), du = empty(shape_of(g));
  float *pdg = dg.mutable_data(), *pdu = du.mutable_data();
  const float *pdh = dh.data(), *pg = g.data(), *pu = u.data();
  const int64_t F = g.size();
  {
    py::gil_scoped_release nogil;
    swiglu_backward(pdg, pdu, pdh, pg, pu, F, /*set=*/true);
  }
  return py::make_tuple(dg, du);
}

// ---- rope -----------------------------------------------------------------------------------
py::dict rope_table_py(int64_t dim, double theta, py::object scaling) {
  RopeTable t = rope_table(rope_params(dim, theta, scaling));
  py::array_t<double> inv((py::ssize_t)t.inv_freq.size());
  std::copy(t.inv_freq.begin(), t.inv_freq.end(), inv.mutable_data());
  py::dict out;
  out["inv_freq"] = inv;
  out["attn_factor"] = t.attn_factor;
  out["low"] = t.low;
  out["high"] = t.high;
  return out;
}

F32 rope_apply_py(py::handle x_h, py::handle pos_h, double theta, py::object scaling,
                  bool backward) {
  const char* op = backward ? "rope_backward" : "rope";
  auto x = f32(x_h, op, backward ? "dy" : "x");
  auto pos = i64(pos_h, op, "positions");
  check_ndim(x, 3, 4, op, backward ? "dy (T, H, Dr) or (B, T, H, Dr)" : "x (T, H, Dr) or (B, T, H, Dr)");
  const int64_t B = x.ndim() == 4 ? x.shape(0) : 1, T = x.shape(x.ndim() - 3),
                H = x.shape(x.ndim() - 2), Dr = x.shape(x.ndim() - 1);
  const bool per_batch = pos.ndim() == 2;
  DSV3_CHECK((pos.ndim() == 1 && pos.shape(0) == T) ||
                 (per_batch && x.ndim() == 4 && pos.shape(0) == B && pos.shape(1) == T),
             "[", op, "] positions must have shape (T,) = (", T, ",)",
             x.ndim() == 4 ? str_cat(" or (B, T) = (", B, ", ", T, ")") : std::string(""),
             ", got ", shape_str(shape_of(pos)));
  RopeTable t = rope_table(rope_params(Dr, theta, scaling));
  std::vector<int64_t> rowpos((size_t)(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) rowpos[b * T + i] = pos.data()[per_batch ? b * T + i : i];
  F32 y = backward ? zeros(shape_of(x)) : empty(shape_of(x));
  float* py_ = y.mutable_data();
  const float* px = x.data();
  py::gil_scoped_release nogil;
  if (backward)
    rope_backward(py_, H * Dr, Dr, px, H * Dr, Dr, rowpos.data(), B * T, H, t);
  else
    rope_forward(py_, H * Dr, Dr, px, H * Dr, Dr, rowpos.data(), B * T, H, t);
  return y;
}

// ---- attention ------------------------------------------------------------------------------
struct AttnArgs {
  F32 q, k, v;
  AttnShape s;
  bool batched;
};

AttnArgs attn_args(py::handle q_h, py::handle k_h, py::handle v_h, double scale,
                   int64_t start_pos, const char* op) {
  AttnArgs a{f32(q_h, op, "q"), f32(k_h, op, "k"), f32(v_h, op, "v"), {}, false};
  check_ndim(a.q, 3, 4, op, "q (Tq, H, Dk) or (B, Tq, H, Dk)");
  DSV3_CHECK(a.k.ndim() == a.q.ndim() && a.v.ndim() == a.q.ndim(), "[", op,
             "] q, k and v must have the same rank, got shapes ", shape_str(shape_of(a.q)), ", ",
             shape_str(shape_of(a.k)), ", ", shape_str(shape_of(a.v)));
  a.batched = a.q.ndim() == 4;
  const int o = a.batched ? 1 : 0;
  const int64_t B = a.batched ? a.q.shape(0) : 1;
  DSV3_CHECK(!a.batched || (a.k.shape(0) == B && a.v.shape(0) == B), "[", op,
             "] q, k and v must have the same batch size, got shapes ", shape_str(shape_of(a.q)),
             ", ", shape_str(shape_of(a.k)), ", ", shape_str(shape_of(a.v)));
  a.s = AttnShape{B, a.q.shape(o), a.k.shape(o), a.q.shape(o + 1), a.k.shape(o + 1),
                  a.q.shape(o + 2), a.v.shape(o + 2), start_pos, (float)scale};
  DSV3_CHECK(a.k.shape(o + 2) == a.s.Dk, "[", op, "] k head dim must equal q head dim ", a.s.Dk,
             ", got shape ", shape_str(shape_of(a.k)));
  DSV3_CHECK(a.v.shape(o) == a.s.Tk && a.v.shape(o + 1) == a.s.Hkv, "[", op,
             "] v must have the tokens and heads of k (", a.s.Tk, ", ", a.s.Hkv,
             "), got shape ", shape_str(shape_of(a.v)));
  attention_check(a.s);
  return a;
}

py::tuple attention_py(py::handle q_h, py::handle k_h, py::handle v_h, double scale,
                       int64_t start_pos) {
  AttnArgs a = attn_args(q_h, k_h, v_h, scale, start_pos, "attention");
  Shape os = shape_of(a.q);
  os.back() = a.s.Dv;
  Shape ls = a.batched ? Shape{a.s.B, a.s.H, a.s.Tq} : Shape{a.s.H, a.s.Tq};
  F32 o = empty(os), lse = empty(ls);
  float *po = o.mutable_data(), *pl = lse.mutable_data();
  const float *pq = a.q.data(), *pk = a.k.data(), *pv = a.v.data();
  {
    py::gil_scoped_release nogil;
    attention_forward(po, pl, {pq, pk, pv}, a.s);
  }
  return py::make_tuple(o, lse);
}

py::tuple attention_bwd(py::handle do_h, py::handle q_h, py::handle k_h, py::handle v_h,
                        py::handle o_h, py::handle lse_h, double scale, int64_t start_pos) {
  const char* op = "attention_backward";
  AttnArgs a = attn_args(q_h, k_h, v_h, scale, start_pos, op);
  auto d_o = f32(do_h, op, "d_out");
  auto o = f32(o_h, op, "out");
  auto lse = f32(lse_h, op, "lse");
  Shape os = shape_of(a.q);
  os.back() = a.s.Dv;
  Shape ls = a.batched ? Shape{a.s.B, a.s.H, a.s.Tq} : Shape{a.s.H, a.s.Tq};
  DSV3_CHECK(shape_of(d_o) == os && shape_of(o) == os, "[", op,
             "] d_out and out must have shape ", shape_str(os), ", got ",
             shape_str(shape_of(d_o)), " and ", shape_str(shape_of(o)));
  DSV3_CHECK(shape_of(lse) == ls, "[", op, "] lse must have shape ", shape_str(ls), ", got ",
             shape_str(shape_of(lse)));
  F32 dq = empty(shape_of(a.q)), dk = empty(shape_of(a.k)), dv = empty(shape_of(a.v));
  float *pdq = dq.mutable_data(), *pdk = dk.mutable_data(), *pdv = dv.mutable_data();
  const float *pdo = d_o.data(), *po = o.data(), *pl = lse.data(), *pq = a.q.data(),
              *pk = a.k.data(), *pv = a.v.data();
  {
    py::gil_scoped_release nogil;
    attention_backward({pdq, pdk, pdv, nullptr, /*set=*/true}, pdo, {po, pl}, {pq, pk, pv}, a.s);
  }
  return py::make_tuple(dq, dk, dv);
}

// ---- cross-entropy --------------------------------------------------------------------------
struct CeArgs {
  F32 logits;
  I64 targets;
  int64_t R, V;
};

CeArgs ce_args(py::handle l_h, py::handle t_h, const char* op) {
  CeArgs a{f32(l_h, op, "logits"), i64(t_h, op, "targets"), 0, 0};
  a.V = last_dim(a.logits, op, "logits");
  DSV3_CHECK(a.V >= 1, "[", op, "] logits must have at least one class");
  Shape want = shape_of(a.logits);
  want.pop_back();
  DSV3_CHECK(shape_of(a.targets) == want, "[", op, "] targets must have shape logits.shape[:-1] = ",
             shape_str(want), ", got ", shape_str(shape_of(a.targets)));
  a.R = rows(a.logits);
  return a;
}

py::tuple cross_entropy_py(py::handle l_h, py::handle t_h, int64_t ignore_index) {
  CeArgs a = ce_args(l_h, t_h, "cross_entropy");
  Shape rs = shape_of(a.targets);
  F32 loss_rows = empty(rs), lse = empty(rs);
  float *plr = loss_rows.mutable_data(), *pl = lse.mutable_data();
  const float* px = a.logits.data();
  const int64_t* pt = a.targets.data();
  int64_t count;
  double total = 0;
  {
    py::gil_scoped_release nogil;
    count = cross_entropy_forward(plr, pl, px, pt, a.R, a.V, ignore_index);
    for (int64_t r = 0; r < a.R; ++r) total += plr[r];  // fixed order, double accumulator
  }
  const double mean = count ? total / (double)count : std::nan("");
  return py::make_tuple(mean, lse, count);
}

F32 cross_entropy_bwd(py::handle l_h, py::handle t_h, py::handle lse_h, int64_t ignore_index,
                      double d_loss) {
  const char* op = "cross_entropy_backward";
  CeArgs a = ce_args(l_h, t_h, op);
  auto lse = f32(lse_h, op, "lse");
  DSV3_CHECK(shape_of(lse) == shape_of(a.targets), "[", op, "] lse must have shape ",
             shape_str(shape_of(a.targets)), ", got ", shape_str(shape_of(lse)));
  const int64_t* pt = a.targets.data();
  const int64_t count = cross_entropy_count(pt, a.R, a.V, ignore_index, op);
  if (count == 0) return zeros(shape_of(a.logits));
  F32 d = empty(shape_of(a.logits));
  float* pd = d.mutable_data();
  const float *px = a.logits.data(), *pl = lse.data();
  const float scale = (float)(d_loss / (double)count);
  py::gil_scoped_release nogil;
  cross_entropy_backward(pd, pl, px, pt, a.R, a.V, ignore_index, scale, /*set=*/true);
  return d;
}

// float32 -> bf16 bit patterns (core/bf16.h), any shape
py::array_t<uint16_t> bf16_bits_py(py::handle x_h) {
  F32 x = f32(x_h, "bf16_bits", "x");
  py::array_t<uint16_t> out(shape_of(x));
  const float* px = x.data();
  uint16_t* po = out.mutable_data();
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < n; ++i) po[i] = bf16_encode(px[i]);
  return out;
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def("yarn_mscale", &yarn_mscale, arg("scale"), arg("mscale"));
  m.def("bf16_bits", &bf16_bits_py, arg("x"));
  m.def("embedding", &embedding, arg("ids"), arg("weight"));
  m.def("embedding_backward", &embedding_bwd, arg("d_out"), arg("ids"), arg("num_embeddings"));
  m.def("linear", &linear, arg("x"), arg("weight"));
  m.def("linear_backward", &linear_bwd, arg("dy"), arg("x"), arg("weight"));
  m.def("rmsnorm", &rmsnorm, arg("x"), arg("weight"), arg("eps"));
  m.def("rmsnorm_backward", &rmsnorm_bwd, arg("dy"), arg("x"), arg("weight"), arg("eps"));
  m.def("swiglu", &swiglu, arg("gate"), arg("up"));
  m.def("swiglu_backward", &swiglu_bwd, arg("dh"), arg("gate"), arg("up"));
  m.def("rope_table", &rope_table_py, arg("dim"), arg("theta"), arg("rope_scaling"));
  m.def("rope", [](py::handle x, py::handle p, double th, py::object s) {
    return rope_apply_py(x, p, th, s, false);
  }, arg("x"), arg("positions"), arg("theta"), arg("rope_scaling"));
  m.def("rope_backward", [](py::handle dy, py::handle p, double th, py::object s) {
    return rope_apply_py(dy, p, th, s, true);
  }, arg("dy"), arg("positions"), arg("theta"), arg("rope_scaling"));
  m.def("attention", &attention_py, arg("q"), arg("k"), arg("v"), arg("scale"), arg("start_pos"));
  m.def("attention_backward", &attention_bwd, arg("d_out"), arg("q"), arg("k"), arg("v"),
        arg("out"), arg("lse"), arg("scale"), arg("start_pos"));
  m.def("_exp_f32", &exp_py, arg("x"));
  m.def("_small_gemm", &small_gemm_py, arg("a"), arg("b"), arg("trans_a") = false,
        arg("alpha") = 1.f, arg("c") = py::none(), arg("naive") = false);
  m.def("_transpose_rows", &transpose_rows_py, arg("src"), arg("K"));
  m.def("cross_entropy", &cross_entropy_py, arg("logits"), arg("targets"), arg("ignore_index"));
  m.def("cross_entropy_backward", &cross_entropy_bwd, arg("logits"), arg("targets"), arg("lse"),
        arg("ignore_index"), arg("d_loss"));
}

}  // namespace dsv3
