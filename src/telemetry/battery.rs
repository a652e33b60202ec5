//! The battery: on Linux from /sys/class/power_supply, on macOS from `ioreg -rn
//! AppleSmartBattery`. Read by hand rather than through `starship-battery` because that crate
//! reads only the live /sys and IOKit (it cannot be pointed at a recorded tree, so its logic
//! could not be tested here), folds "Unknown" and "Not charging" into states we need apart,
//! and its macOS side could not even be compiled on this Linux-only project's CI. Each
//! sysfs attribute is one integer; the ioreg text is `"Key" = value` lines.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Discharging,
    Charging,
    Full,
    /// On AC but held (charge threshold, or an adapter that only keeps it level).
    NotCharging,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatteryReading {
    pub state: Charge,
    /// Watts out of (discharging) or into (charging) the batteries, when reported.
    pub watts: Option<f64>,
    pub percent: Option<f64>,
    /// Energy left, watt-hours.
    pub energy_wh: Option<f64>,
    /// Energy when full, watt-hours.
    pub full_wh: Option<f64>,
    pub batteries: usize,
}

impl BatteryReading {
    /// Hours left at `watts` of discharge.
    pub fn hours_left(&self, watts: f64) -> Option<f64> {
        (self.state == Charge::Discharging && watts > 0.0).then_some(self.energy_wh? / watts)
    }

    /// Joules in one percent of the battery.
    pub fn joules_per_percent(&self) -> Option<f64> {
        self.full_wh
            .filter(|w| *w > 0.0)
            .map(|w| w * 3600.0 / 100.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Battery {
    Reading(BatteryReading),
    /// No battery (a desktop, a DGX Spark), or none readable: why.
    Unavailable(String),
}

impl Default for Battery {
    fn default() -> Self {
        Battery::Unavailable("no battery reading yet".into())
    }
}

impl Battery {
    /// Watts drawn from the battery, when the machine runs on it.
    pub fn discharge_watts(&self) -> Option<f64> {
        match self {
            Battery::Reading(r) if r.state == Charge::Discharging => r.watts,
            _ => None,
        }
    }
}

/// One power_supply entry: its attribute files, else its uevent's POWER_SUPPLY_* lines.
struct Supply<'a> {
    dir: &'a Path,
    uevent: String,
}

impl Supply<'_> {
    fn text(&self, name: &str) -> Option<String> {
        if let Ok(t) = std::fs::read_to_string(self.dir.join(name)) {
            return Some(t.trim().to_string());
        }
        let key = format!("POWER_SUPPLY_{}=", name.to_ascii_uppercase());
        self.uevent
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().to_string())
    }

    fn num(&self, name: &str) -> Option<f64> {
        self.text(name)?.parse().ok()
    }
}

/// Per battery: (status, watts, energy µWh now, µWh full, capacity %).
type Cell = (String, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn read_cell(s: &Supply) -> Cell {
    let status = s.text("status").unwrap_or_else(|| "Unknown".into());
    // power_now in µW; some drivers give only current_now (µA) and voltage_now (µV).
    let watts = match s.num("power_now") {
        Some(p) if p > 0.0 => Some(p / 1e6),
        p => match (s.num("current_now"), s.num("voltage_now")) {
            (Some(i), Some(v)) if i != 0.0 => Some(i.abs() * v / 1e12),
            _ => p.map(|p| p / 1e6),
        },
    };
    // Energy in µWh, or charge in µAh times the design voltage (µV).
    let volts = s
        .num("voltage_min_design")
        .or_else(|| s.num("voltage_now"))
        .map(|v| v / 1e6);
    let energy = |e: &str, c: &str| {
        s.num(e)
            .or_else(|| Some(s.num(c)? * volts?))
            .map(|uwh| uwh / 1e6)
    };
    (
        status,
        watts,
        energy("energy_now", "charge_now"),
        energy("energy_full", "charge_full"),
        s.num("capacity"),
    )
}

/// Reads every system battery under `sysfs` (normally `/sys`); peripheral batteries (a
/// mouse's, scope "Device") are left out.
pub fn read_sysfs(sysfs: &Path) -> Battery {
    let root = sysfs.join("class/power_supply");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Battery::Unavailable("no power_supply class in sysfs".into());
    };
    let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    let mut cells = Vec::new();
    for dir in &dirs {
        let s = Supply {
            dir,
            uevent: std::fs::read_to_string(dir.join("uevent")).unwrap_or_default(),
        };
        let name = dir
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into());
        let is_battery = match s.text("type") {
            Some(t) => t == "Battery",
            None => name.starts_with("BAT"),
        };
        if is_battery && s.text("scope").as_deref() != Some("Device") {
            cells.push(read_cell(&s));
        }
    }
    combine(&cells)
}

fn sum(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    xs.collect::<Option<Vec<f64>>>().map(|v| v.iter().sum())
}

