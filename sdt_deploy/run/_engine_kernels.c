/* The integer engine's compiled kernels (sdt_deploy.run._engine_kernels), called by sdt_deploy/run/engine_kernels.py,
 * and the NIR interpreter's neuron step (float64, at the end of the integer part).
 *
 * Plain C over Python buffers (no numpy headers: the extension builds with setuptools and a C compiler
 * alone). Each function releases the GIL while it computes, and splits its work over `parts` threads of
 * its own team (below: pthreads that spin between rounds), each part writing only its own outputs. The
 * engine's arithmetic is exact integer arithmetic; the callers check beforehand that nothing can
 * overflow (see engine_kernels.py for the bounds each function relies on).
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
 * The team: the threads that split a kernel's work (`parts` > 1). team_run(fn, ctx, parts) runs
 * fn(ctx, i, parts) for every part i, part 0 on the calling thread, the others on workers that the
 * team starts on first use and keeps. A worker that has finished its part spins (pause, checking the
 * clock) for a while before it sleeps on a condition variable: a batch-1 layer takes 0.1-0.3 ms, and
 * waking a sleeping thread (what a Python thread pool does: 85 us a round trip, measured on the
 * project's VM) costs about as much as the layer saves. torch's OpenMP threads spin the same way.
 * SDT_ENGINE_SPIN_US sets the spin (default 1000 us; 0: sleep at once).
 *
 * One caller at a time: a second thread that finds the team busy runs every part itself (the same
 * results: each part writes only its own outputs). After fork() the child starts with no workers.
 */
#include <pthread.h>
#include <sched.h>
#include <time.h>

#define TEAM_MAX 8
typedef void (*team_fn)(void *ctx, int part, int parts);

static pthread_mutex_t team_busy = PTHREAD_MUTEX_INITIALIZER;   /* held by the caller of a round */
static pthread_mutex_t team_lock = PTHREAD_MUTEX_INITIALIZER;   /* guards the sleep / wake hand-shake */
static pthread_cond_t team_wake = PTHREAD_COND_INITIALIZER;
static int team_workers = 0;                  /* workers started (parts 1..team_workers) */
/* the latest round, as one word: its number (incremented for every round) << 8 | its number of parts.
 * One word, so that a worker not taking part in a round (part >= parts) cannot read the parts of the next
 * one with the number of this one, and then run the next one twice. */
static uint64_t team_post = 0;
static int team_sleeping = 0;                 /* workers waiting on team_wake */
static int team_left = 0;                     /* parts of the round not yet finished by the workers */
static team_fn team_task_fn;                  /* the round's task: written before its post, and not again */
static void *team_task_ctx;                   /* until every worker taking part has finished */
static int64_t team_spin_ns = 1000000;        /* set when the module loads */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* a worker: its part, and the last post it has seen (the one before its first round: the round its starter
 * is about to post may already have been posted when the thread starts) */
typedef struct { int part; uint64_t seen; } team_start;

static void *team_worker(void *arg)
{
    const int part = ((team_start *)arg)->part;
    uint64_t seen = ((team_start *)arg)->seen;
    free(arg);
    for (;;) {
        uint64_t now = __atomic_load_n(&team_post, __ATOMIC_ACQUIRE);
        if (now == seen) {
            const int64_t until = now_ns() + team_spin_ns;
            for (int i = 1; now == seen; i++) {
                cpu_relax();
                now = __atomic_load_n(&team_post, __ATOMIC_ACQUIRE);
                if ((i & 63) == 0 && now == seen && now_ns() >= until) {
                    pthread_mutex_lock(&team_lock);
                    __atomic_add_fetch(&team_sleeping, 1, __ATOMIC_SEQ_CST);
                    while ((now = __atomic_load_n(&team_post, __ATOMIC_SEQ_CST)) == seen)
                        pthread_cond_wait(&team_wake, &team_lock);
                    __atomic_sub_fetch(&team_sleeping, 1, __ATOMIC_SEQ_CST);
                    pthread_mutex_unlock(&team_lock);
                }
            }
        }
        seen = now;
        const int parts = (int)(now & 0xff);
        if (part < parts) {
            team_task_fn(team_task_ctx, part, parts);
            __atomic_sub_fetch(&team_left, 1, __ATOMIC_ACQ_REL);
        }
    }
    return NULL;
}

