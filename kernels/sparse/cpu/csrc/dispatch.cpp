// The Python-facing side of the packed 2:4 CPU kernel: argument checks, the choice of instruction set from the CPU's
// flags, and the threading. Compiled without instruction-set flags; each kernel lives in its own translation unit
// (scalar.cpp, avx2.cpp, avx512.cpp, avx512bf16.cpp, amx.cpp), built with its own flags and linked in when the compiler
// could build it (SEC24_HAVE_*).
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <emmintrin.h>  // _mm_clflush, _mm_mfence (SSE2: every x86-64 CPU)
#include <sys/syscall.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#include "packed24.h"

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Under `amx`, bf16 × bf16 products of up to this many tokens take the AVX-512 BF16 (pair) kernel; 4 tokens the
// AVX-512 kernel, more the AMX one. Measured (Xeon with AMX, 1 thread, interleaved, shared machine, so noisy):
// 1536x576 in cache, pair kernel vs AVX-512 kernel 0.043 vs 0.079 ms at 1 token, 0.064 vs 0.093 at 2, 0.086 vs
// 0.099 at 3, 0.120 vs 0.116 at 4, 0.228 vs 0.204 at 8: on that CPU its 16-bit permute (VPERMT2W) costs more issue
// slots than it saves once the gathers dominate.
// Under `avx512bf16` (AVX-512 BF16 without AMX: in practice AMD Zen 4 and 5) the pair kernel takes every token count:
// measured (AMD EPYC Zen 5, 1 thread, weights rotated over 48 MB, medians of 20; pair kernel vs AVX-512 kernel vs
// dense F.linear, ms): 4096x4096 at 16 tokens 2.09 vs 2.87 vs 2.55, 576x576 0.058 vs 0.082 vs 0.075, 1536x576 0.149
// vs 0.211 vs 0.178; at 2-3 tokens the two kernels within noise of each other (4096x4096 at 3: 0.73 vs 0.82).
// (A kernel expanding 16 rows into an L1 panel and multiplying it with VDPBF16PS, as the AMX kernel does with tiles,
// measured no better from 4 to 16 tokens, 4096x4096 at 16: 2.25 ms, and only 0-13 % faster at 24-48, where the
// packed product is within 10 % of dense either way: not kept.)
constexpr int64_t kBf16PairMaxTokens = 3;
// bf16 × bf16 products of at least this many tokens take the AMX kernel where the ISA is amx (fewer: as above).
// Measured (Xeon with AMX, 1 thread, quiet, weights rotated over 700 MB, medians of 25; AMX kernel vs AVX-512
// kernel): 4096x4096 at 4 tokens 2.41 vs 2.11 ms, at 5 2.44 vs 3.01; 1536x576 at 4 0.157 vs 0.131, at 5 0.160 vs
// 0.159, at 6 0.145 vs 0.161. The AMX kernel's cost barely grows with the tokens (expanding the weight dominates).
constexpr int64_t kAmxMinTokens = 5;
// Products of at least this many tokens whose activations run in fp32 (every product but the bf16 × bf16 ones the AMX
// and the pair kernels take) run the token-vector kernel (tokens.h) instead of the instruction set's general one.
// Measured (Xeon with AMX, 1 thread, weights rotated, best of 3 medians; general / token-vector time, fp32 x with
// fp32 and bf16 weights, 4096x4096, 1536x576, 576x1536, 192x576):
//   AVX-512 build: 8 tokens 0.44-0.82, 16 tokens 0.75-1.20 (above 1 only on 4096x4096 and 576x1536 fp32), 32
//   tokens 0.94-1.46 (1.07-1.46 on all but 1536x576: 0.94, 0.99), 48 tokens 1.05-1.53;
//   AVX2 build (on the same Xeon; not yet measured on an AVX2-only CPU): 4 tokens 0.53-0.86, 8 tokens 1.01-1.52,
//   16 tokens 1.31-2.08, 32 tokens 1.62-2.62 (the AVX2 general kernel does the dense number of FMAs).
constexpr int64_t kTokenVectorMinAvx512 = 32, kTokenVectorMinAvx2 = 8;
int64_t token_vector_override = 0;  // set_token_vector_min: > 0 replaces both (the tests force 1)

int64_t token_vector_min(int64_t isa) {
    if (token_vector_override > 0) return token_vector_override;
    return isa >= kAvx512 ? kTokenVectorMinAvx512 : kTokenVectorMinAvx2;
}
const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16", "amx"};

