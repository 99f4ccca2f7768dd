//! Checking a rollout request and turning it into a plan, without I/O: the
//! defaults filled in, every stage's cumulative device count, the
//! maintenance window test. Everything an operator can get wrong is refused
//! here, before anything is written.
use crate::error::{OtaError, Result};
use sha2::{Digest, Sha256};
use trellis_proto::v1::{CreateRolloutRequest, MaintenanceWindow, Stage};

pub const DEFAULT_MAX_CONCURRENT: u32 = 10;
pub const DEFAULT_APPROVAL_TIMEOUT_MS: u32 = 5_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_APPLY_TIMEOUT_SECS: u32 = 900;

fn invalid(msg: impl Into<String>) -> OtaError {
    OtaError::InvalidArgument(msg.into())
}

fn check_ratio(what: &str, v: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        return Err(invalid(format!(
            "{what} is {v}; it is a ratio between 0 and 1 (0.9 = 90 %)"
        )));
    }
    Ok(())
}

/// Checks everything that does not need the target's size, and fills in
/// the defaults. Returns the request as it will be stored.
pub fn normalize(mut req: CreateRolloutRequest) -> Result<CreateRolloutRequest> {
    req.release_id = req.release_id.trim().to_string();
    if req.release_id.is_empty() {
        return Err(invalid(
            "release_id is empty: name the release to roll out (trellis release show)",
        ));
    }
    let target = req.target.get_or_insert_with(Default::default);
    if target.percent > 100 {
        return Err(invalid(format!(
            "target.percent is {}; give 1..100 (0 or 100: the whole selection)",
            target.percent
        )));
    }
    let mut ids = Vec::with_capacity(target.device_ids.len());
    for id in &target.device_ids {
        let id = normalize_device_id(id)?;
        if ids.contains(&id) {
            return Err(invalid(format!("target.device_ids names {id} twice")));
        }
        ids.push(id);
    }
    target.device_ids = ids;
    target.tag = target.tag.trim().to_lowercase();
    if !target.tag.is_empty() {
        if !target.device_ids.is_empty() {
            return Err(invalid(
                "target names both device_ids and a tag; give one (a tag selects among the product's devices)",
            ));
        }
        if target.tag.len() > 64
            || !target
                .tag
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        {
            return Err(invalid(format!(
                "target.tag {:?} is not a tag: 1 to 64 characters of a-z, 0-9, '.', '_' and '-'",
                target.tag
            )));
        }
    }
    check_ratio("max_failure_ratio", req.max_failure_ratio)?;
    check_stages(&req.stages)?;
    if let Some(w) = &req.window {
        check_window(w)?;
    }
    req.approval_url = req.approval_url.trim().to_string();
    if !req.approval_url.is_empty() {
        let ok = req
            .approval_url
            .strip_prefix("http://")
            .or_else(|| req.approval_url.strip_prefix("https://"))
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok {
            return Err(invalid(format!(
                "approval_url {:?} is not an http:// or https:// URL",
                req.approval_url
            )));
        }
    }
    if req.max_concurrent == 0 {
        req.max_concurrent = DEFAULT_MAX_CONCURRENT;
    }
    if req.approval_timeout_ms == 0 {
        req.approval_timeout_ms = DEFAULT_APPROVAL_TIMEOUT_MS;
    }
    if req.max_attempts == 0 {
        req.max_attempts = DEFAULT_MAX_ATTEMPTS;
    }
    if req.apply_timeout_secs == 0 {
        req.apply_timeout_secs = DEFAULT_APPLY_TIMEOUT_SECS;
    }
    for (i, s) in req.stages.iter_mut().enumerate() {
        if s.name.trim().is_empty() {
            s.name = if s.percent > 0 {
                format!("{}%", s.percent)
            } else {
                format!("stage {}", i + 1)
            };
        }
    }
    Ok(req)
}

