//! One store test suite, run on both backends: every test below is an `async fn(Store)`, and
//! `store_suite!` makes a `sqlite::<name>` and a `postgres::<name>` test of it. SQLite tests get
//! their own file; PostgreSQL tests get their own schema (dropped afterwards) in the database
//! at `CALSYNC_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`). When
//! PostgreSQL cannot be reached, its tests pass after saying loudly that they did not run,
//! unless `CALSYNC_REQUIRE_POSTGRES=1`, which makes them fail.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use calsync::graph::{Attendees, DeltaItem, Event, PageLink, Window};
use calsync::store::{
    Backend, Cursor, Enqueued, EventLink, JobRecord, Lease, MailboxId, MailboxKey, MailboxRecord,
    MasterWrite, NewWrite, PageWrite, RoundEnd, RunOutcome, Store, StoreError, WriteCounts,
    WriteOp, WriteRecord, WriteResult, WriteState, RUNS_KEPT_PER_MAILBOX,
};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::helpers::store::in_postgres_schema;
use crate::helpers::store::{on_postgres, on_postgres_at, on_sqlite, on_sqlite_at};
use sqlx::Connection;

macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::on_sqlite(super::$test).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::on_postgres(super::$test).await;
                }
            )*
        }
    };
}

store_suite!(
    migrations_run_twice,
    config_mailboxes_are_added_disabled_and_reenabled,
    due_candidates_follow_schedule_leases_and_tenant_cap,
    due_candidates_take_each_tenants_requests_then_its_oldest,
    claim_only_if_due,
    racing_claims_have_exactly_one_winner,
    claim_many_leases_each_free_mailbox_to_its_own_job,
    racing_batch_claims_share_out_every_mailbox_once,
    jobs_ending_together_each_land_on_their_own_mailbox,
    lease_expires_and_renewal_extends_it,
    stale_leases_are_released_at_start_only_on_sqlite,
    stale_owners_page_is_refused_and_nothing_written,
    stale_round_is_refused,
    an_empty_page_moves_only_the_cursor_and_is_fenced,
    an_idle_rounds_cursor_ends_with_its_job_and_is_fenced,
    no_write_of_the_old_owner_lands_after_a_takeover,
    upserts_are_idempotent,
    a_page_applies_its_items_in_order,
    repeated_ids_in_a_page_end_as_applied_in_order,
    a_round_ending_page_reconciles_what_it_leaves,
    an_item_understood_later_in_its_page_leaves_quarantine,
    a_page_of_a_lost_lease_changes_nothing,
    removals_only_delete_inside_the_window,
    full_round_reconciles_at_its_end_only,
    cursor_resumes_from_the_last_committed_page,
    finish_job_records_each_outcome,
    run_history_is_pruned,
    event_counts_per_mailbox,
    nul_characters_do_not_poison_a_page_or_a_record,
    mailboxes_are_registered_and_removed_at_run_time,
    sync_requests_are_deduplicated_dispatched_first_and_survive_a_running_job,
    a_request_while_a_requested_job_runs_gets_a_round_after_it,
    events_between_returns_what_overlaps_the_range,
    series_masters_refill_their_occurrences_and_go_with_their_series,
    changed_masters_of_one_page_each_refill_their_own_series,
    replicas_heartbeat_run_out_leave_and_are_forgotten,
    writes_are_enqueued_replayed_and_refused,
    an_enqueued_write_makes_its_mailbox_due_at_once,
    a_claim_says_whether_writes_are_queued,
    pending_writes_come_in_order_with_their_links,
    record_write_is_fenced_on_the_lease,
    delivered_writes_update_the_link_and_end,
    retries_count_attempts_and_stay_queued,
    a_conflict_keeps_outlooks_version,
    a_cancel_that_did_not_happen_reopens_its_appointment,
    concurrent_enqueues_of_one_key_store_one_write,
    write_counts_per_tenant_and_ended_writes_pruned,
    a_wait_graph_imposed_is_not_cut_short_by_requests_or_writes,
    removing_a_mailbox_removes_its_writes_and_links,
    tenant_summaries_count_in_the_store_and_list_the_worst_first,
    subscription_counts_cover_enabled_mailboxes_only,
);

// ---------------------------------------------------------------------------------------------
// Fixtures. Times are whole milliseconds (SQLite keeps milliseconds, PostgreSQL microseconds).

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-02T08:00:00Z")
        .expect("valid time")
        .with_timezone(&Utc)
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn window() -> Window {
    Window {
        start: t0() - chrono::Duration::days(30),
        end: t0() + chrono::Duration::days(30),
    }
}

fn event(id: &str, subject: &str, start: DateTime<Utc>) -> Event {
    Event {
        id: id.to_string(),
        ical_uid: Some(format!("uid-{id}")),
        change_key: Some(format!("ck-{subject}")),
        etag: Some(format!("W/\"{subject}\"")),
        last_modified: Some(start - secs(3600)),
        subject: Some(subject.to_string()),
        start_utc: start,
        end_utc: start + secs(1800),
        start_date: None,
        end_date: None,
        is_all_day: false,
        is_cancelled: false,
        show_as: Some("busy".into()),
        sensitivity: Some("normal".into()),
        event_type: Some("singleInstance".into()),
        series_master_id: None,
        organizer_name: Some("Org".into()),
        organizer_address: Some("org@contoso.com".into()),
        attendees: Attendees::from_value(&json!([{"name": "Bob", "address": "bob@contoso.com",
                           "type": "required", "response": "accepted"}])),
        location: Some("Room 1".into()),
        categories: vec!["Blue category".into()],
        web_link: None,
        raw: json!({"id": id, "subject": subject}).to_string(),
    }
}

fn upsert(id: &str, subject: &str, start: DateTime<Utc>) -> DeltaItem {
    DeltaItem::Upsert(Box::new(event(id, subject, start)))
}

fn removed(id: &str) -> DeltaItem {
    DeltaItem::Removed { id: id.to_string() }
}

fn next(link: &str) -> PageLink {
    PageLink::Next(format!("https://graph.example/next/{link}"))
}

fn delta(link: &str) -> PageLink {
    PageLink::Delta(format!("https://graph.example/delta/{link}"))
}

/// Registers `(tenant, user)` mailboxes from config at t0 and returns their ids, in order.
async fn register(store: &Store, mailboxes: &[(&str, &str)]) -> Vec<MailboxId> {
    let owned: Vec<(String, String)> = mailboxes
        .iter()
        .map(|(t, u)| (t.to_string(), u.to_string()))
        .collect();
    store
        .sync_config_mailboxes(&owned, t0())
        .await
        .expect("config mailboxes");
    let mut ids = Vec::new();
    for (tenant, user) in mailboxes {
        ids.push(mailbox(store, tenant, user).await.id);
    }
    ids
}

async fn mailbox(store: &Store, tenant: &str, user: &str) -> MailboxRecord {
    store
        .mailbox(tenant, user)
        .await
        .expect("mailbox query")
        .expect("mailbox exists")
}

async fn record_of(store: &Store, id: MailboxId) -> MailboxRecord {
    store
        .mailboxes()
        .await
        .expect("mailboxes")
        .into_iter()
        .find(|m| m.id == id)
        .expect("enabled mailbox")
}

/// `n` mailboxes of tenant `a`, users `m0`, `m1`, ...
async fn register_numbered(store: &Store, n: usize) -> Vec<MailboxId> {
    let users: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let named: Vec<(&str, &str)> = users.iter().map(|u| ("a", u.as_str())).collect();
    register(store, &named).await
}

/// Claims `id` for `owner` at `now` for a minute, whatever its schedule.
async fn lease(store: &Store, id: MailboxId, owner: &str, now: DateTime<Utc>) -> Lease {
    store
        .claim(id, owner, now, Duration::from_secs(60), false)
        .await
        .expect("claim")
        .expect("mailbox is free");
    Lease {
        mailbox: id,
        owner: owner.to_string(),
    }
}

async fn full_round(store: &Store, lease: &Lease) -> Cursor {
    let round_id = store
        .start_full_round(lease, &window())
        .await
        .expect("full round starts");
    Cursor {
        round_id,
        full: true,
        window: Some(window()),
        next_link: None,
        delta_link: None,
    }
}

fn job(outcome: RunOutcome, at: DateTime<Utc>, next_run_at: DateTime<Utc>) -> JobRecord {
    JobRecord {
        started_at: at,
        finished_at: at + secs(2),
        outcome,
        full_round: false,
        pages: 1,
        upserted: 0,
        deleted: 0,
        error: (outcome != RunOutcome::Ok).then(|| format!("{} here", outcome.as_str())),
        request_id: None,
        next_run_at,
        hold_until: None,
        round_end: None,
    }
}

/// Ends any job on `id` and schedules its next run at `next_run_at`.
async fn schedule(store: &Store, id: MailboxId, next_run_at: DateTime<Utc>) {
    let lease = lease(store, id, "scheduler", t0()).await;
    store
        .finish_job(&lease, &job(RunOutcome::Ok, t0(), next_run_at))
        .await
        .expect("finish job");
}