static void team_after_fork(void)
{
    pthread_mutex_init(&team_busy, NULL);
    pthread_mutex_init(&team_lock, NULL);
    pthread_cond_init(&team_wake, NULL);
    team_workers = 0;
    team_sleeping = 0;
    team_left = 0;
}

/* Start workers up to parts - 1 (called with team_busy held); returns how many there are. */
static int team_grow(int parts)
{
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, team_after_fork);
        registered = 1;
    }
    while (team_workers < parts - 1 && team_workers < TEAM_MAX - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        team_start *start = malloc(sizeof *start);
        if (!start) break;
        start->part = team_workers + 1;
        start->seen = __atomic_load_n(&team_post, __ATOMIC_ACQUIRE);
        const int ok = pthread_create(&t, &attr, team_worker, start) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) { free(start); break; }
        team_workers++;
    }
    return team_workers;
}

static void team_run(team_fn fn, void *ctx, int parts)
{
    if (parts > TEAM_MAX) parts = TEAM_MAX;
    if (parts <= 1 || pthread_mutex_trylock(&team_busy) != 0) {
        for (int i = 0; i < (parts > 1 ? parts : 1); i++) fn(ctx, i, parts > 1 ? parts : 1);
        return;
    }
    const int workers = team_grow(parts);
    if (parts > workers + 1) parts = workers + 1;     /* fewer threads could start: fewer, larger parts */
    if (parts > 1) {
        team_task_fn = fn;
        team_task_ctx = ctx;
        __atomic_store_n(&team_left, parts - 1, __ATOMIC_SEQ_CST);
        const uint64_t round = (__atomic_load_n(&team_post, __ATOMIC_RELAXED) >> 8) + 1;
        __atomic_store_n(&team_post, round << 8 | (uint64_t)parts, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&team_sleeping, __ATOMIC_SEQ_CST) > 0) {
            pthread_mutex_lock(&team_lock);
            pthread_cond_broadcast(&team_wake);
            pthread_mutex_unlock(&team_lock);
        }
    }
    fn(ctx, 0, parts);
    for (int i = 1; __atomic_load_n(&team_left, __ATOMIC_ACQUIRE) > 0; i++) {
        cpu_relax();
        if ((i & 1023) == 0) sched_yield();           /* a worker without a core: give it ours */
    }
    pthread_mutex_unlock(&team_busy);
}

/* part i of n items split into `parts` near-equal ranges: [*a, *b) */
static inline void team_range(int64_t n, int part, int parts, int64_t *a, int64_t *b)
{
    *a = n * part / parts;
    *b = n * (part + 1) / parts;
}

/* ------------------------------------------------------------------------------------------------
 * Event lists: for every input position pos in [p0, p1) of a channel-last spike tensor [n, H, W, C]
 * (uint8, nonzero = spike), the channels that spiked, in increasing order: chan[first[pos]] ..
 * chan[last[pos] - 1], written from chan[p0 * C] on (so that ranges of positions fill their lists in
 * parallel). chan must hold up to npos * C entries (untouched pages cost nothing).
 */
