//! Events for containerd (`/tasks/create`, `/tasks/exit`, ...), sent in order over
//! containerd's ttrpc socket. A send that fails (containerd restarted, so the old
//! connection is closed) reconnects and is tried again, and the shim does not exit while
//! an event is still on its way: a task's exit must reach the containerd that runs now.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

/// Attempts per event before it is dropped (with a warning).
const ATTEMPTS: u32 = 10;
/// The pause between attempts grows by this much each time.
const BACKOFF: Duration = Duration::from_millis(200);

/// An event: its topic and message.
pub struct Event {
    pub topic: &'static str,
    pub message: Box<dyn MessageDyn>,
}

/// The sending side, held by the task service.
#[derive(Clone)]
pub struct EventTx {
    tx: mpsc::UnboundedSender<Event>,
    pending: Arc<AtomicUsize>,
}

/// The receiving side, drained by [`forward`] (or by a test).
pub struct EventRx {
    rx: mpsc::UnboundedReceiver<Event>,
    pending: Arc<AtomicUsize>,
}

pub fn channel() -> (EventTx, EventRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    (
        EventTx {
            tx,
            pending: Arc::clone(&pending),
        },
        EventRx { rx, pending },
    )
}

impl EventTx {
    pub fn send(&self, topic: &'static str, message: Box<dyn MessageDyn>) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Event { topic, message }).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(topic, "the event forwarder is gone; event dropped");
        }
    }

    /// Events sent and not yet delivered (or given up on).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Waits until every event is delivered, at most `limit`.
    pub async fn drain(&self, limit: Duration) {
        let t = tokio::time::Instant::now();
        while self.pending() > 0 && t.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl EventRx {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Marks one received event as handled.
    pub fn done(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends the events of `rx` to containerd's ttrpc socket `address` (a path), in order.
pub async fn forward(address: String, namespace: String, mut rx: EventRx) {
    let mut client: Option<EventsClient> = None;
    while let Some(e) = rx.recv().await {
        let req = match request(&namespace, &e) {
            Ok(r) => r,
            Err(err) => {
                tracing::warn!(topic = e.topic, error = %err, "encoding an event; dropped");
                rx.done();
                continue;
            }
        };
        let mut sent = false;
        for attempt in 0..ATTEMPTS {
            if client.is_none() {
                client = Client::connect(&format!("unix://{address}"))
                    .await
                    .map(EventsClient::new)
                    .ok();
            }
            if let Some(c) = &client {
                match c.forward(Context::default(), &req).await {
                    Ok(_) => {
                        sent = true;
                        break;
                    }
                    Err(err) => {
                        tracing::info!(topic = e.topic, error = %err, "containerd did not take an event; reconnecting");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(BACKOFF * (attempt + 1)).await;
        }
        if !sent {
            tracing::warn!(
                topic = e.topic,
                address,
                "containerd is unreachable; event dropped"
            );
        }
        rx.done();
    }
}

fn request(namespace: &str, e: &Event) -> containerd_shim::Result<ForwardRequest> {
    let mut envelope = Envelope::new();
    envelope.set_topic(e.topic.to_string());
    envelope.set_namespace(namespace.to_string());
    envelope.set_timestamp(containerd_shim::util::timestamp()?);
    let mut data = Vec::new();
    e.message.write_to_vec_dyn(&mut data)?;
    let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
    any.value = data;
    any.type_url = e.message.descriptor_dyn().full_name().to_string();
    envelope.set_event(any);
    let mut req = ForwardRequest::new();
    req.set_envelope(envelope);
    Ok(req)
}

/// The exit status of a `/tasks/exit` event (for tests).
pub fn exit_status(e: &Event) -> Option<u32> {
    e.message.downcast_ref::<TaskExit>().map(|x| x.exit_status)
}
