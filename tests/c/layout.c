/*
 * tandem-layout: puts databases where a plain top-level listing misses them
 * (docs/BDB-NOTES.md §10): HOME/sub/deeper/x.db (btree), HOME/sub/part.db partitioned
 * in two (__dbp.part.db.000/.001) and HOME/sub/queue.db, a queue with
 * two-page extents (__dbq.queue.db.N). Joins (or creates) the transactional
 * environment HOME and commits N transactions, each writing one record to
 * all three, then checkpoints.
 *
 * Usage: tandem-layout HOME N. Prints "DONE N". Errors: stderr, exit 1.
 * Compiled by tests/tests/layout.rs (cc ... -ldb-5.3).
 */
#include <db.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CK(x)                                                              \
	do {                                                               \
		int r_ = (x);                                              \
		if (r_) {                                                  \
			fprintf(stderr, "tandem-layout: %s: %s\n", #x,     \
			    db_strerror(r_));                              \
			exit(1);                                           \
		}                                                          \
	} while (0)

int main(int argc, char **argv)
{
	DB_ENV *env;
	DB *q, *p, *x;
	DB_TXN *t;
	char path[4096], buf[64], kb[32];
	DBT keys[1];
	long n, i;

	if (argc != 3) {
		fprintf(stderr, "usage: tandem-layout HOME N\n");
		return 1;
	}
	n = atol(argv[2]);
	snprintf(path, sizeof path, "%s/sub/deeper", argv[1]);
	mkdir(argv[1], 0755);
	snprintf(path, sizeof path, "%s/sub", argv[1]);
	mkdir(path, 0755);
	snprintf(path, sizeof path, "%s/sub/deeper", argv[1]);
	mkdir(path, 0755);

	CK(db_env_create(&env, 0));
	CK(env->open(env, argv[1], DB_CREATE | DB_INIT_MPOOL | DB_INIT_LOCK |
	    DB_INIT_LOG | DB_INIT_TXN, 0644));
	CK(db_create(&q, env, 0));
	CK(q->set_re_len(q, 64));
	CK(q->set_q_extentsize(q, 2));
	CK(q->open(q, NULL, "sub/queue.db", NULL, DB_QUEUE,
	    DB_CREATE | DB_AUTO_COMMIT, 0644));
	CK(db_create(&p, env, 0));
	memset(keys, 0, sizeof keys);
	keys[0].data = "m";
	keys[0].size = 1;
	CK(p->set_partition(p, 2, keys, NULL));
	CK(p->open(p, NULL, "sub/part.db", NULL, DB_BTREE,
	    DB_CREATE | DB_AUTO_COMMIT, 0644));
	CK(db_create(&x, env, 0));
	CK(x->open(x, NULL, "sub/deeper/x.db", NULL, DB_BTREE,
	    DB_CREATE | DB_AUTO_COMMIT, 0644));
	memset(buf, 'v', sizeof buf);
	for (i = 0; i < n; i++) {
		db_recno_t rn;
		DBT k, d, k2;
		memset(&k, 0, sizeof k);
		memset(&d, 0, sizeof d);
		memset(&k2, 0, sizeof k2);
		k.data = &rn;
		k.ulen = sizeof rn;
		k.flags = DB_DBT_USERMEM;
		d.data = buf;
		d.size = sizeof buf;
		snprintf(kb, sizeof kb, "%c%08ld", 'a' + (int)(i % 26), i);
		k2.data = kb;
		k2.size = strlen(kb);
		CK(env->txn_begin(env, NULL, &t, 0));
		CK(q->put(q, t, &k, &d, DB_APPEND));
		CK(p->put(p, t, &k2, &d, 0));
		CK(x->put(x, t, &k2, &d, 0));
		CK(t->commit(t, 0));
	}
	CK(q->close(q, 0));
	CK(p->close(p, 0));
	CK(x->close(x, 0));
	CK(env->txn_checkpoint(env, 0, 0, 0));
	CK(env->close(env, 0));
	printf("DONE %ld\n", n);
	return 0;
}
