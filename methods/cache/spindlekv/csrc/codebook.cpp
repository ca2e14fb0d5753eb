// SpindleKV's decoding step over its codebook cache, fused (methods/cache/spindlekv/codebook_kernels.py).
//
// attend: one query token attends over the codebook slots of each KV head and the newest
// tokens (not yet in the codebooks), reading each slot's entry and RoPE row once and
// writing nothing per slot. Slot u of KV head (b, h) holds the key
// rope(kent[krefs[u]] * kmag[u], pos[u]) and the value vent[vrefs[u]] * vmag[u]; the RoPE
// rows of `table` are [cos | sin] of the first half of the dims (rotate-half RoPE).
//
// nearest: for each unit vector, its own group's entry of largest cosine (the first on ties)
// and that cosine (-inf for a group with no entry).
//
// append: SpindleKV's decoding rule for one new vector per group (scope "head", one step):
// it joins its group's most similar entry when their cosine exceeds theta, else it becomes a
// new entry; keys are taken back to pre-RoPE first. Written into the codebook's buffers,
// whose room the caller has reserved.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// A slot a query head does not see. No infinities inside the loops (built with
// -ffast-math); a head that sees no slot and no newest token reports 0.
constexpr float kHidden = -std::numeric_limits<float>::max();
// Rows are read in slot order at the entries' indices: fetch a few slots ahead.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const float* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t c = 0; c < n * static_cast<int64_t>(sizeof(float)); c += 64) {
    __builtin_prefetch(bytes + c);
  }
}

const float* optional_data(const torch::Tensor& t) {
  return t.numel() ? t.data_ptr<float>() : nullptr;
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be contiguous float32");
}

