// Fused S² grid activation on the CPU, out = A · SiLU(S · x) per row, with its gradient and the gradient's
// derivative: coefficients → values on the grid → SiLU → coefficients, one tile of channels of one row at a time,
// so the grid values live in the L1 cache and never in memory; the grid MLP's point-wise steps; and the rotation of
// node pairs into the edge frames (at the end).  Built and loaded by potentials/accel/cpu.py.
//
// Layout: x [B, K, C] (row, coefficient, channel; channels contiguous), row-major matrices: synthesis S [G, K]
// (coefficients → grid values), analysis A [KO, G] (grid values → coefficients).  Rows are shared among OpenMP
// threads (the runtime PyTorch has loaded).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int TILE = 64;  // channels per inner block

template <typename T> struct Consts;
template <> struct Consts<float> {
  using U = uint32_t;
  static constexpr int mantissa = 23;
  static constexpr U bias = 127;
  static constexpr float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer held in the low bits
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
};
template <> struct Consts<double> {
  using U = uint64_t;
  static constexpr int mantissa = 52;
  static constexpr U bias = 1023;
  static constexpr double shifter = 6755399441055744.0;  // 1.5·2^52
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
};

// exp(x) for x clamped to the finite range: x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by its Taylor series (degree 7 in
// float, 13 in double: truncation below half an ulp), 2^n assembled in the exponent bits.  Branch-free, so the
// loops that call it vectorise.
template <typename T>
inline T exp_clamped(T x) {
  using K = Consts<T>;
  using U = typename K::U;
  x = std::min(std::max(x, K::lo), K::hi);
  T shifted = x * K::log2e + K::shifter;
  U bits;
  std::memcpy(&bits, &shifted, sizeof(T));
  T n = shifted - K::shifter;
  T r = x - n * K::ln2_hi - n * K::ln2_lo;
  T p;
  if constexpr (sizeof(T) == 4) {
    p = 1.0f / 5040;
    p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6;
    p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  } else {
    p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0; p = p * r + 1.0 / 40320.0; p = p * r + 1.0 / 5040.0; p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0; p = p * r + 1.0 / 24.0; p = p * r + 1.0 / 6.0; p = p * r + 0.5;
    p = p * r + 1.0; p = p * r + 1.0;
  }
  U scale_bits = (bits + K::bias) << K::mantissa;
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  return p * scale;
}

template <typename T>
inline T sigmoid(T y) { return T(1) / (T(1) + exp_clamped<T>(-y)); }

template <typename T>
inline T silu(T y) { return y * sigmoid(y); }

// SiLU'(y) = σ(y)·(1 + y·(1 − σ(y))), given σ(y)
template <typename T>
inline T silu_slope(T y, T sg) { return sg * (T(1) + y * (T(1) - sg)); }

template <typename T>
inline T silu_slope(T y) { return silu_slope(y, sigmoid(y)); }

// Bytes of the vector type of combine(): the target's widest registers.  A 64-byte type on a target without
// AVX-512 is split by GCC 12 through memory: combine() then ran about 3x slower (AVX2 EPYC, float32).
#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
#else
constexpr int VECTOR_BYTES = 32;
#endif

// out[c] = Σ_i w[i·w_stride] rows[i·row_stride + c] over one tile of TILE channels: the accumulator is a few
// vector registers (GCC/Clang vector types of the target's width), one load per multiply-add
template <typename T>
inline void combine(const T* __restrict w, int64_t w_stride, int64_t n, const T* __restrict rows, int64_t row_stride,
                    T* __restrict out) {
  typedef T V __attribute__((vector_size(VECTOR_BYTES)));
  constexpr int L = VECTOR_BYTES / sizeof(T), NV = TILE / L;
  V acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = V{};
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i * w_stride];
    const T* row = rows + i * row_stride;
    for (int j = 0; j < NV; ++j) {
      V r;
      std::memcpy(&r, row + j * L, sizeof(V));
      acc[j] += wi * r;
    }
  }
  for (int j = 0; j < NV; ++j) std::memcpy(out + j * L, &acc[j], sizeof(V));
}

