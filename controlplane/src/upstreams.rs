//! The upstream manager: keeps each upstream's live state ([`UpstreamLive`]) from one config
//! revision to the next, resolves host names and SRV names (re-resolving when their TTL runs
//! out), runs active health checks, ends passive ejections when their time is up, and
//! answers `/v1/upstreams/{id}/health` and the per-target metrics.
//!
//! It runs on its own thread ("gw-upstreams", a current-thread tokio runtime), never on a
//! worker. [`Upstreams::adopt`] is called with every snapshot before it is published: it links
//! the snapshot's upstreams to their live state and, for names it has not seen before, waits
//! for a first answer (bounded by the resolver timeout) so a new upstream has addresses when
//! its routes go live. Target states are keyed by upstream id and address, so health and
//! counters survive config changes that leave a target in place.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use common::config::UpstreamProtocol;
use common::live::{
    now_ms, LastCheck, LiveTarget, TargetSet, TargetState, UpstreamLive, CIRCUIT_REASONS,
    FAILURE_KINDS,
};
use common::snapshot::{HealthCheck, Target};
use common::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

use crate::dns::{Resolver, Srv};

/// How often ended ejections are noticed.
const EJECTION_TICK: Duration = Duration::from_millis(50);

/// Handle on the upstream manager (cheap to clone).
#[derive(Debug, Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rt: tokio::runtime::Handle,
    state: Mutex<State>,
    /// First answers looked up ahead of a write ([`Upstreams::prefetch`]), for its
    /// [`Upstreams::adopt`] to take: a name's first lookup then holds up no admin call.
    prefetched: Mutex<Vec<Prefetched>>,
}

/// A first answer looked up before the snapshot naming it was committed.
#[derive(Debug)]
struct Prefetched {
    name: Name,
    /// The resolver asked (a write changing `[resolver]` meanwhile asks again).
    resolver: Resolver,
    at: std::time::Instant,
    found: Found,
}

/// How long a prefetched answer may wait for its write: longer, and it is asked again.
const PREFETCH_FOR: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    resolver: Resolver,
    min_ttl: Duration,
    max_ttl: Duration,
    upstreams: HashMap<Box<str>, Entry>,
    states: HashMap<(Box<str>, SocketAddr), Arc<TargetState>>,
    hosts: HashMap<Box<str>, Host>,
    srvs: HashMap<Box<str>, SrvName>,
    checks: HashMap<(Box<str>, SocketAddr), Check>,
}

/// One upstream as the manager keeps it.
#[derive(Debug)]
struct Entry {
    live: Arc<UpstreamLive>,
    targets: Vec<Target>,
    srv: Option<Box<str>>,
    health_check: Option<HealthCheck>,
    /// The TLS its connections were opened with.
    tls: Option<common::tls::UpstreamTls>,
}

/// A host name's addresses.
#[derive(Debug)]
struct Host {
    addrs: Vec<IpAddr>,
    task: Option<AbortHandle>,
    stats: Arc<LookupStats>,
    /// Lookups in a row where one address family's query failed (the other answered).
    family_failures: u32,
}

/// An SRV name's records (the lowest priority's).
#[derive(Debug)]
struct SrvName {
    records: Vec<Srv>,
    task: Option<AbortHandle>,
    stats: Arc<LookupStats>,
}

#[derive(Debug, Default)]
struct LookupStats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Failed lookups since the last answer (the log says the 1st, 2nd, 4th, 8th...).
    in_a_row: AtomicU64,
}

impl LookupStats {
    /// An answer: counted, and said in the log if lookups had been failing.
    fn answered(&self, name: &Name) {
        self.ok.fetch_add(1, Relaxed);
        let failed = self.in_a_row.swap(0, Relaxed);
        if failed > 0 {
            log::info!("resolver: {name} answers again, after {failed} failed lookups");
        }
    }
}

/// Tells the checkers apart (see `CheckState::owner`); 0 is none.
static NEXT_CHECKER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug)]
struct Check {
    config: HealthCheck,
    task: AbortHandle,
    state: Arc<TargetState>,
}

// A name's refresh task and a target's checks end with their entries, however those go.
impl Drop for Host {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for SrvName {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Check {
    /// No active checks any more (or new settings, which start over): the target is not held
    /// unhealthy by checks that no longer run.
    fn drop(&mut self) {
        self.task.abort();
        // Under the lock its task takes to record a result: a check that completes as this
        // runs (on the upstreams thread) cannot mark the target unhealthy afterwards.
        let mut c = self.state.check.lock().unwrap_or_else(|p| p.into_inner());
        *c = Default::default();
        self.state.set_unhealthy(false);
    }
}

/// What a first lookup found.
#[derive(Debug)]
enum Found {
    /// Addresses and TTL; `Some(true)` / `Some(false)`: the A / AAAA query failed (see
    /// [`Resolver::lookup_ip`]).
    Ips(Vec<IpAddr>, u32, Option<bool>),
    Srv(Vec<Srv>, Vec<(String, IpAddr, u32)>, u32),
    Failed(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Upstreams {
    /// Starts the manager's thread.
    pub fn start() -> std::io::Result<Upstreams> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("gw-upstreams".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            })?;
        let rt = rx
            .recv()
            .map_err(|_| std::io::Error::other("the upstream thread did not start"))??;
        let inner = Arc::new(Inner {
            rt,
            prefetched: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                resolver: Resolver {
                    servers: Vec::new(),
                    timeout: Duration::from_secs(2),
                    hosts_file: true,
                },
                min_ttl: Duration::from_secs(1),
                max_ttl: Duration::from_secs(300),
                upstreams: HashMap::new(),
                states: HashMap::new(),
                hosts: HashMap::new(),
                srvs: HashMap::new(),
                checks: HashMap::new(),
            }),
        });
        let weak = Arc::downgrade(&inner);
        inner.rt.spawn(async move {
            loop {
                tokio::time::sleep(EJECTION_TICK).await;
                let Some(inner) = weak.upgrade() else { return };
                let now = now_ms();
                let st = lock(&inner.state);
                for s in st.states.values() {
                    s.expire(now);
                }
            }
        });
        Ok(Upstreams { inner })
    }

