//! Configuration: a bad value fails naming its key and what is allowed, the environment
//! overlays the file, and the secret never shows in `Debug` or in `calsync check-config`.

use std::process::Command;

use calsync::config::{ConfigError, Settings};

use crate::helpers::*;

fn config_text() -> String {
    base_config("http://127.0.0.1:9", "/tmp/calsync-config-test.db")
}

fn rejected(toml: &str) -> ConfigError {
    Settings::from_toml_str(toml).expect_err("the configuration must be rejected")
}

/// The test config with `extra` laid over it (tables merge).
fn with_extra(extra: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml_layers(&[&config_text(), extra])
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_test_config_is_valid() {
    Settings::from_toml_str(&config_text()).expect("valid");
}

#[test]
fn zero_workers_names_sync_workers() {
    let error = rejected(&config_text().replace("workers = 4", "workers = 0"));
    assert_eq!(error.key, "sync.workers");
    let text = error.to_string();
    assert!(
        text.contains("sync.workers") && text.contains("between 1 and"),
        "{text}"
    );
}

#[test]
fn interval_in_words_names_the_key_and_the_allowed_units() {
    let error = rejected(&config_text().replace("interval = \"1m\"", "interval = \"5 minutes\""));
    assert_eq!(error.key, "sync.interval");
    let text = error.to_string();
    assert!(
        text.contains("sync.interval") && text.contains("ms, s, m, h, d"),
        "{text}"
    );
}

#[test]
fn misspelt_key_is_rejected_by_name() {
    let error = rejected(&config_text().replace("[sync]\n", "[sync]\nintervall = \"5m\"\n"));
    let text = error.to_string();
    assert!(text.contains("intervall"), "{text}");
    assert!(error.key.starts_with("sync"), "{text}");
}

#[test]
fn missing_credential_names_the_tenants_client_secret() {
    let error =
        rejected(&config_text().replace(&format!("client_secret = \"{CLIENT_SECRET}\"\n"), ""));
    assert_eq!(error.key, "tenants[0].client_secret");
    assert!(error.to_string().contains("certificate_file"), "{error}");
}

#[test]
fn two_credentials_are_rejected_too() {
    let error = rejected(&config_text().replace(
        "mailboxes = [",
        "client_secret_file = \"/run/secrets/x\"\nmailboxes = [",
    ));
    assert_eq!(error.key, "tenants[0].client_secret");
}

/// The replica heartbeat defaults to a tenth of the lease, and may not be so slow that a
/// live replica's row could run out between two heartbeats.
#[test]
fn replica_heartbeat_is_a_fraction_of_the_lease() {
    let settings = with_extra("[sync]\nlease_ttl = \"30s\"\n").expect("valid");
    assert_eq!(
        settings.sync.replica_heartbeat,
        std::time::Duration::from_secs(3)
    );
    let settings =
        with_extra("[sync]\nlease_ttl = \"3s\"\nreplica_heartbeat = \"200ms\"\n").expect("valid");
    assert_eq!(
        settings.sync.replica_heartbeat,
        std::time::Duration::from_millis(200)
    );
    let error = with_extra("[sync]\nlease_ttl = \"3s\"\nreplica_heartbeat = \"2s\"\n")
        .expect_err("slower than a third of the lease");
    assert_eq!(error.key, "sync.replica_heartbeat");
    assert!(error.message.contains("sync.lease_ttl"), "{error}");
    let error = with_extra("[sync]\nreplica_heartbeat = \"0s\"\n").expect_err("zero");
    assert_eq!(error.key, "sync.replica_heartbeat");
}

#[test]
fn job_deadline_not_longer_than_the_request_timeout_is_rejected() {
    let error = rejected(&config_text().replace("job_deadline = \"5s\"", "job_deadline = \"2s\""));
    assert_eq!(error.key, "sync.job_deadline");
    assert!(
        error.to_string().contains("graph.request_timeout"),
        "{error}"
    );
}

#[test]
fn environment_variables_configure_everything_a_file_would() {
    let settings = Settings::load_from(
        None,
        env(&[
            ("CALSYNC_SYNC__WORKERS", "3"),
            ("CALSYNC_SYNC__INTERVAL", "90s"),
            ("CALSYNC_GRAPH__BASE_URL", "http://127.0.0.1:4010/v1.0"),
            ("CALSYNC_TENANTS__0__NAME", "contoso"),
            ("CALSYNC_TENANTS__0__TENANT_ID", TENANT_ID),
            (
                "CALSYNC_TENANTS__0__CLIENT_ID",
                "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            ),
            ("CALSYNC_TENANTS__0__CLIENT_SECRET", CLIENT_SECRET),
            (
                "CALSYNC_TENANTS__0__MAILBOXES",
                "alice@contoso.com, bob@contoso.com",
            ),
            ("CALSYNC_TENANTS__1__NAME", "fabrikam"),
            ("CALSYNC_TENANTS__1__TENANT_ID", "fabrikam.onmicrosoft.com"),
            (
                "CALSYNC_TENANTS__1__CLIENT_ID",
                "ffffffff-bbbb-cccc-dddd-eeeeeeeeeeee",
            ),
            ("CALSYNC_TENANTS__1__CLIENT_SECRET", "another-secret"),
            ("CALSYNC_CONFIG", "/not/a/setting.toml"),
            ("PATH", "/usr/bin"),
            ("SYNC__WORKERS", "99"),
        ]),
    )
    .expect("valid from the environment alone");
    assert_eq!(settings.sync.workers, 3);
    assert_eq!(settings.sync.interval, std::time::Duration::from_secs(90));
    assert_eq!(
        settings.graph.base_url.as_str(),
        "http://127.0.0.1:4010/v1.0"
    );
    assert_eq!(settings.tenants.len(), 2);
    assert_eq!(settings.tenants[0].name, "contoso");
    assert_eq!(
        settings.tenants[0].mailboxes,
        vec!["alice@contoso.com", "bob@contoso.com"]
    );
    assert_eq!(settings.tenants[1].tenant_id, "fabrikam.onmicrosoft.com");
    let debug = format!("{settings:?} {settings:#?}");
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
    assert!(!debug.contains("another-secret"));
}

#[test]
fn environment_wins_over_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("calsync.toml");
    std::fs::write(&file, config_text().replace("workers = 4", "workers = 7")).expect("write");
    let from_file = Settings::load_from(Some(&file), env(&[])).expect("valid");
    assert_eq!(from_file.sync.workers, 7);

    let settings = Settings::load_from(
        Some(&file),
        env(&[
            ("CALSYNC_SYNC__WORKERS", "3"),
            ("CALSYNC_TENANTS__0__CLIENT_SECRET", "x"),
        ]),
    )
    .expect("valid");
    assert_eq!(settings.sync.workers, 3);
    assert_eq!(settings.tenants[0].mailboxes, vec![ALICE]);
    assert!(matches!(
        &settings.tenants[0].credential,
        calsync::config::Credential::Secret(s) if secrecy::ExposeSecret::expose_secret(s) == "x"
    ));
}

#[test]
fn bad_environment_values_name_their_key() {
    let error = Settings::load_from(None, env(&[("CALSYNC_SYNC__WORKERS", "lots")]))
        .expect_err("not a number");
    assert_eq!(error.key, "sync.workers");
    assert!(error.to_string().contains("lots"), "{error}");

    let error = Settings::load_from(None, env(&[("CALSYNC_SYNC__INTERVAL", "5 minutes")]))
        .expect_err("no such unit");
    assert_eq!(error.key, "sync.interval");
    assert!(error.to_string().contains("ms, s, m, h, d"), "{error}");

    let error = Settings::load_from(None, env(&[("CALSYNC_SYNC__INTERVALL", "5m")]))
        .expect_err("no such key");
    assert!(error.to_string().contains("intervall"), "{error}");

    let error = Settings::load_from(None, env(&[("CALSYNC_TENANTS__3__NAME", "x")]))
        .expect_err("index past the end");
    assert!(error.to_string().contains("tenants.3.name"), "{error}");
}

#[test]
fn debug_output_never_holds_the_secret() {
    let settings = Settings::from_toml_str(&config_text()).expect("valid");
    for text in [
        format!("{settings:?}"),
        format!("{settings:#?}"),
        format!("{:?}", settings.tenants[0]),
        format!("{:?}", settings.tenants[0].credential),
    ] {
        assert!(!text.contains(CLIENT_SECRET), "{text}");
        assert!(!text.contains("s3cr3t"), "not even a prefix: {text}");
    }
}

fn check_config(file: &std::path::Path, envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_calsync"))
        .env_clear()
        .envs(envs.iter().copied())
        .arg("--config")
        .arg(file)
        .arg("check-config")
        .output()
        .expect("calsync runs")
}

#[test]
fn check_config_fails_on_a_bad_file_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, config_text().replace("workers = 4", "workers = 0")).expect("write");

    let output = check_config(&file, &[]);

    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sync.workers"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains(CLIENT_SECRET));
    assert!(!stderr.contains(CLIENT_SECRET));
}