// The same as a loop over an array.  At one call of double_backward (h = Aᵀ·grad) this form, not combine(), keeps
// GCC 12's code for the whole loop fast: with combine() there (inlined or not, or with h summed in place) the
// function ran several times slower.
template <typename T>
inline void combine_loop(const T* __restrict w, int64_t w_stride, int64_t n, const T* __restrict rows,
                         int64_t row_stride, T* __restrict out) {
  alignas(64) T acc[TILE] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i * w_stride];
    const T* row = rows + i * row_stride;
#pragma omp simd aligned(acc : 64)
    for (int c = 0; c < TILE; ++c) acc[c] += wi * row[c];
  }
  for (int c = 0; c < TILE; ++c) out[c] = acc[c];
}

// One tile of channels of one row b: its inputs copied to [n, TILE] buffers (zero-padded past the last channel)
template <typename T>
inline void load_tile(const T* src, int64_t n, int64_t C, int64_t c0, int width, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + i * TILE, src + i * C + c0, width * sizeof(T));
    std::fill(dst + i * TILE + width, dst + (i + 1) * TILE, T(0));
  }
}

template <typename T>
inline void store_tile(const T* src, int64_t n, int64_t C, int64_t c0, int width, T* dst) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * C + c0, src + i * TILE, width * sizeof(T));
}

// out = A · SiLU(S · x)
template <typename T>
void forward(const T* x, const T* S, const T* A, T* out, int64_t B, int64_t K, int64_t G, int64_t KO, int64_t C,
             int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> xbuf(K * TILE), vbuf(G * TILE), obuf(KO * TILE);  // per-thread tiles
    T *xt = xbuf.data(), *values = vbuf.data(), *ot = obuf.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(x + b * K * C, K, C, c0, width, xt);
        for (int64_t g = 0; g < G; ++g) {
          T* y = values + g * TILE;
          combine(S + g * K, 1, K, xt, TILE, y);
#pragma omp simd
          for (int c = 0; c < TILE; ++c) y[c] = silu(y[c]);
        }
        for (int64_t k = 0; k < KO; ++k) combine(A + k * G, 1, G, values, TILE, ot + k * TILE);
        store_tile(ot, KO, C, c0, width, out + b * KO * C);
      }
    }
  }
}

// grad_x = Sᵀ · (SiLU'(S·x) ⊙ (Aᵀ · grad))
template <typename T>
void backward(const T* x, const T* grad, const T* S, const T* A, T* out, int64_t B, int64_t K, int64_t G,
              int64_t KO, int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> xbuf(K * TILE), gbuf(KO * TILE), vbuf(G * TILE), obuf(K * TILE);
    T *xt = xbuf.data(), *gt = gbuf.data(), *values = vbuf.data(), *ot = obuf.data();
    alignas(64) T h[TILE];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(x + b * K * C, K, C, c0, width, xt);
        load_tile(grad + b * KO * C, KO, C, c0, width, gt);
        for (int64_t g = 0; g < G; ++g) {
          T* y = values + g * TILE;
          combine(S + g * K, 1, K, xt, TILE, y);
          combine(A + g, G, KO, gt, TILE, h);
#pragma omp simd
          for (int c = 0; c < TILE; ++c) y[c] = silu_slope(y[c]) * h[c];
        }
        for (int64_t k = 0; k < K; ++k) combine(S + k, K, G, values, TILE, ot + k * TILE);
        store_tile(ot, K, C, c0, width, out + b * K * C);
      }
    }
  }
}