    /// The resolver `snap` configures.
    fn resolver_of(snap: &Snapshot) -> Resolver {
        let r = &snap.config.resolver;
        Resolver::new(&r.nameservers, Duration::from_millis(r.timeout_ms)).unwrap_or_else(|e| {
            log::warn!("resolver: {e}; using the system's name servers");
            Resolver::new(&[], Duration::from_millis(r.timeout_ms)).unwrap_or(Resolver {
                servers: Vec::new(),
                timeout: Duration::from_secs(2),
                hosts_file: true,
            })
        })
    }

    /// The names `snap` uses that the manager has not looked up yet.
    fn new_names(&self, snap: &Snapshot) -> Vec<Name> {
        let st = lock(&self.inner.state);
        let mut names = Vec::new();
        for u in &snap.upstreams {
            for t in &u.targets {
                if let Some((h, _)) = &t.host {
                    names.push(Name::Host(h.clone()));
                }
            }
            names.extend(u.srv.clone().map(Name::Srv));
        }
        names.retain(|n| match n {
            Name::Host(h) => !st.hosts.contains_key(h),
            Name::Srv(s) => !st.srvs.contains_key(s),
        });
        names.sort();
        names.dedup();
        names
    }

    /// Whether `snap` names a host or SRV name not looked up yet (see [`Upstreams::prefetch`]).
    pub fn has_new_names(&self, snap: &Snapshot) -> bool {
        !self.new_names(snap).is_empty()
    }

    /// Looks up the names `snap` would use for the first time, for [`Upstreams::adopt`] to
    /// take when `snap` (or one built the same way again) is published within a few seconds.
    /// A writer calls this without the admin store's lock, so that a name whose servers do
    /// not answer holds up no other admin call.
    pub fn prefetch(&self, snap: &Snapshot) {
        let resolver = Self::resolver_of(snap);
        let names: Vec<Name> = {
            let held = lock(&self.inner.prefetched);
            self.new_names(snap)
                .into_iter()
                .filter(|n| !held.iter().any(|p| p.name == *n && p.resolver == resolver))
                .collect()
        };
        if names.is_empty() {
            return;
        }
        let found = self.first_lookups(&resolver, names);
        let at = std::time::Instant::now();
        let mut held = lock(&self.inner.prefetched);
        held.retain(|p| p.at.elapsed() < PREFETCH_FOR);
        for (name, found) in found {
            held.retain(|p| p.name != name);
            let resolver = resolver.clone();
            held.push(Prefetched {
                name,
                resolver,
                at,
                found,
            });
        }
    }

    /// Links `snap`'s upstreams to their live state, resolving names not seen before, and
    /// publishes their target sets. Call it with every snapshot before publishing it.
    pub fn adopt(&self, snap: &mut Snapshot) {
        let resolver = Self::resolver_of(snap);
        let r = &snap.config.resolver;
        let (min_ttl, max_ttl) = (
            Duration::from_millis(r.min_ttl_ms),
            Duration::from_millis(r.max_ttl_ms),
        );
        // Names new to the manager get a first answer before the snapshot goes live (one
        // looked up ahead by `prefetch`, or now); the lock is not held meanwhile (the
        // lookups run on the manager's thread).
        let mut new_names = self.new_names(snap);
        let mut found = Vec::new();
        {
            let mut held = lock(&self.inner.prefetched);
            held.retain(|p| p.at.elapsed() < PREFETCH_FOR);
            new_names.retain(|n| {
                let Some(i) = held
                    .iter()
                    .position(|p| p.name == *n && p.resolver == resolver)
                else {
                    return true;
                };
                found.push((n.clone(), held.swap_remove(i).found));
                false
            });
        }
        found.extend(self.first_lookups(&resolver, new_names));

        let mut st = lock(&self.inner.state);
        let changed = st.resolver != resolver || (st.min_ttl, st.max_ttl) != (min_ttl, max_ttl);
        st.resolver = resolver;
        st.min_ttl = min_ttl;
        st.max_ttl = max_ttl;
        if changed {
            // The names known already are asked again at once, through the new servers and
            // within the new bounds (before: each kept its answer until the TTL it had been
            // given ran out, up to the old `max_ttl_ms`, a day by default).
            let names: Vec<Name> = (st.hosts.keys().map(|h| Name::Host(h.clone())))
                .chain(st.srvs.keys().map(|s| Name::Srv(s.clone())))
                .collect();
            for name in names {
                let task = Some(self.refresh(name.clone(), Duration::ZERO));
                let old = match &name {
                    Name::Host(h) => st
                        .hosts
                        .get_mut(h)
                        .and_then(|e| std::mem::replace(&mut e.task, task)),
                    Name::Srv(s) => st
                        .srvs
                        .get_mut(s)
                        .and_then(|e| std::mem::replace(&mut e.task, task)),
                };
                if let Some(old) = old {
                    old.abort();
                }
            }
        }
        for (name, found) in found {
            self.record_first(&mut st, name, found);
        }
        let mut seen = HashSet::new();
        for u in &mut snap.upstreams {
            seen.insert(u.id.clone());
            let entry = st.upstreams.entry(u.id.clone()).or_insert_with(|| Entry {
                live: u.live.clone(),
                targets: Vec::new(),
                srv: None,
                health_check: None,
                tls: u.tls.clone(),
            });
            if entry.tls != u.tls {
                // Other TLS settings (cleartext to TLS, another authority or client
                // certificate): its connections are pooled under its live state, so a new
                // one leaves those behind, and the workers close them (the published
                // snapshot bumps the generation). Target health is kept (by address).
                entry.live = u.live.clone();
                entry.tls = u.tls.clone();
            }
            entry.targets = u.targets.clone();
            entry.srv = u.srv.clone();
            entry.health_check = u.health_check.clone();
            u.live = entry.live.clone();
        }
        st.upstreams.retain(|id, _| seen.contains(id));
        let ids: Vec<Box<str>> = st.upstreams.keys().cloned().collect();
        for id in &ids {
            rebuild(&mut st, id);
        }
        self.reconcile(&mut st);
    }

