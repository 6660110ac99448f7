/*
 * tandem-waitbench: a multi-threaded Berkeley DB 5.3 workload for the wait
 * benchmark. THREADS threads commit small transactions (one 100-byte put
 * into bench.db each) for SECS seconds, at RATE commits per second in all
 * (0 = as fast as they can); with -W each thread waits after every commit
 * on tandem-primary's wait socket (contrib/c/tandem_wait.c) until K
 * standbys hold it, and the wait's latency is recorded.
 *
 * Usage: tandem-waitbench -h ENVDIR -T SECS [-t THREADS] [-r RATE]
 *                         [-W SOCKET [-k K]]
 * Output, one line:
 *   RESULT commits=N secs=S rate=R waits=W timeouts=X p50_us=A p99_us=B max_us=C
 * Errors: message on stderr, exit 1.
 */
#define _GNU_SOURCE
#include <db.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tandem_wait.h"

static DB_ENV *env;
static DB *dbp;
static const char *wait_socket;
static int wait_k = 1;
static double secs = 5, rate;
static int nthreads = 1;

struct worker {
	pthread_t th;
	int id;
	uint64_t commits, timeouts;
	uint64_t *lat_us; /* wait latencies */
	size_t nlat, cap;
};

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(int ret, const char *what)
{
	fprintf(stderr, "tandem-waitbench: %s: %s\n", what,
	    ret ? db_strerror(ret) : strerror(errno));
	exit(1);
}

static double t0;

