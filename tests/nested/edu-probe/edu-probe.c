/*
 * edu-probe: talks to QEMU's `edu` PCI device (1234:11e8) through sysfs, the way a
 * workload inside a gpucell sandbox reaches a passed-through function.
 *
 * usage: edu-probe [BDF...]      (default: every 1234:11e8 function in sysfs)
 *
 * For each function it maps BAR0 (`/sys/bus/pci/devices/BDF/resource0`; sysfs
 * resource files of MMIO BARs can be mapped but not read), then
 *   - reads the identification register at 0x00 (expect 0x010000ed),
 *   - writes 5 to the factorial register at 0x08, waits while bit 0 of the status
 *     register at 0x20 is set (busy), reads back the factorial (expect 0x78).
 * One line per function on stdout:
 *   EDU-PROBE bdf=0000:01:00.0 ident=0x010000ed fact5=0x00000078 ok=1
 * Exit status: 0 if at least one function was found and all were right, 1 if any
 * was wrong or none was found, 2 on bad usage.
 *
 * Inside a container /sys is often mounted read-only: then the probe mounts a
 * private sysfs of its own (needs CAP_SYS_ADMIN, which a sandbox's root has) and
 * uses that. If the function's memory decoding is off it writes 1 to `enable`.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_IDENT 0x00
#define EDU_FACT 0x08
#define EDU_STATUS 0x20
#define EDU_IDENT_EXPECTED 0x010000edu
#define EDU_FACT5_EXPECTED 0x78u
#define MAP_LEN 4096
#define MAX_DEVICES 64
#define PRIVATE_SYSFS "/tmp/.edu-probe-sysfs"

static char sysfs[256] = "/sys";

/* Reads a small hex sysfs attribute ("0x1234\n"); -1 on any error. */
static long read_hex(const char *bdf, const char *attr)
{
    char path[1536], buf[32];
    snprintf(path, sizeof path, "%s/bus/pci/devices/%s/%s", sysfs, bdf, attr);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *end;
    errno = 0;
    long v = strtol(buf, &end, 16);
    if (errno || end == buf)
        return -1;
    return v;
}

static int is_edu(const char *bdf)
{
    return read_hex(bdf, "vendor") == EDU_VENDOR && read_hex(bdf, "device") == EDU_DEVICE;
}

/* A BDF as sysfs names it: dddd:bb:dd.f, nothing else (it becomes part of a path). */
static int valid_bdf(const char *s)
{
    static const char shape[] = "xxxx:xx:xx.x";
    if (strlen(s) != sizeof shape - 1)
        return 0;
    for (size_t i = 0; shape[i]; i++) {
        if (shape[i] == 'x') {
            if (!strchr("0123456789abcdefABCDEF", s[i]))
                return 0;
        } else if (s[i] != shape[i]) {
            return 0;
        }
    }
    return 1;
}

/* Uses a private read-write sysfs when the one at /sys is read-only. */
static void ensure_writable_sysfs(const char *bdf)
{
    char path[1536];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource0", bdf);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return;
    }
    if (errno != EROFS)
        return;
    if (mkdir(PRIVATE_SYSFS, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "edu-probe: /sys is read-only and %s cannot be created: %s\n",
                PRIVATE_SYSFS, strerror(errno));
        return;
    }
    if (mount("sysfs", PRIVATE_SYSFS, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        fprintf(stderr, "edu-probe: /sys is read-only and mounting sysfs on %s failed: %s\n",
                PRIVATE_SYSFS, strerror(errno));
        return;
    }
    snprintf(sysfs, sizeof sysfs, "%s", PRIVATE_SYSFS);
}

/* Turns on memory decoding (command register bit 1) through `enable` if it is off. */
static void ensure_enabled(const char *bdf)
{
    char path[1536];
    unsigned char cfg[6];
    snprintf(path, sizeof path, "%s/bus/pci/devices/%s/config", sysfs, bdf);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = pread(fd, cfg, sizeof cfg, 0);
    close(fd);
    if (n == (ssize_t)sizeof cfg && (cfg[4] & 0x2))
        return;
    snprintf(path, sizeof path, "%s/bus/pci/devices/%s/enable", sysfs, bdf);
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "edu-probe: %s: memory decoding is off and %s cannot be opened: %s\n",
                bdf, path, strerror(errno));
        return;
    }
    if (write(fd, "1", 1) != 1)
        fprintf(stderr, "edu-probe: %s: writing 1 to %s failed: %s\n", bdf, path, strerror(errno));
    close(fd);
}

static int probe(const char *bdf)
{
    char path[1536];
    ensure_enabled(bdf);
    snprintf(path, sizeof path, "%s/bus/pci/devices/%s/resource0", sysfs, bdf);
    int fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0) {
        printf("EDU-PROBE bdf=%s ok=0 error=open-%s:%s\n", bdf, path, strerror(errno));
        return 1;
    }
    void *map = mmap(NULL, MAP_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        printf("EDU-PROBE bdf=%s ok=0 error=mmap-%s:%s\n", bdf, path, strerror(errno));
        return 1;
    }
    volatile uint32_t *regs = map;
    uint32_t ident = regs[EDU_IDENT / 4];
    regs[EDU_FACT / 4] = 5;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int busy = 1;
    for (;;) {
        if (!(regs[EDU_STATUS / 4] & 1)) {
            busy = 0;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 5)
            break;
        usleep(100);
    }
    uint32_t fact = regs[EDU_FACT / 4];
    munmap(map, MAP_LEN);
    int ok = !busy && ident == EDU_IDENT_EXPECTED && fact == EDU_FACT5_EXPECTED;
    printf("EDU-PROBE bdf=%s ident=0x%08x fact5=0x%08x ok=%d%s\n", bdf, ident, fact, ok,
           busy ? " error=still-busy-after-5s" : "");
    return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
    char found[MAX_DEVICES][16];
    int n = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        if (!valid_bdf(argv[i]) || n == MAX_DEVICES) {
            fprintf(stderr, "usage: edu-probe [BDF...]  (BDF like 0000:01:00.0, at most %d)\n",
                    MAX_DEVICES);
            return 2;
        }
        snprintf(found[n++], sizeof found[0], "%s", argv[i]);
    }
    if (n == 0) {
        DIR *d = opendir("/sys/bus/pci/devices");
        if (!d) {
            printf("EDU-PROBE none error=/sys/bus/pci/devices:%s\n", strerror(errno));
            return 1;
        }
        struct dirent *e;
        while ((e = readdir(d)) && n < MAX_DEVICES)
            if (valid_bdf(e->d_name) && is_edu(e->d_name))
                snprintf(found[n++], sizeof found[0], "%s", e->d_name);
        closedir(d);
    }
    if (n == 0) {
        printf("EDU-PROBE none\n");
        return 1;
    }
    ensure_writable_sysfs(found[0]);
    int bad = 0;
    for (int i = 0; i < n; i++)
        bad |= probe(found[i]);
    if (strcmp(sysfs, "/sys") != 0)
        umount2(sysfs, MNT_DETACH);
    return bad ? 1 : 0;
}
