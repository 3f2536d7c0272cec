/*
 * A stand-in for tests/gpu/cuda/gpucheck.cu on machines without nvcc or a GPU, used only
 * by tests/gpu/fake/run.sh to exercise scripts/test-gpu.sh's plumbing. It loads
 * libcuda.so.1 as the CUDA runtime would (so injection and NVIDIA_VISIBLE_DEVICES show),
 * but computes on the CPU: its results prove nothing about a GPU.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static int devices(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) {
        printf("devices=0 (cudaErrorInsufficientDriver: %s)\n", dlerror());
        return 0;
    }
    int (*init)(unsigned) = (int (*)(unsigned))dlsym(h, "cuInit");
    int (*count)(int *) = (int (*)(int *))dlsym(h, "cuDeviceGetCount");
    int n = 0;
    if (!init || !count || init(0) != 0 || count(&n) != 0 || n == 0) {
        printf("devices=0 (cudaErrorNoDevice)\n");
        return 0;
    }
    printf("devices=%d (fake)\n", n);
    return n;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    int n = devices();
    if (strcmp(mode, "query") == 0)
        return n ? 0 : 2;
    if (!n)
        return 1;
    if (strcmp(mode, "vectoradd") == 0) {
        printf("vectoradd OK: 16777216 elements (fake, on the CPU)\n");
        return 0;
    }
    if (strcmp(mode, "bandwidth") == 0) {
        printf("{\"bandwidth\":{\"device\":\"fake\",\"bytes\":0,\"reps\":0,\"h2d_gbps\":0.00,"
               "\"d2h_gbps\":0.00,\"d2d_gbps\":0.00}}\n");
        return 0;
    }
    return 64;
}
