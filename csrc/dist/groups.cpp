#include <cstdlib>
#include <stdexcept>
#include <string>

#include "core/check.h"
#include "dist/comm.h"

namespace dsv3 {

ParallelLayout parse_parallel_layout(const std::string& s) {
  ParallelLayout l;
  bool seen_dp = false, seen_ep = false;
  size_t i = 0;
  while (!s.empty() && i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string part = s.substr(i, j - i);
    const size_t eq = part.find('=');
    const std::string key = part.substr(0, eq);
    DSV3_CHECK(eq != std::string::npos && (key == "dp" || key == "ep"),
               "[parallel] expected 'dp=N,ep=M' (either part optional), got '", s,
               "': cannot read '", part, "'");
    const std::string val = part.substr(eq + 1);
    char* end = nullptr;
    const long v = std::strtol(val.c_str(), &end, 10);
    DSV3_CHECK(!val.empty() && end && *end == '\0' && v >= 1 && v <= 65536, "[parallel] ", key,
               " must be an integer >= 1, got '", val, "' in '", s, "'");
    bool& seen = key == "dp" ? seen_dp : seen_ep;
    DSV3_CHECK(!seen, "[parallel] ", key, " is given twice in '", s, "'");
    seen = true;
    (key == "dp" ? l.dp : l.ep) = (int)v;
    i = j + 1;
  }
  return l;
}

ParallelGroups make_groups(const std::shared_ptr<Comm>& world, const ParallelLayout& layout) {
  DSV3_CHECK(world, "[parallel] no communicator (dsv3 was built without MPI)");
  DSV3_CHECK(layout.world() == world->size(), "[parallel] dp*ep = ", layout.dp, "*", layout.ep,
             " = ", layout.world(), " must equal the number of processes (", world->size(), ")");
  ParallelGroups g;
  g.layout = layout;
  g.world = world;
  const int r = world->rank();
  g.ep_group = world->split(r / layout.ep, r % layout.ep);
  g.dp_group = world->split(r % layout.ep, r / layout.ep);
  return g;
}

}  // namespace dsv3
