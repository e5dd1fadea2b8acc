//! Masking and de-identification of FHIR resources (GB/T 37964-2019 techniques:
//! suppression, masking, generalisation, pseudonymisation).
//!
//! Rules name a FHIR path such as `Patient.name` or `Patient.contact.telecom`. The first
//! segment is a resource type: the rule applies to every resource of that type anywhere in
//! the document — the top-level resource, `contained` resources and `Bundle.entry.resource`,
//! at any depth. Arrays along the path are walked element by element.
//!
//! Masking is fail-closed in three ways:
//! 1. each technique rewrites every part of a field that can hold the value (`HumanName.text`,
//!    `family`, `given`, and the field's `extension`s, which are dropped); a value of an
//!    unexpected shape is removed, not passed through;
//! 2. a resource that any rule touched loses its narrative (`text`), which repeats the data;
//! 3. after the rules ran, every original value that was changed or removed is looked for in
//!    **every** string of the document (extensions, identifiers of contained resources, notes)
//!    and replaced there too. An exact match is always replaced; a value is also replaced inside
//!    longer strings when it has at least 2 characters and is not pure ASCII (Chinese names),
//!    or at least 4 characters. This errs on the side of privacy: an unrelated string that
//!    happens to contain a masked value is masked as well.
//!
//! A value that sits only in a field no rule names, and duplicates no masked value, cannot be
//! recognised and is left alone: configure a rule for such fields.

use crate::config::ConfigError;
use crate::decision::Obligation;
use crate::ids::InstitutionId;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sm3::Sm3;
use std::fmt;
use thiserror::Error;

/// Identifier system given to pseudonymised identifiers.
pub const PSEUDONYM_SYSTEM: &str = "urn:yiqiao:pseudonym:hmac-sm3";

/// A de-identification technique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Technique {
    /// Masking a `HumanName` or name string: keep the first character (张三丰 → 张**).
    Name,
    /// Masking an `Identifier` or id string: resident ID keeps first 6 and last 4
    /// (110105********002X); other identifiers keep the last 4 when at least 8 long.
    Identifier,
    /// Masking a `ContactPoint`: phone keeps first 3 and last 4 digits (138****5678),
    /// email keeps first character and domain (z****@example.com).
    Telecom,
    /// Generalising an `Address` to the district: keeps country/state/city/district,
    /// drops line/postalCode; text is cut after the 区/县.
    Address,
    /// Generalising a date to its year (1949-12-31 → 1949).
    DateToYear,
    /// Suppression: the field is removed.
    Suppress,
    /// Pseudonymisation: keyed HMAC-SM3, scoped to the requester.
    Pseudonymise,
}

/// One masking rule: a FHIR path and a technique.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// `ResourceType.field[.field…]`, e.g. `Patient.contact.telecom`.
    pub path: String,
    /// What to do with it.
    pub technique: Technique,
}

impl FieldRule {
    /// A rule.
    pub fn new(path: impl Into<String>, technique: Technique) -> Self {
        Self {
            path: path.into(),
            technique,
        }
    }

    /// Checks the path is `ResourceType.field[.field…]` with non-empty segments.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut segments = self.path.split('.');
        let ok = segments
            .next()
            .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))
            && self.path.split('.').count() >= 2
            && self
                .path
                .split('.')
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if ok {
            Ok(())
        } else {
            Err(ConfigError::BadPath(self.path.clone()))
        }
    }

    fn split(&self) -> (&str, Vec<&str>) {
        let mut segments = self.path.split('.');
        let ty = segments.next().unwrap_or_default();
        (ty, segments.collect())
    }
}

/// Masking could not be done; the response must not be released.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaskError {
    /// The pseudonymisation key is too short.
    #[error("pseudonymisation key must be at least {min} bytes, got {len}")]
    KeyTooShort {
        /// Required length.
        min: usize,
        /// Given length.
        len: usize,
    },
    /// A pseudonymisation obligation was given without a pseudonymiser.
    #[error("a pseudonymisation obligation needs a pseudonymiser (key) and none was given")]
    MissingPseudonymiser,
}

/// The secret key for pseudonyms. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct PseudonymKey(Vec<u8>);

impl PseudonymKey {
    /// Minimum key length in bytes.
    pub const MIN_LEN: usize = 16;