    /// Runs the first lookups of `names` concurrently on the manager's thread and waits for
    /// them (each is bounded by the resolver's timeout per server).
    fn first_lookups(&self, resolver: &Resolver, names: Vec<Name>) -> Vec<(Name, Found)> {
        if names.is_empty() {
            return Vec::new();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let n = names.len();
        let asked = names.clone();
        let limit = resolver.timeout * (resolver.servers.len().max(1) as u32 + 1);
        let deadline = std::time::Instant::now() + limit;
        // An SRV name's target hosts are cut a little before, so that its answer is in.
        let hosts_by = tokio::time::Instant::from_std(deadline);
        let hosts_by = hosts_by
            .checked_sub(Duration::from_millis(50))
            .unwrap_or(hosts_by);
        for name in names {
            let (tx, resolver) = (tx.clone(), resolver.clone());
            self.inner.rt.spawn(async move {
                let found = lookup(&resolver, &name, &HashSet::new(), Some(hosts_by)).await;
                let _ = tx.send((name, found));
            });
        }
        drop(tx);
        let mut out: Vec<(Name, Found)> = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        // A name without an answer by now is a failure like any other: it is retried after
        // min_ttl_ms by its refresh task.
        for name in asked {
            if !out.iter().any(|(n, _)| *n == name) {
                let why = format!("no answer within {} ms", limit.as_millis());
                out.push((name, Found::Failed(why)));
            }
        }
        out
    }

    /// Records a name's first answer (or failure) and starts its refresh task (a name that
    /// has an entry already keeps its task and just takes the answer).
    fn record_first(&self, st: &mut State, name: Name, found: Found) {
        if self.stats(st, &name).is_some() {
            self.apply(st, &name, found, true);
            return;
        }
        let stats = Arc::new(LookupStats::default());
        match &name {
            Name::Host(h) => {
                st.hosts.entry(h.clone()).or_insert_with(|| Host {
                    addrs: Vec::new(),
                    family_failures: 0,
                    task: None,
                    stats: stats.clone(),
                });
            }
            Name::Srv(srv) => {
                st.srvs.entry(srv.clone()).or_insert_with(|| SrvName {
                    records: Vec::new(),
                    task: None,
                    stats: stats.clone(),
                });
            }
        }
        let Some(next) = self.apply(st, &name, found, false) else {
            return;
        };
        let task = self.refresh(name.clone(), next);
        match &name {
            Name::Host(h) => st.hosts.get_mut(h).map(|e| e.task = Some(task)),
            Name::Srv(srv) => st.srvs.get_mut(srv).map(|e| e.task = Some(task)),
        };
    }

    /// Applies a lookup's result to `name`'s entry: new addresses or records (the upstreams
    /// using them rebuilt when `publish`), or a failure that keeps the last good ones.
    /// Returns when to ask again; `None` when the name is no longer used.
    fn apply(&self, st: &mut State, name: &Name, found: Found, publish: bool) -> Option<Duration> {
        let (min, max) = (st.min_ttl, st.max_ttl);
        let (changed, next) = match found {
            Found::Failed(e) => {
                let stats = self.stats(st, name)?;
                stats.failed.fetch_add(1, Relaxed);
                // Said at the 1st, 2nd, 4th, 8th... in a row: a name that stays away is not
                // logged every `min_ttl_ms`.
                let in_a_row = stats.in_a_row.fetch_add(1, Relaxed) + 1;
                if in_a_row.is_power_of_two() {
                    log::warn!(
                        "resolver: {name}: {e}; keeping its last answer, retrying in {} ms \
                         ({in_a_row} failed in a row)",
                        min.as_millis()
                    );
                }
                return Some(min);
            }
            Found::Ips(mut ips, ttl, failed) => {
                let Name::Host(h) = name else { return None };
                let host = st.hosts.get_mut(h)?;
                let next = match failed {
                    None => {
                        host.stats.answered(name);
                        if host.family_failures > 0 {
                            log::info!("resolver: {name}: both address families answer again");
                        }
                        host.family_failures = 0;
                        clamp(ttl, min, max)
                    }
                    // One family's query failed: its last addresses stay (a lost packet must
                    // not take half of a dual-stack target's addresses away), and it is asked
                    // again soon, then less and less often up to the answer's TTL: a name
                    // server that always fails one family (SERVFAIL for AAAA is common) is
                    // not asked every `min_ttl_ms`, nor the log told each time.
                    Some(v4) => {
                        host.stats.failed.fetch_add(1, Relaxed);
                        // The name answers (in the other family).
                        host.stats.in_a_row.store(0, Relaxed);
                        host.family_failures = host.family_failures.saturating_add(1);
                        let wait = min.saturating_mul(1 << (host.family_failures - 1).min(16));
                        let wait = wait.min(clamp(ttl, min, max));
                        if host.family_failures.is_power_of_two() {
                            let family = if v4 { "A" } else { "AAAA" };
                            log::warn!(
                                "resolver: {name}: the {family} query failed ({} times in a \
                                 row); keeping its last addresses, retrying in {} ms",
                                host.family_failures,
                                wait.as_millis()
                            );
                        }
                        ips.extend(host.addrs.iter().filter(|a| a.is_ipv4() == v4));
                        ips.sort();
                        ips.dedup();
                        wait
                    }
                };
                let changed = host.addrs != ips;
                host.addrs = ips;
                (changed, next)
            }
            Found::Srv(records, extra, ttl) => {
                let Name::Srv(srv) = name else { return None };
                st.srvs.get(srv)?.stats.answered(name);
                // Addresses the answer carried (or that were looked up) for targets not
                // known yet: those hosts start with them.
                let mut by_host: HashMap<&str, (Vec<IpAddr>, u32)> = HashMap::new();
                for (host, ip, ttl) in &extra {
                    let e = by_host.entry(host).or_insert((Vec::new(), u32::MAX));
                    e.0.push(*ip);
                    e.1 = e.1.min(*ttl);
                }
                let records = by_priority(records);
                let mut seeded = false;
                for r in &records {
                    if st.hosts.contains_key(r.target.as_str()) {
                        continue;
                    }
                    let found = match by_host.remove(r.target.as_str()) {
                        Some((ips, ttl)) => Found::Ips(ips, ttl, None),
                        None => Found::Failed(format!("no address for this target of {name}")),
                    };
                    self.record_first(st, Name::Host(r.target.as_str().into()), found);
                    seeded = true;
                }
                let entry = st.srvs.get_mut(srv)?;
                let changed = entry.records != records || seeded;
                entry.records = records;
                (changed, clamp(ttl, min, max))
            }
        };
        if changed && publish {
            log::info!("resolver: {name} has a new answer");
            let users: Vec<Box<str>> = st
                .upstreams
                .iter()
                .filter(|(_, e)| e.uses(name, &st.srvs))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &users {
                rebuild(st, id);
            }
            self.reconcile(st);
        }
        Some(next)
    }

    fn stats<'s>(&self, st: &'s State, name: &Name) -> Option<&'s LookupStats> {
        match name {
            Name::Host(h) => st.hosts.get(h).map(|e| &*e.stats),
            Name::Srv(s) => st.srvs.get(s).map(|e| &*e.stats),
        }
    }

    /// Asks for `name` again every time its answer's TTL (clamped) runs out, or `min_ttl_ms`
    /// after a failure, until it is no longer used.
    fn refresh(&self, name: Name, first: Duration) -> AbortHandle {
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .rt
            .spawn(async move {
                let mut next = first;
                loop {
                    tokio::time::sleep(next).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let (resolver, known) = {
                        let st = lock(&inner.state);
                        (st.resolver.clone(), st.hosts.keys().cloned().collect())
                    };
                    let found = lookup(&resolver, &name, &known, None).await;
                    let me = Upstreams {
                        inner: inner.clone(),
                    };
                    let mut st = lock(&inner.state);
                    match me.apply(&mut st, &name, found, true) {
                        Some(n) => next = n,
                        None => return,
                    }
                }
            })
            .abort_handle()
    }

    /// Starts and stops health checks to match the target sets, and forgets the states,
    /// names and lookups nothing uses any more.
    fn reconcile(&self, st: &mut State) {
        let mut wanted: HashMap<TargetKey, (HealthCheck, Arc<TargetState>, String)> =
            HashMap::new();
        let mut in_use = HashSet::new();
        let mut names = HashSet::new();
        for (id, e) in &st.upstreams {
            let set = e.live.set.load();
            for t in &set.targets {
                in_use.insert((id.clone(), t.addr));
                if let Some(hc) = &e.health_check {
                    let host = match &t.host {
                        Some(h) => format!("{h}:{}", t.addr.port()),
                        None => t.addr.to_string(),
                    };
                    wanted.insert((id.clone(), t.addr), (hc.clone(), t.state.clone(), host));
                }
            }
            for t in &e.targets {
                if let Some((h, _)) = &t.host {
                    names.insert(h.clone());
                }
            }
            if let Some(s) = &e.srv {
                if let Some(srv) = st.srvs.get(s) {
                    names.extend(
                        srv.records
                            .iter()
                            .map(|r| Box::<str>::from(r.target.as_str())),
                    );
                }
            }
        }
        st.checks
            .retain(|key, c| wanted.get(key).is_some_and(|(hc, _, _)| *hc == c.config));
        for (key, (hc, state, host)) in wanted {
            if st.checks.contains_key(&key) {
                continue;
            }
            let owner = NEXT_CHECKER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.check.lock().unwrap_or_else(|p| p.into_inner()).owner = owner;
            let task = self
                .inner
                .rt
                .spawn(health_checks(key.1, hc.clone(), host, state.clone(), owner))
                .abort_handle();
            st.checks.insert(
                key,
                Check {
                    config: hc,
                    task,
                    state,
                },
            );
        }
        st.states.retain(|key, _| in_use.contains(key));
        st.hosts.retain(|h, _| names.contains(h));
        let srv_names: HashSet<Box<str>> = st
            .upstreams
            .values()
            .filter_map(|e| e.srv.clone())
            .collect();
        st.srvs.retain(|s, _| srv_names.contains(s));
    }

    /// `GET /v1/upstreams/{id}/health`; `None` for an unknown id.
    pub fn health(&self, id: &str) -> Option<serde_json::Value> {
        let st = lock(&self.inner.state);
        let e = st.upstreams.get(id)?;
        let set = e.live.set.load();
        let targets: Vec<serde_json::Value> = set
            .targets
            .iter()
            .map(|t| {
                let check = t.state.check.lock().unwrap_or_else(|p| p.into_inner()).last;
                serde_json::json!({
                    "address": t.addr.to_string(),
                    "host": t.host.as_deref(),
                    "state": t.state.state_label(t.draining),
                    "backup": t.backup,
                    "last_check": check.map(|c: LastCheck| serde_json::json!({
                        "at": rfc3339(c.at),
                        "ok": c.ok,
                        "status": c.status,
                    })),
                    "consecutive_failures": t.state.consecutive_failures(),
                    "outstanding": t.state.outstanding(),
                    "ejections": t.state.ejections(),
                })
            })
            .collect();
        Some(serde_json::json!({ "targets": targets }))
    }

    /// Per-target and per-upstream metrics, and DNS lookups, in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let st = lock(&self.inner.state);
        let mut ids: Vec<&Box<str>> = st.upstreams.keys().collect();
        ids.sort();
        let mut targets = Vec::new();
        for id in &ids {
            let e = &st.upstreams[*id];
            let set = e.live.set.load_full();
            targets.push((id, e, set));
        }
        // One series per target: name, type, help, value.
        let series: [(&str, &str, &str, &TargetValue); 4] = [
            (
                "gateway_target_requests_total",
                "counter",
                "Requests sent to each target, retries included.",
                &|t| t.state.requests(),
            ),
            (
                "gateway_target_retries_total",
                "counter",
                "Retries sent to each target.",
                &|t| t.state.retries(),
            ),
            (
                "gateway_target_outstanding",
                "gauge",
                "Requests in flight to each target.",
                &|t| t.state.outstanding(),
            ),
            (
                "gateway_target_ejections_total",
                "counter",
                "Passive ejections of each target.",
                &|t| t.state.ejections(),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (id, _, set) in &targets {
                for t in &set.targets {
                    let _ = writeln!(
                        out,
                        "{name}{{upstream=\"{id}\",target=\"{}\"}} {}",
                        t.addr,
                        value(t)
                    );
                }
            }
        }
        let _ = writeln!(out, "# HELP gateway_target_errors_total Failed requests per target, by kind.\n# TYPE gateway_target_errors_total counter");
        for (id, _, set) in &targets {
            for t in &set.targets {
                for (k, kind) in FAILURE_KINDS.iter().enumerate() {
                    let n = t.state.errors(k);
                    if n > 0 {
                        let _ = writeln!(out, "gateway_target_errors_total{{upstream=\"{id}\",target=\"{}\",kind=\"{kind}\"}} {n}", t.addr);
                    }
                }
            }
        }
        let _ = writeln!(out, "# HELP gateway_target_state 1 for each target's current state.\n# TYPE gateway_target_state gauge");
        for (id, _, set) in &targets {
            for t in &set.targets {
                let now = t.state.state_label(t.draining);
                for state in ["healthy", "unhealthy", "ejected", "draining"] {
                    let _ = writeln!(out, "gateway_target_state{{upstream=\"{id}\",target=\"{}\",state=\"{state}\"}} {}", t.addr, u8::from(now == state));
                }
            }
        }
        let _ = writeln!(out, "# HELP gateway_circuit_rejected_total Requests answered 503 by a circuit limit.\n# TYPE gateway_circuit_rejected_total counter");
        for (id, e, _) in &targets {
            for (i, reason) in CIRCUIT_REASONS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "gateway_circuit_rejected_total{{upstream=\"{id}\",reason=\"{reason}\"}} {}",
                    e.live.circuit.rejected[i].load(Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP gateway_retry_budget_denied_total Retries not made because the retry budget was spent.\n# TYPE gateway_retry_budget_denied_total counter");
        for (id, e, _) in &targets {
            let _ = writeln!(
                out,
                "gateway_retry_budget_denied_total{{upstream=\"{id}\"}} {}",
                e.live.budget.denied.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP gateway_dns_lookups_total DNS lookups of target host names and SRV names, by result.\n# TYPE gateway_dns_lookups_total counter");
        let mut names: Vec<(String, &LookupStats)> = st
            .hosts
            .iter()
            .map(|(h, x)| (h.to_string(), &*x.stats))
            .chain(st.srvs.iter().map(|(s, x)| (s.to_string(), &*x.stats)))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, stats) in names {
            // Names from DNS answers are checked as host names; escaped all the same.
            let name = dataplane::metrics::escape(&name);
            for (result, n) in [("ok", &stats.ok), ("failed", &stats.failed)] {
                let _ = writeln!(
                    out,
                    "gateway_dns_lookups_total{{name=\"{name}\",result=\"{result}\"}} {}",
                    n.load(Relaxed)
                );
            }
        }
    }
}

/// An SRV name's records and addresses for their targets: those the answer carried, and
/// those looked up for targets it did not (unless `known` already has them), backups
/// included. The lookups run at once, for the time one lookup may take: a target host that
/// does not answer by then is left to its own retries, and the answer stands with the others
/// (one after another, a few silent hosts made the first lookup miss its bound and drop
/// a good answer).
async fn resolve_srv(
    resolver: &Resolver,
    name: &str,
    known: impl Fn(&str) -> bool,
    hosts_by: Option<tokio::time::Instant>,
) -> Result<(Vec<Srv>, Vec<(String, IpAddr, u32)>, u32), crate::dns::DnsError> {
    use futures_util::StreamExt;
    let (records, mut extra, ttl) = resolver.lookup_srv(name).await?;
    let mut missing: Vec<&str> = records
        .iter()
        .map(|r| r.target.as_str())
        .filter(|t| !known(t) && !extra.iter().any(|(n, _, _)| n == t))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    let mut lookups: futures_util::stream::FuturesUnordered<_> = missing
        .into_iter()
        .map(|host| async move { (host, resolver.lookup_ip(host).await) })
        .collect();
    // One lookup's time: its name servers asked one after another, each for `timeout_ms`.
    let one_lookup = resolver.timeout * resolver.servers.len().max(1) as u32;
    let deadline = tokio::time::Instant::now() + one_lookup;
    let deadline = hosts_by.map_or(deadline, |by| deadline.min(by));
    while let Ok(Some((host, found))) = tokio::time::timeout_at(deadline, lookups.next()).await {
        match found {
            Ok((ips, ttl, _)) => {
                extra.extend(ips.into_iter().map(|ip| (host.to_owned(), ip, ttl)));
            }
            Err(e) => log::warn!("resolver: {host} (a target of SRV {name}): {e}"),
        }
    }
    drop(lookups);
    Ok((records, extra, ttl))
}

/// Target weights from SRV weights (0 to 65535; 0 counts as 1): divided by their common
/// divisor, then scaled down so the largest is at most 100 only when it is larger. Small
/// weights keep a hash ring's points per target fixed, so a target leaving moves only its
/// own keys (scaled to 1,000 each, as before, every ring was rescaled: removing one of four
/// targets moved keys between the other three).
fn srv_weights(weights: impl Iterator<Item = u16>) -> Vec<u32> {
    let w: Vec<u32> = weights.map(|w| u32::from(w.max(1))).collect();
    let gcd = w.iter().fold(0, |a, &b| gcd(a, b)).max(1);
    let max = w.iter().max().copied().unwrap_or(1) / gcd;
    w.iter()
        .map(|&x| {
            let x = x / gcd;
            if max > 100 {
                (x * 100 / max).max(1)
            } else {
                x
            }
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A per-target metric's value.
type TargetValue = dyn Fn(&LiveTarget) -> u64;

/// A target of an upstream: its id and address.
type TargetKey = (Box<str>, SocketAddr);

/// A name the manager looks up: a target's host name (A and AAAA) or an SRV name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Host(Box<str>),
    Srv(Box<str>),
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Host(h) => f.write_str(h),
            Name::Srv(s) => write!(f, "SRV {s}"),
        }
    }
}

impl Entry {
    /// Whether this upstream's targets come from `name`: a host name among its targets or
    /// among its SRV records' targets, or its SRV name.
    fn uses(&self, name: &Name, srvs: &HashMap<Box<str>, SrvName>) -> bool {
        match name {
            Name::Host(h) => {
                self.targets
                    .iter()
                    .any(|t| t.host.as_ref().is_some_and(|(x, _)| x == h))
                    || self
                        .srv
                        .as_ref()
                        .and_then(|s| srvs.get(s))
                        .is_some_and(|s| s.records.iter().any(|r| *r.target == **h))
            }
            Name::Srv(s) => self.srv.as_ref() == Some(s),
        }
    }
}

/// One lookup of `name`; an SRV name's targets are looked up too unless `known` has them.
/// `hosts_by`: when an SRV name's target-host lookups are cut at the latest (a first
/// lookup's bound), beside their own.
async fn lookup(
    resolver: &Resolver,
    name: &Name,
    known: &HashSet<Box<str>>,
    hosts_by: Option<tokio::time::Instant>,
) -> Found {
    let result = match name {
        Name::Host(h) => resolver
            .lookup_ip(h)
            .await
            .map(|(ips, ttl, failed)| Found::Ips(ips, ttl, failed)),
        Name::Srv(s) => resolve_srv(resolver, s, |h| known.contains(h), hosts_by)
            .await
            .map(|(records, extra, ttl)| Found::Srv(records, extra, ttl)),
    };
    result.unwrap_or_else(|e| Found::Failed(e.to_string()))
}

/// The records in a stable order, the lowest priority first (RFC 2782: the others are for
/// when those fail; they become backup targets).
fn by_priority(mut records: Vec<Srv>) -> Vec<Srv> {
    records.sort_by(|a, b| (a.priority, &a.target, a.port).cmp(&(b.priority, &b.target, b.port)));
    records
}

fn clamp(ttl_s: u32, min: Duration, max: Duration) -> Duration {
    Duration::from_secs(u64::from(ttl_s)).clamp(min, max.max(min))
}

/// A target about to be published: address, weight, host name, draining, backup.
type Listed = (SocketAddr, u32, Option<Arc<str>>, bool, bool);

/// Publishes upstream `id`'s target set from its config and the names' current answers.
fn rebuild(st: &mut State, id: &str) {
    let Some(e) = st.upstreams.get(id) else {
        return;
    };
    let mut list: Vec<Listed> = Vec::new();
    for t in &e.targets {
        match (&t.addr, &t.host) {
            (Some(a), _) => list.push((*a, t.weight, None, t.draining, t.backup)),
            (None, Some((h, port))) => {
                let name: Arc<str> = Arc::from(&**h);
                for ip in st.hosts.get(h).map(|x| &x.addrs[..]).unwrap_or_default() {
                    list.push((
                        SocketAddr::new(*ip, *port),
                        t.weight,
                        Some(name.clone()),
                        t.draining,
                        t.backup,
                    ));
                }
            }
            (None, None) => {}
        }
    }
    if let Some(srv) = e.srv.as_ref().and_then(|s| st.srvs.get(s)) {
        // RFC 2782: the lowest priority first; the others are backups. The records are in
        // priority order (`by_priority`), so backups come after the others (a cap on the
        // targets keeps the lowest priority). Weights are shares within a priority.
        let lowest = srv.records.first().map(|r| r.priority);
        for group in srv.records.chunk_by(|a, b| a.priority == b.priority) {
            let weights = srv_weights(group.iter().map(|r| r.weight));
            for (r, w) in group.iter().zip(weights) {
                let backup = Some(r.priority) != lowest;
                let name: Arc<str> = Arc::from(r.target.as_str());
                for ip in st
                    .hosts
                    .get(r.target.as_str())
                    .map(|x| &x.addrs[..])
                    .unwrap_or_default()
                {
                    let addr = SocketAddr::new(*ip, r.port);
                    list.push((addr, w, Some(name.clone()), false, backup));
                }
            }
        }
    }
    let mut seen = HashMap::new();
    let mut merged: Option<(SocketAddr, Arc<str>, Arc<str>)> = None;
    list.retain(|(a, _, host, ..)| match seen.entry(*a) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(host.clone());
            true
        }
        std::collections::hash_map::Entry::Occupied(o) => {
            if let (Some(kept), Some(other)) = (o.get(), host) {
                if kept != other && merged.is_none() {
                    merged = Some((*a, kept.clone(), other.clone()));
                }
            }
            false
        }
    });
    // Targets are told apart by address. Over TLS without `server_name` the name is the
    // SNI, so two names at one address (a shared ingress) get the first one's: said once
    // per change of the set.
    if let (Some((addr, kept, other)), Some(tls)) = (merged, &e.tls) {
        if tls.server_name.is_none() {
            log::warn!(
                "upstream {id:?}: {kept} and {other} both resolve to {addr}, which is one \
                 target, reached with SNI {kept}; give the upstream a `tls.server_name`, or \
                 the names upstreams of their own"
            );
        }
    }
    if list.len() > common::snapshot::MAX_TARGETS {
        log::warn!(
            "upstream {id:?}: {} addresses, of which the first {} (by SRV priority, target \
             name and port, then address) are its targets",
            list.len(),
            common::snapshot::MAX_TARGETS
        );
        list.truncate(common::snapshot::MAX_TARGETS);
    }
    let live = e.live.clone();
    let targets = list
        .into_iter()
        .map(|(addr, weight, host, draining, backup)| {
            let state = st.states.entry((Box::from(id), addr)).or_default().clone();
            LiveTarget {
                addr,
                weight,
                host,
                draining,
                backup,
                state,
            }
        })
        .collect();
    live.publish(TargetSet::new(targets));
}

