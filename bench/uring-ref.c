/*
 * uring-ref.c - C/liburing reference side of the ring benchmark.
 *
 * The TypeScript io_uring (src/uring) is measured by bench/uring.ts; this
 * program does the same work through liburing so the two can be compared
 * on the same machine.
 *
 * Build:  gcc -O2 -o /tmp/uring-ref bench/uring-ref.c -luring
 *         (Debian bookworm: apt-get install -y liburing-dev, liburing 2.3)
 *
 * Usage:
 *   uring-ref [--flags=LIST] nop  BATCH SECONDS
 *   uring-ref [--flags=LIST] read FILE QD SECONDS
 *
 *   LIST is a comma-separated list of ring setup flags, any of
 *     single_issuer, defer_taskrun, coop_taskrun, taskrun_flag, submit_all
 *   (or "none"). The same list can be given in the environment variable
 *   URING_REF_FLAGS; --flags on the command line wins. Note that the kernel
 *   rejects defer_taskrun without single_issuer (EINVAL).
 *
 * Modes:
 *   nop  - ring of 256 entries. Each iteration gets BATCH SQEs, preps a NOP
 *          in each with user_data = a running sequence number, calls
 *          io_uring_submit_and_wait(ring, BATCH), then reaps every available
 *          CQE with io_uring_for_each_cqe + io_uring_cq_advance, checking
 *          res == 0 and that user_data comes back in sequence (aborts on a
 *          mismatch).
 *   read - ring of 64 entries. Random 4 KiB buffered reads (no O_DIRECT),
 *          4 KiB aligned, over the whole file, QD reads in flight at all
 *          times, each slot with its own 4 KiB buffer (posix_memalign).
 *          Each iteration: io_uring_submit_and_wait(ring, 1), reap all ready
 *          CQEs (checking res == 4096), and re-arm each completed slot with a
 *          new random read, so the SQ always refills the ring to QD.
 *
 *   Random offsets come from xorshift64 (Marsaglia 13/7/17), 64-bit
 *   unsigned state, seeded with the constant XORSHIFT_SEED below:
 *       x ^= x << 13;  x ^= x >> 7;  x ^= x << 17;
 *       block  = x & (nblocks - 1)     if nblocks is a power of two,
 *       block  = x % nblocks           otherwise;  nblocks = file_size / 4096
 *   (the benchmark file is 256 MiB, so the mask: a 64-bit division per read
 *   would cost the C side ~10 ns and the JS side, which must emulate it on
 *   doubles, far more -- the point is to time the rings, not the generator.)
 *       offset = block * 4096;
 *   One value is drawn per read issued, first for slots 0..QD-1 in order,
 *   then one per completion in the order the CQEs are reaped.
 *
 * Timing: both modes run a 0.2 s warm-up (not counted), then the measured
 * phase of SECONDS. The clock (clock_gettime(CLOCK_MONOTONIC)) is read every
 * 1000 loop iterations, so the measured window overshoots SECONDS slightly;
 * "seconds" in the output is the actual elapsed time of the measured phase
 * and "ops" the CQEs reaped in it.
 *
 * Output: one line of JSON on stdout, e.g.
 *   {"mode":"nop","batch":8,"flags":"none","ops":N,"seconds":S,"ops_per_sec":X}
 *   {"mode":"read","qd":32,"flags":"none","ops":N,"seconds":S,"ops_per_sec":X}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NOP_RING_ENTRIES 256
#define READ_RING_ENTRIES 64
#define IO_SIZE 4096
#define WARMUP_SECONDS 0.2
#define CLOCK_CHECK_EVERY 1000 /* loop iterations between clock reads */
#define XORSHIFT_SEED 0x9E3779B97F4A7C15ULL

/* ------------------------------------------------------------------ */
/* helpers                                                            */
/* ------------------------------------------------------------------ */

static void die(const char *what, int err)
{
	fprintf(stderr, "uring-ref: %s: %s\n", what, strerror(err));
	exit(1);
}

static double now_sec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t xorshift64(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

static long parse_long(const char *s, const char *name, long min, long max)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < min || v > max) {
		fprintf(stderr, "uring-ref: bad %s '%s' (want %ld..%ld)\n",
			name, s, min, max);
		exit(2);
	}
	return v;
}

