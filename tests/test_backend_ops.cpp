// Every op of the CPU backend (1 and 2 threads) against plain scalar double-precision references written
// here, on random inputs, plus bitwise thread-count determinism.
//
// Tolerances (u = 2^-24, the float unit roundoff):
//   * float-weight matmul (F32/F16/BF16, and Q4_0/Q4_K/Q6_K, whose rows are dequantized to float first):
//     the kernel sums K products in float, 16 lanes of ~K/16 sequential FMAs then a 4-level tree, so the
//     error is at most about (K/16 + 8) * 2u * sum|w*x| (plus one rounding per dequantized weight: u|w|).
//   * Q8_0 matmul: the activations are quantized to 8 bits per block of 32 (scale d = amax/127), so each
//     x_k is off by at most d/2: the bound is sum over blocks of (amax_b/254) * sum_b |w_k|, plus the float
//     accumulation term above. This is a rigorous bound, typically ~1e-2 relative.
//   * element-wise ops: a few ulps of the result (exp is a degree-6 polynomial with ~1e-7 relative error).
//   * rope: ggml's angle recurrence theta_i = p * scale^i by repeated float multiplication has a relative
//     error of about (i + 4) u, i.e. an absolute angle error of |theta| (i + 4) u that the output inherits
//     times the pair's norm.
//   * attention (every KV type, against a reference from the *stored* K/V read back with kv_read_page):
//     scores are float dots of head_dim terms and the probabilities use the polynomial exp,
//     so each probability is within ~1e-6 relative; outputs are convex combinations of V rows, so we allow
//     1e-5 * max|v| (a wrong slot or a wrong mask shows up as errors of ~1e-1).
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/simd.h"
#include "backend/cpu/thread_pool.h"
#include "backend/registry.h"
#include "util/error.h"

namespace headroom {
namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24

// ---- test-local half/bf16 codecs (independent of the library) -----------------------------------------
double half_to_double(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  double v;
  if (exp == 0) v = std::ldexp(double(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(double(1024 + man), exp - 25);
  return sign ? -v : v;
}
// Nearest half (ties to even) for values in the normal half range or zero.
uint16_t double_to_half(double v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  v = std::fabs(v);
  int e;
  std::frexp(v, &e);  // v = f * 2^e, f in [0.5, 1)
  int exp = e - 1 + 15;
  if (exp < 1) exp = 1;  // subnormal range uses the minimum exponent
  double man = std::nearbyint(std::ldexp(v, 10 - (exp - 15)));  // includes the implicit 1024
  if (man >= 2048) {
    man /= 2;
    ++exp;
  }
  if (man < 1024) return sign | uint16_t(man);  // subnormal
  return sign | uint16_t(exp << 10) | uint16_t(int(man) - 1024);
}
double bf16_to_double(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- weights in every type: stored bytes + the exact values the test expects --------------------------
struct TestWeight {
  DType type;
  int64_t rows, cols;
  std::vector<uint8_t> data;
  std::vector<double> ref;  // rows*cols dequantized values (double, from the format spec)
  WeightView view() const {
    WeightView w;
    w.type = type;
    w.data = data.data();
    w.rows = rows;
    w.cols = cols;
    w.row_bytes = data.size() / size_t(rows);
    return w;
  }
};

void put16(std::vector<uint8_t>& d, uint16_t v) {
  d.push_back(uint8_t(v & 0xFF));
  d.push_back(uint8_t(v >> 8));
}

TestWeight make_weight(DType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::uniform_real_distribution<float> uf(-1.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  TestWeight w{type, rows, cols, {}, {}};
  w.ref.reserve(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    switch (type) {
      case DType::F32:
        for (int64_t c = 0; c < cols; ++c) {
          const float v = uf(rng);
          uint8_t b[4];
          std::memcpy(b, &v, 4);
          w.data.insert(w.data.end(), b, b + 4);
          w.ref.push_back(v);
        }
        break;
      case DType::F16:
        for (int64_t c = 0; c < cols; ++c) {
          const uint16_t h = double_to_half(uf(rng));
          put16(w.data, h);
          w.ref.push_back(half_to_double(h));
        }
        break;
      case DType::BF16:
        for (int64_t c = 0; c < cols; ++c) {
          const float v = uf(rng);
          uint32_t u;
          std::memcpy(&u, &v, 4);
          put16(w.data, uint16_t(u >> 16));
          w.ref.push_back(bf16_to_double(uint16_t(u >> 16)));
        }
        break;
      case DType::Q8_0:  // quantize random floats like ggml's quantize_row_q8_0_ref
        for (int64_t b = 0; b < cols / 32; ++b) {
          float x[32], amax = 0;
          for (float& v : x) {
            v = uf(rng) * (b % 3 == 0 ? 4.0f : 1.0f);
            amax = std::max(amax, std::fabs(v));
          }
          const float d = amax / 127.0f;
          const uint16_t dh = double_to_half(d);
          put16(w.data, dh);
          for (float v : x) {
            const int q = int(std::lround(v / d));
            w.data.push_back(uint8_t(int8_t(std::clamp(q, -127, 127))));
            w.ref.push_back(half_to_double(dh) * std::clamp(q, -127, 127));
          }
        }
        break;
      case DType::Q4_0:
        for (int64_t b = 0; b < cols / 32; ++b) {
          const uint16_t dh = double_to_half(0.01 + 0.1 * (uf(rng) + 1));
          put16(w.data, dh);
          uint8_t qs[16];
          for (auto& q : qs) q = uint8_t(byte(rng));
          w.data.insert(w.data.end(), qs, qs + 16);
          for (int j = 0; j < 16; ++j) w.ref.push_back(half_to_double(dh) * ((qs[j] & 15) - 8));
          for (int j = 0; j < 16; ++j) w.ref.push_back(half_to_double(dh) * ((qs[j] >> 4) - 8));
        }
        break;
      case DType::Q4_K:  // random valid blocks; reference from ggml's layout
        for (int64_t b = 0; b < cols / 256; ++b) {
          const uint16_t dh = double_to_half(0.002 + 0.01 * (uf(rng) + 1));
          const uint16_t mh = double_to_half(0.001 + 0.005 * (uf(rng) + 1));
          uint8_t sc[12], qs[128];
          for (auto& v : sc) v = uint8_t(byte(rng));
          for (auto& v : qs) v = uint8_t(byte(rng));
          put16(w.data, dh);
          put16(w.data, mh);
          w.data.insert(w.data.end(), sc, sc + 12);
          w.data.insert(w.data.end(), qs, qs + 128);
          for (int j = 0; j < 8; ++j) {  // sub-block j: 32 values
            int s, m;
            if (j < 4) {
              s = sc[j] & 63;
              m = sc[j + 4] & 63;
            } else {
              s = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
              m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
            }
            // elements 64*(j/2) + l use low nibbles (j even) or high nibbles (j odd) of qs[32*(j/2) + l]
            for (int l = 0; l < 32; ++l) {
              const int q = j % 2 == 0 ? qs[32 * (j / 2) + l] & 15 : qs[32 * (j / 2) + l] >> 4;
              w.ref.push_back(half_to_double(dh) * s * q - half_to_double(mh) * m);
            }
          }
        }
        break;
      case DType::Q6_K:
        for (int64_t b = 0; b < cols / 256; ++b) {
          uint8_t ql[128], qh[64];
          int8_t sc[16];
          for (auto& v : ql) v = uint8_t(byte(rng));
          for (auto& v : qh) v = uint8_t(byte(rng));
          for (auto& v : sc) v = int8_t(byte(rng) - 128);
          const uint16_t dh = double_to_half(0.0005 + 0.001 * (uf(rng) + 1));
          w.data.insert(w.data.end(), ql, ql + 128);
          w.data.insert(w.data.end(), qh, qh + 64);
          for (int8_t s : sc) w.data.push_back(uint8_t(s));
          put16(w.data, dh);
          // element e: half n = e/128, within it l = e%32 and quarter k = (e%128)/32
          for (int e = 0; e < 256; ++e) {
            const int n = e / 128, k = (e % 128) / 32, l = e % 32;
            const uint8_t lb = ql[64 * n + l + (k % 2) * 32];
            const int lo = k < 2 ? lb & 15 : lb >> 4;
            const int hi = (qh[32 * n + l] >> (2 * k)) & 3;
            const int q = (lo | hi << 4) - 32;
            const int s = sc[8 * n + l / 16 + 2 * k];
            w.ref.push_back(half_to_double(dh) * s * q);
          }
        }
        break;
      default:
        ADD_FAILURE() << "no generator";
    }
  }
  return w;
}

std::vector<float> random_vec(size_t n, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

struct Backends {
  std::unique_ptr<Backend> one = make_cpu_backend(1);
  std::unique_ptr<Backend> two = make_cpu_backend(2);
};

// ---- formats ------------------------------------------------------------------------------------------

TEST(BackendOps, RowBytes) {
  EXPECT_EQ(row_bytes(DType::F32, 7), 28u);
  EXPECT_EQ(row_bytes(DType::F16, 7), 14u);
  EXPECT_EQ(row_bytes(DType::BF16, 3), 6u);
  EXPECT_EQ(row_bytes(DType::Q8_0, 256), 8u * 34);
  EXPECT_EQ(row_bytes(DType::Q4_0, 64), 2u * 18);
  EXPECT_EQ(row_bytes(DType::Q4_K, 512), 2u * 144);
  EXPECT_EQ(row_bytes(DType::Q6_K, 256), 210u);
  EXPECT_THROW(row_bytes(DType::Q8_0, 33), Error);
  EXPECT_THROW(row_bytes(DType::Q5_K, 256), Error);
}

TEST(BackendOps, VectorExpIsWithinItsStatedError) {
  // The softmax's and SwiGLU's e^x of this build's ISA (exp16 with AVX-512, exp8 with AVX2; scalar std::exp
  // otherwise): relative error ~1e-7 over the range where e^x is a normal float, 0 for -inf and below, inf
  // above, NaN kept.
  std::vector<float> x;
  for (float v = -87.0f; v <= 88.0f; v += 0.01234f) x.push_back(v);
  for (float v : {0.0f, -0.0f, 1e-8f, -1e-8f, -200.0f, -INFINITY, 100.0f, INFINITY, NAN}) x.push_back(v);
  while (x.size() % 16) x.push_back(0.5f);
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); i += 16) {
#if defined(HR_AVX512)
    _mm512_storeu_ps(&y[i], cpu::exp16(_mm512_loadu_ps(&x[i])));
#elif defined(HR_AVX2)
    _mm256_storeu_ps(&y[i], cpu::exp8(_mm256_loadu_ps(&x[i])));
    _mm256_storeu_ps(&y[i + 8], cpu::exp8(_mm256_loadu_ps(&x[i + 8])));
#else
    for (size_t j = i; j < i + 16; ++j) y[j] = cpu::exp_scalar(x[j]);
#endif
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(double(x[i]));
    if (std::isnan(x[i])) {
      EXPECT_TRUE(std::isnan(y[i]));
    } else if (x[i] < -87.34f) {
      EXPECT_EQ(y[i], 0.0f) << x[i];
    } else if (x[i] > 88.73f) {
      EXPECT_EQ(y[i], INFINITY) << x[i];
    } else {
      ASSERT_NEAR(y[i], want, 4e-7 * want) << "e^" << x[i];
    }
  }
}

TEST(BackendOps, ScatterI32WritesThePairsOrNothing) {
  auto cpu = make_cpu_backend(1);
  DeviceArray<int32_t> t(*cpu, 6);
  const std::vector<int32_t> start = {0, 1, 2, 3, 4, 5};
  t.upload(start.data(), start.size());
  const std::vector<int32_t> pairs = {4, 40, 0, 7};
  cpu->scatter_i32(t.get(), 6, pairs);
  std::vector<int32_t> got(6);
  cpu->download(got.data(), t.get(), 6 * sizeof(int32_t));
  EXPECT_EQ(got, (std::vector<int32_t>{7, 1, 2, 3, 40, 5}));
  const std::vector<int32_t> bad = {1, 9, 6, 9}, odd = {1};
  EXPECT_THROW(cpu->scatter_i32(t.get(), 6, bad), Error);
  EXPECT_THROW(cpu->scatter_i32(t.get(), 6, odd), Error);
  cpu->download(got.data(), t.get(), 6 * sizeof(int32_t));
  EXPECT_EQ(got, (std::vector<int32_t>{7, 1, 2, 3, 40, 5})) << "a bad pair writes nothing";
}

TEST(BackendOps, DequantizeRowMatchesSpec) {
  std::mt19937 rng(1);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q6_K}) {
    const int64_t cols = 512, rows = 3;
    const TestWeight w = make_weight(t, rows, cols, rng);
    std::vector<float> out(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t, w.data.data() + size_t(r) * w.data.size() / rows, out.data(), cols);
      for (int64_t c = 0; c < cols; ++c) {
        const double ref = w.ref[size_t(r * cols + c)];
        // ggml dequantizes in float: at most two roundings (Q4_K: d1*q - m1; Q6_K: (d*sc)*q).
        ASSERT_NEAR(out[size_t(c)], ref, 4 * kU * (std::fabs(ref) + 1e-3)) << "type " << int(t) << " col " << c;
      }
    }
  }
  float dummy[32];
  uint8_t block[64] = {};
  EXPECT_THROW(dequantize_row(DType::Q5_0, block, dummy, 32), Error);
}

// ---- matmul -------------------------------------------------------------------------------------------

struct MatmulCase {
  DType type;
  int64_t rows, cols, n;
};

void check_matmul(const MatmulCase& mc, Backends& be, std::mt19937& rng) {
  SCOPED_TRACE(testing::Message() << "type " << int(mc.type) << " rows " << mc.rows << " cols " << mc.cols
                                  << " n " << mc.n);
  const TestWeight w = make_weight(mc.type, mc.rows, mc.cols, rng);
  std::vector<float> x = random_vec(size_t(mc.n * mc.cols), rng);
  for (int64_t j = 0; j < mc.n; j += 3) x[size_t(j * mc.cols)] *= 8.0f;  // some outliers
  std::vector<float> y1(size_t(mc.n * mc.rows), NAN), y2(y1.size(), NAN);
  be.one->matmul(w.view(), x.data(), mc.n, y1.data());
  be.two->matmul(w.view(), x.data(), mc.n, y2.data());
  ASSERT_TRUE(bitwise_equal(y1, y2)) << "1 and 2 threads differ";

  const bool q8 = mc.type == DType::Q8_0;
  const bool dequant = mc.type == DType::Q4_0 || mc.type == DType::Q4_K || mc.type == DType::Q6_K;
  const double acc_factor = (double(mc.cols) / 16 + 8) * 2 * kU;
  double worst = 0;
  for (int64_t j = 0; j < mc.n; ++j)
    for (int64_t i = 0; i < mc.rows; ++i) {
      double ref = 0, mag = 0, q8_bound = 0;
      const float* xr = x.data() + j * mc.cols;
      const double* wr = w.ref.data() + i * mc.cols;
      for (int64_t k = 0; k < mc.cols; ++k) {
        ref += wr[k] * xr[k];
        mag += std::fabs(wr[k] * xr[k]);
      }
      if (q8)
        for (int64_t b = 0; b < mc.cols / 32; ++b) {
          double amax = 0, wabs = 0;
          for (int k = 0; k < 32; ++k) {
            amax = std::max(amax, double(std::fabs(xr[b * 32 + k])));
            wabs += std::fabs(wr[b * 32 + k]);
          }
          q8_bound += amax / 254 * wabs;
        }
      const double tol = acc_factor * mag * (q8 ? 2 : 1) + (dequant ? 2 * kU * mag : 0) + q8_bound * 1.001 + 1e-30;
      const double err = std::fabs(double(y1[size_t(j * mc.rows + i)]) - ref);
      worst = std::max(worst, err / (tol + 1e-300));
      ASSERT_LE(err, tol) << "y[" << j << "][" << i << "] = " << y1[size_t(j * mc.rows + i)] << " ref " << ref;
    }
  if (std::getenv("HEADROOM_TEST_VERBOSE"))
    std::printf("matmul type %d %lldx%lld n=%lld: worst error / tolerance = %.3g\n", int(mc.type),
                (long long)mc.rows, (long long)mc.cols, (long long)mc.n, worst);
}

TEST(BackendOps, MatmulFloatTypes) {
  Backends be;
  std::mt19937 rng(2);
  for (DType t : {DType::F32, DType::F16, DType::BF16})
    for (const auto& [rows, cols, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {5, 37, 1}, {37, 64, 37}, {256, 256, 1}, {7, 17, 3}, {33, 96, 512}, {768, 256, 1}, {20, 256, 9}})
      check_matmul({t, rows, cols, n}, be, rng);
}

TEST(BackendOps, MatmulQ8_0) {
  Backends be;
  std::mt19937 rng(3);
  for (const auto& [rows, cols, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {5, 32, 1},     {37, 64, 37},  {256, 256, 1}, {61, 96, 3},  {33, 256, 512}, {768, 256, 1},
           {256, 768, 7},  {13, 160, 9},  {3, 32, 2},    {256, 256, 512}, {1, 288, 1}, {130, 256, 65}})
    check_matmul({DType::Q8_0, rows, cols, n}, be, rng);
}

TEST(BackendOps, MatmulQuantTypes) {
  Backends be;
  std::mt19937 rng(4);
  for (DType t : {DType::Q4_0, DType::Q4_K, DType::Q6_K})
    for (const auto& [rows, cols, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {20, 256, 1}, {37, 512, 37}, {16, 256, 512}, {9, 768, 4}})
      check_matmul({t, rows, cols, n}, be, rng);
}

// A row of a batch gives exactly the result of the same row alone (prefill and decode agree bitwise).
TEST(BackendOps, MatmulBatchRowEqualsSingleRow) {
  Backends be;
  std::mt19937 rng(5);
  for (DType t : {DType::Q8_0, DType::F32, DType::F16, DType::Q4_K}) {
    const int64_t rows = 45, cols = 256, n = 37;
    const TestWeight w = make_weight(t, rows, cols, rng);
    const std::vector<float> x = random_vec(size_t(n * cols), rng);
    std::vector<float> y(static_cast<size_t>(n * rows)), y1(static_cast<size_t>(rows));
    be.two->matmul(w.view(), x.data(), n, y.data());
    for (int64_t j : {int64_t(0), int64_t(5), int64_t(36)}) {
      be.two->matmul(w.view(), x.data() + j * cols, 1, y1.data());
      EXPECT_EQ(0, std::memcmp(y1.data(), y.data() + j * rows, size_t(rows) * 4)) << "type " << int(t) << " row " << j;
    }
  }
}

// The CPU's grouped matmuls (q/k/v, gate/up + SwiGLU) share the input's Q8_0 quantization between their Q8_0
// weights: bitwise the separate matmuls, Q8_0 and F16 weights mixed; and nothing of it survives the call
// (the same input pointer with new contents is quantized again).
TEST(BackendOps, GroupedMatmulsEqualSeparateOnesBitwise) {
  auto be = make_cpu_backend(2);
  std::mt19937 rng(15);
  for (int64_t n : {int64_t(1), int64_t(9), int64_t(70)}) {
    const TestWeight a = make_weight(DType::Q8_0, 40, 256, rng), b = make_weight(DType::Q8_0, 24, 256, rng);
    const TestWeight c = make_weight(DType::F16, 24, 256, rng);
    std::vector<float> x = random_vec(size_t(n * 256), rng);
    auto sep = [&](const TestWeight& w) {
      std::vector<float> y(size_t(n * w.view().rows));
      be->matmul(w.view(), x.data(), n, y.data());
      return y;
    };
    std::vector<float> ya(size_t(n * 40)), yb(size_t(n * 24)), yc(size_t(n * 24));
    const MatmulPart parts[] = {{a.view(), ya.data()}, {b.view(), yb.data()}, {c.view(), yc.data()}};
    be->matmul_group(parts, x.data(), n);
    EXPECT_TRUE(bitwise_equal(ya, sep(a)) && bitwise_equal(yb, sep(b)) && bitwise_equal(yc, sep(c))) << "n " << n;
    // gate/up + SwiGLU.
    std::vector<float> g(size_t(n * 24)), u(size_t(n * 24)), gs = sep(b), us = sep(c);
    be->swiglu(gs.data(), us.data(), int64_t(gs.size()), gs.data());
    const TestWeight c8 = make_weight(DType::Q8_0, 24, 256, rng);
    be->matmul_swiglu(b.view(), c.view(), x.data(), n, g.data(), u.data());
    EXPECT_TRUE(bitwise_equal(g, gs)) << "matmul_swiglu, n " << n;
    // New contents at the same address after a group: quantized again.
    be->matmul_group(parts, x.data(), n);
    for (float& v : x) v *= -1.5f;
    std::vector<float> y_after(size_t(n * 24));
    be->matmul(c8.view(), x.data(), n, y_after.data());
    std::vector<float> y_fresh(size_t(n * 24));
    auto fresh = make_cpu_backend(2);
    fresh->matmul(c8.view(), x.data(), n, y_fresh.data());
    EXPECT_TRUE(bitwise_equal(y_after, y_fresh)) << "stale quantized activations reused, n " << n;
  }
}

TEST(BackendOps, MatmulRejectsBadWeights) {
  Backends be;
  std::vector<uint8_t> buf(4096);
  std::vector<float> x(256), y(16);
  WeightView w{DType::Q5_K, buf.data(), 4, 256, 176};
  EXPECT_THROW(be.one->matmul(w, x.data(), 1, y.data()), Error);
  WeightView w2{DType::Q8_0, buf.data(), 4, 40, 0};  // 40 is not a multiple of 32
  EXPECT_THROW(be.one->matmul(w2, x.data(), 1, y.data()), Error);
  WeightView w3{DType::Q4_K, buf.data(), 4, 128, 0};
  EXPECT_THROW(be.one->matmul(w3, x.data(), 1, y.data()), Error);
  try {
    be.one->matmul(w, x.data(), 1, y.data());
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
}

// ---- embed --------------------------------------------------------------------------------------------

TEST(BackendOps, Embed) {
  Backends be;
  std::mt19937 rng(6);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_K, DType::Q6_K}) {
    const int64_t rows = 50, cols = 256;
    const TestWeight w = make_weight(t, rows, cols, rng);
    std::vector<int32_t> ids(40);
    for (auto& id : ids) id = int32_t(rng() % rows);
    ids[0] = 0;
    ids[1] = int32_t(rows - 1);
    std::vector<float> o1(ids.size() * size_t(cols)), o2(o1.size());
    be.one->embed(w.view(), ids.data(), int64_t(ids.size()), o1.data());
    be.two->embed(w.view(), ids.data(), int64_t(ids.size()), o2.data());
    EXPECT_TRUE(bitwise_equal(o1, o2));
    for (size_t i = 0; i < ids.size(); ++i)
      for (int64_t c = 0; c < cols; ++c) {
        const double ref = w.ref[size_t(ids[i]) * size_t(cols) + size_t(c)];
        ASSERT_NEAR(o1[i * size_t(cols) + size_t(c)], ref, 4 * kU * (std::fabs(ref) + 1e-3));
      }
    int32_t bad = int32_t(rows);
    EXPECT_THROW(be.one->embed(w.view(), &bad, 1, o1.data()), Error);
  }
}

