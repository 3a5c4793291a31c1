// Fused relocate + patch + scatter into a paged KV cache, and the paged gather (save side).
//
// Same contract as kernels/relocate.py (see kvreuse/ops/plan.py for the address model):
//   K' = R(dst - src)(K + A_k B_k),  V' = V + A_v B_v   (fp32 inside, one rounding)
// written to  out + layer_off[l] + blk * s_blk + off * s_off + h * s_h + d  (V at + s_kv).
// One CTA per (token, layer); each thread moves VEC elements (16 bytes when aligned) of one head.
// layer_align: gcd of the per-layer element offsets (the host knows them; checking them here would
// need a device-to-host copy per call).
// The rotation reads the fp32 delta table [N, half] built by the reference; products and sums use
// __fmul_rn / __fadd_rn so no FMA contraction changes the rounding relative to the reference.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace kvreuse {

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& x) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = x;
}

struct Factor {           // one kind (K or V) of per-layer factors; A [N, H, r_l], B [H, r_l, D]
  const void* a;          // base of layer 0 (factor dtype TF)
  const int64_t* a_off;   // [L] element offsets
  const void* b;
  const int64_t* b_off;
  const int32_t* rank;    // [L]
};

struct Params {
  const void* k; const void* v;            // [L, N, H, D]
  int64_t sk_l, sk_n, sk_h, sv_l, sv_n, sv_h;
  void* out; const int64_t* out_loff;      // destination of layer 0, [L] element offsets
  int64_t so_kv, so_blk, so_off, so_h;
  const int64_t* slots64; const int32_t* slots32;  // [N] or both null (slot = token)
  int64_t block_size, num_slots;
  const float* cos; const float* sin;      // [N, half] delta table
  int64_t s_cs;
  int N, H, D, rot_lo, rot_dim;
  bool is_neox, has_v;
  Factor fk, fv;
  bool patch_k, patch_v;
};

// sum_r A[n, h, r] * B[h, r, d] in fp32
template <typename TF>
__device__ __forceinline__ float patch_at(const Factor& f, int layer, int64_t n, int h, int H, int D, int d) {
  const int r = f.rank[layer];
  const TF* a = reinterpret_cast<const TF*>(f.a) + f.a_off[layer] + (n * H + h) * r;
  const TF* b = reinterpret_cast<const TF*>(f.b) + f.b_off[layer] + (int64_t)h * r * D + d;
  float acc = 0.f;
  for (int i = 0; i < r; ++i) acc = __fadd_rn(acc, __fmul_rn(to_f32(a[i]), to_f32(b[(int64_t)i * D])));
  return acc;
}

