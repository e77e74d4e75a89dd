/* CPU kernels of the cpu platform: float32 MoE experts, small linears, paged decode attention
 * and the per-row ops of a decoder layer. Built with the system C compiler on first use (see
 * cpu_kernels.py) and called through ctypes on raw tensor pointers; no torch headers.
 *
 * moe_experts: rows grouped by expert in C (a counting sort), each expert's rows run through
 *   gate/up -> silu(gate)*up -> down; a few rows (decode) in blocks of up to 8 that stream
 *   every weight row once per block, many rows (prefill) in chunks of 48 through a
 *   register-blocked 6x16 GEMM; a token's k outputs are summed in ascending expert order (as
 *   the Hugging Face reference loop does). Weights are input-major: w13 [E, H, 2I], w2 [E, I, H].
 *   Both GEMMs accumulate over k in order with one FMA per term, so they agree bit for bit.
 * linear: x @ w^T for a few rows, each weight row read once (MKL packs the weights on
 *   every call, which costs more than the product at decode sizes).
 * decode_attention: one query token per sequence against keys read straight from the paged
 *   cache [blocks, block_size, kv_heads, D] (no gather copy), exact two-pass softmax.
 * write_kv: new keys and values into their paged-cache slots.
 * route_topk: softmax routing with top-k selection and renormalisation.
 * rms_norm, rope: the per-row float32 arithmetic of RMSNorm and neox rotary embedding,
 *   reading strided heads so q/k views of the fused qkv need no copy first.
 * decode_layer: a whole MoE decoder layer of a decode step, calling the kernels above in
 *   the order the layer's modules do (see fused_layer.py).
 * sample_race: one token a row drawn from softmax(logits / T) in one pass, by an exponential
 *   race on counter-based (Philox) noise made in registers.
 * apply_bitmask: a grammar's packed token bitmask applied to rows of the logits in place (-inf where
 *   a bit is 0), eight tokens a store, words whose 32 tokens are all allowed skipped. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* e^x for 8 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), about 1 ulp. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* Y[r, :] += x[r, k] * W[k, :] + x[r, k+1] * W[k+1, :] for r < R (R <= 8), N a multiple of 8.
 * Two weight rows stream through per call, once for all R rows; the outputs stay in L1. */
static inline __attribute__((always_inline)) void axpy2(const float *X, int ldx, int k, const float *w0,
                                                         const float *w1, float *Y, int ldy, int N, const int R) {
    __m256 a[8], b[8];
    for (int r = 0; r < R; r++) {
        a[r] = _mm256_broadcast_ss(X + r * ldx + k);
        b[r] = _mm256_broadcast_ss(X + r * ldx + k + 1);
    }
    for (int j = 0; j < N; j += 8) {
        if (!(j & 15)) {   /* the rows 8 ahead: the hardware prefetcher alone leaves bandwidth unused */
            _mm_prefetch((const char *)(w0 + 8 * (size_t)N + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + 8 * (size_t)N + j), _MM_HINT_T0);
        }
        __m256 u = _mm256_loadu_ps(w0 + j), v = _mm256_loadu_ps(w1 + j);
        for (int r = 0; r < R; r++) {
            float *y = Y + r * ldy + j;
            _mm256_storeu_ps(y, _mm256_fmadd_ps(b[r], v, _mm256_fmadd_ps(a[r], u, _mm256_loadu_ps(y))));
        }
    }
}

/* Y[r, :] += x[r, k] * W[k, :] for r < R (R <= 4), N a multiple of 16: one weight row streams
 * through per call, in order, for all R rows (for few rows a single sequential stream reads
 * faster than two interleaved ones; the outputs stay in L1). */
static inline __attribute__((always_inline)) void axpy1(const float *X, int ldx, int k, const float *w0,
                                                         float *Y, int ldy, int N, const int R) {
    __m256 a[4];
    for (int r = 0; r < R; r++) a[r] = _mm256_broadcast_ss(X + r * ldx + k);
    for (int j = 0; j < N; j += 16) {
        _mm_prefetch((const char *)(w0 + 8 * (size_t)N + j), _MM_HINT_T0);
        __m256 u = _mm256_loadu_ps(w0 + j), u2 = _mm256_loadu_ps(w0 + j + 8);
        for (int r = 0; r < R; r++) {
            float *y = Y + r * ldy + j;
            _mm256_storeu_ps(y, _mm256_fmadd_ps(a[r], u, _mm256_loadu_ps(y)));
            _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(a[r], u2, _mm256_loadu_ps(y + 8)));
        }
    }
}

