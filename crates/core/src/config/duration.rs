//! Durations written the way operators write them: "250ms", "30s", "5m", "2h", "180d".

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit; write e.g. 250ms, 30s, 5m, 2h or 7d"))?;
        let (number, unit) = text.split_at(split);
        let value: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` must start with a whole number, e.g. 30s"))?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{text}` has unknown unit `{unit}`; allowed: ms, s, m, h, d"
                ))
            }
        };
        let millis = value
            .checked_mul(millis_per_unit)
            .ok_or_else(|| format!("`{text}` is too large"))?;
        Ok(Self(Duration::from_millis(millis)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"250ms\", \"30s\", \"5m\", \"2h\" or \"180d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("180d", 15_552_000_000),
        ];
        for (text, ms) in cases {
            assert_eq!(
                HumanDuration::parse(text),
                Ok(HumanDuration(Duration::from_millis(ms)))
            );
        }
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(HumanDuration::parse("30").unwrap_err().contains("no unit"));
        assert!(HumanDuration::parse("3w")
            .unwrap_err()
            .contains("unknown unit `w`"));
        assert!(HumanDuration::parse("s")
            .unwrap_err()
            .contains("whole number"));
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }
}
