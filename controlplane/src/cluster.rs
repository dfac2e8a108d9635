//! Keeps a node in step with an etcd store, on two threads of their own:
//! - the watch: reads `P/config` (a full read, so a node that starts, reconnects or finds
//!   its watch compacted catches up in one step), then watches it from the next revision and
//!   hands every new record to [`Admin::observe`], which validates and publishes it through
//!   the same path as a local change;
//! - the heartbeat: every second (and as soon as the node applies a revision), refreshes
//!   this node's lease and writes its record
//!   (`P/nodes/ID`: applied revision, last seen, the shared ids its node file uses), which
//!   disappears [`NODE_TTL_S`] seconds after the node does. The record is written only while
//!   it is under this node's lease (or absent: its lease ran out while etcd was away), never
//!   over another node's (one started with this id while this node's record had expired) nor
//!   over this node's successor's during a binary upgrade; an earlier process's of this node
//!   (an upgrade that failed after its successor claimed the record, or an older build
//!   replaced) is taken back.
//!
//! Either one failing marks the store unreachable (for `/v1/status`); the node keeps serving
//! its last config and retries with a bounded backoff.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::Admin;
use crate::etcd::{Client, EtcdError, WatchEvent};
use crate::store::etcd::{same_node, Health, NODE_TTL_S, TWIN_RECHECK};

const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the heartbeat looks for a newly applied revision between beats.
const APPLIED_POLL: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the heartbeat compares the store's config revision with the watch's.
const WATCH_CHECK: Duration = Duration::from_secs(2);

/// What the heartbeat knows of the watch, to tell a watch that has stopped delivering (its
/// etcd member hung, or cut off from the others) from one with nothing to deliver.
#[derive(Debug, Default)]
struct WatchState {
    /// The etcd revision of the last config record the watch delivered (or read to catch up).
    seen: AtomicI64,
    /// The open watch's socket, under the lock its owner closes it with.
    fd: Mutex<Option<std::os::fd::RawFd>>,
    /// The lease this node's record is bound to (0: none yet), under the lock the
    /// heartbeat holds while it writes the record, so a node that leaves revokes the lease
    /// the record is under.
    lease: Mutex<i64>,
    /// The node is stopping: the heartbeat writes no more records.
    leaving: AtomicBool,
}

/// How long a stopping node waits for etcd to take its record out.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

/// This node's membership in the store's list of live nodes.
#[derive(Debug)]
pub struct Membership {
    client: Client,
    state: Arc<WatchState>,
}