// ---- rmsnorm, swiglu, add, add_bias -------------------------------------------------------------------

TEST(BackendOps, RmsNorm) {
  Backends be;
  std::mt19937 rng(7);
  for (const auto& [n, dim] : std::vector<std::pair<int64_t, int64_t>>{{1, 256}, {37, 256}, {512, 256}, {3, 37}, {2, 4096}}) {
    const std::vector<float> x = random_vec(size_t(n * dim), rng, -3, 3), w = random_vec(size_t(dim), rng, 0.5, 1.5);
    const float eps = 1e-5f;
    std::vector<float> o1(x.size()), o2 = x;
    be.one->rmsnorm(x.data(), w.data(), n, dim, eps, o1.data());
    be.two->rmsnorm(o2.data(), w.data(), n, dim, eps, o2.data());  // in place
    EXPECT_TRUE(bitwise_equal(o1, o2));
    for (int64_t r = 0; r < n; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * x[size_t(r * dim + i)];
      const double inv = 1.0 / std::sqrt(ss / double(dim) + eps);
      for (int64_t i = 0; i < dim; ++i) {
        const double ref = x[size_t(r * dim + i)] * inv * w[size_t(i)];
        ASSERT_NEAR(o1[size_t(r * dim + i)], ref, 8 * kU * std::fabs(ref) + 1e-12);  // ~5 float roundings
      }
    }
  }
}

TEST(BackendOps, SwiGLU) {
  Backends be;
  std::mt19937 rng(8);
  for (int64_t count : {int64_t(1), int64_t(37), int64_t(768), int64_t(512 * 768 + 5)}) {
    std::vector<float> g = random_vec(size_t(count), rng, -12, 12), u = random_vec(size_t(count), rng, -2, 2);
    if (count > 10) {
      g[0] = -100.0f;
      g[1] = 100.0f;
      g[2] = 0.0f;
      g[3] = -87.0f;
    }
    std::vector<float> o1(g.size()), o2 = g;
    be.one->swiglu(g.data(), u.data(), count, o1.data());
    be.two->swiglu(o2.data(), u.data(), count, o2.data());  // out aliases gate
    EXPECT_TRUE(bitwise_equal(o1, o2));
    for (int64_t i = 0; i < count; ++i) {
      const double gd = g[size_t(i)];
      const double ref = gd / (1.0 + std::exp(-gd)) * u[size_t(i)];
      // exp: ~1e-7 relative; division and multiply: 2 roundings.
      ASSERT_NEAR(o1[size_t(i)], ref, 1e-6 * std::fabs(ref) + 1e-30) << "g " << gd;
    }
  }
}

TEST(BackendOps, AddAndBias) {
  Backends be;
  std::mt19937 rng(9);
  for (int64_t n : {int64_t(1), int64_t(37), int64_t(512)}) {
    const int64_t dim = 96;
    const std::vector<float> x = random_vec(size_t(n * dim), rng), y = random_vec(size_t(n * dim), rng),
                             b = random_vec(size_t(dim), rng);
    std::vector<float> a1 = x, a2 = x, c1 = x, c2 = x;
    be.one->add(a1.data(), y.data(), n * dim);
    be.two->add(a2.data(), y.data(), n * dim);
    be.one->add_bias(c1.data(), b.data(), n, dim);
    be.two->add_bias(c2.data(), b.data(), n, dim);
    for (int64_t i = 0; i < n * dim; ++i) {  // one float addition: exact to compare with float math
      ASSERT_EQ(a1[size_t(i)], x[size_t(i)] + y[size_t(i)]);
      ASSERT_EQ(c1[size_t(i)], x[size_t(i)] + b[size_t(i % dim)]);
    }
    EXPECT_TRUE(bitwise_equal(a1, a2));
    EXPECT_TRUE(bitwise_equal(c1, c2));
  }
}

// ---- rope ---------------------------------------------------------------------------------------------

// RoPE cases (the CPU test and the CUDA-against-CPU test): both pair layouts, partial rotation, scaling and
// Llama-3.1 frequency factors.
struct RopeCase {
  bool neox;
  int64_t n, heads, head_dim;
  int n_rot;
  float base, freq_scale;
  bool ff;
};
constexpr RopeCase kRopeCases[] = {{false, 37, 4, 64, 64, 10000.0f, 1.0f, false}, {true, 37, 4, 64, 64, 1e6f, 1.0f, false},
                                   {false, 5, 2, 128, 128, 500000.0f, 0.25f, true}, {true, 1, 3, 64, 32, 10000.0f, 0.5f, true},
                                   {false, 512, 2, 64, 48, 10000.0f, 1.0f, false}};
RopeParams rope_params(const RopeCase& c, const float* freq_factors) {
  RopeParams p;
  p.n_rot = c.n_rot;
  p.neox = c.neox;
  p.theta_base = c.base;
  p.freq_scale = c.freq_scale;
  p.freq_factors = c.ff ? freq_factors : nullptr;
  return p;
}

TEST(BackendOps, Rope) {
  Backends be;
  std::mt19937 rng(10);
  for (const RopeCase& c : kRopeCases) {
    SCOPED_TRACE(testing::Message() << "neox " << c.neox << " n " << c.n << " n_rot " << c.n_rot);
    const int half = c.n_rot / 2;
    std::vector<float> ff = random_vec(size_t(half), rng, 1.0f, 8.0f);
    std::vector<int32_t> pos(static_cast<size_t>(c.n));
    for (auto& p : pos) p = int32_t(rng() % 4096);
    pos[0] = 0;
    const RopeParams p = rope_params(c, ff.data());
    const std::vector<float> x = random_vec(size_t(c.n * c.heads * c.head_dim), rng);
    std::vector<float> x1 = x, x2 = x;
    be.one->rope(x1.data(), c.n, c.heads, c.head_dim, pos.data(), p);
    be.two->rope(x2.data(), c.n, c.heads, c.head_dim, pos.data(), p);
    EXPECT_TRUE(bitwise_equal(x1, x2));
    for (int64_t r = 0; r < c.n; ++r)
      for (int64_t h = 0; h < c.heads; ++h) {
        const size_t o = size_t((r * c.heads + h) * c.head_dim);
        for (int i = 0; i < half; ++i) {
          const double theta = double(pos[size_t(r)]) * c.freq_scale * std::pow(double(c.base), -2.0 * i / c.n_rot) /
                               (c.ff ? double(ff[size_t(i)]) : 1.0);
          const size_t i0 = c.neox ? o + size_t(i) : o + 2 * size_t(i);
          const size_t i1 = c.neox ? o + size_t(i + half) : o + 2 * size_t(i) + 1;
          const double a = x[i0], b = x[i1];
          const double r0 = a * std::cos(theta) - b * std::sin(theta), r1 = a * std::sin(theta) + b * std::cos(theta);
          const double tol = (std::fabs(theta) * (i + 4) * kU + 8 * kU) * (std::fabs(a) + std::fabs(b));
          ASSERT_NEAR(x1[i0], r0, tol) << "r " << r << " h " << h << " i " << i << " pos " << pos[size_t(r)];
          ASSERT_NEAR(x1[i1], r1, tol) << "r " << r << " h " << h << " i " << i;
        }
        for (int64_t d = c.n_rot; d < c.head_dim; ++d) ASSERT_EQ(x1[o + size_t(d)], x[o + size_t(d)]);  // untouched
      }
  }
  // Parameters change between calls (the table cache must notice).
  std::vector<int32_t> pos = {3};
  std::vector<float> v = {1, 0}, w = {1, 0};
  RopeParams a;
  a.n_rot = 2;
  be.one->rope(v.data(), 1, 1, 2, pos.data(), a);
  a.theta_base = 2.0f;
  a.freq_scale = 0.5f;
  be.one->rope(w.data(), 1, 1, 2, pos.data(), a);
  EXPECT_NEAR(v[0], std::cos(3.0), 1e-6);
  EXPECT_NEAR(w[0], std::cos(1.5), 1e-6);
  RopeParams bad;
  bad.n_rot = 3;
  EXPECT_THROW(be.one->rope(v.data(), 1, 1, 2, pos.data(), bad), Error);
}

// ---- KV store ops -------------------------------------------------------------------------------------
//
// The helpers take the backend under test as a Backend& so that another backend (CUDA) can be checked the
// same way, and against the CPU backend (run the same writes on both and compare kv_read_page / outputs).

constexpr KVType kAllKVTypes[] = {KVType::F32, KVType::F16, KVType::BF16, KVType::Q8_0};

KVLayout make_layout(KVType t, int page_size, int head_dim, int32_t device_pages, int32_t host_pages, bool minmax,
                     bool scores) {
  KVLayout l;
  l.type = t;
  l.page_size = page_size;
  l.head_dim = head_dim;
  l.device_pages = device_pages;
  l.host_pages = host_pages;
  l.page_minmax = minmax;
  l.slot_scores = scores;
  return l;
}

// Test-local references for the stored value of x in each KV type.
double bf16_rne(float x) {  // nearest bf16, ties to even (x finite, no overflow)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t lo = u & 0xFFFF0000u, hi = lo + 0x10000u;
  const double dl = std::fabs(bf16_to_double(uint16_t(lo >> 16)) - double(x));
  const double dh = std::fabs(bf16_to_double(uint16_t(hi >> 16)) - double(x));
  if (dl < dh) return bf16_to_double(uint16_t(lo >> 16));
  if (dh < dl) return bf16_to_double(uint16_t(hi >> 16));
  return ((lo >> 16) & 1) ? bf16_to_double(uint16_t(hi >> 16)) : bf16_to_double(uint16_t(lo >> 16));
}
// llama.cpp quantize_row_q8_0_ref followed by dequantization, for a row of n (multiple of 32) floats.
std::vector<double> q8_0_reference(const float* x, int n) {
  std::vector<double> out;
  for (int b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const double dh = half_to_double(double_to_half(d));
    for (int j = 0; j < 32; ++j) out.push_back(dh * double(std::roundf(x[b * 32 + j] * id)));
  }
  return out;
}
std::vector<double> stored_reference(KVType t, const float* x, int n) {
  if (t == KVType::Q8_0) return q8_0_reference(x, n);
  std::vector<double> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i)
    out[size_t(i)] = t == KVType::F32 ? double(x[i]) : t == KVType::F16 ? half_to_double(double_to_half(x[i])) : bf16_rne(x[i]);
  return out;
}

// One page read back as floats.
struct PageData {
  std::vector<float> k, v;
  std::vector<int32_t> pos;
};
PageData read_page(Backend& be, KVStore& kv, int32_t id) {
  const KVLayout& l = kv.layout();
  PageData p;
  p.k.resize(size_t(l.page_size) * size_t(l.head_dim));
  p.v.resize(p.k.size());
  p.pos.resize(size_t(l.page_size));
  be.kv_read_page(kv, id, p.k.data(), p.v.data(), p.pos.data());
  return p;
}
std::vector<float> read_scores(Backend& be, KVStore& kv, std::vector<int32_t> ids) {
  std::vector<float> s(ids.size() * size_t(kv.layout().page_size), NAN);
  be.kv_read_scores(kv, ids, s.data());
  return s;
}

// Rows for kv_store: one KV head, slot and position per row.
struct KVWrites {
  std::vector<float> k, v;
  std::vector<int32_t> slots, pos;
};
void store_writes(Backend& be, KVStore& kv, const KVWrites& w) {
  if (w.slots.empty()) return;
  const int D = kv.layout().head_dim;
  DeviceArray<float> k(be, w.k.size()), v(be, w.v.size());
  DeviceArray<int32_t> slots(be, w.slots.size()), pos(be, w.pos.size());
  k.upload(w.k.data(), w.k.size());
  v.upload(w.v.data(), w.v.size());
  slots.upload(w.slots.data(), w.slots.size());
  pos.upload(w.pos.data(), w.pos.size());
  ASSERT_EQ(w.k.size(), w.slots.size() * size_t(D));
  be.kv_store(kv, k.get(), v.get(), int64_t(w.slots.size()), 1, slots.get(), pos.get());
}

TEST(BackendOps, KVFreshStoreIsEmpty) {
  auto be = make_cpu_backend(2);
  for (KVType t : kAllKVTypes) {
    const KVLayout l = make_layout(t, 16, 64, 3, 2, true, true);
    auto kv = be->kv_create(l);
    EXPECT_EQ(kv->layout().total_pages(), 5);
    for (int32_t id = 0; id < 5; ++id) {
      const PageData p = read_page(*be, *kv, id);
      for (int32_t ps : p.pos) ASSERT_EQ(ps, -1) << "type " << kv_type_name(t) << " page " << id;
    }
    for (float s : read_scores(*be, *kv, {0, 1, 2, 3, 4})) ASSERT_EQ(s, 0.0f);
  }
  // A big store costs no RSS for its K/V capacity, so creating it is cheap (and its positions read -1).
  auto big = be->kv_create(make_layout(KVType::F16, 32, 128, 20000, 0, false, false));
  const PageData p = read_page(*be, *big, 19999);
  for (int32_t ps : p.pos) ASSERT_EQ(ps, -1);
}

TEST(BackendOps, KVCreateRejects) {
  auto be = make_cpu_backend(1);
  try {
    be->kv_create(make_layout(KVType::Q8_0, 16, 72, 2, 0, false, false));
    ADD_FAILURE() << "q8_0 with head_dim 72 must throw";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("72"), std::string::npos) << e.what();
  }
  EXPECT_THROW(be->kv_create(make_layout(KVType::F16, 0, 64, 2, 0, false, false)), Error);
  EXPECT_THROW(be->kv_create(make_layout(KVType::F16, 16, 64, -1, 0, false, false)), Error);
  EXPECT_THROW(be->kv_create(make_layout(KVType::F16, 1 << 20, 64, 1 << 12, 0, false, false)), Error);  // int32 slots
  auto kv = be->kv_create(make_layout(KVType::F32, 4, 32, 2, 1, false, false));
  const std::vector<int32_t> bad = {3};
  EXPECT_THROW(be->kv_reset(*kv, bad), Error);
  EXPECT_THROW(read_page(*be, *kv, -1), Error);
  EXPECT_THROW(read_scores(*be, *kv, {0}), Error);  // no slot scores kept
  const std::vector<PageCopy> pc = {{0, 3}};
  EXPECT_THROW(be->kv_copy_pages(*kv, pc), Error);
  const std::vector<SlotCopy> sc = {{0, 12}};
  EXPECT_THROW(be->kv_copy_slots(*kv, sc), Error);
  std::vector<float> k(32), v(32);
  const int32_t slot = 12, pos = 0;
  EXPECT_THROW(be->kv_store(*kv, k.data(), v.data(), 1, 1, &slot, &pos), Error);
}