// A core's L1 data cache (level 1: the token-vector kernels' tall blocks) or L2 (level 2: the hand-over's tile size on
// one thread, kernel.py's hand_over_tile_bytes), in bytes as glibc reads them from CPUID; 0 when the system does not
// say.
int64_t cache_bytes(int level) {
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    static const int64_t l1d = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
    static const int64_t l2 = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
    return level == 1 ? l1d : l2;
#else
    return 0;
#endif
}
int64_t l1d_bytes() { return cache_bytes(1); }
int64_t l2_bytes() { return cache_bytes(2); }
// Whether the token-vector kernels take their tall row blocks (tokens.h): where the L1d holds them, unless a test
// forces either (set_tokens_tall: 1 or 0; -1 the measured rule again). A CPU that does not report its L1d takes the
// short blocks, which every CPU measured so far runs at least as fast as the earlier layout.
int64_t tokens_tall_override = -1;
// The AMX kernel's input blocks (amx.cpp) by its measured rule (-1), or forced off (0) or on wherever they fit (1):
// set_amx_input_blocks, for the tests and for comparing the paths in one process.
int64_t amx_input_blocks_override = -1, amx_sums_bytes_override = 0;

// The AVX-512 general kernel's prefetch of the next rows on long rows (packed24.h, SEC24_LONG_ROW_BYTES): on until
// kernel.py's measurement at first use sets it (set_long_row_prefetch).
bool long_row_prefetch = true;

bool tokens_tall() {
    if (tokens_tall_override >= 0) return tokens_tall_override > 0;
    return l1d_bytes() >= SEC24_TOKENS_TALL_L1_BYTES;
}

bool compiled(int64_t isa) {
    switch (isa) {
        case kScalar: return true;
#if defined(SEC24_HAVE_AVX2)
        case kAvx2: return true;
#endif
#if defined(SEC24_HAVE_AVX512)
        case kAvx512: return true;
#endif
#if defined(SEC24_HAVE_AVX512BF16)
        case kAvx512Bf16: return true;
#endif
#if defined(SEC24_HAVE_AMX) && defined(SEC24_HAVE_AVX512BF16)
        case kAmx: return true;
#endif
        default: return false;
    }
}

#if defined(__x86_64__) || defined(__i386__)
// CPUID leaf 7: AVX512-VBMI2 (ECX bit 6), AMX-BF16 (EDX bit 22), AMX-TILE (EDX bit 24). GCC 12's
// __builtin_cpu_supports does not know the AMX names.
bool cpuid7(int reg, int bit) {
    unsigned int r[4] = {0, 0, 0, 0};
    if (!__get_cpuid_count(7, 0, &r[0], &r[1], &r[2], &r[3])) return false;
    return (r[reg] >> bit) & 1u;
}

// Linux hands a process the AMX tile state only when asked (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); asked once.
// False on a kernel that refuses or predates it, where the first tile instruction would fault.
bool amx_granted() {
    static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}
#endif

// What the CPU (and the OS, for the AVX-512 register state) offers; GCC's __builtin_cpu_supports checks both.
std::vector<std::string> cpu_flags() {
    std::vector<std::string> flags;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) flags.push_back("avx2");
    if (__builtin_cpu_supports("fma")) flags.push_back("fma");
    if (__builtin_cpu_supports("avx512f")) flags.push_back("avx512f");
    if (__builtin_cpu_supports("avx512bw")) flags.push_back("avx512bw");
    if (__builtin_cpu_supports("avx512vl")) flags.push_back("avx512vl");
    if (__builtin_cpu_supports("avx512vbmi")) flags.push_back("avx512vbmi");
    if (__builtin_cpu_supports("avx512bf16")) flags.push_back("avx512bf16");
    if (cpuid7(2, 6)) flags.push_back("avx512vbmi2");
    if (cpuid7(3, 24)) flags.push_back("amx_tile");
    if (cpuid7(3, 22)) flags.push_back("amx_bf16");
#endif
    return flags;
}

bool cpu_runs(int64_t isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    switch (isa) {
        case kScalar: return true;
        case kAvx2: return avx2;
        case kAvx512: return avx512;
        case kAvx512Bf16:
            return avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
                   cpuid7(2, 6);  // VBMI2
        case kAmx:
            return cpu_runs(kAvx512Bf16) && cpuid7(3, 24) && cpuid7(3, 22) && amx_granted();
        default: return false;
    }
#else
    return isa == kScalar;
#endif
}

