// Error type shared by the engine, and the CHECK macros that carry file:line.
//
// Every failure the engine reports is a pyckpt::Error with a kind that
// bindings.cpp maps onto a Python exception class (RuntimeError, ValueError,
// OSError). Messages name the file/chunk involved so a user can act on them;
// internal invariant failures (CHECK) also carry the C++ source location.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

namespace pyckpt {

enum class ErrorKind { Runtime, Value, OS };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

/// Throws Error(kind, message + " [file:line]"); used by the CHECK macros.
[[noreturn]] void throw_at(ErrorKind kind, const std::string& message, const char* file,
                           int line);

/// "No such file or directory (errno 2)" for an errno value.
std::string errno_text(int err);

/// Message text for the CHECK macros, built with std::string alone. No
/// iostreams: the engine formats errors on its worker threads, and an engine
/// whose libstdc++ was linked statically by the toolchain (GCC 13.3 from
/// /opt/gcc on a GPU host) crashed in the stream's locale code there, next
/// to the process's own libstdc++ of another version.
class Msg {
 public:
  Msg& operator<<(const std::string& s) {
    s_ += s;
    return *this;
  }
  Msg& operator<<(const char* s) {
    s_ += s;
    return *this;
  }
  Msg& operator<<(char c) {
    s_ += c;
    return *this;
  }
  template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
  Msg& operator<<(T v) {
    s_ += std::to_string(v);
    return *this;
  }
  const std::string& str() const { return s_; }

 private:
  std::string s_;
};

}  // namespace pyckpt

#define PYCKPT_CHECK_KIND_(kind, cond, msg)                                        \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      ::pyckpt::Msg pyckpt_msg_;                                                   \
      pyckpt_msg_ << msg;                                                          \
      ::pyckpt::throw_at(::pyckpt::ErrorKind::kind, pyckpt_msg_.str(), __FILE__,   \
                         __LINE__);                                                \
    }                                                                              \
  } while (0)

/// Internal invariant / runtime failure -> RuntimeError.
#define PYCKPT_CHECK(cond, msg) PYCKPT_CHECK_KIND_(Runtime, cond, msg)
/// Bad argument from the caller -> ValueError.
#define PYCKPT_CHECK_ARG(cond, msg) PYCKPT_CHECK_KIND_(Value, cond, msg)
