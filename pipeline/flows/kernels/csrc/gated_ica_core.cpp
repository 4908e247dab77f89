// The gated ICA layer as one C++ autograd node: the same arithmetic as the Python reference
// pipeline/flows/ica_nodes.py::GatedICACore (forward and hand-written backward), built at first use by
// pipeline/flows/native.py. A MANGO layer on a small token grid is ~70 small ATen ops; from Python each op and
// the autograd.Function around them cost interpreter and argument-parsing time that was ~15 % of a training
// step, which C++ does not pay. The tests hold this node to the Python one (values and gradients, fp64).
//
// Tensor arguments that may be absent (gather, scatter, loc, log_scale) arrive as None (std::optional).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr double kGateMargin = 1e-4;

std::vector<std::pair<int64_t, int64_t>> row_blocks(int64_t n, int64_t block) {
  std::vector<std::pair<int64_t, int64_t>> rows;
  for (int64_t r0 = 0; r0 < n; r0 += block) rows.emplace_back(r0, std::min(n, r0 + block));
  return rows;
}

// x1 and x2 each gathered by its own half of the index: two contiguous halves, where one gather of the whole
// followed by chunk leaves strided halves that the projections then copy (the split alone: 14 vs 45 us on a
// (16, 128, 48) input; a whole training step: within the noise, 0.99-1.01x)
std::pair<Tensor, Tensor> halves(const Tensor& x, const Tensor& gather, bool swap) {
  if (gather.defined()) {
    const int64_t n = gather.size(0) / 2;
    Tensor first = x.index_select(1, gather.slice(0, 0, n)), second = x.index_select(1, gather.slice(0, n));
    return swap ? std::make_pair(second, first) : std::make_pair(first, second);
  }
  auto parts = x.chunk(2, 1);
  return swap ? std::make_pair(parts[1], parts[0]) : std::make_pair(parts[0], parts[1]);
}

// ---- row kernels (CPU, fp32/fp64): the layer's token permutations and its fused ActNorm as single memory passes.
// On small token grids the split (ActNorm add and mul, two gathers), the merge (cat, then the scatter) and their
// backward twins were a dozen full passes over the layer's activations per training step; each kernel below is
// one. Elsewhere (CUDA, other dtypes) the ATen ops run as before.

bool rows_on_cpu(const Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// an index tensor's entries (the identity 0 … length−1 when it is absent)
std::vector<int64_t> index_vector(const Tensor& index, int64_t length) {
  std::vector<int64_t> out(length);
  if (index.defined()) {
    Tensor t = index.to(at::kCPU, at::kLong).contiguous();
    std::copy(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + length, out.begin());
  } else {
    for (int64_t i = 0; i < length; ++i) out[i] = i;
  }
  return out;
}

// the source token of each row of the halves: (first half, second half), x1 = the first unless swapped
std::pair<std::vector<int64_t>, std::vector<int64_t>> half_sources(const Tensor& gather, int64_t length, bool swap) {
  const int64_t n = length / 2;
  const std::vector<int64_t> all = index_vector(gather, length);
  std::vector<int64_t> first(all.begin(), all.begin() + n), second(all.begin() + n, all.end());
  if (swap) std::swap(first, second);
  return {first, second};
}

// out[b, j, :] = (x[b, src[j], :] + loc)·scale  (loc / scale may be absent: a plain gather); token_major: the
// result laid out (m, N, D) instead of (N, m, D), i.e. out[j, b, :]
Tensor take_rows(const Tensor& x_in, const std::vector<int64_t>& src, const Tensor& loc, const Tensor& scale,
                 bool token_major = false) {
  Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), length = x.size(1), d = x.size(2), m = static_cast<int64_t>(src.size());
  Tensor out = token_major ? at::empty({m, batch, d}, x.options()) : at::empty({batch, m, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "take_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Tensor lc = loc.defined() ? loc.contiguous() : loc, sc = scale.defined() ? scale.contiguous() : scale;
    const scalar_t* lp = lc.defined() ? lc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = sc.defined() ? sc.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch * m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / m, j = r % m;
        const scalar_t* row = xp + (b * length + src[j]) * d;
        scalar_t* o = op + (token_major ? j * batch + b : r) * d;
        if (lp) {
          for (int64_t c = 0; c < d; ++c) o[c] = (row[c] + lp[c]) * sp[c];
        } else {
          std::copy(row, row + d, o);
        }
      }
    });
  });
  return out;
}

// The merge: out[b, t, :] = z[b, zpos[t], :] with z = [first ; second] (second absent: z = first, whole, laid out
// (L, N, D) when token_major; zpos: the scatter, or the identity).
// Options (MergeExtras): `add` (output layout) is added to the rows whose z index lies in [add_lo, add_hi) — the
// gradient that reaches the kept half of a layer straight from its output, without gathering it first.
// With a fused ActNorm x = (x_in + loc)·scale in the backward: out = g·scale for g = z[zpos] (+ add), and the
// per-channel sums Σ g·x (→ ∂/∂log_scale) and Σ g·scale (→ ∂/∂loc) come back in dls / dloc (double accumulators);
// x is read either as x_in in the output layout, or already normalised in z's layout (x_first / x_second, the
// halves a layer saved in its forward).
struct MergeExtras {
  Tensor add;
  int64_t add_lo = 0, add_hi = 0;
  Tensor x_in, x_first, x_second, loc, scale;  // the fused ActNorm's input (or normalised halves) and affine
  Tensor* dloc = nullptr;
  Tensor* dls = nullptr;
};

Tensor merge_rows(const Tensor& first_in, const Tensor& second_in, const Tensor& scatter,
                  const MergeExtras& ex = MergeExtras(), bool token_major = false) {
  const bool halves = second_in.defined();
  Tensor first = first_in.contiguous(), second = halves ? second_in.contiguous() : first;
  const int64_t batch = first.size(token_major ? 1 : 0), d = first.size(2);
  const int64_t length = halves ? 2 * first.size(1) : first.size(token_major ? 0 : 1);
  const int64_t n = halves ? first.size(1) : length;  // rows of `first`: z rows ≥ n come from `second`
  const std::vector<int64_t> zpos = index_vector(scatter, length);
  Tensor out = at::empty({batch, length, d}, first.options());
  const bool z_norm = ex.x_first.defined(), norm = ex.x_in.defined() || z_norm;
  TORCH_CHECK(!z_norm || (halves && !token_major), "merge_rows: normalised halves need two z halves");
  Tensor xc = ex.x_in.defined() ? ex.x_in.contiguous() : Tensor();
  Tensor xf = z_norm ? ex.x_first.contiguous() : Tensor(), xs = z_norm ? ex.x_second.contiguous() : Tensor();
  Tensor add = ex.add.defined() ? ex.add.contiguous() : Tensor();
  Tensor sums = norm ? at::zeros({batch, 2, d}, first.options().dtype(at::kDouble)) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "merge_rows", [&] {
    const scalar_t* fp = first.data_ptr<scalar_t>();
    const scalar_t* secp = second.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Tensor lc = norm ? ex.loc.contiguous() : Tensor(), sc = norm ? ex.scale.contiguous() : Tensor();
    const scalar_t* xp = xc.defined() ? xc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xfp = z_norm ? xf.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xsp = z_norm ? xs.data_ptr<scalar_t>() : nullptr;
    const scalar_t* addp = add.defined() ? add.data_ptr<scalar_t>() : nullptr;
    const scalar_t* lp = norm ? lc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = norm ? sc.data_ptr<scalar_t>() : nullptr;
    double* acc = norm ? sums.data_ptr<double>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> a_ls(norm ? d : 0), a_loc(norm ? d : 0), g(d);  // one sample's sums, then into double
      scalar_t* gp = g.data();
      for (int64_t b = begin; b < end; ++b) {
        std::fill(a_ls.begin(), a_ls.end(), scalar_t(0));
        std::fill(a_loc.begin(), a_loc.end(), scalar_t(0));
        for (int64_t t = 0; t < length; ++t) {
          const int64_t zp = zpos[t];
          const scalar_t* row = token_major ? fp + (zp * batch + b) * d
                                : zp < n  ? fp + (b * n + zp) * d
                                          : secp + (b * n + zp - n) * d;
          scalar_t* o = op + (b * length + t) * d;
          if (addp && zp >= ex.add_lo && zp < ex.add_hi) {  // g = z row + the straight-through gradient
            const scalar_t* ar = addp + (b * length + t) * d;
            _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) gp[c] = row[c] + ar[c];
            row = gp;
          }
          if (!norm) {
            std::copy(row, row + d, o);
            continue;
          }
          if (z_norm) {  // x normalised, in z's layout
            const scalar_t* xr = zp < n ? xfp + (b * n + zp) * d : xsp + (b * n + zp - n) * d;
            _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) {
              const scalar_t gv = row[c];
              a_ls[c] += gv * xr[c];
              a_loc[c] += gv * sp[c];
              o[c] = gv * sp[c];
            }
          } else {
            const scalar_t* xr = xp + (b * length + t) * d;
            for (int64_t c = 0; c < d; ++c) {
              const scalar_t gv = row[c], gs = gv * sp[c];
              a_ls[c] += gs * (xr[c] + lp[c]);  // g·x with x = (x_in + loc)·scale
              a_loc[c] += gs;
              o[c] = gs;
            }
          }
        }
        if (norm) {
          double* dls_b = acc + b * 2 * d;
          for (int64_t c = 0; c < d; ++c) dls_b[c] = a_ls[c], dls_b[d + c] = a_loc[c];
        }
      }
    });
  });
  if (norm) {
    Tensor total = sums.sum(0).to(first.scalar_type());
    *ex.dls = total.select(0, 0);
    *ex.dloc = total.select(0, 1);
  }
  return out;
}

