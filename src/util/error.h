// Errors that name the culprit: every message says which file, tensor or field is at
// fault and what was expected.
#pragma once
#include <fmt/format.h>
#include <stdexcept>
#include <string>

namespace bigmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

#define BIGMOE_CHECK(cond, ...)                 \
  do {                                          \
    if (!(cond)) ::bigmoe::fail(__VA_ARGS__);   \
  } while (0)

}  // namespace bigmoe
