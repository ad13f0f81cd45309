// A caching CPU allocator for training: tensors of at least `min_bytes` get their own anonymous
// memory mapping, and a freed mapping is kept (up to `limit` bytes in all, oldest evicted first)
// for the next request of the same page-rounded size. A training step asks for the same sizes
// in the same order every time, so nearly every request is served from the cache: no page
// faults, and no glibc heap that fragments and keeps freed memory resident (see
// docs/design.md, "Freed memory"). Smaller requests go to the allocator it replaced.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/core/Allocator.h>
#include <torch/extension.h>

namespace upq {
namespace {

constexpr size_t kPage = 4096;

struct Mapping {
  void* ptr;
  size_t size;
};

class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: live tensors may outlive everything
    return *cache;
  }

  // The context of every block is its own address (as Allocator::raw_allocate requires: oneDNN
  // allocates its scratch memory that way), so the cache keeps each live block's size. Requests
  // it does not serve take no lock.
  c10::DataPtr allocate(size_t n) override {
    if (!active_.load(std::memory_order_acquire) || n < min_bytes_.load(std::memory_order_relaxed)) {
      return fallback_->allocate(n);
    }
    const size_t size = (n + kPage - 1) & ~(kPage - 1);
    void* ptr = take(size);
    if (ptr == nullptr) {
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "out of memory: could not map ", size, " bytes");
      std::lock_guard<std::mutex> lock(mu_);
      mapped_ += size;
      peak_mapped_ = std::max(peak_mapped_, mapped_);
      ++misses_;
      live_[ptr] = size;
    }
    return {ptr, ptr, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Becomes the CPU allocator (for good: oneDNN frees scratch memory through whichever
  // allocator is current, so a later switch back could hand it one of these blocks) and starts
  // caching. False if it is already active.
  bool install(int64_t min_bytes, int64_t limit) {
    TORCH_CHECK(min_bytes >= 1 && limit >= 0, "block cache: min_bytes >= 1 and limit >= 0");
    std::lock_guard<std::mutex> lock(mu_);
    if (active_) return false;
    if (fallback_ == nullptr) {
      fallback_ = c10::GetAllocator(c10::DeviceType::CPU);
      c10::SetAllocator(c10::DeviceType::CPU, this);
    }
    min_bytes_ = static_cast<size_t>(min_bytes);
    limit_ = static_cast<size_t>(limit);
    active_.store(true, std::memory_order_release);
    return true;
  }

  // Stops caching: new requests go to the previous allocator, the cache is unmapped, and live
  // blocks are unmapped when freed.
  void uninstall() {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!active_) return;
      active_ = false;
      drop = evict(0);
    }
    unmap(drop);
  }

  std::unordered_map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {{"installed", active_.load()}, {"mapped_bytes", static_cast<int64_t>(mapped_)},
            {"peak_mapped_bytes", static_cast<int64_t>(peak_mapped_)}, {"cached_bytes", static_cast<int64_t>(cached_)},
            {"hits", hits_}, {"misses", misses_}};
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_mapped_ = mapped_;
    hits_ = misses_ = 0;
  }

 private:
  using Cached = std::list<Mapping>::iterator;

  // Frees a block of this cache, or (raw_deallocate of a small request) one of the fallback's.
  static void release(void* ptr) {
    BlockCache& cache = instance();
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(cache.mu_);
      auto live = cache.live_.find(ptr);
      if (live != cache.live_.end()) {
        size = live->second;
        cache.live_.erase(live);
      }
    }
    if (size == 0) {
      cache.fallback_->raw_deleter()(ptr);
    } else {
      cache.give_back({ptr, size});
    }
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto bin = bins_.find(size);
    if (bin == bins_.end() || bin->second.empty()) return nullptr;
    const Cached newest = bin->second.back();  // the most recently freed: likeliest still in the CPU caches
    bin->second.pop_back();
    void* ptr = newest->ptr;
    cached_list_.erase(newest);
    cached_ -= size;
    ++hits_;
    live_[ptr] = size;
    return ptr;
  }

  void give_back(const Mapping& mapping) {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!active_ || mapping.size > limit_) {
        drop.push_back(mapping);
      } else {
        bins_[mapping.size].push_back(cached_list_.insert(cached_list_.end(), mapping));
        cached_ += mapping.size;
        drop = evict(limit_);
      }
    }
    unmap(drop);
  }

  // Takes the oldest cached mappings out until at most `limit` bytes stay cached (holds mu_).
  std::vector<Mapping> evict(size_t limit) {
    std::vector<Mapping> drop;
    while (cached_ > limit) {
      const Cached oldest = cached_list_.begin();
      auto& bin = bins_[oldest->size];
      bin.erase(std::find(bin.begin(), bin.end(), oldest));
      drop.push_back(*oldest);
      cached_ -= oldest->size;
      cached_list_.erase(oldest);
    }
    return drop;
  }

  void unmap(const std::vector<Mapping>& drop) {
    size_t total = 0;
    for (const auto& m : drop) {
      munmap(m.ptr, m.size);
      total += m.size;
    }
    if (total == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    mapped_ -= total;
  }

  std::mutex mu_;
  c10::Allocator* fallback_ = nullptr;  // set once, before this becomes the CPU allocator
  std::atomic<bool> active_{false};
  std::atomic<size_t> min_bytes_{1 << 20};
  size_t limit_ = 0;
  std::list<Mapping> cached_list_;                               // freed mappings kept, oldest first
  std::unordered_map<size_t, std::vector<Cached>> bins_;         // page-rounded size -> its cached mappings
  std::unordered_map<void*, size_t> live_;                       // mapping in use -> its size
  size_t cached_ = 0, mapped_ = 0, peak_mapped_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

void bind_block_cache(py::module& m) {
  m.def("block_cache_install", [](int64_t min_bytes, int64_t limit) { return BlockCache::instance().install(min_bytes, limit); },
        "route CPU allocations of at least min_bytes through the block cache (keeping at most limit freed bytes); "
        "False if it is already installed", py::arg("min_bytes"), py::arg("limit"));
  m.def("block_cache_uninstall", [] { BlockCache::instance().uninstall(); },
        "stop caching: new requests go to the previous CPU allocator and the cached blocks are unmapped");
  m.def("block_cache_stats", [] { return BlockCache::instance().stats(); });
  m.def("block_cache_reset_peak", [] { BlockCache::instance().reset_peak(); });
}

}  // namespace upq