// kv_store converts exactly as the reference (F16/BF16 nearest-even, Q8_0 like llama.cpp), puts rows at
// their slots (two KV heads per row, some slots -1), and only there.
TEST(BackendOps, KVStoreRoundTrip) {
  auto be = make_cpu_backend(2);
  std::mt19937 rng(40);
  for (KVType t : kAllKVTypes)
    for (int D : {64, 40, 128}) {
      if (!kv_type_fits(t, D).empty()) continue;
      SCOPED_TRACE(testing::Message() << "type " << kv_type_name(t) << " head_dim " << D);
      const int P = 8;
      auto kv = be->kv_create(make_layout(t, P, D, 3, 2, true, true));
      const int n_rows = 9, n_kv = 2;
      std::vector<float> k = random_vec(size_t(n_rows * n_kv * D), rng, -3, 3), v = random_vec(k.size(), rng, -3, 3);
      // Halfway cases: F16 ties (1 + 2^-11, 1 + 3*2^-11), BF16 ties (1 + 2^-8, 1 + 3*2^-8), Q8_0 ties
      // (amax 127 -> d 1, x*id = 2.5 / -3.5 / 0.5 round away from zero), zero, subnormal-free small values.
      // Q8_0 ties in the first block of 32, the others in the second.
      const float q8_ties[] = {127.0f, 2.5f, -3.5f, 0.5f};
      const float ties[] = {1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 1.0f + 1.0f / 256, -(1.0f + 3.0f / 256),
                            0.0f, -0.0f, 1e-3f, 60000.0f};
      for (size_t i = 0; i < std::size(q8_ties); ++i) k[i] = q8_ties[i];
      for (size_t i = 0; i < std::size(ties); ++i) k[32 + i] = v[size_t(D) + 32 + i] = ties[i];
      std::vector<int32_t> slots(size_t(n_rows * n_kv)), pos(static_cast<size_t>(n_rows));
      std::vector<int32_t> all_slots(size_t(5 * P));
      std::iota(all_slots.begin(), all_slots.end(), 0);
      std::shuffle(all_slots.begin(), all_slots.end(), rng);
      for (size_t i = 0; i < slots.size(); ++i) slots[i] = i % 5 == 3 ? -1 : all_slots[i];
      for (int r = 0; r < n_rows; ++r) pos[size_t(r)] = 100 + 7 * r;
      be->kv_store(*kv, k.data(), v.data(), n_rows, n_kv, slots.data(), pos.data());
      std::vector<int> written(size_t(5 * P), -1);  // global slot -> row*n_kv + head
      for (size_t i = 0; i < slots.size(); ++i)
        if (slots[i] >= 0) written[size_t(slots[i])] = int(i);
      for (int32_t id = 0; id < 5; ++id) {
        const PageData p = read_page(*be, *kv, id);
        for (int s = 0; s < P; ++s) {
          const int w = written[size_t(id * P + s)];
          if (w < 0) {
            ASSERT_EQ(p.pos[size_t(s)], -1) << "page " << id << " slot " << s;
            continue;
          }
          ASSERT_EQ(p.pos[size_t(s)], pos[size_t(w / n_kv)]);
          const std::vector<double> kr = stored_reference(t, k.data() + size_t(w) * size_t(D), D);
          const std::vector<double> vr = stored_reference(t, v.data() + size_t(w) * size_t(D), D);
          for (int e = 0; e < D; ++e) {
            ASSERT_EQ(double(p.k[size_t(s * D + e)]), kr[size_t(e)]) << "K page " << id << " slot " << s << " dim " << e;
            ASSERT_EQ(double(p.v[size_t(s * D + e)]), vr[size_t(e)]) << "V page " << id << " slot " << s << " dim " << e;
          }
        }
      }
      if (t == KVType::Q8_0) {  // the ties themselves, spelled out
        const PageData p = read_page(*be, *kv, slots[0] / P);
        const float* k0 = p.k.data() + size_t(slots[0] % P) * size_t(D);
        EXPECT_EQ(k0[1], 3.0f);
        EXPECT_EQ(k0[2], -4.0f);
        EXPECT_EQ(k0[3], 1.0f);
      }
      if (t == KVType::F16) {
        const PageData p = read_page(*be, *kv, slots[0] / P);
        const float* k0 = p.k.data() + size_t(slots[0] % P) * size_t(D);
        EXPECT_EQ(k0[32], 1.0f);                // 1 + 2^-11 -> even 1
        EXPECT_EQ(k0[33], 1.0f + 2.0f / 1024);  // 1 + 3*2^-11 -> even 1 + 2^-9
      }
    }
}

// Page and slot copies move K, V, positions and scores; copies run in order; reset empties.
TEST(BackendOps, KVCopyPagesSlotsAndReset) {
  auto be = make_cpu_backend(2);
  std::mt19937 rng(41);
  for (KVType t : kAllKVTypes) {
    SCOPED_TRACE(testing::Message() << "type " << kv_type_name(t));
    const int P = 8, D = 64;
    auto kv = be->kv_create(make_layout(t, P, D, 3, 3, true, true));
    KVWrites w;
    for (int s = 0; s < 2 * P; ++s) {  // pages 0 and 1 full, positions 0..15
      if (s == 5) continue;            // a hole in page 0
      w.slots.push_back(s);
      w.pos.push_back(s);
    }
    w.k = random_vec(w.slots.size() * D, rng);
    w.v = random_vec(w.slots.size() * D, rng);
    store_writes(*be, *kv, w);
    // Nonzero scores: one decode row attending pages 0 and 1 with score accumulation.
    std::vector<float> q = random_vec(D, rng), out(D);
    std::vector<int32_t> qpos = {100}, ids = {0, 1};
    AttnJob job;
    job.n_rows = 1;
    job.n_pages = 2;
    job.score = 1;
    AttnBatch b;
    b.q = q.data();
    b.q_stride = D;
    b.q_pos = qpos.data();
    b.out = out.data();
    b.out_stride = D;
    b.head_dim = D;
    b.scale = 0.125f;
    b.jobs = &job;
    b.n_jobs = 1;
    b.page_ids = ids.data();
    be->attention(*kv, b);
    const std::vector<float> sc01 = read_scores(*be, *kv, {0, 1});
    for (int s = 0; s < 2 * P; ++s) ASSERT_EQ(sc01[size_t(s)] > 0, s != 5) << s;
    const PageData p0 = read_page(*be, *kv, 0), p1 = read_page(*be, *kv, 1);

    // Page copies, in order: 0 -> 4 (host tier), then 4 -> 2, then 1 -> 0 (0's old content survives in 2).
    const std::vector<PageCopy> pc = {{0, 4}, {4, 2}, {1, 0}, {3, 3}};
    be->kv_copy_pages(*kv, pc);
    for (int32_t id : {4, 2}) {
      const PageData p = read_page(*be, *kv, id);
      EXPECT_TRUE(bitwise_equal(p.k, p0.k));  // bitwise: the hole (slot 5) holds whatever was there
      EXPECT_TRUE(bitwise_equal(p.v, p0.v));
      EXPECT_EQ(p.pos, p0.pos);
      const std::vector<float> s = read_scores(*be, *kv, {id});
      EXPECT_TRUE(std::equal(s.begin(), s.end(), sc01.begin())) << "page " << id;
    }
    {
      const PageData p = read_page(*be, *kv, 0);
      EXPECT_TRUE(bitwise_equal(p.k, p1.k));
      EXPECT_EQ(p.pos, p1.pos);
      const std::vector<float> s = read_scores(*be, *kv, {0});
      EXPECT_TRUE(std::equal(s.begin(), s.end(), sc01.begin() + P));
    }
    // Slot copies, in order: compaction within page 2 (slot 6 -> 5, then 7 -> 6) and across pages
    // (page 1 slot 3 -> page 5 slot 0, then page 5 slot 0 -> page 5 slot 1).
    const std::vector<SlotCopy> cp = {{2 * P + 6, 2 * P + 5}, {2 * P + 7, 2 * P + 6}, {1 * P + 3, 5 * P}, {5 * P, 5 * P + 1}};
    be->kv_copy_slots(*kv, cp);
    const PageData p2 = read_page(*be, *kv, 2), p5 = read_page(*be, *kv, 5);
    const std::vector<float> s2 = read_scores(*be, *kv, {2}), s5 = read_scores(*be, *kv, {5});
    auto row_eq = [&](const std::vector<float>& a, int sa, const std::vector<float>& b_, int sb) {
      return std::equal(a.begin() + sa * D, a.begin() + (sa + 1) * D, b_.begin() + sb * D);
    };
    EXPECT_TRUE(row_eq(p2.k, 5, p0.k, 6) && row_eq(p2.v, 5, p0.v, 6));
    EXPECT_TRUE(row_eq(p2.k, 6, p0.k, 7) && row_eq(p2.v, 6, p0.v, 7));
    EXPECT_TRUE(row_eq(p2.k, 7, p0.k, 7));  // the source stays
    EXPECT_EQ(p2.pos[5], 6);
    EXPECT_EQ(p2.pos[6], 7);
    EXPECT_EQ(p2.pos[7], 7);
    EXPECT_EQ(s2[5], sc01[6]);
    EXPECT_EQ(s2[6], sc01[7]);
    for (int s : {0, 1}) {
      EXPECT_TRUE(row_eq(p5.k, s, p1.k, 3) && row_eq(p5.v, s, p1.v, 3)) << s;
      EXPECT_EQ(p5.pos[size_t(s)], 11);
      EXPECT_EQ(s5[size_t(s)], sc01[size_t(P + 3)]);
    }
    for (int s = 2; s < P; ++s) EXPECT_EQ(p5.pos[size_t(s)], -1);

    const std::vector<int32_t> rs = {2, 5};
    be->kv_reset(*kv, rs);
    for (int32_t id : rs) {
      const PageData p = read_page(*be, *kv, id);
      for (int32_t ps : p.pos) EXPECT_EQ(ps, -1);
      for (float s : read_scores(*be, *kv, {id})) EXPECT_EQ(s, 0.0f);
    }
    EXPECT_EQ(read_page(*be, *kv, 4).pos, p0.pos);  // untouched
  }
}

// ---- attention ----------------------------------------------------------------------------------------

bool allowed(int32_t ps, int32_t qp, int32_t sinks, int32_t window) {
  if (ps < 0 || ps > qp) return false;
  return window == 0 || ps < sinks || int64_t(ps) > int64_t(qp) - window;
}

struct TestJob {
  int32_t row0, n_rows, kv_head;
  std::vector<int32_t> pages;  // ids
  int32_t sinks = 0, window = 0;
  bool score = false;
};

// A batch: step rows (q, positions), query heads n_kv * group, the store's contents (writes) and the jobs.
struct AttnCase {
  KVLayout layout;
  int n_rows = 0, n_kv = 0, group = 1;
  float scale = 0.125f;
  std::vector<int32_t> q_pos;
  std::vector<float> q;
  KVWrites writes;
  std::vector<TestJob> jobs;
  bool host_shape = false;  // fill AttnBatch's host-known shape (max_rows, n_decode_jobs, max_pages)
};

// Writes positions (shuffled, a share of them dropped as holes) into the slots of `ids` in order, random K/V;
// some holes get garbage rows with position -1 (NaN for float types) that must never reach a result.
void fill_pages(AttnCase& c, const std::vector<int32_t>& ids, std::vector<int32_t> positions, double hole_rate,
                std::mt19937& rng, bool shuffle = true) {
  const int P = c.layout.page_size, D = c.layout.head_dim;
  if (shuffle) std::shuffle(positions.begin(), positions.end(), rng);
  std::uniform_real_distribution<double> u01(0, 1);
  const float garbage = c.layout.type == KVType::Q8_0 ? 1e4f : NAN;
  size_t next = 0;
  for (int32_t id : ids)
    for (int s = 0; s < P; ++s) {
      const bool real = next < positions.size() && u01(rng) >= hole_rate;
      if (!real && u01(rng) < 0.5) continue;  // never written
      c.writes.slots.push_back(id * P + s);
      c.writes.pos.push_back(real ? positions[next++] : -1);
      const std::vector<float> k = random_vec(size_t(D), rng, -1, 1), v = random_vec(size_t(D), rng, -2, 2);
      for (int e = 0; e < D; ++e) {
        c.writes.k.push_back(real ? k[size_t(e)] : garbage);
        c.writes.v.push_back(real ? v[size_t(e)] : garbage);
      }
    }
}

struct AttnResult {
  std::vector<float> out;
  std::vector<std::vector<float>> scores;  // per job: its pages' scores after the run
};

// Runs the case on a backend (a fresh store; attention runs `runs` times, so scores accumulate). hints: the
// batch carries its host-known shape (max_rows, n_decode_jobs, max_pages), as the model's batches do;
// otherwise they are left unknown. Results must not depend on it.
// (A case with host_shape always carries them.)
AttnResult run_attention(Backend& be, const AttnCase& c, int runs = 1, bool hints = false) {
  auto kv = be.kv_create(c.layout);
  store_writes(be, *kv, c.writes);
  const int D = c.layout.head_dim, H = c.n_kv * c.group;
  std::vector<AttnJob> jobs;
  std::vector<int32_t> ids;
  for (const TestJob& tj : c.jobs) {
    AttnJob j;
    j.row0 = tj.row0;
    j.n_rows = tj.n_rows;
    j.kv_head = tj.kv_head;
    j.page0 = int32_t(ids.size());
    j.n_pages = int32_t(tj.pages.size());
    j.sinks = tj.sinks;
    j.window = tj.window;
    j.score = tj.score;
    ids.insert(ids.end(), tj.pages.begin(), tj.pages.end());
    jobs.push_back(j);
  }
  DeviceArray<float> q(be, c.q.size() + 1), out(be, size_t(c.n_rows) * H * D + 1);
  DeviceArray<int32_t> qpos(be, c.q_pos.size() + 1), dids(be, ids.size() + 1);
  DeviceArray<AttnJob> djobs(be, jobs.size() + 1);
  q.upload(c.q.data(), c.q.size());
  qpos.upload(c.q_pos.data(), c.q_pos.size());
  dids.upload(ids.data(), ids.size());
  djobs.upload(jobs.data(), jobs.size());
  AttnResult res;
  res.out.assign(size_t(c.n_rows) * H * D, NAN);
  out.upload(res.out.data(), res.out.size());
  AttnBatch b;
  b.q = q.get();
  b.q_stride = int64_t(H) * D;
  b.q_pos = qpos.get();
  b.out = out.get();
  b.out_stride = int64_t(H) * D;
  b.n_group = c.group;
  b.head_dim = D;
  b.scale = c.scale;
  b.jobs = djobs.get();
  b.n_jobs = int32_t(jobs.size());
  b.page_ids = dids.get();
  if (c.host_shape || hints) {
    b.n_decode_jobs = 0;
    for (const AttnJob& j : jobs) {
      b.max_rows = std::max(b.max_rows, j.n_rows);
      b.max_pages = std::max(b.max_pages, j.n_pages);
      b.n_decode_jobs += j.n_rows < 4 ? 1 : 0;
    }
  }
  for (int i = 0; i < runs; ++i) be.attention(*kv, b);
  be.download(res.out.data(), out.get(), res.out.size() * 4);
  for (const TestJob& tj : c.jobs)
    res.scores.push_back(c.layout.slot_scores ? read_scores(be, *kv, tj.pages) : std::vector<float>{});
  return res;
}

// Float64 reference from the stored K/V (read back from the backend's store) against the backend's result.
void check_against_reference(Backend& be, const AttnCase& c, const AttnResult& res, int runs) {
  auto kv = be.kv_create(c.layout);
  store_writes(be, *kv, c.writes);
  const int D = c.layout.head_dim, H = c.n_kv * c.group, P = c.layout.page_size;
  std::vector<bool> row_done(size_t(c.n_rows) * H, false);
  for (size_t ji = 0; ji < c.jobs.size(); ++ji) {
    const TestJob& job = c.jobs[ji];
    std::vector<PageData> pages;
    double vmax = 0;
    for (int32_t id : job.pages) {
      pages.push_back(read_page(be, *kv, id));
      for (int s = 0; s < P; ++s)
        if (pages.back().pos[size_t(s)] >= 0)
          for (int e = 0; e < D; ++e) vmax = std::max(vmax, double(std::fabs(pages.back().v[size_t(s * D + e)])));
    }
    std::vector<double> score_ref(job.pages.size() * size_t(P), 0.0);
    for (int r = job.row0; r < job.row0 + job.n_rows; ++r)
      for (int h = job.kv_head * c.group; h < (job.kv_head + 1) * c.group; ++h) {
        row_done[size_t(r * H + h)] = true;
        const float* qv = c.q.data() + size_t((r * H + h) * D);
        std::vector<std::pair<double, const float*>> sv;
        std::vector<size_t> slot_index;
        for (size_t pi = 0; pi < pages.size(); ++pi)
          for (int s = 0; s < P; ++s)
            if (allowed(pages[pi].pos[size_t(s)], c.q_pos[size_t(r)], job.sinks, job.window)) {
              double d = 0;
              for (int e = 0; e < D; ++e) d += double(qv[e]) * pages[pi].k[size_t(s * D + e)];
              sv.push_back({d * c.scale, pages[pi].v.data() + size_t(s * D)});
              slot_index.push_back(pi * size_t(P) + size_t(s));
            }
        const float* out = res.out.data() + size_t((r * H + h) * D);
        if (sv.empty()) {
          for (int e = 0; e < D; ++e) ASSERT_EQ(out[e], 0.0f) << "row without allowed slot must be zero";
          continue;
        }
        double mx = -INFINITY, sum = 0;
        for (auto& s : sv) mx = std::max(mx, s.first);
        for (auto& s : sv) sum += std::exp(s.first - mx);
        for (int e = 0; e < D; ++e) {
          double ref = 0;
          for (auto& s : sv) ref += std::exp(s.first - mx) / sum * s.second[e];
          ASSERT_NEAR(out[e], ref, 1e-5 * vmax) << "job " << ji << " row " << r << " head " << h << " dim " << e;
        }
        for (size_t t = 0; t < sv.size(); ++t) score_ref[slot_index[t]] += runs * std::exp(sv[t].first - mx) / sum;
      }
    if (c.layout.slot_scores) {
      ASSERT_EQ(res.scores[ji].size(), score_ref.size());
      for (size_t s = 0; s < score_ref.size(); ++s) {
        const double expect = job.score ? score_ref[s] : 0.0;  // kv_store starts every slot at 0
        ASSERT_NEAR(res.scores[ji][s], expect, 1e-5 * (1 + std::fabs(expect))) << "job " << ji << " slot " << s;
      }
    }
  }
  for (size_t i = 0; i < row_done.size(); ++i) {  // outputs nobody wrote stay untouched
    if (row_done[i]) continue;
    for (int e = 0; e < D; ++e) ASSERT_TRUE(std::isnan(res.out[i * size_t(D) + size_t(e)])) << "row*head " << i;
  }
}

// The case once per KV type the head_dim allows (all of them if types is empty), each with its store type set;
// for Q8_0 the NaN garbage in empty slots becomes 1e4, which it can hold.
std::vector<AttnCase> per_kv_type(const AttnCase& c, std::vector<KVType> types) {
  if (types.empty()) types.assign(std::begin(kAllKVTypes), std::end(kAllKVTypes));
  std::vector<AttnCase> out;
  for (KVType t : types) {
    if (!kv_type_fits(t, c.layout.head_dim).empty()) continue;
    AttnCase ct = c;
    ct.layout.type = t;
    if (t == KVType::Q8_0)
      for (size_t i = 0; i < ct.writes.k.size(); ++i)
        if (std::isnan(ct.writes.k[i])) ct.writes.k[i] = ct.writes.v[i] = 1e4f;
    out.push_back(std::move(ct));
  }
  return out;
}