/// Device ids are 24 hex characters, stored lowercase.
pub fn normalize_device_id(id: &str) -> Result<String> {
    let id = id.trim();
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!(
            "device id {id:?} is not 24 hex characters"
        )));
    }
    Ok(id.to_ascii_lowercase())
}

fn check_stages(stages: &[Stage]) -> Result<()> {
    if stages.is_empty() {
        return Err(invalid(
            "stages is empty: give at least one stage, e.g. canary of 2 devices then 100 %",
        ));
    }
    let mut last_percent = 0;
    for (i, s) in stages.iter().enumerate() {
        let name = stage_label(i, s);
        match (s.device_count, s.percent) {
            (0, 0) => {
                return Err(invalid(format!(
                    "{name} has neither device_count nor percent; give one"
                )));
            }
            (c, p) if c > 0 && p > 0 => {
                return Err(invalid(format!(
                    "{name} has both device_count ({c}) and percent ({p}); give one"
                )));
            }
            (_, p) if p > 100 => {
                return Err(invalid(format!(
                    "{name} has percent {p}; percents are cumulative shares of the target, at most 100"
                )));
            }
            (_, p) if p > 0 => {
                if p <= last_percent {
                    return Err(invalid(format!(
                        "{name} has percent {p} after an earlier stage's {last_percent}; \
                         percents are cumulative and must increase"
                    )));
                }
                last_percent = p;
            }
            _ => {}
        }
        check_ratio(&format!("{name} min_success_ratio"), s.min_success_ratio)?;
    }
    Ok(())
}

fn stage_label(i: usize, s: &Stage) -> String {
    if s.name.is_empty() {
        format!("stage {}", i + 1)
    } else {
        format!("stage {} ({:?})", i + 1, s.name)
    }
}

/// Each stage's cumulative end (devices in this and earlier stages) for a
/// target of `n` devices. Counts add up; percents are shares of `n` rounded
/// up. The last stage must reach the whole target.
pub fn plan_stages(stages: &[Stage], n: u32) -> Result<Vec<u32>> {
    let mut ends = Vec::with_capacity(stages.len());
    let mut end: u32 = 0;
    for (i, s) in stages.iter().enumerate() {
        let name = stage_label(i, s);
        let next = if s.device_count > 0 {
            let next = end.saturating_add(s.device_count);
            if next > n {
                return Err(invalid(format!(
                    "{name} needs {} devices but the target has {n} and earlier stages take {end}; \
                     lower its device_count or widen the target",
                    s.device_count
                )));
            }
            next
        } else {
            let next = (u64::from(n) * u64::from(s.percent)).div_ceil(100) as u32;
            next.max(end)
        };
        end = next;
        ends.push(end);
    }
    if end < n {
        return Err(invalid(format!(
            "the stages cover {end} of the target's {n} devices; end with a 100% stage \
             (or narrow the target with target.percent)"
        )));
    }
    Ok(ends)
}

pub fn check_window(w: &MaintenanceWindow) -> Result<()> {
    if let Some(d) = w.days.iter().find(|d| **d > 6) {
        return Err(invalid(format!(
            "window.days has {d}; days are 0 = Monday .. 6 = Sunday (UTC)"
        )));
    }
    if w.start_hour > 23 {
        return Err(invalid(format!(
            "window.start_hour is {}; give 0..23 (UTC)",
            w.start_hour
        )));
    }
    if w.end_hour > 24 {
        return Err(invalid(format!(
            "window.end_hour is {}; give 0..24 (UTC, exclusive)",
            w.end_hour
        )));
    }
    Ok(())
}

/// Whether a UTC weekday (0 = Monday) and hour lie in the window. No window:
/// always. `start_hour > end_hour` wraps past midnight (22-4); the day is
/// the day the hour belongs to.
pub fn in_window(w: Option<&MaintenanceWindow>, weekday: u32, hour: u32) -> bool {
    let Some(w) = w else { return true };
    if !w.days.is_empty() && !w.days.contains(&weekday) {
        return false;
    }
    let (s, e) = (w.start_hour, w.end_hour.min(24));
    if s == e || (s == 0 && e == 24) {
        true
    } else if s < e {
        hour >= s && hour < e
    } else {
        hour >= s || hour < e
    }
}

