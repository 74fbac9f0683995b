// P^T g and P beta for basis rows stored in bfloat16, int8 or int4 (CPU).
//
// XLA:CPU widens a low-bit block to float32 in memory before it multiplies
// it, which costs about what reading float32 P does. These loops widen 16
// values at a time in registers and multiply them at once, so the time
// follows the bytes read. Rows are k x C, row-major. int8/int4 rows are
// uint8 codes with a float32 scale and offset per group of columns (value =
// code * scale + offset); an int4 byte holds entry b of its group in the low
// nibble and entry b + group / 2 in the high nibble (quantization.py).
// The column blocks are dealt to a fixed number of slots, run on XLA's CPU
// thread pool, and the slots' sums are added in order: results do not depend
// on timing.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float F32x16 __attribute__((vector_size(4 * kLanes)));
typedef uint32_t U32x16 __attribute__((vector_size(4 * kLanes)));
typedef uint16_t U16x16 __attribute__((vector_size(2 * kLanes)));
typedef uint8_t U8x16 __attribute__((vector_size(kLanes)));
typedef int32_t I32x16 __attribute__((vector_size(4 * kLanes)));

constexpr int kRows = 4;  // rows that share one read of g (P^T g)
constexpr int kAxpyRows = 8;  // rows that share one pass over out (P beta)
constexpr int64_t kBlock = 4096;         // columns per block
constexpr int64_t kPerThread = 1 << 20;  // stored values worth a thread
constexpr int64_t kMaxThreads = 8;       // memory-bound beyond a few cores

template <typename V>
inline V Load(const void* at) {
  V v;
  std::memcpy(&v, at, sizeof v);
  return v;
}

inline void Store(float* at, F32x16 v) { std::memcpy(at, &v, sizeof v); }

inline float Sum(F32x16 v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// 16 bfloat16 values, exactly, as float32: the bits are float32's top half.
inline F32x16 Widen(const uint16_t* at) {
  return (F32x16)(__builtin_convertvector(Load<U16x16>(at), U32x16) << 16);
}

// Codes as float32: widened to int32, then converted.
inline F32x16 Codes(U8x16 bytes) {
#if defined(__AVX512F__)
  return (F32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)bytes));
#else
  return __builtin_convertvector(
      __builtin_convertvector(__builtin_convertvector(bytes, U16x16), I32x16),
      F32x16);
#endif
}

inline float WidenOne(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Slots for a product: one per kPerThread values, at most one per block,
// per core and kMaxThreads.
int64_t Threads(int64_t cols, int64_t block, int64_t values) {
  return std::min<int64_t>(
      {std::max<int64_t>(1, std::thread::hardware_concurrency()), kMaxThreads,
       std::max<int64_t>(1, (cols + block - 1) / block),
       std::max<int64_t>(1, values / kPerThread)});
}

// fn(slot, first, last) for the column blocks [first, last); block b belongs
// to slot b % slots. Each slot runs once, on whichever thread claims it
// first: XLA's pool threads, or this one, which claims every slot no pool
// thread has started, so it never waits on a queued task.
template <typename Fn>
void OverBlocks(ffi::ThreadPool& pool, int64_t cols, int64_t block,
                int64_t slots, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable finished;
  };
  const int64_t blocks = (cols + block - 1) / block;
  auto state = std::make_shared<State>();
  auto work = [state, slots, blocks, cols, block, &fn] {
    for (int64_t s; (s = state->next.fetch_add(1)) < slots;) {
      for (int64_t b = s; b < blocks; b += slots) {
        fn(s, b * block, std::min(cols, (b + 1) * block));
      }
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == slots) state->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < slots; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done == slots; });
}

// f(std::integral_constant<int, R>, first row) over the rows, Rows at once
// (R = Rows), then one at a time (R = 1).
template <int Rows = kRows, typename F>
void ForRows(int64_t k, F f) {
  int64_t r = 0;
  for (; r + Rows <= k; r += Rows) f(std::integral_constant<int, Rows>(), r);
  for (; r < k; ++r) f(std::integral_constant<int, 1>(), r);
}