// Every KV type the head_dim allows: the backend with 1, 2, 3 threads bitwise equal, and against the
// float64 reference.
void check_attention(AttnCase c, std::mt19937& rng, std::vector<KVType> types = {}) {
  c.q = random_vec(size_t(c.n_rows) * c.n_kv * c.group * c.layout.head_dim, rng, -2, 2);
  for (const AttnCase& ct : per_kv_type(c, types)) {
    const KVType t = ct.layout.type;
    SCOPED_TRACE(testing::Message() << "kv type " << kv_type_name(t));
    const int runs = 2;
    auto one = make_cpu_backend(1), two = make_cpu_backend(2), three = make_cpu_backend(3);
    const AttnResult r1 = run_attention(*one, ct, runs);
    const AttnResult r2 = run_attention(*two, ct, runs);
    const AttnResult r3 = run_attention(*three, ct, runs);
    ASSERT_TRUE(bitwise_equal(r1.out, r2.out) && bitwise_equal(r1.out, r3.out)) << "thread counts differ (out)";
    for (size_t ji = 0; ji < ct.jobs.size(); ++ji)
      ASSERT_TRUE(bitwise_equal(r1.scores[ji], r2.scores[ji]) && bitwise_equal(r1.scores[ji], r3.scores[ji]))
          << "thread counts differ (scores)";
    check_against_reference(*two, ct, r2, runs);
  }
}

std::vector<int32_t> iota_vec(int n, int start = 0) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

// ---- Attention cases, shared by the CPU tests and the CUDA-against-CPU tests ------------------------------

// 2 KV heads x group 2; positions 0..179 scattered over uneven page lists (device and host ids), ~20% holes;
// q at 150, so some slots hold "future" positions that causality must skip.
AttnCase case_decode_holes_host_pages(std::mt19937& rng) {
  AttnCase c;
  c.layout = make_layout(KVType::F32, 32, 64, 6, 6, false, true);
  c.n_rows = 1, c.n_kv = 2, c.group = 2;
  c.q_pos = {150};
  const std::vector<int32_t> p0 = {3, 7, 0, 10, 1, 6, 11}, p1 = {2, 9, 4, 8};
  fill_pages(c, p0, iota_vec(180), 0.2, rng);
  fill_pages(c, p1, iota_vec(120), 0.05, rng);
  c.jobs = {{0, 1, 0, p0, 0, 0, true}, {0, 1, 1, p1, 0, 0, false}};
  return c;
}

// 17 pages of 256 per KV head (split-K path), group 4, scores, and sinks/window on the second head.
AttnCase case_long_decode_pages_of_256(std::mt19937& rng) {
  AttnCase c;
  c.layout = make_layout(KVType::F32, 256, 128, 20, 20, false, true);
  c.n_rows = 1, c.n_kv = 2, c.group = 4;
  c.scale = 1.0f / std::sqrt(128.0f);
  c.q_pos = {4300};
  std::vector<int32_t> p0, p1;
  for (int i = 0; i < 17; ++i) {
    p0.push_back(i < 9 ? i : 11 + i);  // device ids, then host ids 20..27
    p1.push_back(i < 10 ? 19 - i : 49 - i);
  }
  fill_pages(c, p0, iota_vec(4300), 0.05, rng);
  fill_pages(c, p1, iota_vec(4300), 0.05, rng);
  c.jobs = {{0, 1, 0, p0, 0, 0, true}, {0, 1, 1, p1, 4, 1000, true}};
  return c;
}

// Rows at positions 70..106; the cache holds positions 0..106 (the new rows included) in pages of 32 with a
// few holes. Group 2; window 16 adds sinks 4.
AttnCase case_causal_prefill(std::mt19937& rng, int32_t window) {
  const int n_rows = 37, past = 70;
  AttnCase c;
  c.layout = make_layout(KVType::F32, 32, 64, 8, 2, false, true);
  c.n_rows = n_rows, c.n_kv = 2, c.group = 2;
  c.q_pos = iota_vec(n_rows, past);
  const std::vector<int32_t> p0 = {0, 1, 2, 8}, p1 = {5, 9, 3, 4};
  fill_pages(c, p0, iota_vec(past + n_rows), 0.1, rng);
  fill_pages(c, p1, iota_vec(past + n_rows), 0.1, rng);
  c.jobs = {{0, n_rows, 0, p0, window ? 4 : 0, window, false}, {0, n_rows, 1, p1, window ? 4 : 0, window, true}};
  return c;
}

// head_dim 72 (not a multiple of 16, so no Q8_0); group 1; row 1's position (-5) is before every slot (zeros),
// row 2 sees only slots < 3; pages of 20 (chunks span pages).
AttnCase case_head_dim_72(std::mt19937& rng) {
  AttnCase c;
  c.layout = make_layout(KVType::F32, 20, 72, 70, 0, false, true);
  c.n_rows = 3, c.n_kv = 2, c.group = 1;
  c.q_pos = {600, -5, 2};
  std::vector<int32_t> p0, p1;
  for (int i = 0; i < 35; ++i) {
    p0.push_back(i);
    p1.push_back(69 - i);
  }
  fill_pages(c, p0, iota_vec(650), 0.1, rng);
  fill_pages(c, p1, iota_vec(700), 0.3, rng);
  c.jobs = {{0, 3, 0, p0, 2, 50, true}, {0, 3, 1, p1, 0, 0, true}};
  return c;
}

// head_dim 96 (a multiple of 32 other than 64/128), prefill rows, group 3.
AttnCase case_head_dim_96(std::mt19937& rng) {
  const int rows = 11;
  AttnCase c;
  c.layout = make_layout(KVType::F32, 16, 96, 4, 0, false, true);
  c.n_rows = rows, c.n_kv = 1, c.group = 3;
  c.scale = 0.1f;
  c.q_pos = iota_vec(rows, 40);
  fill_pages(c, {2, 0, 3, 1}, iota_vec(40 + rows), 0.1, rng);
  c.jobs = {{0, rows, 0, {2, 0, 3, 1}, 0, 0, true}};
  return c;
}

// A job without pages, and a job over only empty slots (garbage rows with position -1).
AttnCase case_no_pages_and_all_holes(std::mt19937& rng) {
  AttnCase c;
  c.layout = make_layout(KVType::F32, 16, 64, 2, 1, false, true);
  c.n_rows = 2, c.n_kv = 2, c.group = 1;
  c.q_pos = {5, 9};
  fill_pages(c, {2}, {}, 1.0, rng);
  c.jobs = {{0, 2, 0, {}, 0, 0, false}, {0, 2, 1, {2, 0}, 0, 0, true}};
  return c;
}

// 64 prefill rows after 1200 tokens, GQA 4, pages of 128 over both tiers (the second list backwards).
AttnCase case_prefill_long_context_gqa4(std::mt19937& rng, int head_dim) {
  const int n_rows = 64, past = 1200;
  AttnCase c;
  c.layout = make_layout(KVType::F32, 128, head_dim, 12, 12, false, true);
  c.n_rows = n_rows, c.n_kv = 2, c.group = 4;
  c.q_pos = iota_vec(n_rows, past);
  std::vector<int32_t> p0, p1;
  for (int i = 0; i < 11; ++i) p0.push_back(i), p1.push_back(23 - i);
  fill_pages(c, p0, iota_vec(past + n_rows), 0.02, rng);
  fill_pages(c, p1, iota_vec(past + n_rows), 0.02, rng);
  c.jobs = {{0, n_rows, 0, p0, 0, 0, true}, {0, n_rows, 1, p1, 0, 0, false}};
  return c;
}

// Several sequences in one batch (jobs over different row ranges): a decode row and a prefill block, tiny
// pages (chunks span pages and pages end mid-chunk), scores on some jobs only, shared pages read by two jobs
// without scores.
AttnCase case_mixed_batch_tiny_pages(std::mt19937& rng, int head_dim) {
  AttnCase c;
  c.layout = make_layout(KVType::F32, 5, head_dim, 400, 300, false, true);
  c.n_rows = 1 + 9 + 3, c.n_kv = 2, c.group = 2;
  c.q_pos = {1100};
  for (int r = 0; r < 9; ++r) c.q_pos.push_back(300 + r);
  for (int r = 0; r < 3; ++r) c.q_pos.push_back(20 + 2 * r);
  std::vector<int32_t> ids(700);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  auto take = [&](size_t n) {
    std::vector<int32_t> v(ids.end() - ptrdiff_t(n), ids.end());
    ids.resize(ids.size() - n);
    return v;
  };
  const std::vector<int32_t> a0 = take(240), a1 = take(240), b0 = take(65), b1 = take(62), shared = take(6);
  fill_pages(c, a0, iota_vec(1101), 0.1, rng);
  fill_pages(c, a1, iota_vec(1101), 0.1, rng);
  fill_pages(c, b0, iota_vec(309), 0.05, rng);
  fill_pages(c, b1, iota_vec(309), 0.05, rng);
  fill_pages(c, shared, iota_vec(30), 0.0, rng);
  c.jobs = {{0, 1, 0, a0, 3, 0, true},   {0, 1, 1, a1, 3, 300, false}, {1, 9, 0, b0, 0, 0, true},
            {1, 9, 1, b1, 2, 64, false}, {10, 3, 0, shared, 0, 0, false}, {10, 3, 1, shared, 0, 4, false}};
  return c;
}

TEST(BackendOps, AttentionDecodeWithHolesAndHostPages) {
  std::mt19937 rng(11);
  check_attention(case_decode_holes_host_pages(rng), rng);
}

TEST(BackendOps, AttentionLongDecodeSplitWithScores) {
  std::mt19937 rng(12);
  check_attention(case_long_decode_pages_of_256(rng), rng);
}

TEST(BackendOps, AttentionCausalPrefill) {
  std::mt19937 rng(13);
  for (int32_t window : {0, 16}) check_attention(case_causal_prefill(rng, window), rng);
}

TEST(BackendOps, AttentionOddHeadDimsAndEmptyRows) {
  std::mt19937 rng(14);
  check_attention(case_head_dim_72(rng), rng);
  check_attention(case_head_dim_96(rng), rng);
}

TEST(BackendOps, AttentionNoPagesAndAllHoles) {
  std::mt19937 rng(15);
  check_attention(case_no_pages_and_all_holes(rng), rng);
}

TEST(BackendOps, AttentionPrefillLongContextGqa4) {
  std::mt19937 rng(16);
  check_attention(case_prefill_long_context_gqa4(rng, 64), rng, {KVType::F32, KVType::F16, KVType::Q8_0});
}

TEST(BackendOps, AttentionMixedBatchTinyPages) {
  std::mt19937 rng(18);
  check_attention(case_mixed_batch_tiny_pages(rng, 64), rng);
}

TEST(BackendOps, AttentionRejectsBadJobs) {
  auto be = make_cpu_backend(1);
  auto kv = be->kv_create(make_layout(KVType::F16, 16, 64, 2, 0, false, false));
  std::vector<float> q(64), out(64);
  std::vector<int32_t> qpos = {3}, ids = {2};
  AttnJob job;
  job.n_rows = 1;
  job.n_pages = 1;
  AttnBatch b;
  b.q = q.data();
  b.q_stride = 64;
  b.q_pos = qpos.data();
  b.out = out.data();
  b.out_stride = 64;
  b.head_dim = 64;
  b.jobs = &job;
  b.n_jobs = 1;
  b.page_ids = ids.data();
  EXPECT_THROW(be->attention(*kv, b), Error);  // page id 2 of 2 pages
  ids[0] = 1;
  job.score = 1;
  EXPECT_THROW(be->attention(*kv, b), Error);  // scores without slot scores
  job.score = 0;
  b.head_dim = 32;
  EXPECT_THROW(be->attention(*kv, b), Error);  // head_dim of another store
  b.head_dim = 64;
  be->attention(*kv, b);  // an empty page: zeros
  for (float o : out) EXPECT_EQ(o, 0.0f);
}

// ---- select_pages -------------------------------------------------------------------------------------

// Float64 Quest scores of pages (from their stored keys) for the group's heads of one query row.
double quest_reference(const PageData& p, const float* q, int G, int D) {
  std::vector<double> mn(size_t(D), INFINITY), mx(size_t(D), -INFINITY);
  bool any = false;
  for (size_t s = 0; s < p.pos.size(); ++s)
    if (p.pos[s] >= 0) {
      any = true;
      for (int d = 0; d < D; ++d) {
        mn[size_t(d)] = std::min(mn[size_t(d)], double(p.k[s * size_t(D) + size_t(d)]));
        mx[size_t(d)] = std::max(mx[size_t(d)], double(p.k[s * size_t(D) + size_t(d)]));
      }
    }
  if (!any) return -INFINITY;
  double t = 0;
  for (int h = 0; h < G; ++h)
    for (int d = 0; d < D; ++d)
      t += std::max(q[h * D + d] * mn[size_t(d)], q[h * D + d] * mx[size_t(d)]);
  return t;
}

// Expected page list of a job after select_pages (the reference: sort candidates by score, ties earlier).
std::vector<int32_t> expected_selection(const std::vector<int32_t>& pages, int cand0, int n_cand, int k,
                                        const std::vector<double>& score, double* gap) {
  std::vector<int> order(static_cast<size_t>(n_cand));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[size_t(a)] > score[size_t(b)]; });
  *gap = INFINITY;
  if (k < n_cand) *gap = score[size_t(order[size_t(k - 1)])] - score[size_t(order[size_t(k)])];
  if (k >= n_cand) return pages;
  std::vector<int> keep(order.begin(), order.begin() + k);
  std::sort(keep.begin(), keep.end());
  std::vector<int32_t> out(pages.begin(), pages.begin() + cand0);
  for (int i : keep) out.push_back(pages[size_t(cand0 + i)]);
  out.insert(out.end(), pages.begin() + cand0 + n_cand, pages.end());
  return out;
}

TEST(BackendOps, SelectPagesQuest) {
  std::mt19937 rng(19);
  const int P = 4, D = 64, G = 2, n_kv = 2;
  for (KVType t : kAllKVTypes) {
    SCOPED_TRACE(testing::Message() << "kv type " << kv_type_name(t));
    const KVLayout l = make_layout(t, P, D, 300, 400, true, false);
    // Jobs: (rows, pages, cand0, n_cand, k). Job 0: 3 rows (the last one selects), 10 pages, candidates
    // 1..8, keep 3; page 4 scaled x3 (the best) and page 7 a copy of it (a tie: the earlier one wins when
    // k = 1, job 1 over the same pages); job 2: k >= n_cand (unchanged); job 3: 320 candidates (the
    // parallel path), keep 40; job 4: an empty candidate page (never better than a real one).
    std::vector<std::vector<int32_t>> pages(5);
    std::vector<int32_t> ids(700);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    size_t next = 0;
    auto fresh = [&](size_t n) {
      std::vector<int32_t> v(ids.begin() + ptrdiff_t(next), ids.begin() + ptrdiff_t(next + n));
      next += n;
      return v;
    };
    pages[0] = fresh(10);
    pages[1] = pages[0];
    pages[2] = fresh(5);
    pages[3] = fresh(330);
    pages[4] = fresh(6);
    struct Sel {
      int row0, n_rows, kv_head, cand0, n_cand, k;
    };
    const Sel sel[5] = {{0, 3, 0, 1, 8, 3}, {0, 3, 1, 1, 8, 1}, {3, 1, 0, 0, 5, 5}, {4, 1, 1, 5, 320, 40}, {5, 1, 0, 0, 6, 2}};
    const int n_rows = 6;
    std::vector<std::vector<int32_t>> results[3];
    for (int th = 1; th <= 3; ++th) {
      auto be = make_cpu_backend(th);
      auto kv = be->kv_create(l);
      std::mt19937 data_rng(77);  // the same store for every thread count
      KVWrites w;
      std::vector<int32_t> to_fill;
      for (int j : {0, 2, 3, 4})
        for (int32_t id : pages[size_t(j)]) to_fill.push_back(id);
      for (int32_t id : to_fill) {
        if (id == pages[4][2] || id == pages[0][6]) continue;  // empty page / filled by copy below
        const int n = 1 + int(data_rng() % P);
        const float scale = id == pages[0][3] ? 3.0f : 1.0f;
        for (int s = 0; s < n; ++s) {
          w.slots.push_back(id * P + s);
          w.pos.push_back(s);
          for (int d = 0; d < D; ++d) {
            w.k.push_back(scale * std::uniform_real_distribution<float>(-1, 1)(data_rng));
            w.v.push_back(0.0f);
          }
        }
      }
      store_writes(*be, *kv, w);
      const std::vector<PageCopy> cp = {{pages[0][3], pages[0][6]}};
      be->kv_copy_pages(*kv, cp);
      const std::vector<float> q = random_vec(size_t(n_rows) * n_kv * G * D, data_rng, -1, 1);
      std::vector<AttnJob> jobs;
      std::vector<int32_t> flat;
      for (int j = 0; j < 5; ++j) {
        AttnJob a;
        a.row0 = sel[j].row0;
        a.n_rows = sel[j].n_rows;
        a.kv_head = sel[j].kv_head;
        a.page0 = int32_t(flat.size());
        a.n_pages = int32_t(pages[size_t(j)].size());
        a.cand0 = sel[j].cand0;
        a.n_cand = sel[j].n_cand;
        a.select_k = sel[j].k;
        flat.insert(flat.end(), pages[size_t(j)].begin(), pages[size_t(j)].end());
        jobs.push_back(a);
      }
      std::vector<int32_t> qpos(static_cast<size_t>(n_rows), 1000);
      std::vector<float> out(q.size());
      AttnBatch b;
      b.q = q.data();
      b.q_stride = int64_t(n_kv) * G * D;
      b.q_pos = qpos.data();
      b.out = out.data();
      b.out_stride = b.q_stride;
      b.n_group = G;
      b.head_dim = D;
      b.jobs = jobs.data();
      b.n_jobs = 5;
      b.page_ids = flat.data();
      be->select_pages(*kv, b);
      for (int j = 0; j < 5; ++j) {
        const AttnJob& a = jobs[size_t(j)];
        results[th - 1].emplace_back(flat.begin() + a.page0, flat.begin() + a.page0 + a.n_pages);
      }
      if (th > 1) continue;
      // The reference, from the stored keys.
      for (int j = 0; j < 5; ++j) {
        SCOPED_TRACE(testing::Message() << "job " << j);
        const Sel& s = sel[j];
        const float* qr = q.data() + size_t(s.row0 + s.n_rows - 1) * size_t(b.q_stride) + size_t(s.kv_head * G * D);
        std::vector<double> score;
        for (int c = 0; c < s.n_cand; ++c)
          score.push_back(quest_reference(read_page(*be, *kv, pages[size_t(j)][size_t(s.cand0 + c)]), qr, G, D));
        double gap;
        const std::vector<int32_t> expect = expected_selection(pages[size_t(j)], s.cand0, s.n_cand, s.k, score, &gap);
        if (j != 1) {
          ASSERT_GT(gap, 1e-4 * (1 + std::fabs(score[0]))) << "ambiguous test data";
        }
        EXPECT_EQ(results[0][size_t(j)], expect);
      }
      // The tie: job 1 keeps page 4 (index 3), not its copy at index 6; job 0 keeps both.
      EXPECT_EQ(results[0][1], (std::vector<int32_t>{pages[0][0], pages[0][3], pages[0][9]}));
      const auto& r0 = results[0][0];
      EXPECT_NE(std::find(r0.begin(), r0.end(), pages[0][3]), r0.end());
      EXPECT_NE(std::find(r0.begin(), r0.end(), pages[0][6]), r0.end());
      EXPECT_EQ(jobs[2].n_pages, 5);
      EXPECT_EQ(jobs[3].n_pages, 330 - 280);
      const auto& r4 = results[0][4];
      EXPECT_EQ(std::find(r4.begin(), r4.end(), pages[4][2]), r4.end()) << "an empty page was selected";
    }
    EXPECT_EQ(results[0], results[1]);
    EXPECT_EQ(results[0], results[2]);
  }
}

