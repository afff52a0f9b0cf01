// The MPI implementation of comm.h (built only when CMake finds MPI: DSV3_WITH_MPI).
//
// Deterministic sums (comm.h): x is cut into W contiguous chunks; chunk p of every rank goes
// to rank p (one all-to-all), rank p adds the W copies in rank order 0..W-1, and an
// all-gather returns the summed chunks to everyone. Same traffic as a ring all-reduce
// (2 (W-1)/W n elements sent per rank), and the bits do not depend on MPI's algorithm choice.
// Messages are cut into segments of at most kSegment elements (MPI counts are int).
//
// All-to-all with per-rank byte counts: one MPI_Alltoallv while every count and displacement
// fits an int; when any rank's does not (a message or offset above 2 GiB, or above
// DSV3_MPI_MAX_MESSAGE bytes, the limit's override for tests), every rank learns it from one
// MPI_Allreduce of a flag and all of them move the data as point-to-point pieces of at most
// that many bytes (MPI keeps the pieces between two ranks in order).
//
// Thread level: dsv3 asks MPI_Init_thread for MPI_THREAD_MULTIPLE; DSV3_MPI_THREAD = single |
// funneled | serialized | multiple asks for another level instead (tests: the Trainer's three
// paths, train_parallel.cpp: no communication thread below serialized; the expert dispatch
// through that thread at serialized; direct at multiple).
#ifdef DSV3_WITH_MPI
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/check.h"
#include "dist/comm.h"

namespace dsv3 {

namespace {

constexpr int64_t kSegment = int64_t(1) << 24;  // elements per collective call

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <typename T> MPI_Datatype mpi_type();
template <> MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <> MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(std::string("[dsv3.distributed] ") + what + " failed: " +
                           std::string(msg, (size_t)len));
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm c, bool owned) : c_(c), owned_(owned) {
    MPI_Comm_rank(c_, &rank_);
    MPI_Comm_size(c_, &size_);
    if (const char* v = std::getenv("DSV3_MPI_MAX_MESSAGE"); v && *v) {
      const long long m = std::atoll(v);
      if (m >= 1 && m < max_msg_) max_msg_ = m;
    }
  }
  ~MpiComm() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned_ && !fin) MPI_Comm_free(&c_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(float* x, int64_t n) override { ordered_sum(x, n); }
  void allreduce_sum(double* x, int64_t n) override { ordered_sum(x, n); }
  void allreduce_sum(int64_t* x, int64_t n) override {  // integer sums are exact
    const double t0 = now();
    for (int64_t o = 0; o < n; o += kSegment)
      check(MPI_Allreduce(MPI_IN_PLACE, x + o, (int)std::min(kSegment, n - o), MPI_INT64_T,
                          MPI_SUM, c_), "MPI_Allreduce");
    seconds_allreduce += now() - t0;
  }

  void alltoallv(const void* send, const int64_t* scount, const int64_t* sdispl, void* recv,
                 const int64_t* rcount, const int64_t* rdispl) override {
    const double t0 = now();
    int big = 0, any = 0;
    for (int p = 0; p < size_; ++p) {
      big |= sdispl[p] + scount[p] > max_msg_ || rdispl[p] + rcount[p] > max_msg_;
      if (p != rank_) bytes_alltoall += scount[p];
    }
    check(MPI_Allreduce(&big, &any, 1, MPI_INT, MPI_MAX, c_), "MPI_Allreduce");
    if (any)
      alltoallv_pieces((const char*)send, scount, sdispl, (char*)recv, rcount, rdispl);
    else
      alltoallv_one(send, scount, sdispl, recv, rcount, rdispl);
    seconds_alltoall += now() - t0;
  }

  void allgather(const int64_t* x, int64_t n, int64_t* out) override {
    check(MPI_Allgather(x, (int)n, MPI_INT64_T, out, (int)n, MPI_INT64_T, c_), "MPI_Allgather");
  }
  void barrier() override { check(MPI_Barrier(c_), "MPI_Barrier"); }

  std::shared_ptr<Comm> split(int color, int key) override {
    MPI_Comm out;
    check(MPI_Comm_split(c_, color, key, &out), "MPI_Comm_split");
    return std::make_shared<MpiComm>(out, true);
  }

 private:
  void alltoallv_one(const void* send, const int64_t* scount, const int64_t* sdispl, void* recv,
                     const int64_t* rcount, const int64_t* rdispl) {
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    for (int p = 0; p < size_; ++p) {
      sc[p] = (int)scount[p];
      sd[p] = (int)sdispl[p];
      rc[p] = (int)rcount[p];
      rd[p] = (int)rdispl[p];
    }
    check(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(),
                        MPI_BYTE, c_), "MPI_Alltoallv");
  }

  void alltoallv_pieces(const char* send, const int64_t* scount, const int64_t* sdispl,
                        char* recv, const int64_t* rcount, const int64_t* rdispl) {
    constexpr int kTag = 0x5d3;
    DSV3_CHECK(scount[rank_] == rcount[rank_], "[dsv3.distributed] all-to-all: this rank sends "
               "itself ", scount[rank_], " bytes but expects ", rcount[rank_]);
    std::vector<MPI_Request> req;
    auto post = [&](bool is_send, int p) {
      const int64_t n = is_send ? scount[p] : rcount[p];
      for (int64_t o = 0; o < n; o += max_msg_) {
        const int m = (int)std::min<int64_t>(max_msg_, n - o);
        req.emplace_back();
        if (is_send)
          check(MPI_Isend(send + sdispl[p] + o, m, MPI_BYTE, p, kTag, c_, &req.back()),
                "MPI_Isend");
        else
          check(MPI_Irecv(recv + rdispl[p] + o, m, MPI_BYTE, p, kTag, c_, &req.back()),
                "MPI_Irecv");
      }
    };
    for (int p = 0; p < size_; ++p)
      if (p != rank_) post(false, p);
    for (int p = 0; p < size_; ++p)
      if (p != rank_) post(true, p);
    if (scount[rank_] > 0) std::memcpy(recv + rdispl[rank_], send + sdispl[rank_], scount[rank_]);
    check(MPI_Waitall((int)req.size(), req.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  }

  template <typename T>
  void ordered_sum(T* x, int64_t n) {
    if (size_ == 1 || n == 0) return;
    const double t0 = now();
    const int W = size_;
    std::vector<T> recv;
    std::vector<int> cnt(W), dsp(W), rcnt(W), rdsp(W);
    for (int64_t o = 0; o < n; o += kSegment) {
      const int64_t m = std::min(kSegment, n - o);
      // chunk p = [p*m/W, (p+1)*m/W)
      for (int p = 0; p < W; ++p) {
        dsp[p] = (int)(p * m / W);
        cnt[p] = (int)((p + 1) * m / W) - dsp[p];
      }
      const int mine = cnt[rank_];
      recv.resize((size_t)mine * W);
      for (int p = 0; p < W; ++p) {
        rcnt[p] = mine;
        rdsp[p] = p * mine;
      }
      check(MPI_Alltoallv(x + o, cnt.data(), dsp.data(), mpi_type<T>(), recv.data(),
                          rcnt.data(), rdsp.data(), mpi_type<T>(), c_), "MPI_Alltoallv");
      T* dst = x + o + dsp[rank_];
      for (int i = 0; i < mine; ++i) {
        T s = recv[i];  // rank 0's copy, then ranks 1..W-1 in order
        for (int p = 1; p < W; ++p) s += recv[(size_t)p * mine + i];
        dst[i] = s;
      }
      check(MPI_Allgatherv(MPI_IN_PLACE, 0, mpi_type<T>(), x + o, cnt.data(), dsp.data(),
                           mpi_type<T>(), c_), "MPI_Allgatherv");
      bytes_allreduce += (int64_t)sizeof(T) * 2 * (m - mine);
    }
    seconds_allreduce += now() - t0;
  }

  MPI_Comm c_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  int64_t max_msg_ = INT_MAX;  // bytes per MPI message (counts and displacements are int)
};

bool g_we_initialised = false;

void finalize_at_exit() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (!fin) MPI_Finalize();
}

}  // namespace