// out = the threads' partial sums (double), added in thread order.
void Reduce(const std::vector<double>& partial, int64_t threads, int64_t k,
            float* out) {
  for (int64_t r = 0; r < k; ++r) {
    double s = 0;
    for (int64_t t = 0; t < threads; ++t) s += partial[t * k + r];
    out[r] = float(s);
  }
}

ffi::Error MatvecBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> p, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> out) {
  const int64_t k = p.dimensions()[0], cols = p.dimensions()[1];
  if (g.element_count() != cols) {
    return ffi::Error::InvalidArgument("matvec: g's length is not P's width");
  }
  const auto* rows = reinterpret_cast<const uint16_t*>(p.typed_data());
  const float* gd = g.typed_data();
  const int64_t threads = Threads(cols, kBlock, k * cols);
  std::vector<double> partial(threads * k, 0.0);
  OverBlocks(pool, cols, kBlock, threads, [&](int64_t t, int64_t c0, int64_t c1) {
    ForRows(k, [&](auto rows_at_once, int64_t r0) {
      constexpr int R = decltype(rows_at_once)::value;
      const uint16_t* at[R];
      for (int r = 0; r < R; ++r) at[r] = rows + (r0 + r) * cols;
      F32x16 acc[R] = {};
      int64_t c = c0;
      for (; c + kLanes <= c1; c += kLanes) {
        const F32x16 gv = Load<F32x16>(gd + c);
        for (int r = 0; r < R; ++r) acc[r] += Widen(at[r] + c) * gv;
      }
      for (int r = 0; r < R; ++r) {
        float s = Sum(acc[r]);
        for (int64_t i = c; i < c1; ++i) s += WidenOne(at[r][i]) * gd[i];
        partial[t * k + r0 + r] += s;
      }
    });
  });
  Reduce(partial, threads, k, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error VecmatBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::BF16> p,
                      ffi::ResultBuffer<ffi::F32> out) {
  const int64_t k = p.dimensions()[0], cols = p.dimensions()[1];
  if (beta.element_count() != k) {
    return ffi::Error::InvalidArgument("vecmat: beta's length is not P's rows");
  }
  const auto* rows = reinterpret_cast<const uint16_t*>(p.typed_data());
  const float* b = beta.typed_data();
  float* o = out->typed_data();
  OverBlocks(pool, cols, kBlock, Threads(cols, kBlock, k * cols),
             [&](int64_t, int64_t c0, int64_t c1) {
    std::fill(o + c0, o + c1, 0.f);
    ForRows<kAxpyRows>(k, [&](auto rows_at_once, int64_t r0) {
      constexpr int R = decltype(rows_at_once)::value;
      const uint16_t* at[R];
      for (int r = 0; r < R; ++r) at[r] = rows + (r0 + r) * cols;
      int64_t c = c0;
      for (; c + kLanes <= c1; c += kLanes) {
        F32x16 s = Load<F32x16>(o + c);
        for (int r = 0; r < R; ++r) s += b[r0 + r] * Widen(at[r] + c);
        Store(o + c, s);
      }
      for (; c < c1; ++c) {
        for (int r = 0; r < R; ++r) o[c] += b[r0 + r] * WidenOne(at[r][c]);
      }
    });
  });
  return ffi::Error::Success();
}

// Quantized rows: codes k x (cols * bits / 8); scale and offset k x groups.
struct Quantized {
  int64_t k, cols, groups, group, span;  // span: code bytes of a group
  int64_t bytes;                         // code bytes of a row
  const uint8_t* codes;
  const float* scale;
  const float* offset;
};

ffi::Error Describe(ffi::Buffer<ffi::U8>& codes, ffi::Buffer<ffi::F32>& scale,
                    ffi::Buffer<ffi::F32>& offset, int bits, Quantized& q) {
  q.k = codes.dimensions()[0];
  q.bytes = codes.dimensions()[1];
  q.groups = scale.dimensions()[1];
  q.cols = q.bytes * 8 / bits;
  if (scale.dimensions()[0] != q.k || offset.dimensions()[0] != q.k ||
      offset.dimensions()[1] != q.groups || q.groups == 0 ||
      q.cols % q.groups || (q.cols / q.groups) % 2) {
    return ffi::Error::InvalidArgument(
        "quantized rows: codes, scale and offset do not make whole groups");
  }
  q.group = q.cols / q.groups;
  q.span = q.group * bits / 8;
  q.codes = codes.typed_data();
  q.scale = scale.typed_data();
  q.offset = offset.typed_data();
  return ffi::Error::Success();
}

// Columns per block: whole groups, about kBlock columns.
int64_t GroupBlock(const Quantized& q) {
  return std::max<int64_t>(1, kBlock / q.group) * q.group;
}

// acc[r] += codes . g over one group, in lanes. int4 reads a byte's two
// nibbles at once: entries b and b + span of the group.
template <int R, int Bits>
inline void GroupDots(const uint8_t* const* at, const float* g, int64_t span,
                      F32x16 (&acc)[R]) {
  int64_t c = 0;
  for (; c + kLanes <= span; c += kLanes) {
    if constexpr (Bits == 8) {
      const F32x16 gv = Load<F32x16>(g + c);
      for (int r = 0; r < R; ++r) acc[r] += Codes(Load<U8x16>(at[r] + c)) * gv;
    } else {
      const F32x16 low = Load<F32x16>(g + c), high = Load<F32x16>(g + span + c);
      for (int r = 0; r < R; ++r) {
        const U8x16 bytes = Load<U8x16>(at[r] + c);
        acc[r] += Codes(bytes & 15) * low + Codes(bytes >> 4) * high;
      }
    }
  }
  for (; c < span; ++c) {
    for (int r = 0; r < R; ++r) {
      const uint8_t byte = at[r][c];
      acc[r][0] += Bits == 8 ? float(byte) * g[c]
                             : float(byte & 15) * g[c] + float(byte >> 4) * g[span + c];
    }
  }
}

// P^T g = sum over groups j of scale_j (codes_j . g_j) + offset_j sum(g_j).
// A group's products are scaled in their lanes; lanes are summed once a block.
template <int Bits>
ffi::Error MatvecQuantized(ffi::ThreadPool pool,
                           ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> offset,
                           ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> out) {
  Quantized q;
  if (ffi::Error e = Describe(codes, scale, offset, Bits, q); e.failure()) {
    return e;
  }
  if (g.element_count() != q.cols) {
    return ffi::Error::InvalidArgument("matvec: g's length is not P's width");
  }
  const float* gd = g.typed_data();
  const int64_t block = GroupBlock(q);
  const int64_t threads = Threads(q.cols, block, q.k * q.cols);
  std::vector<double> partial(threads * q.k, 0.0);
  OverBlocks(pool, q.cols, block, threads, [&](int64_t t, int64_t c0, int64_t c1) {
    const int64_t j0 = c0 / q.group, j1 = c1 / q.group;
    std::vector<float> sums(j1 - j0);
    for (int64_t j = j0; j < j1; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < q.group; ++i) s += gd[j * q.group + i];
      sums[j - j0] = s;
    }
    ForRows(q.k, [&](auto rows_at_once, int64_t r0) {
      constexpr int R = decltype(rows_at_once)::value;
      F32x16 total[R] = {};
      float offsets[R] = {};
      for (int64_t j = j0; j < j1; ++j) {
        const uint8_t* at[R];
        for (int r = 0; r < R; ++r) at[r] = q.codes + (r0 + r) * q.bytes + j * q.span;
        F32x16 acc[R] = {};
        GroupDots<R, Bits>(at, gd + j * q.group, Bits == 8 ? q.group : q.span, acc);
        for (int r = 0; r < R; ++r) {
          const int64_t rj = (r0 + r) * q.groups + j;
          total[r] += q.scale[rj] * acc[r];
          offsets[r] += q.offset[rj] * sums[j - j0];
        }
      }
      for (int r = 0; r < R; ++r) partial[t * q.k + r0 + r] += Sum(total[r]) + offsets[r];
    });
  });
  Reduce(partial, threads, q.k, out->typed_data());
  return ffi::Error::Success();
}

