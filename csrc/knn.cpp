// Exact k nearest neighbours, streamed in tiles: GEMM per tile (fp32, or bf16 inputs with float32 output) + a running
// candidate merge, then an exact float64 re-score of the candidates.
//
// Definition of the result (shared by every backend and by knn_ref): score(i, j) = sum_t x_it * y_jt evaluated in
// float64 from the float32 inputs (each product is exact in float64); "ip" ranks by the largest score, "l2" by the
// smallest ||x_i||^2 + ||y_j||^2 - 2 score; equal keys go to the lower index. The tile GEMM only proposes
// candidates: every approximate score carries a rigorous error bound delta; each row keeps the candidates whose upper
// bound reaches the k-th largest lower bound seen so far (the only ones that can be in the exact top k), at most C of
// them. Only rows with more than C such near-ties drop candidates; the exact top-k is still guaranteed to lie among
// the kept ones when the worst kept score is more than the bound below the k-th lower bound. Rows where that check
// fails are redone: by an fp32 candidate pass after a bf16 search, by an exact scan after an fp32 one. So the bf16
// candidate search returns bit-identical results to the fp32 one; the precision only changes the speed.
// Inputs whose float32 scores could overflow are searched on copies scaled by powers of two (the re-score reads the
// originals), so every finite input gives the exact result; NaN or Inf raise a ValueError.
// Memory: O(N * C) candidates + one tile of kTileRows x kTileCols scores, never N x M.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "knn.h"

namespace vireid {
namespace {

constexpr int64_t kTileRows = 1024;
constexpr int64_t kTileCols = 1024;

constexpr int64_t kChunk = 16;

VIREID_ALWAYS_INLINE float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
VIREID_ALWAYS_INLINE float load_score(float v) { return v; }
VIREID_ALWAYS_INLINE float load_score(uint16_t v) { return bf16_to_float(v); }

const uint16_t* bf16_rows(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>());
}


// Rounds row r of x (d floats) to bf16 (nearest even; inputs are finite) into out, and returns the squared norms of
// the rounded row and of the rounding residual x - bf16(x) (exact in float32).
template <typename T>
VIREID_ALWAYS_INLINE void round_row_bf16_body(const float* x, uint16_t* out, int64_t d, double* low2, double* err2) {
  // float64 sums of squares: a float32 square of a component below ~2^-63 (or a residual of a row below ~2^-55)
  // would underflow and shrink the bound below the true rounding error.
  double a_low[16] = {0}, a_err[16] = {0};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) {
    for (int u = 0; u < 16; ++u) {
      uint32_t bits;
      std::memcpy(&bits, &x[t + u], sizeof(bits));
      bits += 0x7FFFu + ((bits >> 16) & 1u);
      const uint16_t b = static_cast<uint16_t>(bits >> 16);
      out[t + u] = b;
      const double low = bf16_to_float(b);
      const double err = static_cast<double>(x[t + u]) - low;
      a_low[u] += low * low;
      a_err[u] += err * err;
    }
  }
  for (int u = 0; t < d; ++t, ++u) {
    uint32_t bits;
    std::memcpy(&bits, &x[t], sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    out[t] = static_cast<uint16_t>(bits >> 16);
    const double low = bf16_to_float(out[t]);
    const double err = static_cast<double>(x[t]) - low;
    a_low[u] += low * low;
    a_err[u] += err * err;
  }
  double sl = 0, se = 0;
  for (int u = 0; u < 16; ++u) {
    sl += a_low[u];
    se += a_err[u];
  }
  *low2 = sl;
  *err2 = se;
}
VIREID_MULTIVERSION(round_row_bf16)

// bf16 copy of x (R, d), padded with a zero column to an even width (the float32-output GEMM reads pairs), and, per
// row, the norms of the copy and of the rounding residual.
at::Tensor to_bf16_with_norms(const at::Tensor& x, std::vector<double>& nlow, std::vector<double>& nerr) {
  const int64_t R = x.size(0), d = x.size(1), dp = d + (d & 1);
  at::Tensor out = at::empty({R, dp}, x.options().dtype(at::kBFloat16));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float* xp = x.data_ptr<float>();
  nlow.resize(R);
  nerr.resize(R);
  at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double l2, e2;
      round_row_bf16<float>(xp + r * d, op + r * dp, d, &l2, &e2);
      if (dp != d) op[r * dp + d] = 0;
      // float64 accumulation of d squares: relative error < d * 2^-53, covered by the bound's safety factor.
      nlow[r] = std::sqrt(l2);
      nerr[r] = std::sqrt(e2);
    }
  });
  return out;
}

struct Cand {
  float score;  // approximate score, larger is better (l2: dot - ||y||^2 / 2)
  int32_t index;
};

// a ranks before b: larger score, then lower index.
inline bool ranks_before(float sa, int32_t ia, float sb, int32_t ib) { return sa > sb || (sa == sb && ia < ib); }

struct BestFirst {
  bool operator()(const Cand& a, const Cand& b) const { return ranks_before(a.score, a.index, b.score, b.index); }
};

