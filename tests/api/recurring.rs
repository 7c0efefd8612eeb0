//! Recurring series as Graph sends them: occurrence stubs stored complete from their master,
//! masters kept apart and fetched at most once per round; and the simulator held to the shapes
//! of `fixtures/graph/recurring/` (Microsoft's samples and the public reports, see its README).

use std::collections::{BTreeSet, HashSet};

use calsync::graph::model::MASTER_SELECT;
use calsync::graph::Event;
use calsync::sim::{FaultKind, FaultRule, SimConfig, GRAPH_SCOPE};
use calsync::store::RunOutcome;
use chrono::{NaiveDate, TimeZone, Utc};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::sim::{fast, sim_app, world, SimApp};
use crate::helpers::*;

const WEEKLY: &str = "AAMkADSeriesMasterWeekly=";
const ALL_DAY: &str = "AAMkADSeriesMasterAllDay=";
const OCC_1207: &str = "AAMkADSeriesOccurrence=20261207";
const OCC_1214: &str = "AAMkADSeriesOccurrence=20261214";
const OCC_1228: &str = "AAMkADSeriesOccurrence=20261228";
const EXCEPTION: &str = "AAMkADSeriesException=20261221";
const ALL_DAY_1201: &str = "AAMkADSeriesOccurrence=allday20261201";
const ALL_DAY_1202: &str = "AAMkADSeriesOccurrence=allday20261202";
const SINGLE: &str = "AAMkADNVxRAAA=";

fn master_path(id: &str) -> String {
    format!("/v1.0/users/{ALICE}/events/{id}")
}

/// Graph answers one GET of the weekly series' master (with the `$select` calsync sends) with
/// `status` and the fixture; exactly one such request must come.
async fn mount_master_once(app: &TestApp, status: u16, fixture: &str) {
    Mock::given(method("GET"))
        .and(path(master_path(WEEKLY)))
        .and(param("$select", MASTER_SELECT))
        .respond_with(ResponseTemplate::new(status).set_body_json(app.fixture(fixture)))
        .expect(1)
        .mount(&app.graph)
        .await;
}

/// The three pages of `fixtures/graph/recurring/page*.json` for Alice's first round.
async fn mount_recurring_round(app: &TestApp) {
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/recurring/page1.json")),
        )
        .mount(&app.graph)
        .await;
    for (token, page) in [
        ("R0usmcRecur-page2", "graph/recurring/page2.json"),
        ("R0usmcRecur-page3", "graph/recurring/page3.json"),
    ] {
        Mock::given(method("GET"))
            .and(path(DELTA_PATH))
            .and(param("$skiptoken", token))
            .respond_with(ResponseTemplate::new(200).set_body_json(app.fixture(page)))
            .mount(&app.graph)
            .await;
    }
}

async fn mount_incremental(app: &TestApp) {
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmcRecur-round1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(app.fixture("graph/recurring/incremental.json")),
        )
        .mount(&app.graph)
        .await;
}

/// After the first round: a Graph that has both rounds mounted, and calsync past round one.
/// The tenant's breaker needs more evidence than one mailbox's failing fetches give: these
/// tests are about what a page writes.
async fn after_first_round() -> TestApp {
    let app = spawn_app_with(|toml| {
        toml.replace("[resilience]\n", "[resilience]\nbreaker_min_calls = 50\n")
    })
    .await;
    app.mount_token_ok().await;
    mount_recurring_round(&app).await;
    let first = app.sync_alice().await;
    assert_eq!(first.outcome, RunOutcome::Ok, "{:?}", first.error);
    app
}

fn by_id<'a>(events: &'a [Event], id: &str) -> &'a Event {
    events
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("{id} is stored"))
}