#[test]
fn check_config_prints_a_summary_without_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("good.toml");
    std::fs::write(&file, config_text()).expect("write");

    for envs in [
        vec![],
        vec![(
            "CALSYNC_TENANTS__0__CLIENT_SECRET",
            "env-secret-value-9f8e7d",
        )],
    ] {
        let output = check_config(&file, &envs);

        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stdout.contains("contoso"), "{stdout}");
        for text in [&stdout, &stderr] {
            assert!(!text.contains(CLIENT_SECRET), "{text}");
            assert!(!text.contains("env-secret-value-9f8e7d"), "{text}");
        }
    }
}

/// The example file documents every key with its default: it must parse, and (its tenant aside)
/// mean exactly what no file at all means.
#[test]
fn the_example_config_parses_and_states_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/calsync.example.toml");
    let text = std::fs::read_to_string(path).expect("the example file exists");
    let text = text.replace(
        "client_secret_file = \"/run/secrets/contoso-client-secret\"",
        "client_secret = \"example-secret\"",
    );
    let example = Settings::from_toml_str(&text).expect("the example parses");
    let defaults = Settings::from_toml_str("").expect("the defaults parse");
    let shown = |s: &Settings| {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            s.server, s.store, s.graph, s.sync, s.log, s.resilience, s.notifications, s.writes
        )
    };
    assert_eq!(shown(&example), shown(&defaults));
    assert_eq!(example.tenants.len(), 1);
    assert_eq!(example.tenants[0].mailboxes.len(), 2);
}

