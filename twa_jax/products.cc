// Compiled CPU products: P^T g and P beta for basis rows stored in
// bfloat16, int8 or int4, and a 2-D convolution and its kernel gradient.
//
// XLA:CPU widens a low-bit block to float32 in memory before it multiplies
// it, which costs about what reading float32 P does. These loops widen 16
// values at a time in registers and multiply them at once, so the time
// follows the bytes read. Rows are k x C, row-major. int8/int4 rows are
// uint8 codes with a float32 scale and offset per group of columns (value =
// code * scale + offset); an int4 byte holds entry b of its group in the low
// nibble and entry b + group / 2 in the high nibble (quantization.py).
// The kernel gradient of an NHWC conv with an HWIO kernel is (patches of
// x)^T dy, summed over the batch's output pixels: XLA:CPU transposes x and
// dy to lay it out as one convolution (1.2-2.6x PyTorch's time with up to
// 64 channels); here it is read in place. The conv keeps R output pixels x
// 16 J output channels in registers; with few channels it beats XLA:CPU's.
// 3x3 stride-1 convs and their kernel gradients also run by Winograd
// F(2x2, 3x3): transforms around one matrix product per window position.
// A kernel flipped and transposed for an input gradient is transposed in
// 16 x 16 tiles in registers.
// The column blocks (images) are dealt to a fixed number of slots, which
// threads of XLA's CPU pool take as they come free, and the slots' sums are
// added in order: results do not depend on timing.
#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
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
// first: this one or one of up to (cores - 1) tasks on XLA's pool. This
// thread claims every slot no pool thread has started, so it never waits on
// a queued task, and a pool thread busy with another op takes no more than
// it can start.
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
  const int64_t workers = std::min<int64_t>(
      {slots, std::max<int64_t>(1, std::thread::hardware_concurrency()),
       kMaxThreads});
  for (int64_t t = 1; t < workers; ++t) pool.Schedule(decltype(work)(work));
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

// Float buffers reused from call to call. The fresh pages of a large
// allocation each cost a page fault and a clearing by the OS, which took
// longer than a Winograd conv's products on them (2-3x its time on
// VGG16's 16x16x128 maps). A buffer is taken for one call of a kernel (or
// one slot of it) and given back; the pool keeps at most as many as were
// ever in use at once.
class Scratch {
 public:
  explicit Scratch(int64_t size) {
    std::lock_guard<std::mutex> lock(Mutex());
    std::vector<Buffer>& free = Free();
    auto best = free.end();
    for (auto it = free.begin(); it != free.end(); ++it) {
      if (it->size >= size && (best == free.end() || it->size < best->size)) {
        best = it;
      }
    }
    if (best != free.end()) {
      buffer_ = std::move(*best);
      free.erase(best);
      return;
    }
    if (!free.empty()) {  // all too small: drop the largest
      free.erase(std::max_element(free.begin(), free.end(),
                                  [](const Buffer& a, const Buffer& b) {
                                    return a.size < b.size;
                                  }));
    }
    buffer_ = {size, std::unique_ptr<float[]>(new float[size])};
  }
  ~Scratch() {
    std::lock_guard<std::mutex> lock(Mutex());
    Free().push_back(std::move(buffer_));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return buffer_.data.get(); }

 private:
  struct Buffer {
    int64_t size = 0;
    std::unique_ptr<float[]> data;
  };
  static std::mutex& Mutex() {
    static std::mutex mu;
    return mu;
  }
  static std::vector<Buffer>& Free() {
    static std::vector<Buffer> free;
    return free;
  }
  Buffer buffer_;
};

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

// The kernel gradient of a conv: one image's share of rows [e, e + R) of
// one kernel row (entries (kw, ci), contiguous in a padded image row) and
// output channels [col, col + 16 J), kept in R x J registers over the
// image's output pixels and then added to dw (rows of Co).
struct ConvShape {
  int64_t ho, wo, sh, sw, wp, ci, co;  // wp: the padded image's width
  int64_t n, h, w, kh, kw, ph, pw, hp;  // hp: the padded image's height
};

