//! Deterministic (seeded) generator of a synthetic regional population with ground truth:
//! persons with realistic Han names, birth dates, valid resident IDs, phones and addresses,
//! each registered at 1–N institutions with registration errors at stated rates.

use std::collections::HashMap;

use chrono::{Datelike, Duration, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ident::{IdentifierKind, Sex, check_character};
use super::normalize::{LOOKALIKE_GROUPS, char_pinyin, pinyin_of};
use super::record::{Identifier, RecordId, SourceRecord};

/// Per-record probabilities of registration errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorRates {
    /// One character of the name replaced by a homophone (张 → 章).
    pub homophone: f64,
    /// One character replaced by a look-alike (王 → 玉), when the name has one.
    pub lookalike: f64,
    /// One given-name character dropped (two-character given names).
    pub dropped_char: f64,
    /// Name written in Latin script (pinyin), random order and case.
    pub latin_name: f64,
    /// Spaces or full-width characters inserted (removed by normalisation).
    pub name_formatting: f64,
    /// Day and month swapped (when the day is 1–12).
    pub day_month_swap: f64,
    /// Birth date one day off.
    pub date_off_by_one: f64,
    pub date_missing: f64,
    pub resident_id_missing: f64,
    /// Resident ID with a wrong check character.
    pub resident_id_wrong_check: f64,
    /// Resident ID with one mistyped digit.
    pub resident_id_digit_typo: f64,
    /// Legacy 15-digit resident ID (persons born 1900–1999).
    pub resident_id_legacy15: f64,
    pub phone_missing: f64,
    /// A different (new) phone number.
    pub phone_changed: f64,
    pub address_missing: f64,
    /// A different address (moved).
    pub address_moved: f64,
    /// Same address with another house number or without the province.
    pub address_variant: f64,
    pub sex_missing: f64,
    pub sex_wrong: f64,
    /// Medical insurance number given (when the person has one).
    pub insurance_given: f64,
}

impl Default for ErrorRates {
    fn default() -> Self {
        Self {
            homophone: 0.05,
            lookalike: 0.01,
            dropped_char: 0.01,
            latin_name: 0.02,
            name_formatting: 0.03,
            day_month_swap: 0.01,
            date_off_by_one: 0.01,
            date_missing: 0.02,
            resident_id_missing: 0.15,
            resident_id_wrong_check: 0.02,
            resident_id_digit_typo: 0.01,
            resident_id_legacy15: 0.03,
            phone_missing: 0.25,
            phone_changed: 0.05,
            address_missing: 0.10,
            address_moved: 0.08,
            address_variant: 0.10,
            sex_missing: 0.02,
            sex_wrong: 0.005,
            insurance_given: 0.5,
        }
    }
}

/// What population to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PopulationConfig {
    /// Number of source records (persons are added until this many records exist).
    pub records: usize,
    pub seed: u64,
    /// Share of persons born as twins (the twin is generated too).
    pub twin_rate: f64,
    /// Probabilities of 1, 2, 3, … registrations per person.
    pub registrations: Vec<f64>,
    pub errors: ErrorRates,
}

impl PopulationConfig {
    pub fn new(records: usize, seed: u64) -> Self {
        Self {
            records,
            seed,
            twin_rate: 0.01,
            registrations: vec![0.35, 0.30, 0.18, 0.10, 0.07],
            errors: ErrorRates::default(),
        }
    }
}

/// Generated records with ground truth.
#[derive(Clone, Debug, Default)]
pub struct Population {
    pub records: Vec<SourceRecord>,
    /// Person of each record (same index as `records`).
    pub person_of: Vec<u64>,
    pub persons: usize,
}

/// A true person.
#[derive(Clone, Debug)]
struct Person {
    surname: String,
    given: String,
    sex: Sex,
    birth: NaiveDate,
    resident_id: String,
    phone: String,
    address: Addr,
    insurance: Option<String>,
}

#[derive(Clone, Debug)]
struct Addr {
    province: &'static str,
    district: &'static str,
    street: &'static str,
    number: u32,
}

impl Addr {
    fn render(&self, with_province: bool, spaced: bool) -> String {
        let sep = if spaced { " " } else { "" };
        let province = if with_province { self.province } else { "" };
        format!(
            "{province}{sep}{}{sep}{}{}号",
            self.district, self.street, self.number
        )
    }
}