/// Variables of the CLI and of the test harness share the prefix but are not settings; a
/// setting written with one `_` instead of `__` is refused, naming the fix.
#[test]
fn non_setting_variables_are_ignored_and_single_underscore_settings_refused() {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let loaded = Settings::load_from(
        None,
        env(&[
            ("CALSYNC_REQUIRE_TOOLS", "1"),
            ("CALSYNC_CHROMIUM", "/usr/bin/chromium"),
            ("CALSYNC_TEST_POSTGRES_URL", "postgres://x@127.0.0.1/test"),
            ("CALSYNC_REQUIRE_POSTGRES", "1"),
            ("CALSYNC_URL", "http://127.0.0.1:8080"),
            ("CALSYNC_SYNC__WORKERS", "3"),
        ]),
    )
    .expect("only CALSYNC_SYNC__WORKERS is a setting");
    assert_eq!(loaded.sync.workers, 3);

    let error = Settings::load_from(None, env(&[("CALSYNC_SYNC_WORKERS", "3")]))
        .expect_err("a one-underscore setting is a typo");
    assert_eq!(error.key, "CALSYNC_SYNC_WORKERS");
    assert!(
        error.message.contains("CALSYNC_SYNC__WORKERS"),
        "{}",
        error.message
    );
}

// ---- issue 11: a configuration that never lies or leaks ----