template <typename T, typename TO, typename TF, int VEC>
__global__ void relocate_scatter_kernel(const Params p) {
  const int64_t n = blockIdx.x;
  const int layer = blockIdx.y;
  int64_t slot = n;
  if (p.slots64) slot = p.slots64[n];
  else if (p.slots32) slot = p.slots32[n];
  if (slot < 0 || slot >= p.num_slots) return;   // vLLM padding (-1) and strays are never written
  TO* out = reinterpret_cast<TO*>(p.out) + p.out_loff[layer] + (slot / p.block_size) * p.so_blk +
            (slot % p.block_size) * p.so_off;
  const T* k = reinterpret_cast<const T*>(p.k) + layer * p.sk_l + n * p.sk_n;
  const T* v = reinterpret_cast<const T*>(p.v) + layer * p.sv_l + n * p.sv_n;
  const int half = p.rot_dim / 2;
  const int vecs_per_head = p.D / VEC;

  for (int idx = threadIdx.x; idx < p.H * vecs_per_head; idx += blockDim.x) {
    const int h = idx / vecs_per_head;
    const int d0 = (idx % vecs_per_head) * VEC;
    const T* krow = k + h * p.sk_h;
    const Vec<T, VEC> xv = load_vec<T, VEC>(krow + d0);
    float x[VEC], pr[VEC];
    int pd[VEC];
    bool rot[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int d = d0 + i, j = d - p.rot_lo;
      rot[i] = j >= 0 && j < p.rot_dim;
      pd[i] = !rot[i] ? d : (p.is_neox ? (j < half ? d + half : d - half) : p.rot_lo + (j ^ 1));
      x[i] = to_f32(xv.v[i]);
    }
    // partner values: NeoX pairs sit in another (aligned) vector, GPT-J pairs in this one
    if (p.is_neox && rot[0]) {
      const Vec<T, VEC> pv = load_vec<T, VEC>(krow + pd[0]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) pr[i] = to_f32(pv.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int off = pd[i] - d0;
        pr[i] = (off >= 0 && off < VEC) ? x[off] : to_f32(krow[pd[i]]);
      }
    }
    if (p.patch_k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        x[i] = __fadd_rn(x[i], patch_at<TF>(p.fk, layer, n, h, p.H, p.D, d0 + i));
        if (rot[i]) pr[i] = __fadd_rn(pr[i], patch_at<TF>(p.fk, layer, n, h, p.H, p.D, pd[i]));
      }
    }
    Vec<TO, VEC> ov;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float o = x[i];
      if (rot[i]) {
        const int j = d0 + i - p.rot_lo;
        const int f = p.is_neox ? (j < half ? j : j - half) : (j >> 1);
        const bool first = p.is_neox ? (j < half) : ((j & 1) == 0);
        const float c = p.cos[n * p.s_cs + f], s = p.sin[n * p.s_cs + f];
        o = first ? __fsub_rn(__fmul_rn(x[i], c), __fmul_rn(pr[i], s))
                  : __fadd_rn(__fmul_rn(x[i], c), __fmul_rn(pr[i], s));
      }
      ov.v[i] = from_f32<TO>(o);
    }
    store_vec<TO, VEC>(out + h * p.so_h + d0, ov);

    if (p.has_v) {
      const Vec<T, VEC> vv = load_vec<T, VEC>(v + h * p.sv_h + d0);
      Vec<TO, VEC> ow;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float y = to_f32(vv.v[i]);
        if (p.patch_v) y = __fadd_rn(y, patch_at<TF>(p.fv, layer, n, h, p.H, p.D, d0 + i));
        ow.v[i] = from_f32<TO>(y);
      }
      store_vec<TO, VEC>(out + p.so_kv + h * p.so_h + d0, ow);
    }
  }
}

template <typename T, int VEC>
__global__ void gather_kernel(const T* cache, const int64_t* loff, int64_t s_kv, int64_t s_blk, int64_t s_off,
                              int64_t s_h, const int64_t* slots64, const int32_t* slots32, int64_t block_size,
                              T* k_out, T* v_out, int64_t so_l, int64_t so_n, int64_t so_h, int H, int D) {
  const int64_t n = blockIdx.x;
  const int layer = blockIdx.y;
  const int64_t slot = slots64 ? slots64[n] : (int64_t)slots32[n];
  const T* src = cache + loff[layer] + (slot / block_size) * s_blk + (slot % block_size) * s_off;
  const int vecs = D / VEC;
  for (int idx = threadIdx.x; idx < H * vecs; idx += blockDim.x) {
    const int h = idx / vecs, d0 = (idx % vecs) * VEC;
    const int64_t o = layer * so_l + n * so_n + h * so_h + d0;
    store_vec<T, VEC>(k_out + o, load_vec<T, VEC>(src + h * s_h + d0));
    if (v_out) store_vec<T, VEC>(v_out + o, load_vec<T, VEC>(src + s_kv + h * s_h + d0));  // null: MLA, K only
  }
}

// ------------------------------------------------------------------------------------------ host side
namespace {

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check_offsets_cuda(const torch::Tensor& t, int64_t L, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.numel() == L && t.is_contiguous(),
              name, " must be a contiguous CUDA int64 tensor of ", L, " layer offsets");
}

// largest element count per 16-byte vector that every address of the call keeps aligned
int pick_vec(int64_t elem, std::initializer_list<int64_t> extents, std::initializer_list<const void*> ptrs) {
  for (int vec = 16 / (int)elem; vec > 1; vec /= 2) {
    bool ok = true;
    for (int64_t e : extents) ok = ok && (e % vec == 0);
    for (const void* q : ptrs) ok = ok && aligned(q, vec * elem);
    if (ok) return vec;
  }
  return 1;
}

