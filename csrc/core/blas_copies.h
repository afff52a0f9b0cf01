// Private copies of a BLAS library that is not thread-safe (Debian's serial OpenBLAS, built
// without USE_LOCKING: its buffer allocator is a global table without locks).
//
// Each copy is the same file loaded a second time from an in-memory file (memfd_create +
// dlopen("/proc/self/fd/N", RTLD_LOCAL)): the loader sees another object, so the copy has
// globals (and buffers) of its own, while its code is the same bytes, so every copy computes
// the same bits. A thread leases one copy per call: the one it used last if free, another
// free one, a new one while there are fewer copies than dsv3 threads, else it waits for its
// own. Where copies cannot be made (no memfd, the loader refuses) or DSV3_BLAS_COPIES=0, one
// copy exists (the linked library) and calls are serialised.
#pragma once
#include <cblas.h>

#include <cstdint>
#include <string>

namespace dsv3 {

// cblas_sgemm's signature (the same in every OpenBLAS cblas.h, prefixed or not).
using SgemmFn = void (*)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint,
                         blasint, blasint, float, const float*, blasint, const float*, blasint,
                         float, float*, blasint);

class BlasLease {
 public:
  BlasLease();  // blocks until a copy is free (never long: one product piece)
  ~BlasLease();
  BlasLease(const BlasLease&) = delete;
  BlasLease& operator=(const BlasLease&) = delete;
  SgemmFn sgemm() const;

 private:
  int slot_;
};

// Must be called once before the first lease: the linked library's sgemm and its file.
void blas_copies_init(SgemmFn linked, const std::string& path, const char* symbol);
int blas_copies_loaded();           // copies loaded so far (1 = only the linked library)
const std::string& blas_copies_error();  // why copies are unavailable ("" if they are)

}  // namespace dsv3