// What a row's candidate cut needs: the error bound of its approximate scores, delta(s) = bound + rel |s + nyh_j|,
// and dmax >= delta(s) for every score of the row.
struct RowBound {
  double bound, rel, dmax;
  const float* nyh;
  // The relative part applies to the GEMM output, dot = score + ||y_j||^2 / 2 (l2; nyh is 0 for ip).
  double delta(const Cand& c) const { return bound + rel * std::fabs(static_cast<double>(c.score) + nyh[c.index]); }
};

// Cuts a row's candidate buffer h[0, n) back (rarely called: once the buffer holds more than 2C):
// 1. k-rule: L = the k-th largest lower bound s - delta(s) is a lower bound of the exact k-th best score, so entries
//    whose upper bound stays below L can never enter the top k; they are dropped by the conservative test
//    s < L - dmax, and the cut rises to L - dmax. Nothing the result needs is lost, so this never forces a redo.
// 2. C-rule: if more than C entries survive (many near-ties), the best C are kept and cut->index records that
//    entries were dropped that the final check must account for.
// Returns the new size.
int64_t compact_candidates(Cand* h, int64_t n, int64_t k, int64_t C, const RowBound& rb, Cand* cut,
                           std::vector<double>& lower) {
  lower.resize(n);
  for (int64_t c = 0; c < n; ++c) lower[c] = h[c].score - rb.delta(h[c]);
  std::nth_element(lower.begin(), lower.begin() + (k - 1), lower.begin() + n, std::greater<double>());
  const double kcut_exact = lower[k - 1] - rb.dmax;
  float kcut = static_cast<float>(kcut_exact);
  if (static_cast<double>(kcut) > kcut_exact) kcut = std::nextafter(kcut, -std::numeric_limits<float>::infinity());
  int64_t w = 0;
  for (int64_t c = 0; c < n; ++c) {
    h[w] = h[c];
    w += h[c].score >= kcut;
  }
  if (kcut > cut->score) cut->score = kcut;
  if (w > C) {
    std::nth_element(h, h + (C - 1), h + w, BestFirst());
    *cut = h[C - 1];
    w = C;
  }
  return w;
}

// Merges one row of scores (columns j0..j0+ncols, minus sub) into a row's candidates: an unsorted buffer h of up to
// 2C + kChunk entries, cut back (compact_candidates) once it holds more than 2C; cut->score only rises. A vectorised
// check per chunk skips the chunks holding no score >= the cut; the others are appended branch-free (entries below
// the cut are overwritten by the next one).
template <typename T, bool kSub>
VIREID_ALWAYS_INLINE void merge_scores_impl(const T* s_row, const float* sub, int64_t j0, int64_t ncols, Cand* h,
                                            int64_t k, int64_t C, const RowBound& rb, int64_t* n_io, Cand* cut_io,
                                            std::vector<double>& scratch) {
  auto score = [&](int64_t c) { return kSub ? load_score(s_row[c]) - sub[c] : load_score(s_row[c]); };
  int64_t n = *n_io;
  Cand cut = *cut_io;
  for (int64_t c0 = 0; c0 < ncols; c0 += kChunk) {
    const int64_t c1 = std::min(ncols, c0 + kChunk);
    int any = 0;
    for (int64_t c = c0; c < c1; ++c) any |= score(c) >= cut.score;
    if (!any) continue;
    if (n > 2 * C) n = compact_candidates(h, n, k, C, rb, &cut, scratch);
    for (int64_t c = c0; c < c1; ++c) {
      const float s = score(c);
      h[n] = {s, static_cast<int32_t>(j0 + c)};
      n += s >= cut.score;
    }
  }
  *n_io = n;
  *cut_io = cut;
}

// sub == nullptr: nothing to subtract (ip), which keeps the chunk check to one load per score.
template <typename T>
VIREID_ALWAYS_INLINE void merge_scores_body(const T* s_row, const float* sub, int64_t j0, int64_t ncols, Cand* h,
                                            int64_t k, int64_t C, const RowBound& rb, int64_t* n_io, Cand* cut_io,
                                            std::vector<double>& scratch) {
  if (sub == nullptr)
    merge_scores_impl<T, false>(s_row, sub, j0, ncols, h, k, C, rb, n_io, cut_io, scratch);
  else
    merge_scores_impl<T, true>(s_row, sub, j0, ncols, h, k, C, rb, n_io, cut_io, scratch);
}
VIREID_MULTIVERSION(merge_scores)


// Exact keys (smaller is better) of candidates `idx` for query row x_i.
template <typename T>
VIREID_ALWAYS_INLINE void exact_keys_body(const float* xi, double nx2, const float* y, const double* ny2, int64_t d,
                                          bool l2, const int32_t* idx, int64_t n, double* key) {
  for (int64_t c = 0; c < n; ++c) {
    const double s = dot_exact_body<T>(xi, y + static_cast<int64_t>(idx[c]) * d, d);
    key[c] = l2 ? nx2 + ny2[idx[c]] - 2.0 * s : -s;
  }
}
VIREID_MULTIVERSION(exact_keys)

struct Exact {
  double key;
  int32_t index;
  bool operator<(const Exact& o) const { return key < o.key || (key == o.key && index < o.index); }
};

