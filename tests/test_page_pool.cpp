// PagePool (engine/page_pool.h): the KV cache's page bookkeeping, on the host.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "engine/page_pool.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using ::testing::HasSubstr;

std::vector<int> table_of(const PagePool& p, int seq) {
  return std::vector<int>(p.table(seq), p.table(seq) + p.table_size());
}

// The table lists the pages in position order, then the null page; no page is held twice.
void expect_consistent(const PagePool& p, int n_seqs) {
  std::set<int> held;
  size_t total = 0;
  for (int s = 0; s < n_seqs; ++s) {
    const auto& pg = p.pages(s);
    auto t = table_of(p, s);
    for (int i = 0; i < p.table_size(); ++i)
      EXPECT_EQ(t[size_t(i)], i < int(pg.size()) ? pg[size_t(i)] : p.null_page()) << "seq " << s << " entry " << i;
    held.insert(pg.begin(), pg.end());
    total += pg.size();
  }
  EXPECT_EQ(held.size(), total) << "a page is held twice";
  EXPECT_EQ(int(total) + p.free_pages(), p.n_pages());
  for (int pg : held) EXPECT_TRUE(pg >= 0 && pg < p.n_pages());
}

TEST(PagePool, InterleavedGrowthInterleavesPages) {
  PagePool p(8, 16, 2, 8);
  EXPECT_EQ(p.null_page(), 8);
  EXPECT_EQ(table_of(p, 0), std::vector<int>(8, 8));
  for (int rows = 4; rows <= 48; rows += 4) p.reserve({{0, rows}, {1, rows}});
  EXPECT_EQ(p.pages(0), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(p.pages(1), (std::vector<int>{1, 3, 5}));
  EXPECT_EQ(p.free_pages(), 2);
  expect_consistent(p, 2);
}

TEST(PagePool, ReservePartialPagesAndNoop) {
  PagePool p(4, 16, 1, 4);
  p.reserve({{0, 1}});
  EXPECT_EQ(p.pages(0).size(), 1u);
  p.reserve({{0, 16}});
  EXPECT_EQ(p.pages(0).size(), 1u);
  p.reserve({{0, 17}});
  EXPECT_EQ(p.pages(0).size(), 2u);
  p.reserve({{0, 0}});  // never shrinks
  EXPECT_EQ(p.pages(0).size(), 2u);
  expect_consistent(p, 1);
}

TEST(PagePool, ShrinkReturnsPagesAndRegrowTakesThemBack) {
  PagePool p(6, 16, 2, 4);
  p.reserve({{0, 64}});
  EXPECT_EQ(p.pages(0), (std::vector<int>{0, 1, 2, 3}));
  p.shrink(0, 20);  // keeps the pages of positions 0..19
  EXPECT_EQ(p.pages(0), (std::vector<int>{0, 1}));
  EXPECT_EQ(p.free_pages(), 4);
  p.reserve({{1, 10}});  // the lowest freed page first
  EXPECT_EQ(p.pages(1), (std::vector<int>{2}));
  p.reserve({{0, 50}});
  EXPECT_EQ(p.pages(0), (std::vector<int>{0, 1, 3, 4}));
  expect_consistent(p, 2);
  p.shrink(0, 0);
  p.shrink(1, 0);
  EXPECT_EQ(p.free_pages(), 6);
  expect_consistent(p, 2);
}

TEST(PagePool, ExhaustionNamesSequenceAndPositionAndTakesNothing) {
  PagePool p(3, 16, 2, 8);
  p.reserve({{0, 40}});  // pages 0, 1, 2
  try {
    p.reserve({{1, 1}});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("sequence 1 needs a page for position 0"));
    EXPECT_THAT(std::string(e.what()), HasSubstr("cache_pages"));
  }
  p.shrink(0, 16);  // one page left to sequence 0, two free
  try {
    p.reserve({{0, 20}, {1, 48}});  // 1 + 3 pages wanted, 2 free: sequence 1 gets one, not its second
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("sequence 1 needs a page for position 16"));
  }
  EXPECT_EQ(p.pages(0).size(), 1u);  // all or none
  EXPECT_TRUE(p.pages(1).empty());
  EXPECT_EQ(p.free_pages(), 2);
  expect_consistent(p, 2);
  EXPECT_THROW(p.reserve({{0, 8 * 16 + 1}}), Error);  // past the table
  EXPECT_THROW(p.reserve({{2, 1}}), Error);           // no such sequence
}

TEST(PagePool, DirtyRangesCoverEveryChange) {
  PagePool p(8, 4, 1, 8);
  EXPECT_EQ(p.take_dirty(0), (std::pair<int, int>{0, 0}));
  p.reserve({{0, 9}});
  EXPECT_EQ(p.take_dirty(0), (std::pair<int, int>{0, 3}));
  EXPECT_EQ(p.take_dirty(0), (std::pair<int, int>{0, 0}));
  p.reserve({{0, 20}});
  p.shrink(0, 6);
  EXPECT_EQ(p.take_dirty(0), (std::pair<int, int>{2, 5}));  // entries 3, 4 taken, then 2..4 freed
  p.shrink(0, 0);
  p.reserve({{0, 4}});
  EXPECT_EQ(p.take_dirty(0), (std::pair<int, int>{0, 2}));
}

}  // namespace
}  // namespace bigmoe
