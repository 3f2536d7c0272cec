/*
 * A stand-in for the NVIDIA driver's libcuda, for tests on machines without a GPU: the
 * calls tests/gpu/cuda/cuprobe.c makes, answering as driver 580 (CUDA 13.0) with one GPU
 * per /dev/nvidiaN node the container has, so that NVIDIA_VISIBLE_DEVICES shows.
 * Build: gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so.580.159.04 libcuda.c
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int gpus(void) {
    int n = 0;
    char path[32];
    for (int i = 0; i < 16; i++) {
        snprintf(path, sizeof path, "/dev/nvidia%d", i);
        if (access(path, F_OK) == 0)
            n++;
    }
    return n;
}

int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuInit(unsigned int flags) { (void)flags; return gpus() ? 0 : 100; }
int cuDeviceGetCount(int *n) { *n = gpus(); return 0; }
int cuDeviceGet(int *dev, int i) { *dev = i; return i < gpus() ? 0 : 101; }
int cuDeviceGetName(char *name, int len, int dev) {
    (void)dev;
    snprintf(name, (size_t)len, "NVIDIA H200 (fake)");
    return 0;
}
int cuDeviceGetAttribute(int *v, int attr, int dev) {
    (void)dev;
    *v = attr == 75 ? 9 : 0;
    return 0;
}
