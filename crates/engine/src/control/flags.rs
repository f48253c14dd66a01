//! Phase 5 feature flags (`config/feature-flags.yaml`): a global switch, per
//! feature blocks with their own rollout percentage and hash seed, and an
//! emergency kill switch, decided per request by a hash any service can
//! reproduce:
//!
//! 1. `digest = MD5(utf8(request_id + hash_seed))`;
//! 2. `n` = the first 8 hex digits of the digest (its first 4 bytes,
//!    big-endian) as an unsigned 32-bit number;
//! 3. `bucket = n % 10000`;
//! 4. on when `bucket < round(rollout_percentage * 100)`: 0 is never, 100 is
//!    always, 0.5 is 50 buckets in 10,000.
//!
//! A feature is on for a request when the kill switch is off, `phase5` is
//! enabled and the request falls in `phase5`'s rollout, and the feature is
//! enabled and the request falls in its own rollout. Sub-features
//! (`ttft_pipeline.kv_prefetch`) also need their own switch on.
//!
//! Environment variables override the file: `PHASE5_ENABLED`,
//! `PHASE5_TTFT_ENABLED`, `PHASE5_QOS_ENABLED` (true/false/1/0) and
//! `PHASE5_ROLLOUT_PERCENT` (0-100, for `phase5`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use md5::{Digest, Md5};
use serde::Deserialize;