async fn event_ids(store: &Store, id: MailboxId) -> BTreeSet<String> {
    store
        .events(id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn is_lease_lost(result: Result<impl std::fmt::Debug, StoreError>) -> bool {
    matches!(result, Err(StoreError::LeaseLost(_)))
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn migrations_run_twice(store: Store) {
    store.migrate().await.expect("second run is a no-op");
    store.ping().await.expect("ping");
}

async fn config_mailboxes_are_added_disabled_and_reenabled(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob"), ("b", "cat")]).await;
    let all = store.mailboxes().await.expect("mailboxes");
    assert_eq!(all.len(), 3);
    for m in &all {
        assert!(m.enabled);
        assert_eq!(m.next_run_at, t0(), "new mailboxes are due at once");
        assert_eq!(m.created_at, t0());
        assert_eq!(
            m.cursor,
            Cursor {
                full: true,
                ..Cursor::default()
            }
        );
        assert_eq!(m.consecutive_failures, 0);
        assert_eq!((m.lease_owner.as_deref(), m.lease_until), (None, None));
        assert_eq!(m.last_success_at, None);
    }
    let names: Vec<(&str, &str)> = all
        .iter()
        .map(|m| (m.tenant.as_str(), m.user_id.as_str()))
        .collect();
    assert_eq!(names, [("a", "ann"), ("a", "bob"), ("b", "cat")]);
    keys_list_the_enabled_mailboxes(&store).await;

    // bob leaves the config, dan joins; the rest keep their ids.
    let later = register(&store, &[("a", "ann"), ("b", "cat"), ("b", "dan")]).await;
    assert_eq!((later[0], later[1]), (ids[0], ids[2]));
    let enabled: Vec<String> = store
        .mailboxes()
        .await
        .expect("mailboxes")
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    assert_eq!(enabled, ["ann", "cat", "dan"]);
    keys_list_the_enabled_mailboxes(&store).await;
    let bob = mailbox(&store, "a", "bob").await;
    assert!(
        !bob.enabled,
        "a mailbox removed from the config is disabled, not deleted"
    );

    // Back in the config: the same mailbox again, not a new one; nothing duplicated.
    let again = register(
        &store,
        &[("a", "ann"), ("a", "bob"), ("b", "cat"), ("b", "dan")],
    )
    .await;
    assert_eq!(again[1], ids[1]);
    register(
        &store,
        &[("a", "ann"), ("a", "bob"), ("b", "cat"), ("b", "dan")],
    )
    .await;
    assert_eq!(store.mailboxes().await.expect("mailboxes").len(), 4);
    keys_list_the_enabled_mailboxes(&store).await;
}

/// `mailbox_keys` names the mailboxes `mailboxes` lists, in the same order.
async fn keys_list_the_enabled_mailboxes(store: &Store) {
    let expected: Vec<MailboxKey> = store
        .mailboxes()
        .await
        .expect("mailboxes")
        .into_iter()
        .map(|m| MailboxKey {
            id: m.id,
            tenant: m.tenant,
            user_id: m.user_id,
        })
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(store.mailbox_keys().await.expect("keys"), expected);
}

async fn due_candidates_follow_schedule_leases_and_tenant_cap(store: Store) {
    let ids = register(
        &store,
        &[
            ("a", "a1"),
            ("a", "a2"),
            ("a", "a3"),
            ("b", "b1"),
            ("b", "b2"),
        ],
    )
    .await;
    let (a1, a2, a3, b1, b2) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    schedule(&store, a1, t0() + secs(30)).await;
    schedule(&store, a2, t0() + secs(10)).await;
    schedule(&store, a3, t0() + secs(20)).await;
    schedule(&store, b1, t0() + secs(15)).await;
    schedule(&store, b2, t0() + secs(3600)).await;

    let due = |now, cap| {
        let store = store.clone();
        async move {
            store
                .due_candidates(now, cap)
                .await
                .expect("due candidates")
                .into_iter()
                .map(|d| (d.id, d.tenant, d.next_run_at))
                .collect::<Vec<_>>()
        }
    };
    assert!(due(t0(), 10).await.is_empty(), "nothing is due yet");
    // Oldest due first; at most two of tenant a.
    assert_eq!(
        due(t0() + secs(60), 2).await,
        [
            (a2, "a".to_string(), t0() + secs(10)),
            (b1, "b".to_string(), t0() + secs(15)),
            (a3, "a".to_string(), t0() + secs(20)),
        ]
    );
    // A leased mailbox is not a candidate until its lease has run out.
    store
        .claim(a2, "w", t0() + secs(60), Duration::from_secs(30), true)
        .await
        .expect("claim")
        .expect("a2 is due and free");
    let ids_at = |v: Vec<(MailboxId, String, DateTime<Utc>)>| {
        v.into_iter().map(|(id, ..)| id).collect::<Vec<_>>()
    };
    assert_eq!(ids_at(due(t0() + secs(61), 10).await), [b1, a3, a1]);
    assert_eq!(ids_at(due(t0() + secs(91), 10).await), [a2, b1, a3, a1]);
    // A disabled mailbox never is.
    register(
        &store,
        &[("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")],
    )
    .await;
    assert_eq!(ids_at(due(t0() + secs(91), 10).await), [a2, b1, a1]);
}

/// Every tenant is visited, whatever its name and however many of its mailboxes are due or
/// disabled, and each gets at most `per_tenant`: its requested mailboxes first (oldest first),
/// then its other due ones, the two counted together.
async fn due_candidates_take_each_tenants_requests_then_its_oldest(store: Store) {
    let mut users = Vec::new();
    for tenant in ["a", "b", "c", "d"] {
        for n in 0..4 {
            users.push((tenant, format!("{tenant}{n}")));
        }
    }
    let pairs: Vec<(&str, &str)> = users.iter().map(|(t, u)| (*t, u.as_str())).collect();
    let ids = register(&store, &pairs).await;
    let id = |tenant: usize, n: usize| ids[tenant * 4 + n];
    let at = |n| t0() + secs(n);
    // Tenant a: all four disabled. Tenant b: two requests, made after the others fell due.
    // Tenant c: one request. Tenant d: nothing requested, one not due yet.
    let enabled: Vec<(&str, &str)> = pairs.iter().copied().filter(|(t, _)| *t != "a").collect();
    register(&store, &enabled).await;
    for (tenant, seconds) in [
        (1, [40, 30, 20, 10]),
        (2, [10, 20, 30, 40]),
        (3, [5, 15, 25, 9999]),
    ] {
        for (n, s) in seconds.into_iter().enumerate() {
            schedule(&store, id(tenant, n), at(s)).await;
        }
    }
    for (mailbox, when) in [(id(1, 0), 50), (id(1, 1), 45), (id(2, 3), 50)] {
        store
            .request_sync(mailbox, at(when))
            .await
            .expect("request")
            .expect("registered");
    }
    let picked: Vec<(MailboxId, bool)> = store
        .due_candidates(at(100), 2)
        .await
        .expect("due")
        .into_iter()
        .map(|d| (d.id, d.requested))
        .collect();
    assert_eq!(
        picked,
        [
            // Requests first, oldest first, across tenants.
            (id(1, 1), true),
            (id(1, 0), true),
            (id(2, 3), true),
            // Then the oldest due, one more for c (its request counts), two for d.
            (id(3, 0), false),
            (id(2, 0), false),
            (id(3, 1), false),
        ]
    );
    // Every mailbox of d asked for (d3 due at once): a tenant with requests only.
    for n in 0..4 {
        store
            .request_sync(id(3, n), at(60))
            .await
            .expect("request")
            .expect("registered");
    }
    let picked: Vec<(MailboxId, bool)> = store
        .due_candidates(at(100), 2)
        .await
        .expect("due")
        .into_iter()
        .map(|d| (d.id, d.requested))
        .collect();
    assert_eq!(
        picked,
        [
            (id(3, 0), true),
            (id(3, 1), true),
            (id(1, 1), true),
            (id(1, 0), true),
            (id(2, 3), true),
            (id(2, 0), false),
        ]
    );
}

async fn claim_only_if_due(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    schedule(&store, ids[0], t0() + secs(60)).await;
    let claim = |id, owner: &'static str, only_if_due| {
        let store = store.clone();
        async move {
            store
                .claim(
                    id,
                    owner,
                    t0() + secs(1),
                    Duration::from_secs(30),
                    only_if_due,
                )
                .await
                .expect("claim")
        }
    };
    assert!(claim(ids[0], "w1", true).await.is_none(), "not due yet");
    let forced = claim(ids[0], "w1", false)
        .await
        .expect("sync-once claims anyway");
    assert_eq!(forced.lease_owner.as_deref(), Some("w1"));
    assert_eq!(forced.lease_until, Some(t0() + secs(31)));
    // Disabled: never claimed as due.
    register(&store, &[("a", "ann")]).await;
    assert!(claim(ids[1], "w2", true).await.is_none(), "disabled");
}

/// One statement claims several mailboxes: each one free (and due, when asked) is leased to
/// its own job, the batch's name followed by its id, with its sync request cleared; the ones
/// leased, not due or disabled are left.
async fn claim_many_leases_each_free_mailbox_to_its_own_job(store: Store) {
    let ids = register(
        &store,
        &[
            ("a", "ann"),
            ("a", "bob"),
            ("b", "cat"),
            ("b", "dan"),
            ("b", "eve"),
        ],
    )
    .await;
    let (requested, held, later, disabled) = (ids[0], ids[2], ids[3], ids[4]);
    store
        .request_sync(requested, t0())
        .await
        .expect("request")
        .expect("known mailbox");
    lease(&store, held, "another-job", t0()).await;
    schedule(&store, later, t0() + secs(60)).await;
    // eve is no longer configured.
    register(
        &store,
        &[("a", "ann"), ("a", "bob"), ("b", "cat"), ("b", "dan")],
    )
    .await;
    let now = t0() + secs(1);
    let claim = |owner: &'static str, only_if_due| {
        let (store, ids) = (store.clone(), ids.clone());
        async move {
            let mut claimed = store
                .claim_many(&ids, owner, now, Duration::from_secs(30), only_if_due)
                .await
                .expect("claim_many");
            claimed.sort_by_key(|m| m.id);
            claimed
        }
    };
    let claimed = claim("replica/1:", true).await;
    let got: Vec<(MailboxId, Option<String>, Option<DateTime<Utc>>)> = claimed
        .iter()
        .map(|m| (m.id, m.lease_owner.clone(), m.lease_until))
        .collect();
    let leased = |id: MailboxId| (id, Some(format!("replica/1:{id}")), Some(now + secs(30)));
    assert_eq!(got, vec![leased(ids[0]), leased(ids[1])]);
    assert_eq!(claimed[0].sync_requested_at, None, "the request is served");
    assert_eq!(
        record_of(&store, requested).await.lease_owner,
        Some(format!("replica/1:{requested}"))
    );
    assert_eq!(
        record_of(&store, held).await.lease_owner.as_deref(),
        Some("another-job"),
        "a held lease is left"
    );
    assert!(
        claim("replica/2:", true).await.is_empty(),
        "nothing left due"
    );
    // sync-once claims whatever is free, due or not, disabled or not.
    let forced: Vec<MailboxId> = claim("replica/3:", false)
        .await
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(forced, vec![later, disabled]);
    assert!(store
        .claim_many(&[], "replica/4:", now, Duration::from_secs(30), false)
        .await
        .expect("an empty batch")
        .is_empty());
}

/// Replicas claiming the same mailboxes in batches at once: each mailbox goes to exactly one
/// of them, and every mailbox to one.
async fn racing_batch_claims_share_out_every_mailbox_once(store: Store) {
    let ids = register_numbered(&store, 24).await;
    let mut racers = tokio::task::JoinSet::new();
    for replica in 0..4 {
        let (store, mut ids) = (store.clone(), ids.clone());
        // Each replica in its own order, so that their claims cross.
        ids.rotate_left(replica * 5);
        racers.spawn(async move {
            let prefix = format!("replica-{replica}:");
            let mut won = Vec::new();
            for batch in ids.chunks(8) {
                let claimed = store
                    .claim_many(batch, &prefix, t0(), Duration::from_secs(60), true)
                    .await
                    .expect("claim_many");
                for m in claimed {
                    assert_eq!(m.lease_owner, Some(format!("{prefix}{}", m.id)));
                    won.push(m.id);
                }
            }
            won
        });
    }
    let mut winners: HashMap<MailboxId, usize> = HashMap::new();
    while let Some(done) = racers.join_next().await {
        for id in done.expect("racer") {
            *winners.entry(id).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(winners.get(id), Some(&1), "mailbox {id}: {winners:?}");
    }
}

/// Jobs that end at the same time (committed together on SQLite) each land on their own
/// mailbox, fenced on their own lease, with their own run in the history.
async fn jobs_ending_together_each_land_on_their_own_mailbox(store: Store) {
    let ids = register_numbered(&store, 12).await;
    let mut leases = Vec::new();
    for &id in &ids {
        leases.push(lease(&store, id, &format!("job-{id}"), t0()).await);
    }
    // The last job lost its lease to another before it ended.
    let stale = leases.pop().expect("twelve");
    let taker = Lease {
        mailbox: stale.mailbox,
        owner: "taker".into(),
    };
    store
        .claim(
            taker.mailbox,
            &taker.owner,
            t0() + secs(61),
            Duration::from_secs(60),
            false,
        )
        .await
        .expect("claim")
        .expect("the lease ran out");
    let outcome = |i: usize| {
        if i % 3 == 0 {
            RunOutcome::Failed
        } else {
            RunOutcome::Ok
        }
    };
    let mut ending = tokio::task::JoinSet::new();
    for (i, lease) in leases.iter().cloned().chain([stale.clone()]).enumerate() {
        let store = store.clone();
        let job = job(
            outcome(i),
            t0() + secs(i as i64),
            t0() + secs(600 + i as i64),
        );
        ending.spawn(async move { store.finish_job(&lease, &job).await });
    }
    while let Some(done) = ending.join_next().await {
        done.expect("ends").expect("finish_job");
    }
    for (i, lease) in leases.iter().enumerate() {
        let m = record_of(&store, lease.mailbox).await;
        assert_eq!(
            (m.lease_owner, m.next_run_at, m.last_attempt_at),
            (
                None,
                t0() + secs(600 + i as i64),
                Some(t0() + secs(i as i64))
            ),
            "mailbox {i}"
        );
        assert_eq!(
            m.consecutive_failures,
            u32::from(outcome(i) == RunOutcome::Failed)
        );
        let runs = store.runs(lease.mailbox, 10).await.expect("runs");
        assert_eq!(runs.len(), 1, "mailbox {i}: {runs:?}");
        assert_eq!(runs[0].started_at, t0() + secs(i as i64));
    }
    let m = record_of(&store, stale.mailbox).await;
    assert_eq!(
        (m.lease_owner.as_deref(), m.last_attempt_at),
        (Some("taker"), None),
        "the stale job's end did not land on the mailbox"
    );
}

async fn racing_claims_have_exactly_one_winner(store: Store) {
    let ids = register(
        &store,
        &[("a", "m1"), ("a", "m2"), ("b", "m3"), ("b", "m4")],
    )
    .await;
    for round in 0..5 {
        let now = t0() + secs(1000 * round);
        let mut racers = tokio::task::JoinSet::new();
        for &id in &ids {
            for replica in 0..6 {
                let store = store.clone();
                let owner = format!("replica-{replica}/round-{round}");
                racers.spawn(async move {
                    let won = store
                        .claim(id, &owner, now, Duration::from_secs(60), true)
                        .await
                        .expect("claim");
                    (id, owner, won)
                });
            }
        }
        let mut winners: HashMap<MailboxId, Vec<String>> = HashMap::new();
        while let Some(done) = racers.join_next().await {
            let (id, owner, won) = done.expect("racer");
            if let Some(record) = won {
                assert_eq!(record.lease_owner.as_deref(), Some(owner.as_str()));
                winners.entry(id).or_default().push(owner);
            }
        }
        for &id in &ids {
            let won = winners.get(&id).cloned().unwrap_or_default();
            assert_eq!(won.len(), 1, "round {round}, mailbox {id}: winners {won:?}");
            assert_eq!(
                record_of(&store, id).await.lease_owner,
                Some(won[0].clone())
            );
            let lease = Lease {
                mailbox: id,
                owner: won[0].clone(),
            };
            store
                .finish_job(&lease, &job(RunOutcome::Ok, now, now + secs(500)))
                .await
                .expect("finish");
        }
    }
}

async fn lease_expires_and_renewal_extends_it(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await; // until t0 + 60s
    let try_claim = |owner: &'static str, at| {
        let store = store.clone();
        async move {
            store
                .claim(id, owner, at, Duration::from_secs(60), false)
                .await
                .expect("claim")
        }
    };
    assert!(
        try_claim("b", t0() + secs(30)).await.is_none(),
        "live lease"
    );
    assert!(
        try_claim("b", t0() + secs(60)).await.is_none(),
        "live to its last instant"
    );
    assert!(store
        .renew_lease(&a, t0() + secs(120))
        .await
        .expect("renew"));
    assert_eq!(
        record_of(&store, id).await.lease_until,
        Some(t0() + secs(120))
    );
    assert!(try_claim("b", t0() + secs(90)).await.is_none(), "renewed");
    let taken = try_claim("b", t0() + secs(121))
        .await
        .expect("expired lease is taken over");
    assert_eq!(taken.lease_owner.as_deref(), Some("b"));

    // The old owner finds out: its renewal fails and its end of job leaves b's lease alone.
    assert!(!store
        .renew_lease(&a, t0() + secs(180))
        .await
        .expect("renew"));
    store
        .finish_job(&a, &job(RunOutcome::Ok, t0(), t0() + secs(999)))
        .await
        .expect("finish");
    let now = record_of(&store, id).await;
    assert_eq!(now.lease_owner.as_deref(), Some("b"));
    assert_eq!(now.lease_until, Some(t0() + secs(181)));
    assert_eq!(
        now.next_run_at,
        t0(),
        "the old owner's schedule is not applied"
    );
}

async fn stale_leases_are_released_at_start_only_on_sqlite(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    lease(&store, id, "another-process", t0()).await;
    let released = store.release_stale_leases().await.expect("release");
    let owner = record_of(&store, id).await.lease_owner;
    match store.backend() {
        Backend::Sqlite => assert_eq!((released, owner), (1, None)),
        // Other replicas hold live leases in a shared database.
        Backend::Postgres => assert_eq!((released, owner.as_deref()), (0, Some("another-process"))),
    }
}

/// The replica registry: a heartbeat creates or updates the row with its promise; a row is
/// live while its heartbeat is within the lease; a clean stop removes it; dead rows are
/// forgotten; on SQLite the rows of an earlier process are removed at start.
async fn replicas_heartbeat_run_out_leave_and_are_forgotten(store: Store) {
    let lease = secs(30);
    store
        .replica_heartbeat("r1", t0(), t0(), None)
        .await
        .expect("r1 joins");
    store
        .replica_heartbeat("r2", t0(), t0() + secs(10), Some(2))
        .await
        .expect("r2 joins");
    let live = store
        .live_replicas(t0() + secs(5) - lease)
        .await
        .expect("reads");
    let seen: Vec<(&str, Option<u32>)> = live
        .iter()
        .map(|r| (r.replica_id.as_str(), r.keeps_share_of))
        .collect();
    assert_eq!(seen, [("r1", None), ("r2", Some(2))]);
    assert_eq!(live[1].heartbeat_at, t0() + secs(10));
    assert_eq!(live[1].started_at, t0());

    // r1 heartbeats with a new promise; its start stays.
    store
        .replica_heartbeat("r1", t0() + secs(99), t0() + secs(20), Some(3))
        .await
        .expect("r1 beats");
    // At t0 + 45 s r2's heartbeat (t0 + 10 s) is older than the lease: it is dead.
    let live = store
        .live_replicas(t0() + secs(45) - lease)
        .await
        .expect("reads");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        (live[0].replica_id.as_str(), live[0].keeps_share_of),
        ("r1", Some(3))
    );
    assert_eq!(live[0].started_at, t0());

    assert_eq!(
        store
            .forget_replicas(t0() + secs(15))
            .await
            .expect("forget"),
        1
    );
    assert!(store.remove_replica("r1").await.expect("leaves"));
    assert!(!store.remove_replica("r1").await.expect("already gone"));
    assert!(store
        .live_replicas(t0() - secs(3600))
        .await
        .expect("reads")
        .is_empty());

    store
        .replica_heartbeat("r3", t0(), t0(), Some(1))
        .await
        .expect("r3 joins");
    store.release_stale_leases().await.expect("release");
    let left = store
        .live_replicas(t0() - secs(3600))
        .await
        .expect("reads")
        .len();
    match store.backend() {
        // One process per SQLite file: an earlier process's row is a dead one's.
        Backend::Sqlite => assert_eq!(left, 0),
        Backend::Postgres => assert_eq!(left, 1),
    }
}

async fn stale_owners_page_is_refused_and_nothing_written(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    let page1 = [upsert("e1", "one", t0()), upsert("e2", "two", t0())];
    store
        .apply_page(&a, &cursor, PageWrite::items(&page1), &next("p2"), t0())
        .await
        .expect("page 1");
    let cursor = Cursor {
        next_link: Some("https://graph.example/next/p2".into()),
        ..cursor
    };

    // a's lease runs out and b takes the mailbox over.
    let b_view = store
        .claim(id, "b", t0() + secs(61), Duration::from_secs(60), false)
        .await
        .expect("claim")
        .expect("taken over");
    assert_eq!(
        b_view.cursor, cursor,
        "b resumes where a's last commit left it"
    );

    let before = store.events(id).await.expect("events");
    let page2 = [
        upsert("e3", "three", t0()),
        upsert("e1", "changed", t0()),
        removed("e2"),
    ];
    assert!(is_lease_lost(
        store
            .apply_page(&a, &cursor, PageWrite::items(&page2), &delta("d1"), t0())
            .await
    ));
    assert_eq!(
        store.events(id).await.expect("events"),
        before,
        "nothing written"
    );
    assert_eq!(record_of(&store, id).await.cursor, cursor, "cursor unmoved");
    assert!(is_lease_lost(store.start_full_round(&a, &window()).await));
    assert_eq!(record_of(&store, id).await.cursor, cursor);

    // The new owner carries on.
    let b = Lease {
        mailbox: id,
        owner: "b".into(),
    };
    let applied = store
        .apply_page(&b, &cursor, PageWrite::items(&page2), &delta("d1"), t0())
        .await
        .expect("b's page");
    assert_eq!((applied.upserted, applied.deleted), (2, 1));
    assert_eq!(event_ids(&store, id).await, set(&["e1", "e3"]));
}

