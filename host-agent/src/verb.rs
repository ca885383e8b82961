//! The verb layer: each hot-plug verb is one type that names itself and brings
//! its plan, its executor and its judge; one runner does the rest.
//!
//! ```text
//! run():     gather (libvirt + agent) → Verb::plan (pure: facts + request →
//!            plan | refusal) → Verb::execute (libvirt steps, the guest's
//!            answers: the evidence, no verdict) → Verb::judge (pure:
//!            evidence → outcome and message) → one OpReport
//! preview(): gather → Verb::plan → Verb::preview   (what `check` prints)
//! ```
//!
//! A new verb is one file with a `Verb` impl (and its clap arguments), and one
//! registration line in `cli.rs`; `check`, the report and the schema take its
//! name from [`Verb::NAME`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use vmplug_common::protocol::ZonePolicy;

use crate::domain::{Affect, Connection, DomainError};
use crate::facts::{gather_timed, Facts, HotplugOpts};
use crate::link::{AgentAddr, GuestAgent};
use crate::preflight::{Finding, NotPlanned};
use crate::report::{ms, not_planned, OpReport, Run};

/// One verb: its name, its pure plan, what the plan would do in words (for
/// `check`), its execution (which gathers evidence) and its pure judge.
pub trait Verb: Sync {
    /// The verb as typed, as reports and the `--json` schema name it.
    const NAME: &'static str;
    /// Whether the runner opens the guest agent's session for a live change
    /// (a verb that gives the guest nothing yet, such as a new empty device,
    /// does not ask it).
    const ASKS_GUEST: bool = true;
    /// What the plan decided: the steps, and the findings preflight left.
    type Plan: Send + Sync;
    /// What carrying the plan out showed, and the plan itself: what libvirt
    /// did or refused, what it lists afterwards, what the guest answered.
    /// Never a verdict: that is [`Verb::judge`]'s.
    type Evidence: Send;

    /// Pure: the facts and the request give the steps, or a refusal.
    fn plan(&self, facts: &Facts, opts: &HotplugOpts) -> Result<Self::Plan, NotPlanned>;

    /// The request's idempotency key, when it has one (`attach-memory
    /// --request-id`): an error after acting names it, to repeat the request.
    fn request_id(&self) -> Option<&str> {
        None
    }

    /// The plan's findings and its steps in words: `check` prints them.
    fn preview(&self, facts: &Facts, plan: Self::Plan) -> (Vec<Finding>, Vec<String>);

    /// Carries the plan out through libvirt and the guest's agent (undoing
    /// what a failed step leaves half-done) and returns what it saw. Timings
    /// go to `run`. An `Err` is an error of the request itself (a usage error).
    fn execute<A: GuestAgent>(
        &self,
        facts: &Facts,
        link: Option<&mut A>,
        plan: Self::Plan,
        opts: &HotplugOpts,
        run: &mut Run,
    ) -> impl Future<Output = Result<Self::Evidence, DomainError>> + Send;

    /// Pure: the evidence gives the report, its outcome and message, what was
    /// applied and what was verified. Only the runner calls it.
    fn judge(&self, facts: &Facts, evidence: Self::Evidence, opts: &HotplugOpts, run: &Run) -> OpReport;
}

/// `VerbArgs::domain` and `domain_mut` over the arguments' `domain` field,
/// which every verb's command line names its domain by.
#[macro_export]
macro_rules! domain_field {
    () => {
        fn domain(&self) -> &str {
            &self.domain
        }

        fn domain_mut(&mut self) -> &mut String {
            &mut self.domain
        }
    };
}

/// A registered verb's command line (its clap arguments, flattened into the
/// CLI by one line in `cli.rs`): the domain it names, the verb and its options.
pub trait VerbArgs {
    type Verb: Verb;
    fn domain(&self) -> &str;
    fn domain_mut(&mut self) -> &mut String;
    fn verb(&self) -> Result<Self::Verb, DomainError>;
    fn opts(&self) -> Result<HotplugOpts, DomainError>;
    /// What the command line asks that vmplug does not do (refused before the
    /// domain is looked up).
    fn unsupported(&self) -> Option<String> {
        None
    }
}