/// A human description of a window (`mon,tue 02-05 UTC`).
pub fn describe_window(w: Option<&MaintenanceWindow>) -> String {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let Some(w) = w else {
        return "always".into();
    };
    let days = if w.days.is_empty() {
        "every day".to_string()
    } else {
        w.days
            .iter()
            .filter_map(|d| NAMES.get(*d as usize))
            .copied()
            .collect::<Vec<_>>()
            .join(",")
    };
    if w.start_hour == w.end_hour {
        format!("{days}, all day UTC")
    } else {
        format!("{days} {:02}:00-{:02}:00 UTC", w.start_hour, w.end_hour)
    }
}

/// The fleet in a stable pseudo-random order for this rollout, so canaries
/// are spread over the fleet rather than the lowest ids.
pub fn fleet_order(rollout_id: &str, mut ids: Vec<String>) -> Vec<String> {
    let key = |id: &str| {
        let mut h = Sha256::new();
        h.update(rollout_id.as_bytes());
        h.update([0]);
        h.update(id.as_bytes());
        h.finalize().to_vec()
    };
    ids.sort_by_cached_key(|id| key(id));
    ids
}

/// The first `percent` % (rounded up) of a selection; 0 or 100: all of it.
pub fn take_percent(mut ids: Vec<String>, percent: u32) -> Vec<String> {
    if percent == 0 || percent >= 100 {
        return ids;
    }
    let keep = (ids.len() as u64 * u64::from(percent)).div_ceil(100) as usize;
    ids.truncate(keep);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: u32) -> Stage {
        Stage {
            device_count: n,
            ..Default::default()
        }
    }
    fn pct(p: u32) -> Stage {
        Stage {
            percent: p,
            ..Default::default()
        }
    }

    #[test]
    fn canary_then_percents() {
        assert_eq!(
            plan_stages(&[count(2), pct(50), pct(100)], 20).unwrap(),
            vec![2, 10, 20]
        );
        // A small fleet: 50 % of 3 is 2, the canary already took 2.
        assert_eq!(
            plan_stages(&[count(2), pct(50), pct(100)], 3).unwrap(),
            vec![2, 2, 3]
        );
    }

    #[test]
    fn stages_that_do_not_add_up() {
        assert!(plan_stages(&[count(25)], 20).is_err());
        assert!(plan_stages(&[count(2), pct(50)], 20).is_err());
        assert!(check_stages(&[pct(50), pct(50)]).is_err());
        assert!(check_stages(&[pct(120)]).is_err());
        assert!(check_stages(&[]).is_err());
        assert!(
            check_stages(&[Stage {
                percent: 100,
                min_success_ratio: 1.5,
                ..Default::default()
            }])
            .is_err()
        );
    }

    #[test]
    fn windows() {
        let w = MaintenanceWindow {
            days: vec![0, 1, 2, 3, 4],
            start_hour: 2,
            end_hour: 5,
        };
        assert!(in_window(Some(&w), 0, 2));
        assert!(!in_window(Some(&w), 0, 5));
        assert!(!in_window(Some(&w), 5, 3));
        let night = MaintenanceWindow {
            days: vec![],
            start_hour: 22,
            end_hour: 4,
        };
        assert!(in_window(Some(&night), 3, 23));
        assert!(in_window(Some(&night), 3, 1));
        assert!(!in_window(Some(&night), 3, 12));
        assert!(in_window(None, 6, 12));
        assert!(
            check_window(&MaintenanceWindow {
                days: vec![7],
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn percent_of_selection() {
        let ids: Vec<String> = (0..10).map(|i| format!("{i}")).collect();
        assert_eq!(take_percent(ids.clone(), 25).len(), 3);
        assert_eq!(take_percent(ids, 0).len(), 10);
    }
}