#define ROWS 8   /* rows of one expert that share a pass over its weights */

/* Y[R, N] = X[R, K] @ W[K, N] for R <= ROWS, K even, N a multiple of 16: W streams once, row by row. */
static void small_gemm(const float *X, int ldx, const float *W, int N, float *Y, int ldy, int K, int R) {
    for (int r = 0; r < R; r++) memset(Y + (size_t)r * ldy, 0, sizeof(float) * N);
    if (R <= 4) {
        for (int k = 0; k < K; k++) {
            const float *w0 = W + (size_t)k * N;
            switch (R) {
                case 1: axpy1(X, ldx, k, w0, Y, ldy, N, 1); break;
                case 2: axpy1(X, ldx, k, w0, Y, ldy, N, 2); break;
                case 3: axpy1(X, ldx, k, w0, Y, ldy, N, 3); break;
                default: axpy1(X, ldx, k, w0, Y, ldy, N, 4); break;
            }
        }
        return;
    }
    for (int k = 0; k < K; k += 2) {
        const float *w0 = W + (size_t)k * N, *w1 = w0 + N;
        switch (R) {
            case 5: axpy2(X, ldx, k, w0, w1, Y, ldy, N, 5); break;
            case 6: axpy2(X, ldx, k, w0, w1, Y, ldy, N, 6); break;
            case 7: axpy2(X, ldx, k, w0, w1, Y, ldy, N, 7); break;
            default: axpy2(X, ldx, k, w0, w1, Y, ldy, N, 8); break;
        }
    }
}

/* Y[R, 16] = X[R, K] @ W[K, 16] (W row stride ldw) for R <= 6 rows: the 12 accumulators stay
 * in registers over the whole K loop, each term one FMA in k order. */
static inline __attribute__((always_inline)) void tile6x16(const float *X, int ldx, const float *W, int ldw,
                                                            float *Y, int ldy, int K, const int R) {
    __m256 c0[6], c1[6];
    for (int r = 0; r < R; r++) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(W + (size_t)k * ldw), b1 = _mm256_loadu_ps(W + (size_t)k * ldw + 8);
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_broadcast_ss(X + r * ldx + k);
            c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(Y + r * ldy, c0[r]);
        _mm256_storeu_ps(Y + r * ldy + 8, c1[r]);
    }
}

/* Y[R, N] = X[R, K] @ W[K, N] for many rows, N a multiple of 16: each 16-column panel of W is
 * copied into `panel` (K x 16, contiguous, so it stays in L1) and every 6-row tile of X
 * passes over it. */
static void tiled_gemm(const float *X, int ldx, const float *W, int N, float *Y, int ldy, int K, int R,
                       float *panel) {
    for (int j = 0; j < N; j += 16) {
        for (int k = 0; k < K; k++) {
            _mm256_storeu_ps(panel + 16 * k, _mm256_loadu_ps(W + (size_t)k * N + j));
            _mm256_storeu_ps(panel + 16 * k + 8, _mm256_loadu_ps(W + (size_t)k * N + j + 8));
        }
        for (int r = 0; r < R; r += 6) {
            const float *x = X + (size_t)r * ldx;
            float *y = Y + (size_t)r * ldy + j;
            switch (R - r < 6 ? R - r : 6) {
                case 1: tile6x16(x, ldx, panel, 16, y, ldy, K, 1); break;
                case 2: tile6x16(x, ldx, panel, 16, y, ldy, K, 2); break;
                case 3: tile6x16(x, ldx, panel, 16, y, ldy, K, 3); break;
                case 4: tile6x16(x, ldx, panel, 16, y, ldy, K, 4); break;
                case 5: tile6x16(x, ldx, panel, 16, y, ldy, K, 5); break;
                default: tile6x16(x, ldx, panel, 16, y, ldy, K, 6); break;
            }
        }
    }
}

#define CHUNK 96   /* rows of one expert per task when it has many (prefill) */

/* Row padding of the per-thread buffers: rows 4 KiB apart would alias in the store-to-load
 * forwarding check (a load of row r+2 waits on the store to row r). */
#define PAD 16

/* floats of per-thread work space moe_experts needs */
int64_t moe_work_floats(int64_t H, int64_t I) {
    return CHUNK * (2 * (H + PAD) + (2 * I + PAD) + (I + PAD)) + 16 * (H > I ? H : I);
}