const SURNAMES: &[(&str, f64)] = &[
    ("王", 7.1),
    ("李", 7.0),
    ("张", 6.6),
    ("刘", 5.4),
    ("陈", 4.6),
    ("杨", 3.1),
    ("黄", 2.5),
    ("赵", 2.3),
    ("吴", 2.0),
    ("周", 1.9),
    ("徐", 1.6),
    ("孙", 1.5),
    ("马", 1.4),
    ("朱", 1.3),
    ("胡", 1.3),
    ("郭", 1.1),
    ("何", 1.1),
    ("林", 1.2),
    ("高", 1.0),
    ("罗", 0.9),
    ("郑", 0.9),
    ("梁", 0.9),
    ("谢", 0.8),
    ("宋", 0.8),
    ("唐", 0.8),
    ("许", 0.7),
    ("韩", 0.7),
    ("冯", 0.7),
    ("邓", 0.7),
    ("曹", 0.6),
    ("彭", 0.6),
    ("曾", 0.6),
    ("肖", 0.6),
    ("田", 0.5),
    ("董", 0.5),
    ("袁", 0.5),
    ("潘", 0.5),
    ("于", 0.5),
    ("蒋", 0.5),
    ("蔡", 0.5),
    ("余", 0.5),
    ("杜", 0.4),
    ("叶", 0.4),
    ("程", 0.4),
    ("苏", 0.4),
    ("魏", 0.4),
    ("吕", 0.4),
    ("丁", 0.4),
    ("任", 0.4),
    ("沈", 0.4),
    ("姚", 0.4),
    ("卢", 0.4),
    ("姜", 0.3),
    ("崔", 0.3),
    ("钟", 0.3),
    ("谭", 0.3),
    ("陆", 0.3),
    ("汪", 0.3),
    ("范", 0.3),
    ("金", 0.3),
    ("石", 0.3),
    ("廖", 0.3),
    ("贾", 0.3),
    ("夏", 0.3),
    ("韦", 0.3),
    ("方", 0.3),
    ("白", 0.3),
    ("邹", 0.3),
    ("孟", 0.3),
    ("熊", 0.3),
    ("秦", 0.3),
    ("邱", 0.3),
    ("江", 0.3),
    ("尹", 0.3),
    ("薛", 0.3),
    ("段", 0.3),
    ("雷", 0.3),
    ("侯", 0.3),
    ("龙", 0.3),
    ("史", 0.2),
    ("陶", 0.2),
    ("黎", 0.2),
    ("贺", 0.2),
    ("顾", 0.2),
    ("毛", 0.2),
    ("郝", 0.2),
    ("龚", 0.2),
    ("邵", 0.2),
    ("万", 0.2),
    ("钱", 0.2),
    ("严", 0.2),
    ("覃", 0.2),
    ("武", 0.2),
    ("戴", 0.2),
    ("莫", 0.2),
    ("欧阳", 0.06),
    ("司马", 0.02),
    ("诸葛", 0.01),
    ("上官", 0.02),
    ("东方", 0.01),
];

/// Very common whole given names (so that 张伟 and 王芳 collide a lot).
const MALE_GIVEN: &[(&str, f64)] = &[
    ("伟", 3.0),
    ("强", 1.5),
    ("磊", 1.5),
    ("军", 1.5),
    ("勇", 1.2),
    ("杰", 1.2),
    ("涛", 1.0),
    ("明", 1.0),
    ("超", 1.0),
    ("刚", 0.8),
    ("平", 0.8),
    ("辉", 0.8),
    ("建华", 0.6),
    ("建国", 0.6),
    ("志强", 0.6),
    ("俊", 0.6),
    ("鹏", 0.6),
    ("浩", 0.6),
    ("斌", 0.6),
    ("波", 0.6),
    ("海燕", 0.3),
    ("文", 0.5),
    ("华", 0.5),
];
const FEMALE_GIVEN: &[(&str, f64)] = &[
    ("芳", 2.5),
    ("娜", 2.0),
    ("秀英", 2.0),
    ("敏", 1.5),
    ("静", 1.5),
    ("丽", 1.5),
    ("艳", 1.2),
    ("娟", 1.0),
    ("霞", 1.0),
    ("秀兰", 1.0),
    ("燕", 1.0),
    ("玲", 0.8),
    ("桂英", 0.8),
    ("丹", 0.8),
    ("萍", 0.8),
    ("红", 0.8),
    ("玉兰", 0.5),
    ("婷", 0.8),
    ("雪", 0.6),
    ("慧", 0.6),
    ("莉", 0.5),
    ("秀珍", 0.5),
];
const MALE_CHARS: &str =
    "子浩宇轩博文俊嘉天志建国明华海东晓振家永成德立新光春金祥龙飞鑫泽铭睿晨阳伟强军杰涛辉鹏斌波宏";