TEST(BackendOps, ThreadsDefaultToPhysicalCores) {
  // 0 threads: one per physical core among the CPUs this process may run on.
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  const int cores = cpu::physical_core_count();
  EXPECT_LE(cores, CPU_COUNT(&allowed)) << "more cores than CPUs";
  auto be = make_cpu_backend(0);
  EXPECT_EQ(be->threads(), cores);
  EXPECT_STREQ(be->name(), "cpu");
  // Pinned to one CPU, that is one core (the affinity mask is honoured).
  int first = 0;
  while (!CPU_ISSET(first, &allowed)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  const int pinned_cores = cpu::physical_core_count();
  const int pinned_threads = make_cpu_backend(0)->threads();
  ASSERT_EQ(sched_setaffinity(0, sizeof(allowed), &allowed), 0);
  EXPECT_EQ(pinned_cores, 1);
  EXPECT_EQ(pinned_threads, 1);
  EXPECT_EQ(make_cpu_backend(3)->threads(), 3);
}

// Many tiny parallel sections back to back (pool wake-up / completion races).
TEST(BackendOps, ManySmallCallsStayDeterministic) {
  Backends be;
  std::mt19937 rng(17);
  const TestWeight w = make_weight(DType::Q8_0, 64, 256, rng);
  const std::vector<float> x = random_vec(256, rng);
  std::vector<float> ref(64), y(64);
  be.one->matmul(w.view(), x.data(), 1, ref.data());
  for (int it = 0; it < 3000; ++it) {
    be.two->matmul(w.view(), x.data(), 1, y.data());
    ASSERT_TRUE(bitwise_equal(ref, y)) << "iteration " << it;
  }
}


// ==== The CUDA backend against the CPU backend =========================================================
//
// Every op of the CUDA backend (when this build has it and a GPU is present; otherwise these tests report
// SKIPPED with the reason) on random inputs, against the CPU backend on the same inputs. Tolerances
// (u = 2^-24; mag = sum |w*x| of the dot product; acc = (K/16 + 8) * 2u, the float accumulation bound of
// one backend):
//   * matmul, n <= 32 (the GPU's decode GEMV: float FMA for F32/F16/BF16, int8 dots on activations
//     quantized exactly as the CPU does for Q8_0): 2 * acc * mag, both sides' accumulation error; for
//     Q4_0/Q4_K/Q6_K also 2^-11 * mag, since the GPU holds those weights as F16 (converted at upload).
//   * matmul, n > 32 (cuBLAS on half-precision inputs): the activations are rounded to F16 (2^-11) or, for
//     BF16 weights, to BF16 (2^-8), and Q8_0 weights are dequantized to F16 (2^-11): 1.5 * that * mag, plus
//     for Q8_0 the CPU's own activation-quantization bound (as in check_matmul).
//   * embed: bitwise for F32/F16/BF16/Q8_0; 2^-11 relative for the types held as F16.
//   * rmsnorm 16u relative, rope 16u * (|x0| + |x1|) (both use ggml's angle recurrence, bit for bit; the
//     cos/sin differ by ulps), swiglu 2e-6 relative, add/add_bias exact.
//   * KV store ops (kv_store, kv_copy_pages, kv_copy_slots, kv_reset): bitwise equal pages (K, V as read
//     back, positions); scores from attention within 2e-5 relative.
//   * attention: both sides are within 1e-5 * max|v| of the float64 result (the CPU tests above), so we
//     allow 2e-5 * max|v|; scores 2e-5 * (1 + |score|); outputs nobody writes stay NaN.
//   * select_pages: identical page lists (the test data keeps the candidates' Quest scores >= 0.1% apart
//     at the cut, far above either side's float rounding), ties resolved towards the earlier page.
// And on the GPU alone: decode matmul rows and decode attention rows are bitwise the same whatever else is
// in the call (batch invariance), and repeated runs are bitwise equal.

std::unique_ptr<Backend> cuda_backend_or_null() {
  if (!cuda_unavailable().empty()) return nullptr;
  return make_backend("cuda", 0);
}
#define REQUIRE_CUDA(var)                                                      \
  std::unique_ptr<Backend> var = cuda_backend_or_null();                       \
  if (!var) GTEST_SKIP() << "no CUDA backend here: " << cuda_unavailable();

template <typename T>
DeviceArray<T> to_device(Backend& be, const std::vector<T>& v) {
  DeviceArray<T> d(be, std::max<size_t>(1, v.size()));
  if (!v.empty()) d.upload(v.data(), v.size());
  return d;
}
template <typename T>
std::vector<T> from_device(Backend& be, const DeviceArray<T>& d, size_t n) {
  std::vector<T> v(n);
  if (n) be.download(v.data(), d.get(), n * sizeof(T));
  return v;
}

TEST(BackendRegistry, PicksAndRefuses) {
  EXPECT_STREQ(make_backend("cpu", 1)->name(), "cpu");
  try {
    make_backend("tpu", 1);
    ADD_FAILURE() << "an unknown device must throw";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
  if (cuda_unavailable().empty()) {
    EXPECT_STREQ(make_backend("auto", 1)->name(), "cuda");
    EXPECT_STREQ(make_backend("cuda", 1)->name(), "cuda");
    EXPECT_NE(describe_device_choice("auto").find("cuda"), std::string::npos);
  } else {
    EXPECT_STREQ(make_backend("auto", 1)->name(), "cpu");
    try {
      make_backend("cuda", 1);
      ADD_FAILURE() << "--device cuda without a usable GPU must throw";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
    }
    EXPECT_NE(describe_device_choice("auto").find("cpu"), std::string::npos);
  }
}

void check_cuda_matmul(Backend& gpu, Backend& cpu, DType t, int64_t rows, int64_t cols, int64_t n, std::mt19937& rng) {
  SCOPED_TRACE(testing::Message() << "type " << gguf::type_name(t) << " rows " << rows << " cols " << cols << " n " << n);
  const TestWeight w = make_weight(t, rows, cols, rng);
  const bool as_f16 = t == DType::Q4_0 || t == DType::Q4_K || t == DType::Q6_K;
  // The decode paths: the tensor-core skinny GEMM (F16/BF16 and the types held as F16: n = 2..32; Q8_0:
  // n = 2..64; cols % 32 == 0) and the GEMV (n <= 32 otherwise), each batch invariant; the rest is cuBLAS.
  const bool skinny = (t == DType::F16 || t == DType::BF16 || t == DType::Q8_0 || as_f16) && cols % 32 == 0 && n >= 2 &&
                      n <= (t == DType::Q8_0 ? 64 : 32);
  const bool gemv = n <= 32 || skinny;
  std::vector<float> x = random_vec(size_t(n * cols), rng);
  for (int64_t j = 0; j < n; j += 3) x[size_t(j * cols)] *= 8.0f;
  // Decode paths: rows of other magnitudes too (the F16 skinny path scales each row by a power of two before
  // splitting it). Not for cuBLAS, whose F16 activations cannot hold rows of ~1e-6 (F16 subnormals).
  if (gemv) {
    for (int64_t j = 1; j < n; j += 5)
      for (int64_t k = 0; k < cols; ++k) x[size_t(j * cols + k)] *= 0x1p-20f;
    for (int64_t j = 3; j < n; j += 5)
      for (int64_t k = 0; k < cols; ++k) x[size_t(j * cols + k)] *= 3000.0f;
  }
  std::vector<float> yc(size_t(n * rows));
  cpu.matmul(w.view(), x.data(), n, yc.data());
  const WeightView gw = gpu.upload_weight(w.view());
  DeviceArray<float> dx = to_device(gpu, x);
  DeviceArray<float> dy = to_device(gpu, std::vector<float>(size_t(n * rows), NAN));
  gpu.matmul(gw, dx.get(), n, dy.get());
  const std::vector<float> yg = from_device(gpu, dy, size_t(n * rows));
  const double acc = (double(cols) / 16 + 8) * 2 * kU;
  double worst = 0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < rows; ++i) {
      const float* xr = x.data() + j * cols;
      const double* wr = w.ref.data() + i * cols;
      double mag = 0, q8_bound = 0, wsum = 0, xmax = 0;
      for (int64_t k = 0; k < cols; ++k) {
        mag += std::fabs(wr[k] * xr[k]);
        wsum += std::fabs(wr[k]);
        xmax = std::max(xmax, double(std::fabs(xr[k])));
      }
      if (t == DType::Q8_0)
        for (int64_t b = 0; b < cols / 32; ++b) {
          double amax = 0, wabs = 0;
          for (int k = 0; k < 32; ++k) {
            amax = std::max(amax, double(std::fabs(xr[b * 32 + k])));
            wabs += std::fabs(wr[b * 32 + k]);
          }
          q8_bound += amax / 254 * wabs;
        }
      double tol = 2 * acc * mag * (t == DType::Q8_0 ? 2 : 1) + 1e-30;
      if (as_f16) tol += mag / 2048;
      // Skinny F16/BF16: x kept to ~22 bits (F16 hi + lo of x * 2^s; BF16 hi + mid + lo): 2^-21 mag, plus the
      // F16 lo term's subnormal floor (2^-25 in units where the row's amax is >= 2^14).
      if (skinny && t != DType::Q8_0) tol += mag * 0x1p-21 + xmax * wsum * 0x1p-38;
      if (!gemv) {
        if (t == DType::BF16) tol += 1.5 * mag / 256;
        else if (t == DType::F16) tol += 1.5 * mag / 2048;
        else if (t == DType::Q8_0) tol += 3 * mag / 2048 + q8_bound * 1.001;
        else if (as_f16) tol += 1.5 * mag / 2048;
      }
      const double err = std::fabs(double(yg[size_t(j * rows + i)]) - double(yc[size_t(j * rows + i)]));
      worst = std::max(worst, err / tol);
      ASSERT_LE(err, tol) << "y[" << j << "][" << i << "] gpu " << yg[size_t(j * rows + i)] << " cpu "
                          << yc[size_t(j * rows + i)];
    }
  if (std::getenv("HEADROOM_TEST_VERBOSE"))
    std::printf("cuda matmul %s %lldx%lld n=%lld: worst error / tolerance = %.3g\n", gguf::type_name(t), (long long)rows,
                (long long)cols, (long long)n, worst);
  // Batch invariance of the decode paths: each row equals the same row computed alone (GEMV), or as the first
  // row of a 2-row call with another row beside it (skinny GEMM, whose range starts at n = 2).
  if (gemv)
    for (int64_t j : {int64_t(0), n / 2, n - 1}) {
      const int64_t m = skinny ? 2 : 1;
      std::vector<float> xj(x.begin() + j * cols, x.begin() + (j + 1) * cols);
      if (skinny) xj.insert(xj.end(), x.begin() + ((j + 1) % n) * cols, x.begin() + ((j + 1) % n + 1) * cols);
      DeviceArray<float> dxj = to_device(gpu, xj);
      DeviceArray<float> d1 = to_device(gpu, std::vector<float>(size_t(m * rows), NAN));
      gpu.matmul(gw, dxj.get(), m, d1.get());
      const std::vector<float> y1 = from_device(gpu, d1, size_t(rows));
      ASSERT_EQ(0, std::memcmp(y1.data(), yg.data() + j * rows, size_t(rows) * 4))
          << "row " << j << (skinny ? " in a 2-row call" : " alone") << " differs";
    }
}

TEST(CudaBackendOps, MatmulEveryTypeAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(2);
  std::mt19937 rng(101);
  const std::vector<int64_t> ns = {1, 2, 3, 5, 8, 9, 17, 32, 33, 48, 64, 65, 100};
  for (DType t : {DType::F32, DType::F16, DType::BF16})
    for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{5, 37}, {37, 64}, {7, 17}, {33, 96}, {768, 256},
                                                                             {1027, 520}, {256, 4096}, {1000, 2048}})
      for (int64_t n : ns) check_cuda_matmul(*gpu, *cpu, t, rows, cols, n, rng);
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{5, 32}, {37, 64}, {61, 96}, {768, 256}, {13, 160},
                                                                           {1027, 544}, {300, 4096}})
    for (int64_t n : ns) check_cuda_matmul(*gpu, *cpu, DType::Q8_0, rows, cols, n, rng);
  for (DType t : {DType::Q4_0, DType::Q4_K, DType::Q6_K})
    for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{20, 256}, {37, 512}, {9, 768}})
      for (int64_t n : {int64_t(1), int64_t(4), int64_t(32), int64_t(40)}) check_cuda_matmul(*gpu, *cpu, t, rows, cols, n, rng);
}

TEST(CudaBackendOps, EmbedAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(1);
  std::mt19937 rng(102);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q6_K}) {
    SCOPED_TRACE(gguf::type_name(t));
    const int64_t rows = 50, cols = 256;
    const TestWeight w = make_weight(t, rows, cols, rng);
    std::vector<int32_t> ids(40);
    for (auto& id : ids) id = int32_t(rng() % rows);
    ids[0] = 0;
    ids[1] = int32_t(rows - 1);
    std::vector<float> oc(ids.size() * size_t(cols));
    cpu->embed(w.view(), ids.data(), int64_t(ids.size()), oc.data());
    const WeightView gw = gpu->upload_weight(w.view());
    DeviceArray<int32_t> did = to_device(*gpu, ids);
    DeviceArray<float> dout = to_device(*gpu, std::vector<float>(oc.size(), NAN));
    gpu->embed(gw, did.get(), int64_t(ids.size()), dout.get());
    const std::vector<float> og = from_device(*gpu, dout, oc.size());
    const bool exact = t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::Q8_0;
    for (size_t i = 0; i < oc.size(); ++i) {
      if (exact) ASSERT_EQ(og[i], oc[i]) << i;
      else ASSERT_NEAR(og[i], oc[i], std::fabs(oc[i]) / 2048 + 6e-8) << i;
    }
    // A bad id is reported at the next synchronisation, in one line.
    std::vector<int32_t> bad = {0, int32_t(rows)};
    DeviceArray<int32_t> dbad = to_device(*gpu, bad);
    gpu->embed(gw, dbad.get(), 2, dout.get());
    try {
      gpu->synchronize();
      ADD_FAILURE() << "a token id out of range must throw";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("embed"), std::string::npos) << e.what();
    }
    gpu->synchronize();  // the error is reported once
  }
}

TEST(CudaBackendOps, RowOpsAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(2);
  std::mt19937 rng(103);
  for (const auto& [n, dim] : std::vector<std::pair<int64_t, int64_t>>{{1, 256}, {37, 256}, {512, 256}, {3, 37}, {2, 4096}}) {
    const std::vector<float> x = random_vec(size_t(n * dim), rng, -3, 3), w = random_vec(size_t(dim), rng, 0.5, 1.5);
    std::vector<float> oc(x.size());
    cpu->rmsnorm(x.data(), w.data(), n, dim, 1e-5f, oc.data());
    DeviceArray<float> dx = to_device(*gpu, x);
    const float* dw = gpu->upload_f32(w.data(), dim);
    gpu->rmsnorm(dx.get(), dw, n, dim, 1e-5f, dx.get());  // in place
    const std::vector<float> og = from_device(*gpu, dx, x.size());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(og[i], oc[i], 16 * kU * std::fabs(oc[i]) + 1e-12) << "rmsnorm " << i;
  }
  for (int64_t count : {int64_t(1), int64_t(37), int64_t(768), int64_t(512 * 768 + 5)}) {
    std::vector<float> g = random_vec(size_t(count), rng, -12, 12), u = random_vec(size_t(count), rng, -2, 2);
    if (count > 10) g[0] = -100.0f, g[1] = 100.0f, g[2] = 0.0f, g[3] = -87.0f;
    std::vector<float> sc(g.size()), ac = g, bc = g;
    cpu->swiglu(g.data(), u.data(), count, sc.data());
    cpu->add(ac.data(), u.data(), count);
    DeviceArray<float> dg = to_device(*gpu, g), du = to_device(*gpu, u), da = to_device(*gpu, g);
    gpu->swiglu(dg.get(), du.get(), count, dg.get());  // out aliases gate
    gpu->add(da.get(), du.get(), count);
    const std::vector<float> sg = from_device(*gpu, dg, g.size()), ag = from_device(*gpu, da, g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      ASSERT_NEAR(sg[i], sc[i], 2e-6 * std::fabs(sc[i]) + 1e-30) << "swiglu g " << g[i];
      ASSERT_EQ(ag[i], ac[i]) << "add " << i;
    }
  }
  {
    const int64_t n = 37, dim = 96;
    const std::vector<float> x = random_vec(size_t(n * dim), rng), b = random_vec(size_t(dim), rng);
    std::vector<float> c = x;
    cpu->add_bias(c.data(), b.data(), n, dim);
    DeviceArray<float> dx = to_device(*gpu, x);
    gpu->add_bias(dx.get(), gpu->upload_f32(b.data(), dim), n, dim);
    EXPECT_TRUE(bitwise_equal(from_device(*gpu, dx, x.size()), c));
  }
  for (const RopeCase& c : kRopeCases) {
    SCOPED_TRACE(testing::Message() << "rope neox " << c.neox << " n " << c.n << " n_rot " << c.n_rot);
    const int half = c.n_rot / 2;
    std::vector<float> ff = random_vec(size_t(half), rng, 1.0f, 8.0f);
    std::vector<int32_t> pos(static_cast<size_t>(c.n));
    for (auto& p : pos) p = int32_t(rng() % 131072);
    const RopeParams p = rope_params(c, ff.data());
    const std::vector<float> x = random_vec(size_t(c.n * c.heads * c.head_dim), rng);
    std::vector<float> xc = x;
    cpu->rope(xc.data(), c.n, c.heads, c.head_dim, pos.data(), p);
    DeviceArray<float> dx = to_device(*gpu, x);
    DeviceArray<int32_t> dpos = to_device(*gpu, pos);
    RopeParams pg = p;
    pg.freq_factors = c.ff ? gpu->upload_f32(ff.data(), half) : nullptr;
    gpu->rope(dx.get(), c.n, c.heads, c.head_dim, dpos.get(), pg);
    const std::vector<float> xg = from_device(*gpu, dx, x.size());
    for (int64_t r = 0; r < c.n; ++r)
      for (int64_t h = 0; h < c.heads; ++h) {
        const size_t o = size_t((r * c.heads + h) * c.head_dim);
        for (int i = 0; i < half; ++i) {
          const size_t i0 = c.neox ? o + size_t(i) : o + 2 * size_t(i);
          const size_t i1 = c.neox ? o + size_t(i + half) : o + 2 * size_t(i) + 1;
          const double tol = 16 * kU * (std::fabs(x[i0]) + std::fabs(x[i1]));
          ASSERT_NEAR(xg[i0], xc[i0], tol) << "r " << r << " h " << h << " i " << i << " pos " << pos[size_t(r)];
          ASSERT_NEAR(xg[i1], xc[i1], tol) << "r " << r << " h " << h << " i " << i;
        }
        for (int64_t d = c.n_rot; d < c.head_dim; ++d) ASSERT_EQ(xg[o + size_t(d)], x[o + size_t(d)]);
      }
  }
}

