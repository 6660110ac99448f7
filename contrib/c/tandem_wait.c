/*
 * tandem_wait: the C client of tandem-primary's wait socket (see
 * tandem_wait.h and README "Waiting for a commit").
 */
#define _GNU_SOURCE
#include "tandem_wait.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* Longest reply read; replies are a line of well under this. */
#define TW_REPLY_MAX 512
/* How long past its timeout the client waits for a reply from a primary
 * that hangs, in seconds. */
#define TW_REPLY_GRACE_S 10

static uint32_t be32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	    ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int send_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		/* MSG_NOSIGNAL: a primary that closed must not kill the caller. */
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Fills sa with the address of the socket file at path. A path longer than
 * sun_path (environments live at deep paths) is reached through a handle
 * on its directory, /proc/self/fd/N/NAME, returned in *dirfd for the caller
 * to close after connect (-1 when not needed). Returns 0 or -1.
 */
static int socket_address(const char *path, struct sockaddr_un *sa, int *dirfd)
{
	*dirfd = -1;
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	size_t len = strlen(path);
	if (len < sizeof sa->sun_path) {
		memcpy(sa->sun_path, path, len + 1);
		return 0;
	}
	const char *slash = strrchr(path, '/');
	if (slash == NULL || slash[1] == '\0') {
		errno = ENAMETOOLONG;
		return -1;
	}
	char dir[4096];
	size_t dlen = slash == path ? 1 : (size_t)(slash - path);
	if (dlen >= sizeof dir) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(dir, path, dlen);
	dir[dlen] = '\0';
	int fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int n = snprintf(sa->sun_path, sizeof sa->sun_path, "/proc/self/fd/%d/%s",
	    fd, slash + 1);
	if (n < 0 || (size_t)n >= sizeof sa->sun_path) {
		close(fd);
		errno = ENAMETOOLONG;
		return -1;
	}
	*dirfd = fd;
	return 0;
}

int tandem_wait_lsn(const char *socket_path, uint32_t file, uint32_t offset,
    int k, int timeout_ms)
{
	struct sockaddr_un sa;
	int dirfd;
	if (socket_path == NULL || k < 1 || k > 64 || timeout_ms < 0 ||
	    timeout_ms > 86400000)
		return TANDEM_WAIT_ERROR;
	if (socket_address(socket_path, &sa, &dirfd) != 0)
		return errno == ENOENT ? TANDEM_WAIT_NO_PRIMARY : TANDEM_WAIT_ERROR;

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		if (dirfd >= 0)
			close(dirfd);
		return TANDEM_WAIT_ERROR;
	}
	int r;
	do {
		r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	} while (r != 0 && errno == EINTR);
	int e = errno;
	if (dirfd >= 0)
		close(dirfd);
	if (r != 0) {
		close(fd);
		return (e == ENOENT || e == ECONNREFUSED) ?
		    TANDEM_WAIT_NO_PRIMARY : TANDEM_WAIT_ERROR;
	}
	struct timeval tv;
	tv.tv_sec = timeout_ms / 1000 + TW_REPLY_GRACE_S;
	tv.tv_usec = (timeout_ms % 1000) * 1000;
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

	char req[96];
	int len = snprintf(req, sizeof req, "WAIT %u %u %d %d\n", file, offset,
	    k, timeout_ms);
	if (len <= 0 || (size_t)len >= sizeof req ||
	    send_all(fd, req, (size_t)len) != 0) {
		close(fd);
		return TANDEM_WAIT_ERROR;
	}

	char reply[TW_REPLY_MAX];
	size_t got = 0;
	for (;;) {
		if (got == sizeof reply - 1) {
			close(fd);
			return TANDEM_WAIT_ERROR;
		}
		ssize_t n = recv(fd, reply + got, sizeof reply - 1 - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* Closed before a whole line, or no reply in time. */
			close(fd);
			return TANDEM_WAIT_ERROR;
		}
		got += (size_t)n;
		if (memchr(reply, '\n', got) != NULL)
			break;
	}
	close(fd);
	reply[got] = '\0';
	if (strncmp(reply, "DURABLE ", 8) == 0)
		return TANDEM_WAIT_DURABLE;
	if (strncmp(reply, "TIMEOUT ", 8) == 0)
		return TANDEM_WAIT_TIMEOUT;
	return TANDEM_WAIT_ERROR;
}

int tandem_wait_token(const char *socket_path, const DB_TXN_TOKEN *token,
    int k, int timeout_ms)
{
	if (token == NULL)
		return TANDEM_WAIT_ERROR;
	/* docs/BDB-NOTES.md §10: bytes 12..15 LSN file, 16..19 LSN offset, big-endian. */
	return tandem_wait_lsn(socket_path, be32(token->buf + 12),
	    be32(token->buf + 16), k, timeout_ms);
}

const char *tandem_wait_strerror(int code)
{
	switch (code) {
	case TANDEM_WAIT_DURABLE:
		return "durable on the standbys asked for";
	case TANDEM_WAIT_TIMEOUT:
		return "timed out: not durable on the standbys asked for";
	case TANDEM_WAIT_NO_PRIMARY:
		return "no primary listens on the wait socket";
	default:
		return "error: bad arguments, refused request, or I/O error";
	}
}