/* out[T, H] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over ids >= 0.
 * scratch: T*K*H + threads * moe_work_floats(H, I) floats. Returns 0. */
int moe_experts(const float *x, int64_t T, int64_t H, const int64_t *ids, const float *weights, int64_t K,
                const float *w13, const float *w2, int64_t E, int64_t I, float *out, float *scratch,
                int threads) {
    int64_t n = T * K;
    int64_t *count = calloc(E + 1, sizeof(int64_t)), *rows = malloc(sizeof(int64_t) * (n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) if (ids[i] >= 0) count[ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) count[e + 1] += count[e];
    int64_t *fill = malloc(sizeof(int64_t) * (E + 1));
    memcpy(fill, count, sizeof(int64_t) * (E + 1));
    for (int64_t i = 0; i < n; i++) if (ids[i] >= 0) rows[fill[ids[i]]++] = i;   /* (t, k) pairs by expert */
    /* tasks: (expert, first row, rows): blocks of ROWS for experts with few rows, CHUNK for many */
    int64_t ntask = 0, *task = malloc(sizeof(int64_t) * 3 * (n + E + 1));
    for (int64_t e = 0; e < E; e++) {
        int64_t len = count[e + 1] - count[e], step = len >= 2 * ROWS ? CHUNK : ROWS;
        for (int64_t s = count[e]; s < count[e + 1]; s += step) {
            task[3 * ntask] = e; task[3 * ntask + 1] = s;
            task[3 * ntask + 2] = count[e + 1] - s < step ? count[e + 1] - s : step;
            ntask++;
        }
    }
    float *buf = scratch, *work = scratch + n * H;
    const int64_t lx = H + PAD, lh = 2 * I + PAD, la = I + PAD;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t tk = 0; tk < ntask; tk++) {
#ifdef _OPENMP
        float *xs = work + (size_t)omp_get_thread_num() * moe_work_floats(H, I);
#else
        float *xs = work;
#endif
        int64_t e = task[3 * tk], s = task[3 * tk + 1];
        int R = (int)task[3 * tk + 2];
        float *h = xs + CHUNK * lx, *act = h + CHUNK * lh, *y = act + CHUNK * la, *panel = y + CHUNK * lx;
        const float *we13 = w13 + (size_t)e * H * 2 * I, *we2 = w2 + (size_t)e * I * H;
        for (int r = 0; r < R; r++) memcpy(xs + r * lx, x + (rows[s + r] / K) * H, sizeof(float) * H);
        if (R > ROWS) tiled_gemm(xs, (int)lx, we13, (int)(2 * I), h, (int)lh, (int)H, R, panel);
        else small_gemm(xs, (int)lx, we13, (int)(2 * I), h, (int)lh, (int)H, R);
        for (int r = 0; r < R; r++)
            for (int64_t i = 0; i < I; i += 8) {   /* silu(gate) * up */
                __m256 g = _mm256_loadu_ps(h + r * lh + i), u = _mm256_loadu_ps(h + r * lh + I + i);
                __m256 sg = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
                _mm256_storeu_ps(act + r * la + i, _mm256_mul_ps(sg, u));
            }
        if (R > ROWS) tiled_gemm(act, (int)la, we2, (int)H, y, (int)lx, (int)I, R, panel);
        else small_gemm(act, (int)la, we2, (int)H, y, (int)lx, (int)I, R);
        for (int r = 0; r < R; r++) {
            float wt = weights[rows[s + r]];
            float *dst = buf + rows[s + r] * H;
            for (int64_t j = 0; j < H; j++) dst[j] = y[r * lx + j] * wt;
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
        int64_t order[64];
        int m = 0;
        for (int64_t k = 0; k < K; k++) {           /* this token's experts, ascending (K <= 64: the caller checks) */
            if (ids[t * K + k] < 0) continue;
            int p = m++;
            while (p > 0 && ids[t * K + order[p - 1]] > ids[t * K + k]) { order[p] = order[p - 1]; p--; }
            order[p] = k;
        }
        float *o = out + t * H;
        if (!m) { memset(o, 0, sizeof(float) * H); continue; }
        memcpy(o, buf + (t * K + order[0]) * H, sizeof(float) * H);
        for (int j = 1; j < m; j++) {
            const float *src = buf + (t * K + order[j]) * H;
            for (int64_t c = 0; c < H; c++) o[c] += src[c];
        }
    }
    free(count); free(rows); free(fill); free(task);
    return 0;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[B, Hq, D] = softmax(q k^T * scale) v per sequence over lens[b] cached tokens.
 * k/v cache: [blocks, bs, KVH, D]; tables: [B, W] block ids. Each cached token's keys and
 * values (all KV heads, contiguous) are read once per sequence. scratch: threads * Hq * max_len. */
int decode_attention(const float *q, const float *kc, const float *vc, const int64_t *tables, const int64_t *lens,
                     int64_t B, int64_t Hq, int64_t KVH, int64_t D, int64_t bs, int64_t W, float scale,
                     float *out, float *scratch, int64_t max_len, int threads) {
    int64_t G = Hq / KVH, row = KVH * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        int64_t L = lens[b];
#ifdef _OPENMP
        float *p = scratch + (size_t)omp_get_thread_num() * Hq * max_len;
#else
        float *p = scratch;
#endif
        const int64_t *tab = tables + b * W;
        const float *qb = q + b * Hq * D;
        for (int64_t t = 0; t < L; t++) {
            const float *k = kc + (tab[t / bs] * bs + t % bs) * row;
            for (int64_t h = 0; h < Hq; h++) {
                const float *kh = k + (h / G) * D, *qh = qb + h * D;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + d), acc);
                p[h * L + t] = hsum(acc) * scale;
            }
        }
        float *ob = out + b * Hq * D;
        memset(ob, 0, sizeof(float) * Hq * D);
        for (int64_t h = 0; h < Hq; h++) {
            float *ph = p + h * L, mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) mx = ph[t] > mx ? ph[t] : mx;
            __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_setzero_ps();
            int64_t t = 0;
            for (; t + 8 <= L; t += 8) {
                __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(ph + t), vmx));
                _mm256_storeu_ps(ph + t, e);
                vs = _mm256_add_ps(vs, e);
            }
            sum = hsum(vs);
            for (; t < L; t++) { ph[t] = expf(ph[t] - mx); sum += ph[t]; }
            float inv = 1.0f / sum;
            for (t = 0; t < L; t++) ph[t] *= inv;
        }
        for (int64_t t = 0; t < L; t++) {
            const float *v = vc + (tab[t / bs] * bs + t % bs) * row;
            for (int64_t h = 0; h < Hq; h++) {
                const float *vh = v + (h / G) * D;
                float *o = ob + h * D;
                __m256 pw = _mm256_set1_ps(p[h * L + t]);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pw, _mm256_loadu_ps(vh + d), _mm256_loadu_ps(o + d)));
            }
        }
    }
    return 0;
}

