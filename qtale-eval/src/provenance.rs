//! What produced a result: code revision, library versions, device, dtype, threads, host, Slurm ids.
//!
//! Results carry a [`Provenance`]; its [`Numerics`] part holds the fields that change numbers. A stored
//! stage or cell is reused only when its `Numerics` equal the current ones (stage keys include them;
//! cells compare them on reuse), so a result computed by other code, another libtorch, another device or
//! another thread count (libtorch's reductions depend on it) is never passed off as this run's.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Version of the numerics: bump it in the same commit as any change that alters computed numbers
/// (kernels, tokenization, scoring, training, quantization, calibration), so that stored stages and
/// cells computed before it are recomputed instead of reused.
pub const NUMERICS_VERSION: u32 = 1;

/// The fields of a run that change its numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numerics {
    pub numerics_version: u32,
    /// tch crate version (Cargo.lock).
    pub tch: String,
    /// libtorch actually loaded by this process (`version.py` / `build-version` next to its library).
    pub libtorch: Option<String>,
    pub device: String,
    pub dtype: String,
    /// libtorch intra-op threads.
    pub threads: i32,
}

impl Numerics {
    /// This process, computing on `device` in `dtype`.
    pub fn current(device: Device, dtype: Kind) -> Self {
        Numerics {
            numerics_version: NUMERICS_VERSION,
            tch: env!("QTALE_TCH_VERSION").to_string(),
            libtorch: libtorch_version(),
            device: format!("{device:?}").to_lowercase(),
            dtype: format!("{dtype:?}").to_lowercase(),
            threads: tch::get_num_threads(),
        }
    }

    /// `field: stored vs now` for each field where `stored` differs from `self`.
    pub fn differences(&self, stored: &Numerics) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(stored).expect("serializable"),
            serde_json::to_value(self).expect("serializable"),
        );
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {v} (stored) vs {} (now)", b[k]))
            .collect()
    }
}

/// Slurm job identity, when running under Slurm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slurm {
    pub job_id: Option<String>,
    pub array_job_id: Option<String>,
    pub array_task_id: Option<String>,
}

/// Everything a result records about what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Revision of the compiled sources (build time) and whether they had uncommitted changes.
    pub git_revision: Option<String>,
    pub git_dirty: Option<bool>,
    pub crate_version: String,
    pub rustc: String,
    pub numerics: Numerics,
    pub host: Option<String>,
    pub slurm: Option<Slurm>,
    pub date_utc: String,
}

impl Provenance {
    pub fn current(device: Device, dtype: Kind) -> Self {
        Provenance {
            git_revision: Some(env!("QTALE_GIT_REV"))
                .filter(|s| !s.is_empty())
                .map(String::from),
            git_dirty: match env!("QTALE_GIT_DIRTY") {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            rustc: env!("QTALE_RUSTC_VERSION").to_string(),
            numerics: Numerics::current(device, dtype),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .or_else(|| std::env::var("HOSTNAME").ok()),
            slurm: std::env::var("SLURM_JOB_ID").ok().map(|job| Slurm {
                job_id: Some(job),
                array_job_id: std::env::var("SLURM_ARRAY_JOB_ID").ok(),
                array_task_id: std::env::var("SLURM_ARRAY_TASK_ID").ok(),
            }),
            date_utc: crate::report::utc_now(),
        }
    }

    /// A short revision label: `abc1234` or `abc1234+dirty`.
    pub fn revision_label(&self) -> String {
        let r = self
            .git_revision
            .as_deref()
            .map_or("unknown", |r| &r[..r.len().min(12)]);
        match self.git_dirty {
            Some(true) => format!("{r}+dirty"),
            _ => r.to_string(),
        }
    }
}

/// The version of the libtorch this process loaded: found from the path of `libtorch_cpu` in
/// `/proc/self/maps`, read from PyTorch's `version.py` (wheel layout `torch/lib/..`) or libtorch's
/// `build-version` (zip layout). `None` when neither is there.
pub fn libtorch_version() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("libtorch_cpu."))?;
    let dir = std::path::Path::new(lib).parent()?.parent()?;
    if let Ok(s) = std::fs::read_to_string(dir.join("version.py")) {
        let v = s.lines().find_map(|l| {
            l.strip_prefix("__version__").map(|r| {
                r.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches(['\'', '"'])
            })
        });
        if let Some(v) = v {
            return Some(v.to_string());
        }
    }
    std::fs::read_to_string(dir.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_names_the_fields_that_differ() {
        let now = Numerics::current(Device::Cpu, Kind::Float);
        assert_eq!(now.numerics_version, NUMERICS_VERSION);
        assert_eq!(now.device, "cpu");
        assert_eq!(now.dtype, "float");
        assert!(now.differences(&now).is_empty());
        let mut old = now.clone();
        old.threads = now.threads + 3;
        old.numerics_version = 0;
        let d = now.differences(&old);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|s| s.starts_with("threads: ")), "{d:?}");
        assert!(
            d.iter().any(|s| s.starts_with("numerics_version: 0")),
            "{d:?}"
        );
    }

    #[test]
    fn provenance_records_build_and_runtime_facts() {
        let p = Provenance::current(Device::Cpu, Kind::Float);
        // Built from a git checkout: a 40-hex revision (the test runs from one).
        if let Some(r) = &p.git_revision {
            assert_eq!(r.len(), 40, "{r}");
            assert!(r.chars().all(|c| c.is_ascii_hexdigit()), "{r}");
        }
        assert!(p.rustc.starts_with("rustc "), "{}", p.rustc);
        assert!(!p.numerics.tch.is_empty());
        // The loaded libtorch is found (this project links libtorch from the torch wheel).
        let v = p.numerics.libtorch.clone().expect("libtorch version");
        assert!(v.starts_with("2."), "{v}");
        let json = serde_json::to_string(&p).unwrap();
        let back: Provenance = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }
}
