// Exact-tile causal flash attention for CPU over packed segments, with an optional shared anchor key.
//
// One call covers a whole (B, L) batch: every segment (row b, start s, length n, anchor a) runs causal
// attention over its own tokens; when a == 1 the row's token 0 (the anchor) is one more key, visible to
// every query of the segment. Q/K/V are read from (B, L, H, D)-strided memory (the last dim contiguous)
// with no full-size copy: each task copies its segment's rows of one head into contiguous thread-local
// buffers (O(n) per task; ~5-10% faster than GEMMs on the 2 KB-strided rows, measured). Key blocks end
// exactly at each query block's last key (torch's CPU flash kernel always runs whole 512-key blocks, so a causal segment of n <= 512 tokens
// costs a full n x n square there). Forward: online softmax per query block. Backward: recompute P from
// the saved log-sum-exp; dQ/dK/dV accumulate in the task's buffers, one task per (kv head, segment)
// running the kv head's query heads in turn, so GQA groups never race; the anchor's dK/dV terms (one per
// segment) go to per-task slots summed after the loop. Threads: at::parallel_for (torch's OpenMP pool,
// hence -fopenmp).
// Matrix products go to the BLAS that libtorch_cpu exports (sgemm_/dgemm_); the exponential is a
// vectorisable polynomial (float) or std::exp (double).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}

namespace {

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C; op(X) = X^T when tX.
// Stored A is M x K (or K x M when ta) with leading dimension lda; likewise B.
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                 int ldb, float beta, float* C, int ldc) {
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  sgemm_(&ca, &cb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
inline void gemm(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda, const double* B,
                 int ldb, double beta, double* C, int ldc) {
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  dgemm_(&ca, &cb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp), written so that GCC vectorises a loop over it.
inline float fexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}
inline double fexp(double x) { return std::exp(x); }

template <typename T>
struct Strided {  // (B, L, H, D) view: element (b, l, h, d) at p[b*sb + l*sl + h*sh + d]
  T* p;
  int64_t sb, sl, sh;
  T* row(int64_t b, int64_t l, int64_t h) const { return p + b * sb + l * sl + h * sh; }
};

template <typename T>
Strided<T> view(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// One key block of a segment: rows [k0, k0 + kb) of the row's K/V (token index), causal relative to the
// query block when `diag` (query i of the block, token q0 + i, sees keys with token index <= q0 + i).
struct KeyBlock {
  int64_t k0;
  int kb;
  bool diag;
  bool anchor;  // the row's token 0 as the segment's extra key
};

// Key blocks for the query block [q0, q0 + qb) of segment [s, s + n) with anchor flag a.
inline void key_blocks(int64_t s, int64_t q0, int qb, bool a, int KB, std::vector<KeyBlock>& out) {
  out.clear();
  if (a) out.push_back({0, 1, false, true});
  const int64_t end = q0 + qb;  // exclusive: the block's last query sees keys up to end - 1
  for (int64_t k0 = s; k0 < end; k0 += KB) {
    const int kb = static_cast<int>(std::min<int64_t>(KB, end - k0));
    out.push_back({k0, kb, k0 + kb > q0 + 1, false});
  }
}

// Number of visible keys of key block `kblk` for query token q (>= 0; 0 = none).
inline int visible(const KeyBlock& kblk, int64_t q) {
  if (!kblk.diag) return kblk.kb;
  const int64_t v = q - kblk.k0 + 1;
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kblk.kb, v)));
}

// Rows [r0, r0 + nr) of head h of row b, copied into dst (nr x D, contiguous).
// (converted to the compute type T: float for float/bfloat16/half storage, double for double).
template <typename St, typename T>
inline void gather_rows(const Strided<St>& X, int64_t b, int64_t h, int64_t r0, int64_t nr, int64_t D, T* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    const St* src = X.row(b, r0 + r, h);
    T* d = dst + r * D;
    for (int64_t i = 0; i < D; ++i) d[i] = static_cast<T>(src[i]);
  }
}