/* out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for small M: each weight row is read once, from
 * memory into L1, and dotted with every row of x; threads split the N rows. K % 8 == 0. */
int linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *out,
           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const float *wn = w + n * K;
        float b = bias ? bias[n] : 0.0f;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) {
                __m256 v = _mm256_loadu_ps(wn + k);
                a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x0 + k), a0);
                a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x1 + k), a1);
                a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x2 + k), a2);
                a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x3 + k), a3);
            }
            out[m * N + n] = hsum(a0) + b; out[(m + 1) * N + n] = hsum(a1) + b;
            out[(m + 2) * N + n] = hsum(a2) + b; out[(m + 3) * N + n] = hsum(a3) + b;
        }
        for (; m < M; m++) {
            const float *xm = x + m * K;
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(wn + k), _mm256_loadu_ps(xm + k), a);
            out[m * N + n] = hsum(a) + b;
        }
    }
    return 0;
}

/* RMSNorm of n0 x n1 rows of D floats (row (i, j) at x + i*s0 + j*s1) into contiguous out:
 * out = w * (x / sqrt(mean(x^2) + eps)). D % 8 == 0. */
int rms_norm(const float *x, int64_t n0, int64_t n1, int64_t s0, int64_t s1, int64_t D, const float *w,
             float eps, float *out) {
    for (int64_t i = 0; i < n0; i++)
        for (int64_t j = 0; j < n1; j++) {
            const float *xr = x + i * s0 + j * s1;
            float *o = out + (i * n1 + j) * D;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) { __m256 v = _mm256_loadu_ps(xr + d); acc = _mm256_fmadd_ps(v, v, acc); }
            __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / (float)D + eps));
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(xr + d), r)));
        }
    return 0;
}

/* Neox rotary embedding of T x H heads of D floats (head (t, h) at x + t*s0 + h*s1) into
 * contiguous out, with cos/sin tables [positions, D] (each half repeated). D % 16 == 0. */
