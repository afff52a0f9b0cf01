// comm.h without MPI (CMake found none): parallel runs are refused with an explanation.
#ifndef DSV3_WITH_MPI
#include "dist/comm.h"

namespace dsv3 {
bool mpi_available() { return false; }
int mpi_thread_level() { return 3; }
std::string mpi_library_version() { return ""; }
std::shared_ptr<Comm> mpi_world() { return nullptr; }
void mpi_abort(int) {}
}  // namespace dsv3
#endif
