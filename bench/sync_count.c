/* Counts the CUDA driver calls that block the host, for gpu-check's "host syncs per denoising step".
 * Build: gcc -O2 -shared -fPIC -o libsync_count.so bench/sync_count.c -ldl
 * Use:   LD_PRELOAD=/path/libsync_count.so gpu-check ...   (cudarc links libcuda directly, so these
 *        definitions interpose on its calls and forward to the real driver through RTLD_NEXT).
 * gpu-check finds `fleet_sync_count` with dlsym and reads it between denoising steps. Counted: stream, context
 * and event synchronisation, device-to-host copies (candle follows its async ones with a synchronise; both
 * counted), and the synchronous cuMemFree (a plain free waits for the device). cuMemAlloc is counted apart
 * (fleet_sync_count_of(6)) and not in the total: it does not wait for the device. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdatomic.h>

static atomic_long counts[8];
static const char *names[8] = {"cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize",
                               "cuMemcpyDtoH_v2", "cuMemcpyDtoHAsync_v2", "cuMemFree_v2", "cuMemAlloc_v2", 0};

/* Total of the blocking calls (0..5). */
long fleet_sync_count(void) {
  long n = 0;
  for (int i = 0; i < 6; i++) n += atomic_load(&counts[i]);
  return n;
}

/* Count of call kind i (0..6), and its name through *name; -1 past the end. */
long fleet_sync_count_of(int i, const char **name) {
  if (i < 0 || i >= 7) return -1;
  *name = names[i];
  return atomic_load(&counts[i]);
}

#define WRAP(idx, fn, params, args)                                   \
  int fn params {                                                     \
    static int(*real) params;                                         \
    if (!real) real = (int(*) params)dlsym(RTLD_NEXT, #fn);           \
    atomic_fetch_add(&counts[idx], 1);                                \
    return real args;                                                 \
  }

typedef unsigned long long dptr;
WRAP(0, cuStreamSynchronize, (void *s), (s))
WRAP(1, cuCtxSynchronize, (void), ())
WRAP(2, cuEventSynchronize, (void *e), (e))
WRAP(3, cuMemcpyDtoH_v2, (void *dst, dptr src, size_t n), (dst, src, n))
WRAP(4, cuMemcpyDtoHAsync_v2, (void *dst, dptr src, size_t n, void *s), (dst, src, n, s))
WRAP(5, cuMemFree_v2, (dptr p), (p))
WRAP(6, cuMemAlloc_v2, (dptr * p, size_t n), (p, n))