/// A TOML syntax error on a secret's line names the key and the line, never the line itself.
#[test]
fn toml_syntax_errors_name_key_and_line_but_never_print_a_secret() {
    let secret = "Sup3r-S3cret-Value";
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, bad_line, key) in [
        (
            "bad escape",
            format!("client_secret = \"{secret}\\q\""),
            "tenants[0].client_secret",
        ),
        (
            "unterminated string",
            format!("client_secret = \"{secret}"),
            "tenants[0].client_secret",
        ),
        (
            "api token, bad escape",
            format!("[api]\ntoken = \"{secret}{secret}\\x\""),
            "api.token",
        ),
    ] {
        let text = if key == "api.token" {
            format!("{}\n{bad_line}\n", config_text())
        } else {
            config_text().replace(&format!("client_secret = \"{CLIENT_SECRET}\""), &bad_line)
        };
        let line = text
            .lines()
            .position(|l| l.contains(secret))
            .expect("the bad line")
            + 1;
        let error = rejected(&text);
        let shown = error.to_string();
        assert!(!shown.contains(secret), "{what}: {shown}");
        assert!(!shown.contains("Sup3r"), "{what}: not even a part: {shown}");
        assert_eq!(error.key, key, "{what}: {shown}");
        assert!(shown.contains(&format!("line {line}")), "{what}: {shown}");

        let file = dir.path().join("bad.toml");
        std::fs::write(&file, &text).expect("write");
        let output = check_config(&file, &[]);
        assert_eq!(output.status.code(), Some(2), "{what}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{what}: {stderr}");
        assert!(!stderr.contains("Sup3r"), "{what}: {stderr}");
        assert!(!String::from_utf8_lossy(&output.stdout).contains("Sup3r"));
    }
    // A secret of the wrong type is not quoted either ("invalid type: integer `123…`").
    let error = rejected(&format!(
        "{}\n[api]\ntoken = 98765432109876543\n",
        config_text()
    ));
    assert_eq!(error.key, "api.token");
    assert!(!error.to_string().contains("98765432109876543"), "{error}");
}

/// `warning`, `loud` and `xyz=info` would each turn every log line off; they are refused.
#[test]
fn a_log_level_that_would_silence_logging_is_refused() {
    for (level, hint) in [
        ("warning", "did you mean `warn`"),
        ("loud", "levels are"),
        ("xyz=info", "not a target"),
        ("info,calsync=verbose", "did you mean `debug`"),
    ] {
        let error = with_extra(&format!("[log]\nlevel = \"{level}\"\n")).expect_err(level);
        assert_eq!(error.key, "log.level", "{level}");
        assert!(error.message.contains(hint), "{level}: {error}");
    }
    for level in [
        "warn",
        "info,calsync=debug",
        "error,sqlx::query=warn",
        "off",
    ] {
        with_extra(&format!("[log]\nlevel = \"{level}\"\n"))
            .unwrap_or_else(|e| panic!("{level}: {e}"));
    }
}

/// Every duration has a ceiling; the one from the issue (`window_future = "100000000d"`, which
/// made every job panic) is refused by name.
#[test]
fn durations_past_what_their_use_can_hold_are_refused_by_name() {
    for (table, key, value) in [
        ("sync", "window_future", "100000000d"),
        ("sync", "window_past", "3651d"),
        ("sync", "interval", "31d"),
        ("sync", "job_deadline", "25h"),
        ("sync", "lease_ttl", "2d"),
        ("graph", "request_timeout", "2h"),
        ("graph", "connect_timeout", "6m"),
        ("resilience", "breaker_max_break", "2d"),
        ("resilience", "breaker_permanent_break", "8d"),
        ("server", "shutdown_grace", "2h"),
        ("server", "header_read_timeout", "6m"),
        ("notifications", "check_interval", "2d"),
    ] {
        let error = with_extra(&format!("[{table}]\n{key} = \"{value}\"\n")).expect_err(value);
        assert_eq!(error.key, format!("{table}.{key}"), "{value}: {error}");
        assert!(error.message.contains("at most"), "{error}");
    }
}