void check_isa(int64_t isa) {
    static const bool runs[] = {compiled(kScalar) && cpu_runs(kScalar), compiled(kAvx2) && cpu_runs(kAvx2),
                                compiled(kAvx512) && cpu_runs(kAvx512), compiled(kAvx512Bf16) && cpu_runs(kAvx512Bf16),
                                compiled(kAmx) && cpu_runs(kAmx)};
    TORCH_CHECK(isa >= kScalar && isa <= kAmx, "unknown instruction set ", isa);
    TORCH_CHECK(runs[isa], "the ", kIsaNames[isa], " kernel is not compiled into this build or this CPU cannot run it");
}

// The kernel for a product (kernel_kind decides): the AMX one when `amx`, the bf16-pair one when `bf16_pair`, the
// token-vector one when `token_vectors`, else the instruction set's general kernel.
sec24_rows_fn rows_fn(int64_t isa, bool bf16_pair, bool amx, bool token_vectors) {
    if (token_vectors) {
#if defined(SEC24_HAVE_AVX512)
        if (isa >= kAvx512) return sec24_rows_avx512_tokens;
#endif
#if defined(SEC24_HAVE_AVX2)
        if (isa == kAvx2) return sec24_rows_avx2_tokens;
#endif
    }
    switch (isa) {
#if defined(SEC24_HAVE_AMX) && defined(SEC24_HAVE_AVX512BF16)
        case kAmx:
            if (amx) return sec24_rows_amx;
            [[fallthrough]];
#endif
#if defined(SEC24_HAVE_AVX512BF16)
        case kAvx512Bf16:
            if (bf16_pair) return sec24_rows_avx512bf16;
            [[fallthrough]];
#endif
#if defined(SEC24_HAVE_AVX512)
        case kAvx512: return sec24_rows_avx512;
#endif
#if defined(SEC24_HAVE_AVX2)
        case kAvx2: return sec24_rows_avx2;
#endif
        default: return sec24_rows_scalar;
    }
}

// The x layout of the token-vector kernel rows_fn returns for `isa` (each unit exports its own, from tokens.h).
void token_layout(int64_t isa, sec24_xt_floats_fn* floats, sec24_pack_xt_fn* pack) {
#if defined(SEC24_HAVE_AVX512)
    if (isa >= kAvx512) {
        *floats = sec24_tokens_xt_floats_avx512;
        *pack = sec24_tokens_pack_xt_avx512;
        return;
    }
#endif
#if defined(SEC24_HAVE_AVX2)
    *floats = sec24_tokens_xt_floats_avx2;
    *pack = sec24_tokens_pack_xt_avx2;
#endif
}

sec24_decompress_fn decompress_fn(int64_t isa, bool bf16) {
#if defined(SEC24_HAVE_AVX512BF16)
    if (bf16 && (isa == kAmx || isa == kAvx512Bf16)) return sec24_decompress_avx512bf16;
#endif
    switch (isa) {
#if defined(SEC24_HAVE_AVX512)
        case kAmx:
        case kAvx512Bf16:
        case kAvx512: return sec24_decompress_avx512;
#endif
#if defined(SEC24_HAVE_AVX2)
        case kAvx2: return sec24_decompress_avx2;
#endif
        default: return sec24_decompress_scalar;
    }
}

// Runs body(begin, end) over [0, n) in blocks of `block`. Below `serial_work` (in bytes of weight streamed, plus the
// tokens' share) the caller's thread does it all: a decode-sized product never waits for a pool thread to wake. Above,
// at::parallel_for starts torch's threads, and each takes runs of blocks from a shared counter until none are left, so
// a thread that starts late (descheduled on a busy machine) finds the work done instead of holding a share. A run is a
// part of a thread's share (below): contiguous rows, which the kernels' prefetch of the next rows and the hardware
// prefetcher follow. (One block of 16 rows per take, until 2026-11-29, alternated the threads' blocks: each thread's
// prefetch fetched the other's next rows, and the counter's cache line moved between the cores at every block.
// Measured, Xeon, 2 threads, 1 token fp32, 4096x4096: 2.13 -> 1.76 ms; runs of 1/1, 1/2, 1/8 of a share measured
// alike.) A run is half a thread's share since 2026-11-30: on small layers 1/8 of a share is one block, and the
// threads' runs alternated again (192x576: 12 blocks of 16 rows, 12 takes). Measured (Xeon family 6 model 167, 2
// threads, one token fp32, weights rotated over 300 MB, packed / dense F.linear medians of 280 interleaved calls, one
// to three rounds each): 1/8 of a share 0.69-0.74 (576x1536), 0.54-0.55 (1536x576), 0.61-0.64 (576x576), 0.72-0.79
// (192x576); 1/2 0.67, 0.52, 0.54, 0.64; a whole share 0.64-0.67, 0.48-0.50, 0.50-0.53, 0.57-0.61; 4096x4096 0.67-0.70
// in all. Half, not whole: a thread descheduled after its take holds at most a quarter of the work (on two threads).
constexpr int64_t kGrabsPerThread = 2;
template <typename Body>
void run_blocks(int64_t n, int64_t block, int64_t work, int64_t serial_work, const Body& body) {
    const int64_t blocks = (n + block - 1) / block;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
    if (work < serial_work || threads <= 1 || at::in_parallel_region()) {
        body(0, n);
        return;
    }
    const int64_t grab = std::max<int64_t>(1, blocks / (threads * kGrabsPerThread));  // blocks per take
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        for (int64_t b = next.fetch_add(grab); b < blocks; b = next.fetch_add(grab))
            body(b * block, std::min(n, (b + grab) * block));
    });
}