const FEMALE_CHARS: &str =
    "欣怡梓涵雨诗佳思梦晓雅婷秀美丽春玉凤兰琳雪静晶颖慧月露倩妍悦萱芳娜敏燕玲红";
/// Extra characters that give common homophones of name characters.
const HOMOPHONE_POOL: &str = "玮炜卫维薇巍方放纳那莹瑛鹰影章彰汪理里礼留柳晨辰臣洋阳扬皇煌照武伍舟州晶敬鸣铭名化桦君均永涌洁捷韬桃墙蕾雷莉力立艳雁彦鹃侠岚蓝澜铃龄凌宏虹鸿平苹庭亭廷惠辉汇修贵民闽朝潮钢纲彬宾博柏昊皓朋骏峻晖梅美玫宇雨语果健剑智治至丹单婷挺";

const DISTRICTS: &[(&str, &str, &str)] = &[
    ("440103", "广东省", "广州市荔湾区"),
    ("440104", "广东省", "广州市越秀区"),
    ("440105", "广东省", "广州市海珠区"),
    ("440106", "广东省", "广州市天河区"),
    ("440111", "广东省", "广州市白云区"),
    ("440112", "广东省", "广州市黄埔区"),
    ("440113", "广东省", "广州市番禺区"),
    ("440114", "广东省", "广州市花都区"),
    ("440115", "广东省", "广州市南沙区"),
    ("440118", "广东省", "广州市增城区"),
    ("440604", "广东省", "佛山市禅城区"),
    ("440605", "广东省", "佛山市南海区"),
    ("440606", "广东省", "佛山市顺德区"),
    ("440303", "广东省", "深圳市罗湖区"),
    ("440304", "广东省", "深圳市福田区"),
    ("440305", "广东省", "深圳市南山区"),
];
/// Birth-place area codes of residents born outside the region.
const MIGRANT_AREAS: &[&str] = &["430102", "360102", "450102", "110105", "510104", "420106"];
const STREETS: &[&str] = &[
    "中山路",
    "人民路",
    "解放路",
    "建设路",
    "新华路",
    "和平路",
    "东风路",
    "环市路",
    "体育西路",
    "天河路",
    "江南大道",
    "工业大道",
    "滨江路",
    "沿江路",
    "黄埔大道",
    "广州大道",
    "花城大道",
    "五山路",
    "石牌路",
    "龙口路",
    "华强路",
    "深南大道",
    "季华路",
    "桂城路",
    "大良路",
    "新港路",
    "宝岗路",
    "南华路",
    "芳村大道",
    "解放北路",
];

/// Cumulative-weight sampler.
struct Weighted<T> {
    items: Vec<T>,
    cumulative: Vec<f64>,
}