// out[c] += sum_r coef[r] code(r, c) over one group's m code bytes; int4
// writes entry c (low nibble) and c + m (high nibble).
template <int R, int Bits>
inline void GroupAxpys(const float* coef, const uint8_t* const* at, int64_t m,
                       float* out) {
  int64_t c = 0;
  for (; c + kLanes <= m; c += kLanes) {
    if constexpr (Bits == 8) {
      F32x16 s = Load<F32x16>(out + c);
      for (int r = 0; r < R; ++r) s += coef[r] * Codes(Load<U8x16>(at[r] + c));
      Store(out + c, s);
    } else {
      F32x16 low = Load<F32x16>(out + c), high = Load<F32x16>(out + m + c);
      for (int r = 0; r < R; ++r) {
        const U8x16 bytes = Load<U8x16>(at[r] + c);
        low += coef[r] * Codes(bytes & 15);
        high += coef[r] * Codes(bytes >> 4);
      }
      Store(out + c, low);
      Store(out + m + c, high);
    }
  }
  for (; c < m; ++c) {
    for (int r = 0; r < R; ++r) {
      if constexpr (Bits == 8) {
        out[c] += coef[r] * float(at[r][c]);
      } else {
        out[c] += coef[r] * float(at[r][c] & 15);
        out[m + c] += coef[r] * float(at[r][c] >> 4);
      }
    }
  }
}