// Writes the k best of `pool` (exact keys) to the output row.
void write_row(std::vector<Exact>& pool, int64_t k, bool l2, float* vals, int64_t* inds) {
  std::partial_sort(pool.begin(), pool.begin() + k, pool.end());
  for (int64_t t = 0; t < k; ++t) {
    const double key = pool[t].key;
    vals[t] = static_cast<float>(l2 ? std::max(key, 0.0) : -key);
    inds[t] = pool[t].index;
  }
}

double row_sq_norm(const float* v, int64_t d) { return dot_exact<float>(v, v, d); }

// Exact keys of the queries rows[0, n) (sorted) of x against one candidate row y_j (given as float64 yd).
template <typename T>
VIREID_ALWAYS_INLINE void exact_keys_of_candidate_body(const float* x, const double* nx2, const int32_t* rows,
                                                       double* const* out, int64_t n, const float* yj, double* yd,
                                                       double ny2j, int64_t d, bool l2) {
  for (int64_t t = 0; t < d; ++t) yd[t] = static_cast<double>(yj[t]);
  double key = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    if (c == 0 || rows[c] != rows[c - 1]) {  // rows come sorted: a repeated pair is scored once
      const double s = dot_exact_body<T>(x + static_cast<int64_t>(rows[c]) * d, yd, d);
      key = l2 ? nx2[rows[c]] + ny2j - 2.0 * s : -s;
    }
    *out[c] = key;
  }
}
VIREID_MULTIVERSION(exact_keys_of_candidate)

// Exact keys of (row, candidate) pairs: row i of x owns pairs [ptr[i], ptr[i + 1]); pair(i, t) returns the
// candidate's row of y and where to store its key. Within each block of ~8 MB of query rows (they stay in the last-
// level cache), the pairs are sorted by candidate: each candidate row is read and converted to float64 once per
// block, and candidates come in increasing order. symmetric (x is y): the pair (i, j) is scored as (min, max), so
// that it and its mirror (j, i), whose keys are the same bits (the products commute, the summation order is fixed),
// meet and are scored once; in clustered data ~45% of the pairs are such mirrors.
template <typename PairFn>
void exact_keys_blocked(const float* x, const double* nx2, int64_t N, const float* y, const double* ny2, int64_t M,
                        int64_t d, bool l2, bool symmetric, const std::vector<int64_t>& ptr, PairFn pair) {
  const int64_t total = ptr[N];
  if (total == 0) return;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(float));
  const int64_t rows_per_block = std::max<int64_t>(16, (int64_t{8} << 20) / row_bytes);
  const int64_t row_blocks = (N + rows_per_block - 1) / rows_per_block;
  // The pairs by the row block of their query row.
  std::vector<int32_t> query(total), cand(total);
  std::vector<double*> dest(total);
  std::vector<int64_t> block_start(row_blocks + 1, 0);
  {
    auto oriented = [&](int64_t i, int32_t j) {
      return symmetric && j < i ? std::pair<int32_t, int32_t>(j, static_cast<int32_t>(i))
                                : std::pair<int32_t, int32_t>(static_cast<int32_t>(i), j);
    };
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < ptr[i + 1] - ptr[i]; ++t)
        block_start[oriented(i, pair(i, t).first).first / rows_per_block + 1]++;
    for (int64_t b = 0; b < row_blocks; ++b) block_start[b + 1] += block_start[b];
    std::vector<int64_t> fill(block_start.begin(), block_start.end() - 1);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < ptr[i + 1] - ptr[i]; ++t) {
        const auto [j, out] = pair(i, t);
        const auto [q, c] = oriented(i, j);
        const int64_t slot = fill[q / rows_per_block]++;
        query[slot] = q;
        cand[slot] = c;
        dest[slot] = out;
      }
  }
  // Within each block, a counting sort by candidate; each candidate's run is then sorted by query row.
  std::vector<int32_t> item_row(total);
  std::vector<double*> item_out(total);
  std::vector<int32_t> run_col;    // candidate of each run of pairs sharing it
  std::vector<int64_t> run_start;  // and where the run starts in item_row / item_out
  std::vector<int64_t> block_runs(row_blocks + 1, 0);
  {
    std::vector<std::vector<int32_t>> cols(row_blocks);
    std::vector<std::vector<int64_t>> starts(row_blocks);
    at::parallel_for(0, row_blocks, 1, [&](int64_t rb0, int64_t rb1) {
      std::vector<int64_t> count(M + 1);
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int64_t p0 = block_start[rb], p1 = block_start[rb + 1];
        std::fill(count.begin(), count.end(), 0);
        for (int64_t p = p0; p < p1; ++p) count[cand[p] + 1]++;
        for (int64_t j = 0; j < M; ++j) {
          if (count[j + 1] > 0) {
            cols[rb].push_back(static_cast<int32_t>(j));
            starts[rb].push_back(p0 + count[j]);
          }
          count[j + 1] += count[j];
        }
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t slot = p0 + count[cand[p]]++;
          item_row[slot] = query[p];
          item_out[slot] = dest[p];
        }
        for (size_t r = 0; r < starts[rb].size(); ++r) {  // runs are short (tens of pairs): insertion sort
          const int64_t first = starts[rb][r], last = r + 1 < starts[rb].size() ? starts[rb][r + 1] : p1;
          for (int64_t a = first + 1; a < last; ++a) {
            const int32_t row = item_row[a];
            double* const out = item_out[a];
            int64_t b = a;
            for (; b > first && item_row[b - 1] > row; --b) {
              item_row[b] = item_row[b - 1];
              item_out[b] = item_out[b - 1];
            }
            item_row[b] = row;
            item_out[b] = out;
          }
        }
      }
    });
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      block_runs[rb + 1] = block_runs[rb] + static_cast<int64_t>(cols[rb].size());
      run_col.insert(run_col.end(), cols[rb].begin(), cols[rb].end());
      run_start.insert(run_start.end(), starts[rb].begin(), starts[rb].end());
    }
  }
  // Parallel over the candidates of a row block: the threads share its query rows in the cache.
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    const int64_t end_of_block = block_start[rb + 1];
    at::parallel_for(block_runs[rb], block_runs[rb + 1], 16, [&](int64_t r0, int64_t r1) {
      std::vector<double> yd(d);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t first = run_start[r];
        const int64_t last = r + 1 < block_runs[rb + 1] ? run_start[r + 1] : end_of_block;
        const int32_t j = run_col[r];
        exact_keys_of_candidate<float>(x, nx2, item_row.data() + first, item_out.data() + first, last - first,
                                       y + static_cast<int64_t>(j) * d, yd.data(), ny2[j], d, l2);
      }
    });
  }
}