// ---- the attention's mask (CPU): A's row block [r0, r1) over key columns [r0, n) is masked left of its diagonal
// (local row i: columns j < i). Writing −inf there in place replaces baddbmm's additive mask, whose broadcast
// into the output was a full copy per call (the softmax itself stays ATen's vectorised kernel).
void mask_below_diagonal_(Tensor& scores) {
  const int64_t rows = scores.size(1), cols = scores.size(2), total = scores.size(0) * rows;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mask_below_diagonal_", [&] {
    scalar_t* p = scores.data_ptr<scalar_t>();
    const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
    at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::fill(p + r * cols, p + r * cols + std::min(r % rows, cols), neg_inf);
    });
  });
}

// ---- the log-det term and its backward (CPU, fp32/fp64), one pass over (N, n, D) each.
// logdet_b = Σ_i Σ_c log(1 + α_c a_ii) is read as log Π_i Π_c (1 + α_c a_ii): the product runs in a wider type
// (double for fp32, long double for fp64) with its binary exponent split off after every row (frexp), so it never
// under- or overflows (each factor lies in [1e-4, 2]: |α_c| ≤ 1 − 1e-4, a_ii ∈ (0, 1]), and costs one log per
// sample instead of N·n·D log1p calls — the most expensive elementwise op of the layer. Its rounding error
// (about one unit of the wide type per factor) is far below the fp32 log1p sum it replaces.
template <typename scalar_t>
using wide_t = typename std::conditional<std::is_same<scalar_t, double>::value, long double, double>::type;

Tensor gated_logdet(const Tensor& diag_in, const Tensor& alpha_in) {
  Tensor diag = diag_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t batch = diag.size(0), n = diag.size(1), d = alpha.size(0);
  Tensor out = at::empty({batch}, diag.options());
  AT_DISPATCH_FLOATING_TYPES(diag.scalar_type(), "gated_logdet", [&] {
    using acc_t = wide_t<scalar_t>;
    const scalar_t* dp = diag.data_ptr<scalar_t>();
    const scalar_t* ap = alpha.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t mant = 1;
        long exponent = 0;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t a = dp[b * n + i];
          acc_t p = 1;
          _Pragma("omp simd reduction(* : p)")
          for (int64_t c = 0; c < d; ++c) p *= 1 + static_cast<acc_t>(ap[c]) * a;
          int e = 0;
          mant = std::frexp(mant * p, &e);  // the row's product ≥ 1e-4^d: its exponent split off every row
          exponent += e;
        }
        op[b] = static_cast<scalar_t>(std::log(mant) + static_cast<acc_t>(exponent) * std::log(acc_t(2)));
      }
    });
  });
  return out;
}

// the log-det's backward: with w_bic = g_b / (1 + α_c a_bi), returns g_diag[b, i] = Σ_c α_c w_bic (→ ∂/∂a_ii) and
// dalpha[c] = Σ_b Σ_i a_bi w_bic (→ ∂/∂α_c), without the (N, n, D) temporaries of the composed form
std::pair<Tensor, Tensor> gated_logdet_backward(const Tensor& diag_in, const Tensor& alpha_in, const Tensor& g_in) {
  Tensor diag = diag_in.contiguous(), alpha = alpha_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = diag.size(0), n = diag.size(1), d = alpha.size(0);
  Tensor g_diag = at::empty({batch, n}, diag.options());
  Tensor partial = at::zeros({batch, d}, diag.options());
  AT_DISPATCH_FLOATING_TYPES(diag.scalar_type(), "gated_logdet_backward", [&] {
    const scalar_t* dp = diag.data_ptr<scalar_t>();
    const scalar_t* ap = alpha.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gdp = g_diag.data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> w(d);
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* dal = pp + b * d;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t a = dp[b * n + i];
          const scalar_t gb = gp[b];
          scalar_t* wp = w.data();
          scalar_t acc = 0;
          _Pragma("omp simd reduction(+ : acc)")
          for (int64_t c = 0; c < d; ++c) {
            wp[c] = gb / (scalar_t(1) + ap[c] * a);
            acc += ap[c] * wp[c];
          }
          gdp[b * n + i] = acc;
          _Pragma("omp simd")
          for (int64_t c = 0; c < d; ++c) dal[c] += a * wp[c];
        }
      }
    });
  });
  return {g_diag, partial.sum(0)};
}

// ---- back through the gated update y2 = x2 + α ⊙ (A x2) on the CPU, elementwise part in one pass: from at_g = Aᵀ g_y,
// dx2 = g_y + α ⊙ at_g, g_alpha = g_y ⊙ α (what A's entries receive, times x2ᵀ) and Σ_{b,i} at_g ⊙ x2 (→ ∂/∂α)
std::vector<Tensor> gate_backward_rows(const Tensor& g_y_in, const Tensor& at_g_in, const Tensor& x2_in,
                                       const Tensor& alpha_in) {
  Tensor g_y = g_y_in.contiguous(), at_g = at_g_in.contiguous(), x2 = x2_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t d = alpha.size(0), rows = g_y.numel() / d;
  Tensor dx2 = at::empty_like(g_y), g_alpha = at::empty_like(g_y);
  const int64_t threads = at::get_num_threads();
  Tensor partial = at::zeros({threads, d}, g_y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g_y.scalar_type(), "gate_backward_rows", [&] {
    const scalar_t *gp = g_y.data_ptr<scalar_t>(), *ap = at_g.data_ptr<scalar_t>(), *xp = x2.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    scalar_t *dxp = dx2.data_ptr<scalar_t>(), *gap = g_alpha.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(d, scalar_t(0));
      scalar_t* accp = acc.data();
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * d;
        _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) {
          const scalar_t g = gp[o + c], a = ap[o + c];
          dxp[o + c] = g + al[c] * a;
          gap[o + c] = g * al[c];
          accp[c] += a * xp[o + c];
        }
      }
      double* slot = part + at::get_thread_num() * d;
      for (int64_t c = 0; c < d; ++c) slot[c] += accp[c];
    });
  });
  return {dx2, g_alpha, partial.sum(0).to(g_y.scalar_type())};
}

// ---- LayerNorm of the queries and the keys (CPU, fp32/fp64). The two projections come from one matmul against
// [Wq ; Wk]: pqk (rows, 2E) holds a token's query row then its key row. Both are normalised in one pass, the
// temperature folded into the queries; same statistics as at::native_layer_norm (biased variance, eps inside the
// root; mean and rstd with its (…, 1) shape). The backward writes dpqk in the same layout, so the input gradient and
// the weight gradient are one matmul each against [Wq ; Wk].
struct QKNorm {
  Tensor q, kn, mq, rq, mk, rk;
};

