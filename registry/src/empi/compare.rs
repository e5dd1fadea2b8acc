//! Field-by-field comparison of two prepared records into discrete agreement levels
//! (the comparison vector γ of Fellegi–Sunter). A missing value on either side gives no
//! level (`None`) and contributes no evidence.

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use strsim::jaro_winkler;

use super::ident::IdentifierKind;
use super::normalize::{NameScript, PersonName, char_pinyin, lookalike_canonical};
use super::record::PreparedRecord;

/// Jaro-Winkler similarity of given-name pinyin (same surname) counted as `Similar`.
pub const NAME_PINYIN_JW: f64 = 0.90;
/// Jaro-Winkler similarity of the romanised name (Latin script) counted as `Similar`.
pub const NAME_ROMANISED_JW: f64 = 0.92;
/// Character-bigram Dice similarity of addresses counted as `Similar`.
pub const ADDRESS_DICE: f64 = 0.8;

/// Compared fields, in comparison-vector order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    Name,
    BirthDate,
    Sex,
    ResidentId,
    OtherId,
    Phone,
    Address,
}

/// Number of compared fields.
pub const FIELD_COUNT: usize = 7;

/// All fields in comparison-vector order.
pub const FIELDS: [Field; FIELD_COUNT] = [
    Field::Name,
    Field::BirthDate,
    Field::Sex,
    Field::ResidentId,
    Field::OtherId,
    Field::Phone,
    Field::Address,
];

/// Agreement level of one field; which levels a field uses is [`Field::levels`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Level {
    Exact,
    /// Names: same toneless pinyin (homophones, Han vs Latin script).
    SamePinyin,
    /// Names: same length, each character equal, homophone or look-alike.
    Variant,
    /// Names: a dropped character or Jaro-Winkler above threshold; addresses: Dice above
    /// threshold.
    Similar,
    DayMonthSwapped,
    OneDayOff,
    SameYear,
    /// Resident ID: one substituted or two adjacent transposed characters.
    OneCharDiff,
    /// Resident ID: differs by more than one character, and at least one is untrusted.
    DifferentUntrusted,
    SameDistrict,
    Different,
}

impl Field {
    /// The levels of this field, most to least agreeing; a comparison vector stores the
    /// index into this slice.
    pub const fn levels(self) -> &'static [Level] {
        use Level::*;
        match self {
            Field::Name => &[Exact, SamePinyin, Variant, Similar, Different],
            Field::BirthDate => &[Exact, DayMonthSwapped, OneDayOff, SameYear, Different],
            Field::Sex | Field::OtherId | Field::Phone => &[Exact, Different],
            Field::ResidentId => &[Exact, OneCharDiff, DifferentUntrusted, Different],
            Field::Address => &[Exact, Similar, SameDistrict, Different],
        }
    }

    /// Position of the field in a comparison vector.
    pub fn index(self) -> usize {
        FIELDS.iter().position(|f| *f == self).unwrap_or(0)
    }

    fn level_index(self, level: Level) -> Option<u8> {
        self.levels()
            .iter()
            .position(|l| *l == level)
            .and_then(|i| u8::try_from(i).ok())
    }
}

/// Comparison vector: per field, the index of its level in [`Field::levels`], or `None`
/// when a value is missing on either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComparisonVector(pub [Option<u8>; FIELD_COUNT]);

impl ComparisonVector {
    /// The level of `field`, if not missing.
    pub fn level(&self, field: Field) -> Option<Level> {
        let i = self.0[field.index()]?;
        field.levels().get(usize::from(i)).copied()
    }
}

/// Compare two prepared records field by field.
pub fn compare(a: &PreparedRecord, b: &PreparedRecord) -> ComparisonVector {
    let levels = [
        (Field::Name, compare_names(&a.name, &b.name)),
        (Field::BirthDate, compare_dates(a.birth_date, b.birth_date)),
        (Field::Sex, both(a.sex, b.sex).map(|(x, y)| agree(x == y))),
        (Field::ResidentId, compare_resident_ids(a, b)),
        (Field::OtherId, compare_other_ids(a, b)),
        (Field::Phone, compare_sets(&a.phones, &b.phones)),
        (Field::Address, compare_addresses(a, b)),
    ];
    let mut v = [None; FIELD_COUNT];
    for (i, (field, level)) in levels.into_iter().enumerate() {
        v[i] = level.and_then(|l| field.level_index(l));
    }
    ComparisonVector(v)
}