impl<T: Clone> Weighted<T> {
    fn new(pairs: impl IntoIterator<Item = (T, f64)>) -> Self {
        let (mut items, mut cumulative) = (Vec::new(), Vec::new());
        let mut acc = 0.0;
        for (item, w) in pairs {
            acc += w;
            items.push(item);
            cumulative.push(acc);
        }
        Self { items, cumulative }
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> T {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.gen_range(0.0..total.max(f64::MIN_POSITIVE));
        let i = self.cumulative.partition_point(|c| *c <= x);
        self.items[i.min(self.items.len() - 1)].clone()
    }
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

struct Generator {
    rng: ChaCha8Rng,
    surnames: Weighted<&'static str>,
    male: Weighted<&'static str>,
    female: Weighted<&'static str>,
    male_chars: Vec<char>,
    female_chars: Vec<char>,
    homophones: HashMap<String, Vec<char>>,
    registrations: Weighted<usize>,
    errors: ErrorRates,
}

impl Generator {
    fn new(cfg: &PopulationConfig) -> Self {
        let mut homophones: HashMap<String, Vec<char>> = HashMap::new();
        let all_chars = SURNAMES
            .iter()
            .flat_map(|(s, _)| s.chars())
            .chain(MALE_CHARS.chars())
            .chain(FEMALE_CHARS.chars())
            .chain(
                MALE_GIVEN
                    .iter()
                    .chain(FEMALE_GIVEN)
                    .flat_map(|(g, _)| g.chars()),
            )
            .chain(HOMOPHONE_POOL.chars());
        for c in all_chars {
            let group = homophones.entry(char_pinyin(c)).or_default();
            if !group.contains(&c) {
                group.push(c);
            }
        }
        Self {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            surnames: Weighted::new(SURNAMES.iter().copied()),
            male: Weighted::new(MALE_GIVEN.iter().copied()),
            female: Weighted::new(FEMALE_GIVEN.iter().copied()),
            male_chars: MALE_CHARS.chars().collect(),
            female_chars: FEMALE_CHARS.chars().collect(),
            homophones,
            registrations: Weighted::new(
                cfg.registrations
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (i + 1, *w)),
            ),
            errors: cfg.errors.clone(),
        }
    }

    fn given_name(&mut self, sex: Sex) -> String {
        if self.rng.gen_bool(0.45) {
            let table = if sex == Sex::Male {
                &self.male
            } else {
                &self.female
            };
            return table.pick(&mut self.rng).to_string();
        }
        let pool = if sex == Sex::Male {
            &self.male_chars
        } else {
            &self.female_chars
        };
        let len = if self.rng.gen_bool(0.3) { 1 } else { 2 };
        (0..len).map(|_| *pick(&mut self.rng, pool)).collect()
    }

    fn resident_id(&mut self, area: &str, birth: NaiveDate, sex: Sex) -> String {
        let mut seq = self.rng.gen_range(0..500u32) * 2;
        if sex == Sex::Male {
            seq += 1;
        }
        let first17 = format!("{area}{}{seq:03}", birth.format("%Y%m%d"));
        let check = check_character(&first17).unwrap_or('0');
        format!("{first17}{check}")
    }

    fn phone(&mut self) -> String {
        let prefix = *pick(&mut self.rng, &["13", "15", "18", "17", "19"]);
        format!("{prefix}{:09}", self.rng.gen_range(0..1_000_000_000u32))
    }

    fn address(&mut self) -> (Addr, &'static str) {
        let (code, province, district) = *pick(&mut self.rng, DISTRICTS);
        let addr = Addr {
            province,
            district,
            street: STREETS[self.rng.gen_range(0..STREETS.len())],
            number: self.rng.gen_range(1..400),
        };
        (addr, code)
    }

    fn person(&mut self) -> Person {
        let sex = if self.rng.gen_bool(0.5) {
            Sex::Male
        } else {
            Sex::Female
        };
        let start = NaiveDate::from_ymd_opt(1930, 1, 1).unwrap_or_default();
        let birth = start + Duration::days(self.rng.gen_range(0..33_000));
        let (address, local) = self.address();
        let area = if self.rng.gen_bool(0.8) {
            local
        } else {
            pick(&mut self.rng, MIGRANT_AREAS)
        };
        let insurance = self
            .rng
            .gen_bool(0.8)
            .then(|| format!("G{:010}", self.rng.gen_range(0..10_000_000_000u64)));
        Person {
            surname: self.surnames.pick(&mut self.rng).to_string(),
            given: self.given_name(sex),
            sex,
            birth,
            resident_id: self.resident_id(area, birth, sex),
            phone: self.phone(),
            address,
            insurance,
        }
    }

    /// A twin: same surname, birth date, address and phone; own given name, sex and ID.
    fn twin(&mut self, p: &Person) -> Person {
        let sex = if self.rng.gen_bool(0.5) {
            Sex::Male
        } else {
            Sex::Female
        };
        let mut given = self.given_name(sex);
        while given == p.given {
            given = self.given_name(sex);
        }
        let area = p.resident_id.get(..6).unwrap_or("440106").to_string();
        let insurance = p
            .insurance
            .as_ref()
            .map(|_| format!("G{:010}", self.rng.gen_range(0..10_000_000_000u64)));
        Person {
            surname: p.surname.clone(),
            given,
            sex,
            birth: p.birth,
            resident_id: self.resident_id(&area, p.birth, sex),
            phone: p.phone.clone(),
            address: p.address.clone(),
            insurance,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p.min(1.0))
    }

    fn registered_name(&mut self, p: &Person) -> String {
        let e = self.errors.clone();
        if self.chance(e.latin_name) {
            let given = pinyin_of(&p.given);
            let surname = pinyin_of(&p.surname);
            let cap = |s: &str| {
                let mut c = s.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect::<String>())
                    .unwrap_or_default()
            };
            return match self.rng.gen_range(0..3) {
                0 => format!("{} {}", surname.to_uppercase(), cap(&given)),
                1 => format!("{} {}", cap(&given), cap(&surname)),
                _ => format!("{surname} {given}"),
            };
        }
        let mut chars: Vec<char> = format!("{}{}", p.surname, p.given).chars().collect();
        let surname_len = p.surname.chars().count();
        if self.chance(e.homophone) {
            let i = if self.rng.gen_bool(0.25) {
                0
            } else {
                self.rng
                    .gen_range(surname_len.min(chars.len() - 1)..chars.len())
            };
            let group: Vec<char> = self
                .homophones
                .get(&char_pinyin(chars[i]))
                .map(|g| g.iter().copied().filter(|c| *c != chars[i]).collect())
                .unwrap_or_default();
            if !group.is_empty() {
                chars[i] = *pick(&mut self.rng, &group);
            }
        }
        if self.chance(e.lookalike) {
            let spots: Vec<(usize, Vec<char>)> = chars
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let g = LOOKALIKE_GROUPS.iter().find(|g| g.contains(*c))?;
                    Some((i, g.chars().filter(|x| x != c).collect()))
                })
                .collect();
            if !spots.is_empty() {
                let (i, alts) = pick(&mut self.rng, &spots).clone();
                chars[i] = *pick(&mut self.rng, &alts);
            }
        }
        if chars.len() >= surname_len + 2 && self.chance(e.dropped_char) {
            let i = self.rng.gen_range(surname_len..chars.len());
            chars.remove(i);
        }
        let mut name: String = chars.iter().collect();
        if self.chance(e.name_formatting) {
            let split = chars.iter().take(surname_len).collect::<String>().len();
            let sep = *pick(&mut self.rng, &[" ", "\u{3000}", "  "]);
            name = format!(" {}{sep}{} ", &name[..split], &name[split..]);
        }
        name
    }

    fn registered_id(&mut self, p: &Person) -> Option<String> {
        let e = self.errors.clone();
        let id = p.resident_id.clone();
        if self.chance(e.resident_id_missing) {
            return None;
        }
        let mut chars: Vec<char> = id.chars().collect();
        if self.chance(e.resident_id_wrong_check) {
            let right = chars[17];
            let wrong: Vec<char> = "0123456789X".chars().filter(|c| *c != right).collect();
            chars[17] = *pick(&mut self.rng, &wrong);
        } else if self.chance(e.resident_id_digit_typo) {
            let i = self.rng.gen_range(0..17);
            let right = chars[i];
            let wrong: Vec<char> = "0123456789".chars().filter(|c| *c != right).collect();
            chars[i] = *pick(&mut self.rng, &wrong);
        } else if (1900..2000).contains(&p.birth.year()) && self.chance(e.resident_id_legacy15) {
            return Some(format!("{}{}", &id[..6], &id[8..17]));
        }
        Some(chars.into_iter().collect())
    }

    fn registered_date(&mut self, birth: NaiveDate) -> Option<NaiveDate> {
        let e = self.errors.clone();
        if self.chance(e.date_missing) {
            return None;
        }
        if birth.day() <= 12 && birth.day() != birth.month() && self.chance(e.day_month_swap) {
            return NaiveDate::from_ymd_opt(birth.year(), birth.day(), birth.month());
        }
        if self.chance(e.date_off_by_one) {
            let d = if self.rng.gen_bool(0.5) { 1 } else { -1 };
            return Some(birth + Duration::days(d));
        }
        Some(birth)
    }

    fn registered_phone(&mut self, p: &Person) -> Option<String> {
        let e = self.errors.clone();
        if self.chance(e.phone_missing) {
            return None;
        }
        let phone = if self.chance(e.phone_changed) {
            self.phone()
        } else {
            p.phone.clone()
        };
        Some(match self.rng.gen_range(0..4) {
            0 => format!("+86 {} {} {}", &phone[..3], &phone[3..7], &phone[7..]),
            1 => format!("{}-{}-{}", &phone[..3], &phone[3..7], &phone[7..]),
            _ => phone,
        })
    }

    fn registered_address(&mut self, p: &Person) -> Option<String> {
        let e = self.errors.clone();
        if self.chance(e.address_missing) {
            return None;
        }
        if self.chance(e.address_moved) {
            return Some(self.address().0.render(true, false));
        }
        if self.chance(e.address_variant) {
            let mut a = p.address.clone();
            if self.rng.gen_bool(0.5) {
                a.number = self.rng.gen_range(1..400);
                return Some(a.render(true, true));
            }
            return Some(a.render(false, false));
        }
        Some(p.address.render(true, false))
    }

    fn record(&mut self, p: &Person, id: u64, institution: usize) -> SourceRecord {
        let e = self.errors.clone();
        let name = self.registered_name(p);
        let sex = if self.chance(e.sex_missing) {
            None
        } else if self.chance(e.sex_wrong) {
            Some(if p.sex == Sex::Male {
                Sex::Female
            } else {
                Sex::Male
            })
        } else {
            Some(p.sex)
        };
        let birth_date = self.registered_date(p.birth);
        let mut identifiers = Vec::new();
        if let Some(v) = self.registered_id(p) {
            identifiers.push(Identifier {
                kind: IdentifierKind::ResidentId,
                value: v,
            });
        }
        if let Some(v) = self.registered_phone(p) {
            identifiers.push(Identifier {
                kind: IdentifierKind::Phone,
                value: v,
            });
        }
        if let Some(ins) = &p.insurance
            && self.chance(e.insurance_given)
        {
            identifiers.push(Identifier {
                kind: IdentifierKind::MedicalInsurance,
                value: ins.clone(),
            });
        }
        identifiers.push(Identifier {
            kind: IdentifierKind::InstitutionRecord,
            value: format!("MR{id:09}"),
        });
        SourceRecord {
            record_id: RecordId(id),
            institution: format!("H{institution:03}"),
            name,
            sex,
            birth_date,
            identifiers,
            address: self.registered_address(p),
        }
    }
}