QKNorm qk_layer_norm(const Tensor& pqk_in, const Tensor& wq_in, const Tensor& bq_in, const Tensor& wk_in,
                     const Tensor& bk_in, const Tensor& tau_in, double eps_q, double eps_k) {
  Tensor pqk = pqk_in.contiguous();
  Tensor wq = wq_in.contiguous(), bq = bq_in.contiguous(), wk = wk_in.contiguous(), bk = bk_in.contiguous();
  const int64_t e = pqk.size(-1) / 2, rows = pqk.numel() / (2 * e);
  std::vector<int64_t> shape(pqk.sizes().begin(), pqk.sizes().end());
  shape.back() = e;
  std::vector<int64_t> stat_shape = shape;
  stat_shape.back() = 1;
  QKNorm r;
  r.q = at::empty(shape, pqk.options());
  r.kn = at::empty(shape, pqk.options());
  r.mq = at::empty(stat_shape, pqk.options());
  r.rq = at::empty(stat_shape, pqk.options());
  r.mk = at::empty(stat_shape, pqk.options());
  r.rk = at::empty(stat_shape, pqk.options());
  AT_DISPATCH_FLOATING_TYPES(pqk.scalar_type(), "qk_layer_norm", [&] {
    const scalar_t tau = tau_in.item<scalar_t>();
    auto norm_rows = [&](const scalar_t* in, const scalar_t* w, const scalar_t* bias, scalar_t scale, double eps,
                         scalar_t* out, scalar_t* mean, scalar_t* rstd) {
      std::vector<scalar_t> ws(e), bs(e);  // the affine with the scale folded in
      for (int64_t c = 0; c < e; ++c) ws[c] = w[c] * scale, bs[c] = bias[c] * scale;
      const scalar_t* wsp = ws.data();
      const scalar_t* bsp = bs.data();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = begin; r0 < end; ++r0) {
          const scalar_t* v = in + r0 * 2 * e;
          scalar_t* o = out + r0 * e;
          scalar_t sum = 0, sq = 0;
          _Pragma("omp simd reduction(+ : sum)") for (int64_t c = 0; c < e; ++c) sum += v[c];
          const scalar_t mu = sum / static_cast<scalar_t>(e);
          _Pragma("omp simd reduction(+ : sq)") for (int64_t c = 0; c < e; ++c) sq += (v[c] - mu) * (v[c] - mu);
          const scalar_t rs = scalar_t(1) / std::sqrt(sq / static_cast<scalar_t>(e) + static_cast<scalar_t>(eps));
          _Pragma("omp simd") for (int64_t c = 0; c < e; ++c) o[c] = (v[c] - mu) * rs * wsp[c] + bsp[c];
          mean[r0] = mu;
          rstd[r0] = rs;
        }
      });
    };
    const scalar_t* p = pqk.data_ptr<scalar_t>();
    norm_rows(p, wq.data_ptr<scalar_t>(), bq.data_ptr<scalar_t>(), tau, eps_q, r.q.data_ptr<scalar_t>(),
              r.mq.data_ptr<scalar_t>(), r.rq.data_ptr<scalar_t>());
    norm_rows(p + e, wk.data_ptr<scalar_t>(), bk.data_ptr<scalar_t>(), scalar_t(1), eps_k, r.kn.data_ptr<scalar_t>(),
              r.mk.data_ptr<scalar_t>(), r.rk.data_ptr<scalar_t>());
  });
  return r;
}

// The backward of qk_layer_norm for the gradients dq (of q = LN_q(p_q)·τ) and dkn (of the keys): returns
// {dpqk (rows, 2E), dwq, dbq, dwk, dbk, dlog_tau} with dlog_tau = Σ dq·q (τ = e^log_tau). Per row, with
// x̂ = (p − μ)·rstd and g = (upstream)·w: dp = rstd·(g − mean(g) − x̂·mean(g·x̂)).
std::vector<Tensor> qk_layer_norm_backward(const Tensor& dq_in, const Tensor& dkn_in, const Tensor& pqk_in,
                                           const Tensor& mq_in, const Tensor& rq_in, const Tensor& mk_in,
                                           const Tensor& rk_in, const Tensor& wq_in, const Tensor& wk_in,
                                           const Tensor& tau_in, const Tensor& q_in) {
  Tensor dq = dq_in.contiguous(), dkn = dkn_in.contiguous(), pqk = pqk_in.contiguous(), q = q_in.contiguous();
  Tensor mq = mq_in.contiguous(), rq = rq_in.contiguous(), mk = mk_in.contiguous(), rk = rk_in.contiguous();
  Tensor wq = wq_in.contiguous(), wk = wk_in.contiguous();
  const int64_t e = pqk.size(-1) / 2, rows = pqk.numel() / (2 * e);
  Tensor dpqk = at::empty({rows, 2 * e}, pqk.options());
  const int64_t threads = at::get_num_threads();
  Tensor partial = at::zeros({threads, 4 * e + 1}, pqk.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(pqk.scalar_type(), "qk_layer_norm_backward", [&] {
    const scalar_t tau = tau_in.item<scalar_t>();
    const scalar_t inv_e = scalar_t(1) / static_cast<scalar_t>(e);
    const scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dkn.data_ptr<scalar_t>(), *pp = pqk.data_ptr<scalar_t>();
    const scalar_t *qp = q.data_ptr<scalar_t>(), *wqp = wq.data_ptr<scalar_t>(), *wkp = wk.data_ptr<scalar_t>();
    const scalar_t *mqp = mq.data_ptr<scalar_t>(), *rqp = rq.data_ptr<scalar_t>();
    const scalar_t *mkp = mk.data_ptr<scalar_t>(), *rkp = rk.data_ptr<scalar_t>();
    scalar_t* out = dpqk.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      // this chunk's sums of the affine gradients (dwq, dbq, dwk, dbk) and of dq·q, then into the thread's slot
      std::vector<scalar_t> acc(4 * e, scalar_t(0)), g(e), xh(e);
      scalar_t* dw_q = acc.data();
      scalar_t* db_q = dw_q + e;
      scalar_t* dw_k = db_q + e;
      scalar_t* db_k = dw_k + e;
      scalar_t dlt = 0;
      scalar_t* gp = g.data();
      scalar_t* xp = xh.data();
      auto one = [&](const scalar_t* up, const scalar_t* v, scalar_t mu, scalar_t rs, const scalar_t* w, scalar_t scale,
                     scalar_t* dw, scalar_t* db, scalar_t* dp) {
        scalar_t sg = 0, sgx = 0;
        _Pragma("omp simd reduction(+ : sg, sgx)") for (int64_t c = 0; c < e; ++c) {
          const scalar_t gn = up[c] * scale;  // ∂/∂(the normalised row after its affine)
          xp[c] = (v[c] - mu) * rs;
          dw[c] += gn * xp[c];
          db[c] += gn;
          gp[c] = gn * w[c];
          sg += gp[c];
          sgx += gp[c] * xp[c];
        }
        sg *= inv_e;
        sgx *= inv_e;
        _Pragma("omp simd") for (int64_t c = 0; c < e; ++c) dp[c] = rs * (gp[c] - sg - xp[c] * sgx);
      };
      for (int64_t r0 = begin; r0 < end; ++r0) {
        const scalar_t* dqr = dqp + r0 * e;
        const scalar_t* qr = qp + r0 * e;
        _Pragma("omp simd reduction(+ : dlt)") for (int64_t c = 0; c < e; ++c) dlt += dqr[c] * qr[c];
        one(dqr, pp + r0 * 2 * e, mqp[r0], rqp[r0], wqp, tau, dw_q, db_q, out + r0 * 2 * e);
        one(dkp + r0 * e, pp + r0 * 2 * e + e, mkp[r0], rkp[r0], wkp, scalar_t(1), dw_k, db_k, out + r0 * 2 * e + e);
      }
      double* slot = part + at::get_thread_num() * (4 * e + 1);
      for (int64_t c = 0; c < 4 * e; ++c) slot[c] += acc[c];
      slot[4 * e] += dlt;
    });
  });
  Tensor total = partial.sum(0).to(pqk.scalar_type());
  return {dpqk, total.slice(0, 0, e), total.slice(0, e, 2 * e), total.slice(0, 2 * e, 3 * e),
          total.slice(0, 3 * e, 4 * e), total.slice(0, 4 * e, 4 * e + 1).reshape({})};
}

// an optional tensor kept in ctx->saved_data (an undefined tensor when it was absent)
Tensor saved_tensor_or_none(AutogradContext* ctx, const char* key) {
  const auto& v = ctx->saved_data[key];
  return v.isTensor() ? v.toTensor() : Tensor();
}

Tensor cat1(const std::vector<Tensor>& parts) { return parts.size() == 1 ? parts[0] : at::cat(parts, 1); }

struct Attention {
  Tensor pq, mq, rq, pk, mk, rk, tau, q, kn;
  std::vector<Tensor> a;  // A's row blocks, block i over key columns [r0, n)
};

Attention core_attention(const Tensor& x1_in, const Tensor& wq, const Tensor& wk, const Tensor& lnq_w,
                         const Tensor& lnq_b, const Tensor& lnk_w, const Tensor& lnk_b, const Tensor& log_tau,
                         const Tensor& bias, double eps_q, double eps_k, int64_t block) {
  Attention s;
  const int64_t e = wq.size(0);
  Tensor x1 = x1_in.contiguous();
  s.tau = log_tau.exp();
  Tensor kn;
  if (rows_on_cpu(x1) && x1.scalar_type() == wq.scalar_type() && x1.scalar_type() == lnq_w.scalar_type() &&
      x1.scalar_type() == log_tau.scalar_type()) {
    // one projection matmul for both, its rows [q | k]: s.pq holds it, s.pk stays undefined (the backward's cue)
    s.pq = at::matmul(x1, at::cat({wq, wk}, 0).t());
    QKNorm r = qk_layer_norm(s.pq, lnq_w, lnq_b, lnk_w, lnk_b, s.tau, eps_q, eps_k);
    s.q = r.q; kn = r.kn; s.mq = r.mq; s.rq = r.rq; s.mk = r.mk; s.rk = r.rk;
  } else {
    s.pq = at::matmul(x1, wq.t());
    s.pk = at::matmul(x1, wk.t());
    Tensor qn;
    std::tie(qn, s.mq, s.rq) = at::native_layer_norm(s.pq, {e}, lnq_w, lnq_b, eps_q);
    std::tie(kn, s.mk, s.rk) = at::native_layer_norm(s.pk, {e}, lnk_w, lnk_b, eps_k);
    s.q = qn * s.tau;
  }
  s.kn = kn;
  // on the CPU the mask is applied structurally (bias is always the layer's upper-triangular mask_bias)
  const bool cpu = rows_on_cpu(s.q) && s.q.scalar_type() == kn.scalar_type();
  for (auto [r0, r1] : row_blocks(s.q.size(1), block)) {
    if (cpu) {
      Tensor scores = at::bmm(s.q.slice(1, r0, r1), kn.slice(1, r0).transpose(-1, -2));
      mask_below_diagonal_(scores);
      s.a.push_back(at::softmax(scores, -1));
    } else {
      Tensor scores = at::baddbmm(bias.slice(0, r0, r1).slice(1, r0), s.q.slice(1, r0, r1),
                                  kn.slice(1, r0).transpose(-1, -2));
      s.a.push_back(at::softmax(scores, -1));
    }
  }
  return s;
}