// Every page of two stores (one per backend) holds the same K, V (bitwise, as read back) and positions.
void expect_same_pages(Backend& a, KVStore& ka, Backend& b, KVStore& kb) {
  const KVLayout& l = ka.layout();
  for (int32_t id = 0; id < l.total_pages(); ++id) {
    const PageData pa = read_page(a, ka, id), pb = read_page(b, kb, id);
    ASSERT_EQ(pa.pos, pb.pos) << "page " << id;
    const size_t D = size_t(l.head_dim);
    for (size_t s = 0; s < pa.pos.size(); ++s) {  // rows of empty slots hold whatever the memory held
      if (pa.pos[s] < 0) continue;
      ASSERT_EQ(0, std::memcmp(pa.k.data() + s * D, pb.k.data() + s * D, D * 4)) << "K of page " << id << " slot " << s;
      ASSERT_EQ(0, std::memcmp(pa.v.data() + s * D, pb.v.data() + s * D, D * 4)) << "V of page " << id << " slot " << s;
    }
  }
}
void expect_close_scores(Backend& a, KVStore& ka, Backend& b, KVStore& kb) {
  std::vector<int32_t> all(static_cast<size_t>(ka.layout().total_pages()));
  std::iota(all.begin(), all.end(), 0);
  const std::vector<float> sa = read_scores(a, ka, all), sb = read_scores(b, kb, all);
  for (size_t i = 0; i < sa.size(); ++i) ASSERT_NEAR(sa[i], sb[i], 2e-5 * (1 + std::fabs(sb[i]))) << "slot " << i;
}

// One decode row attending `ids` with score accumulation, on one backend (device memory of that backend).
void score_pass(Backend& be, KVStore& kv, const std::vector<int32_t>& ids, const std::vector<float>& q, int D) {
  std::vector<int32_t> qpos = {1 << 20};
  AttnJob job;
  job.n_rows = 1;
  job.n_pages = int32_t(ids.size());
  job.score = 1;
  DeviceArray<float> dq = to_device(be, q), dout(be, size_t(D));
  DeviceArray<int32_t> dqp = to_device(be, qpos), dids = to_device(be, ids);
  DeviceArray<AttnJob> dj = to_device(be, std::vector<AttnJob>{job});
  AttnBatch b;
  b.q = dq.get();
  b.q_stride = D;
  b.q_pos = dqp.get();
  b.out = dout.get();
  b.out_stride = D;
  b.head_dim = D;
  b.scale = 0.125f;
  b.jobs = dj.get();
  b.n_jobs = 1;
  b.page_ids = dids.get();
  be.attention(kv, b);
  be.synchronize();
}

TEST(CudaBackendOps, KVStoreOpsAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(2);
  std::mt19937 rng(104);
  for (KVType t : kAllKVTypes)
    for (int D : {64, 40, 128}) {
      if (!kv_type_fits(t, D).empty()) continue;
      SCOPED_TRACE(testing::Message() << "type " << kv_type_name(t) << " head_dim " << D);
      const int P = 8;
      const KVLayout l = make_layout(t, P, D, 3, 3, true, true);
      auto kc = cpu->kv_create(l);
      auto kg = gpu->kv_create(l);
      expect_same_pages(*cpu, *kc, *gpu, *kg);  // fresh: empty
      // kv_store: 2 KV heads per row, some slots -1, both tiers, rounding ties.
      const int n_rows = 11, n_kv = 2;
      std::vector<float> k = random_vec(size_t(n_rows * n_kv * D), rng, -3, 3), v = random_vec(k.size(), rng, -3, 3);
      const float ties[] = {127.0f, 2.5f, -3.5f, 0.5f, 1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 1.0f + 1.0f / 256, 0.0f, -0.0f, 60000.0f};
      for (size_t i = 0; i < std::size(ties); ++i) k[i] = ties[i];
      std::vector<int32_t> all_slots(size_t(6 * P));
      std::iota(all_slots.begin(), all_slots.end(), 0);
      std::shuffle(all_slots.begin(), all_slots.end(), rng);
      std::vector<int32_t> slots(size_t(n_rows * n_kv)), pos(static_cast<size_t>(n_rows));
      for (size_t i = 0; i < slots.size(); ++i) slots[i] = i % 5 == 3 ? -1 : all_slots[i];
      for (int r = 0; r < n_rows; ++r) pos[size_t(r)] = 100 + 7 * r;
      cpu->kv_store(*kc, k.data(), v.data(), n_rows, n_kv, slots.data(), pos.data());
      {
        DeviceArray<float> dk = to_device(*gpu, k), dv = to_device(*gpu, v);
        DeviceArray<int32_t> ds = to_device(*gpu, slots), dp = to_device(*gpu, pos);
        gpu->kv_store(*kg, dk.get(), dv.get(), n_rows, n_kv, ds.get(), dp.get());
      }
      expect_same_pages(*cpu, *kc, *gpu, *kg);
      // Scores, then page copies (across tiers, in order), slot copies, resets.
      const std::vector<float> q = random_vec(size_t(D), rng);
      const std::vector<int32_t> ids = {0, 1, 2, 3, 4, 5};
      score_pass(*cpu, *kc, ids, q, D);
      score_pass(*gpu, *kg, ids, q, D);
      expect_close_scores(*cpu, *kc, *gpu, *kg);
      const std::vector<PageCopy> pc = {{0, 4}, {4, 2}, {1, 0}, {3, 3}, {5, 1}};
      cpu->kv_copy_pages(*kc, pc);
      gpu->kv_copy_pages(*kg, pc);
      expect_same_pages(*cpu, *kc, *gpu, *kg);
      const std::vector<SlotCopy> sc = {{2 * P + 6, 2 * P + 5}, {2 * P + 7, 2 * P + 6}, {1 * P + 3, 5 * P},
                                        {5 * P, 5 * P + 1}, {-1, 4 * P + 2},     {3 * P + 1, 0}};
      cpu->kv_copy_slots(*kc, sc);
      gpu->kv_copy_slots(*kg, sc);
      expect_same_pages(*cpu, *kc, *gpu, *kg);
      expect_close_scores(*cpu, *kc, *gpu, *kg);
      const std::vector<int32_t> rs = {2, 5};
      cpu->kv_reset(*kc, rs);
      gpu->kv_reset(*kg, rs);
      expect_same_pages(*cpu, *kc, *gpu, *kg);
      expect_close_scores(*cpu, *kc, *gpu, *kg);
    }
}

TEST(CudaBackendOps, ScatterI32AgainstCpu) {
  // The page table's in-place update: pairs of (index, id) at distinct indices, counts around the kernel's
  // block, and a bad index refused before anything is written.
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(1);
  std::mt19937 rng(211);
  for (int n_pairs : {0, 1, 255, 256, 257, 70000}) {
    const size_t len = 100003;
    std::vector<int32_t> table(len);
    for (auto& v : table) v = int32_t(rng() % 1000000);
    std::vector<int32_t> index(len), pairs;
    std::iota(index.begin(), index.end(), 0);
    std::shuffle(index.begin(), index.end(), rng);
    for (int i = 0; i < n_pairs; ++i) {
      pairs.push_back(index[size_t(i)]);
      pairs.push_back(int32_t(rng()));
    }
    DeviceArray<int32_t> dc = to_device(*cpu, table), dg = to_device(*gpu, table);
    cpu->scatter_i32(dc.get(), len, pairs);
    gpu->scatter_i32(dg.get(), len, pairs);
    ASSERT_EQ(from_device(*gpu, dg, len), from_device(*cpu, dc, len)) << n_pairs << " pairs";
  }
  DeviceArray<int32_t> d = to_device(*gpu, std::vector<int32_t>(8, 5));
  const std::vector<int32_t> bad = {1, 9, 8, 9};
  EXPECT_THROW(gpu->scatter_i32(d.get(), 8, bad), Error);
  EXPECT_EQ(from_device(*gpu, d, 8), std::vector<int32_t>(8, 5)) << "nothing written";
}

