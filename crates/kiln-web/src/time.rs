//! Times and durations as the pages print them (UTC, no time zone database).

use kiln_domain::Millis;

/// `2026-12-05T07:30:12Z` from milliseconds since the epoch (RFC 3339, UTC; a time before
/// the epoch, which no stored time is, shows as the epoch).
pub(crate) fn utc(ms: Millis) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `1h 2m`, `3m 4s`, `5.2s`, `120ms`.
pub(crate) fn duration(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        // Tenths rounded half up in integers, as the page's script does.
        1000..60_000 => {
            let tenths = (ms + 50) / 100;
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
        60_000..3_600_000 => format!("{}m {}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h {}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// The span between two times, when both are known (or until now when it has not ended).
pub(crate) fn span(start: Option<Millis>, end: Option<Millis>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => duration(e.saturating_sub(s).max(0) as u64),
        (Some(s), None) => format!(
            "{} so far",
            duration(kiln_domain::now_millis().saturating_sub(s).max(0) as u64)
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_455_812_000), "2026-12-05T07:30:12Z");
        assert_eq!(duration(999), "999ms");
        assert_eq!(duration(5_200), "5.2s");
        assert_eq!(duration(1_250), "1.3s");
        assert_eq!(duration(1_149), "1.1s");
        assert_eq!(duration(59_960), "60.0s");
        assert_eq!(duration(185_000), "3m 5s");
        assert_eq!(duration(3_720_000), "1h 2m");
    }
}
