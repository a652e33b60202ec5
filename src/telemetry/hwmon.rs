//! hwmon power sensors (Linux): a file holding microwatts, e.g. amdgpu's power1_average.

use super::power::read_u64;
use std::path::{Path, PathBuf};

/// The first hwmon power sensor under `sysfs`: its file and a label for the pane.
pub fn find(sysfs: &Path) -> Option<(PathBuf, String)> {
    let mut candidates = Vec::new();
    for e in std::fs::read_dir(sysfs.join("class/hwmon")).ok()?.flatten() {
        for f in ["power1_input", "power1_average"] {
            let p = e.path().join(f);
            if read_u64(&p).is_some() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                candidates.push((p, format!("hwmon {}", name.trim())));
                break;
            }
        }
    }
    candidates.sort();
    candidates.into_iter().next()
}