// Token-vector products of at least kTokenSpanMin tokens on more than one thread, where the laid-out x outgrows the
// packed values (use_token_spans), run in spans of kTokenSpan tokens: each thread takes whole spans, lays out that
// span's x in a buffer of its own and runs every row over it, so the x it reads stays in its core's caches (256
// tokens x 576 inputs: 576 KiB) and the weight passes once per span. Rows split over the threads read the whole
// laid-out x once per block of rows (from memory once it outgrows the caches), after the calling thread alone laid
// it out. Measured (AMD EPYC Zen 3, AVX2, fp32, 2 threads, medians of 5-11 interleaved, against dense F.linear):
// SmolLM2's 576x1536 at 2,048 tokens rows 0.71x, spans 0.98x; the three SmolLM2 shapes at 32,768 tokens rows
// 0.61-0.81x, spans 0.97-1.07x; where the packed values are the larger, spans lost (LLaMA-7B's 4096x11008 at 512
// tokens: rows 1.02x, spans 0.92x) or tied. On one thread there is no laying out to share, and spans measured no
// better (576x1536 at 2,048 tokens 1.07x rows, 1.01x spans; 4096x11008 at 512 1.23x / 1.17x). From 2,048 tokens:
// with spans from 512, benchmarks/cpu_kernel.py (weights rotated past the L3, 2 threads) read SmolLM2's 576x1536 at
// 512 tokens 7.54 -> 8.26 ms (each span reads the weight again) and 576x576 2.81 -> 2.80; at 512 tokens the laid-out
// x (3 MB for 1536 inputs) still sits in the L3 for the row blocks.
constexpr int64_t kTokenSpan = 256, kTokenSpanMin = 2048;
int64_t token_spans_override = -1;  // set_token_spans: 1 always (from kTokenSpanMin tokens), 0 never, -1 the rule

bool use_token_spans(int64_t tokens, int64_t out, int64_t threads) {
    if (tokens < kTokenSpanMin) return false;
    if (token_spans_override >= 0) return token_spans_override > 0;
    // on more than one thread, once the laid-out x (tokens × in floats) outgrows the packed values (out × in / 2)
    return threads > 1 && 2 * tokens > out;
}

void check_packed(const at::Tensor& values, const at::Tensor& codes, int64_t in) {
    TORCH_CHECK(values.device().is_cpu() && codes.device().is_cpu(), "packed tensors must be on the CPU");
    TORCH_CHECK(values.dim() == 2 && codes.dim() == 2, "values and codes must be 2-D");
    TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
                "values must be float32 or bfloat16, got ", values.scalar_type());
    TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8");
    TORCH_CHECK(values.is_contiguous() && codes.is_contiguous(), "values and codes must be contiguous");
    TORCH_CHECK(in % 4 == 0 && values.size(1) * 2 == in, "values [", values.size(0), ", ", values.size(1),
                "] do not hold 2 of every 4 of ", in, " inputs");
    TORCH_CHECK(codes.size(0) == values.size(0) && codes.size(1) == (in / 2 * 2 + 7) / 8,
                "codes must be [out, ceil(in/8)]");
}

}  // namespace