// For the gradient u of grad_x = backward(x, grad):  out_grad = A · (SiLU'(y) ⊙ v),
// out_x = Sᵀ · (SiLU''(y) ⊙ h ⊙ v), with y = S·x, v = S·u, h = Aᵀ·grad.  Either output may be null.
template <typename T>
void double_backward(const T* x, const T* grad, const T* u, const T* S, const T* A, T* out_x, T* out_grad,
                     int64_t B, int64_t K, int64_t G, int64_t KO, int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> xbuf(K * TILE), ubuf(K * TILE), gbuf(KO * TILE), sbuf(G * TILE), cbuf(G * TILE),
        obuf(std::max(K, KO) * TILE);
    T *xt = xbuf.data(), *ut = ubuf.data(), *gt = gbuf.data(), *slope = sbuf.data(), *curv = cbuf.data();
    T* ot = obuf.data();
    alignas(64) T y[TILE];
    alignas(64) T v[TILE];
    alignas(64) T h[TILE];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(x + b * K * C, K, C, c0, width, xt);
        load_tile(u + b * K * C, K, C, c0, width, ut);
        if (out_x) load_tile(grad + b * KO * C, KO, C, c0, width, gt);
        for (int64_t g = 0; g < G; ++g) {
          combine(S + g * K, 1, K, xt, TILE, y);
          combine(S + g * K, 1, K, ut, TILE, v);
          if (out_x) combine_loop(A + g, G, KO, gt, TILE, h);
          T* t1 = slope + g * TILE;
          T* t2 = curv + g * TILE;
#pragma omp simd
          for (int c = 0; c < TILE; ++c) {
            const T sg = sigmoid(y[c]);
            t1[c] = silu_slope(y[c], sg) * v[c];
            t2[c] = sg * (T(1) - sg) * (T(2) + y[c] * (T(1) - T(2) * sg)) * v[c];
          }
          if (out_x) {
#pragma omp simd
            for (int c = 0; c < TILE; ++c) t2[c] *= h[c];
          }
        }
        if (out_grad) {
          for (int64_t k = 0; k < KO; ++k) combine(A + k * G, 1, G, slope, TILE, ot + k * TILE);
          store_tile(ot, KO, C, c0, width, out_grad + b * KO * C);
        }
        if (out_x) {
          for (int64_t k = 0; k < K; ++k) combine(S + k, K, G, curv, TILE, ot + k * TILE);
          store_tile(ot, K, C, c0, width, out_x + b * K * C);
        }
      }
    }
  }
}

// The grid MLP's point-wise steps around its channel-mixing matrix product (which stays with the BLAS):
//   a = SiLU(S·h) on the grid,  out = A·SiLU(p) back to coefficients,  and their gradients.
// Grid values are [B, G, C] tensors here, laid out for that matrix product ([B·G, C] rows).

// a[b, g, :] = SiLU(Σ_k S[g, k] h[b, k, :])
template <typename T>
void mlp_to_grid(const T* h, const T* S, T* a, int64_t B, int64_t K, int64_t G, int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> buf(K * TILE);
    T* ht = buf.data();
    alignas(64) T y[TILE];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(h + b * K * C, K, C, c0, width, ht);
        for (int64_t g = 0; g < G; ++g) {
          combine(S + g * K, 1, K, ht, TILE, y);
#pragma omp simd
          for (int c = 0; c < TILE; ++c) y[c] = silu(y[c]);
          std::memcpy(a + (b * G + g) * C + c0, y, width * sizeof(T));
        }
      }
    }
  }
}

// out[b, k, :] = Σ_g A[k, g] SiLU(p[b, g, :])
template <typename T>
void mlp_from_grid(const T* p, const T* A, T* out, int64_t B, int64_t G, int64_t KO, int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> buf(G * TILE), obuf(KO * TILE);
    T *values = buf.data(), *ot = obuf.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(p + b * G * C, G, C, c0, width, values);
        for (int64_t g = 0; g < G; ++g) {
          T* v = values + g * TILE;
#pragma omp simd
          for (int c = 0; c < TILE; ++c) v[c] = silu(v[c]);
        }
        for (int64_t k = 0; k < KO; ++k) combine(A + k * G, 1, G, values, TILE, ot + k * TILE);
        store_tile(ot, KO, C, c0, width, out + b * KO * C);
      }
    }
  }
}

// grad_p[b, g, :] = SiLU'(p[b, g, :]) ⊙ Σ_k A[k, g] grad[b, k, :]
template <typename T>
void mlp_from_grid_backward(const T* p, const T* grad, const T* A, T* grad_p, int64_t B, int64_t G, int64_t KO,
                            int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> buf(KO * TILE);
    T* gt = buf.data();
    alignas(64) T h[TILE];
    alignas(64) T v[TILE];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(grad + b * KO * C, KO, C, c0, width, gt);
        for (int64_t g = 0; g < G; ++g) {
          combine(A + g, G, KO, gt, TILE, h);
          std::memcpy(v, p + (b * G + g) * C + c0, width * sizeof(T));
          std::fill(v + width, v + TILE, T(0));
#pragma omp simd
          for (int c = 0; c < TILE; ++c) v[c] = silu_slope(v[c]) * h[c];
          std::memcpy(grad_p + (b * G + g) * C + c0, v, width * sizeof(T));
        }
      }
    }
  }
}

