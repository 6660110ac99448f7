/*
 * tandem-check: proves that data.db, meta.db and hash.db in a directory hold
 * EXACTLY the effect of the committed prefix 1..M of tandem-workload's
 * transactions, M = meta.db[0]: nothing missing, nothing extra, no value from
 * an uncommitted (or later) transaction.
 *
 * Usage: tandem-check [-u U] [-v V] ENVDIR
 *   -u U / -v V  additionally require every transaction to have used U / V
 *                (by default each transaction's U and V are read from the
 *                self-describing meta.db[t] value and verified there).
 *
 * The databases are opened read-only WITHOUT an environment, so run this
 * after the environment was recovered (db5.3_recover [-c]) and while no
 * process is using it; region files are not needed.
 *
 * Output: "OK M=<M>" and exit 0; "FAIL <first difference>" and exit 1;
 * errors (missing files, DB errors) on stderr and exit 2.
 */
#define _GNU_SOURCE
#include <db.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "workload_common.h"

#define MAX_M 1000000000ULL

static const char *progname = "tandem-check";

static void error_exit(int ret, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (ret != 0)
		fprintf(stderr, ": %s", db_strerror(ret));
	fputc('\n', stderr);
	exit(2);
}

static void fail_exit(const char *fmt, ...)
{
	va_list ap;
	fputs("FAIL ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
	exit(1);
}

static DB *open_ro(const char *dir, const char *name)
{
	char path[4096];
	struct stat st;
	DB *dbp;
	int ret;
	snprintf(path, sizeof path, "%s/%s", dir, name);
	if (stat(path, &st) != 0)
		error_exit(0, "%s: %s", path, strerror(errno));
	if ((ret = db_create(&dbp, NULL, 0)) != 0)
		error_exit(ret, "db_create");
	dbp->set_errfile(dbp, stderr);
	dbp->set_errpfx(dbp, progname);
	if ((ret = dbp->set_cachesize(dbp, 0, 16 * 1024 * 1024, 1)) != 0)
		error_exit(ret, "DB->set_cachesize");
	if ((ret = dbp->open(dbp, NULL, path, NULL, DB_UNKNOWN, DB_RDONLY, 0)) != 0)
		error_exit(ret, "DB->open(%s)", path);
	return dbp;
}

static DBC *cursor(DB *dbp, const char *name)
{
	DBC *c;
	int ret;
	if ((ret = dbp->cursor(dbp, NULL, &c, 0)) != 0)
		error_exit(ret, "DB->cursor(%s)", name);
	return c;
}

/* Next record; 1 when found, 0 at end. */
static int next(DBC *c, DBT *k, DBT *d, const char *name)
{
	memset(k, 0, sizeof *k);
	memset(d, 0, sizeof *d);
	int ret = c->get(c, k, d, DB_NEXT);
	if (ret == DB_NOTFOUND)
		return 0;
	if (ret != 0)
		error_exit(ret, "DBC->get(%s)", name);
	return 1;
}

static uint64_t key_of(const DBT *k, const char *name)
{
	if (k->size != 8)
		fail_exit("%s: key of %u bytes (expected 8-byte big-endian u64)",
		    name, k->size);
	return tw_get_be64(k->data);
}

/*
 * Compare an actual value with the expected one for (tag, key, writer, u, v).
 * On mismatch, FAIL with a description of the difference.
 */
static void expect_value(const char *name, char tag, uint64_t key,
    uint64_t writer, uint32_t u, uint32_t v, const DBT *d, unsigned char *buf)
{
	const unsigned char *a = d->data;
	tw_value(buf, tag, key, writer, u, v);
	if (d->size == v && memcmp(a, buf, v) == 0)
		return;
	if (d->size >= TW_HDR && memcmp(a, "TND1", 4) == 0) {
		uint64_t akey = tw_get_be64(a + 8), aw = tw_get_be64(a + 16);
		uint32_t au = tw_get_be32(a + 24), av = tw_get_be32(a + 28);
		if (a[4] != (unsigned char)tag)
			fail_exit("%s key %" PRIu64 ": value has database tag "
			    "'%c', expected '%c'", name, key, a[4], tag);
		if (akey != key)
			fail_exit("%s key %" PRIu64 ": value header names key "
			    "%" PRIu64, name, key, akey);
		if (aw != writer)
			fail_exit("%s key %" PRIu64 ": value written by t=%" PRIu64
			    ", expected last writer t=%" PRIu64 "%s", name, key,
			    aw, writer, aw > writer ? " (a transaction after M "
			    "or an undone one)" : " (a later committed write is "
			    "missing)");
		if (au != u || av != v)
			fail_exit("%s key %" PRIu64 " (writer t=%" PRIu64 "): value "
			    "header says U=%u V=%u, expected U=%u V=%u", name, key,
			    writer, au, av, u, v);
	}
	if (d->size != v)
		fail_exit("%s key %" PRIu64 " (writer t=%" PRIu64 "): value is %u "
		    "bytes, expected %u", name, key, writer, d->size, v);
	uint32_t off = 0;
	while (off < v && a[off] == buf[off])
		off++;
	fail_exit("%s key %" PRIu64 " (writer t=%" PRIu64 "): value differs at "
	    "byte %u (0x%02x, expected 0x%02x)", name, key, writer, off, a[off],
	    buf[off]);
}

int main(int argc, char **argv)
{
	int ch;
	int64_t want_u = -1, want_v = -1;
	while ((ch = getopt(argc, argv, "u:v:")) != -1) {
		switch (ch) {
		case 'u': want_u = atoll(optarg); break;
		case 'v': want_v = atoll(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-u U] [-v V] ENVDIR\n", progname);
			return 2;
		}
	}
	if (optind + 1 != argc) {
		fprintf(stderr, "usage: %s [-u U] [-v V] ENVDIR\n", progname);
		return 2;
	}
	const char *dir = argv[optind];

	DB *meta = open_ro(dir, "meta.db");
	DB *data = open_ro(dir, "data.db");
	DB *hash = open_ro(dir, "hash.db");
	unsigned char *buf = malloc(TW_MAX_VALUE);
	uint64_t *ukeys = malloc(sizeof(uint64_t) * TW_MAX_UPDATES);
	if (buf == NULL || ukeys == NULL)
		error_exit(0, "out of memory");
	DBT k, d;

	/* ---- meta.db: key 0 = M, then keys 1..M with self-describing values. */
	DBC *c = cursor(meta, "meta.db");
	uint64_t M = 0;
	int have = next(c, &k, &d, "meta.db");
	if (have) {
		uint64_t key = key_of(&k, "meta.db");
		if (key != 0)
			fail_exit("meta.db: key 0 missing (first key is %" PRIu64 ")",
			    key);
		if (d.size != 8)
			fail_exit("meta.db key 0: value of %u bytes, expected 8",
			    d.size);
		M = tw_get_be64(d.data);
		if (M > MAX_M)
			fail_exit("meta.db key 0: implausible M=%" PRIu64, M);
		have = next(c, &k, &d, "meta.db");
	}
	uint64_t *lw = calloc(M + 1, sizeof(uint64_t)); /* last writer per key */
	uint32_t *tu = calloc(M + 1, sizeof(uint32_t)); /* U of transaction t */
	uint32_t *tv = calloc(M + 1, sizeof(uint32_t)); /* V of transaction t */
	if (lw == NULL || tu == NULL || tv == NULL)
		error_exit(0, "out of memory for M=%" PRIu64, M);
	for (uint64_t t = 1; t <= M; t++) {
		if (!have)
			fail_exit("meta.db: key %" PRIu64 " missing (M=%" PRIu64
			    ", meta.db ends after key %" PRIu64 ")", t, M, t - 1);
		uint64_t key = key_of(&k, "meta.db");
		if (key != t)
			fail_exit("meta.db: key %" PRIu64 " missing (next key is %"
			    PRIu64 ", M=%" PRIu64 ")", t, key, M);
		const unsigned char *a = d.data;
		if (d.size < TW_HDR || memcmp(a, "TND1", 4) != 0)
			fail_exit("meta.db key %" PRIu64 ": not a workload value "
			    "(%u bytes)", t, d.size);
		uint32_t u = tw_get_be32(a + 24), v = tw_get_be32(a + 28);
		if (u > TW_MAX_UPDATES || v < TW_HDR || v > TW_MAX_VALUE)
			fail_exit("meta.db key %" PRIu64 ": implausible U=%u V=%u",
			    t, u, v);
		if (want_u >= 0 && u != (uint64_t)want_u)
			fail_exit("meta.db key %" PRIu64 ": transaction used U=%u, "
			    "required %" PRId64, t, u, want_u);
		if (want_v >= 0 && v != (uint64_t)want_v)
			fail_exit("meta.db key %" PRIu64 ": transaction used V=%u, "
			    "required %" PRId64, t, v, want_v);
		expect_value("meta.db", 'm', t, t, u, v, &d, buf);
		tu[t] = u;
		tv[t] = v;
		have = next(c, &k, &d, "meta.db");
	}
	if (have)
		fail_exit("meta.db: extra key %" PRIu64 " after M=%" PRIu64,
		    key_of(&k, "meta.db"), M);
	c->close(c);

	/* ---- expected last writer of every data.db key after 1..M. */
	for (uint64_t t = 1; t <= M; t++) {
		lw[t] = t;
		uint32_t n = tw_update_keys(t, tu[t], ukeys);
		for (uint32_t i = 0; i < n; i++)
			lw[ukeys[i]] = t;
	}

	/* ---- data.db: exactly keys 1..M, in order, with last-writer values. */
	c = cursor(data, "data.db");
	have = next(c, &k, &d, "data.db");
	for (uint64_t key = 1; key <= M; key++) {
		if (!have)
			fail_exit("data.db: key %" PRIu64 " missing (data.db ends "
			    "after key %" PRIu64 ", M=%" PRIu64 ")", key, key - 1, M);
		uint64_t ak = key_of(&k, "data.db");
		if (ak != key)
			fail_exit("data.db: key %" PRIu64 " missing (next key is %"
			    PRIu64 ", M=%" PRIu64 ")", key, ak, M);
		uint64_t w = lw[key];
		expect_value("data.db", 'd', key, w, tu[w], tv[w], &d, buf);
		have = next(c, &k, &d, "data.db");
	}
	if (have)
		fail_exit("data.db: extra key %" PRIu64 " (M=%" PRIu64 ")",
		    key_of(&k, "data.db"), M);
	c->close(c);

	/* ---- hash.db: exactly keys 1..M (any order), each written by itself. */
	memset(lw, 0, (M + 1) * sizeof(uint64_t)); /* reuse as "seen" marks */
	uint64_t count = 0;
	c = cursor(hash, "hash.db");
	while (next(c, &k, &d, "hash.db")) {
		uint64_t key = key_of(&k, "hash.db");
		if (key == 0 || key > M)
			fail_exit("hash.db: extra key %" PRIu64 " (M=%" PRIu64 ")",
			    key, M);
		if (lw[key])
			fail_exit("hash.db: key %" PRIu64 " returned twice", key);
		lw[key] = 1;
		count++;
		expect_value("hash.db", 'h', key, key, tu[key], tv[key], &d, buf);
	}
	c->close(c);
	if (count != M) {
		uint64_t key = 1;
		while (key <= M && lw[key])
			key++;
		fail_exit("hash.db: key %" PRIu64 " missing (%" PRIu64 " of %"
		    PRIu64 " keys present)", key, count, M);
	}

	int ret;
	if ((ret = meta->close(meta, 0)) != 0 ||
	    (ret = data->close(data, 0)) != 0 ||
	    (ret = hash->close(hash, 0)) != 0)
		error_exit(ret, "DB->close");
	free(lw);
	free(tu);
	free(tv);
	free(buf);
	free(ukeys);
	printf("OK M=%" PRIu64 "\n", M);
	return 0;
}
