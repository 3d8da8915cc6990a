/*
 * System test helper, run inside the VM (built on the host by tests/system/run.sh).
 *
 *   feeder out DEVICE FRAMES.ppm SCHEDULE LOG [loop]
 *     Streams frames into a V4L2 output node (vivid's HDMI output, looped back byte-exact to
 *     its capture node). The node's format (YUYV, NV12 or RGB3) and size are read with
 *     G_FMT: set them first with v4l2-ctl. FRAMES.ppm is the demo clip's frames as
 *     concatenated binary PPMs (P6), scaled here to the node's size (nearest neighbour) and
 *     converted (BT.601 limited range, what the daemon reads) one frame ahead of the schedule
 *     while streaming, each once. SCHEDULE lists one frame index a line; each is queued in
 *     turn and the node's own frame rate paces them. LOG gets "QUEUED <index>
 *     <CLOCK_MONOTONIC ns>" for every frame queued, so the test knows when a frame reached the
 *     output node. With "loop" the schedule repeats until SIGTERM. With FEEDER_HOLD set, the
 *     schedule's first frame is shown until SIGUSR1, then the schedule plays.
 *
 *   feeder watch VALUE_FILE LOG
 *     Polls a gpio-sim sysfs value file every millisecond and writes "LINE <0|1> <ns>" to LOG at
 *     each change (and the initial value), same clock, until SIGTERM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/videodev2.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop, go;
static void on_term(int sig) { (void)sig; stop = 1; }
static void on_go(int sig) { (void)sig; go = 1; }

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "feeder: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg) {
  int r;
  do r = ioctl(fd, req, arg);
  while (r < 0 && errno == EINTR && !stop);
  return r;
}

struct ppm { int w, h; unsigned char *rgb; };

static int read_token(FILE *f) {
  int c, v = 0;
  do {
    c = fgetc(f);
    if (c == '#') while (c != '\n' && c != EOF) c = fgetc(f);
  } while (c == ' ' || c == '\n' || c == '\r' || c == '\t');
  if (c < '0' || c > '9') return -1;
  while (c >= '0' && c <= '9') { v = v * 10 + (c - '0'); c = fgetc(f); }
  return v; /* one whitespace after the max value is consumed here */
}

static int read_ppms(const char *path, struct ppm **out) {
  FILE *f = fopen(path, "rb");
  if (!f) die(path);
  int n = 0, cap = 0;
  struct ppm *v = NULL;
  for (;;) {
    int a = fgetc(f), b = fgetc(f);
    if (a == EOF) break;
    if (a != 'P' || b != '6') { fprintf(stderr, "feeder: %s: not P6 at frame %d\n", path, n); exit(1); }
    int w = read_token(f), h = read_token(f), mx = read_token(f);
    if (w <= 0 || h <= 0 || mx != 255) { fprintf(stderr, "feeder: bad PPM header\n"); exit(1); }
    if (n == cap) { cap = cap ? cap * 2 : 64; v = realloc(v, cap * sizeof *v); }
    v[n].w = w; v[n].h = h; v[n].rgb = malloc((size_t)w * h * 3);
    if (fread(v[n].rgb, 1, (size_t)w * h * 3, f) != (size_t)w * h * 3) { fprintf(stderr, "feeder: short PPM\n"); exit(1); }
    n++;
  }
  fclose(f);
  *out = v;
  return n;
}

static unsigned char clamp(int x) { return x < 0 ? 0 : x > 255 ? 255 : x; }
static unsigned char y601(const unsigned char *p) { return clamp(((66 * p[0] + 129 * p[1] + 25 * p[2] + 128) >> 8) + 16); }
static unsigned char u601(const unsigned char *p) { return clamp(((-38 * p[0] - 74 * p[1] + 112 * p[2] + 128) >> 8) + 128); }
static unsigned char v601(const unsigned char *p) { return clamp(((112 * p[0] - 94 * p[1] - 18 * p[2] + 128) >> 8) + 128); }