    /// Wraps key bytes (at least [`PseudonymKey::MIN_LEN`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, MaskError> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN {
            return Err(MaskError::KeyTooShort {
                min: Self::MIN_LEN,
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(<redacted>)")
    }
}

/// Makes pseudonyms: HMAC-SM3 over (requester, namespace, value), hex encoded.
///
/// Stable for one requester and key, different between requesters (so two recipients cannot
/// link their data sets), and not reversible without the key.
#[derive(Clone)]
pub struct Pseudonymiser {
    mac: Hmac<Sm3>,
    requester: InstitutionId,
}

impl fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pseudonymiser")
            .field("requester", &self.requester)
            .finish_non_exhaustive()
    }
}

impl Pseudonymiser {
    /// A pseudonymiser for one requester.
    pub fn new(key: &PseudonymKey, requester: InstitutionId) -> Self {
        // HMAC accepts keys of any length; the fallback is unreachable but keeps us panic-free.
        let mac = <Hmac<Sm3> as KeyInit>::new_from_slice(&key.0)
            .unwrap_or_else(|_| <Hmac<Sm3> as KeyInit>::new(&Default::default()));
        Self { mac, requester }
    }

    /// The pseudonym of `value` within `namespace` (e.g. an identifier system).
    pub fn pseudonym(&self, namespace: &str, value: &str) -> String {
        let mut mac = self.mac.clone();
        for part in [self.requester.as_str(), namespace, value] {
            // Length-prefix every part so that ("ab","c") and ("a","bc") differ.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex(&mac.finalize().into_bytes())
    }
}

/// Raw HMAC-SM3 (RFC 2104 over SM3), exposed for test vectors.
pub fn hmac_sm3(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(mut mac) = <Hmac<Sm3> as KeyInit>::new_from_slice(key) {
        mac.update(message);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Value-level techniques.

/// 张三丰 → 张**, John Smith → J*** *****: keep the first character, star every other
/// non-space character. A one-character name becomes `*`.
pub fn mask_name(name: &str) -> String {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return String::new();
    };
    if name.chars().count() == 1 {
        return "*".to_owned();
    }
    std::iter::once(first)
        .chain(chars.map(|c| if c.is_whitespace() { c } else { '*' }))
        .collect()
}

/// A family name keeps its first character even when that is all of it (张 → 张,
/// 欧阳 → 欧*, Smith → S****): it is the character the masked full name shows anyway.
fn mask_family(family: &str) -> String {
    let mut chars = family.chars();
    chars
        .next()
        .into_iter()
        .chain(chars.map(|c| if c.is_whitespace() { c } else { '*' }))
        .collect()
}

/// Every non-space character starred (used for given names: the first character of a name is
/// kept from the family name only).
fn star_all(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_whitespace() { c } else { '*' })
        .collect()
}

/// Whether `s` has the shape of a resident ID (18 characters, 17 digits then digit or X; or a
/// legacy 15-digit number).
pub fn looks_like_resident_id(s: &str) -> bool {
    let b = s.as_bytes();
    match b.len() {
        18 => {
            b[..17].iter().all(u8::is_ascii_digit)
                && (b[17].is_ascii_digit() || b[17] == b'X' || b[17] == b'x')
        }
        15 => b.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

fn keep_ends(s: &str, head: usize, tail: usize) -> String {
    let n = s.chars().count();
    if n <= head + tail {
        return star_all(s);
    }
    s.chars()
        .enumerate()
        .map(|(i, c)| if i < head || i >= n - tail { c } else { '*' })
        .collect()
}

/// 11010519491231002X → 110105********002X (first 6 and last 4 kept).
pub fn mask_resident_id(id: &str) -> String {
    keep_ends(id, 6, 4)
}

/// Other identifiers: the last 4 kept when at least 8 characters, else all starred.
pub fn mask_identifier_value(value: &str) -> String {
    if looks_like_resident_id(value) {
        mask_resident_id(value)
    } else if value.chars().count() >= 8 {
        keep_ends(value, 0, 4)
    } else {
        star_all(value)
    }
}

/// 13812345678 → 138****5678: the first 3 and last 4 digits kept, separators kept; with fewer
/// than 8 digits every digit is starred.
pub fn mask_phone(phone: &str) -> String {
    let digits = phone.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    phone
        .chars()
        .map(|c| {
            if !c.is_ascii_digit() {
                return if c.is_alphanumeric() { '*' } else { c };
            }
            seen += 1;
            if digits >= 8 && (seen <= 3 || seen > digits - 4) {
                c
            } else {
                '*'
            }
        })
        .collect()
}

/// zhangsan@example.com → z****@example.com (a fixed 4 stars hide the length).
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() => {
            let first = local.chars().next().map(String::from).unwrap_or_default();
            format!("{first}****@{domain}")
        }
        _ => star_all(email),
    }
}

/// 北京市海淀区中关村大街27号 → 北京市海淀区******: keep the address up to the county level
/// (区/县/旗), not counting 自治区/地区/特别行政区, which are province or prefecture level.
/// Without a county marker the text is kept up to the first 市 (or 省); failing that, it is
/// starred whole. Non-Chinese text keeps nothing.
pub fn mask_address_text(text: &str) -> String {
    const SUFFIX: &str = "******";
    let mut prefix = String::new();
    let mut cut: Option<usize> = None;
    let mut city: Option<usize> = None;
    let mut province: Option<usize> = None;
    for (i, c) in text.char_indices() {
        prefix.push(c);
        let end = i + c.len_utf8();
        match c {
            '县' | '旗' => {
                cut = Some(end);
                break;
            }
            '区' if !(prefix.ends_with("自治区")
                || prefix.ends_with("地区")
                || prefix.ends_with("特别行政区")) =>
            {
                cut = Some(end);
                break;
            }
            '市' if city.is_none() => city = Some(end),
            '省' if province.is_none() => province = Some(end),
            _ => {}
        }
    }
    match cut.or(city).or(province) {
        Some(end) if end == text.len() => text.to_owned(),
        Some(end) => format!("{}{SUFFIX}", &text[..end]),
        None => SUFFIX.to_owned(),
    }
}

/// 1949-12-31 → 1949. `None` when the value does not start with a 4-digit year.
pub fn generalise_date_to_year(date: &str) -> Option<String> {
    let year = date.get(..4)?;
    year.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| year.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Resource-level application.

/// Applies the masking and pseudonymisation obligations of a decision to a FHIR resource (or
/// Bundle). `FlagForReview` needs no change to the data and is ignored here.
pub fn apply_obligations(
    resource: &mut Value,
    obligations: &[Obligation],
    pseudonymiser: Option<&Pseudonymiser>,
) -> Result<(), MaskError> {
    let rules: Vec<FieldRule> = obligations
        .iter()
        .flat_map(|o| match o {
            Obligation::Mask { rules } | Obligation::Pseudonymise { rules } => rules.as_slice(),
            Obligation::FlagForReview { .. } => &[],
        })
        .cloned()
        .collect();
    apply_rules(resource, &rules, pseudonymiser)
}

/// Applies field rules to a FHIR resource (or Bundle) in place.
pub fn apply_rules(
    resource: &mut Value,
    rules: &[FieldRule],
    pseudonymiser: Option<&Pseudonymiser>,
) -> Result<(), MaskError> {
    if rules.is_empty() {
        return Ok(());
    }
    if pseudonymiser.is_none() && rules.iter().any(|r| r.technique == Technique::Pseudonymise) {
        return Err(MaskError::MissingPseudonymiser);
    }
    let compiled: Vec<(&str, Vec<&str>, Technique)> = rules
        .iter()
        .map(|r| {
            let (ty, fields) = r.split();
            (ty, fields, r.technique)
        })
        .collect();
    let mut run = MaskRun {
        rules: &compiled,
        pseudonymiser,
        replaced: Vec::new(),
    };
    run.walk(resource);
    run.sweep(resource);
    Ok(())
}

/// Keys under which a removed subtree holds personal values (as opposed to codes).
const PERSONAL_KEYS: [&str; 9] = [
    "value",
    "text",
    "family",
    "given",
    "line",
    "postalCode",
    "valueString",
    "id",
    "reference",
];

struct MaskRun<'a> {
    rules: &'a [(&'a str, Vec<&'a str>, Technique)],
    pseudonymiser: Option<&'a Pseudonymiser>,
    /// (original, replacement) pairs for the final sweep.
    replaced: Vec<(String, String)>,
}

impl MaskRun<'_> {
    fn record(&mut self, original: &str, replacement: &str) {
        if !original.is_empty() && original != replacement {
            self.replaced
                .push((original.to_owned(), replacement.to_owned()));
        }
    }

