// A small C ABI over libtorch's distributed engine (c10d), which tch does not expose: a process
// group from a TCPStore rendezvous (Gloo on CPU, NCCL on CUDA), the collectives the trainer
// needs, an autograd-aware all-reduce (for synchronised batch norm), and DDP's own gradient
// Reducer (bucketed all-reduce launched from autograd hooks, overlapped with the backward pass).
//
// Every function catches C++ exceptions and returns them as a malloc'ed message (NULL on
// success) that the caller frees with tricks_dist_free_error.
#include <torch/headeronly/version.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef TRICKS_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "ffi_error.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

// The torch wheel ships c10d's headers but not Gloo's, so ProcessGroupGloo.hpp cannot be
// included. The class is declared here with exactly the members this file uses, all defined in
// libtorch_cpu (the mangled names match), and constructed in place in a buffer of the real
// class's size. That size (0x1e8) is the operand of `operator new` in libtorch 2.11.0's own
// ProcessGroupGloo::split/merge; the project pins torch==2.11.0 and the check below keeps a
// different libtorch from building this file silently.
static_assert(TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11,
              "csrc/dist.cpp: ProcessGroupGloo's size was taken from libtorch 2.11; re-measure it "
              "(objdump ProcessGroupGloo::split, operand of operator new) for another version");
namespace c10d {
class TORCH_API ProcessGroupGloo : public Backend {
 public:
  struct TORCH_API Options : public Backend::Options {
    // GLOO_SOCKET_IFNAME's interfaces when set, else the device for this host's name.
    static c10::intrusive_ptr<Options> create_default(std::chrono::milliseconds timeout);
    ~Options() override;
  };
  explicit ProcessGroupGloo(const c10::intrusive_ptr<Store>& store, int rank, int size,
                            c10::intrusive_ptr<Options> options);
  ~ProcessGroupGloo() override;
};
}  // namespace c10d
static constexpr size_t kProcessGroupGlooSize = 0x1e8;

namespace {

using tricks::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group& g) {
  work->wait(g.timeout);
}

void all_reduce_sum(c10d::Backend& backend, std::chrono::milliseconds timeout, at::Tensor& t) {
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  backend.allreduce(ts, opts)->wait(timeout);
}

void all_reduce_sum(Group& g, at::Tensor& t) { all_reduce_sum(*g.backend, g.timeout, t); }

// Sum over ranks in the forward pass and, since every rank's loss depends on the sum, sum of
// the incoming gradients over ranks in the backward pass (what SyncBatchNorm's statistics need).
// The graph node holds its own reference to the backend: a graph may outlive the Rust
// ProcessGroup that built it (a raw Group pointer here once made a backward pass crash after the
// group was released).
class AllReduceSumFn : public torch::autograd::Function<AllReduceSumFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            int64_t group) {
    const Group& g = *reinterpret_cast<Group*>(group);
    ctx->saved_data["backend"] = c10::IValue::make_capsule(g.backend);
    ctx->saved_data["timeout_ms"] = static_cast<int64_t>(g.timeout.count());
    at::Tensor y = x.detach().clone(at::MemoryFormat::Contiguous);
    all_reduce_sum(*g.backend, g.timeout, y);
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto backend = c10::static_intrusive_pointer_cast<c10d::Backend>(
        ctx->saved_data["backend"].toCapsule());
    const std::chrono::milliseconds timeout(ctx->saved_data["timeout_ms"].toInt());
    at::Tensor gy = grads[0].contiguous().clone();
    all_reduce_sum(*backend, timeout, gy);
    return {gy, at::Tensor()};
  }
};

}  // namespace

