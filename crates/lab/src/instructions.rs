//! `calsync bench --instructions`: calsync's instructions per stored event and per idle mailbox
//! round, figures that do not depend on the machine's load (CI prints them, so a regression
//! shows as a number).
//!
//! The command runs the bench's sync-only mode (`--sync-only`: the initial sync and idle rounds
//! against the simulator, nothing else) under `valgrind --tool=callgrind`, always with the same
//! mailboxes. The simulator is a child process that valgrind does not follow, so only calsync's
//! instructions are counted. Each figure is the difference of two runs that differ in one thing
//! only, so start-up and everything else they share cancel out:
//! - per stored event: two sizes of calendar (one idle round each), divided by the difference
//!   in stored events: a stored event's share of the page request, parsing, series hydration
//!   and the page write;
//! - per idle mailbox round: a 1-event calendar with 1 and with `1 + EXTRA_IDLE_ROUNDS` idle
//!   rounds, divided by the extra mailbox rounds: the claim, the writes outbox look-up, the
//!   request, the empty page, the cursor and the job's record (and the bench's listing of the
//!   mailboxes each round, a few hundred instructions per mailbox);
//! - the same with a full history: the runs start after `RUNS_KEPT_PER_MAILBOX + 1` idle rounds,
//!   so that every counted round's end also deletes the mailbox's oldest `sync_runs` row, as it
//!   does in production once a mailbox has run 50 jobs (the first figure's rounds never get
//!   there, and the steady state costs about a tenth more);
//! - per resilience call: `PIPELINE_SMALL` and `PIPELINE_LARGE` Graph calls through the
//!   resilience pipeline's success path alone (`bench --pipeline-calls`: the rate limits, the
//!   breaker, the retry budget; no Graph, no store), divided by the difference in calls: the
//!   deterministic companion of the pipeline's criterion bench. It counts the clock's
//!   instructions, not its time: a clock read that costs 25-35 ns on this machine kind is a few
//!   dozen instructions in the vDSO.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use calsync_core::config::Settings;
use calsync_core::resilience::success_path::SuccessPath;

use crate::bench::{BenchArgs, SyncOnlyReport};

/// The world both runs share: few mailboxes so valgrind finishes in a minute or two.
const TENANTS: usize = 2;
const MAILBOXES: usize = 10;
/// Events per mailbox of the small and the large run (one and three pages of 100).
const SMALL: usize = 100;
const LARGE: usize = 300;
/// The idle rounds the second idle run adds to the first one's single round.
const EXTRA_IDLE_ROUNDS: u32 = 20;
/// Idle rounds before the full-history runs' counted rounds: the initial sync's job and these
/// fill each mailbox's history, so every counted round prunes it.
const FULL_HISTORY_ROUNDS: u32 = calsync_core::store::RUNS_KEPT_PER_MAILBOX as u32 + 1;
/// Calls of the small and the large pipeline run.
const PIPELINE_SMALL: u64 = 10_000;
const PIPELINE_LARGE: u64 = 110_000;
/// Not counted: quanta (the metrics exporter's clock) calibrates the TSC against the wall clock
/// at start, spinning for a time, so its instruction count (3 to 8 million under callgrind) is the one
/// part of a run that moves with the machine's load.
const NOT_COUNTED: &str = "<quanta::Clock as core::default::Default>::default";

#[derive(Debug, Serialize, Deserialize)]
pub struct InstructionReport {
    pub mailboxes: usize,
    pub small: Run,
    pub large: Run,
    /// (large − small instructions) / (large − small stored events).
    pub instructions_per_stored_event: f64,
    /// The large run's instructions per stored event with start-up and the idle round
    /// included: for scale only.
    pub whole_run_instructions_per_stored_event: f64,
    /// The 1-event runs with one idle round and with `1 + EXTRA_IDLE_ROUNDS`.
    pub one_idle_round: Run,
    pub more_idle_rounds: Run,
    /// (more − one idle round's instructions) / (extra idle rounds × mailboxes).
    pub instructions_per_idle_mailbox_round: f64,
    /// The 1-event runs with `FULL_HISTORY_ROUNDS` idle rounds and with `EXTRA_IDLE_ROUNDS`
    /// more, each mailbox's history full in the extra rounds.
    pub full_history_idle_rounds: Run,
    pub full_history_more_idle_rounds: Run,
    /// The same difference per extra mailbox round, with the history full.
    pub instructions_per_idle_mailbox_round_full_history: f64,
    pub pipeline_small: PipelineRun,
    pub pipeline_large: PipelineRun,
    /// (large − small instructions) / (large − small calls).
    pub instructions_per_pipeline_call: f64,
}

/// What `bench --pipeline-calls` prints: the calls it made, every one admitted at once.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipelineCalls {
    pub calls: u64,
}

/// A `bench --pipeline-calls` run under callgrind.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipelineRun {
    pub calls: u64,
    /// The whole run's instructions, from its callgrind profile.
    pub instructions: u64,
}