// P beta, per group j: sum_r (beta_r scale_rj) codes_rj + sum_r beta_r offset_rj.
template <int Bits>
ffi::Error VecmatQuantized(ffi::ThreadPool pool,
                           ffi::Buffer<ffi::F32> beta,
                           ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> offset,
                           ffi::ResultBuffer<ffi::F32> out) {
  Quantized q;
  if (ffi::Error e = Describe(codes, scale, offset, Bits, q); e.failure()) {
    return e;
  }
  if (beta.element_count() != q.k) {
    return ffi::Error::InvalidArgument("vecmat: beta's length is not P's rows");
  }
  const float* b = beta.typed_data();
  float* o = out->typed_data();
  const int64_t block = GroupBlock(q);
  OverBlocks(pool, q.cols, block, Threads(q.cols, block, q.k * q.cols),
             [&](int64_t, int64_t c0, int64_t c1) {
    const int64_t j0 = c0 / q.group, j1 = c1 / q.group;
    for (int64_t j = j0; j < j1; ++j) {
      float base = 0.f;
      for (int64_t r = 0; r < q.k; ++r) base += b[r] * q.offset[r * q.groups + j];
      std::fill(o + j * q.group, o + (j + 1) * q.group, base);
    }
    // Rows outside, groups inside: each row is read as one run of the block.
    ForRows<kAxpyRows>(q.k, [&](auto rows_at_once, int64_t r0) {
      constexpr int R = decltype(rows_at_once)::value;
      for (int64_t j = j0; j < j1; ++j) {
        const uint8_t* at[R];
        float coef[R];
        for (int r = 0; r < R; ++r) {
          at[r] = q.codes + (r0 + r) * q.bytes + j * q.span;
          coef[r] = b[r0 + r] * q.scale[(r0 + r) * q.groups + j];
        }
        GroupAxpys<R, Bits>(coef, at, Bits == 8 ? q.group : q.span,
                            o + j * q.group);
      }
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaMatvecBf16, MatvecBf16,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::BF16>>().Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaVecmatBf16, VecmatBf16,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::F32>>());

#define TWA_QUANTIZED(BITS)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      TwaMatvecInt##BITS, MatvecQuantized<BITS>,                             \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::U8>>()                           \
          .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()         \
          .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      TwaVecmatInt##BITS, VecmatQuantized<BITS>,                             \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()                          \
          .Arg<ffi::Buffer<ffi::U8>>().Arg<ffi::Buffer<ffi::F32>>()          \
          .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

TWA_QUANTIZED(8)
TWA_QUANTIZED(4)