static double parse_seconds(const char *s)
{
	char *end;
	double v = strtod(s, &end);
	if (*end || !(v > 0)) {
		fprintf(stderr, "uring-ref: bad SECONDS '%s'\n", s);
		exit(2);
	}
	return v;
}

/* Map "single_issuer,defer_taskrun,..." to IORING_SETUP_* bits. */
static const struct {
	const char *name;
	unsigned flag;
} flag_names[] = {
	{ "single_issuer", IORING_SETUP_SINGLE_ISSUER },
	{ "defer_taskrun", IORING_SETUP_DEFER_TASKRUN },
	{ "coop_taskrun", IORING_SETUP_COOP_TASKRUN },
	{ "taskrun_flag", IORING_SETUP_TASKRUN_FLAG },
	{ "submit_all", IORING_SETUP_SUBMIT_ALL },
};

static unsigned parse_flags(const char *list)
{
	unsigned flags = 0;
	char *copy = strdup(list), *save = NULL;
	for (char *tok = strtok_r(copy, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		if (!strcmp(tok, "none") || !*tok)
			continue;
		size_t i;
		for (i = 0; i < sizeof(flag_names) / sizeof(flag_names[0]); i++)
			if (!strcmp(tok, flag_names[i].name))
				break;
		if (i == sizeof(flag_names) / sizeof(flag_names[0])) {
			fprintf(stderr, "uring-ref: unknown flag '%s'\n", tok);
			exit(2);
		}
		flags |= flag_names[i].flag;
	}
	free(copy);
	return flags;
}

/* Canonical spelling of the flags for the JSON output. */
static void format_flags(unsigned flags, char *out, size_t len)
{
	out[0] = '\0';
	for (size_t i = 0; i < sizeof(flag_names) / sizeof(flag_names[0]); i++) {
		if (!(flags & flag_names[i].flag))
			continue;
		if (out[0])
			strncat(out, ",", len - strlen(out) - 1);
		strncat(out, flag_names[i].name, len - strlen(out) - 1);
	}
	if (!out[0])
		snprintf(out, len, "none");
}

static void ring_init(struct io_uring *ring, unsigned entries, unsigned flags)
{
	int ret;
	if (flags == 0) {
		/* The plain setup the brief asks for. */
		ret = io_uring_queue_init(entries, ring, 0);
	} else {
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		p.flags = flags;
		ret = io_uring_queue_init_params(entries, ring, &p);
	}
	if (ret < 0)
		die("io_uring_queue_init", -ret);
}

/* io_uring_submit_and_wait, retrying on EINTR; dies on other errors. */
static void submit_and_wait(struct io_uring *ring, unsigned wait_nr)
{
	int ret;
	do {
		ret = io_uring_submit_and_wait(ring, wait_nr);
	} while (ret == -EINTR);
	if (ret < 0)
		die("io_uring_submit_and_wait", -ret);
}

static struct io_uring_sqe *get_sqe(struct io_uring *ring)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	if (!sqe) {
		/* Cannot happen: batch/QD are bounded by the ring size. */
		fprintf(stderr, "uring-ref: SQ ring full\n");
		exit(1);
	}
	return sqe;
}

/* ------------------------------------------------------------------ */
/* nop mode                                                           */
/* ------------------------------------------------------------------ */

struct nop_state {
	struct io_uring ring;
	unsigned batch;
	uint64_t next_submit; /* user_data of the next SQE we prep */
	uint64_t next_expect; /* user_data the next CQE must carry */
};