// The token-vector kernel over all rows, kTokenSpan tokens at a time (see kTokenSpanMin); `args` describes the whole
// product, its x fp32.
void token_spans(const sec24_args& args, int64_t isa) {
    sec24_xt_floats_fn floats = nullptr;
    sec24_pack_xt_fn pack = nullptr;
    token_layout(isa, &floats, &pack);
    const sec24_rows_fn fn = rows_fn(isa, false, false, true);
    const int64_t spans = (args.tokens + kTokenSpan - 1) / kTokenSpan, y_size = args.y_bf16 ? 2 : 4;
    run_blocks(spans, 1, std::numeric_limits<int64_t>::max(), 0, [&](int64_t s0, int64_t s1) {
        std::vector<float> xt(floats(kTokenSpan, args.in));  // this thread's span of x, laid out
        for (int64_t s = s0; s < s1; ++s) {
            sec24_args span = args;
            const int64_t t0 = s * kTokenSpan;
            span.tokens = std::min(kTokenSpan, args.tokens - t0);
            span.x = args.x + t0 * args.x_stride;
            span.y = (char*)args.y + t0 * args.y_stride * y_size;
            pack(&span, xt.data());
            span.x_t = xt.data();
            fn(&span, 0, args.out);
        }
    });
}

// Which kernel `linear` runs for these arguments: the AMX one, the bf16-pair one, the token-vector one, or the
// instruction set's own.
enum class Kind { kGeneral, kBf16Pair, kAmxTiles, kTokenVectors };

Kind kernel_kind(int64_t isa, bool x_bf16, bool w_bf16, int64_t tokens) {
    const bool bf16 = x_bf16 && w_bf16;
    if (bf16 && isa == kAmx && tokens >= kAmxMinTokens) return Kind::kAmxTiles;
    if (bf16 && (isa == kAvx512Bf16 || (isa == kAmx && tokens <= kBf16PairMaxTokens))) return Kind::kBf16Pair;
    if (isa != kScalar && tokens >= token_vector_min(isa)) return Kind::kTokenVectors;
    return Kind::kGeneral;
}

// The same as a name: "amx", "avx512bf16" (the bf16-pair kernel), "<isa>_tokens" (the token-vector one) or the
// instruction set's.
std::string kernel_name(int64_t isa, bool x_bf16, bool w_bf16, int64_t tokens) {
    check_isa(isa);
    switch (kernel_kind(isa, x_bf16, w_bf16, tokens)) {
        case Kind::kAmxTiles: return "amx";
        case Kind::kBf16Pair: return "avx512bf16";
        case Kind::kTokenVectors: return std::string(kIsaNames[std::min<int64_t>(isa, kAvx512)]) + "_tokens";
        default: return kIsaNames[std::min<int64_t>(isa, kAvx512)];
    }
}

// The bias [out] as a contiguous tensor of `dtype`, or an undefined tensor when there is none.
at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t out, at::ScalarType dtype) {
    if (!bias.has_value() || !bias->defined()) return at::Tensor();
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be [out]");
    return bias->to(dtype).contiguous();
}

// x [..., in] (fp32 or bf16, any strides) · W[out, in]ᵀ (+ bias) -> [..., out] in x's dtype. The leading dimensions
// are flattened here rather than in Python: a decode step calls this for every linear of the model, and each
// reshape through Python's dispatch costs about a microsecond on products of tens.
at::Tensor linear(const at::Tensor& x_any, const at::Tensor& values, const at::Tensor& codes,
                  const c10::optional<at::Tensor>& bias, int64_t isa, int64_t serial_work, int64_t block_rows) {
    check_isa(isa);
    TORCH_CHECK(x_any.device().is_cpu() && x_any.dim() >= 1, "x must be a CPU tensor of at least one dimension");
    const at::Tensor x = x_any.dim() == 2 ? x_any : x_any.reshape({-1, x_any.size(-1)});  // [tokens, in]
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "x must be float32 or bfloat16, got ", x.scalar_type());
    const int64_t tokens = x.size(0), in = x.size(1), out = values.size(0);
    check_packed(values, codes, in);
    const bool x_bf16 = x.scalar_type() == at::kBFloat16;
    const bool w_bf16 = values.scalar_type() == at::kBFloat16;
    const Kind kind = kernel_kind(isa, x_bf16, w_bf16, tokens);
    const bool amx = kind == Kind::kAmxTiles, bf16_pair = kind == Kind::kBf16Pair;
    const bool token_vectors = kind == Kind::kTokenVectors;
    at::Tensor xh = x_bf16 && x.stride(1) != 1 ? x.contiguous() : x;
    at::Tensor xf = x_bf16 ? (bf16_pair || amx ? at::Tensor() : x.to(at::kFloat).contiguous())
                           : (x.stride(1) == 1 ? x : x.contiguous());
    const at::Tensor b = checked_bias(bias, out, at::kFloat);
    std::vector<int64_t> y_sizes = x_any.sizes().vec();
    y_sizes.back() = out;
    at::Tensor y = at::empty(y_sizes, x.options().memory_format(at::MemoryFormat::Contiguous));  // [..., out]
    if (tokens == 0 || out == 0) return y;
    sec24_args args;
    args.x = xf.defined() ? xf.data_ptr<float>() : nullptr;
    args.x_stride = xf.defined() ? xf.stride(0) : 0;
    args.x_bf16 = x_bf16 ? (const uint16_t*)xh.data_ptr() : nullptr;
    args.x_bf16_stride = x_bf16 ? xh.stride(0) : 0;
    args.values = values.data_ptr();
    args.codes = codes.data_ptr<uint8_t>();
    args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
    args.y = y.data_ptr();
    args.y_stride = out;
    args.tokens = tokens;
    args.out = out;
    args.in = in;
    args.code_bytes = codes.size(1);
    args.values_bf16 = w_bf16 ? 1 : 0;
    args.y_bf16 = x_bf16 ? 1 : 0;
    args.x_vnni = nullptr;
    args.x_t = nullptr;
    args.tokens_tall = tokens_tall() ? 1 : 0;
    args.amx_input_blocks = (int32_t)amx_input_blocks_override;
    args.amx_sums_bytes = amx_sums_bytes_override;
    args.prefetch_long_rows = long_row_prefetch ? 1 : 0;
    at::Tensor x_vnni, x_t;
    if (token_vectors && use_token_spans(tokens, out, at::get_num_threads())) {
        token_spans(args, isa);
        return y;
    }
    if (token_vectors) {  // x once in the token-vector kernel's layout, read by every thread
        sec24_xt_floats_fn floats = nullptr;
        sec24_pack_xt_fn pack = nullptr;
        token_layout(isa, &floats, &pack);
        x_t = at::empty({floats(tokens, in)}, x.options().dtype(at::kFloat));
        pack(&args, x_t.data_ptr<float>());
        args.x_t = x_t.data_ptr<float>();
    }
