//! Counting global allocator: live heap bytes and a resettable high-water mark, so the CPU probe can
//! report what the process itself holds (the OS's RSS also counts mapped weights and freed-but-kept pages).
//!
//! Installed once, in the crate root:
//!
//! ```text
//! use zturbo::memory::alloc::CountingAlloc;
//!
//! #[global_allocator]
//! static GLOBAL: CountingAlloc = CountingAlloc;
//! ```
//!
//! Memory-mapped weights (safetensors via mmap) never pass through the allocator; the probe's RSS covers
//! them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

// usize rather than u64: 64-bit atomics are missing on some 32-bit targets, and live bytes fit a usize.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);

/// A [`GlobalAlloc`] over [`System`] that counts live bytes and their peak.
///
/// Every call costs one relaxed read-modify-write on the live counter; the peak is only written when the
/// live count passes it, which is rare once a process has warmed up.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAlloc;

#[inline]
fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed).wrapping_add(by);
    // A plain load first: the common case (below the peak) then costs no write to a shared cache line.
    if live > PEAK.load(Ordering::Relaxed) {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
    if !SEEN.load(Ordering::Relaxed) {
        SEEN.store(true, Ordering::Relaxed);
    }
}

#[inline]
fn shrank(by: usize) {
    LIVE.fetch_sub(by, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters are
// bookkeeping only and never affect which memory is returned.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract of `GlobalAlloc::alloc`.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract of `GlobalAlloc::alloc_zeroed`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract of `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract of `GlobalAlloc::realloc`.
        let new_ptr = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block is still live and unchanged, so nothing to count.
        if !new_ptr.is_null() {
            let old_size = layout.size();
            if new_size >= old_size {
                grew(new_size - old_size);
            } else {
                shrank(old_size - new_size);
            }
        }
        new_ptr
    }
}

/// Heap bytes currently allocated through [`CountingAlloc`] (0 when it is not installed).
pub fn live_bytes() -> u64 {
    LIVE.load(Ordering::Relaxed) as u64
}

/// Highest [`live_bytes`] seen since start or since the last [`reset_peak`].
pub fn peak_bytes() -> u64 {
    // Relaxed reads of two counters can see `live` a moment ahead of `peak`; a peak below the live count
    // is never true, so report at least the live count.
    (PEAK.load(Ordering::Relaxed) as u64).max(live_bytes())
}

/// Starts a new peak window at the current live count; returns the peak of the window that ended.
pub fn reset_peak() -> u64 {
    let live = LIVE.load(Ordering::Relaxed);
    (PEAK.swap(live, Ordering::Relaxed) as u64).max(live as u64)
}

/// Whether [`CountingAlloc`] has served any allocation, i.e. whether the numbers above are real readings
/// rather than zeros from an allocator that was never installed.
pub fn is_installed() -> bool {
    SEEN.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_in_this_test_binary() {
        // lib.rs installs CountingAlloc, and the test harness itself allocates before any test runs.
        assert!(is_installed());
        assert!(live_bytes() > 0);
    }
}