TEST(CudaBackendOps, KVRejects) {
  REQUIRE_CUDA(gpu);
  try {
    gpu->kv_create(make_layout(KVType::F32, 1024, 256, 1 << 20, 0, false, false));  // 2 TiB of device tier
    ADD_FAILURE() << "a device tier larger than the GPU must throw";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("free"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gpu->kv_create(make_layout(KVType::Q8_0, 16, 72, 2, 0, false, false)), Error);
  EXPECT_THROW(gpu->kv_create(make_layout(KVType::F16, 16, 512, 2, 0, false, false)), Error);  // head_dim > 256
  auto kv = gpu->kv_create(make_layout(KVType::F32, 4, 32, 2, 1, false, false));
  const std::vector<int32_t> bad = {3};
  EXPECT_THROW(gpu->kv_reset(*kv, bad), Error);
  EXPECT_THROW(read_scores(*gpu, *kv, {0}), Error);
  const std::vector<PageCopy> pc = {{0, 3}};
  EXPECT_THROW(gpu->kv_copy_pages(*kv, pc), Error);
  // A bad page id inside a device job table: reported at the next synchronisation.
  std::vector<float> q(32, 0.5f);
  std::vector<int32_t> qpos = {3}, ids = {7};
  AttnJob job;
  job.n_rows = 1;
  job.n_pages = 1;
  DeviceArray<float> dq = to_device(*gpu, q), dout = to_device(*gpu, q);
  DeviceArray<int32_t> dqp = to_device(*gpu, qpos), dids = to_device(*gpu, ids);
  DeviceArray<AttnJob> dj = to_device(*gpu, std::vector<AttnJob>{job});
  AttnBatch b;
  b.q = dq.get();
  b.q_stride = 32;
  b.q_pos = dqp.get();
  b.out = dout.get();
  b.out_stride = 32;
  b.head_dim = 32;
  b.jobs = dj.get();
  b.n_jobs = 1;
  b.page_ids = dids.get();
  gpu->attention(*kv, b);
  EXPECT_THROW(gpu->synchronize(), Error);
}

// Attention of a case on the GPU against the CPU (and the GPU against itself, run twice).
void check_cuda_attention(Backend& gpu, AttnCase c, std::mt19937& rng, std::vector<KVType> types = {}) {
  c.q = random_vec(size_t(c.n_rows) * c.n_kv * c.group * c.layout.head_dim, rng, -2, 2);
  auto cpu = make_cpu_backend(2);
  for (const AttnCase& ct : per_kv_type(c, types)) {
    const KVType t = ct.layout.type;
    SCOPED_TRACE(testing::Message() << "kv type " << kv_type_name(t));
    double vmax = 0;
    const int D = ct.layout.head_dim;
    for (size_t i = 0; i < ct.writes.pos.size(); ++i)
      if (ct.writes.pos[i] >= 0)
        for (int e = 0; e < D; ++e) vmax = std::max(vmax, double(std::fabs(ct.writes.v[i * size_t(D) + size_t(e)])));
    const AttnResult rc = run_attention(*cpu, ct, 2);
    // The second run carries the batch's shape hints (other grids): the results must be the same bits, except
    // the outputs of the jobs the tensor-core prefill kernel takes with hints (its own test checks them).
    const AttnResult rg = run_attention(gpu, ct, 2);
    const AttnResult rg2 = run_attention(gpu, ct, 2, true);
    const int H = ct.n_kv * ct.group;
    std::vector<uint8_t> tensor_core(rg.out.size(), 0);
    const bool slot_scores = ct.layout.slot_scores;
    if (D == 64 || D == 128)
      for (const TestJob& j : ct.jobs)
        if (j.n_rows >= 4 && !(j.score && slot_scores))
          for (int r = j.row0; r < j.row0 + j.n_rows; ++r)
            for (int h = j.kv_head * ct.group; h < (j.kv_head + 1) * ct.group; ++h)
              for (int e = 0; e < D; ++e) tensor_core[(size_t(r) * H + size_t(h)) * size_t(D) + size_t(e)] = 1;
    for (size_t i = 0; i < rg.out.size(); ++i) {
      if (tensor_core[i]) continue;
      ASSERT_EQ(0, std::memcmp(&rg.out[i], &rg2.out[i], 4)) << "two GPU runs differ at " << i << ": " << rg.out[i]
                                                             << " vs " << rg2.out[i];
    }
    ASSERT_EQ(rc.out.size(), rg.out.size());
    double worst = 0;
    for (size_t i = 0; i < rc.out.size(); ++i) {
      if (std::isnan(rc.out[i])) {
        ASSERT_TRUE(std::isnan(rg.out[i])) << "the GPU wrote an output nobody owns, " << i;
        continue;
      }
      ASSERT_NEAR(rg.out[i], rc.out[i], 2e-5 * vmax + 1e-30) << "out[" << i << "] (row*head " << i / size_t(D) << ")";
      if (vmax > 0) worst = std::max(worst, std::fabs(double(rg.out[i]) - double(rc.out[i])) / vmax);
    }
    if (std::getenv("HEADROOM_TEST_VERBOSE"))
      std::printf("  cuda attention %s head_dim %d group %d: worst |gpu - cpu| / max|v| = %.3g (bound 2e-5)\n",
                  kv_type_name(t), D, ct.group, worst);
    for (size_t ji = 0; ji < rc.scores.size(); ++ji) {
      ASSERT_TRUE(bitwise_equal(rg.scores[ji], rg2.scores[ji])) << "two GPU runs differ (scores)";
      for (size_t s = 0; s < rc.scores[ji].size(); ++s)
        ASSERT_NEAR(rg.scores[ji][s], rc.scores[ji][s], 2e-5 * (1 + std::fabs(rc.scores[ji][s]))) << "job " << ji << " slot " << s;
    }
  }
}

TEST(CudaBackendOps, AttentionAgainstCpu) {
  REQUIRE_CUDA(gpu);
  std::mt19937 rng(105);
  check_cuda_attention(*gpu, case_decode_holes_host_pages(rng), rng);
  {  // long decode over many splits, group 4, head_dim 128, scores, sinks/window
    AttnCase c;
    c.layout = make_layout(KVType::F32, 32, 128, 300, 300, false, true);
    c.n_rows = 2, c.n_kv = 2, c.group = 4;
    c.scale = 1.0f / std::sqrt(128.0f);
    c.q_pos = {9000, 9001};
    std::vector<int32_t> p0, p1;
    for (int i = 0; i < 283; ++i) p0.push_back(i < 150 ? i : 150 + i);  // device ids, then host ids
    for (int i = 0; i < 211; ++i) p1.push_back(i < 150 ? 299 - i : 599 - (i - 150));  // disjoint from p0
    fill_pages(c, p0, iota_vec(9002), 0.02, rng);
    fill_pages(c, p1, iota_vec(6700), 0.05, rng);
    c.jobs = {{0, 2, 0, p0, 0, 0, true}, {0, 2, 1, p1, 64, 1000, true}};
    check_cuda_attention(*gpu, c, rng);
  }
  check_cuda_attention(*gpu, case_long_decode_pages_of_256(rng), rng);
  for (int32_t window : {0, 16}) check_cuda_attention(*gpu, case_causal_prefill(rng, window), rng);
  check_cuda_attention(*gpu, case_head_dim_72(rng), rng);  // generic kernel, rows before every slot
  check_cuda_attention(*gpu, case_head_dim_96(rng), rng);  // generic kernel, Q8_0 too
  check_cuda_attention(*gpu, case_no_pages_and_all_holes(rng), rng);
  check_cuda_attention(*gpu, case_prefill_long_context_gqa4(rng, 128), rng);
  check_cuda_attention(*gpu, case_mixed_batch_tiny_pages(rng, 256), rng);  // head_dim 256
}

// The fast decode path (decode jobs with n_rows * group <= 4, head_dim 64/128/256, pages of a multiple of 4
// slots): many splits (more pages per split than the minimum), both tiers, holes with NaN garbage,
// sinks/window, scores, tiny pages (many copies per stage, page ids staged in windows), empty jobs, and fast
// jobs beside legacy decode and prefill jobs in one batch.
TEST(CudaBackendOps, AttentionFastDecodeAgainstCpu) {
  REQUIRE_CUDA(gpu);
  std::mt19937 rng(107);
  {  // 8B-like: head_dim 128, GQA 4, 1100 pages of 32 per job (9 pages per split), a legacy 2-row decode job
    AttnCase c;
    c.layout = make_layout(KVType::F32, 32, 128, 1400, 1000, false, true);
    c.n_rows = 3, c.n_kv = 2, c.group = 4;
    c.scale = 1.0f / std::sqrt(128.0f);
    c.q_pos = {35100, 2000, 2001};
    std::vector<int32_t> ids(2400);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const std::vector<int32_t> a(ids.begin(), ids.begin() + 1100), bb(ids.begin() + 1100, ids.begin() + 2200),
        cc(ids.begin() + 2200, ids.begin() + 2270);
    fill_pages(c, a, iota_vec(35101), 0.01, rng);
    fill_pages(c, bb, iota_vec(35101), 0.02, rng);
    fill_pages(c, cc, iota_vec(2002), 0.05, rng);
    c.jobs = {{0, 1, 0, a, 0, 0, true}, {0, 1, 1, bb, 16, 4000, true}, {1, 2, 0, cc, 0, 0, true}};
    check_cuda_attention(*gpu, c, rng);
  }
  {  // 1B-like: head_dim 64, pages of 16 and 20 (pieces across stage boundaries), an empty job, only holes
    for (int P : {16, 20}) {
      AttnCase c;
      c.layout = make_layout(KVType::F32, P, 64, 500, 200, false, true);
      c.n_rows = 2, c.n_kv = 4, c.group = 4;
      c.q_pos = {5500, 700};
      std::vector<int32_t> ids(700);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      const std::vector<int32_t> a(ids.begin(), ids.begin() + 300), bb(ids.begin() + 300, ids.begin() + 345),
          holes(ids.begin() + 345, ids.begin() + 350);
      fill_pages(c, a, iota_vec(5501), 0.03, rng);
      fill_pages(c, bb, iota_vec(701), 0.03, rng);
      fill_pages(c, holes, {}, 1.0, rng);
      c.jobs = {{0, 1, 0, a, 0, 0, true}, {0, 1, 1, {}, 0, 0, false}, {1, 1, 2, bb, 4, 100, true},
                {1, 1, 3, holes, 0, 0, true}};
      check_cuda_attention(*gpu, c, rng);
    }
  }
  {  // head_dim 256, pages of 4 slots (16 copies per stage), 8300 pages (65 per split: a second id window),
     // 2 rows x group 2, a prefill job beside it
    AttnCase c;
    c.layout = make_layout(KVType::F32, 4, 256, 8000, 400, false, true);
    c.n_rows = 2 + 6, c.n_kv = 2, c.group = 2;
    c.q_pos = {33250, 33251};
    for (int r = 0; r < 6; ++r) c.q_pos.push_back(90 + r);
    std::vector<int32_t> a;
    for (int i = 0; i < 8300; ++i) a.push_back(i < 7990 ? i : 8000 + (i - 7990));
    std::vector<int32_t> pf = {7990, 7991, 7992, 7993, 7994, 7995, 7996, 7997, 7998, 7999, 8310, 8311,
                               8312, 8313, 8314, 8315, 8316, 8317, 8318, 8319, 8320, 8321, 8322, 8323, 8324};
    fill_pages(c, a, iota_vec(33252), 0.02, rng);
    fill_pages(c, pf, iota_vec(96), 0.02, rng);
    c.jobs = {{0, 2, 1, a, 0, 0, true}, {2, 6, 0, pf, 0, 0, true}};
    check_cuda_attention(*gpu, c, rng);
  }
  {  // group 1 (3 rows = 3 pairs), head_dim 128, window only
    AttnCase c;
    c.layout = make_layout(KVType::F32, 32, 128, 120, 0, false, true);
    c.n_rows = 3, c.n_kv = 1, c.group = 1;
    c.q_pos = {3700, 3699, 100};
    std::vector<int32_t> a = iota_vec(118);
    std::shuffle(a.begin(), a.end(), rng);
    fill_pages(c, a, iota_vec(3701), 0.05, rng);
    c.jobs = {{0, 3, 0, a, 0, 512, true}};
    check_cuda_attention(*gpu, c, rng);
  }
}

// The tensor-core split pass (F16 KV, head_dim 64/128: the fast jobs, except score jobs on a store with slot
// scores). Stores without slot scores (every fast job takes it) and with them (a score job on attn_fast_kernel
// beside non-score jobs in one batch); GQA 1/2/4 with 1 to 4 pairs a job, many splits, both tiers, holes with NaN
// garbage, sinks/window, an empty job. The other KV types run the same cases on attn_fast_kernel.
TEST(CudaBackendOps, AttentionTensorCoreDecodeAgainstCpu) {
  REQUIRE_CUDA(gpu);
  std::mt19937 rng(108);
  for (int D : {64, 128})
    for (int G : {1, 2, 4})
      for (bool scores : {false, true}) {
        SCOPED_TRACE(testing::Message() << "head_dim " << D << " group " << G << (scores ? " slot scores" : ""));
        AttnCase c;
        c.layout = make_layout(KVType::F32, 32, D, 900, 500, false, scores);
        const int rb = std::min(3, 4 / G);  // rows of job B (decode: < 4 rows; 3, 4, 4 pairs)
        c.n_rows = 1 + rb + 1, c.n_kv = 2, c.group = G;
        c.scale = 1.0f / std::sqrt(float(D));
        c.q_pos = {20100};
        for (int r = 0; r < rb; ++r) c.q_pos.push_back(9000 + r);
        c.q_pos.push_back(50);
        std::vector<int32_t> ids(1400);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        const std::vector<int32_t> a(ids.begin(), ids.begin() + 640), bb(ids.begin() + 640, ids.begin() + 930);
        fill_pages(c, a, iota_vec(20101), 0.02, rng);
        fill_pages(c, bb, iota_vec(9000 + rb), 0.05, rng);
        c.jobs = {{0, 1, 0, a, 0, 0, scores}, {1, rb, 1, bb, 16, 4000, false}, {1 + rb, 1, 0, {}, 0, 0, false}};
        check_cuda_attention(*gpu, c, rng);
      }
}

// A decode job's output and scores are bitwise the same alone and inside a batch of other jobs.
TEST(CudaBackendOps, AttentionDecodeIsBatchInvariant) {
  REQUIRE_CUDA(gpu);
  std::mt19937 rng(106);
  for (KVType t : {KVType::F16, KVType::Q8_0}) {
    SCOPED_TRACE(kv_type_name(t));
    AttnCase big;
    big.layout = make_layout(t, 32, 128, 200, 100, false, true);
    big.n_rows = 1 + 1 + 12, big.n_kv = 2, big.group = 4;
    big.q_pos = {5000, 3000};
    for (int r = 0; r < 12; ++r) big.q_pos.push_back(900 + r);
    std::vector<int32_t> ids(300);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const std::vector<int32_t> a(ids.begin(), ids.begin() + 160), b(ids.begin() + 160, ids.begin() + 260),
        c(ids.begin() + 260, ids.begin() + 290);
    fill_pages(big, a, iota_vec(5001), 0.05, rng);
    fill_pages(big, b, iota_vec(3001), 0.05, rng);
    fill_pages(big, c, iota_vec(912), 0.05, rng);
    big.q = random_vec(size_t(big.n_rows) * 2 * 4 * 128, rng, -2, 2);
    AttnCase alone = big;
    big.jobs = {{1, 1, 1, b, 0, 0, false}, {0, 1, 0, a, 0, 0, true}, {2, 12, 0, c, 0, 0, false}, {0, 1, 1, a, 0, 0, false}};
    alone.jobs = {{0, 1, 0, a, 0, 0, true}};
    const AttnResult rb = run_attention(*gpu, big, 1), ra = run_attention(*gpu, alone, 1, true);
    const size_t D = 128;
    for (size_t h = 0; h < 4; ++h)  // row 0, heads 0..3 (KV head 0)
      ASSERT_EQ(0, std::memcmp(ra.out.data() + h * D, rb.out.data() + h * D, D * 4)) << "head " << h;
    ASSERT_TRUE(bitwise_equal(ra.scores[0], rb.scores[1]));
  }
}

// Tensor-core prefill attention (jobs >= 4 rows, head_dim 64/128, the batch's host shape known): F16 operands
// (BF16 for BF16 KV), F32 accumulation. Bound against the CPU, per output element d of (row, head), with
// p_j the exact probabilities over the allowed slots, mag_d = sum p_j |v_jd| / sum p_j and
// A = max_j sum_e |q_e k_je| * scale * log2(e) (the score magnitude in log2 units):
//   |gpu - cpu| <= 2 * (2 ln2 (u_q + u_k) A + 2 u_p + u_k) * mag_d + 2e-5 max|v|,
// u_q = u_p = 2^-11 (F16) or 2^-8 (BF16 KV: Q and P in BF16), u_k = 2^-11 for F32 / Q8_0 KV (rounded to F16
// on the way), 0 for F16 / BF16 KV (used as stored). The 2e-5 max|v| covers the CPU's own float error.
void check_cuda_prefill(Backend& gpu, AttnCase c, std::mt19937& rng, std::vector<KVType> types = {}) {
  c.host_shape = true;
  c.q = random_vec(size_t(c.n_rows) * c.n_kv * c.group * c.layout.head_dim, rng, -2, 2);
  auto cpu = make_cpu_backend(2);
  for (const AttnCase& ct : per_kv_type(c, types)) {
    const KVType t = ct.layout.type;
    SCOPED_TRACE(testing::Message() << "kv type " << kv_type_name(t));
    const int D = ct.layout.head_dim, H = ct.n_kv * ct.group, P = ct.layout.page_size;
    const AttnResult rc = run_attention(*cpu, ct, 2);
    const AttnResult rg = run_attention(gpu, ct, 2);
    const AttnResult rg2 = run_attention(gpu, ct, 2);
    ASSERT_EQ(rc.out.size(), rg.out.size());
    for (size_t i = 0; i < rg.out.size(); ++i)
      ASSERT_EQ(0, std::memcmp(&rg.out[i], &rg2.out[i], 4)) << "two GPU runs differ at " << i;
    // The stored K/V (read back from a CPU store) for the bound.
    auto kv = cpu->kv_create(ct.layout);
    store_writes(*cpu, *kv, ct.writes);
    const double u16 = 1.0 / 2048, ubf = 1.0 / 256;
    const double uq = t == KVType::BF16 ? ubf : u16, up = uq;
    const double uk = (t == KVType::F32 || t == KVType::Q8_0) ? u16 : 0.0;
    const double log2e = 1.4426950408889634;
    double worst = 0;
    std::vector<bool> owned(rg.out.size() / size_t(D), false);
    for (size_t ji = 0; ji < ct.jobs.size(); ++ji) {
      const TestJob& job = ct.jobs[ji];
      std::vector<PageData> pages;
      double vmax = 0;
      for (int32_t id : job.pages) {
        pages.push_back(read_page(*cpu, *kv, id));
        for (int s = 0; s < P; ++s)
          if (pages.back().pos[size_t(s)] >= 0)
            for (int e = 0; e < D; ++e) vmax = std::max(vmax, double(std::fabs(pages.back().v[size_t(s * D + e)])));
      }
      for (int r = job.row0; r < job.row0 + job.n_rows; ++r)
        for (int h = job.kv_head * ct.group; h < (job.kv_head + 1) * ct.group; ++h) {
          const size_t oi = size_t(r * H + h);
          owned[oi] = true;
          const float* qv = ct.q.data() + oi * size_t(D);
          std::vector<double> sc;
          std::vector<const float*> vs;
          double amax = 0;
          for (const PageData& pg : pages)
            for (int s = 0; s < P; ++s)
              if (allowed(pg.pos[size_t(s)], ct.q_pos[size_t(r)], job.sinks, job.window)) {
                double d = 0, a = 0;
                for (int e = 0; e < D; ++e) {
                  d += double(qv[e]) * pg.k[size_t(s * D + e)];
                  a += std::fabs(double(qv[e]) * pg.k[size_t(s * D + e)]);
                }
                sc.push_back(d * ct.scale);
                vs.push_back(pg.v.data() + size_t(s * D));
                amax = std::max(amax, a * ct.scale * log2e);
              }
          const float* og = rg.out.data() + oi * size_t(D);
          const float* oc = rc.out.data() + oi * size_t(D);
          if (sc.empty()) {
            for (int e = 0; e < D; ++e) ASSERT_EQ(og[e], 0.0f) << "row " << r << " head " << h << ": no allowed slot";
            continue;
          }
          double mx = -INFINITY, sum = 0;
          for (double x : sc) mx = std::max(mx, x);
          for (double x : sc) sum += std::exp(x - mx);
          const double rel = 2 * (2 * std::log(2.0) * (uq + uk) * amax + 2 * up + uk);
          for (int e = 0; e < D; ++e) {
            double mag = 0;
            for (size_t j = 0; j < sc.size(); ++j) mag += std::exp(sc[j] - mx) * std::fabs(vs[j][e]);
            mag /= sum;
            const double tol = rel * mag + 2e-5 * vmax + 1e-30;
            const double err = std::fabs(double(og[e]) - double(oc[e]));
            worst = std::max(worst, err / tol);
            ASSERT_LE(err, tol) << "job " << ji << " row " << r << " head " << h << " dim " << e << ": gpu " << og[e]
                                << " cpu " << oc[e] << " (A " << amax << ", mag " << mag << ")";
          }
        }
    }
    for (size_t i = 0; i < owned.size(); ++i) {
      if (owned[i]) continue;
      for (int e = 0; e < D; ++e) ASSERT_TRUE(std::isnan(rg.out[i * size_t(D) + size_t(e)])) << "row*head " << i;
    }
    for (size_t ji = 0; ji < rc.scores.size(); ++ji) {  // score jobs stay on the exact path
      ASSERT_TRUE(bitwise_equal(rg.scores[ji], rg2.scores[ji])) << "two GPU runs differ (scores)";
      for (size_t s = 0; s < rc.scores[ji].size(); ++s)
        ASSERT_NEAR(rg.scores[ji][s], rc.scores[ji][s], 2e-5 * (1 + std::fabs(rc.scores[ji][s]))) << "job " << ji << " slot " << s;
    }
    if (std::getenv("HEADROOM_TEST_VERBOSE"))
      std::printf("cuda prefill attention %s D=%d G=%d rows=%d: worst error / tolerance = %.3g\n", kv_type_name(t), D,
                  ct.group, ct.n_rows, worst);
  }
}

void prefill_cases(Backend* gpu) {
  std::mt19937 rng(107);
  {  // GQA 4, head_dim 128, a causal chunk over past context, uneven page lists over both tiers, holes,
     // sinks/window on one job
    const int n_rows = 203, past = 300;
    AttnCase c;
    c.layout = make_layout(KVType::F32, 16, 128, 40, 20, false, false);
    c.n_rows = n_rows, c.n_kv = 2, c.group = 4;
    c.scale = 1.0f / std::sqrt(128.0f);
    c.q_pos = iota_vec(n_rows, past);
    std::vector<int32_t> p0, p1;
    for (int i = 0; i < 34; ++i) p0.push_back(i < 20 ? 2 * i : 40 + (i - 20));        // device, then host pages
    for (int i = 0; i < 19; ++i) p1.push_back(2 * i + 1);
    for (int i = 54; i < 60; ++i) p1.push_back(i);
    std::shuffle(p1.begin(), p1.end(), rng);
    fill_pages(c, p0, iota_vec(past + n_rows), 0.1, rng);
    fill_pages(c, p1, iota_vec(past + n_rows), 0.05, rng, false);  // in order: whole tiles skipped / unmasked
    c.jobs = {{0, n_rows, 0, p0, 0, 0, false}, {0, n_rows, 1, p1, 4, 100, false}};
    check_cuda_prefill(*gpu, c, rng);
  }
  for (int group : {1, 2, 3}) {  // head_dim 64, pages of 5 / 20, rows before every slot, unsorted positions
    const int n_rows = 131;
    AttnCase c;
    const int P = group == 2 ? 5 : 20;
    c.layout = make_layout(KVType::F32, P, 64, 120, 0, false, false);
    c.n_rows = n_rows, c.n_kv = 1, c.group = group;
    for (int r = 0; r < n_rows; ++r) c.q_pos.push_back(r % 17 == 3 ? -5 : int32_t((r * 37) % 400));
    std::vector<int32_t> p0;
    for (int i = 0; i < 400 / P + 3; ++i) p0.push_back(119 - i);
    fill_pages(c, p0, iota_vec(400), 0.1, rng);
    c.jobs = {{0, n_rows, 0, p0, group == 3 ? 3 : 0, group == 3 ? 50 : 0, false}};
    check_cuda_prefill(*gpu, c, rng);
  }
  {  // mixed batch: decode jobs, prefill jobs, a score job (exact path) on a store with slot scores, P = 256,
     // a job without pages
    AttnCase c;
    c.layout = make_layout(KVType::F32, 256, 128, 12, 6, false, true);
    c.n_rows = 1 + 70 + 9, c.n_kv = 2, c.group = 2;
    c.scale = 0.1f;
    c.q_pos = {1500};
    for (int r = 0; r < 70; ++r) c.q_pos.push_back(600 + r);
    for (int r = 0; r < 9; ++r) c.q_pos.push_back(40 + 3 * r);
    const std::vector<int32_t> a0 = {0, 13, 2, 15, 4, 5}, a1 = {6, 7, 16, 9, 17, 11}, b0 = {1, 3, 12}, b1 = {8, 10, 14};
    fill_pages(c, a0, iota_vec(1501), 0.05, rng);
    fill_pages(c, a1, iota_vec(1501), 0.05, rng);
    fill_pages(c, b0, iota_vec(670), 0.1, rng);
    fill_pages(c, b1, iota_vec(670), 0.1, rng);
    c.jobs = {{0, 1, 0, a0, 0, 0, true},  {0, 1, 1, a1, 2, 500, false}, {1, 70, 0, b0, 0, 0, false},
              {1, 70, 1, b1, 0, 0, true}, {71, 9, 0, {}, 0, 0, false},  {71, 9, 1, b0, 1, 8, false}};
    check_cuda_prefill(*gpu, c, rng);
  }
  {  // a long chunk (three row tiles of 32 rows per KV head and more), GQA 4, pages of 128, F16 and Q8_0
    const int n_rows = 517, past = 1500;
    AttnCase c;
    c.layout = make_layout(KVType::F32, 128, 128, 18, 0, false, false);
    c.n_rows = n_rows, c.n_kv = 1, c.group = 4;
    c.scale = 1.0f / std::sqrt(128.0f);
    c.q_pos = iota_vec(n_rows, past);
    std::vector<int32_t> p0(17);
    std::iota(p0.begin(), p0.end(), 1);
    std::shuffle(p0.begin(), p0.end(), rng);
    fill_pages(c, p0, iota_vec(past + n_rows), 0.02, rng, false);
    c.jobs = {{0, n_rows, 0, p0, 0, 0, false}};
    check_cuda_prefill(*gpu, c, rng, {KVType::F16, KVType::Q8_0});
  }
}

TEST(CudaBackendOps, PrefillAttentionAgainstCpu) {
  REQUIRE_CUDA(gpu);
  prefill_cases(gpu.get());
}

// Split-KV: the same cases with every job cut into KV ranges of 1 and of 3 tiles (64 slots each), merged
// afterwards (the long-context plan cuts ranges of >= 256 tiles, too long for test data): the same tolerance,
// and two runs bitwise equal.
TEST(CudaBackendOps, PrefillAttentionSplitKVAgainstCpu) {
  REQUIRE_CUDA(gpu);
  for (const char* tiles : {"1", "3"}) {
    SCOPED_TRACE(testing::Message() << "ranges of " << tiles << " tiles");
    setenv("HEADROOM_CUDA_PF_SPLIT", tiles, 1);
    prefill_cases(gpu.get());
    unsetenv("HEADROOM_CUDA_PF_SPLIT");
  }
}

TEST(CudaBackendOps, SelectPagesAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(2);
  std::mt19937 rng(107);
  const int P = 4, D = 64, G = 2, n_kv = 2;
  for (KVType t : kAllKVTypes) {
    SCOPED_TRACE(testing::Message() << "kv type " << kv_type_name(t));
    // Jobs (pages, cand0, n_cand, k, score spacing). The keys of a candidate page are the same base keys
    // times a factor from a shuffled ladder 1, 1 + step, 1 + 2 step, ..., so the Quest scores are ordered
    // by the factor and far apart; job 1 selects over job 0's pages with k = 1 where page 4 has an exact
    // copy at index 6 (a tie: the earlier wins); job 2 keeps all; job 4 has an empty candidate; job 5
    // (F32 only) has 13000 candidates (more than the kernel keeps in shared memory).
    struct Sel {
      int n_pages, cand0, n_cand, k;
      double step;
      int row0, kv_head;
    };
    std::vector<Sel> sel = {{10, 1, 8, 3, 0.05, 0, 0}, {10, 1, 8, 1, 0.05, 0, 1}, {5, 0, 5, 5, 0.05, 3, 0},
                            {330, 5, 320, 40, 0.01, 4, 1}, {6, 0, 6, 2, 0.05, 5, 0}};
    if (t == KVType::F32) sel.push_back({13010, 3, 13000, 500, 0.0005, 6, 1});
    int total = 0;
    for (const Sel& s : sel) total += s.n_pages;
    const KVLayout l = make_layout(t, P, D, total / 2, total - total / 2 + 20, true, false);
    std::vector<int32_t> ids(static_cast<size_t>(l.total_pages()));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<std::vector<int32_t>> pages(sel.size());
    size_t next = 0;
    for (size_t j = 0; j < sel.size(); ++j) {
      if (j == 1) {
        pages[1] = pages[0];
        continue;
      }
      pages[j].assign(ids.begin() + ptrdiff_t(next), ids.begin() + ptrdiff_t(next + size_t(sel[j].n_pages)));
      next += size_t(sel[j].n_pages);
    }
    const std::vector<float> base = random_vec(size_t(P * D), rng, 0.2f, 1.0f);
    KVWrites w;
    for (size_t j = 0; j < sel.size(); ++j) {
      if (j == 1) continue;
      std::vector<double> ladder(static_cast<size_t>(sel[j].n_pages));
      for (size_t i = 0; i < ladder.size(); ++i) ladder[i] = 1 + sel[j].step * double(i);
      std::shuffle(ladder.begin(), ladder.end(), rng);
      if (j == 0) std::swap(ladder[3], *std::max_element(ladder.begin(), ladder.end()));  // page 4 is the best
      for (int pi = 0; pi < sel[j].n_pages; ++pi) {
        const int32_t id = pages[j][size_t(pi)];
        if ((j == 4 && pi == 2) || (j == 0 && pi == 6)) continue;  // empty page / filled by copy below
        for (int s = 0; s < P; ++s) {
          w.slots.push_back(id * P + s);
          w.pos.push_back(s);
          for (int d = 0; d < D; ++d) {
            w.k.push_back(float(base[size_t(s * D + d)] * ladder[size_t(pi)]));
            w.v.push_back(0.0f);
          }
        }
      }
    }
    const std::vector<PageCopy> cp = {{pages[0][3], pages[0][6]}};
    std::vector<float> q = random_vec(size_t(7) * n_kv * G * D, rng, 0.1f, 1.0f);
    std::vector<AttnJob> jobs;
    std::vector<int32_t> flat;
    for (size_t j = 0; j < sel.size(); ++j) {
      AttnJob a;
      a.row0 = sel[j].row0;
      a.n_rows = 1;
      a.kv_head = sel[j].kv_head;
      a.page0 = int32_t(flat.size());
      a.n_pages = sel[j].n_pages;
      a.cand0 = sel[j].cand0;
      a.n_cand = sel[j].n_cand;
      a.select_k = sel[j].k;
      flat.insert(flat.end(), pages[j].begin(), pages[j].end());
      jobs.push_back(a);
    }
    std::vector<int32_t> qpos(7, 1000);
    auto run = [&](Backend& be, bool on_gpu) {
      auto kv = be.kv_create(l);
      store_writes(be, *kv, w);
      be.kv_copy_pages(*kv, cp);
      DeviceArray<float> dq = to_device(be, q), dout(be, q.size());
      DeviceArray<int32_t> dqp = to_device(be, qpos), dflat = to_device(be, flat);
      DeviceArray<AttnJob> dj = to_device(be, jobs);
      AttnBatch b;
      b.q = dq.get();
      b.q_stride = int64_t(n_kv) * G * D;
      b.q_pos = dqp.get();
      b.out = dout.get();
      b.out_stride = b.q_stride;
      b.n_group = G;
      b.head_dim = D;
      b.jobs = dj.get();
      b.n_jobs = int32_t(jobs.size());
      b.page_ids = dflat.get();
      be.select_pages(*kv, b);
      const std::vector<AttnJob> oj = from_device(be, dj, jobs.size());
      const std::vector<int32_t> of = from_device(be, dflat, flat.size());
      std::vector<std::vector<int32_t>> res;
      for (const AttnJob& a : oj) res.emplace_back(of.begin() + a.page0, of.begin() + a.page0 + a.n_pages);
      (void)on_gpu;
      return res;
    };
    const auto rc = run(*cpu, false), rg = run(*gpu, true);
    ASSERT_EQ(rc.size(), rg.size());
    for (size_t j = 0; j < rc.size(); ++j) EXPECT_EQ(rg[j], rc[j]) << "job " << j;
    EXPECT_EQ(rg[1], (std::vector<int32_t>{pages[0][0], pages[0][3], pages[0][9]}));  // the tie
    EXPECT_EQ(rg[3].size(), size_t(330 - 280));
  }
}

// ---- fused ops (backend.h) ------------------------------------------------------------------------------
// Each fused op against the ops it is defined as, on the same backend: bitwise (the CPU runs the definitions;
// CUDA keeps their order of arithmetic: the same GEMV block sums, rmsnorm reduction, angles and row encodings).
// With a CPU beside it, the backend's fused results against the CPU's, with the tolerances of the ops' own
// CUDA-against-CPU tests: rmsnorm 16u relative; matmul the decode paths' bound (2 * (K/16 + 8) * 2u * sum|w x|,
// twice for Q8_0, plus the skinny F16/BF16 split term); SwiGLU that error carried through silu(g) * u
// (|silu'| <= 1.1) plus 4e-6 relative; RoPE 16u * (|x0| + |x1|); V rows bitwise, K rows (F32 store) as RoPE.

double decode_matmul_tol(const TestWeight& w, const float* xr, int64_t i) {
  double mag = 0, wsum = 0, xmax = 0;
  for (int64_t k = 0; k < w.cols; ++k) {
    mag += std::fabs(w.ref[size_t(i * w.cols + k)] * xr[k]);
    wsum += std::fabs(w.ref[size_t(i * w.cols + k)]);
    xmax = std::max(xmax, double(std::fabs(xr[k])));
  }
  const double acc = (double(w.cols) / 16 + 8) * 2 * kU;
  return 2 * acc * mag * (w.type == DType::Q8_0 ? 2 : 1) + mag * 0x1p-21 + xmax * wsum * 0x1p-38 + 1e-30;
}

struct AddNormOut {
  std::vector<float> x, out;
};
AddNormOut run_add_rmsnorm(Backend& be, bool fused, const std::vector<float>& x, const std::vector<float>& y,
                           const std::vector<float>& w, int64_t n, int64_t dim) {
  DeviceArray<float> dx = to_device(be, x), dy = to_device(be, y);
  const float* dw = be.upload_f32(w.data(), dim);
  if (fused) {
    be.add_rmsnorm(dx.get(), dy.get(), dw, n, dim, 1e-5f, dy.get());  // out aliases y, as in the forward pass
  } else {
    be.add(dx.get(), dy.get(), n * dim);
    be.rmsnorm(dx.get(), dw, n, dim, 1e-5f, dy.get());
  }
  return {from_device(be, dx, x.size()), from_device(be, dy, y.size())};
}

std::vector<std::vector<float>> run_matmul_group(Backend& be, bool fused, const std::vector<TestWeight>& ws,
                                                 const std::vector<float>& x, int64_t n) {
  DeviceArray<float> dx = to_device(be, x);
  std::vector<DeviceArray<float>> ys;
  std::vector<MatmulPart> parts;
  for (const TestWeight& w : ws) {
    ys.push_back(to_device(be, std::vector<float>(size_t(n * w.rows), NAN)));
    parts.push_back({be.upload_weight(w.view()), ys.back().get()});
  }
  if (fused) be.matmul_group(parts, dx.get(), n);
  else
    for (const MatmulPart& p : parts) be.matmul(p.w, dx.get(), n, p.y);
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < ws.size(); ++i) out.push_back(from_device(be, ys[i], size_t(n * ws[i].rows)));
  return out;
}