#if defined(SEC24_HAVE_AMX)
    if (amx) {  // x once in the tile layout, read by every thread
        x_vnni = at::empty({sec24_amx_x_words(tokens, in)}, x.options().dtype(at::kInt));
        sec24_amx_pack_x(&args, (uint32_t*)x_vnni.data_ptr());
        args.x_vnni = (const uint32_t*)x_vnni.data_ptr();
    }
#endif
    const sec24_rows_fn fn = rows_fn(isa, bf16_pair, amx, token_vectors);
    const int64_t row_bytes = values.size(1) * values.element_size() + codes.size(1);
    const int64_t work = out * row_bytes + tokens * out * in / 2;
    run_blocks(out, std::max<int64_t>(block_rows, 1), work, serial_work,
               [&](int64_t r0, int64_t r1) { fn(&args, r0, r1); });
    return y;
}

// Whether x is what a layer's bound call was bound for (kernel.py's _bound, _bound_tiles): x on the CPU, in its dtype,
// `width` inputs, more than `above` and at most `at_most` elements, the same thread count, no autograd, no CPU
// autocast. Otherwise PackedLinear's dispatch must decide. x comes last so that Python binds the rest once
// (functools.partial): a decode step calls this for every linear, and each Python-level check had cost 0.05-0.4 µs.
bool bound_takes(bool x_bf16, int64_t width, int64_t above, int64_t at_most, int64_t threads, const at::Tensor& x) {
    return x.scalar_type() == (x_bf16 ? at::kBFloat16 : at::kFloat) && x.device().is_cpu() && x.dim() >= 1 &&
           x.size(-1) == width && x.numel() > above && x.numel() <= at_most && at::get_num_threads() == threads &&
           !(x.requires_grad() && at::GradMode::is_enabled()) && !at::autocast::is_autocast_enabled(at::kCPU);
}

// The kernel's bound call: the product where bound_takes (any size up to `limit` elements), else None.
c10::optional<at::Tensor> bound_linear(const at::Tensor& values, const at::Tensor& codes,
                                       const c10::optional<at::Tensor>& bias, int64_t isa, int64_t serial_work,
                                       int64_t block_rows, bool x_bf16, int64_t width, int64_t limit, int64_t threads,
                                       const at::Tensor& x) {
    if (!bound_takes(x_bf16, width, -1, limit, threads, x)) return c10::nullopt;
    return linear(x, values, codes, bias, isa, serial_work, block_rows);
}