/* Run the nop loop until `seconds` have passed; returns CQEs reaped. */
static uint64_t nop_run(struct nop_state *st, double seconds, double *elapsed)
{
	struct io_uring *ring = &st->ring;
	uint64_t ops = 0;
	double start = now_sec(), end = start + seconds, t = start;

	for (unsigned long iter = 1;; iter++) {
		for (unsigned i = 0; i < st->batch; i++) {
			struct io_uring_sqe *sqe = get_sqe(ring);
			io_uring_prep_nop(sqe);
			io_uring_sqe_set_data64(sqe, st->next_submit++);
		}
		submit_and_wait(ring, st->batch);

		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(ring, head, cqe) {
			if (cqe->res != 0) {
				fprintf(stderr, "uring-ref: nop res %d\n", cqe->res);
				abort();
			}
			if (cqe->user_data != st->next_expect) {
				fprintf(stderr,
					"uring-ref: nop user_data %" PRIu64
					", expected %" PRIu64 "\n",
					(uint64_t)cqe->user_data, st->next_expect);
				abort();
			}
			st->next_expect++;
			seen++;
		}
		io_uring_cq_advance(ring, seen);
		ops += seen;

		if (iter % CLOCK_CHECK_EVERY == 0) {
			t = now_sec();
			if (t >= end)
				break;
		}
	}
	*elapsed = t - start;
	return ops;
}

static int mode_nop(int argc, char **argv, unsigned flags, const char *fl)
{
	if (argc != 2) {
		fprintf(stderr, "usage: uring-ref nop BATCH SECONDS\n");
		return 2;
	}
	struct nop_state st = { 0 };
	st.batch = (unsigned)parse_long(argv[0], "BATCH", 1, NOP_RING_ENTRIES);
	double seconds = parse_seconds(argv[1]);

	ring_init(&st.ring, NOP_RING_ENTRIES, flags);

	double elapsed;
	nop_run(&st, WARMUP_SECONDS, &elapsed); /* warm-up, discarded */
	uint64_t ops = nop_run(&st, seconds, &elapsed);

	/* Everything submitted must have come back. */
	if (st.next_expect != st.next_submit) {
		fprintf(stderr, "uring-ref: %" PRIu64 " nops outstanding\n",
			st.next_submit - st.next_expect);
		abort();
	}
	io_uring_queue_exit(&st.ring);

	printf("{\"mode\":\"nop\",\"batch\":%u,\"flags\":\"%s\",\"ops\":%" PRIu64
	       ",\"seconds\":%.6f,\"ops_per_sec\":%.1f}\n",
	       st.batch, fl, ops, elapsed, (double)ops / elapsed);
	return 0;
}

/* ------------------------------------------------------------------ */
/* read mode                                                          */
/* ------------------------------------------------------------------ */

struct read_state {
	struct io_uring ring;
	int fd;
	unsigned qd;
	uint64_t nblocks;
	uint64_t rng;
	void **bufs; /* one 4 KiB aligned buffer per slot */
};

/* Queue (not submit) a random 4 KiB read into `slot`. */
static void queue_read(struct read_state *st, unsigned slot)
{
	uint64_t x = xorshift64(&st->rng);
	uint64_t block = (st->nblocks & (st->nblocks - 1)) == 0 ?
		x & (st->nblocks - 1) : x % st->nblocks;
	struct io_uring_sqe *sqe = get_sqe(&st->ring);
	io_uring_prep_read(sqe, st->fd, st->bufs[slot], IO_SIZE,
			   block * IO_SIZE);
	io_uring_sqe_set_data64(sqe, slot);
}

/* Run the read loop until `seconds` have passed; returns CQEs reaped.
 * On entry and on return every one of the QD slots holds a read that is
 * either in flight or queued in the SQ ring awaiting the next submit. */
static uint64_t read_run(struct read_state *st, double seconds, double *elapsed)
{
	struct io_uring *ring = &st->ring;
	uint64_t ops = 0;
	double start = now_sec(), end = start + seconds, t = start;

	for (unsigned long iter = 1;; iter++) {
		/* Submits the re-armed reads queued below (or the initial QD). */
		submit_and_wait(ring, 1);

		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(ring, head, cqe) {
			if (cqe->res != IO_SIZE) {
				fprintf(stderr, "uring-ref: read res %d%s%s\n",
					cqe->res, cqe->res < 0 ? ": " : "",
					cqe->res < 0 ? strerror(-cqe->res) : "");
				abort();
			}
			uint64_t slot = cqe->user_data;
			if (slot >= st->qd) {
				fprintf(stderr, "uring-ref: bad slot %" PRIu64 "\n",
					slot);
				abort();
			}
			/* Refill the slot straight away; the SQ ring is
			 * separate from the CQ ring, so this is safe here. */
			queue_read(st, (unsigned)slot);
			seen++;
		}
		io_uring_cq_advance(ring, seen);
		ops += seen;

		if (iter % CLOCK_CHECK_EVERY == 0) {
			t = now_sec();
			if (t >= end)
				break;
		}
	}
	*elapsed = t - start;
	return ops;
}

