/*
 * A fake libnvidia-ml.so.1 for the agent tests: the real pynvml ctypes layer loads it through
 * LD_LIBRARY_PATH, so the nvml backend runs unchanged against it (argument order, error codes,
 * size queries).
 *
 * State lives in a shared mmap'd file named by ENVPIPE_FAKE_NVML_STATE, so a test process can see what an
 * agent subprocess did (and what a killed one left behind). Layout: struct fake_state below; keep it in
 * sync with FakeNvmlState in conftest.py.
 *
 * Strict on purpose: unknown handles, NULL pointers, min > max, clocks that are not supported at the
 * highest memory clock and unknown memory clocks all fail with NVML_ERROR_INVALID_ARGUMENT and are counted
 * in bad_calls. ENVPIPE_FAKE_NVML_GPUS sets the GPU count (default 2, at most 8) when the file is created;
 * ENVPIPE_FAKE_NVML_REQUIRE_ROOT=1 makes setters fail with NO_PERMISSION for non-root callers;
 * ENVPIPE_FAKE_NVML_SET_US adds a delay to every setter. ENVPIPE_FAKE_NVML_ENERGY_STEP_MS makes the
 * energy counter move in steps, as a real one does (H100: every ~100 ms): a read returns the energy at the
 * last multiple of the step. ENVPIPE_FAKE_NVML_READ_US adds a delay to every energy read (H100: ~3 ms).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 8
#define STATE_MAGIC 0x4e564d4cu /* "NVML" */
#define TOP_MEM_MHZ 2619u
#define LOW_MEM_MHZ 1593u
#define TOP_SM_MHZ 1980u
#define LOW_MEM_TOP_SM_MHZ 1755u /* fewer SM clocks at the lower memory clock: the agent must ask the top one */
#define MIN_SM_MHZ 345u
#define STEP_MHZ 15u

struct fake_gpu {
    uint32_t locked;
    uint32_t min_mhz;
    uint32_t max_mhz;
    uint32_t sm_mhz;
    uint64_t set_calls;
    uint64_t reset_calls;
    uint64_t bad_calls;
    uint64_t last_set_ns; /* CLOCK_MONOTONIC of the last successful lock */
    uint64_t energy_uj;
    uint64_t energy_ns; /* when energy_uj was last advanced */
};

struct fake_state {
    uint32_t magic;
    uint32_t ngpus;
    uint64_t init_calls;
    struct fake_gpu gpus[MAX_GPUS];
};

struct fake_device {
    uint32_t index;
};

static struct fake_device devices[MAX_GPUS];
static struct fake_state *state;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t power_mw(const struct fake_gpu *gpu) { return 100000u + 300u * gpu->sm_mhz; }

static void advance_energy(struct fake_gpu *gpu) {
    uint64_t t = now_ns();
    gpu->energy_uj += (uint64_t)power_mw(gpu) * (t - gpu->energy_ns) / 1000000ull; /* mW * ns = 1e-12 J */
    gpu->energy_ns = t;
}

static int open_state(void) {
    const char *path = getenv("ENVPIPE_FAKE_NVML_STATE");
    if (!path) return -1;
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0) return -1;
    flock(fd, LOCK_EX);
    if (ftruncate(fd, sizeof(struct fake_state)) != 0) { close(fd); return -1; }
    state = mmap(NULL, sizeof(struct fake_state), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (state == MAP_FAILED) { state = NULL; close(fd); return -1; }
    if (state->magic != STATE_MAGIC) {
        const char *count = getenv("ENVPIPE_FAKE_NVML_GPUS");
        int n = count ? atoi(count) : 2;
        state->ngpus = (uint32_t)(n < 1 ? 1 : (n > MAX_GPUS ? MAX_GPUS : n));
        for (uint32_t i = 0; i < MAX_GPUS; i++) {
            state->gpus[i].sm_mhz = TOP_SM_MHZ;
            state->gpus[i].energy_ns = now_ns();
        }
        state->magic = STATE_MAGIC;
    }
    state->init_calls++;
    flock(fd, LOCK_UN);
    close(fd);
    return 0;
}

static struct fake_gpu *gpu_of(const void *handle) {
    if (!state) return NULL;
    for (uint32_t i = 0; i < state->ngpus; i++)
        if (handle == (const void *)&devices[i]) return &state->gpus[i];
    return NULL;
}

static int bad(struct fake_gpu *gpu) {
    if (gpu) __atomic_add_fetch(&gpu->bad_calls, 1, __ATOMIC_SEQ_CST);
    return NVML_ERROR_INVALID_ARGUMENT;
}

static int supported_sm(uint32_t mhz) {
    return mhz >= MIN_SM_MHZ && mhz <= TOP_SM_MHZ && (TOP_SM_MHZ - mhz) % STEP_MHZ == 0;
}

static int may_set(void) {
    const char *root = getenv("ENVPIPE_FAKE_NVML_REQUIRE_ROOT");
    const char *delay = getenv("ENVPIPE_FAKE_NVML_SET_US");
    if (delay) usleep((useconds_t)atoi(delay));
    return !(root && root[0] == '1' && geteuid() != 0);
}

int nvmlInitWithFlags(unsigned int flags) {
    if (flags != 0) return NVML_ERROR_INVALID_ARGUMENT;
    for (uint32_t i = 0; i < MAX_GPUS; i++) devices[i].index = i;
    return open_state() == 0 ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) { return state ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED; }

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    default: return "Unknown Error";
    }
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!state) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = state->ngpus;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    if (!state) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= state->ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

