// Page bookkeeping of the paged KV cache (nano-vllm's block manager): a pool of n_pages pages of
// page_rows positions each, shared by up to n_seqs sequences. Sequence s's position r lives in
// page table(s)[r / page_rows], row r % page_rows of it. Pages come from a free list as a
// sequence grows (reserve) and go back when it shrinks or ends (shrink), so sequences share the
// memory rather than each holding max_context positions. Pure bookkeeping: the executor owns the
// pools (backend/cuda/glm_dsa_cuda.cpp keeps one per layer and kind, the same page index in all
// of them) and uploads the entries that changed (take_dirty) to its device copy of the tables.
//
// Entries past a sequence's pages hold null_page() (= n_pages): the pools keep one more page
// there that is never written, so a kernel that reads past a sequence's last position (a decode
// step's indexer scores every key up to a power-of-two capacity and masks later) reads that
// page rather than out of bounds or another sequence's rows.
#pragma once
#include <cstddef>
#include <utility>
#include <vector>

namespace bigmoe {

class PagePool {
 public:
  // table_size: entries of each sequence's table (ceil(max_context / page_rows)).
  PagePool(int n_pages, int page_rows, int n_seqs, int table_size);

  // Pages for positions [0, rows) of each (sequence, rows), all or none: when the free pages
  // do not cover them, throws bigmoe::Error naming the first sequence and position that finds
  // none (and changes nothing).
  void reserve(const std::vector<std::pair<int, int>>& seq_rows);
  // Keeps the pages of positions [0, rows) (ceil(rows / page_rows) of them) and frees the rest.
  void shrink(int seq, int rows);

  const int* table(int seq) const { return &tables_[size_t(check_seq(seq)) * table_size_]; }  // [table_size]
  const std::vector<int>& pages(int seq) const { return pages_[check_seq(seq)]; }  // in position order
  // The entries of seq's table changed since the last call, [first, second) (empty when equal).
  std::pair<int, int> take_dirty(int seq);

  int n_pages() const { return n_pages_; }
  int page_rows() const { return page_rows_; }
  int table_size() const { return table_size_; }
  int free_pages() const { return int(free_.size()); }
  int null_page() const { return n_pages_; }
  static int pages_for(int rows, int page_rows) { return (rows + page_rows - 1) / page_rows; }

 private:
  int check_seq(int seq) const;
  int n_pages_, page_rows_, table_size_;
  std::vector<int> free_;                // a stack: the lowest page index on top at first
  std::vector<std::vector<int>> pages_;  // [seq]: pages in position order
  std::vector<int> tables_;              // [seq][table_size]: pages_, then null_page()
  std::vector<std::pair<int, int>> dirty_;
};

}  // namespace bigmoe
