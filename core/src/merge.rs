//! Concurrent calls of one key, merged into fewer round trips: the first
//! calls of a key (up to a number of calls in flight) go out at once;
//! calls that arrive while those are on the wire queue and, when one
//! returns (or is dropped), go out together as one call, in a task of
//! their own, until none are left. With few callers nothing waits (as
//! many round trips in flight as callers, up to the limit); with many,
//! the server sees few statements carrying many items.
//!
//! Server backends use it to settle the acks of concurrent consumers of
//! one process in one statement or script call. It decides only which
//! items share a call; what a call does, and every check the contract
//! needs, stay with the caller's `run` function (on the server, item by
//! item). It owns no other state.

use crate::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::oneshot;

/// An item waiting for a call in flight, and where its answer goes.
type Waiting<I, O> = (I, oneshot::Sender<Result<O>>);

/// A key's calls in flight and the items queued behind them.
struct Busy<I, O> {
    calls: usize,
    queue: Vec<Waiting<I, O>>,
}

/// The future a merged call returns: one answer per item, in order.
pub type MergedCall<O> = Pin<Box<dyn Future<Output = Result<Vec<O>>> + Send>>;

/// Merges concurrent calls per key (see the module docs).
///
/// ```
/// use conveyor_core::backend::{Merge, MergedCall};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor_core::Result<()> {
/// let merge: Arc<Merge<&'static str, u32, u32>> = Arc::new(Merge::new(100, 4));
/// // `run` gets the key and every item of one call; one answer per item.
/// let run = |_key: &'static str, items: Vec<u32>| -> MergedCall<u32> {
///     Box::pin(async move { Ok(items.into_iter().map(|i| i * 2).collect()) })
/// };
/// assert_eq!(merge.call("acks", 21, run).await?, 42);
/// # Ok(())
/// # }
/// ```
pub struct Merge<K, I, O> {
    busy: Mutex<HashMap<K, Busy<I, O>>>,
    max: usize,
    calls: usize,
}

