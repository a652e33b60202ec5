//! Battery logic on recorded /sys/class/power_supply trees and macOS `ioreg` output
//! (tests/data/telemetry/README.md names the issue each one was posted in).

use std::path::{Path, PathBuf};
use std::time::Instant;
use tokentop::telemetry::battery::{parse_ioreg, read_sysfs};
use tokentop::telemetry::{Battery, BatteryReading, BatteryUse, Charge, Power, PowerProbe};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/telemetry")
        .join(rel)
}

/// Lays a recorded case out as a sysfs tree: NAME.uevent files become
/// class/power_supply/NAME/uevent, directories are copied as they are.
fn tree(case: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let ps = d.path().join("class/power_supply");
    for e in std::fs::read_dir(data(&format!("power_supply/{case}"))).unwrap() {
        let e = e.unwrap().path();
        let name = e.file_stem().unwrap().to_string_lossy().to_string();
        let dir = ps.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        if e.is_dir() {
            for f in std::fs::read_dir(&e).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&e, dir.join("uevent")).unwrap();
        }
    }
    d
}

fn reading(b: Battery) -> BatteryReading {
    match b {
        Battery::Reading(r) => r,
        Battery::Unavailable(why) => panic!("no reading: {why}"),
    }
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-3)
}

#[test]
fn discharging_thinkpad_from_its_uevent() {
    let d = tree("discharging");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::Discharging);
    assert!(close(r.watts, 27.758), "{r:?}");
    assert!(close(r.energy_wh, 2.42) && close(r.full_wh, 25.86), "{r:?}");
    // 2.42 Wh at 27.758 W: about 5 minutes left.
    assert!(close(r.hours_left(27.758), 2.42 / 27.758));
    assert!(close(r.percent, 9.0), "the kernel's capacity");
    assert_eq!(r.batteries, 1);
}

#[test]
fn discharging_from_attribute_files() {
    let d = tree("files_discharging");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::Discharging);
    assert!(close(r.watts, 5.156) && close(r.energy_wh, 23.6), "{r:?}");
    // 23.6 Wh at 5.156 W is 4.58 h (acpi said 05:43 at its own averaged rate).
    assert!(close(r.hours_left(5.156), 23.6 / 5.156));
    // One percent of a 46.59 Wh battery is 1677 J.
    assert!(close(r.joules_per_percent(), 465.9 * 3.6));
}

#[test]
fn charging_dell_with_charge_and_current_only() {
    let d = tree("charging");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::Charging);
    // 0.413 A × 12.729 V.
    assert!(close(r.watts, 0.413 * 12.729), "{r:?}");
    // µAh × design voltage: 3.692 Ah × 11.4 V.
    assert!(close(r.energy_wh, 3.692 * 11.4), "{r:?}");
    assert_eq!(r.hours_left(5.0), None, "no hours left while charging");
}

#[test]
fn unknown_at_100_percent_is_full() {
    let d = tree("full");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::Full);
    assert!(close(r.percent, 100.0));
}

#[test]
fn two_batteries_add_up_and_the_idle_one_only_adds_energy() {
    let d = tree("two");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.batteries, 2);
    assert_eq!(r.state, Charge::Discharging);
    assert!(close(r.watts, 27.758), "{r:?}");
    assert!(
        close(r.energy_wh, 2.42) && close(r.full_wh, 25.86 + 30.38),
        "{r:?}"
    );
    assert!(close(r.percent, 100.0 * 2.42 / (25.86 + 30.38)), "{r:?}");
}

#[test]
fn missing_fields() {
    // No power_now: current_now × voltage_now.
    let d = tree("current_only");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::Discharging);
    assert!(close(r.watts, 0.756 * 12.6), "{r:?}");
    // Neither current nor voltage: on AC, held at a threshold, no rate and no time left.
    let d = tree("not_charging");
    let r = reading(read_sysfs(d.path()));
    assert_eq!(r.state, Charge::NotCharging);
    assert!(close(r.energy_wh, 65.44) && close(r.percent, 100.0 * 65.44 / 69.24));
    assert_eq!(Battery::Reading(r).discharge_watts(), None);
    // No power_supply class at all (a desktop, a container), or one with no battery.
    let empty = tempfile::tempdir().unwrap();
    assert!(
        matches!(read_sysfs(empty.path()), Battery::Unavailable(r) if r.contains("power_supply"))
    );
    std::fs::create_dir_all(empty.path().join("class/power_supply/AC")).unwrap();
    std::fs::write(empty.path().join("class/power_supply/AC/type"), "Mains\n").unwrap();
    assert_eq!(
        read_sysfs(empty.path()),
        Battery::Unavailable("no battery".into())
    );
}

#[test]
fn battery_is_the_power_source_only_when_nothing_better_exists() {
    let d = tree("files_discharging");
    let mut probe = PowerProbe::discover(d.path());
    assert_eq!(
        probe.read(Instant::now()),
        Power::Watts {
            watts: 5.156,
            source: "battery discharge".into()
        }
    );
    // Plugged in, the battery is no power meter: an honest n/a.
    let d = tree("not_charging");
    let mut probe = PowerProbe::discover(d.path());
    assert!(
        matches!(probe.read(Instant::now()), Power::Unavailable(r) if r.contains("not discharging"))
    );
}

#[test]
fn macos_ioreg_with_the_amperage_printed_unsigned() {
    let text = std::fs::read_to_string(data("apple/ioreg-draining-on-charger.txt")).unwrap();
    let r = reading(parse_ioreg(&text));
    // 18446744073709551133 is −483 mA: a weak charger, the battery still drains.
    assert_eq!(r.state, Charge::Discharging);
    assert!(close(r.watts, 0.483 * 12.1), "{r:?}");
    assert!(close(r.energy_wh, 6.764 * 12.1), "{r:?}");
    let text = std::fs::read_to_string(data("apple/ioreg-full.txt")).unwrap();
    let r = reading(parse_ioreg(&text));
    assert_eq!(r.state, Charge::Full);
    assert!(close(r.percent, 100.0));
    assert_eq!(parse_ioreg(""), Battery::Unavailable("no battery".into()));
}

#[test]
fn share_of_battery_spent_generating() {
    let d = tree("files_discharging");
    let b = read_sysfs(d.path());
    let mut used = BatteryUse::default();
    used.record(&b, 3.0, false);
    used.record(&b, 1.0, true);
    assert!(close(Some(used.joules), 4.0 * 5.156));
    assert!(close(used.generating_share(), 0.25));
    // Time on AC adds nothing.
    used.record(&reading_battery("not_charging"), 10.0, true);
    assert!(close(used.generating_share(), 0.25));
}

fn reading_battery(case: &str) -> Battery {
    let d = tree(case);
    read_sysfs(d.path())
}