static int mode_read(int argc, char **argv, unsigned flags, const char *fl)
{
	if (argc != 3) {
		fprintf(stderr, "usage: uring-ref read FILE QD SECONDS\n");
		return 2;
	}
	struct read_state st = { 0 };
	const char *path = argv[0];
	st.qd = (unsigned)parse_long(argv[1], "QD", 1, READ_RING_ENTRIES);
	double seconds = parse_seconds(argv[2]);
	st.rng = XORSHIFT_SEED;

	st.fd = open(path, O_RDONLY); /* buffered: no O_DIRECT */
	if (st.fd < 0)
		die(path, errno);
	struct stat sb;
	if (fstat(st.fd, &sb) < 0)
		die("fstat", errno);
	st.nblocks = (uint64_t)sb.st_size / IO_SIZE;
	if (st.nblocks == 0) {
		fprintf(stderr, "uring-ref: %s is smaller than 4 KiB\n", path);
		return 1;
	}

	st.bufs = calloc(st.qd, sizeof(*st.bufs));
	if (!st.bufs)
		die("calloc", ENOMEM);
	for (unsigned i = 0; i < st.qd; i++) {
		int err = posix_memalign(&st.bufs[i], IO_SIZE, IO_SIZE);
		if (err)
			die("posix_memalign", err);
	}

	ring_init(&st.ring, READ_RING_ENTRIES, flags);

	/* Fill the ring to QD; read_run's first submit sends them. */
	for (unsigned i = 0; i < st.qd; i++)
		queue_read(&st, i);

	double elapsed;
	read_run(&st, WARMUP_SECONDS, &elapsed); /* warm-up, discarded */
	uint64_t ops = read_run(&st, seconds, &elapsed);

	/* Reads still in flight are completed or cancelled by the kernel on
	 * ring teardown; the re-armed ones never got submitted. */
	io_uring_queue_exit(&st.ring);
	for (unsigned i = 0; i < st.qd; i++)
		free(st.bufs[i]);
	free(st.bufs);
	close(st.fd);

	printf("{\"mode\":\"read\",\"qd\":%u,\"flags\":\"%s\",\"ops\":%" PRIu64
	       ",\"seconds\":%.6f,\"ops_per_sec\":%.1f}\n",
	       st.qd, fl, ops, elapsed, (double)ops / elapsed);
	return 0;
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	const char *flag_list = getenv("URING_REF_FLAGS");
	char *pos[8];
	int npos = 0;

	for (int i = 1; i < argc; i++) {
		if (!strncmp(argv[i], "--flags=", 8)) {
			flag_list = argv[i] + 8;
		} else if (npos < (int)(sizeof(pos) / sizeof(pos[0]))) {
			pos[npos++] = argv[i];
		} else {
			fprintf(stderr, "uring-ref: too many arguments\n");
			return 2;
		}
	}

	unsigned flags = flag_list ? parse_flags(flag_list) : 0;
	char fl[128];
	format_flags(flags, fl, sizeof(fl));

	if (npos >= 1 && !strcmp(pos[0], "nop"))
		return mode_nop(npos - 1, pos + 1, flags, fl);
	if (npos >= 1 && !strcmp(pos[0], "read"))
		return mode_read(npos - 1, pos + 1, flags, fl);

	fprintf(stderr,
		"usage: uring-ref [--flags=LIST] nop BATCH SECONDS\n"
		"       uring-ref [--flags=LIST] read FILE QD SECONDS\n"
		"  LIST: comma-separated single_issuer,defer_taskrun,"
		"coop_taskrun,taskrun_flag,submit_all (or env URING_REF_FLAGS)\n");
	return 2;
}