impl<K, I, O> Merge<K, I, O>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    /// At most `max` items share one call, and at most `calls` calls of
    /// one key are in flight (each at least one).
    pub fn new(max: usize, calls: usize) -> Self {
        Merge {
            busy: Mutex::new(HashMap::new()),
            max: max.max(1),
            calls: calls.max(1),
        }
    }

    /// Run `item` through `run`, merged with the other items of `key` in
    /// flight: the answer `run` gave for this item.
    ///
    /// `run(key, items)` must return one answer per item, in order; a
    /// different count fails the whole call with `Internal`. Every call of
    /// one key passes an equivalent `run`: queued items go out through the
    /// `run` of the call they queued behind.
    ///
    /// # Errors
    /// What `run` returned for the call that carried the item (each item
    /// of a failed call gets the error's kind and message);
    /// `Unavailable` if the call could not be sent (no runtime to send
    /// queued items on).
    ///
    /// # Cancel safety
    /// As one call of `run`: dropped, the item may or may not have been
    /// sent. Items queued behind a dropped call still go out.
    pub async fn call<F>(self: &Arc<Self>, key: K, item: I, run: F) -> Result<O>
    where
        F: Fn(K, Vec<I>) -> MergedCall<O> + Send + Sync + 'static,
    {
        let waiting = {
            let mut busy = self.busy.lock();
            let busy = busy.entry(key.clone()).or_insert_with(|| Busy {
                calls: 0,
                queue: Vec::new(),
            });
            if busy.calls < self.calls {
                busy.calls += 1;
                Ok(item)
            } else {
                let (tx, rx) = oneshot::channel();
                busy.queue.push((item, tx));
                Err(rx)
            }
        };
        let item = match waiting {
            Ok(item) => item,
            Err(rx) => {
                return rx.await.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Unavailable,
                        "the call was not sent (shutting down)",
                    ))
                })
            }
        };
        // This call goes out at once; when it is answered (or dropped),
        // the items queued meanwhile go out together.
        let lead = Lead {
            merge: self.clone(),
            key: key.clone(),
            run: Some(run),
        };
        // The call's future owns what it needs: `run` stays with the lead,
        // for the items that queue meanwhile.
        let call = (lead.run.as_ref().expect("set above"))(key, vec![item]);
        let answers = call.await;
        drop(lead);
        one(answers)
    }

    /// A call of `key` ended: the items queued for it (at most `max`),
    /// which go out as the next call, or `None` (one call fewer in
    /// flight) when there are none.
    fn take(&self, key: &K) -> Option<Vec<Waiting<I, O>>> {
        let mut all = self.busy.lock();
        let busy = all.get_mut(key)?;
        if busy.queue.is_empty() {
            busy.calls = busy.calls.saturating_sub(1);
            if busy.calls == 0 {
                all.remove(key);
            }
            return None;
        }
        let n = busy.queue.len().min(self.max);
        Some(busy.queue.drain(..n).collect())
    }

    /// Send queued items, one call per batch, until none are left.
    async fn flush<F>(self: Arc<Self>, key: K, mut batch: Vec<Waiting<I, O>>, run: F)
    where
        F: Fn(K, Vec<I>) -> MergedCall<O> + Send + Sync + 'static,
    {
        loop {
            let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
            let n = items.len();
            match run(key.clone(), items).await {
                Ok(answers) if answers.len() == n => {
                    for (tx, answer) in replies.into_iter().zip(answers) {
                        let _ = tx.send(Ok(answer));
                    }
                }
                Ok(answers) => {
                    for tx in replies {
                        let _ = tx.send(Err(miscounted(answers.len(), n)));
                    }
                }
                Err(e) => {
                    for tx in replies {
                        let _ = tx.send(Err(Error::new(e.kind(), e.message().to_string())));
                    }
                }
            }
            match self.take(&key) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}

fn miscounted(got: usize, sent: usize) -> Error {
    Error::internal(format!("a merged call gave {got} answers for {sent} items"))
}

/// The only answer of a call of one item.
fn one<O>(answers: Result<Vec<O>>) -> Result<O> {
    let mut answers = answers?;
    match answers.len() {
        1 => Ok(answers.remove(0)),
        n => Err(miscounted(n, 1)),
    }
}

/// The call in flight of one key. Dropped (answered or cancelled), it
/// sends the items that queued behind it, in a task of their own, or
/// marks the key idle.
struct Lead<K, I, O, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(K, Vec<I>) -> MergedCall<O> + Send + Sync + 'static,
{
    merge: Arc<Merge<K, I, O>>,
    key: K,
    run: Option<F>,
}

impl<K, I, O, F> Drop for Lead<K, I, O, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(K, Vec<I>) -> MergedCall<O> + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let Some(first) = self.merge.take(&self.key) else {
            return;
        };
        let run = self.run.take().expect("a lead has its call");
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.merge.clone().flush(self.key.clone(), first, run));
            }
            Err(_) => {
                for (_, tx) in first {
                    let _ = tx.send(Err(Error::new(
                        ErrorKind::Unavailable,
                        "no runtime to send the call on",
                    )));
                }
                // Ended without a call: one fewer in flight.
                let mut all = self.merge.busy.lock();
                if let Some(busy) = all.get_mut(&self.key) {
                    busy.calls = busy.calls.saturating_sub(1);
                    if busy.calls == 0 && busy.queue.is_empty() {
                        all.remove(&self.key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_calls_share_one_call_and_each_gets_its_answer() {
        let merge: Arc<Merge<u8, u32, u32>> = Arc::new(Merge::new(1000, 1));
        let calls = Arc::new(AtomicUsize::new(0));
        let (open, gate) = tokio::sync::watch::channel(false);
        let run = {
            let calls = calls.clone();
            move |_k: u8, items: Vec<u32>| -> MergedCall<u32> {
                calls.fetch_add(1, Ordering::SeqCst);
                let mut gate = gate.clone();
                Box::pin(async move {
                    // The first call waits until every other item queued.
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(items.iter().map(|i| i + 1).collect())
                })
            }
        };
        let run = Arc::new(run);
        let mut tasks = Vec::new();
        for i in 0..10u32 {
            let (merge, run) = (merge.clone(), run.clone());
            tasks.push(tokio::spawn(async move {
                merge.call(0, i, move |k, items| run(k, items)).await
            }));
        }
        // Every item is in flight or queued before the first call returns.
        while merge.busy.lock().get(&0).map_or(0, |b| b.queue.len()) < 9 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        open.send(true).expect("receivers live");
        for (i, t) in (0..10u32).zip(tasks) {
            assert_eq!(t.await.expect("task").expect("answer"), i + 1);
        }
        // The lead alone, then the nine that queued, together.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(merge.busy.lock().is_empty());
    }

    #[tokio::test]
    async fn up_to_the_limit_calls_go_out_at_once() {
        let merge: Arc<Merge<u8, u32, u32>> = Arc::new(Merge::new(1000, 3));
        let calls = Arc::new(AtomicUsize::new(0));
        let (open, gate) = tokio::sync::watch::channel(false);
        let run = {
            let calls = calls.clone();
            Arc::new(move |_k: u8, items: Vec<u32>| -> MergedCall<u32> {
                calls.fetch_add(1, Ordering::SeqCst);
                let mut gate = gate.clone();
                Box::pin(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    Ok(items)
                })
            })
        };
        let tasks: Vec<_> = (0..10u32)
            .map(|i| {
                let (merge, run) = (merge.clone(), run.clone());
                tokio::spawn(async move { merge.call(0, i, move |k, items| run(k, items)).await })
            })
            .collect();
        // Three calls in flight, the other seven queued behind them.
        while merge.busy.lock().get(&0).map_or(0, |b| b.queue.len()) < 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        open.send(true).expect("receivers live");
        for (i, t) in (0..10u32).zip(tasks) {
            assert_eq!(t.await.expect("task").expect("answer"), i);
        }
        // The first call to return took the seven queued ones, as one.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(merge.busy.lock().is_empty());
    }

    #[tokio::test]
    async fn answers_follow_their_items_and_errors_reach_each() {
        let merge: Arc<Merge<u8, u32, u32>> = Arc::new(Merge::new(2, 1));
        let got = merge
            .call(1, 5, |_k, items| -> MergedCall<u32> {
                Box::pin(async move { Ok(items.iter().map(|i| i * 10).collect()) })
            })
            .await
            .expect("answer");
        assert_eq!(got, 50);
        let err = merge
            .call(1, 5, |_k, _items| -> MergedCall<u32> {
                Box::pin(async move { Err(Error::new(ErrorKind::Unavailable, "down")) })
            })
            .await
            .expect_err("the call failed");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let err = merge
            .call(1, 5, |_k, _items| -> MergedCall<u32> {
                Box::pin(async move { Ok(vec![1, 2]) })
            })
            .await
            .expect_err("two answers for one item");
        assert_eq!(err.kind(), ErrorKind::Internal);
    }
}
