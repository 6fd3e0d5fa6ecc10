//! Request coalescing: the fixes of concurrent `Ingest` calls and `IngestStream` messages, of
//! every caller and tenant, leave for the mesh together in shared batches, and each caller gets
//! exactly its own part of the answer back.
//!
//! Natural batching, no timer: a request that finds a free slot (fewer than `max_in_flight`
//! batches in flight) leaves at once, so an idle gateway answers a lone fix without waiting;
//! otherwise it waits in the queue, which departs as one batch (of at most `max_fixes` fixes)
//! as soon as a batch in flight returns. The busier the mesh, the larger the batches; with one
//! slot, the next batch fills exactly while the previous one flies. Several slots keep the
//! mesh's round trips overlapping, so large requests still pipeline.
//! The queue needs no bound of its own: every queued request is a caller holding one of its
//! tenant's concurrency slots.
//!
//! Deadlines: a caller whose deadline passes while its request waits is answered
//! DEADLINE_EXCEEDED at that deadline, and its fixes are never sent (a departing batch drops
//! every request whose caller has expired or left). A batch's downstream deadline is the latest
//! of its callers', capped by DOWNSTREAM_TIMEOUT. A batch runs in a task of its own, so a caller
//! that leaves after its batch departed cancels nothing for the others.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::{sync::oneshot, time::Instant};
use tonic::Status;
use tracing::Instrument as _;
use trackmesh_proto::v1::{Fix, IngestResponse, RefineResponse, RefinedFix, Rejection, Verdict};
use trackmesh_shared::grpc::Deadline;

/// One caller's validated request: its tenant and its fixes, in order.
#[derive(Debug)]
pub struct Entry {
    pub tenant: String,
    pub fixes: Vec<Fix>,
}

/// One caller's part of a batch's answer (its `sequence` is left for the caller to set).
pub type Answer = Result<IngestResponse, Status>;

/// Sends a batch on: one answer per entry, in the entries' order.
pub type Dispatch =
    Arc<dyn Fn(Vec<Entry>, Deadline) -> BoxFuture<'static, Vec<Answer>> + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// A batch departs once it holds this many fixes (one larger request departs alone).
    pub max_fixes: usize,
    pub max_in_flight: usize,
    /// The longest downstream deadline a batch gets.
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct Coalescer {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    dispatch: Dispatch,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    in_flight: usize,
}

struct Waiting {
    entry: Entry,
    deadline: Instant,
    since: Instant,
    /// The caller's span: a batch runs in the trace of its first caller.
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

fn expired() -> Status {
    Status::deadline_exceeded(
        "deadline passed while the request waited for its batch; nothing was sent, retry",
    )
}

impl Coalescer {
    pub fn new(settings: Settings, dispatch: Dispatch) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                dispatch,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Queues `entry` and waits for its answer until `deadline`.
    pub async fn submit(&self, entry: Entry, deadline: Deadline) -> Answer {
        let now = Instant::now();
        let deadline = now + deadline.remaining();
        let (reply, answer) = oneshot::channel();
        let batches = {
            let mut state = self.shared.lock();
            state.queue.push_back(Waiting {
                entry,
                deadline,
                since: now,
                span: tracing::Span::current(),
                reply,
            });
            self.shared.depart(&mut state)
        };
        self.shared.launch(batches);
        // Leaving (timeout or a dropped future) drops `answer`; a departing batch skips it.
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::internal(
                "the batch carrying this request failed unexpectedly; retry",
            )),
            Err(_) => Err(Status::deadline_exceeded(
                "no answer before the deadline; retry (stored fixes are de-duplicated)",
            )),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the batches that should leave now off the queue (counting them in flight).
    fn depart(&self, state: &mut State) -> Vec<Batch> {
        let Settings {
            max_fixes,
            max_in_flight,
            timeout,
        } = self.settings;
        let mut batches = Vec::new();
        while !state.queue.is_empty() && state.in_flight < max_in_flight {
            let now = Instant::now();
            let mut entries = Vec::new();
            let mut replies = Vec::new();
            let mut fixes = 0;
            let mut latest = now;
            let mut span = None;
            while let Some(next) = state.queue.front() {
                let n = next.entry.fixes.len();
                if !entries.is_empty() && fixes + n > max_fixes {
                    break;
                }
                let Some(waiting) = state.queue.pop_front() else {
                    break;
                };
                if waiting.reply.is_closed() {
                    continue;
                }
                if waiting.deadline <= now {
                    let _ = waiting.reply.send(Err(expired()));
                    continue;
                }
                metrics::histogram!("gateway_coalesce_wait_seconds")
                    .record((now - waiting.since).as_secs_f64());
                fixes += n;
                latest = latest.max(waiting.deadline);
                span.get_or_insert(waiting.span);
                entries.push(waiting.entry);
                replies.push(waiting.reply);
            }
            let Some(parent) = span else {
                continue; // Everyone in it had left: look at the rest of the queue.
            };
            metrics::histogram!("gateway_coalesced_batch_size").record(fixes as f64);
            state.in_flight += 1;
            metrics::gauge!("gateway_batches_in_flight").set(state.in_flight as f64);
            batches.push(Batch {
                span: tracing::info_span!(parent: &parent, "coalesced_batch", callers = entries.len(), fixes),
                entries,
                replies,
                deadline: Deadline::after((latest - now).min(timeout)),
            });
        }
        batches
    }