// The best entry of `group` for unit vector v (D): cosine and index, first on ties.
std::pair<float, int64_t> best_entry(const float* v, int group, const float* entries,
                                     const int* owner, int64_t count, int64_t D,
                                     bool normalize) {
  float best = kHidden;  // none of the group's: reported as -inf by `nearest`
  int64_t ref = 0;
  for (int64_t e = 0; e < count; ++e) {
    if (owner[e] != group) continue;
    const float* row = entries + e * D;
    float dot = 0.0f, sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += v[d] * row[d];
    if (normalize) {
      for (int64_t d = 0; d < D; ++d) sq += row[d] * row[d];
      dot /= std::max(std::sqrt(sq), 1e-12f);
    }
    if (dot > best) {
      best = dot;
      ref = e;
    }
  }
  return {best, ref};
}

}  // namespace

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& kent,
                     const torch::Tensor& krefs, const torch::Tensor& kmag,
                     const torch::Tensor& table, const torch::Tensor& pos,
                     const torch::Tensor& heads, const torch::Tensor& vent,
                     const torch::Tensor& vrefs, const torch::Tensor& vmag,
                     const torch::Tensor& tail_k, const torch::Tensor& tail_v, double softcap) {
  check_float(q, "q");
  check_float(kent, "key entries");
  check_float(vent, "value entries");
  check_float(table, "table");
  check_float(tail_k, "newest keys");
  check_float(tail_v, "newest values");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t U = krefs.size(2), Dv = vent.size(1), T = tail_k.size(2), half = D / 2;
  for (const auto* t : {&krefs, &pos, &vrefs}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt, "refs and positions must be int32");
    check_rows(*t, "refs and positions");
  }
  if (kmag.numel()) check_rows(kmag, "key magnitudes");
  if (vmag.numel()) check_rows(vmag, "value magnitudes");
  if (heads.numel()) check_rows(heads, "heads");

  auto out = torch::zeros({B, H, G, Dv}, q.options());
  const float *qd = q.data_ptr<float>(), *ke = kent.data_ptr<float>(),
              *ve = vent.data_ptr<float>(), *tb = table.data_ptr<float>(),
              *tk = tail_k.data_ptr<float>(), *tv = tail_v.data_ptr<float>();
  const float *km = optional_data(kmag), *vm = optional_data(vmag);
  const uint8_t* hd = heads.numel() ? reinterpret_cast<const uint8_t*>(heads.data_ptr<bool>())
                                    : nullptr;
  const int *kr = krefs.data_ptr<int>(), *vr = vrefs.data_ptr<int>(), *ps = pos.data_ptr<int>();
  float* od = out.data_ptr<float>();
  const float cap = static_cast<float>(softcap);
  const int64_t hs2 = heads.numel() ? heads.stride(2) : 0;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(G * (U + T)), rotated(D), top(G), total(G);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int* krow = kr + b * krefs.stride(0) + h * krefs.stride(1);
      const int* vrow = vr + b * vrefs.stride(0) + h * vrefs.stride(1);
      const int* prow = ps + b * pos.stride(0) + h * pos.stride(1);
      const float* kmrow = km ? km + b * kmag.stride(0) + h * kmag.stride(1) : nullptr;
      const float* vmrow = vm ? vm + b * vmag.stride(0) + h * vmag.stride(1) : nullptr;
      const uint8_t* hrow = hd ? hd + b * heads.stride(0) + h * heads.stride(1) : nullptr;
      const float* qrow = qd + bh * G * D;
      const float* tkrow = tk + bh * T * D;
      const float* tvrow = tv + bh * T * Dv;
      float* o = od + bh * G * Dv;
      // pass 1: scores of the slots (entry rotated once, scored by the G query heads), then
      // of the newest tokens (post-RoPE), at columns U..U+T
      for (int64_t u = 0; u < U; ++u) {
        if (u + kAhead < U) {
          prefetch_row(ke + static_cast<int64_t>(krow[u + kAhead]) * D, D);
          prefetch_row(tb + static_cast<int64_t>(prow[u + kAhead]) * D, D);
        }
        const float* e = ke + static_cast<int64_t>(krow[u]) * D;
        const float* t = tb + static_cast<int64_t>(prow[u]) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = e[i], c = e[i + half], cs = t[i], sn = t[i + half];
          rotated[i] = a * cs - c * sn;
          rotated[i + half] = c * cs + a * sn;
        }
        const float scale = kmrow ? kmrow[u] : 1.0f;
        for (int64_t g = 0; g < G; ++g) {
          float dot = 0.0f;
          const float* qg = qrow + g * D;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * rotated[d];
          logits[g * (U + T) + u] = dot * scale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qrow + g * D;
        float* l = logits.data() + g * (U + T);
        for (int64_t j = 0; j < T; ++j) {
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * tkrow[j * D + d];
          l[U + j] = dot;
        }
        if (cap > 0.0f) {  // before the mask
          for (int64_t u = 0; u < U + T; ++u) l[u] = std::tanh(l[u] / cap) * cap;
        }
        if (hrow) {  // arithmetic, not a branch: it vectorises
          const uint8_t* seen = hrow + g * hs2;
          for (int64_t u = 0; u < U; ++u) {
            const float keep = static_cast<float>(seen[u]);
            l[u] = keep * l[u] + (1.0f - keep) * kHidden;
          }
        }
        float m = kHidden;
        for (int64_t u = 0; u < U + T; ++u) m = std::max(m, l[u]);
        // pass 2: softmax numerators (a hidden slot underflows to 0), times |v|
        float sum = 0.0f;
        if (m == kHidden) {
          std::fill(l, l + U + T, 0.0f);
        } else {
          for (int64_t u = 0; u < U + T; ++u) {
            const float p = std::exp(l[u] - m);
            sum += p;
            l[u] = p;
          }
          if (vmrow) {
            for (int64_t u = 0; u < U; ++u) l[u] *= vmrow[u];
          }
        }
        total[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
      }
      // pass 3: weighted values of the slots, then of the newest tokens
      for (int64_t u = 0; u < U; ++u) {
        if (u + kAhead < U) prefetch_row(ve + static_cast<int64_t>(vrow[u + kAhead]) * Dv, Dv);
        const float* v = ve + static_cast<int64_t>(vrow[u]) * Dv;
        for (int64_t g = 0; g < G; ++g) {
          const float w = logits[g * (U + T) + u];
          float* og = o + g * Dv;
          for (int64_t d = 0; d < Dv; ++d) og[d] += w * v[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = o + g * Dv;
        for (int64_t j = 0; j < T; ++j) {
          const float w = logits[g * (U + T) + U + j];
          for (int64_t d = 0; d < Dv; ++d) og[d] += w * tvrow[j * Dv + d];
        }
        for (int64_t d = 0; d < Dv; ++d) og[d] *= total[g];
      }
    }
  });
  return out;
}

