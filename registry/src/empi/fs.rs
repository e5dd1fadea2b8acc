//! Fellegi–Sunter scoring and EM estimation of its parameters.
//!
//! For each field f and level k: m = P(level k | same person), u = P(level k | different
//! persons). A pair's score is Σ log2(m/u) over fields that are not missing. m, u and the
//! match prevalence among candidate pairs are estimated without labels by EM under
//! conditional independence; only the EM starting values are fixed in code.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::compare::{ComparisonVector, FIELD_COUNT, FIELDS, Field, Level};

/// Smallest probability used in a weight, so an unseen level gives a large finite weight.
const PROBABILITY_FLOOR: f64 = 1e-6;

/// Errors loading or estimating a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model parameters are not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field {field:?}: expected {expected} levels, found {found}")]
    LevelCount {
        field: Field,
        expected: usize,
        found: usize,
    },
    #[error("field {0:?} is missing from the parameters")]
    MissingField(Field),
    #[error("no comparison vectors to estimate from")]
    NoPairs,
}

/// m and u probabilities of one field, indexed like [`Field::levels`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldParameters {
    pub field: Field,
    pub levels: Vec<Level>,
    pub m: Vec<f64>,
    pub u: Vec<f64>,
}

/// Outcome of an EM run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmReport {
    pub iterations: usize,
    pub converged: bool,
    /// Log-likelihood (natural log) after each iteration; non-decreasing.
    pub log_likelihood: Vec<f64>,
    /// Number of candidate pairs and of distinct comparison vectors used.
    pub pairs: u64,
    pub distinct_vectors: usize,
}

/// The parameters of a Fellegi–Sunter model; serialise with [`Self::to_json`] to store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatchParameters {
    pub fields: Vec<FieldParameters>,
    /// Estimated share of candidate pairs that are matches.
    pub prevalence: f64,
    /// How the parameters were obtained, when estimated.
    pub em: Option<EmReport>,
}

/// Options of the EM algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmOptions {
    pub max_iterations: usize,
    /// Stop when the largest change of any parameter is below this.
    pub tolerance: f64,
    /// Keep the starting u probabilities (e.g. from [`estimate_u_from_random_pairs`]) and
    /// estimate only m and the prevalence.
    pub fix_u: bool,
}

impl Default for EmOptions {
    fn default() -> Self {
        Self {
            max_iterations: 200,
            tolerance: 1e-7,
            fix_u: false,
        }
    }
}

/// Per-field contribution to a score, stored with a link as its explanation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldWeight {
    pub field: Field,
    /// `None` when the value is missing on either side (weight 0).
    pub level: Option<Level>,
    /// log2(m/u).
    pub weight: f64,
}

/// A scored pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Sum of field weights (log2 likelihood ratio).
    pub total: f64,
    pub explanation: Vec<FieldWeight>,
}

/// What to do with a scored pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    AutoLink,
    Review,
    NonMatch,
}

/// Score thresholds in log2 likelihood-ratio units: `total ≥ auto_link` links,
/// `review ≤ total < auto_link` goes to a data steward.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub auto_link: f64,
    pub review: f64,
}

impl Thresholds {
    /// Thresholds at given posterior match probabilities: posterior odds = 2^total · prior
    /// odds. With u estimated from random pairs the prior is the match rate among all
    /// record pairs (see [`prior_from_candidates`]).
    pub fn from_posterior(prior: f64, auto_link: f64, review: f64) -> Self {
        let logit = |p: f64| (p / (1.0 - p)).log2();
        let prior = logit(prior.clamp(1e-15, 1.0 - 1e-15));
        Self {
            auto_link: logit(auto_link) - prior,
            review: logit(review) - prior,
        }
    }

    /// Decision from the score alone.
    pub fn decide(&self, total: f64) -> Decision {
        if total >= self.auto_link {
            Decision::AutoLink
        } else if total >= self.review {
            Decision::Review
        } else {
            Decision::NonMatch
        }
    }

    /// Decision with conflict vetoes: a pair whose names are `Different` or whose trusted
    /// resident IDs are `Different` is never linked automatically (twins and household
    /// members agree on everything else), at most sent to review.
    pub fn decide_pair(&self, total: f64, v: &ComparisonVector) -> Decision {
        let decision = self.decide(total);
        let conflict = v.level(Field::Name) == Some(Level::Different)
            || v.level(Field::ResidentId) == Some(Level::Different);
        if decision == Decision::AutoLink && conflict {
            Decision::Review
        } else {
            decision
        }
    }
}