/// Checks one target every `interval` (with up to 10% jitter, the first at a random point
/// of the first interval) and sets its state after `unhealthy_after` / `healthy_after`
/// results in a row, while it is the target's checker (`owner`).
async fn health_checks(
    addr: SocketAddr,
    hc: HealthCheck,
    host: String,
    state: Arc<TargetState>,
    owner: u64,
) {
    let interval = hc.interval.as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(jitter(interval))).await;
    let mut no_socket = dataplane::FailureLog::default();
    loop {
        // The next check starts an interval after this one started, whatever this one
        // takes (up to `timeout_ms`, at most the interval): a target that stops answering
        // is noticed within `unhealthy_after` intervals and one timeout.
        let next = tokio::time::Instant::now()
            + Duration::from_millis(interval - interval / 10 + jitter(interval / 5));
        let status = match check_once(addr, &hc, &host).await {
            Ok(status) => status,
            // The gateway's own want of a socket says nothing of the target: no result
            // (before, a gateway out of file descriptors marked every target unhealthy).
            Err(e) => {
                if let Some(more) = no_socket.due(std::time::Instant::now()) {
                    log::warn!(
                        "health: cannot check {addr}: {e}{more} (not counted; said at most \
                         once a minute)"
                    );
                }
                tokio::time::sleep_until(next).await;
                continue;
            }
        };
        let ok = status.is_some_and(|s| match hc.protocol {
            // Its 200 is `grpc-status: 0` (and SERVING); anything else is no pass.
            UpstreamProtocol::Grpc => s == 200,
            _ => hc.expect_status.contains(&s),
        });
        {
            let mut c = state.check.lock().unwrap_or_else(|p| p.into_inner());
            if c.owner != owner {
                // Stopped (`Check`'s drop) while this check ran.
                return;
            }
            c.last = Some(LastCheck {
                at: SystemTime::now(),
                ok,
                status,
            });
            if ok {
                c.passes += 1;
                c.fails = 0;
                if state.is_unhealthy() && c.passes >= hc.healthy_after {
                    state.set_unhealthy(false);
                    log::info!("health: {addr} is healthy again");
                }
            } else {
                c.fails += 1;
                c.passes = 0;
                if !state.is_unhealthy() && c.fails >= hc.unhealthy_after {
                    state.set_unhealthy(true);
                    log::warn!("health: {addr} is unhealthy ({} failed checks)", c.fails);
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

/// A random point in `0..max` milliseconds.
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    u64::from_ne_bytes(b) % max
}

/// One check on a new connection: `GET path` over HTTP/1.1 or HTTP/2 (over TLS with the
/// upstream's `tls`), or for a gRPC upstream the unary call `path` with an empty message.
/// The status answered (a gRPC call counts as 200 only when its `grpc-status` is 0 and, for
/// the standard health service, the answer says SERVING), or `None` when the target did not
/// answer within the timeout (a failed TLS handshake included); `Err` when the gateway had
/// no socket to check with ([`dataplane::upstream::no_socket`]).
async fn check_once(
    addr: SocketAddr,
    hc: &HealthCheck,
    host: &str,
) -> Result<Option<u16>, std::io::Error> {
    let check = async {
        let tcp = match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(e) if dataplane::upstream::no_socket(&e) => return Err(e),
            Err(_) => return Ok(None),
        };
        let Some(tls) = &hc.tls else {
            return Ok(check_on(tcp, hc, host, "http").await);
        };
        // `host` is `NAME:PORT`, or the target's address when it has no name.
        let name = match host.parse::<SocketAddr>() {
            Ok(_) => None,
            Err(_) => host.rsplit_once(':').map(|(name, _)| name),
        };
        let name = tls.name_for(name, addr.ip());
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        match connector.connect(name, tcp).await {
            Ok(s) => Ok(check_on(s, hc, host, "https").await),
            Err(e) => {
                log::debug!("health: TLS with {addr} failed: {e}");
                Ok(None)
            }
        }
    };
    tokio::time::timeout(hc.timeout, check)
        .await
        .unwrap_or(Ok(None))
}

/// [`check_once`] on an open connection.
async fn check_on<S>(s: S, hc: &HealthCheck, host: &str, scheme: &str) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match hc.protocol {
        UpstreamProtocol::Http1 => check_h1(s, hc, host).await,
        _ => check_h2(s, hc, host, scheme).await,
    }
}

/// [`check_once`] over HTTP/1.1.
async fn check_h1<S>(mut s: S, hc: &HealthCheck, host: &str) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gateway-health-check\r\nConnection: close\r\n\r\n",
        hc.path
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let mut interims = 0;
    loop {
        // The final answer's status: interim answers (1xx but 101: 103 Early Hints, a 100)
        // come before it and are skipped whole, as a client must (RFC 9110 15.2).
        if let Some(eol) = buf.iter().position(|&b| b == b'\n') {
            let status = status_of(&buf[..eol])?;
            if !(100..200).contains(&status) || status == 101 {
                return Some(status);
            }
            if let Some(end) = head_end(&buf) {
                interims += 1;
                if interims > MAX_INTERIMS {
                    return None;
                }
                buf.drain(..end);
                continue;
            }
        }
        if buf.len() >= CHECK_HEAD_MAX {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            // A status line the target closed after, without its CRLF.
            return status_of(&buf).filter(|s| !(100..200).contains(s) || *s == 101);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Interim answers a health check skips before it gives up on a target's final one.
const MAX_INTERIMS: usize = 8;
/// The most of an HTTP/1.1 check's answer read while looking for its final status line.
const CHECK_HEAD_MAX: usize = 16 * 1024;

/// The status of an HTTP/1.x status line (its CR and LF, if any, trimmed).
fn status_of(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches(['\r', '\n']);
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?;
    (status.len() == 3).then(|| status.parse::<u16>().ok())?
}

/// Where the head at the start of `buf` ends (after its empty line, CRLF or bare LF).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        let line_end = at + i + 1;
        let line = &buf[at..line_end];
        if at > 0 && (line == b"\r\n" || line == b"\n") {
            return Some(line_end);
        }
        at = line_end;
    }
    None
}

/// [`check_once`] over HTTP/2.
async fn check_h2<S>(io: S, hc: &HealthCheck, host: &str, scheme: &str) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::handshake(io).await.ok()?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let grpc = hc.protocol == UpstreamProtocol::Grpc;
    let result = async {
        let mut send = send.ready().await.ok()?;
        let mut req = http::Request::builder()
            .uri(format!("{scheme}://{host}{}", hc.path))
            .header("user-agent", "gateway-health-check");
        if grpc {
            req = req
                .method("POST")
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        }
        let (resp, mut body_out) = send.send_request(req.body(()).ok()?, !grpc).ok()?;
        if grpc {
            // One empty message: no compression flag, length 0.
            body_out
                .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .ok()?;
        }
        let resp = resp.await.ok()?;
        let status = resp.status().as_u16();
        if !grpc {
            return Some(status);
        }
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        // Read to the trailers (the status), keeping no more of the answer than the check
        // looks at: a `SERVING` answer is 7 bytes, and a target that streamed DATA for the
        // whole check timeout (up to an hour) grew this buffer without a bound.
        let mut message = Vec::with_capacity(8);
        while let Some(data) = body.data().await {
            let data = data.ok()?;
            let _ = body.flow_control().release_capacity(data.len());
            let room = 8usize.saturating_sub(message.len());
            message.extend_from_slice(&data[..data.len().min(room)]);
        }
        let trailers = body.trailers().await.ok()?.unwrap_or_default();
        let code = trailers
            .get("grpc-status")
            .or_else(|| headers.get("grpc-status"))
            .map(|v| v.as_bytes().to_vec());
        let serving = !hc.path.ends_with("grpc.health.v1.Health/Check")
            || message.get(5..) == Some(&[0x08, 0x01][..]);
        Some(
            if status == 200 && code.as_deref() == Some(b"0") && serving {
                200
            } else if status == 200 {
                // A gRPC failure: not healthy, whatever `expect_status` lists.
                503
            } else {
                status
            },
        )
    }
    .await;
    driver.abort();
    result
}