// Rows [row_begin, row_end) of the dense weight, in the values' dtype, written into `dense` ([>= rows, in]).
void decompress(const at::Tensor& values, const at::Tensor& codes, int64_t row_begin, int64_t row_end,
                at::Tensor& dense, int64_t isa, int64_t serial_work) {
    check_isa(isa);
    const int64_t in = dense.size(1);
    check_packed(values, codes, in);
    TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= values.size(0), "row range out of bounds");
    TORCH_CHECK(dense.is_contiguous() && dense.scalar_type() == values.scalar_type() &&
                    dense.size(0) >= row_end - row_begin,
                "dense must be a contiguous [rows, in] tensor of the values' dtype");
    const sec24_decompress_fn fn = decompress_fn(isa, values.scalar_type() == at::kBFloat16);
    const int64_t rows = row_end - row_begin;
    const int64_t work = rows * in * values.element_size();
    const void* v = values.data_ptr();
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const int32_t bf16 = values.scalar_type() == at::kBFloat16 ? 1 : 0;
    const int64_t code_bytes = codes.size(1), esize = values.element_size();
    char* d = (char*)dense.data_ptr();
    run_blocks(rows, 16, work, serial_work, [&](int64_t r0, int64_t r1) {
        fn(v, c, bf16, in, code_bytes, row_begin + r0, row_begin + r1, d + r0 * in * esize);
    });
}

// The hand-over with threads: y = x·Wᵀ (+ b), W decompressed `tile_rows` rows at a time, each thread taking runs of
// tiles (run_blocks) into its own buffer and multiplying them with at::linear on its own core (an ATen product
// inside a parallel region runs on the calling thread), so no tile's product is a parallel region of its own and
// each tile stays in the cache of the core that wrote it. x [tokens, in] -> [tokens, out] in x's dtype (mixed
// dtypes compute in fp32). Why: with the tiles one after the other, each product split over the threads, 2 threads
// ran bf16 at 512 tokens at 0.85-0.95x dense on an AMD Zen 4 and 0.77-0.91x on a Zen 5 (README), where one thread
// ran 0.94-0.99x.
at::Tensor tiles_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes,
                        const c10::optional<at::Tensor>& bias, int64_t isa, int64_t tile_rows) {
    check_isa(isa);
    TORCH_CHECK(x.dim() == 2, "x must be [tokens, in]");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "x must be float32 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
    const int64_t tokens = x.size(0), in = x.size(1), out = values.size(0);
    check_packed(values, codes, in);
    const at::ScalarType compute = x.scalar_type() == values.scalar_type() ? x.scalar_type() : at::kFloat;
    const at::Tensor xc = x.to(compute).contiguous();  // [tokens, in]
    const at::Tensor b = checked_bias(bias, out, compute);
    at::Tensor y = at::empty({tokens, out}, x.options().dtype(compute));  // [tokens, out]
    if (tokens == 0 || out == 0) return y.to(x.scalar_type());
    const sec24_decompress_fn fn = decompress_fn(isa, values.scalar_type() == at::kBFloat16);
    const void* v = values.data_ptr();
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const int32_t bf16 = values.scalar_type() == at::kBFloat16 ? 1 : 0;
    const int64_t code_bytes = codes.size(1);
    run_blocks(out, tile_rows, std::numeric_limits<int64_t>::max(), 0, [&](int64_t r0, int64_t r1) {
        at::Tensor buffer = at::empty({std::min(tile_rows, r1 - r0), in}, values.options());  // [rows, in]
        for (int64_t start = r0; start < r1; start += tile_rows) {
            const int64_t rows = std::min(tile_rows, r1 - start);
            fn(v, c, bf16, in, code_bytes, start, start + rows, buffer.data_ptr());
            at::Tensor w = buffer.narrow(0, 0, rows);  // [rows, in]
            if (w.scalar_type() != compute) w = w.to(compute);
            const at::Tensor part = at::linear(xc, w, b.defined() ? b.narrow(0, start, rows) : at::Tensor());
            y.narrow(1, start, rows).copy_(part);  // [tokens, rows]
        }
    });
    return y.to(x.scalar_type());
}

// How many pieces at::parallel_for(0, n, 1, ...) ran as: one per thread when the build has torch's intra-op
// threads (compiled with OpenMP), 1 when it silently runs everything on the calling thread. For the tests.
int64_t parallel_pieces(int64_t n) {
    std::atomic<int64_t> pieces{0};
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) { pieces.fetch_add(1); });
    return pieces.load();
}

std::vector<std::string> isas_compiled() {
    std::vector<std::string> names;
    for (int64_t i = kScalar; i <= kAmx; ++i)
        if (compiled(i)) names.push_back(kIsaNames[i]);
    return names;
}

std::vector<std::string> isas_runnable() {
    std::vector<std::string> names;
    for (int64_t i = kScalar; i <= kAmx; ++i)
        if (compiled(i) && cpu_runs(i)) names.push_back(kIsaNames[i]);
    return names;
}