int rope(const float *x, int64_t T, int64_t H, int64_t s0, int64_t s1, int64_t D, const int64_t *pos,
         const float *cos_t, const float *sin_t, float *out) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * D, *sn = sin_t + pos[t] * D;
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + t * s0 + h * s1;
            float *o = out + (t * H + h) * D;
            for (int64_t i = 0; i < half; i += 8) {
                __m256 x1 = _mm256_loadu_ps(xr + i), x2 = _mm256_loadu_ps(xr + half + i);
                _mm256_storeu_ps(o + i, _mm256_fnmadd_ps(x2, _mm256_loadu_ps(sn + i), _mm256_mul_ps(x1, _mm256_loadu_ps(c + i))));
                _mm256_storeu_ps(o + half + i, _mm256_fmadd_ps(x1, _mm256_loadu_ps(sn + half + i),
                                                               _mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i))));
            }
        }
    }
    return 0;
}

/* Router: softmax over E logits per token, the K largest probabilities (ties to the lower
 * expert id), renormalised over those K when renorm is set. */
int route_topk(const float *logits, int64_t T, int64_t E, int64_t K, int renorm, float *weights, int64_t *ids) {
    float *p = malloc(sizeof(float) * E);
    for (int64_t t = 0; t < T; t++) {
        const float *row = logits + t * E;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) mx = row[e] > mx ? row[e] : mx;
        for (int64_t e = 0; e < E; e++) { p[e] = expf(row[e] - mx); sum += p[e]; }
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float picked = 0.0f;
        for (int64_t j = 0; j < K; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            ids[t * K + j] = best;
            weights[t * K + j] = p[best];
            picked += p[best];
            p[best] = -1.0f;
        }
        if (renorm)
            for (int64_t j = 0; j < K; j++) weights[t * K + j] /= picked;
    }
    free(p);
    return 0;
}

/* The new tokens' keys and values ([T, row] each) into their cache slots. */
int write_kv(const float *k, const float *v, int64_t T, int64_t row, const int64_t *slots, float *kc, float *vc) {
    for (int64_t t = 0; t < T; t++) {
        memcpy(kc + slots[t] * row, k + t * row, sizeof(float) * row);
        memcpy(vc + slots[t] * row, v + t * row, sizeof(float) * row);
    }
    return 0;
}

/* One decoder layer of a decode step (T tokens, one per sequence), in place on the residual
 * stream x [T, Hd]: the same kernels, in the same order, as the layer's modules call one by
 * one, without returning to Python in between:
 *   h = rms(x) ln1; qkv = h Wqkv^T (+b); q, k = rope(q_norm(q), k_norm(k)); cache <- k, v;
 *   x += attention(q) Wo^T; h = rms(x) ln2; weights, ids = topk(softmax(h Wgate^T));
 *   x += experts(h).
 * qn/kn NULL: no q/k norm. scratch: decode_layer_floats(...) floats. */
int64_t decode_layer_floats(int64_t T, int64_t Hd, int64_t Hq, int64_t KVH, int64_t D, int64_t E, int64_t K,
                            int64_t I, int64_t max_len, int threads) {
    int64_t row = (Hq + 2 * KVH) * D;
    return 3 * T * Hd + T * row + 2 * T * (Hq + KVH) * D + T * KVH * D + T * Hq * D + threads * Hq * max_len
           + T * E + T * K + 2 * T * K + T * K * Hd + threads * moe_work_floats(Hd, I) + 64;
}