// grad_h[b, k, :] = Σ_g S[g, k] SiLU'(y[b, g, :]) ⊙ grad_a[b, g, :],  y = S·h
template <typename T>
void mlp_to_grid_backward(const T* h, const T* grad_a, const T* S, T* grad_h, int64_t B, int64_t K, int64_t G,
                          int64_t C, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> hbuf(K * TILE), vbuf(G * TILE), obuf(K * TILE);
    T *ht = hbuf.data(), *values = vbuf.data(), *ot = obuf.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int width = static_cast<int>(std::min<int64_t>(TILE, C - c0));
        load_tile(h + b * K * C, K, C, c0, width, ht);
        load_tile(grad_a + b * G * C, G, C, c0, width, values);
        for (int64_t g = 0; g < G; ++g) {
          alignas(64) T y[TILE];
          combine(S + g * K, 1, K, ht, TILE, y);
          T* v = values + g * TILE;
#pragma omp simd
          for (int c = 0; c < TILE; ++c) v[c] *= silu_slope(y[c]);
        }
        for (int64_t k = 0; k < K; ++k) combine(S + k, K, G, values, TILE, ot + k * TILE);
        store_tile(ot, K, C, c0, width, grad_h + b * K * C);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Node pairs rotated into each edge's frame (the input of the eSCN / EquiformerV2 message), without the gathered
// [E, K, 2C] copy of the pairs:
//   out[e, r, 0:C]  = Σ_k rot[e, r, k] · x[src[e], k, :],    out[e, r, C:2C] = Σ_k rot[e, r, k] · x[dst[e], k, :]
// x [N, K, C], rot [E, R, K], out [E, R, 2C].  rot is block-diagonal in the degree: row r is read only in its
// columns first[r] … first[r] + len[r] − 1 (the others are constant zeros of the model), which also skips their
// multiplications (35 of 81 entries per edge at lmax = mmax = 2).

template <typename T>
void rotate_pairs(const T* x, const T* rot, const int64_t* src, const int64_t* dst, const int64_t* first,
                  const int64_t* len, T* out, int64_t E, int64_t R, int64_t K, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t e = 0; e < E; ++e) {
    const T* re = rot + e * R * K;
    for (int half = 0; half < 2; ++half) {
      const T* xn = x + (half ? dst[e] : src[e]) * K * C;
      for (int64_t r = 0; r < R; ++r) {
        T* o = out + (e * R + r) * 2 * C + half * C;
        const int64_t k0 = first[r], k1 = first[r] + len[r];
        const T a0 = re[r * K + k0];
        const T* x0 = xn + k0 * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = a0 * x0[c];
        for (int64_t k = k0 + 1; k < k1; ++k) {
          const T a = re[r * K + k];
          const T* xk = xn + k * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] += a * xk[c];
        }
      }
    }
  }
}

// y += a·u over C channels, returning Σ u·v (the two halves of a rotation's gradient in one pass over u)
template <typename T>
inline T axpy_dot(T a, const T* u, const T* v, T* y, int64_t C) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < C; ++c) {
    y[c] += a * u[c];
    dot += u[c] * v[c];
  }
  return dot;
}