Tensor diagonal_of(const std::vector<Tensor>& a, const std::vector<std::pair<int64_t, int64_t>>& rows) {
  std::vector<Tensor> d;
  for (size_t i = 0; i < rows.size(); ++i)
    d.push_back(a[i].slice(2, 0, rows[i].second - rows[i].first).diagonal(0, -2, -1));
  return cat1(d);
}

struct GatedICACoreNative : public torch::autograd::Function<GatedICACoreNative> {
  static variable_list forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> gather_opt,
                               std::optional<Tensor> scatter_opt, bool swap, Tensor wq, Tensor wk, Tensor lnq_w,
                               Tensor lnq_b, Tensor lnk_w, Tensor lnk_b, Tensor log_tau, Tensor beta, Tensor bias,
                               double eps_q, double eps_k, bool recompute, int64_t block, std::optional<Tensor> loc_opt,
                               std::optional<Tensor> log_scale_opt) {
    auto opt = [](const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); };
    const Tensor gather = opt(gather_opt), scatter = opt(scatter_opt), loc = opt(loc_opt), log_scale = opt(log_scale_opt);
    const bool norm = loc.defined();
    Tensor x_in = x, x1, x2;
    const bool on_cpu = rows_on_cpu(x);
    if (on_cpu) {  // the preceding ActNorm fused into the two gathers: one pass over x
      auto [src1, src2] = half_sources(gather, x.size(1), swap);
      Tensor scale = norm ? log_scale.exp() : Tensor();
      x1 = take_rows(x_in, src1, loc, scale);
      x2 = take_rows(x_in, src2, loc, scale);
    } else {
      if (norm) x = (x_in + loc) * log_scale.exp();  // the preceding ActNorm, fused
      std::tie(x1, x2) = halves(x, gather, swap);
    }
    Attention s = core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, bias, eps_q, eps_k, block);
    Tensor alpha = at::tanh(beta) * (1.0 - kGateMargin);
    Tensor xa = x2 * alpha;
    auto rows = row_blocks(x2.size(1), block);
    std::vector<Tensor> y2_parts;
    for (size_t i = 0; i < rows.size(); ++i) {
      auto [r0, r1] = rows[i];
      y2_parts.push_back(at::baddbmm(x2.slice(1, r0, r1), s.a[i], xa.slice(1, r0)));
    }
    Tensor y2 = cat1(y2_parts);
    Tensor diag = diagonal_of(s.a, rows);
    Tensor logdet = on_cpu && alpha.scalar_type() == diag.scalar_type() ? gated_logdet(diag, alpha)
                                                                          : at::log1p(diag.unsqueeze(-1) * alpha).sum({1, 2});
    if (norm) logdet = logdet + log_scale.sum() * static_cast<double>(x.size(1));
    Tensor out;
    if (on_cpu) {
      out = swap ? merge_rows(y2, x1, scatter) : merge_rows(x1, y2, scatter);
    } else {
      out = swap ? at::cat({y2, x1}, 1) : at::cat({x1, y2}, 1);
      if (scatter.defined()) out = out.index_select(1, scatter);
    }

    ctx->saved_data["gather"] = gather;
    ctx->saved_data["scatter"] = scatter;
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["swap"] = swap;
    ctx->saved_data["recompute"] = recompute;
    ctx->saved_data["block"] = block;
    ctx->saved_data["eps_q"] = eps_q;
    ctx->saved_data["eps_k"] = eps_k;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["length"] = x_in.size(1);
    // the halves as the layer used them (after the fused ActNorm, gathered): the backward needs no gather of x,
    // and they hold what x_in held
    variable_list saved = {x1, x2, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta};
    if (norm) {
      saved.push_back(loc);
      saved.push_back(log_scale);
    }
    if (!recompute) {
      for (const Tensor& t : {s.pq, s.mq, s.rq, s.pk, s.mk, s.rk, s.q, s.kn}) saved.push_back(t);
      for (const Tensor& t : s.a) saved.push_back(t);
    }
    ctx->save_for_backward(saved);
    return {out, logdet};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor g_out = grads[0], g_logdet = grads[1];
    auto tensor_or_none = [&](const char* key) { return saved_tensor_or_none(ctx, key); };
    const Tensor gather = tensor_or_none("gather"), scatter = tensor_or_none("scatter");
    const bool swap = ctx->saved_data["swap"].toBool(), norm = ctx->saved_data["norm"].toBool();
    const bool recompute = ctx->saved_data["recompute"].toBool();
    const int64_t block = ctx->saved_data["block"].toInt();
    // autograd edges exist for the tensors present: x, [gather, scatter], wq, wk, lnq_w, lnq_b, lnk_w, lnk_b,
    // log_tau, beta, bias, [loc, log_scale]; need(i) takes the index as if all were present
    const size_t shift = gather.defined() ? 0 : 2;
    auto need = [&](size_t i) { return ctx->needs_input_grad(i == 0 ? 0 : i - shift); };
    variable_list saved = ctx->get_saved_variables();
    const Tensor x1 = saved[0], x2 = saved[1];
    Tensor wq = saved[2], wk = saved[3], lnq_w = saved[4], lnq_b = saved[5], lnk_w = saved[6], lnk_b = saved[7],
           log_tau = saved[8], beta = saved[9];
    size_t next = 10;
    Tensor loc, log_scale, scale;
    if (norm) {
      loc = saved[10];
      log_scale = saved[11];
      next = 12;
      scale = log_scale.exp();
    }
    const int64_t length = ctx->saved_data["length"].toInt();
    const bool on_cpu = rows_on_cpu(x1) && rows_on_cpu(g_out) && g_out.scalar_type() == x1.scalar_type();
    // g_y: the gradient of the updated half, gathered (the matmuls need it contiguous); on the CPU the kept half's
    // gradient g_y1 is never gathered: the merge adds it straight from g_out
    Tensor g_y1, g_y;
    if (on_cpu) {
      g_y = take_rows(g_out, half_sources(gather, length, swap).second, Tensor(), Tensor());
    } else {
      std::tie(g_y1, g_y) = halves(g_out, gather, swap);
    }
    Attention s;
    if (recompute) {
      s = core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, ctx->saved_data["bias"].toTensor(),
                         ctx->saved_data["eps_q"].toDouble(), ctx->saved_data["eps_k"].toDouble(), block);
    } else {
      s.pq = saved[next]; s.mq = saved[next + 1]; s.rq = saved[next + 2];
      s.pk = saved[next + 3]; s.mk = saved[next + 4]; s.rk = saved[next + 5];
      s.q = saved[next + 6]; s.kn = saved[next + 7];
      s.a.assign(saved.begin() + static_cast<int64_t>(next + 8), saved.end());
      s.tau = log_tau.exp();
    }
    auto rows = row_blocks(x2.size(1), block);
    Tensor th = at::tanh(beta);
    Tensor alpha = th * (1.0 - kGateMargin);
    Tensor diag = diagonal_of(s.a, rows);  // (N, n)
    // y2 = x2 + A (x2 ⊙ α);  Aᵀ g_y: block 0 spans every column, the others add onto columns [r0, n)
    Tensor at_g = at::matmul(s.a[0].transpose(-1, -2), g_y.slice(1, 0, rows[0].second));
    for (size_t i = 1; i < rows.size(); ++i) {
      auto [r0, r1] = rows[i];
      at_g.slice(1, r0).baddbmm_(s.a[i].transpose(-1, -2), g_y.slice(1, r0, r1));
    }
    Tensor dx2, g_alpha, dalpha_update;
    if (on_cpu && at_g.scalar_type() == g_y.scalar_type() && alpha.scalar_type() == g_y.scalar_type()) {
      std::vector<Tensor> r = gate_backward_rows(g_y, at_g, x2, alpha);
      dx2 = r[0]; g_alpha = r[1]; dalpha_update = r[2];
    } else {
      dx2 = at::addcmul(g_y, at_g, alpha);
      g_alpha = g_y * alpha;
      dalpha_update = (at_g * x2).sum({0, 1});
    }
    // logdet = Σ log1p(α_c a_ii): ∂/∂a_ii = Σ_c α_c / (1 + α_c a_ii), ∂/∂α_c = Σ_i a_ii / (1 + α_c a_ii)
    Tensor dbeta, g_diag, dalpha_logdet;
    if (on_cpu && g_logdet.scalar_type() == diag.scalar_type() && alpha.scalar_type() == diag.scalar_type()) {
      std::tie(g_diag, dalpha_logdet) = gated_logdet_backward(diag, alpha, g_logdet);
    } else {
      Tensor d3 = diag.unsqueeze(-1);
      Tensor w = g_logdet.view({-1, 1, 1}) / (d3 * alpha + 1.0);  // (N, n, D)
      g_diag = (w * alpha).sum(-1);
      dalpha_logdet = (w * d3).sum({0, 1});
    }
    if (need(10)) dbeta = (dalpha_update + dalpha_logdet) * ((1.0 - th * th) * (1.0 - kGateMargin));
    std::vector<Tensor> dq_parts;
    Tensor dkn;
    for (size_t i = 0; i < rows.size(); ++i) {
      auto [r0, r1] = rows[i];
      Tensor da = at::matmul(g_alpha.slice(1, r0, r1), x2.slice(1, r0).transpose(-1, -2));
      da.slice(2, 0, r1 - r0).diagonal(0, -2, -1).add_(g_diag.slice(1, r0, r1));
      Tensor ds = at::_softmax_backward_data(da, s.a[i], -1, s.a[i].scalar_type());  // zero below the diagonal
      dq_parts.push_back(at::matmul(ds, s.kn.slice(1, r0)));
      if (i == 0)
        dkn = at::matmul(ds.transpose(-1, -2), s.q.slice(1, r0, r1));
      else
        dkn.slice(1, r0).baddbmm_(ds.transpose(-1, -2), s.q.slice(1, r0, r1));
    }
    Tensor dq = cat1(dq_parts);
    Tensor dlog_tau;
    const int64_t e = wq.size(0), d = wq.size(1);
    Tensor flat_x1 = x1.reshape({-1, d});
    Tensor dwq, dwk, dlnq_w, dlnq_b, dlnk_w, dlnk_b, dpq, dpk, dpqk, wqk;
    if (!s.pk.defined()) {  // the CPU path: [q | k] rows from one projection (core_attention)
      std::vector<Tensor> g = qk_layer_norm_backward(dq, dkn, s.pq, s.mq, s.rq, s.mk, s.rk, lnq_w, lnk_w, s.tau, s.q);
      dpqk = g[0];
      dlnq_w = g[1]; dlnq_b = g[2]; dlnk_w = g[3]; dlnk_b = g[4];
      if (need(9)) dlog_tau = g[5].view_as(log_tau);
      if (need(3) || need(4)) {
        Tensor dwqk = at::mm(dpqk.t(), flat_x1);  // (2E, D): [dWq ; dWk]
        if (need(3)) dwq = dwqk.slice(0, 0, e);
        if (need(4)) dwk = dwqk.slice(0, e);
      }
      wqk = at::cat({wq, wk}, 0);
    } else {
      if (need(9)) dlog_tau = (dq * s.q).sum().view_as(log_tau);
      const bool ln_params = need(5) || need(6) || need(7) || need(8);
      std::array<bool, 3> mask = {true, ln_params, ln_params};
      std::tie(dpq, dlnq_w, dlnq_b) =
          at::native_layer_norm_backward(dq * s.tau, s.pq, {e}, s.mq, s.rq, lnq_w, lnq_b, mask);
      std::tie(dpk, dlnk_w, dlnk_b) = at::native_layer_norm_backward(dkn, s.pk, {e}, s.mk, s.rk, lnk_w, lnk_b, mask);
      if (need(3)) dwq = at::matmul(dpq.reshape({-1, e}).t(), flat_x1);
      if (need(4)) dwk = at::matmul(dpk.reshape({-1, e}).t(), flat_x1);
    }
    Tensor dx, dloc, dlog_scale;
    if (need(0) || (norm && (need(12) || need(13)))) {
      if (on_cpu) {  // merge, scatter, the kept half's straight-through gradient and the ActNorm's backward: one pass
        Tensor dx1 = dpqk.defined() ? at::mm(dpqk, wqk).view(x1.sizes())
                                    : at::matmul(dpq, wq).add_(at::matmul(dpk, wk));
        const Tensor& first = swap ? dx2 : dx1;
        const Tensor& second = swap ? dx1 : dx2;
        const int64_t n = x1.size(1);
        MergeExtras ex;
        ex.add = g_out;  // into the kept half's rows: z rows [0, n), or [n, 2n) when swapped
        ex.add_lo = swap ? n : 0;
        ex.add_hi = swap ? 2 * n : n;
        Tensor dls;
        if (norm) {
          ex.x_first = swap ? x2 : x1;
          ex.x_second = swap ? x1 : x2;
          ex.loc = loc; ex.scale = scale; ex.dloc = &dloc; ex.dls = &dls;
        }
        dx = merge_rows(first, second, scatter, ex);
        if (norm) {
          dlog_scale = dls + g_logdet.sum() * static_cast<double>(length);
          if (!need(12)) dloc = Tensor();
          if (!need(13)) dlog_scale = Tensor();
        }
      } else {
        Tensor dx1 = dpqk.defined() ? at::addmm(g_y1.reshape({-1, d}), dpqk, wqk).view(g_y1.sizes())
                                    : at::matmul(dpq, wq).add_(at::matmul(dpk, wk)).add_(g_y1);
        Tensor dz = swap ? at::cat({dx2, dx1}, 1) : at::cat({dx1, dx2}, 1);
        if (norm) {  // through x = (x_in + loc)·s, whose halves (in z's order) the forward saved
          Tensor xz = swap ? at::cat({x2, x1}, 1) : at::cat({x1, x2}, 1);
          if (need(13)) dlog_scale = (dz * xz).sum({0, 1}) + g_logdet.sum() * static_cast<double>(length);
          dz = dz * scale;
          if (need(12)) dloc = dz.sum({0, 1});
        }
        dx = scatter.defined() ? dz.index_select(1, scatter) : dz;
      }
    }
    if (!need(5)) dlnq_w = Tensor();
    if (!need(6)) dlnq_b = Tensor();
    if (!need(7)) dlnk_w = Tensor();
    if (!need(8)) dlnk_b = Tensor();
    // one entry per forward argument (non-tensor ones undefined)
    return {dx, Tensor(), Tensor(), Tensor(), dwq, dwk, dlnq_w, dlnq_b, dlnk_w, dlnk_b, dlog_tau, dbeta,
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), dloc, dlog_scale};
  }
};