fn addresses(event: &Event) -> Vec<String> {
    event
        .attendees
        .to_value()
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_graph_shaped_round_stores_every_occurrence_complete_and_no_master() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    mount_recurring_round(&app).await;
    // Both masters come in the round itself: none is fetched.
    Mock::given(method("GET"))
        .and(path(master_path(WEEKLY)))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert_eq!(result.report.master_requests, 0);

    let events = app.events(ALICE).await;
    let ids: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            SINGLE,
            OCC_1207,
            OCC_1214,
            OCC_1228,
            EXCEPTION,
            ALL_DAY_1201,
            ALL_DAY_1202
        ]),
        "every instance once; no series master as a calendar entry (no 2019 ghost)"
    );

    for id in [OCC_1207, OCC_1214, OCC_1228] {
        let o = by_id(&events, id);
        assert_eq!(o.event_type.as_deref(), Some("occurrence"));
        assert_eq!(o.series_master_id.as_deref(), Some(WEEKLY));
        assert_eq!(o.subject.as_deref(), Some("Weekly team sync"), "{id}");
        assert_eq!(o.organizer_name.as_deref(), Some("Carol Diaz"));
        assert_eq!(o.organizer_address.as_deref(), Some("carol@contoso.com"));
        assert_eq!(addresses(o), ["alice@contoso.com", "bob@contoso.com"]);
        assert_eq!(o.show_as.as_deref(), Some("busy"));
        assert_eq!(o.sensitivity.as_deref(), Some("normal"));
        assert_eq!(o.location.as_deref(), Some("Room 12"));
        assert_eq!(o.categories, ["Blue category"]);
        assert_eq!(
            o.change_key.as_deref(),
            Some("DwAAABYAAAC9YbapXssvT4RTG13UUr6AAAhT48i7")
        );
        assert!(!o.is_all_day);
        assert_eq!(
            o.ical_uid, None,
            "Graph gives each occurrence its own iCalUId"
        );
        let raw: Value = serde_json::from_str(&o.raw).expect("raw JSON");
        assert_eq!(raw.as_object().map(|r| r.len()), Some(7), "raw is the stub");
    }
    let first = by_id(&events, OCC_1207);
    assert_eq!(
        (first.start_utc, first.end_utc),
        (
            Utc.with_ymd_and_hms(2026, 12, 7, 9, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 7, 9, 30, 0).unwrap()
        ),
        "an occurrence keeps its own times, not its master's 2019 ones"
    );

    let exception = by_id(&events, EXCEPTION);
    assert_eq!(exception.event_type.as_deref(), Some("exception"));
    assert_eq!(
        exception.subject.as_deref(),
        Some("Weekly team sync (moved for the offsite)")
    );
    assert_eq!(exception.show_as.as_deref(), Some("tentative"));

    for (id, day) in [(ALL_DAY_1201, 1), (ALL_DAY_1202, 2)] {
        let o = by_id(&events, id);
        assert!(o.is_all_day, "{id} takes isAllDay from its master");
        assert_eq!(o.start_date, NaiveDate::from_ymd_opt(2026, 12, day));
        assert_eq!(o.end_date, NaiveDate::from_ymd_opt(2026, 12, day + 1));
        assert_eq!(o.subject.as_deref(), Some("On call"));
        assert_eq!(o.show_as.as_deref(), Some("free"));
        assert_eq!(o.sensitivity.as_deref(), Some("private"));
    }

    let single = by_id(&events, SINGLE);
    assert_eq!(single.subject.as_deref(), Some("Plan shopping list"));

    let record = app.mailbox(ALICE).await;
    let masters = app
        .store
        .series_masters(record.id, &[WEEKLY, ALL_DAY])
        .await
        .expect("reads");
    assert_eq!(masters.len(), 2, "both masters are kept apart");
}

#[tokio::test]
async fn stubs_without_their_master_fetch_it_once_and_a_rename_reaches_every_occurrence() {
    let app = after_first_round().await;
    mount_incremental(&app).await;
    mount_master_once(&app, 200, "graph/recurring/master_renamed.json").await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmcRecur-round2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "@odata.deltaLink": format!(
                "{}/users/{ALICE}/calendarView/delta?$deltatoken=R0usmcRecur-round3",
                app.base()
            ),
            "value": []
        })))
        .mount(&app.graph)
        .await;

    let second = app.sync_alice().await;
    assert_eq!(second.outcome, RunOutcome::Ok, "{:?}", second.error);
    assert_eq!(second.report.master_requests, 1);

    let events = app.events(ALICE).await;
    assert!(
        events.iter().all(|e| e.id != OCC_1228),
        "the removed occurrence is gone"
    );
    // OCC_1207 came as a stub; OCC_1214 did not come at all: both follow the renamed master.
    for id in [OCC_1207, OCC_1214] {
        let o = by_id(&events, id);
        assert_eq!(
            o.subject.as_deref(),
            Some("Weekly team sync (now with Fabrikam)"),
            "{id}"
        );
        assert_eq!(o.show_as.as_deref(), Some("tentative"));
        assert_eq!(o.location.as_deref(), Some("Teams"));
        assert_eq!(o.categories, ["Blue category", "Customer"]);
        assert_eq!(addresses(o), ["alice@contoso.com", "dana@fabrikam.com"]);
        assert_eq!(
            o.change_key.as_deref(),
            Some("DwAAABYAAAC9YbapXssvT4RTG13UUr6AAAkR2m9x")
        );
    }
    assert_eq!(
        by_id(&events, OCC_1214).start_utc,
        Utc.with_ymd_and_hms(2026, 12, 14, 9, 0, 0).unwrap()
    );
    // An exception keeps its own fields; the other series is untouched.
    assert_eq!(
        by_id(&events, EXCEPTION).subject.as_deref(),
        Some("Weekly team sync (moved for the offsite)")
    );
    assert_eq!(
        by_id(&events, ALL_DAY_1201).subject.as_deref(),
        Some("On call")
    );

    // A round in which the series does not appear fetches nothing (expect(1) holds on drop).
    let third = app.sync_alice().await;
    assert_eq!(third.outcome, RunOutcome::Ok, "{:?}", third.error);
    assert_eq!(third.report.master_requests, 0);
}

