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

/// Serialises the unit tests that move the process-wide peak (allocator and CPU-probe tests run on
/// parallel threads).
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding the lock has already failed; the others can still run.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn installed_in_this_test_binary() {
        // lib.rs installs CountingAlloc, and the test harness itself allocates before any test runs.
        assert!(is_installed());
        assert!(live_bytes() > 0);
    }

    #[test]
    fn counts_alloc_free_and_peak() {
        let _guard = test_lock();
        let before = live_bytes();
        let buf: Vec<u8> = Vec::with_capacity(64 * MIB as usize);
        // Other test threads allocate and free concurrently; 64 MiB dwarfs their noise.
        let during = live_bytes();
        assert!(
            during >= before + 60 * MIB,
            "before {before}, during {during}"
        );
        assert!(peak_bytes() >= during.min(before + 64 * MIB));
        drop(buf);
        let after = live_bytes();
        assert!(after + 60 * MIB <= during, "during {during}, after {after}");
        // The freed block is gone from the live count but not from the peak.
        assert!(peak_bytes() >= before + 64 * MIB);
    }

    #[test]
    fn zeroed_allocation_is_counted() {
        let _guard = test_lock();
        let before = live_bytes();
        let buf = vec![0u8; 32 * MIB as usize];
        assert!(live_bytes() >= before + 30 * MIB);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn realloc_counts_the_delta() {
        let _guard = test_lock();
        let mut buf: Vec<u8> = Vec::with_capacity(8 * MIB as usize);
        let small = live_bytes();
        buf.reserve_exact(72 * MIB as usize);
        let grown = live_bytes();
        assert!(grown >= small + 60 * MIB, "small {small}, grown {grown}");
        buf.shrink_to(MIB as usize);
        let shrunk = live_bytes();
        assert!(shrunk + 60 * MIB <= grown, "grown {grown}, shrunk {shrunk}");
    }

    #[test]
    fn reset_peak_starts_a_new_window() {
        let _guard = test_lock();
        let big = vec![1u8; 48 * MIB as usize];
        let with_big = live_bytes();
        drop(big);
        let previous = reset_peak();
        assert!(
            previous >= with_big,
            "previous {previous}, with_big {with_big}"
        );
        // After the reset the dropped block no longer props up the peak.
        assert!(peak_bytes() + 40 * MIB <= previous);
    }
}
