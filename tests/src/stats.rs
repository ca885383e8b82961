//! Statistics for the bench: a true median, the interquartile range, a bootstrap
//! 95 % interval of the median, and a comparison that calls a ratio a win or a
//! loss only when the two intervals do not overlap. Pure; no I/O.

/// The fewest samples per method and operation the bench takes and the report
/// accepts; below it a row is printed as too few samples.
pub const MIN_SAMPLES: usize = 5;

/// Resamples of the bootstrap.
const RESAMPLES: usize = 2000;

/// The summary of one method's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartiles.
    pub q1: f64,
    pub q3: f64,
    /// Bootstrap 95 % interval of the median.
    pub ci_lo: f64,
    pub ci_hi: f64,
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// The `p` quantile of sorted data, linear between neighbours (type 7, as R's and
/// numpy's default): 0.5 is the median, the mean of the middle two for an even count.
fn quantile_sorted(s: &[f64], p: f64) -> f64 {
    let h = (s.len() - 1) as f64 * p;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    s[lo] + (h - lo as f64) * (s[hi] - s[lo])
}

/// The median: the middle sample, or the mean of the middle two.
pub fn median(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| quantile_sorted(&sorted(v), 0.5))
}

/// A small deterministic generator (xorshift64*), so a report is reproducible.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Percentile bootstrap of the median: 95 % of resampled medians lie in it.
fn bootstrap_median(v: &[f64]) -> (f64, f64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ v.len() as u64);
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let pick: Vec<f64> = (0..v.len()).map(|_| v[rng.below(v.len())]).collect();
            quantile_sorted(&sorted(&pick), 0.5)
        })
        .collect();
    medians.sort_by(|a, b| a.total_cmp(b));
    (quantile_sorted(&medians, 0.025), quantile_sorted(&medians, 0.975))
}

/// Median, range, quartiles and the median's interval; `None` for no samples.
pub fn summarize(v: &[f64]) -> Option<Summary> {
    if v.is_empty() {
        return None;
    }
    let s = sorted(v);
    let (ci_lo, ci_hi) = bootstrap_median(&s);
    Some(Summary {
        n: s.len(),
        median: quantile_sorted(&s, 0.5),
        min: s[0],
        max: s[s.len() - 1],
        q1: quantile_sorted(&s, 0.25),
        q3: quantile_sorted(&s, 0.75),
        ci_lo,
        ci_hi,
    })
}

/// How a method compares with another.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Faster: its interval lies wholly below the other's.
    Faster(f64),
    /// Slower: wholly above.
    Slower(f64),
    /// The intervals overlap: the ratio of medians says nothing.
    WithinNoise(f64),
    /// Fewer than [`MIN_SAMPLES`] on either side.
    TooFew,
}

/// `a` against `b` (times: lower is better), by the medians' bootstrap intervals.
pub fn compare(a: &Summary, b: &Summary) -> Verdict {
    if a.n < MIN_SAMPLES || b.n < MIN_SAMPLES {
        return Verdict::TooFew;
    }
    let ratio = a.median / b.median;
    if a.ci_hi < b.ci_lo {
        Verdict::Faster(ratio)
    } else if a.ci_lo > b.ci_hi {
        Verdict::Slower(ratio)
    } else {
        Verdict::WithinNoise(ratio)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Faster(r) => write!(f, "{r:.2} (faster)"),
            Verdict::Slower(r) => write!(f, "{r:.2} (slower)"),
            Verdict::WithinNoise(r) => write!(f, "{r:.2} (within noise)"),
            Verdict::TooFew => write!(f, "too few samples"),
        }
    }
}