// The conv of x (NHWC) with an (HWIO) kernel into out (NHWC), or an error
// naming `what` if the dimensions do not make one the kernels take.
template <typename Dims>
ffi::ErrorOr<ConvShape> MakeConvShape(const char* what, Dims x, Dims kernel,
                                      Dims out, int64_t sh, int64_t sw,
                                      int64_t ph, int64_t pw) {
  if (x.size() != 4 || kernel.size() != 4 || out.size() != 4 ||
      out[0] != x[0] || kernel[2] != x[3] || kernel[3] != out[3]) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(what) + ": the input, kernel and output are not NHWC, "
        "HWIO, NHWC of one conv"));
  }
  if (out[3] % kLanes || sh < 1 || sw < 1 || ph < 0 || pw < 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(what) + ": output channels not a multiple of 16, or a "
        "stride below 1, or a negative padding"));
  }
  return ConvShape{out[1], out[2], sh, sw, (out[2] - 1) * sw + kernel[1], x[3],
                   out[3], x[0], x[1], x[2], kernel[0], kernel[1], ph, pw,
                   (out[1] - 1) * sh + kernel[0]};
}

// Slots for a conv's kernel gradient, each summing its images into its own
// copy of the kernel: a few per core, so a thread held up by another op
// leaves its share to the others.
constexpr int64_t kKernelGradSlots = 8;

template <int J, int R>
void KernelRows(const ConvShape& c, const float* x, const float* dy,
                int64_t col, float* dw) {
  F32x16 acc[R][J] = {};
  for (int64_t oh = 0; oh < c.ho; ++oh) {
    const float* xr = x + oh * c.sh * c.wp * c.ci;
    const float* dr = dy + oh * c.wo * c.co + col;
    for (int64_t ow = 0; ow < c.wo; ++ow) {
      const float* xp = xr + ow * c.sw * c.ci;
      F32x16 d[J];
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) d[j] = Load<F32x16>(dr + ow * c.co + j * kLanes);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        const float v = xp[r];
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) acc[r][j] += v * d[j];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      float* o = dw + r * c.co + col + j * kLanes;
      Store(o, Load<F32x16>(o) + acc[r][j]);
    }
  }
}

// Registers: R rows x J vectors of accumulators, plus J for dy.
template <int J>
constexpr int kKernelRows = 24 / J;

using KernelRowsFn = void (*)(const ConvShape&, const float*, const float*,
                              int64_t, float*);

template <int J, int... R>
constexpr std::array<KernelRowsFn, sizeof...(R)> KernelRowsTable(
    std::integer_sequence<int, R...>) {
  return {&KernelRows<J, R + 1>...};
}

// All `entries` rows of one kernel row, kKernelRows<J> at a time.
template <int J>
void KernelRow(const ConvShape& c, const float* x, const float* dy,
               int64_t col, int64_t entries, float* dw) {
  static constexpr auto table = KernelRowsTable<J>(
      std::make_integer_sequence<int, kKernelRows<J>>());
  for (int64_t e = 0; e < entries; e += kKernelRows<J>) {
    const int64_t r = std::min<int64_t>(kKernelRows<J>, entries - e);
    table[r - 1](c, x + e, dy, col, dw + e * c.co);
  }
}

// The conv itself: R output pixels of one output row (from ow) x output
// channels [col, col + 16 J), kept in R x J registers over the kernel rows
// and each row's entries (kw, ci); each entry reads J vectors of the kernel
// and R values of x. x is the zero-padded image.
template <int J, int R>
void OutputPixels(const ConvShape& c, const float* x, const float* w,
                  int64_t oh, int64_t ow, int64_t col, float* y) {
  const int64_t entries = c.kw * c.ci;
  F32x16 acc[R][J] = {};
  for (int64_t r = 0; r < c.kh; ++r) {
    const float* xr = x + ((oh * c.sh + r) * c.wp + ow * c.sw) * c.ci;
    const float* wr = w + r * entries * c.co + col;
    for (int64_t e = 0; e < entries; ++e) {
      F32x16 k[J];
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) k[j] = Load<F32x16>(wr + e * c.co + j * kLanes);
#pragma GCC unroll 32
      for (int p = 0; p < R; ++p) {
        const float v = xr[p * c.sw * c.ci + e];
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) acc[p][j] += v * k[j];
      }
    }
  }
  for (int p = 0; p < R; ++p) {
    for (int j = 0; j < J; ++j) {
      Store(y + ((oh * c.wo) + ow + p) * c.co + col + j * kLanes, acc[p][j]);
    }
  }
}

