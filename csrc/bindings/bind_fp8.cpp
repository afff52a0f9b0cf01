// dsv3._core fp8: csrc/kernels/fp8{,_gemm,_linear}.h on numpy arrays. Codes are uint8 arrays
// (anything else: TypeError naming the argument); float inputs float32; shapes and options
// are checked here (ValueError naming the argument); outputs are new arrays.
#include <pybind11/stl.h>

#include <string>

#include "bindings/arrays.h"
#include "kernels/fp8.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_linear.h"

namespace dsv3 {

namespace py = pybind11;
using namespace py_glue;
using py::arg;

namespace {

using U8 = py::array_t<uint8_t, py::array::c_style>;

U8 u8(const py::handle& obj, const char* op, const char* name) {
  if (!is_array_of<uint8_t>(obj, str_cat("fp8.", op).c_str(), name))
    throw py::type_error(str_cat("[fp8.", op, "] ", name, " must be a uint8 numpy array of ",
                                 "fp8 codes, got ", dtype_name(obj)));
  return U8::ensure(obj);
}

F32 f32_arg(const py::handle& obj, const char* op, const char* name) {
  return f32(obj, str_cat("fp8.", op).c_str(), name);
}

// Rows and columns of an array quantized with `block`: rows are all leading dimensions
// flattened when block rows == 1 (activations of any rank), else the array must be 2-D.
void rows_cols(const py::array& a, Fp8Block block, const char* op, const char* name,
               int64_t& R, int64_t& C) {
  DSV3_CHECK(block.rows >= 1 && block.cols >= 1, "[fp8.", op, "] block sizes must be >= 1, ",
             "got block=(", block.rows, ", ", block.cols, ")");
  DSV3_CHECK(a.ndim() >= 1, "[fp8.", op, "] ", name, " must have at least 1 dimension");
  DSV3_CHECK(block.rows == 1 || a.ndim() == 2, "[fp8.", op, "] ", name, " must be 2-D for a ",
             "block of ", block.rows, " rows, got shape ", shape_str(shape_of(a)));
  R = rows(a);
  C = a.shape(a.ndim() - 1);
}

Shape scale_shape(const py::array& a, Fp8Block block, int64_t R, int64_t C) {
  Shape s = shape_of(a);
  s.back() = fp8_blocks(C, block.cols);
  if (block.rows != 1) s[0] = fp8_blocks(R, block.rows);
  return s;
}

int opt_bits(const py::object& o) {
  if (o.is_none()) return 0;
  const int k = o.cast<int>();
  DSV3_CHECK(k >= 1 && k <= 24, "[fp8.gemm] accumulator_bits must be in [1, 24] (fp32 keeps ",
             "24) or None, got ", k);
  return k;
}

int64_t opt_interval(const py::object& o) {
  if (o.is_none()) return 0;
  const int64_t p = o.cast<int64_t>();
  DSV3_CHECK(p >= 1, "[fp8.gemm] promotion_interval must be a positive integer or None, got ", p);
  return p;
}

// ---- elementwise ----------------------------------------------------------------------------
F32 cast_py(py::handle x_h, const std::string& fmt, bool saturate) {
  auto x = f32_arg(x_h, "cast", "x");
  const Fp8Format f = fp8_parse_format(fmt, "cast");
  F32 out = empty(shape_of(x));
  float* po = out.mutable_data();
  const float* px = x.data();
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  fp8_cast(po, px, n, f, saturate);
  return out;
}

U8 encode_py(py::handle x_h, const std::string& fmt, bool saturate) {
  auto x = f32_arg(x_h, "encode", "x");
  const Fp8Format f = fp8_parse_format(fmt, "encode");
  U8 out(shape_of(x));
  uint8_t* po = out.mutable_data();
  const float* px = x.data();
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  fp8_encode(po, px, n, f, saturate);
  return out;
}

F32 decode_py(py::handle c_h, const std::string& fmt) {
  auto c = u8(c_h, "decode", "codes");
  const Fp8Format f = fp8_parse_format(fmt, "decode");
  F32 out = empty(shape_of(c));
  float* po = out.mutable_data();
  const uint8_t* pc = c.data();
  const int64_t n = c.size();
  py::gil_scoped_release nogil;
  fp8_decode(po, pc, n, f);
  return out;
}

// ---- block quantization ---------------------------------------------------------------------
py::tuple quantize_py(py::handle x_h, const std::string& fmt, int64_t br, int64_t bc, bool pow2) {
  auto x = f32_arg(x_h, "quantize", "x");
  const Fp8Format f = fp8_parse_format(fmt, "quantize");
  const Fp8Block block{br, bc};
  int64_t R, C;
  rows_cols(x, block, "quantize", "x", R, C);
  U8 codes(shape_of(x));
  F32 scales = empty(scale_shape(x, block, R, C));
  uint8_t* pc = codes.mutable_data();
  float* ps = scales.mutable_data();
  const float* px = x.data();
  {
    py::gil_scoped_release nogil;
    fp8_quantize(pc, ps, px, R, C, block, f, pow2);
  }
  return py::make_tuple(codes, scales);
}

F32 dequantize_py(py::handle c_h, py::handle s_h, int64_t br, int64_t bc, const std::string& fmt) {
  auto c = u8(c_h, "dequantize", "codes");
  auto s = f32_arg(s_h, "dequantize", "scales");
  const Fp8Format f = fp8_parse_format(fmt, "dequantize");
  const Fp8Block block{br, bc};
  int64_t R, C;
  rows_cols(c, block, "dequantize", "codes", R, C);
  const Shape want = scale_shape(c, block, R, C);
  DSV3_CHECK(shape_of(s) == want, "[fp8.dequantize] scales must have shape ", shape_str(want),
             " for codes of shape ", shape_str(shape_of(c)), " and block=(", br, ", ", bc,
             "), got ", shape_str(shape_of(s)));
  F32 out = empty(shape_of(c));
  float* po = out.mutable_data();
  const uint8_t* pc = c.data();
  const float* ps = s.data();
  py::gil_scoped_release nogil;
  fp8_dequantize(po, pc, ps, R, C, block, f);
  return out;
}

// ---- gemm -----------------------------------------------------------------------------------
// The scale layout of a [rows, K] operand, from its scales' shape: [rows, ceil(K/128)] 1x128
// tiles, [ceil(rows/128), ceil(K/128)] 128x128 blocks, or a single scale (per tensor). Where
// two layouts give the same shape they also give the same scale to every element.
Fp8Block infer_block(const py::array& s, int64_t rows, int64_t K, const char* name) {
  const int64_t kc = fp8_blocks(K, 128);
  if (s.size() == 1 && s.ndim() <= 2) return {std::max<int64_t>(rows, 1), std::max<int64_t>(K, 1)};
  const Shape got = shape_of(s);
  if (got == Shape{(py::ssize_t)rows, (py::ssize_t)kc}) return {1, 128};
  if (got == Shape{(py::ssize_t)fp8_blocks(rows, 128), (py::ssize_t)kc}) return {128, 128};
  throw std::invalid_argument(str_cat(
      "[fp8.gemm] ", name, "_scales must have shape (", rows, ", ", kc, ") for 1x128 tiles, (",
      fp8_blocks(rows, 128), ", ", kc, ") for 128x128 blocks, or (1, 1) for one scale per ",
      "tensor (", name, "_codes has shape (", rows, ", ", K, ")), got ", shape_str(got)));
}

Fp8Operand operand(const U8& c, const F32& s, const std::string& fmt, const char* name) {
  Fp8Operand o;
  o.codes = c.data();
  o.scales = s.data();
  o.block = infer_block(s, c.shape(0), c.shape(1), name);
  o.fmt = fp8_parse_format(fmt, "gemm");
  return o;
}

F32 gemm_py(py::handle ac_h, py::handle as_h, py::handle bc_h, py::handle bs_h,
            py::object acc_bits, py::object interval, const std::string& a_fmt,
            const std::string& b_fmt) {
  auto ac = u8(ac_h, "gemm", "a_codes");
  auto as = f32_arg(as_h, "gemm", "a_scales");
  auto bc = u8(bc_h, "gemm", "b_codes");
  auto bs = f32_arg(bs_h, "gemm", "b_scales");
  DSV3_CHECK(ac.ndim() == 2, "[fp8.gemm] a_codes must be 2-D (M, K), got shape ",
             shape_str(shape_of(ac)));
  DSV3_CHECK(bc.ndim() == 2, "[fp8.gemm] b_codes must be 2-D (N, K), got shape ",
             shape_str(shape_of(bc)));
  DSV3_CHECK(bc.shape(1) == ac.shape(1), "[fp8.gemm] b_codes must have K = a_codes.shape[1] = ",
             ac.shape(1), " columns (C = A @ B^T), got shape ", shape_str(shape_of(bc)));
  const int64_t M = ac.shape(0), N = bc.shape(0), K = ac.shape(1);
  Fp8GemmOptions opts;
  opts.accumulator_bits = opt_bits(acc_bits);
  opts.promotion_interval = opt_interval(interval);
  const Fp8Operand a = operand(ac, as, a_fmt, "a"), b = operand(bc, bs, b_fmt, "b");
  fp8_gemm_check(a, b, M, N, K, opts);
  F32 out = empty({(py::ssize_t)M, (py::ssize_t)N});
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  fp8_gemm(po, a, b, M, N, K, opts, false);
  return out;
}

// ---- linear ---------------------------------------------------------------------------------
Fp8LinearOptions linear_opts(bool pow2, py::object acc_bits, py::object interval,
                             const std::string& grad_fmt, const char* op) {
  Fp8LinearOptions o;
  o.pow2_scale = pow2;
  o.gemm.accumulator_bits = opt_bits(acc_bits);
  o.gemm.promotion_interval = opt_interval(interval);
  o.grad_fmt = fp8_parse_format(grad_fmt, op);
  DSV3_CHECK(fp8_format_info(o.grad_fmt).byte_codes, "[fp8.", op, "] grad_fmt must be \"e4m3\" ",
             "or \"e5m2\", got \"", grad_fmt, "\"");
  return o;
}

void check_linear(const F32& x, const F32& w, const char* op) {
  DSV3_CHECK(w.ndim() == 2, "[fp8.", op, "] weight must be 2-D (O, K), got shape ",
             shape_str(shape_of(w)));
  DSV3_CHECK(x.ndim() >= 1 && x.shape(x.ndim() - 1) == w.shape(1), "[fp8.", op,
             "] x must have last dimension in_features (weight.shape[1]) = ", w.shape(1),
             ", got shape ", shape_str(shape_of(x)));
}

F32 linear_py(py::handle x_h, py::handle w_h, bool pow2, py::object acc, py::object interval) {
  auto x = f32_arg(x_h, "linear", "x");
  auto w = f32_arg(w_h, "linear", "weight");
  check_linear(x, w, "linear");
  const Fp8LinearOptions o = linear_opts(pow2, acc, interval, "e4m3", "linear");
  const int64_t R = rows(x), K = w.shape(1), O = w.shape(0);
  Shape ys = shape_of(x);
  ys.back() = O;
  F32 y = empty(ys);
  float* py_ = y.mutable_data();
  const float *px = x.data(), *pw = w.data();
  py::gil_scoped_release nogil;
  fp8_linear_forward(py_, px, pw, R, K, O, o);
  return y;
}

py::tuple linear_bwd_py(py::handle dy_h, py::handle x_h, py::handle w_h, const std::string& gf,
                        bool pow2, py::object acc, py::object interval) {
  auto dy = f32_arg(dy_h, "linear_backward", "dy");
  auto x = f32_arg(x_h, "linear_backward", "x");
  auto w = f32_arg(w_h, "linear_backward", "weight");
  check_linear(x, w, "linear_backward");
  Shape want = shape_of(x);
  want.back() = w.shape(0);
  DSV3_CHECK(shape_of(dy) == want, "[fp8.linear_backward] dy must have shape ", shape_str(want),
             ", got ", shape_str(shape_of(dy)));
  const Fp8LinearOptions o = linear_opts(pow2, acc, interval, gf, "linear_backward");
  const int64_t R = rows(x), K = w.shape(1), O = w.shape(0);
  F32 dx = zeros(shape_of(x)), dw = zeros(shape_of(w));
  float *pdx = dx.mutable_data(), *pdw = dw.mutable_data();
  const float *pdy = dy.data(), *px = x.data(), *pw = w.data();
  {
    py::gil_scoped_release nogil;
    fp8_linear_backward(pdx, pdw, pdy, px, pw, R, K, O, o);
  }
  return py::make_tuple(dx, dw);
}

py::dict format_info_py(const std::string& fmt) {
  const Fp8FormatInfo& i = fp8_format_info(fp8_parse_format(fmt, "format_info"));
  py::dict d;
  d["name"] = i.name;
  d["exponent_bits"] = i.exponent_bits;
  d["mantissa_bits"] = i.mantissa_bits;
  d["bias"] = i.bias;
  d["ieee"] = i.ieee;
  d["byte_codes"] = i.byte_codes;
  d["max"] = i.max;
  d["min_subnormal"] = i.min_subnormal;
  return d;
}

}  // namespace

void bind_fp8(py::module_& m) {
  m.def("fp8_format_info", &format_info_py, arg("fmt"));
  m.def("fp8_cast", &cast_py, arg("x"), arg("fmt"), arg("saturate"));
  m.def("fp8_encode", &encode_py, arg("x"), arg("fmt"), arg("saturate"));
  m.def("fp8_decode", &decode_py, arg("codes"), arg("fmt"));
  m.def("fp8_quantize", &quantize_py, arg("x"), arg("fmt"), arg("block_rows"),
        arg("block_cols"), arg("pow2_scale"));
  m.def("fp8_dequantize", &dequantize_py, arg("codes"), arg("scales"), arg("block_rows"),
        arg("block_cols"), arg("fmt"));
  m.def("fp8_gemm", &gemm_py, arg("a_codes"), arg("a_scales"), arg("b_codes"), arg("b_scales"),
        arg("accumulator_bits"), arg("promotion_interval"), arg("a_fmt"), arg("b_fmt"));
  m.def("fp8_linear", &linear_py, arg("x"), arg("weight"), arg("pow2_scale"),
        arg("accumulator_bits"), arg("promotion_interval"));
  m.def("fp8_linear_backward", &linear_bwd_py, arg("dy"), arg("x"), arg("weight"),
        arg("grad_fmt"), arg("pow2_scale"), arg("accumulator_bits"), arg("promotion_interval"));
}

}  // namespace dsv3