bool mpi_available() { return true; }

int mpi_thread_level() {
  int init = 0, level = MPI_THREAD_SINGLE;
  MPI_Initialized(&init);
  if (!init) return 0;
  MPI_Query_thread(&level);
  return level >= MPI_THREAD_MULTIPLE ? 3 : level >= MPI_THREAD_SERIALIZED ? 2
         : level >= MPI_THREAD_FUNNELED ? 1 : 0;
}

std::string mpi_library_version() {
  char v[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(v, &len);
  std::string s(v, (size_t)len);
  const size_t nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

std::shared_ptr<Comm> mpi_world() {
  static std::shared_ptr<Comm> world;
  if (world) return world;
  int init = 0;
  MPI_Initialized(&init);
  if (!init) {
    int provided = 0, want = MPI_THREAD_MULTIPLE;
    if (const char* v = std::getenv("DSV3_MPI_THREAD"); v && *v) {
      const std::string s(v);
      DSV3_CHECK(s == "single" || s == "funneled" || s == "serialized" || s == "multiple",
                 "[dsv3.distributed] DSV3_MPI_THREAD must be single, funneled, serialized or ",
                 "multiple, got '", s, "'");
      want = s == "single"       ? MPI_THREAD_SINGLE
             : s == "funneled"   ? MPI_THREAD_FUNNELED
             : s == "serialized" ? MPI_THREAD_SERIALIZED
                                 : MPI_THREAD_MULTIPLE;
    }
    check(MPI_Init_thread(nullptr, nullptr, want, &provided), "MPI_Init_thread");
    g_we_initialised = true;
    std::atexit(finalize_at_exit);
  }
  world = std::make_shared<MpiComm>(MPI_COMM_WORLD, false);
  return world;
}

void mpi_abort(int code) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Abort(MPI_COMM_WORLD, code);
}

}  // namespace dsv3
#endif  // DSV3_WITH_MPI
