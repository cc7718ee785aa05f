// A minimal test harness: CHECK records a failure with its location and keeps going; main returns non-zero.
#pragma once

#include <cstdio>

namespace qk_test {
inline int& failures() {
  static int count = 0;
  return count;
}
}  // namespace qk_test

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++qk_test::failures();                                               \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
    }                                                                      \
  } while (0)

#define TEST_MAIN_RESULT(name)                                             \
  (std::printf("%s: %s\n", name, qk_test::failures() ? "FAILED" : "ok"), qk_test::failures() ? 1 : 0)
