//! End-to-end evaluation on a synthetic population: blocking → comparison → EM →
//! thresholds → clustering (union-find over auto-links) → pairwise precision/recall/F1
//! against ground truth. Ground truth is used only to measure, never to link.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::blocking::{BlockIndex, BlockingStats, blocking_keys};
use super::compare::{ComparisonVector, compare};
use super::fs::{
    Decision, EmOptions, MatchParameters, ModelError, Score, Thresholds, estimate,
    estimate_u_from_random_pairs, prior_from_candidates,
};
use super::record::{PreparedRecord, RecordId, prepare};
use super::synth::{PopulationConfig, generate};

/// Default cap on block size for the in-memory index.
pub const DEFAULT_MAX_BLOCK: usize = 1_000;

/// What to evaluate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluationConfig {
    pub population: PopulationConfig,
    pub max_block: usize,
    pub em: EmOptions,
    /// Posterior match probability at or above which a pair is linked automatically.
    pub link_posterior: f64,
    /// Posterior match probability at or above which a pair goes to review.
    pub review_posterior: f64,
    /// How many worst false and missed links to list.
    pub examples: usize,
    /// Random record pairs drawn to estimate u probabilities.
    pub u_samples: usize,
}

impl EvaluationConfig {
    /// Defaults used by `yiqiao mpi evaluate --records N --seed S`.
    pub fn new(records: usize, seed: u64) -> Self {
        Self {
            population: PopulationConfig::new(records, seed),
            max_block: DEFAULT_MAX_BLOCK,
            em: EmOptions::default(),
            link_posterior: 0.999,
            review_posterior: 0.5,
            examples: 5,
            u_samples: 500_000,
        }
    }
}

/// A scored pair with its explanation, for the lists of worst errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairExample {
    pub a: RecordId,
    pub b: RecordId,
    pub name_a: String,
    pub name_b: String,
    pub score: Score,
}

/// Wall-clock time of each stage, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub generate_ms: u128,
    pub prepare_ms: u128,
    pub blocking_ms: u128,
    pub compare_ms: u128,
    pub em_ms: u128,
    pub link_ms: u128,
}

/// Result of an evaluation run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub records: usize,
    pub persons: usize,
    pub true_pairs: u64,
    pub candidate_pairs: usize,
    pub pairs_per_record: f64,
    /// Share of true pairs that share at least one blocking key.
    pub blocking_recall: f64,
    pub blocking: BlockingStats,
    pub parameters: MatchParameters,
    pub thresholds: Thresholds,
    pub auto_links: usize,
    pub reviews: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub worst_false_links: Vec<PairExample>,
    pub worst_missed_links: Vec<PairExample>,
    pub timings: Timings,
}

/// Blocking keys of all records into an in-memory index; candidate pairs as indexes into
/// `records`.
pub fn candidate_pairs(
    records: &[PreparedRecord],
    max_block: usize,
) -> (Vec<(usize, usize)>, BlockingStats) {
    let mut index = BlockIndex::new(max_block);
    for (i, r) in records.iter().enumerate() {
        index.insert(RecordId(i as u64), &blocking_keys(r));
    }
    let (pairs, stats) = index.candidate_pairs();
    let pairs = pairs
        .into_iter()
        .map(|(a, b)| (a.0 as usize, b.0 as usize))
        .collect();
    (pairs, stats)
}

/// Compare many pairs, using all available cores.
pub fn compare_pairs(
    records: &[PreparedRecord],
    pairs: &[(usize, usize)],
) -> Vec<ComparisonVector> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = pairs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .map(|&(a, b)| compare(&records[a], &records[b]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// `samples` distinct-index pairs drawn uniformly (deterministic for a seed).
pub fn random_pairs(n: usize, samples: usize, seed: u64) -> Vec<(usize, usize)> {
    use rand::{Rng, SeedableRng};
    if n < 2 {
        return Vec::new();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_u64);
    (0..samples)
        .map(|_| {
            let a = rng.gen_range(0..n);
            let b = (a + rng.gen_range(1..n)) % n;
            (a, b)
        })
        .collect()
}

/// Disjoint-set forest over record indexes.
#[derive(Clone, Debug)]
pub struct UnionFind {
    parent: Vec<usize>,
}

impl UnionFind {
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
        }
    }

    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    pub fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb)] = ra.min(rb);
        }
    }

    /// Cluster label (root) of every element.
    pub fn labels(&mut self) -> Vec<usize> {
        (0..self.parent.len()).map(|i| self.find(i)).collect()
    }
}

