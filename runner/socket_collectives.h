// Collectives over TCP between the processes of a multi-host group, for the host backend
// (the CPU twins of the device ops), where NCCL does not apply. They make the device
// engine's multi-host paths (the cluster's commands, the id hand-out, the load barrier,
// the communicator's watchdog and abort) run, and be tested, on machines without GPUs.
//
// Rank 0 relays: the other ranks connect to it; it reduces the ranks' buffers with
// kernels::tree_sum in rank order, as the in-process communicator does, so a group of
// hosts gives the bits of one host. Every message carries the operation and its size,
// and rank 0 refuses a rank whose collective differs from its own. Not a fast transport:
// it is for testing and for small models.
#pragma once

#include <string>

#include "common/common.h"
#include "kernels/ops.h"

namespace grokit::runner {

// The table (GrokitCollectives, this build's ABI). unique_id listens on an ephemeral TCP
// port of every interface; the id names the port, and the host to reach it at (set with
// socket_id_set_host on every host before comm_init).
const GrokitCollectives* socket_collectives();

// Writes into a socket collectives id where rank 0 listens, as this host reaches it
// ("127.0.0.1" on the leader's own host, the leader's address elsewhere).
Status socket_id_set_host(GrokitNcclId* id, const std::string& host);

}  // namespace grokit::runner