// Its gradient for the output gradient grad [E, R, 2C], node by node (no two threads write one row):
//   grad_x[n]  = Σ_{e: src[e] = n} rot[e]ᵀ · grad[e, :, 0:C] + Σ_{e: dst[e] = n} rot[e]ᵀ · grad[e, :, C:2C]
//   grad_rot[h, e, r, k] = Σ_c grad[e, r, hC + c] · x[node_h(e), k, c]   (h = 0: src, 1: dst; 0 outside the blocks)
// order [2, E]: edges sorted by src, then by dst; start [2, N + 1]: where each node's edges begin in them.
template <typename T>
void rotate_pairs_backward(const T* x, const T* rot, const T* grad, const int64_t* order, const int64_t* start,
                           const int64_t* first, const int64_t* len, T* grad_x, T* grad_rot, int64_t N, int64_t E,
                           int64_t R, int64_t K, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
  for (int64_t n = 0; n < N; ++n) {
    T* gx = grad_x + n * K * C;
    std::fill(gx, gx + K * C, T(0));
    const T* xn = x + n * K * C;
    for (int half = 0; half < 2; ++half) {
      const int64_t* st = start + half * (N + 1);
      for (int64_t i = st[n]; i < st[n + 1]; ++i) {
        const int64_t e = order[half * E + i];
        const T* re = rot + e * R * K;
        T* gr = grad_rot + (half * E + e) * R * K;
        std::fill(gr, gr + R * K, T(0));
        for (int64_t r = 0; r < R; ++r) {
          const T* g = grad + (e * R + r) * 2 * C + half * C;
          for (int64_t k = first[r]; k < first[r] + len[r]; ++k)
            gr[r * K + k] = axpy_dot(re[r * K + k], g, xn + k * C, gx + k * C, C);
        }
      }
    }
  }
}

// Messages rotated back from the edge frames and summed into their centres (the output of the eSCN / EquiformerV2
// message passing), node by node:  out[n] = Σ_{e: dst[e] = n} rot[e]ᵀ · msg[e]
// msg [E, R, C], rot [E, R, K] (block-diagonal as above), out [N, K, C]; order, start: the dst half of the
// incidence arrays of rotate_pairs_backward.
template <typename T>
void rotate_back_sum(const T* msg, const T* rot, const int64_t* order, const int64_t* start, const int64_t* first,
                     const int64_t* len, T* out, int64_t N, int64_t R, int64_t K, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * K * C;
    std::fill(o, o + K * C, T(0));
    for (int64_t i = start[n]; i < start[n + 1]; ++i) {
      const int64_t e = order[i];
      const T* re = rot + e * R * K;
      for (int64_t r = 0; r < R; ++r) {
        const T* m = msg + (e * R + r) * C;
        for (int64_t k = first[r]; k < first[r] + len[r]; ++k) {
          const T a = re[r * K + k];
          T* ok = o + k * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ok[c] += a * m[c];
        }
      }
    }
  }
}

// Its gradient for the output gradient grad [N, K, C], edge by edge:
//   grad_msg[e] = rot[e] · grad[dst[e]],   grad_rot[e, r, k] = Σ_c msg[e, r, c] · grad[dst[e], k, c] (0 outside the
//   blocks)
template <typename T>
void rotate_back_sum_backward(const T* msg, const T* rot, const T* grad, const int64_t* dst, const int64_t* first,
                              const int64_t* len, T* grad_msg, T* grad_rot, int64_t E, int64_t R, int64_t K,
                              int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t e = 0; e < E; ++e) {
    const T* re = rot + e * R * K;
    const T* gn = grad + dst[e] * K * C;
    T* gr = grad_rot + e * R * K;
    std::fill(gr, gr + R * K, T(0));
    for (int64_t r = 0; r < R; ++r) {
      const T* m = msg + (e * R + r) * C;
      T* gm = grad_msg + (e * R + r) * C;
      std::fill(gm, gm + C, T(0));
      for (int64_t k = first[r]; k < first[r] + len[r]; ++k)
        gr[r * K + k] = axpy_dot(re[r * K + k], gn + k * C, m, gm, C);
    }
  }
}

}  // namespace

#define EXPORT(T, SUFFIX)                                                                                          \
  extern "C" void grid_silu_forward_##SUFFIX(const T* x, const T* S, const T* A, T* out, int64_t B, int64_t K,     \
                                             int64_t G, int64_t KO, int64_t C, int threads) {                    \
    forward<T>(x, S, A, out, B, K, G, KO, C, threads);                                                             \
  }                                                                                                                \
  extern "C" void grid_silu_backward_##SUFFIX(const T* x, const T* grad, const T* S, const T* A, T* out,          \
                                              int64_t B, int64_t K, int64_t G, int64_t KO, int64_t C,             \
                                              int threads) {                                                      \
    backward<T>(x, grad, S, A, out, B, K, G, KO, C, threads);                                                      \
  }                                                                                                                \
  extern "C" void grid_silu_double_backward_##SUFFIX(const T* x, const T* grad, const T* u, const T* S,           \
                                                     const T* A, T* out_x, T* out_grad, int64_t B, int64_t K,     \
                                                     int64_t G, int64_t KO, int64_t C, int threads) {             \
    double_backward<T>(x, grad, u, S, A, out_x, out_grad, B, K, G, KO, C, threads);                                \
  }