/// `vmplug VERB DOMAIN …`: gather, plan, execute, judge, report.
pub async fn run<V: Verb>(
    verb: &V,
    conn: Arc<dyn Connection>,
    name: &str,
    opts: &HotplugOpts,
) -> Result<OpReport, DomainError> {
    let (facts, mut link, run) = gather_timed(conn, name, opts, V::ASKS_GUEST).await?;
    run_on(verb, &facts, link.as_mut(), opts, run).await
}

/// A verb on facts already gathered, with whatever guest agent the caller has
/// (the real session, autoscale's held one, or a scripted one in tests).
pub async fn run_on<V: Verb, A: GuestAgent>(
    verb: &V,
    facts: &Facts,
    link: Option<&mut A>,
    opts: &HotplugOpts,
    mut run: Run,
) -> Result<OpReport, DomainError> {
    let t = Instant::now();
    let plan = verb.plan(facts, opts);
    run.preflight_ms += ms(t);
    match plan {
        Ok(plan) => {
            let evidence = verb.execute(facts, link, plan, opts, &mut run).await?;
            Ok(verb.judge(facts, evidence, opts, &run))
        }
        Err(why) => not_planned(V::NAME, &facts.loaded.facts.name, facts.affect, why, &run),
    }
}

/// What `check` asks of a verb: its plan's findings and steps, without acting.
pub trait Preview: Send + Sync {
    fn preview(&self, facts: &Facts, opts: &HotplugOpts) -> Result<(Vec<Finding>, Vec<String>), NotPlanned>;
}

impl<V: Verb + Send> Preview for V {
    fn preview(&self, facts: &Facts, opts: &HotplugOpts) -> Result<(Vec<Finding>, Vec<String>), NotPlanned> {
        Verb::plan(self, facts, opts).map(|p| Verb::preview(self, facts, p))
    }
}

/// The options every verb's command line shares (flattened into each).
#[derive(Args, Debug, Clone, Copy)]
pub struct AffectArgs {
    /// Affect the running domain.
    #[arg(long)]
    pub live: bool,
    /// Affect the persistent definition.
    #[arg(long)]
    pub config: bool,
    /// Live if running, else config (the default).
    #[arg(long)]
    pub current: bool,
}

impl AffectArgs {
    pub fn affect(self) -> Result<Affect, DomainError> {
        Affect::from_flags(self.live, self.config, self.current)
    }
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Guest agent address: vsock:CID:PORT, hybrid:PATH:PORT or serial:PATH
    /// (default: from the domain's vmplug metadata or its virtio-serial channel).
    #[arg(long)]
    pub agent: Option<AgentAddr>,
    /// Seconds to wait for the agent's handshake.
    #[arg(long, default_value_t = 30)]
    pub agent_timeout: u64,
}

#[derive(Args, Debug, Clone)]
pub struct HotplugArgs {
    #[command(flatten)]
    pub affect: AffectArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Seconds the guest may take to bring everything online.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Do not wait for the guest's confirmation.
    #[arg(long)]
    pub no_wait: bool,
    /// Apply even when preflight finds errors (the guest's answer is still checked).
    #[arg(long)]
    pub force: bool,
    /// Zone for onlined memory: auto, movable, kernel, online (default: auto for
    /// DIMMs, movable for virtio-mem, so that it can shrink again).
    #[arg(long)]
    pub zone: Option<ZonePolicy>,
}

impl HotplugArgs {
    pub fn opts(&self) -> Result<HotplugOpts, DomainError> {
        self.opts_with_zone(ZonePolicy::Auto)
    }

    pub fn opts_with_zone(&self, default_zone: ZonePolicy) -> Result<HotplugOpts, DomainError> {
        Ok(HotplugOpts {
            affect: self.affect.affect()?,
            timeout: Duration::from_secs(self.timeout.clamp(1, 3600)),
            agent_wait: Duration::from_secs(self.agent.agent_timeout.clamp(1, 3600)),
            no_wait: self.no_wait,
            force: self.force,
            agent: self.agent.agent.clone(),
            zone: self.zone.unwrap_or(default_zone),
        })
    }
}