async fn stale_round_is_refused(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let old = full_round(&store, &a).await;
    let new = full_round(&store, &a).await;
    assert_eq!(new.round_id, old.round_id + 1);
    let page = [upsert("e1", "one", t0())];
    assert!(is_lease_lost(
        store
            .apply_page(&a, &old, PageWrite::items(&page), &next("p2"), t0())
            .await
    ));
    assert!(event_ids(&store, id).await.is_empty());
    store
        .apply_page(&a, &new, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("current round");
    assert_eq!(event_ids(&store, id).await, set(&["e1"]));
}

/// A page with nothing in it (an idle round's) writes only the cursor, and is refused like any
/// other page to an owner that lost the lease or a round that is over.
async fn an_empty_page_moves_only_the_cursor_and_is_fenced(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    let page = [upsert("e1", "one", t0())];
    store
        .apply_page(&a, &cursor, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("page 1");
    // The full round ends with an empty page: it still reconciles (e1 was seen, so it stays).
    let applied = store
        .apply_page(&a, &cursor, PageWrite::default(), &delta("d1"), t0())
        .await
        .expect("last page");
    assert_eq!((applied.upserted, applied.deleted), (0, 0));
    let after_full = record_of(&store, id).await.cursor;
    assert_eq!(
        (
            after_full.full,
            after_full.next_link.as_deref(),
            after_full.delta_link.as_deref()
        ),
        (false, None, Some("https://graph.example/delta/d1"))
    );
    assert_eq!(event_ids(&store, id).await, set(&["e1"]));

    // An incremental round of empty pages: a nextLink, then a deltaLink.
    let incremental = Cursor {
        full: false,
        ..after_full.clone()
    };
    store
        .apply_page(&a, &incremental, PageWrite::default(), &next("i2"), t0())
        .await
        .expect("empty next page");
    let moved = record_of(&store, id).await.cursor;
    assert_eq!(
        (
            moved.full,
            moved.next_link.as_deref(),
            moved.delta_link.as_deref()
        ),
        (
            false,
            Some("https://graph.example/next/i2"),
            Some("https://graph.example/delta/d1")
        )
    );

    // Refused to an owner whose lease was taken over and to a round that is over.
    store
        .claim(id, "b", t0() + secs(61), Duration::from_secs(60), false)
        .await
        .expect("claim")
        .expect("taken over");
    assert!(is_lease_lost(
        store
            .apply_page(
                &a,
                &incremental,
                PageWrite::default(),
                &delta("stale"),
                t0()
            )
            .await
    ));
    let b = Lease {
        mailbox: id,
        owner: "b".into(),
    };
    let old_round = Cursor {
        round_id: incremental.round_id - 1,
        ..incremental.clone()
    };
    assert!(is_lease_lost(
        store
            .apply_page(&b, &old_round, PageWrite::default(), &delta("stale"), t0())
            .await
    ));
    assert_eq!(record_of(&store, id).await.cursor, moved, "cursor unmoved");
    store
        .apply_page(&b, &incremental, PageWrite::default(), &delta("d2"), t0())
        .await
        .expect("the new owner's empty last page");
    let done = record_of(&store, id).await.cursor;
    assert_eq!(
        (done.next_link.as_deref(), done.delta_link.as_deref()),
        (None, Some("https://graph.example/delta/d2"))
    );
    assert_eq!(event_ids(&store, id).await, set(&["e1"]));
}

/// An idle round's cursor is written by `finish_job` with the job's record: the deltaLink, the
/// nextLink cleared and the failing-page count reset, only while the lease is held and only in
/// the round it ended.
async fn an_idle_rounds_cursor_ends_with_its_job_and_is_fenced(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    let a = lease(&store, id, "a", at(0)).await;
    let cursor = full_round(&store, &a).await;
    store
        .apply_page(&a, &cursor, PageWrite::default(), &delta("d1"), at(0))
        .await
        .expect("the full round's last page");
    let idle = |round_id: i64, link: &str, started, next_run_at| JobRecord {
        round_end: Some(RoundEnd {
            round_id,
            delta_link: format!("https://graph.example/delta/{link}"),
        }),
        ..job(RunOutcome::Ok, started, next_run_at)
    };
    store
        .finish_job(&a, &idle(cursor.round_id, "d2", at(0), at(300)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!(
        (m.cursor.full, m.cursor.next_link, m.cursor.delta_link),
        (false, None, Some("https://graph.example/delta/d2".into()))
    );
    assert_eq!((m.lease_owner, m.next_run_at), (None, at(300)));
    assert_eq!(m.last_success_at, Some(at(2)));

    // A job that lost its lease to b writes neither the cursor nor the mailbox's record.
    let stale = lease(&store, id, "stale", at(10)).await;
    let b = lease(&store, id, "b", at(71)).await;
    store
        .finish_job(&stale, &idle(cursor.round_id, "stale", at(10), at(900)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!(
        m.cursor.delta_link.as_deref(),
        Some("https://graph.example/delta/d2"),
        "cursor unmoved"
    );
    assert_eq!(m.lease_owner.as_deref(), Some("b"), "b's lease kept");
    assert_eq!(
        (m.next_run_at, m.last_success_at),
        (at(300), Some(at(2))),
        "the stale job's record did not land on the mailbox"
    );

    // The holder's job in another round than the one the cursor is in records its end, but
    // leaves the cursor (and the failing-page count) as they are.
    assert_eq!(
        store.note_page_failure(&b, "sig", 5).await.expect("note"),
        (1, false)
    );
    store
        .finish_job(&b, &idle(cursor.round_id - 1, "old", at(71), at(400)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!(
        m.cursor.delta_link.as_deref(),
        Some("https://graph.example/delta/d2")
    );
    assert_eq!((m.lease_owner, m.next_run_at), (None, at(400)));
    let c = lease(&store, id, "c", at(80)).await;
    assert_eq!(
        store.note_page_failure(&c, "sig", 5).await.expect("note"),
        (2, false),
        "count kept"
    );
    // Its round's end resets the count with the cursor.
    store
        .finish_job(&c, &idle(cursor.round_id, "d3", at(80), at(500)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!(
        (m.cursor.next_link, m.cursor.delta_link),
        (None, Some("https://graph.example/delta/d3".into()))
    );
    let d = lease(&store, id, "d", at(90)).await;
    assert_eq!(
        store.note_page_failure(&d, "sig", 5).await.expect("note"),
        (1, false),
        "count reset"
    );
}

/// Replica A writes large pages as fast as it can while replica B takes the mailbox over:
/// once B's claim has returned, none of A's pages may commit, and B's claim must have seen the
/// cursor of A's last committed page. (Without the row lock in `apply_page`, a page whose fence
/// check passed just before the takeover would commit after it.)
async fn no_write_of_the_old_owner_lands_after_a_takeover(store: Store) {
    let ids = register(&store, &[("a", "m0"), ("a", "m1"), ("a", "m2")]).await;
    for (attempt, id) in (0..).zip(ids) {
        let owner = format!("a{attempt}");
        let a = lease(&store, id, &owner, t0()).await;
        let cursor = full_round(&store, &a).await;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut committed = Vec::new();
                for page in 0..1000 {
                    let items: Vec<DeltaItem> = (0..100)
                        .map(|k| upsert(&format!("{owner}-{page}-{k}"), "x", t0()))
                        .collect();
                    let link = next(&format!("{owner}-{page}"));
                    match store
                        .apply_page(&a, &cursor, PageWrite::items(items.clone()), &link, t0())
                        .await
                    {
                        Ok(_) => committed.push(page),
                        Err(StoreError::LeaseLost(_)) => return committed,
                        Err(e) => panic!("page {page}: {e}"),
                    }
                }
                committed
            })
        };
        // Let A commit a few pages, then take over mid-write.
        while store
            .event_counts()
            .await
            .expect("counts")
            .get(&id)
            .copied()
            .unwrap_or(0)
            < 200
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let thief = format!("b{attempt}");
        // PostgreSQL skips a row locked by a page in progress instead of waiting: try again.
        let at_takeover = loop {
            let claimed = store
                .claim(id, &thief, t0() + secs(500), Duration::from_secs(60), false)
                .await
                .expect("claim");
            match claimed {
                Some(record) => break record,
                None => tokio::task::yield_now().await,
            }
        };
        let seen = event_ids(&store, id).await;
        let committed = writer.await.expect("writer");
        assert!(!committed.is_empty());
        assert_eq!(
            event_ids(&store, id).await,
            seen,
            "a page of the old owner landed late"
        );
        let last = committed.last().copied().unwrap_or_default();
        assert_eq!(
            at_takeover.cursor.next_link,
            Some(format!("https://graph.example/next/a{attempt}-{last}")),
            "the takeover saw the last committed page"
        );
        assert_eq!(
            seen.len(),
            committed.len() * 100,
            "each page all or nothing"
        );
        let b = Lease {
            mailbox: id,
            owner: thief,
        };
        store
            .finish_job(&b, &job(RunOutcome::Ok, t0(), t0()))
            .await
            .expect("finish");
    }
}

async fn upserts_are_idempotent(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    let mut all_day = event("day", "holiday", t0());
    all_day.is_all_day = true;
    all_day.start_date = Some(t0().date_naive());
    all_day.end_date = t0().date_naive().succ_opt();
    let page = vec![
        upsert("e1", "one", t0() + secs(3600)),
        DeltaItem::Upsert(Box::new(all_day.clone())),
        upsert("e2", "two", t0()),
    ];
    for _ in 0..2 {
        let applied = store
            .apply_page(
                &a,
                &cursor,
                PageWrite::items(page.clone()),
                &next("p2"),
                t0(),
            )
            .await
            .expect("page (replayed after a crash the second time)");
        assert_eq!(applied.upserted, 3);
    }
    let stored = store.events(id).await.expect("events");
    assert_eq!(stored.len(), 3);
    let day = stored
        .iter()
        .find(|e| e.id == "day")
        .expect("all-day event");
    assert_eq!(
        (day.start_date, day.end_date, day.is_all_day),
        (all_day.start_date, all_day.end_date, true)
    );
    assert_eq!(day.raw, all_day.raw);
    assert_eq!(day.organizer_address.as_deref(), Some("org@contoso.com"));
    assert_eq!(
        stored.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["day", "e2", "e1"],
        "by start"
    );

    // A changed event (twice in one page, the later version wins) is updated in place.
    let page = [
        upsert("e1", "one v2", t0() + secs(7200)),
        upsert("e1", "one v3", t0() + secs(9000)),
    ];
    store
        .apply_page(&a, &cursor, PageWrite::items(&page), &next("p3"), t0())
        .await
        .expect("changes");
    let stored = store.events(id).await.expect("events");
    assert_eq!(stored.len(), 3);
    let e1 = stored.iter().find(|e| e.id == "e1").expect("e1");
    assert_eq!(e1.subject.as_deref(), Some("one v3"));
    assert_eq!(e1.change_key.as_deref(), Some("ck-one v3"));
    assert_eq!(
        (e1.start_utc, e1.end_utc),
        (t0() + secs(9000), t0() + secs(10800))
    );
}

async fn a_page_applies_its_items_in_order(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let l = lease(&store, id, "w", t0()).await;
    let cursor = full_round(&store, &l).await;
    store
        .apply_page(
            &l,
            &cursor,
            PageWrite::items(&[upsert("back", "v1", t0())]),
            &next("p2"),
            t0(),
        )
        .await
        .expect("page 1");
    let page = [
        upsert("gone", "v1", t0()),
        upsert("kept", "v1", t0()),
        removed("gone"),
        removed("back"),
        upsert("back", "v2", t0()),
        upsert("kept", "v2", t0()),
        removed("never-seen"),
        upsert("last", "v1", t0()),
    ];
    let applied = store
        .apply_page(&l, &cursor, PageWrite::items(&page), &next("p3"), t0())
        .await
        .expect("page 2");
    assert_eq!((applied.upserted, applied.deleted), (5, 2));
    let stored: Vec<(String, Option<String>)> = store
        .events(id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.id, e.subject))
        .collect();
    let want = |id: &str, v: &str| (id.to_string(), Some(v.to_string()));
    assert_eq!(
        stored,
        [want("back", "v2"), want("kept", "v2"), want("last", "v1")]
    );
}

/// Ids met several times in one page, against stored events inside and outside the window: the
/// result and the counts are those of applying the items one by one.
async fn repeated_ids_in_a_page_end_as_applied_in_order(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    let outside = window().end + chrono::Duration::days(2);
    let stored = [
        upsert("y", "v1", t0()),
        upsert("z", "v1", t0()),
        upsert("w", "v1", outside),
    ];
    store
        .apply_page(&a, &cursor, PageWrite::items(&stored), &next("p1"), t0())
        .await
        .expect("page 1");
    let page = [
        // Upserted outside the window, then removed: Graph's removal does not delete it.
        upsert("x", "v1", outside),
        removed("x"),
        // The stored one removed (1), the new one too (1).
        removed("y"),
        upsert("y", "v2", t0()),
        removed("y"),
        // The stored one removed (1), then back.
        removed("z"),
        upsert("z", "v2", t0()),
        // The stored one (outside) replaced by one inside, which is removed (1).
        upsert("w", "v2", t0()),
        removed("w"),
        // Removed inside (1), back outside, whose removal keeps it.
        upsert("v", "a", t0()),
        removed("v"),
        upsert("v", "b", outside),
        removed("v"),
    ];
    let applied = store
        .apply_page(&a, &cursor, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("page 2");
    assert_eq!((applied.upserted, applied.deleted), (6, 5));
    let stored: Vec<(String, Option<String>)> = store
        .events(id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.id, e.subject))
        .collect();
    let want = |id: &str, v: &str| (id.to_string(), Some(v.to_string()));
    assert_eq!(stored, [want("z", "v2"), want("v", "b"), want("x", "v1")]);
}

fn rejected(id: &str) -> calsync::graph::model::RejectedItem {
    calsync::graph::model::RejectedItem {
        id: Some(id.to_string()),
        raw: json!({"id": id, "start": "not a time"}).to_string(),
        reason: "start: not a time".into(),
    }
}

fn masters(events: &[&Event]) -> Vec<MasterWrite> {
    events
        .iter()
        .map(|m| MasterWrite {
            master: (*m).clone(),
            refill_occurrences: true,
        })
        .collect()
}

async fn quarantine_keys(store: &Store, id: MailboxId) -> BTreeSet<String> {
    store
        .quarantined(id, 100)
        .await
        .expect("quarantine")
        .into_iter()
        .map(|q| q.item_key)
        .collect()
}

async fn master_ids(store: &Store, id: MailboxId, of: &[&str]) -> BTreeSet<String> {
    store
        .series_masters(id, of)
        .await
        .expect("masters")
        .into_keys()
        .collect()
}

/// A page that sends an item calsync cannot understand and, later, the same item as an event
/// it can: the event is stored and the item does not stay in quarantine, also on a mailbox
/// that had nothing in quarantine before the page. A page that only rejects keeps its item.
async fn an_item_understood_later_in_its_page_leaves_quarantine(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    let marker = round.round_marker();
    let items = [upsert("q1", "understood now", t0())];
    store
        .apply_page(
            &a,
            &round,
            PageWrite {
                items: items.to_vec(),
                masters: &[],
                gone_series: &[],
                round: &marker,
                quarantined: &[rejected("q1")],
            },
            &next("p1"),
            t0(),
        )
        .await
        .expect("page 1");
    assert_eq!(event_ids(&store, id).await, set(&["q1"]));
    assert_eq!(quarantine_keys(&store, id).await, set(&[]));

    store
        .apply_page(
            &a,
            &round,
            PageWrite {
                items: Vec::new(),
                masters: &[],
                gone_series: &[],
                round: &marker,
                quarantined: &[rejected("q2")],
            },
            &next("p2"),
            t0(),
        )
        .await
        .expect("page 2");
    assert_eq!(quarantine_keys(&store, id).await, set(&["q2"]));
}

/// The page that ends a full round, with removals, upserts and a removed master beside the
/// reconciliation: events, masters and quarantine end as if the items were applied one by one
/// and the round reconciled after them.
async fn a_round_ending_page_reconciles_what_it_leaves(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let outside = window().end + chrono::Duration::days(2);
    let [m1, m2, m3, m4, m5] =
        ["M1", "M2", "M3", "M4", "M5"].map(|m| master(m, &format!("series {m}"), "ck", false));

    let round1 = full_round(&store, &a).await;
    let items = [
        upsert("z", "v1", t0()),
        upsert("x", "v1", outside),
        upsert("v", "v1", t0()),
        upsert("old", "v1", outside),
        occurrence("m4-a", "M4", &m4, t0()),
    ];
    let marker = round1.round_marker();
    store
        .apply_page(
            &a,
            &round1,
            PageWrite {
                items: items.to_vec(),
                masters: &masters(&[&m4]),
                gone_series: &[],
                round: &marker,
                quarantined: &[rejected("q1"), rejected("q2")],
            },
            &next("p1"),
            t0(),
        )
        .await
        .expect("round 1");

    let round2 = full_round(&store, &a).await;
    let items = [
        upsert("z", "v2", t0()),
        occurrence("m1-a", "M1", &m1, t0()),
        occurrence("m2-a", "M2", &m2, t0()),
        occurrence("m5-a", "M5", &m5, t0()),
    ];
    let marker = round2.round_marker();
    store
        .apply_page(
            &a,
            &round2,
            PageWrite {
                items: items.to_vec(),
                masters: &masters(&[&m1, &m2, &m3, &m5]),
                gone_series: &[],
                round: &marker,
                quarantined: &[rejected("q3")],
            },
            &next("r2-p1"),
            t0(),
        )
        .await
        .expect("round 2, page 1");
    let last = [
        removed("x"),
        upsert("v", "v2", t0()),
        removed("z"),
        removed("m1-a"),
        occurrence("m3-a", "M3", &m3, t0()),
        removed("M5"),
        upsert("q2", "understood now", t0()),
    ];
    let applied = store
        .apply_page(&a, &round2, PageWrite::items(&last), &delta("d2"), t0())
        .await
        .expect("round 2, last page");
    // Removed inside the window: z, m1-a; not returned by the round: old, m4-a and x (whose
    // removal, outside the window, kept it).
    assert_eq!((applied.upserted, applied.deleted), (3, 5));
    assert_eq!(
        event_ids(&store, id).await,
        set(&["m2-a", "m3-a", "m5-a", "q2", "v"])
    );
    // M1 and M4 have no event left, M5 was removed; M3's only event came in the last page.
    assert_eq!(
        master_ids(&store, id, &["M1", "M2", "M3", "M4", "M5"]).await,
        set(&["M2", "M3"])
    );
    assert_eq!(quarantine_keys(&store, id).await, set(&["q3"]));
    let cursor = record_of(&store, id).await.cursor;
    assert!(!cursor.full);
    assert_eq!(
        cursor.delta_link.as_deref(),
        Some("https://graph.example/delta/d2")
    );
    assert_eq!(cursor.next_link, None);
}

/// Once another owner has the mailbox, no page of the old one writes anything, whatever it
/// carries: items, masters, gone series, quarantine, or the end of a full round.
async fn a_page_of_a_lost_lease_changes_nothing(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    let m1 = master("M1", "Weekly", "ck1", false);
    let items = [
        upsert("e1", "one", t0()),
        upsert("e2", "two", t0()),
        occurrence("o1", "M1", &m1, t0()),
    ];
    let marker = round.round_marker();
    store
        .apply_page(
            &a,
            &round,
            PageWrite {
                items: items.to_vec(),
                masters: &masters(&[&m1]),
                gone_series: &[],
                round: &marker,
                quarantined: &[rejected("q1")],
            },
            &next("p1"),
            t0(),
        )
        .await
        .expect("page 1");
    let cursor = record_of(&store, id).await.cursor;
    store
        .claim(id, "b", t0() + secs(61), Duration::from_secs(60), false)
        .await
        .expect("claim")
        .expect("taken over");
    let before = (
        store.events(id).await.expect("events"),
        store
            .series_masters(id, &["M1", "M2"])
            .await
            .expect("masters"),
        store.quarantined(id, 100).await.expect("quarantine"),
        record_of(&store, id).await.cursor,
    );
    let m2 = master("M2", "Daily", "ck2", false);
    let changed_m1 = master("M1", "Weekly (renamed)", "ck9", true);
    let pages = [
        // A plain page that would end the round: reconcile, remove, leave quarantine.
        PageWrite {
            items: vec![
                upsert("e3", "three", t0()),
                removed("e1"),
                removed("M1"),
                upsert("q1", "understood now", t0()),
            ],
            ..PageWrite::default()
        },
        // One with every rare part.
        PageWrite {
            items: vec![upsert("e1", "changed", t0()), removed("e2")],
            masters: &masters(&[&m2, &changed_m1]),
            gone_series: &["M1".to_string()],
            round: &marker,
            quarantined: &[rejected("q2")],
        },
    ];
    for page in &pages {
        for link in [delta("d1"), next("p2")] {
            assert!(is_lease_lost(
                store
                    .apply_page(&a, &cursor, page.clone(), &link, t0())
                    .await
            ));
            let after = (
                store.events(id).await.expect("events"),
                store
                    .series_masters(id, &["M1", "M2"])
                    .await
                    .expect("masters"),
                store.quarantined(id, 100).await.expect("quarantine"),
                record_of(&store, id).await.cursor,
            );
            assert_eq!(after, before, "nothing written");
        }
    }
}

async fn removals_only_delete_inside_the_window(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    let w = window();
    let page = [
        upsert("inside", "in", t0()),
        upsert("before", "old", w.start - chrono::Duration::days(2)),
        upsert("after", "far", w.end + chrono::Duration::days(2)),
        upsert("edge", "straddles the start", w.start - secs(600)),
    ];
    store
        .apply_page(&a, &cursor, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("page");
    // Graph reports events leaving the window as removals too: only those held inside go.
    let page = [
        removed("inside"),
        removed("before"),
        removed("after"),
        removed("edge"),
        removed("never-seen"),
    ];
    let applied = store
        .apply_page(&a, &cursor, PageWrite::items(&page), &next("p3"), t0())
        .await
        .expect("removals");
    assert_eq!(applied.deleted, 2);
    assert_eq!(event_ids(&store, id).await, set(&["after", "before"]));
}

async fn full_round_reconciles_at_its_end_only(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round1 = full_round(&store, &a).await;
    let page = [
        upsert("e1", "1", t0()),
        upsert("e2", "2", t0()),
        upsert("e3", "3", t0()),
    ];
    store
        .apply_page(&a, &round1, PageWrite::items(&page), &delta("d1"), t0())
        .await
        .expect("round 1");

    // A full resync that no longer returns e2: it goes at the round's end, not before.
    let round2 = full_round(&store, &a).await;
    store
        .apply_page(
            &a,
            &round2,
            PageWrite::items(&[upsert("e1", "1", t0())]),
            &next("p2"),
            t0(),
        )
        .await
        .expect("round 2 page 1");
    assert_eq!(event_ids(&store, id).await, set(&["e1", "e2", "e3"]));
    let applied = store
        .apply_page(
            &a,
            &round2,
            PageWrite::items(&[upsert("e3", "3", t0())]),
            &delta("d2"),
            t0(),
        )
        .await
        .expect("round 2 page 2");
    assert_eq!((applied.upserted, applied.deleted), (1, 1));
    assert_eq!(event_ids(&store, id).await, set(&["e1", "e3"]));
    let cursor = record_of(&store, id).await.cursor;
    assert!(!cursor.full);

    // An incremental round only applies what it returns.
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite::items(&[upsert("e4", "4", t0())]),
            &delta("d3"),
            t0(),
        )
        .await
        .expect("incremental round");
    assert_eq!(event_ids(&store, id).await, set(&["e1", "e3", "e4"]));
}

async fn cursor_resumes_from_the_last_committed_page(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let cursor = full_round(&store, &a).await;
    assert_eq!(record_of(&store, id).await.cursor, cursor);
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite::items(&[upsert("e1", "1", t0())]),
            &next("p2"),
            t0(),
        )
        .await
        .expect("page 1");
    // The process dies here: no finish_job. The next job, after the lease ran out:
    let resumed = store
        .claim(id, "b", t0() + secs(3600), Duration::from_secs(60), true)
        .await
        .expect("claim")
        .expect("due and expired");
    assert_eq!(
        resumed.cursor,
        Cursor {
            next_link: Some("https://graph.example/next/p2".into()),
            ..cursor.clone()
        }
    );
    let b = Lease {
        mailbox: id,
        owner: "b".into(),
    };
    store
        .apply_page(
            &b,
            &resumed.cursor,
            PageWrite::items(&[upsert("e2", "2", t0())]),
            &delta("d1"),
            t0(),
        )
        .await
        .expect("page 2");
    assert_eq!(
        record_of(&store, id).await.cursor,
        Cursor {
            round_id: cursor.round_id,
            full: false,
            window: Some(window()),
            next_link: None,
            delta_link: Some("https://graph.example/delta/d1".into()),
        }
    );
    assert_eq!(event_ids(&store, id).await, set(&["e1", "e2"]));
}

async fn finish_job_records_each_outcome(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let mut at = t0();
    let mut run = |outcome: RunOutcome, request_id: Option<&str>| {
        at += secs(100);
        let store = store.clone();
        let request_id = request_id.map(str::to_string);
        let at = at;
        async move {
            let l = lease(&store, id, "w", at).await;
            let mut record = job(outcome, at, at + secs(50));
            record.request_id = request_id;
            record.pages = 3;
            record.upserted = 7;
            record.deleted = 2;
            record.full_round = outcome == RunOutcome::Ok;
            store.finish_job(&l, &record).await.expect("finish");
            (record_of(&store, id).await, at)
        }
    };
    let (m, at1) = run(RunOutcome::Ok, Some("req-1")).await;
    assert_eq!(m.consecutive_failures, 0);
    assert_eq!(m.last_success_at, Some(at1 + secs(2)));
    assert_eq!(m.last_attempt_at, Some(at1));
    assert_eq!(m.next_run_at, at1 + secs(50));
    assert_eq!((m.lease_owner, m.lease_until), (None, None));
    assert_eq!((m.last_error, m.last_error_at), (None, None));
    assert_eq!(m.last_request_id.as_deref(), Some("req-1"));

    let (m, at2) = run(RunOutcome::Failed, None).await;
    assert_eq!(m.consecutive_failures, 1);
    assert_eq!(m.last_error.as_deref(), Some("failed here"));
    assert_eq!(m.last_error_at, Some(at2 + secs(2)));
    assert_eq!(m.last_success_at, Some(at1 + secs(2)), "last success kept");
    assert_eq!(
        m.last_request_id.as_deref(),
        Some("req-1"),
        "kept when none is new"
    );

    let (m, _) = run(RunOutcome::DeadlineExceeded, Some("req-3")).await;
    assert_eq!(m.consecutive_failures, 2);
    assert_eq!(m.last_error.as_deref(), Some("deadline_exceeded here"));
    assert_eq!(m.last_request_id.as_deref(), Some("req-3"));

    // A deferral is not a failure of the mailbox: the count stays, the reason is shown.
    let (m, at4) = run(RunOutcome::Deferred, None).await;
    assert_eq!(m.consecutive_failures, 2);
    assert_eq!(m.last_error.as_deref(), Some("deferred here"));
    assert_eq!(m.last_error_at, Some(at4 + secs(2)));
    assert_eq!(m.next_run_at, at4 + secs(50));

    let (m, at5) = run(RunOutcome::Ok, None).await;
    assert_eq!(m.consecutive_failures, 0);
    assert_eq!(m.last_success_at, Some(at5 + secs(2)));

    let runs = store.runs(id, 10).await.expect("runs");
    let outcomes: Vec<&str> = runs.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["ok", "deferred", "deadline_exceeded", "failed", "ok"]
    );
    let first = &runs[4];
    assert_eq!((first.started_at, first.finished_at), (at1, at1 + secs(2)));
    assert_eq!(
        (first.full_round, first.pages, first.upserted, first.deleted),
        (true, 3, 7, 2)
    );
    assert_eq!(first.request_id.as_deref(), Some("req-1"));
    assert_eq!(runs[3].error.as_deref(), Some("failed here"));
    assert_eq!(store.runs(id, 2).await.expect("runs").len(), 2);
}

async fn run_history_is_pruned(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    for n in 0..(RUNS_KEPT_PER_MAILBOX + 10) {
        let l = lease(&store, ids[0], "w", t0()).await;
        let mut record = job(RunOutcome::Ok, t0() + secs(n), t0());
        record.pages = n as u64;
        store.finish_job(&l, &record).await.expect("finish");
    }
    let l = lease(&store, ids[1], "w", t0()).await;
    store
        .finish_job(&l, &job(RunOutcome::Failed, t0(), t0()))
        .await
        .expect("finish");
    let runs = store.runs(ids[0], 1000).await.expect("runs");
    let pages: Vec<i64> = runs.iter().map(|r| r.pages).collect();
    let expected: Vec<i64> = (10..RUNS_KEPT_PER_MAILBOX + 10).rev().collect();
    assert_eq!(pages, expected, "the newest are kept, newest first");
    assert_eq!(
        store.runs(ids[1], 1000).await.expect("runs").len(),
        1,
        "per mailbox"
    );
}

async fn event_counts_per_mailbox(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob"), ("b", "cat")]).await;
    assert!(store.event_counts().await.expect("counts").is_empty());
    for (id, n) in [(ids[0], 3), (ids[1], 1)] {
        let l = lease(&store, id, "w", t0()).await;
        let cursor = full_round(&store, &l).await;
        let items: Vec<DeltaItem> = (0..n)
            .map(|k| upsert(&format!("e{k}"), "x", t0()))
            .collect();
        store
            .apply_page(
                &l,
                &cursor,
                PageWrite::items(items.clone()),
                &delta("d"),
                t0(),
            )
            .await
            .expect("page");
    }
    let counts = store.event_counts().await.expect("counts");
    assert_eq!(counts, HashMap::from([(ids[0], 3), (ids[1], 1)]));
}

/// PostgreSQL text and jsonb cannot hold NUL, which Graph data and echoed error bodies can
/// contain; such a value must not fail its page (or the job's record) forever.
async fn nul_characters_do_not_poison_a_page_or_a_record(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let l = lease(&store, id, "w", t0()).await;
    let cursor = full_round(&store, &l).await;
    let mut e = event("e\u{0}1", "sub\u{0}ject", t0());
    e.attendees =
        Attendees::from_value(&json!([{"name": "B\u{0}ob", "address": "bob@contoso.com"}]));
    e.raw = json!({"id": "e\u{0}1", "subject": "sub\u{0}ject"}).to_string();
    let page = [DeltaItem::Upsert(Box::new(e))];
    store
        .apply_page(&l, &cursor, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("page with NULs");
    let stored = store.events(id).await.expect("events");
    assert_eq!(stored.len(), 1);
    let subject = stored[0].subject.as_deref().unwrap_or_default();
    assert_eq!(subject.replace('\0', "\u{FFFD}"), "sub\u{FFFD}ject");
    // The same id, NUL and all, removes it.
    store
        .apply_page(
            &l,
            &cursor,
            PageWrite::items(&[removed("e\u{0}1")]),
            &next("p3"),
            t0(),
        )
        .await
        .expect("removal");
    assert!(store.events(id).await.expect("events").is_empty());

    let mut record = job(RunOutcome::Failed, t0(), t0());
    record.error = Some("Graph said: bad\u{0}body".into());
    store
        .finish_job(&l, &record)
        .await
        .expect("record with a NUL");
    let m = record_of(&store, id).await;
    assert_eq!(m.consecutive_failures, 1);
    assert_eq!(m.lease_owner, None);
}

async fn mailboxes_are_registered_and_removed_at_run_time(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    let (added, is_new) = store
        .register_mailbox("b", "cat", t0() + secs(5))
        .await
        .expect("register");
    assert!(is_new);
    assert_eq!((added.source.as_str(), added.enabled), ("api", true));
    assert_eq!(added.next_run_at, t0() + secs(5), "due at once");
    let (again, is_new) = store
        .register_mailbox("b", "cat", t0() + secs(9))
        .await
        .expect("register again");
    assert!(!is_new);
    assert_eq!((again.id, again.next_run_at), (added.id, t0() + secs(5)));

    // A config reload leaves API mailboxes alone; re-registering a mailbox the config dropped
    // enables it again, due at once, and it is the API's from then on.
    register(&store, &[("a", "ann")]).await;
    assert!(!mailbox(&store, "a", "bob").await.enabled);
    assert!(mailbox(&store, "b", "cat").await.enabled);
    schedule(&store, ids[1], t0() + secs(3600)).await;
    let (bob, is_new) = store
        .register_mailbox("a", "bob", t0() + secs(20))
        .await
        .expect("re-enable");
    assert!(!is_new);
    assert_eq!(bob.id, ids[1]);
    assert_eq!((bob.source.as_str(), bob.enabled), ("api", true));
    assert_eq!(bob.next_run_at, t0() + secs(20));
    register(&store, &[("a", "ann")]).await;
    assert!(mailbox(&store, "a", "bob").await.enabled);

    // Removal takes events and history with it; a job still running on it writes nothing.
    let l = lease(&store, added.id, "w", t0()).await;
    let cursor = full_round(&store, &l).await;
    store
        .apply_page(
            &l,
            &cursor,
            PageWrite::items(&[upsert("e1", "1", t0())]),
            &next("p2"),
            t0(),
        )
        .await
        .expect("page");
    assert!(store.remove_mailbox(added.id).await.expect("remove"));
    assert!(!store.remove_mailbox(added.id).await.expect("remove again"));
    assert!(store.mailbox_by_id(added.id).await.expect("read").is_none());
    assert!(!store
        .event_counts()
        .await
        .expect("counts")
        .contains_key(&added.id));
    assert!(is_lease_lost(
        store
            .apply_page(
                &l,
                &cursor,
                PageWrite::items(&[upsert("e2", "2", t0())]),
                &next("p3"),
                t0()
            )
            .await
    ));
    store
        .finish_job(&l, &job(RunOutcome::Ok, t0(), t0()))
        .await
        .expect("the end of a job on a removed mailbox is not an error");
    assert!(store.runs(added.id, 10).await.expect("runs").is_empty());
    assert_eq!(
        store
            .mailbox_by_id(ids[0])
            .await
            .expect("read")
            .map(|m| m.user_id),
        Some("ann".to_string())
    );
}

async fn sync_requests_are_deduplicated_dispatched_first_and_survive_a_running_job(store: Store) {
    let ids = register(&store, &[("a", "m1"), ("a", "m2"), ("b", "m3")]).await;
    let (m1, m2, m3) = (ids[0], ids[1], ids[2]);
    schedule(&store, m2, t0() + secs(100)).await;
    let at = |n| t0() + secs(n);
    assert_eq!(
        store.request_sync(m2, at(10)).await.expect("request"),
        Some(true)
    );
    assert_eq!(
        store.request_sync(m2, at(11)).await.expect("request"),
        Some(false),
        "deduplicated"
    );
    assert_eq!(
        store.request_sync(9999, at(11)).await.expect("request"),
        None
    );
    let m = record_of(&store, m2).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (Some(at(10)), at(10)));

    // m1 has waited longer, but with one per tenant the requested m2 goes.
    let due = store.due_candidates(at(12), 1).await.expect("due");
    let picked: Vec<(MailboxId, bool)> = due.iter().map(|d| (d.id, d.requested)).collect();
    assert_eq!(picked, [(m2, true), (m3, false)]);
    let due = store.due_candidates(at(12), 5).await.expect("due");
    let picked: Vec<(MailboxId, bool)> = due.iter().map(|d| (d.id, d.requested)).collect();
    assert_eq!(picked, [(m2, true), (m1, false), (m3, false)]);

    // A job that starts after the request serves it.
    let l = lease(&store, m2, "w", at(13)).await;
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(14), at(500)))
        .await
        .expect("finish");
    let m = record_of(&store, m2).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (None, at(500)));

    // A request made while a job runs is not served by it: it stays, and keeps the mailbox due.
    let l = lease(&store, m2, "w", at(600)).await;
    assert_eq!(
        store.request_sync(m2, at(602)).await.expect("request"),
        Some(true)
    );
    store
        .finish_job(&l, &job(RunOutcome::Failed, at(601), at(1200)))
        .await
        .expect("finish");
    let m = record_of(&store, m2).await;
    assert_eq!(
        (m.sync_requested_at, m.next_run_at),
        (Some(at(602)), at(602))
    );
    let due = store.due_candidates(at(603), 5).await.expect("due");
    assert_eq!((due[0].id, due[0].requested), (m2, true));

    // Disabled mailboxes take no requests.
    register(&store, &[("a", "m1"), ("a", "m2")]).await;
    assert_eq!(
        store.request_sync(m3, at(700)).await.expect("request"),
        None
    );
}

/// The lost wake-up of issue 10: a job claimed for a pending request is running when the next
/// change is notified. It may already have read the changed page, so that second request must
/// not be folded into the one the job is serving.
async fn a_request_while_a_requested_job_runs_gets_a_round_after_it(store: Store) {
    let id = register(&store, &[("a", "m1")]).await[0];
    let at = |n| t0() + secs(n);
    schedule(&store, id, at(1000)).await;
    assert_eq!(
        store.request_sync(id, at(10)).await.expect("request"),
        Some(true)
    );
    let l = lease(&store, id, "w", at(11)).await;
    assert_eq!(
        record_of(&store, id).await.sync_requested_at,
        None,
        "the claimed job serves the request"
    );
    assert_eq!(
        store.request_sync(id, at(12)).await.expect("request"),
        Some(true),
        "a request after the claim is a new one, not a duplicate of the one being served"
    );
    assert_eq!(
        store.request_sync(id, at(13)).await.expect("request"),
        Some(false),
        "deduplicated with the new one"
    );
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(11), at(311)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!(
        (m.sync_requested_at, m.next_run_at),
        (Some(at(12)), at(12)),
        "due again at once, for the request made while the job ran"
    );
    let due = store.due_candidates(at(14), 5).await.expect("due");
    assert_eq!(
        due.iter().map(|d| (d.id, d.requested)).collect::<Vec<_>>(),
        [(id, true)]
    );
    let l = lease(&store, id, "w", at(15)).await;
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(15), at(315)))
        .await
        .expect("finish");
    let m = record_of(&store, id).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (None, at(315)));
}

