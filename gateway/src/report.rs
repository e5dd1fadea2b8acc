//! The compliance report (`yiqiao audit report`): accesses by institution, purpose and decision,
//! refusals, break-the-glass with review status, and the chain verification result, as a
//! self-contained HTML page (inline CSS and SVG charts, nothing fetched) or CSV.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::NaiveDateTime;
use yiqiao_registry::audit::alerts::{self, Alert};
use yiqiao_registry::audit::query::{self, Summary};
use yiqiao_registry::audit::{Report, format_time, verify_db};
use yiqiao_registry::store::{DbConn, StoreError};
use yiqiao_sm::Sm2PublicKey;

/// A bound of a report period: a date (`YYYY-MM-DD`, UTC) or an RFC 3339 time. An end date
/// (`is_end`) includes that whole day. `None` when `raw` is neither.
pub fn period_bound(raw: &str, is_end: bool) -> Option<NaiveDateTime> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        let day = if is_end {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        return Some(day.and_time(chrono::NaiveTime::MIN));
    }
    chrono::DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.naive_utc())
}

/// Everything the report shows.
#[derive(Debug)]
pub struct ReportData {
    pub from: NaiveDateTime,
    pub to: NaiveDateTime,
    pub generated_at: NaiveDateTime,
    pub summary: Summary,
    /// Review alert of each break-the-glass record, by chain position.
    pub reviews: BTreeMap<i64, Alert>,
    /// Verification of the positions in the range (`None`: no records in range).
    pub verification: Option<Report>,
}

/// Gather the report over `[from, to)`.
pub fn gather(
    conn: &mut DbConn,
    from: NaiveDateTime,
    to: NaiveDateTime,
    key: &Sm2PublicKey,
) -> Result<ReportData, StoreError> {
    let summary = query::summarise(conn, from, to)?;
    let seqs: Vec<i64> = summary.break_glass.iter().map(|e| e.seq).collect();
    let reviews = alerts::break_glass_reviews(conn, &seqs)?;
    let verification = match (summary.first_seq, summary.last_seq) {
        (Some(a), Some(b)) => Some(verify_db(conn, Some(a), Some(b), key)?),
        _ => None,
    };
    Ok(ReportData {
        from,
        to,
        generated_at: yiqiao_registry::store::now_utc(),
        summary,
        reviews,
        verification,
    })
}

impl ReportData {
    /// One line: "OK: positions a..b (n records, k checkpoints verified)" or the failure.
    pub fn verification_text(&self) -> String {
        match &self.verification {
            None => "no records in this period".into(),
            Some(r) => match r.first_problem() {
                None => format!(
                    "OK: positions {}..{} ({} records, {} checkpoints verified)",
                    r.first_seq.unwrap_or(0),
                    r.last_seq.unwrap_or(0),
                    r.records,
                    r.checkpoints
                ),
                Some(p) => format!(
                    "FAILED at position {}: {}: {} ({} problem(s))",
                    p.seq,
                    p.kind.as_str(),
                    p.detail,
                    r.problems.len()
                ),
            },
        }
    }

    pub fn verified(&self) -> bool {
        self.verification.as_ref().is_none_or(Report::ok)
    }

    fn review_status(&self, seq: i64) -> (String, String) {
        match self.reviews.get(&seq) {
            None => ("not yet scanned".into(), String::new()),
            Some(a) if a.status == "acknowledged" => (
                format!("reviewed by {}", a.ack_by.clone().unwrap_or_default()),
                a.ack_note.clone().unwrap_or_default(),
            ),
            Some(_) => ("pending review".into(), String::new()),
        }
    }

    fn denials_total(&self) -> u64 {
        self.summary.denials_by_institution.values().sum()
    }
}