using OutputPixelsFn = void (*)(const ConvShape&, const float*, const float*,
                                int64_t, int64_t, int64_t, float*);

template <int J, int... R>
constexpr std::array<OutputPixelsFn, sizeof...(R)> OutputPixelsTable(
    std::integer_sequence<int, R...>) {
  return {&OutputPixels<J, R + 1>...};
}

// One output row of one image, kKernelRows<J> pixels at a time.
template <int J>
void OutputRow(const ConvShape& c, const float* x, const float* w, int64_t oh,
               int64_t col, float* y) {
  static constexpr auto table = OutputPixelsTable<J>(
      std::make_integer_sequence<int, kKernelRows<J>>());
  for (int64_t ow = 0; ow < c.wo; ow += kKernelRows<J>) {
    const int64_t r = std::min<int64_t>(kKernelRows<J>, c.wo - ow);
    table[r - 1](c, x, w, oh, ow, col, y);
  }
}

// Vectors of output channels that a block of them takes where `left`
// channels remain: 4, 2 or 1.
inline int BlockVectors(int64_t left) {
  return left >= 4 * kLanes ? 4 : left >= 2 * kLanes ? 2 : 1;
}

// Output row oh of one image, all output channels: 64, 32, then 16 at a time.
void OutputChannels(const ConvShape& c, const float* x, const float* w,
                    int64_t oh, float* y) {
  for (int64_t col = 0, j; col < c.co; col += j * kLanes) {
    j = BlockVectors(c.co - col);
    if (j == 4) OutputRow<4>(c, x, w, oh, col, y);
    else if (j == 2) OutputRow<2>(c, x, w, oh, col, y);
    else OutputRow<1>(c, x, w, oh, col, y);
  }
}

// KernelRow for J = j.
void KernelRowOf(int j, const ConvShape& c, const float* x, const float* dy,
                 int64_t col, int64_t entries, float* dw) {
  if (j == 4) KernelRow<4>(c, x, dy, col, entries, dw);
  else if (j == 2) KernelRow<2>(c, x, dy, col, entries, dw);
  else KernelRow<1>(c, x, dy, col, entries, dw);
}

// padded (hp x wp x ci) = image b of x (n, h, w, ci), zero-padded to the
// windows the output pixels read: ph rows and pw columns before it.
void PadImage(const ConvShape& c, const float* x, int64_t b, float* padded) {
  std::fill(padded, padded + c.hp * c.wp * c.ci, 0.f);
  const int64_t j0 = std::min(c.pw, c.wp), j1 = std::min(c.wp, c.w + c.pw);
  for (int64_t i = 0; i < c.hp && j0 < j1; ++i) {
    const int64_t ih = i - c.ph;
    if (ih < 0 || ih >= c.h) continue;
    std::memcpy(padded + (i * c.wp + j0) * c.ci,
                x + ((b * c.h + ih) * c.w + j0 - c.pw) * c.ci,
                (j1 - j0) * c.ci * sizeof(float));
  }
}

// y[n, oh, ow, co] = sum over kh, kw, ci of
// x[n, oh sh + kh - ph, ow sw + kw - pw, ci] w[kh, kw, ci, co] (zero
// outside x): an NHWC conv with an HWIO kernel, each image a slot.
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const auto shape = MakeConvShape("conv", x.dimensions(), w.dimensions(),
                                   y->dimensions(), sh, sw, ph, pw);
  if (shape.has_error()) return shape.error();
  const ConvShape& c = shape.value();
  const float* ws = w.typed_data();
  OverBlocks(pool, c.n, 1, c.n, [&](int64_t, int64_t b, int64_t) {
    Scratch padded(c.hp * c.wp * c.ci);
    PadImage(c, x.typed_data(), b, padded.data());
    float* out = y->typed_data() + b * c.ho * c.wo * c.co;
    for (int64_t oh = 0; oh < c.ho; ++oh) OutputChannels(c, padded.data(), ws, oh, out);
  });
  return ffi::Error::Success();
}

