//! Metric names: which ones the Grafana dashboard and the Prometheus rules
//! use, which ones `docs/metrics.md` documents, and which ones a live
//! `/metrics` page exposes. Shared by `tests/deploy.rs` (dashboard and rules
//! against the docs) and the worker's tests (a live scrape against the same
//! names). Include it with
//!
//! ```ignore
//! #[path = "common/deploy_names.rs"]
//! mod deploy_names;
//! ```
//!
//! The PromQL reading here is a small lexer, not a parser: it finds every
//! identifier that is not a function, a keyword, a label name in a grouping
//! clause, or inside `{…}` (label matchers), `[…]` (ranges), strings or
//! Grafana `$variables`. That is exactly the set of metric names, for the
//! expressions the dashboard and the rules contain.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The dashboard, relative to the repository root.
pub const DASHBOARD: &str = "deploy/grafana/dashboards/triagem.json";
/// The alert rules, relative to the repository root.
pub const RULES: &str = "deploy/prometheus/rules/triagem.rules.yml";
/// The metrics contract, relative to the repository root.
pub const METRICS_DOC: &str = "docs/metrics.md";
/// Series that Prometheus itself makes (not the worker): allowed in queries, never scraped.
pub const PROMETHEUS_SERIES: &[&str] = &["up"];
/// Suffixes Prometheus adds to a histogram's name.
pub const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// PromQL words that look like identifiers but are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
];
/// Aggregation operators: `sum by (x) (…)` puts a grouping clause between the name and `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Every metric name in one PromQL expression.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_until_close(&chars, i, '{', '}'),
            '[' => i = skip_until_close(&chars, i, '[', ']'),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                // Grafana variable: $name, ${name}, ${name:format}.
                i += 1;
                if i < chars.len() && chars[i] == '{' {
                    i = skip_until_close(&chars, i, '{', '}');
                } else {
                    while i < chars.len() && is_ident_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) => {
                // A number or a duration: 0.95, 1e-3, 0x1f, 5m, 1h30m.
                i += 1;
                while i < chars.len() {
                    let d = chars[i];
                    let exponent_sign = (d == '+' || d == '-') && matches!(chars[i - 1], 'e' | 'E');
                    if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                // A function call, or an aggregation written `sum by (le) (…)`.
                let called = j < chars.len()
                    && (chars[j] == '('
                        || (AGGREGATIONS.contains(&lower.as_str()) && next_word_is_grouping(&chars[j..])));
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if called {
                        i = skip_until_close(&chars, j, '(', ')');
                    }
                } else if !called && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Whether `rest` starts with `by` or `without` followed by `(`.
fn next_word_is_grouping(rest: &[char]) -> bool {
    let word: String = rest.iter().take_while(|c| is_ident_char(**c)).collect();
    let after = rest[word.len()..].iter().find(|c| !c.is_whitespace());
    matches!(word.to_ascii_lowercase().as_str(), "by" | "without") && after == Some(&'(')
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal opening at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    i
}

/// Index just past the bracket that closes the one at `start` (strings inside are skipped).
fn skip_until_close(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    i
}

/// Every PromQL expression of a Grafana dashboard: panel targets (also inside
/// collapsed rows) and the queries of query variables. A variable query
/// `label_values(selector, label)` yields its selector.
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn panel_exprs(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            panel_exprs(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panel_exprs(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or_default();
        out.push(grafana_variable_expr(query));
    }
    out
}

/// The PromQL part of a Grafana Prometheus variable query.
fn grafana_variable_expr(query: &str) -> String {
    let q = query.trim();
    for func in ["label_values(", "query_result("] {
        if let Some(inner) = q.strip_prefix(func).and_then(|r| r.strip_suffix(')')) {
            if func == "label_values(" {
                // label_values(label) or label_values(selector, label): drop the label argument.
                return match inner.rfind(',') {
                    Some(comma) if inner[comma..].find('}').is_none() => inner[..comma].to_string(),
                    _ => String::new(),
                };
            }
            return inner.to_string();
        }
    }
    for func in ["metrics(", "label_names("] {
        if q.starts_with(func) {
            return String::new();
        }
    }
    q.to_string()
}

/// Every `expr` of a Prometheus rule file (alerting and recording rules).
pub fn rule_exprs(rules_yaml: &str) -> Result<Vec<String>, serde_yaml::Error> {
    let doc: serde_yaml::Value = serde_yaml::from_str(rules_yaml)?;
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            if let Some(expr) = rule["expr"].as_str() {
                out.push(expr.to_string());
            }
        }
    }
    Ok(out)
}

/// Metric names the dashboard and the alert rules use, each with where it is used.
pub fn referenced_metric_names(repo_root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dashboard_text = std::fs::read_to_string(repo_root.join(DASHBOARD)).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("dashboard is JSON");
    for expr in dashboard_exprs(&dashboard) {
        for name in promql_metric_names(&expr) {
            names.entry(name).or_default().insert(DASHBOARD.to_string());
        }
    }
    let rules_text = std::fs::read_to_string(repo_root.join(RULES)).expect("read the alert rules");
    for expr in rule_exprs(&rules_text).expect("rules are YAML") {
        for name in promql_metric_names(&expr) {
            names.entry(name).or_default().insert(RULES.to_string());
        }
    }
    names
}

/// The metrics table of `docs/metrics.md`: name → type (`counter`, `histogram`, …).
/// A cell may list several names (the process collector's row).
pub fn documented_metrics(markdown: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in markdown.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 {
            continue;
        }
        let kind = cells[1].to_ascii_lowercase();
        for (n, part) in cells[0].split('`').enumerate() {
            // Odd pieces are inside backticks.
            if n % 2 == 1 && part.starts_with("triagem_") {
                out.insert(part.to_string(), kind.clone());
            }
        }
    }
    out
}

/// The documented metric a queried name belongs to: itself, or the histogram
/// whose `_bucket`/`_sum`/`_count` series it is. `None` when undocumented.
pub fn documented_base<'a>(name: &str, documented: &'a BTreeMap<String, String>) -> Option<&'a str> {
    if let Some((k, _)) = documented.get_key_value(name) {
        return Some(k.as_str());
    }
    for suffix in HISTOGRAM_SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some((k, kind)) = documented.get_key_value(base) {
                if kind.contains("histogram") {
                    return Some(k.as_str());
                }
            }
        }
    }
    None
}

/// Metric (sample) names on a Prometheus text-format page such as a worker's
/// `/metrics`: histograms appear as their `_bucket`/`_sum`/`_count` series.
/// A labelled metric that has no child yet has no sample and is absent.
pub fn exposed_metric_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(|c: char| c == '{' || c.is_whitespace()).next())
        .map(str::to_string)
        .collect()
}
