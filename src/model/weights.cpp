#include "model/weights.h"

#include <algorithm>

#include <fmt/ranges.h>

#include "util/error.h"

namespace bigmoe {

Linear Linear::from_gguf(const GgufTensorInfo& t, const std::string& file) {
  if (t.ne.size() != 2) fail("{}: tensor '{}' has {} dims, expected a 2-D weight", file, t.name, t.ne.size());
  if (!ggml_type_computable(t.type))
    fail("{}: tensor '{}' has type {}, which bigmoe cannot compute yet", file, t.name, ggml_type_name(t.type));
  Linear l;
  l.g = &t;
  l.in = int(t.ne[0]);
  l.out = int(t.ne[1]);
  l.row_bytes = ggml_row_size(t.type, t.ne[0]);
  return l;
}

Linear Linear::from_gguf_expert(const GgufTensorInfo& t, int e, const std::string& file) {
  if (t.ne.size() != 3) fail("{}: tensor '{}' has {} dims, expected a 3-D merged expert tensor", file, t.name, t.ne.size());
  if (!ggml_type_computable(t.type))
    fail("{}: tensor '{}' has type {}, which bigmoe cannot compute yet", file, t.name, ggml_type_name(t.type));
  if (e < 0 || e >= t.ne[2]) fail("{}: tensor '{}' has {} experts, no expert {}", file, t.name, t.ne[2], e);
  Linear l;
  l.g = &t;
  l.in = int(t.ne[0]);
  l.out = int(t.ne[1]);
  l.row_bytes = ggml_row_size(t.type, t.ne[0]);
  l.g_offset = size_t(e) * size_t(l.out) * l.row_bytes;
  return l;
}

Linear Linear::from_floats(std::vector<float> w, int out, int in) {
  if (w.size() != size_t(out) * size_t(in)) fail("Linear::from_floats: {} values for [{}, {}]", w.size(), out, in);
  Linear l;
  l.out = out;
  l.in = in;
  l.owned = std::make_shared<const std::vector<float>>(std::move(w));
  return l;
}

void Linear::row(int o, float* dst) const {
  if (g) {
    dequantize_row(g->type, g->data + g_offset + size_t(o) * row_bytes, dst, in);
    return;
  }
  if (owned) {
    std::copy_n(owned->data() + size_t(o) * in, in, dst);
    return;
  }
  size_t esz = dtype_size(w->dtype);
  to_f32(w->dtype, w->data + size_t(o) * in * esz, dst, size_t(in));
  if (scale) {
    int nb = (in + bi - 1) / bi;
    std::vector<float> s(nb);
    size_t ssz = dtype_size(scale->dtype);
    to_f32(scale->dtype, scale->data + size_t(o / bo) * nb * ssz, s.data(), size_t(nb));
    for (int i = 0; i < in; ++i) dst[i] *= s[i / bi];
  }
}

size_t Linear::nbytes() const {
  return (w ? w->nbytes : 0) + (scale ? scale->nbytes : 0) + (g ? size_t(out) * row_bytes : 0) +
         (owned ? owned->size() * sizeof(float) : 0);
}

const TensorView& WeightLoader::tensor(const std::string& name, std::vector<int64_t> shape) const {
  const TensorView& t = st_.get(name);
  if (t.shape != shape)
    fail("{}: tensor '{}' has shape [{}], expected [{}]", t.file, name, fmt::join(t.shape, ", "),
         fmt::join(shape, ", "));
  return t;
}

Linear WeightLoader::linear(const std::string& prefix, int out, int in) const {
  Linear l;
  l.out = out;
  l.in = in;
  l.w = &tensor(prefix + ".weight", {out, in});
  switch (l.w->dtype) {
    case DType::F32: case DType::F16: case DType::BF16: case DType::F8_E4M3: break;
    default: fail("{}: tensor '{}.weight' has dtype {}, expected a float type", l.w->file, prefix,
                  dtype_name(l.w->dtype));
  }
  if (l.w->dtype == DType::F8_E4M3) {
    std::string sname = prefix + ".weight_scale_inv";
    if (!st_.has(sname))
      fail("{}: FP8 tensor '{}.weight' has no '{}'", l.w->file, prefix, sname);
    l.bo = bo_;
    l.bi = bi_;
    l.scale = &tensor(sname, {(out + bo_ - 1) / bo_, (in + bi_ - 1) / bi_});
    if (l.scale->dtype != DType::F32 && l.scale->dtype != DType::BF16)
      fail("{}: '{}' has dtype {}, expected F32 or BF16", l.scale->file, sname, dtype_name(l.scale->dtype));
  }
  return l;
}

std::vector<float> WeightLoader::vec(const std::string& name, int n) const {
  const TensorView& t = tensor(name, {n});
  std::vector<float> v(n);
  to_f32(t.dtype, t.data, v.data(), size_t(n));
  return v;
}

}  // namespace bigmoe
