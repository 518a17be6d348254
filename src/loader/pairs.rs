//! MPCS magnification pairs (METHOD.md, "Pair sampling per sample, per epoch"). Indices refer to
//! the magnification order of `data::breakhis::MAGNIFICATIONS`: 0 = 40X, 1 = 100X, 2 = 200X, 3 = 400X.

use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// How the two views of a region are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PairMode {
    /// Fixed pair: always (200X, 400X).
    #[serde(rename = "FP")]
    Fixed,
    /// Ordered pair: k uniform in {0, 1, 2, 3}; 0 → (40X, 100X), 1 → (100X, 200X), 2 and 3 → (200X, 400X),
    /// so (200X, 400X) comes half the time, as in the reference code.
    #[serde(rename = "OP")]
    Ordered,
    /// Random pair: two different magnifications, uniformly (each of the 12 ordered pairs 1/12).
    #[serde(rename = "RP")]
    Random,
}

impl PairMode {
    /// Parses "FP" / "OP" / "RP" (any case).
    pub fn parse(s: &str) -> Option<PairMode> {
        match s.to_ascii_uppercase().as_str() {
            "FP" => Some(PairMode::Fixed),
            "OP" => Some(PairMode::Ordered),
            "RP" => Some(PairMode::Random),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PairMode::Fixed => "FP",
            PairMode::Ordered => "OP",
            PairMode::Random => "RP",
        }
    }
}

/// The (view 1, view 2) magnification indices for one draw.
pub fn sample_pair(mode: PairMode, rng: &mut Rng) -> (usize, usize) {
    match mode {
        PairMode::Fixed => (2, 3),
        PairMode::Ordered => match rng.below(4) {
            0 => (0, 1),
            1 => (1, 2),
            _ => (2, 3),
        },
        PairMode::Random => {
            // Like `random.sample(range(4), 2)`: first uniform, second uniform among the rest.
            let a = rng.below(4) as usize;
            let mut b = rng.below(3) as usize;
            if b >= a {
                b += 1;
            }
            (a, b)
        }
    }
}