int decode_layer(float *x, int64_t T, int64_t Hd, const float *ln1, const float *ln2, float eps,
                 const float *wqkv, const float *bqkv, int64_t Hq, int64_t KVH, int64_t D,
                 const float *qn, const float *kn, const int64_t *pos, const float *cos_t, const float *sin_t,
                 float *kc, float *vc, const int64_t *slots, const int64_t *tables, const int64_t *lens,
                 int64_t bs, int64_t W, float scale, const float *wo, const float *wgate, int64_t E, int64_t K,
                 int renorm, const float *w13, const float *w2, int64_t I, float *scratch, int threads) {
    int64_t row = (Hq + 2 * KVH) * D, max_len = W * bs;
    float *h = scratch, *o = h + T * Hd, *y = o + T * Hd, *qkv = y + T * Hd;
    float *qn_out = qkv + T * row, *kn_out = qn_out + T * Hq * D;
    float *qr = kn_out + T * KVH * D, *kr = qr + T * Hq * D, *vv = kr + T * KVH * D;
    float *att = vv + T * KVH * D, *att_scratch = att + T * Hq * D;
    float *logits = att_scratch + threads * Hq * max_len, *wts = logits + T * E;
    int64_t *ids = (int64_t *)(((uintptr_t)(wts + T * K) + 7) & ~(uintptr_t)7);
    float *moe_scratch = (float *)(ids + T * K);

    rms_norm(x, T, 1, Hd, 0, Hd, ln1, eps, h);
    linear(h, T, Hd, wqkv, row, bqkv, qkv, threads);
    const float *q = qkv, *k = qkv + Hq * D;
    int64_t qs0 = row, qs1 = D, ks0 = row, ks1 = D;
    if (qn) {
        rms_norm(qkv, T, Hq, row, D, D, qn, eps, qn_out);
        rms_norm(qkv + Hq * D, T, KVH, row, D, D, kn, eps, kn_out);
        q = qn_out; k = kn_out; qs0 = Hq * D; ks0 = KVH * D;
    }
    rope(q, T, Hq, qs0, qs1, D, pos, cos_t, sin_t, qr);
    rope(k, T, KVH, ks0, ks1, D, pos, cos_t, sin_t, kr);
    for (int64_t t = 0; t < T; t++) memcpy(vv + t * KVH * D, qkv + t * row + (Hq + KVH) * D, sizeof(float) * KVH * D);
    write_kv(kr, vv, T, KVH * D, slots, kc, vc);
    decode_attention(qr, kc, vc, tables, lens, T, Hq, KVH, D, bs, W, scale, att, att_scratch, max_len, threads);
    linear(att, T, Hq * D, wo, Hd, NULL, o, threads);
    for (int64_t i = 0; i < T * Hd; i++) x[i] += o[i];
    rms_norm(x, T, 1, Hd, 0, Hd, ln2, eps, h);
    linear(h, T, Hd, wgate, E, NULL, logits, threads);
    route_topk(logits, T, E, K, renorm, wts, ids);
    moe_experts(h, T, Hd, ids, wts, K, w13, w2, E, I, y, moe_scratch, threads);
    for (int64_t i = 0; i < T * Hd; i++) x[i] += y[i];
    return 0;
}

/* ln x for 8 lanes of positive normal floats: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
 * ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to s^9 (error < 1e-9). */
static inline __m256 log256(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
    __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(e, 23)));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one)), s2 = _mm256_mul_ps(s, s);
    __m256 p = _mm256_fmadd_ps(s2, _mm256_set1_ps(1.0f / 9), _mm256_set1_ps(1.0f / 7));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3));
    p = _mm256_fmadd_ps(p, s2, one);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(e), _mm256_set1_ps(0.69314718056f), _mm256_mul_ps(_mm256_add_ps(s, s), p));
}

/* The high 32 bits of a * m for 8 unsigned lanes (m broadcast). */
/* Philox4x32-10 (Salmon et al., SC'11) of counters (c0[n], 0, 0, 0) under key (k0, k1), for NB
 * independent sets of 8 lanes at once (their multiplies overlap); r[4 n + i]: output i of set n. Each
 * 32 x 32 -> 64-bit product is two even-lane multiplies. */
#define NB 4
static inline __attribute__((always_inline)) void philox8(const __m256i *ctr, uint32_t k0, uint32_t k1,
                                                          __m256i *r) {
    const __m256i ma = _mm256_set1_epi32((int)0xD2511F53), mb = _mm256_set1_epi32((int)0xCD9E8D57);
    __m256i c0[NB], c1[NB], c2[NB], c3[NB];
    for (int n = 0; n < NB; n++) {      /* round 1, with c1 = c2 = c3 = 0 */
        __m256i pe = _mm256_mul_epu32(ctr[n], ma), po = _mm256_mul_epu32(_mm256_srli_epi64(ctr[n], 32), ma);
        c1[n] = _mm256_setzero_si256();
        c3[n] = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
        c2[n] = _mm256_xor_si256(_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA), _mm256_set1_epi32((int)k1));
        c0[n] = _mm256_set1_epi32((int)k0);
    }
    for (int i = 1; i < 10; i++) {
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
        for (int n = 0; n < NB; n++) {
            __m256i ae = _mm256_mul_epu32(c0[n], ma), ao = _mm256_mul_epu32(_mm256_srli_epi64(c0[n], 32), ma);
            __m256i be = _mm256_mul_epu32(c2[n], mb), bo = _mm256_mul_epu32(_mm256_srli_epi64(c2[n], 32), mb);
            __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(ae, 32), ao, 0xAA);
            __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(be, 32), bo, 0xAA);
            c0[n] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[n]), _mm256_set1_epi32((int)k0));
            c2[n] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[n]), _mm256_set1_epi32((int)k1));
            c1[n] = _mm256_blend_epi32(be, _mm256_slli_epi64(bo, 32), 0xAA);
            c3[n] = _mm256_blend_epi32(ae, _mm256_slli_epi64(ao, 32), 0xAA);
        }
    }
    for (int n = 0; n < NB; n++) {
        r[4 * n] = c0[n]; r[4 * n + 1] = c1[n]; r[4 * n + 2] = c2[n]; r[4 * n + 3] = c3[n];
    }
}

