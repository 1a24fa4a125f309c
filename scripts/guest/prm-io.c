/*
 * prm-io: the test guest's I/O load.  Writes stamped 4 KiB blocks with
 * O_DIRECT over a region of the disk, reads each one back (O_DIRECT) and
 * compares, for as long as it runs.  It measures what a guest application
 * sees during a move: the longest interval between two successive I/O
 * completions (the stall), the latency of the first command after that
 * stall, the median latency, errors and mismatches.
 *
 * Control lines on standard input (the serial console):
 *   mark    print "PRM window ..." for the time since the last mark, reset it
 *           (a stall in progress counts in the window where it ends); its
 *           now_us lets the host map guest times to its own clock
 *   pause   stop the load (no command of it in flight afterwards): "PRM paused"
 *   fence   stop the load; one O_DIRECT write and one SG_IO WRITE(10): print
 *           "PRM fence write_errno=E sg_status=0xSS" (0x18: RESERVATION CONFLICT)
 *   quit    print "PRM done ..." and exit
 * A gap of 20 ms or more prints "PRM stall at_us=T gap_us=G" (T: CLOCK_MONOTONIC,
 * the clock of the kernel's log timestamps), and the next completion
 * "PRM after at_us=T lat_us=L": the latency of the first command after it.
 * Every line it prints starts with "PRM " and is "key=value" pairs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <scsi/sg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAX_LAT 200000
#define MAX_ERR_LINES 20
#define STALL_LINE_US 20000 /* gaps this long are printed with their time */
#define MAX_STALL_LINES 3000

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

struct window {
	uint64_t start, last_done, max_gap, max_gap_at, after_gap;
	uint64_t ops, errors, mismatches;
	int want_after;
	uint32_t nlat;
	uint32_t lat[MAX_LAT];
};

static struct window w;
static uint64_t total_ops, total_errors, total_mismatches, err_lines, stall_lines;
static int after_stall;

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

/* A new window; the gap in progress goes on (it counts where it ends). */
static void window_reset(uint64_t t)
{
	w.start = t;
	w.max_gap = w.max_gap_at = w.after_gap = 0;
	w.ops = w.errors = w.mismatches = 0;
	w.want_after = 0;
	w.nlat = 0;
}

static void window_print(const char *what)
{
	uint64_t med = 0;
	if (w.nlat) {
		qsort(w.lat, w.nlat, sizeof w.lat[0], cmp_u32);
		med = w.lat[w.nlat / 2];
	}
	printf("PRM %s ops=%llu errors=%llu mismatches=%llu max_gap_us=%llu after_gap_us=%llu "
	       "median_us=%llu window_us=%llu now_us=%llu total_ops=%llu total_errors=%llu total_mismatches=%llu\n",
	       what, (unsigned long long)w.ops, (unsigned long long)w.errors,
	       (unsigned long long)w.mismatches, (unsigned long long)w.max_gap,
	       (unsigned long long)w.after_gap, (unsigned long long)med,
	       (unsigned long long)(now_us() - w.start), (unsigned long long)now_us(), (unsigned long long)total_ops,
	       (unsigned long long)total_errors, (unsigned long long)total_mismatches);
	fflush(stdout);
}

/* One completion: the gap since the previous one and this command's latency. */
static void completed(uint64_t started, uint64_t done)
{
	uint64_t gap = done - w.last_done, lat = done - started;
	if (after_stall) {
		printf("PRM after at_us=%llu lat_us=%llu\n", (unsigned long long)done, (unsigned long long)lat);
		after_stall = 0;
	}
	if (w.want_after) {
		w.after_gap = lat;
		w.want_after = 0;
	}
	if (gap >= STALL_LINE_US && stall_lines++ < MAX_STALL_LINES) {
		printf("PRM stall at_us=%llu gap_us=%llu\n", (unsigned long long)done,
		       (unsigned long long)gap);
		after_stall = 1;
	}
	if (gap > w.max_gap) {
		w.max_gap = gap;
		w.max_gap_at = done - w.start;
		w.want_after = 1;
	}
	w.last_done = done;
	if (w.nlat < MAX_LAT)
		w.lat[w.nlat++] = (uint32_t)(lat > 0xffffffffu ? 0xffffffffu : lat);
	w.ops++;
	total_ops++;
}