// n rows of D values from src (compute type, contiguous) to rows [r0, r0 + n) of head h (storage type).
template <typename St, typename T>
inline void scatter_rows(const T* src, int64_t n, int64_t D, const Strided<St>& X, int64_t b, int64_t r0, int64_t h) {
  for (int64_t r = 0; r < n; ++r) {
    St* d = X.row(b, r0 + r, h);
    const T* x = src + r * D;
    for (int64_t i = 0; i < D; ++i) d[i] = static_cast<St>(x[i]);
  }
}

// Query rows per block: 64 for short segments (less work in the diagonal block), QB otherwise.
inline int query_block(int64_t n, int QB) { return n <= 384 ? std::min(QB, 64) : QB; }

template <typename St, typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segs,
                  at::Tensor& out, at::Tensor& lse, double scale_d, int QB, int KB) {
  const int64_t H = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int64_t S = segs.size(0), group = H / Hkv;
  const auto Q = view<St>(q), K = view<St>(k), V = view<St>(v), O = view<St>(out);
  T* L = lse.data_ptr<T>();  // (B, H, Lq) contiguous, compute type
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1);
  const int64_t* sg = segs.data_ptr<int64_t>();
  const T scale = static_cast<T>(scale_d);
  // tasks ordered head-major so a static split over threads gives each thread whole heads
  at::parallel_for(0, H * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(static_cast<size_t>(QB) * KB), acc(static_cast<size_t>(QB) * D), mx(QB), sm(QB);
    std::vector<T> qc, kc, vc;  // the segment's rows of this head, contiguous: [anchor] + document for K/V
    std::vector<KeyBlock> blocks;
    const int iD = static_cast<int>(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / S, g = h / group;
      const int64_t* seg = sg + 4 * (task % S);
      const int64_t b = seg[0], s = seg[1], n = seg[2];
      const bool a = seg[3] != 0;
      const int64_t nk = n + (a ? 1 : 0);
      qc.resize(n * D);
      kc.resize(nk * D);
      vc.resize(nk * D);
      gather_rows(Q, b, h, s, n, D, qc.data());
      if (a) {
        gather_rows(K, b, g, 0, 1, D, kc.data());
        gather_rows(V, b, g, 0, 1, D, vc.data());
      }
      gather_rows(K, b, g, s, n, D, kc.data() + (a ? D : 0));
      gather_rows(V, b, g, s, n, D, vc.data() + (a ? D : 0));
      const int qbs = query_block(n, QB);
      for (int64_t q0 = s; q0 < s + n; q0 += qbs) {
        const int qb = static_cast<int>(std::min<int64_t>(qbs, s + n - q0));
        std::fill(acc.begin(), acc.begin() + qb * D, T(0));
        std::fill(mx.begin(), mx.begin() + qb, T(-1e30));
        std::fill(sm.begin(), sm.begin() + qb, T(0));
        key_blocks(s, q0, qb, a, KB, blocks);
        for (const auto& kblk : blocks) {
          const int kb = kblk.kb;
          // S = scale * Q_blk @ K_blk^T   (qb x kb)
          const int64_t kl = kblk.anchor ? 0 : kblk.k0 - s + (a ? 1 : 0);  // first key row in kc/vc
          gemm(false, true, qb, kb, iD, scale, qc.data() + (q0 - s) * D, iD, kc.data() + kl * D, iD, T(0),
               sbuf.data(), kb);
          for (int i = 0; i < qb; ++i) {
            T* srow = sbuf.data() + static_cast<int64_t>(i) * kb;
            const int lim = visible(kblk, q0 + i);
            if (lim == 0) {
              std::fill(srow, srow + kb, T(0));
              continue;
            }
            T m = mx[i];
#pragma omp simd reduction(max : m)
            for (int j = 0; j < lim; ++j) m = srow[j] > m ? srow[j] : m;
            const T f = fexp(mx[i] - m);
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < lim; ++j) {
              const T p = fexp(srow[j] - m);
              srow[j] = p;
              sum += p;
            }
            std::fill(srow + lim, srow + kb, T(0));
            sm[i] = sm[i] * f + sum;
            mx[i] = m;
            if (f != T(1)) {
              T* arow = acc.data() + i * D;
              for (int64_t d = 0; d < D; ++d) arow[d] *= f;
            }
          }
          // acc += P @ V_blk   (qb x D)
          gemm(false, false, qb, iD, kb, T(1), sbuf.data(), kb, vc.data() + kl * D, iD, T(1), acc.data(), iD);
        }
        for (int i = 0; i < qb; ++i) {
          const T inv = T(1) / sm[i];
          St* orow = O.row(b, q0 + i, h);
          const T* arow = acc.data() + i * D;
          for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<St>(arow[d] * inv);
          L[b * lsb + h * lsh + q0 + i] = mx[i] + std::log(sm[i]);
        }
      }
    }
  });
}

