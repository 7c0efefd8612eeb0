//! The status page at `/`: one server-rendered HTML page over the same data as `/healthz`,
//! refreshed by the browser every few seconds (`<meta http-equiv="refresh">`, no JavaScript).
//! Everything that came from outside (tenant and mailbox names, error text, request ids) is
//! HTML-escaped; errors are calsync's stored messages, which never hold a secret or a token.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::{Health, MailboxHealth, TenantHealth};
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::BreakerSnapshot;

/// Seconds between refreshes.
pub const REFRESH_SECONDS: u32 = 5;
/// The page is one document with an inline stylesheet and no script, image, form or frame:
/// anything else that found its way in (an unescaped value) would not run or load, and no other
/// site may frame it (clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Rows in "most behind" and "recent errors".
const BEHIND_ROWS: usize = 10;
const ERROR_ROWS: usize = 15;
/// Error messages are cut here on the page (the full text is in `/healthz` and the logs).
const ERROR_CHARS: usize = 300;

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
header{display:flex;align-items:center;gap:12px;padding:14px 24px;background:#1d2430;color:#fff}
header h1{font-size:20px;margin:0}
header .checked{margin-left:auto;color:#b8c2d0;font-size:13px}
main{padding:8px 24px 24px}
h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e4e8ee;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#4a5568}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok,.closed{background:#d9f2e3;color:#17603a}
.degraded,.half_open{background:#fff0c7;color:#7a5300}
.open,.unavailable,.stuck{background:#fde0df;color:#9b1c1c}
.muted{color:#6b7685;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:14px}
.card{background:#fff;padding:8px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:120px}
.card b{display:block;font-size:20px}
.error{max-width:640px}
footer{padding:0 24px 24px;color:#6b7685;font-size:12px}
"#;

/// `text` safe inside HTML text and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// "3h 02m", "4m 05s", "12s", "0.4s".
pub fn short_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 10.0 && seconds.fract() != 0.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn ago(now: DateTime<Utc>, at: Option<DateTime<Utc>>) -> String {
    match at {
        Some(at) => format!(
            "{} ago",
            short_duration((now - at).num_milliseconds().max(0) as f64 / 1000.0)
        ),
        None => "never".into(),
    }
}

fn page(title_status: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>calsync: {}</title><style>{STYLE}</style></head>\n<body>{body}</body></html>\n",
        escape(title_status)
    )
}

/// The page when the store does not answer.
pub fn render_unavailable(reason: &str) -> String {
    page(
        "unavailable",
        &format!(
            "<header><h1>calsync</h1><span class=\"badge unavailable\" id=\"overall\">unavailable</span></header>\
<main><p>The store does not answer: {}</p></main>",
            escape(reason)
        ),
    )
}

pub fn render(health: &Health) -> String {
    let now = health.checked_at;
    let mut b = String::new();
    let _ = write!(
        b,
        "<header><h1>calsync</h1><span class=\"badge {s}\" id=\"overall\" data-status=\"{s}\">{s}</span>\
<span class=\"checked\">checked {} &middot; refreshes every {REFRESH_SECONDS}s</span></header><main>",
        time(now),
        s = health.status,
    );
    summary(&mut b, health);
    tenants(&mut b, &health.tenants, now);
    most_behind(&mut b, &health.tenants, now);
    recent_errors(&mut b, &health.tenants, now);
    stuck(&mut b, health);
    b.push_str(
        "</main><footer>Detail as JSON: <a href=\"/healthz\">/healthz</a> &middot; \
Prometheus: <a href=\"/metrics\">/metrics</a></footer>",
    );
    page(health.status, &b)
}

fn summary(b: &mut String, health: &Health) {
    let w = &health.jobs.worker;
    let cards = [
        ("Workers busy", format!("{} / {}", w.busy_slots, w.workers)),
        ("Running jobs", w.running.len().to_string()),
        ("Longest running", short_duration(w.longest_running_seconds)),
        (
            "Oldest due job",
            short_duration(health.jobs.oldest_due_seconds as f64),
        ),
        (
            "Held by breakers",
            health.jobs.deferred_by_breaker.to_string(),
        ),
        ("Stuck jobs (total)", w.stuck_total.to_string()),
        ("Live replicas", health.fleet.live_replicas.to_string()),
        (
            "This replica's share of the app rate",
            format!("{:.1} req/s", health.fleet.app_requests_per_second),
        ),
    ];
    b.push_str("<section class=\"cards\" id=\"jobs\">");
    for (label, value) in cards {
        let _ = write!(
            b,
            "<div class=\"card\"><b>{}</b><span class=\"muted\">{}</span></div>",
            escape(&value),
            escape(label)
        );
    }
    b.push_str("</section>");
}

fn breaker_cell(breaker: Option<&BreakerSnapshot>) -> String {
    let Some(br) = breaker else {
        return "<td>-</td>".into();
    };
    let state = br.state.as_str();
    let mut detail = format!("for {}", short_duration(br.since_seconds as f64));
    if br.state == BreakerState::Open {
        if let Some(probe) = br.probe_in_seconds {
            let _ = write!(detail, ", probe in {}", short_duration(probe as f64));
        }
    }
    if br.permanent {
        detail.push_str(", credentials rejected");
    }
    if br.trips > 0 {
        let _ = write!(detail, ", {} trips", br.trips);
    }
    format!(
        "<td data-breaker=\"{dep}\" data-state=\"{state}\"><span class=\"badge {state}\">{}</span> <span class=\"muted\">{}</span></td>",
        state.replace('_', "-"),
        escape(&detail),
        dep = br.dependency.as_str(),
    )
}

fn tenants(b: &mut String, tenants: &[TenantHealth], now: DateTime<Utc>) {
    b.push_str(
        "<h2>Tenants</h2><table id=\"tenants\"><thead><tr><th>Tenant</th><th>Status</th>\
<th>Token endpoint</th><th>Graph</th><th>Mailboxes</th><th>Failing</th><th>Never synced</th>\
<th>Max lag</th><th>Last success</th><th>Token</th></tr></thead><tbody>",
    );
    for t in tenants {
        let find = |dep| t.breakers.iter().find(|br| br.dependency == dep);
        let last_success = t.last_success_at;
        let token = match &t.token {
            Some(s) if s.using_extended_lifetime => "cached, past expiry (grace)".to_string(),
            Some(s) if s.cached => format!(
                "cached, expires in {}",
                short_duration(s.expires_in_secs.unwrap_or(0) as f64)
            ),
            Some(_) => "none".into(),
            None => "-".into(),
        };
        let mut status = if t.auth_failing_permanently {
            format!(
                "<span class=\"badge {s}\">{s}</span> <span class=\"badge open\">auth failing</span>",
                s = t.status
            )
        } else {
            format!("<span class=\"badge {s}\">{s}</span>", s = t.status)
        };
        if t.quarantined > 0 {
            let _ = write!(
                status,
                " <span class=\"badge half_open\" title=\"items Graph sent that calsync could not understand; GET /v1/mailboxes/{{id}}/quarantine\">{} quarantined</span>",
                t.quarantined
            );
        }
        let _ = write!(
            b,
            "<tr data-tenant=\"{name}\" data-status=\"{}\"><td><b>{name}</b></td><td>{status}</td>{}{}\
<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
<td>{}</td><td class=\"muted\">{}</td></tr>",
            t.status,
            breaker_cell(find(crate::resilience::guard::Dependency::Token)),
            breaker_cell(find(crate::resilience::guard::Dependency::Graph)),
            t.mailboxes,
            t.failing,
            t.never_synced,
            short_duration(t.max_lag_seconds as f64),
            ago(now, last_success),
            escape(&token),
            name = escape(&t.name),
        );
    }
    b.push_str("</tbody></table>");
}

fn all_mailboxes(tenants: &[TenantHealth]) -> Vec<(&str, &MailboxHealth)> {
    tenants
        .iter()
        .flat_map(|t| t.mailbox_detail.iter().map(move |m| (t.name.as_str(), m)))
        .collect()
}

fn most_behind(b: &mut String, tenants: &[TenantHealth], now: DateTime<Utc>) {
    let mut rows = all_mailboxes(tenants);
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.lag_seconds));
    b.push_str(
        "<h2>Mailboxes most behind</h2><table id=\"behind\"><thead><tr><th>Tenant</th><th>Mailbox</th>\
<th>Lag</th><th>Last success</th><th>Failures in a row</th><th>Next run</th></tr></thead><tbody>",
    );
    for (tenant, m) in rows.into_iter().take(BEHIND_ROWS) {
        let next = if m.running {
            "running".to_string()
        } else if m.next_run_at <= now {
            "due".to_string()
        } else {
            format!(
                "in {}",
                short_duration((m.next_run_at - now).num_milliseconds() as f64 / 1000.0)
            )
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td>\
<td class=\"num\">{}</td><td>{}</td></tr>",
            escape(tenant),
            escape(&m.mailbox),
            short_duration(m.lag_seconds as f64),
            ago(now, m.last_success_at),
            m.consecutive_failures,
            escape(&next),
        );
    }
    b.push_str("</tbody></table>");
    let omitted: u64 = tenants.iter().map(|t| t.mailbox_detail_omitted).sum();
    if omitted > 0 {
        let _ = write!(
            b,
            "<p class=\"muted\" id=\"omitted\">From each tenant's {} worst mailboxes; {omitted} \
more are counted above, not listed (all of them: <code>GET /v1/mailboxes</code>).</p>",
            super::MAILBOX_DETAIL_PER_TENANT,
        );
    }
}

fn recent_errors(b: &mut String, tenants: &[TenantHealth], now: DateTime<Utc>) {
    let mut rows: Vec<_> = all_mailboxes(tenants)
        .into_iter()
        // Deferrals too: their reason (open breaker, Retry-After) is what an operator wants.
        .filter(|(_, m)| m.last_error.is_some() && m.last_error_at > m.last_success_at)
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.last_error_at));
    b.push_str("<h2>Recent errors</h2>");
    if rows.is_empty() {
        b.push_str("<p class=\"muted\" id=\"no-errors\">No mailbox is failing or deferred.</p>");
        return;
    }
    b.push_str(
        "<table id=\"errors\"><thead><tr><th>When</th><th>Tenant</th><th>Mailbox</th>\
<th>Error</th><th>Last Graph request-id</th></tr></thead><tbody>",
    );
    for (tenant, m) in rows.into_iter().take(ERROR_ROWS) {
        let error: String = m
            .last_error
            .as_deref()
            .unwrap_or_default()
            .chars()
            .take(ERROR_CHARS)
            .collect();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"error\">{}</td><td><code>{}</code></td></tr>",
            ago(now, m.last_error_at),
            escape(tenant),
            escape(&m.mailbox),
            escape(&error),
            escape(m.last_request_id.as_deref().unwrap_or("-")),
        );
    }
    b.push_str("</tbody></table>");
}

fn stuck(b: &mut String, health: &Health) {
    let recent = &health.jobs.worker.stuck_recent;
    if recent.is_empty() {
        return;
    }
    b.push_str(
        "<h2>Stuck jobs</h2><table id=\"stuck\"><thead><tr><th>Detected</th><th>Tenant</th>\
<th>Mailbox</th><th>Running for</th><th>Ended after</th></tr></thead><tbody>",
    );
    for s in recent.iter().rev() {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td></tr>",
            time(s.detected_at),
            escape(&s.tenant),
            escape(&s.mailbox),
            short_duration(s.running_seconds),
            s.finished_after_seconds
                .map_or("<span class=\"badge stuck\">still running</span>".to_string(), short_duration),
        );
    }
    b.push_str("</tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::JobsHealth;
    use crate::resilience::guard::Dependency;
    use crate::scheduler::WorkerStatus;

    fn health(error: &str, mailbox: &str) -> Health {
        let now = Utc::now();
        Health {
            status: "degraded",
            checked_at: now,
            replica: "calsync-test".into(),
            jobs: JobsHealth {
                worker: WorkerStatus {
                    workers: 4,
                    busy_slots: 0,
                    running: Vec::new(),
                    longest_running_seconds: 0.0,
                    stuck_total: 0,
                    stuck_recent: Vec::new(),
                },
                oldest_due_seconds: 0,
                deferred_by_breaker: 1,
            },
            fleet: crate::resilience::limits::ShareStatus {
                live_replicas: 1,
                replicas: Some(1),
                app_requests_per_second: 2000.0,
                tenant_requests_per_second: 200.0,
                app_limit_per_second: 2000,
                tenant_limit_per_second: 200,
            },
            tenants: vec![TenantHealth {
                name: "contoso".into(),
                status: "degraded",
                breakers: vec![
                    BreakerSnapshot {
                        dependency: Dependency::Token,
                        state: BreakerState::Open,
                        permanent: false,
                        since_seconds: 42,
                        probe_in_seconds: Some(7),
                        trips: 2,
                    },
                    BreakerSnapshot {
                        dependency: Dependency::Graph,
                        state: BreakerState::Closed,
                        permanent: false,
                        since_seconds: 900,
                        probe_in_seconds: None,
                        trips: 0,
                    },
                ],
                auth_failing_permanently: false,
                mailboxes: 1,
                never_synced: 0,
                failing: 1,
                max_lag_seconds: 420,
                last_success_at: Some(now - chrono::Duration::seconds(420)),
                quarantined: 0,
                due: Default::default(),
                writes: Default::default(),
                token: None,
                mailbox_detail_omitted: 0,
                mailbox_detail: vec![MailboxHealth {
                    mailbox: mailbox.into(),
                    last_success_at: Some(now - chrono::Duration::seconds(420)),
                    lag_seconds: 420,
                    last_error: Some(error.into()),
                    last_error_at: Some(now - chrono::Duration::seconds(3)),
                    last_request_id: Some("req-<1>".into()),
                    consecutive_failures: 3,
                    next_run_at: now,
                    running: false,
                    quarantined: 0,
                    fresh_rounds_forced: 0,
                }],
            }],
        }
    }

    #[test]
    fn outside_text_is_escaped() {
        let html = render(&health(
            "Graph refused: <script>alert(1)</script> & \"quotes\"",
            "eve\"><img src=x onerror=alert(2)>@contoso.com",
        ));
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;"));
        assert!(html.contains("req-&lt;1&gt;"));
    }

    #[test]
    fn shows_breakers_lag_and_errors() {
        let html = render(&health(
            "token endpoint failed transiently",
            "a@contoso.com",
        ));
        assert!(html.contains("<meta http-equiv=\"refresh\""));
        assert!(html.contains("data-tenant=\"contoso\" data-status=\"degraded\""));
        assert!(html.contains("data-breaker=\"token\" data-state=\"open\""));
        assert!(html.contains("probe in 7s"));
        assert!(html.contains("7m 00s"), "lag shown: {html}");
        assert!(html.contains("token endpoint failed transiently"));
        assert!(!html.contains("<script"), "no JavaScript");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(short_duration(0.4), "0.4s");
        assert_eq!(short_duration(12.0), "12s");
        assert_eq!(short_duration(245.0), "4m 05s");
        assert_eq!(short_duration(7380.0), "2h 03m");
        assert_eq!(short_duration(f64::NAN), "-");
    }
}
