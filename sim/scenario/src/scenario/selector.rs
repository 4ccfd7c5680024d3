//! Board selectors: which boards of the fleet a fault or an expectation applies to.

/// One end of a board range: an index, or a percentage of the fleet (so a scenario's
/// selectors still mean the same with `--devices`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Index(u32),
    Percent(u32),
}

impl Bound {
    fn parse(s: &str, part: &str) -> Result<Bound, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= 100)
                .map(Bound::Percent)
                .ok_or_else(|| format!("'{part}': '{s}' is not a percentage from 0% to 100%")),
            None => s
                .parse()
                .map(Bound::Index)
                .map_err(|_| format!("'{part}': '{s}' is not a board index or a percentage")),
        }
    }

    /// The index this bound stands for in a fleet of `n` boards (percentages round up, as
    /// rollout waves do).
    fn at(self, n: u32) -> u32 {
        match self {
            Bound::Index(i) => i,
            Bound::Percent(p) => (n as u64 * p as u64).div_ceil(100) as u32,
        }
    }
}

/// Which boards a fault or expectation applies to (indices 0..devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    spec: Vec<(Bound, Bound)>,
    /// `spec` for the current fleet size.
    ranges: Vec<(u32, u32)>,
    pub text: String,
}

impl Selector {
    pub fn all() -> Selector {
        let spec = vec![(Bound::Index(0), Bound::Index(u32::MAX))];
        Selector {
            ranges: vec![(0, u32::MAX)],
            spec,
            text: "all".into(),
        }
    }

    /// `all`, `N`, `A..B` (B excluded), or a comma-separated list of those, where A and B are
    /// board indices or percentages of the fleet (`0%..10%`). Resolve before use.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut spec = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part == "all" {
                spec.push((Bound::Index(0), Bound::Index(u32::MAX)));
            } else if let Some((a, b)) = part.split_once("..") {
                let (a, b) = (Bound::parse(a, part)?, Bound::parse(b, part)?);
                let empty = match (a, b) {
                    (Bound::Index(x), Bound::Index(y)) | (Bound::Percent(x), Bound::Percent(y)) => {
                        x >= y
                    }
                    _ => false,
                };
                if empty {
                    return Err(format!("'{part}' selects no board (the end is excluded)"));
                }
                spec.push((a, b));
            } else {
                let n: u32 = part.parse().map_err(|_| {
                    format!("'{part}' is not `all`, a board index or a range `A..B`")
                })?;
                spec.push((Bound::Index(n), Bound::Index(n + 1)));
            }
        }
        Ok(Selector {
            spec,
            ranges: Vec::new(),
            text: text.to_string(),
        })
    }

    /// Fix the percentages for a fleet of `n` boards.
    pub fn resolve(&mut self, n: u32) {
        self.ranges = self.spec.iter().map(|(a, b)| (a.at(n), b.at(n))).collect();
    }

    pub fn contains(&self, i: u32) -> bool {
        self.ranges.iter().any(|(a, b)| i >= *a && i < *b)
    }

    pub(super) fn max_index(&self) -> Option<u32> {
        self.spec
            .iter()
            .filter_map(|(_, b)| match b {
                Bound::Index(e) if *e != u32::MAX => Some(e - 1),
                _ => None,
            })
            .max()
    }
}
