//! Staged rollouts: a release goes to growing waves of a channel's boards, and halts by itself
//! when too many boards of the waves so far failed (like hawkBit's error threshold or the
//! abort criteria of AWS IoT Jobs).
//!
//! Boards outside the current waves keep being offered the previous release. A wave is judged
//! `interval` after it started: the failure rate is the share of boards in the waves so far
//! whose ack for this release says anything but `installed` (boards still updating count as
//! not failed). Above `halt_failure_rate` percent, no further wave starts.

use std::collections::BTreeSet;

/// How a release rolls out.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPlan {
    /// Cumulative percentages of the channel's boards, e.g. `[10, 50, 100]`.
    pub waves: Vec<u32>,
    pub interval_ms: u64,
    /// Halt when more than this percentage of the boards so far failed.
    pub halt_failure_rate: u32,
}

/// What happens after a wave was judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Start the next wave with these boards.
    Next(Vec<u32>),
    /// Stopped: `failed` of `members` boards failed.
    Halted {
        wave: usize,
        failed: usize,
        members: usize,
    },
    /// Every wave is out and the last one was fine.
    Done,
}

/// The state of one rollout.
#[derive(Clone, Debug)]
pub struct Rollout {
    plan: RolloutPlan,
    eligible: Vec<u32>,
    members: BTreeSet<u32>,
    wave: usize,
    halted: bool,
}

impl Rollout {
    /// `eligible`: the boards of the release's channel, in the order waves take them.
    pub fn new(plan: RolloutPlan, eligible: Vec<u32>) -> Rollout {
        Rollout {
            plan,
            eligible,
            members: BTreeSet::new(),
            wave: 0,
            halted: false,
        }
    }

    pub fn plan(&self) -> &RolloutPlan {
        &self.plan
    }

    /// Boards offered the release now.
    pub fn contains(&self, board: u32) -> bool {
        self.members.contains(&board)
    }

    /// Index of the current wave (0 for the first).
    pub fn wave(&self) -> usize {
        self.wave
    }

    pub fn is_halted(&self) -> bool {
        self.halted
    }

    fn size_of(&self, wave: usize) -> usize {
        let pct = self.plan.waves.get(wave).copied().unwrap_or(100).min(100) as usize;
        (self.eligible.len() * pct).div_ceil(100)
    }

    /// The boards of the first wave.
    pub fn start(&mut self) -> Vec<u32> {
        self.grow(0)
    }

    fn grow(&mut self, wave: usize) -> Vec<u32> {
        self.wave = wave;
        let new: Vec<u32> = self.eligible[self.members.len().min(self.eligible.len())
            ..self.size_of(wave).max(self.members.len())]
            .to_vec();
        self.members.extend(new.iter().copied());
        new
    }

    /// Judge the current wave; `failed(board)` says whether that board's ack reports a failure.
    pub fn check(&mut self, failed: impl Fn(u32) -> bool) -> Step {
        if self.halted {
            return Step::Done;
        }
        let members = self.members.len();
        let bad = self.members.iter().filter(|b| failed(**b)).count();
        if members > 0 && bad * 100 > self.plan.halt_failure_rate as usize * members {
            self.halted = true;
            return Step::Halted {
                wave: self.wave,
                failed: bad,
                members,
            };
        }
        if self.wave + 1 >= self.plan.waves.len() {
            return Step::Done;
        }
        Step::Next(self.grow(self.wave + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RolloutPlan {
        RolloutPlan {
            waves: vec![10, 50, 100],
            interval_ms: 1,
            halt_failure_rate: 20,
        }
    }

    #[test]
    fn waves_grow_to_the_whole_channel() {
        let mut r = Rollout::new(plan(), (0..20).collect());
        assert_eq!(r.start(), vec![0, 1]);
        assert_eq!(r.check(|_| false), Step::Next((2..10).collect()));
        assert_eq!(r.check(|_| false), Step::Next((10..20).collect()));
        assert_eq!(r.check(|_| false), Step::Done);
        assert!(r.contains(19));
    }

    #[test]
    fn too_many_failures_halt_the_rollout() {
        let mut r = Rollout::new(plan(), (0..20).collect());
        r.start();
        assert_eq!(
            r.check(|b| b == 0),
            Step::Halted {
                wave: 0,
                failed: 1,
                members: 2
            }
        );
        assert!(r.is_halted() && !r.contains(2));
    }
}
