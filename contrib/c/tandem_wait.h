/*
 * tandem_wait: wait until a Berkeley DB commit is durable on Tandem
 * standbys, from the application that made it.
 *
 * Tandem replicates asynchronously; for the transactions that matter, an
 * application commits with a commit token and then waits on the primary's
 * wait socket (tandem-primary run serves it, by default at
 * ENV/.tandem-primary/wait.sock, owner-only) until K connected standbys
 * hold the commit record fsynced. This is PostgreSQL's
 * synchronous_commit = on: other sessions may see the data before the wait
 * returns, and if the primary dies before, the transaction may be lost
 * (the wait never said it was safe).
 *
 *     DB_TXN_TOKEN token;
 *     txn->set_commit_token(txn, &token);
 *     txn->commit(txn, 0);
 *     if (tandem_wait_token(sock, &token, 1, 5000) != TANDEM_WAIT_DURABLE)
 *         ... not known to be on a standby: retry, alert, or refuse ...
 *
 * Each call opens one connection to the socket, sends one request
 * (WAIT <file> <offset> <k> <timeout_ms>) and reads one reply line; calls
 * from many threads are independent and share the standbys' acks on the
 * primary. No dependency beyond libc and libdb's header. Thread-safe.
 */
#ifndef TANDEM_WAIT_H
#define TANDEM_WAIT_H

#include <db.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. */
#define TANDEM_WAIT_DURABLE 0    /* K connected standbys hold the record */
#define TANDEM_WAIT_TIMEOUT 1    /* not within timeout_ms: no standby, fewer than K, or behind */
#define TANDEM_WAIT_NO_PRIMARY 2 /* nothing listens on the socket: no primary runs */
#define TANDEM_WAIT_ERROR 3      /* bad arguments, refused request, I/O or protocol error */

/*
 * Waits until the log record that starts at LSN file/offset is fsynced on
 * at least k (1..64) connected standbys, at most timeout_ms milliseconds
 * (0..86400000; 0 answers from what the primary knows now).
 */
int tandem_wait_lsn(const char *socket_path, uint32_t file, uint32_t offset,
    int k, int timeout_ms);

/*
 * The same for the commit that filled *token (DB_TXN->set_commit_token):
 * its LSN is big-endian in bytes 12..15 (file) and 16..19 (offset).
 */
int tandem_wait_token(const char *socket_path, const DB_TXN_TOKEN *token,
    int k, int timeout_ms);

/* A short English description of a return code. */
const char *tandem_wait_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif
