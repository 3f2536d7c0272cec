/*
 * cuprobe: what the driver says about itself, for the container harness's requirement check
 * (gpucell-agent container-test --cuda-probe). Plain C, no CUDA headers: libcuda.so.1 is
 * loaded with dlopen, as the CUDA runtime loads it, from the container's ld.so.cache.
 *
 * Prints:
 *   cuda_driver_version=N    cuDriverGetVersion (13000 for CUDA 13.0)
 *   cu_init=R                cuInit's result when not 0 (100: no device visible)
 *   gpu=MAJOR.MINOR NAME     one line per visible GPU (compute capability, name)
 * Exit 0 when the version was read, 1 otherwise.
 *
 * Build: gcc -O2 -o cuprobe cuprobe.c -ldl   (or nvcc -o cuprobe cuprobe.c)
 */
#include <dlfcn.h>
#include <stdio.h>

typedef int (*fn_int_p)(int *);
typedef int (*fn_init)(unsigned int);
typedef int (*fn_get)(int *, int);
typedef int (*fn_name)(char *, int, int);
typedef int (*fn_attr)(int *, int, int);

/* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR */
#define CC_MAJOR 75
#define CC_MINOR 76

int main(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) {
        fprintf(stderr, "cuprobe: dlopen libcuda.so.1: %s\n", dlerror());
        return 1;
    }
    fn_int_p get_version = (fn_int_p)dlsym(h, "cuDriverGetVersion");
    fn_init init = (fn_init)dlsym(h, "cuInit");
    fn_int_p count = (fn_int_p)dlsym(h, "cuDeviceGetCount");
    fn_get get = (fn_get)dlsym(h, "cuDeviceGet");
    fn_name name = (fn_name)dlsym(h, "cuDeviceGetName");
    fn_attr attr = (fn_attr)dlsym(h, "cuDeviceGetAttribute");
    int version = 0;
    if (!get_version || get_version(&version) != 0 || version <= 0) {
        fprintf(stderr, "cuprobe: cuDriverGetVersion failed\n");
        return 1;
    }
    printf("cuda_driver_version=%d\n", version);
    if (!init || !count || !get || !name || !attr) {
        fprintf(stderr, "cuprobe: libcuda.so.1 lacks a device query symbol\n");
        return 0;
    }
    int r = init(0);
    if (r != 0) {
        printf("cu_init=%d\n", r);
        return 0;
    }
    int n = 0;
    if (count(&n) != 0)
        n = 0;
    for (int i = 0; i < n; i++) {
        int dev = 0, major = 0, minor = 0;
        char buf[256] = "";
        if (get(&dev, i) != 0 || name(buf, (int)sizeof buf, dev) != 0 ||
            attr(&major, CC_MAJOR, dev) != 0 || attr(&minor, CC_MINOR, dev) != 0) {
            fprintf(stderr, "cuprobe: querying GPU %d failed\n", i);
            continue;
        }
        printf("gpu=%d.%d %s\n", major, minor, buf);
    }
    return 0;
}