static void build_events_plain(const uint8_t *s, int64_t p0, int64_t p1, int64_t C, int64_t *first,
                               int64_t *last, int32_t *chan)
{
    int64_t e = p0 * C;
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *row = s + p * C;
        first[p] = e;
        for (int64_t c = 0; c < C; c++) {
            chan[e] = (int32_t)c;
            e += row[c] != 0;          /* branch-free compaction */
        }
        last[p] = e;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_EVENTS 1
/* The same lists, 16 channels at a time: a mask of the nonzero bytes (vptestmb) selects the channel
 * numbers that vpcompressd writes out; branch-free, the same entries in the same order. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void build_events_avx512(const uint8_t *s, int64_t p0, int64_t p1, int64_t C, int64_t *first,
                                int64_t *last, int32_t *chan)
{
    int64_t e = p0 * C;
    const __m512i step = _mm512_set1_epi32(16);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *row = s + p * C;
        __m512i idx = lanes;
        int64_t c = 0;
        first[p] = e;
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
        last[p] = e;
    }
}
#endif

static int events_avx512 = 0;          /* set when the module loads (threads read it) */

static void events_choose(void)
{
#ifdef HAVE_AVX512_EVENTS
    /* SDT_ENGINE_PLAIN_EVENTS set: the plain loop (the tests compare both) */
    events_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && getenv("SDT_ENGINE_PLAIN_EVENTS") == NULL;
#endif
}

static void build_events(const uint8_t *s, int64_t p0, int64_t p1, int64_t C, int64_t *first, int64_t *last,
                         int32_t *chan)
{
#ifdef HAVE_AVX512_EVENTS
    if (events_avx512) {
        build_events_avx512(s, p0, p1, C, first, last, chan);
        return;
    }
#endif
    build_events_plain(s, p0, p1, C, first, last, chan);
}

/* ------------------------------------------------------------------------------------------------
 * Event-driven convolution, output-stationary, for one tile of L = NV * 32 output channels.
 *
 * For every output position (n, yo, xo) of the rows r0 <= n * Ho + yo < r1, and every kernel tap (ky, kx) whose input (n, yo + ky - pad,
 * xo + kx - pad) lies inside the input, the weight rows wt[tap][c][0:L] of the channels c that spiked
 * there are added into int16 accumulators held in registers. Before an event could take any lane past
 * 2**15 - 1 (its running budget, the sum of mag[tap][c] = max over the tile's lanes of |w|, would
 * exceed it), the int16 accumulators are emptied into an int32 row: exact. The row plus bias[o0 + j]
 * (int32) is written to out[r * O + o0 + j] for j < min(L, O - o0). Returns the (event, tap) pairs
 * visited; *peak is raised to the largest |value| written (the engine's observed bound of the layer,
 * without a pass of its own over the output).
 */
#define DEFINE_CONV_TILE(NAME, NV, WT, LOAD)                                                                             \
static MULTIVERSION int64_t NAME(const int64_t *first, const int64_t *last, const int32_t *chan,       \
        int64_t r0, int64_t r1, int64_t H, int64_t W, int64_t C, int64_t k, int64_t pad, const WT *wt,   \
        const int32_t *mag, const int32_t *bias, int32_t *out, int64_t O, int64_t o0, uint64_t *peak)    \
{                                                                                                        \
    const int64_t L = NV * LANES, Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1;                    \
    const int64_t valid = (O - o0) < L ? (O - o0) : L;                                                   \
    int64_t pairs = 0;                                                                                   \
    int32_t hi = 0, lo = 0;                                                                              \
    int32_t row32[NV * LANES];                                                                           \
    int16_t row16[NV * LANES];                                                                           \
    for (int64_t r = r0; r < r1; r++) {                                                                  \
    const int64_t n = r / Ho, yo = r % Ho;                                                               \
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
                const int64_t e1 = last[pos];                                                            \
                pairs += e1 - first[pos];                                                                \
                for (int64_t e = first[pos]; e < e1; e++) {                                              \
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
    }}                                                                                                   \
    const uint64_t a = (uint64_t)(int64_t)hi, m = (uint64_t)(-(int64_t)lo);                              \
    if (a > *peak) *peak = a;                                                                            \
    if (m > *peak) *peak = m;                                                                            \
    return pairs;                                                                                        \
}

DEFINE_CONV_TILE(conv16_1, 1, int16_t, load_v)
DEFINE_CONV_TILE(conv16_2, 2, int16_t, load_v)
DEFINE_CONV_TILE(conv16_4, 4, int16_t, load_v)
DEFINE_CONV_TILE(conv16_8, 8, int16_t, load_v)


typedef struct {
    const uint8_t *s;
    const int16_t *wt;
    const int32_t *mag, *bias;
    int32_t *out, *chan;
    int64_t *first, *last;
    int64_t N, H, W, C, k, pad, L, O, tiles, Ho;
    int64_t pairs[TEAM_MAX];
    uint64_t peak[TEAM_MAX];
} conv_job;

static void conv_events_lists(void *ctx, int part, int parts)      /* a range of input positions */
{
    conv_job *j = ctx;
    int64_t a, b;
    team_range(j->N * j->H * j->W, part, parts, &a, &b);
    build_events(j->s, a, b, j->C, j->first, j->last, j->chan);
}

static void conv_events_rows(void *ctx, int part, int parts)       /* a range of output rows (n, yo) */
{
    conv_job *j = ctx;
    int64_t r0, r1, pairs = 0;
    uint64_t peak = 0;
    team_range(j->N * j->Ho, part, parts, &r0, &r1);
    for (int64_t t = 0; t < j->tiles && r0 < r1; t++) {
        const int64_t C = j->C, k = j->k, L = j->L;
        const int32_t *mag = j->mag + t * k * k * C;
        const int16_t *wt = j->wt + t * k * k * C * L;
        int64_t p;
#define CONV_ARGS j->first, j->last, j->chan, r0, r1, j->H, j->W, C, k, j->pad, wt, mag, j->bias, j->out, j->O, t * L, &peak
        switch (L) {
            case 32: p = conv16_1(CONV_ARGS); break;
            case 64: p = conv16_2(CONV_ARGS); break;
            case 128: p = conv16_4(CONV_ARGS); break;
            default: p = conv16_8(CONV_ARGS); break;
        }
#undef CONV_ARGS
        if (t == 0) pairs = p;           /* every tile visits the same (event, tap) pairs */
    }
    j->pairs[part] = pairs;
    j->peak[part] = peak;
}

/* conv_events(spikes, N, H, W, C, k, pad, wt, mag, L, O, bias, out, parts) -> (pairs, max |out| written)
 *   spikes: uint8 [N, H, W, C] contiguous; wt: int16 [ceil(O / L), k*k, C, L];
 *   mag: int32 [tiles, k*k, C]; bias: int32 [tiles * L] (zero past O); out: int32 [N, Ho, Wo, O] (written,
 *   not added to); parts: the team's threads (the input positions' event lists, then the output rows,
 *   split among them: every output row is summed by one thread, as on one). */
static PyObject *py_conv_events(PyObject *self, PyObject *args)
{
    Py_buffer sb, wb, mb, bb, ob;
    long long N, H, W, C, k, pad, L, O, parts;
    if (!PyArg_ParseTuple(args, "y*LLLLLLy*y*LLy*w*L", &sb, &N, &H, &W, &C, &k, &pad, &wb, &mb, &L, &O, &bb, &ob,
                          &parts))
        return NULL;
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, tiles = (O + L - 1) / L;
    PyObject *result = NULL;
    if ((L != 32 && L != 64 && L != 128 && L != 256) || Ho <= 0 || Wo <= 0 || wb.len < (Py_ssize_t)(tiles * k * k * C * L * 2) ||
        sb.len < N * H * W * C || mb.len < (Py_ssize_t)(tiles * k * k * C * 4) || bb.len < (Py_ssize_t)(tiles * L * 4) ||
        ob.len < (Py_ssize_t)(N * Ho * Wo * O * 4) || N < 0 || parts < 1) {
        PyErr_SetString(PyExc_ValueError, "conv_events: inconsistent sizes");
        goto done;
    }
    const int64_t npos = N * H * W;
    conv_job j = {sb.buf, wb.buf, mb.buf, bb.buf, ob.buf, NULL, NULL, NULL, N, H, W, C, k, pad, L, O, tiles, Ho,
                  {0}, {0}};
    j.first = malloc((npos > 0 ? npos : 1) * sizeof(int64_t));
    j.last = malloc((npos > 0 ? npos : 1) * sizeof(int64_t));
    j.chan = malloc((npos * C > 0 ? npos * C : 1) * sizeof(int32_t));
    if (!j.first || !j.last || !j.chan) { free(j.first); free(j.last); free(j.chan); PyErr_NoMemory(); goto done; }
    const int n = parts < TEAM_MAX ? (int)parts : TEAM_MAX;
    Py_BEGIN_ALLOW_THREADS
    team_run(conv_events_lists, &j, n);
    team_run(conv_events_rows, &j, n);
    Py_END_ALLOW_THREADS
    free(j.first);
    free(j.last);
    free(j.chan);
    int64_t pairs = 0;
    uint64_t peak = 0;
    for (int i = 0; i < TEAM_MAX; i++) {
        pairs += j.pairs[i];
        peak = j.peak[i] > peak ? j.peak[i] : peak;
    }
    result = Py_BuildValue("LK", (long long)pairs, (unsigned long long)peak);
done:
    PyBuffer_Release(&sb); PyBuffer_Release(&wb); PyBuffer_Release(&mb); PyBuffer_Release(&bb);
    PyBuffer_Release(&ob);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * Integer LIF over T steps for samples laid out [T, B, P] (P neurons per sample, contiguous), samples
 * b0..b1, neurons j0..j1 of each: x = X * M[j] (the input brought onto the neuron's grid: M[j] = 2**shift, M NULL for none),
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
        for (int64_t j = j0; j < j1; j++) {                                                              \
            LIF_STEP(TYPE, j, XV)                                                                        \
            if (ht) ht[j] = (int64_t)h;                                                                  \
            if (vt) vt[j] = V[j];                                                                        \
        }                                                                                                \
    } else {                                                                                             \
        for (int64_t j = j0; j < j1; j++) {                                                              \
            LIF_STEP(TYPE, j, XV)                                                                        \
        }                                                                                                \
    }

#define DEFINE_LIF(NAME, TYPE)                                                                           \
static MULTIVERSION lif_result NAME(const TYPE *X, const TYPE *theta, const TYPE *M, uint8_t *out,        \
                                    int64_t *H, TYPE *VT, TYPE *V, int64_t T, int64_t B, int64_t P,      \
                                    int64_t b0, int64_t b1, int64_t j0, int64_t j1)                      \
{                                                                                                        \
    TYPE hi = 0, lo = 0, xhi = 0, xlo = 0;                                                               \
    int64_t n = 0;                                                                                       \
    for (int64_t b = b0; b < b1; b++) {                                                                  \
        memset(V + j0, 0, (j1 - j0) * sizeof(TYPE));                                                     \
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

typedef struct {
    const void *X, *theta, *M;
    uint8_t *out;
    int64_t *H;
    void *VT;
    char *V;                            /* P neurons' state per part */
    int64_t isz, T, B, P;
    lif_result r[TEAM_MAX];
} lif_job;

/* part i: a range of samples where there are at least as many as parts, else a range of every sample's
 * neurons (a batch of one still splits; each neuron's state is its own either way) */
static void lif_part(void *ctx, int part, int parts)
{
    lif_job *j = ctx;
    int64_t b0 = 0, b1 = j->B, j0 = 0, j1 = j->P;
    if (j->B >= parts) team_range(j->B, part, parts, &b0, &b1);
    else team_range(j->P, part, parts, &j0, &j1);
    void *V = j->V + (int64_t)part * j->P * j->isz;
    if (j->isz == 4) j->r[part] = lif_i32(j->X, j->theta, j->M, j->out, j->H, j->VT, V, j->T, j->B, j->P, b0, b1, j0, j1);
    else j->r[part] = lif_i64(j->X, j->theta, j->M, j->out, j->H, j->VT, V, j->T, j->B, j->P, b0, b1, j0, j1);
}

/* lif(X, theta, M, out, H, VT, itemsize, T, B, P, parts) -> (max |H|, max |x|, spikes); M: the multipliers
 * (P of X's type) or an empty buffer for none; H: an int64 buffer of T * B * P, VT one of X's type, or
 * empty ones for no trace; parts: the team's threads */
static PyObject *py_lif(PyObject *self, PyObject *args)
{
    Py_buffer xb, tb, mb, ob, hb, vb;
    long long isz, T, B, P, parts;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*LLLLL", &xb, &tb, &mb, &ob, &hb, &vb, &isz, &T, &B, &P, &parts))
        return NULL;
    PyObject *result = NULL;
    if ((isz != 4 && isz != 8) || T < 0 || B < 0 || P < 0 || parts < 1 || xb.len < T * B * P * isz ||
        tb.len < P * isz || (mb.len != 0 && mb.len < P * isz) || ob.len < T * B * P ||
        (hb.len != 0 && hb.len < T * B * P * 8) || (vb.len != 0 && vb.len < T * B * P * isz)) {
        PyErr_SetString(PyExc_ValueError, "lif: inconsistent sizes");
        goto done;
    }
    const int n = parts < TEAM_MAX ? (int)parts : TEAM_MAX;
    lif_job j = {xb.buf, tb.buf, mb.len ? mb.buf : NULL, ob.buf, hb.len ? (int64_t *)hb.buf : NULL,
                 vb.len ? vb.buf : NULL, NULL, isz, T, B, P, {{0, 0, 0}}};
    j.V = malloc((P > 0 ? P : 1) * isz * n);
    if (!j.V) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    team_run(lif_part, &j, n);
    Py_END_ALLOW_THREADS
    free(j.V);
    lif_result r = {0, 0, 0};
    for (int i = 0; i < TEAM_MAX; i++) {
        r.peak_h = j.r[i].peak_h > r.peak_h ? j.r[i].peak_h : r.peak_h;
        r.peak_x = j.r[i].peak_x > r.peak_x ? j.r[i].peak_x : r.peak_x;
        r.spikes += j.r[i].spikes;
    }
    result = Py_BuildValue("KKL", (unsigned long long)r.peak_h, (unsigned long long)r.peak_x, (long long)r.spikes);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&tb); PyBuffer_Release(&mb); PyBuffer_Release(&ob);
    PyBuffer_Release(&hb); PyBuffer_Release(&vb);
    return result;
}

/* ------------------------------------------------------------------------------------------------
 * The residual addition on a common grid: out[o * P + j] = A[o * P + j] * MA[j] + B[o * P + j] * MB[j]
 * (MA / MB: per-neuron multipliers 2**shift, NULL for 1), for the rows o of `rows` rows of P neurons laid
 * out alike in A, B and out; computed in int64 and written in the arrays' type (the caller guarantees the
 * sum fits it). Returns max |out|: the engine's observed bound of the node, without a pass of its own.
 */
#define DEFINE_ADD(NAME, TYPE)                                                                           \
static MULTIVERSION uint64_t NAME(const TYPE *A, const TYPE *B, const TYPE *MA, const TYPE *MB,          \
                                  TYPE *out, int64_t r0, int64_t r1, int64_t P)                          \
{                                                                                                        \
    int64_t hi = 0, lo = 0;                                                                              \
    for (int64_t o = r0; o < r1; o++) {                                                                  \
        const TYPE *a = A + o * P, *b = B + o * P;                                                       \
        TYPE *y = out + o * P;                                                                           \
        for (int64_t j = 0; j < P; j++) {                                                                \
            const int64_t v = (int64_t)a[j] * (MA ? MA[j] : 1) + (int64_t)b[j] * (MB ? MB[j] : 1);      \
            y[j] = (TYPE)v;                                                                              \
            hi = v > hi ? v : hi;                                                                        \
            lo = v < lo ? v : lo;                                                                        \
        }                                                                                                \
    }                                                                                                    \
    const uint64_t x = (uint64_t)hi, m = (uint64_t)0 - (uint64_t)lo;                                      \
    return x > m ? x : m;                                                                                \
}

DEFINE_ADD(add_i32, int32_t)
DEFINE_ADD(add_i64, int64_t)

typedef struct {
    const void *A, *B, *MA, *MB;
    void *out;
    int64_t isz, rows, P;
    uint64_t peak[TEAM_MAX];
} add_job;

static void add_part(void *ctx, int part, int parts)
{
    add_job *j = ctx;
    int64_t r0, r1;
    team_range(j->rows, part, parts, &r0, &r1);
    j->peak[part] = j->isz == 4 ? add_i32(j->A, j->B, j->MA, j->MB, j->out, r0, r1, j->P)
                                : add_i64(j->A, j->B, j->MA, j->MB, j->out, r0, r1, j->P);
}

/* add_scaled(A, B, MA, MB, out, itemsize, rows, P, parts) -> max |out|; MA / MB: P multipliers of the
 * arrays' type, or empty buffers for none */
static PyObject *py_add_scaled(PyObject *self, PyObject *args)
{
    Py_buffer ab, bb, mab, mbb, ob;
    long long isz, rows, P, parts;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*LLLL", &ab, &bb, &mab, &mbb, &ob, &isz, &rows, &P, &parts))
        return NULL;
    PyObject *result = NULL;
    const int64_t n = rows * P * isz;
    if ((isz != 4 && isz != 8) || rows < 0 || P < 0 || parts < 1 || ab.len < n || bb.len < n || ob.len < n ||
        (mab.len != 0 && mab.len < P * isz) || (mbb.len != 0 && mbb.len < P * isz)) {
        PyErr_SetString(PyExc_ValueError, "add_scaled: inconsistent sizes");
        goto done;
    }
    add_job j = {ab.buf, bb.buf, mab.len ? mab.buf : NULL, mbb.len ? mbb.buf : NULL, ob.buf, isz, rows, P, {0}};
    Py_BEGIN_ALLOW_THREADS
    team_run(add_part, &j, parts < TEAM_MAX ? (int)parts : TEAM_MAX);
    Py_END_ALLOW_THREADS
    uint64_t peak = 0;
    for (int i = 0; i < TEAM_MAX; i++) peak = j.peak[i] > peak ? j.peak[i] : peak;
    result = PyLong_FromUnsignedLongLong(peak);
done:
    PyBuffer_Release(&ab); PyBuffer_Release(&bb); PyBuffer_Release(&mab); PyBuffer_Release(&mbb);
    PyBuffer_Release(&ob);
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
 * [N, Ho, Wo, O]; the caller guarantees sum |w| * max |x| + |bias| < 2**31 per output channel. Output rows
 * r0 <= n * Ho + yo < r1. acc: O int32 of scratch.
 */
static MULTIVERSION void dense_conv_i32(const int32_t *x, const int32_t *w, const int32_t *bias, int32_t *out,
        int32_t *acc, int64_t r0, int64_t r1,
        int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t k, int64_t stride, int64_t pad)
{
    const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    for (int64_t r = r0; r < r1; r++)
    for (int64_t xo = 0; xo < Wo; xo++) {
        const int64_t n = r / Ho, yo = r % Ho;
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

typedef struct {
    const int32_t *x, *w, *bias;
    int32_t *out, *acc;
    int64_t N, C, H, W, O, k, stride, pad, Ho;
} dense_job;

static void dense_part(void *ctx, int part, int parts)
{
    dense_job *j = ctx;
    int64_t r0, r1;
    team_range(j->N * j->Ho, part, parts, &r0, &r1);
    dense_conv_i32(j->x, j->w, j->bias, j->out, j->acc + part * j->O, r0, r1, j->N, j->C, j->H, j->W, j->O, j->k,
                   j->stride, j->pad);
}

/* dense_conv(x, w, bias, out, N, C, H, W, O, k, stride, pad, parts): parts split the output rows */
static PyObject *py_dense_conv(PyObject *self, PyObject *args)
{
    Py_buffer xb, wb, bb, ob;
    long long N, C, H, W, O, k, stride, pad, parts;
    if (!PyArg_ParseTuple(args, "y*y*y*w*LLLLLLLLL", &xb, &wb, &bb, &ob, &N, &C, &H, &W, &O, &k, &stride, &pad,
                          &parts))
        return NULL;
    PyObject *result = NULL;
    const int64_t Ho = stride > 0 ? (H + 2 * pad - k) / stride + 1 : 0;
    const int64_t Wo = stride > 0 ? (W + 2 * pad - k) / stride + 1 : 0;
    if (stride <= 0 || Ho <= 0 || Wo <= 0 || N < 0 || parts < 1 || xb.len < N * C * H * W * 4 ||
        wb.len < O * C * k * k * 4 || bb.len < O * 4 || ob.len < N * O * Ho * Wo * 4) {
        PyErr_SetString(PyExc_ValueError, "dense_conv: inconsistent sizes");
        goto done;
    }
    const int n = parts < TEAM_MAX ? (int)parts : TEAM_MAX;
    dense_job j = {xb.buf, wb.buf, bb.buf, ob.buf, NULL, N, C, H, W, O, k, stride, pad, Ho};
    j.acc = malloc((O > 0 ? O : 1) * n * sizeof(int32_t));
    if (!j.acc) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    team_run(dense_part, &j, n);
    Py_END_ALLOW_THREADS
    free(j.acc);
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

typedef struct { const char *a; int64_t n, isz; uint64_t m[TEAM_MAX]; } absmax_job;

static void absmax_part(void *ctx, int part, int parts)
{
    absmax_job *j = ctx;
    int64_t lo, hi;
    team_range(j->n, part, parts, &lo, &hi);
    j->m[part] = j->isz == 4 ? absmax_i32((const int32_t *)j->a + lo, hi - lo) : absmax_i64((const int64_t *)j->a + lo, hi - lo);
}

/* abs_max(buf, itemsize, parts) */
static PyObject *py_abs_max(PyObject *self, PyObject *args)
{
    Py_buffer b;
    long long isz, parts;
    if (!PyArg_ParseTuple(args, "y*LL", &b, &isz, &parts))
        return NULL;
    if ((isz != 4 && isz != 8) || parts < 1) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "abs_max: int32 or int64, parts >= 1");
        return NULL;
    }
    absmax_job j = {b.buf, b.len / isz, isz, {0}};
    Py_BEGIN_ALLOW_THREADS
    team_run(absmax_part, &j, parts < TEAM_MAX ? (int)parts : TEAM_MAX);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    uint64_t m = 0;
    for (int i = 0; i < TEAM_MAX; i++) m = j.m[i] > m ? j.m[i] : m;
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

typedef struct { const char *a, *b; int64_t n; int differ[TEAM_MAX]; } compare_job;

static void compare_part(void *ctx, int part, int parts)
{
    compare_job *j = ctx;
    int64_t lo, hi;
    team_range(j->n, part, parts, &lo, &hi);
    j->differ[part] = hi > lo && memcmp(j->a + lo, j->b + lo, hi - lo) != 0;
}

/* same_bytes(a, b, parts) -> whether two buffers hold the same bytes (memcmp; parts split the bytes) */
static PyObject *py_same_bytes(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    long long parts;
    if (!PyArg_ParseTuple(args, "y*y*L", &a, &b, &parts))
        return NULL;
    int same = a.len == b.len;
    if (same) {
        compare_job j = {a.buf, b.buf, a.len, {0}};
        Py_BEGIN_ALLOW_THREADS
        team_run(compare_part, &j, parts < 1 ? 1 : parts < TEAM_MAX ? (int)parts : TEAM_MAX);
        Py_END_ALLOW_THREADS
        for (int i = 0; i < TEAM_MAX; i++) same &= !j.differ[i];
    }
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
    {"add_scaled", py_add_scaled, METH_VARARGS, "the residual addition on a common grid (see engine_kernels.py)"},
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

PyMODINIT_FUNC PyInit__engine_kernels(void)
{
    const char *spin = getenv("SDT_ENGINE_SPIN_US");
    if (spin) team_spin_ns = (int64_t)atoll(spin) * 1000;
    events_choose();
    return PyModule_Create(&module);
}