#[tokio::test]
async fn a_series_whose_master_is_gone_is_removed_with_all_its_instances() {
    let app = after_first_round().await;
    mount_incremental(&app).await;
    mount_master_once(&app, 404, "graph/recurring/item_not_found.json").await;

    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    let ids: BTreeSet<String> = app.event_ids(ALICE).await.into_iter().collect();
    assert_eq!(
        ids,
        BTreeSet::from([SINGLE.into(), ALL_DAY_1201.into(), ALL_DAY_1202.into()]),
        "the weekly series went, its exception too"
    );
    let record = app.mailbox(ALICE).await;
    let masters = app
        .store
        .series_masters(record.id, &[WEEKLY, ALL_DAY])
        .await
        .expect("reads");
    assert!(!masters.contains_key(WEEKLY) && masters.contains_key(ALL_DAY));
}

#[tokio::test]
async fn a_failed_master_fetch_writes_nothing_and_the_round_resumes_from_the_same_link() {
    let app = after_first_round().await;
    assert_eq!(app.settings.resilience.breaker.min_calls, 50);
    let before = app.events(ALICE).await;
    let link_before = app.mailbox(ALICE).await.cursor.delta_link;
    mount_incremental(&app).await;
    Mock::given(method("GET"))
        .and(path(master_path(WEEKLY)))
        .respond_with(ResponseTemplate::new(503).set_body_json(graph_error(
            "ServiceNotAvailable",
            "The service is temporarily unavailable.",
        )))
        .mount(&app.graph)
        .await;

    let failed = app.sync_alice().await;
    assert_eq!(failed.outcome, RunOutcome::Failed, "{:?}", failed.error);
    assert_eq!(failed.report.pages, 0, "the page did not commit");
    assert_eq!(app.events(ALICE).await, before, "nothing half-written");
    assert_eq!(app.mailbox(ALICE).await.cursor.delta_link, link_before);

    // Graph is back: the next job replays the same link and completes the round.
    app.graph.reset().await;
    app.mount_token_ok().await;
    mount_incremental(&app).await;
    mount_master_once(&app, 200, "graph/recurring/master_renamed.json").await;
    let resumed = app.sync_alice().await;
    assert_eq!(resumed.outcome, RunOutcome::Ok, "{:?}", resumed.error);
    let events = app.events(ALICE).await;
    assert_eq!(
        by_id(&events, OCC_1214).subject.as_deref(),
        Some("Weekly team sync (now with Fabrikam)")
    );
}

// ---- the simulator against the fixtures ----------------------------------------------------