// Writes back and drops every cache line of t's bytes from every cache level (x86's CLFLUSH; elsewhere nothing), so
// that the next product reads them from memory, as a decode step finds a layer too large for the caches. For
// kernel.py's measurements at first use, which time one weight instead of copies spanning the last-level cache.
bool evict(const at::Tensor& t) {
#if defined(__x86_64__) || defined(__i386__)
    const char* p = (const char*)t.data_ptr();
    const int64_t bytes = t.numel() * t.element_size();
    for (int64_t i = 0; i < bytes; i += 64) _mm_clflush(p + i);
    if (bytes > 0) _mm_clflush(p + bytes - 1);
    _mm_mfence();
    return true;
#else
    (void)t;
    return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "secateurs packed 2:4 CPU kernel (see secateurs.kernels.sparse.cpu)";
    m.def("linear", &linear, "y = x W^T (+ b) from the packed 2:4 form");
    m.def("bound_takes", &bound_takes,
          "whether x is what a layer's bound call was bound for (dtype, device, width, size, threads, autograd, "
          "autocast)");
    m.def("bound_linear", &bound_linear, "linear for a layer's bound call: None where bound_takes does not");
    m.def("decompress", &decompress, "rows of the dense weight from the packed 2:4 form");
    m.def("tiles_linear", &tiles_linear,
          "y = x W^T (+ b): W decompressed a tile of rows at a time, each thread multiplying its own tiles");
    m.def("kernel_name", &kernel_name, "the kernel linear runs for (isa, x is bf16, w is bf16, tokens)");
    m.def(
        "set_token_vector_min", [](int64_t tokens) { token_vector_override = std::max<int64_t>(0, tokens); },
        "products of at least this many tokens (fp32 activations) take the token-vector kernel; 0: the measured "
        "defaults");
    m.def("token_vector_min", &token_vector_min, "the token count from which the token-vector kernel runs (isa)");
    m.def(
        "set_tokens_tall", [](int64_t tall) { tokens_tall_override = tall < 0 ? -1 : (tall > 0 ? 1 : 0); },
        "the token-vector kernels' full chunks in tall row blocks (1), short ones (0), or as the L1d allows (-1)");
    m.def(
        "set_token_spans", [](int64_t spans) { token_spans_override = spans < 0 ? -1 : (spans > 0 ? 1 : 0); },
        "token-vector products of many tokens in spans of tokens (1), in blocks of rows (0), or by the rule (-1)");
    m.def("token_spans", &use_token_spans, "whether a token-vector product of (tokens, out, threads) runs in spans");
    m.def(
        "set_amx_input_blocks",
        [](int64_t on, int64_t sums_bytes) {
            amx_input_blocks_override = on < 0 ? -1 : (on > 0 ? 1 : 0);
            amx_sums_bytes_override = std::max<int64_t>(0, sums_bytes);
        },
        "the AMX kernel's input blocks by their rule (-1), never (0), or wherever 32 rows fit (1); sums_bytes > 0 "
        "caps their sums (token tiles then go in groups)",
        py::arg("on"), py::arg("sums_bytes") = 0);
    m.def("tokens_tall", &tokens_tall, "whether the token-vector kernels' full chunks take tall row blocks");
    m.def(
        "set_long_row_prefetch", [](int64_t on) { long_row_prefetch = on > 0; },
        "the AVX-512 general kernel's prefetch of the next rows on long rows: on (1) or off (0)");
    m.def("long_row_prefetch", []() { return long_row_prefetch; },
          "whether the AVX-512 general kernel prefetches the next rows on long rows");
    m.def("long_row_bytes", []() { return (int64_t)SEC24_LONG_ROW_BYTES; },
          "a row's kept-value bytes from which it counts as long (the prefetch choice applies)");
    m.def("evict", &evict, "flush a tensor's bytes out of every cache level (False where the CPU has no CLFLUSH)");
    m.def("l1d_bytes", &l1d_bytes, "the L1 data cache of a core in bytes (0: not reported)");
    m.def("l2_bytes", &l2_bytes, "the L2 cache of a core in bytes (0: not reported)");
    m.def("parallel_pieces", &parallel_pieces, "pieces at::parallel_for(0, n, 1) ran as (1 = no threads)");
    m.def("isas_compiled", &isas_compiled, "instruction sets compiled into this build, in order of preference");
    m.def("isas_runnable", &isas_runnable, "the compiled instruction sets this CPU runs");
    m.def("cpu_flags", &cpu_flags, "the CPU features the kernels look at");
}
