//! Keeps a node in step with an etcd store, on two threads of their own:
//! - the watch: reads `P/config` (a full read, so a node that starts, reconnects or finds
//!   its watch compacted catches up in one step), then watches it from the next revision and
//!   hands every new record to [`Admin::observe`], which validates and publishes it through
//!   the same path as a local change;
//! - the heartbeat: every second (and as soon as the node applies a revision), refreshes
//!   this node's lease and writes its record
//!   (`P/nodes/ID`: applied revision, last seen, the shared ids its node file uses), which
//!   disappears [`NODE_TTL_S`] seconds after the node does.
//!
//! Either one failing marks the store unreachable (for `/v1/status`); the node keeps serving
//! its last config and retries with a bounded backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::Admin;
use crate::etcd::{Client, EtcdError, WatchEvent};
use crate::store::etcd::{Health, NODE_TTL_S};

const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the heartbeat looks for a newly applied revision between beats.
const APPLIED_POLL: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Starts the watch and heartbeat threads.
pub fn spawn(admin: Arc<Admin>, client: Client, health: Arc<Health>) -> std::io::Result<()> {
    let (a, c, h) = (admin.clone(), client.clone(), health.clone());
    std::thread::Builder::new()
        .name("gw-etcd-watch".into())
        .spawn(move || watch_forever(&a, c, &h))?;
    std::thread::Builder::new()
        .name("gw-etcd-node".into())
        .spawn(move || heartbeat_forever(&admin, client, &health))?;
    Ok(())
}

fn watch_forever(admin: &Admin, mut client: Client, health: &Health) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match watch_once(admin, &mut client, health) {
            Ok(why) => {
                log::info!("config store: {why}; reading the config again");
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                health.fail(&e);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Catches up, then follows the watch until it ends (`Ok` with the reason) or fails.
fn watch_once(admin: &Admin, client: &mut Client, health: &Health) -> Result<String, EtcdError> {
    let (kvs, revision) = client.range("config", false)?;
    health.ok();
    if let Some(kv) = kvs.first() {
        admin.observe(&kv.value, kv.mod_revision);
    }
    let mut watch = client.watch("config", false, revision + 1)?;
    loop {
        match watch.next_event()? {
            WatchEvent::Changes(kvs, _) => {
                health.ok();
                for kv in kvs.iter().filter(|kv| !kv.value.is_empty()) {
                    admin.observe(&kv.value, kv.mod_revision);
                }
            }
            WatchEvent::Progress => health.ok(),
            WatchEvent::Ended(why) => return Ok(why),
        }
    }
}

fn heartbeat_forever(admin: &Admin, mut client: Client, health: &Health) {
    let mut lease = 0i64;
    let mut published = u64::MAX;
    loop {
        let beat = (|| -> Result<(), EtcdError> {
            if lease == 0 || !client.keep_alive(lease)? {
                lease = client.grant(NODE_TTL_S)?;
            }
            let (id, record) = admin.node_record();
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            client.put(&format!("nodes/{id}"), &bytes, lease)?;
            published = record["applied_revision"].as_u64().unwrap_or(0);
            Ok(())
        })();
        match beat {
            Ok(()) => health.ok(),
            Err(e) => health.fail(&e),
        }
        // The next beat after a second, or as soon as this node applies another revision,
        // so `GET /v1/nodes` shows it at once.
        let next = Instant::now() + HEARTBEAT;
        while Instant::now() < next && admin.applied_revision() == published {
            std::thread::sleep(APPLIED_POLL);
        }
    }
}