/* One frame in the node's format, from a PPM scaled to w x h. */
static unsigned char *convert(const struct ppm *src, struct v4l2_pix_format *pf) {
  int w = pf->width, h = pf->height, bpl = pf->bytesperline;
  unsigned char *rgb = malloc((size_t)w * h * 3);
  /* Source columns once per frame: a division per pixel is a helper call under TCG. */
  int *sx = malloc((size_t)w * sizeof *sx);
  for (int x = 0; x < w; x++) sx[x] = x * src->w / w * 3;
  for (int y = 0; y < h; y++) {
    const unsigned char *line = src->rgb + (size_t)(y * src->h / h) * src->w * 3;
    unsigned char *d = rgb + (size_t)y * w * 3;
    for (int x = 0; x < w; x++, d += 3) {
      const unsigned char *s = line + sx[x];
      d[0] = s[0]; d[1] = s[1]; d[2] = s[2];
    }
  }
  free(sx);
  unsigned char *out = calloc(1, pf->sizeimage);
  switch (pf->pixelformat) {
  case V4L2_PIX_FMT_RGB24:
    for (int y = 0; y < h; y++) memcpy(out + (size_t)y * bpl, rgb + (size_t)y * w * 3, (size_t)w * 3);
    break;
  case V4L2_PIX_FMT_YUYV:
    for (int y = 0; y < h; y++)
      for (int x = 0; x + 1 < w; x += 2) {
        const unsigned char *p0 = rgb + ((size_t)y * w + x) * 3, *p1 = p0 + 3;
        unsigned char avg[3] = {(p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2, (p0[2] + p1[2]) / 2};
        unsigned char *d = out + (size_t)y * bpl + x * 2;
        d[0] = y601(p0); d[1] = u601(avg); d[2] = y601(p1); d[3] = v601(avg);
      }
    break;
  case V4L2_PIX_FMT_NV12: {
    unsigned char *uv = out + (size_t)bpl * h;
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w; x++) out[(size_t)y * bpl + x] = y601(rgb + ((size_t)y * w + x) * 3);
    for (int y = 0; y + 1 < h; y += 2)
      for (int x = 0; x + 1 < w; x += 2) {
        int s[3] = {0, 0, 0};
        for (int dy = 0; dy < 2; dy++)
          for (int dx = 0; dx < 2; dx++)
            for (int c = 0; c < 3; c++) s[c] += rgb[((size_t)(y + dy) * w + x + dx) * 3 + c];
        unsigned char avg[3] = {s[0] / 4, s[1] / 4, s[2] / 4};
        unsigned char *d = uv + (size_t)(y / 2) * bpl + x;
        d[0] = u601(avg); d[1] = v601(avg);
      }
    break;
  }
  default:
    fprintf(stderr, "feeder: unsupported output format %.4s\n", (char *)&pf->pixelformat);
    exit(1);
  }
  free(rgb);
  return out;
}