async fn events_between_returns_what_overlaps_the_range(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let l = lease(&store, id, "w", t0()).await;
    let cursor = full_round(&store, &l).await;
    let span = |id: &str, from: i64, to: i64| {
        let mut e = event(id, id, t0() + secs(from));
        e.end_utc = t0() + secs(to);
        DeltaItem::Upsert(Box::new(e))
    };
    let page = [
        span("before", -7200, -3600),
        span("ends-at-start", -1800, 0),
        span("across-start", -1800, 1800),
        span("instant-at-start", 0, 0),
        span("inside", 3600, 5400),
        span("across-end", 6000, 9000),
        span("starts-at-end", 7200, 9000),
    ];
    store
        .apply_page(&l, &cursor, PageWrite::items(&page), &next("p2"), t0())
        .await
        .expect("page");
    let found: Vec<String> = store
        .events_between(id, t0(), t0() + secs(7200))
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        found,
        ["across-start", "instant-at-start", "inside", "across-end"]
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

/// A replica frozen (or cut off) in the middle of a page holds the mailbox row's lock: other
/// replicas' claims must not wait for it, and the server ends its transaction after
/// `idle_in_transaction_session_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_does_not_wait_for_a_frozen_replica() {
    in_postgres_schema(frozen_replica).await;
}

