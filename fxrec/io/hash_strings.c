/* Read-time string hashing: one pass over a decoded column's strings (fxrec/io/hashing.py).
 *
 * The same two functions as torch.ops.fxrec.hash_bytes (fxrec/ops/hash.py, SPEC 3.4):
 *   hash_type 0: farmhash Fingerprint64 (= farmhashna::Hash64);
 *   hash_type 1: MurmurHash64A, seed 0;
 * then SPEC 2's read-time id: bucket == 0 keeps h with bit 63 cleared, bucket > 0 gives
 * h % bucket in unsigned arithmetic.
 *
 * String i is data[offsets[i] .. offsets[i + 1]); offsets are Arrow's, int32 (string / binary)
 * or int64 (large_string / large_binary), absolute into data. Words are read little-endian with
 * memcpy (x86 / ARM hosts). Every read stays inside its own string, and the offsets are
 * checked as they are read (the loop stops at the first bad one).
 */

#include <stdint.h>
#include <string.h>

static const uint64_t K0 = 0xc3a5c85c97cb3127ULL;
static const uint64_t K1 = 0xb492b66fbe98f273ULL;
static const uint64_t K2 = 0x9ae16a3b2f90404fULL;
static const uint64_t MURMUR_M = 0xc6a4a7935bd1e995ULL;

static inline uint64_t fetch64(const uint8_t *p) {
    uint64_t r;
    memcpy(&r, p, 8);
    return r;
}

static inline uint64_t fetch32(const uint8_t *p) {
    uint32_t r;
    memcpy(&r, p, 4);
    return r;
}

static inline uint64_t rotr(uint64_t v, int s) { return (v >> s) | (v << (64 - s)); } /* 0 < s < 64 */

static inline uint64_t shift_mix(uint64_t v) { return v ^ (v >> 47); }

static inline uint64_t hash_len16(uint64_t u, uint64_t v, uint64_t mul) {
    uint64_t a = shift_mix((u ^ v) * mul);
    uint64_t b = shift_mix((v ^ a) * mul);
    return b * mul;
}

/* farm_len0to16's 8..16-byte branch, branch-free: the length class of most id strings. */
static inline uint64_t farm_len8to16(const uint8_t *s, uint64_t len) {
    uint64_t mul = K2 + len * 2;
    uint64_t a = fetch64(s) + K2;
    uint64_t b = fetch64(s + len - 8);
    uint64_t c = rotr(b, 37) * mul + a;
    uint64_t d = (rotr(a, 25) + b) * mul;
    return hash_len16(c, d, mul);
}

static uint64_t farm_len0to16(const uint8_t *s, uint64_t len) {
    if (len >= 8) return farm_len8to16(s, len);
    if (len >= 4) {
        uint64_t mul = K2 + len * 2;
        return hash_len16(len + (fetch32(s) << 3), fetch32(s + len - 4), mul);
    }
    if (len > 0) {
        uint64_t y = (uint64_t)s[0] + ((uint64_t)s[len >> 1] << 8);
        uint64_t z = len + ((uint64_t)s[len - 1] << 2);
        return shift_mix(y * K2 ^ z * K0) * K2;
    }
    return K2;
}

static uint64_t farm_len17to32(const uint8_t *s, uint64_t len) {
    uint64_t mul = K2 + len * 2;
    uint64_t a = fetch64(s) * K1;
    uint64_t b = fetch64(s + 8);
    uint64_t c = fetch64(s + len - 8) * mul;
    uint64_t d = fetch64(s + len - 16) * K2;
    return hash_len16(rotr(a + b, 43) + rotr(c, 30) + d, a + rotr(b + K2, 18) + c, mul);
}

