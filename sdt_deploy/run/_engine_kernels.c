/* The integer engine's compiled kernels (sdt_deploy.run._engine_kernels), called by sdt_deploy/run/engine_kernels.py,
 * and the NIR interpreter's neuron step (float64, at the end of the integer part).
 *
 * Plain C over Python buffers (no numpy headers: the extension builds with setuptools and a C compiler
 * alone). Each function releases the GIL while it computes, so the engine's threads run them in parallel
 * on separate sample ranges. The engine's arithmetic is exact integer arithmetic; the callers check beforehand
 * that nothing can overflow (see engine_kernels.py for the bounds each function relies on).
 *
 * Vector code is written with GCC/clang vector extensions and compiled, where the compiler supports
 * function multi-versioning (GCC on x86-64 Linux), for AVX-512BW, AVX2 and the x86-64 baseline; the
 * loader picks the best the CPU has. Elsewhere the plain build is used (same results, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

typedef int16_t v32i16 __attribute__((vector_size(64)));
#define LANES 32                 /* int16 lanes per vector */
#define I16_MAX 32767

static inline __attribute__((always_inline)) v32i16 load_v(const int16_t *p) { v32i16 v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void store_v(int16_t *p, v32i16 v) { memcpy(p, &v, sizeof v); }

/* ------------------------------------------------------------------------------------------------
 * Event lists: for every input position (n, y, x) of a channel-last spike tensor [n, H, W, C] (uint8,
 * nonzero = spike), the channels that spiked, in increasing order. ptr[pos]..ptr[pos+1] index chan.
 * chan must hold up to npos * C entries (untouched pages cost nothing).
 */
static void build_events_plain(const uint8_t *s, int64_t npos, int64_t C, int64_t *ptr, int32_t *chan)
{
    int64_t e = 0;
    ptr[0] = 0;
    for (int64_t p = 0; p < npos; p++) {
        const uint8_t *row = s + p * C;
        for (int64_t c = 0; c < C; c++) {
            chan[e] = (int32_t)c;
            e += row[c] != 0;          /* branch-free compaction */
        }
        ptr[p + 1] = e;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_EVENTS 1
/* The same lists, 16 channels at a time: a mask of the nonzero bytes (vptestmb) selects the channel
 * numbers that vpcompressd writes out; branch-free, the same entries in the same order. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void build_events_avx512(const uint8_t *s, int64_t npos, int64_t C, int64_t *ptr, int32_t *chan)
{
    int64_t e = 0;
    ptr[0] = 0;
    const __m512i step = _mm512_set1_epi32(16);
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t p = 0; p < npos; p++) {
        const uint8_t *row = s + p * C;
        __m512i idx = first;
        int64_t c = 0;
        for (; c + 16 <= C; c += 16) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(row + c));
            const __mmask16 m = _mm_test_epi8_mask(bytes, bytes);
            _mm512_mask_compressstoreu_epi32(chan + e, m, idx);
            e += __builtin_popcount((unsigned)m);
            idx = _mm512_add_epi32(idx, step);
        }
        for (; c < C; c++) {
            chan[e] = (int32_t)c;
            e += row[c] != 0;
        }
        ptr[p + 1] = e;
    }
}
#endif

static void build_events(const uint8_t *s, int64_t npos, int64_t C, int64_t *ptr, int32_t *chan)
{
#ifdef HAVE_AVX512_EVENTS
    static int use = -1;               /* SDT_ENGINE_PLAIN_EVENTS set: the plain loop (the tests compare both) */
    if (use < 0)
        use = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && getenv("SDT_ENGINE_PLAIN_EVENTS") == NULL;
    if (use) {
        build_events_avx512(s, npos, C, ptr, chan);
        return;
    }
#endif
    build_events_plain(s, npos, C, ptr, chan);
}

/* ------------------------------------------------------------------------------------------------
 * Event-driven convolution, output-stationary, for one tile of L = NV * 32 output channels.
 *
 * For every output row r = (n, yo, xo) and every kernel tap (ky, kx) whose input (n, yo + ky - pad,
 * xo + kx - pad) lies inside the input, the weight rows wt[tap][c][0:L] of the channels c that spiked
 * there are added into int16 accumulators held in registers. Before an event could take any lane past
 * 2**15 - 1 (its running budget, the sum of mag[tap][c] = max over the tile's lanes of |w|, would
 * exceed it), the int16 accumulators are emptied into an int32 row: exact. The row plus bias[o0 + j]
 * (int32) is written to out[r * O + o0 + j] for j < min(L, O - o0). Returns the (event, tap) pairs
 * visited; *peak is raised to the largest |value| written (the engine's observed bound of the layer,
 * without a pass of its own over the output).
 */
#define DEFINE_CONV_TILE(NAME, NV, WT, LOAD)                                                                             \
static MULTIVERSION int64_t NAME(const int64_t *ptr, const int32_t *chan, int64_t N,                    \
        int64_t H, int64_t W, int64_t C, int64_t k, int64_t pad, const WT *wt, const int32_t *mag,       \
        const int32_t *bias, int32_t *out, int64_t O, int64_t o0, uint64_t *peak)                        \
{                                                                                                        \
    const int64_t L = NV * LANES, Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1;                    \
    const int64_t valid = (O - o0) < L ? (O - o0) : L;                                                   \
    int64_t pairs = 0;                                                                                   \
    int32_t hi = 0, lo = 0;                                                                              \
    int32_t row32[NV * LANES];                                                                           \
    int16_t row16[NV * LANES];                                                                           \
    for (int64_t n = 0; n < N; n++)                                                                      \
    for (int64_t yo = 0; yo < Ho; yo++)                                                                  \
    for (int64_t xo = 0; xo < Wo; xo++) {                                                                \
        v32i16 acc[NV];                                                                                  \
        for (int v = 0; v < NV; v++) acc[v] = (v32i16){0};                                               \
        int32_t budget = 0;                                                                              \
        int flushed = 0;                                                                                 \
        for (int64_t ky = 0; ky < k; ky++) {                                                             \
            const int64_t yi = yo + ky - pad;                                                            \
            if (yi < 0 || yi >= H) continue;                                                             \
            for (int64_t kx = 0; kx < k; kx++) {                                                         \
                const int64_t xi = xo + kx - pad;                                                        \
                if (xi < 0 || xi >= W) continue;                                                         \
                const int64_t pos = (n * H + yi) * W + xi, tap = ky * k + kx;                            \
                const WT *wtap = wt + tap * C * L;                                                       \
                const int32_t *mtap = mag + tap * C;                                                     \
                const int64_t e1 = ptr[pos + 1];                                                         \
                pairs += e1 - ptr[pos];                                                                  \
                for (int64_t e = ptr[pos]; e < e1; e++) {                                                \
                    const int32_t c = chan[e];                                                           \
                    const int32_t m = mtap[c];                                                           \
                    if (__builtin_expect(budget + m > I16_MAX, 0)) {                                     \
                        for (int v = 0; v < NV; v++) store_v(row16 + v * LANES, acc[v]);                 \
                        if (flushed) for (int64_t j = 0; j < L; j++) row32[j] += row16[j];               \
                        else for (int64_t j = 0; j < L; j++) row32[j] = row16[j];                        \
                        for (int v = 0; v < NV; v++) acc[v] = (v32i16){0};                               \
                        flushed = 1;                                                                     \
                        budget = 0;                                                                      \
                    }                                                                                    \
                    budget += m;                                                                         \
                    const WT *w = wtap + (int64_t)c * L;                                                 \
                    for (int v = 0; v < NV; v++) acc[v] += LOAD(w + v * LANES);                          \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int v = 0; v < NV; v++) store_v(row16 + v * LANES, acc[v]);                                 \
        int32_t *dst = out + ((n * Ho + yo) * Wo + xo) * O + o0;                                         \
        const int32_t *b = bias + o0;                                                                    \
        if (flushed) for (int64_t j = 0; j < valid; j++) dst[j] = row32[j] + row16[j] + b[j];            \
        else for (int64_t j = 0; j < valid; j++) dst[j] = row16[j] + b[j];                               \
        for (int64_t j = 0; j < valid; j++) {                                                            \
            hi = dst[j] > hi ? dst[j] : hi;                                                              \
            lo = dst[j] < lo ? dst[j] : lo;                                                              \
        }                                                                                                \
    }                                                                                                    \
    const uint64_t a = (uint64_t)(int64_t)hi, m = (uint64_t)(-(int64_t)lo);                              \
    if (a > *peak) *peak = a;                                                                            \
    if (m > *peak) *peak = m;                                                                            \
    return pairs;                                                                                        \
}

DEFINE_CONV_TILE(conv16_1, 1, int16_t, load_v)
DEFINE_CONV_TILE(conv16_2, 2, int16_t, load_v)
DEFINE_CONV_TILE(conv16_4, 4, int16_t, load_v)
DEFINE_CONV_TILE(conv16_8, 8, int16_t, load_v)


/* conv_events(spikes, N, H, W, C, k, pad, wt, mag, L, O, bias, out) -> (pairs, max |out| written)
 *   spikes: uint8 [N, H, W, C] contiguous; wt: int16 [ceil(O / L), k*k, C, L];
 *   mag: int32 [tiles, k*k, C]; bias: int32 [tiles * L] (zero past O); out: int32 [N, Ho, Wo, O] (written,
 *   not added to). */
static PyObject *py_conv_events(PyObject *self, PyObject *args)
{
    Py_buffer sb, wb, mb, bb, ob;
    long long N, H, W, C, k, pad, L, O;
    if (!PyArg_ParseTuple(args, "y*LLLLLLy*y*LLy*w*", &sb, &N, &H, &W, &C, &k, &pad, &wb, &mb, &L, &O, &bb, &ob))
        return NULL;
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, tiles = (O + L - 1) / L;
    PyObject *result = NULL;
    if ((L != 32 && L != 64 && L != 128 && L != 256) || Ho <= 0 || Wo <= 0 || wb.len < (Py_ssize_t)(tiles * k * k * C * L * 2) ||
        sb.len < N * H * W * C || mb.len < (Py_ssize_t)(tiles * k * k * C * 4) || bb.len < (Py_ssize_t)(tiles * L * 4) ||
        ob.len < (Py_ssize_t)(N * Ho * Wo * O * 4)) {
        PyErr_SetString(PyExc_ValueError, "conv_events: inconsistent sizes");
        goto done;
    }
    int64_t npos = N * H * W, pairs = 0;
    uint64_t peak = 0;
    int64_t *ptr = malloc((npos + 1) * sizeof(int64_t));
    int32_t *chan = malloc((npos * C > 0 ? npos * C : 1) * sizeof(int32_t));
    if (!ptr || !chan) { free(ptr); free(chan); PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    build_events(sb.buf, npos, C, ptr, chan);
    for (int64_t t = 0; t < tiles; t++) {
        const int32_t *mag = (const int32_t *)mb.buf + t * k * k * C;
        int64_t p;
        const int16_t *wt = (const int16_t *)wb.buf + t * k * k * C * L;
        switch (L) {
            case 32: p = conv16_1(ptr, chan, N, H, W, C, k, pad, wt, mag, bb.buf, ob.buf, O, t * L, &peak); break;
            case 64: p = conv16_2(ptr, chan, N, H, W, C, k, pad, wt, mag, bb.buf, ob.buf, O, t * L, &peak); break;
            case 128: p = conv16_4(ptr, chan, N, H, W, C, k, pad, wt, mag, bb.buf, ob.buf, O, t * L, &peak); break;
            default: p = conv16_8(ptr, chan, N, H, W, C, k, pad, wt, mag, bb.buf, ob.buf, O, t * L, &peak); break;
        }
        if (t == 0) pairs = p;           /* every tile visits the same (event, tap) pairs */
    }
    Py_END_ALLOW_THREADS
    free(ptr);
    free(chan);
    result = Py_BuildValue("LK", (long long)pairs, (unsigned long long)peak);
done:
    PyBuffer_Release(&sb); PyBuffer_Release(&wb); PyBuffer_Release(&mb); PyBuffer_Release(&bb);
    PyBuffer_Release(&ob);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * Integer LIF over T steps for samples laid out [T, B, P] (P neurons per sample, contiguous), samples
 * b0..b1: x = X * M[j] (the input brought onto the neuron's grid: M[j] = 2**shift, M NULL for none),
 * H = (V + x) >> 1 (arithmetic shift: floor), S = H >= theta[j], V = S ? 0 : H, V starting at 0.
 * Writes S (0/1) into out [T, B, P]; where H is not NULL, every step's H (before the reset) as int64
 * into H [T, B, P]; where VT is not NULL, every step's V after the reset into VT [T, B, P] (X's type):
 * the membrane traces (the engine's and the one a verifier compares with a file's states). Returns
 * max |H|, max |x| and the number of spikes over everything it stepped, so that the caller needs no
 * further pass over X or S. The caller guarantees |V + x| fits the type.
 */
typedef struct { uint64_t peak_h, peak_x; int64_t spikes; } lif_result;

/* one neuron's step (j), written once for every loop below: h = H, f = S, V[j] = V' */
#define LIF_STEP(TYPE, j, XV)                                                                            \
    const TYPE xv = (XV);                                                                                \
    TYPE h = (TYPE)(V[j] + xv) >> 1;                                                                     \
    xhi = xv > xhi ? xv : xhi;                                                                           \
    xlo = xv < xlo ? xv : xlo;                                                                           \
    hi = h > hi ? h : hi;                                                                                \
    lo = h < lo ? h : lo;                                                                                \
    uint8_t f = h >= theta[j];                                                                           \
    s[j] = f;                                                                                            \
    n += f;                                                                                              \
    V[j] = f ? 0 : h;

/* the steps of one sample at one time step, with the input as XV; the loop without traces is kept free
 * of the trace branches: it is the engine's hot path */
#define LIF_LOOP(TYPE, XV)                                                                               \
    if (ht || vt) {                                                                                      \
        for (int64_t j = 0; j < P; j++) {                                                                \
            LIF_STEP(TYPE, j, XV)                                                                        \
            if (ht) ht[j] = (int64_t)h;                                                                  \
            if (vt) vt[j] = V[j];                                                                        \
        }                                                                                                \
    } else {                                                                                             \
        for (int64_t j = 0; j < P; j++) {                                                                \
            LIF_STEP(TYPE, j, XV)                                                                        \
        }                                                                                                \
    }

#define DEFINE_LIF(NAME, TYPE)                                                                           \
static MULTIVERSION lif_result NAME(const TYPE *X, const TYPE *theta, const TYPE *M, uint8_t *out,        \
                                    int64_t *H, TYPE *VT, TYPE *V, int64_t T, int64_t B, int64_t P,      \
                                    int64_t b0, int64_t b1)                                              \
{                                                                                                        \
    TYPE hi = 0, lo = 0, xhi = 0, xlo = 0;                                                               \
    int64_t n = 0;                                                                                       \
    for (int64_t b = b0; b < b1; b++) {                                                                  \
        memset(V, 0, P * sizeof(TYPE));                                                                  \
        for (int64_t t = 0; t < T; t++) {                                                                \
            const TYPE *x = X + (t * B + b) * P;                                                         \
            uint8_t *s = out + (t * B + b) * P;                                                          \
            int64_t *ht = H ? H + (t * B + b) * P : NULL;                                                \
            TYPE *vt = VT ? VT + (t * B + b) * P : NULL;                                                 \
            if (M) { LIF_LOOP(TYPE, x[j] * M[j]) }                                                       \
            else { LIF_LOOP(TYPE, x[j]) }                                                                \
        }                                                                                                \
    }                                                                                                    \
    lif_result r;                                                                                        \
    uint64_t a = (uint64_t)hi, m = (uint64_t)0 - (uint64_t)lo;                                            \
    r.peak_h = a > m ? a : m;                                                                            \
    a = (uint64_t)xhi; m = (uint64_t)0 - (uint64_t)xlo;                                                   \
    r.peak_x = a > m ? a : m;                                                                            \
    r.spikes = n;                                                                                        \
    return r;                                                                                            \
}

DEFINE_LIF(lif_i32, int32_t)
DEFINE_LIF(lif_i64, int64_t)

/* lif(X, theta, M, out, H, VT, itemsize, T, B, P, b0, b1) -> (max |H|, max |x|, spikes); M: the multipliers
 * (P of X's type) or an empty buffer for none; H: an int64 buffer of T * B * P, VT one of X's type, or
 * empty ones for no trace */
static PyObject *py_lif(PyObject *self, PyObject *args)
{
    Py_buffer xb, tb, mb, ob, hb, vb;
    long long isz, T, B, P, b0, b1;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*LLLLLL", &xb, &tb, &mb, &ob, &hb, &vb, &isz, &T, &B, &P, &b0, &b1))
        return NULL;
    PyObject *result = NULL;
    if ((isz != 4 && isz != 8) || xb.len < T * B * P * isz || tb.len < P * isz ||
        (mb.len != 0 && mb.len < P * isz) || ob.len < T * B * P ||
        (hb.len != 0 && hb.len < T * B * P * 8) || (vb.len != 0 && vb.len < T * B * P * isz) ||
        b0 < 0 || b1 > B || b0 > b1) {
        PyErr_SetString(PyExc_ValueError, "lif: inconsistent sizes");
        goto done;
    }
    void *V = malloc((P > 0 ? P : 1) * isz);
    if (!V) { PyErr_NoMemory(); goto done; }
    lif_result r;
    Py_BEGIN_ALLOW_THREADS
    int64_t *H = hb.len ? (int64_t *)hb.buf : NULL;
    void *VT = vb.len ? vb.buf : NULL;
    void *M = mb.len ? mb.buf : NULL;
    if (isz == 4) r = lif_i32(xb.buf, tb.buf, M, ob.buf, H, VT, V, T, B, P, b0, b1);
    else r = lif_i64(xb.buf, tb.buf, M, ob.buf, H, VT, V, T, B, P, b0, b1);
    Py_END_ALLOW_THREADS
    free(V);
    result = Py_BuildValue("KKL", (unsigned long long)r.peak_h, (unsigned long long)r.peak_x, (long long)r.spikes);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&tb); PyBuffer_Release(&mb); PyBuffer_Release(&ob);
    PyBuffer_Release(&hb); PyBuffer_Release(&vb);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * The NIR interpreter's neuron (sdt_deploy.run.lif.nir_lif_step, NIR's LIF / IF / LI / I stepped by forward
 * Euler), one step, in float64 with the operations of that numpy definition in its order:
 *     leaky:  h = v + gain * ((v_leak - v) + r * i)        otherwise:  h = v + gain * (r * i)
 *     firing: s = h > v_threshold;  v' = s ? v_reset : h   otherwise:  v' = h
 * Each IEEE operation rounds as numpy's does; the build keeps the compiler from fusing a multiply and an
 * add (-ffp-contract=off in setup.py), which would round once instead of twice. I, H, Vn [B, G, P]; V the
 * same or NULL (at rest: 0); the parameters per group g of P neurons.
 */
static MULTIVERSION void nir_lif_f64(const double *I, const double *V, double *H, double *Vn, uint8_t *S,
        const double *gain, const double *r, const double *vleak, const double *vth, const double *vreset,
        int64_t B, int64_t G, int64_t P, int leaky, int fires)
{
    for (int64_t b = 0; b < B; b++)
    for (int64_t g = 0; g < G; g++) {
        const int64_t o = (b * G + g) * P;
        const double k = gain[g], rr = r[g], vl = vleak[g], th = vth[g], vr = vreset[g];
        for (int64_t j = 0; j < P; j++) {
            const double v = V ? V[o + j] : 0.0;
            const double ri = rr * I[o + j];
            const double h = leaky ? v + k * ((vl - v) + ri) : v + k * ri;
            H[o + j] = h;
            if (fires) {
                const uint8_t f = h > th;
                S[o + j] = f;
                Vn[o + j] = f ? vr : h;
            }
        }
    }
}

/* nir_lif(I, V, H, Vn, S, gain, r, v_leak, v_threshold, v_reset, B, G, P, leaky, fires); V empty: at rest,
 * Vn and S empty for a neuron that does not fire */
static PyObject *py_nir_lif(PyObject *self, PyObject *args)
{
    Py_buffer ib, vb, hb, nb, sb, kb, rb, lb, tb, zb;
    long long B, G, P;
    int leaky, fires;
    if (!PyArg_ParseTuple(args, "y*y*w*w*w*y*y*y*y*y*LLLpp", &ib, &vb, &hb, &nb, &sb, &kb, &rb, &lb, &tb, &zb,
                          &B, &G, &P, &leaky, &fires))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n = B * G * P * 8, g = G * 8;
    if (B < 0 || G < 0 || P < 0 || ib.len < n || (vb.len != 0 && vb.len < n) || hb.len < n ||
        (fires && (nb.len < n || sb.len < B * G * P)) || kb.len < g || rb.len < g || lb.len < g ||
        tb.len < g || zb.len < g) {
        PyErr_SetString(PyExc_ValueError, "nir_lif: inconsistent sizes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    nir_lif_f64(ib.buf, vb.len ? vb.buf : NULL, hb.buf, nb.buf, sb.buf, kb.buf, rb.buf, lb.buf, tb.buf, zb.buf,
                B, G, P, leaky, fires);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&ib); PyBuffer_Release(&vb); PyBuffer_Release(&hb); PyBuffer_Release(&nb);
    PyBuffer_Release(&sb); PyBuffer_Release(&kb); PyBuffer_Release(&rb); PyBuffer_Release(&lb);
    PyBuffer_Release(&tb); PyBuffer_Release(&zb);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * Dense integer convolution (the encoder) in int32, written channel-last: out[n, yo, xo, o] = sum over
 * c, ky, kx of w[ky, kx, c, o] * x[n, c, yo*stride + ky - pad, xo*stride + kx - pad] over the taps inside
 * the input, plus bias[o]. x int32 [N, C, H, W], w int32 [k, k, C, O], bias int32 [O], out int32
 * [N, Ho, Wo, O]; the caller guarantees sum |w| * max |x| + |bias| < 2**31 per output channel. acc: O
 * int32 of scratch.
 */
static MULTIVERSION void dense_conv_i32(const int32_t *x, const int32_t *w, const int32_t *bias, int32_t *out,
        int32_t *acc,
        int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t k, int64_t stride, int64_t pad)
{
    const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    for (int64_t n = 0; n < N; n++)
    for (int64_t yo = 0; yo < Ho; yo++)
    for (int64_t xo = 0; xo < Wo; xo++) {
        for (int64_t o = 0; o < O; o++) acc[o] = bias[o];
        for (int64_t ky = 0; ky < k; ky++) {
            const int64_t yi = yo * stride + ky - pad;
            if (yi < 0 || yi >= H) continue;
            for (int64_t kx = 0; kx < k; kx++) {
                const int64_t xi = xo * stride + kx - pad;
                if (xi < 0 || xi >= W) continue;
                for (int64_t c = 0; c < C; c++) {
                    const int32_t xv = x[((n * C + c) * H + yi) * W + xi];
                    const int32_t *wr = w + ((ky * k + kx) * C + c) * O;
                    for (int64_t o = 0; o < O; o++) acc[o] += xv * wr[o];
                }
            }
        }
        memcpy(out + ((n * Ho + yo) * Wo + xo) * O, acc, O * sizeof(int32_t));
    }
}

/* dense_conv(x, w, bias, out, N, C, H, W, O, k, stride, pad) */
static PyObject *py_dense_conv(PyObject *self, PyObject *args)
{
    Py_buffer xb, wb, bb, ob;
    long long N, C, H, W, O, k, stride, pad;
    if (!PyArg_ParseTuple(args, "y*y*y*w*LLLLLLLL", &xb, &wb, &bb, &ob, &N, &C, &H, &W, &O, &k, &stride, &pad))
        return NULL;
    PyObject *result = NULL;
    const int64_t Ho = stride > 0 ? (H + 2 * pad - k) / stride + 1 : 0;
    const int64_t Wo = stride > 0 ? (W + 2 * pad - k) / stride + 1 : 0;
    if (stride <= 0 || Ho <= 0 || Wo <= 0 || xb.len < N * C * H * W * 4 || wb.len < O * C * k * k * 4 || bb.len < O * 4 ||
        ob.len < N * O * Ho * Wo * 4) {
        PyErr_SetString(PyExc_ValueError, "dense_conv: inconsistent sizes");
        goto done;
    }
    int32_t *acc = malloc((O > 0 ? O : 1) * sizeof(int32_t));
    if (!acc) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    dense_conv_i32(xb.buf, wb.buf, bb.buf, ob.buf, acc, N, C, H, W, O, k, stride, pad);
    Py_END_ALLOW_THREADS
    free(acc);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&wb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * Max pool over channel-last data: src [N, H, W, C], dst [N, Ho, Wo, C]; dst[n, yo, xo, c] = max of
 * src[n, yo*stride + ky - pad, xo*stride + kx - pad, c] over the taps inside the input, and `fill`
 * where the window reaches outside it.
 */
#define DEFINE_POOL(NAME, TYPE)                                                                          \
static MULTIVERSION void NAME(const TYPE *src, TYPE *dst, TYPE fill, int64_t N, int64_t H, int64_t W,    \
                              int64_t C, int64_t k, int64_t stride, int64_t pad)                         \
{                                                                                                        \
    const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;              \
    for (int64_t n = 0; n < N; n++)                                                                      \
    for (int64_t yo = 0; yo < Ho; yo++)                                                                  \
    for (int64_t xo = 0; xo < Wo; xo++) {                                                                \
        TYPE *d = dst + ((n * Ho + yo) * Wo + xo) * C;                                                   \
        int first = 1, padded = 0;                                                                       \
        for (int64_t ky = 0; ky < k; ky++) {                                                             \
            const int64_t yi = yo * stride + ky - pad;                                                   \
            if (yi < 0 || yi >= H) { padded = 1; continue; }                                             \
            for (int64_t kx = 0; kx < k; kx++) {                                                         \
                const int64_t xi = xo * stride + kx - pad;                                               \
                if (xi < 0 || xi >= W) { padded = 1; continue; }                                         \
                const TYPE *r = src + ((n * H + yi) * W + xi) * C;                                       \
                if (first) memcpy(d, r, C * sizeof(TYPE));                                               \
                else for (int64_t c = 0; c < C; c++) d[c] = r[c] > d[c] ? r[c] : d[c];                   \
                first = 0;                                                                               \
            }                                                                                            \
        }                                                                                                \
        if (first) for (int64_t c = 0; c < C; c++) d[c] = fill;                                          \
        else if (padded) for (int64_t c = 0; c < C; c++) d[c] = fill > d[c] ? fill : d[c];              \
    }                                                                                                    \
}

DEFINE_POOL(pool_u8, uint8_t)
DEFINE_POOL(pool_i32, int32_t)
DEFINE_POOL(pool_i64, int64_t)

/* pool_max(src, dst, kind, fill, N, H, W, C, k, stride, pad); kind: 1 uint8, 4 int32, 8 int64 */
static PyObject *py_pool_max(PyObject *self, PyObject *args)
{
    Py_buffer sb, db;
    long long kind, fill, N, H, W, C, k, stride, pad;
    if (!PyArg_ParseTuple(args, "y*w*LLLLLLLLL", &sb, &db, &kind, &fill, &N, &H, &W, &C, &k, &stride, &pad))
        return NULL;
    PyObject *result = NULL;
    const int64_t Ho = stride > 0 ? (H + 2 * pad - k) / stride + 1 : 0;
    const int64_t Wo = stride > 0 ? (W + 2 * pad - k) / stride + 1 : 0;
    if ((kind != 1 && kind != 4 && kind != 8) || stride <= 0 || Ho <= 0 || Wo <= 0 ||
        sb.len < N * H * W * C * kind || db.len < N * Ho * Wo * C * kind) {
        PyErr_SetString(PyExc_ValueError, "pool_max: inconsistent sizes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (kind == 1) pool_u8(sb.buf, db.buf, (uint8_t)fill, N, H, W, C, k, stride, pad);
    else if (kind == 4) pool_i32(sb.buf, db.buf, (int32_t)fill, N, H, W, C, k, stride, pad);
    else pool_i64(sb.buf, db.buf, (int64_t)fill, N, H, W, C, k, stride, pad);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&sb); PyBuffer_Release(&db);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * max |a| over a contiguous int32 / int64 buffer, one pass (as an unsigned magnitude: exact at the
 * type's minimum).
 */
#define DEFINE_ABSMAX(NAME, TYPE)                                                                        \
static MULTIVERSION uint64_t NAME(const TYPE *a, int64_t n)                                              \
{                                                                                                        \
    TYPE hi = 0, lo = 0;                                                                                 \
    for (int64_t i = 0; i < n; i++) {                                                                    \
        hi = a[i] > hi ? a[i] : hi;                                                                      \
        lo = a[i] < lo ? a[i] : lo;                                                                      \
    }                                                                                                    \
    uint64_t x = (uint64_t)hi, m = (uint64_t)0 - (uint64_t)lo;                                            \
    return x > m ? x : m;                                                                                \
}

DEFINE_ABSMAX(absmax_i32, int32_t)
DEFINE_ABSMAX(absmax_i64, int64_t)

/* abs_max(buf, itemsize) */
static PyObject *py_abs_max(PyObject *self, PyObject *args)
{
    Py_buffer b;
    long long isz;
    if (!PyArg_ParseTuple(args, "y*L", &b, &isz))
        return NULL;
    if (isz != 4 && isz != 8) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "abs_max: int32 or int64");
        return NULL;
    }
    uint64_t m;
    Py_BEGIN_ALLOW_THREADS
    m = isz == 4 ? absmax_i32(b.buf, b.len / 4) : absmax_i64(b.buf, b.len / 8);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(m);
}

/* ------------------------------------------------------------------------------------------------
 * Micro-benchmarks of the peak integer-add rate (bench/peak_int_add.py): `rounds` passes of int16
 * vector adds, (a) register-resident (NACC independent accumulators, the arithmetic limit) and (b) the
 * event kernel's pattern: rows of L int16 weights loaded from an L1/L2-resident table and added into
 * register accumulators. Returns the checksum (so nothing is optimised away); the caller times it and
 * counts rounds * adds per round.
 */
#define NACC 16
static MULTIVERSION int64_t add_registers(int64_t rounds)
{
    v32i16 acc[NACC], one;
    for (int i = 0; i < NACC; i++) acc[i] = (v32i16){0} + (int16_t)i;
    one = (v32i16){0} + 1;
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < NACC; i++) acc[i] += one;    /* NACC independent chains (checked: not folded) */
    int64_t sum = 0;
    int16_t tmp[LANES];
    for (int i = 0; i < NACC; i++) {
        store_v(tmp, acc[i]);
        for (int j = 0; j < LANES; j++) sum += tmp[j];
    }
    return sum;
}

static MULTIVERSION int64_t add_rows(const int16_t *table, int64_t rows, int64_t rounds)
{
    v32i16 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = (v32i16){0};
    int64_t row = 0;
    for (int64_t r = 0; r < rounds; r++) {
        const int16_t *w = table + row * 8 * LANES;
        for (int v = 0; v < 8; v++) acc[v] += load_v(w + v * LANES);
        row = row + 1 == rows ? 0 : row + 1;
    }
    int64_t sum = 0;
    int16_t tmp[LANES];
    for (int v = 0; v < 8; v++) {
        store_v(tmp, acc[v]);
        for (int j = 0; j < LANES; j++) sum += tmp[j];
    }
    return sum;
}

/* peak_adds(mode, rounds, table) -> (checksum, int16 additions performed); mode 0: registers, 1: rows */
static PyObject *py_peak_adds(PyObject *self, PyObject *args)
{
    long long mode, rounds;
    Py_buffer tb;
    if (!PyArg_ParseTuple(args, "LLy*", &mode, &rounds, &tb))
        return NULL;
    int64_t sum, adds;
    const int64_t rows = tb.len / (8 * LANES * 2);
    if (mode == 1 && rows < 1) {
        PyBuffer_Release(&tb);
        PyErr_SetString(PyExc_ValueError, "peak_adds: table too small");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (mode == 0) { sum = add_registers(rounds); adds = rounds * NACC * LANES; }
    else { sum = add_rows(tb.buf, rows, rounds); adds = rounds * 8 * LANES; }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&tb);
    return Py_BuildValue("LL", (long long)sum, (long long)adds);
}

/* same_bytes(a, b) -> whether two buffers hold the same bytes (memcmp) */
static PyObject *py_same_bytes(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b))
        return NULL;
    int same;
    Py_BEGIN_ALLOW_THREADS
    same = a.len == b.len && memcmp(a.buf, b.buf, a.len) == 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(same);
}

/* which clone the loader chose, for the benchmark report */
static PyObject *py_isa(PyObject *self, PyObject *noargs)
{
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bw")) return PyUnicode_FromString("avx512bw");
    if (__builtin_cpu_supports("avx2")) return PyUnicode_FromString("avx2");
    return PyUnicode_FromString("x86-64 baseline");
#else
    return PyUnicode_FromString("generic (no multi-versioning)");
#endif
}

static PyMethodDef methods[] = {
    {"conv_events", py_conv_events, METH_VARARGS, "event-driven convolution (see engine_kernels.py)"},
    {"lif", py_lif, METH_VARARGS, "integer LIF over T (see engine_kernels.py)"},
    {"nir_lif", py_nir_lif, METH_VARARGS, "one forward-Euler step of NIR's neurons in float64 (see lif.py)"},
    {"dense_conv", py_dense_conv, METH_VARARGS, "dense int32 convolution (see engine_kernels.py)"},
    {"pool_max", py_pool_max, METH_VARARGS, "channel-last max pool (see engine_kernels.py)"},
    {"abs_max", py_abs_max, METH_VARARGS, "max |a| of an int32 / int64 buffer"},
    {"same_bytes", py_same_bytes, METH_VARARGS, "memcmp of two buffers"},
    {"peak_adds", py_peak_adds, METH_VARARGS, "int16 add-rate micro-benchmark"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels run with"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__engine_kernels(void) { return PyModule_Create(&module); }
