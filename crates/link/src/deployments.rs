//! Idempotency by deployment id: a bounded table of what the link has done.

use std::collections::{HashMap, VecDeque};

use crate::protocol::{ErrorBody, OpResult};

/// How many deployment ids the link remembers.
pub const DEFAULT_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
enum Entry {
    InFlight,
    Done(OpResult),
    Stopped,
}

/// What to do with an incoming `deploy`.
#[derive(Debug, Clone, PartialEq)]
pub enum DeployAction {
    /// New id: call the daemon.
    Start,
    /// Already done: answer with this result again (marked `replayed`).
    Replay(OpResult),
    /// Already running: its result will follow; do nothing now.
    InFlight,
    /// Answer with this failure without calling the daemon.
    Refuse(OpResult),
}

/// Deployment ids the link has seen, oldest evicted first; ids still in flight are
/// never evicted.
#[derive(Debug)]
pub struct Deployments {
    map: HashMap<String, Entry>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Deployments {
    pub fn new(capacity: usize) -> Self {
        Deployments {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn begin_deploy(&mut self, id: &str) -> DeployAction {
        match self.map.get(id) {
            Some(Entry::InFlight) => return DeployAction::InFlight,
            Some(Entry::Done(result)) => {
                let mut result = result.clone();
                result.replayed = true;
                return DeployAction::Replay(result);
            }
            Some(Entry::Stopped) => {
                return DeployAction::Refuse(failure(
                    id,
                    "stopped",
                    format!("deployment `{id}` was stopped on this node: deploy again under a new deployment id"),
                ))
            }
            None => {}
        }
        if !self.make_room() {
            return DeployAction::Refuse(failure(
                id,
                "busy",
                format!(
                    "{} deployments are in flight on this node: retry later",
                    self.capacity
                ),
            ));
        }
        self.insert(id, Entry::InFlight);
        DeployAction::Start
    }

    /// Records a finished deploy; an id stopped meanwhile stays stopped.
    pub fn finish_deploy(&mut self, result: &OpResult) {
        if let Some(entry) = self.map.get_mut(&result.deployment_id) {
            if matches!(entry, Entry::InFlight) {
                *entry = Entry::Done(result.clone());
            }
        }
    }

    /// Records a stop: later deploys of the id are refused.
    pub fn stopped(&mut self, id: &str) {
        if let Some(entry) = self.map.get_mut(id) {
            *entry = Entry::Stopped;
            return;
        }
        if self.make_room() {
            self.insert(id, Entry::Stopped);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn insert(&mut self, id: &str, entry: Entry) {
        self.map.insert(id.to_string(), entry);
        self.order.push_back(id.to_string());
    }

    /// Evicts the oldest finished entries until one more fits; false if all are in flight.
    fn make_room(&mut self) -> bool {
        let mut scanned = 0;
        while self.map.len() >= self.capacity && scanned < self.order.len() {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if matches!(self.map.get(&oldest), Some(Entry::InFlight)) {
                self.order.push_back(oldest);
                scanned += 1;
            } else {
                self.map.remove(&oldest);
            }
        }
        self.map.len() < self.capacity
    }
}

pub(crate) fn failure(id: &str, code: &str, message: String) -> OpResult {
    OpResult {
        deployment_id: id.to_string(),
        ok: false,
        sandbox: None,
        error: Some(ErrorBody {
            code: code.to_string(),
            message,
        }),
        replayed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(id: &str) -> OpResult {
        OpResult {
            deployment_id: id.into(),
            ok: true,
            sandbox: Some(json!({"id": id})),
            error: None,
            replayed: false,
        }
    }

    #[test]
    fn a_deploy_runs_once_and_is_replayed() {
        let mut d = Deployments::new(8);
        assert_eq!(d.begin_deploy("a"), DeployAction::Start);
        assert_eq!(d.begin_deploy("a"), DeployAction::InFlight);
        d.finish_deploy(&ok("a"));
        let mut replay = ok("a");
        replay.replayed = true;
        assert_eq!(d.begin_deploy("a"), DeployAction::Replay(replay));
    }

    #[test]
    fn stopped_ids_are_refused() {
        let mut d = Deployments::new(8);
        assert_eq!(d.begin_deploy("a"), DeployAction::Start);
        d.stopped("a");
        d.finish_deploy(&ok("a"));
        assert!(
            matches!(d.begin_deploy("a"), DeployAction::Refuse(r) if r.error.as_ref().map(|e| e.code.as_str()) == Some("stopped"))
        );
        d.stopped("never-deployed");
        assert!(matches!(
            d.begin_deploy("never-deployed"),
            DeployAction::Refuse(_)
        ));
    }

    #[test]
    fn bounded_oldest_finished_evicted_in_flight_kept() {
        let mut d = Deployments::new(3);
        for id in ["a", "b", "c"] {
            assert_eq!(d.begin_deploy(id), DeployAction::Start);
        }
        // All in flight: a fourth is refused, nothing evicted.
        assert!(
            matches!(d.begin_deploy("d"), DeployAction::Refuse(r) if r.error.as_ref().map(|e| e.code.as_str()) == Some("busy"))
        );
        assert_eq!(d.len(), 3);
        d.finish_deploy(&ok("b"));
        assert_eq!(d.begin_deploy("d"), DeployAction::Start);
        assert_eq!(d.len(), 3);
        // b was evicted; a is still in flight.
        assert_eq!(d.begin_deploy("a"), DeployAction::InFlight);
        for i in 0..100 {
            let id = format!("x{i}");
            d.finish_deploy(&ok("a"));
            d.finish_deploy(&ok("c"));
            d.finish_deploy(&ok("d"));
            assert_eq!(d.begin_deploy(&id), DeployAction::Start);
            d.finish_deploy(&ok(&id));
            assert!(d.len() <= 3);
        }
    }
}
