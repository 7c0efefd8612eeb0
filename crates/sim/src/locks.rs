//! Locking that a panicked handler cannot poison for everyone else.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, tolerating poison: a panicked handler must not take the simulator down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
