#include "daemon/state_file.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>  // renameat2, RENAME_NOREPLACE
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "daemon/failpoint.hpp"

namespace mailflow {
namespace {

namespace fs = std::filesystem;

bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

}  // namespace

bool write_state_file(const std::string& state_dir, std::string_view name, std::string_view text,
                      std::string& error) {
  const fs::path path = fs::path(state_dir) / name;
  const fs::path temp = fs::path(state_dir) / (std::string(name) + ".tmp");
  const auto fail = [&](const std::string& what, int saved_errno) {
    error = what + ": " + std::strerror(saved_errno);
    return false;
  };
  // A temporary file that an earlier run left (a crash, a kill -9; owned by root after a root run, so the
  // daemon's user could not open it to truncate it) made every later save fail: it is unlinked first
  // (state_dir has one writer, so nobody else has it open) and the new one is created exclusively, never
  // through a link.
  ::unlink(temp.c_str());
  const auto create = [&] { return ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640); };
  int fd = create();
  if (fd < 0 && errno == ENOENT) {
    // state_dir was deleted while the daemon runs (an operator's rm -rf, a clean-up job): made again as at
    // start, or every save would fail until a restart and the windows would be lost at stop.
    std::error_code ec;
    fs::create_directories(state_dir, ec);
    if (ec) return fail("cannot create " + state_dir, ec.value());
    fd = create();
  }
  if (fd < 0) return fail("cannot create " + temp.string(), errno);
  // The tests' slow disk (a busy HDD or network volume takes 10-500 ms per fsync): state.fsync=Nms.
  if (const auto delay = failpoint_delay("state.fsync"); delay.count() > 0)
    std::this_thread::sleep_for(delay);
  if (!write_all(fd, text) || ::fsync(fd) != 0) {
    const int saved = errno;
    ::close(fd);
    ::unlink(temp.c_str());
    return fail("cannot write " + temp.string(), saved);
  }
  if (::close(fd) != 0) {
    const int saved = errno;
    ::unlink(temp.c_str());
    return fail("cannot write " + temp.string(), saved);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    ::unlink(temp.c_str());
    return fail("cannot rename " + temp.string() + " to " + path.string(), saved);
  }
  const int dir_fd = ::open(state_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return fail("cannot open " + state_dir, errno);
  if (::fsync(dir_fd) != 0) {
    const int saved = errno;
    ::close(dir_fd);
    return fail("cannot sync " + state_dir, saved);
  }
  ::close(dir_fd);
  error.clear();
  return true;
}

StateDirLock::StateDirLock(const std::string& state_dir) : state_dir_(state_dir) {
  const fs::path path = fs::path(state_dir) / "mailflowd.lock";
  const auto fail = [&](const std::string& what, int saved_errno) {
    if (fd_ >= 0) ::close(fd_);
    throw std::runtime_error("state_dir " + state_dir + ": " + what + ": " + std::strerror(saved_errno));
  };
  std::error_code ec;
  fs::create_directories(state_dir, ec);
  if (ec) fail("cannot create it", ec.value());
  // O_NONBLOCK: a FIFO there opens at once (read-only, it would wait for a writer forever) and is refused
  // below.
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0644);
  const bool writable = fd_ >= 0;
  // Made by a run as another user (root): a lock needs no write access, only the pid is not written then.
  if (fd_ < 0 && errno == EACCES) fd_ = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) fail("cannot open " + path.string(), errno);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail("cannot read " + path.string(), errno);
  if (!S_ISREG(st.st_mode)) {
    ::close(fd_);
    throw std::runtime_error("state_dir " + state_dir + ": " + path.string() + ": not a regular file");
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) fail("cannot lock " + path.string(), errno);
    char text[24] = {};
    const ssize_t n = ::pread(fd_, text, sizeof text - 1, 0);
    std::string pid(text, n > 0 ? static_cast<std::size_t>(n) : 0);
    pid.resize(std::min(pid.size(), pid.find_first_not_of("0123456789")));  // the digits of "1234\n"
    ::close(fd_);
    throw InUse("state_dir " + state_dir + " is in use by another mailflowd process (pid " +
                (pid.empty() ? "unknown" : pid) + ", which holds " + path.string() +
                "): two processes on one state_dir overwrite each other's state");
  }
  if (writable) {
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd_, 0) != 0 ||
        ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size()))
      fail("cannot write " + path.string(), errno);
  }
}

StateDirLock::~StateDirLock() { ::close(fd_); }

StateDirLock::Kept StateDirLock::keep(std::string& error) {
  const fs::path path = fs::path(state_dir_) / "mailflowd.lock";
  struct stat held {};
  struct stat there {};
  if (::fstat(fd_, &held) == 0 && ::lstat(path.c_str(), &there) == 0 && held.st_dev == there.st_dev &&
      held.st_ino == there.st_ino)
    return Kept::held;
  try {
    StateDirLock again(state_dir_);
    std::swap(fd_, again.fd_);  // the lock on the deleted file is released with `again`
    return Kept::taken_again;
  } catch (const std::exception& e) {
    error = e.what();
    return Kept::lost;
  }
}

