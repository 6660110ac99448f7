/*
 * tandem-workload: a real Berkeley DB 5.3 transactional workload that commits
 * numbered transactions 1, 2, 3, ... whose exact effect tandem-check can
 * recompute (see workload_common.h for the layout).
 *
 * Usage: tandem-workload -h ENVDIR [options]   (ENVDIR is created if missing)
 *   -n N      commit N transactions in this run, then exit (0 = unlimited)
 *   -T SECS   stop after SECS seconds
 *   -r RATE   at most RATE commits per second (0 = as fast as possible)
 *   -c N      txn_checkpoint every N commits of this run (0 = never)
 *   -m BYTES  set_lg_max (default 1048576)
 *   -M MB     cache size in MB (default 8)
 *   -p BYTES  page size for newly created databases
 *   -K        DB_CHKSUM on newly created databases
 *   -u U      older data.db keys rewritten per transaction (default 3)
 *   -v V      value length in bytes (default 100, minimum 32)
 *   -O K      the transaction number to hold open (default: first of run)
 *   -o SECS   hold transaction K open SECS seconds after its writes and a
 *             log_flush(NULL) (negative = until signalled); prints "OPEN K"
 *   -L FILE   after each commit append "t FILE OFFSET\n" (log_stat end of log)
 *   -R        DB_RECOVER on environment open
 *   -S        full sync commits (default DB_TXN_WRITE_NOSYNC)
 *   -q        quiet: print only OPEN and DONE lines
 *   -W SOCKET after each commit, wait on tandem-primary's wait socket
 *             (contrib/c/tandem_wait.c) until 1 standby holds it durably
 *             (timeout 10 s), with the commit token set at commit
 *   -D FILE   with -W: append "t\n" for each transaction whose wait
 *             returned durable, after it returned; a timeout or error is
 *             printed on stderr ("WAIT t CODE") and the workload goes on
 * Output: "COMMITTED t" every 1000th t, "DONE last=t" at exit.
 * SIGTERM/SIGINT: finish the current transaction, close cleanly, DONE, exit 0.
 * Errors: message on stderr, exit 1.
 */
#define _GNU_SOURCE
#include <db.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "workload_common.h"
#include "tandem_wait.h"

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static const char *progname = "tandem-workload";

static void die_usage(const char *msg)
{
	fprintf(stderr, "%s: %s\n", progname, msg);
	fprintf(stderr,
	    "usage: %s -h ENVDIR [-n N] [-T SECS] [-r RATE] [-c N] [-m BYTES]\n"
	    "       [-M MB] [-p PAGESIZE] [-K] [-u U] [-v V] [-O K] [-o SECS]\n"
	    "       [-L FILE] [-R] [-S] [-q] [-W SOCKET [-D FILE]]\n", progname);
	exit(1);
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-') {
		char buf[256];
		snprintf(buf, sizeof buf, "bad %s: '%s'", what, s);
		die_usage(buf);
	}
	return v;
}

static int64_t parse_i64(const char *s, const char *what)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || end == s || *end) {
		char buf[256];
		snprintf(buf, sizeof buf, "bad %s: '%s'", what, s);
		die_usage(buf);
	}
	return v;
}

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Sleep until monotonic time `until`; returns early when a signal arrived. */
static void sleep_until(double until)
{
	while (!stop_requested) {
		double d = until - now_mono();
		if (d <= 0)
			return;
		struct timespec ts;
		ts.tv_sec = (time_t)d;
		ts.tv_nsec = (long)((d - (double)ts.tv_sec) * 1e9);
		if (nanosleep(&ts, NULL) != 0 && errno != EINTR)
			return;
	}
}

/* Global handles, so every error path can close cleanly. */
static DB_ENV *env;
static DB *dbp_data, *dbp_meta, *dbp_hash;

static void close_all(void)
{
	DB **dbs[] = { &dbp_data, &dbp_meta, &dbp_hash };
	for (size_t i = 0; i < 3; i++) {
		if (*dbs[i] != NULL) {
			int ret = (*dbs[i])->close(*dbs[i], 0);
			if (ret != 0)
				fprintf(stderr, "%s: DB->close: %s\n", progname,
				    db_strerror(ret));
			*dbs[i] = NULL;
		}
	}
	if (env != NULL) {
		int ret = env->close(env, 0);
		if (ret != 0)
			fprintf(stderr, "%s: DB_ENV->close: %s\n", progname,
			    db_strerror(ret));
		env = NULL;
	}
}

static void fail(int ret, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (ret != 0)
		fprintf(stderr, ": %s", db_strerror(ret));
	fputc('\n', stderr);
	close_all();
	exit(1);
}