/// Several batteries as one: the pack discharges when any cell does, and an "Unknown" cell
/// (the idle one of a ThinkPad's two) only adds its energy.
fn combine(cells: &[Cell]) -> Battery {
    if cells.is_empty() {
        return Battery::Unavailable("no battery".into());
    }
    let any = |s: &str| cells.iter().any(|c| c.0 == s);
    let state = if any("Discharging") {
        Charge::Discharging
    } else if any("Charging") {
        Charge::Charging
    } else if cells
        .iter()
        .all(|c| c.0 == "Full" || c.4.is_some_and(|p| p >= 99.0))
    {
        Charge::Full
    } else {
        Charge::NotCharging
    };
    let active = |c: &&Cell| match state {
        Charge::Discharging => c.0 == "Discharging",
        Charge::Charging => c.0 == "Charging",
        _ => false,
    };
    let watts = match state {
        Charge::Discharging | Charge::Charging => sum(cells.iter().filter(active).map(|c| c.1)),
        _ => Some(0.0),
    };
    let energy_wh = sum(cells.iter().map(|c| c.2));
    let full_wh = sum(cells.iter().map(|c| c.3));
    // The kernel's own capacity for one battery (it knows the reserve); for several, their
    // energy together.
    let percent = match (cells, energy_wh, full_wh) {
        ([(.., Some(p))], ..) => Some(*p),
        (_, Some(e), Some(f)) if f > 0.0 => Some((100.0 * e / f).min(100.0)),
        _ => sum(cells.iter().map(|c| c.4)).map(|p| p / cells.len() as f64),
    };
    Battery::Reading(BatteryReading {
        state,
        watts,
        percent,
        energy_wh,
        full_wh,
        batteries: cells.len(),
    })
}

/// `ioreg -rn AppleSmartBattery` text. Amperage is printed as an unsigned 64-bit number, so
/// a discharge of 483 mA reads 18446744073709551133.
pub fn parse_ioreg(text: &str) -> Battery {
    let field = |key: &str| {
        let pat = format!("\"{key}\" = ");
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&pat).map(|v| v.trim().to_string()))
    };
    let int = |key: &str| -> Option<i64> {
        let v = field(key)?;
        v.parse::<i64>()
            .ok()
            .or_else(|| v.parse::<u64>().ok().map(|u| u as i64))
    };
    let yes = |key: &str| field(key).as_deref() == Some("Yes");
    if field("AppleRawCurrentCapacity").is_none() && field("CurrentCapacity").is_none() {
        return Battery::Unavailable("no battery".into());
    }
    let mv = int("Voltage").or_else(|| int("AppleRawBatteryVoltage"));
    let ma = int("InstantAmperage")
        .filter(|a| *a != 0)
        .or_else(|| int("Amperage"));
    let state = match ma {
        Some(a) if a < 0 => Charge::Discharging,
        _ if !yes("ExternalConnected") => Charge::Discharging,
        _ if yes("FullyCharged") => Charge::Full,
        _ if yes("IsCharging") => Charge::Charging,
        _ => Charge::NotCharging,
    };
    let watts = match (ma, mv) {
        (Some(a), Some(v)) => Some((a.abs() * v) as f64 / 1e6),
        _ => None,
    };
    let wh = |key: &str| Some((int(key)? * mv?) as f64 / 1e6);
    let percent = match (int("CurrentCapacity"), int("MaxCapacity")) {
        (Some(c), Some(m)) if m > 0 => Some(100.0 * c as f64 / m as f64),
        (Some(c), None) if c <= 100 => Some(c as f64),
        _ => None,
    };
    Battery::Reading(BatteryReading {
        state,
        watts,
        percent,
        energy_wh: wh("AppleRawCurrentCapacity"),
        full_wh: wh("AppleRawMaxCapacity"),
        batteries: 1,
    })
}

/// The battery of this machine now.
pub fn read(sysfs: &Path) -> Battery {
    if cfg!(target_os = "macos") {
        match std::process::Command::new("ioreg")
            .args(["-rn", "AppleSmartBattery"])
            .output()
        {
            Ok(o) if o.status.success() => parse_ioreg(&String::from_utf8_lossy(&o.stdout)),
            _ => Battery::Unavailable("ioreg gave no battery reading".into()),
        }
    } else {
        read_sysfs(sysfs)
    }
}

/// Battery energy spent since tokentop started, and the part spent while generating.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatteryUse {
    pub joules: f64,
    pub generating_joules: f64,
}

impl BatteryUse {
    /// Adds `dt` seconds at the battery's current discharge.
    pub fn record(&mut self, battery: &Battery, dt: f64, generating: bool) {
        if let Some(w) = battery.discharge_watts() {
            self.joules += w * dt;
            if generating {
                self.generating_joules += w * dt;
            }
        }
    }

    /// Share of the battery energy spent while generating.
    pub fn generating_share(&self) -> Option<f64> {
        (self.joules > 0.0).then(|| self.generating_joules / self.joules)
    }
}