async fn frozen_replica(url: String) {
    let store = Store::connect(&url, 4).await.expect("store");
    store.migrate().await.expect("migrations");
    let id = register(&store, &[("a", "ann")]).await[0];
    let mut frozen = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("SET idle_in_transaction_session_timeout = '1s'")
        .execute(&mut frozen)
        .await
        .expect("set");
    sqlx::query("BEGIN")
        .execute(&mut frozen)
        .await
        .expect("begin");
    sqlx::query("SELECT 1 FROM mailboxes WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut frozen)
        .await
        .expect("lock the row");

    // Skipped, not waited for: a claim that waited for the lock would get the row once the
    // server ends the frozen transaction, and return it.
    let claimed = store
        .claim(id, "other", t0(), Duration::from_secs(60), true)
        .await
        .expect("claim");
    assert!(claimed.is_none(), "the locked row is skipped");

    // The server ends the idle transaction after its 1 s; the mailbox can be claimed again.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let claimed = loop {
        let claimed = store
            .claim(id, "other", t0(), Duration::from_secs(60), true)
            .await
            .expect("claim");
        if claimed.is_some() {
            break claimed;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the frozen transaction still holds the row after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        claimed.and_then(|m| m.lease_owner).as_deref(),
        Some("other")
    );
    let _ = frozen.close().await;
    store.close().await;
}

/// A page of upserts and removals is one statement and one round trip, as seen on the wire: the
/// store talks to the server through a proxy that notes the type of every message it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_page_is_one_round_trip() {
    in_postgres_schema(one_round_trip).await;
}

async fn one_round_trip(url: String) {
    let (proxy_url, sent) = message_log_proxy(&url).await;
    // One connection: nothing else goes over it while a page is written.
    let store = Store::connect(&proxy_url, 1).await.expect("store");
    store.migrate().await.expect("migrations");
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    // The first page prepares the statement (a round trip of its own, once per connection).
    let first: Vec<DeltaItem> = (0..50)
        .map(|n| upsert(&format!("e{n}"), "v1", t0()))
        .collect();
    store
        .apply_page(
            &a,
            &round,
            PageWrite::items(first.clone()),
            &next("p1"),
            t0(),
        )
        .await
        .expect("page 1");
    let plain: Vec<DeltaItem> = (0..50)
        .map(|n| upsert(&format!("e{n}"), "v2", t0()))
        .chain((50..100).map(|n| upsert(&format!("n{n}"), "new", t0())))
        .chain([removed("e3"), removed("e4"), upsert("e3", "back", t0())])
        .collect();
    // The round's last page also has what used to take a transaction of its own: series
    // masters (one refilling its stored occurrences), a gone series and rejected items.
    let m1 = master("M1", "weekly", "ck1", false);
    let last = [
        upsert("e0", "v3", t0()),
        removed("e1"),
        occurrence("o1", "M1", &m1, t0()),
        occurrence("o2", "M1", &m1, t0() + secs(7 * 86_400)),
    ];
    let series_page = PageWrite {
        items: last.to_vec(),
        masters: &masters(&[&m1, &master("M2", "daily", "ck1", true)]),
        gone_series: &["M9".to_string()],
        round: "r1",
        quarantined: &[rejected("q1"), rejected("q2"), rejected("q1")],
    };
    for (page, link) in [
        (PageWrite::items(plain.clone()), next("p2")),
        (series_page, delta("d1")),
    ] {
        let from = returned_to_pool(&sent).await;
        store
            .apply_page(&a, &round, page, &link, t0())
            .await
            .expect("page");
        let to = returned_to_pool(&sent).await;
        let messages: Vec<u8> = sent.lock().expect("log")[from..to].to_vec();
        let flights = assert_one_statement_in_one_round_trip(&messages);
        // Besides it only the ping sqlx makes when the connection is returned to the pool,
        // off the caller's path: none before the statement.
        assert_eq!(flights, 2, "{}", String::from_utf8_lossy(&messages));
    }
    assert_eq!(event_ids(&store, id).await.len(), 100);
    // M2 has no event left when the round ends: written and reconciled away in one statement.
    assert_eq!(master_ids(&store, id, &["M1", "M2"]).await, set(&["M1"]));
    let kept: Vec<(String, u64)> = store
        .quarantined(id, 10)
        .await
        .expect("quarantine")
        .into_iter()
        .map(|q| (q.item_key, q.times_seen))
        .collect();
    assert_eq!(kept, [("q1".to_string(), 2), ("q2".to_string(), 1)]);
    store.close().await;
}

/// The JSON PostgreSQL keeps (an event's raw item and attendees, a series master's and a
/// rejected item's raw) is compressed with lz4 where the server has it (migration 0011), not
/// with the server's default, and reads back unchanged. The store's sessions ask for pglz by
/// default here, so only the columns' own setting can make a value lz4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stored_json_is_compressed_with_lz4() {
    in_postgres_schema(stored_json_compression).await;
}

async fn stored_json_compression(url: String) {
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let has_lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_optional(&mut db)
    .await
    .expect("server settings")
    .unwrap_or(false);
    let mut pglz_by_default = url::Url::parse(&url).expect("a URL");
    if has_lz4 {
        pglz_by_default
            .query_pairs_mut()
            .append_pair("options[default_toast_compression]", "pglz");
    }
    let store = Store::connect(pglz_by_default.as_str(), 2)
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    // Each value ~6 KB or more: past the ~2 KB row size at which PostgreSQL compresses.
    let filler = "a long description of the meeting, ".repeat(200);
    let mut big = event("e1", "v1", t0());
    big.raw = json!({"id": "e1", "body": {"content": filler}}).to_string();
    let many: Vec<serde_json::Value> = (0..80)
        .map(|n| json!({"name": format!("Attendee {n}"), "address": format!("a{n}@contoso.com")}))
        .collect();
    big.attendees = Attendees::from_value(&json!(many));
    let mut m1 = master("M1", "weekly", "ck1", false);
    m1.raw = json!({"id": "M1", "type": "seriesMaster", "body": {"content": filler}}).to_string();
    let mut bad = rejected("q1");
    bad.raw = json!({"id": "q1", "start": "not a time", "body": {"content": filler}}).to_string();
    let page = PageWrite {
        items: vec![DeltaItem::Upsert(Box::new(big.clone()))],
        masters: &masters(&[&m1]),
        gone_series: &[],
        round: "r1",
        quarantined: std::slice::from_ref(&bad),
    };
    store
        .apply_page(&a, &round, page, &next("p1"), t0())
        .await
        .expect("page");

    let stored = store.events(id).await.expect("events");
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].raw, big.raw,
        "the event's raw JSON reads back unchanged"
    );
    assert_eq!(stored[0].attendees, big.attendees);
    for (table, expected) in [("series_masters", &m1.raw), ("quarantine", &bad.raw)] {
        let raw: String = sqlx::query_scalar(&format!("SELECT raw FROM {table}"))
            .fetch_one(&mut db)
            .await
            .expect("the stored raw JSON");
        assert_eq!(&raw, expected, "{table}'s raw JSON reads back unchanged");
    }
    if has_lz4 {
        let methods: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT 'events.raw', pg_column_compression(raw) FROM events
             UNION ALL SELECT 'events.attendees', pg_column_compression(attendees) FROM events
             UNION ALL SELECT 'series_masters.raw', pg_column_compression(raw) FROM series_masters
             UNION ALL SELECT 'quarantine.raw', pg_column_compression(raw) FROM quarantine",
        )
        .fetch_all(&mut db)
        .await
        .expect("compression methods");
        for (column, method) in methods {
            assert_eq!(method.as_deref(), Some("lz4"), "{column}");
        }
    } else {
        eprintln!("this PostgreSQL has no lz4: the stored JSON keeps its default compression");
    }
    let _ = db.close().await;
    store.close().await;
}

/// PostgreSQL writes a page in one statement whose parts all see the rows as they were before
/// it; SQLite applies the same page part after part. Random pages (upserts and removals of
/// single events and occurrences, inside and outside the window, repeated ids, series masters
/// written twice and refilling or not, gone series, rejected items repeated or understood
/// later in the page, rounds that reconcile) must leave both stores with the same events,
/// masters and quarantine, and report the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_random_pages_end_as_on_sqlite() {
    in_postgres_schema(random_pages_on_both).await;
}

/// splitmix64: a fixed sequence per seed, so a failure names the seed that reproduces it.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// One random page: its items, masters, gone series and rejected items.
fn random_page(
    draw: &mut Draw,
    step: usize,
) -> (
    Vec<DeltaItem>,
    Vec<MasterWrite>,
    Vec<String>,
    Vec<calsync::graph::model::RejectedItem>,
) {
    let series = ["M0", "M1", "M2"];
    // Whole hours from 40 days before t0 to 40 days after: some outside the 30-day window.
    let start = |draw: &mut Draw| t0() + secs(3600 * (draw.below(1920) as i64 - 960));
    let mut items = Vec::new();
    for _ in 0..draw.below(8) {
        let item = match draw.below(5) {
            0 | 1 => upsert(
                &format!("e{}", draw.below(5)),
                &format!("s{step}-{}", draw.below(100)),
                start(draw),
            ),
            2 | 3 => {
                let m = series[draw.below(3) as usize];
                let of = master(m, &format!("{m} as stub"), "stub", false);
                occurrence(&format!("o{}", draw.below(6)), m, &of, start(draw))
            }
            _ => {
                let ids = [
                    "e0", "e1", "e2", "e3", "e4", "o0", "o1", "o2", "o3", "o4", "o5", "M0", "M1",
                    "M2", "q0",
                ];
                removed(ids[draw.below(ids.len() as u64) as usize])
            }
        };
        items.push(item);
    }
    let masters: Vec<MasterWrite> = (0..draw.below(4))
        .map(|_| {
            let m = series[draw.below(3) as usize];
            let version = draw.below(3);
            MasterWrite {
                master: master(
                    m,
                    &format!("{m} s{step} v{version}"),
                    &format!("ck{version}"),
                    draw.one_in(3),
                ),
                refill_occurrences: !draw.one_in(3),
            }
        })
        .collect();
    let gone: Vec<String> = series
        .iter()
        .filter(|_| draw.one_in(8))
        .map(|m| m.to_string())
        .collect();
    let quarantined = (0..draw.below(3))
        .map(|_| {
            let keys = ["q0", "q1", "e0", "o1"];
            let mut item = rejected(keys[draw.below(4) as usize]);
            item.reason = format!("reason s{step}");
            if draw.one_in(4) {
                item.id = None;
            }
            item
        })
        .collect();
    (items, masters, gone, quarantined)
}

async fn random_pages_on_both(url: String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite_url = format!("sqlite://{}", dir.path().join("store.db").display());
    let stores = [
        Store::connect(&sqlite_url, 2).await.expect("SQLite store"),
        Store::connect(&url, 2).await.expect("PostgreSQL store"),
    ];
    for store in &stores {
        store.migrate().await.expect("migrations");
    }
    let seeds = 0..60u64;
    let users: Vec<String> = seeds.clone().map(|seed| format!("u{seed}")).collect();
    let named: Vec<(&str, &str)> = users.iter().map(|u| ("a", u.as_str())).collect();
    let mut ids = Vec::new();
    for store in &stores {
        ids.push(register(store, &named).await);
    }
    let mut pages = 0;
    for seed in seeds {
        let mut draw = Draw(seed);
        let at = t0() + secs(seed as i64);
        let mut leases = Vec::new();
        for (store, ids) in stores.iter().zip(&ids) {
            leases.push(lease(store, ids[seed as usize], "a", at).await);
        }
        for round in 0..3 {
            let mut cursors = Vec::new();
            for (store, lease) in stores.iter().zip(&leases) {
                cursors.push(full_round(store, lease).await);
            }
            // A round whose cursor is not full applies its pages without reconciling.
            let full = !draw.one_in(3);
            let length = 1 + draw.below(3) as usize;
            for step in 0..length {
                let (items, masters, gone, quarantined) = random_page(&mut draw, step);
                let page = PageWrite {
                    items: items.to_vec(),
                    masters: &masters,
                    gone_series: &gone,
                    round: "r",
                    quarantined: &quarantined,
                };
                let link = if step + 1 == length {
                    delta(&format!("d{round}"))
                } else {
                    next(&format!("p{round}-{step}"))
                };
                let now = at + secs(60 * (round * 10 + step as i64));
                let context = format!("seed {seed}, round {round}, page {step}: {items:?} masters {masters:?} gone {gone:?} rejected {quarantined:?}");
                let mut applied = Vec::new();
                for ((store, lease), cursor) in stores.iter().zip(&leases).zip(&cursors) {
                    let cursor = Cursor {
                        full,
                        ..cursor.clone()
                    };
                    let done = store
                        .apply_page(lease, &cursor, page.clone(), &link, now)
                        .await
                        .unwrap_or_else(|e| panic!("{context}: {e}"));
                    applied.push((done.upserted, done.deleted));
                }
                assert_eq!(
                    applied[0], applied[1],
                    "counts (SQLite, PostgreSQL): {context}"
                );
                let mut states = Vec::new();
                for (store, ids) in stores.iter().zip(&ids) {
                    let id = ids[seed as usize];
                    let events = store.events(id).await.expect("events");
                    let masters = store
                        .series_masters(id, &["M0", "M1", "M2"])
                        .await
                        .expect("masters");
                    let masters: BTreeSet<(String, Option<String>, String, String)> = masters
                        .into_values()
                        .map(|m| (m.master_id, m.change_key, m.checked_round, m.raw))
                        .collect();
                    let quarantine = store.quarantined(id, 100).await.expect("quarantine");
                    states.push((events, masters, quarantine));
                }
                assert_eq!(
                    states[0], states[1],
                    "stores (SQLite, PostgreSQL): {context}"
                );
                pages += 1;
            }
        }
    }
    assert!(pages >= 300, "{pages} pages");
    for store in &stores {
        store.close().await;
    }
}

/// Checks that the client's `messages` (one type byte each) hold one statement in one round
/// trip and no BEGIN or COMMIT; returns how many flights they make. 'S' Sync ends a flight of
/// messages, after which the client waits for the server: a round trip; so does 'Q', a simple
/// query (BEGIN, COMMIT). 'E' Execute runs a statement.
fn assert_one_statement_in_one_round_trip(messages: &[u8]) -> usize {
    let flights: Vec<&[u8]> = messages
        .split_inclusive(|&m| m == b'S' || m == b'Q')
        .collect();
    let work: Vec<&[u8]> = flights.iter().copied().filter(|f| f != b"S").collect();
    let shown = String::from_utf8_lossy(messages);
    assert_eq!(work.len(), 1, "one round trip: {shown}");
    assert_eq!(
        work[0].iter().filter(|&&m| m == b'E').count(),
        1,
        "one statement: {shown}"
    );
    assert!(!messages.contains(&b'Q'), "no BEGIN or COMMIT: {shown}");
    flights.len()
}

/// An idle job's end (the mailbox's row with the round's deltaLink, the run appended, the
/// history pruned) is one statement and one round trip, as seen on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_job_end_is_one_round_trip() {
    in_postgres_schema(job_end_round_trip).await;
}

async fn job_end_round_trip(url: String) {
    let (proxy_url, sent) = message_log_proxy(&url).await;
    let store = Store::connect(&proxy_url, 1).await.expect("store");
    store.migrate().await.expect("migrations");
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    store
        .apply_page(&a, &round, PageWrite::default(), &delta("d1"), t0())
        .await
        .expect("the full round's last page");
    // The first job end prepares the statement (a round trip of its own, once per connection).
    store
        .finish_job(&a, &job(RunOutcome::Ok, t0(), t0() + secs(60)))
        .await
        .expect("finish");
    for n in 1..=3 {
        let b = lease(&store, id, "b", t0() + secs(n * 100)).await;
        let from = returned_to_pool(&sent).await;
        let end = JobRecord {
            round_end: Some(RoundEnd {
                round_id: round.round_id,
                delta_link: format!("https://graph.example/delta/idle{n}"),
            }),
            ..job(
                RunOutcome::Ok,
                t0() + secs(n * 100),
                t0() + secs(n * 100 + 60),
            )
        };
        store.finish_job(&b, &end).await.expect("finish");
        let to = returned_to_pool(&sent).await;
        let messages: Vec<u8> = sent.lock().expect("log")[from..to].to_vec();
        assert_one_statement_in_one_round_trip(&messages);
    }
    let m = record_of(&store, id).await;
    assert_eq!(
        (m.lease_owner, m.cursor.delta_link.as_deref()),
        (None, Some("https://graph.example/delta/idle3"))
    );
    assert_eq!(store.runs(id, 10).await.expect("runs").len(), 4);
    store.close().await;
}

