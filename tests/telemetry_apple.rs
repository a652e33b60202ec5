//! Apple telemetry on recorded output: `sysctl` values, `macmon pipe` JSON lines, and the
//! pool with the GPU's wired-memory limit (tests/data/telemetry/README.md cites each).

use std::path::Path;
use std::time::Instant;
use tokentop::telemetry::apple::{parse_macmon_line, parse_sysctl, wired_limit};
use tokentop::telemetry::gb10::GpuPower;
use tokentop::telemetry::{assemble, Battery, GpuMemory, PoolKind, Power, Readings};

fn data(rel: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/telemetry")
            .join(rel),
    )
    .unwrap()
}

#[test]
fn sysctl_values_and_the_wired_limit() {
    let m5 = parse_sysctl(&data("apple/sysctl-m5max.txt"));
    assert_eq!(m5.memsize, Some(128 << 30));
    assert_eq!(m5.wired_limit_mb, Some(0));
    assert_eq!(m5.brand.as_deref(), Some("Apple M5 Max"));
    // 0 means macOS's default: about three quarters of 128 GiB = 96 GiB, which a 70B Q4_K_M
    // (~42 GB) fits and a 120 GB model does not.
    assert_eq!(wired_limit(&m5), Some((96 << 30, true)));
    let m1 = parse_sysctl(&data("apple/sysctl-m1max-raised.txt"));
    assert_eq!(wired_limit(&m1), Some((26000 << 20, false)));
    // An Intel Mac or an old macOS has no iogpu key: sysctl prints only what it knows.
    let intel = parse_sysctl("hw.memsize: 17179869184\nmachdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n");
    assert_eq!(intel.wired_limit_mb, None);
    assert_eq!(wired_limit(&intel), Some((12 << 30, true)));
    assert_eq!(wired_limit(&parse_sysctl("")), None);
}

#[test]
fn macmon_pipe_lines_old_and_new_format() {
    for f in ["macmon/v0.6.jsonl", "macmon/v0.8.jsonl"] {
        let line = data(f);
        let s = parse_macmon_line(line.trim()).unwrap();
        assert_eq!(
            (s.cpu_power, s.gpu_power, s.ane_power, s.all_power),
            (0.20486385, 0.017451683, 0.0, 0.22231553),
            "{f}"
        );
        assert_eq!(s.sys_power, Some(5.876533), "{f}");
    }
    let err = parse_macmon_line("{\"cpu_power\": 1.0}").unwrap_err();
    assert!(err.starts_with("macmon pipe:"), "{err}");
    assert!(parse_macmon_line("not json").is_err());
}

/// A 128 GB M5 Max as kennss/SiliconScope pull request #58 recorded it: 72.0 of 128 GB in
/// use; E 11.6 + P 15.8 W CPU, 0.9 W GPU, 0 W ANE. That tool reads the same IOReport
/// counters macmon does; here its figures fill a macmon sample.
pub fn m5_max(at: Instant) -> Readings {
    let sysctl = parse_sysctl(&data("apple/sysctl-m5max.txt"));
    let total = sysctl.memsize.unwrap();
    let macmon = parse_macmon_line(
        r#"{"cpu_power":27.4,"gpu_power":0.9,"ane_power":0.0,"all_power":28.3,"ram_power":2.2}"#,
    );
    Readings {
        at,
        os_memory: (total, total - 72_000_000_000),
        cgroup: None,
        process_rss: 1_500_000_000,
        os_kind: PoolKind::Unified,
        gpu: Err("Apple GPU (Metal), no NVML".into()),
        macmon,
        sysctl: Some(sysctl),
        system_power: Power::Unavailable("no powercap (RAPL) interface".into()),
        battery: tokentop::telemetry::battery::parse_ioreg(&data("apple/ioreg-full.txt")),
        cpu_model: None,
    }
}

#[test]
fn m5_max_pool_limit_and_package_power() {
    let snap = assemble(m5_max(Instant::now()), &mut GpuPower::default());
    assert_eq!(snap.memory.kind, PoolKind::Unified);
    assert_eq!(snap.memory.total, 128 << 30);
    assert_eq!(snap.memory.used, 72_000_000_000);
    assert_eq!(
        snap.details.gpu_memory,
        GpuMemory::WiredLimit {
            bytes: 96 << 30,
            default: true
        }
    );
    assert_eq!(
        snap.power,
        Power::Watts {
            watts: 28.3,
            source: "package (macmon)".into()
        }
    );
    assert_eq!(
        snap.details.parts,
        vec![("CPU", 27.4), ("GPU", 0.9), ("ANE", 0.0)]
    );
    assert_eq!(snap.details.machine.as_deref(), Some("Apple M5 Max"));
    assert!(matches!(snap.details.battery, Battery::Reading(_)));
}

#[test]
fn without_macmon_the_reason_is_shown() {
    let mut r = m5_max(Instant::now());
    r.macmon = Err("macmon not installed (brew install macmon)".into());
    let snap = assemble(r, &mut GpuPower::default());
    if cfg!(target_os = "macos") {
        assert!(
            matches!(&snap.power, Power::Unavailable(why) if why.contains("macmon not installed"))
        );
    } else {
        assert!(snap.power.watts().is_none());
    }
    assert!(snap.details.parts.is_empty());
}

#[test]
fn without_macmon_on_battery_the_discharge_is_the_power() {
    // The recorded ioreg reading of a Mac draining 483 mA at 12.1 V despite a charger.
    let mut r = m5_max(Instant::now());
    r.macmon = Err("macmon not installed (brew install macmon)".into());
    r.battery =
        tokentop::telemetry::battery::parse_ioreg(&data("apple/ioreg-draining-on-charger.txt"));
    let snap = assemble(r, &mut GpuPower::default());
    let w = snap.power.watts().unwrap();
    assert!((w - 0.483 * 12.1).abs() < 1e-9, "{:?}", snap.power);
    assert!(matches!(&snap.power, Power::Watts { source, .. } if source == "battery discharge"));
}