    /// Runs each batch in a task of its own, outside the lock.
    fn launch(self: &Arc<Self>, batches: Vec<Batch>) {
        for batch in batches {
            let in_flight = InFlight {
                shared: self.clone(),
                returned: false,
            };
            let answers = (self.dispatch)(batch.entries, batch.deadline);
            tokio::spawn(
                async move {
                    // The whole guard moves in (not just the field it sets).
                    let mut in_flight = in_flight;
                    let mut answers = answers.await.into_iter();
                    for reply in batch.replies {
                        let answer = answers.next().unwrap_or_else(|| {
                            Err(Status::internal("the batch lost this request's answer"))
                        });
                        let _ = reply.send(answer);
                    }
                    in_flight.returned = true;
                }
                .instrument(batch.span),
            );
        }
    }
}

struct Batch {
    entries: Vec<Entry>,
    replies: Vec<oneshot::Sender<Answer>>,
    deadline: Deadline,
    span: tracing::Span,
}

/// A batch in flight, counted until dropped. Only a batch that returned lets the queue
/// leave: one dropped unfinished (its task panicked, or the runtime is shutting down) must
/// not start another; the queue then leaves with the next request or returning batch.
struct InFlight {
    shared: Arc<Shared>,
    returned: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let batches = {
            let mut state = self.shared.lock();
            state.in_flight -= 1;
            metrics::gauge!("gateway_batches_in_flight").set(state.in_flight as f64);
            if !self.returned {
                return;
            }
            self.shared.depart(&mut state)
        };
        self.shared.launch(batches);
    }
}

/// The entries of a batch grouped by tenant, in order of first appearance: per tenant, the
/// indexes of its entries and their fixes (moved, not copied), in queue order.
pub fn by_tenant(entries: Vec<Entry>) -> Vec<(String, Vec<usize>, Vec<Vec<Fix>>)> {
    let mut groups: Vec<(String, Vec<usize>, Vec<Vec<Fix>>)> = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        match groups
            .iter_mut()
            .find(|(tenant, ..)| *tenant == entry.tenant)
        {
            Some((_, indexes, fixes)) => {
                indexes.push(index);
                fixes.push(entry.fixes);
            }
            None => groups.push((entry.tenant, vec![index], vec![entry.fixes])),
        }
    }
    groups
}

