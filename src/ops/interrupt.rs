//! Cooperative interruption of long kernels. The engine marks the thread that runs a job
//! with the job's cancel flag ([`scope`]); kernels that run for long (the VAE's convolutions,
//! band by band) call [`check`] or poll [`current`] and stop with an error once it is set, so a
//! cancel or a shutdown does not wait for a whole decode. Outside a scope nothing is ever
//! interrupted.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The error text of an interrupted computation (the engine reports it as a cancellation).
pub const INTERRUPTED: &str = "interrupted: the job was cancelled";

thread_local! {
    static CURRENT: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// While alive, [`check`] on this thread fails once `flag` is set.
pub struct Scope {
    previous: Option<Arc<AtomicBool>>,
}

/// Makes `flag` this thread's interruption flag until the returned guard is dropped.
pub fn scope(flag: Arc<AtomicBool>) -> Scope {
    let previous = CURRENT.with(|c| c.borrow_mut().replace(flag));
    Scope { previous }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// This thread's flag, to hand to worker threads of a parallel loop.
pub fn current() -> Option<Arc<AtomicBool>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Whether `flag` (from [`current`]) is set.
pub fn is_set(flag: &Option<Arc<AtomicBool>>) -> bool {
    flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// `Err` once this thread's flag is set.
pub fn check() -> candle_core::Result<()> {
    if CURRENT.with(|c| is_set(&c.borrow())) {
        return Err(candle_core::Error::Msg(INTERRUPTED.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_to_the_thread_and_restored() {
        assert!(check().is_ok(), "no scope: never interrupted");
        let flag = Arc::new(AtomicBool::new(false));
        {
            let _s = scope(flag.clone());
            assert!(check().is_ok());
            flag.store(true, Ordering::SeqCst);
            assert!(check().is_err());
            assert!(is_set(&current()));
            // Another thread is not affected.
            std::thread::spawn(|| assert!(check().is_ok()))
                .join()
                .unwrap();
        }
        assert!(check().is_ok(), "the scope ended");
    }
}
