//! A fixed pool of plain threads working through numbered jobs, with progress and abort.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Shared counters a job bumps as it goes; the caller reads them to draw progress.
#[derive(Default)]
pub struct Progress {
    /// Items (images, samples) finished.
    pub items: AtomicU64,
    /// Bytes of input finished.
    pub bytes: AtomicU64,
    /// Set when a job failed: other jobs stop at their next item.
    pub abort: AtomicBool,
}

impl Progress {
    /// Records one finished item of `bytes` bytes.
    pub fn add(&self, bytes: u64) {
        self.items.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Whether a job has failed and work should stop.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// Runs `job(i, progress)` for every `i` in `0..jobs` on `workers` threads, calling
/// `tick(progress)` about ten times a second and `done(i, result)` on this thread as each
/// job finishes. After the first error no new job starts, running ones see
/// [`Progress::aborted`], and that error is returned.
pub fn run_jobs<T: Send, E: Send>(
    jobs: usize,
    workers: usize,
    job: impl Fn(usize, &Progress) -> Result<T, E> + Sync,
    mut tick: impl FnMut(&Progress),
    mut done: impl FnMut(usize, T),
) -> Result<(), E> {
    let progress = Progress::default();
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Result<T, E>)>();
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, jobs.max(1)) {
            let tx = tx.clone();
            let (job, next, progress) = (&job, &next, &progress);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs || progress.aborted() {
                        break;
                    }
                    let result = job(i, progress);
                    let failed = result.is_err();
                    if failed {
                        progress.abort.store(true, Ordering::Relaxed);
                    }
                    // The receiver lives until every worker has ended.
                    tx.send((i, result)).expect("receiver outlives workers");
                    if failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((i, Ok(value))) => done(i, value),
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            tick(&progress);
        }
    });
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_job_once() {
        let mut seen = [0; 50];
        run_jobs(
            50,
            4,
            |i, _| Ok::<_, ()>(i * 2),
            |_| {},
            |i, v| {
                assert_eq!(v, i * 2);
                seen[i] += 1;
            },
        )
        .unwrap();
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn first_error_stops_the_rest() {
        let mut finished = 0;
        let err = run_jobs(
            1000,
            2,
            |i, p| {
                if i == 3 {
                    Err(format!("job {i} failed"))
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                    Ok(p.aborted())
                }
            },
            |_| {},
            |_, _| finished += 1,
        )
        .unwrap_err();
        assert_eq!(err, "job 3 failed");
        assert!(finished < 999);
    }
}
