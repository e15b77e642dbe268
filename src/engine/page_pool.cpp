#include "engine/page_pool.h"

#include <algorithm>
#include <utility>

#include "util/error.h"

namespace bigmoe {

PagePool::PagePool(int n_pages, int page_rows, int n_seqs, int table_size)
    : n_pages_(n_pages), page_rows_(page_rows), table_size_(table_size) {
  BIGMOE_CHECK(n_pages >= 1 && page_rows >= 1 && n_seqs >= 1 && table_size >= 1,
               "PagePool: bad shape ({} pages of {} positions, {} sequences, {} table entries)", n_pages, page_rows,
               n_seqs, table_size);
  free_.resize(size_t(n_pages));
  for (int i = 0; i < n_pages; ++i) free_[size_t(i)] = n_pages - 1 - i;
  pages_.resize(size_t(n_seqs));
  tables_.assign(size_t(n_seqs) * table_size, null_page());
  dirty_.assign(size_t(n_seqs), {0, 0});
}

int PagePool::check_seq(int seq) const {
  BIGMOE_CHECK(seq >= 0 && seq < int(pages_.size()), "PagePool: no sequence {} (0..{})", seq, pages_.size() - 1);
  return seq;
}

void PagePool::reserve(const std::vector<std::pair<int, int>>& seq_rows) {
  // First the count, so that a step that cannot have all its pages takes none.
  std::vector<int> want(pages_.size(), 0);
  int taken = 0;
  for (const auto& [seq, rows] : seq_rows) {
    check_seq(seq);
    BIGMOE_CHECK(rows >= 0 && rows <= table_size_ * page_rows_,
                 "KV cache: sequence {} at {} positions exceeds its page table of {} pages of {} positions", seq, rows,
                 table_size_, page_rows_);
    const int have = std::max(int(pages_[size_t(seq)].size()), want[size_t(seq)]);
    const int need = pages_for(rows, page_rows_);
    if (need <= have) continue;
    if (taken + need - have > free_pages())
      fail("KV cache pool exhausted: sequence {} needs a page for position {}, and all {} pages ({} positions each) "
           "are taken; raise cache_pages or free sequences",
           seq, (have + free_pages() - taken) * page_rows_, n_pages_, page_rows_);
    taken += need - have;
    want[size_t(seq)] = need;
  }
  for (size_t s = 0; s < pages_.size(); ++s) {
    std::vector<int>& p = pages_[s];
    if (want[s] <= int(p.size())) continue;
    auto& d = dirty_[s];
    const int lo = int(p.size());
    while (int(p.size()) < want[s]) {
      tables_[s * table_size_ + p.size()] = free_.back();
      p.push_back(free_.back());
      free_.pop_back();
    }
    d = d.first == d.second ? std::pair{lo, want[s]} : std::pair{std::min(d.first, lo), std::max(d.second, want[s])};
  }
}

void PagePool::shrink(int seq, int rows) {
  check_seq(seq);
  BIGMOE_CHECK(rows >= 0, "PagePool::shrink: {} rows", rows);
  std::vector<int>& p = pages_[size_t(seq)];
  const int keep = pages_for(rows, page_rows_), had = int(p.size());
  if (keep >= had) return;
  // Freed in reverse, so the next reserve takes the lowest of them first.
  for (int i = had - 1; i >= keep; --i) {
    free_.push_back(p[size_t(i)]);
    tables_[size_t(seq) * table_size_ + i] = null_page();
  }
  p.resize(size_t(keep));
  auto& d = dirty_[size_t(seq)];
  d = d.first == d.second ? std::pair{keep, had} : std::pair{std::min(d.first, keep), std::max(d.second, had)};
}

std::pair<int, int> PagePool::take_dirty(int seq) {
  check_seq(seq);
  return std::exchange(dirty_[size_t(seq)], {0, 0});
}

}  // namespace bigmoe