StateRead read_state_file(const std::string& state_dir, std::string_view name, std::size_t max_bytes,
                          std::string& text, std::string& error) {
  const fs::path path = fs::path(state_dir) / name;
  text.clear();
  // O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (the daemon never started, and never
  // said why), and is refused below as what it is.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) return StateRead::absent;
    error = "cannot open " + path.string() + ": " + std::strerror(errno);
    return StateRead::failed;
  }
  // Only a regular file is state, as Postfix's safe_open() takes nothing else ("must be a regular file"):
  // like a file that cannot be read, it is refused, naming it, and nothing is moved or overwritten.
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    error = "cannot read " + path.string() + ": not a regular file";
    return StateRead::failed;
  }
  char buffer[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int saved = errno;
      ::close(fd);
      error = "cannot read " + path.string() + ": " + std::strerror(saved);
      return StateRead::failed;
    }
    if (n == 0) break;
    if (text.size() + static_cast<std::size_t>(n) > max_bytes) {
      ::close(fd);
      error = "larger than " + std::to_string(max_bytes) + " bytes";
      return StateRead::too_big;
    }
    text.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return StateRead::read;
}

namespace {

// (unix time, N) of NAME.corrupt-<unix time>[-N] (N = 1 without a suffix); nullopt for any other file name.
std::optional<std::pair<std::int64_t, std::int64_t>> aside_order(std::string_view file,
                                                                 std::string_view prefix) {
  if (!file.starts_with(prefix)) return std::nullopt;
  file.remove_prefix(prefix.size());
  const auto number = [](std::string_view digits) -> std::optional<std::int64_t> {
    std::int64_t value = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || digits.front() == '-')
      return std::nullopt;
    return value;
  };
  const auto dash = file.find('-');
  const auto time = number(file.substr(0, dash));
  const auto n =
      dash == std::string_view::npos ? std::optional<std::int64_t>(1) : number(file.substr(dash + 1));
  if (!time || !n) return std::nullopt;
  return std::pair{*time, *n};
}

// Keeps `kept` (just moved aside) and the newest others of NAME.corrupt-* up to max_kept_aside in all: a
// file that is corrupt at every start (a restart loop, a disk going bad) must not fill state_dir. Returns the
// names removed, oldest first.
std::vector<std::string> remove_oldest_aside(const fs::path& state_dir, std::string_view name,
                                             const fs::path& kept) {
  const std::string prefix = std::string(name) + ".corrupt-";
  std::vector<std::pair<std::pair<std::int64_t, std::int64_t>, std::string>> others;
  std::error_code ec;
  for (fs::directory_iterator it(state_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string file = it->path().filename().string();
    if (it->path() == kept) continue;
    if (const auto order = aside_order(file, prefix)) others.emplace_back(*order, file);
  }
  std::sort(others.begin(), others.end());
  std::vector<std::string> removed;
  for (std::size_t i = 0; i + (max_kept_aside - 1) < others.size(); ++i) {
    if (fs::remove(state_dir / others[i].second, ec)) removed.push_back(others[i].second);
  }
  return removed;
}

}  // namespace

std::string move_state_file_aside(const std::string& state_dir, std::string_view name,
                                  std::int64_t unix_time) {
  const fs::path path = fs::path(state_dir) / name;
  const std::string first = std::string(name) + ".corrupt-" + std::to_string(unix_time);
  // Never over an earlier one: two files moved aside in the same second (a restart loop, another bad copy
  // restored at once) keep both evidence, the later as NAME.corrupt-<time>-2, -3, ...
  constexpr int kMostPerSecond = 1000;
  for (int n = 1; n <= kMostPerSecond; ++n) {
    const fs::path aside = fs::path(state_dir) / (n == 1 ? first : first + "-" + std::to_string(n));
    int moved = ::renameat2(AT_FDCWD, path.c_str(), AT_FDCWD, aside.c_str(), RENAME_NOREPLACE);
    if (moved != 0 && errno == EINVAL) {
      // A file system without RENAME_NOREPLACE (NFS): link() never replaces either.
      moved = ::link(path.c_str(), aside.c_str());
      if (moved == 0) ::unlink(path.c_str());
    }
    if (moved == 0) {
      const auto removed = remove_oldest_aside(state_dir, name, aside);
      std::string said = "moved to " + aside.string();
      for (std::size_t i = 0; i < removed.size(); ++i)
        said += (i == 0 ? " (removed the oldest moved aside before: " : ", ") + removed[i];
      return removed.empty() ? said : said + ")";
    }
    if (errno != EEXIST) return "cannot be moved aside: " + std::string(std::strerror(errno));
  }
  return "cannot be moved aside: " + std::to_string(kMostPerSecond) + " files named " + first + "* already";
}

}  // namespace mailflow