/// Every duration at its ceiling at once: the service syncs without a panic anywhere.
#[tokio::test]
async fn every_duration_at_its_ceiling_still_syncs() {
    let app = spawn_app_with(|toml| {
        merged(
            &toml,
            "
[server]
shutdown_grace = \"1h\"
header_read_timeout = \"5m\"
idle_timeout = \"1h\"
request_timeout = \"1h\"
public_request_timeout = \"5m\"
[sync]
interval = \"30d\"
jitter = \"30d\"
window_past = \"3650d\"
window_future = \"3650d\"
job_deadline = \"24h\"
failure_backoff_initial = \"7d\"
failure_backoff_max = \"7d\"
lease_ttl = \"24h\"
stuck_grace = \"24h\"
[resilience]
retry_initial = \"1h\"
retry_max = \"1h\"
slow_call = \"1h\"
breaker_window = \"24h\"
breaker_base_break = \"24h\"
breaker_max_break = \"24h\"
breaker_permanent_break = \"7d\"
[graph]
request_timeout = \"1h\"
connect_timeout = \"5m\"
",
        )
    })
    .await;
    complete_initial_round(&app).await;
    let mailbox = app.mailbox(ALICE).await;
    assert!(mailbox.last_success_at.is_some());
    assert!(mailbox.next_run_at > chrono::Utc::now() + chrono::Duration::days(29));
}

/// `base` with `extra` laid over it, table by table.
fn merged(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut table: toml::Table = toml::from_str(base).expect("base TOML");
    merge(&mut table, toml::from_str(extra).expect("extra TOML"));
    toml::to_string(&table).expect("TOML")
}

/// Graph URLs with a user or password are refused, and the password is not printed.
#[test]
fn userinfo_in_graph_urls_is_refused_without_printing_it() {
    for key in ["base_url", "authority"] {
        for url in [
            "https://user:hunter2pw@graph.microsoft.com/v1.0",
            "https://hunter2pw@graph.microsoft.com/v1.0",
            "https://user:hunter2pw@graph micro soft/v1.0",
        ] {
            let error = with_extra(&format!("[graph]\n{key} = \"{url}\"\n")).expect_err(url);
            assert_eq!(error.key, format!("graph.{key}"), "{url}");
            assert!(!error.to_string().contains("hunter2pw"), "{error}");
        }
    }
    assert_eq!(
        calsync::config::redact_url("postgres://calsync:pw@db:5432/calsync"),
        "postgres://calsync:REDACTED@db:5432/calsync"
    );
}

/// Each misspelt variable's error names the right one, and that one works when fed back.
#[test]
fn the_fix_an_environment_error_suggests_is_right() {
    let tenant = |prefix: &str| {
        vec![
            (format!("{prefix}NAME"), "contoso".to_string()),
            (format!("{prefix}TENANT_ID"), TENANT_ID.to_string()),
            (format!("{prefix}CLIENT_ID"), "aaaaaaaa-bbbb".to_string()),
        ]
    };
    for (wrong, value, check) in [
        (
            "CALSYNC_TENANTS_0_CLIENT_SECRET",
            "env-secret",
            "tenants[0].credential",
        ),
        (
            "CALSYNC_TENANTS__0_CLIENT_SECRET",
            "env-secret",
            "tenants[0].credential",
        ),
        (
            "CALSYNC_TENANTS_0__CLIENT_SECRET",
            "env-secret",
            "tenants[0].credential",
        ),
        ("CALSYNC_SYNC_WORKERS", "3", "sync.workers"),
        (
            "CALSYNC_SYNC_MAX_JOBS_PER_TENANT",
            "1",
            "sync.max_jobs_per_tenant",
        ),
        (
            "CALSYNC_SERVER_PUBLIC_LISTEN",
            "127.0.0.1:9443",
            "server.public_listen",
        ),
    ] {
        let mut vars = tenant("CALSYNC_TENANTS__0__");
        if check != "tenants[0].credential" {
            vars.push((
                "CALSYNC_TENANTS__0__CLIENT_SECRET".into(),
                CLIENT_SECRET.into(),
            ));
        }
        vars.push((wrong.to_string(), value.to_string()));
        let error = match Settings::load_from(None, vars.clone()) {
            Err(e) => e,
            Ok(_) => panic!("{wrong} was accepted"),
        };
        assert_eq!(error.key, wrong);
        let fix = error
            .message
            .split_whitespace()
            .find(|w| w.starts_with("CALSYNC_") && *w != wrong)
            .unwrap_or_else(|| panic!("{wrong}: no fix in {error}"))
            .trim_end_matches([',', '.', ')'])
            .to_string();
        vars.pop();
        vars.push((fix.clone(), value.to_string()));
        let settings = Settings::load_from(None, vars)
            .unwrap_or_else(|e| panic!("{wrong} -> {fix} still fails: {e}"));
        let shown = match check {
            "tenants[0].credential" => matches!(
                &settings.tenants[0].credential,
                calsync::config::Credential::Secret(s) if secrecy::ExposeSecret::expose_secret(s) == value
            )
            .to_string(),
            "sync.workers" => (settings.sync.workers == 3).to_string(),
            "sync.max_jobs_per_tenant" => (settings.sync.max_jobs_per_tenant == 1).to_string(),
            _ => (settings.server.public_listen.port() == 9443).to_string(),
        };
        assert_eq!(shown, "true", "{wrong} -> {fix} did not set {check}");
    }
    let error = Settings::load_from(None, env(&[("CALSYNC_SYNCS__WORKERS", "3")]))
        .expect_err("no such section");
    assert!(error.message.contains("not a section"), "{error}");
}

