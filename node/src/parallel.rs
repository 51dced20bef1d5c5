//! Work spread over the machine's cores, for publishing: many files to
//! digest and copy, many patches and bundles to encode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;

/// `f` applied to every item on every core, results in the items' order.
/// The first error stops the work (items already started finish) and is
/// returned.
pub(crate) fn map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(usize::MAX);
    let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let mut parts: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while failed.load(Ordering::Relaxed) == usize::MAX {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        match f(item) {
                            Ok(r) => done.push((i, r)),
                            Err(e) => {
                                // The first failure in the items' order is
                                // the one reported.
                                if failed.fetch_min(i, Ordering::Relaxed) > i {
                                    if let Ok(mut slot) = error.lock() {
                                        *slot = Some(e);
                                    }
                                }
                                break;
                            }
                        }
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut all: Vec<(usize, R)> = parts.drain(..).flatten().collect();
    if all.len() != items.len() {
        anyhow::bail!("a worker thread panicked");
    }
    all.sort_unstable_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_come_in_order_and_an_error_is_returned() {
        let items: Vec<u64> = (0..1000).collect();
        let squares = super::map(&items, |x| Ok(x * x)).expect("no error");
        assert_eq!(squares, items.iter().map(|x| x * x).collect::<Vec<_>>());
        let e = super::map(&items, |x| {
            if *x == 700 {
                anyhow::bail!("item {x} is bad")
            }
            Ok(*x)
        })
        .expect_err("fails");
        assert_eq!(e.to_string(), "item 700 is bad");
        assert!(super::map(&[] as &[u8], |_| Ok(()))
            .expect("empty")
            .is_empty());
    }
}
