/* A stand-in for the CUDA driver library (libcuda.so.1), built by tests/unit/test_cuda_memory.py
 * so that devtools/cuda_memory.py's ctypes declarations are exercised on a machine without a GPU.
 * The prototypes are cuda.h's. Two devices of FAKE_TOTAL bytes each; "device memory" is host
 * memory from malloc, and every pointer passed in is checked against the allocations made, so a
 * pointer or a size passed at the wrong width fails with CUDA_ERROR_INVALID_VALUE instead of
 * writing somewhere. Built with -DFAKE_NO_DEVICE, cuInit fails as on a host without a GPU. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_INVALID_CONTEXT 201

#define DEVICES 2
#define FAKE_TOTAL (256ull * 1024 * 1024)
#define MAX_ALLOCATIONS 4096

struct allocation {
    void *memory;
    size_t size;
    int device;
};

static int initialised;
static int retained[DEVICES];
static char contexts[DEVICES];
static __thread CUcontext current;
static struct allocation allocations[MAX_ALLOCATIONS];
static size_t used[DEVICES];

static int current_device(void) {
    for (int d = 0; d < DEVICES; d++)
        if (current == &contexts[d] && retained[d] > 0)
            return d;
    return -1;
}

CUresult cuInit(unsigned int flags) {
#ifdef FAKE_NO_DEVICE
    (void)flags;
    return CUDA_ERROR_NO_DEVICE;
#else
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    initialised = 1;
    return CUDA_SUCCESS;
#endif
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialised)
        return CUDA_ERROR_NOT_INITIALIZED;
    *count = DEVICES;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialised)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= DEVICES)
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
    if (device < 0 || device >= DEVICES)
        return CUDA_ERROR_INVALID_DEVICE;
    retained[device]++;
    *context = &contexts[device];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    if (device < 0 || device >= DEVICES || retained[device] == 0)
        return CUDA_ERROR_INVALID_DEVICE;
    retained[device]--;
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext context) {
    current = context;
    return current_device() >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuCtxSynchronize(void) {
    return current_device() >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

static struct allocation *find(CUdeviceptr pointer) {
    for (int i = 0; i < MAX_ALLOCATIONS; i++)
        if (allocations[i].memory != NULL && (CUdeviceptr)(uintptr_t)allocations[i].memory == pointer)
            return &allocations[i];
    return NULL;
}

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t size) {
    int device = current_device();
    if (device < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (size == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (used[device] + size > FAKE_TOTAL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct allocation *slot = NULL;
    for (int i = 0; slot == NULL && i < MAX_ALLOCATIONS; i++)
        if (allocations[i].memory == NULL)
            slot = &allocations[i];
    if (slot == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    slot->memory = malloc(size);
    if (slot->memory == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    slot->size = size;
    slot->device = device;
    used[device] += size;
    *pointer = (CUdeviceptr)(uintptr_t)slot->memory;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr pointer) {
    struct allocation *found = find(pointer);
    if (found == NULL || found->device != current_device())
        return CUDA_ERROR_INVALID_VALUE;
    free(found->memory);
    used[found->device] -= found->size;
    found->memory = NULL;
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr pointer, unsigned char value, size_t count) {
    struct allocation *found = find(pointer);
    if (found == NULL || count > found->size || found->device != current_device())
        return CUDA_ERROR_INVALID_VALUE;
    memset(found->memory, value, count);
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    int device = current_device();
    if (device < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    *free_bytes = FAKE_TOTAL - used[device];
    *total_bytes = FAKE_TOTAL;
    return CUDA_SUCCESS;
}

/* Not CUDA's: the last byte of an allocation, which the test reads to see that it was all written. */
int fake_last_byte(CUdeviceptr pointer) {
    struct allocation *found = find(pointer);
    return found == NULL ? -1 : ((unsigned char *)found->memory)[found->size - 1];
}

static const char *names[][2] = {
    {"CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {"CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {"CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
};

static CUresult describe(CUresult error, const char **text, int which) {
    if (error >= 1 && error <= 3) {
        *text = names[error - 1][which];
        return CUDA_SUCCESS;
    }
    if (error == CUDA_ERROR_NO_DEVICE) {
        *text = which == 0 ? "CUDA_ERROR_NO_DEVICE" : "no CUDA-capable device is detected";
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorName(CUresult error, const char **name) { return describe(error, name, 0); }

CUresult cuGetErrorString(CUresult error, const char **text) { return describe(error, text, 1); }