template <typename St, typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& segs, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, double scale_d, int QB, int KB) {
  const int64_t H = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int64_t S = segs.size(0), group = H / Hkv;
  const auto Q = view<St>(q), K = view<St>(k), V = view<St>(v), O = view<St>(out), dO = view<St>(dout);
  const auto dQ = view<St>(dq), dK = view<St>(dk), dV = view<St>(dv);
  const T* L = lse.data_ptr<T>();
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1);
  const int64_t* sg = segs.data_ptr<int64_t>();
  const T scale = static_cast<T>(scale_d);
  const int iD = static_cast<int>(D);
  // The anchor's dK/dV get one term per segment: each (kv head, segment) task writes its term here, summed
  // into dK/dV[b, 0] after the parallel loop, so tasks never write the same rows.
  std::vector<T> anchor_terms(static_cast<size_t>(S * Hkv * 2 * D), T(0));
  // tasks (kv head, segment), kv-head-major; a task runs the kv head's query heads (GQA group) in turn
  at::parallel_for(0, Hkv * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pbuf(static_cast<size_t>(QB) * KB), dpbuf(static_cast<size_t>(QB) * KB), dsum(QB);
    // the segment's rows, contiguous: K/V and their gradients as [anchor] + document, Q/dO/dQ per query head
    std::vector<T> kc, vc, dkc, dvc, qc, doc, dqc;
    std::vector<KeyBlock> blocks;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / S, si = task % S;
      const int64_t* seg = sg + 4 * si;
      const int64_t b = seg[0], s = seg[1], n = seg[2];
      const bool a = seg[3] != 0;
      const int64_t nk = n + (a ? 1 : 0), off = a ? 1 : 0;
      kc.resize(nk * D);
      vc.resize(nk * D);
      dkc.assign(nk * D, T(0));
      dvc.assign(nk * D, T(0));
      qc.resize(n * D);
      doc.resize(n * D);
      dqc.resize(n * D);
      if (a) {
        gather_rows(K, b, g, 0, 1, D, kc.data());
        gather_rows(V, b, g, 0, 1, D, vc.data());
      }
      gather_rows(K, b, g, s, n, D, kc.data() + off * D);
      gather_rows(V, b, g, s, n, D, vc.data() + off * D);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        {
          gather_rows(Q, b, h, s, n, D, qc.data());
          gather_rows(dO, b, h, s, n, D, doc.data());
          std::fill(dqc.begin(), dqc.end(), T(0));
          const int qbs = query_block(n, QB);
          for (int64_t q0 = s; q0 < s + n; q0 += qbs) {
            const int qb = static_cast<int>(std::min<int64_t>(qbs, s + n - q0));
            const T* q_blk = qc.data() + (q0 - s) * D;
            const T* do_blk = doc.data() + (q0 - s) * D;
            T* dq_blk = dqc.data() + (q0 - s) * D;
            for (int i = 0; i < qb; ++i) {
              const T* go = do_blk + i * D;
              const St* o = O.row(b, q0 + i, h);
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t d = 0; d < D; ++d) acc += go[d] * static_cast<T>(o[d]);
              dsum[i] = acc;
            }
            key_blocks(s, q0, qb, a, KB, blocks);
            for (const auto& kblk : blocks) {
              const int kb = kblk.kb;
              T* P = pbuf.data();
              T* dP = dpbuf.data();
              const int64_t kl = kblk.anchor ? 0 : kblk.k0 - s + off;  // first key row in kc/vc/dkc/dvc
              gemm(false, true, qb, kb, iD, scale, q_blk, iD, kc.data() + kl * D, iD, T(0), P, kb);
              for (int i = 0; i < qb; ++i) {
                T* prow = P + static_cast<int64_t>(i) * kb;
                const int lim = visible(kblk, q0 + i);
                const T l = L[b * lsb + h * lsh + q0 + i];
#pragma GCC ivdep
                for (int j = 0; j < lim; ++j) prow[j] = fexp(prow[j] - l);
                std::fill(prow + lim, prow + kb, T(0));
              }
              // dV_blk += P^T @ dO_blk
              gemm(true, false, kb, iD, qb, T(1), P, kb, do_blk, iD, T(1), dvc.data() + kl * D, iD);
              // dP = dO_blk @ V_blk^T
              gemm(false, true, qb, kb, iD, T(1), do_blk, iD, vc.data() + kl * D, iD, T(0), dP, kb);
              // dS = P * (dP - dsum)   (in dP)
              for (int i = 0; i < qb; ++i) {
                T* prow = P + static_cast<int64_t>(i) * kb;
                T* drow = dP + static_cast<int64_t>(i) * kb;
                const T ds = dsum[i];
#pragma GCC ivdep
                for (int j = 0; j < kb; ++j) drow[j] = prow[j] * (drow[j] - ds);
              }
              // dQ_blk += scale * dS @ K_blk ;  dK_blk += scale * dS^T @ Q_blk
              gemm(false, false, qb, iD, kb, scale, dP, kb, kc.data() + kl * D, iD, T(1), dq_blk, iD);
              gemm(true, false, kb, iD, qb, scale, dP, kb, q_blk, iD, T(1), dkc.data() + kl * D, iD);
            }
          }
          scatter_rows(dqc.data(), n, D, dQ, b, s, h);
        }
      }
      // this task owns the segment's dK/dV rows of kv head g; the anchor's term goes to its slot
      scatter_rows(dkc.data() + off * D, n, D, dK, b, s, g);
      scatter_rows(dvc.data() + off * D, n, D, dV, b, s, g);
      if (a) {
        T* slot = anchor_terms.data() + (si * Hkv + g) * 2 * D;
        std::copy_n(dkc.data(), D, slot);
        std::copy_n(dvc.data(), D, slot + D);
      }
    }
  });
  // the anchor's terms of each row summed in the compute type, then added to its own-segment value and
  // rounded once (a half-precision running sum over many documents would lose bits per term)
  const int64_t B = q.size(0);
  std::vector<T> sums(static_cast<size_t>(B * Hkv * 2 * D), T(0));
  std::vector<char> has(static_cast<size_t>(B), 0);
  for (int64_t si = 0; si < S; ++si) {
    if (sg[4 * si + 3] == 0) continue;
    const int64_t b = sg[4 * si];
    has[b] = 1;
    const T* t = anchor_terms.data() + si * Hkv * 2 * D;
    T* acc = sums.data() + b * Hkv * 2 * D;
    for (int64_t i = 0; i < Hkv * 2 * D; ++i) acc[i] += t[i];
  }
  for (int64_t b = 0; b < B; ++b) {
    if (!has[b]) continue;
    for (int64_t g = 0; g < Hkv; ++g) {
      const T* t = sums.data() + (b * Hkv + g) * 2 * D;
      St* dk0 = dK.row(b, 0, g);
      St* dv0 = dV.row(b, 0, g);
      for (int64_t d = 0; d < D; ++d) {
        dk0[d] = static_cast<St>(static_cast<T>(dk0[d]) + t[d]);
        dv0[d] = static_cast<St>(static_cast<T>(dv0[d]) + t[D + d]);
      }
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segs) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "anchor_flash_cpu: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "anchor_flash_cpu: q/k/v must be (B, L, H, D)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "anchor_flash_cpu: last dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "anchor_flash_cpu: q/k/v shapes disagree");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "anchor_flash_cpu: H must be a multiple of Hkv");
  TORCH_CHECK(segs.dtype() == at::kLong && segs.dim() == 2 && segs.size(1) == 4 && segs.is_contiguous(),
              "anchor_flash_cpu: segs must be a contiguous (S, 4) int64 tensor");
}

