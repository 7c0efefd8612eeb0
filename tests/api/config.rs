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
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            s.server, s.store, s.graph, s.sync, s.log, s.resilience, s.notifications
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