std::vector<Tensor> gated_ica_core(const Tensor& x, const std::optional<Tensor>& gather,
                                   const std::optional<Tensor>& scatter, bool swap, const Tensor& wq,
                                   const Tensor& wk, const Tensor& lnq_w, const Tensor& lnq_b, const Tensor& lnk_w,
                                   const Tensor& lnk_b, const Tensor& log_tau, const Tensor& beta, const Tensor& bias,
                                   double eps_q, double eps_k, bool recompute, int64_t block,
                                   const std::optional<Tensor>& loc, const std::optional<Tensor>& log_scale) {
  return GatedICACoreNative::apply(x, gather, scatter, swap, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta, bias,
                                   eps_q, eps_k, recompute, block, loc, log_scale);
}


// ---------------------------------------------------------------------------------------------------------------
// The affine coupling (pipeline/flows/coupling.py) as one node: conditioner Conv1d(k) → GroupNorm(1) → GELU →
// Conv1d(1) → GroupNorm(1) → GELU → Conv1d(k) on the conditioning half, then yb = xb·exp(log_s) + t with
// log_s = B·tanh(raw/B). Tokens stay last-but-one (N, L, C): each k-wide convolution is one matmul over the k
// shifted copies of its input (zero "same" padding), each GroupNorm(1, ·) a normalisation over (L, C) per sample
// and a per-channel affine. Same parameters and values as the module path (tested).

struct ConvParams {
  Tensor w0, b0, g0, be0, w1, b1, g1, be1, w2, b2;  // w0: (H, k·Ci) tap-major, w1: (H, H), w2: (2Co, k·H)
};

Tensor unfold_tokens(const Tensor& x_in, int64_t k) {  // (N, L, C) → (N, L, k·C), tap-major
  if (k == 1) return x_in;
  if (rows_on_cpu(x_in)) {  // one pass: each output row is k input rows (or zeros past the ends) side by side
    Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();  // a channel slice keeps its row stride
    const int64_t batch = x.size(0), length = x.size(1), c = x.size(2), pad = k / 2;
    const int64_t sb = x.stride(0), sl = x.stride(1);
    Tensor out = at::empty({batch, length, k * c}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unfold_tokens", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / length, l = r % length;
          scalar_t* o = op + r * k * c;
          for (int64_t t = 0; t < k; ++t) {
            const int64_t src = l + t - pad;
            if (src < 0 || src >= length) {
              std::fill(o + t * c, o + (t + 1) * c, scalar_t(0));
            } else {
              const scalar_t* row = xp + b * sb + src * sl;
              std::copy(row, row + c, o + t * c);
            }
          }
        }
      });
    });
    return out;
  }
  const int64_t pad = k / 2, length = x_in.size(1);
  const Tensor& x = x_in;
  Tensor padded = at::constant_pad_nd(x, {0, 0, pad, pad});
  std::vector<Tensor> taps;
  for (int64_t i = 0; i < k; ++i) taps.push_back(padded.slice(1, i, i + length));
  return at::cat(taps, -1);
}

