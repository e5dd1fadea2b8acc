//! Candidate selection ("blocking"). Each prepared record yields a small set of string keys;
//! two records are candidates when they share at least one key. A storage layer keeps the
//! keys in a table `(record_id, key)` with an index on `key`; [`BlockIndex`] is the
//! in-memory equivalent for tests, benchmarks and evaluation.
//!
//! Keys are chosen to survive the usual registration errors:
//! - `rid:` first 17 characters of the resident ID (survives a wrong check character);
//! - `oid:` other identifiers (insurance, passport); `ph:` phone (also what a PDQm `telecom`
//!   search looks up). Institution record numbers are no key: namespaced by their institution
//!   they are unique per record (no other record shares one), so the key was an index entry
//!   per record that never found a candidate;
//! - `nm:` order-insensitive romanised name + birth year (survives homophones, Latin script,
//!   day/month errors);
//! - `np:` each name part's pinyin (surname, given name; Latin tokens) + birth date with day
//!   and month sorted (survives a swapped day/month, dropped or look-alike characters in the
//!   other part).

use std::collections::HashMap;

use chrono::Datelike;

use super::ident::IdentifierKind;
use super::normalize::NameScript;
use super::record::{PreparedRecord, RecordId};

/// The key of a normalised phone number (also what a PDQm `telecom` search looks up).
pub fn phone_key(normalised: &str) -> String {
    format!("ph:{normalised}")
}