fn both<T>(a: Option<T>, b: Option<T>) -> Option<(T, T)> {
    a.zip(b)
}

fn agree(same: bool) -> Level {
    if same { Level::Exact } else { Level::Different }
}

/// Name level; `None` when either name is empty.
pub fn compare_names(a: &PersonName, b: &PersonName) -> Option<Level> {
    if a.script == NameScript::Empty || b.script == NameScript::Empty {
        return None;
    }
    if a.full == b.full {
        return Some(Level::Exact);
    }
    if a.romanised == b.romanised {
        return Some(Level::SamePinyin);
    }
    if a.script == NameScript::Han && b.script == NameScript::Han {
        if han_variant(&a.full, &b.full) {
            return Some(Level::Variant);
        }
        let same_surname = a.surname == b.surname || a.surname_pinyin == b.surname_pinyin;
        if same_surname
            && (dropped_one(&a.given, &b.given)
                || jaro_winkler(&a.given_pinyin, &b.given_pinyin) >= NAME_PINYIN_JW)
        {
            return Some(Level::Similar);
        }
        return Some(Level::Different);
    }
    let similar = jaro_winkler(&a.romanised, &b.romanised) >= NAME_ROMANISED_JW;
    Some(if similar {
        Level::Similar
    } else {
        Level::Different
    })
}

/// Same length and every position equal, a homophone or a look-alike.
fn han_variant(a: &str, b: &str) -> bool {
    a.chars().count() == b.chars().count()
        && a.chars().zip(b.chars()).all(|(x, y)| {
            x == y
                || lookalike_canonical(x) == lookalike_canonical(y)
                || char_pinyin(x) == char_pinyin(y)
        })
}

/// One name is the other with exactly one character dropped (and is not empty).
fn dropped_one(a: &str, b: &str) -> bool {
    let (short, long) = if a.chars().count() < b.chars().count() {
        (a, b)
    } else {
        (b, a)
    };
    if short.is_empty() || long.chars().count() != short.chars().count() + 1 {
        return false;
    }
    let mut it = long.chars();
    short.chars().all(|c| it.any(|l| l == c))
}

/// Birth-date level; `None` when either is missing.
pub fn compare_dates(a: Option<NaiveDate>, b: Option<NaiveDate>) -> Option<Level> {
    let (a, b) = both(a, b)?;
    Some(if a == b {
        Level::Exact
    } else if a.year() == b.year() && a.month() == b.day() && a.day() == b.month() {
        Level::DayMonthSwapped
    } else if (a - b).num_days().abs() == 1 {
        Level::OneDayOff
    } else if a.year() == b.year() {
        Level::SameYear
    } else {
        Level::Different
    })
}

/// Resident IDs are evidence only when both are trusted (valid GB 11643 numbers). With an
/// untrusted one, agreement (`Exact`, `OneCharDiff`) is no evidence at all — two records
/// sharing a malformed number must not be linked by it — and disagreement is the weak
/// `DifferentUntrusted`, never the `Different` that vetoes an auto-link.
fn compare_resident_ids(a: &PreparedRecord, b: &PreparedRecord) -> Option<Level> {
    let (x, y) = both(a.resident_id.as_ref(), b.resident_id.as_ref())?;
    match compare_id_numbers(&x.number, &y.number) {
        level if x.trusted && y.trusted => Some(level),
        Level::Different => Some(Level::DifferentUntrusted),
        _ => None,
    }
}

/// Resident ID numbers: exact, one substitution / adjacent transposition, or different.
pub fn compare_id_numbers(a: &str, b: &str) -> Level {
    if a == b {
        return Level::Exact;
    }
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if x.len() != y.len() {
        return Level::Different;
    }
    let diffs: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
    let transposed = diffs.len() == 2
        && diffs[1] == diffs[0] + 1
        && x[diffs[0]] == y[diffs[1]]
        && x[diffs[1]] == y[diffs[0]];
    if diffs.len() == 1 || transposed {
        Level::OneCharDiff
    } else {
        Level::Different
    }
}