std::vector<torch::Tensor> nearest(const torch::Tensor& vectors, const torch::Tensor& groups,
                                   const torch::Tensor& entries, const torch::Tensor& owner,
                                   bool normalize) {
  check_float(vectors, "vectors");
  check_float(entries, "entries");
  TORCH_CHECK(groups.scalar_type() == torch::kInt && owner.scalar_type() == torch::kInt &&
                  groups.is_contiguous() && owner.is_contiguous(),
              "groups and owner must be contiguous int32");
  const int64_t N = vectors.size(0), D = vectors.size(1), E = entries.size(0);
  auto best = torch::empty({N}, vectors.options());
  auto ref = torch::empty({N}, vectors.options().dtype(torch::kLong));
  for (int64_t n = 0; n < N; ++n) {
    const auto found = best_entry(vectors.data_ptr<float>() + n * D, groups.data_ptr<int>()[n],
                                  entries.data_ptr<float>(), owner.data_ptr<int>(), E, D,
                                  normalize);
    best.data_ptr<float>()[n] =
        found.first == kHidden ? -std::numeric_limits<float>::infinity() : found.first;
    ref.data_ptr<int64_t>()[n] = found.second;
  }
  return {best, ref};
}

// New vectors (N, D), one per group n (groups 0..N-1, scope "head"), float32; `table` (P, D)
// and `positions` (N,) int32 when they are post-RoPE keys (else empty). Entries and owners
// are written from row `count` of their buffers (room for N more reserved). Returns the
// entry of each vector (N,) int32, their norms (N,) and how many entries were made.
std::vector<torch::Tensor> append(const torch::Tensor& vectors, const torch::Tensor& table,
                                  const torch::Tensor& positions, torch::Tensor entries,
                                  torch::Tensor owner, int64_t count, double theta,
                                  bool magnitudes) {
  check_float(vectors, "vectors");
  check_float(entries, "entries");
  TORCH_CHECK(owner.scalar_type() == torch::kInt && owner.is_contiguous(), "owner: int32");
  const int64_t N = vectors.size(0), D = vectors.size(1), half = D / 2;
  TORCH_CHECK(entries.size(0) >= count + N && owner.size(0) >= count + N, "reserve room first");
  auto refs = torch::empty({N}, owner.options());
  auto norms = torch::empty({N}, vectors.options());
  float *ed = entries.data_ptr<float>(), *nd = norms.data_ptr<float>();
  int *od = owner.data_ptr<int>(), *rd = refs.data_ptr<int>();
  const int64_t existing = count;
  std::vector<float> raw(D), unit(D);
  for (int64_t n = 0; n < N; ++n) {
    const float* v = vectors.data_ptr<float>() + n * D;
    if (table.numel()) {  // undo RoPE (cos/sin may carry an attention scaling factor)
      const float* t = table.data_ptr<float>() + int64_t{positions.data_ptr<int>()[n]} * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], c = v[i + half], cs = t[i], sn = t[i + half];
        const float r = cs * cs + sn * sn;
        raw[i] = (a * cs + c * sn) / r;
        raw[i + half] = (c * cs - a * sn) / r;
      }
    } else {
      std::copy(v, v + D, raw.begin());
    }
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) sq += raw[d] * raw[d];
    const float norm = std::sqrt(sq);
    for (int64_t d = 0; d < D; ++d) unit[d] = raw[d] / std::max(norm, 1e-12f);
    nd[n] = norm;
    // entries made by earlier vectors of this call belong to other groups: skip them
    const auto found = best_entry(unit.data(), static_cast<int>(n), ed, od, existing, D,
                                  !magnitudes);
    if (found.first > theta) {
      rd[n] = static_cast<int>(found.second);
    } else {
      const float* keep = magnitudes ? unit.data() : raw.data();
      std::copy(keep, keep + D, ed + count * D);
      od[count] = static_cast<int>(n);
      rd[n] = static_cast<int>(count++);
    }
  }
  return {refs, norms, torch::tensor(count - existing)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "SpindleKV: one query token over the codebook slots");
  m.def("nearest", &nearest, "SpindleKV: each vector's most similar entry of its group");
  m.def("append", &append, "SpindleKV: one new vector per group joins or opens an entry");
}