use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureFlags {
    pub phase5: Rollout,
    #[serde(default)]
    pub emergency: Emergency,
    #[serde(default)]
    pub features: BTreeMap<String, Feature>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub enabled: bool,
    pub rollout_percentage: f64,
    pub hash_seed: String,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emergency {
    /// Forces every feature off (baseline behaviour) for every request.
    #[serde(default)]
    pub kill_switch: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Feature {
    pub enabled: bool,
    pub rollout_percentage: f64,
    pub hash_seed: String,
    /// Sub-features (`warmup: true`) and settings (`dry_run: true`): every
    /// other key, each a boolean.
    #[serde(flatten)]
    pub options: BTreeMap<String, bool>,
}

/// Why a feature is on or off for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    KillSwitch,
    Phase5Disabled,
    Phase5RolloutExcluded,
    UnknownFeature,
    FeatureDisabled,
    RolloutExcluded,
    SubFeatureDisabled,
    Enabled,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KillSwitch => "kill_switch",
            Reason::Phase5Disabled => "phase5_disabled",
            Reason::Phase5RolloutExcluded => "phase5_rollout_excluded",
            Reason::UnknownFeature => "unknown_feature",
            Reason::FeatureDisabled => "feature_disabled",
            Reason::RolloutExcluded => "rollout_excluded",
            Reason::SubFeatureDisabled => "sub_feature_disabled",
            Reason::Enabled => "enabled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub enabled: bool,
    pub reason: Reason,
    /// The request's bucket (0-9999) for the deciding rollout, when one decided.
    pub bucket: Option<u32>,
}

/// The documented bucket of a request id under a seed.
pub fn bucket(request_id: &str, hash_seed: &str) -> u32 {
    let mut h = Md5::new();
    h.update(request_id.as_bytes());
    h.update(hash_seed.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 10_000
}

/// Whether a request falls inside a rollout, and its bucket.
pub fn includes(rollout_percentage: f64, hash_seed: &str, request_id: &str) -> (bool, u32) {
    let b = bucket(request_id, hash_seed);
    (b < (rollout_percentage * 100.0).round() as u32, b)
}

fn check_percentage(path: &str, p: f64) -> Result<(), String> {
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{path}.rollout_percentage: must be between 0 and 100, got {p}"));
    }
    Ok(())
}

impl FeatureFlags {
    /// Parses, applies the environment overrides in `env`, and validates.
    pub fn from_yaml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut f: FeatureFlags = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde_yaml's own messages may already start with the path.
            if path == "." || inner.starts_with(&format!("{path}: ")) { inner } else { format!("{path}: {inner}") }
        })?;
        f.apply_env(env)?;
        f.validate()?;
        Ok(f)
    }

    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let text = crate::formats::filebuf::read_text(path, crate::formats::filebuf::MAX_CONFIG_TEXT)
            .map_err(|e| EngineError::InvalidParams(format!("cannot read feature flags {}: {e}", path.display())))?;
        Self::from_yaml(&text, &|k| std::env::var(k).ok())
            .map_err(|e| EngineError::InvalidParams(format!("feature flags {}: {e}", path.display())))
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        let flag = |name: &str| -> Result<Option<bool>, String> {
            match env(name).as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some("1" | "true" | "TRUE" | "True") => Ok(Some(true)),
                Some("0" | "false" | "FALSE" | "False") => Ok(Some(false)),
                Some(v) => Err(format!("{name}: expected true/false/1/0, got '{v}'")),
            }
        };
        if let Some(on) = flag("PHASE5_ENABLED")? {
            self.phase5.enabled = on;
        }
        for (var, feature) in [("PHASE5_TTFT_ENABLED", "ttft_pipeline"), ("PHASE5_QOS_ENABLED", "qos_policy")] {
            if let Some(on) = flag(var)? {
                let f = self.features.get_mut(feature).ok_or_else(|| format!("{var}: the file has no '{feature}' feature"))?;
                f.enabled = on;
            }
        }
        if let Some(v) = env("PHASE5_ROLLOUT_PERCENT").filter(|v| !v.trim().is_empty()) {
            self.phase5.rollout_percentage =
                v.trim().parse().map_err(|_| format!("PHASE5_ROLLOUT_PERCENT: expected a number from 0 to 100, got '{v}'"))?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        check_percentage("phase5", self.phase5.rollout_percentage)?;
        for (name, f) in &self.features {
            check_percentage(&format!("features.{name}"), f.rollout_percentage)?;
        }
        Ok(())
    }

    /// Whether `name` (`phase5`, `feature` or `feature.sub_feature`) is on for this request, and why.
    pub fn evaluate(&self, name: &str, request_id: &str) -> Decision {
        let off = |reason, bucket| Decision { enabled: false, reason, bucket };
        if self.emergency.kill_switch {
            return off(Reason::KillSwitch, None);
        }
        if !self.phase5.enabled {
            return off(Reason::Phase5Disabled, None);
        }
        let (inside, b) = includes(self.phase5.rollout_percentage, &self.phase5.hash_seed, request_id);
        if !inside {
            return off(Reason::Phase5RolloutExcluded, Some(b));
        }
        // `phase5` itself is the global rollout: the guide's canonical check.
        if name == "phase5" {
            return Decision { enabled: true, reason: Reason::Enabled, bucket: Some(b) };
        }
        let (feature, sub) = match name.split_once('.') {
            Some((f, s)) => (f, Some(s)),
            None => (name, None),
        };
        let Some(f) = self.features.get(feature) else { return off(Reason::UnknownFeature, None) };
        if !f.enabled {
            return off(Reason::FeatureDisabled, None);
        }
        let (inside, b) = includes(f.rollout_percentage, &f.hash_seed, request_id);
        if !inside {
            return off(Reason::RolloutExcluded, Some(b));
        }
        if let Some(sub) = sub {
            match f.options.get(sub) {
                Some(true) => {}
                Some(false) => return off(Reason::SubFeatureDisabled, Some(b)),
                None => return off(Reason::UnknownFeature, None),
            }
        }
        Decision { enabled: true, reason: Reason::Enabled, bucket: Some(b) }
    }

    /// A feature's setting (`qos_policy.dry_run`), whatever the rollout says.
    pub fn option(&self, feature: &str, key: &str) -> Option<bool> {
        self.features.get(feature)?.options.get(key).copied()
    }
}

/// The flags in force, reloadable while requests run: a reload that fails
/// to read or validate keeps the flags in force and reports why.
pub struct FlagStore {
    path: PathBuf,
    current: RwLock<Arc<FeatureFlags>>,
    /// The file as last read (or last found bad), for `refresh`.
    seen: Mutex<Option<Stamp>>,
}

/// What tells an edited file from the one read: editors replace files by
/// rename (a new inode) or rewrite them (a new mtime or length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { inode: m.ino(), len: m.len(), modified: m.modified().ok() })
}

impl FlagStore {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, EngineError> {
        let path = path.into();
        let seen = stamp(&path);
        let flags = FeatureFlags::from_file(&path)?;
        Ok(FlagStore { path, current: RwLock::new(Arc::new(flags)), seen: Mutex::new(seen) })
    }

    pub fn current(&self) -> Arc<FeatureFlags> {
        self.current.read().unwrap().clone()
    }

    pub fn reload(&self) -> Result<(), EngineError> {
        let seen = stamp(&self.path);
        *self.seen.lock().unwrap() = seen;
        let flags = FeatureFlags::from_file(&self.path)?;
        *self.current.write().unwrap() = Arc::new(flags);
        Ok(())
    }