Factor make_factor(const c10::optional<torch::Tensor>& a, const c10::optional<torch::Tensor>& a_off,
                   const c10::optional<torch::Tensor>& b, const c10::optional<torch::Tensor>& b_off,
                   const c10::optional<torch::Tensor>& rank, int64_t L, torch::ScalarType* dtype) {
  Factor f{nullptr, nullptr, nullptr, nullptr, nullptr};
  if (!a.has_value()) return f;
  TORCH_CHECK(a_off.has_value() && b.has_value() && b_off.has_value() && rank.has_value(),
              "factor tensors must be given together");
  TORCH_CHECK(a->is_cuda() && b->is_cuda() && a->scalar_type() == b->scalar_type(), "factors must be CUDA, one dtype");
  check_offsets_cuda(*a_off, L, "factor a offsets");
  check_offsets_cuda(*b_off, L, "factor b offsets");
  TORCH_CHECK(rank->is_cuda() && rank->scalar_type() == torch::kInt32 && rank->numel() == L, "ranks must be CUDA int32 [L]");
  *dtype = a->scalar_type();
  f.a = a->data_ptr(); f.a_off = a_off->data_ptr<int64_t>();
  f.b = b->data_ptr(); f.b_off = b_off->data_ptr<int64_t>();
  f.rank = rank->data_ptr<int32_t>();
  return f;
}