fn rfc3339(t: SystemTime) -> serde_json::Value {
    let mut out = Vec::new();
    dataplane::access_log::json_time(&mut out, t);
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    #[test]
    fn srv_weights_are_kept_small() {
        let w = |ws: &[u16]| super::srv_weights(ws.iter().copied());
        assert_eq!(w(&[30, 10]), [3, 1]);
        assert_eq!(w(&[0, 5]), [1, 5]);
        assert_eq!(w(&[10, 10, 10]), [1, 1, 1]);
        assert_eq!(w(&[65535, 1]), [100, 1]);
        assert_eq!(w(&[1000, 7]), [100, 1]);
    }

    use super::*;

    #[test]
    fn ttls_are_clamped_and_srv_records_ordered_by_priority() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(clamp(0, min, max), min);
        assert_eq!(clamp(30, min, max), Duration::from_secs(30));
        assert_eq!(clamp(86_400, min, max), max);
        let srv = |priority, target: &str| Srv {
            priority,
            weight: 1,
            port: 80,
            target: target.into(),
        };
        let got = by_priority(vec![srv(20, "c"), srv(10, "b"), srv(10, "a")]);
        assert_eq!(got, vec![srv(10, "a"), srv(10, "b"), srv(20, "c")]);
    }

    /// An HTTP/1.1 check of `/health` that one result decides.
    fn http1_check() -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            healthy_after: 1,
            unhealthy_after: 1,
            expect_status: [200].into(),
            protocol: common::config::UpstreamProtocol::Http1,
            tls: None,
        }
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn an_http1_check_reads_the_final_status_past_interim_answers() {
        let (hc, rt) = (http1_check(), current_thread());
        let check = |answer: &'static [u8], pieces: usize| {
            rt.block_on(async {
                let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
                let target = tokio::spawn(async move {
                    let mut request = [0u8; 512];
                    let _ = theirs.read(&mut request).await;
                    // In `pieces` writes, so heads arrive cut anywhere.
                    for part in answer.chunks(answer.len().div_ceil(pieces).max(1)) {
                        theirs.write_all(part).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                });
                let status = check_h1(ours, &hc, "t").await;
                target.abort();
                status
            })
        };
        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n";
        for pieces in [1, 3, 50] {
            let two = [
                &hints[..],
                hints,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ]
            .concat()
            .leak();
            // Before, the 103 was taken as the check's status: the target went unhealthy.
            assert_eq!(check(two, pieces), Some(200), "{pieces} pieces");
            let bare = b"HTTP/1.1 100 Continue\n\nHTTP/1.1 503 Busy\n\n";
            assert_eq!(check(bare, pieces), Some(503), "{pieces} pieces");
        }
        assert_eq!(check(b"HTTP/1.1 204 No Content\r\n\r\n", 1), Some(204));
        assert_eq!(
            check(b"HTTP/1.1 200 OK", 1),
            Some(200),
            "closed after the line"
        );
        // Only interim answers, or endless ones, or none at all: no status.
        assert_eq!(check(hints, 1), None);
        assert_eq!(check(hints.repeat(20).leak(), 1), None);
        assert_eq!(check(b"SSH-2.0-OpenSSH\r\n", 1), None);
        assert_eq!(check(b"HTTP/1.1 2000 OK\r\n\r\n", 1), None);
    }

    #[test]
    fn a_stopped_checker_leaves_the_target_alone() {
        // A check of a closed port fails at once; one failure makes a target unhealthy. The
        // checker that owns the target marks it; one that was stopped (another owner now,
        // as after `Check`'s drop) records nothing, even if its check was under way.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let (hc, rt) = (http1_check(), current_thread());
        for (owner, checker, unhealthy) in [(7, 7, true), (8, 7, false)] {
            let state = TargetState::new();
            state.check.lock().unwrap().owner = owner;
            let run = health_checks(addr, hc.clone(), addr.to_string(), state.clone(), checker);
            // Two intervals: the owner's first check has long come back by then.
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), run).await });
            let c = state.check.lock().unwrap().clone();
            assert_eq!(
                (state.is_unhealthy(), c.last.is_some()),
                (unhealthy, unhealthy),
                "owner {owner}, checker {checker}"
            );
        }
    }
}