static int feed(int argc, char **argv) {
  if (argc < 6) { fprintf(stderr, "usage: feeder out DEVICE FRAMES.ppm SCHEDULE LOG [loop]\n"); return 2; }
  const char *dev = argv[2];
  int loop = argc > 6 && strcmp(argv[6], "loop") == 0;
  struct ppm *frames;
  int nframes = read_ppms(argv[3], &frames);
  FILE *sf = fopen(argv[4], "r");
  if (!sf) die(argv[4]);
  int *sched = NULL, ns = 0, cap = 0, idx;
  while (fscanf(sf, "%d", &idx) == 1) {
    if (idx < 0 || idx >= nframes) { fprintf(stderr, "feeder: frame %d out of range\n", idx); return 1; }
    if (ns == cap) { cap = cap ? cap * 2 : 256; sched = realloc(sched, cap * sizeof *sched); }
    sched[ns++] = idx;
  }
  fclose(sf);
  if (!ns) { fprintf(stderr, "feeder: empty schedule\n"); return 1; }
  FILE *log = fopen(argv[5], "a");
  if (!log) die(argv[5]);
  setvbuf(log, NULL, _IOLBF, 0);

  int fd = open(dev, O_RDWR);
  if (fd < 0) die(dev);
  struct v4l2_format fmt = {.type = V4L2_BUF_TYPE_VIDEO_OUTPUT};
  if (xioctl(fd, VIDIOC_G_FMT, &fmt) < 0) die("G_FMT");
  struct v4l2_pix_format *pf = &fmt.fmt.pix;
  /* Frames are converted as they are needed, not all before streaming: under TCG converting a
     clip's hundred frames took 5-15 s, and the test waited for it. Only the first goes before
     STREAMON; then one frame ahead of the schedule per queued buffer (while the previous one
     is shown), which stays ahead of a schedule that shows each frame at least once. */
  unsigned char **conv = calloc(nframes, sizeof *conv);
  conv[sched[0]] = convert(&frames[sched[0]], pf);
  int ahead = 0; /* schedule positions before this one are converted */
  /* FEEDER_DUMP=FILE: the first scheduled frame as queued, to check the loopback against. */
  const char *dump = getenv("FEEDER_DUMP");
  if (dump) {
    FILE *d = fopen(dump, "wb");
    if (!d || fwrite(conv[sched[0]], 1, pf->sizeimage, d) != pf->sizeimage) die(dump);
    fclose(d);
  }
  fprintf(stderr, "feeder: %s %.4s %ux%u bpl %u size %u, %d frames, schedule of %d%s\n", dev,
          (char *)&pf->pixelformat, pf->width, pf->height, pf->bytesperline, pf->sizeimage,
          nframes, ns, loop ? " (looped)" : "");

  /* Three buffers: a frame waits at most two frame periods before going out, and a starved
     feeder still keeps the output fed. */
  struct v4l2_requestbuffers req = {.count = 3, .type = V4L2_BUF_TYPE_VIDEO_OUTPUT, .memory = V4L2_MEMORY_MMAP};
  if (xioctl(fd, VIDIOC_REQBUFS, &req) < 0) die("REQBUFS");
  void *maps[16];
  size_t lens[16];
  for (unsigned i = 0; i < req.count && i < 16; i++) {
    struct v4l2_buffer b = {.type = V4L2_BUF_TYPE_VIDEO_OUTPUT, .memory = V4L2_MEMORY_MMAP, .index = i};
    if (xioctl(fd, VIDIOC_QUERYBUF, &b) < 0) die("QUERYBUF");
    maps[i] = mmap(NULL, b.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, b.m.offset);
    lens[i] = b.length;
    if (maps[i] == MAP_FAILED) die("mmap");
  }
  unsigned queued = 0;
  int pos = 0, started = 0;
  int holding = getenv("FEEDER_HOLD") != NULL;
  while (!stop) {
    if (holding && go) {
      holding = 0;
      pos = 0;
    }
    if (pos == ns) {
      if (!loop) break;
      pos = 0;
    }
    struct v4l2_buffer b = {.type = V4L2_BUF_TYPE_VIDEO_OUTPUT, .memory = V4L2_MEMORY_MMAP};
    if (queued < req.count) {
      b.index = queued++;
    } else if (xioctl(fd, VIDIOC_DQBUF, &b) < 0) {
      if (stop) break;
      die("DQBUF");
    }
    if (!conv[sched[pos]]) conv[sched[pos]] = convert(&frames[sched[pos]], pf);
    size_t n = pf->sizeimage < lens[b.index] ? pf->sizeimage : lens[b.index];
    memcpy(maps[b.index], conv[sched[pos]], n);
    b.bytesused = n;
    b.field = V4L2_FIELD_NONE;
    if (xioctl(fd, VIDIOC_QBUF, &b) < 0) die("QBUF");
    fprintf(log, "QUEUED %d %lld\n", sched[pos], now_ns());
    if (!holding) pos++;
    if (!started && queued == req.count) {
      int type = V4L2_BUF_TYPE_VIDEO_OUTPUT;
      if (xioctl(fd, VIDIOC_STREAMON, &type) < 0) die("STREAMON");
      started = 1;
    }
    /* The next frame not converted yet, while the output shows the queued ones. */
    while (ahead < ns && conv[sched[ahead]]) ahead++;
    if (ahead < ns) conv[sched[ahead]] = convert(&frames[sched[ahead]], pf);
  }
  if (!started) {
    int type = V4L2_BUF_TYPE_VIDEO_OUTPUT;
    if (xioctl(fd, VIDIOC_STREAMON, &type) < 0) die("STREAMON");
  }
  /* Let the last queued frames go out before stopping (not looped: a clean end). */
  if (!loop)
    for (unsigned i = 0; i < req.count && !stop; i++) {
      struct v4l2_buffer b = {.type = V4L2_BUF_TYPE_VIDEO_OUTPUT, .memory = V4L2_MEMORY_MMAP};
      if (xioctl(fd, VIDIOC_DQBUF, &b) < 0) break;
    }
  int type = V4L2_BUF_TYPE_VIDEO_OUTPUT;
  xioctl(fd, VIDIOC_STREAMOFF, &type);
  close(fd);
  return 0;
}

static int watch(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: feeder watch VALUE_FILE LOG\n"); return 2; }
  FILE *log = fopen(argv[3], "a");
  if (!log) die(argv[3]);
  setvbuf(log, NULL, _IOLBF, 0);
  int last = -1;
  /* A millisecond is finer than anything measured here, and a tighter loop takes a vCPU
     from the daemon under TCG. */
  struct timespec nap = {0, 1000000};
  while (!stop) {
    int fd = open(argv[2], O_RDONLY);
    char c = 0;
    if (fd >= 0) {
      if (read(fd, &c, 1) == 1 && (c == '0' || c == '1') && c - '0' != last) {
        last = c - '0';
        fprintf(log, "LINE %d %lld\n", last, now_ns());
      }
      close(fd);
    }
    nanosleep(&nap, NULL);
  }
  return 0;
}

int main(int argc, char **argv) {
  struct sigaction sa = {.sa_handler = on_term};
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  struct sigaction sg = {.sa_handler = on_go};
  sigaction(SIGUSR1, &sg, NULL);
  if (argc > 1 && strcmp(argv[1], "out") == 0) return feed(argc, argv);
  if (argc > 1 && strcmp(argv[1], "watch") == 0) return watch(argc, argv);
  fprintf(stderr, "usage: feeder out|watch ...\n");
  return 2;
}