impl Membership {
    /// Takes this node's record out of the store (a clean stop), rather than leaving it
    /// until its lease runs out: a shared resource only its listeners used can then be
    /// deleted at once. Waits [`LEAVE_WAIT`] at most (etcd may hang; the lease ends the
    /// record then). Not for a binary upgrade, whose successor is the same node.
    pub fn leave(&self) {
        self.state.leaving.store(true, Ordering::Relaxed);
        let (state, mut client) = (self.state.clone(), self.client.clone());
        let (done, wait) = std::sync::mpsc::channel();
        let revoke = move || {
            let mut lease = state.lease.lock().unwrap_or_else(|p| p.into_inner());
            let result = match *lease {
                0 => Ok(()),
                id => client.revoke(id),
            };
            *lease = 0;
            let _ = done.send(result);
        };
        let outcome = match std::thread::Builder::new()
            .name("gw-etcd-leave".into())
            .spawn(revoke)
        {
            Ok(_) => wait
                .recv_timeout(LEAVE_WAIT)
                .map_err(|_| "etcd did not answer in time".into()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = outcome.and_then(|r| r.map_err(|e| e.to_string())) {
            log::warn!("config store: this node's record stays until its lease ends: {e}");
        }
    }
}

/// Starts the watch and heartbeat threads; `lease` is the one this node's record was
/// claimed under; `successor`: this process is a binary upgrade's.
pub fn spawn(
    admin: Arc<Admin>,
    client: Client,
    health: Arc<Health>,
    lease: i64,
    successor: bool,
) -> std::io::Result<Membership> {
    let (a, c, h) = (admin.clone(), client.clone(), health.clone());
    let state = Arc::new(WatchState {
        lease: Mutex::new(lease),
        ..WatchState::default()
    });
    let s = state.clone();
    std::thread::Builder::new()
        .name("gw-etcd-watch".into())
        .spawn(move || watch_forever(&a, c, &h, &s))?;
    let (c, s) = (client.clone(), state.clone());
    std::thread::Builder::new()
        .name("gw-etcd-node".into())
        .spawn(move || heartbeat_forever(&admin, c, &health, &s, successor))?;
    Ok(Membership { client, state })
}

fn watch_forever(admin: &Admin, mut client: Client, health: &Health, state: &WatchState) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let opened = std::time::Instant::now();
        match watch_once(admin, &mut client, health, state) {
            // A watch that etcd ends as soon as it is opened, again and again, is opened
            // again after a growing pause, not in a loop that floods etcd and the log.
            Ok(why) if opened.elapsed() < Duration::from_secs(1) => {
                log::info!("config store: {why}; reading the config again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
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
fn watch_once(
    admin: &Admin,
    client: &mut Client,
    health: &Health,
    state: &WatchState,
) -> Result<String, EtcdError> {
    let (seen, revision) = admin.observe_read(|| client.range("config", false))?;
    health.ok();
    // No config (etcd rebuilt empty): the next one written is new whatever its revision.
    state.seen.store(seen.unwrap_or(0), Ordering::Relaxed);
    let mut watch = client.watch("config", false, revision + 1)?;
    *state.fd.lock().unwrap_or_else(|p| p.into_inner()) = Some(watch.fd());
    let ended = loop {
        match watch.next_event() {
            Ok(WatchEvent::Changes(kvs, _)) => {
                health.ok();
                for kv in &kvs {
                    if kv.value.is_empty() {
                        // The key deleted (by hand): no config any more, said once.
                        admin.observe_deleted();
                    } else {
                        admin.observe(&kv.value, kv.mod_revision);
                    }
                    state.seen.store(kv.mod_revision, Ordering::Relaxed);
                }
            }
            Ok(WatchEvent::Progress) => health.ok(),
            Ok(WatchEvent::Ended(why)) => break Ok(why),
            Err(e) => break Err(e),
        }
    };
    // The socket closes with `watch`, after the heartbeat can no longer shut it down.
    *state.fd.lock().unwrap_or_else(|p| p.into_inner()) = None;
    drop(watch);
    ended
}

/// Whether the watch has fallen behind the store: the config changed at a revision the
/// watch has not delivered, at two checks in a row (a change made just before the first
/// had [`WATCH_CHECK`] to arrive); or the store went back (restored from a backup: the
/// config's revision in etcd is below the one delivered, and the watch waits for a revision
/// etcd has not reached). It is then shut down, and opened again by its thread, on an
/// endpoint that answers, after reading the config whole.
fn check_watch(client: &mut Client, state: &WatchState, behind: &mut u32) -> Option<String> {
    // What the watch delivered before the store is read: a change it delivers meanwhile
    // must not look like the store going back.
    let seen = state.seen.load(Ordering::Relaxed);
    let latest = client.mod_revision("config").ok()?;
    let went_back = latest > 0 && latest < seen;
    if latest <= seen && !went_back {
        *behind = 0;
        return None;
    }
    *behind += 1;
    if *behind < 2 && !went_back {
        return None;
    }
    *behind = 0;
    if let Some(fd) = *state.fd.lock().unwrap_or_else(|p| p.into_inner()) {
        // SAFETY: the watch thread clears the fd under this lock before its socket closes,
        // so the fd is the open watch's. shutdown() only makes its blocked read fail.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    Some(match went_back {
        true => format!(
            "the config in etcd went back to etcd revision {latest} from {seen} (restored from \
             a backup?); reading it again"
        ),
        false => format!(
            "the config watch has not delivered etcd revision {latest} (it is at {seen}); \
             watching again"
        ),
    })
}

fn heartbeat_forever(
    admin: &Admin,
    mut client: Client,
    health: &Health,
    state: &WatchState,
    successor: bool,
) {
    let mut published = u64::MAX;
    let mut next_check = Instant::now() + WATCH_CHECK;
    let mut behind = 0;
    // Who holds this node's record instead of it, once said; whether an earlier process's
    // record was taken over (said once).
    let mut held_by: Option<String> = None;
    let mut took_over = false;
    // A record of this node under another lease, as last read: its etcd revision and since
    // when it has not changed.
    let mut foreign: Option<(i64, Instant)> = None;
    loop {
        if state.leaving.load(Ordering::Relaxed) {
            return;
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + WATCH_CHECK;
            if let Some(why) = check_watch(&mut client, state, &mut behind) {
                log::warn!("config store: {why}");
                health.fail(&EtcdError::Unavailable(why));
            }
        }
        let beat = (|| -> Result<(), EtcdError> {
            // Held until the record is written: a node leaving meanwhile then revokes the
            // lease it was written under.
            let mut held = state.lease.lock().unwrap_or_else(|p| p.into_inner());
            // Handed over to an upgrade's successor, whose record it is now: a process that
            // drains no longer serves as the node (the review found one writing the record
            // again once the successor had stopped and taken it out).
            if state.leaving.load(Ordering::Relaxed) || admin.handed_over() {
                return Ok(());
            }
            if *held == 0 || !client.keep_alive(*held)? {
                *held = client.grant(NODE_TTL_S)?;
            }
            let (id, record) = admin.node_record();
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            let key = format!("nodes/{id}");
            let lease = *held;
            let mine = json!({"target": "LEASE", "lease": lease.to_string()});
            let absent = json!({"target": "CREATE", "create_revision": "0"});
            let written = match client.put_if(&key, &bytes, lease, mine)? {
                Err(None) => client.put_if(&key, &bytes, lease, absent)?,
                other => other,
            };
            published = record["applied_revision"].as_u64().unwrap_or(0);
            match written {
                Ok(()) => {
                    foreign = None;
                    if held_by.take().is_some() {
                        log::warn!("config store: this node's record is its own again");
                    }
                    Ok(())
                }
                // Absent again, or moved to another lease, since it was read: the next beat.
                Err(None) => Ok(()),
                Err(Some(kv)) => {
                    let other = serde_json::from_slice::<Value>(&kv.value).unwrap_or_default();
                    let (host, dir) = (&other["host"], &other["data_dir"]);
                    // During an upgrade an older build's record (which says no directory) is
                    // this node's successor's too.
                    let ours = same_node(&other, &record, successor || admin.upgrading());
                    let why = if !ours {
                        format!(
                            "node_id {id:?} is held by another node (host {host}, data \
                             directory {dir}), started while this node's record had expired: \
                             this node writes no record while it runs, and is missing from \
                             /v1/nodes; give each node its own [cluster] node_id"
                        )
                    } else if admin.upgrading() {
                        let why = format!(
                            "this node's record (node_id {id:?}) is its successor's (a binary \
                             upgrade): this process writes it no more"
                        );
                        if held_by.as_deref() != Some(&why) {
                            log::info!("config store: {why}");
                            held_by = Some(why);
                        }
                        return Ok(());
                    } else {
                        // Another process of this node (this data directory, which only this
                        // process or an upgrade's predecessor can have open). Left alone for
                        // TWIN_RECHECK, it is a dead one's (a successor that claimed the
                        // record and then failed to start): this one is the node. Written
                        // meanwhile, it is the process a binary upgrade replaced, running an
                        // older build (which writes without looking) while it drains.
                        let moved = foreign.is_some_and(|(m, _)| m != kv.mod_revision);
                        let since = match foreign {
                            Some((m, since)) if m == kv.mod_revision => since,
                            _ => foreign.insert((kv.mod_revision, Instant::now())).1,
                        };
                        if since.elapsed() >= TWIN_RECHECK {
                            let again = json!({"target": "MOD",
                                               "mod_revision": kv.mod_revision.to_string()});
                            let taken = client.put_if(&key, &bytes, lease, again)?.is_ok();
                            if taken && !std::mem::replace(&mut took_over, true) {
                                log::info!(
                                    "config store: this node's record was left by another \
                                     process of it that no longer writes it: this one does"
                                );
                            }
                            foreign = None;
                            held_by = None;
                            return Ok(());
                        }
                        if moved {
                            let why = format!(
                                "another process of this node (node_id {id:?}; the one a \
                                 binary upgrade replaced, an older build?) writes its record: \
                                 this one writes it once that process stops"
                            );
                            if held_by.as_deref() != Some(&why) {
                                log::info!("config store: {why}");
                                held_by = Some(why);
                            }
                        }
                        return Ok(());
                    };
                    if held_by.as_deref() != Some(&why) {
                        log::error!("config store: {why}");
                        held_by = Some(why.clone());
                    }
                    Err(EtcdError::Refused(why))
                }
            }
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