/// Generate a population of `config.records` source records with ground truth.
pub fn generate(config: &PopulationConfig) -> Population {
    let mut g = Generator::new(config);
    let mut pop = Population::default();
    let mut pending: Vec<Person> = Vec::new();
    while pop.records.len() < config.records {
        let person = match pending.pop() {
            Some(p) => p,
            None => {
                let p = g.person();
                if g.chance(config.twin_rate) {
                    let t = g.twin(&p);
                    pending.push(t);
                }
                p
            }
        };
        let person_id = pop.persons as u64;
        pop.persons += 1;
        let n = g.registrations.pick(&mut g.rng);
        let first_institution = g.rng.gen_range(0..100);
        for k in 0..n {
            if pop.records.len() >= config.records {
                break;
            }
            let id = pop.records.len() as u64;
            let rec = g.record(&person, id, (first_institution + k * 7) % 100);
            pop.records.push(rec);
            pop.person_of.push(person_id);
        }
    }
    pop
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::empi::ident::parse_resident_id;

    #[test]
    fn generation_is_deterministic_and_sized() {
        let a = generate(&PopulationConfig::new(2_000, 42));
        let b = generate(&PopulationConfig::new(2_000, 42));
        let c = generate(&PopulationConfig::new(2_000, 43));
        assert_eq!(a.records.len(), 2_000);
        assert_eq!(a.records, b.records);
        assert_ne!(a.records, c.records);
        assert!(a.persons > 700 && a.persons < 1_200, "{}", a.persons);
    }

    #[test]
    fn clean_population_has_valid_ids_and_common_name_collisions() {
        let mut cfg = PopulationConfig::new(5_000, 1);
        cfg.errors = ErrorRates {
            resident_id_missing: 0.0,
            resident_id_wrong_check: 0.0,
            resident_id_digit_typo: 0.0,
            resident_id_legacy15: 0.0,
            latin_name: 0.0,
            name_formatting: 0.0,
            ..ErrorRates::default()
        };
        let pop = generate(&cfg);
        for r in &pop.records {
            let id = &r.identifiers[0];
            assert_eq!(id.kind, IdentifierKind::ResidentId);
            assert!(parse_resident_id(&id.value).0.trusted, "{}", id.value);
        }
        let zhang_wei = pop.records.iter().filter(|r| r.name == "张伟").count();
        assert!(zhang_wei >= 5, "张伟 appears {zhang_wei} times");
    }
}
