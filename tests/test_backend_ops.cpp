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
//   * attention: scores are float dots of head_dim terms and the probabilities use the polynomial exp,
//     so each probability is within ~1e-6 relative; outputs are convex combinations of V rows, so we allow
//     1e-5 * max|v| (a wrong slot or a wrong mask shows up as errors of ~1e-1).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "backend/backend.h"
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

TEST(BackendOps, Rope) {
  Backends be;
  std::mt19937 rng(10);
  struct Case {
    bool neox;
    int64_t n, heads, head_dim;
    int n_rot;
    float base, freq_scale;
    bool ff;
  };
  for (const Case& c : {Case{false, 37, 4, 64, 64, 10000.0f, 1.0f, false}, Case{true, 37, 4, 64, 64, 1e6f, 1.0f, false},
                        Case{false, 5, 2, 128, 128, 500000.0f, 0.25f, true}, Case{true, 1, 3, 64, 32, 10000.0f, 0.5f, true},
                        Case{false, 512, 2, 64, 48, 10000.0f, 1.0f, false}}) {
    SCOPED_TRACE(testing::Message() << "neox " << c.neox << " n " << c.n << " n_rot " << c.n_rot);
    const int half = c.n_rot / 2;
    std::vector<float> ff = random_vec(size_t(half), rng, 1.0f, 8.0f);
    std::vector<int32_t> pos(static_cast<size_t>(c.n));
    for (auto& p : pos) p = int32_t(rng() % 4096);
    pos[0] = 0;
    RopeParams p;
    p.n_rot = c.n_rot;
    p.neox = c.neox;
    p.theta_base = c.base;
    p.freq_scale = c.freq_scale;
    p.freq_factors = c.ff ? ff.data() : nullptr;
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

// ---- attention ----------------------------------------------------------------------------------------

struct TestPage {
  std::vector<float> k, v, score;
  std::vector<int32_t> pos;
  bool with_score = false;
};

struct TestJob {
  int n_rows, head0, n_group, head_dim;
  float scale;
  int32_t sinks, window;
  std::vector<int32_t> q_pos;
  std::vector<TestPage> pages;
};

// Fills pages with the positions in `positions` (some replaced by -1 holes), random K/V.
std::vector<TestPage> make_pages(const std::vector<int>& sizes, std::vector<int32_t> positions, int head_dim,
                                 double hole_rate, bool score, std::mt19937& rng) {
  std::shuffle(positions.begin(), positions.end(), rng);
  std::uniform_real_distribution<double> u01(0, 1);
  std::vector<TestPage> pages;
  size_t next = 0;
  for (int s : sizes) {
    TestPage p;
    p.k = random_vec(size_t(s * head_dim), rng, -1, 1);
    p.v = random_vec(size_t(s * head_dim), rng, -2, 2);
    p.pos.resize(size_t(s));
    for (auto& ps : p.pos) ps = (next < positions.size() && u01(rng) >= hole_rate) ? positions[next++] : -1;
    // Empty slots hold garbage: NaN K/V must never reach a result.
    for (size_t i = 0; i < p.pos.size(); ++i)
      if (p.pos[i] < 0)
        for (int e = 0; e < head_dim; ++e) p.k[i * size_t(head_dim) + size_t(e)] = p.v[i * size_t(head_dim) + size_t(e)] = NAN;
    p.with_score = score;
    if (score) p.score = random_vec(size_t(s), rng, 0, 1);  // += must keep the old value
    pages.push_back(std::move(p));
  }
  return pages;
}

bool allowed(int32_t ps, int32_t qp, int32_t sinks, int32_t window) {
  if (ps < 0 || ps > qp) return false;
  return window == 0 || ps < sinks || int64_t(ps) > int64_t(qp) - window;
}

// Runs the jobs on a backend: returns out and the final score arrays (pages are copied, not modified).
struct AttnResult {
  std::vector<float> out;
  std::vector<std::vector<float>> scores;  // per job, concatenated pages
};

AttnResult run_attention(Backend& be, const std::vector<TestJob>& tj, const std::vector<float>& q, int n_rows,
                         int n_heads, int head_dim) {
  AttnResult res;
  res.out.assign(size_t(n_rows * n_heads * head_dim), NAN);
  std::vector<std::vector<TestPage>> pages;
  for (const auto& j : tj) pages.push_back(j.pages);
  std::vector<std::vector<AttnPage>> views(tj.size());
  std::vector<AttnJob> jobs;
  for (size_t ji = 0; ji < tj.size(); ++ji) {
    for (auto& p : pages[ji])
      views[ji].push_back({p.k.data(), p.v.data(), p.pos.data(), p.with_score ? p.score.data() : nullptr,
                           int(p.pos.size())});
    AttnJob j;
    j.n_rows = tj[ji].n_rows;
    j.q = q.data();
    j.q_stride = int64_t(n_heads) * head_dim;
    j.q_pos = tj[ji].q_pos.data();
    j.head0 = tj[ji].head0;
    j.n_group = tj[ji].n_group;
    j.head_dim = head_dim;
    j.scale = tj[ji].scale;
    j.sinks = tj[ji].sinks;
    j.window = tj[ji].window;
    j.pages = views[ji];
    j.out = res.out.data();
    j.out_stride = int64_t(n_heads) * head_dim;
    jobs.push_back(j);
  }
  be.attention(jobs);
  for (auto& ps : pages) {
    std::vector<float> s;
    for (auto& p : ps) s.insert(s.end(), p.score.begin(), p.score.end());
    res.scores.push_back(std::move(s));
  }
  return res;
}

void check_attention(const std::vector<TestJob>& tj, int n_rows, int n_heads, int head_dim, std::mt19937& rng) {
  Backends be;
  const std::vector<float> q = random_vec(size_t(n_rows * n_heads * head_dim), rng, -2, 2);
  const AttnResult r1 = run_attention(*be.one, tj, q, n_rows, n_heads, head_dim);
  const AttnResult r2 = run_attention(*be.two, tj, q, n_rows, n_heads, head_dim);
  ASSERT_TRUE(bitwise_equal(r1.out, r2.out)) << "1 and 2 threads differ (out)";
  for (size_t ji = 0; ji < tj.size(); ++ji) ASSERT_TRUE(bitwise_equal(r1.scores[ji], r2.scores[ji])) << "scores differ";

  for (size_t ji = 0; ji < tj.size(); ++ji) {
    const TestJob& job = tj[ji];
    std::vector<double> score_ref;  // per slot of the job's pages; only pages with score_acc are checked
    std::vector<bool> has_score;
    for (const auto& p : job.pages)
      for (size_t s = 0; s < p.pos.size(); ++s) {
        score_ref.push_back(p.with_score ? p.score[s] : 0.0);
        has_score.push_back(p.with_score);
      }
    double vmax = 0;
    for (const auto& p : job.pages)
      for (float v : p.v) vmax = std::max(vmax, double(std::fabs(v)));
    for (int r = 0; r < job.n_rows; ++r)
      for (int h = job.head0; h < job.head0 + job.n_group; ++h) {
        const float* qv = q.data() + size_t((r * n_heads + h) * head_dim);
        // Scores of allowed slots, in double.
        std::vector<std::pair<double, const float*>> sv;  // (score, v row)
        std::vector<size_t> slot_index;
        size_t base = 0;
        for (const auto& p : job.pages) {
          for (size_t s = 0; s < p.pos.size(); ++s)
            if (allowed(p.pos[s], job.q_pos[size_t(r)], job.sinks, job.window)) {
              double d = 0;
              for (int e = 0; e < head_dim; ++e) d += double(qv[e]) * p.k[s * size_t(head_dim) + size_t(e)];
              sv.push_back({d * job.scale, p.v.data() + s * size_t(head_dim)});
              slot_index.push_back(base + s);
            }
          base += p.pos.size();
        }
        const float* out = r1.out.data() + size_t((r * n_heads + h) * head_dim);
        if (sv.empty()) {
          for (int e = 0; e < head_dim; ++e) ASSERT_EQ(out[e], 0.0f) << "row without allowed slot must be zero";
          continue;
        }
        double mx = -INFINITY, sum = 0;
        for (auto& s : sv) mx = std::max(mx, s.first);
        for (auto& s : sv) sum += std::exp(s.first - mx);
        for (int e = 0; e < head_dim; ++e) {
          double ref = 0;
          for (auto& s : sv) ref += std::exp(s.first - mx) / sum * s.second[e];
          ASSERT_NEAR(out[e], ref, 1e-5 * vmax) << "job " << ji << " row " << r << " head " << h << " dim " << e;
        }
        for (size_t t = 0; t < sv.size(); ++t) score_ref[slot_index[t]] += std::exp(sv[t].first - mx) / sum;
      }
    size_t checked = 0;
    for (size_t s = 0; s < score_ref.size(); ++s)
      if (has_score[s]) {
        ASSERT_NEAR(r1.scores[ji][checked], score_ref[s], 1e-5 * (1 + std::fabs(score_ref[s])))
            << "job " << ji << " slot " << s;
        ++checked;
      }
    ASSERT_EQ(checked, r1.scores[ji].size());
  }
}

std::vector<int32_t> iota_vec(int n, int start = 0) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

TEST(BackendOps, AttentionDecodeWithHoles) {
  std::mt19937 rng(11);
  const int D = 64, n_heads = 4;
  // 2 KV heads x group 2; positions 0..179 scattered over 3 pages, ~20% holes; q at 150 so some slots
  // hold "future" positions that causality must skip.
  std::vector<TestJob> jobs;
  for (int kv = 0; kv < 2; ++kv)
    jobs.push_back({1, kv * 2, 2, D, 0.125f, 0, 0, {150}, make_pages({40, 64, 100}, iota_vec(180), D, 0.2, false, rng)});
  check_attention(jobs, 1, n_heads, D, rng);
}

TEST(BackendOps, AttentionLongDecodeSplitWithScores) {
  std::mt19937 rng(12);
  const int D = 128, n_heads = 8;
  // 4200 slots (split-K path): pages of 256 plus a short one, group 4, evict scores, and sinks/window.
  std::vector<TestJob> jobs;
  std::vector<int> sizes(16, 256);
  sizes.push_back(104);
  for (int kv = 0; kv < 2; ++kv)
    jobs.push_back({1, kv * 4, 4, D, 1.0f / std::sqrt(float(D)), kv == 0 ? 0 : 4, kv == 0 ? 0 : 1000, {4300},
                    make_pages(sizes, iota_vec(4300), D, 0.05, true, rng)});
  check_attention(jobs, 1, n_heads, D, rng);
}

TEST(BackendOps, AttentionCausalPrefill) {
  std::mt19937 rng(13);
  const int D = 64, n_heads = 4, n_rows = 37, past = 70;
  // Rows at positions past..past+36; the cache holds positions 0..past+36 (the new rows included) in
  // pages of 32 with a few evicted slots. Group 2, and a second pass with sinks 4 / window 16.
  for (int32_t window : {0, 16}) {
    std::vector<TestJob> jobs;
    std::vector<int32_t> qpos = iota_vec(n_rows, past);
    for (int kv = 0; kv < 2; ++kv)
      jobs.push_back({n_rows, kv * 2, 2, D, 0.125f, window ? 4 : 0, window, qpos,
                      make_pages({32, 32, 32, 11}, iota_vec(past + n_rows), D, 0.1, kv == 1, rng)});
    check_attention(jobs, n_rows, n_heads, D, rng);
  }
}

TEST(BackendOps, AttentionOddHeadDimGroupsAndEmptyRows) {
  std::mt19937 rng(14);
  const int D = 72, n_heads = 5;  // head_dim not a multiple of 16; groups 1 and 4
  std::vector<TestJob> jobs;
  // Row 1's position (-5) is before every slot: no allowed slot, zeros. Row 2 sees only slots < 3.
  const std::vector<int32_t> qpos = {600, -5, 2};
  jobs.push_back({3, 0, 1, D, 0.1f, 2, 50, qpos, make_pages({300, 400}, iota_vec(650), D, 0.1, true, rng)});
  jobs.push_back({3, 1, 4, D, 0.1f, 0, 0, qpos, make_pages({16, 16, 700}, iota_vec(700), D, 0.3, true, rng)});
  check_attention(jobs, 3, n_heads, D, rng);
  // head_dim 96 (a multiple of 16 other than 64/128), prefill rows, group 3.
  const int D2 = 96, rows2 = 11;
  std::vector<TestJob> jobs2;
  jobs2.push_back({rows2, 0, 3, D2, 0.1f, 0, 0, iota_vec(rows2, 40), make_pages({20, 40}, iota_vec(40 + rows2), D2, 0.1, true, rng)});
  check_attention(jobs2, rows2, 3, D2, rng);
}

TEST(BackendOps, AttentionNoPagesAndAllHoles) {
  std::mt19937 rng(15);
  const int D = 64, n_heads = 2;
  std::vector<TestJob> jobs;
  jobs.push_back({2, 0, 1, D, 0.125f, 0, 0, {5, 9}, {}});
  jobs.push_back({2, 1, 1, D, 0.125f, 0, 0, {5, 9}, make_pages({20}, {}, D, 1.0, true, rng)});
  check_attention(jobs, 2, n_heads, D, rng);
}

TEST(BackendOps, AttentionPrefillLongContextGqa4) {
  std::mt19937 rng(16);
  const int D = 64, n_heads = 8, n_rows = 64, past = 1200;
  std::vector<TestJob> jobs;
  for (int kv = 0; kv < 2; ++kv)
    jobs.push_back({n_rows, kv * 4, 4, D, 0.125f, 0, 0, iota_vec(n_rows, past),
                    make_pages({512, 512, 240}, iota_vec(past + n_rows), D, 0.02, kv == 0, rng)});
  check_attention(jobs, n_rows, n_heads, D, rng);
}

// Pages smaller than a chunk (chunks then span pages), some with score_acc and some without; decode
// (split-K over many tiny pages) and prefill rows.
TEST(BackendOps, AttentionTinyPagesMixedScores) {
  std::mt19937 rng(18);
  const int D = 64, n_heads = 4;
  std::vector<int> sizes;
  for (int i = 0; i < 300; ++i) sizes.push_back(1 + int(rng() % 7));
  for (int n_rows : {1, 9}) {
    std::vector<TestJob> jobs;
    std::vector<int32_t> qpos;
    for (int r = 0; r < n_rows; ++r) qpos.push_back(1100 + r);
    for (int kv = 0; kv < 2; ++kv) {
      TestJob j{n_rows, kv * 2, 2, D, 0.125f, 3, kv == 0 ? 0 : 300, qpos,
                make_pages(sizes, iota_vec(1100 + n_rows), D, 0.1, true, rng)};
      for (size_t i = 1; i < j.pages.size(); i += 3) {
        j.pages[i].with_score = false;
        j.pages[i].score.clear();
      }
      jobs.push_back(std::move(j));
    }
    check_attention(jobs, n_rows, n_heads, D, rng);
  }
}

TEST(BackendOps, ThreadsDefaultToPhysicalCores) {
  auto be = make_cpu_backend(0);
  EXPECT_GE(be->threads(), 1);
  EXPECT_STREQ(be->name(), "cpu");
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

}  // namespace
}  // namespace headroom