Tensor flip_taps(const Tensor& w, int64_t k, int64_t c_in) {
  // w (C_out, k·C_in) tap-major → the "same" convolution's adjoint as a convolution: (C_in, k·C_out) with the
  // taps reversed, so that d/dx = unfold_tokens(dy, k) @ flip_taps(w)ᵀ
  const int64_t c_out = w.size(0);
  return w.view({c_out, k, c_in}).flip({1}).permute({2, 1, 0}).reshape({c_in, k * c_out});
}

struct GroupNormAffine {
  Tensor out, mean, rstd, weight, bias;  // weight/bias: the per-channel affine broadcast to (L, C) (contiguous)
};

GroupNormAffine group_norm_tokens(const Tensor& h, const Tensor& g, const Tensor& b, double eps) {
  // GroupNorm(1, C) on channels-last tokens: a layer norm over (L, C) per sample, the per-channel affine fused in
  GroupNormAffine r;
  const int64_t length = h.size(1), c = h.size(2);
  r.weight = g.expand({length, c}).contiguous();
  r.bias = b.expand({length, c}).contiguous();
  std::tie(r.out, r.mean, r.rstd) = at::native_layer_norm(h, {length, c}, r.weight, r.bias, eps);
  return r;
}

// x Wᵀ + b for tokens (N, L, C): on the CPU the bias is added after the matmul (addmm, which at::linear uses, first
// copies the bias broadcast over every row into its output: a slow strided copy as large as the output)
Tensor token_linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  if (!rows_on_cpu(x)) return at::linear(x, w, b);
  return at::matmul(x, w.t()).add_(b);
}

struct Conditioner {
  Tensor u0, h0, m0, r0, a0, e0, h1, m1, r1, a1, u2, h;
};

Conditioner conditioner(const Tensor& xa, const ConvParams& p, int64_t k, double eps0, double eps1,
                        const std::string& approx) {
  Conditioner c;
  c.u0 = unfold_tokens(xa, k);
  c.h0 = token_linear(c.u0, p.w0, p.b0);
  auto g0 = group_norm_tokens(c.h0, p.g0, p.be0, eps0);
  c.a0 = g0.out; c.m0 = g0.mean; c.r0 = g0.rstd;
  c.e0 = at::gelu(c.a0, approx);
  c.h1 = token_linear(c.e0, p.w1, p.b1);
  auto g1 = group_norm_tokens(c.h1, p.g1, p.be1, eps1);
  c.a1 = g1.out; c.m1 = g1.mean; c.r1 = g1.rstd;
  c.u2 = unfold_tokens(at::gelu(c.a1, approx), k);
  c.h = token_linear(c.u2, p.w2, p.b2);
  return c;
}

struct AffineCouplingNative : public torch::autograd::Function<AffineCouplingNative> {
  // weights arrive in the modules' layouts: conv0 (H, Ci, k), conv1 (H, H, 1), conv2 (2Co, H, k)
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor conv0_w, Tensor conv0_b, Tensor gn0_w,
                               Tensor gn0_b, Tensor conv1_w, Tensor conv1_b, Tensor gn1_w, Tensor gn1_b, Tensor conv2_w,
                               Tensor conv2_b, bool swap, int64_t cond_dim, double bound, double eps0, double eps1,
                               std::string approx, bool recompute) {
    const int64_t d = x.size(2), out_dim = d - cond_dim, k = conv0_w.size(2);
    Tensor xa = swap ? x.slice(2, out_dim) : x.slice(2, 0, cond_dim);
    Tensor xb = swap ? x.slice(2, 0, out_dim) : x.slice(2, cond_dim);
    ConvParams p = params(conv0_w, conv0_b, gn0_w, gn0_b, conv1_w, conv1_b, gn1_w, gn1_b, conv2_w, conv2_b);
    Conditioner c = conditioner(xa, p, k, eps0, eps1, approx);
    Tensor th = at::tanh(c.h.slice(2, 0, out_dim) / bound);
    Tensor log_s = th * bound;
    Tensor yb = at::addcmul(c.h.slice(2, out_dim), xb, log_s.exp());
    Tensor logdet = log_s.sum({1, 2});
    Tensor y = swap ? at::cat({yb, xa}, 2) : at::cat({xa, yb}, 2);
    ctx->saved_data["swap"] = swap;
    ctx->saved_data["cond_dim"] = cond_dim;
    ctx->saved_data["bound"] = bound;
    ctx->saved_data["eps0"] = eps0;
    ctx->saved_data["eps1"] = eps1;
    ctx->saved_data["approx"] = approx;
    ctx->saved_data["recompute"] = recompute;
    variable_list saved = {x, conv0_w, conv0_b, gn0_w, gn0_b, conv1_w, conv1_b, gn1_w, gn1_b, conv2_w, conv2_b};
    if (!recompute) {
      for (const Tensor& t : {c.u0, c.h0, c.m0, c.r0, c.a0, c.e0, c.h1, c.m1, c.r1, c.a1, c.u2, th}) saved.push_back(t);
    }
    ctx->save_for_backward(saved);
    return {y, logdet};
  }

  static ConvParams params(const Tensor& conv0_w, const Tensor& conv0_b, const Tensor& gn0_w, const Tensor& gn0_b,
                           const Tensor& conv1_w, const Tensor& conv1_b, const Tensor& gn1_w, const Tensor& gn1_b,
                           const Tensor& conv2_w, const Tensor& conv2_b) {
    ConvParams p;
    p.w0 = conv0_w.permute({0, 2, 1}).reshape({conv0_w.size(0), -1});
    p.w1 = conv1_w.select(2, 0);
    p.w2 = conv2_w.permute({0, 2, 1}).reshape({conv2_w.size(0), -1});
    p.b0 = conv0_b; p.g0 = gn0_w; p.be0 = gn0_b; p.b1 = conv1_b; p.g1 = gn1_w; p.be1 = gn1_b; p.b2 = conv2_b;
    return p;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor gy = grads[0], gl = grads[1];
    const bool swap = ctx->saved_data["swap"].toBool(), recompute = ctx->saved_data["recompute"].toBool();
    const int64_t cond_dim = ctx->saved_data["cond_dim"].toInt();
    const double bound = ctx->saved_data["bound"].toDouble();
    const std::string approx = ctx->saved_data["approx"].toStringRef();
    variable_list s = ctx->get_saved_variables();
    Tensor x = s[0], conv0_w = s[1], conv2_w = s[9];
    ConvParams p = params(s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10]);
    const int64_t d = x.size(2), out_dim = d - cond_dim, k = conv0_w.size(2), hidden = conv0_w.size(0);
    Tensor xa = swap ? x.slice(2, out_dim) : x.slice(2, 0, cond_dim);
    Tensor xb = swap ? x.slice(2, 0, out_dim) : x.slice(2, cond_dim);
    Conditioner c;
    Tensor th;
    if (recompute) {
      c = conditioner(xa, p, k, ctx->saved_data["eps0"].toDouble(), ctx->saved_data["eps1"].toDouble(), approx);
      th = at::tanh(c.h.slice(2, 0, out_dim) / bound);
    } else {
      c.u0 = s[11]; c.h0 = s[12]; c.m0 = s[13]; c.r0 = s[14]; c.a0 = s[15]; c.e0 = s[16];
      c.h1 = s[17]; c.m1 = s[18]; c.r1 = s[19]; c.a1 = s[20]; c.u2 = s[21]; th = s[22];
    }
    // edges: x 0, conv0_w 1, conv0_b 2, gn0_w 3, gn0_b 4, conv1_w 5, conv1_b 6, gn1_w 7, gn1_b 8, conv2_w 9, conv2_b 10
    auto need = [&](size_t i) { return ctx->needs_input_grad(i); };
    Tensor gya = swap ? gy.slice(2, out_dim) : gy.slice(2, 0, cond_dim);
    Tensor gyb = swap ? gy.slice(2, 0, out_dim) : gy.slice(2, cond_dim);
    Tensor es = (th * bound).exp();
    Tensor dxb = gyb * es;
    // ∂/∂log_s = gyb·xb·e^s (+ g_logdet), ∂log_s/∂raw = 1 − th²;  ∂/∂t = gyb
    Tensor d_raw = at::addcmul(gl.view({-1, 1, 1}), dxb, xb) * (1.0 - th * th);
    Tensor dh = at::cat({d_raw, gyb}, 2);  // (N, L, 2Co)
    auto flat = [](const Tensor& t) { return t.reshape({-1, t.size(-1)}); };
    Tensor dw2, db2, dw1, db1, dg1, dbe1, dw0, db0, dg0, dbe0;
    if (need(9)) dw2 = at::mm(flat(dh).t(), flat(c.u2)).view({conv2_w.size(0), k, hidden}).permute({0, 2, 1}).contiguous();
    if (need(10)) db2 = dh.sum({0, 1});
    const int64_t length = x.size(1);
    Tensor de1 = at::matmul(unfold_tokens(dh, k), flip_taps(p.w2, k, hidden).t());
    Tensor da1 = at::gelu_backward(de1, c.a1, approx);
    const std::array<bool, 3> all = {true, true, true};
    auto [dh1, dg1_full, dbe1_full] = at::native_layer_norm_backward(
        da1, c.h1, {length, hidden}, c.m1, c.r1, p.g1.expand({length, hidden}).contiguous(),
        p.be1.expand({length, hidden}).contiguous(), all);
    if (need(7)) dg1 = dg1_full.sum(0);
    if (need(8)) dbe1 = dbe1_full.sum(0);
    if (need(5)) dw1 = at::mm(flat(dh1).t(), flat(c.e0)).unsqueeze(-1);
    if (need(6)) db1 = dh1.sum({0, 1});
    Tensor de0 = at::matmul(dh1, p.w1);
    Tensor da0 = at::gelu_backward(de0, c.a0, approx);
    auto [dh0, dg0_full, dbe0_full] = at::native_layer_norm_backward(
        da0, c.h0, {length, hidden}, c.m0, c.r0, p.g0.expand({length, hidden}).contiguous(),
        p.be0.expand({length, hidden}).contiguous(), all);
    if (need(3)) dg0 = dg0_full.sum(0);
    if (need(4)) dbe0 = dbe0_full.sum(0);
    if (need(1)) dw0 = at::mm(flat(dh0).t(), flat(c.u0)).view({hidden, k, cond_dim}).permute({0, 2, 1}).contiguous();
    if (need(2)) db0 = dh0.sum({0, 1});
    Tensor dx;
    if (need(0)) {
      Tensor dxa = at::addmm(flat(gya), flat(unfold_tokens(dh0, k)), flip_taps(p.w0, k, cond_dim).t()).view_as(gya);
      dx = swap ? at::cat({dxb, dxa}, 2) : at::cat({dxa, dxb}, 2);
    }
    return {dx, dw0, db0, dg0, dbe0, dw1, db1, dg1, dbe1, dw2, db2, Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor()};
  }
};