/// Makes `calls` Graph calls through the resilience pipeline's success path
/// ([`SuccessPath`]), with the embedded defaults and the rate limits raised so that none waits.
pub fn pipeline_calls(calls: u64) -> anyhow::Result<PipelineCalls> {
    let settings = Settings::from_toml_str("")
        .context("the embedded defaults do not load")?
        .resilience;
    let path = SuccessPath::new(&SuccessPath::unlimited(settings));
    let admitted = (0..calls).filter(|_| path.call()).count() as u64;
    anyhow::ensure!(
        admitted == calls,
        "only {admitted} of {calls} calls were admitted at once"
    );
    Ok(PipelineCalls { calls })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    pub events_per_mailbox: usize,
    pub idle_rounds: u32,
    pub stored_events: u64,
    pub pages: u64,
    pub instructions: u64,
}

pub async fn count(args: &BenchArgs) -> anyhow::Result<InstructionReport> {
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    anyhow::ensure!(
        valgrind.is_ok_and(|s| s.success()),
        "`calsync bench --instructions` needs valgrind (Debian: apt-get install valgrind)"
    );
    let dir = std::env::temp_dir().join(format!("calsync-instr-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        let small = run_under_callgrind(args, SMALL, 1, &dir).await?;
        let large = run_under_callgrind(args, LARGE, 1, &dir).await?;
        let one_idle = run_under_callgrind(args, 1, 1, &dir).await?;
        let more_idle = run_under_callgrind(args, 1, 1 + EXTRA_IDLE_ROUNDS, &dir).await?;
        let full_idle = run_under_callgrind(args, 1, FULL_HISTORY_ROUNDS, &dir).await?;
        let more_full_idle =
            run_under_callgrind(args, 1, FULL_HISTORY_ROUNDS + EXTRA_IDLE_ROUNDS, &dir).await?;
        let pipeline_small = pipeline_under_callgrind(args, PIPELINE_SMALL, &dir).await?;
        let pipeline_large = pipeline_under_callgrind(args, PIPELINE_LARGE, &dir).await?;
        Ok::<_, anyhow::Error>((
            small,
            large,
            [one_idle, more_idle, full_idle, more_full_idle],
            pipeline_small,
            pipeline_large,
        ))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let (small, large, idle, pipeline_small, pipeline_large) = result?;
    let [one_idle_round, more_idle_rounds, full_history_idle_rounds, full_history_more_idle_rounds] =
        idle;
    anyhow::ensure!(
        large.stored_events > small.stored_events,
        "the large run stored no more events than the small one ({} vs {})",
        large.stored_events,
        small.stored_events
    );
    let marginal = large.instructions.saturating_sub(small.instructions) as f64
        / (large.stored_events - small.stored_events) as f64;
    let mailbox_rounds = f64::from(EXTRA_IDLE_ROUNDS) * (TENANTS * MAILBOXES) as f64;
    let per_idle_round = |one: &Run, more: &Run| {
        more.instructions.saturating_sub(one.instructions) as f64 / mailbox_rounds
    };
    let per_pipeline_call = pipeline_large
        .instructions
        .saturating_sub(pipeline_small.instructions) as f64
        / (pipeline_large.calls - pipeline_small.calls) as f64;
    Ok(InstructionReport {
        mailboxes: TENANTS * MAILBOXES,
        whole_run_instructions_per_stored_event: large.instructions as f64
            / large.stored_events as f64,
        instructions_per_stored_event: marginal,
        small,
        large,
        instructions_per_idle_mailbox_round: per_idle_round(&one_idle_round, &more_idle_rounds),
        one_idle_round,
        more_idle_rounds,
        instructions_per_idle_mailbox_round_full_history: per_idle_round(
            &full_history_idle_rounds,
            &full_history_more_idle_rounds,
        ),
        full_history_idle_rounds,
        full_history_more_idle_rounds,
        pipeline_small,
        pipeline_large,
        instructions_per_pipeline_call: per_pipeline_call,
    })
}

async fn run_under_callgrind(
    args: &BenchArgs,
    events: usize,
    idle_rounds: u32,
    dir: &Path,
) -> anyhow::Result<Run> {
    let out = dir.join(format!("callgrind.{events}.{idle_rounds}.out"));
    if !args.json {
        eprintln!(
            "callgrind: sync-only bench of {} mailboxes x {events} events, {idle_rounds} idle round(s)...",
            TENANTS * MAILBOXES
        );
    }
    let bench_args = [
        "--sync-only".to_string(),
        "--json".into(),
        "--workers".into(),
        args.workers.to_string(),
        "--tenants".into(),
        TENANTS.to_string(),
        "--mailboxes".into(),
        MAILBOXES.to_string(),
        "--events".into(),
        events.to_string(),
        "--idle-rounds".into(),
        idle_rounds.to_string(),
    ];
    let (stdout, instructions) = callgrind(&bench_args, &out).await?;
    let report: SyncOnlyReport = serde_json::from_slice(&stdout)
        .context("the sync-only bench did not print its JSON report")?;
    anyhow::ensure!(
        report.failed_jobs == 0,
        "{} sync jobs failed under callgrind",
        report.failed_jobs
    );
    Ok(Run {
        events_per_mailbox: events,
        idle_rounds,
        stored_events: report.initial_events,
        pages: report.initial_pages,
        instructions,
    })
}

async fn pipeline_under_callgrind(
    args: &BenchArgs,
    calls: u64,
    dir: &Path,
) -> anyhow::Result<PipelineRun> {
    if !args.json {
        eprintln!("callgrind: {calls} calls through the resilience pipeline...");
    }
    let out = dir.join(format!("callgrind.pipeline.{calls}.out"));
    let bench_args = ["--pipeline-calls".to_string(), calls.to_string()];
    let (stdout, instructions) = callgrind(&bench_args, &out).await?;
    let run: PipelineCalls = serde_json::from_slice(&stdout)
        .context("the pipeline run did not print its JSON report")?;
    anyhow::ensure!(
        run.calls == calls,
        "the pipeline run made {} calls, not {calls}",
        run.calls
    );
    Ok(PipelineRun {
        calls,
        instructions,
    })
}

/// Runs `calsync bench <bench_args>` under callgrind, its profile written to `out`: what it
/// printed, and its instruction total.
async fn callgrind(bench_args: &[String], out: &Path) -> anyhow::Result<(Vec<u8>, u64)> {
    let exe = std::env::current_exe().context("cannot find the calsync executable")?;
    let output = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--toggle-collect={NOT_COUNTED}"))
        // After `--toggle-collect`, which would otherwise count only inside that function.
        .arg("--collect-atstart=yes")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .arg("bench")
        .args(bench_args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run valgrind")?;
    anyhow::ensure!(
        output.status.success(),
        "calsync bench {} under callgrind failed ({}): {}",
        bench_args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let text = std::fs::read_to_string(out)
        .with_context(|| format!("callgrind wrote no profile to {}", out.display()))?;
    let instructions =
        totals(&text).with_context(|| format!("no `totals:` line in {}", out.display()))?;
    Ok((output.stdout, instructions))
}

/// The instruction total of a callgrind profile (`totals:`, or `summary:` in older formats).
fn totals(profile: &str) -> Option<u64> {
    profile.lines().rev().find_map(|line| {
        let rest = line
            .strip_prefix("totals:")
            .or_else(|| line.strip_prefix("summary:"))?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn render(r: &InstructionReport) -> String {
    format!(
        "\ncalsync instructions (callgrind), {} mailboxes, sync-only bench\n\
         \x20 {:>6} events/mailbox: {:>7} events stored in {:>3} pages, {:>14} instructions\n\
         \x20 {:>6} events/mailbox: {:>7} events stored in {:>3} pages, {:>14} instructions\n\
         \x20 instructions per stored event   {:.0} (marginal: the difference of the two runs)\n\
         \x20 {:>6} event/mailbox, {:>2} idle round(s): {:>14} instructions\n\
         \x20 {:>6} event/mailbox, {:>2} idle round(s): {:>14} instructions\n\
         \x20 instructions per idle mailbox round   {:.0} (the difference per extra mailbox round)\n\
         \x20 {:>6} event/mailbox, {:>2} idle round(s): {:>14} instructions\n\
         \x20 {:>6} event/mailbox, {:>2} idle round(s): {:>14} instructions\n\
         \x20 instructions per idle mailbox round, history full   {:.0} (each round also prunes the mailbox's sync_runs)\n\
         \x20 {:>7} resilience calls: {:>14} instructions\n\
         \x20 {:>7} resilience calls: {:>14} instructions\n\
         \x20 instructions per resilience call   {:.0} (a Graph call's success path: limits, breaker, budget)\n",
        r.mailboxes,
        r.small.events_per_mailbox,
        r.small.stored_events,
        r.small.pages,
        r.small.instructions,
        r.large.events_per_mailbox,
        r.large.stored_events,
        r.large.pages,
        r.large.instructions,
        r.instructions_per_stored_event,
        r.one_idle_round.events_per_mailbox,
        r.one_idle_round.idle_rounds,
        r.one_idle_round.instructions,
        r.more_idle_rounds.events_per_mailbox,
        r.more_idle_rounds.idle_rounds,
        r.more_idle_rounds.instructions,
        r.instructions_per_idle_mailbox_round,
        r.full_history_idle_rounds.events_per_mailbox,
        r.full_history_idle_rounds.idle_rounds,
        r.full_history_idle_rounds.instructions,
        r.full_history_more_idle_rounds.events_per_mailbox,
        r.full_history_more_idle_rounds.idle_rounds,
        r.full_history_more_idle_rounds.instructions,
        r.instructions_per_idle_mailbox_round_full_history,
        r.pipeline_small.calls,
        r.pipeline_small.instructions,
        r.pipeline_large.calls,
        r.pipeline_large.instructions,
        r.instructions_per_pipeline_call,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_the_profiles_last_totals_line() {
        let profile =
            "version: 1\ncmd: calsync\nevents: Ir\nfn=main\n1 5\nsummary: 999\ntotals: 123456789\n";
        assert_eq!(totals(profile), Some(123_456_789));
        assert_eq!(totals("events: Ir\nsummary: 42\n"), Some(42));
        assert_eq!(totals("events: Ir\n"), None);
    }
}