// float32 for float/bfloat16/half storage, float64 for double: the type of every product, sum and the lse.
at::ScalarType compute_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// q (B, L, H, D), k/v (B, L, Hkv, D) strided views; segs (S, 4) int64 rows (b, s, n, a).
// Returns out (B, L, H, D) (zeros outside every segment) and lse (B, H, L).
std::vector<at::Tensor> anchor_flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& segs, double scale, int64_t QB, int64_t KB) {
  check_inputs(q, k, v, segs);
  auto out = at::zeros(q.sizes(), q.options());
  auto lse = at::zeros({q.size(0), q.size(2), q.size(1)}, q.options().dtype(compute_type(q)));
  AT_DISPATCH_SWITCH(
      q.scalar_type(), "anchor_flash_forward",
      AT_DISPATCH_CASE(at::kFloat, [&] { forward_impl<float, float>(q, k, v, segs, out, lse, scale, QB, KB); })
      AT_DISPATCH_CASE(at::kDouble, [&] { forward_impl<double, double>(q, k, v, segs, out, lse, scale, QB, KB); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { forward_impl<at::BFloat16, float>(q, k, v, segs, out, lse, scale, QB, KB); })
      AT_DISPATCH_CASE(at::kHalf, [&] { forward_impl<at::Half, float>(q, k, v, segs, out, lse, scale, QB, KB); }));
  return {out, lse};
}

// Gradients (dq (B, L, H, D), dk/dv (B, L, Hkv, D)); zeros outside every segment.
std::vector<at::Tensor> anchor_flash_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                              const at::Tensor& segs, double scale, int64_t QB, int64_t KB) {
  check_inputs(q, k, v, segs);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.stride(3) == 1 && out.sizes() == q.sizes() && out.stride(3) == 1,
              "anchor_flash_cpu: dout/out must match q with a contiguous last dim");
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  TORCH_CHECK(lse.scalar_type() == compute_type(q), "anchor_flash_cpu: lse must be in the compute type");
  AT_DISPATCH_SWITCH(
      q.scalar_type(), "anchor_flash_backward",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        backward_impl<float, float>(dout, q, k, v, out, lse, segs, dq, dk, dv, scale, QB, KB);
      }) AT_DISPATCH_CASE(at::kDouble, [&] {
        backward_impl<double, double>(dout, q, k, v, out, lse, segs, dq, dk, dv, scale, QB, KB);
      }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
        backward_impl<at::BFloat16, float>(dout, q, k, v, out, lse, segs, dq, dk, dv, scale, QB, KB);
      }) AT_DISPATCH_CASE(at::kHalf, [&] {
        backward_impl<at::Half, float>(dout, q, k, v, out, lse, segs, dq, dk, dv, scale, QB, KB);
      }));
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &anchor_flash_forward, "anchor flash attention forward (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &anchor_flash_backward, "anchor flash attention backward (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
