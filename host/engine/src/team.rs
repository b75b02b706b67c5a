//! A team of spinning threads for the many short parallel loops of a decode step.
//!
//! Decoding one token runs some 120 quantized products of a few hundred microseconds each.
//! With rayon each is a fork and join, and the other thread has usually fallen asleep in
//! the gap between two of them (a norm, a rotation, an attention row): waking it costs
//! about as much as the work it is woken for, so the second core barely helps. llama.cpp
//! keeps its threads spinning between the ops of a graph. [`for_each`] does the same for
//! the loops given to it: the team's threads (one fewer than rayon's, the caller being the
//! last) spin for a while after each loop, so the next one finds them awake, and only then
//! sleep.
//!
//! `LATHE_SPIN_US` sets how long the threads spin (default 500 µs); 0 turns the team off and
//! leaves every loop to rayon, for machines where a spinning thread takes a core that
//! another process needs (llama.cpp's `--poll` is the same trade).
//!
//! Work is handed out one item at a time from a shared counter, so a slow or descheduled
//! thread costs its current item, not its share. A caller that finds the team busy (two
//! loops from two threads at once) runs its loop on rayon instead.
//!
//! The loop's closure and items live on the caller's stack while other threads use them, a
//! lifetime the compiler cannot see (as in any scoped pool): hence the `unsafe` below, each
//! block with the invariant that makes it sound.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a thread keeps spinning after its last loop before it sleeps, unless
/// `LATHE_SPIN_US` says otherwise. Longer than the gap between two products of a decode
/// step, short enough that a prefill (rayon's dense gemm on the same cores) loses little to
/// the spinners.
const SPIN: Duration = Duration::from_micros(500);

/// Runs `f` on every item, on the team when there is one and it is free: the caller works
/// too and returns once every item is done. Each item is given to exactly one thread.
pub(crate) fn for_each<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    if items.len() <= 1 {
        items.iter_mut().for_each(f);
        return;
    }
    match team() {
        Some(team) => team.run(items, &f),
        None => items.par_iter_mut().for_each(&f),
    }
}

/// How long the team's threads spin: `LATHE_SPIN_US`, or 500 µs. Commands check it first,
/// so a bad value is a clear error rather than the panic [`for_each`] would raise.
pub fn spin() -> Result<Duration, String> {
    static SPIN_FOR: OnceLock<Result<Duration, String>> = OnceLock::new();
    SPIN_FOR
        .get_or_init(|| match std::env::var("LATHE_SPIN_US") {
            Ok(v) => v
                .trim()
                .parse()
                .map(Duration::from_micros)
                .map_err(|_| format!("LATHE_SPIN_US={v:?}: expected whole microseconds (0 turns the spinning team off)")),
            Err(_) => Ok(SPIN),
        })
        .clone()
}

/// The process's team, sized to rayon's pool at first use; none with one thread or with
/// `LATHE_SPIN_US=0`.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<Team>> = OnceLock::new();
    TEAM.get_or_init(|| {
        let spin = spin().unwrap_or_else(|e| panic!("{e}"));
        let helpers = rayon::current_num_threads().saturating_sub(1);
        (helpers > 0 && !spin.is_zero()).then(|| Team::start(helpers, spin))
    })
    .as_ref()
}

/// A loop the helpers may join: items `0..len`, each run by calling `body(index)`.
#[derive(Clone, Copy)]
struct Job {
    /// Erased to `'static`; [`Team::run`] does not return (nor unwind) while a helper that
    /// joined can still call it.
    body: *const (dyn Fn(usize) + Sync),
    len: usize,
}

struct Team {
    shared: &'static Shared,
    /// Held by the thread whose loop the team runs.
    busy: Mutex<()>,
}

struct Shared {
    /// `job id << 32 | helpers that joined it`. An odd id is open: helpers may join. An even
    /// one is closed.
    ticket: AtomicU64,
    /// Written by the caller only while no job is open and every joined helper has left.
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    /// Helpers that finished with the current job.
    left: AtomicUsize,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only while no helper can read it (see `Team::run`), and the body
// it points to is `Sync`.
unsafe impl Sync for Shared {}

impl Team {
    fn start(helpers: usize, spin: Duration) -> Team {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            ticket: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                body: std::ptr::null::<fn(usize)>() as *const (dyn Fn(usize) + Sync),
                len: 0,
            }),
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..helpers {
            std::thread::Builder::new()
                .name(format!("lathe-team-{i}"))
                .spawn(move || shared.help(spin))
                .expect("starting a team thread");
        }
        Team {
            shared,
            busy: Mutex::new(()),
        }
    }

    fn run<T: Send>(&self, items: &mut [T], f: &(impl Fn(&mut T) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            items.par_iter_mut().for_each(f);
            return;
        };
        let base = Items(items.as_mut_ptr());
        let body = move |i: usize| {
            // SAFETY: `next` hands out every index below `len` exactly once, so no two
            // threads hold the same item, and `items` outlives the job.
            f(unsafe { &mut *base.at(i) })
        };
        let body: &(dyn Fn(usize) + Sync + '_) = &body;
        let s = self.shared;
        let id = (s.ticket.load(Ordering::Relaxed) >> 32) + 1;
        // SAFETY: no job is open (the last `run` closed it and saw every helper leave), so no
        // helper reads `job` now. The lifetime is erased; `Close` below keeps this frame
        // alive until every helper that joined has left.
        unsafe {
            *s.job.get() = Job {
                body: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(body),
                len: items.len(),
            };
        }
        s.next.store(0, Ordering::Relaxed);
        s.left.store(0, Ordering::Relaxed);
        s.ticket.store(id << 32, Ordering::SeqCst);
        let close = Close { shared: s, id };
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        s.work(body, items.len());
        drop(close);
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task on the team's thread panicked");
        }
    }
}

