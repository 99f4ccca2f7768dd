//! The Helm chart and the binary agree: every `TRELLIS_*` variable the
//! chart's templates set (or values.yaml documents) is a configuration key
//! the binary knows (figment: `TRELLIS_` prefix, `__` between section and
//! key; the configuration refuses unknown keys, so a stray one stops the
//! pod), and every flag the `helm test` Pod passes to `trellis sim` exists.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use trellis_core::Config;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/trellis")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("chart directory").flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// `TRELLIS_*` names following `prefix` in `text`.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let start = i + prefix.len();
        let end = rest[start..]
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .map_or(rest.len(), |e| start + e);
        if rest[start..end].starts_with("TRELLIS_") {
            out.insert(rest[start..end].to_string());
        }
        rest = &rest[end..];
    }
    out
}

/// Environment variable names the templates set (`name: TRELLIS_...`) and
/// that values.yaml documents (`(TRELLIS_...`).
fn chart_variables() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut templates = Vec::new();
    files(&chart().join("templates"), &mut templates);
    for f in templates {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for n in names_after(&text, "name: ") {
            out.insert((n, f.display().to_string()));
        }
    }
    let values = std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml");
    for n in names_after(&values, "(") {
        out.insert((n, "values.yaml".to_string()));
    }
    out
}

/// Whether `TRELLIS_<var>` names a configuration key, as figment maps it.
fn is_config_key(config: &serde_json::Value, var: &str) -> bool {
    let Some(key) = var.strip_prefix("TRELLIS_") else {
        return false;
    };
    let mut node = config;
    for part in key.to_lowercase().split("__") {
        match node.get(part) {
            Some(next) => node = next,
            None => return false,
        }
    }
    true
}

/// The CLI's own variables (`--gateway-url` and friends), which the
/// configuration ignores on purpose (config.rs).
const CLI_VARIABLES: &[&str] = &[
    "TRELLIS_CONFIG",
    "TRELLIS_GATEWAY_URL",
    "TRELLIS_KEYVAULT_URL",
    "TRELLIS_OTA_URL",
    "TRELLIS_SIGNER_URL",
];

#[test]
fn every_variable_the_chart_sets_is_a_config_key() {
    let config = serde_json::to_value(Config::default()).expect("config as JSON");
    let vars = chart_variables();
    assert!(
        vars.iter()
            .any(|(v, _)| v == "TRELLIS_GATEWAY__DEVICE_LISTEN"),
        "the scan found the chart's variables: {vars:?}"
    );
    let unknown: Vec<String> = vars
        .iter()
        .filter(|(v, _)| !CLI_VARIABLES.contains(&v.as_str()) && !is_config_key(&config, v))
        .map(|(v, f)| format!("{v} ({f})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "the chart sets variables the configuration does not have (a pod with one refuses to start):\n  {}",
        unknown.join("\n  ")
    );
}

#[test]
fn config_key_mapping() {
    let config = serde_json::to_value(Config::default()).expect("config as JSON");
    assert!(is_config_key(&config, "TRELLIS_REGION"));
    assert!(is_config_key(&config, "TRELLIS_GATEWAY__KEEPALIVE_SECS"));
    assert!(is_config_key(&config, "TRELLIS_KEYVAULT__MASTER_KEY_FILE"));
    assert!(!is_config_key(&config, "TRELLIS_GATEWAY__KEEPALIVE"));
    assert!(!is_config_key(&config, "TRELLIS_KEYVAULT_SERVICE_HOST"));
}

#[test]
fn the_helm_test_pod_passes_flags_trellis_sim_has() {
    let pod = std::fs::read_to_string(chart().join("templates/tests/test-smoke.yaml"))
        .expect("test-smoke.yaml");
    let flags: BTreeSet<String> = pod
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| format!("--{}", f.split('=').next().unwrap_or(f)))
        .collect();
    assert!(flags.contains("--smoke"), "{flags:?}");
    let help = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["sim", "--help"])
        .output()
        .expect("trellis sim --help");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for f in &flags {
        assert!(
            help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
            "`trellis sim` has no flag {f} (the helm test Pod passes it):\n{help}"
        );
    }
}