    /// Reloads when the file changed since it was last read (one `stat`
    /// otherwise). A bad edit is reported once, and the flags in force stay
    /// until the file changes again.
    pub fn refresh(&self) -> Result<(), EngineError> {
        let now = stamp(&self.path);
        if now == *self.seen.lock().unwrap() {
            return Ok(());
        }
        self.reload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = include_str!("../../../../config/feature-flags.yaml");

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn buckets_follow_the_documented_md5_rule() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e: 0xd41d8cd9 = 3558706393, % 10000 = 6393.
        assert_eq!(bucket("", ""), 6393);
        // MD5("abc") = 900150983cd24fb0d6963f7d28e17f72: 0x90015098 = 2416005272 -> 5272; split
        // across id and seed gives the same string, so the same bucket.
        assert_eq!(bucket("abc", ""), 5272);
        assert_eq!(bucket("a", "bc"), 5272);
        // MD5("message digest") = f96b697d7cb7938d525a2f31aaf161d0: 0xf96b697d = 4184566141 -> 6141.
        assert_eq!(bucket("message ", "digest"), 6141);
    }

    fn flags(yaml: &str) -> FeatureFlags {
        FeatureFlags::from_yaml(yaml, &no_env).unwrap()
    }

    const SMALL: &str = "phase5: {enabled: true, rollout_percentage: 100, hash_seed: p}\n\
        features:\n  ttft_pipeline: {enabled: true, rollout_percentage: 50, hash_seed: t, warmup: true, speculative: false}\n";

    #[test]
    fn rollout_percentages_split_requests_as_the_buckets_say() {
        let f = flags(SMALL);
        let mut on = 0;
        for i in 0..2000 {
            let id = format!("req-{i}");
            let d = f.evaluate("ttft_pipeline", &id);
            assert_eq!(d.enabled, bucket(&id, "t") < 5000, "{id}");
            assert_eq!(d, f.evaluate("ttft_pipeline", &id), "sticky");
            on += d.enabled as usize;
        }
        assert!((900..1100).contains(&on), "{on}");
        // Sub-features need their own switch.
        let id = (0..).map(|i| format!("r{i}")).find(|id| f.evaluate("ttft_pipeline", id).enabled).unwrap();
        assert!(f.evaluate("ttft_pipeline.warmup", &id).enabled);
        assert_eq!(f.evaluate("ttft_pipeline.speculative", &id).reason, Reason::SubFeatureDisabled);
        assert_eq!(f.evaluate("ttft_pipeline.nope", &id).reason, Reason::UnknownFeature);
        assert_eq!(f.evaluate("nope", &id).reason, Reason::UnknownFeature);
    }

    #[test]
    fn zero_is_never_hundred_is_always_and_half_a_percent_is_possible() {
        let at = |p: f64| flags(&SMALL.replace("rollout_percentage: 50", &format!("rollout_percentage: {p}")));
        let (never, always, half) = (at(0.0), at(100.0), at(0.5));
        let ids: Vec<String> = (0..4000).map(|i| format!("id{i}")).collect();
        assert!(ids.iter().all(|id| !never.evaluate("ttft_pipeline", id).enabled));
        assert!(ids.iter().all(|id| always.evaluate("ttft_pipeline", id).enabled));
        let n = ids.iter().filter(|id| half.evaluate("ttft_pipeline", id).enabled).count();
        assert_eq!(n, ids.iter().filter(|id| bucket(id, "t") < 50).count());
        assert!(n > 0 && n < 60, "{n}");
    }

    #[test]
    fn kill_switch_and_global_switch_force_baseline() {
        let f = flags(&format!("{SMALL}emergency: {{kill_switch: true}}\n"));
        assert_eq!(f.evaluate("ttft_pipeline", "x").reason, Reason::KillSwitch);
        let f = flags(&SMALL.replace("enabled: true, rollout_percentage: 100", "enabled: false, rollout_percentage: 100"));
        assert_eq!(f.evaluate("ttft_pipeline", "x").reason, Reason::Phase5Disabled);
    }