// Searches every row of x against y, writing the exact top-k to vp/ip (row-major, k per row). Rows whose candidate
// margin is too thin are either redone here by an exact scan (bf16 == false) or returned for an fp32 pass.
// split > 0 (with self): x = [a; b] with a = rows [0, split); rows of a search b and rows of b search a, each tile
// of a x b scored once and merged both ways (candidate indices stay in x's numbering).
std::vector<int64_t> knn_impl(const at::Tensor& x, const at::Tensor& y, int64_t k, bool l2, bool bf16, bool self,
                              float* vp, int64_t* ip, int64_t split = 0) {
  const int64_t N = x.size(0), M = y.size(0), d = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  // ---- norms and the error bound of the approximate scores ----
  // Exact squared norms in float64 (finite for every finite float32 row: at most d * 2^256).
  std::vector<double> nx2(N), ny2(M);
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) nx2[i] = row_sq_norm(xp + i * d, d);
  });
  at::parallel_for(0, M, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) ny2[j] = row_sq_norm(yp + j * d, d);
  });
  double nx2_max = 0, ny2_max = 0;
  bool finite = true;
  for (int64_t i = 0; i < N; ++i) {
    finite &= std::isfinite(nx2[i]);
    nx2_max = std::max(nx2_max, nx2[i]);
  }
  for (int64_t j = 0; j < M; ++j) {
    finite &= std::isfinite(ny2[j]);
    ny2_max = std::max(ny2_max, ny2[j]);
  }
  TORCH_CHECK_VALUE(finite, "vireid::knn: the features contain NaN or Inf; clean them (e.g. torch.nan_to_num) "
                    "before the search");
  // The candidate search runs on copies scaled by powers of two when the float32 scores could overflow (or sink to
  // the bound's absolute floor): the scaled scores are the exact ones times 2^(ex + ey), up to the underflow of
  // components below 2^-126, which the bound covers. The exact re-score always reads the original rows.
  int ex = 0, ey = 0;
  {
    const double nx_max = std::sqrt(nx2_max), ny_max0 = std::sqrt(ny2_max);
    auto to_unit = [](double v) { return v > 0 ? -std::ilogb(v) : 0; };  // 2^e v in [1, 2)
    auto outside = [](double p) { return p > std::ldexp(1.0, 50) || (p > 0 && p < std::ldexp(1.0, -50)); };
    if (self || l2) {  // one scale: the symmetric search shares its operand, l2 mixes dot and ||y||^2
      const double m = std::max(nx_max, ny_max0);
      if (outside(m * m)) ex = ey = to_unit(m);
    } else if (outside(nx_max * ny_max0)) {
      ex = to_unit(nx_max);
      ey = to_unit(ny_max0);
    }
  }
  const bool scaled = ex != 0 || ey != 0;
  auto scale_copy = [&](const at::Tensor& t, int e) {
    at::Tensor out = at::empty_like(t);
    const float* src = t.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t b, int64_t f) {
      for (int64_t u = b; u < f; ++u) dst[u] = static_cast<float>(std::ldexp(static_cast<double>(src[u]), e));
    });
    return out;
  };
  const at::Tensor xs = scaled ? scale_copy(x, ex) : x;
  const at::Tensor ys = !scaled ? y : self ? xs : scale_copy(y, ey);
  // Squared norms of the search operands (the originals' unless scaled).
  std::vector<double> sx2_store, sy2_store;
  if (scaled) {
    const float* xsp = xs.data_ptr<float>();
    const float* ysp = ys.data_ptr<float>();
    sx2_store.resize(N);
    sy2_store.resize(M);
    at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sx2_store[i] = row_sq_norm(xsp + i * d, d);
    });
    at::parallel_for(0, M, 256, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) sy2_store[j] = row_sq_norm(ysp + j * d, d);
    });
  }
  const double* sx2 = scaled ? sx2_store.data() : nx2.data();
  const double* sy2 = scaled ? sy2_store.data() : ny2.data();
  const double sy2_max = scaled ? *std::max_element(sy2, sy2 + M) : ny2_max;
  const double sy_max = std::sqrt(sy2_max);
  const double u32 = std::ldexp(1.0, -24);
  const double gamma = (d + 2) * u32 / (1.0 - (d + 2) * u32);  // accumulation error factor of any fp32 summation
  // Denormal inputs, products, sums or scaled components flushed to zero: each costs at most 2^-126 (an input
  // component, weighted by the other row's norm) in the search's units.
  auto underflow = [&](double nxi, double ny) {
    return std::ldexp(1.0, -124) * (static_cast<double>(d) + std::sqrt(static_cast<double>(d)) * (nxi + ny + 1.0));
  };
  // bf16: a float32-output bf16 GEMM when the CPU has one (no output rounding), else ATen's bf16 matmul (bf16 out).
  const bool f32_out = bf16 && bf16_gemm_kind() != Bf16Gemm::kNone;
  at::Tensor xa, ya;                                           // the GEMM operands
  std::vector<double> bound(N);                                // absolute part of delta_i
  double rel = 0.0;                                            // relative part (of |approximate score|)
  if (bf16) {
    std::vector<double> nxa, nxe, nya, nye;
    xa = to_bf16_with_norms(xs, nxa, nxe);
    if (self) {
      ya = xa;
      nya = nxa;
      nye = nxe;
    } else {
      ya = to_bf16_with_norms(ys, nya, nye);
    }
    const double nya_max = *std::max_element(nya.begin(), nya.end());
    const double nye_max = *std::max_element(nye.begin(), nye.end());
    if (!f32_out) {
      const double ub = std::ldexp(1.0, -8);
      rel = ub / (1.0 - ub);
    }
    // input rounding (x - x~).y + x~.(y - y~), then the float32 accumulation of the bf16 products (exact each).
    for (int64_t i = 0; i < N; ++i)
      bound[i] = gamma * nxa[i] * nya_max * (1.0 + rel) + nxe[i] * sy_max + nxa[i] * nye_max +
                 underflow(nxa[i], nya_max);
  } else {
    xa = xs;
    ya = ys;
    // If matmuls may run in reduced precision (torch.set_float32_matmul_precision), bound them like bf16 inputs.
    const bool reduced = at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
    const double input_err = reduced ? 2.0 * std::ldexp(1.0, -8) : 0.0;
    for (int64_t i = 0; i < N; ++i)
      bound[i] = (gamma + input_err) * std::sqrt(sx2[i]) * sy_max + underflow(std::sqrt(sx2[i]), sy_max);
  }
  // The l2 score dot - ||y||^2/2 is formed in float: two more roundings.
  std::vector<float> nyh(M, 0.0f);  // ip: zeros
  if (l2) {
    for (int64_t j = 0; j < M; ++j) nyh[j] = static_cast<float>(0.5 * sy2[j]);
    for (int64_t i = 0; i < N; ++i) bound[i] += 4.0 * u32 * (std::sqrt(sx2[i]) * sy_max * (1.0 + rel) + sy2_max);
  }
  const double safety = 1.25;  // covers the rounding of the norms above
  for (int64_t i = 0; i < N; ++i) bound[i] = safety * bound[i] + 1e-30;
  rel *= safety;

  // ---- tiled candidate search ----
  // bf16 scores carry a ~40x wider bound, so clustered rows hold more near-ties to re-score: a deeper pool keeps
  // them from falling back to the fp32 pass (at N=12,000, k=30, 600 identities, 42% of rows overflow a pool of 2k;
  // in CMFP's cross-modality blocks 7% overflow 4k).
  const int64_t C = std::min<int64_t>(M, k + (bf16 ? std::max<int64_t>(5 * k, 64) : std::max<int64_t>(k, 16)));
  const int64_t cap = 2 * C + kChunk;  // the buffer is cut back to C once it holds more than 2C
  std::vector<Cand> heaps;
  heaps.reserve(static_cast<size_t>(N) * cap);
  advise_huge_pages(heaps.data(), static_cast<size_t>(N) * cap * sizeof(Cand));
  heaps.resize(static_cast<size_t>(N) * cap);
  std::vector<int64_t> sizes(N, 0);
  // Before the first cut every score enters: the cut starts as the worst possible entry.
  std::vector<Cand> cuts(N, Cand{-std::numeric_limits<float>::infinity(), std::numeric_limits<int32_t>::max()});
  const double rel_eff = rel * (1.0 + 4.0 * u32);  // the relative part applies to the GEMM output (dot)
  auto row_bound = [&](int64_t i) {
    // |dot| <= ||x_i|| ||y||_max exactly; the approximate one exceeds it by at most its own error.
    const double dot_max = (std::sqrt(sx2[i]) * sy_max * (1.0 + 2.0 * rel) + bound[i]) / (1.0 - rel);
    return RowBound{bound[i], rel_eff, (bound[i] + rel_eff * dot_max) * (1.0 + 1e-6), nyh.data()};
  };
  auto merge_row = [&](int64_t i, const float* s_row, const uint16_t* s_row_b, int64_t j0, int64_t ncols,
                       std::vector<double>& scratch) {
    Cand* h = heaps.data() + i * cap;
    const RowBound rb = row_bound(i);
    const float* sub = l2 ? nyh.data() + j0 : nullptr;
    if (s_row)
      merge_scores<float>(s_row, sub, j0, ncols, h, k, C, rb, &sizes[i], &cuts[i], scratch);
    else
      merge_scores<uint16_t>(s_row_b, sub, j0, ncols, h, k, C, rb, &sizes[i], &cuts[i], scratch);
  };
  // Rows [r0, r1) of a score tile (one row per query row, columns col0..) into their rows' candidates.
  auto merge_tile = [&](const at::Tensor& t, int64_t r0, int64_t r1, int64_t col0) {
    const int64_t width = t.size(1);
    at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
      std::vector<double> scratch;
      for (int64_t i = b; i < e; ++i) {
        if (t.scalar_type() == at::kBFloat16)
          merge_row(i, nullptr, bf16_rows(t) + (i - r0) * width, col0, width, scratch);
        else
          merge_row(i, t.data_ptr<float>() + (i - r0) * width, nullptr, col0, width, scratch);
      }
    });
  };
  const int64_t row_end = split > 0 ? split : N;
  for (int64_t i0 = 0; i0 < row_end; i0 += kTileRows) {
    const int64_t i1 = std::min(row_end, i0 + kTileRows);
    const at::Tensor xb = xa.slice(0, i0, i1);
    for (int64_t j0 = split > 0 ? split : self ? i0 : 0; j0 < M; j0 += kTileCols) {
      const int64_t j1 = std::min(M, j0 + kTileCols);
      at::Tensor tile;
      if (f32_out) {
        tile = at::empty({i1 - i0, j1 - j0}, xs.options());
        gemm_bf16_f32_nt(tile.data_ptr<float>(), j1 - j0, bf16_rows(xa) + i0 * xa.size(1), i1 - i0,
                         bf16_rows(ya) + j0 * ya.size(1), j1 - j0, xa.size(1), bf16_gemm_kind());
      } else {
        tile = at::empty({i1 - i0, j1 - j0}, xa.options());
        gemm_nt_out(tile, xb, ya.slice(0, j0, j1));
      }
      merge_tile(tile, i0, i1, j0);
      // Symmetric search: the same tile, transposed, serves rows j0..j1 against columns i0..i1.
      if (self && (split > 0 || j0 > i0)) merge_tile(tile.t().contiguous(), j0, j1, i0);
    }
  }

  // ---- exact re-score of the candidates that can still be in the top k ----
  // Per row: the live candidates (upper bound >= the k-th largest lower bound L), the k best by approximate score
  // first. Their exact scores come in two passes of exact_keys_blocked: first those k (the exact top k nearly
  // always); then, with the k-th exact score E in hand, only the rest whose upper bound reaches E.
  std::vector<char> overflow(N, 0);
  std::vector<int64_t> live_n(N, 0);
  at::parallel_for(0, N, 32, [&](int64_t b, int64_t e) {
    std::vector<double> lower(C), scratch;
    for (int64_t i = b; i < e; ++i) {
      Cand* h = heaps.data() + i * cap;
      int64_t n = sizes[i];
      const RowBound rb = row_bound(i);
      if (n > C) n = compact_candidates(h, n, k, C, rb, &cuts[i], scratch);
      if (n < k) {  // cannot happen with finite scores; if it ever did, the row is redone, never read past its end
        overflow[i] = 1;
        continue;
      }
      const bool dropped = cuts[i].index != std::numeric_limits<int32_t>::max();
      Cand worst = h[0];
      for (int64_t c = 1; c < n; ++c)
        if (ranks_before(worst.score, worst.index, h[c].score, h[c].index)) worst = h[c];
      // L = k-th largest lower bound: the exact k-th best score is at least L.
      for (int64_t c = 0; c < n; ++c) lower[c] = h[c].score - rb.delta(h[c]);
      std::nth_element(lower.begin(), lower.begin() + (k - 1), lower.begin() + n, std::greater<double>());
      const double L = lower[k - 1];
      // Dropped columns scored at most the worst kept one; its upper bound must stay below L.
      // A dropped column j scored s <= worst.score; s + rel |s + nyh_j| grows with s, and nyh_j <= ||y||_max^2 / 2.
      const double worst_upper = static_cast<double>(worst.score) + bound[i] +
                                 rel_eff * (std::fabs(static_cast<double>(worst.score)) + 0.5 * sy2_max);
      if (dropped && worst_upper >= L) {
        overflow[i] = 1;
        continue;
      }
      int64_t w = 0;
      for (int64_t c = 0; c < n; ++c)
        if (static_cast<double>(h[c].score) + rb.delta(h[c]) >= L) h[w++] = h[c];
      // The head pass takes slots [0, k), the tail pass the rest: only that split needs the approximate order.
      if (w > k) std::nth_element(h, h + (k - 1), h + w, BestFirst());
      live_n[i] = w;
    }
  });
  std::vector<int64_t> key_off(N + 1, 0);
  for (int64_t i = 0; i < N; ++i) key_off[i + 1] = key_off[i] + live_n[i];
  std::vector<double> keys(key_off[N], std::numeric_limits<double>::quiet_NaN());
  // Head pass: the first min(k, live) candidates of every row.
  std::vector<int64_t> pairs_ptr(N + 1, 0);
  for (int64_t i = 0; i < N; ++i) pairs_ptr[i + 1] = pairs_ptr[i] + std::min<int64_t>(k, live_n[i]);
  exact_keys_blocked(xp, nx2.data(), N, yp, ny2.data(), M, d, l2, self, pairs_ptr, [&](int64_t i, int64_t t) {
    return std::pair<int32_t, double*>(heaps[i * cap + t].index, &keys[key_off[i] + t]);
  });
  // Tail pass: the remaining live candidates whose upper bound reaches the k-th exact score of the head.
  std::vector<std::vector<int32_t>> tail(N);
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    std::vector<double> head;
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = live_n[i];
      if (overflow[i] || n <= k) continue;
      head.assign(keys.begin() + key_off[i], keys.begin() + key_off[i] + k);
      const double kth_key = *std::max_element(head.begin(), head.end());
      // the k-th exact key as a score (ip: -key, l2: (||x||^2 - key) / 2)
      // (in the search's units: the exact scores times 2^(ex + ey), a power of two, exact in float64)
      const double e_exact = l2 ? 0.5 * (nx2[i] - kth_key) : -kth_key;
      const double e_score = std::ldexp(e_exact, ex + ey);
      const double slack =
          std::ldexp(16.0 * std::ldexp(1.0, -52) * (std::fabs(e_exact) + nx2[i] + ny2_max), ex + ey);
      const RowBound rb = row_bound(i);
      for (int64_t t = k; t < n; ++t) {
        const Cand& c = heaps[i * cap + t];
        if (static_cast<double>(c.score) + rb.delta(c) + slack >= e_score)
          tail[i].push_back(static_cast<int32_t>(t));
      }
    }
  });
  for (int64_t i = 0; i < N; ++i) pairs_ptr[i + 1] = pairs_ptr[i] + static_cast<int64_t>(tail[i].size());
  exact_keys_blocked(xp, nx2.data(), N, yp, ny2.data(), M, d, l2, self, pairs_ptr, [&](int64_t i, int64_t t) {
    const int64_t slot = tail[i][t];
    return std::pair<int32_t, double*>(heaps[i * cap + slot].index, &keys[key_off[i] + slot]);
  });
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    std::vector<Exact> pool;
    for (int64_t i = b; i < e; ++i) {
      if (overflow[i]) continue;
      pool.clear();
      for (int64_t t = 0; t < live_n[i]; ++t) {
        const double key = keys[key_off[i] + t];
        if (!std::isnan(key)) pool.push_back({key, heaps[i * cap + t].index});  // NaN: pruned, never scored
      }
      if (static_cast<int64_t>(pool.size()) < k) {  // as above: redo rather than read past the pool
        overflow[i] = 1;
        continue;
      }
      write_row(pool, k, l2, vp + i * k, ip + i * k);
    }
  });
  // Rows whose candidate margin was too thin (near-ties beyond C): exact scan over all of y.
  std::vector<int64_t> redo;
  for (int64_t i = 0; i < N; ++i)
    if (overflow[i]) redo.push_back(i);
  if (bf16) return redo;
  if (!redo.empty()) {
    std::vector<int32_t> all(M);
    for (int64_t j = 0; j < M; ++j) all[j] = static_cast<int32_t>(j);
    at::parallel_for(0, static_cast<int64_t>(redo.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<double> keys(M);
      std::vector<Exact> pool(M);
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = redo[r];
        // split: the other side only
        const int64_t j0 = split > 0 && i < split ? split : 0, j1 = split > 0 && i >= split ? split : M;
        exact_keys<float>(xp + i * d, nx2[i], yp, ny2.data(), d, l2, all.data() + j0, j1 - j0, keys.data());
        pool.resize(j1 - j0);
        for (int64_t j = j0; j < j1; ++j) pool[j - j0] = {keys[j - j0], static_cast<int32_t>(j)};
        write_row(pool, k, l2, vp + i * k, ip + i * k);
      }
    });
  }
  return {};
}