    /// Remembers every personal string of a removed subtree.
    fn record_removed(&mut self, value: &Value, personal: bool) {
        match value {
            Value::String(s) if personal => self.record(s, "***"),
            Value::Array(items) => items.iter().for_each(|v| self.record_removed(v, personal)),
            Value::Object(map) => {
                for (k, v) in map {
                    self.record_removed(v, PERSONAL_KEYS.contains(&k.as_str()));
                }
            }
            _ => {}
        }
    }

    fn walk(&mut self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                let ty = map
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let Some(ty) = ty {
                    self.apply_resource(&ty, map);
                }
                for child in map.values_mut() {
                    self.walk(child);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.walk(v)),
            _ => {}
        }
    }

    fn apply_resource(&mut self, ty: &str, map: &mut Map<String, Value>) {
        let rules = self.rules;
        let mut touched = false;
        for (rule_ty, fields, technique) in rules {
            if *rule_ty == ty {
                touched = true;
                self.apply_path(ty, map, fields, *technique);
            }
        }
        if touched && let Some(narrative) = map.remove("text") {
            self.record_removed(&narrative, false);
        }
    }

    fn apply_path(
        &mut self,
        ty: &str,
        map: &mut Map<String, Value>,
        fields: &[&str],
        technique: Technique,
    ) {
        let Some((first, rest)) = fields.split_first() else {
            return;
        };
        if rest.is_empty() {
            self.apply_terminal(ty, map, first, technique);
            return;
        }
        match map.get_mut(*first) {
            Some(Value::Object(child)) => self.apply_path(ty, child, rest, technique),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::Object(child) = item {
                        self.apply_path(ty, child, rest, technique);
                    }
                }
            }
            _ => {}
        }
    }

    fn apply_terminal(
        &mut self,
        ty: &str,
        map: &mut Map<String, Value>,
        key: &str,
        technique: Technique,
    ) {
        if technique == Technique::Suppress {
            if let Some(removed) = map.remove(key) {
                self.record_removed(&removed, true);
            }
            return;
        }
        let Some(value) = map.get_mut(key) else {
            return;
        };
        let remove = match value {
            Value::Array(items) => {
                for item in items.iter_mut() {
                    self.transform(ty, key, item, technique);
                }
                items.retain(|v| !v.is_null());
                items.is_empty()
            }
            other => {
                self.transform(ty, key, other, technique);
                other.is_null()
            }
        };
        if remove {
            map.remove(key);
        }
    }

    /// Rewrites one value in place; sets it to `Null` when it must be removed.
    fn transform(&mut self, ty: &str, key: &str, value: &mut Value, technique: Technique) {
        let outcome = match (technique, &mut *value) {
            (Technique::Name, Value::Object(name)) => {
                self.rewrite_string(name, "text", mask_name);
                self.rewrite_string(name, "family", mask_family);
                self.rewrite_strings(name, "given", star_all);
                self.drop_fields(name, &["extension"]);
                true
            }
            (Technique::Identifier, Value::Object(id)) => {
                self.rewrite_string(id, "value", mask_identifier_value);
                self.drop_fields(id, &["extension"]);
                true
            }
            (Technique::Telecom, Value::Object(cp)) => {
                let system = cp
                    .get("system")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.rewrite_string(cp, "value", |v| mask_contact_value(&system, v));
                self.drop_fields(cp, &["extension"]);
                true
            }
            (Technique::Address, Value::Object(addr)) => {
                self.drop_fields(addr, &["line", "postalCode", "extension"]);
                self.rewrite_string(addr, "text", mask_address_text);
                true
            }
            (Technique::Pseudonymise, Value::Object(id)) => self.pseudonymise_identifier(id),
            (Technique::Pseudonymise, Value::String(s)) => {
                let original = s.clone();
                match self.pseudonymiser {
                    Some(p) => {
                        let pseudo = p.pseudonym(ty, &original);
                        if key == "id" {
                            self.record(&format!("{ty}/{original}"), &format!("{ty}/{pseudo}"));
                        }
                        self.record(&original, &pseudo);
                        *s = pseudo;
                        true
                    }
                    None => false,
                }
            }
            (Technique::DateToYear, Value::String(s)) => match generalise_date_to_year(s) {
                Some(year) => {
                    let original = std::mem::replace(s, year);
                    self.record(&original, s);
                    true
                }
                None => false,
            },
            (
                Technique::Name | Technique::Identifier | Technique::Telecom | Technique::Address,
                Value::String(s),
            ) => {
                let masked = match technique {
                    Technique::Name => mask_name(s),
                    Technique::Identifier => mask_identifier_value(s),
                    Technique::Telecom => mask_contact_value("", s),
                    _ => mask_address_text(s),
                };
                let original = std::mem::replace(s, masked);
                self.record(&original, s);
                true
            }
            _ => false,
        };
        if !outcome {
            self.record_removed(value, true);
            *value = Value::Null;
        }
    }

    fn pseudonymise_identifier(&mut self, id: &mut Map<String, Value>) -> bool {
        let (Some(p), Some(value)) = (self.pseudonymiser, id.get("value").and_then(Value::as_str))
        else {
            return false;
        };
        let system = id.get("system").and_then(Value::as_str).unwrap_or_default();
        let pseudo = p.pseudonym(system, value);
        let mut old = std::mem::take(id);
        if let Some(Value::String(v)) = old.remove("value") {
            self.record(&v, &pseudo);
        }
        // Everything else (type text, assigner, period, extensions) is dropped.
        self.record_removed(&Value::Object(old), false);
        id.insert(
            "system".to_owned(),
            Value::String(PSEUDONYM_SYSTEM.to_owned()),
        );
        id.insert("value".to_owned(), Value::String(pseudo));
        true
    }

    fn rewrite_string(
        &mut self,
        map: &mut Map<String, Value>,
        key: &str,
        f: impl Fn(&str) -> String,
    ) {
        if let Some(Value::String(s)) = map.get_mut(key) {
            let masked = f(s);
            let original = std::mem::replace(s, masked);
            self.record(&original, s);
        } else if let Some(other) = map.get(key).filter(|v| !v.is_string()) {
            // Unexpected shape: remove rather than pass through.
            let other = other.clone();
            self.record_removed(&other, true);
            map.remove(key);
        }
    }

    fn rewrite_strings(
        &mut self,
        map: &mut Map<String, Value>,
        key: &str,
        f: impl Fn(&str) -> String,
    ) {
        match map.get_mut(key) {
            Some(Value::Array(items)) => {
                let mut pairs = Vec::new();
                for item in items.iter_mut() {
                    if let Value::String(s) = item {
                        let masked = f(s);
                        pairs.push((std::mem::replace(s, masked), s.clone()));
                    } else {
                        pairs.push((String::new(), String::new()));
                        *item = Value::Null;
                    }
                }
                items.retain(|v| !v.is_null());
                for (o, m) in pairs {
                    self.record(&o, &m);
                }
            }
            Some(_) => self.rewrite_string(map, key, f),
            None => {}
        }
    }

    fn drop_fields(&mut self, map: &mut Map<String, Value>, keys: &[&str]) {
        for key in keys {
            if let Some(removed) = map.remove(*key) {
                self.record_removed(&removed, *key != "extension");
            }
        }
    }

    /// Replaces every remaining occurrence of a changed or removed value anywhere.
    fn sweep(&mut self, value: &mut Value) {
        if self.replaced.is_empty() {
            return;
        }
        // Longest first, so that 张三丰 is replaced before 三丰.
        self.replaced.sort_by(|a, b| {
            b.0.chars()
                .count()
                .cmp(&a.0.chars().count())
                .then_with(|| a.0.cmp(&b.0))
        });
        self.replaced.dedup_by(|a, b| a.0 == b.0);
        sweep_value(value, &self.replaced);
    }
}

