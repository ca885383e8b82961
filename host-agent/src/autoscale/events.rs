//! autoscale's output: JSON Lines throughout. Each decision is one JSON object
//! on one line (`schema/vmplug-autoscale-event.schema.json`), written whole and
//! flushed, so a reader (`jq -c`, a log shipper) can take the stream line by
//! line while it runs; the run's last line is its envelope
//! (`schema/vmplug-report.schema.json`), compact as well.

use std::io::Write;

use super::decision::DecisionEvent;

/// Writes `ev` as one line and flushes it.
pub fn write_event(out: &mut impl Write, ev: &DecisionEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Prints `ev` on standard output (one line, under stdout's lock, so that
/// concurrent domains' lines never interleave). A closed stdout is logged.
pub fn print_event(ev: &DecisionEvent) {
    if let Err(e) = write_event(&mut std::io::stdout().lock(), ev) {
        tracing::warn!(domain = %ev.domain, error = %e, "cannot write the decision event");
    }
}

/// A JSON document as one compact line: `text` is what the envelope printer
/// wrote (pretty); anything that is not JSON is left as it is.
pub fn compact_line(text: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => format!("{v}\n"),
        Err(_) => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretty_document_becomes_one_line_and_text_stays() {
        assert_eq!(compact_line("{\n  \"a\": [\n    1\n  ]\n}\n"), "{\"a\":[1]}\n");
        assert_eq!(compact_line("not json\n"), "not json\n");
    }
}
