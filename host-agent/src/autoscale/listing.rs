//! Each round's view of a host: one bulk listing (every active domain's
//! handle, state and a fingerprint of its vCPUs and memory, in one libvirt
//! call; no lookup by name), and the live XML parsed only when something may
//! have changed it: a domain new to the daemon or started again (a new ID),
//! a fingerprint that moved, an action autoscale took or a sample that failed
//! on it, and, as a backstop for changes no listing shows (metadata, a
//! channel), every [`XML_MAX_AGE_ROUNDS`] rounds, staggered across domains.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vmplug_common::Bytes;

use super::{Host, HostRoom, Policy};
use crate::domain::{DomainError, Listed, XmlView};
use crate::ops;
use crate::xml::DomainFacts;

/// The most rounds a domain's parsed XML is used without being read again.
pub const XML_MAX_AGE_ROUNDS: u64 = 12;
/// The blocking-pool threads one host's XML reads use at most at once.
pub const XML_READERS: usize = 4;

#[derive(Debug)]
struct Cached {
    id: Option<u32>,
    fingerprint: u64,
    /// `None`: read, but not a domain autoscale can parse.
    facts: Option<Arc<DomainFacts>>,
    read_round: u64,
    stale: bool,
}

/// A host's parsed live XML per domain name, between rounds.
#[derive(Debug, Default)]
pub struct XmlCache {
    by_name: Mutex<HashMap<String, Cached>>,
    reads: std::sync::atomic::AtomicU64,
}

fn phase(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish() % XML_MAX_AGE_ROUNDS
}

impl XmlCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next round reads this domain's XML again (after an action on it,
    /// or a sample that failed: its agent's address may have changed).
    pub fn invalidate(&self, name: &str) {
        if let Some(c) = self.map().get_mut(name) {
            c.stale = true;
        }
    }

    /// Live XML reads since the start.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the cached XML of `l` may be used in round `round`.
    fn fresh(&self, l: &Listed, round: u64) -> bool {
        let map = self.map();
        let Some(c) = map.get(l.dom.name()) else { return false };
        let aged = round > c.read_round && (round + phase(l.dom.name())).is_multiple_of(XML_MAX_AGE_ROUNDS);
        !c.stale && c.id == l.id && c.fingerprint == l.fingerprint && !aged
    }
}

