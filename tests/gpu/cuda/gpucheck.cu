// gpucheck: the CUDA workload of the GPU harness (make test-gpu, docs/cuda.md).
//
//   gpucheck query       devices, compute capability, memory, driver and runtime versions;
//                        exit 2 when CUDA finds no device
//   gpucheck vectoradd   c = a + b over 2^24 floats (a[i] = i, b[i] = 2i) on the GPU, every
//                        element checked on the host; prints "vectoradd OK" or the first
//                        wrong element
//   gpucheck bandwidth   pinned host->device, device->host and device->device copies of
//                        256 MiB, best of 10 each, in GB/s (1e9 bytes/s; device->device
//                        counts read + write, as CUDA's bandwidthTest does); the last line
//                        is one JSON object
//
// Build: nvcc -O2 -cudart static -o gpucheck gpucheck.cu
// (the static runtime leaves libcuda.so.1 the only NVIDIA library needed at run time).

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                        \
    do {                                                                                   \
        cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "gpucheck: %s failed: %s (%s)\n", #call, cudaGetErrorName(e_), \
                    cudaGetErrorString(e_));                                               \
            return 1;                                                                      \
        }                                                                                  \
    } while (0)

__global__ void add(const float *a, const float *b, float *c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

static int query() {
    int driver = 0, runtime = 0, count = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    printf("driver_version=%d runtime_version=%d\n", driver, runtime);
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("devices=0 (%s)\n", e == cudaSuccess ? "none" : cudaGetErrorName(e));
        return 2;
    }
    printf("devices=%d\n", count);
    for (int i = 0; i < count; i++) {
        cudaDeviceProp p;
        CHECK(cudaGetDeviceProperties(&p, i));
        printf("device %d: %s, compute capability %d.%d, %.1f GiB, %d SMs, PCI %04x:%02x:%02x\n",
               i, p.name, p.major, p.minor, (double)p.totalGlobalMem / (1024.0 * 1024 * 1024),
               p.multiProcessorCount, p.pciDomainID, p.pciBusID, p.pciDeviceID);
    }
    return 0;
}

static int vectoradd() {
    const int n = 1 << 24;
    const size_t bytes = (size_t)n * sizeof(float);
    std::vector<float> a(n), b(n), c(n, -1.0f);
    for (int i = 0; i < n; i++) {
        a[i] = (float)i;
        b[i] = 2.0f * (float)i;
    }
    float *da = 0, *db = 0, *dc = 0;
    CHECK(cudaMalloc((void **)&da, bytes));
    CHECK(cudaMalloc((void **)&db, bytes));
    CHECK(cudaMalloc((void **)&dc, bytes));
    CHECK(cudaMemcpy(da, a.data(), bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b.data(), bytes, cudaMemcpyHostToDevice));
    const int threads = 256;
    add<<<(n + threads - 1) / threads, threads>>>(da, db, dc, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(c.data(), dc, bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(da));
    CHECK(cudaFree(db));
    CHECK(cudaFree(dc));
    double sum = 0;
    for (int i = 0; i < n; i++) {
        const float want = a[i] + b[i];
        if (c[i] != want) {
            printf("vectoradd FAILED: c[%d] = %.1f, expected %.1f\n", i, c[i], want);
            return 1;
        }
        sum += c[i];
    }
    printf("vectoradd OK: %d elements, sum %.0f\n", n, sum);
    return 0;
}

// Best time in ms of `reps` copies of `bytes` from src to dst.
static float best_copy_ms(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                          int reps, cudaEvent_t start, cudaEvent_t stop) {
    float best = 1e30f;
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(start, 0);
        cudaMemcpyAsync(dst, src, bytes, kind, 0);
        cudaEventRecord(stop, 0);
        cudaEventSynchronize(stop);
        float ms = 0;
        cudaEventElapsedTime(&ms, start, stop);
        if (ms > 0 && ms < best) best = ms;
    }
    return best;
}

static int bandwidth() {
    const size_t bytes = (size_t)256 << 20;
    const int reps = 10;
    void *host = 0, *d1 = 0, *d2 = 0;
    CHECK(cudaMallocHost(&host, bytes));
    CHECK(cudaMalloc(&d1, bytes));
    CHECK(cudaMalloc(&d2, bytes));
    memset(host, 1, bytes);
    CHECK(cudaMemset(d1, 0, bytes));
    CHECK(cudaMemset(d2, 0, bytes));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    // One untimed copy each way first (first-touch costs).
    CHECK(cudaMemcpy(d1, host, bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(host, d1, bytes, cudaMemcpyDeviceToHost));
    const float h2d = best_copy_ms(d1, host, bytes, cudaMemcpyHostToDevice, reps, start, stop);
    const float d2h = best_copy_ms(host, d1, bytes, cudaMemcpyDeviceToHost, reps, start, stop);
    const float d2d = best_copy_ms(d2, d1, bytes, cudaMemcpyDeviceToDevice, reps, start, stop);
    CHECK(cudaGetLastError());
    const double gb = (double)bytes / 1e9;
    const double h2d_gbps = gb / (h2d / 1e3), d2h_gbps = gb / (d2h / 1e3);
    const double d2d_gbps = 2 * gb / (d2d / 1e3);
    cudaDeviceProp p;
    CHECK(cudaGetDeviceProperties(&p, 0));
    printf("host->device (pinned): %.1f GB/s\n", h2d_gbps);
    printf("device->host (pinned): %.1f GB/s\n", d2h_gbps);
    printf("device->device: %.1f GB/s\n", d2d_gbps);
    printf("{\"bandwidth\":{\"device\":\"%s\",\"bytes\":%zu,\"reps\":%d,\"h2d_gbps\":%.2f,"
           "\"d2h_gbps\":%.2f,\"d2d_gbps\":%.2f}}\n",
           p.name, bytes, reps, h2d_gbps, d2h_gbps, d2d_gbps);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    CHECK(cudaFreeHost(host));
    CHECK(cudaFree(d1));
    CHECK(cudaFree(d2));
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "query") == 0) return query();
    if (strcmp(mode, "vectoradd") == 0) return vectoradd();
    if (strcmp(mode, "bandwidth") == 0) return bandwidth();
    fprintf(stderr, "usage: gpucheck query|vectoradd|bandwidth\n");
    return 64;
}
