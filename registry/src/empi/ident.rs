//! Identifiers: GB 11643-1999 resident ID numbers (18-digit, legacy 15-digit), medical
//! insurance numbers, passports, phones and institution record numbers.
//!
//! An identifier that fails validation is kept as data but marked untrusted, and the
//! reason is reported as a [`DataQualityIssue`]; only trusted identifiers are strong.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// Administrative sex as recorded (GB/T 2261.1 codes 1 and 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sex {
    Male,
    Female,
}

/// What kind of identifier a value is; decides normalisation and comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IdentifierKind {
    /// GB 11643 resident ID number (居民身份证号码).
    ResidentId,
    /// Medical insurance number (医保号).
    MedicalInsurance,
    Passport,
    /// Mobile or fixed-line phone number.
    Phone,
    /// Record number inside one institution (病案号 / 门诊号); only unique per institution.
    InstitutionRecord,
}

/// A data-quality problem found while preparing a record. Stored with the record so a
/// data steward can fix the source; it never stops a record from being indexed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataQualityIssue {
    /// Resident ID has neither 15 nor 18 characters.
    ResidentIdLength,
    /// Resident ID contains characters other than digits (and a final X).
    ResidentIdCharacters,
    /// Resident ID has an impossible birth date.
    ResidentIdBirthDate,
    /// ISO 7064 MOD 11-2 check character does not match.
    ResidentIdCheckCharacter { expected: char, found: char },
    /// Legacy 15-digit number, upgraded to 18 for comparison.
    ResidentIdLegacy15,
    /// Legacy 15-digit number whose birth date, read as 19YY, contradicts the record's birth
    /// date (a person born in 2000 or later never held one): kept as given, untrusted.
    ResidentIdLegacy15BirthDate,
    /// Birth date on the record differs from the one encoded in the resident ID.
    BirthDateDisagreesWithResidentId,
    /// Sex on the record differs from the one encoded in the resident ID.
    SexDisagreesWithResidentId,
    /// Phone number that is neither an 11-digit mobile nor a plausible fixed line.
    PhoneInvalid,
    /// Empty identifier value.
    IdentifierEmpty(IdentifierKind),
    /// Name empty after normalisation.
    NameEmpty,
}

/// GB 11643 weights of the first 17 digits.
const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// `S mod 11` → check character.
const CHECK_MAP: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];

/// ISO 7064 MOD 11-2 check character for the first 17 digits; `None` if `first17` is not
/// exactly 17 ASCII digits.
pub fn check_character(first17: &str) -> Option<char> {
    let bytes = first17.as_bytes();
    if bytes.len() != 17 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = bytes
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    CHECK_MAP.get((sum % 11) as usize).copied()
}

/// A resident ID number after validation, always in 18-character form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidentId {
    /// 18 characters, upper-case `X`. For a number that failed validation this is the
    /// cleaned input as given (it may still have 18 characters).
    pub number: String,
    /// True only when length, characters, birth date and check character are all valid.
    pub trusted: bool,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    /// The record carried a legacy 15-digit number.
    pub upgraded_from_15: bool,
}

/// Upper-case, strip whitespace, separators and full-width forms.
fn clean_id(raw: &str) -> String {
    raw.chars()
        .filter_map(|c| {
            let c = full_to_half(c);
            if c.is_whitespace() || c == '-' {
                None
            } else {
                Some(c.to_ascii_uppercase())
            }
        })
        .collect()
}