static uint64_t farm_len33to64(const uint8_t *s, uint64_t len) {
    uint64_t mul = K2 + len * 2;
    uint64_t a = fetch64(s) * K2;
    uint64_t b = fetch64(s + 8);
    uint64_t c = fetch64(s + len - 8) * mul;
    uint64_t d = fetch64(s + len - 16) * K2;
    uint64_t y = rotr(a + b, 43) + rotr(c, 30) + d;
    uint64_t z = hash_len16(y, a + rotr(b + K2, 18) + c, mul);
    uint64_t e = fetch64(s + 16) * mul;
    uint64_t f = fetch64(s + 24);
    uint64_t g = (y + fetch64(s + len - 32)) * mul;
    uint64_t h = (z + fetch64(s + len - 24)) * mul;
    return hash_len16(rotr(e + f, 43) + rotr(g, 30) + h, e + rotr(f + a, 18) + g, mul);
}

/* (a, b) <- WeakHashLen32WithSeeds(s, a, b) */
static inline void weak_hash_len32_with_seeds(const uint8_t *s, uint64_t *a, uint64_t *b) {
    uint64_t w = fetch64(s), x = fetch64(s + 8), y = fetch64(s + 16), z = fetch64(s + 24);
    *a += w;
    *b = rotr(*b + *a + z, 21);
    uint64_t c = *a;
    *a += x;
    *a += y;
    *b += rotr(*a, 44);
    *a += z;
    *b += c;
}

struct farm_state {
    uint64_t x, y, z, v0, v1, w0, w1;
};

/* One 64-byte chunk of farmhashna::Hash64's long-string loop; the last chunk runs it with
 * mul = K1 + ((z & 0xff) << 1) and weight 9, every other chunk with K1 and weight 1. */
static inline void farm_chunk(struct farm_state *f, const uint8_t *s, uint64_t mul, uint64_t weight) {
    f->x = rotr(f->x + f->y + f->v0 + fetch64(s + 8), 37) * mul;
    f->y = rotr(f->y + f->v1 + fetch64(s + 48), 42) * mul;
    f->x ^= f->w1 * weight;
    f->y += f->v0 * weight + fetch64(s + 40);
    f->z = rotr(f->z + f->w0, 33) * mul;
    f->v0 = f->v1 * mul;
    f->v1 = f->x + f->w0;
    weak_hash_len32_with_seeds(s, &f->v0, &f->v1);
    f->w0 = f->z + f->w1;
    f->w1 = f->y + fetch64(s + 16);
    weak_hash_len32_with_seeds(s + 32, &f->w0, &f->w1);
    uint64_t t = f->z;
    f->z = f->x;
    f->x = t;
}

static uint64_t farm_len65plus(const uint8_t *s, uint64_t len) {
    const uint64_t seed = 81;
    struct farm_state f = {0};
    f.x = seed * K2 + fetch64(s);
    f.y = seed * K1 + 113;
    f.z = shift_mix(f.y * K2 + 113) * K2;
    const uint8_t *end = s + ((len - 1) / 64) * 64;
    do {
        farm_chunk(&f, s, K1, 1);
        s += 64;
    } while (s != end);
    uint64_t mul = K1 + ((f.z & 0xff) << 1);
    f.w0 += ((len - 1) & 63);
    f.v0 += f.w0;
    f.w0 += f.v0;
    farm_chunk(&f, end + ((len - 1) & 63) - 63, mul, 9); /* the last 64 bytes */
    return hash_len16(hash_len16(f.v0, f.w0, mul) + shift_mix(f.y) * K0 + f.z, hash_len16(f.v1, f.w1, mul) + f.x,
                      mul);
}

static uint64_t farm(const uint8_t *s, uint64_t len) {
    if (len <= 32) return len <= 16 ? farm_len0to16(s, len) : farm_len17to32(s, len);
    return len <= 64 ? farm_len33to64(s, len) : farm_len65plus(s, len);
}

