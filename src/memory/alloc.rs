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
use std::sync::Mutex;

// usize rather than u64: 64-bit atomics are missing on some 32-bit targets, and live bytes fit a usize.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);

/// Blocks at least this large are kept for reuse when freed ([`Reuse`]). glibc serves smaller ones
/// from its heap once its mmap threshold has risen (up to 32 MiB), so only these were always fresh
/// mappings, every page of which faults and is zeroed by the kernel on first touch.
const REUSE_MIN: usize = (32 << 20) + 1;
/// How many freed large blocks may be kept at once.
const REUSE_SLOTS: usize = 8;

/// Large freed blocks kept for the next allocation of the same size: a denoiser step or a VAE
/// decode allocates and frees tensors of the same few shapes over and over (a 128-channel map at
/// 512² is 134 MB), and each fresh mapping costs 32 768 page faults and a kernel-side zeroing.
/// An allocation of 32 MiB or more that finds no kept block of its size first hands every kept
/// block back to the system, so the process never holds a kept block beside a new large one: the
/// resident set exceeds the live bytes only by blocks that wait for their size to come back, and
/// only until the next large allocation of another size.
struct Reuse {
    slots: Mutex<[(usize, usize, usize); REUSE_SLOTS]>,
}

static BIG: Reuse = Reuse::new();

impl Reuse {
    const fn new() -> Self {
        Self {
            slots: Mutex::new([(0, 0, 0); REUSE_SLOTS]),
        }
    }

    /// Blocks kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.slots
            .lock()
            .map_or(0, |s| s.iter().filter(|b| b.0 != 0).count())
    }

    /// A kept block of exactly `layout.size()` bytes, aligned for `layout`; otherwise every kept
    /// block is released and `None` returned.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let released = {
            let Ok(mut slots) = self.slots.lock() else {
                return None;
            };
            let hit = slots
                .iter_mut()
                .find(|(p, size, _)| *p != 0 && *size == layout.size() && *p % layout.align() == 0);
            if let Some(slot) = hit {
                return Some(std::mem::take(slot).0 as *mut u8);
            }
            std::mem::take(&mut *slots)
        };
        free_blocks(&released);
        None
    }

    /// Keeps a freed block; `false` when every slot is taken (the caller frees it).
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        let Ok(mut slots) = self.slots.lock() else {
            return false;
        };
        match slots.iter_mut().find(|(p, ..)| *p == 0) {
            Some(slot) => {
                *slot = (ptr as usize, layout.size(), layout.align());
                true
            }
            None => false,
        }
    }

    fn release_all(&self) {
        let released = match self.slots.lock() {
            Ok(mut slots) => std::mem::take(&mut *slots),
            Err(_) => return,
        };
        free_blocks(&released);
    }
}

/// Sets glibc's malloc up for a process that allocates and frees the same large tensors step after
/// step, once, before the first allocation: blocks up to 1 GiB come from the heap instead of a fresh
/// mapping each (by default everything over 128 KiB — over 32 MiB once the threshold has adapted —
/// is mapped on allocation and unmapped on free, and each page of it faults and is zeroed again on
/// first touch), and free heap memory is not trimmed back to the kernel after every free. Free memory
/// goes back at the end of each job instead (`engine::release_memory`: [`release_kept`] and
/// `malloc_trim`). Medium model at 512², 4 steps, `zturbo generate --precision f32` on the 2-core
/// Zen 4: page faults 1.33 M → 0.42 M, 12.2–13.4 s → 10.7–11.1 s; peak RSS 1.365 → 1.397 GB.
fn tune_once() {
    static TUNED: AtomicBool = AtomicBool::new(false);
    if TUNED.load(Ordering::Relaxed) || TUNED.swap(true, Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's thresholds; it allocates nothing through this
    // allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands every kept large block back to the system (the end of a job, with `malloc_trim`).
pub fn release_kept() {
    BIG.release_all();
}

/// Returns kept blocks to the system (outside the lock).
fn free_blocks(blocks: &[(usize, usize, usize)]) {
    for &(p, size, align) in blocks {
        if p != 0 {
            // SAFETY: each block came from `System` with this size and alignment (recorded by
            // `Reuse::keep` from the layout it was freed with) and is owned by no one else.
            unsafe { System.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, align)) };
        }
    }
}

