//! Sharing an operator's work between tract's threads (no threads of our own), and running a
//! model on them.

use tract_linalg::multithread::{Executor, current_tract_executor};

/// Runs `f` over `0..rows`, split into contiguous ranges shared between tract's threads (the
/// executor `polypwatch::bench::set_threads` and the daemon configure).
pub(crate) fn parallel_rows(rows: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 && rows > 1 => {
            // A few ranges per thread, so that a thread slowed by another process on its core
            // does not hold the whole operator back.
            let chunks = (pool.current_num_threads() * 4).min(rows);
            let f = &f;
            pool.scope(|s| {
                for c in 0..chunks {
                    s.spawn(move |_| f(c * rows / chunks..(c + 1) * rows / chunks));
                }
            });
        }
        _ => f(0..rows),
    }
}

/// How many threads [`parallel_rows`] shares work between.
pub(crate) fn threads() -> usize {
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// Below this many output elements an operator runs on one thread: waking the others costs more.
const PARALLEL_MIN: usize = 1 << 16;

/// A pointer shared by threads that write disjoint parts of what it points to.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: users only write disjoint elements, within the scope of the borrow it came from.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Calls `f(rows, part)` on disjoint parts of `out`, `row_len` elements a row (the last part
/// may be short), shared between tract's threads when `out` is large enough to be worth it.
pub(crate) fn parallel_parts<T: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let row_len = row_len.max(1);
    let rows = out.len().div_ceil(row_len);
    if out.len() < PARALLEL_MIN {
        return f(0..rows, out);
    }
    let (len, ptr) = (out.len(), SendPtr(out.as_mut_ptr()));
    parallel_rows(rows, |r| {
        let start = r.start * row_len;
        let end = (r.end * row_len).min(len);
        let ptr = &ptr;
        // SAFETY: `parallel_rows` hands out disjoint row ranges, so the parts are disjoint and
        // inside `out`, which is borrowed mutably for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), end - start) };
        f(r, part)
    });
}

/// Runs `f` (a model run, or a loop of them) on one of tract's threads when there are several.
///
/// tract's multithreaded executor is a pool of `threads` workers besides the thread that asks
/// for a run; on a 2-core board that made three busy threads, and the caller's serial operators
/// ran slower while a worker spun on its core (int8 frame, 2 threads: 19.5 ms, not faster than
/// one thread). Inside the pool the caller's work is one of the `threads`. Called again from
/// inside (a run within a loop that is already there), it runs `f` in place: a loop of frames
/// on the pool hands nothing over per frame.
pub fn on_tract_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 => pool.install(f),
        _ => f(),
    }
}
