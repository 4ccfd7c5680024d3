//! Property: for random image pairs (sizes, full or delta) and random cut points (single, or a
//! second cut during recovery), the board always boots a known image and converges where the
//! run without a cut does (invariants 1–3 of the explorer, and the others it checks).

use std::path::Path;

use otarig_scenario::plr;
use otarig_scenario::scenario::Scenario;
use proptest::prelude::*;

fn scenario(old_kib: u32, new_kib: u32, delta: bool) -> Scenario {
    let text = format!(
        r#"
[scenario]
name = "property"
[fleet]
devices = 1
device-type = "prop-board"
firmware = "a"
[firmware.a]
version = "1.0.0"
size = "{old_kib}KiB"
[firmware.b]
version = "2.0.0"
size = "{new_kib}KiB"
[[release]]
firmware = "b"
at = "1s"
{delta}
[[expect]]
version = "2.0.0"
"#,
        delta = if delta { "delta-from = [\"a\"]" } else { "" }
    );
    Scenario::parse(Path::new("property.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_cut_in_any_update_recovers(
        old_kib in 8u32..160,
        new_kib in 8u32..160,
        delta in any::<bool>(),
        at in 0.0f64..1.0,
        second in proptest::option::of(1u64..80),
        seed in any::<u64>(),
    ) {
        let s = scenario(old_kib, new_kib, delta);
        let g = plr::golden(&s).unwrap();
        prop_assert_eq!(&g.final_version, "2.0.0");
        let k = (at * g.ops as f64) as u64;
        let cuts: Vec<u64> = match second { Some(d) => vec![k, k + d], None => vec![k] };
        let p = plr::probe(&s, &g, &cuts, seed).unwrap();
        prop_assert!(p.violations.is_empty(), "{} KiB -> {} KiB, delta {}, cuts {:?}, seed {}: {:?}",
            old_kib, new_kib, delta, cuts, seed, p.violations);
    }
}
