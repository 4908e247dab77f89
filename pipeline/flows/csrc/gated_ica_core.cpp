// The gated ICA layer as one C++ autograd node: the same arithmetic as the Python reference
// pipeline/flows/ica_nodes.py::GatedICACore (forward and hand-written backward), built at first use by
// pipeline/flows/native.py. A MANGO layer on a small token grid is ~70 small ATen ops; from Python each op and
// the autograd.Function around them cost interpreter and argument-parsing time that was ~15 % of a training
// step, which C++ does not pay. The tests hold this node to the Python one (values and gradients, fp64).
//
// Tensor arguments that may be absent (gather, scatter, loc, log_scale) arrive as None (std::optional).
#include <torch/extension.h>

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

std::pair<Tensor, Tensor> halves(const Tensor& x, const Tensor& gather, bool swap) {
  Tensor z = gather.defined() ? x.index_select(1, gather) : x;
  auto parts = z.chunk(2, 1);
  return swap ? std::make_pair(parts[1], parts[0]) : std::make_pair(parts[0], parts[1]);
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
  s.pq = at::matmul(x1, wq.t());
  s.pk = at::matmul(x1, wk.t());
  Tensor qn, kn;
  std::tie(qn, s.mq, s.rq) = at::native_layer_norm(s.pq, {e}, lnq_w, lnq_b, eps_q);
  std::tie(kn, s.mk, s.rk) = at::native_layer_norm(s.pk, {e}, lnk_w, lnk_b, eps_k);
  s.kn = kn;
  s.tau = log_tau.exp();
  s.q = qn * s.tau;
  for (auto [r0, r1] : row_blocks(s.q.size(1), block)) {
    Tensor scores = at::baddbmm(bias.slice(0, r0, r1).slice(1, r0), s.q.slice(1, r0, r1),
                                kn.slice(1, r0).transpose(-1, -2));
    s.a.push_back(at::softmax(scores, -1));
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
    Tensor x_in = x;
    if (norm) x = (x_in + loc) * log_scale.exp();  // the preceding ActNorm, fused
    auto [x1, x2] = halves(x, gather, swap);
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
    Tensor logdet = at::log1p(diag.unsqueeze(-1) * alpha).sum({1, 2});
    if (norm) logdet = logdet + log_scale.sum() * static_cast<double>(x.size(1));
    Tensor out = swap ? at::cat({y2, x1}, 1) : at::cat({x1, y2}, 1);
    if (scatter.defined()) out = out.index_select(1, scatter);

    ctx->saved_data["gather"] = gather;
    ctx->saved_data["scatter"] = scatter;
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["swap"] = swap;
    ctx->saved_data["recompute"] = recompute;
    ctx->saved_data["block"] = block;
    ctx->saved_data["eps_q"] = eps_q;
    ctx->saved_data["eps_k"] = eps_k;
    ctx->saved_data["norm"] = norm;
    variable_list saved = {x_in, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta};
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
    auto tensor_or_none = [&](const char* key) {
      const auto& v = ctx->saved_data[key];
      return v.isTensor() ? v.toTensor() : Tensor();
    };
    const Tensor gather = tensor_or_none("gather"), scatter = tensor_or_none("scatter");
    const bool swap = ctx->saved_data["swap"].toBool(), norm = ctx->saved_data["norm"].toBool();
    const bool recompute = ctx->saved_data["recompute"].toBool();
    const int64_t block = ctx->saved_data["block"].toInt();
    // autograd edges exist for the tensors present: x, [gather, scatter], wq, wk, lnq_w, lnq_b, lnk_w, lnk_b,
    // log_tau, beta, bias, [loc, log_scale]; need(i) takes the index as if all were present
    const size_t shift = gather.defined() ? 0 : 2;
    auto need = [&](size_t i) { return ctx->needs_input_grad(i == 0 ? 0 : i - shift); };
    variable_list saved = ctx->get_saved_variables();
    Tensor x = saved[0], wq = saved[1], wk = saved[2], lnq_w = saved[3], lnq_b = saved[4], lnk_w = saved[5],
           lnk_b = saved[6], log_tau = saved[7], beta = saved[8];
    size_t next = 9;
    Tensor loc, log_scale, scale;
    if (norm) {
      loc = saved[9];
      log_scale = saved[10];
      next = 11;
      scale = log_scale.exp();
      x = (x + loc) * scale;  // the fused ActNorm's output, rebuilt from its saved input
    }
    auto [g_y1, g_y] = halves(g_out, gather, swap);
    auto [x1, x2] = halves(x, gather, swap);
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
    Tensor dx2 = at::addcmul(g_y, at_g, alpha);
    // logdet = Σ log1p(α_c a_ii): ∂/∂a_ii = Σ_c α_c / (1 + α_c a_ii), ∂/∂α_c = Σ_i a_ii / (1 + α_c a_ii)
    Tensor d3 = diag.unsqueeze(-1);
    Tensor w = g_logdet.view({-1, 1, 1}) / (d3 * alpha + 1.0);  // (N, n, D)
    Tensor dbeta;
    if (need(10)) {
      Tensor dalpha = (at_g * x2).sum({0, 1}) + (w * d3).sum({0, 1});
      dbeta = dalpha * ((1.0 - th * th) * (1.0 - kGateMargin));
    }
    Tensor g_alpha = g_y * alpha, g_diag = (w * alpha).sum(-1);
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
    if (need(9)) dlog_tau = (dq * s.q).sum().view_as(log_tau);
    const int64_t e = wq.size(0), d = wq.size(1);
    const bool ln_params = need(5) || need(6) || need(7) || need(8);
    std::array<bool, 3> mask = {true, ln_params, ln_params};
    auto [dpq, dlnq_w, dlnq_b] =
        at::native_layer_norm_backward(dq * s.tau, s.pq, {e}, s.mq, s.rq, lnq_w, lnq_b, mask);
    auto [dpk, dlnk_w, dlnk_b] = at::native_layer_norm_backward(dkn, s.pk, {e}, s.mk, s.rk, lnk_w, lnk_b, mask);
    Tensor flat_x1 = x1.reshape({-1, d});
    Tensor dwq, dwk;
    if (need(3)) dwq = at::matmul(dpq.reshape({-1, e}).t(), flat_x1);
    if (need(4)) dwk = at::matmul(dpk.reshape({-1, e}).t(), flat_x1);
    Tensor dx, dloc, dlog_scale;
    if (need(0) || (norm && (need(12) || need(13)))) {
      Tensor dx1 = at::matmul(dpq, wq).add_(at::matmul(dpk, wk)).add_(g_y1);
      Tensor dz = swap ? at::cat({dx2, dx1}, 1) : at::cat({dx1, dx2}, 1);
      dx = scatter.defined() ? dz.index_select(1, scatter) : dz;
      if (norm) {  // through x = (x_in + loc)·s
        if (need(13)) dlog_scale = (dx * x).sum({0, 1}) + g_logdet.sum() * static_cast<double>(x.size(1));
        dx = dx * scale;
        if (need(12)) dloc = dx.sum({0, 1});
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gated_ica_core", &gated_ica_core, "The gated ICA layer as one autograd node (see gated_ica_core.cpp)");
}