fn compare_other_ids(a: &PreparedRecord, b: &PreparedRecord) -> Option<Level> {
    let mut shared_kind = false;
    for x in &a.other_ids {
        // Institution record numbers are only comparable within one institution.
        let namespace = |v: &str| v.split('/').next().map(str::to_owned);
        let comparable = |y: &&super::record::OtherId| {
            y.kind == x.kind
                && (x.kind != IdentifierKind::InstitutionRecord
                    || namespace(&x.value) == namespace(&y.value))
        };
        for y in b.other_ids.iter().filter(comparable) {
            if x.value == y.value {
                return Some(Level::Exact);
            }
            shared_kind = true;
        }
    }
    shared_kind.then_some(Level::Different)
}

fn compare_sets(a: &[String], b: &[String]) -> Option<Level> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    Some(agree(a.iter().any(|x| b.contains(x))))
}

fn compare_addresses(a: &PreparedRecord, b: &PreparedRecord) -> Option<Level> {
    let (x, y) = both(a.address.as_ref(), b.address.as_ref())?;
    Some(if x.full == y.full {
        Level::Exact
    } else if bigram_dice(&x.full, &y.full) >= ADDRESS_DICE {
        Level::Similar
    } else if !x.district.is_empty() && x.district == y.district {
        Level::SameDistrict
    } else {
        Level::Different
    })
}