/// Closes the job and waits for the helpers that joined it, on return and on unwind alike.
struct Close {
    shared: &'static Shared,
    id: u64,
}

impl Drop for Close {
    fn drop(&mut self) {
        let s = self.shared;
        if std::thread::panicking() {
            // The caller's item panicked: the helpers take no more.
            s.next.store(usize::MAX / 2, Ordering::Relaxed);
        }
        let joined = (s.ticket.swap((self.id + 1) << 32, Ordering::AcqRel) & 0xffff_ffff) as usize;
        while s.left.load(Ordering::Acquire) < joined {
            std::hint::spin_loop();
        }
    }
}

struct Items<T>(*mut T);

// By hand: a derive would ask `T: Copy`.
impl<T> Clone for Items<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Items<T> {}

// SAFETY: the pointer is only dereferenced at distinct indices, each by one thread.
unsafe impl<T: Send> Send for Items<T> {}
unsafe impl<T: Send> Sync for Items<T> {}

impl<T> Items<T> {
    /// A method, so closures capture the whole (Sync) wrapper rather than its raw field.
    fn at(self, i: usize) -> *mut T {
        // SAFETY: callers pass indices below the slice's length.
        unsafe { self.0.add(i) }
    }
}

impl Shared {
    fn work(&self, body: &(dyn Fn(usize) + Sync), len: usize) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= len {
                return;
            }
            body(i);
        }
    }

    /// A helper's life: join each open job once, spin a while, sleep until woken.
    fn help(&self, spin: Duration) {
        let mut last = 0u64;
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let ticket = self.ticket.load(Ordering::Acquire);
            let id = ticket >> 32;
            if id & 1 == 1 && id != last {
                if self
                    .ticket
                    .compare_exchange_weak(ticket, ticket + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                last = id;
                // SAFETY: the job is open and this thread joined it, so the caller neither
                // rewrites `job` nor returns before this thread has left.
                let job = unsafe { *self.job.get() };
                let body = unsafe { &*job.body };
                if panic::catch_unwind(AssertUnwindSafe(|| self.work(body, job.len))).is_err() {
                    // Stop the other threads taking more of this job's items.
                    self.next.store(usize::MAX / 2, Ordering::Relaxed);
                    self.panicked.store(true, Ordering::Relaxed);
                }
                self.left.fetch_add(1, Ordering::Release);
                idle_since = Instant::now();
                spins = 0;
                continue;
            }
            spins += 1;
            if !spins.is_multiple_of(256) || idle_since.elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            let ticket = self.ticket.load(Ordering::SeqCst);
            let guard = if (ticket >> 32) & 1 == 1 && ticket >> 32 != last {
                guard
            } else {
                self.wake.wait(guard).unwrap_or_else(|e| e.into_inner())
            };
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            idle_since = Instant::now();
            spins = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_across_many_loops() {
        let team = Team::start(3, SPIN);
        for round in 0..2000usize {
            let mut items: Vec<(usize, u32)> = (0..1 + round % 37).map(|i| (i, 0)).collect();
            team.run(&mut items, &|(i, runs): &mut (usize, u32)| {
                *runs += 1;
                *i *= 2;
            });
            assert!(
                items
                    .iter()
                    .enumerate()
                    .all(|(i, &(v, runs))| v == 2 * i && runs == 1),
                "round {round}: {items:?}"
            );
        }
    }

    #[test]
    fn helpers_that_slept_wake_for_the_next_loop() {
        let team = Team::start(1, SPIN);
        let seen = Mutex::new(std::collections::HashSet::new());
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4);
            let mut items = vec![(); 64];
            team.run(&mut items, &|_: &mut ()| {
                seen.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(1));
            });
        }
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "the caller and the helper both took items"
        );
    }

    #[test]
    fn a_panic_on_a_helper_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::start(1, SPIN);
        let main = std::thread::current().id();
        let mut items = vec![(); 256];
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            team.run(&mut items, &|_: &mut ()| {
                if std::thread::current().id() != main {
                    panic!("boom");
                }
                std::thread::sleep(Duration::from_micros(50));
            })
        }));
        assert!(outcome.is_err(), "the helper's panic was not reported");
        let mut items = vec![0u8; 100];
        team.run(&mut items, &|x: &mut u8| *x += 1);
        assert!(items.iter().all(|&x| x == 1));
    }
}