fn pairs_within(count: u64) -> u64 {
    count * count.saturating_sub(1) / 2
}

/// Pairwise precision and recall of a clustering against the truth.
pub fn pairwise_quality(predicted: &[usize], truth: &[u64]) -> (f64, f64, f64) {
    let mut by_cluster: HashMap<usize, u64> = HashMap::new();
    let mut by_person: HashMap<u64, u64> = HashMap::new();
    let mut by_both: HashMap<(usize, u64), u64> = HashMap::new();
    for (c, p) in predicted.iter().zip(truth) {
        *by_cluster.entry(*c).or_default() += 1;
        *by_person.entry(*p).or_default() += 1;
        *by_both.entry((*c, *p)).or_default() += 1;
    }
    let predicted_pairs: u64 = by_cluster.values().map(|n| pairs_within(*n)).sum();
    let true_pairs: u64 = by_person.values().map(|n| pairs_within(*n)).sum();
    let tp: u64 = by_both.values().map(|n| pairs_within(*n)).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    let precision = ratio(tp, predicted_pairs);
    let recall = ratio(tp, true_pairs);
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    (precision, recall, f1)
}

fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

/// Generate a population, link it with the engine and measure the result.
pub fn evaluate(config: &EvaluationConfig) -> Result<EvaluationReport, ModelError> {
    let mut timings = Timings::default();
    let t = Instant::now();
    let pop = generate(&config.population);
    timings.generate_ms = ms(t);

    let t = Instant::now();
    let records: Vec<PreparedRecord> = pop.records.iter().map(prepare).collect();
    timings.prepare_ms = ms(t);

    let t = Instant::now();
    let (pairs, blocking) = candidate_pairs(&records, config.max_block);
    timings.blocking_ms = ms(t);

    let t = Instant::now();
    let vectors = compare_pairs(&records, &pairs);
    timings.compare_ms = ms(t);

    let t = Instant::now();
    let random = random_pairs(records.len(), config.u_samples, config.population.seed);
    let start = estimate_u_from_random_pairs(
        compare_pairs(&records, &random),
        MatchParameters::starting_values(),
    );
    let em = EmOptions {
        fix_u: true,
        ..config.em
    };
    let params = estimate(vectors.iter().copied(), start, em)?;
    timings.em_ms = ms(t);

    let t = Instant::now();
    let prior = prior_from_candidates(params.prevalence, pairs.len(), records.len());
    let thresholds =
        Thresholds::from_posterior(prior, config.link_posterior, config.review_posterior);
    let totals: Vec<f64> = vectors.iter().map(|v| params.total(v)).collect();
    let mut uf = UnionFind::new(records.len());
    let (mut auto_links, mut reviews) = (0, 0);
    for ((&(a, b), total), v) in pairs.iter().zip(&totals).zip(&vectors) {
        match thresholds.decide_pair(*total, v) {
            Decision::AutoLink => {
                auto_links += 1;
                uf.union(a, b);
            }
            Decision::Review => reviews += 1,
            Decision::NonMatch => {}
        }
    }
    let labels = uf.labels();
    timings.link_ms = ms(t);

    let truth = &pop.person_of;
    let (precision, recall, f1) = pairwise_quality(&labels, truth);
    let mut person_sizes: HashMap<u64, u64> = HashMap::new();
    for p in truth {
        *person_sizes.entry(*p).or_default() += 1;
    }
    let true_pairs: u64 = person_sizes.values().map(|n| pairs_within(*n)).sum();
    let blocked_true = pairs.iter().filter(|(a, b)| truth[*a] == truth[*b]).count();

    let example = |i: usize| {
        let (a, b) = pairs[i];
        PairExample {
            a: records[a].record_id,
            b: records[b].record_id,
            name_a: pop.records[a].name.clone(),
            name_b: pop.records[b].name.clone(),
            score: params.score(&vectors[i]),
        }
    };
    let mut false_links: Vec<usize> = (0..pairs.len())
        .filter(|&i| {
            let (a, b) = pairs[i];
            truth[a] != truth[b]
                && thresholds.decide_pair(totals[i], &vectors[i]) == Decision::AutoLink
        })
        .collect();
    false_links.sort_by(|x, y| totals[*y].total_cmp(&totals[*x]));
    let mut missed: Vec<usize> = (0..pairs.len())
        .filter(|&i| {
            let (a, b) = pairs[i];
            truth[a] == truth[b] && labels[a] != labels[b]
        })
        .collect();
    missed.sort_by(|x, y| totals[*x].total_cmp(&totals[*y]));

    Ok(EvaluationReport {
        records: records.len(),
        persons: pop.persons,
        true_pairs,
        candidate_pairs: pairs.len(),
        pairs_per_record: pairs.len() as f64 / records.len().max(1) as f64,
        blocking_recall: if true_pairs == 0 {
            1.0
        } else {
            blocked_true as f64 / true_pairs as f64
        },
        blocking,
        parameters: params.clone(),
        thresholds,
        auto_links,
        reviews,
        precision,
        recall,
        f1,
        worst_false_links: false_links
            .into_iter()
            .take(config.examples)
            .map(example)
            .collect(),
        worst_missed_links: missed
            .into_iter()
            .take(config.examples)
            .map(example)
            .collect(),
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_quality_counts_pairs() {
        // truth: {0,1,2} {3}; predicted: {0,1} {2,3}
        let (p, r, f) = pairwise_quality(&[0, 0, 2, 2], &[7, 7, 7, 8]);
        assert!((p - 0.5).abs() < 1e-12);
        assert!((r - 1.0 / 3.0).abs() < 1e-12);
        assert!((f - 0.4).abs() < 1e-12);
    }

    #[test]
    fn union_find_clusters_transitively() {
        let mut uf = UnionFind::new(5);
        uf.union(0, 1);
        uf.union(3, 1);
        let l = uf.labels();
        assert_eq!(l[0], l[3]);
        assert_ne!(l[0], l[2]);
        assert_ne!(l[4], l[2]);
    }

    #[test]
    fn blocking_recall_on_generated_sample() {
        let pop = generate(&PopulationConfig::new(5_000, 11));
        let records: Vec<PreparedRecord> = pop.records.iter().map(prepare).collect();
        let (pairs, _) = candidate_pairs(&records, DEFAULT_MAX_BLOCK);
        let truth = &pop.person_of;
        let found = pairs.iter().filter(|(a, b)| truth[*a] == truth[*b]).count();
        let mut sizes: HashMap<u64, u64> = HashMap::new();
        for p in truth {
            *sizes.entry(*p).or_default() += 1;
        }
        let total: u64 = sizes.values().map(|n| pairs_within(*n)).sum();
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.99, "blocking recall {recall}");
        assert!(pairs.len() < 10 * records.len(), "{} pairs", pairs.len());
    }

    #[test]
    fn evaluation_f1_on_10k_sample() {
        let config = EvaluationConfig {
            u_samples: 100_000,
            ..EvaluationConfig::new(10_000, 2024)
        };
        let report = evaluate(&config);
        let Ok(report) = report else {
            panic!("evaluation failed");
        };
        assert!(
            report.f1 >= 0.98,
            "F1 {:.4} (P {:.4} R {:.4})",
            report.f1,
            report.precision,
            report.recall
        );
        assert!(report.parameters.em.as_ref().is_some_and(|e| e.converged));
    }
}
