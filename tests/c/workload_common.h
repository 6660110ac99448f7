/*
 * Shared definitions for tandem-workload (workload.c) and tandem-check
 * (check.c): key encoding, the deterministic PRNG that chooses which older
 * keys a transaction rewrites, and the value function.
 *
 * Everything here is a pure function of its arguments so the checker can
 * recompute the exact expected database contents after transactions 1..M.
 *
 * Workload transaction t (t >= 1) does, atomically:
 *   data.db[t]               = tw_value('d', t, t, U, V)
 *   data.db[k] for k in tw_update_keys(t, U)  (only when t > 1)
 *                            = tw_value('d', k, t, U, V)
 *   hash.db[t]               = tw_value('h', t, t, U, V)
 *   meta.db[t]               = tw_value('m', t, t, U, V)
 *   meta.db[0]               = t as 8-byte big-endian
 * All keys are 8-byte big-endian u64, so btree order is numeric order.
 *
 * Value layout (V bytes, V >= TW_HDR):
 *   0..4   magic "TND1"
 *   4      database tag: 'd' (data.db), 'h' (hash.db), 'm' (meta.db)
 *   5..8   zero
 *   8..16  key, big-endian u64
 *   16..24 writer transaction t, big-endian u64
 *   24..28 U of the writing transaction, big-endian u32
 *   28..32 V (total value length), big-endian u32
 *   32..V  filler: splitmix64 stream seeded from (tag, key, writer)
 * Because every value records U and V of its writer, the checker learns each
 * transaction's parameters from meta.db[t] and a workload may be restarted on
 * the same environment with different -u / -v.
 */
#ifndef TANDEM_WORKLOAD_COMMON_H
#define TANDEM_WORKLOAD_COMMON_H

#include <stdint.h>
#include <string.h>

#define TW_HDR 32u            /* value header size = minimum value length */
#define TW_MAX_VALUE (1u << 20) /* largest accepted value length */
#define TW_MAX_UPDATES 100000u  /* largest accepted -u */

static inline uint64_t tw_splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static inline void tw_put_be64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--) {
		p[i] = (unsigned char)(v & 0xff);
		v >>= 8;
	}
}

static inline uint64_t tw_get_be64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | p[i];
	return v;
}

static inline void tw_put_be32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static inline uint32_t tw_get_be32(const unsigned char *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	    ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/*
 * The older keys rewritten by transaction t: out[0..u), each in 1..t-1.
 * Seeded only by t. Duplicates are possible (the later write wins, same
 * writer, same value). Returns the number of keys (0 when t <= 1).
 */
static inline uint32_t tw_update_keys(uint64_t t, uint32_t u, uint64_t *out)
{
	if (t <= 1)
		return 0;
	uint64_t s = t ^ 0x54414E44454D3031ULL; /* "TANDEM01" */
	for (uint32_t i = 0; i < u; i++)
		out[i] = 1 + tw_splitmix64(&s) % (t - 1);
	return u;
}

/* Fill buf[0..v) with the value for (tag, key, writer) of a txn with U=u. */
static inline void tw_value(unsigned char *buf, char tag, uint64_t key,
    uint64_t writer, uint32_t u, uint32_t v)
{
	unsigned char hdr[TW_HDR];
	memcpy(hdr, "TND1", 4);
	hdr[4] = (unsigned char)tag;
	hdr[5] = hdr[6] = hdr[7] = 0;
	tw_put_be64(hdr + 8, key);
	tw_put_be64(hdr + 16, writer);
	tw_put_be32(hdr + 24, u);
	tw_put_be32(hdr + 28, v);
	memcpy(buf, hdr, v < TW_HDR ? v : TW_HDR);

	uint64_t s = key * 0xD6E8FEB86659FD93ULL ^ writer * 0x9E3779B97F4A7C15ULL ^
	    ((uint64_t)(unsigned char)tag << 56);
	uint32_t off = TW_HDR;
	while (off < v) {
		uint64_t r = tw_splitmix64(&s);
		uint32_t n = v - off < 8 ? v - off : 8;
		for (uint32_t i = 0; i < n; i++) {
			buf[off + i] = (unsigned char)r;
			r >>= 8;
		}
		off += n;
	}
}

#endif /* TANDEM_WORKLOAD_COMMON_H */