fn mask_contact_value(system: &str, value: &str) -> String {
    match system {
        "email" => mask_email(value),
        "phone" | "fax" | "sms" | "pager" => mask_phone(value),
        _ if value.contains('@') => mask_email(value),
        _ if value.chars().filter(char::is_ascii_digit).count() >= 7 => mask_phone(value),
        _ => star_all(value),
    }
}

fn substring_sweepable(original: &str) -> bool {
    let n = original.chars().count();
    if original.is_ascii() { n >= 4 } else { n >= 2 }
}

fn sweep_value(value: &mut Value, replaced: &[(String, String)]) {
    match value {
        Value::String(s) => {
            if let Some((_, r)) = replaced.iter().find(|(o, _)| o == s) {
                *s = r.clone();
                return;
            }
            for (original, replacement) in replaced {
                if substring_sweepable(original) && s.contains(original.as_str()) {
                    *s = s.replace(original.as_str(), replacement);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| sweep_value(v, replaced)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if !STRUCTURAL_KEYS.contains(&key.as_str()) {
                    sweep_value(v, replaced);
                }
            }
        }
        _ => {}
    }
}

/// Keys whose values are structure or codes, never personal data: the sweep leaves them
/// alone so that a patient called "Pati" cannot corrupt `"resourceType": "Patient"`.
const STRUCTURAL_KEYS: [&str; 6] = ["resourceType", "url", "system", "use", "status", "code"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn key() -> PseudonymKey {
        PseudonymKey::new(b"0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(mask_name("张三丰"), "张**");
        assert_eq!(mask_name("张三"), "张*");
        assert_eq!(mask_name("欧阳锋"), "欧**");
        assert_eq!(mask_name("张"), "*");
        assert_eq!(mask_name(""), "");
        assert_eq!(mask_name("John Smith"), "J*** *****");
        assert_eq!(mask_name("Smith"), "S****");
    }

    #[test]
    fn resident_ids() {
        assert_eq!(mask_resident_id("11010519491231002X"), "110105********002X");
        assert_eq!(mask_resident_id("440524188001010014"), "440524********0014");
        assert_eq!(
            mask_identifier_value("11010519491231002X"),
            "110105********002X"
        );
        assert_eq!(
            mask_identifier_value("110105491231002"),
            "110105*****1002",
            "legacy 15-digit"
        );
        assert_eq!(mask_identifier_value("MRN-00012345"), "********2345");
        assert_eq!(mask_identifier_value("A123"), "****");
        assert!(looks_like_resident_id("11010519491231002x"));
        assert!(!looks_like_resident_id("1101051949123100ZX"));
    }

    #[test]
    fn phones() {
        assert_eq!(mask_phone("13812345678"), "138****5678");
        assert_eq!(mask_phone("138-1234-5678"), "138-****-5678");
        assert_eq!(mask_phone("+86 13812345678"), "+86 1******5678");
        assert_eq!(mask_phone("123456"), "******");
    }

    #[test]
    fn emails() {
        assert_eq!(mask_email("zhangsan@example.com"), "z****@example.com");
        assert_eq!(mask_email("z@example.com"), "z****@example.com");
        assert_eq!(mask_email("not-an-email"), "************");
        assert_eq!(mask_email("@example.com"), "************");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            mask_address_text("北京市海淀区中关村大街27号"),
            "北京市海淀区******"
        );
        assert_eq!(mask_address_text("北京市海淀区"), "北京市海淀区");
        assert_eq!(
            mask_address_text("广东省深圳市南山区科技园8栋"),
            "广东省深圳市南山区******"
        );
        assert_eq!(
            mask_address_text("广西壮族自治区南宁市青秀区民族大道1号"),
            "广西壮族自治区南宁市青秀区******"
        );
        assert_eq!(
            mask_address_text("新疆维吾尔自治区和田地区和田县某乡"),
            "新疆维吾尔自治区和田地区和田县******"
        );
        assert_eq!(
            mask_address_text("内蒙古自治区呼伦贝尔市鄂温克族自治旗巴彦托海镇"),
            "内蒙古自治区呼伦贝尔市鄂温克族自治旗******"
        );
        assert_eq!(
            mask_address_text("江苏省昆山市玉山镇1号"),
            "江苏省昆山市******"
        );
        assert_eq!(mask_address_text("1 Main Street, Springfield"), "******");
    }

    #[test]
    fn birth_dates() {
        assert_eq!(
            generalise_date_to_year("1949-12-31").as_deref(),
            Some("1949")
        );
        assert_eq!(generalise_date_to_year("1949").as_deref(), Some("1949"));
        assert_eq!(generalise_date_to_year("49-1"), None);
    }

    #[test]
    fn hmac_sm3_matches_openssl() {
        // openssl dgst -sm3 -hmac 0123456789abcdef <<< -n abc (also Python hmac with 'sm3').
        let mac = hmac_sm3(b"0123456789abcdef", b"abc");
        assert_eq!(
            hex(&mac),
            "7f121eb91c94ccf54bf5d4e639f4e96eaa77bb2f0f52f875fc7c17ca0688278c"
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_requester_and_keyed() {
        let a = Pseudonymiser::new(&key(), InstitutionId::new("r1"));
        let b = Pseudonymiser::new(&key(), InstitutionId::new("r2"));
        let other_key = Pseudonymiser::new(
            &PseudonymKey::new(vec![7u8; 32]).unwrap(),
            InstitutionId::new("r1"),
        );
        let p = a.pseudonym("urn:oid:2.16.156.10011.1.1", "11010519491231002X");
        assert_eq!(
            p,
            a.pseudonym("urn:oid:2.16.156.10011.1.1", "11010519491231002X")
        );
        assert_eq!(p.len(), 64);
        assert_ne!(
            p,
            b.pseudonym("urn:oid:2.16.156.10011.1.1", "11010519491231002X")
        );
        assert_ne!(
            p,
            other_key.pseudonym("urn:oid:2.16.156.10011.1.1", "11010519491231002X")
        );
        assert_ne!(a.pseudonym("ab", "c"), a.pseudonym("a", "bc"));
        assert!(!format!("{:?}", key()).contains("0123"));
        assert_eq!(
            PseudonymKey::new(vec![1u8; 3]).unwrap_err(),
            MaskError::KeyTooShort { min: 16, len: 3 }
        );
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "text": {"status": "generated", "div": "<div>张三丰 13812345678</div>"},
            "extension": [{"url": "http://example.org/alias", "valueString": "张三丰"}],
            "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": "11010519491231002X"}],
            "name": [{"use": "official", "text": "张三丰", "family": "张", "given": ["三丰"]},
                     {"text": "Zhang Sanfeng", "family": "Zhang", "given": ["Sanfeng"]}],
            "telecom": [{"system": "phone", "value": "13812345678"},
                        {"system": "email", "value": "zhangsan@example.com"}],
            "address": [{"text": "北京市海淀区中关村大街27号", "line": ["中关村大街27号"],
                         "city": "北京市", "district": "海淀区", "state": "北京市", "postalCode": "100080"}],
            "birthDate": "1949-12-31",
            "contained": [{"resourceType": "Patient", "id": "c",
                           "identifier": [{"value": "440524188001010014"}],
                           "name": [{"family": "李", "given": ["四"]}]}]
        })
    }

    fn full_mask() -> Vec<FieldRule> {
        ["name", "identifier", "telecom", "address"]
            .iter()
            .zip([
                Technique::Name,
                Technique::Identifier,
                Technique::Telecom,
                Technique::Address,
            ])
            .map(|(f, t)| FieldRule::new(format!("Patient.{f}"), t))
            .chain([FieldRule::new("Patient.birthDate", Technique::DateToYear)])
            .collect()
    }

    #[test]
    fn masks_a_patient_field_by_field() {
        let mut p = patient();
        apply_rules(&mut p, &full_mask(), None).unwrap();
        assert_eq!(p["name"][0]["text"], "张**");
        assert_eq!(p["name"][0]["family"], "张");
        assert_eq!(p["name"][0]["given"][0], "**");
        assert_eq!(p["name"][1]["text"], "Z**** *******");
        assert_eq!(p["identifier"][0]["value"], "110105********002X");
        assert_eq!(p["telecom"][0]["value"], "138****5678");
        assert_eq!(p["telecom"][1]["value"], "z****@example.com");
        assert_eq!(p["address"][0]["text"], "北京市海淀区******");
        assert_eq!(p["address"][0]["district"], "海淀区");
        assert!(p["address"][0].get("line").is_none());
        assert!(p["address"][0].get("postalCode").is_none());
        assert_eq!(p["birthDate"], "1949");
        assert!(p.get("text").is_none(), "narrative dropped");
        assert_eq!(p["extension"][0]["valueString"], "张**", "swept");
        assert_eq!(
            p["contained"][0]["identifier"][0]["value"],
            "440524********0014"
        );
        assert_eq!(p["contained"][0]["name"][0]["given"][0], "*");
        let s = p.to_string();
        for secret in [
            "三丰",
            "11010519491231002X",
            "13812345678",
            "zhangsan",
            "中关村",
            "100080",
            "1949-12-31",
            "Sanfeng",
        ] {
            assert!(!s.contains(secret), "{secret} leaked in {s}");
        }
    }

    #[test]
    fn masks_inside_bundle_entries_and_nested_paths() {
        let mut bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "contact": [{"name": {"text": "王五"},
                "telecom": [{"system": "phone", "value": "13900001111"}]}]}},
            {"resource": {"resourceType": "Observation", "note": [{"text": "call 13900001111"}]}}
        ]});
        let rules = vec![
            FieldRule::new("Patient.contact.name", Technique::Name),
            FieldRule::new("Patient.contact.telecom", Technique::Telecom),
        ];
        apply_rules(&mut bundle, &rules, None).unwrap();
        let s = bundle.to_string();
        assert!(!s.contains("王五") && !s.contains("13900001111"), "{s}");
        assert_eq!(
            bundle["entry"][0]["resource"]["contact"][0]["name"]["text"],
            "王*"
        );
        assert_eq!(
            bundle["entry"][1]["resource"]["note"][0]["text"],
            "call 139****1111"
        );
    }

    #[test]
    fn pseudonymises_ids_identifiers_and_references() {
        let key = key();
        let ps = Pseudonymiser::new(&key, InstitutionId::new("research-1"));
        let mut bundle = json!({"resourceType": "Bundle", "entry": [
            {"fullUrl": "urn:x:Patient/p-0001", "resource": patient()},
            {"resource": {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}}
        ]});
        let rules = vec![
            FieldRule::new("Patient.id", Technique::Pseudonymise),
            FieldRule::new("Patient.identifier", Technique::Pseudonymise),
            FieldRule::new("Patient.name", Technique::Suppress),
            FieldRule::new("Patient.telecom", Technique::Suppress),
        ];
        apply_rules(&mut bundle, &rules, Some(&ps)).unwrap();
        let patient = &bundle["entry"][0]["resource"];
        let pseudo = ps.pseudonym("Patient", "p1");
        assert_eq!(patient["id"], pseudo.as_str());
        assert_eq!(patient["identifier"][0]["system"], PSEUDONYM_SYSTEM);
        assert_eq!(
            patient["identifier"][0]["value"],
            ps.pseudonym("urn:oid:2.16.156.10011.1.1", "11010519491231002X")
                .as_str()
        );
        assert!(patient.get("name").is_none());
        assert_eq!(
            bundle["entry"][1]["resource"]["subject"]["reference"],
            format!("Patient/{pseudo}").as_str()
        );
        let s = bundle.to_string();
        assert!(
            !s.contains("11010519491231002X") && !s.contains("三丰") && !s.contains("13812345678"),
            "{s}"
        );
        assert_eq!(
            apply_rules(&mut patient.clone(), &rules, None).unwrap_err(),
            MaskError::MissingPseudonymiser
        );
    }

    #[test]
    fn unexpected_shapes_are_removed_not_passed_through() {
        let mut p = json!({"resourceType": "Patient", "birthDate": {"odd": "1949-12-31"}, "name": [42, {"text": "张三"}]});
        let rules = vec![
            FieldRule::new("Patient.birthDate", Technique::DateToYear),
            FieldRule::new("Patient.name", Technique::Name),
        ];
        apply_rules(&mut p, &rules, None).unwrap();
        assert!(p.get("birthDate").is_none());
        assert_eq!(p["name"], json!([{"text": "张*"}]));
    }

    #[test]
    fn rule_paths_are_validated() {
        assert!(
            FieldRule::new("Patient.name", Technique::Name)
                .validate()
                .is_ok()
        );
        assert!(
            FieldRule::new("Patient.contact.name", Technique::Name)
                .validate()
                .is_ok()
        );
        for bad in [
            "Patient",
            "patient.name",
            "Patient..name",
            "Patient.name[0]",
            "",
        ] {
            assert!(
                FieldRule::new(bad, Technique::Name).validate().is_err(),
                "{bad}"
            );
        }
    }
}