/// Waits until the log ends with the ping sqlx sends when a connection comes back to the pool (a
/// Sync of its own after the Sync or simple Query that ended the last work); returns the log's
/// length then.
async fn returned_to_pool(sent: &std::sync::Mutex<Vec<u8>>) -> usize {
    for _ in 0..1000 {
        {
            let log = sent.lock().expect("log");
            if log.ends_with(b"SS") || log.ends_with(b"QS") {
                return log.len();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the connection did not come back to the pool within 10 s");
}

/// A TCP proxy to the server of `url`: returns a URL through it (without TLS, so the messages
/// can be read) and the log of the types of the messages clients send, in order.
async fn message_log_proxy(url: &str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut proxy_url = url::Url::parse(url).expect("a URL");
    let server = format!(
        "{}:{}",
        proxy_url.host_str().expect("a host"),
        proxy_url.port().unwrap_or(5432)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    proxy_url.set_host(Some("127.0.0.1")).expect("host");
    proxy_url.set_port(Some(port)).expect("port");
    proxy_url
        .query_pairs_mut()
        .append_pair("sslmode", "disable");
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                // The startup message has no type byte; every later one is a type byte and a
                // length (which counts itself).
                let (mut pending, mut started) = (Vec::new(), false);
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&chunk[..n]);
                    loop {
                        let header = if started { 5 } else { 4 };
                        if pending.len() < header {
                            break;
                        }
                        let length = u32::from_be_bytes(
                            pending[header - 4..header].try_into().expect("4 bytes"),
                        ) as usize;
                        let whole = header - 4 + length;
                        if pending.len() < whole {
                            break;
                        }
                        if started {
                            log.lock().expect("log").push(pending[0]);
                        }
                        started = true;
                        pending.drain(..whole);
                    }
                    // Logged before it is forwarded, so before any answer to it.
                    if server_write.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (proxy_url.to_string(), sent)
}

// ---------------------------------------------------------------------------------------------
// Replicas: the real service, twice, on one PostgreSQL schema

/// Two `Application`s (two `calsync serve` replicas) on one PostgreSQL database, against the
/// simulator while its calendars change: both replicas take jobs, and at the end the store
/// equals ground truth (nothing lost, nothing doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas_share_the_mailboxes_and_end_equal_to_ground_truth() {
    in_postgres_schema(two_replicas).await;
}

async fn two_replicas(url: String) {
    use crate::helpers::sim::{fast, sim_settings, start_sim, Truth};
    use crate::helpers::{start_app, Jobs};

    let config = calsync::sim::SimConfig::generated(2, 4, 60, 11);
    let sim = start_sim(config.clone()).await;
    let (settings, _dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.store.url = url;
        s.sync.interval = Duration::from_millis(300);
        s.sync.job_deadline = Duration::from_secs(5);
        s.sync.workers = 3;
    });
    let mut replicas = Vec::new();
    for _ in 1..=2 {
        replicas.push(start_app(settings.clone(), Jobs::Loop).await);
    }
    let owners: BTreeSet<String> = replicas
        .iter()
        .map(|r| r.worker.owner().to_string())
        .collect();
    let store = replicas[0].store.clone();

    sim.set_mutations(40.0);
    let mut lessees = BTreeSet::new();
    let changing_until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < changing_until {
        for m in store.mailboxes().await.expect("store reads") {
            if let Some(owner) = m.lease_owner.as_deref().and_then(|o| o.split('/').next()) {
                lessees.insert(owner.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sim.set_mutations(0.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quiet = Utc::now();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mailboxes = store.mailboxes().await.expect("store reads");
        let settled = mailboxes.iter().all(|m| {
            m.last_attempt_at.is_some_and(|t| t > quiet)
                && m.last_success_at >= m.last_attempt_at
                && m.consecutive_failures == 0
        });
        if settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "not every mailbox completed a round after the changes stopped: {:?}",
            mailboxes
                .iter()
                .map(|m| (
                    &m.user_id,
                    m.last_attempt_at,
                    m.last_success_at,
                    &m.last_error
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for replica in replicas {
        replica.stop().await;
    }

    assert_eq!(lessees, owners, "both replicas held leases");
    let stats = sim.stats();
    assert_eq!(stats.violations.over_concurrency.count, 0);
    Truth {
        sim: &sim,
        store: &store,
    }
    .assert_all_match_truth()
    .await;
}

fn master(id: &str, subject: &str, change_key: &str, all_day: bool) -> Event {
    let mut m = event(id, subject, t0() - chrono::Duration::days(700));
    m.event_type = Some("seriesMaster".into());
    m.change_key = Some(change_key.into());
    m.is_all_day = all_day;
    m.show_as = Some("tentative".into());
    m.organizer_name = Some("Carol".into());
    m.categories = vec!["Customer".into()];
    m.attendees = Attendees::from_value(&json!([{"name": "Dana", "address": "dana@fabrikam.com",
                          "type": "required", "response": "none"}]));
    m.raw = json!({"id": id, "type": "seriesMaster", "changeKey": change_key}).to_string();
    m
}

fn occurrence(id: &str, series: &str, of: &Event, start: DateTime<Utc>) -> DeltaItem {
    let mut e = of.clone();
    e.id = id.into();
    e.event_type = Some("occurrence".into());
    e.series_master_id = Some(series.into());
    e.ical_uid = None;
    e.start_utc = start;
    e.end_utc = start + secs(1800);
    e.raw = json!({"id": id, "type": "occurrence", "seriesMasterId": series}).to_string();
    DeltaItem::Upsert(Box::new(e))
}

/// Several changed masters in one page (and one written twice, the later write winning):
/// each series' stored occurrences take their own master's fields, no other's.
async fn changed_masters_of_one_page_each_refill_their_own_series(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    let names = ["s1", "s2", "s3"];
    let v1 = names.map(|m| master(m, &format!("{m} v1"), "ck1", false));
    let items: Vec<DeltaItem> = v1
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            (0..2).map(move |k| {
                occurrence(
                    &format!("{}-{k}", m.id),
                    &m.id,
                    m,
                    t0() + secs(3600 * (2 * i + k) as i64),
                )
            })
        })
        .collect();
    let marker = round.round_marker();
    store
        .apply_page(
            &a,
            &round,
            PageWrite {
                items: items.to_vec(),
                masters: &masters(&v1.iter().collect::<Vec<_>>()),
                gone_series: &[],
                round: &marker,
                quarantined: &[],
            },
            &delta("d1"),
            t0(),
        )
        .await
        .expect("round 1");

    let cursor = record_of(&store, id).await.cursor;
    let marker2 = cursor.round_marker();
    let v2 = names.map(|m| master(m, &format!("{m} v2"), "ck2", m == "s2"));
    let stale = master("s3", "s3 stale", "ck-stale", false);
    let write = |m: &Event, refill: bool| MasterWrite {
        master: m.clone(),
        refill_occurrences: refill,
    };
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite {
                items: Vec::new(),
                masters: &[
                    write(&v2[0], true),
                    write(&stale, true),
                    write(&v2[1], true),
                    write(&v2[2], true),
                ],
                gone_series: &[],
                round: &marker2,
                quarantined: &[],
            },
            &delta("d2"),
            t0(),
        )
        .await
        .expect("the changed masters");
    let events = store.events(id).await.expect("reads");
    assert_eq!(events.len(), 6);
    for e in &events {
        let series = e.series_master_id.as_deref().expect("an occurrence");
        assert_eq!(e.subject, Some(format!("{series} v2")), "{}", e.id);
        assert_eq!(e.change_key.as_deref(), Some("ck2"), "{}", e.id);
        assert_eq!(e.is_all_day, series == "s2", "{}", e.id);
        assert_eq!(e.start_date.is_some(), series == "s2", "{}", e.id);
    }
    let stored = store.series_masters(id, &names).await.expect("reads");
    for m in names {
        assert_eq!(stored[m].change_key.as_deref(), Some("ck2"), "{m}");
        assert_eq!(stored[m].checked_round, marker2);
    }
}

async fn series_masters_refill_their_occurrences_and_go_with_their_series(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let a = lease(&store, id, "a", t0()).await;
    let round = full_round(&store, &a).await;
    let v1 = master("m1", "Weekly", "ck1", false);
    let other = master("m2", "Daily", "ck-m2", false);
    let items = [
        occurrence("o1", "m1", &v1, t0()),
        occurrence("o2", "m1", &v1, t0() + chrono::Duration::days(7)),
        upsert("x1", "Moved one", t0() + secs(600)),
        occurrence("d1", "m2", &other, t0() + secs(7200)),
    ];
    let masters = [
        MasterWrite {
            master: v1.clone(),
            refill_occurrences: true,
        },
        MasterWrite {
            master: other.clone(),
            refill_occurrences: true,
        },
    ];
    let marker = round.round_marker();
    store
        .apply_page(
            &a,
            &round,
            PageWrite {
                items: items.to_vec(),
                masters: &masters,
                gone_series: &[],
                round: &marker,
                quarantined: &[],
            },
            &delta("d1"),
            t0(),
        )
        .await
        .expect("round 1");
    // An exception of m1 (x1 stands in for it).
    let mut exception = event("x1", "Moved one", t0() + secs(600));
    exception.event_type = Some("exception".into());
    exception.series_master_id = Some("m1".into());
    let cursor = record_of(&store, id).await.cursor;
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite::items(&[DeltaItem::Upsert(Box::new(exception))]),
            &delta("d2"),
            t0(),
        )
        .await
        .expect("the exception");

    let stored = store
        .series_masters(id, &["m1", "m2", "nope"])
        .await
        .expect("reads");
    assert_eq!(stored.len(), 2);
    assert_eq!(stored["m1"].change_key.as_deref(), Some("ck1"));
    assert_eq!(stored["m1"].checked_round, marker);
    assert_eq!(stored["m1"].raw, v1.raw);

    // The master changed (renamed, all-day now): every stored occurrence takes its fields, in
    // the page's transaction, with no stub of them on the page.
    let mut v2 = master("m1", "Weekly (renamed)", "ck2", true);
    v2.location = Some("Teams".into());
    let cursor = record_of(&store, id).await.cursor;
    let marker2 = cursor.round_marker();
    assert_ne!(marker2, marker, "a new round, a new marker");
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite {
                items: Vec::new(),
                masters: &[MasterWrite {
                    master: v2.clone(),
                    refill_occurrences: true,
                }],
                gone_series: &[],
                round: &marker2,
                quarantined: &[],
            },
            &delta("d3"),
            t0(),
        )
        .await
        .expect("the renamed master");
    let events = store.events(id).await.expect("reads");
    let get = |eid: &str| events.iter().find(|e| e.id == eid).expect(eid).clone();
    for eid in ["o1", "o2"] {
        let o = get(eid);
        assert_eq!(o.subject.as_deref(), Some("Weekly (renamed)"), "{eid}");
        assert_eq!(o.change_key.as_deref(), Some("ck2"));
        assert_eq!(o.location.as_deref(), Some("Teams"));
        assert_eq!(o.categories, ["Customer"]);
        assert_eq!(o.organizer_name.as_deref(), Some("Carol"));
        assert!(o.is_all_day);
        assert_eq!(o.start_date, Some(o.start_utc.date_naive()));
        assert_eq!(o.end_date, Some(o.end_utc.date_naive()));
        assert_eq!(o.attendees, v2.attendees);
    }
    assert_eq!(get("o2").start_utc, t0() + chrono::Duration::days(7));
    assert_eq!(
        get("x1").subject.as_deref(),
        Some("Moved one"),
        "an exception keeps its own fields"
    );
    assert_eq!(
        get("d1").subject.as_deref(),
        Some("Daily"),
        "other series untouched"
    );
    let stored = store.series_masters(id, &["m1"]).await.expect("reads");
    assert_eq!(stored["m1"].change_key.as_deref(), Some("ck2"));
    assert_eq!(stored["m1"].checked_round, marker2);

    // Graph no longer has m1 (404): the series goes, its exception too; m2 stays.
    let cursor = record_of(&store, id).await.cursor;
    let applied = store
        .apply_page(
            &a,
            &cursor,
            PageWrite {
                items: Vec::new(),
                masters: &[],
                gone_series: &["m1".to_string()],
                round: &cursor.round_marker(),
                quarantined: &[],
            },
            &delta("d4"),
            t0(),
        )
        .await
        .expect("the gone series");
    assert_eq!(applied.deleted, 3);
    assert_eq!(event_ids(&store, id).await, set(&["d1"]));
    let stored = store
        .series_masters(id, &["m1", "m2"])
        .await
        .expect("reads");
    assert!(!stored.contains_key("m1") && stored.contains_key("m2"));

    // A removed master is only forgotten; a full round drops masters no event belongs to.
    let cursor = record_of(&store, id).await.cursor;
    store
        .apply_page(
            &a,
            &cursor,
            PageWrite::items(&[removed("d1")]),
            &delta("d5"),
            t0(),
        )
        .await
        .expect("d1 removed");
    assert!(store
        .series_masters(id, &["m2"])
        .await
        .expect("reads")
        .contains_key("m2"));
    let round = full_round(&store, &a).await;
    store
        .apply_page(
            &a,
            &round,
            PageWrite::items(&[upsert("s1", "Single", t0())]),
            &delta("d6"),
            t0(),
        )
        .await
        .expect("a full round");
    assert!(store
        .series_masters(id, &["m2"])
        .await
        .expect("reads")
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// The outbox of two-way sync: writes and their appointments' links.

/// A write of `external_id` with key `key`: its id, request hash, body and transactionId are
/// derived from them.
struct Write {
    id: String,
    external_id: String,
    op: WriteOp,
    key: String,
    hash: String,
    body: String,
    transaction_id: String,
}

fn write(external_id: &str, op: WriteOp, key: &str) -> Write {
    Write {
        id: format!("write-{key}"),
        external_id: external_id.to_string(),
        op,
        key: key.to_string(),
        hash: format!("hash-{key}"),
        body: json!({"subject": format!("{} {external_id}", op.as_str())}).to_string(),
        transaction_id: format!("txn-{external_id}"),
    }
}

impl Write {
    fn of(&self, mailbox: MailboxId, now: DateTime<Utc>) -> NewWrite<'_> {
        NewWrite {
            id: &self.id,
            mailbox,
            external_id: &self.external_id,
            op: self.op,
            idempotency_key: &self.key,
            request_hash: &self.hash,
            body: &self.body,
            transaction_id: &self.transaction_id,
            now,
        }
    }
}

async fn enqueue(store: &Store, mailbox: MailboxId, w: &Write, now: DateTime<Utc>) -> Enqueued {
    store
        .enqueue_write(&w.of(mailbox, now))
        .await
        .expect("enqueue")
}

/// Enqueues a write that must be stored.
async fn queued(store: &Store, mailbox: MailboxId, w: &Write, now: DateTime<Utc>) -> WriteRecord {
    match enqueue(store, mailbox, w, now).await {
        Enqueued::New(record) => record,
        other => panic!("{} of {}: {other:?}", w.key, w.external_id),
    }
}

async fn write_record(store: &Store, id: &str) -> WriteRecord {
    store
        .write_by_id(id)
        .await
        .expect("write_by_id")
        .expect("the write exists")
}

async fn link(store: &Store, mailbox: MailboxId, external_id: &str) -> EventLink {
    store
        .event_link(mailbox, external_id)
        .await
        .expect("event_link")
        .expect("the link exists")
}

fn delivered(id: &str, change_key: &str) -> WriteResult {
    WriteResult::Delivered {
        graph_event_id: Some(id.to_string()),
        change_key: Some(change_key.to_string()),
        etag: Some(format!("W/\"{change_key}\"")),
        fingerprint: None,
        note: None,
    }
}

async fn pending_ids(store: &Store, mailbox: MailboxId) -> Vec<String> {
    store
        .pending_writes(mailbox, 100)
        .await
        .expect("pending")
        .into_iter()
        .map(|w| w.id)
        .collect()
}

async fn writes_are_enqueued_replayed_and_refused(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    let (ann, bob) = (ids[0], ids[1]);
    let at = |n| t0() + secs(n);

    let create = write("e1", WriteOp::Create, "k1");
    let record = queued(&store, ann, &create, at(1)).await;
    assert_eq!(
        (
            record.id.as_str(),
            record.mailbox_id,
            record.external_id.as_str()
        ),
        ("write-k1", ann, "e1")
    );
    assert_eq!(
        (record.op, record.state, record.attempts),
        (WriteOp::Create, WriteState::Queued, 0)
    );
    assert_eq!(
        (record.created_at, record.updated_at, record.delivered_at),
        (at(1), at(1), None)
    );
    assert_eq!(write_record(&store, "write-k1").await, record);
    let l = link(&store, ann, "e1").await;
    assert_eq!(l.transaction_id, "txn-e1");
    assert_eq!(
        (l.graph_event_id, l.cancelled, l.created_at),
        (None, false, at(1))
    );

    // The same key and request, even under another write id: the earlier write, nothing stored.
    let again = Write {
        id: "write-k1-again".into(),
        ..write("e1", WriteOp::Create, "k1")
    };
    match enqueue(&store, ann, &again, at(2)).await {
        Enqueued::Replay(earlier) => assert_eq!(earlier, record),
        other => panic!("replay expected: {other:?}"),
    }
    let reused = Write {
        id: "write-k1-other".into(),
        hash: "another request".into(),
        ..write("e2", WriteOp::Create, "k1")
    };
    match enqueue(&store, ann, &reused, at(2)).await {
        Enqueued::KeyReused(earlier) => assert_eq!(earlier, record),
        other => panic!("key reuse expected: {other:?}"),
    }
    for id in ["write-k1-again", "write-k1-other"] {
        assert!(
            store.write_by_id(id).await.expect("reads").is_none(),
            "{id} stored"
        );
    }
    assert!(store.event_link(ann, "e2").await.expect("reads").is_none());
    // Keys are per mailbox.
    queued(
        &store,
        bob,
        &Write {
            id: "write-bob-k1".into(),
            ..write("e1", WriteOp::Create, "k1")
        },
        at(2),
    )
    .await;

    assert!(matches!(
        enqueue(&store, 9999, &write("e1", WriteOp::Create, "k9"), at(3)).await,
        Enqueued::NoMailbox
    ));
    assert!(matches!(
        enqueue(&store, ann, &write("e1", WriteOp::Create, "k2"), at(3)).await,
        Enqueued::EventExists
    ));
    assert!(matches!(
        enqueue(&store, ann, &write("nope", WriteOp::Update, "k3"), at(3)).await,
        Enqueued::NoSuchEvent
    ));
    assert!(matches!(
        enqueue(&store, ann, &write("nope", WriteOp::Cancel, "k4"), at(3)).await,
        Enqueued::NoSuchEvent
    ));
    assert!(store
        .event_link(ann, "nope")
        .await
        .expect("reads")
        .is_none());

    // Updates queue behind the create; a cancel closes the appointment at once, while queued.
    queued(&store, ann, &write("e1", WriteOp::Update, "k5"), at(4)).await;
    queued(&store, ann, &write("e1", WriteOp::Cancel, "k6"), at(5)).await;
    assert!(link(&store, ann, "e1").await.cancelled);
    for (op, key) in [(WriteOp::Update, "k7"), (WriteOp::Cancel, "k8")] {
        assert!(
            matches!(
                enqueue(&store, ann, &write("e1", op, key), at(6)).await,
                Enqueued::EventCancelled
            ),
            "{op:?} after a cancel"
        );
    }
    assert!(
        matches!(
            enqueue(&store, ann, &write("e1", WriteOp::Create, "k10"), at(6)).await,
            Enqueued::EventExists
        ),
        "a cancelled appointment is not created again"
    );
    // A replay is still answered after the cancel.
    assert!(matches!(
        enqueue(&store, ann, &write("e1", WriteOp::Update, "k5"), at(7)).await,
        Enqueued::Replay(_)
    ));
    let history: Vec<String> = store
        .writes_of_event(ann, "e1", 10)
        .await
        .expect("writes_of_event")
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(
        history,
        ["write-k6", "write-k5", "write-k1"],
        "newest first"
    );
    assert_eq!(
        store
            .writes_of_event(ann, "e1", 1)
            .await
            .expect("reads")
            .len(),
        1
    );

    // A disabled mailbox takes no writes.
    register(&store, &[("a", "ann")]).await;
    assert!(matches!(
        enqueue(&store, bob, &write("e5", WriteOp::Create, "k11"), at(8)).await,
        Enqueued::MailboxDisabled
    ));
    assert!(store.event_link(bob, "e5").await.expect("reads").is_none());
}

async fn an_enqueued_write_makes_its_mailbox_due_at_once(store: Store) {
    let ids = register(&store, &[("a", "m1"), ("a", "m2")]).await;
    let (m1, m2) = (ids[0], ids[1]);
    let at = |n| t0() + secs(n);
    schedule(&store, m1, at(3600)).await;
    schedule(&store, m2, at(3600)).await;
    assert!(store
        .due_candidates(at(10), 5)
        .await
        .expect("due")
        .is_empty());

    queued(&store, m1, &write("e1", WriteOp::Create, "k1"), at(10)).await;
    let m = record_of(&store, m1).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (Some(at(10)), at(10)));
    let due = store.due_candidates(at(11), 5).await.expect("due");
    assert_eq!(
        due.iter().map(|d| (d.id, d.requested)).collect::<Vec<_>>(),
        [(m1, true)]
    );
    // A later write keeps the earlier request.
    queued(&store, m1, &write("e1", WriteOp::Update, "k2"), at(12)).await;
    let m = record_of(&store, m1).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (Some(at(10)), at(10)));
    // What is refused asks for nothing.
    enqueue(&store, m2, &write("e1", WriteOp::Update, "k3"), at(12)).await;
    assert_eq!(record_of(&store, m2).await.sync_requested_at, None);

    // A write queued while a job runs (which may have read the queue already) gets a job
    // after it.
    let l = lease(&store, m1, "w", at(13)).await;
    assert_eq!(
        record_of(&store, m1).await.sync_requested_at,
        None,
        "the claim served it"
    );
    queued(&store, m1, &write("e1", WriteOp::Update, "k4"), at(14)).await;
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(13), at(313)))
        .await
        .expect("finish");
    let m = record_of(&store, m1).await;
    assert_eq!((m.sync_requested_at, m.next_run_at), (Some(at(14)), at(14)));
    assert!(
        store
            .claim(m1, "w2", at(15), Duration::from_secs(60), true)
            .await
            .expect("claim")
            .is_some(),
        "due at once"
    );
}