fn keys(item: &Value) -> BTreeSet<String> {
    item.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/fixtures/graph/recurring/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn fixture_item(page: &str, pick: impl Fn(&Value) -> bool) -> Value {
    fixture(page)["value"]
        .as_array()
        .and_then(|items| items.iter().find(|i| pick(i)).cloned())
        .unwrap_or_else(|| panic!("{page} has such an item"))
}

struct RawGraph {
    http: reqwest::Client,
    token: String,
    base: String,
}

impl RawGraph {
    async fn connect(app: &SimApp) -> Self {
        let http = reqwest::Client::new();
        let tenant = app.sim.tenants()[0].clone();
        let body: Value = http
            .post(app.sim.token_url(&tenant.tenant_id))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", tenant.client_id.as_str()),
                ("client_secret", tenant.client_secret.as_str()),
                ("scope", GRAPH_SCOPE),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token JSON");
        Self {
            http,
            token: body["access_token"].as_str().expect("token").to_string(),
            base: app.sim.graph_base_url(),
        }
    }

    async fn get(&self, url: &str) -> (u16, Value) {
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .header("Prefer", "odata.maxpagesize=100")
            .header("Prefer", "outlook.timezone=\"UTC\"")
            .send()
            .await
            .expect("Graph request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// A whole round from `url`: every page's body, and the deltaLink.
    async fn round(&self, url: &str) -> (Vec<Value>, String) {
        let mut pages = Vec::new();
        let mut url = url.to_string();
        loop {
            let (status, page) = self.get(&url).await;
            assert_eq!(status, 200, "{url}: {page}");
            pages.push(page.clone());
            match page["@odata.nextLink"].as_str() {
                Some(next) => url = next.to_string(),
                None => {
                    let delta = page["@odata.deltaLink"].as_str().expect("deltaLink");
                    return (pages, delta.to_string());
                }
            }
        }
    }
}

fn items(pages: &[Value]) -> Vec<Value> {
    pages
        .iter()
        .flat_map(|p| p["value"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn the_simulator_answers_in_the_shapes_of_the_fixtures() {
    let app = sim_app(world(1, 1, 80), fast).await;
    let mailbox = app.mailbox_names()[0].clone();
    let graph = RawGraph::connect(&app).await;
    let start = format!(
        "{}/users/{mailbox}/calendarView/delta?startDateTime=2000-01-01T00:00:00Z&endDateTime=2100-01-01T00:00:00Z",
        graph.base
    );
    let (pages, delta) = graph.round(&start).await;
    let all = items(&pages);
    let of_type = |t: &str| -> Vec<&Value> { all.iter().filter(|i| i["type"] == t).collect() };

    // An occurrence is exactly the stub of the public reports, nothing more, nothing less.
    let stub = keys(&fixture_item("page1.json", |i| i["type"] == "occurrence"));
    let stubs = of_type("occurrence");
    assert!(!stubs.is_empty());
    for item in &stubs {
        assert_eq!(keys(item), stub, "{item}");
    }
    // Full items carry at least what Microsoft's samples show.
    for (kind, page) in [("seriesMaster", "page1.json"), ("exception", "page1.json")] {
        let want = keys(&fixture_item(page, |i| i["type"] == kind));
        let got = of_type(kind);
        assert!(!got.is_empty(), "the simulator sends {kind} items");
        for item in got {
            assert!(
                keys(item).is_superset(&want),
                "{kind}: missing {:?}",
                want.difference(&keys(item)).collect::<Vec<_>>()
            );
        }
    }
    let sample_single = keys(&fixture_item("page1.json", |i| i["id"] == SINGLE));
    for item in of_type("singleInstance") {
        assert!(keys(item).is_superset(&sample_single), "{item}");
    }
    // A master is dated at its first occurrence, also for the series begun before the window.
    let masters = of_type("seriesMaster");
    assert!(masters.iter().all(|m| m["recurrence"].is_object()));

    // GET /events/{id}?$select: the selected properties, the etag, the id and the context.
    let master_id = masters[0]["id"].as_str().expect("id");
    let url = format!(
        "{}/users/{mailbox}/events/{}?$select={MASTER_SELECT}",
        graph.base,
        url::form_urlencoded::byte_serialize(master_id.as_bytes()).collect::<String>()
    );
    let (status, master) = graph.get(&url).await;
    assert_eq!(status, 200, "{master}");
    assert_eq!(keys(&master), keys(&fixture("master_renamed.json")));
    let (status, missing) = graph
        .get(&format!(
            "{}/users/{mailbox}/events/AAMkADnotthere=",
            graph.base
        ))
        .await;
    assert_eq!(status, 404);
    assert_eq!(keys(&missing), keys(&fixture("item_not_found.json")));
    assert_eq!(
        keys(&missing["error"]),
        keys(&fixture("item_not_found.json")["error"])
    );
    assert_eq!(missing["error"]["code"], "ErrorItemNotFound");

    // A deleted series: `@removed` in the shape of the docs' sample.
    assert!(app.sim.delete_series(&mailbox, master_id));
    let (next, _) = graph.round(&delta).await;
    let removed = keys(&fixture_item("incremental.json", |i| {
        i.get("@removed").is_some()
    }));
    let gone = items(&next);
    assert!(gone.iter().any(|i| i["id"] == master_id));
    for item in &gone {
        assert_eq!(keys(item), removed, "{item}");
    }

    // An empty page that still has a nextLink.
    let fault = app
        .sim
        .add_fault(FaultRule::new(FaultKind::EmptyPages { n: 1 }).mailbox(&mailbox));
    let (status, empty) = graph.get(&start).await;
    app.sim.remove_fault(fault);
    assert_eq!(status, 200);
    assert_eq!(keys(&empty), keys(&fixture("page2.json")));
    assert_eq!(empty["value"], json!([]));
}

/// Requests the simulator answered on the events endpoint (master fetches) for `mailbox`.
fn master_requests(app: &SimApp, mailbox: &str) -> u64 {
    app.sim.stats().mailboxes[mailbox]
        .by_endpoint
        .get("event")
        .map(|by_status| by_status.values().sum())
        .unwrap_or(0)
}

#[tokio::test]
async fn one_master_request_per_series_a_round_meets_and_none_for_a_round_without_it() {
    // A Graph that never lists masters in delta: every series must be fetched.
    let config = SimConfig {
        masters_in_delta: false,
        ..world(1, 1, 120)
    };
    let app = sim_app(config, fast).await;
    let mailbox = app.mailbox_names()[0].clone();

    let first = app.pass_ok().await;
    let window = app.record(&mailbox).await.cursor.window.expect("window");
    let truth = app.sim.truth(&mailbox, Some((window.start, window.end)));
    let series: HashSet<&str> = truth
        .iter()
        .filter(|e| e["type"] == "occurrence")
        .filter_map(|e| e["seriesMasterId"].as_str())
        .collect();
    let occurrences = truth.iter().filter(|e| e["type"] == "occurrence").count();
    assert!(
        occurrences > 2 * series.len(),
        "series have many occurrences over several pages"
    );
    assert_eq!(first[&mailbox].report.master_requests, series.len() as u64);
    assert_eq!(master_requests(&app, &mailbox), series.len() as u64);
    app.assert_matches_truth(&mailbox).await;

    // A round in which no series appears fetches no master.
    let single = truth
        .iter()
        .find(|e| e["type"] == "singleInstance")
        .and_then(|e| e["id"].as_str())
        .expect("a single event");
    let later = window.start + chrono::Duration::days(1);
    assert!(app.sim.move_event(&mailbox, single, later));
    let second = app.pass_ok().await;
    assert_eq!(second[&mailbox].report.master_requests, 0);
    assert_eq!(master_requests(&app, &mailbox), series.len() as u64);

    // A renamed series: its stubs come back without the master, which is fetched once.
    let renamed = *series.iter().next().expect("a series");
    assert!(app.sim.rename_series(&mailbox, renamed));
    let third = app.pass_ok().await;
    assert_eq!(third[&mailbox].report.master_requests, 1);
    app.assert_matches_truth(&mailbox).await;
}

#[tokio::test]
async fn a_renamed_and_a_deleted_series_are_right_in_the_store_after_one_round() {
    let app = sim_app(world(1, 1, 120), fast).await;
    let mailbox = app.mailbox_names()[0].clone();
    app.pass_ok().await;
    app.assert_matches_truth(&mailbox).await;
    let window = app.record(&mailbox).await.cursor.window.expect("window");
    let in_window: Vec<String> = app
        .sim
        .truth(&mailbox, Some((window.start, window.end)))
        .iter()
        .filter(|e| e["type"] == "occurrence")
        .filter_map(|e| e["seriesMasterId"].as_str().map(str::to_string))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(in_window.len() >= 2, "two series to change");

    assert!(app.sim.rename_series(&mailbox, &in_window[0]));
    assert!(app.sim.delete_series(&mailbox, &in_window[1]));
    let round = app.pass_ok().await;
    assert_eq!(
        round[&mailbox].report.master_requests, 0,
        "the master came in the delta"
    );
    app.assert_matches_truth(&mailbox).await;
    let stored = app.stored(&mailbox).await;
    assert!(stored
        .values()
        .any(|e| e.subject.as_deref().is_some_and(|s| s.contains("renamed"))));
    assert!(stored
        .values()
        .all(|e| e.series_master_id.as_deref() != Some(in_window[1].as_str())));
    assert_eq!(master_requests(&app, &mailbox), 0);
}