/// Map a full-width ASCII variant (U+FF01..U+FF5E) and the ideographic space to ASCII.
pub fn full_to_half(c: char) -> char {
    match c {
        '\u{3000}' => ' ',
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

fn digits_date(yyyymmdd: &str) -> Option<NaiveDate> {
    let y = yyyymmdd.get(0..4)?.parse().ok()?;
    let m = yyyymmdd.get(4..6)?.parse().ok()?;
    let d = yyyymmdd.get(6..8)?.parse().ok()?;
    NaiveDate::from_ymd_opt(y, m, d)
}

/// Upgrade a legacy 15-digit number: insert "19" before the 2-digit year and append the
/// computed check character. `None` if the input is not 15 digits.
pub fn upgrade_15(number15: &str) -> Option<String> {
    if number15.len() != 15 || !number15.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let first17 = format!("{}19{}", number15.get(0..6)?, number15.get(6..)?);
    let check = check_character(&first17)?;
    Some(format!("{first17}{check}"))
}

/// Validate a resident ID number of a record whose birth date is `recorded_birth`: as
/// [`parse_resident_id`], and a legacy 15-digit number is upgraded ("19" inserted) only when
/// the birth date it then encodes agrees with the recorded one (or none is recorded); otherwise
/// it is kept as given, untrusted, with [`DataQualityIssue::ResidentIdLegacy15BirthDate`].
pub fn parse_resident_id_of(
    raw: &str,
    recorded_birth: Option<NaiveDate>,
) -> (ResidentId, Vec<DataQualityIssue>) {
    let (id, mut issues) = parse_resident_id(raw);
    if id.upgraded_from_15
        && let (Some(encoded), Some(recorded)) = (id.birth_date, recorded_birth)
        && encoded != recorded
    {
        issues.push(DataQualityIssue::ResidentIdLegacy15BirthDate);
        return (untrusted(clean_id(raw)), issues);
    }
    (id, issues)
}

/// Validate a resident ID number (18 or legacy 15 characters). Always returns the value
/// (kept as data) plus the issues found; `trusted` says whether it is a strong identifier:
/// 18 characters (a legacy 15-digit number upgraded), 17 digits and a check character that
/// is a digit or `X`, a real birth date, and the ISO 7064 MOD 11-2 check character right.
pub fn parse_resident_id(raw: &str) -> (ResidentId, Vec<DataQualityIssue>) {
    let cleaned = clean_id(raw);
    let mut issues = Vec::new();
    let (number, upgraded) = if cleaned.len() == 15 {
        match upgrade_15(&cleaned) {
            Some(n) => {
                issues.push(DataQualityIssue::ResidentIdLegacy15);
                (n, true)
            }
            None => {
                issues.push(DataQualityIssue::ResidentIdCharacters);
                return (untrusted(cleaned), issues);
            }
        }
    } else {
        (cleaned, false)
    };
    if number.len() != 18 {
        issues.push(DataQualityIssue::ResidentIdLength);
        return (untrusted(number), issues);
    }
    let (first17, last) = number.split_at(17);
    let Some(found) = last.chars().next() else {
        issues.push(DataQualityIssue::ResidentIdLength);
        return (untrusted(number), issues);
    };
    let Some(expected) = check_character(first17) else {
        issues.push(DataQualityIssue::ResidentIdCharacters);
        return (untrusted(number), issues);
    };
    if !(found.is_ascii_digit() || found == 'X') {
        issues.push(DataQualityIssue::ResidentIdCharacters);
    }
    let birth_date = first17.get(6..14).and_then(digits_date);
    if birth_date.is_none() {
        issues.push(DataQualityIssue::ResidentIdBirthDate);
    }
    if expected != found {
        issues.push(DataQualityIssue::ResidentIdCheckCharacter { expected, found });
    }
    let sex = first17.as_bytes().get(16).map(|d| {
        if (d - b'0') % 2 == 1 {
            Sex::Male
        } else {
            Sex::Female
        }
    });
    let trusted = issues
        .iter()
        .all(|i| *i == DataQualityIssue::ResidentIdLegacy15);
    let id = ResidentId {
        number,
        trusted,
        birth_date: birth_date.filter(|_| trusted),
        sex: sex.filter(|_| trusted),
        upgraded_from_15: upgraded,
    };
    (id, issues)
}

fn untrusted(number: String) -> ResidentId {
    ResidentId {
        number,
        trusted: false,
        birth_date: None,
        sex: None,
        upgraded_from_15: false,
    }
}

/// Normalise a phone number: full-width digits, separators, `+86`/`0086`/`86` prefixes
/// removed. Mobile numbers become 11 digits starting with 1; fixed lines keep their
/// area code with the leading 0. `None` if what remains is not plausible.
pub fn normalise_phone(raw: &str) -> Option<String> {
    let mut digits: String = raw
        .chars()
        .map(full_to_half)
        .filter(char::is_ascii_digit)
        .collect();
    for prefix in ["0086", "86"] {
        if digits.len() > 11 && digits.starts_with(prefix) {
            digits = digits.split_off(prefix.len());
            break;
        }
    }
    let mobile = digits.len() == 11 && digits.starts_with('1');
    let fixed = (10..=12).contains(&digits.len()) && digits.starts_with('0');
    (mobile || fixed).then_some(digits)
}

/// Normalise a non-resident, non-phone identifier: half-width, upper-case, no whitespace
/// or separators. `None` when empty.
pub fn normalise_other_id(raw: &str) -> Option<String> {
    let v = clean_id(raw);
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_18_digit_vectors() {
        for (raw, date, sex) in [
            ("11010519491231002X", (1949, 12, 31), Sex::Female),
            ("440524188001010014", (1880, 1, 1), Sex::Male),
            ("11010519491231002x", (1949, 12, 31), Sex::Female),
        ] {
            let (id, issues) = parse_resident_id(raw);
            assert!(id.trusted, "{raw}: {issues:?}");
            assert!(issues.is_empty());
            assert_eq!(
                id.birth_date,
                NaiveDate::from_ymd_opt(date.0, date.1, date.2)
            );
            assert_eq!(id.sex, Some(sex));
        }
    }

    #[test]
    fn wrong_check_digit_is_kept_but_untrusted() {
        let (id, issues) = parse_resident_id("110105194912310021");
        assert!(!id.trusted);
        assert_eq!(id.number, "110105194912310021");
        assert_eq!(
            issues,
            vec![DataQualityIssue::ResidentIdCheckCharacter {
                expected: 'X',
                found: '1'
            }]
        );
        assert_eq!(id.birth_date, None);
    }

    #[test]
    fn legacy_15_digit_is_upgraded() {
        // 11010549123100 2 → 110105 19 491231 002 + check X
        let (id, issues) = parse_resident_id("110105491231002");
        assert!(id.trusted);
        assert!(id.upgraded_from_15);
        assert_eq!(id.number, "11010519491231002X");
        assert_eq!(issues, vec![DataQualityIssue::ResidentIdLegacy15]);
        assert_eq!(upgrade_15("12345"), None);
    }

    #[test]
    fn malformed_ids() {
        let cases: &[(&str, DataQualityIssue)] = &[
            ("1101051949123100", DataQualityIssue::ResidentIdLength),
            ("1101051949A231002X", DataQualityIssue::ResidentIdCharacters),
            ("110105194913310021", DataQualityIssue::ResidentIdBirthDate),
            ("11010549123100A", DataQualityIssue::ResidentIdCharacters),
        ];
        for (raw, issue) in cases {
            let (id, issues) = parse_resident_id(raw);
            assert!(!id.trusted, "{raw}");
            assert!(issues.contains(issue), "{raw}: {issues:?}");
        }
    }

    /// Issue 25: none of these is a trusted identifier, each with its data-quality issue.
    #[test]
    fn invalid_numbers_are_never_trusted() {
        use DataQualityIssue::*;
        let wrong_check = ResidentIdCheckCharacter {
            expected: 'X',
            found: '1',
        };
        let cases: &[(&str, &str, DataQualityIssue)] = &[
            ("wrong check digit", "110105194912310021", wrong_check),
            ("month 13", "110105194913310021", ResidentIdBirthDate),
            ("day 32", "110105194912320021", ResidentIdBirthDate),
            ("February 30", "110105194902300021", ResidentIdBirthDate),
            ("16 digits", "1101051949123100", ResidentIdLength),
            ("17 digits", "11010519491231002", ResidentIdLength),
            ("19 characters", "11010519491231002X1", ResidentIdLength),
            (
                "a letter inside",
                "11010519491231A02X",
                ResidentIdCharacters,
            ),
            (
                "a final letter other than X",
                "11010519491231002Y",
                ResidentIdCharacters,
            ),
            ("X not last", "1101051949123100X2", ResidentIdCharacters),
            ("15 with a letter", "11010549123100X", ResidentIdCharacters),
            ("15 with month 13", "110105491331002", ResidentIdBirthDate),
            ("empty after cleaning", " - ", ResidentIdLength),
        ];
        for (what, raw, issue) in cases {
            let (id, issues) = parse_resident_id(raw);
            assert!(!id.trusted, "{what}: {raw}");
            assert_eq!((id.birth_date, id.sex), (None, None), "{what}");
            assert!(issues.contains(issue), "{what}: {issues:?}");
        }
    }

    /// Issue 25: a 15-digit number of someone born in 2005 is not turned into a 1905 one.
    #[test]
    fn legacy_15_contradicting_the_birth_date_is_not_upgraded() {
        let born = |y, m, d| NaiveDate::from_ymd_opt(y, m, d);
        // 350102 050304 123: read as 1905-03-04.
        let (id, issues) = parse_resident_id_of("350102050304123", born(2005, 3, 4));
        assert!(!id.trusted);
        assert!(!id.upgraded_from_15);
        assert_eq!(id.number, "350102050304123");
        assert_eq!(id.birth_date, None);
        assert!(issues.contains(&DataQualityIssue::ResidentIdLegacy15BirthDate));
        // Agreeing (or no) recorded birth date: upgraded and trusted as before.
        for recorded in [born(1905, 3, 4), None] {
            let (id, issues) = parse_resident_id_of("350102050304123", recorded);
            assert!(id.trusted && id.upgraded_from_15, "{recorded:?}");
            assert_eq!(id.birth_date, born(1905, 3, 4));
            assert_eq!(issues, vec![DataQualityIssue::ResidentIdLegacy15]);
        }
        // An 18-digit number is as issued: a disagreement is reported by `prepare`, not here.
        let (id, _) = parse_resident_id_of("11010519491231002X", born(1950, 1, 1));
        assert!(id.trusted);
    }

    #[test]
    fn full_width_and_spaces_are_cleaned() {
        let (id, _) = parse_resident_id("１１０１０５ 19491231 002Ｘ");
        assert!(id.trusted);
        assert_eq!(id.number, "11010519491231002X");
    }

    #[test]
    fn phones_normalise() {
        let cases = [
            ("+86 138-1234-5678", Some("13812345678")),
            ("0086 13812345678", Some("13812345678")),
            ("8613812345678", Some("13812345678")),
            ("１３８ １２３４ ５６７８", Some("13812345678")),
            ("010-62345678", Some("01062345678")),
            ("12345", None),
            ("", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalise_phone(raw).as_deref(), want, "{raw}");
        }
    }
}