std::vector<Tensor> affine_coupling(const Tensor& x, const Tensor& conv0_w, const Tensor& conv0_b, const Tensor& gn0_w,
                                    const Tensor& gn0_b, const Tensor& conv1_w, const Tensor& conv1_b,
                                    const Tensor& gn1_w, const Tensor& gn1_b, const Tensor& conv2_w,
                                    const Tensor& conv2_b, bool swap, int64_t cond_dim, double bound, double eps0,
                                    double eps1, const std::string& approx, bool recompute) {
  return AffineCouplingNative::apply(x, conv0_w, conv0_b, gn0_w, gn0_b, conv1_w, conv1_b, gn1_w, gn1_b, conv2_w,
                                     conv2_b, swap, cond_dim, bound, eps0, eps1, approx, recompute);
}


// ---------------------------------------------------------------------------------------------------------------
// LICA's block-diagonal token mixer as one node: y = P_s · blockdiag(W_1 … W_K) · P_g · norm(x) on (N, L, D), where
// P_g / P_s are optional token gathers (index_select) and norm the optional fused ActNorm (x + loc)·exp(log_scale);
// w is (K, G, G) with K·G = L. The ICA layer calls it twice: W on the way in, W⁻¹ on the way out.

struct BlockMixNative : public torch::autograd::Function<BlockMixNative> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor w, std::optional<Tensor> gather_opt,
                               std::optional<Tensor> gather_inv_opt, std::optional<Tensor> scatter_opt,
                               std::optional<Tensor> scatter_inv_opt, std::optional<Tensor> loc_opt,
                               std::optional<Tensor> log_scale_opt) {
    auto opt = [](const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); };
    const Tensor gather = opt(gather_opt), gather_inv = opt(gather_inv_opt), scatter = opt(scatter_opt),
                 scatter_inv = opt(scatter_inv_opt), loc = opt(loc_opt), log_scale = opt(log_scale_opt);
    const int64_t n = x.size(0), length = x.size(1), d = x.size(2), k = w.size(0), g = w.size(1);
    TORCH_CHECK(k * g == length, "BlockMix: ", k, " blocks of ", g, " tokens do not cover ", length, " tokens");
    const bool on_cpu = rows_on_cpu(x) && x.scalar_type() == w.scalar_type();
    Tensor y;
    if (on_cpu) {
      // token-major (L, N, D) = (K, G, N·D): the fused ActNorm and the gather write it in one pass, the K blocks are
      // one bmm (a (N, K, G, D) operand made matmul broadcast w to (N, K, G, G): a copy per call), the scatter reads
      // it back into (N, L, D)
      Tensor zt = take_rows(x, index_vector(gather, length), loc, loc.defined() ? log_scale.exp() : Tensor(), true);
      Tensor yt = at::bmm(w, zt.view({k, g, n * d}));
      y = merge_rows(yt.view({length, n, d}), Tensor(), scatter, MergeExtras(), true);
    } else {
      Tensor xn = loc.defined() ? (x + loc) * log_scale.exp() : x;
      Tensor z = gather.defined() ? xn.index_select(1, gather) : xn;
      y = at::matmul(w, z.reshape({n, k, g, d})).reshape({n, length, d});
      if (scatter.defined()) y = y.index_select(1, scatter);
    }
    ctx->saved_data["gather"] = gather;
    ctx->saved_data["gather_inv"] = gather_inv;
    ctx->saved_data["scatter_inv"] = scatter_inv;
    ctx->saved_data["norm"] = loc.defined();
    variable_list saved = {x, w};
    if (loc.defined()) {
      saved.push_back(loc);
      saved.push_back(log_scale);
    }
    ctx->save_for_backward(saved);  // the input, not the gathered copy: rebuilt in backward
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto tensor_or_none = [&](const char* key) { return saved_tensor_or_none(ctx, key); };
    const Tensor gather = tensor_or_none("gather"), gather_inv = tensor_or_none("gather_inv"),
                 scatter_inv = tensor_or_none("scatter_inv");
    const bool norm = ctx->saved_data["norm"].toBool();
    variable_list s = ctx->get_saved_variables();
    Tensor x = s[0], w = s[1], loc, log_scale, scale;
    const int64_t n = x.size(0), length = x.size(1), d = x.size(2), k = w.size(0), g = w.size(1);
    if (norm) {
      loc = s[2];
      log_scale = s[3];
      scale = log_scale.exp();
    }
    // edges: x, w, [gather, gather_inv], [scatter, scatter_inv], [loc, log_scale] — the tensors present
    size_t edge = 2 + (gather.defined() ? 2 : 0) + (scatter_inv.defined() ? 2 : 0);
    Tensor gy = grads[0];
    const bool on_cpu = rows_on_cpu(x) && x.scalar_type() == w.scalar_type() && gy.scalar_type() == x.scalar_type();
    Tensor xn = x;
    if (on_cpu) {  // token-major, as in the forward: the gathers (and the fused ActNorm's output) in single passes,
                   // the blocks' products single bmm's with no broadcast weight and no (N, K, G, G) partial sums
      Tensor dzt = take_rows(gy, index_vector(scatter_inv, length), Tensor(), Tensor(), true).view({k, g, n * d});
      Tensor dw;
      if (ctx->needs_input_grad(1)) {
        Tensor zt = take_rows(x, index_vector(gather, length), loc, scale, true).view({k, g, n * d});
        dw = at::bmm(dzt, zt.transpose(1, 2));
      }
      Tensor dx, dloc, dlog_scale;
      const bool need_norm = norm && (ctx->needs_input_grad(edge) || ctx->needs_input_grad(edge + 1));
      if (ctx->needs_input_grad(0) || need_norm) {
        Tensor dz = at::bmm(w.transpose(1, 2), dzt).view({length, n, d});
        if (norm) {  // the inverse gather and the fused ActNorm's backward in one pass
          MergeExtras ex;
          ex.x_in = x; ex.loc = loc; ex.scale = scale; ex.dloc = &dloc; ex.dls = &dlog_scale;
          dx = merge_rows(dz, Tensor(), gather_inv, ex, true);
          if (!ctx->needs_input_grad(edge)) dloc = Tensor();
          if (!ctx->needs_input_grad(edge + 1)) dlog_scale = Tensor();
        } else {
          dx = merge_rows(dz, Tensor(), gather_inv, MergeExtras(), true);
        }
      }
      return {dx, dw, Tensor(), Tensor(), Tensor(), Tensor(), dloc, dlog_scale};
    }
    // elsewhere (CUDA, other dtypes): the ATen ops
    if (norm) xn = (x + loc) * scale;
    Tensor dzm = (scatter_inv.defined() ? gy.index_select(1, scatter_inv) : gy).reshape({n, k, g, d});
    Tensor z = (gather.defined() ? xn.index_select(1, gather) : xn).reshape({n, k, g, d});
    Tensor dw;
    if (ctx->needs_input_grad(1)) dw = at::matmul(dzm, z.transpose(-1, -2)).sum(0);
    Tensor dx, dloc, dlog_scale;
    const bool need_norm = norm && (ctx->needs_input_grad(edge) || ctx->needs_input_grad(edge + 1));
    if (ctx->needs_input_grad(0) || need_norm) {
      Tensor dz = at::matmul(w.transpose(-1, -2), dzm).reshape({n, length, d});
      dx = gather.defined() ? dz.index_select(1, gather_inv) : dz;
      if (norm) {
        if (ctx->needs_input_grad(edge + 1)) dlog_scale = (dx * xn).sum({0, 1});
        dx = dx * scale;
        if (ctx->needs_input_grad(edge)) dloc = dx.sum({0, 1});
      }
    }
    return {dx, dw, Tensor(), Tensor(), Tensor(), Tensor(), dloc, dlog_scale};
  }
};

