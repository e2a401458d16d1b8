/* SPDX-License-Identifier: Apache-2.0 */
/* appendlog.c: one append to the access log, made only while the log's path
 * still names the open file. Python makes the same check, but between its
 * stat() and its write() the writer thread waits for the GIL, for milliseconds
 * on a busy node: a rename by logrotate (`create`) in that gap sent a whole
 * batch into the rotated file after a shipper (rsyslog's imfile) had read it to
 * its end and closed it. Called through ctypes, which holds no GIL while here,
 * the gap between the check and the write is a few system calls long. */
#include <errno.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define AL_MOVED (-1)

/* Write len bytes of buf at fd (O_APPEND) if path names the same file as fd.
 * Returns 0 (all written), AL_MOVED (path names another file or none; nothing
 * written) or an errno (*written bytes of buf are in the file). */
int al_append_current(int fd, const char *path, const char *buf, size_t len,
		      size_t *written)
{
	struct stat at_path, open_file;

	*written = 0;
	if (stat(path, &at_path) != 0) {
		if (errno == ENOENT)
			return AL_MOVED;
		return errno;
	}
	if (fstat(fd, &open_file) != 0)
		return errno;
	if (at_path.st_dev != open_file.st_dev || at_path.st_ino != open_file.st_ino)
		return AL_MOVED;
	while (*written < len) {
		ssize_t n = write(fd, buf + *written, len - *written);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (n == 0)
			return EIO;
		*written += (size_t)n;
	}
	return 0;
}
