#pragma once
// The receive buffer of one connection: bytes read from the socket and not yet consumed by a parser.
//
// std::string would do, except for what it costs on the hot path: growing it to receive into means
// resize(), which zero-fills the whole room (64 KiB per DATA read) and, on memory the allocator has just
// returned to the kernel, page-faults it all back in first; erase(0, n) moves the rest on every command.
// Here room is handed out uninitialised, consumed bytes only advance an index, and the storage is released
// explicitly when an idle session should hold none.
#include <cstddef>
#include <cstring>
#include <memory>
#include <string_view>

namespace mailflow {

class ReadBuffer {
 public:
  std::string_view view() const { return {data_.get() + begin_, end_ - begin_}; }
  std::size_t size() const { return end_ - begin_; }
  bool empty() const { return begin_ == end_; }
  std::size_t capacity() const { return capacity_; }

  // Room for at least `n` more bytes after the data (uninitialised); fill some of it, then commit().
  char* prepare(std::size_t n) {
    if (end_ + n > capacity_) make_room(n);
    return data_.get() + end_;
  }
  void commit(std::size_t n) { end_ += n; }

  void append(std::string_view bytes) {
    std::memcpy(prepare(bytes.size()), bytes.data(), bytes.size());
    commit(bytes.size());
  }
  void consume(std::size_t n) {
    begin_ = n < end_ - begin_ ? begin_ + n : end_;
    if (begin_ == end_) begin_ = end_ = 0;
  }
  void clear() { begin_ = end_ = 0; }

  // Gives the storage back once nothing is buffered (an idle session holds no buffer).
  void release_if_empty() {
    if (!empty()) return;
    data_.reset();
    capacity_ = begin_ = end_ = 0;
  }

 private:
  // The slow path of prepare(), kept out of line (GCC 12 also misjudges the memmove bound when it is inlined
  // into callers with constant sizes).
  [[gnu::noinline]] void make_room(std::size_t n) {
    const std::size_t size = end_ - begin_;
    if (size + n <= capacity_) {
      std::memmove(data_.get(), data_.get() + begin_, size);  // enough room once the data moves to the front
    } else {
      std::size_t grown = capacity_ > 0 ? capacity_ : n;
      while (grown < size + n) grown *= 2;
      auto bigger = std::make_unique_for_overwrite<char[]>(grown);
      if (size > 0) std::memcpy(bigger.get(), data_.get() + begin_, size);
      data_ = std::move(bigger);
      capacity_ = grown;
    }
    begin_ = 0;
    end_ = size;
  }

  std::unique_ptr<char[]> data_;
  std::size_t capacity_ = 0;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
};

}  // namespace mailflow