/// Splits refinement's answer for the concatenated requests of `sizes` fixes each into one
/// response per request (rejection indexes relative to that request), and returns the fixes
/// to store: every accepted one, then the recovered ones.
///
/// A recovered fix belongs to its device, not to a request: it is counted for the request
/// whose fix of that device re-anchored the track (or, failing that, the last request with a
/// fix of that device).
pub fn split(
    sizes: &[usize],
    refined: RefineResponse,
) -> Result<(Vec<IngestResponse>, Vec<RefinedFix>), Status> {
    let total: usize = sizes.iter().sum();
    if refined.results.len() != total {
        return Err(Status::internal(format!(
            "refinement answered {} results for {total} fixes",
            refined.results.len()
        )));
    }
    let mut responses = vec![IngestResponse::default(); sizes.len()];
    let mut owner = Vec::with_capacity(total);
    for (request, &size) in sizes.iter().enumerate() {
        owner.extend(std::iter::repeat_n(request, size));
    }
    let device = |fix: &RefinedFix| fix.fix.as_ref().map(|fix| fix.device_id.clone());
    // (device, request, re-anchored) of every result, for the recovered fixes.
    let mut devices: Vec<(Option<String>, usize, bool)> = Vec::new();
    if !refined.recovered.is_empty() {
        devices = refined
            .results
            .iter()
            .zip(&owner)
            .map(|(result, &request)| (device(result), request, result.reanchored))
            .collect();
    }
    let mut accepted = Vec::with_capacity(total + refined.recovered.len());
    let mut offset = 0;
    for (index, result) in refined.results.into_iter().enumerate() {
        let request = owner[index];
        if index > 0 && owner[index - 1] != request {
            offset = index;
        }
        let response = &mut responses[request];
        if result.verdict() == Verdict::Accepted {
            response.accepted += 1;
            response.replayed += u32::from(result.replay);
            accepted.push(result);
        } else {
            response.rejected += 1;
            response.rejections.push(Rejection {
                index: u32::try_from(index - offset).unwrap_or(u32::MAX),
                verdict: result.verdict,
                detail: result.detail,
            });
        }
    }
    for recovered in refined.recovered {
        let device = device(&recovered);
        let of_device = || devices.iter().filter(|(d, ..)| *d == device);
        let request = of_device()
            .rfind(|(.., reanchored)| *reanchored)
            .or_else(|| of_device().next_back())
            .map_or(0, |(_, request, _)| *request);
        if let Some(response) = responses.get_mut(request) {
            response.recovered += 1;
        }
        accepted.push(recovered);
    }
    Ok((responses, accepted))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn entry(tenant: &str, n: usize) -> Entry {
        Entry {
            tenant: tenant.into(),
            fixes: (0..n)
                .map(|i| Fix {
                    device_id: format!("{tenant}-{i}"),
                    ..Fix::default()
                })
                .collect(),
        }
    }

    /// A dispatch that reports each batch (its entries' sizes) and holds it until released.
    struct Fake {
        batches: tokio::sync::mpsc::UnboundedReceiver<(Vec<usize>, oneshot::Sender<()>)>,
        sent: Arc<AtomicUsize>,
    }

    fn fake(max_fixes: usize, max_in_flight: usize) -> (Coalescer, Fake) {
        let (tx, batches) = tokio::sync::mpsc::unbounded_channel();
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        let dispatch: Dispatch = Arc::new(move |entries: Vec<Entry>, _| {
            let sizes: Vec<usize> = entries.iter().map(|e| e.fixes.len()).collect();
            counter.fetch_add(sizes.iter().sum(), Ordering::SeqCst);
            let (release, released) = oneshot::channel();
            let _ = tx.send((sizes.clone(), release));
            Box::pin(async move {
                let _ = released.await;
                sizes
                    .iter()
                    .map(|&n| {
                        Ok(IngestResponse {
                            accepted: n as u32,
                            stored: true,
                            ..IngestResponse::default()
                        })
                    })
                    .collect()
            })
        });
        let settings = Settings {
            max_fixes,
            max_in_flight,
            timeout: TIMEOUT,
        };
        (Coalescer::new(settings, dispatch), Fake { batches, sent })
    }

    fn submit(
        coalescer: &Coalescer,
        entry: Entry,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Answer> {
        let coalescer = coalescer.clone();
        tokio::spawn(async move { coalescer.submit(entry, Deadline::after(timeout)).await })
    }

    /// Lets spawned tasks run until they all wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_request_leaves_at_once_and_the_next_ones_fill_while_it_flies() {
        let (coalescer, mut fake) = fake(100, 1);
        let first = submit(&coalescer, entry("a", 1), TIMEOUT);
        let (sizes, release_first) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [1], "an idle coalescer sends a lone fix at once");

        let waiting: Vec<_> = (0..5)
            .map(|i| {
                submit(
                    &coalescer,
                    entry(if i % 2 == 0 { "a" } else { "b" }, 2),
                    TIMEOUT,
                )
            })
            .collect();
        settle().await;
        assert!(
            fake.batches.try_recv().is_err(),
            "they wait for the batch in flight"
        );

        release_first.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().accepted, 1);
        let (sizes, release) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [2; 5], "all five leave together when it returns");
        release.send(()).unwrap();
        for answer in waiting {
            assert_eq!(answer.await.unwrap().unwrap().accepted, 2);
        }
        assert_eq!(fake.sent.load(Ordering::SeqCst), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn free_slots_take_requests_at_once_and_the_size_bound_splits() {
        let (coalescer, mut fake) = fake(10, 2);
        let _first = submit(&coalescer, entry("a", 1), TIMEOUT);
        let (_, release_first) = fake.batches.recv().await.unwrap();
        let _second = submit(&coalescer, entry("a", 4), TIMEOUT);
        let (sizes, _release_second) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [4], "a free slot takes a request at once");
        let _rest: Vec<_> = (0..5)
            .map(|_| submit(&coalescer, entry("a", 4), TIMEOUT))
            .collect();
        settle().await;
        assert!(
            fake.batches.try_recv().is_err(),
            "two in flight: the queue waits although it is full"
        );
        release_first.send(()).unwrap();
        // 4 + 4 fit in 10; the third 4 would not.
        let (sizes, _release_third) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [4, 4], "the size bound splits");
        settle().await;
        assert!(fake.batches.try_recv().is_err(), "two in flight again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_caller_is_answered_and_its_fixes_never_leave() {
        let (coalescer, mut fake) = fake(100, 1);
        let _first = submit(&coalescer, entry("a", 1), TIMEOUT);
        let (_, release_first) = fake.batches.recv().await.unwrap();
        let hasty = submit(&coalescer, entry("a", 3), Duration::from_secs(1));
        let patient = submit(&coalescer, entry("b", 2), TIMEOUT);
        settle().await;

        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = hasty.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");

        release_first.send(()).unwrap();
        let (sizes, release) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [2], "only the patient caller's fixes leave");
        release.send(()).unwrap();
        assert_eq!(patient.await.unwrap().unwrap().accepted, 2);
        assert_eq!(fake.sent.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_does_not_cancel_its_batch() {
        let (coalescer, mut fake) = fake(100, 1);
        let _first = submit(&coalescer, entry("a", 1), TIMEOUT);
        let (_, release_first) = fake.batches.recv().await.unwrap();
        let leaver = submit(&coalescer, entry("a", 3), TIMEOUT);
        let stayer = submit(&coalescer, entry("b", 2), TIMEOUT);
        settle().await;
        release_first.send(()).unwrap();
        let (sizes, release) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [3, 2]);
        leaver.abort();
        assert!(leaver.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        assert_eq!(stayer.await.unwrap().unwrap().accepted, 2);

        // A caller that leaves before departure is dropped from the queue.
        let (_, release_b) = {
            let _c = submit(&coalescer, entry("a", 1), TIMEOUT);
            fake.batches.recv().await.unwrap()
        };
        let gone = submit(&coalescer, entry("a", 7), TIMEOUT);
        let kept = submit(&coalescer, entry("a", 1), TIMEOUT);
        settle().await;
        gone.abort();
        settle().await;
        release_b.send(()).unwrap();
        let (sizes, release) = fake.batches.recv().await.unwrap();
        assert_eq!(sizes, [1]);
        release.send(()).unwrap();
        assert!(kept.await.unwrap().is_ok());
    }

    fn refined(device: &str, verdict: Verdict) -> RefinedFix {
        RefinedFix {
            fix: Some(Fix {
                device_id: device.into(),
                ..Fix::default()
            }),
            verdict: verdict as i32,
            ..RefinedFix::default()
        }
    }

    #[test]
    fn answers_split_back_with_each_requests_own_indexes() {
        use Verdict::{Accepted, Speed};
        let mut reanchoring = refined("d", Accepted);
        reanchoring.reanchored = true;
        let mut replayed = refined("c", Accepted);
        replayed.replay = true;
        let results = vec![
            // Request 0: three fixes, the second rejected.
            refined("a", Accepted),
            refined("a", Speed),
            refined("b", Accepted),
            // Request 1: two fixes, both rejected.
            refined("c", Speed),
            refined("c", Speed),
            // Request 2: a replay and the fix that re-anchors device d.
            replayed,
            reanchoring,
            // Request 3: a later fix of d.
            refined("d", Accepted),
        ];
        let response = RefineResponse {
            results,
            recovered: vec![refined("d", Accepted), refined("d", Accepted)],
        };
        let (responses, accepted) = split(&[3, 2, 0, 2, 1], response).unwrap();
        let summary: Vec<_> = responses
            .iter()
            .map(|r| {
                let indexes: Vec<u32> = r.rejections.iter().map(|x| x.index).collect();
                (r.accepted, r.rejected, r.replayed, r.recovered, indexes)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (2, 1, 0, 0, vec![1]),
                (0, 2, 0, 0, vec![0, 1]),
                (0, 0, 0, 0, vec![]),
                (2, 0, 1, 2, vec![]),
                (1, 0, 0, 0, vec![]),
            ]
        );
        assert_eq!(accepted.len(), 7, "five accepted, then two recovered");

        let err = split(&[2], RefineResponse::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[test]
    fn entries_group_by_tenant_in_queue_order() {
        let groups = by_tenant(vec![entry("a", 1), entry("b", 2), entry("a", 3)]);
        let summary: Vec<_> = groups
            .iter()
            .map(|(t, i, f)| {
                (
                    t.as_str(),
                    i.clone(),
                    f.iter().map(Vec::len).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("a", vec![0, 2], vec![1, 3]), ("b", vec![1], vec![2])]
        );
    }
}
