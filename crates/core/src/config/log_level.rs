//! `log.level` (and `RUST_LOG`): tracing's directive grammar, checked before use.
//!
//! `EnvFilter` reads a word it does not know as a *target*: `warning` or `loud` enable only a
//! module of that name, so calsync would log nothing at all, errors included. So every
//! directive must be a level, or name a target calsync or its libraries log under.

/// Levels as `EnvFilter` spells them.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
/// Crates whose log lines calsync shows; a directive's target must start with one of them.
pub const KNOWN_TARGETS: [&str; 19] = [
    "calsync",
    "sqlx",
    "sqlx_core",
    "sqlx_sqlite",
    "sqlx_postgres",
    "hyper",
    "hyper_util",
    "reqwest",
    "axum",
    "tower",
    "h2",
    "rustls",
    "oauth2",
    "tokio",
    "tokio_util",
    "mio",
    "governor",
    "metrics_exporter_prometheus",
    "tracing",
];

fn is_level(word: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word))
}

fn level_hint(word: &str) -> String {
    let lower = word.to_ascii_lowercase();
    let guess = match lower.as_str() {
        "warning" | "warnings" => Some("warn"),
        "err" | "errors" | "fatal" | "critical" => Some("error"),
        "information" | "informational" | "notice" | "normal" => Some("info"),
        "verbose" | "debugging" => Some("debug"),
        "all" => Some("trace"),
        "none" | "quiet" | "silent" => Some("off"),
        _ => None,
    };
    match guess {
        Some(level) => format!("did you mean `{level}`?"),
        None => format!("levels are {}", LEVELS.join(", ")),
    }
}

/// The filter, trimmed, or why it is not one calsync accepts.
pub fn validate(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("must not be empty (e.g. info, or info,calsync=debug)".into());
    }
    for directive in text.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        // `target[span{field=value}]=level`: the level follows the last `=` outside brackets.
        let bracket_end = directive.rfind(']').map_or(0, |i| i + 1);
        let (selector, level) = match directive[bracket_end..].rfind('=') {
            Some(i) => {
                let at = bracket_end + i;
                (&directive[..at], Some(directive[at + 1..].trim()))
            }
            None => (directive, None),
        };
        if let Some(level) = level {
            if !is_level(level) {
                return Err(format!(
                    "`{directive}`: `{level}` is not a level; {}",
                    level_hint(level)
                ));
            }
        }
        let target = selector.split('[').next().unwrap_or_default().trim();
        if target.is_empty() {
            if level.is_none() || !selector.trim_start().starts_with('[') {
                return Err(format!("`{directive}` names no target and no level"));
            }
            continue;
        }
        if level.is_none() && is_level(target) {
            continue;
        }
        let krate = target.split("::").next().unwrap_or_default();
        if !KNOWN_TARGETS.contains(&krate) {
            let why = if level.is_none() {
                format!(
                    "`{directive}` is neither a level ({}) nor a known target",
                    level_hint(target)
                )
            } else {
                format!("`{directive}`: `{target}` is not a target calsync logs under")
            };
            return Err(format!(
                "{why}; targets start with one of: {} (a target alone would hide every other line, errors included)",
                KNOWN_TARGETS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map_err(|e| format!("`{text}` is not a tracing filter: {e}"))?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn levels_and_known_targets_pass() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,calsync=debug",
            "warn,sqlx::query=info,calsync::http=trace",
            "info,calsync[sync_job{tenant=contoso}]=debug",
        ] {
            assert_eq!(validate(ok).as_deref(), Ok(ok), "{ok}");
        }
    }

    #[test]
    fn words_that_would_silence_every_line_are_refused_with_a_hint() {
        for (bad, hint) in [
            ("warning", "did you mean `warn`"),
            ("loud", "levels are"),
            ("xyz=info", "`xyz` is not a target"),
            ("info,calsync=loud", "`loud` is not a level"),
            ("", "must not be empty"),
        ] {
            let e = validate(bad).expect_err(bad);
            assert!(e.contains(hint), "{bad}: {e}");
        }
    }
}