/// The running domains of `host` the policy selects (their parsed live XML)
/// and the host's room, for round `round` (the webhook passes the round it
/// last saw; a cached XML is never used past its age either way).
pub(crate) async fn select_running(policy: &Policy, host: &Host, round: u64) -> (Vec<Arc<DomainFacts>>, HostRoom) {
    let conn = host.conn.clone();
    let listed = ops::blocking(move || {
        let listed = conn.list_running()?;
        // Free memory and CPUs only: no domain capabilities needed here.
        Ok((listed, ops::host_facts(conn.as_ref(), &DomainFacts::default())?))
    })
    .await;
    let (listed, host_facts) = match listed {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(uri = %host.uri, error = %e, "cannot list the host's domains this round");
            return (Vec::new(), HostRoom { free: Bytes(0), cpus: 1, vcpus: 0 });
        }
    };
    let cache = &host.xml;
    let to_read: Vec<Listed> = listed.iter().filter(|l| !cache.fresh(l, round)).cloned().collect();
    // Read in at most XML_READERS batches, each one blocking task.
    let per = to_read.len().div_ceil(XML_READERS).max(1);
    let mut batches = tokio::task::JoinSet::new();
    for batch in to_read.chunks(per) {
        let batch = batch.to_vec();
        batches.spawn_blocking(move || {
            batch
                .into_iter()
                .map(|l| {
                    let facts = l
                        .dom
                        .xml(XmlView::Live)
                        .and_then(|x| DomainFacts::parse(&x).map_err(|e| DomainError::Other(e.to_string())));
                    (l, facts)
                })
                .collect::<Vec<_>>()
        });
    }
    while let Some(done) = batches.join_next().await {
        let Ok(done) = done else { continue };
        let mut map = cache.map();
        for (l, facts) in done {
            cache.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match facts {
                Ok(f) => {
                    let c = Cached {
                        id: l.id,
                        fingerprint: l.fingerprint,
                        facts: Some(Arc::new(f)),
                        read_round: round,
                        stale: false,
                    };
                    map.insert(l.dom.name().to_string(), c);
                }
                // Gone between the listing and the read, or unreadable: read
                // again next round.
                Err(e) => {
                    tracing::debug!(domain = %l.dom.name(), error = %e, "cannot read the live XML");
                    map.remove(l.dom.name());
                }
            }
        }
    }
    let mut selected = Vec::new();
    let mut vcpus = 0u32;
    {
        let mut map = cache.map();
        let names: std::collections::HashSet<&str> = listed.iter().map(|l| l.dom.name()).collect();
        map.retain(|n, _| names.contains(n.as_str()));
        for l in &listed {
            let Some(f) = map.get(l.dom.name()).and_then(|c| c.facts.clone()) else { continue };
            if policy.selects(&f.name, &f.tags) {
                vcpus = vcpus.saturating_add(f.vcpus_current);
                // A paused, crashed or guest-suspended domain runs no code: its
                // agent cannot answer, so it is not sampled (no connection
                // waits for it); its vCPUs still count against the host.
                if matches!(l.state, crate::domain::DomainState::Running | crate::domain::DomainState::Blocked) {
                    selected.push(f);
                }
            }
        }
    }
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    let room =
        HostRoom { free: Bytes(host_facts.free.iter().map(|b| b.get()).sum()), cpus: host_facts.cpus.max(1), vcpus };
    (selected, room)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Domain, DomainState as State, PauseReason};
    use crate::fake::{FakeConnection, FakeDomain};

    const XML: &str = include_str!("../../tests/fixtures/x86-ready.xml");
    const CAPS: &str = include_str!("../../tests/fixtures/caps.xml");

    fn domains(names: &[&str]) -> Vec<Arc<FakeDomain>> {
        names
            .iter()
            .map(|n| FakeDomain::new(n, &XML.replace("<name>web1</name>", &format!("<name>{n}</name>")), None))
            .collect()
    }

    #[tokio::test]
    async fn a_domain_that_runs_no_code_is_not_sampled_but_its_vcpus_count() {
        let domains = domains(&["a", "b", "c"]);
        domains[1].set_state(State::Paused(PauseReason::User));
        domains[2].set_state(State::PmSuspended);
        let conn = FakeConnection::new(CAPS, domains.clone());
        let policy = Policy::parse("p", "[select]\nglobs = ['*']\n").expect("policy");
        let host = Host::new("test:///".into(), conn, 1);
        let (selected, room) = select_running(&policy, &host, 0).await;
        let picked: Vec<&str> = selected.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(picked, ["a"], "only the running domain is sampled");
        let each = selected[0].vcpus_current;
        assert_eq!(room.vcpus, 3 * each, "the paused and suspended domains' vCPUs still count");
    }

    /// Issue #31: every round looked each domain up by name (after a listing
    /// that had its handle) and read and parsed its live XML. The listing's
    /// handles are used, and the XML is read again only when the listing shows
    /// a change, after an invalidation, or when it is due by age.
    #[tokio::test]
    async fn listing_keeps_the_handles_and_reads_only_what_changed() {
        let names: Vec<String> = (0..24).map(|i| format!("d{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let domains = domains(&refs);
        let conn = FakeConnection::new(CAPS, domains.clone());
        let policy = Policy::parse("p", "[select]\nglobs = ['*']\n").expect("policy");
        let host = Host::new("test:///".into(), conn.clone(), 1);
        let reads = || domains.iter().map(|d| d.xml_reads()).sum::<u32>();
        // The domains whose XML is due by age in `round`.
        let due =
            |round: u64| names.iter().filter(|n| (round + phase(n)).is_multiple_of(XML_MAX_AGE_ROUNDS)).count() as u32;

        let (selected, _) = select_running(&policy, &host, 1).await;
        assert_eq!(selected.len(), 24);
        assert_eq!(reads(), 24, "the first round reads each XML once");
        let (selected, _) = select_running(&policy, &host, 2).await;
        assert_eq!(selected.len(), 24, "the cached facts are used");
        assert_eq!(reads(), 24 + due(2), "nothing changed: only the XML due by age is read");
        assert_eq!(conn.lookups.load(std::sync::atomic::Ordering::Relaxed), 0, "no lookup by name, ever");

        // A change the listing shows (vCPUs), and an invalidation.
        domains[3].set_vcpus(3, crate::domain::Affect::Live).expect("setvcpus");
        host.xml.invalidate("d7");
        let (selected, _) = select_running(&policy, &host, 3).await;
        let aged3 = |i: usize| u32::from((3 + phase(&names[i])).is_multiple_of(XML_MAX_AGE_ROUNDS));
        let not_changed = (0..24).filter(|i| *i != 3 && *i != 7).map(aged3).sum::<u32>();
        assert_eq!(reads(), 24 + due(2) + 2 + not_changed, "the changed and the invalidated domain are read again");
        assert!(domains[3].xml_reads() >= 2);
        assert!(domains[7].xml_reads() >= 2);
        let d3 = selected.iter().find(|f| f.name == "d3").expect("d3");
        assert_eq!(d3.vcpus_current, 3, "and their facts are the new ones");

        // Over XML_MAX_AGE_ROUNDS rounds, each domain is read again once (the
        // backstop for changes no listing shows), spread over the rounds.
        let before = reads();
        let mut most = 0;
        for round in 4..4 + XML_MAX_AGE_ROUNDS {
            let r = reads();
            select_running(&policy, &host, round).await;
            most = most.max(reads() - r);
        }
        assert_eq!(reads() - before, 24, "each domain read once per {XML_MAX_AGE_ROUNDS} rounds");
        assert!(most < 24, "staggered, not all in one round ({most})");

        // A stopped domain leaves the selection and the cache.
        domains[0].set_running(false);
        let (selected, _) = select_running(&policy, &host, 100).await;
        assert!(selected.iter().all(|f| f.name != "d0"));
        assert_eq!(conn.lookups.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
