#include "pyckpt/errors.h"

#include <cstring>

namespace pyckpt {

namespace {
// Keep the part of __FILE__ from "csrc/" on: absolute build paths are noise.
const char* short_path(const char* file) {
  const char* p = std::strstr(file, "csrc/");
  return p ? p : file;
}
}  // namespace

void throw_at(ErrorKind kind, const std::string& message, const char* file, int line) {
  throw Error(kind, message + " [" + short_path(file) + ":" + std::to_string(line) + "]");
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r may return a static string instead of filling buf.
  const char* text = strerror_r(err, buf, sizeof buf);
  return std::string(text) + " (errno " + std::to_string(err) + ")";
}

}  // namespace pyckpt