fn csv_field(s: &str) -> String {
    // Neutralise spreadsheet formulas and quote when needed.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// CSV: one table, `section,key1,key2,key3,value`, so every figure is one row.
pub fn csv(d: &ReportData) -> String {
    let mut out = String::from("section,key1,key2,key3,value\n");
    let mut row = |cols: [&str; 5]| {
        let line: Vec<String> = cols.iter().map(|c| csv_field(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    };
    row(["period", "from", "", "", &format_time(&d.from)]);
    row(["period", "to", "", "", &format_time(&d.to)]);
    row(["total", "", "", "", &d.summary.total.to_string()]);
    row(["denials", "total", "", "", &d.denials_total().to_string()]);
    row([
        "verification",
        if d.verified() { "ok" } else { "failed" },
        "",
        "",
        &d.verification_text(),
    ]);
    for (k, n) in &d.summary.by_access {
        row([
            "access",
            &k.institution,
            &k.purpose,
            &k.decision,
            &n.to_string(),
        ]);
    }
    for (inst, n) in &d.summary.denials_by_institution {
        row(["denials", inst, "", "", &n.to_string()]);
    }
    for (day, (ok, refused)) in &d.summary.by_day {
        row(["day", day, "accesses", "", &ok.to_string()]);
        row(["day", day, "denials", "", &refused.to_string()]);
    }
    for e in &d.summary.break_glass {
        let (status, note) = d.review_status(e.seq);
        row([
            "break-the-glass",
            &format_time(&e.recorded_at),
            e.agent_institution.as_deref().unwrap_or("none"),
            e.patient_id.as_deref().unwrap_or("none"),
            &format!(
                "{status}{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!(": {note}")
                }
            ),
        ]);
    }
    out
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A horizontal bar chart as inline SVG.
fn bar_chart(title: &str, bars: &[(String, u64)], colour: &str) -> String {
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let row_h = 22;
    let h = 30 + row_h * bars.len().max(1);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{t}" width="640" height="{h}" viewBox="0 0 640 {h}"><text x="0" y="16" class="ct">{t}</text>"#,
        t = esc(title)
    );
    if bars.is_empty() {
        svg.push_str(r#"<text x="0" y="40">no data</text>"#);
    }
    for (i, (label, n)) in bars.iter().enumerate() {
        let y = 28 + i * row_h;
        let w = (*n as f64 / max as f64 * 380.0).round().max(1.0);
        let _ = write!(
            svg,
            r#"<text x="0" y="{ty}" class="cl">{l}</text><rect x="200" y="{y}" width="{w}" height="16" fill="{colour}"/><text x="{tx}" y="{ty}" class="cv">{n}</text>"#,
            ty = y + 13,
            l = esc(label),
            tx = 206.0 + w,
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The self-contained HTML report.
pub fn html(d: &ReportData) -> String {
    let s = &d.summary;
    let mut by_inst: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_purpose: BTreeMap<String, u64> = BTreeMap::new();
    for (k, n) in &s.by_access {
        *by_inst.entry(k.institution.clone()).or_default() += n;
        *by_purpose.entry(k.purpose.clone()).or_default() += n;
    }
    let bars =
        |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>();
    let per_day: Vec<(String, u64)> = s.by_day.iter().map(|(d, (a, _))| (d.clone(), *a)).collect();
    let denials_day: Vec<(String, u64)> =
        s.by_day.iter().map(|(d, (_, r))| (d.clone(), *r)).collect();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Yiqiao audit compliance report {from} – {to}</title>
<style>
body{{font-family:system-ui,"Noto Sans CJK SC",sans-serif;margin:2em;color:#222;max-width:60em}}
h1{{font-size:1.5em}} h2{{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
th{{background:#f3f3f3}} td.n{{text-align:right}}
.ok{{color:#176d2c;font-weight:bold}} .bad{{color:#a4161a;font-weight:bold}}
.ct{{font-weight:bold;font-size:13px}} .cl,.cv{{font-size:12px}}
</style></head><body>
<h1>Audit compliance report</h1>
<p>Period: <b>{from}</b> to <b>{to}</b> (UTC, end exclusive). Generated {gen}.</p>
<h2>Chain verification</h2>
<p id="verification" class="{vclass}">{vtext}</p>
<h2>Summary</h2>
<table><tr><th>Audit records</th><td class="n" id="total">{total}</td></tr>
<tr><th>Refused or failed requests</th><td class="n" id="denials">{denials}</td></tr>
<tr><th>Break-the-glass accesses</th><td class="n" id="btg">{btg}</td></tr></table>
"#,
        from = esc(&format_time(&d.from)),
        to = esc(&format_time(&d.to)),
        gen = esc(&format_time(&d.generated_at)),
        vclass = if d.verified() { "ok" } else { "bad" },
        vtext = esc(&d.verification_text()),
        total = s.total,
        denials = d.denials_total(),
        btg = s.break_glass.len(),
    );
    h.push_str("<h2>Charts</h2>\n");
    h.push_str(&bar_chart(
        "Accesses by institution",
        &bars(&by_inst),
        "#2b6cb0",
    ));
    h.push_str(&bar_chart(
        "Accesses by purpose of use",
        &bars(&by_purpose),
        "#2f855a",
    ));
    h.push_str(&bar_chart("Records per day", &per_day, "#4a5568"));
    h.push_str(&bar_chart("Refusals per day", &denials_day, "#c53030"));
    h.push_str(&bar_chart(
        "Refusals by institution",
        &bars(&s.denials_by_institution),
        "#c53030",
    ));
    h.push_str("\n<h2>Accesses by institution, purpose and decision</h2>\n<table id=\"access\"><tr><th>Institution</th><th>Purpose</th><th>Decision</th><th>Records</th></tr>\n");
    for (k, n) in &s.by_access {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{n}</td></tr>",
            esc(&k.institution),
            esc(&k.purpose),
            esc(&k.decision)
        );
    }
    h.push_str("</table>\n<h2>Refusals by institution</h2>\n<table id=\"denials-by-institution\"><tr><th>Institution</th><th>Refused</th></tr>\n");
    for (inst, n) in &s.denials_by_institution {
        let _ = writeln!(h, "<tr><td>{}</td><td class=\"n\">{n}</td></tr>", esc(inst));
    }
    h.push_str("</table>\n<h2>Break-the-glass</h2>\n<table id=\"break-the-glass\"><tr><th>Time</th><th>Institution</th><th>Patient</th><th>Review</th><th>Note</th></tr>\n");
    for e in &s.break_glass {
        let (status, note) = d.review_status(e.seq);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&format_time(&e.recorded_at)),
            esc(e.agent_institution.as_deref().unwrap_or("-")),
            esc(e.patient_id.as_deref().unwrap_or("-")),
            esc(&status),
            esc(&note)
        );
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_neutralises_formulas() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn html_escapes() {
        assert_eq!(esc("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }
}
