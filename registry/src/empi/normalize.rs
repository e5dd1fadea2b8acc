//! Name and address normalisation: width and whitespace, Han surname/given-name split
//! (with compound surnames), toneless pinyin, look-alike characters, Latin-script names.

use pinyin::ToPinyin;
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Compound (two-character) surnames recognised when splitting a Han name.
pub const COMPOUND_SURNAMES: &[&str] = &[
    "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
    "夏侯", "轩辕", "令狐", "钟离", "端木", "独孤", "南宫", "西门", "百里", "呼延", "澹台", "公冶",
    "太史", "申屠", "闻人", "赫连", "东郭", "万俟", "司空", "濮阳",
];

/// Surnames whose reading differs from the character's first reading in `pinyin`.
const SURNAME_READINGS: &[(char, &str)] = &[
    ('单', "shan"),
    ('曾', "zeng"),
    ('解', "xie"),
    ('仇', "qiu"),
    ('区', "ou"),
    ('查', "zha"),
    ('朴', "piao"),
    ('盖', "ge"),
    ('乐', "yue"),
    ('尉', "yu"),
    ('缪', "miao"),
    ('翟', "zhai"),
    ('种', "chong"),
    ('繁', "po"),
    ('覃', "qin"),
    ('召', "shao"),
];

/// Groups of characters that are commonly confused when copying handwriting or OCR.
/// Each group maps to its first character.
pub const LOOKALIKE_GROUPS: &[&str] = &[
    "王玉主",
    "未末",
    "己已巳",
    "土士",
    "日曰",
    "人入八",
    "刀力",
    "天夭",
    "戊戌戍",
    "免兔",
    "拔拨",
    "侯候",
    "史吏",
    "大太犬",
    "今令",
    "贝见",
    "毛手",
    "田由甲申",
    "折拆",
    "壁璧",
    "辨辩辫",
    "汩汨",
    "栗粟",
    "崇祟",
    "荣菜",
    "杨扬",
    "晴睛",
    "清情",
    "洁浩",
    "红江",
    "明朋",
    "丽莉",
    "娟绢",
    "琳淋",
    "梅海",
    "华毕",
    "建健",
    "军车",
    "辉晖",
    "静净",
    "秀季",
];

/// Which writing system a name is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameScript {
    Han,
    Latin,
    Empty,
}

/// A name after normalisation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonName {
    pub script: NameScript,
    /// Han: surname characters; Latin: empty (order is unknown).
    pub surname: String,
    /// Han: given-name characters; Latin: empty.
    pub given: String,
    /// Normalised full name: Han characters without spaces, or Latin tokens sorted and
    /// joined by one space.
    pub full: String,
    /// Han only: look-alike characters mapped to a canonical one.
    pub lookalike: String,
    /// Toneless pinyin of the surname (Han) — empty for Latin names.
    pub surname_pinyin: String,
    /// Toneless pinyin of the given name, syllables joined without spaces.
    pub given_pinyin: String,
    /// Order-insensitive romanised key shared by Han and Latin forms: tokens sorted, joined
    /// by a space (Han 张秀英 → "xiuying zhang", Latin "ZHANG Xiu-Ying" → the same).
    pub romanised: String,
}

/// NFKC (full-width → half-width, compatibility forms), trimmed, whitespace collapsed.
pub fn normalise_text(raw: &str) -> String {
    let nfkc: String = raw.nfkc().collect();
    nfkc.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_han(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{20000}'..='\u{2A6DF}')
}

/// Toneless pinyin of one Han character (first reading); the character itself if unknown.
pub fn char_pinyin(c: char) -> String {
    c.to_pinyin()
        .map(|p| p.plain().to_string())
        .unwrap_or_else(|| c.to_string())
}

/// Toneless pinyin of a string of Han characters, syllables concatenated.
pub fn pinyin_of(s: &str) -> String {
    s.chars().map(char_pinyin).collect()
}

fn surname_pinyin(surname: &str) -> String {
    let mut chars = surname.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => SURNAME_READINGS
            .iter()
            .find(|(s, _)| *s == c)
            .map(|(_, r)| (*r).to_string())
            .unwrap_or_else(|| char_pinyin(c)),
        _ => pinyin_of(surname),
    }
}

/// Canonical representative of a look-alike group (the character itself if in none).
pub fn lookalike_canonical(c: char) -> char {
    LOOKALIKE_GROUPS
        .iter()
        .find(|g| g.contains(c))
        .and_then(|g| g.chars().next())
        .unwrap_or(c)
}

/// Split a Han name into (surname, given name), recognising compound surnames.
pub fn split_han_name(name: &str) -> (String, String) {
    let n = name.chars().count();
    if n >= 3
        && let Some(s) = COMPOUND_SURNAMES.iter().find(|s| name.starts_with(**s))
    {
        return ((*s).to_string(), name[s.len()..].to_string());
    }
    let mut chars = name.chars();
    let surname = chars.next().map(String::from).unwrap_or_default();
    (surname, chars.collect())
}