std::vector<float> run_matmul_swiglu(Backend& be, bool fused, const TestWeight& g, const TestWeight& u,
                                     const std::vector<float>& x, int64_t n) {
  const WeightView gw = be.upload_weight(g.view()), uw = be.upload_weight(u.view());
  DeviceArray<float> dx = to_device(be, x), dout = to_device(be, std::vector<float>(size_t(n * g.rows), NAN)),
                     dup = to_device(be, std::vector<float>(size_t(n * u.rows), NAN));
  if (fused) {
    be.matmul_swiglu(gw, uw, dx.get(), n, dout.get(), dup.get());
  } else {
    be.matmul(gw, dx.get(), n, dout.get());
    be.matmul(uw, dx.get(), n, dup.get());
    be.swiglu(dout.get(), dup.get(), n * g.rows, dout.get());
  }
  return from_device(be, dout, size_t(n * g.rows));
}

struct RopeStoreCase {
  KVType type;
  int64_t n;
  int n_head, n_kv, head_dim;
  RopeCase rope;  // its n, heads and head_dim are unused
};
struct RopeStoreOut {
  std::vector<float> q, k;
  std::vector<PageData> pages;
};
RopeStoreOut run_rope_store(Backend& be, bool fused, const RopeStoreCase& c, const std::vector<float>& q,
                            const std::vector<float>& k, const std::vector<float>& v, const std::vector<int32_t>& pos,
                            const std::vector<int32_t>& slots, const std::vector<float>& ff) {
  const KVLayout l = make_layout(c.type, 8, c.head_dim, 4, 2, true, true);
  auto kv = be.kv_create(l);
  DeviceArray<float> dq = to_device(be, q), dk = to_device(be, k), dv = to_device(be, v);
  DeviceArray<int32_t> dpos = to_device(be, pos), dslots = to_device(be, slots);
  RopeParams p = rope_params(c.rope, nullptr);
  if (c.rope.ff) p.freq_factors = be.upload_f32(ff.data(), int64_t(ff.size()));
  if (fused) {
    be.rope_store(*kv, AttnRows{dq.get(), dk.get(), dv.get(), c.n, c.n_head, c.n_kv, c.head_dim, dpos.get()}, dslots.get(), p);
  } else {
    be.rope(dq.get(), c.n, c.n_head, c.head_dim, dpos.get(), p);
    be.rope(dk.get(), c.n, c.n_kv, c.head_dim, dpos.get(), p);
    be.kv_store(*kv, dk.get(), dv.get(), c.n, c.n_kv, dslots.get(), dpos.get());
  }
  RopeStoreOut o{from_device(be, dq, q.size()), from_device(be, dk, k.size()), {}};
  for (int32_t id = 0; id < l.total_pages(); ++id) o.pages.push_back(read_page(be, *kv, id));
  return o;
}

void check_fused_ops(Backend& be, Backend* cpu) {
  std::mt19937 rng(110);
  for (const auto& [n, dim] : std::vector<std::pair<int64_t, int64_t>>{{1, 4096}, {3, 256}, {37, 256}, {2, 37}}) {
    SCOPED_TRACE(testing::Message() << "add_rmsnorm " << n << " x " << dim);
    const std::vector<float> x = random_vec(size_t(n * dim), rng, -3, 3), y = random_vec(x.size(), rng, -1, 1),
                             w = random_vec(size_t(dim), rng, 0.5, 1.5);
    const AddNormOut f = run_add_rmsnorm(be, true, x, y, w, n, dim), u = run_add_rmsnorm(be, false, x, y, w, n, dim);
    EXPECT_TRUE(bitwise_equal(f.x, u.x));
    EXPECT_TRUE(bitwise_equal(f.out, u.out));
    if (!cpu) continue;
    const AddNormOut c = run_add_rmsnorm(*cpu, true, x, y, w, n, dim);
    EXPECT_TRUE(bitwise_equal(f.x, c.x));
    for (size_t i = 0; i < c.out.size(); ++i) ASSERT_NEAR(f.out[i], c.out[i], 16 * kU * std::fabs(c.out[i]) + 1e-12) << i;
  }
  struct GroupCase {
    DType type;
    int64_t cols;
    std::vector<int64_t> rows;
  };
  const std::vector<GroupCase> groups = {{DType::F16, 256, {64, 16, 16}},      {DType::BF16, 512, {37, 5, 9}},
                                         {DType::F32, 256, {12, 4}},           {DType::Q8_0, 256, {33, 8, 8}},
                                         {DType::F16, 4096, {1024, 256, 256}}, {DType::F16, 37, {9, 3, 3}},
                                         {DType::F16, 256, {8, 8, 8, 8, 8}}};
  for (const GroupCase& g : groups)
    for (int64_t n : {1, 2, 5}) {
      SCOPED_TRACE(testing::Message() << "matmul_group " << gguf::type_name(g.type) << " cols " << g.cols << " parts "
                                      << g.rows.size() << " n " << n);
      std::vector<TestWeight> ws;
      for (int64_t r : g.rows) ws.push_back(make_weight(g.type, r, g.cols, rng));
      const std::vector<float> x = random_vec(size_t(n * g.cols), rng);
      const auto f = run_matmul_group(be, true, ws, x, n), u = run_matmul_group(be, false, ws, x, n);
      for (size_t p = 0; p < ws.size(); ++p) EXPECT_TRUE(bitwise_equal(f[p], u[p])) << "part " << p;
      if (!cpu) continue;
      const auto c = run_matmul_group(*cpu, true, ws, x, n);
      for (size_t p = 0; p < ws.size(); ++p)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t i = 0; i < ws[p].rows; ++i) {
            const size_t o = size_t(j * ws[p].rows + i);
            ASSERT_NEAR(f[p][o], c[p][o], decode_matmul_tol(ws[p], x.data() + j * g.cols, i)) << "part " << p << " row " << j;
          }
    }
  for (const auto& [t, rows, cols] : std::vector<std::tuple<DType, int64_t, int64_t>>{
           {DType::F16, 96, 256}, {DType::F16, 1000, 4096}, {DType::BF16, 37, 512}, {DType::F32, 9, 256},
           {DType::Q8_0, 70, 256}, {DType::F16, 5, 37}})
    for (int64_t n : {1, 2, 5}) {
      SCOPED_TRACE(testing::Message() << "matmul_swiglu " << gguf::type_name(t) << " " << rows << " x " << cols << " n " << n);
      const TestWeight g = make_weight(t, rows, cols, rng), u = make_weight(t, rows, cols, rng);
      std::vector<float> x = random_vec(size_t(n * cols), rng, -2, 2);
      const std::vector<float> f = run_matmul_swiglu(be, true, g, u, x, n), uf = run_matmul_swiglu(be, false, g, u, x, n);
      EXPECT_TRUE(bitwise_equal(f, uf));
      if (!cpu) continue;
      const std::vector<float> c = run_matmul_swiglu(*cpu, true, g, u, x, n);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < rows; ++i) {
          const float* xr = x.data() + j * cols;
          double gv = 0, uv = 0;
          for (int64_t k = 0; k < cols; ++k) {
            gv += g.ref[size_t(i * cols + k)] * xr[k];
            uv += u.ref[size_t(i * cols + k)] * xr[k];
          }
          const double dg = decode_matmul_tol(g, xr, i), du = decode_matmul_tol(u, xr, i);
          const size_t o = size_t(j * rows + i);
          const double tol = 1.1 * (std::fabs(uv) + du) * dg + (std::fabs(gv) + dg) * du + 4e-6 * std::fabs(c[o]) + 1e-30;
          ASSERT_NEAR(f[o], c[o], tol) << "row " << j << " out " << i;
        }
    }
  const RopeCase llama{false, 0, 0, 0, 128, 500000.0f, 1.0f, true}, neox{true, 0, 0, 0, 64, 1e6f, 1.0f, false},
      partial{false, 0, 0, 0, 32, 10000.0f, 0.5f, false};
  std::vector<RopeStoreCase> cases;
  for (KVType t : kAllKVTypes) {
    cases.push_back({t, 3, 8, 2, 128, llama});
    cases.push_back({t, 1, 4, 4, 64, neox});
  }
  cases.push_back({KVType::F32, 5, 6, 3, 64, partial});
  cases.push_back({KVType::F16, 2, 32, 8, 128, llama});
  for (const RopeStoreCase& c : cases) {
    SCOPED_TRACE(testing::Message() << "rope_store " << kv_type_name(c.type) << " n " << c.n << " heads " << c.n_head
                                    << "/" << c.n_kv << " head_dim " << c.head_dim << " n_rot " << c.rope.n_rot);
    const std::vector<float> q = random_vec(size_t(c.n * c.n_head * c.head_dim), rng, -3, 3),
                             k = random_vec(size_t(c.n * c.n_kv * c.head_dim), rng, -3, 3), v = random_vec(k.size(), rng, -3, 3),
                             ff = random_vec(size_t(c.rope.n_rot / 2), rng, 1.0f, 8.0f);
    std::vector<int32_t> pos(static_cast<size_t>(c.n)), all_slots(6 * 8), slots(size_t(c.n * c.n_kv));
    for (auto& p : pos) p = int32_t(rng() % 131072);
    std::iota(all_slots.begin(), all_slots.end(), 0);
    std::shuffle(all_slots.begin(), all_slots.end(), rng);
    for (size_t i = 0; i < slots.size(); ++i) slots[i] = i % 5 == 3 ? -1 : all_slots[i];
    const RopeStoreOut f = run_rope_store(be, true, c, q, k, v, pos, slots, ff),
                       u = run_rope_store(be, false, c, q, k, v, pos, slots, ff);
    EXPECT_TRUE(bitwise_equal(f.q, u.q));
    EXPECT_TRUE(bitwise_equal(f.k, u.k));
    const size_t D = size_t(c.head_dim);
    for (size_t id = 0; id < f.pages.size(); ++id) {
      ASSERT_EQ(f.pages[id].pos, u.pages[id].pos) << "page " << id;
      for (size_t s = 0; s < f.pages[id].pos.size(); ++s) {  // rows of empty slots hold whatever the memory held
        if (f.pages[id].pos[s] < 0) continue;
        EXPECT_EQ(0, std::memcmp(f.pages[id].k.data() + s * D, u.pages[id].k.data() + s * D, D * 4)) << "K of page " << id;
        EXPECT_EQ(0, std::memcmp(f.pages[id].v.data() + s * D, u.pages[id].v.data() + s * D, D * 4)) << "V of page " << id;
      }
    }
    if (!cpu) continue;
    const RopeStoreOut r = run_rope_store(*cpu, true, c, q, k, v, pos, slots, ff);
    const int half = c.rope.n_rot / 2;
    auto near_rope = [&](const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& in) {
      for (size_t vec = 0; vec < in.size() / size_t(c.head_dim); ++vec)
        for (int i = 0; i < c.head_dim; ++i) {
          const size_t o = vec * size_t(c.head_dim);
          const int pair = i < c.rope.n_rot ? (c.rope.neox ? i % half : i / 2) : -1;
          const double tol = pair < 0 ? 0.0
                                      : 16 * kU * (c.rope.neox ? std::fabs(in[o + size_t(pair)]) + std::fabs(in[o + size_t(pair + half)])
                                                               : std::fabs(in[o + 2 * size_t(pair)]) + std::fabs(in[o + 2 * size_t(pair) + 1]));
          ASSERT_NEAR(got[o + size_t(i)], want[o + size_t(i)], tol) << "vector " << vec << " dim " << i;
        }
    };
    near_rope(f.q, r.q, q);
    near_rope(f.k, r.k, k);
    for (size_t id = 0; id < f.pages.size(); ++id) {
      ASSERT_EQ(f.pages[id].pos, r.pages[id].pos) << "page " << id;
      for (size_t s = 0; s < f.pages[id].pos.size(); ++s) {
        if (f.pages[id].pos[s] < 0) continue;
        EXPECT_EQ(0, std::memcmp(f.pages[id].v.data() + s * D, r.pages[id].v.data() + s * D, D * 4)) << "V of page " << id;
        if (c.type == KVType::F32) {
          for (size_t d = 0; d < D; ++d)
            ASSERT_NEAR(f.pages[id].k[s * D + d], r.pages[id].k[s * D + d], 96 * kU) << "K of page " << id;  // |x| <= 3
        }
      }
    }
  }
}

TEST(BackendOps, FusedOpsAreTheirDefinitions) {
  auto cpu = make_cpu_backend(2);
  check_fused_ops(*cpu, nullptr);
}

TEST(CudaBackendOps, FusedOpsBitwiseAndAgainstCpu) {
  REQUIRE_CUDA(gpu);
  auto cpu = make_cpu_backend(2);
  check_fused_ops(*gpu, cpu.get());
}

}  // namespace
}  // namespace headroom