static uint64_t murmur(const uint8_t *s, uint64_t len) {
    uint64_t h = len * MURMUR_M;
    const uint8_t *end = s + (len & ~(uint64_t)7);
    for (; s != end; s += 8) {
        uint64_t k = fetch64(s) * MURMUR_M;
        k ^= k >> 47;
        h ^= k * MURMUR_M;
        h *= MURMUR_M;
    }
    uint64_t rest = len & 7;
    if (rest) {
        uint64_t tail = 0;
        for (uint64_t i = 0; i < rest; i++) tail |= (uint64_t)s[i] << (8 * i);
        h ^= tail;
        h *= MURMUR_M;
    }
    h ^= h >> 47;
    h *= MURMUR_M;
    return h ^ (h >> 47);
}

static inline int64_t finish(uint64_t h, uint64_t bucket) {
    return (int64_t)(bucket == 0 ? h & 0x7fffffffffffffffULL : h % bucket);
}

/* Returns -1, or the index of the first string whose offsets are out of order or outside data
 * (nothing is read for it or after it).
 *
 * Farm hashes four strings at a time when all four are 8..16 bytes long: one string's hash is a
 * chain of ~20 cycles of dependent multiplies, and four independent chains written side by side
 * keep the multiplier busy where the one-string loop's length branches kept the core from
 * overlapping them (2-core VM, 10-byte strings: 540 M strings/s against 210 M). A string of
 * another length sends its group of four through the one-string loop. */
#define HASH_LOOP                                                                                 \
    if (n > 0 && (offsets[0] < 0 || (int64_t)offsets[n] > nbytes)) return 0;                      \
    int64_t i = 0;                                                                                \
    if (hash_type == 0) {                                                                         \
        for (; i + 4 <= n; i += 4) {                                                              \
            int64_t o0 = offsets[i], o1 = offsets[i + 1], o2 = offsets[i + 2];                     \
            int64_t o3 = offsets[i + 3], o4 = offsets[i + 4];                                      \
            uint64_t l0 = (uint64_t)(o1 - o0), l1 = (uint64_t)(o2 - o1);                           \
            uint64_t l2 = (uint64_t)(o3 - o2), l3 = (uint64_t)(o4 - o3);                           \
            /* unsigned: a decreasing offset is a huge length and fails the test */                \
            if ((l0 - 8 <= 8) & (l1 - 8 <= 8) & (l2 - 8 <= 8) & (l3 - 8 <= 8)) {                   \
                uint64_t h0 = farm_len8to16(data + o0, l0), h1 = farm_len8to16(data + o1, l1);     \
                uint64_t h2 = farm_len8to16(data + o2, l2), h3 = farm_len8to16(data + o3, l3);     \
                out[i] = finish(h0, bucket);                                                      \
                out[i + 1] = finish(h1, bucket);                                                  \
                out[i + 2] = finish(h2, bucket);                                                  \
                out[i + 3] = finish(h3, bucket);                                                  \
                continue;                                                                         \
            }                                                                                     \
            for (int64_t j = i; j < i + 4; j++) {                                                 \
                int64_t start = offsets[j], stop = offsets[j + 1];                                 \
                if (stop < start) return j;                                                       \
                out[j] = finish(farm(data + start, (uint64_t)(stop - start)), bucket);            \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    for (; i < n; i++) {                                                                          \
        int64_t start = offsets[i], stop = offsets[i + 1];                                         \
        if (stop < start) return i;                                                               \
        uint64_t h = hash_type == 0 ? farm(data + start, (uint64_t)(stop - start))                 \
                                    : murmur(data + start, (uint64_t)(stop - start));              \
        out[i] = finish(h, bucket);                                                               \
    }                                                                                             \
    return -1;

int64_t fxrec_hash_strings_i32(const uint8_t *data, int64_t nbytes, const int32_t *offsets, int64_t n,
                               int32_t hash_type, uint64_t bucket, int64_t *out) {
    HASH_LOOP
}

int64_t fxrec_hash_strings_i64(const uint8_t *data, int64_t nbytes, const int64_t *offsets, int64_t n,
                               int32_t hash_type, uint64_t bucket, int64_t *out) {
    HASH_LOOP
}