static DB *open_db(const char *name, DBTYPE type, uint32_t pagesize, int chksum)
{
	DB *dbp;
	int ret;
	if ((ret = db_create(&dbp, env, 0)) != 0)
		fail(ret, "db_create(%s)", name);
	if (pagesize != 0 && (ret = dbp->set_pagesize(dbp, pagesize)) != 0)
		fail(ret, "DB->set_pagesize(%s, %u)", name, pagesize);
	if (chksum && (ret = dbp->set_flags(dbp, DB_CHKSUM)) != 0)
		fail(ret, "DB->set_flags(%s, DB_CHKSUM)", name);
	if ((ret = dbp->open(dbp, NULL, name, NULL, type,
	    DB_AUTO_COMMIT | DB_CREATE, 0664)) != 0) {
		dbp->close(dbp, 0);
		fail(ret, "DB->open(%s)", name);
	}
	return dbp;
}

static int put(DB *dbp, DB_TXN *txn, uint64_t key, const void *val, uint32_t len)
{
	unsigned char kb[8];
	DBT k, d;
	tw_put_be64(kb, key);
	memset(&k, 0, sizeof k);
	memset(&d, 0, sizeof d);
	k.data = kb;
	k.size = 8;
	d.data = (void *)val;
	d.size = len;
	return dbp->put(dbp, txn, &k, &d, 0);
}

/* All writes of transaction t inside txn. Returns 0 or a DB error. */
static int do_writes(DB_TXN *txn, uint64_t t, uint32_t u, uint32_t v,
    unsigned char *vbuf, uint64_t *ukeys)
{
	int ret;
	tw_value(vbuf, 'd', t, t, u, v);
	if ((ret = put(dbp_data, txn, t, vbuf, v)) != 0)
		return ret;
	uint32_t n = tw_update_keys(t, u, ukeys);
	for (uint32_t i = 0; i < n; i++) {
		tw_value(vbuf, 'd', ukeys[i], t, u, v);
		if ((ret = put(dbp_data, txn, ukeys[i], vbuf, v)) != 0)
			return ret;
	}
	tw_value(vbuf, 'h', t, t, u, v);
	if ((ret = put(dbp_hash, txn, t, vbuf, v)) != 0)
		return ret;
	tw_value(vbuf, 'm', t, t, u, v);
	if ((ret = put(dbp_meta, txn, t, vbuf, v)) != 0)
		return ret;
	unsigned char tb[8];
	tw_put_be64(tb, t);
	return put(dbp_meta, txn, 0, tb, 8);
}