extern "C" {

void tricks_dist_free_error(char* err) { std::free(err); }

// backend: 0 = Gloo, 1 = NCCL. Blocks until all `world` ranks joined the TCPStore at
// host:port (rank 0 serves it) or `timeout_ms` passed.
char* tricks_dist_init(int backend, const char* host, int port, int rank, int world,
                       int64_t timeout_ms, void** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>("tricks/0", tcp);
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    c10::intrusive_ptr<c10d::Backend> be;
    if (backend == 0) {
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      void* mem = ::operator new(kProcessGroupGlooSize);
      c10d::ProcessGroupGloo* raw = nullptr;
      try {
        raw = new (mem) c10d::ProcessGroupGloo(store, rank, world, opts);
      } catch (...) {
        ::operator delete(mem);
        throw;
      }
      be = c10::intrusive_ptr<c10d::Backend>::unsafe_steal_from_new(
          static_cast<c10d::Backend*>(raw));
      pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
      pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, be);
    } else {
#ifdef TRICKS_WITH_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      be = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
      pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
      pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, be);
#else
      throw std::runtime_error(
          "this binary was built without NCCL (no nccl.h / CUDA headers in the torch install)");
#endif
    }
    be->setSequenceNumberForGroup();
    *out = new Group{tcp, pg, be, timeout};
  });
}

void tricks_dist_free(void* group) { delete static_cast<Group*>(group); }

char* tricks_dist_all_reduce_sum(void* group, at::Tensor* t) {
  return guarded([&] { all_reduce_sum(*static_cast<Group*>(group), *t); });
}

char* tricks_dist_all_reduce_max(void* group, at::Tensor* t) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::MAX;
    wait(g.backend->allreduce(ts, opts), g);
  });
}

char* tricks_dist_broadcast(void* group, at::Tensor* t, int root) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(g.backend->broadcast(ts, opts), g);
  });
}

char* tricks_dist_barrier(void* group) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    wait(g.backend->barrier(), g);
  });
}

// An autograd-aware sum over ranks of `t` (a new tensor in *out).
char* tricks_dist_all_reduce_sum_autograd(void* group, at::Tensor* t, at::Tensor** out) {
  return guarded([&] {
    at::Tensor y = AllReduceSumFn::apply(*t, reinterpret_cast<int64_t>(group));
    *out = new at::Tensor(std::move(y));
  });
}

// DDP's Reducer over `params` (which must require grad): buckets of at most `bucket_bytes`
// (the first one 1 MiB, as DDP does, so communication starts early in the backward pass),
// assigned in reverse order since gradients arrive from the last layer first. Gradients are
// averaged over ranks. Also checks that every rank holds parameters of the same shapes.
char* tricks_reducer_new(void* group, at::Tensor** params, const char** names, int n,
                         int64_t bucket_bytes, void** out) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> ps;
    std::unordered_map<size_t, std::string> param_names;
    for (int i = 0; i < n; i++) {
      ps.push_back(*params[i]);
      param_names[static_cast<size_t>(i)] = names[i];
    }
    c10d::verify_params_across_processes(g.pg, ps, std::nullopt);
    const int64_t first_bucket = 1024 * 1024;
    std::vector<bool> sparse(ps.size(), false);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        ps, {static_cast<size_t>(first_bucket), static_cast<size_t>(bucket_bytes)}, sparse);
    std::reverse(buckets.begin(), buckets.end());
    std::reverse(limits.begin(), limits.end());
    std::vector<int64_t> caps(limits.begin(), limits.end());
    *out = new c10d::Reducer(ps, buckets, g.pg, sparse, bucket_bytes,
                             /*find_unused_parameters=*/false,
                             /*gradient_as_bucket_view=*/false, param_names, first_bucket,
                             /*skip_all_reduce_unused_params=*/false,
                             /*use_python_reducer=*/false, caps);
  });
}

// What DDP's forward does before a training step's backward: rebuild the buckets in gradient
// arrival order after the first iteration (a collective), count the iteration, arm the hooks.
char* tricks_reducer_prepare(void* reducer) {
  return guarded([&] {
    auto* r = static_cast<c10d::Reducer*>(reducer);
    r->rebuild_buckets();
    r->prepare_for_forward();
    r->prepare_for_backward({});
  });
}

char* tricks_reducer_free(void* reducer) {
  return guarded([&] { delete static_cast<c10d::Reducer*>(reducer); });
}

// 1 when this binary can make NCCL process groups.
int tricks_dist_has_nccl() {
#ifdef TRICKS_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