// Winograd F(2x2, 3x3) (Lavin and Gray, 2016): a 3x3 stride-1 conv's 2x2
// block of output pixels (a tile) is A^T [(G g G^T) . (B^T d B)] A for its
// 4x4 window d of the padded input and the kernel g; each of the 16
// positions of (G g G^T) . (B^T d B), summed over input channels, is one
// matrix product of the tiles' transformed windows (tiles x ci) with the
// transformed kernel (ci x co): 16 multiplications per tile and channel
// pair against a direct conv's 36.
constexpr int kWindow = 4;  // a tile's window is kWindow x kWindow
constexpr int kPositions = kWindow * kWindow;
// Tiles per slot: their transformed windows and products (16 x tiles x
// channels each) stay in the core's cache.
constexpr int64_t kWinogradTiles = 32;
// Values of the windows whose products a kernel gradient sums at once, and
// of the windows and gradients it transforms in one pass.
constexpr int64_t kWinogradChunk = 1 << 16;
constexpr int64_t kWinogradPass = 1 << 21;

// G v for a kernel row or column v (3 taps): the window's 4 positions.
inline void KernelTransform(const F32x16 (&v)[3], F32x16 (&u)[kWindow]) {
  u[0] = v[0];
  u[1] = 0.5f * (v[0] + v[1] + v[2]);
  u[2] = 0.5f * (v[0] - v[1] + v[2]);
  u[3] = v[2];
}

// B^T v for a window's row or column v.
inline void InputTransform(const F32x16 (&v)[kWindow], F32x16 (&u)[kWindow]) {
  u[0] = v[0] - v[2];
  u[1] = v[1] + v[2];
  u[2] = v[2] - v[1];
  u[3] = v[1] - v[3];
}

// A^T v for a position row or column v: the tile's 2 pixels.
inline void OutputTransform(const F32x16 (&v)[kWindow], F32x16 (&u)[2]) {
  u[0] = v[0] + v[1] + v[2];
  u[1] = v[1] - v[2] - v[3];
}

// u[p][ci][co] = (G g G^T)[p] for the kernel g = w[:, :, ci, co], 16 output
// channels at a time, input channels dealt to slots.
void TransformKernel(ffi::ThreadPool& pool, const ConvShape& c,
                     const float* w, float* u) {
  OverBlocks(pool, c.ci, kLanes, (c.ci + kLanes - 1) / kLanes,
             [&](int64_t, int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      for (int64_t o = 0; o < c.co; o += kLanes) {
        F32x16 rows[3][kWindow];  // G g, for each kernel column
        for (int kw = 0; kw < 3; ++kw) {
          F32x16 taps[3];
          for (int kh = 0; kh < 3; ++kh) {
            taps[kh] = Load<F32x16>(w + ((kh * 3 + kw) * c.ci + i) * c.co + o);
          }
          KernelTransform(taps, rows[kw]);
        }
        for (int a = 0; a < kWindow; ++a) {
          F32x16 u4[kWindow];
          KernelTransform({rows[0][a], rows[1][a], rows[2][a]}, u4);
          for (int b = 0; b < kWindow; ++b) {
            Store(u + ((a * kWindow + b) * c.ci + i) * c.co + o, u4[b]);
          }
        }
      }
    }
  });
}

// MakeConvShape at stride 1, or an error naming `what` unless the kernel is
// 3x3 and the input channels a multiple of 16 (Winograd F(2x2, 3x3)).
template <typename Dims>
ffi::ErrorOr<ConvShape> MakeWinogradShape(const char* what, Dims x,
                                          Dims kernel, Dims out, int64_t ph,
                                          int64_t pw) {
  auto shape = MakeConvShape(what, x, kernel, out, 1, 1, ph, pw);
  if (!shape.has_error() && (kernel[0] != 3 || kernel[1] != 3 || x[3] % kLanes)) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(what) + ": the kernel is not 3x3, or the input channels "
        "not a multiple of 16"));
  }
  return shape;
}

// Tiles of the images' 2x2 grids of output pixels.
int64_t Tiles(const ConvShape& c) {
  return c.n * ((c.ho + 1) / 2) * ((c.wo + 1) / 2);
}