template <typename T, typename TO, typename TF>
void launch_typed(const Params& p, int L, int vec, cudaStream_t stream) {
  const dim3 grid(p.N, L);
  const int work = p.H * (p.D / vec);
  const int threads = work >= 256 ? 256 : (work >= 128 ? 128 : (work >= 64 ? 64 : 32));
  switch (vec) {
    case 8: relocate_scatter_kernel<T, TO, TF, 8><<<grid, threads, 0, stream>>>(p); break;
    case 4: relocate_scatter_kernel<T, TO, TF, 4><<<grid, threads, 0, stream>>>(p); break;
    case 2: relocate_scatter_kernel<T, TO, TF, 2><<<grid, threads, 0, stream>>>(p); break;
    default: relocate_scatter_kernel<T, TO, TF, 1><<<grid, threads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_out(const Params& p, torch::ScalarType out_t, torch::ScalarType f_t, int L, int vec, cudaStream_t s) {
  // the cache dtype must equal the input dtype here (vLLM caches match the model dtype)
  TORCH_CHECK(out_t == (std::is_same<T, float>::value ? torch::kFloat32
                        : std::is_same<T, __half>::value ? torch::kFloat16 : torch::kBFloat16),
              "kvreuse._C: the cache dtype must equal k's dtype");
  switch (f_t) {
    case torch::kFloat32: launch_typed<T, T, float>(p, L, vec, s); break;
    case torch::kFloat16: launch_typed<T, T, __half>(p, L, vec, s); break;
    case torch::kBFloat16: launch_typed<T, T, __nv_bfloat16>(p, L, vec, s); break;
    default: TORCH_CHECK(false, "kvreuse._C: factors must be float32, float16 or bfloat16");
  }
}

}  // namespace

void relocate_scatter(torch::Tensor k, c10::optional<torch::Tensor> v, torch::Tensor out, torch::Tensor out_loff,
                      int64_t s_kv, int64_t s_blk, int64_t s_off, int64_t s_h, int64_t block_size, int64_t num_slots,
                      c10::optional<torch::Tensor> slots, torch::Tensor cos, torch::Tensor sin, int64_t rot_lo,
                      int64_t rot_dim, bool is_neox,
                      c10::optional<torch::Tensor> ak, c10::optional<torch::Tensor> ak_off,
                      c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bk_off,
                      c10::optional<torch::Tensor> rk,
                      c10::optional<torch::Tensor> av, c10::optional<torch::Tensor> av_off,
                      c10::optional<torch::Tensor> bv, c10::optional<torch::Tensor> bv_off,
                      c10::optional<torch::Tensor> rv, int64_t layer_align) {
  TORCH_CHECK(k.is_cuda() && k.dim() == 4 && k.stride(3) == 1, "k must be a CUDA [L, N, H, D] tensor, D contiguous");
  const int64_t L = k.size(0), N = k.size(1), H = k.size(2), D = k.size(3);
  TORCH_CHECK(N < (1LL << 31) && L < 65536, "too many tokens or layers for one launch");
  TORCH_CHECK(out.is_cuda() && out.device() == k.device(), "cache must be on k's device");
  TORCH_CHECK(out.stride(-1) == 1, "cache head_size dim must be contiguous");
  check_offsets_cuda(out_loff, L, "out_loff");
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_lo >= 0 && rot_lo + rot_dim <= D, "bad rotary slice");
  TORCH_CHECK(cos.is_cuda() && sin.is_cuda() && cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.dim() == 2 && cos.size(0) == N && cos.size(1) == rot_dim / 2 && cos.stride(1) == 1 &&
              sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "cos/sin must be CUDA float32 [N, rotary_dim / 2] tables with equal strides");
  if (v.has_value()) {
    TORCH_CHECK(v->is_cuda() && v->sizes() == k.sizes() && v->scalar_type() == k.scalar_type() && v->stride(3) == 1,
                "v must match k (shape, dtype, CUDA, D contiguous)");
  }
  if (slots.has_value()) {
    TORCH_CHECK(slots->is_cuda() && slots->dim() == 1 && slots->numel() == N && slots->is_contiguous() &&
                (slots->scalar_type() == torch::kInt64 || slots->scalar_type() == torch::kInt32),
                "slot_mapping must be a contiguous CUDA int32/int64 [N] tensor");
  }
  if (N == 0 || L == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  Params p{};
  p.k = k.data_ptr(); p.v = v.has_value() ? v->data_ptr() : nullptr;
  p.sk_l = k.stride(0); p.sk_n = k.stride(1); p.sk_h = k.stride(2);
  p.sv_l = v.has_value() ? v->stride(0) : 0; p.sv_n = v.has_value() ? v->stride(1) : 0; p.sv_h = v.has_value() ? v->stride(2) : 0;
  p.out = out.data_ptr(); p.out_loff = out_loff.data_ptr<int64_t>();
  p.so_kv = s_kv; p.so_blk = s_blk; p.so_off = s_off; p.so_h = s_h;
  p.slots64 = slots.has_value() && slots->scalar_type() == torch::kInt64 ? slots->data_ptr<int64_t>() : nullptr;
  p.slots32 = slots.has_value() && slots->scalar_type() == torch::kInt32 ? slots->data_ptr<int32_t>() : nullptr;
  p.block_size = block_size; p.num_slots = num_slots;
  p.cos = cos.data_ptr<float>(); p.sin = sin.data_ptr<float>(); p.s_cs = cos.stride(0);
  p.N = (int)N; p.H = (int)H; p.D = (int)D; p.rot_lo = (int)rot_lo; p.rot_dim = (int)rot_dim;
  p.is_neox = is_neox; p.has_v = v.has_value();
  torch::ScalarType f_t = k.scalar_type();
  p.fk = make_factor(ak, ak_off, bk, bk_off, rk, L, &f_t);
  p.patch_k = ak.has_value();
  torch::ScalarType fv_t = f_t;
  p.fv = make_factor(av, av_off, bv, bv_off, rv, L, &fv_t);
  p.patch_v = av.has_value();
  TORCH_CHECK(!(p.patch_k && p.patch_v) || f_t == fv_t, "K and V factors must share a dtype");
  if (!p.patch_k) f_t = fv_t;
  // The per-layer element offsets must keep 16-byte alignment for vector access; the host pads
  // nothing, so fall back to narrower vectors whenever any address or extent would break it.
  const int64_t es = k.element_size();
  int vec = pick_vec(es, {D, rot_lo, rot_dim, is_neox ? rot_dim / 2 : 2, p.sk_l, p.sk_n, p.sk_h, p.sv_l, p.sv_n, p.sv_h,
                          s_kv, s_blk, s_off, s_h},
                     {p.k, p.v ? p.v : p.k, p.out});
  while (vec > 1 && layer_align % vec != 0) vec /= 2;  // every layer's tensor must stay aligned too
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (k.scalar_type()) {
    case torch::kFloat32: dispatch_out<float>(p, out.scalar_type(), f_t, (int)L, vec, stream); break;
    case torch::kFloat16: dispatch_out<__half>(p, out.scalar_type(), f_t, (int)L, vec, stream); break;
    case torch::kBFloat16: dispatch_out<__nv_bfloat16>(p, out.scalar_type(), f_t, (int)L, vec, stream); break;
    default: TORCH_CHECK(false, "kvreuse._C: k must be float32, float16 or bfloat16");
  }
}

void gather(torch::Tensor cache, torch::Tensor loff, int64_t s_kv, int64_t s_blk, int64_t s_off, int64_t s_h,
            torch::Tensor slots, int64_t block_size, torch::Tensor k_out, c10::optional<torch::Tensor> v_out,
            int64_t layer_align) {
  TORCH_CHECK(cache.is_cuda() && cache.stride(-1) == 1, "cache must be CUDA with a contiguous head_size dim");
  TORCH_CHECK(k_out.is_cuda() && k_out.dim() == 4 && k_out.is_contiguous() && k_out.scalar_type() == cache.scalar_type(),
              "k_out must be a contiguous CUDA [L, N, H, D] tensor of the cache dtype");
  TORCH_CHECK(!v_out.has_value() || (v_out->is_cuda() && v_out->sizes() == k_out.sizes() && v_out->is_contiguous() &&
                                     v_out->scalar_type() == cache.scalar_type()),
              "v_out must match k_out (contiguous CUDA, cache dtype)");
  const int64_t L = k_out.size(0), N = k_out.size(1), H = k_out.size(2), D = k_out.size(3);
  check_offsets_cuda(loff, L, "cache layer offsets");
  TORCH_CHECK(slots.is_cuda() && slots.dim() == 1 && slots.numel() == N && slots.is_contiguous() &&
              (slots.scalar_type() == torch::kInt64 || slots.scalar_type() == torch::kInt32),
              "slot_mapping must be a contiguous CUDA int32/int64 [N] tensor");
  if (N == 0 || L == 0) return;
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t es = cache.element_size();
  const void* v_ptr = v_out.has_value() ? v_out->data_ptr() : k_out.data_ptr();
  int vec = pick_vec(es, {D, s_kv, s_blk, s_off, s_h}, {cache.data_ptr(), k_out.data_ptr(), v_ptr});
  while (vec > 1 && layer_align % vec != 0) vec /= 2;  // every layer's tensor must stay aligned too
  const dim3 grid(N, L);
  const int work = H * (D / vec);
  const int threads = work >= 256 ? 256 : (work >= 128 ? 128 : (work >= 64 ? 64 : 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* s64 = slots.scalar_type() == torch::kInt64 ? slots.data_ptr<int64_t>() : nullptr;
  const int32_t* s32 = slots.scalar_type() == torch::kInt32 ? slots.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "kvreuse_gather", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, at::Half>::value, __half,
              std::conditional_t<std::is_same<scalar_t, at::BFloat16>::value, __nv_bfloat16, scalar_t>>;
    const T* c = reinterpret_cast<const T*>(cache.data_ptr());
    T* ko = reinterpret_cast<T*>(k_out.data_ptr());
    T* vo = v_out.has_value() ? reinterpret_cast<T*>(v_out->data_ptr()) : nullptr;
    const int64_t sl = k_out.stride(0), sn = k_out.stride(1), sh = k_out.stride(2);
    switch (vec) {
      case 8: gather_kernel<T, 8><<<grid, threads, 0, stream>>>(c, loff.data_ptr<int64_t>(), s_kv, s_blk, s_off, s_h, s64, s32, block_size, ko, vo, sl, sn, sh, (int)H, (int)D); break;
      case 4: gather_kernel<T, 4><<<grid, threads, 0, stream>>>(c, loff.data_ptr<int64_t>(), s_kv, s_blk, s_off, s_h, s64, s32, block_size, ko, vo, sl, sn, sh, (int)H, (int)D); break;
      case 2: gather_kernel<T, 2><<<grid, threads, 0, stream>>>(c, loff.data_ptr<int64_t>(), s_kv, s_blk, s_off, s_h, s64, s32, block_size, ko, vo, sl, sn, sh, (int)H, (int)D); break;
      default: gather_kernel<T, 1><<<grid, threads, 0, stream>>>(c, loff.data_ptr<int64_t>(), s_kv, s_blk, s_off, s_h, s64, s32, block_size, ko, vo, sl, sn, sh, (int)H, (int)D); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace kvreuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvreuse CUDA kernels: fused relocate + patch + paged scatter, paged gather";
  m.def("relocate_scatter", &kvreuse::relocate_scatter, "fused relocate + patch + scatter (see kvreuse/ops/plan.py)");
  m.def("gather", &kvreuse::gather, "paged gather into contiguous [L, N, H, D]");
}