/* The race variable v = (u + 1/2) 2^-32 of 32 random bits u (by their top 31 bits), below 1. */
static inline __m256 race_uniform(__m256i u) {
    __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(u, 1)), _mm256_set1_ps(0x1p-31f),
                               _mm256_set1_ps(0x1p-32f));
    return _mm256_min_ps(v, _mm256_set1_ps(0x1.fffffep-1f));
}

/* x * inv_t - ln E for 8 tokens, E = -ln(1 - v) ~ Exp(1), by its series v + v^2/2 + v^3/3 below
 * v = 1/64 where 1 - v would round. The winners of the race are the tokens with small E, so small v
 * keeps its full resolution. */
static inline __m256 race_score(__m256 x, __m256 inv_t, __m256 v) {
    __m256 series = _mm256_mul_ps(v, _mm256_fmadd_ps(v, _mm256_fmadd_ps(v, _mm256_set1_ps(1.0f / 3), _mm256_set1_ps(0.5f)),
                                                     _mm256_set1_ps(1.0f)));
    __m256 big = _mm256_sub_ps(_mm256_setzero_ps(), log256(_mm256_sub_ps(_mm256_set1_ps(1.0f), v)));
    __m256 e = _mm256_blendv_ps(big, series, _mm256_cmp_ps(v, _mm256_set1_ps(1.0f / 64), _CMP_LT_OQ));
    return _mm256_fmsub_ps(x, inv_t, log256(e));
}

/* An upper bound of race_score from v's exponent alone: E >= v >= 2^floor(log2 v), so
 * -ln E <= -floor(log2 v) ln 2 (plus a margin for rounding). */
static inline __m256 race_bound(__m256 x, __m256 inv_t, __m256 v) {
    __m256i ex = _mm256_sub_epi32(_mm256_set1_epi32(127), _mm256_srli_epi32(_mm256_castps_si256(v), 23));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(ex), _mm256_set1_ps(0.6931472f),
                           _mm256_fmadd_ps(x, inv_t, _mm256_set1_ps(1e-3f)));
}

#define RACE_BLOCK 1024  /* tokens of one Philox block: counter c gives tokens c + {0, 1, 2, 3} * 256 of it */
#define RACE_CHUNK 8192   /* tokens a task scores (a multiple of RACE_BLOCK) */

/* out[r] = argmax_j(logits[r, j] * inv_t[r] - ln E_rj), a draw from softmax(logits[r] * inv_t[r]):
 * the exponential race (argmax p_j / E_j). E_rj comes from Philox4x32-10 keyed by keys[r] (low,
 * high 32 bits), counter (j / 1024) * 256 + j % 256, output (j % 1024) / 256: the noise of the cuda
 * platform's kernel (triton_sample.py), so a key draws the same tokens on both but for rounding. keys /
 * inv_t NULL: row r's key is key0 + r, its inv_t inv_t0. Rows are split into chunks of RACE_CHUNK
 * tokens so one row fills every thread. */