/// A [`GlobalAlloc`] over [`System`] that counts live bytes and their peak, and keeps large freed
/// blocks for reuse ([`Reuse`]).
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

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, or hands out a
// block `System` allocated and the program freed with the same size ([`Reuse`]); the counters are
// bookkeeping only and never affect which memory is returned.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        tune_once();
        let ptr = if layout.size() >= REUSE_MIN {
            match BIG.take(layout) {
                Some(p) => p,
                // SAFETY: forwarded contract of `GlobalAlloc::alloc`.
                None => unsafe { System.alloc(layout) },
            }
        } else {
            // SAFETY: forwarded contract of `GlobalAlloc::alloc`.
            unsafe { System.alloc(layout) }
        };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        tune_once();
        // A kept block is cleared here: one memset costs less than faulting in fresh pages, which
        // the kernel zeroes as well.
        let kept = if layout.size() >= REUSE_MIN {
            BIG.take(layout)
        } else {
            None
        };
        let ptr = match kept {
            Some(p) => {
                // SAFETY: `p` is an owned block of `layout.size()` bytes.
                unsafe { p.write_bytes(0, layout.size()) };
                p
            }
            // SAFETY: forwarded contract of `GlobalAlloc::alloc_zeroed`.
            None => unsafe { System.alloc_zeroed(layout) },
        };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        if layout.size() >= REUSE_MIN && BIG.keep(ptr, layout) {
            return;
        }
        // SAFETY: forwarded contract of `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= REUSE_MIN && new_size > layout.size() {
            BIG.release_all();
        }
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

    /// A freed large block comes back for the next request of its size; a request of another size
    /// hands every kept block back to the system first; slots are bounded.
    #[test]
    fn large_blocks_are_reused_by_size_and_released_on_a_miss() {
        let reuse = Reuse::new();
        let a = Layout::from_size_align(REUSE_MIN + 4096, 64).unwrap();
        let b = Layout::from_size_align(REUSE_MIN + 8192, 64).unwrap();
        // SAFETY: blocks from `System` with these layouts, each kept or freed exactly once.
        unsafe {
            let p = System.alloc(a);
            assert!(!p.is_null());
            p.write(7);
            assert!(reuse.keep(p, a));
            assert_eq!(reuse.kept(), 1);
            // Same size, stricter alignment than the block has: not handed out.
            let strict = Layout::from_size_align(a.size(), 1 << 30).unwrap();
            assert_eq!(reuse.take(strict), None);
            assert_eq!(reuse.kept(), 0, "a miss releases what was kept");
            let p = System.alloc(a);
            assert!(reuse.keep(p, a));
            assert_eq!(reuse.take(a), Some(p));
            assert_eq!(reuse.kept(), 0);
            assert!(reuse.keep(p, a));
            // Another size: nothing handed out, and the kept block is gone.
            assert_eq!(reuse.take(b), None);
            assert_eq!(reuse.kept(), 0);
            let mut blocks = Vec::new();
            for _ in 0..REUSE_SLOTS {
                let p = System.alloc(a);
                assert!(reuse.keep(p, a));
                blocks.push(p);
            }
            let extra = System.alloc(a);
            assert!(!reuse.keep(extra, a), "slots are bounded");
            System.dealloc(extra, a);
            reuse.release_all();
            assert_eq!(reuse.kept(), 0);
        }
    }

    /// Through the installed allocator: a large vector freed and allocated again at the same size
    /// reads and writes like any other (contents are not promised, only ownership).
    #[test]
    fn reused_blocks_through_the_global_allocator_hold_data() {
        let n = REUSE_MIN / 4 + 1;
        for round in 0..3u32 {
            let mut v = vec![0u32; n];
            assert!(v.iter().all(|&x| x == 0), "zeroed even when reused");
            v[n - 1] = round + 1;
            let w: Vec<u32> = Vec::with_capacity(n);
            assert!(w.capacity() >= n);
            drop(v);
            let mut u: Vec<u32> = Vec::with_capacity(n);
            u.extend((0..n as u32).map(|i| i ^ round));
            assert_eq!(u[n - 1], (n as u32 - 1) ^ round);
        }
    }
}