/// Strip diacritics (ü → u, é → e) and lower-case a Latin token.
fn fold_latin(token: &str) -> String {
    token
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .collect()
}

/// Normalise a person's name.
pub fn normalise_name(raw: &str) -> PersonName {
    let text = normalise_text(raw);
    let han: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '·' | '•' | '.' | '-'))
        .collect();
    if !han.is_empty() && han.chars().all(is_han) {
        let (surname, given) = split_han_name(&han);
        let surname_pinyin = surname_pinyin(&surname);
        let given_pinyin = pinyin_of(&given);
        let romanised = romanised_key([surname_pinyin.clone(), given_pinyin.clone()]);
        return PersonName {
            script: NameScript::Han,
            lookalike: han.chars().map(lookalike_canonical).collect(),
            surname,
            given,
            full: han,
            surname_pinyin,
            given_pinyin,
            romanised,
        };
    }
    let tokens: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '·')
        .map(fold_latin)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return PersonName {
            script: NameScript::Empty,
            surname: String::new(),
            given: String::new(),
            full: String::new(),
            lookalike: String::new(),
            surname_pinyin: String::new(),
            given_pinyin: String::new(),
            romanised: String::new(),
        };
    }
    let romanised = romanised_key(tokens);
    PersonName {
        script: NameScript::Latin,
        surname: String::new(),
        given: String::new(),
        full: romanised.clone(),
        lookalike: romanised.clone(),
        surname_pinyin: String::new(),
        given_pinyin: String::new(),
        romanised,
    }
}

fn romanised_key(tokens: impl IntoIterator<Item = String>) -> String {
    let mut t: Vec<String> = tokens.into_iter().filter(|t| !t.is_empty()).collect();
    t.sort();
    t.join(" ")
}

/// A normalised address: the administrative prefix (province/city/district) and the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub full: String,
    /// Up to and including the first district/county (区/县/旗) marker, if any.
    pub district: String,
}

/// Normalise an address (width, whitespace removed) and find its district prefix.
pub fn normalise_address(raw: &str) -> Option<Address> {
    let full: String = normalise_text(raw)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if full.is_empty() {
        return None;
    }
    let district = full
        .char_indices()
        .find(|(_, c)| matches!(c, '区' | '县' | '旗'))
        .map(|(i, c)| full[..i + c.len_utf8()].to_string())
        .unwrap_or_default();
    Some(Address { full, district })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn han_names_split_with_compound_surnames() {
        let cases = [
            ("张伟", "张", "伟"),
            ("欧阳娜娜", "欧阳", "娜娜"),
            ("司马 光", "司马", "光"),
            ("诸葛亮", "诸葛", "亮"),
            ("上官婉儿", "上官", "婉儿"),
            ("东方明", "东方", "明"),
            ("王秀英", "王", "秀英"),
            ("欧阳", "欧", "阳"),
        ];
        for (raw, s, g) in cases {
            let n = normalise_name(raw);
            assert_eq!((n.surname.as_str(), n.given.as_str()), (s, g), "{raw}");
            assert_eq!(n.script, NameScript::Han);
        }
    }

    #[test]
    fn homophones_share_pinyin() {
        for (a, b) in [("张伟", "章伟"), ("王芳", "王方"), ("李娜", "李纳")] {
            let (a, b) = (normalise_name(a), normalise_name(b));
            assert_eq!(a.romanised, b.romanised);
            assert_ne!(a.full, b.full);
        }
        assert_eq!(normalise_name("曾伟").surname_pinyin, "zeng");
    }

    #[test]
    fn lookalikes_share_canonical_form() {
        assert_eq!(
            normalise_name("王未").lookalike,
            normalise_name("玉末").lookalike
        );
    }

    #[test]
    fn width_and_whitespace() {
        assert_eq!(normalise_text("  张\u{3000}伟 "), "张 伟");
        assert_eq!(normalise_name("张\u{3000}伟").full, "张伟");
        assert_eq!(normalise_text("ＡＢＣ１２３"), "ABC123");
    }

    #[test]
    fn latin_names_fold_case_diacritics_and_order() {
        let a = normalise_name("ZHANG Xiu-Ying");
        let b = normalise_name("xiuying  zhang");
        let c = normalise_name("Zhāng Xiùyīng");
        assert_eq!(a.script, NameScript::Latin);
        assert_eq!(a.romanised, "xiuying zhang");
        assert_eq!(a.romanised, b.romanised);
        assert_eq!(a.romanised, c.romanised);
        assert_eq!(normalise_name("张秀英").romanised, a.romanised);
        assert_eq!(normalise_name("  ").script, NameScript::Empty);
    }

    #[test]
    fn addresses() {
        let a = normalise_address("广东省 广州市天河区 体育西路 12 号");
        let a = a.as_ref().map(|a| (a.full.as_str(), a.district.as_str()));
        assert_eq!(
            a,
            Some(("广东省广州市天河区体育西路12号", "广东省广州市天河区"))
        );
        assert_eq!(normalise_address(" "), None);
    }
}
