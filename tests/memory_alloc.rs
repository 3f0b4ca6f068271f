//! The counting global allocator (installed by the library) under real allocations. These live in
//! their own test binary because the counters are process-wide: unit tests running in parallel
//! in the library's test binary would move them.

use zturbo::memory::alloc::{is_installed, live_bytes, peak_bytes, reset_peak};
use zturbo::memory::probe::{CpuProbe, MemoryProbe};

const MIB: u64 = 1 << 20;

fn lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn allocator_is_installed_through_the_library() {
    assert!(is_installed());
}

#[test]
fn counts_alloc_free_and_peak() {
    let _guard = lock();
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
    // The freed block is gone from the live count but not from the peak. `before` includes other
    // threads' transient allocations, which may be freed before the block is allocated: same
    // 4 MiB tolerance as above.
    assert!(peak_bytes() >= before + 60 * MIB);
}

#[test]
fn zeroed_allocation_is_counted() {
    let _guard = lock();
    let before = live_bytes();
    let buf = vec![0u8; 32 * MIB as usize];
    assert!(live_bytes() >= before + 30 * MIB);
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn realloc_counts_the_delta() {
    let _guard = lock();
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
    let _guard = lock();
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

#[test]
fn cpu_probe_peak_window() {
    let _guard = lock();
    let probe = CpuProbe::new();
    let big = vec![7u8; 40 << 20];
    let with_big = probe.peak_bytes();
    drop(big);
    assert!(probe.peak_bytes() >= with_big);
    probe.reset_peak();
    assert!(probe.peak_bytes() + (32 << 20) <= with_big);
}