Tensor block_mix(const Tensor& x, const Tensor& w, const std::optional<Tensor>& gather,
                 const std::optional<Tensor>& gather_inv, const std::optional<Tensor>& scatter,
                 const std::optional<Tensor>& scatter_inv, const std::optional<Tensor>& loc,
                 const std::optional<Tensor>& log_scale) {
  return BlockMixNative::apply(x, w, gather, gather_inv, scatter, scatter_inv, loc, log_scale)[0];
}


// ---------------------------------------------------------------------------------------------------------------
// The channel mixer (pipeline/flows/channel_mix.py): y = x Wᵀ on every token, W = (L + I)(U + diag(sign·e^log_s))
// with L / U the strict lower / upper triangles of one (D, D) tensor; log-det L_tokens·Σ log_s.

std::pair<Tensor, Tensor> lu_factors(const Tensor& lu, const Tensor& log_s, const Tensor& sign) {
  Tensor low = at::tril(lu, -1) + at::eye(lu.size(0), lu.options());
  Tensor up = at::triu(lu, 1) + at::diag(sign * log_s.exp());
  return {low, up};
}

struct ChannelMixerNative : public torch::autograd::Function<ChannelMixerNative> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor lu, Tensor log_s, Tensor sign) {
    auto [low, up] = lu_factors(lu, log_s, sign);
    const int64_t d = x.size(2);
    Tensor y = at::mm(x.reshape({-1, d}), at::mm(low, up).t()).view(x.sizes());
    Tensor logdet = (log_s.sum() * static_cast<double>(x.size(1))).expand({x.size(0)}).contiguous();
    ctx->save_for_backward({x, lu, log_s, sign});
    return {y, logdet};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    Tensor x = s[0], lu = s[1], log_s = s[2], sign = s[3];
    auto [low, up] = lu_factors(lu, log_s, sign);
    const int64_t d = x.size(2);
    Tensor g = grads[0].reshape({-1, d});
    Tensor dx, dlu, dlog_s;
    if (ctx->needs_input_grad(0)) dx = at::mm(g, at::mm(low, up)).view(x.sizes());
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      Tensor dw = at::mm(g.t(), x.reshape({-1, d}));  // ∂/∂W of y = x Wᵀ
      Tensor dup = at::mm(low.t(), dw);                // W = low · up
      if (ctx->needs_input_grad(1)) dlu = at::tril(at::mm(dw, up.t()), -1) + at::triu(dup, 1);
      if (ctx->needs_input_grad(2))
        dlog_s = dup.diagonal() * sign * log_s.exp() + grads[1].sum() * static_cast<double>(x.size(1));
    }
    return {dx, dlu, dlog_s, Tensor()};
  }
};

std::vector<Tensor> channel_mix(const Tensor& x, const Tensor& lu, const Tensor& log_s, const Tensor& sign) {
  return ChannelMixerNative::apply(x, lu, log_s, sign);
}

// The gated ICA's inverse without autograd: solve (I + α_c A) x[:, :, c] = y[:, :, c] for every sample and
// channel by back-substitution, x_i = (y_i − α ⊙ Σ_{j>i} a_ij x_j) / (1 + α ⊙ a_ii), from the last row up.
// A is (N, n, n) upper triangular, α (D,), y (N, n, D), all contiguous, one floating dtype. The inner loop runs
// over the D channels of a solved row (contiguous, vectorised by the compiler); samples run in parallel. Same
// O(n²D) work as the blocked solve in ica.py, without its per-channel (N, D, b, b) diagonal blocks — building
// those was most of the sampling time on small token grids.
template <typename scalar_t>
void gated_back_substitution(const scalar_t* a, const scalar_t* alpha, const scalar_t* y, scalar_t* x,
                             int64_t batch, int64_t n, int64_t d) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(d);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* ab = a + b * n * n;
      const scalar_t* yb = y + b * n * d;
      scalar_t* xb = x + b * n * d;
      for (int64_t i = n - 1; i >= 0; --i) {
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        const scalar_t* arow = ab + i * n;
        for (int64_t j = i + 1; j < n; ++j) {
          const scalar_t aij = arow[j];
          const scalar_t* xj = xb + j * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += aij * xj[c];
        }
        const scalar_t aii = arow[i];
        const scalar_t* yi = yb + i * d;
        scalar_t* xi = xb + i * d;
        for (int64_t c = 0; c < d; ++c) xi[c] = (yi[c] - alpha[c] * acc[c]) / (scalar_t(1) + alpha[c] * aii);
      }
    }
  });
}

Tensor gated_solve(const Tensor& a, const Tensor& alpha, const Tensor& y) {
  TORCH_CHECK(a.dim() == 3 && y.dim() == 3 && alpha.dim() == 1, "gated_solve: a (N, n, n), alpha (D,), y (N, n, D)");
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == y.scalar_type() && a.scalar_type() == alpha.scalar_type(),
              "gated_solve: CPU tensors of one dtype");
  Tensor ac = a.contiguous(), alc = alpha.contiguous(), yc = y.contiguous();
  Tensor x = at::empty_like(yc);
  AT_DISPATCH_FLOATING_TYPES(ac.scalar_type(), "gated_solve", [&] {
    gated_back_substitution<scalar_t>(ac.data_ptr<scalar_t>(), alc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                      x.data_ptr<scalar_t>(), yc.size(0), yc.size(1), yc.size(2));
  });
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gated_ica_core", &gated_ica_core, "The gated ICA layer as one autograd node (see gated_ica_core.cpp)");
  m.def("channel_mix", &channel_mix, "The channel mixer as one autograd node (see gated_ica_core.cpp)");
  m.def("block_mix", &block_mix, "LICA's block-diagonal token mixer as one autograd node (see gated_ica_core.cpp)");
  m.def("affine_coupling", &affine_coupling, "The affine coupling as one autograd node (see gated_ica_core.cpp)");
  // the CPU kernels inside gated_ica_core on their own (underscored: not entry points of the flow), for the tests
  m.def("_gated_logdet", &gated_logdet, "Σ_i Σ_c log(1 + α_c a_ii) per sample: diag (N, n), alpha (D,) → (N,)");
  m.def("_gated_logdet_backward", &gated_logdet_backward, "(g_diag, dalpha) of gated_logdet for the gradient g (N,)");
  m.def(
      "_qk_layer_norm",
      [](const Tensor& pqk, const Tensor& wq, const Tensor& bq, const Tensor& wk, const Tensor& bk, const Tensor& tau,
         double eps_q, double eps_k) {
        QKNorm r = qk_layer_norm(pqk, wq, bq, wk, bk, tau, eps_q, eps_k);
        return std::vector<Tensor>{r.q, r.kn, r.mq, r.rq, r.mk, r.rk};
      },
      "LayerNorm of queries (times tau) and keys from [pq | pk] rows: (q, kn, mean_q, rstd_q, mean_k, rstd_k)");
  m.def("_qk_layer_norm_backward", &qk_layer_norm_backward,
        "(dpqk, dwq, dbq, dwk, dbk, dlog_tau) of _qk_layer_norm for the gradients (dq, dkn)");
  m.def(
      "_take_rows",
      [](const Tensor& x, const Tensor& index, const std::optional<Tensor>& loc, const std::optional<Tensor>& scale) {
        return take_rows(x, index_vector(index, index.size(0)), loc.value_or(Tensor()), scale.value_or(Tensor()));
      },
      "out[b, j] = (x[b, index[j]] + loc)·scale");
  m.def("gated_solve", &gated_solve, "The gated ICA inverse by back-substitution, no autograd (see gated_ica_core.cpp)");
}