// The grid MLP's steps, with the same trailing sizes (B, K, G, KO, C, threads) as the activation's
#define EXPORT_MLP(T, SUFFIX)                                                                                      \
  extern "C" void mlp_to_grid_##SUFFIX(const T* h, const T* S, T* a, int64_t B, int64_t K, int64_t G, int64_t,    \
                                       int64_t C, int threads) {                                                  \
    mlp_to_grid<T>(h, S, a, B, K, G, C, threads);                                                                  \
  }                                                                                                                \
  extern "C" void mlp_from_grid_##SUFFIX(const T* p, const T* A, T* out, int64_t B, int64_t, int64_t G,           \
                                         int64_t KO, int64_t C, int threads) {                                    \
    mlp_from_grid<T>(p, A, out, B, G, KO, C, threads);                                                             \
  }                                                                                                                \
  extern "C" void mlp_from_grid_backward_##SUFFIX(const T* p, const T* grad, const T* A, T* grad_p, int64_t B,    \
                                                  int64_t, int64_t G, int64_t KO, int64_t C, int threads) {       \
    mlp_from_grid_backward<T>(p, grad, A, grad_p, B, G, KO, C, threads);                                           \
  }                                                                                                                \
  extern "C" void mlp_to_grid_backward_##SUFFIX(const T* h, const T* grad_a, const T* S, T* grad_h, int64_t B,    \
                                                int64_t K, int64_t G, int64_t, int64_t C, int threads) {          \
    mlp_to_grid_backward<T>(h, grad_a, S, grad_h, B, K, G, C, threads);                                            \
  }

#define EXPORT_ROTATION(T, SUFFIX)                                                                                 \
  extern "C" void rotate_pairs_##SUFFIX(const T* x, const T* rot, const int64_t* src, const int64_t* dst,          \
                                        const int64_t* first, const int64_t* len, T* out, int64_t E, int64_t R,   \
                                        int64_t K, int64_t C, int threads) {                                      \
    rotate_pairs<T>(x, rot, src, dst, first, len, out, E, R, K, C, threads);                                       \
  }                                                                                                                \
  extern "C" void rotate_pairs_backward_##SUFFIX(const T* x, const T* rot, const T* grad, const int64_t* order,   \
                                                 const int64_t* start, const int64_t* first, const int64_t* len,  \
                                                 T* grad_x, T* grad_rot, int64_t N, int64_t E, int64_t R,         \
                                                 int64_t K, int64_t C, int threads) {                             \
    rotate_pairs_backward<T>(x, rot, grad, order, start, first, len, grad_x, grad_rot, N, E, R, K, C, threads);   \
  }                                                                                                               \
  extern "C" void rotate_back_sum_##SUFFIX(const T* msg, const T* rot, const int64_t* order, const int64_t* start,  \
                                           const int64_t* first, const int64_t* len, T* out, int64_t N, int64_t R, \
                                           int64_t K, int64_t C, int threads) {                                   \
    rotate_back_sum<T>(msg, rot, order, start, first, len, out, N, R, K, C, threads);                              \
  }                                                                                                                \
  extern "C" void rotate_back_sum_backward_##SUFFIX(const T* msg, const T* rot, const T* grad, const int64_t* dst, \
                                                    const int64_t* first, const int64_t* len, T* grad_msg,        \
                                                    T* grad_rot, int64_t E, int64_t R, int64_t K, int64_t C,      \
                                                    int threads) {                                                \
    rotate_back_sum_backward<T>(msg, rot, grad, dst, first, len, grad_msg, grad_rot, E, R, K, C, threads);         \
  }

EXPORT(float, f32)
EXPORT(double, f64)
EXPORT_MLP(float, f32)
EXPORT_MLP(double, f64)
EXPORT_ROTATION(float, f32)
EXPORT_ROTATION(double, f64)