/// Prior match probability of a random record pair, from the EM prevalence among
/// `candidates` candidate pairs out of `records` records.
pub fn prior_from_candidates(prevalence: f64, candidates: usize, records: usize) -> f64 {
    let all = records as f64 * (records as f64 - 1.0) / 2.0;
    if all <= 0.0 {
        return prevalence;
    }
    (prevalence * candidates as f64 / all).clamp(0.0, 1.0)
}

impl MatchParameters {
    /// EM starting values: agreement likely among matches, disagreement among non-matches.
    pub fn starting_values() -> Self {
        let fields = FIELDS
            .iter()
            .map(|&field| {
                let levels = field.levels().to_vec();
                let n = levels.len();
                let rest = (n - 1) as f64;
                let m = (0..n)
                    .map(|k| if k == 0 { 0.9 } else { 0.1 / rest })
                    .collect();
                let u = (0..n)
                    .map(|k| if k + 1 == n { 0.9 } else { 0.1 / rest })
                    .collect();
                FieldParameters {
                    field,
                    levels,
                    m,
                    u,
                }
            })
            .collect();
        Self {
            fields,
            prevalence: 0.1,
            em: None,
        }
    }

    pub fn to_json(&self) -> Result<String, ModelError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Parse and check that every field is present with the levels this engine uses.
    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        let mut p: Self = serde_json::from_str(json)?;
        let mut ordered = Vec::with_capacity(FIELD_COUNT);
        for field in FIELDS {
            let pos = p
                .fields
                .iter()
                .position(|f| f.field == field)
                .ok_or(ModelError::MissingField(field))?;
            let f = p.fields.swap_remove(pos);
            let expected = field.levels().len();
            for found in [f.levels.len(), f.m.len(), f.u.len()] {
                if found != expected || f.levels != field.levels() {
                    return Err(ModelError::LevelCount {
                        field,
                        expected,
                        found,
                    });
                }
            }
            ordered.push(f);
        }
        p.fields = ordered;
        Ok(p)
    }

    /// log2(m/u) of a field at a level index.
    pub fn weight(&self, field_index: usize, level: u8) -> f64 {
        let Some(f) = self.fields.get(field_index) else {
            return 0.0;
        };
        let k = usize::from(level);
        let m = f.m.get(k).copied().unwrap_or(0.0).max(PROBABILITY_FLOOR);
        let u = f.u.get(k).copied().unwrap_or(0.0).max(PROBABILITY_FLOOR);
        (m / u).log2()
    }

    /// Total score only (fast path for bulk scoring).
    pub fn total(&self, v: &ComparisonVector) -> f64 {
        v.0.iter()
            .enumerate()
            .filter_map(|(i, l)| l.map(|l| self.weight(i, l)))
            .sum()
    }

    /// Score with a per-field explanation.
    pub fn score(&self, v: &ComparisonVector) -> Score {
        let explanation: Vec<FieldWeight> = FIELDS
            .iter()
            .enumerate()
            .map(|(i, &field)| FieldWeight {
                field,
                level: v.level(field),
                weight: v.0[i].map_or(0.0, |l| self.weight(i, l)),
            })
            .collect();
        Score {
            total: explanation.iter().map(|w| w.weight).sum(),
            explanation,
        }
    }

    /// Likelihoods of a vector under the match and non-match classes (missing skipped).
    fn likelihoods(&self, v: &ComparisonVector) -> (f64, f64) {
        let (mut pm, mut pu) = (self.prevalence, 1.0 - self.prevalence);
        for (f, l) in self.fields.iter().zip(v.0) {
            if let Some(l) = l {
                let k = usize::from(l);
                pm *= f.m.get(k).copied().unwrap_or(0.0);
                pu *= f.u.get(k).copied().unwrap_or(0.0);
            }
        }
        (pm, pu)
    }
}

/// Estimate u probabilities from comparison vectors of randomly drawn record pairs, almost
/// all of which are non-matches (no labels needed). Half a pseudo-count per level keeps
/// unseen levels finite. m and the prevalence are kept from `start`.
pub fn estimate_u_from_random_pairs(
    vectors: impl IntoIterator<Item = ComparisonVector>,
    start: MatchParameters,
) -> MatchParameters {
    let mut p = start;
    let mut counts: Vec<Vec<f64>> = p.fields.iter().map(|f| vec![0.5; f.u.len()]).collect();
    for v in vectors {
        for (i, l) in v.0.iter().enumerate() {
            if let Some(c) = l.and_then(|l| counts[i].get_mut(usize::from(l))) {
                *c += 1.0;
            }
        }
    }
    for (f, c) in p.fields.iter_mut().zip(counts) {
        let sum: f64 = c.iter().sum();
        f.u = c.into_iter().map(|x| x / sum).collect();
    }
    p
}