/// Dice coefficient over character bigrams (multiset).
pub fn bigram_dice(a: &str, b: &str) -> f64 {
    fn bigrams(s: &str) -> Vec<(char, char)> {
        let c: Vec<char> = s.chars().collect();
        let mut v: Vec<(char, char)> = c.windows(2).map(|w| (w[0], w[1])).collect();
        v.sort_unstable();
        v
    }
    let (x, y) = (bigrams(a), bigrams(b));
    if x.is_empty() && y.is_empty() {
        return if a == b { 1.0 } else { 0.0 };
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < x.len() && j < y.len() {
        match x[i].cmp(&y[j]) {
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    2.0 * common as f64 / (x.len() + y.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::empi::normalize::{normalise_address, normalise_name};

    fn name_level(a: &str, b: &str) -> Option<Level> {
        compare_names(&normalise_name(a), &normalise_name(b))
    }

    #[test]
    fn name_levels() {
        let cases = [
            ("张伟", "张伟", Some(Level::Exact)),
            ("张 伟", "张伟", Some(Level::Exact)),
            ("张伟", "章伟", Some(Level::SamePinyin)),
            ("王芳", "王方", Some(Level::SamePinyin)),
            ("张伟", "Zhang Wei", Some(Level::SamePinyin)),
            ("王未", "玉末", Some(Level::Variant)),
            ("章秀莹", "张秀英", Some(Level::SamePinyin)),
            ("玉秀瑛", "王秀英", Some(Level::Variant)),
            ("张秀英", "张英", Some(Level::Similar)),
            ("李晓林", "李晓玲", Some(Level::Similar)),
            ("张秀英", "张秀兰", Some(Level::Different)),
            ("张伟", "李娜", Some(Level::Different)),
            ("zhang xiuying", "zhang xiuyin", Some(Level::Similar)),
            ("zhang xiuying", "li na", Some(Level::Different)),
            ("", "张伟", None),
        ];
        for (a, b, want) in cases {
            assert_eq!(name_level(a, b), want, "{a} / {b}");
        }
    }

    #[test]
    fn date_levels() {
        let d = |y, m, d| NaiveDate::from_ymd_opt(y, m, d);
        let cases = [
            (d(1980, 3, 12), d(1980, 3, 12), Some(Level::Exact)),
            (d(1980, 3, 12), d(1980, 12, 3), Some(Level::DayMonthSwapped)),
            (d(1980, 3, 12), d(1980, 3, 13), Some(Level::OneDayOff)),
            (d(1979, 12, 31), d(1980, 1, 1), Some(Level::OneDayOff)),
            (d(1980, 3, 12), d(1980, 7, 1), Some(Level::SameYear)),
            (d(1980, 3, 12), d(1981, 3, 12), Some(Level::Different)),
            (d(1980, 3, 12), None, None),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_dates(a, b), want, "{a:?} / {b:?}");
        }
    }

    #[test]
    fn resident_id_levels() {
        let cases = [
            ("11010519491231002X", "11010519491231002X", Level::Exact),
            (
                "11010519491231002X",
                "110105194912310021",
                Level::OneCharDiff,
            ),
            (
                "11010519491231002X",
                "11010519491213002X",
                Level::OneCharDiff,
            ),
            ("11010519491231002X", "110105194912310046", Level::Different),
            ("11010519491231002X", "1101051949123100", Level::Different),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_id_numbers(a, b), want, "{a} / {b}");
        }
    }

    /// Issue 25: an untrusted resident ID neither links (no agreement evidence) nor vetoes
    /// (never `Different`).
    #[test]
    fn untrusted_resident_ids_are_no_strong_evidence() {
        let level = |a: &str, b: &str| {
            let mut ra = blank();
            let mut rb = blank();
            ra.resident_id = Some(crate::empi::ident::parse_resident_id(a).0);
            rb.resident_id = Some(crate::empi::ident::parse_resident_id(b).0);
            compare(&ra, &rb).level(Field::ResidentId)
        };
        let valid = "11010519491231002X";
        let cases = [
            (valid, valid, Some(Level::Exact)),
            (valid, "110105194912130029", Some(Level::Different)),
            // Same malformed number on both (16 digits; month 13): no evidence.
            ("1101051949123100", "1101051949123100", None),
            ("110105194913310021", "110105194913310021", None),
            // A wrong check character next to the valid number: no evidence either way.
            (valid, "110105194912310021", None),
            // Disagreement with an untrusted number is weak, and never a veto.
            (valid, "110105198001010021", Some(Level::DifferentUntrusted)),
        ];
        for (a, b, want) in cases {
            assert_eq!(level(a, b), want, "{a} / {b}");
        }
    }

    #[test]
    fn address_levels() {
        let level = |a: &str, b: &str| {
            let (Some(x), Some(y)) = (normalise_address(a), normalise_address(b)) else {
                return None;
            };
            let mut ra = blank();
            let mut rb = blank();
            ra.address = Some(x);
            rb.address = Some(y);
            compare_addresses(&ra, &rb)
        };
        let base = "广东省广州市天河区体育西路12号";
        assert_eq!(
            level(base, "广东省 广州市 天河区 体育西路12号"),
            Some(Level::Exact)
        );
        assert_eq!(
            level(base, "广东省广州市天河区体育西路13号"),
            Some(Level::Similar)
        );
        assert_eq!(
            level(base, "广东省广州市天河区五山路381号"),
            Some(Level::SameDistrict)
        );
        assert_eq!(
            level(base, "北京市海淀区中关村大街1号"),
            Some(Level::Different)
        );
    }

    #[test]
    fn identifier_and_sex_levels() {
        use crate::empi::ident::Sex;
        use crate::empi::record::OtherId;
        let mut a = blank();
        let mut b = blank();
        assert_eq!(compare(&a, &b).0, [None; FIELD_COUNT]);
        a.sex = Some(Sex::Male);
        b.sex = Some(Sex::Female);
        a.phones = vec!["13800000000".into(), "13900000000".into()];
        b.phones = vec!["13900000000".into()];
        a.other_ids = vec![OtherId {
            kind: crate::empi::ident::IdentifierKind::Passport,
            value: "E1".into(),
        }];
        b.other_ids = vec![OtherId {
            kind: crate::empi::ident::IdentifierKind::Passport,
            value: "E2".into(),
        }];
        let v = compare(&a, &b);
        assert_eq!(v.level(Field::Sex), Some(Level::Different));
        assert_eq!(v.level(Field::Phone), Some(Level::Exact));
        assert_eq!(v.level(Field::OtherId), Some(Level::Different));
        b.other_ids[0].kind = crate::empi::ident::IdentifierKind::MedicalInsurance;
        assert_eq!(compare(&a, &b).level(Field::OtherId), None);
    }

    fn blank() -> PreparedRecord {
        crate::empi::record::prepare(&crate::empi::record::SourceRecord {
            record_id: crate::empi::record::RecordId(0),
            institution: String::new(),
            name: String::new(),
            sex: None,
            birth_date: None,
            identifiers: vec![],
            address: None,
        })
    }
}