// v[p][t][ci] = (B^T d B)[p] for tiles [first, last) (t counts from first;
// positions `tiles` apart) of the images' tile grids, 16 input channels at
// a time; the window reads zeros outside the image.
void TransformWindows(const ConvShape& c, const float* x, int64_t first,
                      int64_t last, int64_t tiles, float* v) {
  const int64_t th = (c.ho + 1) / 2, tw = (c.wo + 1) / 2;
  for (int64_t t = first; t < last; ++t) {
    const int64_t b = t / (th * tw), r0 = t / tw % th * 2 - c.ph,
                  c0 = t % tw * 2 - c.pw;
    for (int64_t i = 0; i < c.ci; i += kLanes) {
      F32x16 cols[kWindow][kWindow];  // B^T d, for each window column
      for (int q = 0; q < kWindow; ++q) {
        F32x16 d[kWindow];
        for (int r = 0; r < kWindow; ++r) {
          const int64_t ih = r0 + r, iw = c0 + q;
          d[r] = ih < 0 || ih >= c.h || iw < 0 || iw >= c.w
                     ? F32x16{}
                     : Load<F32x16>(x + ((b * c.h + ih) * c.w + iw) * c.ci + i);
        }
        InputTransform(d, cols[q]);
      }
      for (int a = 0; a < kWindow; ++a) {
        F32x16 u4[kWindow];
        InputTransform({cols[0][a], cols[1][a], cols[2][a], cols[3][a]}, u4);
        for (int q = 0; q < kWindow; ++q) {
          Store(v + ((a * kWindow + q) * tiles + t - first) * c.ci + i, u4[q]);
        }
      }
    }
  }
}

// y's pixels of tiles [first, last) = A^T m A for their products m
// (m[p][t][co], t counting from first), 16 output channels at a time.
void TransformProducts(const ConvShape& c, const float* m, int64_t first,
                       int64_t last, float* y) {
  const int64_t th = (c.ho + 1) / 2, tw = (c.wo + 1) / 2, tiles = last - first;
  for (int64_t t = first; t < last; ++t) {
    const int64_t b = t / (th * tw), r0 = t / tw % th * 2, c0 = t % tw * 2;
    for (int64_t o = 0; o < c.co; o += kLanes) {
      F32x16 rows[kWindow][2];  // m A, for each position row
      for (int a = 0; a < kWindow; ++a) {
        F32x16 p[kWindow];
        for (int q = 0; q < kWindow; ++q) {
          p[q] = Load<F32x16>(m + ((a * kWindow + q) * tiles + t - first) * c.co + o);
        }
        OutputTransform(p, rows[a]);
      }
      for (int q = 0; q < 2 && c0 + q < c.wo; ++q) {
        F32x16 pixels[2];
        OutputTransform({rows[0][q], rows[1][q], rows[2][q], rows[3][q]}, pixels);
        for (int r = 0; r < 2 && r0 + r < c.ho; ++r) {
          Store(y + ((b * c.ho + r0 + r) * c.wo + c0 + q) * c.co + o, pixels[r]);
        }
      }
    }
  }
}

// The conv of ConvForward for a 3x3 kernel at stride 1, by Winograd
// F(2x2, 3x3): the kernel transformed once, then kWinogradTiles tiles per
// slot (windows transformed, 16 products, pixels transformed back). Each
// pixel's sums run in the same order whatever the slots.
ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                        int64_t ph, int64_t pw) {
  const auto shape = MakeWinogradShape("winograd conv", x.dimensions(),
                                       w.dimensions(), y->dimensions(), ph, pw);
  if (shape.has_error()) return shape.error();
  const ConvShape& c = shape.value();
  Scratch u(kPositions * c.ci * c.co);
  TransformKernel(pool, c, w.typed_data(), u.data());
  const int64_t tiles = Tiles(c);
  const int64_t slots = (tiles + kWinogradTiles - 1) / kWinogradTiles;
  const int64_t block = (tiles + slots - 1) / slots;
  OverBlocks(pool, tiles, block, slots,
             [&](int64_t, int64_t first, int64_t last) {
    const int64_t n = last - first;
    Scratch v(kPositions * n * c.ci), m(kPositions * n * c.co);
    TransformWindows(c, x.typed_data(), first, last, n, v.data());
    // Each position's product is a 1x1 conv of a 1 x n image.
    const ConvShape product{1, n, 1, 1, n, c.ci, c.co, 1, 1, n, 1, 1, 0, 0, 1};
    for (int p = 0; p < kPositions; ++p) {
      OutputChannels(product, v.data() + p * n * c.ci, u.data() + p * c.ci * c.co,
                     0, m.data() + p * n * c.co);
    }
    TransformProducts(c, m.data(), first, last, y->typed_data());
  });
  return ffi::Error::Success();
}