/// The claimed record tells the job whether it has writes to deliver (an idle job then does
/// not look them up): queued writes of this mailbox only, and none once they have ended.
async fn a_claim_says_whether_writes_are_queued(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    let (ann, bob) = (ids[0], ids[1]);
    let at = |n| t0() + secs(n);
    let claim = |id: MailboxId, n: i64| {
        let store = store.clone();
        async move {
            let record = store
                .claim(id, "w", at(n), Duration::from_secs(60), false)
                .await
                .expect("claim")
                .expect("free");
            let lease = Lease {
                mailbox: id,
                owner: "w".into(),
            };
            (record.writes_queued, lease)
        }
    };
    let (queued_at_claim, l) = claim(ann, 1).await;
    assert!(!queued_at_claim, "nothing queued yet");
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(1), at(2)))
        .await
        .expect("finish");

    queued(&store, ann, &write("e1", WriteOp::Create, "k1"), at(3)).await;
    assert!(record_of(&store, ann).await.writes_queued);
    assert!(!record_of(&store, bob).await.writes_queued, "per mailbox");
    let (queued_at_claim, l) = claim(ann, 4).await;
    assert!(queued_at_claim);
    store
        .record_write(&l, "write-k1", &delivered("g1", "ck1"), at(5))
        .await
        .expect("record");
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(4), at(6)))
        .await
        .expect("finish");
    let (queued_at_claim, _) = claim(ann, 7).await;
    assert!(!queued_at_claim, "the delivered write is no longer queued");
}

async fn pending_writes_come_in_order_with_their_links(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("b", "bob")]).await;
    let (ann, bob) = (ids[0], ids[1]);
    let at = |n| t0() + secs(n);
    queued(&store, ann, &write("e2", WriteOp::Create, "k1"), at(1)).await;
    queued(&store, bob, &write("e1", WriteOp::Create, "b1"), at(2)).await;
    queued(&store, ann, &write("e1", WriteOp::Create, "k2"), at(3)).await;
    queued(&store, ann, &write("e2", WriteOp::Update, "k3"), at(4)).await;
    queued(&store, ann, &write("e1", WriteOp::Update, "k4"), at(5)).await;
    queued(&store, ann, &write("e2", WriteOp::Cancel, "k5"), at(6)).await;

    let pending = store.pending_writes(ann, 100).await.expect("pending");
    let order: Vec<(&str, &str, WriteOp)> = pending
        .iter()
        .map(|w| (w.id.as_str(), w.external_id.as_str(), w.op))
        .collect();
    assert_eq!(
        order,
        [
            ("write-k1", "e2", WriteOp::Create),
            ("write-k2", "e1", WriteOp::Create),
            ("write-k3", "e2", WriteOp::Update),
            ("write-k4", "e1", WriteOp::Update),
            ("write-k5", "e2", WriteOp::Cancel),
        ]
    );
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
    let first = &pending[0];
    assert_eq!(first.transaction_id, "txn-e2");
    assert_eq!((first.attempts, first.created_at), (0, at(1)));
    assert_eq!(first.body, write("e2", WriteOp::Create, "k1").body);
    assert_eq!(
        (&first.graph_event_id, &first.change_key, &first.etag),
        (&None, &None, &None)
    );
    assert_eq!(pending_ids(&store, bob).await, ["write-b1"]);
    let two = store.pending_writes(ann, 2).await.expect("pending");
    assert_eq!(
        two.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["write-k1", "write-k2"]
    );

    // A delivered write leaves the queue, and the next writes carry what it taught the link.
    let l = lease(&store, ann, "w", at(7)).await;
    store
        .record_write(&l, "write-k1", &delivered("g2", "ck1"), at(8))
        .await
        .expect("record");
    let pending = store.pending_writes(ann, 100).await.expect("pending");
    assert_eq!(pending[0].id, "write-k2");
    let update = pending.iter().find(|w| w.id == "write-k3").expect("queued");
    assert_eq!(
        (
            update.graph_event_id.as_deref(),
            update.change_key.as_deref(),
            update.etag.as_deref()
        ),
        (Some("g2"), Some("ck1"), Some("W/\"ck1\""))
    );
}

async fn record_write_is_fenced_on_the_lease(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    let created = queued(&store, id, &write("e1", WriteOp::Create, "k1"), at(1)).await;
    let stranger = Lease {
        mailbox: id,
        owner: "stranger".into(),
    };
    // Unleased, then leased by someone else.
    assert!(is_lease_lost(
        store
            .record_write(&stranger, "write-k1", &delivered("g1", "ck1"), at(2))
            .await
    ));
    let _held = lease(&store, id, "owner", at(3)).await;
    for result in [
        delivered("g1", "ck1"),
        WriteResult::Retry {
            reason: "timeout".into(),
        },
        WriteResult::Failed {
            reason: "400".into(),
        },
    ] {
        assert!(is_lease_lost(
            store
                .record_write(&stranger, "write-k1", &result, at(4))
                .await
        ));
    }
    assert_eq!(
        write_record(&store, "write-k1").await,
        created,
        "nothing written"
    );
    let l = link(&store, id, "e1").await;
    assert_eq!(
        (l.graph_event_id, l.change_key, l.updated_at),
        (None, None, at(1))
    );
    assert_eq!(pending_ids(&store, id).await, ["write-k1"]);
    // A lease on another mailbox does not cover this one's writes.
    let other = register(&store, &[("a", "ann"), ("a", "bob")]).await[1];
    let bobs = lease(&store, other, "owner", at(5)).await;
    store
        .record_write(&bobs, "write-k1", &delivered("g1", "ck1"), at(6))
        .await
        .expect("not this mailbox's write: nothing to do");
    assert_eq!(write_record(&store, "write-k1").await, created);
}

async fn delivered_writes_update_the_link_and_end(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    queued(&store, id, &write("e1", WriteOp::Create, "k1"), at(1)).await;
    queued(&store, id, &write("e1", WriteOp::Update, "k2"), at(2)).await;
    let l = lease(&store, id, "w", at(3)).await;

    store
        .record_write(&l, "write-k1", &delivered("g1", "ck1"), at(4))
        .await
        .expect("record");
    let w = write_record(&store, "write-k1").await;
    assert_eq!(
        (w.state, w.graph_event_id.as_deref()),
        (WriteState::Delivered, Some("g1"))
    );
    assert_eq!(
        (w.updated_at, w.delivered_at, w.attempts),
        (at(4), Some(at(4)), 0)
    );
    let link1 = link(&store, id, "e1").await;
    assert_eq!(
        (
            link1.graph_event_id.as_deref(),
            link1.change_key.as_deref(),
            link1.etag.as_deref()
        ),
        (Some("g1"), Some("ck1"), Some("W/\"ck1\""))
    );
    assert_eq!(
        (link1.transaction_id.as_str(), link1.updated_at),
        ("txn-e1", at(4))
    );

    // Recorded again (a repeated job): the first result stands.
    store
        .record_write(
            &l,
            "write-k1",
            &WriteResult::Failed {
                reason: "late".into(),
            },
            at(5),
        )
        .await
        .expect("a no-op");
    assert_eq!(write_record(&store, "write-k1").await, w);
    store
        .record_write(&l, "no-such-write", &delivered("g9", "ck9"), at(5))
        .await
        .expect("a no-op");

    // An update's result carries the new change key; the event id is the link's.
    store
        .record_write(
            &l,
            "write-k2",
            &WriteResult::Delivered {
                graph_event_id: None,
                change_key: Some("ck2".into()),
                etag: Some("W/\"ck2\"".into()),
                fingerprint: None,
                note: Some("attendees unchanged".into()),
            },
            at(6),
        )
        .await
        .expect("record");
    let w = write_record(&store, "write-k2").await;
    assert_eq!(
        (w.state, w.graph_event_id.as_deref()),
        (WriteState::Delivered, Some("g1"))
    );
    assert_eq!(w.note.as_deref(), Some("attendees unchanged"));
    let link2 = link(&store, id, "e1").await;
    assert_eq!(
        (
            link2.graph_event_id.as_deref(),
            link2.change_key.as_deref(),
            link2.cancelled
        ),
        (Some("g1"), Some("ck2"), false)
    );

    // A delivered cancel: the link stays cancelled and keeps its ids.
    queued(&store, id, &write("e1", WriteOp::Cancel, "k3"), at(7)).await;
    store
        .record_write(
            &l,
            "write-k3",
            &WriteResult::Delivered {
                graph_event_id: Some("g1".into()),
                change_key: None,
                etag: None,
                fingerprint: None,
                note: None,
            },
            at(8),
        )
        .await
        .expect("record");
    assert_eq!(
        write_record(&store, "write-k3").await.state,
        WriteState::Delivered
    );
    let link3 = link(&store, id, "e1").await;
    assert!(link3.cancelled);
    assert_eq!(
        (link3.graph_event_id.as_deref(), link3.change_key.as_deref()),
        (Some("g1"), Some("ck2"))
    );
    assert!(pending_ids(&store, id).await.is_empty());
    assert!(matches!(
        enqueue(&store, id, &write("e1", WriteOp::Update, "k4"), at(9)).await,
        Enqueued::EventCancelled
    ));
}

async fn retries_count_attempts_and_stay_queued(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    let w = write("e1", WriteOp::Create, "k1");
    queued(&store, id, &w, at(1)).await;
    let l = lease(&store, id, "w", at(2)).await;
    for (n, reason) in [(3, "timeout"), (4, "503 Service Unavailable")] {
        store
            .record_write(
                &l,
                "write-k1",
                &WriteResult::Retry {
                    reason: reason.into(),
                },
                at(n),
            )
            .await
            .expect("record");
    }
    let record = write_record(&store, "write-k1").await;
    assert_eq!((record.state, record.attempts), (WriteState::Queued, 2));
    assert_eq!(
        (record.last_error.as_deref(), record.updated_at),
        (Some("503 Service Unavailable"), at(4))
    );
    assert_eq!(record.delivered_at, None);
    let pending = store.pending_writes(id, 10).await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].attempts, pending[0].body.as_str()),
        (2, w.body.as_str()),
        "the body is kept for the next try"
    );
    let link = link(&store, id, "e1").await;
    assert_eq!((link.graph_event_id, link.updated_at), (None, at(1)));

    // A later success keeps the count of tries it took.
    store
        .record_write(&l, "write-k1", &delivered("g1", "ck1"), at(5))
        .await
        .expect("record");
    let record = write_record(&store, "write-k1").await;
    assert_eq!((record.state, record.attempts), (WriteState::Delivered, 2));
}

async fn a_conflict_keeps_outlooks_version(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    queued(&store, id, &write("e1", WriteOp::Create, "k1"), at(1)).await;
    queued(&store, id, &write("e1", WriteOp::Update, "k2"), at(2)).await;
    let l = lease(&store, id, "w", at(3)).await;
    store
        .record_write(&l, "write-k1", &delivered("g1", "ck1"), at(4))
        .await
        .expect("record");
    store
        .record_write(
            &l,
            "write-k2",
            &WriteResult::Conflict {
                reason: "changed in Outlook".into(),
                change_key: Some("ck-outlook".into()),
                etag: Some("W/\"outlook\"".into()),
                fingerprint: None,
            },
            at(5),
        )
        .await
        .expect("record");
    let w = write_record(&store, "write-k2").await;
    assert_eq!(
        (w.state, w.conflict.as_deref()),
        (WriteState::Conflict, Some("changed in Outlook"))
    );
    assert_eq!(
        (w.delivered_at, w.graph_event_id.as_deref(), w.updated_at),
        (None, Some("g1"), at(5))
    );
    let link = link(&store, id, "e1").await;
    assert_eq!(
        (
            link.graph_event_id.as_deref(),
            link.change_key.as_deref(),
            link.etag.as_deref()
        ),
        (Some("g1"), Some("ck-outlook"), Some("W/\"outlook\""))
    );
    assert!(pending_ids(&store, id).await.is_empty());
    // The application may write again, from Outlook's version.
    queued(&store, id, &write("e1", WriteOp::Update, "k3"), at(6)).await;
}

async fn a_cancel_that_did_not_happen_reopens_its_appointment(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    queued(&store, id, &write("e1", WriteOp::Create, "k1"), at(1)).await;
    queued(&store, id, &write("e1", WriteOp::Cancel, "k2"), at(2)).await;
    let l = lease(&store, id, "w", at(3)).await;
    store
        .record_write(&l, "write-k1", &delivered("g1", "ck1"), at(4))
        .await
        .expect("record");
    store
        .record_write(
            &l,
            "write-k2",
            &WriteResult::Retry {
                reason: "timeout".into(),
            },
            at(5),
        )
        .await
        .expect("record");
    assert!(
        link(&store, id, "e1").await.cancelled,
        "still being cancelled"
    );
    store
        .record_write(
            &l,
            "write-k2",
            &WriteResult::Failed {
                reason: "403 Forbidden".into(),
            },
            at(6),
        )
        .await
        .expect("record");
    let w = write_record(&store, "write-k2").await;
    assert_eq!(
        (w.state, w.last_error.as_deref()),
        (WriteState::Failed, Some("403 Forbidden"))
    );
    assert!(
        !link(&store, id, "e1").await.cancelled,
        "the event is still in Outlook"
    );
    queued(&store, id, &write("e1", WriteOp::Cancel, "k3"), at(7)).await;
    assert!(link(&store, id, "e1").await.cancelled);
}

async fn concurrent_enqueues_of_one_key_store_one_write(store: Store) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..8 {
        let store = store.clone();
        racers.spawn(async move {
            // Each caller has its own write id, as each API request makes one.
            let w = Write {
                id: format!("racer-{n}"),
                ..write("e1", WriteOp::Create, "k1")
            };
            enqueue(&store, id, &w, t0()).await
        });
    }
    let (mut new, mut replayed) = (Vec::new(), Vec::new());
    while let Some(done) = racers.join_next().await {
        match done.expect("racer") {
            Enqueued::New(record) => new.push(record),
            Enqueued::Replay(record) => replayed.push(record),
            other => panic!("only one new write and replays: {other:?}"),
        }
    }
    assert_eq!((new.len(), replayed.len()), (1, 7));
    assert!(
        replayed.iter().all(|r| *r == new[0]),
        "every replay is the stored write"
    );
    assert_eq!(pending_ids(&store, id).await, [new[0].id.clone()]);
    assert_eq!(
        store
            .writes_of_event(id, "e1", 10)
            .await
            .expect("reads")
            .len(),
        1
    );
}