/// Blocking keys of one record, deduplicated and sorted.
pub fn blocking_keys(r: &PreparedRecord) -> Vec<String> {
    let mut keys = Vec::with_capacity(8);
    if let Some(id) = &r.resident_id
        && id.number.len() == 18
        && let Some(first17) = id.number.get(..17)
    {
        keys.push(format!("rid:{first17}"));
    }
    for o in r
        .other_ids
        .iter()
        .filter(|o| o.kind != IdentifierKind::InstitutionRecord)
    {
        keys.push(format!("oid:{:?}:{}", o.kind, o.value));
    }
    for p in &r.phones {
        keys.push(phone_key(p));
    }
    if let Some(d) = r.birth_date
        && r.name.script != NameScript::Empty
    {
        keys.push(format!("nm:{}:{}", r.name.romanised, d.year()));
        let (lo, hi) = if d.month() <= d.day() {
            (d.month(), d.day())
        } else {
            (d.day(), d.month())
        };
        let date = format!("{}-{lo:02}-{hi:02}", d.year());
        let parts: Vec<&str> = match r.name.script {
            NameScript::Han => vec![r.name.surname_pinyin.as_str(), r.name.given_pinyin.as_str()],
            _ => r.name.romanised.split(' ').collect(),
        };
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            keys.push(format!("np:{part}:{date}"));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// In-memory inverted index from blocking key to records.
#[derive(Debug, Default)]
pub struct BlockIndex {
    blocks: HashMap<String, Vec<RecordId>>,
    /// Blocks larger than this are skipped as uninformative (like stop words).
    max_block: usize,
}

/// Statistics of a candidate-pair enumeration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockingStats {
    pub keys: usize,
    pub skipped_blocks: usize,
    pub largest_block_used: usize,
}

impl BlockIndex {
    /// An empty index that ignores blocks with more than `max_block` records.
    pub fn new(max_block: usize) -> Self {
        Self {
            blocks: HashMap::new(),
            max_block,
        }
    }

    /// Index a record under its keys.
    pub fn insert(&mut self, id: RecordId, keys: &[String]) {
        for k in keys {
            self.blocks.entry(k.clone()).or_default().push(id);
        }
    }

    /// Records sharing at least one (not oversized) key with `keys`, excluding `exclude`.
    pub fn candidates(&self, keys: &[String], exclude: Option<RecordId>) -> Vec<RecordId> {
        let mut out: Vec<RecordId> = keys
            .iter()
            .filter_map(|k| self.blocks.get(k))
            .filter(|b| b.len() <= self.max_block)
            .flatten()
            .copied()
            .filter(|id| Some(*id) != exclude)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// All distinct candidate pairs `(a, b)` with `a < b`, sorted.
    pub fn candidate_pairs(&self) -> (Vec<(RecordId, RecordId)>, BlockingStats) {
        let mut stats = BlockingStats {
            keys: self.blocks.len(),
            ..BlockingStats::default()
        };
        let mut pairs = Vec::new();
        for block in self.blocks.values() {
            if block.len() > self.max_block {
                stats.skipped_blocks += 1;
                continue;
            }
            stats.largest_block_used = stats.largest_block_used.max(block.len());
            for (i, a) in block.iter().enumerate() {
                for b in &block[i + 1..] {
                    if a != b {
                        pairs.push(if a < b { (*a, *b) } else { (*b, *a) });
                    }
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        (pairs, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::empi::record::{Identifier, SourceRecord, prepare};
    use chrono::NaiveDate;

    fn rec(id: u64, name: &str, date: (i32, u32, u32), rid: Option<&str>) -> PreparedRecord {
        prepare(&SourceRecord {
            record_id: RecordId(id),
            institution: "H".into(),
            name: name.into(),
            sex: None,
            birth_date: NaiveDate::from_ymd_opt(date.0, date.1, date.2),
            identifiers: rid
                .map(|v| Identifier {
                    kind: IdentifierKind::ResidentId,
                    value: v.into(),
                })
                .into_iter()
                .collect(),
            address: None,
        })
    }

    fn share_key(a: &PreparedRecord, b: &PreparedRecord) -> bool {
        let kb = blocking_keys(b);
        blocking_keys(a).iter().any(|k| kb.contains(k))
    }

    #[test]
    fn keys_survive_typical_errors() {
        let base = rec(1, "张秀英", (1949, 12, 3), Some("11010519491231002X"));
        let variants = [
            rec(2, "章秀英", (1949, 12, 4), None), // homophone, ±1 day
            rec(3, "张英", (1949, 3, 12), None),   // dropped, swapped
            rec(4, "玉秀英", (1949, 3, 12), None), // look-alike surname
            rec(5, "Zhang Xiuying", (1950, 1, 1), Some("110105194912310021")), // bad check
            rec(6, "xiuying ZHANG", (1949, 12, 9), None), // Latin, wrong day
        ];
        for v in &variants {
            assert!(share_key(&base, v), "{:?}", v.name);
        }
        assert!(!share_key(&base, &rec(7, "李娜", (1949, 12, 3), None)));
    }

    #[test]
    fn insurance_and_passport_are_keys_institution_record_numbers_are_not() {
        let with = |kind: IdentifierKind, value: &str| {
            let mut r = SourceRecord {
                record_id: RecordId(1),
                institution: "H001".into(),
                name: "王芳".into(),
                sex: None,
                birth_date: NaiveDate::from_ymd_opt(1980, 5, 6),
                identifiers: Vec::new(),
                address: None,
            };
            r.identifiers.push(Identifier {
                kind,
                value: value.into(),
            });
            blocking_keys(&prepare(&r))
        };
        assert!(
            with(IdentifierKind::MedicalInsurance, "YB3501001234")
                .iter()
                .any(|k| k.starts_with("oid:MedicalInsurance:"))
        );
        assert!(
            with(IdentifierKind::Passport, "E12345678")
                .iter()
                .any(|k| k.starts_with("oid:Passport:"))
        );
        // Unique per record (namespaced by the institution): an index entry that never finds
        // a candidate.
        let keys = with(IdentifierKind::InstitutionRecord, "MR000000042");
        assert!(keys.iter().all(|k| !k.starts_with("oid:")), "{keys:?}");
        assert!(keys.iter().any(|k| k.starts_with("nm:")));
    }

    #[test]
    fn index_enumerates_pairs_and_skips_oversized_blocks() {
        let mut idx = BlockIndex::new(2);
        idx.insert(RecordId(1), &["a".into(), "big".into()]);
        idx.insert(RecordId(2), &["a".into(), "big".into()]);
        idx.insert(RecordId(3), &["big".into(), "c".into()]);
        let (pairs, stats) = idx.candidate_pairs();
        assert_eq!(pairs, vec![(RecordId(1), RecordId(2))]);
        assert_eq!(stats.skipped_blocks, 1);
        assert_eq!(
            idx.candidates(&["a".into()], Some(RecordId(1))),
            vec![RecordId(2)]
        );
    }
}