// Rows `rows` of x whose bf16 candidate margin was too thin: an fp32 candidate pass over them against db (the same
// exact result), written to those rows of vp/ip (k per row) with index_offset added to the indices.
void redo_fp32(const at::Tensor& x, const std::vector<int64_t>& rows, const at::Tensor& db, int64_t k, bool l2,
               int64_t index_offset, float* vp, int64_t* ip) {
  if (rows.empty()) return;
  const int64_t R = static_cast<int64_t>(rows.size());
  const at::Tensor sel = at::from_blob(const_cast<int64_t*>(rows.data()), {R}, at::kLong).clone();
  const at::Tensor q = x.index_select(0, sel).contiguous();
  std::vector<float> rv(R * k);
  std::vector<int64_t> ri(R * k);
  knn_impl(q, db, k, l2, false, false, rv.data(), ri.data());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < k; ++t) {
      vp[rows[r] * k + t] = rv[r * k + t];
      ip[rows[r] * k + t] = ri[r * k + t] + index_offset;
    }
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k,
                                           c10::string_view metric_sv, c10::string_view precision_sv) {
  const std::string metric(metric_sv), precision(precision_sv);
  TORCH_CHECK(x_in.dim() == 2 && y_in.dim() == 2, "vireid::knn: x and y must be 2-D, got ", x_in.sizes(), " and ",
              y_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat,
              "vireid::knn: x and y must be float32");
  TORCH_CHECK(x_in.size(1) == y_in.size(1), "vireid::knn: x and y must have the same number of columns");
  TORCH_CHECK(metric == "ip" || metric == "l2", "vireid::knn: metric must be 'ip' or 'l2', got ", metric);
  TORCH_CHECK(precision == "fp32" || precision == "bf16", "vireid::knn: precision must be 'fp32' or 'bf16'");
  check_finite(x_in, "x");
  if (!y_in.is_same(x_in)) check_finite(y_in, "y");
  return knn_exact(x_in, y_in, k, metric == "l2", precision == "bf16");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_exact_both(const at::Tensor& a, const at::Tensor& b,
                                                                          int64_t k, bool l2, bool bf16) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 &&
                  a.size(1) == b.size(1),
              "vireid::knn: a and b must be 2-D float32 with the same number of columns");
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  TORCH_CHECK(na > 0 && nb > 0 && d > 0 && k >= 1 && k <= std::min(na, nb),
              "vireid::knn: need 1 <= k <= min(rows of a, rows of b)");
  TORCH_CHECK(na + nb < (int64_t(1) << 31), "vireid::knn: at most 2^31 - 1 rows");
  const at::Tensor z = at::cat({a, b}, 0).contiguous();
  const int64_t n = na + nb;
  std::vector<float> vals(static_cast<size_t>(n) * k);
  std::vector<int64_t> inds(static_cast<size_t>(n) * k);
  const std::vector<int64_t> redo = knn_impl(z, z, k, l2, bf16, true, vals.data(), inds.data(), na);
  // Rows whose bf16 margin was too thin: an fp32 pass against the other side (indices in z's numbering until below).
  std::vector<int64_t> redo_a, redo_b;
  for (const int64_t r : redo) (r < na ? redo_a : redo_b).push_back(r);
  redo_fp32(z, redo_a, b.contiguous(), k, l2, na, vals.data(), inds.data());
  redo_fp32(z, redo_b, a.contiguous(), k, l2, 0, vals.data(), inds.data());
  at::Tensor va = at::empty({na, k}, a.options()), ia = at::empty({na, k}, a.options().dtype(at::kLong));
  at::Tensor vb = at::empty({nb, k}, a.options()), ib = at::empty({nb, k}, a.options().dtype(at::kLong));
  std::copy(vals.begin(), vals.begin() + na * k, va.data_ptr<float>());
  std::copy(vals.begin() + na * k, vals.end(), vb.data_ptr<float>());
  int64_t* iap = ia.data_ptr<int64_t>();
  int64_t* ibp = ib.data_ptr<int64_t>();
  for (int64_t e = 0; e < na * k; ++e) iap[e] = inds[e] - na;
  std::copy(inds.begin() + na * k, inds.end(), ibp);
  return {va, ia, vb, ib};
}