/// Estimate m, u and prevalence from unlabelled comparison vectors by EM.
pub fn estimate(
    vectors: impl IntoIterator<Item = ComparisonVector>,
    start: MatchParameters,
    options: EmOptions,
) -> Result<MatchParameters, ModelError> {
    let mut counts: HashMap<ComparisonVector, u64> = HashMap::new();
    for v in vectors {
        *counts.entry(v).or_default() += 1;
    }
    if counts.is_empty() {
        return Err(ModelError::NoPairs);
    }
    let patterns: Vec<(ComparisonVector, f64)> =
        counts.into_iter().map(|(v, c)| (v, c as f64)).collect();
    let total: f64 = patterns.iter().map(|(_, c)| c).sum();
    let mut p = start;
    let mut report = EmReport {
        iterations: 0,
        converged: false,
        log_likelihood: Vec::new(),
        pairs: total as u64,
        distinct_vectors: patterns.len(),
    };
    while report.iterations < options.max_iterations {
        report.iterations += 1;
        // E step, accumulating expected counts per field and level.
        let mut m_acc: Vec<Vec<f64>> = p.fields.iter().map(|f| vec![0.0; f.m.len()]).collect();
        let mut u_acc = m_acc.clone();
        let (mut matches, mut ll) = (0.0, 0.0);
        for (v, c) in &patterns {
            let (pm, pu) = p.likelihoods(v);
            let g = if pm + pu > 0.0 { pm / (pm + pu) } else { 0.0 };
            ll += c * (pm + pu).max(f64::MIN_POSITIVE).ln();
            matches += c * g;
            for (i, l) in v.0.iter().enumerate() {
                if let Some(l) = l {
                    let k = usize::from(*l);
                    m_acc[i][k] += c * g;
                    u_acc[i][k] += c * (1.0 - g);
                }
            }
        }
        report.log_likelihood.push(ll);
        // M step.
        let mut change: f64 = 0.0;
        for (f, (ma, ua)) in p.fields.iter_mut().zip(m_acc.iter().zip(&u_acc)) {
            let mut targets = vec![(&mut f.m, ma)];
            if !options.fix_u {
                targets.push((&mut f.u, ua));
            }
            for (probs, acc) in targets {
                let sum: f64 = acc.iter().sum();
                if sum > 0.0 {
                    for (x, a) in probs.iter_mut().zip(acc) {
                        let new = a / sum;
                        change = change.max((new - *x).abs());
                        *x = new;
                    }
                }
            }
        }
        let prevalence = matches / total;
        change = change.max((prevalence - p.prevalence).abs());
        p.prevalence = prevalence;
        if change < options.tolerance {
            report.converged = true;
            break;
        }
    }
    p.em = Some(report);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Known parameters: per field, (m, u) over its levels.
    fn truth() -> MatchParameters {
        let mut p = MatchParameters::starting_values();
        let table: [(&[f64], &[f64]); FIELD_COUNT] = [
            (
                &[0.85, 0.08, 0.02, 0.03, 0.02],
                &[0.01, 0.02, 0.005, 0.05, 0.915],
            ),
            (
                &[0.9, 0.02, 0.03, 0.02, 0.03],
                &[0.02, 0.001, 0.003, 0.3, 0.676],
            ),
            (&[0.99, 0.01], &[0.5, 0.5]),
            (&[0.94, 0.03, 0.01, 0.02], &[0.001, 0.001, 0.008, 0.99]),
            (&[0.97, 0.03], &[0.01, 0.99]),
            (&[0.9, 0.1], &[0.05, 0.95]),
            (&[0.6, 0.1, 0.1, 0.2], &[0.01, 0.02, 0.2, 0.77]),
        ];
        for (f, (m, u)) in p.fields.iter_mut().zip(table) {
            f.m = m.to_vec();
            f.u = u.to_vec();
        }
        p.prevalence = 0.3;
        p
    }

    fn draw(rng: &mut ChaCha8Rng, probs: &[f64]) -> u8 {
        let x: f64 = rng.r#gen();
        let mut acc = 0.0;
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if x < acc {
                return k as u8;
            }
        }
        (probs.len() - 1) as u8
    }

    fn sample(p: &MatchParameters, n: usize, seed: u64) -> Vec<ComparisonVector> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let is_match = rng.gen_bool(p.prevalence);
                let mut v = [None; FIELD_COUNT];
                for (i, f) in p.fields.iter().enumerate() {
                    // 20% missing, independent of class.
                    if rng.gen_bool(0.8) {
                        v[i] = Some(draw(&mut rng, if is_match { &f.m } else { &f.u }));
                    }
                }
                ComparisonVector(v)
            })
            .collect()
    }

    #[test]
    fn em_recovers_known_parameters_and_likelihood_never_decreases() {
        let truth = truth();
        let vectors = sample(&truth, 200_000, 7);
        let est = estimate(
            vectors,
            MatchParameters::starting_values(),
            EmOptions::default(),
        );
        let Ok(est) = est else {
            panic!("estimation failed");
        };
        let report = est.em.clone().unwrap_or_else(|| panic!("no report"));
        assert!(report.converged, "{} iterations", report.iterations);
        for w in report.log_likelihood.windows(2) {
            assert!(w[1] >= w[0] - 1e-6 * w[0].abs(), "{} → {}", w[0], w[1]);
        }
        assert!((est.prevalence - truth.prevalence).abs() < 0.01);
        for (e, t) in est.fields.iter().zip(&truth.fields) {
            for (a, b) in e.m.iter().zip(&t.m).chain(e.u.iter().zip(&t.u)) {
                assert!((a - b).abs() < 0.02, "{:?}: {a} vs {b}", e.field);
            }
        }
    }

    #[test]
    fn parameters_round_trip_through_json_and_are_checked() {
        let p = truth();
        let json = p.to_json().unwrap_or_default();
        let back = MatchParameters::from_json(&json).ok();
        assert_eq!(back.as_ref(), Some(&p));
        let mut broken = p.clone();
        broken.fields[0].m.pop();
        let json = broken.to_json().unwrap_or_default();
        assert!(matches!(
            MatchParameters::from_json(&json),
            Err(ModelError::LevelCount {
                field: Field::Name,
                ..
            })
        ));
        assert!(matches!(
            MatchParameters::from_json("{"),
            Err(ModelError::Json(_))
        ));
    }

    #[test]
    fn score_explains_each_field_and_thresholds_decide() {
        let p = truth();
        let mut v = [None; FIELD_COUNT];
        v[Field::Name.index()] = Some(0);
        v[Field::ResidentId.index()] = Some(3);
        let s = p.score(&ComparisonVector(v));
        assert_eq!(s.explanation.len(), FIELD_COUNT);
        let name = &s.explanation[0];
        assert_eq!(name.level, Some(Level::Exact));
        assert!((name.weight - (0.85f64 / 0.01).log2()).abs() < 1e-9);
        assert_eq!(s.explanation[1].level, None);
        assert_eq!(s.explanation[1].weight, 0.0);
        assert!(
            s.explanation[3].weight < -5.0,
            "a different resident ID counts against"
        );
        assert!((s.total - p.total(&ComparisonVector(v))).abs() < 1e-9);

        let t = Thresholds {
            auto_link: 10.0,
            review: 0.0,
        };
        assert_eq!(t.decide(10.0), Decision::AutoLink);
        assert_eq!(t.decide(9.99), Decision::Review);
        assert_eq!(t.decide(0.0), Decision::Review);
        assert_eq!(t.decide(-0.01), Decision::NonMatch);
        let mut twin = [Some(0); FIELD_COUNT];
        twin[Field::Name.index()] = Some(4);
        assert_eq!(
            t.decide_pair(40.0, &ComparisonVector(twin)),
            Decision::Review
        );
        twin[Field::Name.index()] = Some(1);
        assert_eq!(
            t.decide_pair(40.0, &ComparisonVector(twin)),
            Decision::AutoLink
        );
        twin[Field::ResidentId.index()] = Some(3);
        assert_eq!(
            t.decide_pair(40.0, &ComparisonVector(twin)),
            Decision::Review
        );
        twin[Field::ResidentId.index()] = Some(2);
        assert_eq!(
            t.decide_pair(40.0, &ComparisonVector(twin)),
            Decision::AutoLink
        );
        let t = Thresholds::from_posterior(0.3, 0.99, 0.5);
        // prior odds 0.3/0.7: a 50 % posterior needs log2(7/3) bits.
        assert!((t.review - (0.7f64 / 0.3).log2()).abs() < 1e-9);
        assert!(t.auto_link > t.review);
        assert!((prior_from_candidates(0.5, 10, 5) - 0.5).abs() < 1e-12);
    }
}