    #[test]
    fn environment_overrides_win_and_bad_values_are_refused() {
        let env = |k: &str| match k {
            "PHASE5_ENABLED" => Some("false".to_string()),
            "PHASE5_ROLLOUT_PERCENT" => Some("12.5".to_string()),
            "PHASE5_TTFT_ENABLED" => Some("0".to_string()),
            _ => None,
        };
        let f = FeatureFlags::from_yaml(SMALL, &env).unwrap();
        assert!(!f.phase5.enabled);
        assert_eq!(f.phase5.rollout_percentage, 12.5);
        assert!(!f.features["ttft_pipeline"].enabled);
        let bad = |k: &str| (k == "PHASE5_ROLLOUT_PERCENT").then(|| "lots".to_string());
        assert!(FeatureFlags::from_yaml(SMALL, &bad).unwrap_err().contains("PHASE5_ROLLOUT_PERCENT"));
        let bad = |k: &str| (k == "PHASE5_ROLLOUT_PERCENT").then(|| "150".to_string());
        assert!(FeatureFlags::from_yaml(SMALL, &bad).unwrap_err().contains("phase5.rollout_percentage"));
        let bad = |k: &str| (k == "PHASE5_ENABLED").then(|| "yes please".to_string());
        assert!(FeatureFlags::from_yaml(SMALL, &bad).unwrap_err().contains("PHASE5_ENABLED"));
    }

    #[test]
    fn the_committed_file_parses_and_errors_name_the_key() {
        let f = FeatureFlags::from_yaml(FILE, &no_env).unwrap();
        assert!(f.features.contains_key("ttft_pipeline") && f.features.contains_key("qos_policy"));
        let err = FeatureFlags::from_yaml("phase5: {enabled: true, rollout_percentage: 5}\n", &no_env).unwrap_err();
        assert!(err.contains("hash_seed"), "{err}");
        let err = FeatureFlags::from_yaml(&SMALL.replace("warmup: true", "warmup: maybe"), &no_env).unwrap_err();
        assert!(err.contains("features"), "{err}");
    }

    #[test]
    fn a_failed_reload_keeps_the_flags_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags.yaml");
        std::fs::write(&path, SMALL).unwrap();
        let store = FlagStore::open(&path).unwrap();
        std::fs::write(&path, "phase5: [garbage").unwrap();
        let err = store.reload().unwrap_err();
        assert_eq!(err.code(), "InvalidParams");
        assert_eq!(*store.current(), flags(SMALL));
        std::fs::write(&path, SMALL.replace("rollout_percentage: 50", "rollout_percentage: 0")).unwrap();
        store.reload().unwrap();
        assert!(!store.current().evaluate("ttft_pipeline", "x").enabled);
    }

    #[test]
    fn phase5_is_the_global_rollout() {
        let f = flags(&SMALL.replace("rollout_percentage: 100, hash_seed: p", "rollout_percentage: 40, hash_seed: p"));
        for i in 0..500 {
            let id = format!("u{i}");
            let d = f.evaluate("phase5", &id);
            assert_eq!(d.enabled, bucket(&id, "p") < 4000, "{id}");
            assert_eq!(d.bucket, Some(bucket(&id, "p")));
            assert_eq!(d.reason, if d.enabled { Reason::Enabled } else { Reason::Phase5RolloutExcluded });
        }
        let killed = flags(&format!("{SMALL}emergency: {{kill_switch: true}}\n"));
        assert_eq!(killed.evaluate("phase5", "u1").reason, Reason::KillSwitch);
        let inside = (0..).map(|i| format!("u{i}")).find(|id| f.evaluate("phase5", id).enabled).unwrap();
        assert_eq!(f.evaluate("phase5.anything", &inside).reason, Reason::UnknownFeature);
    }

    #[test]
    fn refresh_reloads_only_an_edited_file_and_reports_a_bad_edit_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags.yaml");
        std::fs::write(&path, SMALL).unwrap();
        let store = FlagStore::open(&path).unwrap();
        store.refresh().unwrap();
        let first = store.current();
        store.refresh().unwrap();
        assert!(Arc::ptr_eq(&first, &store.current()), "an unchanged file is not read again");
        // A replacement by rename, as editors save: a new inode.
        let tmp = dir.path().join("flags.yaml.new");
        std::fs::write(&tmp, SMALL.replace("rollout_percentage: 50", "rollout_percentage: 0")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        store.refresh().unwrap();
        assert!(!store.current().evaluate("ttft_pipeline", "x").enabled);
        std::fs::write(&path, "phase5: [garbage").unwrap();
        assert_eq!(store.refresh().unwrap_err().code(), "InvalidParams");
        store.refresh().unwrap();
        assert!(!store.current().evaluate("ttft_pipeline", "x").enabled, "the flags in force stay");
    }
}