static void *run(void *arg)
{
	struct worker *w = arg;
	unsigned char kb[8], vb[100];
	memset(vb, 'v', sizeof vb);
	double per_thread = rate > 0 ? rate / nthreads : 0;
	for (uint64_t i = 0;; i++) {
		double now = now_mono();
		if (now - t0 >= secs)
			break;
		if (per_thread > 0) {
			double at = t0 + (double)i / per_thread;
			if (at > now) {
				double d = at - now;
				struct timespec ts = { (time_t)d,
				    (long)((d - (double)(time_t)d) * 1e9) };
				nanosleep(&ts, NULL);
			}
		}
		uint64_t key = ((uint64_t)w->id << 40) | i;
		for (int b = 0; b < 8; b++)
			kb[b] = (unsigned char)(key >> (56 - 8 * b));
		DBT k, d;
		memset(&k, 0, sizeof k);
		memset(&d, 0, sizeof d);
		k.data = kb;
		k.size = 8;
		d.data = vb;
		d.size = sizeof vb;
		DB_TXN *txn;
		DB_TXN_TOKEN token;
		int ret;
		if ((ret = env->txn_begin(env, NULL, &txn, 0)) != 0)
			die(ret, "txn_begin");
		ret = dbp->put(dbp, txn, &k, &d, 0);
		if (ret == DB_LOCK_DEADLOCK) {
			txn->abort(txn);
			continue;
		}
		if (ret != 0)
			die(ret, "put");
		if (wait_socket && (ret = txn->set_commit_token(txn, &token)) != 0)
			die(ret, "set_commit_token");
		if ((ret = txn->commit(txn, 0)) != 0)
			die(ret, "commit");
		w->commits++;
		if (wait_socket) {
			double s = now_mono();
			int r = tandem_wait_token(wait_socket, &token, wait_k,
			    10000);
			if (r != TANDEM_WAIT_DURABLE) {
				w->timeouts++;
				continue;
			}
			if (w->nlat == w->cap) {
				w->cap = w->cap ? w->cap * 2 : 4096;
				w->lat_us = realloc(w->lat_us,
				    w->cap * sizeof *w->lat_us);
				if (w->lat_us == NULL)
					die(0, "realloc");
			}
			w->lat_us[w->nlat++] =
			    (uint64_t)((now_mono() - s) * 1e6);
		}
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	const char *home = NULL;
	int ch, ret;
	while ((ch = getopt(argc, argv, "h:T:t:r:W:k:")) != -1) {
		switch (ch) {
		case 'h': home = optarg; break;
		case 'T': secs = atof(optarg); break;
		case 't': nthreads = atoi(optarg); break;
		case 'r': rate = atof(optarg); break;
		case 'W': wait_socket = optarg; break;
		case 'k': wait_k = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: tandem-waitbench -h ENVDIR -T SECS "
			    "[-t THREADS] [-r RATE] [-W SOCKET [-k K]]\n");
			return 1;
		}
	}
	if (home == NULL || nthreads < 1 || nthreads > 256 || secs <= 0) {
		fprintf(stderr, "tandem-waitbench: -h ENVDIR and -T SECS > 0 "
		    "are required; 1 <= THREADS <= 256\n");
		return 1;
	}
	if (mkdir(home, 0775) != 0 && errno != EEXIST)
		die(0, "mkdir");
	if ((ret = db_env_create(&env, 0)) != 0)
		die(ret, "db_env_create");
	env->set_errfile(env, stderr);
	if ((ret = env->set_lg_max(env, 16u << 20)) != 0 ||
	    (ret = env->set_cachesize(env, 0, 32u << 20, 1)) != 0 ||
	    (ret = env->set_lk_detect(env, DB_LOCK_DEFAULT)) != 0 ||
	    (ret = env->set_flags(env, DB_TXN_WRITE_NOSYNC, 1)) != 0)
		die(ret, "environment settings");
	if ((ret = env->open(env, home, DB_CREATE | DB_INIT_TXN | DB_INIT_LOG |
	    DB_INIT_LOCK | DB_INIT_MPOOL | DB_THREAD, 0664)) != 0)
		die(ret, "DB_ENV->open");
	if ((ret = db_create(&dbp, env, 0)) != 0)
		die(ret, "db_create");
	if ((ret = dbp->open(dbp, NULL, "bench.db", NULL, DB_BTREE,
	    DB_AUTO_COMMIT | DB_CREATE | DB_THREAD, 0664)) != 0)
		die(ret, "DB->open(bench.db)");

	struct worker *ws = calloc((size_t)nthreads, sizeof *ws);
	if (ws == NULL)
		die(0, "calloc");
	t0 = now_mono();
	for (int i = 0; i < nthreads; i++) {
		ws[i].id = i;
		if (pthread_create(&ws[i].th, NULL, run, &ws[i]) != 0)
			die(0, "pthread_create");
	}
	uint64_t commits = 0, timeouts = 0, n = 0;
	for (int i = 0; i < nthreads; i++) {
		pthread_join(ws[i].th, NULL);
		commits += ws[i].commits;
		timeouts += ws[i].timeouts;
		n += ws[i].nlat;
	}
	double elapsed = now_mono() - t0;
	uint64_t *all = malloc((n ? n : 1) * sizeof *all);
	if (all == NULL)
		die(0, "malloc");
	size_t at = 0;
	for (int i = 0; i < nthreads; i++) {
		memcpy(all + at, ws[i].lat_us, ws[i].nlat * sizeof *all);
		at += ws[i].nlat;
		free(ws[i].lat_us);
	}
	qsort(all, n, sizeof *all, cmp_u64);
	uint64_t p50 = n ? all[n / 2] : 0;
	uint64_t p99 = n ? all[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1] : 0;
	uint64_t mx = n ? all[n - 1] : 0;
	printf("RESULT commits=%" PRIu64 " secs=%.3f rate=%.1f waits=%" PRIu64
	    " timeouts=%" PRIu64 " p50_us=%" PRIu64 " p99_us=%" PRIu64
	    " max_us=%" PRIu64 "\n", commits, elapsed, commits / elapsed, n,
	    timeouts, p50, p99, mx);
	free(all);
	free(ws);
	if ((ret = dbp->close(dbp, 0)) != 0 || (ret = env->close(env, 0)) != 0)
		die(ret, "close");
	return 0;
}