// A^T v for a tile's row or column of output gradients v (2 pixels): the
// gradient of the 4 positions that OutputTransform adds up.
inline void GradientTransform(const F32x16 (&v)[2], F32x16 (&u)[kWindow]) {
  u[0] = v[0];
  u[1] = v[0] + v[1];
  u[2] = v[0] - v[1];
  u[3] = -v[1];
}

// G^T v for a position row or column v: the 3 taps' gradients.
inline void KernelGradientTransform(const F32x16 (&v)[kWindow],
                                    F32x16 (&u)[3]) {
  u[0] = v[0] + 0.5f * (v[1] + v[2]);
  u[1] = 0.5f * (v[1] - v[2]);
  u[2] = v[3] + 0.5f * (v[1] + v[2]);
}

// m[p][t][co] = (A dy A^T)[p] for tiles [first, last) of the tile grids
// (t counts from first; positions `tiles` apart): the gradient of the
// products m of WinogradConv, zero for pixels past the output's edge.
void TransformGradients(const ConvShape& c, const float* dy, int64_t first,
                        int64_t last, int64_t tiles, float* m) {
  const int64_t th = (c.ho + 1) / 2, tw = (c.wo + 1) / 2;
  for (int64_t t = first; t < last; ++t) {
    const int64_t b = t / (th * tw), r0 = t / tw % th * 2, c0 = t % tw * 2;
    for (int64_t o = 0; o < c.co; o += kLanes) {
      F32x16 cols[2][kWindow];  // A dy, for each pixel column
      for (int q = 0; q < 2; ++q) {
        F32x16 d[2];
        for (int r = 0; r < 2; ++r) {
          d[r] = r0 + r < c.ho && c0 + q < c.wo
                     ? Load<F32x16>(dy + ((b * c.ho + r0 + r) * c.wo + c0 + q) * c.co + o)
                     : F32x16{};
        }
        GradientTransform(d, cols[q]);
      }
      for (int a = 0; a < kWindow; ++a) {
        F32x16 u4[kWindow];
        GradientTransform({cols[0][a], cols[1][a]}, u4);
        for (int q = 0; q < kWindow; ++q) {
          Store(m + ((a * kWindow + q) * tiles + t - first) * c.co + o, u4[q]);
        }
      }
    }
  }
}