/* SCSI status of one WRITE(10) of block lba through SG_IO (-1: no answer). */
static int sg_write_status(int fd, uint32_t lba, unsigned char *buf)
{
	unsigned char cdb[10] = {0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	unsigned char sense[32];
	sg_io_hdr_t io;
	uint32_t blocks = BS / 512;
	lba *= BS / 512;
	cdb[2] = lba >> 24; cdb[3] = lba >> 16; cdb[4] = lba >> 8; cdb[5] = lba;
	cdb[7] = blocks >> 8; cdb[8] = blocks;
	memset(&io, 0, sizeof io);
	io.interface_id = 'S';
	io.dxfer_direction = SG_DXFER_TO_DEV;
	io.cmd_len = sizeof cdb;
	io.cmdp = cdb;
	io.dxfer_len = BS;
	io.dxferp = buf;
	io.mx_sb_len = sizeof sense;
	io.sbp = sense;
	io.timeout = 20000;
	if (ioctl(fd, SG_IO, &io) < 0)
		return -1;
	return io.status;
}

static void stamp(unsigned char *buf, uint64_t seq, uint32_t lba)
{
	for (size_t i = 0; i < BS; i += 16) {
		memcpy(buf + i, &seq, 8);
		memcpy(buf + i + 8, &lba, 4);
		memcpy(buf + i + 12, "PRMg", 4);
	}
}

static void report_error(int fd, const char *op, uint32_t lba, int err, unsigned char *buf)
{
	w.errors++;
	total_errors++;
	if (err_lines++ < MAX_ERR_LINES) {
		int st = sg_write_status(fd, lba, buf);
		printf("PRM error op=%s lba=%u errno=%d sg_status=0x%02x\n", op, lba, err, st & 0xff);
		fflush(stdout);
	}
	usleep(10000);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: prm-io DEVICE FIRST_BLOCK BLOCKS\n");
		return 2;
	}
	uint32_t first = (uint32_t)strtoul(argv[2], NULL, 0);
	uint32_t count = (uint32_t)strtoul(argv[3], NULL, 0);
	int fd = open(argv[1], O_RDWR | O_DIRECT);
	if (fd < 0 || count == 0) {
		printf("PRM fatal open errno=%d\n", errno);
		return 1;
	}
	unsigned char *wbuf, *rbuf;
	if (posix_memalign((void **)&wbuf, BS, BS) || posix_memalign((void **)&rbuf, BS, BS))
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	window_reset(now_us());
	w.last_done = w.start;
	printf("PRM io started device=%s first=%u blocks=%u\n", argv[1], first, count);
	char line[128];
	size_t used = 0;
	uint64_t seq = 0;
	int running = 1;
	for (;;) {
		struct pollfd p = {.fd = 0, .events = POLLIN};
		if (poll(&p, 1, running ? 0 : 1000) > 0) {
			ssize_t n = read(0, line + used, sizeof line - 1 - used);
			if (n <= 0) {
				/* no console input: keep running */
			} else {
				used += (size_t)n;
				line[used] = 0;
				char *nl;
				while ((nl = strchr(line, '\n')) != NULL) {
					*nl = 0;
					if (strstr(line, "mark")) {
						window_print("window");
						window_reset(now_us());
					} else if (strstr(line, "pause")) {
						running = 0;
						printf("PRM paused total_ops=%llu\n", (unsigned long long)total_ops);
					} else if (strstr(line, "fence")) {
						running = 0;
						uint32_t lba = first;
						stamp(wbuf, ++seq, lba);
						ssize_t r = pwrite(fd, wbuf, BS, (off_t)lba * BS);
						int e = r == BS ? 0 : errno;
						int st = sg_write_status(fd, lba, wbuf);
						printf("PRM fence write_errno=%d sg_status=0x%02x\n", e, st & 0xff);
					} else if (strstr(line, "quit")) {
						window_print("done");
						return 0;
					}
					memmove(line, nl + 1, used - (size_t)(nl + 1 - line) + 1);
					used -= (size_t)(nl + 1 - line);
				}
				if (used >= sizeof line - 1)
					used = 0;
			}
		}
		if (!running)
			continue;
		uint32_t lba = first + (uint32_t)(seq % count);
		stamp(wbuf, ++seq, lba);
		uint64_t t0 = now_us();
		if (pwrite(fd, wbuf, BS, (off_t)lba * BS) != BS) {
			report_error(fd, "write", lba, errno, wbuf);
			continue;
		}
		uint64_t t1 = now_us();
		completed(t0, t1);
		memset(rbuf, 0, BS);
		if (pread(fd, rbuf, BS, (off_t)lba * BS) != BS) {
			report_error(fd, "read", lba, errno, wbuf);
			continue;
		}
		completed(t1, now_us());
		if (memcmp(wbuf, rbuf, BS) != 0) {
			w.mismatches++;
			total_mismatches++;
			if (err_lines++ < MAX_ERR_LINES)
				printf("PRM mismatch lba=%u seq=%llu\n", lba, (unsigned long long)seq);
		}
	}
}