/// The mailbox rule is the admin API's: no Unicode space, control or invisible character, at
/// most 320 characters.
#[test]
fn mailboxes_follow_the_apis_rule() {
    for bad in [
        "alice\u{00A0}@contoso.com",
        "alice\u{2028}@contoso.com",
        "alice\u{202E}@contoso.com",
        "alice\u{200B}@contoso.com",
        "al ice@contoso.com",
        "alice/x@contoso.com",
    ] {
        let error = rejected(&config_text().replace(ALICE, bad));
        assert_eq!(error.key, "tenants[0].mailboxes[0]", "{bad:?}");
        assert!(calsync::config::check_mailbox(bad).is_err());
    }
    let long = format!("{}@contoso.com", "a".repeat(320));
    let error = rejected(&config_text().replace(ALICE, &long));
    assert!(error.message.contains("320"), "{error}");
    let fits = format!("{}@contoso.com", "a".repeat(320 - 12));
    Settings::from_toml_str(&config_text().replace(ALICE, &fits)).expect("320 characters fit");
}

#[test]
fn tenant_names_are_unique_ignoring_case() {
    let second = format!(
        "\n[[tenants]]\nname = \"CONTOSO\"\ntenant_id = \"{TENANT_ID}\"\nclient_id = \"x\"\nclient_secret = \"y\"\n"
    );
    let error = rejected(&format!("{}{second}", config_text()));
    assert_eq!(error.key, "tenants[1].name");
    assert!(error.message.contains("ignoring case"), "{error}");
}

/// Unset, the jitter is a tenth of the interval (30 s of the default 5 m; 200 ms of 2 s); set,
/// it may not exceed the interval.
#[test]
fn jitter_is_a_tenth_of_the_interval_unless_set() {
    let defaults = Settings::from_toml_str("").expect("defaults");
    assert_eq!(defaults.sync.jitter, std::time::Duration::from_secs(30));
    let fast = Settings::from_toml_str("[sync]\ninterval = \"2s\"\n").expect("valid");
    assert_eq!(fast.sync.jitter, std::time::Duration::from_millis(200));
    let set =
        Settings::from_toml_str("[sync]\ninterval = \"2s\"\njitter = \"0s\"\n").expect("valid");
    assert_eq!(set.sync.jitter, std::time::Duration::ZERO);
    let error = rejected("[sync]\ninterval = \"2s\"\njitter = \"30s\"\n");
    assert_eq!(error.key, "sync.jitter");
}

/// `calsync check-config | head -2`: a reader that went away ends calsync quietly, no panic.
#[test]
fn check_config_into_a_closed_pipe_exits_without_a_panic() {
    use std::os::fd::OwnedFd;
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("good.toml");
    std::fs::write(&file, config_text()).expect("write");
    // A socket pair whose other end is closed before calsync starts: its first write fails
    // with EPIPE, deterministically.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    drop(theirs);
    let output = Command::new(env!("CARGO_BIN_EXE_calsync"))
        .env_clear()
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .stdout(Stdio::from(OwnedFd::from(ours)))
        .stderr(Stdio::piped())
        .output()
        .expect("calsync runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{output:?}");
}