// The kernel gradient of WinogradConv's conv: with the windows v and the
// products' gradients m of the tiles, the transformed kernel's gradient at
// position p is v[p]^T m[p] (ci x co, summed over the tiles in order), and
// dw = G^T (that) G. Tiles are dealt to slots for the transforms, then
// (position, 64 output channels) pairs for the products.
ffi::Error WinogradKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t ph,
                              int64_t pw) {
  const auto shape = MakeWinogradShape("winograd conv kernel gradient",
                                       x.dimensions(), dw->dimensions(),
                                       dy.dimensions(), ph, pw);
  if (shape.has_error()) return shape.error();
  const ConvShape& c = shape.value();
  // Passes over the tiles, each transforming its windows and gradients and
  // then adding each position's products: a 1x1 conv's kernel gradient
  // over a 1 x tiles image, summed a chunk of tiles at a time (their
  // windows stay in the cache).
  const int64_t tiles = Tiles(c);
  const int64_t pass = std::max<int64_t>(
      kWinogradTiles, kWinogradPass / (kPositions * (c.ci + c.co)));
  const int64_t chunk = std::max<int64_t>(kLanes, kWinogradChunk / c.ci);
  const int64_t blocks = (c.co + 4 * kLanes - 1) / (4 * kLanes);
  Scratch v(kPositions * std::min(pass, tiles) * c.ci);
  Scratch m(kPositions * std::min(pass, tiles) * c.co);
  Scratch u(kPositions * c.ci * c.co);
  std::fill(u.data(), u.data() + kPositions * c.ci * c.co, 0.f);
  for (int64_t t0 = 0; t0 < tiles; t0 += pass) {
    const int64_t n = std::min(pass, tiles - t0);
    OverBlocks(pool, n, kWinogradTiles,
               (n + kWinogradTiles - 1) / kWinogradTiles,
               [&](int64_t, int64_t first, int64_t last) {
      TransformWindows(c, x.typed_data(), t0 + first, t0 + last, n,
                       v.data() + first * c.ci);
      TransformGradients(c, dy.typed_data(), t0 + first, t0 + last, n,
                         m.data() + first * c.co);
    });
    OverBlocks(pool, kPositions * blocks, 1, kPositions * blocks,
               [&](int64_t, int64_t job, int64_t) {
      const int64_t p = job / blocks, col = job % blocks * 4 * kLanes;
      const int64_t end = std::min(c.co, col + 4 * kLanes);
      for (int64_t t = 0; t < n; t += chunk) {
        const int64_t nt = std::min(chunk, n - t);
        const ConvShape product{1, nt, 1, 1, nt, c.ci, c.co, 1, 1, nt,
                                1, 1, 0, 0, 1};
        for (int64_t o = col, j; o < end; o += j * kLanes) {
          j = BlockVectors(end - o);
          KernelRowOf(j, product, v.data() + (p * n + t) * c.ci,
                      m.data() + (p * n + t) * c.co, o, c.ci,
                      u.data() + p * c.ci * c.co);
        }
      }
    });
  }
  float* out = dw->typed_data();
  OverBlocks(pool, c.ci, kLanes, (c.ci + kLanes - 1) / kLanes,
             [&](int64_t, int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      for (int64_t o = 0; o < c.co; o += kLanes) {
        F32x16 rows[kWindow][3];  // (position row) G, for each position row
        for (int a = 0; a < kWindow; ++a) {
          F32x16 p[kWindow];
          for (int b = 0; b < kWindow; ++b) {
            p[b] = Load<F32x16>(u.data() + ((a * kWindow + b) * c.ci + i) * c.co + o);
          }
          KernelGradientTransform(p, rows[a]);
        }
        for (int kw = 0; kw < 3; ++kw) {
          F32x16 taps[3];
          KernelGradientTransform({rows[0][kw], rows[1][kw], rows[2][kw], rows[3][kw]},
                                  taps);
          for (int kh = 0; kh < 3; ++kh) {
            Store(out + ((kh * 3 + kw) * c.ci + i) * c.co + o, taps[kh]);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// dw[kh, kw, ci, co] = sum over n, oh, ow of
// x[n, oh sh + kh - ph, ow sw + kw - pw, ci] dy[n, oh, ow, co] (zero outside
// x). Each slot sums its images into its own dw; the slots are added in
// order.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                          int64_t sw, int64_t ph, int64_t pw) {
  const auto shape = MakeConvShape("conv kernel gradient", x.dimensions(),
                                   dw->dimensions(), dy.dimensions(), sh, sw,
                                   ph, pw);
  if (shape.has_error()) return shape.error();
  const ConvShape& c = shape.value();
  const int64_t entries = c.kw * c.ci, size = c.kh * entries * c.co;
  const int64_t slots = std::min(c.n, kKernelGradSlots);
  Scratch partial(slots * size);
  std::fill(partial.data(), partial.data() + slots * size, 0.f);
  OverBlocks(pool, c.n, 1, slots, [&](int64_t slot, int64_t b, int64_t) {
    Scratch padded(c.hp * c.wp * c.ci);
    PadImage(c, x.typed_data(), b, padded.data());
    float* acc = partial.data() + slot * size;
    const float* d = dy.typed_data() + b * c.ho * c.wo * c.co;
    for (int64_t col = 0, j; col < c.co; col += j * kLanes) {
      j = BlockVectors(c.co - col);
      for (int64_t r = 0; r < c.kh; ++r) {
        KernelRowOf(j, c, padded.data() + r * c.wp * c.ci, d, col, entries,
                    acc + r * entries * c.co);
      }
    }
  });
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.f);
  for (int64_t t = 0; t < slots; ++t) {
    for (int64_t i = 0; i < size; ++i) out[i] += partial.data()[t * size + i];
  }
  return ffi::Error::Success();
}

// Lane l of rows r (Top) and r + b of a 2b x 2b block after its
// off-diagonal b x b blocks are swapped: row r keeps its left half and takes
// row r + b's left half on the right; row r + b takes row r's right half on
// the left (lanes 16-31 are row r + b's).
constexpr int SwappedLane(int b, bool top, int l) {
  return (l & b) ? (top ? kLanes + l - b : kLanes + l) : (top ? l : l + b);
}

template <int B, bool Top, size_t... L>
inline F32x16 SwappedRow(F32x16 t, F32x16 u, std::index_sequence<L...>) {
  return __builtin_shufflevector(t, u, SwappedLane(B, Top, L)...);
}

template <int B>
inline void SwapBlocks(F32x16 (&v)[kLanes]) {
  constexpr auto lanes = std::make_index_sequence<kLanes>();
  for (int r = 0; r < kLanes; ++r) {
    if (r & B) continue;
    const F32x16 top = v[r], bottom = v[r + B];
    v[r] = SwappedRow<B, true>(top, bottom, lanes);
    v[r + B] = SwappedRow<B, false>(top, bottom, lanes);
  }
}

// dst (16 x 16, rows dst_stride apart) = the transpose of src (rows
// src_stride apart): the off-diagonal blocks swapped at 8, 4, 2 and 1.
inline void Transpose16(const float* src, int64_t src_stride, float* dst,
                        int64_t dst_stride) {
  F32x16 v[kLanes];
  for (int r = 0; r < kLanes; ++r) v[r] = Load<F32x16>(src + r * src_stride);
  SwapBlocks<8>(v);
  SwapBlocks<4>(v);
  SwapBlocks<2>(v);
  SwapBlocks<1>(v);
  for (int r = 0; r < kLanes; ++r) Store(dst + r * dst_stride, v[r]);
}

// out[i, j, o, c] = w[kh - 1 - i, kw - 1 - j, c, o]: the kernel of a conv's
// input gradient (HWIO in, HWIO out with the channels swapped), each tap's
// ci x co matrix transposed in 16 x 16 tiles, one tap per slot. XLA:CPU's
// fused reverse and transpose of a 3x3x512x512 kernel took about 8x as long.
ffi::Error FlipKernel(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto d = w.dimensions();
  const auto o = out->dimensions();
  if (d.size() != 4 || o.size() != 4 || o[0] != d[0] || o[1] != d[1] ||
      o[2] != d[3] || o[3] != d[2]) {
    return ffi::Error::InvalidArgument(
        "flip kernel: the output is not the HWIO kernel with its channels "
        "swapped");
  }
  const int64_t kh = d[0], kw = d[1], ci = d[2], co = d[3], taps = kh * kw;
  const float* in = w.typed_data();
  float* res = out->typed_data();
  OverBlocks(pool, taps, 1, taps, [&](int64_t, int64_t t, int64_t) {
    const int64_t src = (kh - 1 - t / kw) * kw + (kw - 1 - t % kw);
    const float* a = in + src * ci * co;
    float* b = res + t * ci * co;
    for (int64_t c0 = 0; c0 < ci; c0 += kLanes) {
      for (int64_t o0 = 0; o0 < co; o0 += kLanes) {
        if (c0 + kLanes <= ci && o0 + kLanes <= co) {
          Transpose16(a + c0 * co + o0, co, b + o0 * ci + c0, ci);
          continue;
        }
        const int64_t c1 = std::min(ci, c0 + kLanes), o1 = std::min(co, o0 + kLanes);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t o = o0; o < o1; ++o) b[o * ci + c] = a[c * co + o];
        }
      }
    }
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaConvKernelGrad, ConvKernelGrad,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w")
        .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaConvForward, ConvForward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w")
        .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaFlipKernel, FlipKernel,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaWinogradConv, WinogradConv,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TwaWinogradKernelGrad, WinogradKernelGrad,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