static int copy_string(const char *text, char *buffer, unsigned int length) {
    if (!buffer) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buffer, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

int nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    char text[64];
    /* ENVPIPE_FAKE_NVML_UUID_TAG (8 hex digits) tells concurrent fake nodes apart: agents lock GPUs by UUID
       node-wide, so two test runs of one machine must not share UUIDs. */
    const char *tag = getenv("ENVPIPE_FAKE_NVML_UUID_TAG");
    snprintf(text, sizeof text, "GPU-%.8s-0000-4000-8000-%012u", tag && *tag ? tag : "fa4e0000",
             ((struct fake_device *)device)->index);
    return copy_string(text, uuid, length);
}

int nvmlDeviceGetName(void *device, char *name, unsigned int length) {
    if (!gpu_of(device)) return bad(NULL);
    return copy_string("NVIDIA H100 80GB HBM3", name, length);
}

static int list_clocks(const uint32_t *values, unsigned int n, unsigned int *count, unsigned int *clocks) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (!clocks || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < n; i++) clocks[i] = values[i];
    *count = n;
    return NVML_SUCCESS;
}

int nvmlDeviceGetSupportedMemoryClocks(void *device, unsigned int *count, unsigned int *clocks) {
    static const uint32_t memory[] = {TOP_MEM_MHZ, LOW_MEM_MHZ};
    if (!gpu_of(device)) return bad(NULL);
    return list_clocks(memory, 2, count, clocks);
}

int nvmlDeviceGetSupportedGraphicsClocks(void *device, unsigned int memory_mhz, unsigned int *count,
                                         unsigned int *clocks) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    uint32_t top;
    if (memory_mhz == TOP_MEM_MHZ) top = TOP_SM_MHZ;
    else if (memory_mhz == LOW_MEM_MHZ) top = LOW_MEM_TOP_SM_MHZ;
    else return bad(gpu);
    uint32_t values[256];
    unsigned int n = 0;
    for (uint32_t mhz = top; mhz >= MIN_SM_MHZ && n < 256; mhz -= STEP_MHZ) values[n++] = mhz;
    return list_clocks(values, n, count, clocks);
}

int nvmlDeviceSetGpuLockedClocks(void *device, unsigned int min_mhz, unsigned int max_mhz) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    if (min_mhz > max_mhz || !supported_sm(min_mhz) || !supported_sm(max_mhz)) return bad(gpu);
    if (!may_set()) return NVML_ERROR_NO_PERMISSION;
    advance_energy(gpu);
    gpu->min_mhz = min_mhz;
    gpu->max_mhz = max_mhz;
    gpu->sm_mhz = max_mhz;
    gpu->locked = 1;
    gpu->last_set_ns = now_ns();
    __atomic_add_fetch(&gpu->set_calls, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

int nvmlDeviceResetGpuLockedClocks(void *device) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    if (!may_set()) return NVML_ERROR_NO_PERMISSION;
    advance_energy(gpu);
    gpu->locked = 0;
    gpu->min_mhz = gpu->max_mhz = 0;
    gpu->sm_mhz = TOP_SM_MHZ;
    __atomic_add_fetch(&gpu->reset_calls, 1, __ATOMIC_SEQ_CST);
    return NVML_SUCCESS;
}

int nvmlDeviceGetClockInfo(void *device, int type, unsigned int *clock) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    if (!clock) return bad(gpu);
    if (type == 0 || type == 1) *clock = gpu->sm_mhz; /* NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM */
    else if (type == 2) *clock = TOP_MEM_MHZ;          /* NVML_CLOCK_MEM */
    else return bad(gpu);
    return NVML_SUCCESS;
}

int nvmlDeviceGetPowerUsage(void *device, unsigned int *power) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    if (!power) return bad(gpu);
    *power = power_mw(gpu);
    return NVML_SUCCESS;
}

/* The counter as published in steps: the energy at the last multiple of step_ns (per process). */
static uint64_t published_uj[MAX_GPUS];
static uint64_t published_ns[MAX_GPUS];

static uint64_t stepped_energy_uj(struct fake_gpu *gpu, uint32_t index, uint64_t step_ns) {
    uint64_t boundary = gpu->energy_ns - gpu->energy_ns % step_ns;
    if (boundary > published_ns[index]) {
        /* constant power since the boundary (a clock set in between makes this approximate: fine here) */
        uint64_t since_uj = (uint64_t)power_mw(gpu) * (gpu->energy_ns - boundary) / 1000000ull;
        published_uj[index] = gpu->energy_uj > since_uj ? gpu->energy_uj - since_uj : 0; /* fresh state */
        published_ns[index] = boundary;
    }
    return published_uj[index];
}

int nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *energy) {
    struct fake_gpu *gpu = gpu_of(device);
    if (!gpu) return bad(NULL);
    if (!energy) return bad(gpu);
    const char *delay = getenv("ENVPIPE_FAKE_NVML_READ_US");
    const char *step = getenv("ENVPIPE_FAKE_NVML_ENERGY_STEP_MS");
    if (delay) usleep((useconds_t)atoi(delay));
    advance_energy(gpu);
    uint64_t step_ns = step ? (uint64_t)atoi(step) * 1000000ull : 0;
    uint32_t index = ((struct fake_device *)device)->index;
    *energy = (step_ns ? stepped_energy_uj(gpu, index, step_ns) : gpu->energy_uj) / 1000ull;
    return NVML_SUCCESS;
}