bool knn_bf16_worthwhile(int64_t n, int64_t m, int64_t d) {
  // Native bf16 dot products (AVX512-BF16 or AMX-BF16, unless VIREID_CPU_ISA caps the ISA below avx512) make the bf16
  // GEMM several times faster than fp32; below ~1 GMAC the extra rounding pass and the wider candidate pools are not
  // worth it. vireid_fast/ops/knn.py makes the same choice for precision="auto".
  if (static_cast<double>(n) * static_cast<double>(m) * static_cast<double>(d) < std::ldexp(1.0, 30)) return false;
  static const bool native = cpu_isa() == Isa::kAvx512 && (__builtin_cpu_supports("avx512bf16") ||
                                                           __builtin_cpu_supports("amx-bf16"));
  return native;
}

std::tuple<at::Tensor, at::Tensor> knn_exact(const at::Tensor& x_in, const at::Tensor& y_in, int64_t k, bool l2,
                                             bool bf16) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat && x_in.dim() == 2 &&
                  y_in.dim() == 2 && x_in.size(1) == y_in.size(1),
              "vireid::knn: x and y must be 2-D float32 with the same number of columns");
  const int64_t N = x_in.size(0), M = y_in.size(0), d = x_in.size(1);
  TORCH_CHECK(M > 0 && d > 0, "vireid::knn: y must be non-empty");
  TORCH_CHECK(k >= 1 && k <= M, "vireid::knn: k must be in [1, M=", M, "], got ", k);
  TORCH_CHECK(M < (int64_t(1) << 31), "vireid::knn: at most 2^31 - 1 database rows");
  const bool self = x_in.is_same(y_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = self ? x : y_in.contiguous();
  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  redo_fp32(x, knn_impl(x, y, k, l2, bf16, self, vp, ip), y, k, l2, 0, vp, ip);
  return {values, indices};
}

}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("_knn_cpu", &vireid::knn_cpu); }