async fn write_counts_per_tenant_and_ended_writes_pruned(store: Store) {
    let ids = register(
        &store,
        &[("a", "ann"), ("a", "bob"), ("b", "cat"), ("c", "dan")],
    )
    .await;
    let (ann, bob, cat) = (ids[0], ids[1], ids[2]);
    let at = |n| t0() + secs(n);
    assert!(store.write_counts().await.expect("counts").is_empty());
    for (mailbox, external, key, n) in [
        (bob, "e1", "k1", 5),
        (ann, "e1", "k2", 3),
        (ann, "e2", "k3", 4),
        (ann, "e3", "k4", 6),
        (cat, "e1", "k5", 7),
    ] {
        queued(
            &store,
            mailbox,
            &write(external, WriteOp::Create, key),
            at(n),
        )
        .await;
    }
    let a = lease(&store, ann, "w", at(8)).await;
    store
        .record_write(&a, "write-k2", &delivered("g1", "ck"), at(9))
        .await
        .expect("record");
    store
        .record_write(
            &a,
            "write-k3",
            &WriteResult::Failed {
                reason: "400".into(),
            },
            at(9),
        )
        .await
        .expect("record");
    store
        .record_write(
            &a,
            "write-k4",
            &WriteResult::Conflict {
                reason: "changed".into(),
                change_key: None,
                etag: None,
                fingerprint: None,
            },
            at(9),
        )
        .await
        .expect("record");
    let c = lease(&store, cat, "w", at(8)).await;
    store
        .record_write(&c, "write-k5", &delivered("g5", "ck"), at(9))
        .await
        .expect("record");

    let counts = store.write_counts().await.expect("counts");
    assert_eq!(
        counts.get("a"),
        Some(&WriteCounts {
            queued: 1,
            oldest_queued_at: Some(at(5)),
            failed: 1,
            conflict: 1
        })
    );
    assert_eq!(counts.get("b"), None, "all delivered");
    assert_eq!(counts.len(), 1);

    // Ended writes go once they are older than the retention; queued ones and links stay.
    assert_eq!(
        store.prune_writes(at(9)).await.expect("prune"),
        0,
        "none ended before 9"
    );
    assert_eq!(store.prune_writes(at(10)).await.expect("prune"), 4);
    assert_eq!(
        store.write_counts().await.expect("counts").get("a"),
        Some(&WriteCounts {
            queued: 1,
            oldest_queued_at: Some(at(5)),
            failed: 0,
            conflict: 0
        })
    );
    assert!(store
        .write_by_id("write-k2")
        .await
        .expect("reads")
        .is_none());
    assert!(store
        .write_by_id("write-k1")
        .await
        .expect("reads")
        .is_some());
    assert!(store.event_link(ann, "e1").await.expect("reads").is_some());
}

async fn removing_a_mailbox_removes_its_writes_and_links(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    let (ann, bob) = (ids[0], ids[1]);
    queued(&store, ann, &write("e1", WriteOp::Create, "k1"), t0()).await;
    queued(&store, ann, &write("e1", WriteOp::Update, "k2"), t0()).await;
    queued(&store, bob, &write("e1", WriteOp::Create, "b1"), t0()).await;
    assert!(store.remove_mailbox(ann).await.expect("remove"));
    assert!(store
        .write_by_id("write-k1")
        .await
        .expect("reads")
        .is_none());
    assert!(store
        .write_by_id("write-k2")
        .await
        .expect("reads")
        .is_none());
    assert!(store.event_link(ann, "e1").await.expect("reads").is_none());
    assert!(store
        .pending_writes(ann, 10)
        .await
        .expect("reads")
        .is_empty());
    assert_eq!(pending_ids(&store, bob).await, ["write-b1"]);
    assert!(store.event_link(bob, "e1").await.expect("reads").is_some());
    let counts = store.write_counts().await.expect("counts");
    assert_eq!(counts.get("a").map(|c| c.queued), Some(1));
}

/// The body of a write as stored, read past the store.
async fn stored_body(store: &Store, url: &str, id: &str) -> String {
    match store.backend() {
        Backend::Sqlite => {
            let mut db = sqlx::SqliteConnection::connect(url).await.expect("connect");
            sqlx::query_scalar("SELECT body FROM writes WHERE id = ?1")
                .bind(id)
                .fetch_one(&mut db)
                .await
                .expect("body")
        }
        Backend::Postgres => {
            let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query_scalar("SELECT body FROM writes WHERE id = $1")
                .bind(id)
                .fetch_one(&mut db)
                .await
                .expect("body")
        }
    }
}

/// Runs one statement on the store's database, as an operator or another release would.
async fn execute_on(store: &Store, url: &str, sqlite: &str, postgres: &str, version: i64) {
    match store.backend() {
        Backend::Sqlite => {
            let mut db = sqlx::SqliteConnection::connect(url).await.expect("connect");
            sqlx::query(sqlite)
                .bind(version)
                .execute(&mut db)
                .await
                .expect("statement");
        }
        Backend::Postgres => {
            let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query(postgres)
                .bind(version)
                .execute(&mut db)
                .await
                .expect("statement");
        }
    }
}

/// After a rollback, a store that a newer calsync migrated is refused at start, in words that
/// name the migration and where the way back is written down; the store is left as it was and
/// takes this release again once that migration's record is gone (README, "Rolling back a
/// release"). The same for a store whose applied migration has other text than this binary's.
async fn a_store_migrated_by_a_newer_calsync_is_refused_by_name(store: Store, url: String) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let newer = 1_000_i64;
    execute_on(
        &store,
        &url,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (?1, 'from a newer calsync', TRUE, X'00', 0)",
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from a newer calsync', TRUE, '\\x00', 0)",
        newer,
    )
    .await;
    let refused = store.migrate().await.expect_err("a newer store is refused");
    let StoreError::NewerStore { version, latest } = refused else {
        panic!("not NewerStore: {refused:?}");
    };
    assert_eq!(version, newer);
    assert!((10..newer).contains(&latest), "{latest}");
    let said = refused.to_string();
    for words in [
        "migration 1000",
        "a newer calsync has migrated it",
        "\"Rolling back a release\"",
    ] {
        assert!(said.contains(words), "{said:?} does not say {words:?}");
    }
    assert_eq!(
        store.mailboxes().await.expect("reads")[0].id,
        id,
        "nothing lost"
    );
    // The process stops there (and sqlx's migrator keeps its lock on the connection it ran on
    // until that closes): the next attempt is a new process.
    let backend = store.backend();
    store.close().await;

    // The way back: the newer migration's record deleted.
    let store = Store::connect(&url, 2).await.expect("opens");
    assert_eq!(store.backend(), backend);
    execute_on(
        &store,
        &url,
        "DELETE FROM _sqlx_migrations WHERE version = ?1",
        "DELETE FROM _sqlx_migrations WHERE version = $1",
        newer,
    )
    .await;
    store
        .migrate()
        .await
        .expect("this release runs on it again");

    execute_on(
        &store,
        &url,
        "UPDATE _sqlx_migrations SET checksum = X'00' WHERE version = ?1",
        "UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = $1",
        1,
    )
    .await;
    let refused = store
        .migrate()
        .await
        .expect_err("a changed migration is refused");
    assert!(
        matches!(refused, StoreError::ChangedMigration { version: 1 }),
        "{refused:?}"
    );
    assert!(refused
        .to_string()
        .contains("migration 1 is not this calsync's migration 1"));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_store_migrated_by_a_newer_calsync_is_refused_by_name() {
    on_sqlite_at(a_store_migrated_by_a_newer_calsync_is_refused_by_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_store_migrated_by_a_newer_calsync_is_refused_by_name() {
    on_postgres_at(a_store_migrated_by_a_newer_calsync_is_refused_by_name).await;
}

/// Bodies hold personal data: kept while a write may still be sent, dropped when it ends.
async fn an_ended_write_keeps_no_body(store: Store, url: String) {
    let id = register(&store, &[("a", "ann")]).await[0];
    let at = |n| t0() + secs(n);
    let writes = [
        write("e1", WriteOp::Create, "k1"),
        write("e2", WriteOp::Create, "k2"),
        write("e3", WriteOp::Create, "k3"),
        write("e4", WriteOp::Create, "k4"),
    ];
    for w in &writes {
        queued(&store, id, w, at(1)).await;
    }
    let l = lease(&store, id, "w", at(2)).await;
    let results = [
        delivered("g1", "ck1"),
        WriteResult::Failed {
            reason: "400".into(),
        },
        WriteResult::Conflict {
            reason: "changed".into(),
            change_key: None,
            etag: None,
            fingerprint: None,
        },
        WriteResult::Retry {
            reason: "timeout".into(),
        },
    ];
    for (w, result) in writes.iter().zip(&results) {
        store
            .record_write(&l, &w.id, result, at(3))
            .await
            .expect("record");
    }
    for w in &writes[..3] {
        assert_eq!(stored_body(&store, &url, &w.id).await, "{}", "{}", w.id);
    }
    assert_eq!(
        stored_body(&store, &url, "write-k4").await,
        writes[3].body,
        "queued: kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_ended_write_keeps_no_body() {
    on_sqlite_at(an_ended_write_keeps_no_body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_ended_write_keeps_no_body() {
    on_postgres_at(an_ended_write_keeps_no_body).await;
}

/// A job that ended on Graph's Retry-After holds the mailbox until then: a
/// sync request, a change notification's request or an accepted write during or after that
/// job does not bring the next run forward (an early retry is throttled again, and counted
/// against the app). Without such a wait they do.
async fn a_wait_graph_imposed_is_not_cut_short_by_requests_or_writes(store: Store) {
    let ids = register(&store, &[("a", "ann"), ("a", "bob")]).await;
    let (ann, bob) = (ids[0], ids[1]);
    let at = |n| t0() + secs(n);
    let held = |outcome, started, until| JobRecord {
        hold_until: Some(until),
        ..job(outcome, started, until)
    };
    // A request while the job runs, then the job ends on a Retry-After of 300 s.
    let l = lease(&store, ann, "w", at(10)).await;
    store.request_sync(ann, at(11)).await.expect("request");
    store
        .finish_job(&l, &held(RunOutcome::Deferred, at(10), at(312)))
        .await
        .expect("finish");
    assert_eq!(record_of(&store, ann).await.next_run_at, at(312));
    // Requests and writes after it keep the wait.
    store.request_sync(ann, at(20)).await.expect("request");
    store
        .request_syncs(&[ann], at(21))
        .await
        .expect("notification requests");
    queued(&store, ann, &write("e1", WriteOp::Create, "k1"), at(22)).await;
    let m = record_of(&store, ann).await;
    assert_eq!(m.next_run_at, at(312), "held until Graph's time");
    assert!(m.sync_requested_at.is_some(), "the request waits with it");
    assert!(store
        .due_candidates(at(311), 10)
        .await
        .expect("due")
        .iter()
        .all(|d| d.id != ann));
    // A job without an imposed wait lifts the hold: a request makes the mailbox due at once.
    let l = lease(&store, ann, "w", at(320)).await;
    store
        .finish_job(&l, &job(RunOutcome::Ok, at(320), at(620)))
        .await
        .expect("finish");
    store.request_sync(ann, at(330)).await.expect("request");
    assert_eq!(record_of(&store, ann).await.next_run_at, at(330));
    // A write to a mailbox held by nothing is due at once too.
    schedule(&store, bob, at(900)).await;
    queued(&store, bob, &write("e1", WriteOp::Create, "k2"), at(40)).await;
    assert_eq!(record_of(&store, bob).await.next_run_at, at(40));
}

/// Health's numbers come from the store: per tenant the enabled mailboxes counted (never
/// synced, failing, due and not running, quarantined items), the largest lag and the last
/// success, and at most `listed` mailboxes: those whose last job failed or was deferred, most
/// recent first, then the most behind.
async fn tenant_summaries_count_in_the_store_and_list_the_worst_first(store: Store) {
    let ids = register(
        &store,
        &[
            ("a", "ok1"),
            ("a", "ok2"),
            ("a", "failed"),
            ("a", "deferred"),
            ("a", "never"),
            ("a", "gone"),
            ("b", "x"),
        ],
    )
    .await;
    let [ok1, ok2, failed, deferred, never, gone, _] = ids[..] else {
        panic!("seven mailboxes: {ids:?}")
    };
    let now = t0() + secs(100);
    let end = |id, outcome, at: i64, next: i64| {
        let store = store.clone();
        async move {
            let l = lease(&store, id, "w", t0() + secs(at)).await;
            let record = job(outcome, t0() + secs(at), t0() + secs(next));
            store.finish_job(&l, &record).await.expect("job ends");
        }
    };
    end(ok1, RunOutcome::Ok, 8, 1000).await; // success at +10, not due
    end(ok2, RunOutcome::Ok, 20, 50).await; // success at +22, due since +50
    end(failed, RunOutcome::Ok, 5, 0).await;
    end(failed, RunOutcome::Failed, 30, 60).await; // error at +32, due since +60
    end(deferred, RunOutcome::Ok, 5, 0).await;
    end(deferred, RunOutcome::Deferred, 40, 2000).await; // error at +42, not a failure
    lease(&store, never, "w", now - secs(10)).await; // running: due, but not waiting
    let l = lease(&store, failed, "w", t0() + secs(70)).await;
    let round = full_round(&store, &l).await;
    store
        .apply_page(
            &l,
            &round,
            PageWrite {
                quarantined: &[rejected("q1"), rejected("q2")],
                ..PageWrite::default()
            },
            &next("p1"),
            t0() + secs(70),
        )
        .await
        .expect("page with quarantined items");
    store
        .finish_job(
            &l,
            &job(RunOutcome::Failed, t0() + secs(30), t0() + secs(60)),
        )
        .await
        .expect("job ends");
    // Disabled: not counted.
    let keep: Vec<(String, String)> = ["ok1", "ok2", "failed", "deferred", "never"]
        .map(|u| ("a".to_string(), u.to_string()))
        .into_iter()
        .chain([("b".to_string(), "x".to_string())])
        .collect();
    store
        .sync_config_mailboxes(&keep, t0())
        .await
        .expect("config");
    assert!(!record_of_any(&store, gone).await.enabled);

    let summaries = store.tenant_summaries(now, 3).await.expect("summaries");
    let tenants: Vec<&str> = summaries.iter().map(|s| s.tenant.as_str()).collect();
    assert_eq!(tenants, ["a", "b"]);
    let a = &summaries[0];
    assert_eq!(
        (a.mailboxes, a.never_synced, a.failing, a.quarantined),
        (5, 1, 1, 2)
    );
    assert_eq!(
        a.behind_since,
        Some(t0()),
        "`never`, since its registration"
    );
    assert_eq!(a.last_success_at, Some(t0() + secs(22)));
    assert_eq!((a.due, a.oldest_due_at), (2, Some(t0() + secs(50))));
    let worst: Vec<(MailboxId, u64)> = a
        .worst
        .iter()
        .map(|m| (m.record.id, m.quarantined))
        .collect();
    assert_eq!(worst, [(deferred, 0), (failed, 2), (never, 0)]);
    let b = &summaries[1];
    assert_eq!(
        (
            b.mailboxes,
            b.never_synced,
            b.failing,
            b.due,
            b.oldest_due_at
        ),
        (1, 1, 0, 1, Some(t0()))
    );
    assert_eq!(b.worst.len(), 1);

    // All of them, worst first: after the two in error, the most behind.
    let all = store.tenant_summaries(now, 10).await.expect("summaries");
    let order: Vec<MailboxId> = all[0].worst.iter().map(|m| m.record.id).collect();
    assert_eq!(order, [deferred, failed, never, ok1, ok2]);
    // Counts only.
    let counts = store.tenant_summaries(now, 0).await.expect("summaries");
    assert!(counts.iter().all(|s| s.worst.is_empty()));
    assert_eq!((counts[0].mailboxes, counts[0].due), (5, 2));
}

async fn record_of_any(store: &Store, id: MailboxId) -> MailboxRecord {
    store
        .mailbox_by_id(id)
        .await
        .expect("mailbox query")
        .expect("mailbox exists")
}

/// The subscriptions health shows, counted in the store: live, expired, not (yet) held,
/// failing (with at most the number asked for listed), of enabled mailboxes only.
async fn subscription_counts_cover_enabled_mailboxes_only(store: Store) {
    use calsync::store::SubscriptionSaved;
    let ids = register(
        &store,
        &[
            ("a", "live"),
            ("a", "expired"),
            ("a", "failing"),
            ("a", "failing2"),
            ("a", "off"),
        ],
    )
    .await;
    let now = t0() + secs(1000);
    let state = secrecy::SecretString::from("client-state".to_string());
    for (id, expires) in [
        (ids[0], now + secs(60)),
        (ids[1], now - secs(1)),
        (ids[4], now + secs(60)),
    ] {
        assert!(store
            .claim_subscription(id, t0(), t0() + secs(30))
            .await
            .expect("claims"));
        let saved = SubscriptionSaved {
            subscription_id: &format!("sub-{id}"),
            client_state: Some(&state),
            expires_at: expires,
            created: true,
        };
        store
            .subscription_saved(id, &saved, t0())
            .await
            .expect("saved");
    }
    for id in [ids[2], ids[3]] {
        assert!(store
            .claim_subscription(id, t0(), t0() + secs(30))
            .await
            .expect("claims"));
        store
            .subscription_failed(id, "Graph answered 503", t0(), now)
            .await
            .expect("failure recorded");
    }
    // `off` leaves the config: its live subscription is not counted.
    let keep: Vec<(String, String)> = ["live", "expired", "failing", "failing2"]
        .map(|u| ("a".to_string(), u.to_string()))
        .into();
    store
        .sync_config_mailboxes(&keep, t0())
        .await
        .expect("config");

    let counts = store.subscription_counts(now, 1).await.expect("counts");
    assert_eq!(
        (
            counts.rows,
            counts.active,
            counts.expired,
            counts.without,
            counts.failing
        ),
        (4, 1, 1, 2, 2)
    );
    let listed: Vec<MailboxId> = counts.failures.iter().map(|r| r.mailbox_id).collect();
    assert_eq!(listed, [ids[2]], "at most one, by mailbox");
    assert_eq!(
        counts.failures[0].last_error.as_deref(),
        Some("Graph answered 503")
    );
}
