// Communication between the processes of a parallel training run (data and expert parallel).
//
// Legend:  W world size (processes)   dp data-parallel degree   ep expert-parallel degree
//          W = dp * ep;  world rank r = d * ep + e  with  d = r / ep (its replica group index)
//          and e = r % ep (its EP rank: it owns routed experts [e*E/ep, (e+1)*E/ep))
//
// Every rank trains on its own 1/W of the global batch. With ep > 1 a routed expert is
// COMPUTED and HELD only by its owners (one per replica group; model/shard.h: the weights,
// gradients and AdamW moments of the other experts are not allocated): a token's hidden state
// travels to the EP ranks owning its selected experts and back (all-to-all inside its EP group,
// the ep consecutive world ranks of group d). The replicated parameters' gradients are summed
// over the world; an owned expert's over the dp_group (the dp ranks holding the same experts),
// so every holder of a weight applies the same update and the replicas stay identical.
//
// `Comm` is the interface the engine calls; the MPI implementation (mpi_comm.cpp) is built when
// CMake finds MPI. All collectives are blocking and must be entered by every rank of the
// communicator in the same order (the usual MPI rule). Sums are deterministic and identical on
// every rank (reduce-scatter in rank order, then all-gather: each element is summed by one rank
// in rank order 0..W-1 and the result is copied to the others), so replicas stay bit-identical.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // x[n] <- sum over ranks of x[n], the same bits on every rank.
  virtual void allreduce_sum(float* x, int64_t n) = 0;
  virtual void allreduce_sum(double* x, int64_t n) = 0;
  virtual void allreduce_sum(int64_t* x, int64_t n) = 0;
  // All-to-all of variable-size byte blocks: send[ sdispl[p] .. + scount[p] ) goes to rank p,
  // recv[ rdispl[p] .. + rcount[p] ) comes from rank p. Counts in bytes.
  virtual void alltoallv(const void* send, const int64_t* scount, const int64_t* sdispl,
                         void* recv, const int64_t* rcount, const int64_t* rdispl) = 0;
  // Every rank's n int64 values: out[p*n .. p*n+n) from rank p.
  virtual void allgather(const int64_t* x, int64_t n, int64_t* out) = 0;
  virtual void barrier() = 0;
  // The ranks with the same color, ordered by key (MPI_Comm_split).
  virtual std::shared_ptr<Comm> split(int color, int key) = 0;
  // Bytes this rank sent through alltoallv / allreduce since creation (statistics).
  int64_t bytes_alltoall = 0, bytes_allreduce = 0;
  double seconds_alltoall = 0, seconds_allreduce = 0;
};

struct ParallelLayout {
  int dp = 1, ep = 1;
  int world() const { return dp * ep; }
};
// "dp=2,ep=2" | "dp=4" | "ep=2" | "" (dp=1, ep=1); throws std::invalid_argument naming the
// part it cannot read.
ParallelLayout parse_parallel_layout(const std::string& s);

// The groups of one process (built once from the world communicator by make_groups):
//   world: all W ranks;  ep_group: the ep ranks sharing this rank's replica index d (expert
//   dispatch); dp_group: the dp ranks sharing this rank's EP index e (same experts).
struct ParallelGroups {
  ParallelLayout layout;
  std::shared_ptr<Comm> world, ep_group, dp_group;
  int dp_index() const { return world->rank() / layout.ep; }
  int ep_index() const { return world->rank() % layout.ep; }
};
// Checks layout.world() == world->size() (std::invalid_argument otherwise) and splits.
ParallelGroups make_groups(const std::shared_ptr<Comm>& world, const ParallelLayout& layout);

// The MPI world (MPI_Init_thread on first use when the process has not initialised MPI, and
// MPI_Finalize at exit in that case); null when dsv3 was built without MPI.
std::shared_ptr<Comm> mpi_world();
bool mpi_available();
// The thread support MPI granted: 0 single, 1 funneled, 2 serialized, 3 multiple (3 without
// MPI). dsv3 asks for MULTIPLE; the communication thread needs SERIALIZED (Trainer).
int mpi_thread_level();
std::string mpi_library_version();  // "" without MPI
// MPI_Abort of the world (a rank that fails stops the others instead of leaving them in a
// collective); nothing when MPI is not initialised.
void mpi_abort(int code);

}  // namespace dsv3