int sample_race(const float *logits, int64_t B, int64_t V, const int64_t *keys, int64_t key0, const float *inv_t,
                float inv_t0, int64_t *out, int threads) {
    int64_t nch = (V + RACE_CHUNK - 1) / RACE_CHUNK;
    float *best = malloc(sizeof(float) * B * nch);
    int64_t *arg = malloc(sizeof(int64_t) * B * nch);
    if (!best || !arg) { free(best); free(arg); return -1; }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < B * nch; task++) {
        int64_t r = task / nch, j0 = task % nch * RACE_CHUNK, j1 = j0 + RACE_CHUNK < V ? j0 + RACE_CHUNK : V;
        const float *x = logits + r * V;
        uint64_t key = keys ? (uint64_t)keys[r] : (uint64_t)(key0 + r);
        uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
        __m256 it = _mm256_set1_ps(inv_t ? inv_t[r] : inv_t0), bv = _mm256_set1_ps(-INFINITY);
        __m256i bi = _mm256_setzero_si256(), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        float tail[RACE_BLOCK];
        for (int64_t blk = j0; blk < j1; blk += RACE_BLOCK) {
            const float *xb = x + blk;
            if (blk + RACE_BLOCK > j1) {
                for (int t = 0; t < RACE_BLOCK; t++) tail[t] = blk + t < j1 ? xb[t] : -INFINITY;
                xb = tail;
            }
            for (int c = 0; c < RACE_BLOCK / 4; c += 8 * NB) {
                /* noise is a function of (key, token): tokens that cannot beat the lane's best even with
                 * the largest noise (-ln E <= 32 ln 2) are skipped, and so is the Philox of a stretch of
                 * them; the draw is the same as with every score computed */
                __m256 top = _mm256_set1_ps(-INFINITY);
                for (int n = 0; n < NB; n++)
                    for (int k = 0; k < 4; k++) top = _mm256_max_ps(top, _mm256_loadu_ps(xb + k * 256 + c + 8 * n));
                if (!_mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmadd_ps(top, it, _mm256_set1_ps(22.2f)), bv,
                                                      _CMP_GT_OQ)))
                    continue;
                __m256i ctr[NB], rnd[4 * NB];
                for (int n = 0; n < NB; n++)
                    ctr[n] = _mm256_add_epi32(_mm256_set1_epi32((int)(blk / 4 + c + 8 * n)), lane);
                philox8(ctr, k0, k1, rnd);
                for (int n = 0; n < NB; n++)
                    for (int k = 0; k < 4; k++) {
                        int off = k * 256 + c + 8 * n;
                        __m256 xk = _mm256_loadu_ps(xb + off), v = race_uniform(rnd[4 * n + k]);
                        if (!_mm256_movemask_ps(_mm256_cmp_ps(race_bound(xk, it, v), bv, _CMP_GT_OQ)))
                            continue;
                        __m256 s = race_score(xk, it, v);
                        __m256 gt = _mm256_cmp_ps(s, bv, _CMP_GT_OQ);
                        bv = _mm256_blendv_ps(bv, s, gt);
                        bi = _mm256_blendv_epi8(bi, _mm256_add_epi32(lane, _mm256_set1_epi32((int)(blk + off))),
                                                _mm256_castps_si256(gt));
                    }
            }
        }
        float v[8]; int32_t id[8];
        _mm256_storeu_ps(v, bv); _mm256_storeu_si256((__m256i *)id, bi);
        float b = v[0]; int64_t a = id[0];
        for (int t = 1; t < 8; t++)
            if (v[t] > b || (v[t] == b && id[t] < a)) { b = v[t]; a = id[t]; }
        best[task] = b; arg[task] = a;
    }
    for (int64_t r = 0; r < B; r++) {
        int64_t t = r * nch;
        for (int64_t c = 1; c < nch; c++)
            if (best[r * nch + c] > best[t]) t = r * nch + c;
        out[r] = arg[t];
    }
    free(best); free(arg);
    return 0;
}

/* logits[rows[i], t] = -inf where bit t % 32 of mask[i, t / 32] is 0, for t < V and i < R; the mask has
 * W = ceil(V / 32) words a row. A word of all ones (every token allowed) is skipped. */
int apply_bitmask(float *logits, int64_t V, const int32_t *mask, const int64_t *rows, int64_t R) {
    int64_t W = (V + 31) / 32, full = V / 32;
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < R; i++) {
        float *x = logits + rows[i] * V;
        const int32_t *m = mask + i * W;
        for (int64_t w = 0; w < full; w++) {
            uint32_t word = (uint32_t)m[w];
            if (word == 0xffffffffu) continue;
            for (int b = 0; b < 4; b++) {
                __m256i lanes = _mm256_and_si256(_mm256_set1_epi32((int)(word >> (8 * b))), bit);
                __m256 banned = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, _mm256_setzero_si256()));
                float *p = x + w * 32 + 8 * b;
                _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_loadu_ps(p), ninf, banned));
            }
        }
        for (int64_t t = full * 32; t < V; t++)
            if (!((uint32_t)m[t / 32] >> (t % 32) & 1u)) x[t] = -INFINITY;
    }
    return 0;
}