int main(int argc, char **argv)
{
	const char *home = NULL, *lsn_path = NULL;
	const char *wait_socket = NULL, *durable_path = NULL;
	uint64_t ntxn = 0, tsecs = 0, rate = 0, ckp_every = 0;
	uint64_t lg_max = 1048576, cache_mb = 8, pagesize = 0;
	uint64_t updates = 3, vlen = 100, open_k = 0;
	int64_t open_secs = 0;
	int have_T = 0, have_o = 0, have_O = 0, chksum = 0, recover = 0;
	int fullsync = 0, quiet = 0;
	int ch, ret;

	while ((ch = getopt(argc, argv, "h:n:T:r:c:m:M:p:Ku:v:O:o:L:RSqW:D:")) != -1) {
		switch (ch) {
		case 'h': home = optarg; break;
		case 'n': ntxn = parse_u64(optarg, "-n"); break;
		case 'T': tsecs = parse_u64(optarg, "-T"); have_T = 1; break;
		case 'r': rate = parse_u64(optarg, "-r"); break;
		case 'c': ckp_every = parse_u64(optarg, "-c"); break;
		case 'm': lg_max = parse_u64(optarg, "-m"); break;
		case 'M': cache_mb = parse_u64(optarg, "-M"); break;
		case 'p': pagesize = parse_u64(optarg, "-p"); break;
		case 'K': chksum = 1; break;
		case 'u': updates = parse_u64(optarg, "-u"); break;
		case 'v': vlen = parse_u64(optarg, "-v"); break;
		case 'O': open_k = parse_u64(optarg, "-O"); have_O = 1; break;
		case 'o': open_secs = parse_i64(optarg, "-o"); have_o = 1; break;
		case 'L': lsn_path = optarg; break;
		case 'R': recover = 1; break;
		case 'S': fullsync = 1; break;
		case 'q': quiet = 1; break;
		case 'W': wait_socket = optarg; break;
		case 'D': durable_path = optarg; break;
		default: die_usage("unknown option");
		}
	}
	if (optind != argc)
		die_usage("unexpected arguments");
	if (home == NULL)
		die_usage("-h ENVDIR is required");
	if (vlen < TW_HDR || vlen > TW_MAX_VALUE)
		die_usage("-v must be between 32 and 1048576");
	if (updates > TW_MAX_UPDATES)
		die_usage("-u too large (max 100000)");
	if (lg_max > UINT32_MAX || cache_mb == 0 || cache_mb > 4095 ||
	    pagesize > 65536)
		die_usage("-m, -M or -p out of range");
	if (have_O && !have_o)
		die_usage("-O needs -o");
	if (durable_path != NULL && wait_socket == NULL)
		die_usage("-D needs -W");

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	int lsn_fd = -1;
	if (lsn_path != NULL) {
		lsn_fd = open(lsn_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
		    0644);
		if (lsn_fd < 0) {
			fprintf(stderr, "%s: open %s: %s\n", progname, lsn_path,
			    strerror(errno));
			return 1;
		}
	}

	int durable_fd = -1;
	if (durable_path != NULL) {
		durable_fd = open(durable_path,
		    O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (durable_fd < 0) {
			fprintf(stderr, "%s: open %s: %s\n", progname,
			    durable_path, strerror(errno));
			return 1;
		}
	}

	/* Create ENVDIR itself if missing (BDB's DB_CREATE does not). */
	if (mkdir(home, 0775) != 0 && errno != EEXIST) {
		fprintf(stderr, "%s: mkdir %s: %s\n", progname, home,
		    strerror(errno));
		return 1;
	}
	if ((ret = db_env_create(&env, 0)) != 0)
		fail(ret, "db_env_create");
	env->set_errfile(env, stderr);
	env->set_errpfx(env, progname);
	if ((ret = env->set_lg_max(env, (uint32_t)lg_max)) != 0)
		fail(ret, "DB_ENV->set_lg_max(%" PRIu64 ")", lg_max);
	if ((ret = env->set_cachesize(env, (uint32_t)(cache_mb / 1024),
	    (uint32_t)((cache_mb % 1024) * 1024 * 1024), 1)) != 0)
		fail(ret, "DB_ENV->set_cachesize(%" PRIu64 " MB)", cache_mb);
	/*
	 * The buffer pool sizes its mutex count and hash table for 4 KB pages
	 * unless told otherwise; with smaller pages and a full cache BDB prints
	 * "BDB2034 unable to allocate memory for mutex" for every buffer
	 * (measured: 50,392 lines for -p 1024 -v 3000 -n 3000, yet rc 0).
	 */
	if (pagesize != 0 &&
	    (ret = env->set_mp_pagesize(env, (uint32_t)pagesize)) != 0)
		fail(ret, "DB_ENV->set_mp_pagesize(%" PRIu64 ")", pagesize);
	/* Room for large -u; ignored when joining an existing region. */
	if ((ret = env->set_lk_max_locks(env, 20000)) != 0 ||
	    (ret = env->set_lk_max_objects(env, 20000)) != 0)
		fail(ret, "DB_ENV->set_lk_max_*");
	/* Others (db_dump -h, hot backup tools) may join the environment. */
	if ((ret = env->set_lk_detect(env, DB_LOCK_DEFAULT)) != 0)
		fail(ret, "DB_ENV->set_lk_detect");
	if (!fullsync && (ret = env->set_flags(env, DB_TXN_WRITE_NOSYNC, 1)) != 0)
		fail(ret, "DB_ENV->set_flags(DB_TXN_WRITE_NOSYNC)");
	uint32_t eflags = DB_CREATE | DB_INIT_TXN | DB_INIT_LOG | DB_INIT_LOCK |
	    DB_INIT_MPOOL | (recover ? DB_RECOVER : 0);
	if ((ret = env->open(env, home, eflags, 0664)) != 0)
		fail(ret, "DB_ENV->open(%s)", home);

	dbp_data = open_db("data.db", DB_BTREE, (uint32_t)pagesize, chksum);
	dbp_meta = open_db("meta.db", DB_BTREE, (uint32_t)pagesize, chksum);
	dbp_hash = open_db("hash.db", DB_HASH, (uint32_t)pagesize, chksum);

	/* Continue after the last committed transaction, if any. */
	uint64_t last = 0;
	{
		unsigned char kb[8], vb[8];
		DBT k, d;
		tw_put_be64(kb, 0);
		memset(&k, 0, sizeof k);
		memset(&d, 0, sizeof d);
		k.data = kb;
		k.size = 8;
		d.data = vb;
		d.ulen = sizeof vb;
		d.flags = DB_DBT_USERMEM;
		ret = dbp_meta->get(dbp_meta, NULL, &k, &d, 0);
		if (ret == 0) {
			if (d.size != 8)
				fail(0, "meta.db key 0 has %u bytes, expected 8",
				    d.size);
			last = tw_get_be64(vb);
		} else if (ret != DB_NOTFOUND) {
			fail(ret, "DB->get(meta.db, 0)");
		}
	}
	const uint64_t start = last + 1;
	if (!have_O)
		open_k = start;
	if (have_o && open_k < start)
		fprintf(stderr, "%s: warning: -O %" PRIu64 " is already "
		    "committed (next is %" PRIu64 "); no transaction held open\n",
		    progname, open_k, start);

	unsigned char *vbuf = malloc(vlen);
	uint64_t *ukeys = malloc(sizeof(uint64_t) * (updates ? updates : 1));
	if (vbuf == NULL || ukeys == NULL)
		fail(0, "out of memory");

	const double t0 = now_mono();
	uint64_t done = 0; /* commits in this run */
	while (!stop_requested && (ntxn == 0 || done < ntxn)) {
		if (have_T && now_mono() - t0 >= (double)tsecs)
			break;
		if (rate != 0)
			sleep_until(t0 + (double)done / (double)rate);
		/* A signal during the throttle sleep: nothing started, stop. */
		if (stop_requested)
			break;

		const uint64_t t = last + 1;
		const int hold = have_o && t == open_k;
		int attempt = 0;
		DB_TXN_TOKEN token;
		for (;;) {
			DB_TXN *txn;
			if ((ret = env->txn_begin(env, NULL, &txn, 0)) != 0)
				fail(ret, "DB_ENV->txn_begin(t=%" PRIu64 ")", t);
			ret = do_writes(txn, t, (uint32_t)updates, (uint32_t)vlen,
			    vbuf, ukeys);
			if (ret == DB_LOCK_DEADLOCK || ret == DB_LOCK_NOTGRANTED) {
				int r2 = txn->abort(txn);
				if (r2 != 0)
					fail(r2, "DB_TXN->abort(t=%" PRIu64 ")", t);
				if (++attempt >= 1000)
					fail(ret, "t=%" PRIu64 ": giving up after "
					    "%d deadlocks", t, attempt);
				continue;
			}
			if (ret != 0) {
				txn->abort(txn);
				fail(ret, "write t=%" PRIu64, t);
			}
			if (hold) {
				if ((ret = env->log_flush(env, NULL)) != 0) {
					txn->abort(txn);
					fail(ret, "DB_ENV->log_flush");
				}
				printf("OPEN %" PRIu64 "\n", t);
				fflush(stdout);
				if (open_secs < 0) {
					while (!stop_requested)
						pause();
				} else {
					sleep_until(now_mono() + (double)open_secs);
				}
			}
			if (wait_socket != NULL &&
			    (ret = txn->set_commit_token(txn, &token)) != 0) {
				txn->abort(txn);
				fail(ret, "DB_TXN->set_commit_token");
			}
			if ((ret = txn->commit(txn, 0)) != 0)
				fail(ret, "DB_TXN->commit(t=%" PRIu64 ")", t);
			break;
		}
		last = t;
		done++;

		if (wait_socket != NULL) {
			int w = tandem_wait_token(wait_socket, &token, 1, 10000);
			if (w == TANDEM_WAIT_DURABLE && durable_fd >= 0) {
				char line[32];
				int n = snprintf(line, sizeof line, "%" PRIu64 "\n", t);
				if (write(durable_fd, line, (size_t)n) != n)
					fail(0, "write %s: %s", durable_path,
					    strerror(errno));
			} else if (w != TANDEM_WAIT_DURABLE) {
				fprintf(stderr, "WAIT %" PRIu64 " %d %s\n", t, w,
				    tandem_wait_strerror(w));
			}
		}

		if (lsn_fd >= 0) {
			DB_LOG_STAT *ls;
			if ((ret = env->log_stat(env, &ls, 0)) != 0)
				fail(ret, "DB_ENV->log_stat");
			char line[80];
			int n = snprintf(line, sizeof line, "%" PRIu64 " %u %u\n",
			    t, ls->st_cur_file, ls->st_cur_offset);
			free(ls);
			if (write(lsn_fd, line, (size_t)n) != n)
				fail(0, "write %s: %s", lsn_path, strerror(errno));
		}
		if (!quiet && t % 1000 == 0) {
			printf("COMMITTED %" PRIu64 "\n", t);
			fflush(stdout);
		}
		if (ckp_every != 0 && done % ckp_every == 0 &&
		    (ret = env->txn_checkpoint(env, 0, 0, 0)) != 0)
			fail(ret, "DB_ENV->txn_checkpoint");
	}

	free(vbuf);
	free(ukeys);
	if (lsn_fd >= 0)
		close(lsn_fd);
	if (durable_fd >= 0)
		close(durable_fd);
	DB **dbs[] = { &dbp_data, &dbp_meta, &dbp_hash };
	for (size_t i = 0; i < 3; i++) {
		ret = (*dbs[i])->close(*dbs[i], 0);
		*dbs[i] = NULL;
		if (ret != 0)
			fail(ret, "DB->close");
	}
	ret = env->close(env, 0);
	env = NULL;
	if (ret != 0)
		fail(ret, "DB_ENV->close");
	printf("DONE last=%" PRIu64 "\n", last);
	fflush(stdout);
	return 0;
}