/// The latency table from raw samples keyed `"operation / method"` (as
/// `results/bench.json` holds them): per row the sample count, median, min, max,
/// IQR and the median's 95 % interval, and the ratio to the operation's fastest
/// method by median, called faster or slower only when the intervals do not
/// overlap. `exclude` names methods that are components, not methods (they get
/// no ratio and are never the fastest).
pub fn latency_table(raw: &std::collections::BTreeMap<String, Vec<f64>>, exclude: &[&str]) -> String {
    use std::fmt::Write as _;
    let rows: Vec<(&str, &str, Summary)> = raw
        .iter()
        .filter_map(|(k, v)| {
            let (op, m) = k.split_once(" / ")?;
            Some((op, m, summarize(v)?))
        })
        .collect();
    let mut md = String::from(
        "| operation | method | n | median ms | min ms | max ms | IQR ms | median 95 % CI ms | vs fastest (by median) |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for (op, m, s) in &rows {
        let fastest = rows
            .iter()
            .filter(|(o, fm, _)| o == op && !exclude.contains(fm))
            .min_by(|a, b| a.2.median.total_cmp(&b.2.median));
        let few_in_op = rows.iter().any(|(o, fm, r)| o == op && !exclude.contains(fm) && r.n < MIN_SAMPLES);
        let vs = match fastest {
            _ if exclude.contains(m) => "component".to_string(),
            // No ranking from fewer samples than the intervals need.
            _ if few_in_op => "too few samples".to_string(),
            Some((_, fm, _)) if fm == m => "fastest by median".to_string(),
            Some((_, fm, f)) => format!("{} vs {fm}", compare(s, f)),
            None => String::new(),
        };
        let few = if s.n < MIN_SAMPLES { " (too few samples)" } else { "" };
        let _ = writeln!(
            md,
            "| {op} | {m} | {}{few} | {:.1} | {:.1} | {:.1} | {:.1}–{:.1} | {:.1}–{:.1} | {vs} |",
            s.n, s.median, s.min, s.max, s.q1, s.q3, s.ci_lo, s.ci_hi
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_two_is_their_mean_not_the_larger() {
        assert_eq!(median(&[237.3, 400.2]), Some((237.3 + 400.2) / 2.0));
        assert_ne!(median(&[400.2, 237.3]), Some(400.2));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn quartiles_and_range_on_known_data() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]).expect("samples");
        assert_eq!((s.n, s.median, s.min, s.max), (9, 5.0, 1.0, 9.0));
        assert_eq!((s.q1, s.q3), (3.0, 7.0));
        assert!(s.ci_lo <= s.median && s.median <= s.ci_hi, "{s:?}");
        assert!(s.ci_lo >= 1.0 && s.ci_hi <= 9.0, "{s:?}");
    }

    #[test]
    fn identical_samples_have_a_point_interval() {
        let s = summarize(&[7.0; 5]).expect("samples");
        assert_eq!((s.ci_lo, s.ci_hi), (7.0, 7.0));
    }

    #[test]
    fn a_win_only_when_the_intervals_do_not_overlap() {
        let fast = summarize(&[100.0, 101.0, 102.0, 103.0, 104.0]).expect("samples");
        let slow = summarize(&[200.0, 201.0, 202.0, 203.0, 204.0]).expect("samples");
        assert!(matches!(compare(&fast, &slow), Verdict::Faster(r) if (r - 102.0 / 202.0).abs() < 1e-9));
        assert!(matches!(compare(&slow, &fast), Verdict::Slower(_)));
        let wide = summarize(&[90.0, 150.0, 205.0, 260.0, 300.0]).expect("samples");
        assert!(matches!(compare(&fast, &wide), Verdict::WithinNoise(_)), "{:?}", compare(&fast, &wide));
    }

    #[test]
    fn two_samples_are_too_few_to_call() {
        let two = summarize(&[237.3, 400.2]).expect("samples");
        let five = summarize(&[258.3, 280.7, 453.2, 260.0, 270.0]).expect("samples");
        assert_eq!(compare(&five, &two), Verdict::TooFew);
        assert_eq!(compare(&five, &two).to_string(), "too few samples");
    }

    #[test]
    fn the_report_follows_the_raw_samples() {
        let raw: std::collections::BTreeMap<String, Vec<f64>> = [
            ("vCPU / vmplug", vec![453.2, 280.7, 258.3]),
            ("vCPU / shell loop (guide)", vec![237.3, 400.2]),
            ("memory 1 GiB / a", vec![100.0, 101.0, 102.0, 103.0, 104.0]),
            ("memory 1 GiB / b", vec![200.0, 201.0, 202.0, 203.0, 204.0]),
            ("memory 1 GiB / c", vec![90.0, 150.0, 205.0, 260.0, 300.0]),
            ("memory 1 GiB / part", vec![1.0; 5]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let md = latency_table(&raw, &["part"]);
        let row = |m: &str| md.lines().find(|l| l.contains(&format!("| {m} |"))).unwrap_or_default().to_string();
        assert!(row("shell loop (guide)").contains("| 2 (too few samples) | 318.8 |"), "{md}");
        assert!(!row("shell loop (guide)").contains("| 400.2 | 237.3"), "{md}");
        assert!(row("vmplug").ends_with("| too few samples |"), "{md}");
        assert!(row("shell loop (guide)").ends_with("| too few samples |"), "{md}");
        assert!(row("a").ends_with("| fastest by median |"), "{md}");
        assert!(row("b").contains("(slower) vs a"), "{md}");
        assert!(row("c").contains("(within noise) vs a"), "{md}");
        assert!(row("part").ends_with("| component |"), "{md}");
        assert_eq!(md.lines().count(), 2 + raw.len());
    }
}
