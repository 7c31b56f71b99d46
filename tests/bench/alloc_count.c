/* alloc_count.so: counts a process's heap allocations, for tests/bench/per_message.py (LD_PRELOAD).
 *
 * The counters live in a file mapped MAP_SHARED (path in $ALLOC_COUNT_FILE), so the harness reads them while the
 * process runs: before and after a load run, the difference over the messages relayed is allocations per
 * message. Calls go on to glibc's own __libc_* functions (no dlsym bootstrap). operator new reaches malloc
 * through the PLT, so C++ allocations (coroutine frames included) are counted too.
 * Build: cc -O2 -shared -fPIC -o alloc_count.so alloc_count.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);

struct counters {
  uint64_t allocations; /* malloc, calloc, memalign family; realloc of a null pointer */
  uint64_t reallocations;
  uint64_t frees;
  uint64_t bytes;
};

static struct counters early;
static struct counters* counts = &early;

__attribute__((constructor)) static void map_counters(void) {
  const char* path = getenv("ALLOC_COUNT_FILE");
  if (path == NULL) return;
  int fd = open(path, O_RDWR | O_CREAT, 0644);
  if (fd < 0) return;
  if (ftruncate(fd, sizeof(struct counters)) == 0) {
    void* shared = mmap(NULL, sizeof(struct counters), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shared != MAP_FAILED) counts = shared;
  }
  close(fd);
}

static void count(uint64_t* counter, size_t bytes) {
  __atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&counts->bytes, bytes, __ATOMIC_RELAXED);
}

void* malloc(size_t size) {
  count(&counts->allocations, size);
  return __libc_malloc(size);
}

void* calloc(size_t n, size_t size) {
  count(&counts->allocations, n * size);
  return __libc_calloc(n, size);
}

void* realloc(void* p, size_t size) {
  count(p == NULL ? &counts->allocations : &counts->reallocations, size);
  return __libc_realloc(p, size);
}

void* memalign(size_t alignment, size_t size) {
  count(&counts->allocations, size);
  return __libc_memalign(alignment, size);
}

void* aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

int posix_memalign(void** out, size_t alignment, size_t size) {
  void* p = memalign(alignment, size);
  if (p == NULL) return 12; /* ENOMEM */
  *out = p;
  return 0;
}

void free(void* p) {
  if (p != NULL) __atomic_add_fetch(&counts->frees, 1, __ATOMIC_RELAXED);
  __libc_free(p);
}
